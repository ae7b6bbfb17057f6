//! The virtio-mmio transport, version 2 (virtio 1.2, "Virtio Over MMIO"):
//! a 4 KiB register window and a level-triggered interrupt line that is
//! high while the interrupt status is not zero.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{CoreState, VirtioCore, VirtioDevice};
use crate::{IrqLine, Persist, RestoreError};

/// Bytes of the register window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// The register the driver writes a queue's index to.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "QEMU", as QEMU's virtio-mmio reports it; drivers do not check it.
const VENDOR: u32 = 0x554d_4551;
const CONFIG: u64 = 0x100;
const INT_USED_BUFFER: u32 = 1;

/// A virtio device on an MMIO window, interrupting through GSI `gsi`.
pub struct VirtioMmio<D> {
    core: VirtioCore<D>,
    irq: Arc<dyn IrqLine>,
    gsi: u32,
    interrupt_status: u32,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(dev: D, mem: GuestMemoryMmap, irq: Arc<dyn IrqLine>, gsi: u32) -> Self {
        VirtioMmio {
            core: VirtioCore::new(dev, mem),
            irq,
            gsi,
            interrupt_status: 0,
        }
    }

    pub fn core(&self) -> &VirtioCore<D> {
        &self.core
    }

    /// See `VirtioCore::set_handoff()`.
    pub fn set_handoff(&mut self, fds: Vec<Arc<vmm_sys_util::eventfd::EventFd>>) {
        self.core.set_handoff(fds);
    }

    /// Queue notifications as `(offset in the window, value written)`,
    /// for the VMM's ioeventfds.
    pub fn notifications(&self) -> Vec<(u64, u32)> {
        (0..self.core.num_queues() as u32)
            .map(|q| (QUEUE_NOTIFY, q))
            .collect()
    }

    /// The driver notified queue `q` (by a write the VMM's ioeventfd took,
    /// or one that reached the window).
    fn notify_queue(&mut self, q: u16) {
        if self.core.notify(q) {
            self.interrupt_status |= INT_USED_BUFFER;
            self.irq.set_level(self.gsi, true);
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let c = &self.core;
        let q = c.queue();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => c.dev.device_type(),
            0x0c => VENDOR,
            0x10 => c.device_features_word(),
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt_status,
            0x70 => u32::from(c.status()),
            0xfc => u32::from(c.config_generation()),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let c = &mut self.core;
        match offset {
            0x14 => c.select_device_features(v),
            0x20 => c.write_driver_features(v),
            0x24 => c.select_driver_features(v),
            0x30 => c.select_queue(v as u16),
            0x38 => {
                if let Some(q) = c.queue_layout_mut() {
                    if q.try_set_size(v as u16).is_err() {
                        log::debug!("virtio-mmio: queue size {v} refused");
                    }
                }
            }
            0x44 => c.set_queue_ready(v == 1),
            QUEUE_NOTIFY if c.hand_off(v as u16) => {}
            QUEUE_NOTIFY => self.notify_queue(v as u16),
            0x64 => {
                self.interrupt_status &= !v;
                if self.interrupt_status == 0 {
                    self.irq.set_level(self.gsi, false);
                }
            }
            0x70 => {
                c.write_status(v as u8);
                if v == 0 {
                    self.interrupt_status = 0;
                    self.irq.set_level(self.gsi, false);
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(q) = c.queue_layout_mut() else {
                    return;
                };
                let (cur, high) = match offset & !0x4 {
                    0x80 => (q.desc_table(), offset & 4 != 0),
                    0x90 => (q.avail_ring(), offset & 4 != 0),
                    _ => (q.used_ring(), offset & 4 != 0),
                };
                let a = if high {
                    (cur & 0xffff_ffff) | u64::from(v) << 32
                } else {
                    (cur & !0xffff_ffff) | u64::from(v)
                };
                let r = match offset & !0x4 {
                    0x80 => q.try_set_desc_table_address(GuestAddress(a)),
                    0x90 => q.try_set_avail_ring_address(GuestAddress(a)),
                    _ => q.try_set_used_ring_address(GuestAddress(a)),
                };
                if r.is_err() {
                    log::debug!("virtio-mmio: misaligned ring address {a:#x} refused");
                }
            }
            _ => {}
        }
    }
}

impl<D: VirtioDevice> MutDeviceMmio for VirtioMmio<D> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset >= CONFIG {
            self.core.dev.read_config(offset - CONFIG, data);
            return;
        }
        // Registers are 32-bit; other accesses read 0.
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= CONFIG {
            self.core.dev.write_config(offset - CONFIG, data);
            return;
        }
        if let Ok(b) = <[u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                self.write_reg(offset, u32::from_le_bytes(b));
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState<S> {
    pub core: CoreState,
    pub interrupt_status: u32,
    pub device: S,
}

impl<D: VirtioDevice + Persist> Persist for VirtioMmio<D> {
    type State = VirtioMmioState<D::State>;
    /// Guest memory, the interrupt line, its GSI and the device model's
    /// arguments.
    type Args = (GuestMemoryMmap, Arc<dyn IrqLine>, u32, D::Args);
    type Error = RestoreError;

    fn save(&self) -> Self::State {
        VirtioMmioState {
            core: self.core.state(),
            interrupt_status: self.interrupt_status,
            device: self.core.dev.save(),
        }
    }

    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, RestoreError> {
        let (mem, irq, gsi, dev_args) = args;
        let bad = |reason: String| RestoreError::Invalid {
            device: "virtio-mmio",
            reason,
        };
        let dev = D::restore(dev_args, &state.device).map_err(|e| bad(e.to_string()))?;
        let mut t = VirtioMmio::new(dev, mem, irq, gsi);
        t.core.restore(&state.core).map_err(bad)?;
        t.interrupt_status = state.interrupt_status;
        // The line's level lives in the IOAPIC, which the VM's state holds;
        // raise it again in case the interrupt was not taken yet.
        if t.interrupt_status != 0 {
            t.irq.set_level(gsi, true);
        }
        Ok(t)
    }
}

impl<D: VirtioDevice> super::QueueNotify for VirtioMmio<D> {
    fn notify(&mut self, queue: u16) {
        self.notify_queue(queue);
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;
    use crate::test_utils::IrqRecorder;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::memory;
    use crate::virtio::*;

    fn rd(t: &mut VirtioMmio<Rng>, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.mmio_read(MmioAddress(0), off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut VirtioMmio<Rng>, off: u64, v: u32) {
        t.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
    }

    /// A driver's initialization with the queue of `mock`.
    fn bring_up(t: &mut VirtioMmio<Rng>, mock: &MockSplitQueue<GuestMemoryMmap>) {
        wr(t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        wr(t, 0x14, 1);
        assert_eq!(rd(t, 0x10), 1, "VERSION_1 offered");
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        wr(
            t,
            0x70,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        );
        assert_ne!(rd(t, 0x70) & u32::from(STATUS_FEATURES_OK), 0);
        wr(t, 0x30, 0);
        assert_eq!(rd(t, 0x34), 256);
        wr(t, 0x38, 16);
        for (off, a) in [
            (0x80, mock.desc_table_addr().0),
            (0x90, mock.avail_addr().0),
            (0xa0, mock.used_addr().0),
        ] {
            wr(t, off, a as u32);
            wr(t, off + 4, (a >> 32) as u32);
        }
        wr(t, 0x44, 1);
        assert_eq!(rd(t, 0x44), 1);
        wr(
            t,
            0x70,
            u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
        );
    }

    #[test]
    fn identifies_as_virtio_mmio_2() {
        let irq = Arc::new(IrqRecorder::default());
        let mut t = VirtioMmio::new(Rng::new(), memory(), irq, 20);
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), 4);
        // Narrow register reads are not registers.
        let mut b = [0u8; 1];
        t.mmio_read(MmioAddress(0), 0, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn serves_requests_and_interrupts() {
        let mem = memory();
        let irq = Arc::new(IrqRecorder::default());
        let mut t = VirtioMmio::new(Rng::new(), mem.clone(), irq.clone(), 20);
        let mock = MockSplitQueue::new(&mem, 16);
        bring_up(&mut t, &mock);
        let d = Descriptor::new(0x8000, 16, 2, 0);
        mock.add_desc_chains(&[RawDescriptor::from(d)], 0).unwrap();
        wr(&mut t, QUEUE_NOTIFY, 0);
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(rd(&mut t, 0x60), 1);
        assert_eq!(irq.take(), vec![(20, true)]);
        wr(&mut t, 0x64, 1);
        assert_eq!(irq.take(), vec![(20, false)]);

        // Saved and restored: the queue goes on where it was.
        let s = t.save();
        let irq2 = Arc::new(IrqRecorder::default());
        let mut t2 = VirtioMmio::<Rng>::restore((mem.clone(), irq2, 20, ()), &s).unwrap();
        assert_eq!(t2.save(), s);
        mock.add_desc_chains(&[RawDescriptor::from(d)], 1).unwrap();
        t2.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 2);
        let mut buf = [0u8; 16];
        mem.read_slice(&mut buf, GuestAddress(0x8000)).unwrap();
    }

    /// Found by the pci_config fuzz target: an enabled queue resized or
    /// moved until its rings left guest memory saved a state that its
    /// own restore refused.
    #[test]
    fn an_enabled_queue_keeps_its_size_and_rings() {
        let mem = memory();
        let irq = Arc::new(IrqRecorder::default());
        let mut t = VirtioMmio::new(Rng::new(), mem.clone(), irq, 20);
        let mock = MockSplitQueue::new(&mem, 16);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 16);
        for (off, a) in [
            (0x80, mock.desc_table_addr().0),
            (0x90, mock.avail_addr().0),
            (0xa0, mock.used_addr().0),
        ] {
            wr(&mut t, off, a as u32);
        }
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 1);
        wr(&mut t, 0x38, 256);
        wr(&mut t, 0x80, 0xfff0_0000);
        wr(&mut t, 0xa4, 0xffff);
        let s = t.save();
        assert_eq!(s.core.queues[0].size, 16);
        assert_eq!(s.core.queues[0].desc_table, mock.desc_table_addr().0);
        let irq2 = Arc::new(IrqRecorder::default());
        VirtioMmio::<Rng>::restore((mem, irq2, 20, ()), &s).unwrap();
    }

    #[test]
    fn refuses_what_a_driver_must_not_do() {
        let mem = memory();
        let irq = Arc::new(IrqRecorder::default());
        let mut t = VirtioMmio::new(Rng::new(), mem, irq, 20);
        // Features it does not offer: FEATURES_OK stays clear.
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 5);
        wr(&mut t, 0x70, u32::from(STATUS_FEATURES_OK));
        assert_eq!(rd(&mut t, 0x70) & u32::from(STATUS_FEATURES_OK), 0);
        // Rings outside guest memory: the queue stays disabled.
        wr(&mut t, 0x38, 16);
        wr(&mut t, 0x80, 0xfff0_0000);
        wr(&mut t, 0x44, 1);
        assert_eq!(rd(&mut t, 0x44), 0);
        // A queue that does not exist, a size that is not a power of two.
        wr(&mut t, 0x30, 7);
        assert_eq!(rd(&mut t, 0x34), 0);
        wr(&mut t, 0x38, 16);
        t.notify_queue(7);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 15);
        // Notified before DRIVER_OK: nothing happens.
        t.notify_queue(0);
        // A state with another queue count is refused.
        let mut s = t.save();
        s.core.queues.push(QueueState::default());
        let irq2 = Arc::new(IrqRecorder::default());
        assert!(VirtioMmio::<Rng>::restore((memory(), irq2, 20, ()), &s).is_err());
    }
}
