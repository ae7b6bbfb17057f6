//! The virtio-pci transport, modern only (virtio 1.2, "Virtio Over PCI
//! Bus"): one 64-bit memory BAR holding the common configuration, ISR,
//! device configuration, queue notification and MSI-X structures, each
//! found through a vendor-specific capability. Interrupts go through
//! MSI-X when the driver enables it, else through INTA (the ISR).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{CoreState, VirtioCore, VirtioDevice};
use crate::pci::config::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE};
use crate::pci::msix::{Msix, MsixState};
use crate::pci::{BarKind, BarSpec, PciConfig, PciConfigState, PciDevice, PciId};
use crate::{IrqLine, MsiVectors, Persist, RestoreError};

/// BAR 0's layout.
pub const BAR: u8 = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
pub const NOTIFY: u64 = 0x3000;
/// Queue q's notification address is `NOTIFY + q * NOTIFY_MULTIPLIER`.
pub const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION: u64 = 0x1000;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;

pub const NO_VECTOR: u16 = 0xffff;

/// A virtio device on PCI.
pub struct VirtioPci<D> {
    core: VirtioCore<D>,
    config: PciConfig,
    msix: Msix,
    /// The MSI-X vector of each queue and of configuration changes.
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: u8,
    intx: Arc<dyn IrqLine>,
    intx_gsi: u32,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability.
    cfg_cap: usize,
}

/// A virtio_pci_cap body (after ID and next pointer).
fn cap(len: u8, cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut b = vec![len, cfg_type, BAR, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend_from_slice(extra);
    b
}

impl<D: VirtioDevice> VirtioPci<D> {
    /// `dev` on PCI, its MSI-X vectors raised through `vectors`, INTA
    /// through `intx` on GSI `intx_gsi`.
    pub fn new(
        dev: D,
        mem: GuestMemoryMmap,
        vectors: Arc<dyn MsiVectors>,
        intx: Arc<dyn IrqLine>,
        intx_gsi: u32,
    ) -> Self {
        let id = PciId {
            vendor: 0x1af4,
            device: 0x1040 + dev.device_type() as u16,
            revision: 1,
            class: (0xff, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        };
        let mut config = PciConfig::new(id, true);
        config.add_bar(
            usize::from(BAR),
            BarSpec {
                kind: BarKind::Mem64,
                size: BAR_SIZE,
                prefetchable: false,
            },
        );
        let nq = dev.queue_max_sizes().len();
        config.add_capability(
            CAP_VENDOR,
            &cap(16, CAP_COMMON, COMMON, COMMON_LEN, &[]),
            &[],
        );
        config.add_capability(CAP_VENDOR, &cap(16, CAP_ISR, ISR, 1, &[]), &[]);
        config.add_capability(CAP_VENDOR, &cap(16, CAP_DEVICE, DEVICE, REGION, &[]), &[]);
        config.add_capability(
            CAP_VENDOR,
            &cap(
                20,
                CAP_NOTIFY,
                NOTIFY,
                u64::from(NOTIFY_MULTIPLIER) * nq as u64,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        );
        // The configuration access window: bar, offset, length and data
        // are the driver's to write.
        let mut wmask = vec![0u8; 18];
        wmask[2] = 0xff;
        wmask[6..18].fill(0xff);
        let cfg_cap =
            config.add_capability(CAP_VENDOR, &cap(20, CAP_PCI_CFG, 0, 0, &[0; 4]), &wmask);
        // One vector per queue and one for configuration changes.
        let msix = Msix::new(
            &mut config,
            nq as u16 + 1,
            (BAR, MSIX_TABLE as u32),
            (BAR, MSIX_PBA as u32),
            vectors,
        );
        VirtioPci {
            core: VirtioCore::new(dev, mem),
            config,
            msix,
            queue_vectors: vec![NO_VECTOR; nq],
            config_vector: NO_VECTOR,
            isr: 0,
            intx,
            intx_gsi,
            cfg_cap,
        }
    }

    pub fn core(&self) -> &VirtioCore<D> {
        &self.core
    }

    /// See `VirtioCore::set_handoff()`.
    pub fn set_handoff(&mut self, fds: Vec<Arc<vmm_sys_util::eventfd::EventFd>>) {
        self.core.set_handoff(fds);
    }

    /// Queue notifications as offsets in BAR 0 (any width, any value),
    /// for the VMM's ioeventfds.
    pub fn notifications(&self) -> Vec<u64> {
        (0..self.core.num_queues() as u64)
            .map(|q| NOTIFY + q * u64::from(NOTIFY_MULTIPLIER))
            .collect()
    }

    /// The driver notified queue `q`.
    fn notify_queue(&mut self, q: u16) {
        // Without bus mastering the device may not touch guest memory.
        if self.config.command() & COMMAND_BUS_MASTER == 0 {
            log::debug!("virtio-pci: queue {q} notified without bus mastering");
            return;
        }
        if self.core.notify(q) {
            self.interrupt_queue(usize::from(q));
        }
    }

    fn interrupt_queue(&mut self, q: usize) {
        if self.msix.enabled() {
            let v = self.queue_vectors.get(q).copied().unwrap_or(NO_VECTOR);
            if v != NO_VECTOR {
                self.msix.signal(v);
            }
            return;
        }
        self.isr |= 1;
        if self.config.command() & COMMAND_INTX_DISABLE == 0 {
            self.intx.set_level(self.intx_gsi, true);
        }
    }

    fn reset(&mut self) {
        self.core.reset();
        self.queue_vectors.fill(NO_VECTOR);
        self.config_vector = NO_VECTOR;
        self.isr = 0;
        self.intx.set_level(self.intx_gsi, false);
    }

    /// A vector the driver may assign: one the table has.
    fn vector(&self, v: u16) -> u16 {
        if u64::from(v) < self.msix.table_len() / 16 {
            v
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&self, off: u64, len: usize) -> u64 {
        let c = &self.core;
        let q = c.queue();
        let qsel = usize::from(c.queue_sel());
        match (off, len) {
            (0x00, 4) => 0,
            (0x04, 4) => u64::from(c.device_features_word()),
            (0x08, 4) => 0,
            (0x0c, 4) => u64::from(c.driver_features_word()),
            (0x10, 2) => u64::from(self.config_vector),
            (0x12, 2) => c.num_queues() as u64,
            (0x14, 1) => u64::from(c.status()),
            (0x15, 1) => u64::from(c.config_generation()),
            (0x16, 2) => u64::from(c.queue_sel()),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size())),
            (0x1a, 2) => self
                .queue_vectors
                .get(qsel)
                .map_or(u64::from(NO_VECTOR), |&v| u64::from(v)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready())),
            (0x1e, 2) => qsel as u64,
            (0x20, 4) => q.map_or(0, |q| q.desc_table() & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc_table() >> 32),
            (0x28, 4) => q.map_or(0, |q| q.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail_ring() >> 32),
            (0x30, 4) => q.map_or(0, |q| q.used_ring() & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used_ring() >> 32),
            (0x20 | 0x28 | 0x30, 8) => {
                (self.read_common(off + 4, 4) << 32) | self.read_common(off, 4)
            }
            _ => 0,
        }
    }

    fn write_common(&mut self, off: u64, len: usize, v: u64) {
        let qsel = usize::from(self.core.queue_sel());
        match (off, len) {
            (0x00, 4) => self.core.select_device_features(v as u32),
            (0x08, 4) => self.core.select_driver_features(v as u32),
            (0x0c, 4) => self.core.write_driver_features(v as u32),
            (0x10, 2) => self.config_vector = self.vector(v as u16),
            (0x14, 1) => {
                if v == 0 {
                    self.reset();
                } else {
                    self.core.write_status(v as u8);
                }
            }
            (0x16, 2) => self.core.select_queue(v as u16),
            (0x18, 2) => {
                if let Some(q) = self.core.queue_layout_mut() {
                    if q.try_set_size(v as u16).is_err() {
                        log::debug!("virtio-pci: queue size {v} refused");
                    }
                }
            }
            (0x1a, 2) => {
                let vec = self.vector(v as u16);
                if let Some(slot) = self.queue_vectors.get_mut(qsel) {
                    *slot = vec;
                }
            }
            (0x1c, 2) => self.core.set_queue_ready(v == 1),
            (0x20..=0x37, 4) => self.write_ring_half(off, v as u32),
            (0x20 | 0x28 | 0x30, 8) => {
                self.write_ring_half(off, v as u32);
                self.write_ring_half(off + 4, (v >> 32) as u32);
            }
            _ => {}
        }
    }

    fn write_ring_half(&mut self, off: u64, v: u32) {
        let Some(q) = self.core.queue_layout_mut() else {
            return;
        };
        let base = off & !0x7;
        let cur = match base {
            0x20 => q.desc_table(),
            0x28 => q.avail_ring(),
            _ => q.used_ring(),
        };
        let a = if off & 4 != 0 {
            (cur & 0xffff_ffff) | u64::from(v) << 32
        } else {
            (cur & !0xffff_ffff) | u64::from(v)
        };
        let r = match base {
            0x20 => q.try_set_desc_table_address(GuestAddress(a)),
            0x28 => q.try_set_avail_ring_address(GuestAddress(a)),
            _ => q.try_set_used_ring_address(GuestAddress(a)),
        };
        if r.is_err() {
            log::debug!("virtio-pci: misaligned ring address {a:#x} refused");
        }
    }

    /// The access window of the VIRTIO_PCI_CAP_PCI_CFG capability: BAR,
    /// offset and length as the driver wrote them.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let c = &self.config;
        let at = self.cfg_cap;
        let bar = c.byte(at + 4);
        let mut off = [0u8; 4];
        c.read(at + 8, &mut off);
        let mut len = [0u8; 4];
        c.read(at + 12, &mut len);
        let len = u32::from_le_bytes(len) as usize;
        (bar == BAR && matches!(len, 1 | 2 | 4))
            .then_some((u64::from(u32::from_le_bytes(off)), len))
    }
}

fn le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl<D: VirtioDevice> PciDevice for VirtioPci<D> {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.config_written(&self.config);
        let data_at = self.cfg_cap + 16;
        if offset == data_at {
            if let Some((off, len)) = self.cfg_window() {
                let n = len.min(data.len());
                self.write_bar(BAR, off, &data[..n]);
            }
        }
        if self.config.command() & COMMAND_INTX_DISABLE != 0 {
            self.intx.set_level(self.intx_gsi, false);
        }
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_at = self.cfg_cap + 16;
        if offset == data_at {
            if let Some((off, len)) = self.cfg_window() {
                let n = len.min(data.len());
                data.fill(0);
                self.read_bar(BAR, off, &mut data[..n]);
                return;
            }
        }
        self.config.read(offset, data);
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        // An empty access (the configuration window read with no bytes)
        // must not reach the ISR, which a read acknowledges.
        if bar != BAR || data.is_empty() {
            return;
        }
        match offset {
            o if o < COMMON + REGION => {
                let v = self.read_common(o, data.len());
                let n = data.len().min(8);
                data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            o if o == ISR => {
                // Reading the ISR acknowledges the interrupt.
                data[0] = self.isr;
                self.isr = 0;
                self.intx.set_level(self.intx_gsi, false);
            }
            o if (DEVICE..DEVICE + REGION).contains(&o) => {
                self.core.dev.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE, data)
            }
            o if (MSIX_PBA..MSIX_PBA + self.msix.pba_len()).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA, data)
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        match offset {
            o if o < COMMON + REGION => self.write_common(o, data.len(), le(data)),
            o if (DEVICE..DEVICE + REGION).contains(&o) => {
                self.core.dev.write_config(o - DEVICE, data)
            }
            o if (NOTIFY..NOTIFY + REGION).contains(&o) => {
                let q = (o - NOTIFY) / u64::from(NOTIFY_MULTIPLIER);
                if !self.core.hand_off(q as u16) {
                    self.notify_queue(q as u16);
                }
            }
            o if (MSIX_TABLE..MSIX_TABLE + self.msix.table_len()).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE, data)
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState<S> {
    pub config: PciConfigState,
    pub msix: MsixState,
    pub core: CoreState,
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    pub isr: u8,
    pub device: S,
}

impl<D: VirtioDevice + Persist> Persist for VirtioPci<D> {
    type State = VirtioPciState<D::State>;
    /// Guest memory, the MSI vectors, the INTx line, its GSI and the
    /// device model's arguments.
    type Args = (
        GuestMemoryMmap,
        Arc<dyn MsiVectors>,
        Arc<dyn IrqLine>,
        u32,
        D::Args,
    );
    type Error = RestoreError;

    fn save(&self) -> Self::State {
        VirtioPciState {
            config: self.config.state(),
            msix: self.msix.state(),
            core: self.core.state(),
            queue_vectors: self.queue_vectors.clone(),
            config_vector: self.config_vector,
            isr: self.isr,
            device: self.core.dev.save(),
        }
    }

    fn restore(args: Self::Args, s: &Self::State) -> Result<Self, RestoreError> {
        let (mem, vectors, intx, gsi, dev_args) = args;
        let bad = |reason: String| RestoreError::Invalid {
            device: "virtio-pci",
            reason,
        };
        let dev = D::restore(dev_args, &s.device).map_err(|e| bad(e.to_string()))?;
        let mut t = VirtioPci::new(dev, mem, vectors, intx, gsi);
        if s.queue_vectors.len() != t.queue_vectors.len() {
            return Err(bad(format!(
                "{} queue vectors saved",
                s.queue_vectors.len()
            )));
        }
        t.config.restore(&s.config).map_err(bad)?;
        t.core.restore(&s.core).map_err(bad)?;
        t.msix.restore(&s.msix).map_err(bad)?;
        t.queue_vectors = s.queue_vectors.iter().map(|&v| t.vector(v)).collect();
        t.config_vector = t.vector(s.config_vector);
        t.isr = s.isr;
        if t.isr != 0 && !t.msix.enabled() {
            t.intx.set_level(gsi, true);
        }
        Ok(t)
    }
}

impl<D: VirtioDevice> super::QueueNotify for VirtioPci<D> {
    fn notify(&mut self, queue: u16) {
        self.notify_queue(queue);
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::pci::config::{CAPABILITIES_POINTER, COMMAND_MEMORY};
    use crate::pci::msix::tests::MsiRecorder;
    use crate::test_utils::IrqRecorder;
    use crate::virtio::rng::Rng;
    use crate::virtio::test_utils::memory;
    use crate::virtio::*;

    type Dev = VirtioPci<Rng>;

    fn dev(mem: &GuestMemoryMmap) -> (Dev, Arc<MsiRecorder>, Arc<IrqRecorder>) {
        let msi = Arc::new(MsiRecorder::default());
        let irq = Arc::new(IrqRecorder::default());
        let mut d = VirtioPci::new(Rng::new(), mem.clone(), msi.clone(), irq.clone(), 17);
        let c = d.config_mut();
        c.set_bar_address(0, 0xc000_0000);
        c.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        (d, msi, irq)
    }

    fn w(d: &mut Dev, off: u64, v: u64, len: usize) {
        d.write_bar(BAR, off, &v.to_le_bytes()[..len]);
    }

    fn r(d: &mut Dev, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        d.read_bar(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn bring_up(d: &mut Dev, mock: &MockSplitQueue<GuestMemoryMmap>) {
        w(d, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(d, 0x00, 1, 4);
        assert_eq!(r(d, 0x04, 4), 1);
        w(d, 0x08, 1, 4);
        w(d, 0x0c, 1, 4);
        w(
            d,
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        assert_eq!(r(d, 0x12, 2), 1);
        w(d, 0x16, 0, 2);
        w(d, 0x18, 16, 2);
        w(d, 0x20, mock.desc_table_addr().0, 8);
        w(d, 0x28, mock.avail_addr().0, 4);
        w(d, 0x30, mock.used_addr().0, 4);
        w(d, 0x1c, 1, 2);
        assert_eq!(r(d, 0x1c, 2), 1);
        w(
            d,
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
    }

    /// The vendor capabilities, as (cfg_type, offset).
    fn caps(d: &mut Dev) -> Vec<(u8, u32)> {
        let mut out = Vec::new();
        let mut at = usize::from(d.config.byte(CAPABILITIES_POINTER));
        while at != 0 {
            if d.config.byte(at) == CAP_VENDOR {
                let mut off = [0u8; 4];
                d.config.read(at + 8, &mut off);
                out.push((d.config.byte(at + 3), u32::from_le_bytes(off)));
            }
            at = usize::from(d.config.byte(at + 1));
        }
        out
    }

    #[test]
    fn capabilities_point_into_bar0() {
        let mem = memory();
        let (mut d, _, _) = dev(&mem);
        assert_eq!(
            caps(&mut d),
            vec![(1, 0), (3, 0x1000), (4, 0x2000), (2, 0x3000), (5, 0)]
        );
        let mut id = [0u8; 4];
        d.config.read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        assert_eq!(d.notifications(), vec![0x3000]);
    }

    #[test]
    fn intx_until_the_isr_is_read() {
        let mem = memory();
        let (mut d, _, irq) = dev(&mem);
        let mock = MockSplitQueue::new(&mem, 16);
        bring_up(&mut d, &mock);
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x8000, 8, 2, 0))], 0)
            .unwrap();
        w(&mut d, NOTIFY, 0, 2);
        assert_eq!(mock.used().idx().load(), 1);
        assert_eq!(irq.take(), vec![(17, true)]);
        assert_eq!(r(&mut d, ISR, 1), 1);
        assert_eq!(irq.take(), vec![(17, false)]);
        assert_eq!(r(&mut d, ISR, 1), 0);
    }

    #[test]
    fn msix_vectors_carry_queue_interrupts() {
        let mem = memory();
        let (mut d, msi, _) = dev(&mem);
        let mock = MockSplitQueue::new(&mem, 16);
        bring_up(&mut d, &mock);
        // Vector 0: address, data, unmasked; MSI-X on; queue 0 -> vector 0.
        w(&mut d, MSIX_TABLE, 0xfee0_0000, 4);
        w(&mut d, MSIX_TABLE + 8, 0x45, 4);
        w(&mut d, MSIX_TABLE + 12, 0, 4);
        let mut cap = usize::from(d.config.byte(CAPABILITIES_POINTER));
        while d.config.byte(cap) != crate::pci::msix::CAP_ID {
            cap = usize::from(d.config.byte(cap + 1));
        }
        d.write_config(cap + 3, &[0x80]);
        w(&mut d, 0x16, 0, 2);
        w(&mut d, 0x1a, 0, 2);
        assert_eq!(r(&mut d, 0x1a, 2), 0);
        // A vector the table lacks is refused.
        w(&mut d, 0x10, 9, 2);
        assert_eq!(r(&mut d, 0x10, 2), u64::from(NO_VECTOR));
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x8000, 8, 2, 0))], 0)
            .unwrap();
        w(&mut d, NOTIFY, 0, 2);
        assert_eq!(*msi.fired.lock().unwrap(), vec![0]);

        // Saved and restored: the route is given again.
        let s = d.save();
        let msi2 = Arc::new(MsiRecorder::default());
        let irq2 = Arc::new(IrqRecorder::default());
        let d2 = VirtioPci::<Rng>::restore((mem.clone(), msi2.clone(), irq2, 17, ()), &s).unwrap();
        assert_eq!(d2.save(), s);
        assert_eq!(msi2.routes.lock().unwrap().len(), 1);
        assert_eq!(d2.config().mappings()[0].addr, 0xc000_0000);
    }

    #[test]
    fn config_window_capability_reaches_bar0() {
        let mem = memory();
        let (mut d, _, _) = dev(&mem);
        let at = d.cfg_cap;
        // Window on num_queues (BAR 0 + 0x12), 2 bytes.
        d.write_config(at + 4, &[0]);
        d.write_config(at + 8, &0x12u32.to_le_bytes());
        d.write_config(at + 12, &2u32.to_le_bytes());
        let mut v = [0u8; 4];
        d.read_config(at + 16, &mut v);
        assert_eq!(u32::from_le_bytes(v), 1);
        // The pci_config fuzz target's crash: an empty read through a
        // window on the ISR.
        d.write_config(at + 8, &(ISR as u32).to_le_bytes());
        d.write_config(at + 12, &1u32.to_le_bytes());
        d.read_config(at + 16, &mut []);
        d.read_bar(BAR, ISR, &mut []);
    }

    #[test]
    fn needs_bus_mastering() {
        let mem = memory();
        let (mut d, _, irq) = dev(&mem);
        let mock = MockSplitQueue::new(&mem, 16);
        bring_up(&mut d, &mock);
        d.config.set_command(COMMAND_MEMORY);
        mock.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x8000, 8, 2, 0))], 0)
            .unwrap();
        d.notify_queue(0);
        assert_eq!(mock.used().idx().load(), 0);
        assert!(irq.take().is_empty());
    }
}
