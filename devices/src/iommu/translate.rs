//! DMA remapping in legacy mode (Intel VT-d specification, "DMA
//! Remapping"): the root table indexed by bus, the context table by
//! device and function, and the second-level page table of the context
//! entry. Tables are walked on every request; no translation is cached,
//! so every invalidation the guest asks for is already done.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::fault::{Fault, Reason};
use super::regs::{Registers, ECAP_PT, GCMD_TE, PAGE_MASK};

/// Root entry: present, context-table pointer; the rest is reserved in
/// legacy mode.
const PRESENT: u64 = 1 << 0;
const ROOT_RESERVED_LO: u64 = 0xffe;
/// Context entry, low quadword: FPD, translation type, SLPTPTR.
const CONTEXT_FPD: u64 = 1 << 1;
const CONTEXT_TT_SHIFT: u32 = 2;
const CONTEXT_RESERVED_LO: u64 = 0xff0;
/// Context entry, high quadword: address width in bits 2:0, domain in
/// bits 23:8, bit 7 and bits 63:24 reserved.
const CONTEXT_AW_MASK: u64 = 0x7;
const CONTEXT_RESERVED_HI: u64 = !0xff_ff7f;
/// Translation types.
const TT_UNTRANSLATED: u64 = 0;
const TT_PASS_THROUGH: u64 = 2;
/// Second-level paging entry: read, write, page size; address bits 51:12.
const SL_READ: u64 = 1 << 0;
const SL_WRITE: u64 = 1 << 1;
const SL_PAGE_SIZE: u64 = 1 << 7;
const SL_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Where an I/O virtual address lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub gpa: u64,
    /// Bytes from `gpa` to the end of the page it is in.
    pub len: u64,
}

/// One DMA request from `sid` to `iova`.
struct Request {
    sid: u16,
    iova: u64,
    write: bool,
}

impl Request {
    fn fault(&self, reason: Reason, disabled: bool) -> Fault {
        Fault {
            reason,
            source_id: self.sid,
            info: self.iova & PAGE_MASK,
            read: !self.write,
            disabled,
        }
    }
}

fn read_entry<M: GuestMemory>(mem: &M, addr: u64) -> Option<[u64; 2]> {
    let lo: u64 = mem.read_obj(GuestAddress(addr)).ok()?;
    let hi: u64 = mem.read_obj(GuestAddress(addr + 8)).ok()?;
    Some([lo, hi])
}

/// Translate `iova` for a request of `sid` (bus << 8 | devfn).
pub fn translate<M: GuestMemory>(
    mem: &M,
    regs: &Registers,
    sid: u16,
    iova: u64,
    write: bool,
) -> Result<Mapping, Fault> {
    if !regs.enabled(GCMD_TE) {
        return Ok(identity(iova));
    }
    let req = Request { sid, iova, write };
    let root_at = regs.root + u64::from(sid >> 8) * 16;
    let root = read_entry(mem, root_at).ok_or(req.fault(Reason::RootAccess, false))?;
    if root[0] & PRESENT == 0 {
        return Err(req.fault(Reason::RootNotPresent, false));
    }
    if root[0] & ROOT_RESERVED_LO != 0 || root[1] != 0 {
        return Err(req.fault(Reason::RootReserved, false));
    }
    let ctx_at = (root[0] & PAGE_MASK) + u64::from(sid & 0xff) * 16;
    let ctx = read_entry(mem, ctx_at).ok_or(req.fault(Reason::ContextAccess, false))?;
    if ctx[0] & PRESENT == 0 {
        return Err(req.fault(Reason::ContextNotPresent, false));
    }
    // From here on the context entry's FPD decides about recording.
    let fpd = ctx[0] & CONTEXT_FPD != 0;
    if ctx[0] & CONTEXT_RESERVED_LO != 0 || ctx[1] & CONTEXT_RESERVED_HI != 0 {
        return Err(req.fault(Reason::ContextReserved, fpd));
    }
    match (ctx[0] >> CONTEXT_TT_SHIFT) & 3 {
        TT_UNTRANSLATED => {}
        TT_PASS_THROUGH if regs.ecap() & ECAP_PT != 0 => return Ok(identity(iova)),
        // Device-TLB translation is not offered; 3 is reserved.
        _ => return Err(req.fault(Reason::ContextInvalid, fpd)),
    }
    let levels = match ctx[1] & CONTEXT_AW_MASK {
        1 => 3,
        2 => 4,
        _ => return Err(req.fault(Reason::ContextInvalid, fpd)),
    };
    walk(mem, &req, ctx[0] & PAGE_MASK, levels).map_err(|r| req.fault(r, fpd))
}

/// Without translation the address is the guest-physical one.
fn identity(iova: u64) -> Mapping {
    Mapping {
        gpa: iova,
        len: 0x1000 - (iova & 0xfff),
    }
}

/// Walk the second-level table at `table` with `levels` levels. Access
/// is the AND of every level's read and write bits.
fn walk<M: GuestMemory>(
    mem: &M,
    req: &Request,
    mut table: u64,
    levels: u32,
) -> Result<Mapping, Reason> {
    let width = 12 + 9 * levels;
    if req.iova >> width != 0 {
        return Err(Reason::BeyondWidth);
    }
    let need = if req.write { SL_WRITE } else { SL_READ };
    let denied = if req.write {
        Reason::NoWrite
    } else {
        Reason::NoRead
    };
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let at = table + ((req.iova >> shift) & 0x1ff) * 8;
        let e: u64 = mem
            .read_obj(GuestAddress(at))
            .map_err(|_| Reason::PagingEntryAccess)?;
        if e & need == 0 {
            return Err(denied);
        }
        let leaf = level == 1 || e & SL_PAGE_SIZE != 0;
        if !leaf {
            table = e & SL_ADDR;
            continue;
        }
        // Large pages exist at 2 MiB and 1 GiB (CAP.SLLPS) only.
        if level > 3 {
            return Err(Reason::PagingEntryReserved);
        }
        let size = 1u64 << shift;
        let base = e & SL_ADDR & !(size - 1);
        if e & SL_ADDR & (size - 1) & PAGE_MASK != 0 {
            return Err(Reason::PagingEntryReserved);
        }
        let offset = req.iova & (size - 1);
        return Ok(Mapping {
            gpa: base + offset,
            len: size - offset,
        });
    }
    // Level 1 is always a leaf; no walk gets here.
    Err(Reason::PagingEntryReserved)
}
