//! PCI: functions with a configuration space and BARs on one root bus,
//! reached through the configuration ports 0xCF8/0xCFC or ECAM.
//!
//! A guest write that moves, enables or disables a BAR is reported to the
//! VMM through [`BarHost`], which moves the range on its buses; the devices
//! here never place themselves.

pub mod config;
pub mod msi;
pub mod msix;
pub mod q35;

use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::{Persist, RestoreError};
pub use config::{BarKind, BarMapping, BarSpec, PciConfig, PciConfigState, PciId};

/// Device numbers on the root bus.
pub const SLOTS: usize = 32;

/// A function on the root bus (function 0 of its slot).
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    /// For what firmware programs: BAR addresses, command, interrupt line.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A guest's configuration write; the default takes the writable bits.
    /// Devices with capabilities that act (MSI-X) look at them after.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// An access to BAR `bar` at `offset` from its start; the defaults
    /// suit a function without BARs (bridges): reads float, writes drop.
    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// The VMM's side of BAR placement.
pub trait BarHost: Send + Sync {
    /// BAR `m.index` of the device in `slot` decoded at `from` and now
    /// decodes at `to` (`None`: nowhere).
    fn bar_moved(&self, slot: u8, from: Option<BarMapping>, to: Option<BarMapping>);
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The root bus: 32 slots, configuration access by (device, offset).
pub struct PciRoot {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
    host: Arc<dyn BarHost>,
    chipset: Chipset,
}

impl PciRoot {
    /// The default machine's root bus.
    pub fn new(host: Arc<dyn BarHost>) -> Self {
        Self::for_chipset(host, Chipset::Generic)
    }

    pub fn for_chipset(host: Arc<dyn BarHost>, chipset: Chipset) -> Self {
        PciRoot {
            slots: RwLock::new(vec![None; SLOTS]),
            host,
            chipset,
        }
    }

    pub fn chipset(&self) -> Chipset {
        self.chipset
    }

    /// Put `dev` in `slot`; false if the slot is taken.
    pub fn add(&self, slot: u8, dev: SharedPciDevice) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(usize::from(slot)) {
            Some(s @ None) => {
                *s = Some(dev);
                true
            }
            _ => false,
        }
    }

    pub fn remove(&self, slot: u8) -> Option<SharedPciDevice> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        slots.get_mut(usize::from(slot)).and_then(Option::take)
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Option<u8> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().position(Option::is_none).map(|s| s as u8)
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(dev)).cloned().flatten()
    }

    /// A configuration read; an absent function reads all-ones.
    pub fn config_read(&self, bdf: (u8, u8, u8), offset: usize, data: &mut [u8]) {
        match self.device(bdf.0, bdf.1, bdf.2) {
            Some(d) => lock(&d).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; BARs it moved are reported to the host.
    pub fn config_write(&self, bdf: (u8, u8, u8), offset: usize, data: &[u8]) {
        let Some(d) = self.device(bdf.0, bdf.1, bdf.2) else {
            return;
        };
        let (before, after) = {
            let mut d = lock(&d);
            let before = d.config().mappings();
            d.write_config(offset, data);
            (before, d.config().mappings())
        };
        for i in 0..config::NUM_BARS as u8 {
            let was = before.iter().find(|m| m.index == i).copied();
            let now = after.iter().find(|m| m.index == i).copied();
            if was != now {
                self.host.bar_moved(bdf.1, was, now);
            }
        }
    }
}

/// Which chipset the host bridge is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chipset {
    /// QEMU's generic PCIe host bridge (1b36:0008), which no OS applies
    /// quirks to: the default machine's.
    #[default]
    Generic,
    /// The Q35 MCH (8086:29c0), for `--machine q35`.
    Q35,
}

/// The host bridge at 00:00.0: a header and nothing else.
pub struct HostBridge {
    config: PciConfig,
}

impl HostBridge {
    /// The default machine's bridge.
    pub fn new() -> Self {
        Self::for_chipset(Chipset::Generic)
    }

    pub fn for_chipset(chipset: Chipset) -> Self {
        let id = match chipset {
            Chipset::Generic => PciId {
                vendor: 0x1b36,
                device: 0x0008,
                class: (0x06, 0x00, 0x00),
                ..Default::default()
            },
            Chipset::Q35 => q35::MCH_ID,
        };
        HostBridge {
            config: PciConfig::new(id, false),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

impl Persist for HostBridge {
    type State = PciConfigState;
    type Args = Chipset;
    type Error = RestoreError;

    fn save(&self) -> PciConfigState {
        self.config.state()
    }

    fn restore(chipset: Chipset, state: &PciConfigState) -> Result<Self, RestoreError> {
        let mut b = HostBridge::for_chipset(chipset);
        b.config
            .restore(state)
            .map_err(|reason| RestoreError::Invalid {
                device: "pci-host-bridge",
                reason,
            })?;
        Ok(b)
    }
}

/// Configuration mechanism #1: the address port 0xCF8 and the data ports
/// 0xCFC-0xCFF (PCI Local Bus specification, "Configuration Mechanism
/// #1"). Registered at 0xCF8 for 8 ports.
///
/// On q35 the address register keeps its low two bits and they select
/// the byte within the register, as QEMU's host bridges do:
/// kvm-unit-tests' lib/pci.c reads a word at offset 2 with the offset in
/// 0xCF8 and an access to 0xCFC. The default machine keeps the PCI
/// specification's reading (those bits reserved, read as 0).
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
}

const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The bits of the address register that hold.
    fn address_mask(&self) -> u32 {
        match self.root.chipset() {
            Chipset::Generic => 0x80ff_fffc,
            Chipset::Q35 => 0x80ff_ffff,
        }
    }

    /// The function and register the latched address selects, plus
    /// `byte` (0-3) of the data port.
    fn target(&self, byte: usize) -> Option<((u8, u8, u8), usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let bdf = (
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
        );
        Some((bdf, (a & 0xff) as usize | byte))
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let port = base.0.wrapping_add(offset);
        match (port & 7, data.len()) {
            // The address register: 32-bit accesses only.
            (0, 4) => data.copy_from_slice(&self.address.to_le_bytes()),
            (p @ 4..=7, n) if usize::from(p - 4) + n <= 4 => {
                match self.target(usize::from(p - 4)) {
                    Some((bdf, reg)) => self.root.config_read(bdf, reg, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let port = base.0.wrapping_add(offset);
        match (port & 7, data.len()) {
            (0, 4) => {
                // Reserved bits 24-30 (and, but on q35, the register's low
                // two bits) read 0.
                let v = u32::from_le_bytes(data.try_into().unwrap_or([0; 4]));
                self.address = v & self.address_mask();
            }
            (p @ 4..=7, n) if usize::from(p - 4) + n <= 4 => {
                if let Some((bdf, reg)) = self.target(usize::from(p - 4)) {
                    self.root.config_write(bdf, reg, data);
                }
            }
            _ => {}
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigIoState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = PciConfigIoState;
    type Args = Arc<PciRoot>;
    type Error = RestoreError;

    fn save(&self) -> PciConfigIoState {
        PciConfigIoState {
            address: self.address,
        }
    }

    fn restore(root: Arc<PciRoot>, state: &PciConfigIoState) -> Result<Self, RestoreError> {
        let mut io = PciConfigIo::new(root);
        io.address = state.address & io.address_mask();
        Ok(io)
    }
}

/// ECAM (PCI Express enhanced configuration access): 4 KiB per function,
/// bus 0 only; described by the ACPI MCFG table.
pub struct PciConfigMmio {
    root: Arc<PciRoot>,
}

impl PciConfigMmio {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigMmio { root }
    }

    fn target(offset: u64, len: usize) -> Option<((u8, u8, u8), usize)> {
        let reg = (offset & 0xfff) as usize;
        // Naturally aligned accesses of 1, 2 or 4 bytes within a register.
        if !matches!(len, 1 | 2 | 4) || !reg.is_multiple_of(len) {
            return None;
        }
        let bdf = (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
        );
        Some((bdf, reg))
    }
}

impl MutDeviceMmio for PciConfigMmio {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((bdf, reg)) => self.root.config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some((bdf, reg)) = Self::target(offset, data.len()) {
            self.root.config_write(bdf, reg, data);
        }
    }
}

/// ECAM keeps no state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigMmioState {}

impl Persist for PciConfigMmio {
    type State = PciConfigMmioState;
    type Args = Arc<PciRoot>;
    type Error = RestoreError;

    fn save(&self) -> PciConfigMmioState {
        PciConfigMmioState {}
    }

    fn restore(root: Arc<PciRoot>, _: &PciConfigMmioState) -> Result<Self, RestoreError> {
        Ok(PciConfigMmio { root })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Move = (u8, Option<BarMapping>, Option<BarMapping>);

    #[derive(Default)]
    struct MoveRecorder(Mutex<Vec<Move>>);

    impl BarHost for MoveRecorder {
        fn bar_moved(&self, slot: u8, from: Option<BarMapping>, to: Option<BarMapping>) {
            self.0.lock().unwrap().push((slot, from, to));
        }
    }

    struct BarDev(PciConfig);

    impl PciDevice for BarDev {
        fn config(&self) -> &PciConfig {
            &self.0
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.0
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.0.write(offset, data);
        }
        fn read_bar(&mut self, _: u8, _: u64, data: &mut [u8]) {
            data.fill(1);
        }
        fn write_bar(&mut self, _: u8, _: u64, _: &[u8]) {}
    }

    fn root() -> (Arc<PciRoot>, Arc<MoveRecorder>) {
        let rec = Arc::new(MoveRecorder::default());
        let root = Arc::new(PciRoot::new(rec.clone()));
        assert!(root.add(0, Arc::new(Mutex::new(HostBridge::new()))));
        let mut c = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1044,
                ..Default::default()
            },
            true,
        );
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x1000,
                prefetchable: false,
            },
        );
        assert!(root.add(3, Arc::new(Mutex::new(BarDev(c)))));
        (root, rec)
    }

    fn io_read(io: &mut PciConfigIo, dev: u8, reg: u8) -> u32 {
        let addr = CONFIG_ENABLE | u32::from(dev) << 11 | u32::from(reg);
        io.pio_write(PioAddress(0xcf8), 0, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        u32::from_le_bytes(d)
    }

    fn io_write(io: &mut PciConfigIo, dev: u8, reg: u8, v: u32) {
        let addr = CONFIG_ENABLE | u32::from(dev) << 11 | u32::from(reg);
        io.pio_write(PioAddress(0xcf8), 0, &addr.to_le_bytes());
        io.pio_write(PioAddress(0xcf8), 4, &v.to_le_bytes());
    }

    #[test]
    fn config_ports_enumerate_the_bus() {
        let (root, _) = root();
        let mut io = PciConfigIo::new(root.clone());
        assert_eq!(io_read(&mut io, 0, 0), 0x0008_1b36);
        assert_eq!(io_read(&mut io, 3, 0), 0x1044_1af4);
        assert_eq!(io_read(&mut io, 4, 0), 0xffff_ffff);
        // Function 1 and bus 1 are empty.
        let mut d = [0u8; 4];
        io.pio_write(
            PioAddress(0xcf8),
            0,
            &(CONFIG_ENABLE | 3 << 11 | 1 << 8).to_le_bytes(),
        );
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Byte and word reads at the data port's offsets.
        io.pio_write(
            PioAddress(0xcf8),
            0,
            &(CONFIG_ENABLE | 3 << 11).to_le_bytes(),
        );
        let mut w = [0u8; 2];
        io.pio_read(PioAddress(0xcf8), 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1044);
        // Disabled address: all-ones.
        io.pio_write(PioAddress(0xcf8), 0, &0u32.to_le_bytes());
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        assert_eq!(d, [0xff; 4]);
        // The address register reads back without its reserved bits.
        io.pio_write(PioAddress(0xcf8), 0, &0xffff_ffffu32.to_le_bytes());
        io.pio_read(PioAddress(0xcf8), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
        let s = io.save();
        let io2 = PciConfigIo::restore(root, &s).unwrap();
        assert_eq!(io2.save(), s);
    }

    #[test]
    fn bar_moves_reach_the_host() {
        let (root, rec) = root();
        let mut io = PciConfigIo::new(root.clone());
        io_write(&mut io, 3, 0x10, 0xffff_ffff);
        assert_eq!(io_read(&mut io, 3, 0x10), 0xffff_f000);
        io_write(&mut io, 3, 0x10, 0xc000_0000);
        assert!(rec.0.lock().unwrap().is_empty());
        io_write(&mut io, 3, 0x04, 0x2);
        let m = |addr| BarMapping {
            index: 0,
            kind: BarKind::Mem32,
            addr,
            size: 0x1000,
        };
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(3, None, Some(m(0xc000_0000)))]
        );
        io_write(&mut io, 3, 0x10, 0xc000_2000);
        io_write(&mut io, 3, 0x04, 0x0);
        assert_eq!(
            rec.0.lock().unwrap()[1..],
            [
                (3, Some(m(0xc000_0000)), Some(m(0xc000_2000))),
                (3, Some(m(0xc000_2000)), None)
            ]
        );
    }

    #[test]
    fn q35_config_address_selects_bytes_as_qemu() {
        let rec = Arc::new(MoveRecorder::default());
        let root = Arc::new(PciRoot::for_chipset(rec, Chipset::Q35));
        assert!(root.add(
            0,
            Arc::new(Mutex::new(HostBridge::for_chipset(Chipset::Q35)))
        ));
        let mut io = PciConfigIo::new(root);
        // The device ID: offset 2 in the address, a word at 0xCFC.
        io.pio_write(PioAddress(0xcf8), 0, &(CONFIG_ENABLE | 2).to_le_bytes());
        let mut w = [0u8; 2];
        io.pio_read(PioAddress(0xcf8), 4, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        // The same through 0xCFE.
        io.pio_read(PioAddress(0xcf8), 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x29c0);
        let mut d = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), CONFIG_ENABLE | 2);
    }

    #[test]
    fn q35_bridge_is_the_mch_and_refuses_a_generic_state() {
        let b = HostBridge::for_chipset(Chipset::Q35);
        let mut d = [0u8; 4];
        b.config().read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x29c0_8086);
        b.config().read(8, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_0000);
        assert!(HostBridge::restore(Chipset::Q35, &HostBridge::new().save()).is_err());
        assert!(HostBridge::restore(Chipset::Q35, &b.save()).is_ok());
    }

    #[test]
    fn ecam_reaches_the_same_functions() {
        let (root, _) = root();
        let mut ecam = PciConfigMmio::new(root);
        let mut d = [0u8; 4];
        ecam.mmio_read(MmioAddress(0), 3 << 15, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1044_1af4);
        ecam.mmio_read(MmioAddress(0), 5 << 15, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Extended configuration space of a conventional function reads 0.
        ecam.mmio_read(MmioAddress(0), 3 << 15 | 0x100, &mut d);
        assert_eq!(d, [0; 4]);
        // Misaligned: all-ones, writes ignored.
        ecam.mmio_read(MmioAddress(0), 3 << 15 | 1, &mut d[..2]);
        assert_eq!(d[..2], [0xff, 0xff]);
        ecam.mmio_write(MmioAddress(0), 3 << 15 | 0x3c, &[9]);
        ecam.mmio_read(MmioAddress(0), 3 << 15 | 0x3c, &mut d[..1]);
        assert_eq!(d[0], 9);
    }
}
