//! The PIO and MMIO buses a vCPU exit is dispatched to.
//!
//! Built on vm-device's `IoManager`; adds what a PC does for addresses no
//! device owns: reads float to all-ones, writes vanish. Each such address is
//! logged once at debug level so a guest probing hardware is visible with
//! `-v` without flooding the log.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot register {what} at {base:#x} (+{len:#x}): {reason}")]
    Register {
        what: &'static str,
        base: u64,
        len: u64,
        reason: String,
    },
}

#[derive(Default)]
pub struct IoBus {
    io: IoManager,
    unowned_seen: Mutex<HashSet<(bool, u64)>>,
}

impl IoBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_pio(
        &mut self,
        what: &'static str,
        base: u16,
        len: u16,
        dev: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |reason: String| BusError::Register {
            what,
            base: base as u64,
            len: len as u64,
            reason,
        };
        let range = PioRange::new(PioAddress(base), len).map_err(|e| err(format!("{e:?}")))?;
        self.io
            .register_pio(range, dev)
            .map_err(|e| err(format!("{e:?}")))
    }

    pub fn add_mmio(
        &mut self,
        what: &'static str,
        base: u64,
        len: u64,
        dev: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<(), BusError> {
        let err = |reason: String| BusError::Register {
            what,
            base,
            len,
            reason,
        };
        let range = MmioRange::new(MmioAddress(base), len).map_err(|e| err(format!("{e:?}")))?;
        self.io
            .register_mmio(range, dev)
            .map_err(|e| err(format!("{e:?}")))
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
            self.note_unowned(false, port as u64, "read", data.len());
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if self.io.pio_write(PioAddress(port), data).is_err() {
            self.note_unowned(false, port as u64, "write", data.len());
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.io.mmio_read(MmioAddress(addr), data).is_err() {
            data.fill(0xff);
            self.note_unowned(true, addr, "read", data.len());
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.io.mmio_write(MmioAddress(addr), data).is_err() {
            self.note_unowned(true, addr, "write", data.len());
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

    #[test]
    fn unowned_reads_float_high() {
        let mut bus = IoBus::new();
        bus.add_pio("echo", 0x10, 2, Arc::new(Mutex::new(Echo(5))))
            .unwrap();
        let mut d = [0u8; 2];
        bus.pio_read(0x11, &mut d[..1]);
        assert_eq!(d[0], 6);
        bus.pio_write(0x10, &[9]);
        bus.pio_read(0x10, &mut d[..1]);
        assert_eq!(d[0], 9);
        bus.pio_read(0x12, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        let mut m = [0u8; 4];
        bus.mmio_read(0xfed0_0000, &mut m);
        assert_eq!(m, [0xff; 4]);
        bus.mmio_write(0xfed0_0000, &m);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = IoBus::new();
        bus.add_pio("a", 0x10, 4, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        let e = bus
            .add_pio("b", 0x12, 4, Arc::new(Mutex::new(Echo(0))))
            .unwrap_err();
        assert!(e.to_string().contains("b at 0x12"));
    }
}
