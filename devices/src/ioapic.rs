//! An 82093AA I/O APIC in kvmrun, for the split irqchip (`--irqchip
//! split`: local APICs in KVM, the I/O APIC here).
//!
//! Written from Intel's "82093AA I/O Advanced Programmable Interrupt
//! Controller (IOAPIC)" datasheet and matched to what KVM's in-kernel
//! I/O APIC does where the datasheet leaves room, so a guest sees the
//! same controller with either irqchip:
//!
//! - 24 pins; IOREGSEL at offset 0x00, IOWIN at 0x10 (registers ID,
//!   version 0x11, arbitration, and the redirection table from 0x10).
//! - Polarity is stored but not applied: a line's level is "asserted".
//! - Edge pins deliver on a rising edge while unmasked; an edge that
//!   comes while masked is lost.
//! - Level pins deliver while the line is high, unmasked and Remote IRR
//!   is clear, then set Remote IRR; the local APIC's EOI of the vector
//!   clears it (and delivers again if the line is still high). The EOI
//!   comes as a write of the vector to offset 0x40, the EOI register of
//!   later I/O APIC versions, which KVM's accepts too.
//!
//! Delivery turns a redirection entry into an MSI (Intel SDM, "Message
//! Signalled Interrupts": the address names the destination, the data
//! the vector, delivery and trigger modes) in one function, `msi_of()`,
//! and hands it to an [`MsiSink`]; an interrupt-remapping unit belongs
//! in that path. The sink also hears each pin's message whenever the
//! guest reprograms it, so KVM's local APICs know which vectors are
//! level-triggered and need their EOI reported.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use crate::{le_value, MsiMessage, MsiSink, Persist, RestoreError};

/// Guest-physical base of the I/O APIC's registers.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Bytes decoded at [`IOAPIC_BASE`].
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Redirection table entries (pins).
pub const IOAPIC_PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// The EOI register: the VMM writes a local APIC's EOI of a vector here.
pub const IOAPIC_EOI: u64 = 0x40;

const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_TABLE: u8 = 0x10;

/// Version 0x11, highest redirection entry 23.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);
/// Only bits 24-27 of the ID register are the ID.
const ID_MASK: u32 = 0x0f00_0000;

const VECTOR: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// Interrupt format: the entry is in remappable format (VT-d,
/// "Interrupt Requests in Remappable Format").
const FORMAT_REMAPPABLE: u64 = 1 << 48;
/// Bits the guest cannot write: delivery status and Remote IRR.
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;

/// The local APICs' MSI window (Intel SDM, "Message Address Register
/// Format").
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// The I/O APIC.
pub struct Ioapic {
    sink: Arc<dyn MsiSink>,
    id: u32,
    ioregsel: u8,
    table: [u64; IOAPIC_PINS],
    /// Each pin's line level, bit `pin`.
    lines: u32,
}

impl std::fmt::Debug for Ioapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("lines", &format_args!("{:#x}", self.lines))
            .finish_non_exhaustive()
    }
}

/// The MSI a redirection entry delivers as: physical or logical
/// destination in the address, vector, delivery mode and trigger mode
/// in the data. An entry in remappable format carries its interrupt
/// handle in bits 63:49 and bit 11 instead: they land in the address
/// bits a remappable MSI holds them in (bits 19:5 and 2, the format
/// bit 48 in bit 4), for an interrupt-remapping unit to look up.
pub fn msi_of(entry: u64) -> MsiMessage {
    let high = if entry & FORMAT_REMAPPABLE != 0 {
        (entry >> 48) & 0xffff
    } else {
        ((entry >> DEST_SHIFT) & 0xff) << 8
    };
    let logical = entry & DEST_MODE_LOGICAL != 0;
    let mode = (entry >> DELIVERY_MODE_SHIFT) & 7;
    MsiMessage {
        address: MSI_ADDRESS_BASE | (high << 4) | (u64::from(logical) << 2),
        data: ((entry & VECTOR) | (mode << 8) | (entry & TRIGGER_LEVEL)) as u32,
    }
}

impl Ioapic {
    /// An I/O APIC after reset: every pin masked, edge, vector 0.
    pub fn new(sink: Arc<dyn MsiSink>) -> Self {
        let apic = Ioapic {
            sink,
            id: 0,
            ioregsel: 0,
            table: [MASKED; IOAPIC_PINS],
            lines: 0,
        };
        apic.announce_routes();
        apic
    }

    /// Tell the sink every pin's message (at reset and restore).
    fn announce_routes(&self) {
        for (pin, &e) in self.table.iter().enumerate() {
            self.sink.route_pin(pin as u8, msi_of(e));
        }
    }

    /// The redirection entry of `pin` (for tests and diagnostics).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.table.get(pin).copied()
    }

    /// Drive line `pin` to `level`; a pin past the table is ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool) {
        let Some(&entry) = self.table.get(pin) else {
            log::debug!("ioapic: no pin {pin}");
            return;
        };
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if !level {
            self.lines &= !bit;
            return;
        }
        self.lines |= bit;
        if entry & TRIGGER_LEVEL != 0 || !was {
            self.service(pin);
        }
    }

    /// Deliver `pin` if it may: unmasked, and for a level pin, line high
    /// and Remote IRR clear.
    fn service(&mut self, pin: usize) {
        let entry = self.table[pin];
        if entry & MASKED != 0 {
            return;
        }
        if entry & TRIGGER_LEVEL != 0 {
            if entry & REMOTE_IRR != 0 || self.lines & (1 << pin) == 0 {
                return;
            }
            self.table[pin] |= REMOTE_IRR;
        }
        self.sink.send(msi_of(entry));
    }

    /// A local APIC's EOI of `vector`: clear Remote IRR of the level pins
    /// that deliver it, and deliver again those whose line is still high.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let e = self.table[pin];
            if e & VECTOR == u64::from(vector) && e & TRIGGER_LEVEL != 0 && e & REMOTE_IRR != 0 {
                self.table[pin] &= !REMOTE_IRR;
                self.service(pin);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            REG_ID | REG_ARB => self.id,
            REG_VERSION => VERSION,
            r if r >= REG_TABLE => match self.table.get(usize::from((r - REG_TABLE) / 2)) {
                Some(&e) if r & 1 == 0 => e as u32,
                Some(&e) => (e >> 32) as u32,
                None => u32::MAX,
            },
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.ioregsel {
            REG_ID => self.id = value & ID_MASK,
            r if r >= REG_TABLE => {
                let pin = usize::from((r - REG_TABLE) / 2);
                if pin < IOAPIC_PINS {
                    self.write_entry(pin, r & 1 == 1, value);
                }
            }
            _ => {}
        }
    }

    /// Write one half of `pin`'s entry, keeping its read-only bits.
    fn write_entry(&mut self, pin: usize, high: bool, value: u32) {
        let old = self.table[pin];
        let mut e = if high {
            (old & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (old & !0xffff_ffff) | u64::from(value)
        };
        e = (e & !READ_ONLY) | (old & READ_ONLY);
        // An edge pin has no Remote IRR (KVM clears it the same way).
        if e & TRIGGER_LEVEL == 0 {
            e &= !REMOTE_IRR;
        }
        self.table[pin] = e;
        if msi_of(e) != msi_of(old) {
            self.sink.route_pin(pin as u8, msi_of(e));
        }
        // A level line held high while masked delivers on unmask.
        if e & TRIGGER_LEVEL != 0 {
            self.service(pin);
        }
    }
}

impl MutDeviceMmio for Ioapic {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let v = match offset {
            IOREGSEL => u32::from(self.ioregsel),
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let Some(v) = le_value(data) else {
            return;
        };
        match offset {
            IOREGSEL => self.ioregsel = v as u8,
            IOWIN => self.write_register(v as u32),
            IOAPIC_EOI => self.end_of_interrupt(v as u8),
            _ => log::debug!("ioapic: write of {v:#x} at offset {offset:#x} ignored"),
        }
    }
}

/// Saved state of an [`Ioapic`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct IoapicState {
    pub id: u32,
    pub ioregsel: u8,
    pub table: Vec<u64>,
    pub lines: u32,
}

impl Persist for Ioapic {
    type State = IoapicState;
    type Args = Arc<dyn MsiSink>;
    type Error = RestoreError;

    fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            ioregsel: self.ioregsel,
            table: self.table.to_vec(),
            lines: self.lines,
        }
    }

    fn restore(sink: Arc<dyn MsiSink>, state: &IoapicState) -> Result<Self, RestoreError> {
        let table: [u64; IOAPIC_PINS] =
            state
                .table
                .as_slice()
                .try_into()
                .map_err(|_| RestoreError::Invalid {
                    device: "ioapic",
                    reason: format!(
                        "{} redirection entries, expected {IOAPIC_PINS}",
                        state.table.len()
                    ),
                })?;
        let apic = Ioapic {
            sink,
            id: state.id & ID_MASK,
            ioregsel: state.ioregsel,
            table,
            lines: state.lines & ((1 << IOAPIC_PINS) - 1),
        };
        apic.announce_routes();
        Ok(apic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::MsiRecorder;

    fn apic() -> (Ioapic, Arc<MsiRecorder>) {
        let rec = Arc::new(MsiRecorder::default());
        let a = Ioapic::new(rec.clone());
        rec.take_routes();
        (a, rec)
    }

    fn write(a: &mut Ioapic, offset: u64, v: u32) {
        a.mmio_write(MmioAddress(IOAPIC_BASE), offset, &v.to_le_bytes());
    }

    fn read(a: &mut Ioapic, reg: u8) -> u32 {
        write(a, IOREGSEL, u32::from(reg));
        let mut d = [0u8; 4];
        a.mmio_read(MmioAddress(IOAPIC_BASE), IOWIN, &mut d);
        u32::from_le_bytes(d)
    }

    fn program(a: &mut Ioapic, pin: u8, low: u32, dest: u8) {
        write(a, IOREGSEL, u32::from(REG_TABLE + pin * 2 + 1));
        write(a, IOWIN, u32::from(dest) << 24);
        write(a, IOREGSEL, u32::from(REG_TABLE + pin * 2));
        write(a, IOWIN, low);
    }

    #[test]
    fn registers_read_as_an_82093aa() {
        let (mut a, _) = apic();
        assert_eq!(read(&mut a, REG_VERSION), 0x0017_0011);
        write(&mut a, IOREGSEL, 0);
        write(&mut a, IOWIN, 0xffff_ffff);
        assert_eq!(read(&mut a, REG_ID), 0x0f00_0000);
        assert_eq!(read(&mut a, REG_ARB), 0x0f00_0000);
        assert_eq!(read(&mut a, REG_TABLE), MASKED as u32);
        // Past the table: all ones, like an undecoded register.
        assert_eq!(read(&mut a, REG_TABLE + 48), u32::MAX);
    }

    #[test]
    fn messages_name_destination_vector_and_trigger() {
        let e = 0x41 | (1 << 8) | DEST_MODE_LOGICAL | TRIGGER_LEVEL | (3u64 << DEST_SHIFT);
        let m = msi_of(e);
        assert_eq!(m.address, 0xfee0_3004);
        assert_eq!(m.data, 0x8141);
    }

    #[test]
    fn edge_pins_deliver_on_rising_edges_only_while_unmasked() {
        let (mut a, rec) = apic();
        program(&mut a, 14, 0x76, 0);
        assert_eq!(rec.take_routes(), [(14, msi_of(0x76))]);
        a.set_irq(14, true);
        a.set_irq(14, true);
        assert_eq!(rec.take_sent().len(), 1);
        a.set_irq(14, false);
        program(&mut a, 14, 0x76 | MASKED as u32, 0);
        a.set_irq(14, true);
        a.set_irq(14, false);
        program(&mut a, 14, 0x76, 0);
        assert!(rec.take_sent().is_empty(), "a masked edge is lost");
        a.set_irq(14, true);
        assert_eq!(rec.take_sent(), [msi_of(0x76)]);
    }

    #[test]
    fn level_pins_wait_for_eoi_and_retrigger() {
        let (mut a, rec) = apic();
        let low = 0x77 | TRIGGER_LEVEL as u32;
        program(&mut a, 14, low, 0);
        a.set_irq(14, true);
        a.set_irq(14, true);
        assert_eq!(rec.take_sent().len(), 1, "Remote IRR holds the second");
        assert_ne!(read(&mut a, REG_TABLE + 28) & REMOTE_IRR as u32, 0);
        // EOI with the line still high: delivered again.
        write(&mut a, IOAPIC_EOI, 0x77);
        assert_eq!(rec.take_sent().len(), 1);
        a.set_irq(14, false);
        a.end_of_interrupt(0x77);
        assert!(rec.take_sent().is_empty());
        assert_eq!(read(&mut a, REG_TABLE + 28) & REMOTE_IRR as u32, 0);
        // The guest cannot write Remote IRR.
        program(&mut a, 14, low | REMOTE_IRR as u32, 0);
        assert_eq!(read(&mut a, REG_TABLE + 28) & REMOTE_IRR as u32, 0);
    }

    #[test]
    fn masked_level_line_delivers_on_unmask() {
        let (mut a, rec) = apic();
        let low = 0x82 | TRIGGER_LEVEL as u32;
        program(&mut a, 14, low | MASKED as u32, 0);
        a.set_irq(14, true);
        assert!(rec.take_sent().is_empty());
        program(&mut a, 14, low, 0);
        assert_eq!(rec.take_sent(), [msi_of(u64::from(low))]);
    }

    #[test]
    fn state_survives_save_and_restore() {
        let (mut a, rec) = apic();
        program(&mut a, 3, 0x55 | TRIGGER_LEVEL as u32, 2);
        a.set_irq(3, true);
        write(&mut a, IOREGSEL, 0);
        write(&mut a, IOWIN, 0x0200_0000);
        rec.take_sent();
        let st = a.save();
        let rec2 = Arc::new(MsiRecorder::default());
        let mut b = Ioapic::restore(rec2.clone(), &st).unwrap();
        assert_eq!(b.save(), st);
        assert_eq!(rec2.take_routes().len(), IOAPIC_PINS, "routes announced");
        // Remote IRR came along: only the EOI delivers again.
        b.set_irq(3, true);
        assert!(rec2.take_sent().is_empty());
        b.end_of_interrupt(0x55);
        assert_eq!(rec2.take_sent().len(), 1);
        let mut bad = st.clone();
        bad.table.pop();
        assert!(Ioapic::restore(rec2, &bad).is_err());
    }

    #[test]
    fn a_remappable_entry_becomes_a_remappable_msi() {
        // Handle 0x8001: bits 63:49 = 1, bit 11 = handle bit 15.
        let e = (1u64 << 49) | FORMAT_REMAPPABLE | DEST_MODE_LOGICAL | TRIGGER_LEVEL | 0xed;
        let m = msi_of(e);
        assert_eq!(m.address, 0xfee0_0000 | (1 << 5) | (1 << 4) | (1 << 2));
        assert_eq!(m.data, 0x80ed);
        // Compatibility format: the destination in bits 19:12 only.
        assert_eq!(msi_of(0x0300_0000_0000_0030).address, 0xfee0_3000);
    }
}
