//! Leaf 0xD (XSAVE state components) made consistent with the features
//! left on.

use kvm_bindings::kvm_cpuid_entry2;

use super::entries::{entry, word};
use super::features::Reg;

/// Make leaf 0xD describe exactly the state components of the features
/// left on: XCR0's supported mask (subleaf 0 EAX/EDX), the largest save
/// area (ECX), and one subleaf per component. Without XSAVE the leaf is
/// all zero.
pub(super) fn fix_xsave(
    entries: &mut Vec<kvm_cpuid_entry2>,
    sup: &[kvm_cpuid_entry2],
    is_on: &dyn Fn(&str) -> bool,
    level: u32,
) {
    if level < 0xd {
        return;
    }
    if !is_on("xsave") {
        entries.retain(|e| e.function != 0xd || e.index <= 1);
        for e in entries.iter_mut().filter(|e| e.function == 0xd) {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        return;
    }
    let sup_xcr0 =
        u64::from(word(sup, 0xd, 0, Reg::Eax)) | u64::from(word(sup, 0xd, 0, Reg::Edx)) << 32;
    // x87 and SSE state are always part of XSAVE.
    let mut mask: u64 = 0b11;
    for (feature, bits) in [
        ("avx", 1u64 << 2),
        ("mpx", 0b11 << 3),
        ("avx512f", 0b111 << 5),
        ("pku", 1 << 9),
        ("amx-tile", 0b11 << 17),
    ] {
        if is_on(feature) {
            mask |= bits;
        }
    }
    mask &= sup_xcr0 | 0b11;
    let xss: u64 = if is_on("xsaves") {
        u64::from(word(sup, 0xd, 1, Reg::Ecx)) | u64::from(word(sup, 0xd, 1, Reg::Edx)) << 32
    } else {
        0
    };
    // The legacy area and the XSAVE header come first.
    let mut max_size: u32 = 512 + 64;
    for i in 2..64u32 {
        if mask & (1 << i) != 0 {
            let s = word(sup, 0xd, i, Reg::Eax);
            let o = word(sup, 0xd, i, Reg::Ebx);
            max_size = max_size.max(o + s);
        }
    }
    entries.retain(|e| e.function != 0xd || e.index <= 1 || (mask | xss) & (1 << e.index) != 0);
    let e0 = entry(entries, 0xd, 0);
    e0.eax = mask as u32;
    e0.edx = (mask >> 32) as u32;
    // EBX follows XCR0 at run time (KVM updates it); start with x87+SSE.
    e0.ebx = 512 + 64;
    e0.ecx = max_size;
    let e1 = entry(entries, 0xd, 1);
    e1.ecx = xss as u32;
    e1.edx = (xss >> 32) as u32;
    if xss == 0 {
        e1.ebx = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::tests::{on, res};

    #[test]
    fn xsave_leaf_follows_the_features() {
        let h = res("host");
        assert_eq!(word(&h.entries, 0xd, 0, Reg::Eax), 0x7);
        assert_eq!(word(&h.entries, 0xd, 0, Reg::Ecx), 0x340);
        let n = res("host,-avx");
        assert_eq!(word(&n.entries, 0xd, 0, Reg::Eax), 0x3);
        assert_eq!(word(&n.entries, 0xd, 0, Reg::Ecx), 576);
        assert!(!n.entries.iter().any(|e| e.function == 0xd && e.index == 2));
        let x = res("host,-xsave");
        assert!(x.entries.iter().filter(|e| e.function == 0xd).all(|e| e.eax
            | e.ebx
            | e.ecx
            | e.edx
            == 0));
        assert!(!on(&x, "xsaveopt"));
    }
}
