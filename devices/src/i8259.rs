//! A pair of 8259A programmable interrupt controllers (master at 0x20,
//! slave at 0xa0, cascaded on the master's IRQ2), for the split irqchip:
//! KVM then has no PICs, and the pair's output reaches vCPU 0 as ExtINT
//! (KVM_INTERRUPT).
//!
//! Written from Intel's "8259A Programmable Interrupt Controller"
//! datasheet and matched to QEMU's i8259 where the datasheet leaves room:
//!
//! - ICW1-ICW4 (single or cascade mode, ICW4 optional; the 8086 vector
//!   base in ICW2), OCW1 (mask), OCW2 (EOIs and rotation), OCW3 (IRR/ISR
//!   read select, poll, special mask).
//! - Fully nested priority with rotation; auto-EOI (with rotation);
//!   special fully nested mode on the master.
//! - Edge or level trigger per line, from the ELCRs at 0x4d0/0x4d1 (PIIX
//!   "Edge/Level Control Registers"); an edge input is latched in IRR on
//!   its rising edge, a level input follows the line.
//! - INTA (`acknowledge()`) returns the vector and sets ISR; with nothing
//!   left to deliver it returns IRQ7's vector of the controller asked
//!   (a spurious interrupt) and sets no ISR bit.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, IntrKick, Persist, RestoreError};

/// The master's command port (its data port is the next one).
pub const PIC_MASTER_BASE: u16 = 0x20;
/// The slave's command port (its data port is the next one).
pub const PIC_SLAVE_BASE: u16 = 0xa0;
/// Ports each controller decodes.
pub const PIC_PORT_COUNT: u16 = 2;
/// The master's ELCR (the slave's is the next port).
pub const ELCR_BASE: u16 = 0x4d0;
/// Ports of the two ELCRs.
pub const ELCR_PORT_COUNT: u16 = 2;

/// The master's input the slave's output is wired to.
const CASCADE_IRQ: u8 = 2;
/// ELCR bits that can be set: IRQ0-2 (master) and IRQ8 and 13 (slave)
/// are edge-only on a PIIX.
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// One 8259A's registers.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct ChipState {
    /// Input levels seen last, to find rising edges.
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    /// The lowest-priority rotation: IRQ `priority_add` has the highest.
    pub priority_add: u8,
    pub irq_base: u8,
    /// OCW3: read ISR (true) or IRR (false) at the command port.
    pub read_isr: bool,
    pub poll: bool,
    pub special_mask: bool,
    /// Which ICW the data port expects next; 0: none (OCW1).
    pub init_state: u8,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested: bool,
    pub init4: bool,
    pub single_mode: bool,
    pub elcr: u8,
}

/// The priority level (0 highest) of the highest-priority bit of `mask`,
/// 8 when empty.
fn priority(s: &ChipState, mask: u8) -> u8 {
    if mask == 0 {
        return 8;
    }
    (0..8)
        .find(|p| mask & (1 << ((p + s.priority_add) & 7)) != 0)
        .unwrap_or(8)
}

impl ChipState {
    /// The IRQ this chip would raise INT for, if any.
    fn pending(&self, master: bool) -> Option<u8> {
        let want = priority(self, self.irr & !self.imr);
        if want == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && master {
            in_service &= !(1 << CASCADE_IRQ);
        }
        (want < priority(self, in_service)).then_some((want + self.priority_add) & 7)
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
            } else {
                self.irr &= !mask;
            }
        } else if level && self.last_irr & mask == 0 {
            self.irr |= mask;
        }
        if level {
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    fn intack(&mut self, irq: u8) {
        let mask = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
    }

    /// ICW1: start initialisation. The ELCR is not part of the 8259A and
    /// keeps its value; a level input still high stays requested.
    fn init_reset(&mut self, icw1: u8) {
        *self = ChipState {
            irr: self.irr & self.elcr,
            elcr: self.elcr,
            init_state: 1,
            init4: icw1 & 1 != 0,
            single_mode: icw1 & 2 != 0,
            ..ChipState::default()
        };
        if icw1 & 0x08 != 0 {
            log::debug!("i8259: level-triggered mode in ICW1 ignored (the ELCR decides)");
        }
    }

    fn write_command(&mut self, v: u8) {
        if v & 0x10 != 0 {
            self.init_reset(v);
        } else if v & 0x08 != 0 {
            // OCW3.
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 1 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            self.write_ocw2(v);
        }
    }

    fn write_ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0 | 4 => self.rotate_on_auto_eoi = v >> 7 != 0,
            // Non-specific EOI, with rotation for 5.
            cmd @ (1 | 5) => {
                let p = priority(self, self.isr);
                if p != 8 {
                    let irq = (p + self.priority_add) & 7;
                    self.isr &= !(1 << irq);
                    if cmd == 5 {
                        self.priority_add = (irq + 1) & 7;
                    }
                }
            }
            3 => self.isr &= !(1 << level),
            6 => self.priority_add = (level + 1) & 7,
            7 => {
                self.isr &= !(1 << level);
                self.priority_add = (level + 1) & 7;
            }
            _ => {}
        }
    }

    fn write_data(&mut self, v: u8) {
        self.init_state = match self.init_state {
            0 => {
                self.imr = v;
                0
            }
            1 => {
                self.irq_base = v & 0xf8;
                match (self.single_mode, self.init4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                }
            }
            2 => {
                if self.init4 {
                    3
                } else {
                    0
                }
            }
            _ => {
                self.special_fully_nested = v & 0x10 != 0;
                self.auto_eoi = v & 0x02 != 0;
                0
            }
        };
    }
}

/// The cascaded pair, with its INT output to the CPU.
pub struct Pic {
    chips: [ChipState; 2],
    /// The INT output's level after the last change.
    output: bool,
    kick: Arc<dyn IntrKick>,
}

impl std::fmt::Debug for Pic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pic")
            .field("chips", &self.chips)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl Pic {
    /// A pair before any ICW: everything unmasked, vector base 0, every
    /// line edge-triggered. `kick` hears each rise of the INT output.
    pub fn new(kick: Arc<dyn IntrKick>) -> Self {
        Pic {
            chips: Default::default(),
            output: false,
            kick,
        }
    }

    /// Program the pair as a PC BIOS leaves it: ICW1-4 given (cascade,
    /// 8086 mode) with vector bases `base` and masks `imr`, master first.
    pub fn load_bios_state(&mut self, base: [u8; 2], imr: [u8; 2]) {
        for (c, (b, m)) in self.chips.iter_mut().zip(base.into_iter().zip(imr)) {
            c.irq_base = b & 0xf8;
            c.imr = m;
            c.init4 = true;
            c.init_state = 0;
        }
        self.update();
    }

    /// Drive ISA line `irq` (0-15); other numbers are not the PIC's.
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        if irq < 16 {
            self.chips[(irq / 8) as usize].set_irq((irq % 8) as u8, level);
            self.update();
        }
    }

    /// The INT output: whether an interrupt waits for INTA.
    pub fn output(&self) -> bool {
        self.output
    }

    /// The INTA cycle: the vector of the highest-priority request, which
    /// goes in service (a spurious IRQ7 when none is left).
    pub fn acknowledge(&mut self) -> u8 {
        let [master, slave] = &mut self.chips;
        let vector = match master.pending(true) {
            Some(CASCADE_IRQ) => {
                let irq = slave.pending(false);
                if let Some(i) = irq {
                    slave.intack(i);
                }
                master.intack(CASCADE_IRQ);
                slave.irq_base + irq.unwrap_or(7)
            }
            Some(irq) => {
                master.intack(irq);
                master.irq_base + irq
            }
            None => master.irq_base + 7,
        };
        self.update();
        vector
    }

    /// Propagate the slave's output to the master's IRQ2 and the
    /// master's to INT; kick on a rise.
    fn update(&mut self) {
        let slave_out = self.chips[1].pending(false).is_some();
        self.chips[0].set_irq(CASCADE_IRQ, slave_out);
        let out = self.chips[0].pending(true).is_some();
        let rose = out && !self.output;
        self.output = out;
        if rose {
            self.kick.kick();
        }
    }

    /// A poll read (OCW3 poll): acknowledge like INTA, report the IRQ
    /// with bit 7 set, or 0.
    fn poll_read(&mut self, idx: usize) -> u8 {
        let chip = &mut self.chips[idx];
        chip.poll = false;
        let Some(irq) = chip.pending(idx == 0) else {
            return 0;
        };
        chip.intack(irq);
        if idx == 0 && irq == CASCADE_IRQ {
            if let Some(i) = self.chips[1].pending(false) {
                self.chips[1].intack(i);
            }
        }
        self.update();
        irq | 0x80
    }

    fn read_port(&mut self, port: u16) -> Option<u8> {
        let idx = match port & !1 {
            PIC_MASTER_BASE => 0,
            PIC_SLAVE_BASE => 1,
            ELCR_BASE => return Some(self.chips[usize::from(port & 1)].elcr),
            _ => return None,
        };
        if self.chips[idx].poll {
            return Some(self.poll_read(idx));
        }
        let chip = &self.chips[idx];
        Some(match (port & 1, chip.read_isr) {
            (0, true) => chip.isr,
            (0, false) => chip.irr,
            _ => chip.imr,
        })
    }

    fn write_port(&mut self, port: u16, v: u8) {
        let idx = match port & !1 {
            PIC_MASTER_BASE => 0,
            PIC_SLAVE_BASE => 1,
            ELCR_BASE => {
                let i = usize::from(port & 1);
                self.chips[i].elcr = v & ELCR_MASK[i];
                return;
            }
            _ => return,
        };
        if port & 1 == 0 {
            self.chips[idx].write_command(v);
        } else {
            self.chips[idx].write_data(v);
        }
        self.update();
    }
}

impl MutDevicePio for Pic {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let port = base.0.wrapping_add(offset);
        match (data.len(), self.read_port(port)) {
            (1, Some(v)) => data[0] = v,
            _ => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let [v] = data {
            self.write_port(base.0.wrapping_add(offset), *v);
        }
    }
}

/// Saved state of a [`Pic`]: master then slave.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PicState {
    pub chips: Vec<ChipState>,
}

impl Persist for Pic {
    type State = PicState;
    type Args = Arc<dyn IntrKick>;
    type Error = RestoreError;

    fn save(&self) -> PicState {
        PicState {
            chips: self.chips.to_vec(),
        }
    }

    fn restore(kick: Arc<dyn IntrKick>, state: &PicState) -> Result<Self, RestoreError> {
        let chips: [ChipState; 2] =
            state
                .chips
                .clone()
                .try_into()
                .map_err(|_| RestoreError::Invalid {
                    device: "pic",
                    reason: format!("{} controllers, expected 2", state.chips.len()),
                })?;
        let mut pic = Pic {
            chips,
            output: false,
            kick,
        };
        // A restored pending interrupt kicks vCPU 0 again.
        pic.update();
        Ok(pic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::KickCounter;

    fn pic() -> (Pic, Arc<KickCounter>) {
        let k = Arc::new(KickCounter::default());
        (Pic::new(k.clone()), k)
    }

    fn out(p: &mut Pic, port: u16, v: u8) {
        p.pio_write(PioAddress(port), 0, &[v]);
    }

    fn inb(p: &mut Pic, port: u16) -> u8 {
        let mut d = [0u8];
        p.pio_read(PioAddress(port), 0, &mut d);
        d[0]
    }

    /// Program as a PC BIOS does: vectors 0x08 and 0x70, cascade on IRQ2.
    fn init(p: &mut Pic, auto_eoi: bool) {
        let icw4 = if auto_eoi { 0x03 } else { 0x01 };
        for (base, vec, icw3) in [(0x20, 0x08, 0x04), (0xa0, 0x70, 0x02)] {
            out(p, base, 0x11);
            out(p, base + 1, vec);
            out(p, base + 1, icw3);
            out(p, base + 1, icw4);
            out(p, base + 1, 0x00);
        }
    }

    #[test]
    fn an_edge_raises_int_and_inta_returns_the_vector() {
        let (mut p, k) = pic();
        init(&mut p, false);
        p.set_irq(0, true);
        assert!(p.output());
        assert_eq!(k.count(), 1);
        assert_eq!(p.acknowledge(), 0x08);
        assert!(!p.output());
        // In service until EOI: ISR reads back bit 0.
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0x01);
        // A held edge line does not request again.
        p.set_irq(0, true);
        assert!(!p.output());
        out(&mut p, 0x20, 0x20);
        assert_eq!(inb(&mut p, 0x20), 0x00);
        p.set_irq(0, false);
        p.set_irq(0, true);
        assert!(p.output());
    }

    #[test]
    fn masked_lines_wait_and_priority_is_fully_nested() {
        let (mut p, _) = pic();
        init(&mut p, false);
        out(&mut p, 0x21, 0x01);
        p.set_irq(0, true);
        assert!(!p.output());
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x0c);
        out(&mut p, 0x21, 0x00);
        // IRQ0 outranks IRQ4 in service.
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x08);
        // Nothing left: spurious IRQ7, no ISR bit.
        assert_eq!(p.acknowledge(), 0x0f);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0x11);
    }

    #[test]
    fn the_slave_cascades_through_irq2() {
        let (mut p, _) = pic();
        init(&mut p, false);
        p.set_irq(8 + 3, true);
        assert!(p.output());
        assert_eq!(p.acknowledge(), 0x73);
        out(&mut p, 0xa0, 0x0b);
        assert_eq!(inb(&mut p, 0xa0), 0x08);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0x04);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let (mut p, _) = pic();
        init(&mut p, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x09);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0x00);
    }

    #[test]
    fn level_lines_follow_the_elcr() {
        let (mut p, _) = pic();
        init(&mut p, false);
        out(&mut p, 0x4d1, 0xff);
        assert_eq!(inb(&mut p, 0x4d1), 0xde);
        p.set_irq(9, true);
        assert_eq!(p.acknowledge(), 0x71);
        out(&mut p, 0xa0, 0x20);
        out(&mut p, 0x20, 0x20);
        // Still high: requested again after the EOIs.
        assert!(p.output());
        // Lowered before INTA: the master's edge-latched IRQ2 still asks,
        // and the slave answers with its spurious IRQ7.
        p.set_irq(9, false);
        assert_eq!(p.acknowledge(), 0x77);
        out(&mut p, 0x20, 0x20);
        assert!(!p.output());
    }

    #[test]
    fn poll_reads_acknowledge() {
        let (mut p, _) = pic();
        init(&mut p, false);
        p.set_irq(5, true);
        out(&mut p, 0x20, 0x0c);
        assert_eq!(inb(&mut p, 0x20), 0x85);
        assert!(!p.output());
    }

    #[test]
    fn state_survives_save_and_restore() {
        let (mut p, _) = pic();
        init(&mut p, false);
        out(&mut p, 0x21, 0xfe);
        p.set_irq(0, true);
        let k = Arc::new(KickCounter::default());
        let mut q = Pic::restore(k.clone(), &p.save()).expect("restore");
        assert_eq!(q.save(), p.save());
        assert_eq!(k.count(), 1);
        assert_eq!(q.acknowledge(), 0x08);
        let bad = PicState { chips: vec![] };
        assert!(Pic::restore(k, &bad).is_err());
    }
}
