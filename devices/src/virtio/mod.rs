//! virtio (OASIS virtio 1.2): device models on rust-vmm's virtio-queue,
//! and the two transports they sit on, virtio-pci (modern, `pci`) and
//! virtio-mmio (version 2, `mmio`).
//!
//! A device model implements [`VirtioDevice`]: its type, features,
//! queues and what it does with a queue's buffers. [`VirtioCore`] is what
//! both transports share: feature negotiation, the status machine and the
//! queues. Devices reach guest memory through vm-memory; interrupts and
//! queue notifications go through the transports to traits the VMM
//! implements (and ioeventfds it registers), so no KVM fd is held here.

pub mod blk;
pub mod console;
pub mod fs;
pub mod mmio;
pub mod pci;
pub mod rng;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

/// Feature bits (virtio 1.2, "Reserved Feature Bits").
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2, "Device Status Field").
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Serve `queue` a chain at a time with `serve_one` (false: the ring is
/// empty), at most one pass over the ring per notification so a driver
/// that keeps refilling it cannot hold the thread; whether any chain was
/// used.
pub fn serve_ring(queue: &mut Queue, mut serve_one: impl FnMut(&mut Queue) -> bool) -> bool {
    let mut used = false;
    for _ in 0..queue.size() {
        if !serve_one(queue) {
            break;
        }
        used = true;
    }
    used
}

/// A request taken from a ring: its head, its descriptors, and whether
/// the chain ended where the driver ended it (false: cut short by a
/// loop or a bad next index).
pub struct Request {
    pub head: u16,
    pub descs: Vec<virtio_queue::desc::split::Descriptor>,
    pub ended: bool,
}

/// Take the next request of `queue` and return it as used with the byte
/// count `serve` gives; false if there was none or it could not be
/// returned (`device` names the device in that warning).
pub fn serve_request(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    device: &str,
    serve: impl FnOnce(&Request) -> u32,
) -> bool {
    let Some(chain) = queue.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let ended = descs.last().is_some_and(|d| !d.has_next());
    let used = serve(&Request { head, descs, ended });
    if let Err(e) = queue.add_used(mem, head, used) {
        log::warn!("{device}: cannot return request {head}: {e}");
        return false;
    }
    true
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2: block device, 3: console, 4: entropy source).
    fn device_type(&self) -> u32;
    /// Features offered, `VIRTIO_F_VERSION_1` included.
    fn features(&self) -> u64;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// A read of the device-specific configuration at `offset`.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Take the available buffers of queue `index`; true if any was used
    /// (the driver is to be interrupted). A malformed request is answered
    /// (used, with what was written before the fault), never a panic.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Back to the state after reset.
    fn reset(&mut self) {}
    /// Whether queue `index` only takes the driver's output and is
    /// served once more before a reset: a notification the driver sent
    /// before it reset the device may still wait in the queue's
    /// ioeventfd when the reset reaches the registers on a vCPU (Linux
    /// resets every virtio device at power-off, right after a console
    /// port's last write, which does not wait for the device).
    fn drains_before_reset(&self, _index: usize) -> bool {
        false
    }
    /// Event fds the VMM watches as if they were the notifications of
    /// the queues paired with them: the device's own ways to have a
    /// queue looked at again (host input arrived, room in an output,
    /// messages to send on another queue).
    fn wakers(&self) -> Vec<(u16, Arc<EventFd>)> {
        Vec::new()
    }
    /// Whether the device's work must not run on a vCPU thread (it
    /// opens files, which a vCPU thread's seccomp filter refuses): a
    /// notification through the register is then handed to the queue's
    /// event fd, which the VMM thread serves.
    fn serves_on_vmm_thread(&self) -> bool {
        false
    }
}

/// A transport the driver notifies of new buffers in a queue, through the
/// VMM's ioeventfd (or a write that reached the device).
pub trait QueueNotify: Send {
    fn notify(&mut self, queue: u16);
}

/// A queue's state as a snapshot keeps it (virtio-queue's `QueueState`,
/// which is not serializable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_sel: u16,
    pub queues: Vec<QueueState>,
    pub config_generation: u8,
}

/// The transport-independent part of a virtio device.
pub struct VirtioCore<D> {
    pub dev: D,
    mem: GuestMemoryMmap,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u8,
    queue_sel: u16,
    queues: Vec<Queue>,
    config_generation: u8,
    /// Each queue's event fd, for `serves_on_vmm_thread()` devices.
    handoff: Vec<Arc<EventFd>>,
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes
        .iter()
        // A device's maximum sizes are powers of two up to 32768.
        .map(|&s| Queue::new(s).unwrap_or_else(|_| Queue::new(256).expect("queue size")))
        .collect()
}

/// Whether the rings of `q` lie in guest memory (virtio 1.2, "Virtqueues":
/// descriptor table 16 bytes per entry, driver ring 6 + 2n, device ring
/// 6 + 8n).
fn rings_in_memory(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    let n = usize::from(q.size());
    [
        (q.desc_table(), 16 * n, Permissions::Read),
        (q.avail_ring(), 6 + 2 * n, Permissions::Read),
        (q.used_ring(), 6 + 8 * n, Permissions::Write),
    ]
    .iter()
    .all(|&(a, len, p)| mem.check_range(GuestAddress(a), len, p))
}

impl<D: VirtioDevice> VirtioCore<D> {
    pub fn new(dev: D, mem: GuestMemoryMmap) -> Self {
        let queues = new_queues(dev.queue_max_sizes());
        VirtioCore {
            dev,
            mem,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            queue_sel: 0,
            queues,
            config_generation: 0,
            handoff: Vec::new(),
        }
    }

    /// The event fds the VMM thread watches, one per queue in order.
    pub fn set_handoff(&mut self, fds: Vec<Arc<EventFd>>) {
        self.handoff = fds;
    }

    /// A notification that reached the registers (on a vCPU thread):
    /// true if it was handed to the VMM thread instead of being served.
    pub fn hand_off(&self, index: u16) -> bool {
        if !self.dev.serves_on_vmm_thread() {
            return false;
        }
        match self.handoff.get(usize::from(index)) {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    log::warn!("virtio: cannot hand queue {index} to the VMM thread: {e}");
                }
                true
            }
            None => false,
        }
    }

    pub fn status(&self) -> u8 {
        self.status
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.dev.features() as u32,
            1 => (self.dev.features() >> 32) as u32,
            _ => 0,
        }
    }

    pub fn select_device_features(&mut self, sel: u32) {
        self.device_features_sel = sel;
    }

    pub fn select_driver_features(&mut self, sel: u32) {
        self.driver_features_sel = sel;
    }

    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver's features, only before FEATURES_OK.
    pub fn write_driver_features(&mut self, word: u32) {
        if self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            _ => return,
        };
        let mask = 0xffff_ffffu64 << shift;
        self.driver_features = (self.driver_features & !mask) | (u64::from(word) << shift);
    }

    /// A status write: 0 resets; FEATURES_OK stays clear unless the
    /// driver took only offered features and VERSION_1.
    pub fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.dev.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                log::debug!(
                    "virtio: driver features {:#x} not a subset of {offered:#x} with VERSION_1",
                    self.driver_features
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
    }

    pub fn reset(&mut self) {
        // A device that serves on the VMM thread cannot be served here
        // (a vCPU thread's filter refuses its calls); none drains.
        if !self.dev.serves_on_vmm_thread() {
            for i in 0..self.queues.len() {
                if self.dev.drains_before_reset(i) {
                    self.notify(i as u16);
                }
            }
        }
        self.dev.reset();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_sel = 0;
        self.queues = new_queues(self.dev.queue_max_sizes());
    }

    pub fn queue_sel(&self) -> u16 {
        self.queue_sel
    }

    pub fn select_queue(&mut self, q: u16) {
        self.queue_sel = q;
    }

    /// The selected queue, if it exists.
    pub fn queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_sel))
    }

    /// The selected queue, while the driver may still configure it.
    pub fn queue_mut(&mut self) -> Option<&mut Queue> {
        if self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_sel))
    }

    /// The selected queue while its size and ring addresses may change:
    /// before DRIVER_OK and while it is not enabled. The driver must set
    /// them before it enables the queue (virtio 1.2, "Virtqueue
    /// Configuration"); taking them later would let an enabled queue's
    /// rings leave guest memory, and such a state would not restore.
    pub fn queue_layout_mut(&mut self) -> Option<&mut Queue> {
        self.queue_mut().filter(|q| !q.ready())
    }

    /// The driver enables (or disables) the selected queue; a queue whose
    /// rings are not in guest memory stays disabled.
    pub fn set_queue_ready(&mut self, ready: bool) {
        let mem = self.mem.clone();
        let Some(q) = self.queue_mut() else {
            return;
        };
        if ready && !rings_in_memory(q, &mem) {
            log::warn!("virtio: queue rings outside guest memory; queue left disabled");
            return;
        }
        q.set_ready(ready);
    }

    /// The driver notified queue `index`: process it if the device runs;
    /// true if the driver is to be interrupted.
    pub fn notify(&mut self, index: u16) -> bool {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return false;
        }
        let Some(q) = self.queues.get_mut(usize::from(index)) else {
            return false;
        };
        if !q.ready() {
            return false;
        }
        self.dev.process_queue(usize::from(index), q, &self.mem)
    }

    pub fn config_generation(&self) -> u8 {
        self.config_generation
    }

    pub fn state(&self) -> CoreState {
        CoreState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            status: self.status,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
            config_generation: self.config_generation,
        }
    }

    /// Take a saved state of the same device.
    pub fn restore(&mut self, s: &CoreState) -> Result<(), String> {
        let max = self.dev.queue_max_sizes().to_vec();
        if s.queues.len() != max.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                s.queues.len(),
                max.len()
            ));
        }
        let mut queues = Vec::with_capacity(max.len());
        for (i, (qs, &m)) in s.queues.iter().zip(&max).enumerate() {
            let mut q = Queue::new(m).map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_size(qs.size)
                .map_err(|e| format!("queue {i}: size {}: {e}", qs.size))?;
            q.try_set_desc_table_address(GuestAddress(qs.desc_table))
                .map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_avail_ring_address(GuestAddress(qs.avail_ring))
                .map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_used_ring_address(GuestAddress(qs.used_ring))
                .map_err(|e| format!("queue {i}: {e}"))?;
            q.set_next_avail(qs.next_avail);
            q.set_next_used(qs.next_used);
            if qs.ready && !rings_in_memory(&q, &self.mem) {
                return Err(format!("queue {i}: rings outside guest memory"));
            }
            q.set_ready(qs.ready);
            queues.push(q);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    /// 1 MiB of guest memory at 0.
    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    use super::*;

    /// One output queue: counts the chains it takes.
    struct Out(usize);

    impl VirtioDevice for Out {
        fn device_type(&self) -> u32 {
            3
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn process_queue(&mut self, _: usize, q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
            serve_ring(q, |q| {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    return false;
                };
                self.0 += 1;
                q.add_used(mem, chain.head_index(), 0).is_ok()
            })
        }
        fn drains_before_reset(&self, index: usize) -> bool {
            index == 0
        }
    }

    #[test]
    fn output_queued_before_a_reset_is_served_first() {
        let mem = test_utils::memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut core = VirtioCore::new(Out(0), mem.clone());
        core.select_driver_features(1);
        core.write_driver_features(1);
        core.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        core.select_queue(0);
        let q = core.queue_layout_mut().unwrap();
        q.set_size(16);
        let (d, a, u) = (
            mock.desc_table_addr().0,
            mock.avail_addr().0,
            mock.used_addr().0,
        );
        q.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
        q.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
        q.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
        core.set_queue_ready(true);
        core.write_status(
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(core.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        assert!(core.queue().unwrap().ready());
        // Queued, its notification not handed on yet, then the reset.
        let desc = Descriptor::new(0x8000, 16, 0, 0);
        mock.add_desc_chains(&[RawDescriptor::from(desc)], 0)
            .unwrap();
        core.write_status(0);
        assert_eq!(core.dev.0, 1);
        assert_eq!(mock.used().idx().load(), 1);
    }
}
