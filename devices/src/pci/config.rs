//! A PCI function's configuration space: the type 0 header, BARs and the
//! capability list (PCI Local Bus specification, "Configuration Space").
//!
//! Bytes are stored with a mask of the bits the guest may write; a BAR's
//! mask covers only its address bits, so writing all-ones reads back the
//! size, as BAR sizing expects. Where a BAR decodes follows from the
//! stored bytes and the command register (`mappings()`); the root bus
//! compares them around every write to move BARs on the VMM's buses.

use serde::{Deserialize, Serialize};

/// Conventional configuration space; PCI Express extended space reads 0.
pub const CONFIG_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;

pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Where a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarKind {
    Io,
    Mem32,
    /// Takes this BAR and the next.
    Mem64,
}

/// A BAR a device has: its kind and size (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

/// Where BAR `index` decodes now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    pub index: u8,
    pub kind: BarKind,
    pub addr: u64,
    pub size: u64,
}

/// The identity of a function: the header's read-only fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciId {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Class code: base class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciConfig {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    bars: [Option<BarSpec>; NUM_BARS],
    /// Offset of the last capability, where the next one is linked.
    last_cap: Option<u8>,
    /// Where the next capability goes.
    next_cap: usize,
}

/// What a snapshot keeps of a configuration space: its bytes (the rest
/// follows from the device's kind).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    pub bytes: Vec<u8>,
}

impl PciConfig {
    /// A type 0 header for `id`, INTA if `intx`, no BARs or capabilities.
    pub fn new(id: PciId, intx: bool) -> Self {
        let mut c = PciConfig {
            bytes: vec![0; CONFIG_SIZE],
            wmask: vec![0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: 0x40,
        };
        c.put16(VENDOR_ID, id.vendor);
        c.put16(VENDOR_ID + 2, id.device);
        c.bytes[0x08] = id.revision;
        c.bytes[0x09] = id.class.2;
        c.bytes[0x0a] = id.class.1;
        c.bytes[0x0b] = id.class.0;
        c.put16(SUBSYSTEM_VENDOR_ID, id.subsystem_vendor);
        c.put16(SUBSYSTEM_VENDOR_ID + 2, id.subsystem);
        // Command: I/O, memory, bus master, INTx disable.
        c.wmask[COMMAND] = 0x07;
        c.wmask[COMMAND + 1] = 0x04;
        c.wmask[INTERRUPT_LINE] = 0xff;
        if intx {
            c.bytes[INTERRUPT_PIN] = 1;
        }
        c
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn get32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap_or([0; 4]))
    }

    pub fn read16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    pub fn command(&self) -> u16 {
        self.read16(COMMAND)
    }

    /// Give the function BAR `index` (a 64-bit BAR also takes the next).
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) {
        let size = spec.size.next_power_of_two().max(match spec.kind {
            BarKind::Io => 4,
            _ => 16,
        });
        let at = BAR0 + 4 * index;
        let (flags, mask) = match spec.kind {
            BarKind::Io => (0x1u32, !(size as u32 - 1) & !0x3),
            BarKind::Mem32 => (u32::from(spec.prefetchable) << 3, !(size as u32 - 1) & !0xf),
            BarKind::Mem64 => (
                0x4 | u32::from(spec.prefetchable) << 3,
                !((size - 1) as u32) & !0xf,
            ),
        };
        self.put32(at, flags);
        self.wmask[at..at + 4].copy_from_slice(&mask.to_le_bytes());
        if spec.kind == BarKind::Mem64 {
            let hi = !((size - 1) >> 32) as u32;
            self.wmask[at + 4..at + 8].copy_from_slice(&hi.to_le_bytes());
        }
        self.bars[index] = Some(BarSpec { size, ..spec });
    }

    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address programmed into BAR `index`.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar(index)?;
        let at = BAR0 + 4 * index;
        let lo = self.get32(at);
        Some(match spec.kind {
            BarKind::Io => u64::from(lo & !0x3),
            BarKind::Mem32 => u64::from(lo & !0xf),
            BarKind::Mem64 => u64::from(lo & !0xf) | u64::from(self.get32(at + 4)) << 32,
        })
    }

    /// Program BAR `index` with `addr`, as firmware does.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar(index) else {
            return;
        };
        let at = BAR0 + 4 * index;
        let flags = self.get32(at) & if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.put32(at, (addr as u32 & !(spec.size as u32 - 1)) | flags);
        if spec.kind == BarKind::Mem64 {
            self.put32(at + 4, (addr >> 32) as u32);
        }
    }

    pub fn set_command(&mut self, bits: u16) {
        self.put16(COMMAND, bits);
    }

    pub fn set_interrupt_line(&mut self, line: u8) {
        self.bytes[INTERRUPT_LINE] = line;
    }

    /// Where every BAR decodes now: its decoding is enabled in the command
    /// register and its address is programmed (not 0, and not all-ones in
    /// the address bits of its low half, which is what sizing leaves).
    pub fn mappings(&self) -> Vec<BarMapping> {
        let cmd = self.command();
        (0..NUM_BARS)
            .filter_map(|i| {
                let spec = self.bar(i)?;
                let enabled = match spec.kind {
                    BarKind::Io => cmd & COMMAND_IO != 0,
                    _ => cmd & COMMAND_MEMORY != 0,
                };
                let addr = self.bar_address(i)?;
                let mask = u32::from_le_bytes(
                    self.wmask[BAR0 + 4 * i..BAR0 + 4 * i + 4]
                        .try_into()
                        .unwrap_or([0; 4]),
                );
                let sizing = self.get32(BAR0 + 4 * i) & mask == mask;
                let fits = match spec.kind {
                    BarKind::Io => addr + spec.size <= 0x1_0000,
                    BarKind::Mem32 => addr + spec.size <= 1 << 32,
                    BarKind::Mem64 => addr.checked_add(spec.size).is_some(),
                };
                (enabled && addr != 0 && !sizing && fits).then_some(BarMapping {
                    index: i as u8,
                    kind: spec.kind,
                    addr,
                    size: spec.size,
                })
            })
            .collect()
    }

    /// Append capability `id` with `body` (the bytes after ID and next
    /// pointer), of which the bits in `wmask` are writable; its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> usize {
        let at = self.next_cap;
        let len = 2 + body.len();
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        for (i, m) in wmask.iter().enumerate().take(body.len()) {
            self.wmask[at + 2 + i] = *m;
        }
        match self.last_cap {
            None => self.bytes[CAPABILITIES_POINTER] = at as u8,
            Some(last) => self.bytes[usize::from(last) + 1] = at as u8,
        }
        let status = self.read16(STATUS) | STATUS_CAPABILITIES;
        self.put16(STATUS, status);
        self.last_cap = Some(at as u8);
        self.next_cap = (at + len).next_multiple_of(4);
        at
    }

    /// Read `data.len()` bytes at `offset`; past the header, zeros.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// A guest write: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let m = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (d & m);
        }
    }

    /// Overwrite a byte the guest cannot write (a capability's state).
    pub fn set_byte(&mut self, at: usize, v: u8) {
        if let Some(b) = self.bytes.get_mut(at) {
            *b = v;
        }
    }

    pub fn byte(&self, at: usize) -> u8 {
        self.bytes.get(at).copied().unwrap_or(0)
    }

    pub fn state(&self) -> PciConfigState {
        PciConfigState {
            bytes: self.bytes.clone(),
        }
    }

    /// Take the bytes of a saved configuration space of the same device.
    pub fn restore(&mut self, state: &PciConfigState) -> Result<(), String> {
        if state.bytes.len() != CONFIG_SIZE {
            return Err(format!(
                "configuration space of {} bytes, not {CONFIG_SIZE}",
                state.bytes.len()
            ));
        }
        // The identity and capability layout are the device's own; a state
        // of another device would be read wrongly.
        if state.bytes[..4] != self.bytes[..4] {
            return Err("configuration space of another device".into());
        }
        self.bytes.copy_from_slice(&state.bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> PciConfig {
        let mut c = PciConfig::new(
            PciId {
                vendor: 0x1af4,
                device: 0x1044,
                class: (0xff, 0, 0),
                ..Default::default()
            },
            true,
        );
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x4000,
                prefetchable: true,
            },
        );
        c.add_bar(
            2,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
        );
        c
    }

    fn r32(c: &PciConfig, at: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(at, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = dev();
        assert_eq!(r32(&c, 0), 0x1044_1af4);
        c.write(0, &[0xff; 4]);
        assert_eq!(r32(&c, 0), 0x1044_1af4);
        assert_eq!(c.byte(INTERRUPT_PIN), 1);
        c.write(INTERRUPT_LINE, &[17]);
        assert_eq!(c.byte(INTERRUPT_LINE), 17);
    }

    #[test]
    fn bars_size_and_program() {
        let mut c = dev();
        // Memory, 64-bit, prefetchable: flags 0xc.
        assert_eq!(r32(&c, BAR0), 0xc);
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(r32(&c, BAR0), 0xffff_c00c);
        assert_eq!(r32(&c, BAR0 + 4), 0xffff_ffff);
        c.write(BAR0 + 8, &[0xff; 4]);
        assert_eq!(r32(&c, BAR0 + 8), 0xffff_ffe1);
        // Unused BARs read 0 and stay 0.
        c.write(BAR0 + 12, &[0xff; 4]);
        assert_eq!(r32(&c, BAR0 + 12), 0);
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        c.write(BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0x1_d000_0000));
    }

    #[test]
    fn mappings_follow_command_and_sizing() {
        let mut c = dev();
        c.set_bar_address(0, 0xc000_0000);
        c.set_bar_address(2, 0xc040);
        assert!(c.mappings().is_empty());
        c.set_command(COMMAND_MEMORY);
        let m = c.mappings();
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].index, m[0].addr, m[0].size), (0, 0xc000_0000, 0x4000));
        c.set_command(COMMAND_MEMORY | COMMAND_IO);
        assert_eq!(c.mappings().len(), 2);
        // Sizing with decoding on: the BAR is not mapped meanwhile.
        c.write(BAR0, &[0xff; 4]);
        assert_eq!(c.mappings().len(), 1);
        c.write(BAR0, &0xc000_8000u32.to_le_bytes());
        assert_eq!(c.mappings()[0].addr, 0xc000_8000);
    }

    #[test]
    fn capabilities_chain() {
        let mut c = dev();
        let a = c.add_capability(0x11, &[0; 10], &[0, 0xc0]);
        let b = c.add_capability(0x09, &[1, 2], &[]);
        assert_eq!(c.byte(CAPABILITIES_POINTER) as usize, a);
        assert_eq!(c.byte(a) as usize, 0x11);
        assert_eq!(c.byte(a + 1) as usize, b);
        assert_eq!(c.byte(b + 1), 0);
        assert_ne!(c.read16(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(a + 2, &[0xff, 0xff]);
        assert_eq!(c.read16(a + 2), 0xc000);
    }

    #[test]
    fn state_round_trips_and_checks_identity() {
        let mut c = dev();
        c.set_bar_address(0, 0xc000_0000);
        c.set_command(COMMAND_MEMORY);
        let s = c.state();
        let mut d = dev();
        d.restore(&s).unwrap();
        assert_eq!(d.mappings(), c.mappings());
        let other = PciConfig::new(PciId::default(), false);
        assert!(other.clone().restore(&s).is_err());
        assert!(d.restore(&PciConfigState { bytes: vec![0; 3] }).is_err());
    }
}
