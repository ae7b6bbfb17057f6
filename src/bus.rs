//! The PIO and MMIO buses a vCPU exit is dispatched to.
//!
//! Each bus is a map from the first address of a range to the device that
//! decodes it, in a `BTreeMap` behind a read-write lock (the shape of
//! Firecracker's `vstate/bus.rs`): ranges are added, moved and removed
//! through `&self` while vCPUs run, so a guest's BAR write can move a
//! device. An access takes the read lock only to find its device and
//! clone the `Arc`, then calls the device with no bus lock held, so a
//! device may move ranges of the bus it is called from (the PCI
//! configuration ports move I/O BARs).
//!
//! Devices implement vm-device's `DevicePio`/`DeviceMmio` (a `Mutex` of a
//! `MutDevicePio`/`MutDeviceMmio` does). What a PC does for addresses no
//! device owns is added here: reads float to all-ones, writes vanish.
//! Each such address is logged once at debug level so a guest probing
//! hardware is visible with `-vv` without flooding the log.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{DeviceMmio, DevicePio};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("cannot place {what} at {base:#x} (+{len:#x}): {reason}")]
    Register {
        what: String,
        base: u64,
        len: u64,
        reason: String,
    },
    #[error("nothing is placed at {0:#x}")]
    NotPlaced(u64),
}

struct Entry<D: ?Sized> {
    /// One past the last address.
    end: u64,
    name: String,
    dev: Arc<D>,
}

/// One address space: non-overlapping ranges, each decoded by one device.
pub struct Bus<D: ?Sized> {
    map: RwLock<BTreeMap<u64, Entry<D>>>,
}

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus {
            map: RwLock::new(BTreeMap::new()),
        }
    }
}

fn overlaps<D: ?Sized>(map: &BTreeMap<u64, Entry<D>>, base: u64, end: u64) -> Option<&str> {
    map.range(..end)
        .next_back()
        .filter(|(_, e)| e.end > base)
        .map(|(_, e)| e.name.as_str())
}

impl<D: ?Sized> Bus<D> {
    /// Place `dev` at `[base, base + len)`.
    pub fn insert(&self, what: &str, base: u64, len: u64, dev: Arc<D>) -> Result<(), BusError> {
        let err = |reason: String| BusError::Register {
            what: what.to_string(),
            base,
            len,
            reason,
        };
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| err("empty or past the end of the address space".into()))?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(other) = overlaps(&map, base, end) {
            return Err(err(format!("overlaps {other}")));
        }
        map.insert(
            base,
            Entry {
                end,
                name: what.to_string(),
                dev,
            },
        );
        Ok(())
    }

    /// Take the range starting at `base` off the bus.
    pub fn remove(&self, base: u64) -> Result<Arc<D>, BusError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|e| e.dev)
            .ok_or(BusError::NotPlaced(base))
    }

    /// Move the range starting at `from` to start at `to`, keeping its
    /// length and device; on an overlap it stays where it was.
    pub fn relocate(&self, from: u64, to: u64) -> Result<(), BusError> {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let entry = map.remove(&from).ok_or(BusError::NotPlaced(from))?;
        let len = entry.end - from;
        let clash = match to.checked_add(len) {
            None => Some("the end of the address space".to_string()),
            Some(end) => overlaps(&map, to, end).map(str::to_string),
        };
        if let Some(other) = clash {
            let err = BusError::Register {
                what: entry.name.clone(),
                base: to,
                len,
                reason: format!("overlaps {other}"),
            };
            map.insert(from, entry);
            return Err(err);
        }
        map.insert(
            to,
            Entry {
                end: to + len,
                ..entry
            },
        );
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + len)`, and the
    /// range's base.
    pub fn lookup(&self, addr: u64, len: usize) -> Option<(u64, Arc<D>)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = map.range(..=addr).next_back()?;
        let last = addr.checked_add(len.max(1) as u64 - 1)?;
        (last < e.end).then(|| (base, e.dev.clone()))
    }

    /// Every range as `(base, len, name)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64, String)> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(&b, e)| (b, e.end - b, e.name.clone()))
            .collect()
    }
}

pub type PioDevice = dyn DevicePio + Send + Sync;
pub type MmioDevice = dyn DeviceMmio + Send + Sync;

/// The VM's two address spaces.
#[derive(Default)]
pub struct IoBus {
    pub pio: Bus<PioDevice>,
    pub mmio: Bus<MmioDevice>,
    unowned_seen: Mutex<HashSet<(bool, u64)>>,
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_pio(
        &self,
        what: &str,
        base: u16,
        len: u16,
        dev: Arc<PioDevice>,
    ) -> Result<(), BusError> {
        // Port ranges end at 0xffff: a range past it is refused here.
        if u32::from(base) + u32::from(len) > 0x1_0000 {
            return Err(BusError::Register {
                what: what.to_string(),
                base: u64::from(base),
                len: u64::from(len),
                reason: "past port 0xffff".into(),
            });
        }
        self.pio.insert(what, u64::from(base), u64::from(len), dev)
    }

    pub fn add_mmio(
        &self,
        what: &str,
        base: u64,
        len: u64,
        dev: Arc<MmioDevice>,
    ) -> Result<(), BusError> {
        self.mmio.insert(what, base, len, dev)
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match self.pio.lookup(u64::from(port), data.len()) {
            Some((base, dev)) => dev.pio_read(PioAddress(base as u16), port - base as u16, data),
            None => {
                data.fill(0xff);
                self.note_unowned(false, u64::from(port), "read", data.len());
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match self.pio.lookup(u64::from(port), data.len()) {
            Some((base, dev)) => dev.pio_write(PioAddress(base as u16), port - base as u16, data),
            None => self.note_unowned(false, u64::from(port), "write", data.len()),
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.mmio.lookup(addr, data.len()) {
            Some((base, dev)) => dev.mmio_read(MmioAddress(base), addr - base, data),
            None => {
                data.fill(0xff);
                self.note_unowned(true, addr, "read", data.len());
            }
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match self.mmio.lookup(addr, data.len()) {
            Some((base, dev)) => dev.mmio_write(MmioAddress(base), addr - base, data),
            None => self.note_unowned(true, addr, "write", data.len()),
        }
    }

    fn note_unowned(&self, mmio: bool, addr: u64, op: &str, len: usize) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        let mut seen = self.unowned_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.insert((mmio, addr)) {
            let space = if mmio { "MMIO" } else { "port" };
            log::debug!("unowned {space} {addr:#x}: {len}-byte {op} (reads as all-ones)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_device::bus::PioAddressOffset;
    use vm_device::MutDevicePio;

    struct Echo(u8);
    impl MutDevicePio for Echo {
        fn pio_read(&mut self, _b: PioAddress, o: PioAddressOffset, data: &mut [u8]) {
            data.fill(self.0 + o as u8);
        }
        fn pio_write(&mut self, _b: PioAddress, _o: PioAddressOffset, data: &[u8]) {
            self.0 = data[0];
        }
    }

    fn echo(v: u8) -> Arc<PioDevice> {
        Arc::new(Mutex::new(Echo(v)))
    }

    #[test]
    fn unowned_reads_float_high() {
        let bus = IoBus::new();
        bus.add_pio("echo", 0x10, 2, echo(5)).unwrap();
        let mut d = [0u8; 2];
        bus.pio_read(0x11, &mut d[..1]);
        assert_eq!(d[0], 6);
        bus.pio_write(0x10, &[9]);
        bus.pio_read(0x10, &mut d[..1]);
        assert_eq!(d[0], 9);
        bus.pio_read(0x12, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        // An access running past the end of the range is not the device's.
        bus.pio_read(0x11, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        let mut m = [0u8; 4];
        bus.mmio_read(0xfed0_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
        bus.mmio_write(0xfed0_0000, &m);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let bus = IoBus::new();
        bus.add_pio("a", 0x10, 4, echo(0)).unwrap();
        let e = bus.add_pio("b", 0x12, 4, echo(0)).unwrap_err();
        assert!(e.to_string().contains("b at 0x12"), "{e}");
        assert!(e.to_string().contains("overlaps a"), "{e}");
        assert!(bus.add_pio("c", 0x0e, 2, echo(0)).is_ok());
        assert!(bus.add_pio("d", 0x0f, 2, echo(0)).is_err());
        assert!(bus.add_pio("e", 0xffff, 2, echo(0)).is_err());
        assert!(bus.add_mmio("f", u64::MAX, 2, echo_mmio()).is_err());
        assert!(bus.add_mmio("g", 0, 0, echo_mmio()).is_err());
    }

    fn echo_mmio() -> Arc<MmioDevice> {
        struct Nop;
        impl vm_device::MutDeviceMmio for Nop {
            fn mmio_read(&mut self, _: MmioAddress, _: u64, d: &mut [u8]) {
                d.fill(7);
            }
            fn mmio_write(&mut self, _: MmioAddress, _: u64, _: &[u8]) {}
        }
        Arc::new(Mutex::new(Nop))
    }

    #[test]
    fn ranges_move_and_go_while_shared() {
        let bus = Arc::new(IoBus::new());
        bus.add_mmio("bar", 0x1000, 0x100, echo_mmio()).unwrap();
        bus.add_mmio("other", 0x3000, 0x100, echo_mmio()).unwrap();
        let mut d = [0u8; 1];
        bus.mmio_read(0x1010, &mut d);
        assert_eq!(d[0], 7);
        bus.mmio.relocate(0x1000, 0x2000).unwrap();
        bus.mmio_read(0x1010, &mut d);
        assert_eq!(d[0], 0xff);
        bus.mmio_read(0x2010, &mut d);
        assert_eq!(d[0], 7);
        // Onto another range: refused, and the range stays.
        assert!(bus.mmio.relocate(0x2000, 0x2f80).is_err());
        bus.mmio_read(0x2010, &mut d);
        assert_eq!(d[0], 7);
        assert_eq!(
            bus.mmio.relocate(0x5000, 0x6000),
            Err(BusError::NotPlaced(0x5000))
        );
        bus.mmio.remove(0x2000).unwrap();
        bus.mmio_read(0x2010, &mut d);
        assert_eq!(d[0], 0xff);
        assert_eq!(bus.mmio.ranges(), vec![(0x3000, 0x100, "other".into())]);
    }

    /// A device that moves its own range while it is being called, as the
    /// PCI configuration ports do for an I/O BAR.
    #[test]
    fn a_device_may_move_ranges_of_its_own_bus() {
        struct Mover(Arc<IoBus>);
        impl DevicePio for Mover {
            fn pio_read(&self, _: PioAddress, _: PioAddressOffset, d: &mut [u8]) {
                d.fill(1);
            }
            fn pio_write(&self, b: PioAddress, _: PioAddressOffset, _: &[u8]) {
                self.0.pio.relocate(u64::from(b.0), 0x40).unwrap();
            }
        }
        let bus = Arc::new(IoBus::new());
        bus.add_pio("mover", 0x20, 1, Arc::new(Mover(bus.clone())))
            .unwrap();
        bus.pio_write(0x20, &[0]);
        let mut d = [0u8];
        bus.pio_read(0x40, &mut d);
        assert_eq!(d[0], 1);
        // The bus holds itself through the device: break the cycle.
        bus.pio.remove(0x40).unwrap();
    }
}
