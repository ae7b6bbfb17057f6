//! Per-vCPU topology: the APIC ID and the package's core count in leaves
//! 1, 4, 0xB and 0x1F, for one socket of single-thread cores.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Set the per-vCPU fields for vCPU `id` of `count`, in a topology of one
/// socket with `count` cores of one thread each (QEMU's default for `-smp N`).
pub fn for_vcpu(base: &[kvm_cpuid_entry2], id: u32, count: u32) -> Vec<kvm_cpuid_entry2> {
    let core_shift = bits_for(count);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(base.len() + 4);
    for e in base {
        let mut e = *e;
        match e.function {
            1 => {
                // Initial APIC ID, logical processors per package, HTT.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count.min(255)) << 16);
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            4 => {
                // Cores per package minus one; the cache is shared by the
                // threads of one core.
                e.eax = (e.eax & 0x03ff_ffff) | ((count.saturating_sub(1).min(63)) << 26);
                e.eax &= !(0xfff << 14);
            }
            0xb | 0x1f => continue,
            _ => {}
        }
        out.push(e);
    }
    // Extended topology: level 0 is SMT (one thread), level 1 is core.
    let max_basic = base.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    for leaf in [0xbu32, 0x1f] {
        if max_basic < leaf || !base.iter().any(|e| e.function == leaf) {
            continue;
        }
        let levels = [(0u32, 1u32, 1u32), (core_shift, count, 2)];
        for (i, &(shift, n, kind)) in levels.iter().enumerate() {
            out.push(kvm_cpuid_entry2 {
                function: leaf,
                index: i as u32,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: n,
                ecx: (kind << 8) | i as u32,
                edx: id,
                ..Default::default()
            });
        }
        out.push(kvm_cpuid_entry2 {
            function: leaf,
            index: 2,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ecx: 2,
            edx: id,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                edx: 1 << 28,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ebx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x1f,
                index: 0,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn apic_ids_and_counts() {
        let c = for_vcpu(&base(), 3, 4);
        let l1 = c.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.edx & (1 << 28), 0);
        let b: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        assert!(b.iter().all(|e| e.edx == 3));
        assert_eq!((b[1].eax, b[1].ebx, b[1].ecx >> 8), (2, 4, 2));
        assert_eq!(c.iter().filter(|e| e.function == 0x1f).count(), 3);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let c = for_vcpu(&base(), 0, 1);
        let l1 = c.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.edx & (1 << 28), 0);
        let b: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!((b[1].eax, b[1].ebx), (0, 1));
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
