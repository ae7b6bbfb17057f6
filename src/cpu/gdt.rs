//! Segment descriptors and the control-register state of the modes a vCPU
//! is started in, shared by the boot entry, S3 wake-up and `cpuid
//! --probe`: the GDT written to guest memory and the segment registers
//! loaded into KVM come from the same descriptors, so they cannot
//! disagree.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// Flat 4 GiB 32-bit code, execute/read, accessed.
pub const CODE32: u64 = 0x00cf_9b00_0000_ffff;
/// Flat 4 GiB data, read/write, accessed.
pub const DATA32: u64 = 0x00cf_9300_0000_ffff;
/// 64-bit code (L set, D clear), execute/read, accessed.
pub const CODE64: u64 = 0x00af_9b00_0000_ffff;
/// 64 KiB 16-bit code and data, as a BIOS's GDT has them.
pub const CODE16: u64 = 0x0000_9b00_0000_ffff;
pub const DATA16: u64 = 0x0000_9300_0000_ffff;

/// CR0.PE | CR0.ET: protection on, ET hard-wired on every x86-64 CPU.
pub const CR0_PE_ET: u64 = 0x11;
/// CR0.ET alone: real mode after reset.
pub const CR0_ET: u64 = 0x10;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME | EFER.LMA.
pub const EFER_LONG: u64 = 0x500;
/// EFER.LMA alone, to tell long mode from a saved EFER.
pub const EFER_LMA: u64 = 1 << 10;

/// The hidden segment state a CPU loads for `selector` from `descriptor`
/// (Intel SDM, "Segment Descriptors").
pub fn segment(selector: u16, descriptor: u64) -> kvm_segment {
    let d = descriptor;
    let limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        // With G set the limit counts 4 KiB pages; KVM takes it in bytes.
        limit: if g != 0 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((d >> 40) & 0xf) as u8,
        s: ((d >> 44) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        present: ((d >> 47) & 1) as u8,
        avl: ((d >> 52) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        db: ((d >> 54) & 1) as u8,
        g,
        ..Default::default()
    }
}

/// A real-mode segment: base `selector << 4`, 64 KiB, of `type_`.
pub fn real_mode(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    }
}

/// The GDT as bytes for guest memory.
pub fn to_bytes(gdt: &[u64]) -> Vec<u8> {
    gdt.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// Point GDTR at `gdt` (placed at `base`) and load CS from selector `cs`
/// and every data segment register from selector `ds`, as a far jump and
/// the moves after it would; paging, PAE and long mode off, the real-mode
/// IVT as the IDT, as a BIOS hands over.
pub fn load(sregs: &mut kvm_sregs, base: u64, gdt: &[u64], cs: u16, ds: u16) {
    let at = |sel: u16| gdt.get(usize::from(sel >> 3)).copied().unwrap_or(0);
    sregs.gdt.base = base;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    set_segments(sregs, segment(cs, at(cs)), segment(ds, at(ds)));
}

/// Load CS and every data segment register and leave paging and long mode
/// off, with the real-mode IVT as the IDT.
pub fn set_segments(sregs: &mut kvm_sregs, cs: kvm_segment, data: kvm_segment) {
    sregs.cs = cs;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.idt.base = 0;
    sregs.idt.limit = 0x3ff;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Turn on 4-level paging rooted at `cr3` in long mode; CS must already
/// hold a 64-bit code segment.
pub fn enter_long_mode(sregs: &mut kvm_sregs, cr3: u64) {
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LONG;
    sregs.cr0 = CR0_PE_ET | CR0_PG;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptors_decode() {
        let cs = segment(0x08, CODE32);
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        assert_eq!((cs.present, cs.s, cs.db, cs.g, cs.l), (1, 1, 1, 1, 0));
        let cs64 = segment(0x10, CODE64);
        assert_eq!((cs64.l, cs64.db), (1, 0));
        let ds = segment(0x18, DATA32);
        assert_eq!((ds.type_, ds.db, ds.limit), (0x3, 1, 0xffff_ffff));
        let ds16 = segment(0x20, DATA16);
        assert_eq!((ds16.limit, ds16.g, ds16.db), (0xffff, 0, 0));
    }

    #[test]
    fn base_bits_are_gathered() {
        // Base 0x12345678: bits 16-39 hold 0x345678, bits 56-63 hold 0x12.
        let d = (0x12u64 << 56) | (0x93 << 40) | (0x34_5678 << 16);
        let s = segment(0, d);
        assert_eq!(s.base, 0x1234_5678);
    }

    #[test]
    fn load_takes_the_named_entries() {
        let mut sregs = kvm_sregs::default();
        load(&mut sregs, 0xf_0000, &[0, CODE64, DATA32], 0x08, 0x10);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0xf_0000, 23));
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x08, 1));
        assert_eq!((sregs.ss.selector, sregs.ss.type_), (0x10, 3));
    }
}
