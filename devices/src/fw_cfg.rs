//! QEMU's fw_cfg, legacy I/O-port interface only (no DMA).
//!
//! The guest writes a 16-bit item key to the selector port
//! ([`FW_CFG_PORT_SEL`]) and reads the item's bytes one after the other from
//! the data port ([`FW_CFG_PORT_DATA`]). kvm-unit-tests and other test
//! guests read the CPU count and RAM size this way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, Persist, RestoreError};

/// Selector port (16-bit writes).
pub const FW_CFG_PORT_SEL: u16 = 0x510;
/// Data port (8-bit reads).
pub const FW_CFG_PORT_DATA: u16 = 0x511;
/// Number of ports the VMM registers, starting at [`FW_CFG_PORT_SEL`].
pub const FW_CFG_PORT_COUNT: u16 = 2;

pub const FW_CFG_SIGNATURE: u16 = 0x00;
pub const FW_CFG_ID: u16 = 0x01;
pub const FW_CFG_UUID: u16 = 0x02;
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
pub const FW_CFG_NB_CPUS: u16 = 0x05;
pub const FW_CFG_MACHINE_ID: u16 = 0x06;
pub const FW_CFG_KERNEL_ADDR: u16 = 0x07;
pub const FW_CFG_KERNEL_SIZE: u16 = 0x08;
pub const FW_CFG_KERNEL_CMDLINE: u16 = 0x09;
pub const FW_CFG_INITRD_ADDR: u16 = 0x0a;
pub const FW_CFG_INITRD_SIZE: u16 = 0x0b;
pub const FW_CFG_BOOT_DEVICE: u16 = 0x0c;
pub const FW_CFG_NUMA: u16 = 0x0d;
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
pub const FW_CFG_KERNEL_ENTRY: u16 = 0x10;
pub const FW_CFG_KERNEL_DATA: u16 = 0x11;
pub const FW_CFG_INITRD_DATA: u16 = 0x12;
pub const FW_CFG_CMDLINE_ADDR: u16 = 0x13;
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
pub const FW_CFG_SETUP_ADDR: u16 = 0x16;
pub const FW_CFG_SETUP_SIZE: u16 = 0x17;
pub const FW_CFG_SETUP_DATA: u16 = 0x18;
pub const FW_CFG_FILE_DIR: u16 = 0x19;

/// Selector bit a guest sets to write an item; reads ignore it, as QEMU does.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;

/// `FW_CFG_ID` bit 0: the traditional (I/O port) interface is present.
const FW_CFG_VERSION: u32 = 1;

/// fw_cfg items and the guest's read position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selector: u16,
    offset: u32,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new()
    }
}

impl FwCfg {
    /// Creates the device with the items every fw_cfg has: the "QEMU"
    /// signature, the interface ID (I/O ports only, no DMA) and an empty file
    /// directory.
    pub fn new() -> Self {
        let mut fw_cfg = FwCfg {
            items: BTreeMap::new(),
            selector: FW_CFG_SIGNATURE,
            offset: 0,
        };
        fw_cfg.add_bytes(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        fw_cfg.add_u32(FW_CFG_ID, FW_CFG_VERSION);
        // The file directory's count is big-endian, unlike the other items.
        fw_cfg.add_bytes(FW_CFG_FILE_DIR, 0u32.to_be_bytes().to_vec());
        fw_cfg
    }

    /// Creates the device with the items a VM of `nb_cpus` CPUs and
    /// `ram_size` bytes of RAM shows its guest, and `kernel_data` (with its
    /// size in `FW_CFG_KERNEL_SIZE`) as the kernel image item.
    pub fn for_vm(nb_cpus: u16, ram_size: u64, kernel_data: Vec<u8>) -> Self {
        let mut fw_cfg = Self::new();
        fw_cfg.add_u16(FW_CFG_NB_CPUS, nb_cpus);
        fw_cfg.add_u16(FW_CFG_MAX_CPUS, nb_cpus);
        fw_cfg.add_u64(FW_CFG_RAM_SIZE, ram_size);
        // Saturate rather than wrap: a >4 GiB item is not a real kernel.
        fw_cfg.set_kernel_data(kernel_data);
        fw_cfg
    }

    /// Set the kernel image item (`KERNEL_DATA` and `KERNEL_SIZE`), known
    /// once the image is loaded.
    pub fn set_kernel_data(&mut self, kernel_data: Vec<u8>) {
        let kernel_size = u32::try_from(kernel_data.len()).unwrap_or(u32::MAX);
        self.add_u32(FW_CFG_KERNEL_SIZE, kernel_size);
        self.add_bytes(FW_CFG_KERNEL_DATA, kernel_data);
    }

    /// Adds or replaces item `key`.
    pub fn add_bytes(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key & !FW_CFG_WRITE_CHANNEL, data);
    }

    /// Adds or replaces item `key` with a little-endian `u16`.
    pub fn add_u16(&mut self, key: u16, value: u16) {
        self.add_bytes(key, value.to_le_bytes().to_vec());
    }

    /// Adds or replaces item `key` with a little-endian `u32`.
    pub fn add_u32(&mut self, key: u16, value: u32) {
        self.add_bytes(key, value.to_le_bytes().to_vec());
    }

    /// Adds or replaces item `key` with a little-endian `u64`.
    pub fn add_u64(&mut self, key: u16, value: u64) {
        self.add_bytes(key, value.to_le_bytes().to_vec());
    }

    /// Returns item `key`, if present.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items
            .get(&(key & !FW_CFG_WRITE_CHANNEL))
            .map(Vec::as_slice)
    }

    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    fn read_byte(&mut self) -> u8 {
        let Some(item) = self.items.get(&(self.selector & !FW_CFG_WRITE_CHANNEL)) else {
            return 0;
        };
        match usize::try_from(self.offset)
            .ok()
            .and_then(|idx| item.get(idx))
        {
            Some(byte) => {
                // Stop advancing at the end of the item, as QEMU does, so the
                // offset cannot wrap back into the data.
                self.offset = self.offset.saturating_add(1);
                *byte
            }
            None => 0,
        }
    }
}

impl MutDevicePio for FwCfg {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if base.0.checked_add(offset) == Some(FW_CFG_PORT_DATA) {
            for byte in data.iter_mut() {
                *byte = self.read_byte();
            }
        } else {
            fill_all_ones(data);
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if base.0.checked_add(offset) != Some(FW_CFG_PORT_SEL) {
            // Data port writes are the deprecated write path; QEMU ignores
            // them too.
            return;
        }
        match data {
            [lo] => self.select(u16::from(*lo)),
            [lo, hi] => self.select(u16::from_le_bytes([*lo, *hi])),
            _ => {}
        }
    }
}

/// Saved state of an [`FwCfg`]: the guest's position and every item, so
/// a restore needs nothing the image gave at boot (`KERNEL_DATA`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FwCfgState {
    pub selector: u16,
    pub offset: u32,
    pub items: BTreeMap<u16, Vec<u8>>,
}

impl Persist for FwCfg {
    type State = FwCfgState;
    type Args = ();
    type Error = RestoreError;

    fn save(&self) -> FwCfgState {
        FwCfgState {
            selector: self.selector,
            offset: self.offset,
            items: self.items.clone(),
        }
    }

    fn restore(_args: (), state: &FwCfgState) -> Result<Self, RestoreError> {
        let mut fw_cfg = FwCfg::new();
        fw_cfg.items = state.items.clone();
        fw_cfg.selector = state.selector;
        fw_cfg.offset = state.offset;
        Ok(fw_cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PioAddress = PioAddress(FW_CFG_PORT_SEL);

    fn select(dev: &mut FwCfg, key: u16) {
        dev.pio_write(BASE, 0, &key.to_le_bytes());
    }

    fn read(dev: &mut FwCfg, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let mut b = [0u8; 1];
                dev.pio_read(BASE, 1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_id_and_file_dir() {
        let mut dev = FwCfg::new();
        select(&mut dev, FW_CFG_SIGNATURE);
        assert_eq!(read(&mut dev, 4), b"QEMU");
        assert_eq!(read(&mut dev, 2), [0, 0]);
        select(&mut dev, FW_CFG_ID);
        assert_eq!(read(&mut dev, 4), [1, 0, 0, 0]);
        select(&mut dev, FW_CFG_FILE_DIR);
        assert_eq!(read(&mut dev, 4), [0, 0, 0, 0]);
    }

    #[test]
    fn for_vm_items() {
        let mut dev = FwCfg::for_vm(3, 0x1_2345_6789, b"kern".to_vec());
        select(&mut dev, FW_CFG_NB_CPUS);
        assert_eq!(read(&mut dev, 2), [3, 0]);
        select(&mut dev, FW_CFG_MAX_CPUS);
        assert_eq!(read(&mut dev, 2), [3, 0]);
        select(&mut dev, FW_CFG_RAM_SIZE);
        assert_eq!(read(&mut dev, 8), 0x1_2345_6789u64.to_le_bytes());
        select(&mut dev, FW_CFG_KERNEL_SIZE);
        assert_eq!(read(&mut dev, 4), [4, 0, 0, 0]);
        select(&mut dev, FW_CFG_KERNEL_DATA);
        assert_eq!(read(&mut dev, 5), b"kern\0");
    }

    #[test]
    fn selecting_resets_offset_and_unknown_items_read_zero() {
        let mut dev = FwCfg::new();
        select(&mut dev, FW_CFG_SIGNATURE);
        assert_eq!(read(&mut dev, 2), b"QE");
        select(&mut dev, FW_CFG_SIGNATURE);
        assert_eq!(read(&mut dev, 4), b"QEMU");
        select(&mut dev, 0x1234);
        assert_eq!(read(&mut dev, 3), [0, 0, 0]);
        // The write-channel bit does not change what is read.
        select(&mut dev, FW_CFG_WRITE_CHANNEL | FW_CFG_SIGNATURE);
        assert_eq!(read(&mut dev, 1), b"Q");
    }

    #[test]
    fn byte_selector_write_and_wide_data_read() {
        let mut dev = FwCfg::new();
        dev.pio_write(BASE, 0, &[FW_CFG_SIGNATURE as u8]);
        let mut buf = [0u8; 8];
        dev.pio_read(BASE, 1, &mut buf);
        assert_eq!(&buf, b"QEMU\0\0\0\0");
        // A separately registered data port decodes the same.
        dev.pio_write(PioAddress(FW_CFG_PORT_SEL), 0, &[FW_CFG_ID as u8, 0]);
        let mut b = [0u8; 1];
        dev.pio_read(PioAddress(FW_CFG_PORT_DATA), 0, &mut b);
        assert_eq!(b, [1]);
    }

    #[test]
    fn other_accesses_are_ignored() {
        let mut dev = FwCfg::new();
        select(&mut dev, FW_CFG_SIGNATURE);
        // Wide selector writes, data writes and out-of-range ports.
        dev.pio_write(BASE, 0, &[FW_CFG_ID as u8, 0, 0, 0]);
        dev.pio_write(BASE, 1, &[FW_CFG_ID as u8]);
        dev.pio_write(BASE, 2, &[FW_CFG_ID as u8, 0]);
        dev.pio_write(BASE, 0xffff, &[FW_CFG_ID as u8, 0]);
        dev.pio_write(BASE, 0, &[]);
        let mut buf = [0u8; 2];
        dev.pio_read(BASE, 0, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        dev.pio_read(BASE, 0xfff0, &mut buf);
        assert_eq!(buf, [0xff, 0xff]);
        assert_eq!(read(&mut dev, 4), b"QEMU");
    }

    #[test]
    fn add_replaces_items() {
        let mut dev = FwCfg::new();
        dev.add_u32(0x20, 7);
        dev.add_u16(0x20, 9);
        assert_eq!(dev.item(0x20), Some(&[9u8, 0][..]));
        assert_eq!(dev.item(0x21), None);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut dev = FwCfg::for_vm(2, 1 << 30, vec![1, 2, 3, 4, 5]);
        select(&mut dev, FW_CFG_KERNEL_DATA);
        assert_eq!(read(&mut dev, 2), [1, 2]);
        let state = dev.save();
        assert_eq!((state.selector, state.offset), (FW_CFG_KERNEL_DATA, 2));
        assert_eq!(state.items[&FW_CFG_KERNEL_DATA], [1, 2, 3, 4, 5]);

        let mut restored = FwCfg::restore((), &state).expect("restore");
        assert_eq!(restored, dev);
        assert_eq!(read(&mut restored, 4), read(&mut dev, 4));
        assert_eq!(restored.save(), dev.save());
        select(&mut restored, FW_CFG_NB_CPUS);
        assert_eq!(read(&mut restored, 2), [2, 0]);
    }
}
