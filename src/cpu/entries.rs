//! CPUID tables as KVM takes them: one register of one leaf read or
//! written, an entry found or added, the table turned into KVM's `CpuId`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::features::{self, Reg};
use super::CpuError;

/// The value of one register of one leaf in `entries` (0 if absent).
pub fn word(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && (e.index == subleaf || !features::has_subleaves(leaf)))
        .map_or(0, |e| get(e, reg))
}

fn get(e: &kvm_cpuid_entry2, reg: Reg) -> u32 {
    match reg {
        Reg::Eax => e.eax,
        Reg::Ebx => e.ebx,
        Reg::Ecx => e.ecx,
        Reg::Edx => e.edx,
    }
}

pub(super) fn set(e: &mut kvm_cpuid_entry2, reg: Reg, v: u32) {
    match reg {
        Reg::Eax => e.eax = v,
        Reg::Ebx => e.ebx = v,
        Reg::Ecx => e.ecx = v,
        Reg::Edx => e.edx = v,
    }
}

/// The entry for `leaf`/`subleaf`, added (all zero) if missing.
pub(super) fn entry(
    entries: &mut Vec<kvm_cpuid_entry2>,
    leaf: u32,
    subleaf: u32,
) -> &mut kvm_cpuid_entry2 {
    let indexed = features::has_subleaves(leaf);
    let pos = entries
        .iter()
        .position(|e| e.function == leaf && (e.index == subleaf || !indexed));
    let i = match pos {
        Some(i) => i,
        None => {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: if indexed { subleaf } else { 0 },
                flags: if indexed {
                    KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                ..Default::default()
            });
            entries.len() - 1
        }
    };
    &mut entries[i]
}

pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, CpuError> {
    CpuId::from_entries(entries).map_err(|e| CpuError::TooBig(format!("{e:?}")))
}
