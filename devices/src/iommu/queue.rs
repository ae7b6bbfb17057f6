//! Queued invalidation (Intel VT-d specification, "Queued Invalidation
//! Interface"): software writes 128-bit descriptors into a ring in
//! memory and moves the tail; the unit runs them from the head up to the
//! tail within that write. The unit caches nothing, so the cache
//! invalidations only complete; the wait descriptor writes its status
//! and raises its interrupt.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::regs::{
    Registers, FSTS_IQE, GCMD_QIE, ICS_IWC, IQA_DW, IQA_QS_MASK, IQ_INDEX_SHIFT, PAGE_MASK,
};

/// Descriptor types (bits 3:0, with bits 11:9 as type bits 6:4).
const CONTEXT_CACHE: u64 = 0x1;
const IOTLB: u64 = 0x2;
const INTERRUPT_ENTRY_CACHE: u64 = 0x4;
const WAIT: u64 = 0x5;
/// Invalidation wait: interrupt flag and status write.
const WAIT_IF: u64 = 1 << 4;
const WAIT_SW: u64 = 1 << 5;
/// 128-bit descriptors per 4 KiB page.
const PER_PAGE: u64 = 256;

/// The interrupts a run of the queue raises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    pub fault: bool,
    pub invalidation: bool,
}

/// Why a descriptor stops the queue.
#[derive(Debug, PartialEq, Eq)]
enum Bad {
    Descriptor,
}

/// Run every descriptor from IQH to IQT. A descriptor the unit cannot
/// run sets IQE and stays at the head until software clears IQE.
pub fn run<M: GuestMemory>(mem: &M, regs: &mut Registers) -> Events {
    let mut ev = Events::default();
    if !regs.enabled(GCMD_QIE) || regs.fsts & FSTS_IQE != 0 || regs.iqh == regs.iqt {
        return ev;
    }
    let entries = PER_PAGE << (regs.iqa & IQA_QS_MASK);
    let tail = regs.iqt >> IQ_INDEX_SHIFT;
    // 256-bit descriptors belong to scalable mode, which is not offered.
    if regs.iqa & IQA_DW != 0 || tail >= entries {
        ev.fault = regs.queue_error();
        return ev;
    }
    let mut head = regs.iqh >> IQ_INDEX_SHIFT;
    while head != tail {
        let at = (regs.iqa & PAGE_MASK) + head * 16;
        match descriptor(mem, regs, at) {
            Ok(inv) => ev.invalidation |= inv,
            Err(Bad::Descriptor) => {
                ev.fault = regs.queue_error();
                break;
            }
        }
        head = (head + 1) % entries;
    }
    regs.iqh = head << IQ_INDEX_SHIFT;
    ev
}

/// Run the descriptor at `at`; true if it raises the invalidation
/// completion interrupt.
fn descriptor<M: GuestMemory>(mem: &M, regs: &mut Registers, at: u64) -> Result<bool, Bad> {
    let lo: u64 = mem
        .read_obj(GuestAddress(at))
        .map_err(|_| Bad::Descriptor)?;
    let hi: u64 = mem
        .read_obj(GuestAddress(at + 8))
        .map_err(|_| Bad::Descriptor)?;
    let kind = (lo & 0xf) | ((lo >> 9) & 0x7) << 4;
    match kind {
        CONTEXT_CACHE | IOTLB => Ok(false),
        INTERRUPT_ENTRY_CACHE if regs.intremap => Ok(false),
        WAIT => {
            if lo & WAIT_SW != 0 {
                let status = (lo >> 32) as u32;
                mem.write_obj(status, GuestAddress(hi & !3))
                    .map_err(|_| Bad::Descriptor)?;
            }
            if lo & WAIT_IF == 0 || regs.ics & ICS_IWC != 0 {
                return Ok(false);
            }
            regs.ics |= ICS_IWC;
            Ok(regs.raise_event(true))
        }
        _ => Err(Bad::Descriptor),
    }
}
