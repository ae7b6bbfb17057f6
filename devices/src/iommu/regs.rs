//! The VT-d register file (Intel VT-d specification, "Register
//! Descriptions"): plain state and the effects of register writes that
//! need nothing but the registers. A write returns what the unit must do
//! next with guest memory or interrupts ([`Action`]); `Vtd` in `mod.rs`
//! does it.
//!
//! Registers are 32 or 64 bits wide; a 64-bit access is two 32-bit ones,
//! low half first, so a command bit in a high half acts on the whole
//! register.

use serde::{Deserialize, Serialize};

/// Register offsets.
pub const VER: u64 = 0x00;
pub const CAP: u64 = 0x08;
pub const ECAP: u64 = 0x10;
pub const GCMD: u64 = 0x18;
pub const GSTS: u64 = 0x1c;
pub const RTADDR: u64 = 0x20;
pub const CCMD: u64 = 0x28;
pub const FSTS: u64 = 0x34;
pub const FECTL: u64 = 0x38;
pub const FEDATA: u64 = 0x3c;
pub const FEADDR: u64 = 0x40;
pub const FEUADDR: u64 = 0x44;
pub const IQH: u64 = 0x80;
pub const IQT: u64 = 0x88;
pub const IQA: u64 = 0x90;
pub const ICS: u64 = 0x9c;
pub const IECTL: u64 = 0xa0;
pub const IEDATA: u64 = 0xa4;
pub const IEADDR: u64 = 0xa8;
pub const IEUADDR: u64 = 0xac;
pub const IRTA: u64 = 0xb8;
/// The IOTLB registers: Invalidate Address, then IOTLB Invalidate.
pub const IVA: u64 = 0xf0;
pub const IOTLB: u64 = IVA + 8;
/// The fault-recording registers, 16 bytes each.
pub const FRCD: u64 = 0x220;
pub const FAULT_RECORDS: usize = 4;
/// Size of the register page.
pub const SIZE: u64 = 0x1000;

/// Version 1.0.
pub const VERSION: u32 = 0x10;

/// Capability fields.
const CAP_ND_16BIT: u64 = 6;
/// Supported adjusted guest address widths: 39-bit (3-level) and 48-bit
/// (4-level) second-level tables.
pub const CAP_SAGAW_39: u64 = 1 << 9;
pub const CAP_SAGAW_48: u64 = 1 << 10;
/// Maximum guest address width 48, stored as N-1.
pub const MGAW: u32 = 48;
const CAP_MGAW: u64 = ((MGAW as u64) - 1) << 16;
const CAP_FRO: u64 = (FRCD / 16) << 24;
/// Second-level 2 MiB and 1 GiB pages.
pub const CAP_SLLPS: u64 = (1 << 34) | (1 << 35);
const CAP_PSI: u64 = 1 << 39;
const CAP_NFR: u64 = ((FAULT_RECORDS as u64) - 1) << 40;
/// Page-selective invalidation of up to 2^9 pages.
const CAP_MAMV: u64 = 9 << 48;
const CAP_DWD: u64 = 1 << 54;
const CAP_DRD: u64 = 1 << 55;
pub const CAP_VALUE: u64 = CAP_ND_16BIT
    | CAP_SAGAW_39
    | CAP_SAGAW_48
    | CAP_MGAW
    | CAP_FRO
    | CAP_SLLPS
    | CAP_PSI
    | CAP_NFR
    | CAP_MAMV
    | CAP_DWD
    | CAP_DRD;

/// Extended capability fields: coherent table walks, queued
/// invalidation, interrupt remapping (when asked for), pass-through.
const ECAP_C: u64 = 1 << 0;
const ECAP_QI: u64 = 1 << 1;
pub const ECAP_IR: u64 = 1 << 3;
pub const ECAP_PT: u64 = 1 << 6;
const ECAP_IRO: u64 = (IVA / 16) << 8;

/// Global command and status bits (the same positions in both).
pub const GCMD_TE: u32 = 1 << 31;
pub const GCMD_SRTP: u32 = 1 << 30;
pub const GCMD_QIE: u32 = 1 << 26;
pub const GCMD_IRE: u32 = 1 << 25;
pub const GCMD_SIRTP: u32 = 1 << 24;
pub const GCMD_CFI: u32 = 1 << 23;

/// Fault status bits; FRI sits in bits 15:8.
pub const FSTS_PFO: u32 = 1 << 0;
pub const FSTS_PPF: u32 = 1 << 1;
pub const FSTS_IQE: u32 = 1 << 4;
pub const FSTS_ICE: u32 = 1 << 5;
pub const FSTS_ITE: u32 = 1 << 6;
/// The bits software clears by writing ones.
const FSTS_W1C: u32 = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;

/// Event control (fault and invalidation): interrupt mask and pending.
pub const CTL_IM: u32 = 1 << 31;
pub const CTL_IP: u32 = 1 << 30;

/// Invalidation wait completed.
pub const ICS_IWC: u32 = 1 << 0;

/// Invalidation command bits of CCMD and IOTLB: the "go" bit, and the
/// requested and actual granularities.
const CCMD_ICC: u64 = 1 << 63;
const CCMD_CIRG_SHIFT: u32 = 61;
const CCMD_CAIG_SHIFT: u32 = 59;
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_IIRG_SHIFT: u32 = 60;
const IOTLB_IAIG_SHIFT: u32 = 57;

/// Table addresses are 4 KiB aligned.
pub const PAGE_MASK: u64 = !0xfff;
/// IRTA: extended interrupt mode enable and the table size (2^(S+1)).
pub const IRTA_EIME: u64 = 1 << 11;
pub const IRTA_SIZE_MASK: u64 = 0xf;
/// IQA: descriptor width and queue size (2^QS pages).
pub const IQA_DW: u64 = 1 << 11;
pub const IQA_QS_MASK: u64 = 0x7;
/// IQH and IQT hold a 128-bit descriptor's index in bits 18:4.
pub const IQ_INDEX_SHIFT: u32 = 4;
const IQT_MASK: u64 = 0x7fff << IQ_INDEX_SHIFT;

/// What the unit does after a register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// IQT moved, or queued invalidation was resumed: run the queue.
    RunQueue,
    /// The fault event's mask was cleared with an event pending.
    FaultEvent,
    /// The invalidation event's mask was cleared with an event pending.
    InvalidationEvent,
}

/// The unit's registers; what is not here is constant (VER, CAP, ECAP).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registers {
    /// ECAP.IR: interrupt remapping offered (`intremap=on`).
    pub intremap: bool,
    pub gsts: u32,
    pub rtaddr: u64,
    /// The root table pointer latched by the last SRTP.
    pub root: u64,
    pub ccmd: u64,
    /// FSTS without PPF (which follows the records) and FRI.
    pub fsts: u32,
    /// Fault record index: where the next fault goes.
    pub fri: u8,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    pub iqh: u64,
    pub iqt: u64,
    pub iqa: u64,
    pub ics: u32,
    pub iectl: u32,
    pub iedata: u32,
    pub ieaddr: u32,
    pub ieuaddr: u32,
    pub irta: u64,
    /// The interrupt remapping table pointer latched by the last SIRTP.
    pub irt: u64,
    pub iotlb: u64,
    /// Fault records: low and high quadword each.
    pub records: Vec<[u64; 2]>,
}

/// Replace the half of `reg` that `offset` (4-byte aligned) names.
fn set_half(reg: &mut u64, offset: u64, v: u32) {
    if offset & 4 == 0 {
        *reg = (*reg & !0xffff_ffff) | u64::from(v);
    } else {
        *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
    }
}

fn half(reg: u64, offset: u64) -> u32 {
    (reg >> ((offset & 4) * 8)) as u32
}

impl Registers {
    /// The registers after reset.
    pub fn new(intremap: bool) -> Self {
        Registers {
            intremap,
            gsts: 0,
            rtaddr: 0,
            root: 0,
            ccmd: 0,
            fsts: 0,
            fri: 0,
            fectl: CTL_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iectl: CTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            irta: 0,
            irt: 0,
            iotlb: 0,
            records: vec![[0; 2]; FAULT_RECORDS],
        }
    }

    pub fn ecap(&self) -> u64 {
        let ir = if self.intremap { ECAP_IR } else { 0 };
        ECAP_C | ECAP_QI | ECAP_PT | ECAP_IRO | ir
    }

    /// FSTS as the guest reads it: PPF set while any record holds a fault.
    pub fn fault_status(&self) -> u32 {
        let ppf = if self.records.iter().any(|r| r[1] & RECORD_F != 0) {
            FSTS_PPF
        } else {
            0
        };
        self.fsts | ppf | (u32::from(self.fri) << 8)
    }

    /// The 32-bit register half at `offset`; what is not a register
    /// reads 0, as reserved space does.
    pub fn read32(&self, offset: u64) -> u32 {
        let q = offset & !7;
        match offset {
            VER => VERSION,
            CAP | 0x0c => half(CAP_VALUE, offset),
            ECAP | 0x14 => half(self.ecap(), offset),
            GSTS => self.gsts,
            FSTS => self.fault_status(),
            FECTL => self.fectl,
            FEDATA => self.fedata,
            FEADDR => self.feaddr,
            FEUADDR => self.feuaddr,
            ICS => self.ics,
            IECTL => self.iectl,
            IEDATA => self.iedata,
            IEADDR => self.ieaddr,
            IEUADDR => self.ieuaddr,
            _ => match q {
                RTADDR => half(self.rtaddr, offset),
                CCMD => half(self.ccmd, offset),
                IQH => half(self.iqh, offset),
                IQT => half(self.iqt, offset),
                IQA => half(self.iqa, offset),
                IRTA => half(self.irta, offset),
                IOTLB => half(self.iotlb, offset),
                _ => self
                    .record(offset)
                    .map_or(0, |(i, hi)| half(self.records[i][usize::from(hi)], offset)),
            },
        }
    }

    /// Which fault record (and which of its quadwords) `offset` is in.
    fn record(&self, offset: u64) -> Option<(usize, bool)> {
        let rel = offset.checked_sub(FRCD)?;
        let i = (rel / 16) as usize;
        (i < self.records.len()).then_some((i, rel & 8 != 0))
    }

    /// A 32-bit write at `offset` (4-byte aligned).
    pub fn write32(&mut self, offset: u64, v: u32) -> Action {
        match offset {
            GCMD => self.global_command(v),
            FSTS => return self.clear_fault_status(v),
            FECTL => return self.event_control(v, false),
            FEDATA => self.fedata = v & 0xffff,
            FEADDR => self.feaddr = v & !3,
            FEUADDR => self.feuaddr = v,
            ICS => self.ics &= !(v & ICS_IWC),
            IECTL => return self.event_control(v, true),
            IEDATA => self.iedata = v & 0xffff,
            IEADDR => self.ieaddr = v & !3,
            IEUADDR => self.ieuaddr = v,
            RTADDR | 0x24 => {
                set_half(&mut self.rtaddr, offset, v);
                self.rtaddr &= PAGE_MASK;
            }
            CCMD | 0x2c => {
                set_half(&mut self.ccmd, offset, v);
                self.ccmd = invalidate(self.ccmd, CCMD_ICC, CCMD_CIRG_SHIFT, CCMD_CAIG_SHIFT);
            }
            IOTLB | 0xfc => {
                set_half(&mut self.iotlb, offset, v);
                self.iotlb = invalidate(self.iotlb, IOTLB_IVT, IOTLB_IIRG_SHIFT, IOTLB_IAIG_SHIFT);
            }
            IQT | 0x8c => {
                set_half(&mut self.iqt, offset, v);
                self.iqt &= IQT_MASK;
                return Action::RunQueue;
            }
            IQA | 0x94 => {
                set_half(&mut self.iqa, offset, v);
                self.iqa &= PAGE_MASK | IQA_DW | IQA_QS_MASK;
            }
            IRTA | 0xbc if self.intremap => {
                set_half(&mut self.irta, offset, v);
                self.irta &= PAGE_MASK | IRTA_EIME | IRTA_SIZE_MASK;
            }
            _ => self.write_record(offset, v),
        }
        Action::None
    }

    /// Software clears a record's F bit by writing it as one.
    fn write_record(&mut self, offset: u64, v: u32) {
        if let Some((i, true)) = self.record(offset) {
            if offset & 4 != 0 && v & (RECORD_F >> 32) as u32 != 0 {
                self.records[i][1] &= !RECORD_F;
                self.settle_fault_event();
            }
        }
    }

    /// With nothing left to report, a pending fault event goes.
    fn settle_fault_event(&mut self) {
        if self.fault_status() & (FSTS_W1C | FSTS_PPF) == 0 {
            self.fectl &= !CTL_IP;
        }
    }

    /// GCMD: each bit that differs from the status is a command.
    /// Software writes the status back with one bit changed, so the
    /// one-shot "set pointer" bits come back set and latch again, as
    /// they would on hardware.
    fn global_command(&mut self, v: u32) {
        let on = |bit: u32| v & bit != 0;
        self.set_status(GCMD_TE, on(GCMD_TE));
        if on(GCMD_SRTP) {
            self.root = self.rtaddr;
            self.gsts |= GCMD_SRTP;
        }
        if on(GCMD_QIE) != (self.gsts & GCMD_QIE != 0) {
            // Enabling starts the queue from its first descriptor;
            // disabling leaves nothing pending, as every descriptor runs
            // within the write of IQT.
            self.iqh = 0;
            self.set_status(GCMD_QIE, on(GCMD_QIE));
        }
        if !self.intremap {
            return;
        }
        if on(GCMD_SIRTP) {
            self.irt = self.irta;
            self.gsts |= GCMD_SIRTP;
        }
        self.set_status(GCMD_IRE, on(GCMD_IRE));
        // Compatibility-format interrupts pass only in xAPIC mode.
        let cfi = on(GCMD_CFI) && self.irt & IRTA_EIME == 0;
        self.set_status(GCMD_CFI, cfi);
    }

    fn set_status(&mut self, bit: u32, on: bool) {
        if on {
            self.gsts |= bit;
        } else {
            self.gsts &= !bit;
        }
    }

    /// FSTS: software clears overflow and queue errors by writing ones;
    /// clearing IQE lets the queue run again.
    fn clear_fault_status(&mut self, v: u32) -> Action {
        let had_iqe = self.fsts & FSTS_IQE != 0;
        self.fsts &= !(v & FSTS_W1C);
        self.settle_fault_event();
        if had_iqe && self.fsts & FSTS_IQE == 0 {
            return Action::RunQueue;
        }
        Action::None
    }

    /// FECTL or IECTL: only the mask is writable; unmasking with an
    /// event pending sends it.
    fn event_control(&mut self, v: u32, invalidation: bool) -> Action {
        let ctl = if invalidation {
            &mut self.iectl
        } else {
            &mut self.fectl
        };
        *ctl = (*ctl & !CTL_IM) | (v & CTL_IM);
        if *ctl & (CTL_IM | CTL_IP) == CTL_IP {
            *ctl &= !CTL_IP;
            return if invalidation {
                Action::InvalidationEvent
            } else {
                Action::FaultEvent
            };
        }
        Action::None
    }

    /// An event condition arose: true if the interrupt goes now, else it
    /// pends (masked) in IP.
    pub fn raise_event(&mut self, invalidation: bool) -> bool {
        let ctl = if invalidation {
            &mut self.iectl
        } else {
            &mut self.fectl
        };
        if *ctl & CTL_IM != 0 {
            *ctl |= CTL_IP;
            return false;
        }
        true
    }

    pub fn enabled(&self, bit: u32) -> bool {
        self.gsts & bit != 0
    }
}

/// F: the record holds a fault (bit 127 of a record).
pub const RECORD_F: u64 = 1 << 63;

/// Register-based invalidation of caches the unit does not keep (it
/// walks the tables on every request): the command completes at once,
/// at the granularity asked for.
fn invalidate(reg: u64, go: u64, requested: u32, actual: u32) -> u64 {
    if reg & go == 0 {
        return reg;
    }
    let g = (reg >> requested) & 3;
    (reg & !go & !(3 << actual)) | (g << actual)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_say_what_the_unit_does() {
        let r = Registers::new(true);
        assert_eq!(r.read32(VER), 0x10);
        let cap = u64::from(r.read32(CAP)) | u64::from(r.read32(CAP + 4)) << 32;
        assert_eq!(cap & (0x1f << 8), CAP_SAGAW_39 | CAP_SAGAW_48);
        assert_eq!((cap >> 16) & 0x3f, 47);
        assert_eq!((cap >> 24) & 0x3ff, 0x22);
        assert_eq!((cap >> 40) & 0xff, 3);
        assert_eq!(cap & CAP_SLLPS, CAP_SLLPS);
        let ecap = u64::from(r.read32(ECAP)) | u64::from(r.read32(ECAP + 4)) << 32;
        assert_eq!((ecap >> 8) & 0x3ff, 0xf);
        assert_ne!(ecap & ECAP_IR, 0);
        assert_eq!(Registers::new(false).ecap() & ECAP_IR, 0);
    }

    #[test]
    fn global_commands_follow_the_status() {
        let mut r = Registers::new(true);
        r.write32(RTADDR, 0x1234_5fff);
        r.write32(RTADDR + 4, 0x1);
        assert_eq!(r.rtaddr, 0x1_1234_5000);
        r.write32(GCMD, GCMD_SRTP);
        assert_eq!(r.root, 0x1_1234_5000);
        assert_eq!(r.read32(GSTS), GCMD_SRTP);
        r.write32(GCMD, r.read32(GSTS) | GCMD_QIE);
        r.write32(GCMD, r.read32(GSTS) | GCMD_TE);
        assert_eq!(r.read32(GSTS), GCMD_SRTP | GCMD_QIE | GCMD_TE);
        r.write32(IRTA, 0x8000_000f);
        r.write32(GCMD, r.read32(GSTS) | GCMD_SIRTP);
        r.write32(GCMD, r.read32(GSTS) | GCMD_IRE);
        assert_eq!(r.irt, 0x8000_000f);
        assert!(r.enabled(GCMD_IRE) && r.enabled(GCMD_SIRTP));
        r.write32(GCMD, r.read32(GSTS) & !GCMD_TE);
        assert!(!r.enabled(GCMD_TE) && r.enabled(GCMD_IRE));
        // Without interrupt remapping its bits do nothing.
        let mut r = Registers::new(false);
        r.write32(IRTA, 0x8000_000f);
        r.write32(GCMD, GCMD_SIRTP | GCMD_IRE);
        assert_eq!((r.read32(GSTS), r.irta), (0, 0));
    }

    #[test]
    fn register_invalidations_complete_at_once() {
        let mut r = Registers::new(false);
        // Global context invalidation (CIRG 01): ICC clears, CAIG 01.
        r.write32(CCMD + 4, 0xa000_0000);
        assert_eq!(r.read32(CCMD + 4), 0x2800_0000);
        // Domain-selective IOTLB invalidation (IIRG 10).
        r.write32(IOTLB + 4, 0xa000_0000);
        assert_eq!(r.read32(IOTLB + 4), 0x2000_0000 | 0x0400_0000);
    }

    #[test]
    fn event_masks_hold_events_until_cleared() {
        let mut r = Registers::new(false);
        assert!(!r.raise_event(false));
        assert_eq!(r.read32(FECTL), CTL_IM | CTL_IP);
        assert_eq!(r.write32(FECTL, 0), Action::FaultEvent);
        assert_eq!(r.read32(FECTL), 0);
        assert!(r.raise_event(false));
        assert!(!r.raise_event(true));
        assert_eq!(r.write32(IECTL, 0), Action::InvalidationEvent);
    }

    #[test]
    fn fault_status_clears_by_writing_ones() {
        let mut r = Registers::new(false);
        r.fsts = FSTS_PFO | FSTS_IQE;
        r.records[1][1] = RECORD_F | 5;
        r.fri = 2;
        assert_eq!(r.read32(FSTS), FSTS_PFO | FSTS_IQE | FSTS_PPF | 0x200);
        assert_eq!(r.write32(FSTS, FSTS_IQE), Action::RunQueue);
        assert_eq!(r.write32(FSTS, FSTS_PFO | FSTS_PPF), Action::None);
        assert_eq!(r.read32(FSTS), FSTS_PPF | 0x200);
        // F of record 1 (at FRCD + 16 + 12); the pending event goes too.
        r.fectl |= CTL_IP;
        r.write32(FRCD + 16 + 12, 0x8000_0000);
        assert_eq!(r.read32(FSTS), 0x200);
        assert_eq!(r.read32(FECTL), CTL_IM);
        assert_eq!(r.records[1][1], 5);
    }
}
