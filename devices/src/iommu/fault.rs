//! Fault recording (Intel VT-d specification, "Primary Fault Logging"):
//! a blocked request is written to the next fault-recording register,
//! and the fault event interrupt is raised when the unit goes from
//! nothing to report to something.

use super::regs::{Registers, FSTS_ICE, FSTS_IQE, FSTS_ITE, FSTS_PFO, FSTS_PPF, RECORD_F};

/// Fault reasons ("Non-Recoverable Fault Conditions" and "Interrupt
/// Remapping Fault Conditions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum Reason {
    #[error("root entry not present")]
    RootNotPresent = 0x1,
    #[error("context entry not present")]
    ContextNotPresent = 0x2,
    #[error("context entry programmed with an unsupported width or type")]
    ContextInvalid = 0x3,
    #[error("address beyond the guest address width")]
    BeyondWidth = 0x4,
    #[error("write to a page without write permission")]
    NoWrite = 0x5,
    #[error("read of a page without read permission")]
    NoRead = 0x6,
    #[error("second-level paging entry not in memory")]
    PagingEntryAccess = 0x7,
    #[error("root entry not in memory")]
    RootAccess = 0x8,
    #[error("context entry not in memory")]
    ContextAccess = 0x9,
    #[error("reserved bits set in the root entry")]
    RootReserved = 0xa,
    #[error("reserved bits set in the context entry")]
    ContextReserved = 0xb,
    #[error("reserved bits set in a second-level paging entry")]
    PagingEntryReserved = 0xc,
    #[error("reserved bits set in a remappable interrupt")]
    IrRequestReserved = 0x20,
    #[error("interrupt index beyond the remapping table")]
    IrIndexBeyond = 0x21,
    #[error("interrupt remapping table entry not present")]
    IrteNotPresent = 0x22,
    #[error("interrupt remapping table entry not in memory")]
    IrteAccess = 0x23,
    #[error("reserved bits set in an interrupt remapping table entry")]
    IrteReserved = 0x24,
    #[error("compatibility-format interrupt blocked")]
    IrCompatBlocked = 0x25,
    #[error("interrupt source-id verification failed")]
    IrSourceId = 0x26,
}

/// A blocked request, as a fault record holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub reason: Reason,
    pub source_id: u16,
    /// The page of a DMA request, or the interrupt index in bits 63:48.
    pub info: u64,
    /// A read request (DMA only).
    pub read: bool,
    /// Recording is disabled by the entry the fault was found through
    /// (FPD in a context entry or an IRTE).
    pub disabled: bool,
}

/// The fault record's fields: FR in bits 103:96 and T (read) in bit 126.
const RECORD_FR_SHIFT: u32 = 32;
const RECORD_T_READ: u64 = 1 << 62;

/// Event conditions of FSTS: a new one raises the fault event only if
/// none was pending.
const PENDING: u32 = FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE;

impl Registers {
    /// Record `f`; true if the fault event interrupt must be sent now.
    pub fn record_fault(&mut self, f: &Fault) -> bool {
        if f.disabled {
            return false;
        }
        let quiet = self.fault_status() & PENDING == 0;
        let i = usize::from(self.fri);
        if self.fsts & FSTS_PFO != 0 {
            return false;
        }
        if self.records[i][1] & RECORD_F != 0 {
            // The record software has not cleared yet is kept.
            self.fsts |= FSTS_PFO;
            return quiet && self.raise_event(false);
        }
        let t = if f.read { RECORD_T_READ } else { 0 };
        self.records[i] = [
            f.info,
            RECORD_F | t | (u64::from(f.reason as u8) << RECORD_FR_SHIFT) | u64::from(f.source_id),
        ];
        self.fri = ((i + 1) % self.records.len()) as u8;
        quiet && self.raise_event(false)
    }

    /// An invalidation queue error: IQE set, the fault event raised as
    /// for a fault.
    pub fn queue_error(&mut self) -> bool {
        let quiet = self.fault_status() & PENDING == 0;
        self.fsts |= FSTS_IQE;
        quiet && self.raise_event(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::regs::{CTL_IM, CTL_IP, FECTL, FRCD, FSTS};
    use super::*;

    fn fault(sid: u16) -> Fault {
        Fault {
            reason: Reason::NoWrite,
            source_id: sid,
            info: 0x5000,
            read: false,
            disabled: false,
        }
    }

    #[test]
    fn faults_fill_records_then_overflow() {
        let mut r = Registers::new(false);
        r.write32(FECTL, 0);
        assert!(r.record_fault(&fault(0x18)));
        assert_eq!(r.read32(FRCD), 0x5000);
        assert_eq!(r.read32(FRCD + 12), 0x8000_0005);
        assert_eq!(r.read32(FRCD + 8), 0x18);
        // PPF pending: no new event for the next faults.
        assert!(!r.record_fault(&fault(1)));
        assert!(!r.record_fault(&fault(2)));
        assert!(!r.record_fault(&fault(3)));
        assert_eq!(r.read32(FSTS) & FSTS_PFO, 0);
        assert!(!r.record_fault(&fault(4)));
        assert_eq!(r.read32(FSTS), FSTS_PFO | FSTS_PPF);
        // Record 0 still holds the first fault.
        assert_eq!(r.read32(FRCD + 8), 0x18);
        // Disabled faults leave no trace.
        let mut r = Registers::new(false);
        let mut f = fault(1);
        f.disabled = true;
        assert!(!r.record_fault(&f));
        assert_eq!(r.read32(FSTS), 0);
    }

    #[test]
    fn masked_fault_events_pend() {
        let mut r = Registers::new(false);
        assert!(!r.record_fault(&fault(1)));
        assert_eq!(r.read32(FECTL), CTL_IM | CTL_IP);
        let mut r = Registers::new(false);
        r.write32(FECTL, 0);
        assert!(r.queue_error());
        assert_eq!(r.read32(FSTS), FSTS_IQE);
    }
}
