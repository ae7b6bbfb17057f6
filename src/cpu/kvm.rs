//! What this host offers: the CPUID KVM can give a guest (supported and
//! emulated) and the host CPU's own CPUID.

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;
use serde::Serialize;

use super::entries::word;
use super::features::Feature;
use super::CpuError;

/// KVM_CAP_TSC_DEADLINE_TIMER: KVM_GET_SUPPORTED_CPUID leaves the
/// TSC-deadline bit out and says so through this capability instead.
const KVM_CAP_TSC_DEADLINE_TIMER: u64 = 72;

/// How KVM can give a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Avail {
    /// KVM_GET_SUPPORTED_CPUID has it (or the VMM owns the bit).
    Yes,
    /// Only KVM_GET_EMULATED_CPUID has it: KVM emulates the instructions.
    Emulated,
    No,
}

/// What this host's KVM offers.
#[derive(Clone, Debug, Default)]
pub struct KvmCpuid {
    pub supported: Vec<kvm_cpuid_entry2>,
    pub emulated: Vec<kvm_cpuid_entry2>,
}

impl KvmCpuid {
    pub fn query(kvm: &Kvm) -> Result<Self, CpuError> {
        let mut supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuError::Supported)?
            .as_slice()
            .to_vec();
        let deadline = kvm.check_extension_raw(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
        for e in supported.iter_mut().filter(|e| e.function == 1) {
            // The hypervisor bit is the VMM's to set.
            e.ecx |= 1 << 31;
            if deadline {
                e.ecx |= 1 << 24;
            }
        }
        // Older kernels lack KVM_GET_EMULATED_CPUID: then nothing is emulated.
        let emulated = kvm
            .get_emulated_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map(|c| c.as_slice().to_vec())
            .unwrap_or_default();
        Ok(KvmCpuid {
            supported,
            emulated,
        })
    }

    pub fn avail(&self, f: &Feature) -> Avail {
        if f.is_on(word(&self.supported, f.leaf, f.subleaf, f.reg)) {
            Avail::Yes
        } else if f.is_on(word(&self.emulated, f.leaf, f.subleaf, f.reg)) {
            Avail::Emulated
        } else {
            Avail::No
        }
    }
}

/// The hardware CPUID of the machine kvmrun runs on, for reports.
pub fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}
