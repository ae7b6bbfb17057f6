//! CPU models: which named features a model turns on, and the identity
//! (leaf limits, family/model/stepping, brand) named models report.

/// The KVM paravirtual features and the x2APIC bit QEMU turns on for every
/// named model under KVM (QEMU `target/i386/kvm/kvm-cpu.c`,
/// `kvm_default_props`; "acpi", "monitor" and "svm" are turned off there
/// too). Measured under QEMU 7.2 `-cpu qemu64`: CPUID.40000001H:EAX =
/// 0x0100007b, which is exactly these bits.
pub const KVM_DEFAULTS_ON: &[&str] = &[
    "kvmclock",
    "kvm-nopiodelay",
    "kvm-asyncpf",
    "kvm-steal-time",
    "kvm-pv-eoi",
    "kvmclock-stable-bit",
    "x2apic",
];
pub const KVM_DEFAULTS_OFF: &[&str] = &["acpi", "monitor", "svm"];

/// Bits QEMU leaves out of `host`/`max` unless `migratable=off`, because
/// they cannot survive migration (QEMU's `unmigratable_flags`).
pub const UNMIGRATABLE: &[&str] = &["invtsc"];

/// Emulated features `max` adds: KVM_GET_EMULATED_CPUID bits whose
/// instructions KVM's emulator handles completely (they trap as #UD on
/// hardware without them and KVM emulates them), and which need no
/// guest-visible state. Other emulated bits must be asked for one by one.
pub const MAX_EMULATED: &[&str] = &["movbe", "rdpid"];

/// A model defined by a fixed table (the others come from KVM).
#[derive(Debug)]
pub struct Named {
    pub name: &'static str,
    /// Highest basic leaf.
    pub level: u32,
    /// Highest extended leaf.
    pub xlevel: u32,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub brand: &'static str,
    pub features: &'static [&'static str],
    /// Whether QEMU's KVM defaults (`KVM_DEFAULTS_ON/OFF`) apply.
    pub kvm_defaults: bool,
}

/// QEMU's qemu64 (QEMU `target/i386/cpu.c`, `builtin_x86_defs[]`,
/// "qemu64"): PPRO_FEATURES plus MTRR, CLFLUSH, MCA, PSE36; SSE3 and CX16;
/// LM, SYSCALL, NX; LAHF_LM and SVM (the latter turned off again by the KVM
/// defaults). Family 15, model 107, stepping 1, as QEMU 7.2 reports it
/// (CPUID.1:EAX = 0x60fb1, measured). The hypervisor bit is one QEMU sets
/// for every model under KVM.
pub static QEMU64: Named = Named {
    name: "qemu64",
    level: 0xd,
    xlevel: 0x8000_000a,
    family: 15,
    model: 107,
    stepping: 1,
    brand: "QEMU Virtual CPU version 2.5+",
    features: &[
        "fpu",
        "de",
        "pse",
        "tsc",
        "msr",
        "pae",
        "mce",
        "cx8",
        "apic",
        "sep",
        "pge",
        "cmov",
        "pat",
        "fxsr",
        "mmx",
        "sse",
        "sse2",
        "mtrr",
        "clflush",
        "mca",
        "pse36",
        "pni",
        "cx16",
        "lm",
        "syscall",
        "nx",
        "lahf-lm",
        "svm",
        "hypervisor",
    ],
    kvm_defaults: true,
};

/// QEMU's Opteron_G1 (QEMU `target/i386/cpu.c`, `builtin_x86_defs[]`,
/// "Opteron_G1"), which kvm-unit-tests' syscall test asks for.
pub static OPTERON_G1: Named = Named {
    name: "Opteron_G1",
    level: 5,
    xlevel: 0x8000_0008,
    family: 15,
    model: 6,
    stepping: 1,
    brand: "AMD Opteron 240 (Gen 1 Class Opteron)",
    features: &[
        "fpu",
        "vme",
        "de",
        "pse",
        "tsc",
        "msr",
        "pae",
        "mce",
        "cx8",
        "apic",
        "sep",
        "mtrr",
        "pge",
        "mca",
        "cmov",
        "pat",
        "pse36",
        "clflush",
        "mmx",
        "fxsr",
        "sse",
        "sse2",
        "pni",
        "lm",
        "nx",
        "syscall",
        "hypervisor",
    ],
    kvm_defaults: true,
};

/// The smallest set a 64-bit kernel can run on: the x86-64 baseline
/// (FPU, TSC, MSR, PAE, CX8, APIC, SEP, PGE, CMOV, PAT, CLFLUSH, MMX, FXSR,
/// SSE, SSE2, SYSCALL, NX, LM) and the hypervisor bit; no paravirtual
/// features, no x2APIC.
pub static BASE: Named = Named {
    name: "base",
    level: 0xd,
    xlevel: 0x8000_0008,
    family: 15,
    model: 107,
    stepping: 1,
    brand: "kvmrun base CPU",
    features: &[
        "fpu",
        "de",
        "pse",
        "tsc",
        "msr",
        "pae",
        "mce",
        "cx8",
        "apic",
        "sep",
        "pge",
        "cmov",
        "pat",
        "clflush",
        "mmx",
        "fxsr",
        "sse",
        "sse2",
        "syscall",
        "nx",
        "lm",
        "hypervisor",
    ],
    kvm_defaults: false,
};

#[derive(Clone, Copy, Debug)]
pub enum Model {
    /// Everything KVM_GET_SUPPORTED_CPUID offers.
    Host,
    /// `Host` plus the safe emulated features (`MAX_EMULATED`).
    Max,
    Named(&'static Named),
}

impl Model {
    pub fn name(&self) -> &'static str {
        match self {
            Model::Host => "host",
            Model::Max => "max",
            Model::Named(n) => n.name,
        }
    }
}

/// Every model name `--cpu` accepts, for error messages.
pub const KNOWN: &[&str] = &["host", "max", "qemu64", "base", "Opteron_G1"];

/// Find a model by name; QEMU's model names are matched without regard to case.
pub fn lookup(name: &str) -> Option<Model> {
    match name.to_ascii_lowercase().as_str() {
        "host" => Some(Model::Host),
        "max" => Some(Model::Max),
        "qemu64" => Some(Model::Named(&QEMU64)),
        "base" => Some(Model::Named(&BASE)),
        "opteron_g1" => Some(Model::Named(&OPTERON_G1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::features;

    #[test]
    fn model_features_are_all_known_names() {
        for m in [&QEMU64, &OPTERON_G1, &BASE] {
            for f in m.features {
                assert!(features::lookup(f).is_some(), "{}: {f}", m.name);
            }
        }
        for f in KVM_DEFAULTS_ON
            .iter()
            .chain(KVM_DEFAULTS_OFF)
            .chain(UNMIGRATABLE)
            .chain(MAX_EMULATED)
        {
            assert!(features::lookup(f).is_some(), "{f}");
        }
    }

    #[test]
    fn lookup_is_case_insensitive_and_strict() {
        assert_eq!(lookup("QEMU64").unwrap().name(), "qemu64");
        assert_eq!(lookup("opteron_g1").unwrap().name(), "Opteron_G1");
        assert!(lookup("IvyBridge").is_none());
        assert!(lookup("").is_none());
        for k in KNOWN {
            assert_eq!(lookup(k).unwrap().name(), *k);
        }
    }
}
