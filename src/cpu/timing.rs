//! KVM's timing leaf (0x40000010): the TSC and LAPIC timer frequencies
//! offered to the guest.

use kvm_bindings::kvm_cpuid_entry2;

use super::entries::entry;

/// KVM's timing leaf: TSC frequency in kHz (EAX) and the LAPIC timer's
/// bus frequency in kHz (EBX), read by Linux and other guests instead of
/// calibrating the TSC against a PIT or HPET.
pub const KVM_TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's LAPIC timer counts at 1 GHz (one bus cycle per nanosecond) unless
/// KVM_CAP_X86_APIC_BUS_CYCLES_NS says otherwise.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// Offer the timing leaf with `tsc_khz`, raising the hypervisor range's
/// limit in leaf 0x40000000 to cover it.
pub fn add_timing_leaf(entries: &mut Vec<kvm_cpuid_entry2>, tsc_khz: u32) {
    let sig = entry(entries, 0x4000_0000, 0);
    sig.eax = sig.eax.max(KVM_TIMING_LEAF);
    let t = entry(entries, KVM_TIMING_LEAF, 0);
    t.eax = tsc_khz;
    t.ebx = KVM_APIC_BUS_KHZ;
    t.ecx = 0;
    t.edx = 0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::entries::word;
    use crate::cpu::features::Reg;

    #[test]
    fn timing_leaf_raises_the_hypervisor_limit() {
        let mut v = vec![kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: 1,
            ecx: 2,
            edx: 3,
            ..Default::default()
        }];
        add_timing_leaf(&mut v, 2_000_000);
        assert_eq!(word(&v, 0x4000_0000, 0, Reg::Eax), KVM_TIMING_LEAF);
        assert_eq!(word(&v, 0x4000_0000, 0, Reg::Ebx), 1);
        assert_eq!(word(&v, KVM_TIMING_LEAF, 0, Reg::Eax), 2_000_000);
        assert_eq!(word(&v, KVM_TIMING_LEAF, 0, Reg::Ebx), 1_000_000);
    }
}
