//! CPUID for each vCPU: a CPU model and the toggles of `--cpu` turned into
//! a CPUID table (`resolve()`), then the per-vCPU fields real hardware
//! reports (APIC IDs, topology counts; `for_vcpu()`).

pub mod features;
pub mod gdt;
pub mod models;
pub mod msrs;
pub mod probe;
pub mod report;
pub mod spec;

mod entries;
mod kvm;
mod timing;
mod topology;
mod xsave;

use std::collections::BTreeSet;

use kvm_bindings::kvm_cpuid_entry2;
use serde::Serialize;

use entries::{entry, set};
use features::{Feature, Reg, KVM_FEATURES_LEAF};
use models::Model;
use xsave::fix_xsave;

pub use entries::{to_kvm, word};
pub use kvm::{host_cpuid, Avail, KvmCpuid};
pub use spec::{CpuSpec, SpecError};
pub use timing::{add_timing_leaf, KVM_TIMING_LEAF};
pub use topology::for_vcpu;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    Supported(kvm_ioctls::Error),
    #[error("CPUID table has too many entries for KVM: {0}")]
    TooBig(String),
    #[error("--cpu: {0}")]
    Spec(#[from] SpecError),
    #[error("--cpu: CPU feature '{name}' ({location}) is not available from this host's KVM (--cpu-lenient drops it with a warning instead)")]
    Unavailable { name: String, location: String },
    #[error("--cpu: phys-bits={asked} exceeds this host's MAXPHYADDR of {host} bits")]
    PhysBits { asked: u8, host: u8 },
}

/// One named feature: what each layer says about it.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub location: String,
    pub kvm: Avail,
    /// The model turns it on (before toggles and before KVM's limits).
    pub model: bool,
    /// What `--cpu` asked for, if it named the feature.
    pub asked: Option<bool>,
    /// The value in the CPUID table kvmrun gives KVM.
    pub set: bool,
}

/// A CPUID table for a spec, before the per-vCPU fields.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub model: &'static str,
    pub entries: Vec<kvm_cpuid_entry2>,
    pub rows: Vec<Row>,
    /// Features `--cpu-lenient` dropped, one sentence each.
    pub warnings: Vec<String>,
}

/// x86-64 address widths QEMU gives a named model when the spec does not
/// say: 40 physical bits (QEMU's default `phys-bits`), 48 virtual bits.
const DEFAULT_PHYS_BITS: u8 = 40;

/// Leaf-1 EDX bits AMD CPUs repeat in CPUID.80000001H:EDX (QEMU's
/// CPUID_EXT2_AMD_ALIASES): FPU..APIC, MTRR..CMOV, PAT, PSE36, MMX, FXSR.
const AMD_ALIASES: u32 = 0x0183_f3ff;

/// Turn `spec` into a CPUID table with what `kvm` can give. A feature the
/// spec turns on that KVM cannot give is an error, or with `lenient` a
/// warning in `Resolved::warnings` and the feature left off.
pub fn resolve(spec: &CpuSpec, lenient: bool, kvm: &KvmCpuid) -> Result<Resolved, CpuError> {
    let model = models::lookup(&spec.model)
        .ok_or_else(|| CpuError::Spec(SpecError::UnknownModel(spec.model.clone())))?;
    let all = features::all();
    let sup = &kvm.supported;

    let model_on = model_features(model, spec, kvm, &all);
    let mut on = model_on.clone();
    // A model's own bits that KVM lacks are left out, as QEMU does (it
    // warns); the report shows them as "model: yes, set: no".
    on.retain(|n| find(&all, n).is_some_and(|f| kvm.avail(&f) != Avail::No));
    let warnings = apply_toggles(&mut on, spec, lenient, kvm, &all)?;
    let is_on = |n: &str| on.contains(n);

    // Leaf limits.
    let sup_level = word(sup, 0, 0, Reg::Eax);
    let sup_xlevel = word(sup, 0x8000_0000, 0, Reg::Eax);
    let (level, xlevel) = match model {
        Model::Named(m) => (m.level, m.xlevel),
        _ => (sup_level, sup_xlevel),
    };
    let mut entries: Vec<kvm_cpuid_entry2> = sup
        .iter()
        .filter(|e| match e.function {
            f if f < 0x4000_0000 => f <= level,
            f if (0x8000_0000..0xc000_0000).contains(&f) => f <= xlevel,
            f => (0x4000_0000..=0x4000_00ff).contains(&f),
        })
        .copied()
        .collect();
    // Leaves inside the limits that KVM did not fill read as zero; without
    // an entry KVM would answer them with the highest basic leaf's values.
    for leaf in (0..=level).chain(0x8000_0000..=xlevel.max(0x8000_0000)) {
        entry(&mut entries, leaf, 0);
    }
    entry(&mut entries, 0, 0).eax = level;
    entry(&mut entries, 0x8000_0000, 0).eax = xlevel;
    let kvm_sig = entry(&mut entries, 0x4000_0000, 0);
    kvm_sig.eax = KVM_FEATURES_LEAF;
    kvm_sig.ebx = u32::from_le_bytes(*b"KVMK");
    kvm_sig.ecx = u32::from_le_bytes(*b"VMKV");
    kvm_sig.edx = u32::from_le_bytes(*b"M\0\0\0");
    entry(&mut entries, KVM_FEATURES_LEAF, 0);

    // Feature registers: named bits from `on`; unnamed bits as KVM reports
    // them for host/max, clear for a named model.
    for (leaf, sub, reg) in features::words() {
        let in_range = match leaf {
            l if l < 0x4000_0000 => l <= level,
            l if l >= 0x8000_0000 => l <= xlevel,
            _ => true,
        };
        if !in_range {
            continue;
        }
        let named: u32 = all
            .iter()
            .filter(|f| (f.leaf, f.subleaf, f.reg) == (leaf, sub, reg))
            .fold(0, |m, f| m | f.mask);
        let mut v = match model {
            Model::Named(_) => 0,
            _ => word(sup, leaf, sub, reg) & !named,
        };
        for f in all
            .iter()
            .filter(|f| (f.leaf, f.subleaf, f.reg) == (leaf, sub, reg) && is_on(f.name))
        {
            v |= f.mask;
        }
        set(entry(&mut entries, leaf, sub), reg, v);
    }

    // Identity.
    let vendor: [u32; 3] = match &spec.vendor {
        Some(v) => {
            let b = v.as_bytes();
            let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            [w(0), w(4), w(8)]
        }
        // Under KVM the guest sees the host's vendor whatever the model
        // says, as with QEMU: the instruction sets differ per vendor.
        None => [
            word(sup, 0, 0, Reg::Ebx),
            word(sup, 0, 0, Reg::Edx),
            word(sup, 0, 0, Reg::Ecx),
        ],
    };
    for leaf in [0, 0x8000_0000] {
        let e = entry(&mut entries, leaf, 0);
        e.ebx = vendor[0];
        e.edx = vendor[1];
        e.ecx = vendor[2];
    }
    if let Model::Named(m) = model {
        let base_family = m.family.min(0xf);
        let ext_family = m.family.saturating_sub(0xf);
        let e = entry(&mut entries, 1, 0);
        e.eax = m.stepping
            | (m.model & 0xf) << 4
            | base_family << 8
            | ((m.model >> 4) & 0xf) << 16
            | ext_family << 20;
        if xlevel >= 0x8000_0004 {
            let mut brand = [0u8; 48];
            brand[..m.brand.len().min(47)]
                .copy_from_slice(&m.brand.as_bytes()[..m.brand.len().min(47)]);
            for i in 0..3u32 {
                let e = entry(&mut entries, 0x8000_0002 + i, 0);
                let w = |j: usize| {
                    let o = i as usize * 16 + j * 4;
                    u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
                };
                (e.eax, e.ebx, e.ecx, e.edx) = (w(0), w(1), w(2), w(3));
            }
        }
        // The highest subleaf of leaf 7: 1 only when a 7.1 feature is on.
        if level >= 7 {
            let sub1 = all
                .iter()
                .any(|f| f.leaf == 7 && f.subleaf == 1 && is_on(f.name));
            entry(&mut entries, 7, 0).eax = u32::from(sub1);
        }
        // No vPMU for a named model (QEMU's `pmu=off` default).
        if level >= 0xa {
            let e = entry(&mut entries, 0xa, 0);
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
    }
    let amd = vendor == [0x6874_7541, 0x6974_6e65, 0x444d_4163];
    if amd && xlevel >= 0x8000_0001 {
        let leaf1_edx = word(&entries, 1, 0, Reg::Edx);
        entry(&mut entries, 0x8000_0001, 0).edx |= leaf1_edx & AMD_ALIASES;
    }
    if !is_on("svm") && xlevel >= 0x8000_000a {
        let e = entry(&mut entries, 0x8000_000a, 0);
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
    fix_xsave(&mut entries, sup, &is_on, level);

    // Address widths.
    if xlevel >= 0x8000_0008 {
        let host_phys = (word(sup, 0x8000_0008, 0, Reg::Eax) & 0xff) as u8;
        let host_phys = if host_phys == 0 { 36 } else { host_phys };
        let host_default = matches!(model, Model::Host | Model::Max);
        let phys = match (spec.phys_bits, spec.host_phys_bits) {
            (_, Some(true)) => host_phys,
            (Some(n), _) if n > host_phys => {
                return Err(CpuError::PhysBits {
                    asked: n,
                    host: host_phys,
                })
            }
            (Some(n), _) => n,
            (None, None) if host_default => host_phys,
            (None, _) => DEFAULT_PHYS_BITS.min(host_phys),
        };
        let virt: u32 = if is_on("la57") { 57 } else { 48 };
        let e = entry(&mut entries, 0x8000_0008, 0);
        e.eax = (e.eax & !0xffff) | virt << 8 | u32::from(phys);
    }

    entries.sort_by_key(|e| (e.function, e.index));
    let rows = all
        .iter()
        .map(|f| Row {
            name: f.name,
            location: f.location(),
            kvm: kvm.avail(f),
            model: model_on.contains(f.name),
            asked: spec
                .toggles
                .iter()
                .find(|(n, _)| n == f.name)
                .map(|(_, b)| *b),
            set: f.is_on(word(&entries, f.leaf, f.subleaf, f.reg)),
        })
        .collect();
    Ok(Resolved {
        model: model.name(),
        entries,
        rows,
        warnings,
    })
}

/// The feature named exactly `name`.
fn find(all: &[Feature], name: &str) -> Option<Feature> {
    all.iter().find(|f| f.name == name).copied()
}

/// What the model turns on, before `--cpu`'s toggles and KVM's limits.
fn model_features(
    model: Model,
    spec: &CpuSpec,
    kvm: &KvmCpuid,
    all: &[Feature],
) -> BTreeSet<&'static str> {
    let mut on: BTreeSet<&'static str> = BTreeSet::new();
    match model {
        Model::Host | Model::Max => {
            for f in all {
                // KVM hints are for the VMM to assert, never automatic.
                if kvm.avail(f) == Avail::Yes && f.name != "kvm-hint-dedicated" {
                    on.insert(f.name);
                }
            }
            if spec.migratable != Some(false) {
                for n in models::UNMIGRATABLE {
                    on.remove(n);
                }
            }
            if matches!(model, Model::Max) {
                for n in models::MAX_EMULATED {
                    if find(all, n).is_some_and(|f| kvm.avail(&f) != Avail::No) {
                        on.insert(find(all, n).map_or("", |f| f.name));
                    }
                }
            }
        }
        Model::Named(m) => {
            let mut names: Vec<&str> = m.features.to_vec();
            if m.kvm_defaults {
                names.extend(models::KVM_DEFAULTS_ON);
                names.retain(|n| !models::KVM_DEFAULTS_OFF.contains(n));
            }
            for n in names {
                if let Some(f) = find(all, n) {
                    on.insert(f.name);
                }
            }
        }
    }
    on
}

/// Apply `--cpu`'s toggles to `on` in order, returning the warnings of
/// features `lenient` left off.
fn apply_toggles(
    on: &mut BTreeSet<&'static str>,
    spec: &CpuSpec,
    lenient: bool,
    kvm: &KvmCpuid,
    all: &[Feature],
) -> Result<Vec<String>, CpuError> {
    let mut warnings = Vec::new();
    for (name, want) in &spec.toggles {
        let Some(f) = find(all, name) else {
            return Err(SpecError::UnknownFeature {
                name: name.clone(),
                hint: String::new(),
            }
            .into());
        };
        if !want {
            on.remove(f.name);
        } else if kvm.avail(&f) != Avail::No {
            on.insert(f.name);
        } else if lenient {
            warnings.push(format!(
                "CPU feature '{}' ({}) is not available from this host's KVM; left off",
                f.name,
                f.location()
            ));
        } else {
            return Err(CpuError::Unavailable {
                name: f.name.to_string(),
                location: f.location(),
            });
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn e(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if features::has_subleaves(function) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// A KVM that looks like this project's host, shortened.
    fn fake_kvm() -> KvmCpuid {
        let intel = [0x756e_6547, 0x6c65_746e, 0x4965_6e69];
        KvmCpuid {
            supported: vec![
                e(0, 0, [0x1f, intel[0], intel[2], intel[1]]),
                // cx16, x2apic, tsc-deadline, xsave, avx, hypervisor; the
                // usual leaf-1 EDX.
                e(1, 0, [0x806f8, 0x800, 0x9520_2000, 0x0f8b_fbff]),
                // fsgsbase, tsc-adjust, invpcid; umip, la57.
                e(7, 0, [0, 0x403, 0x1_0004, 0]),
                e(0xd, 0, [0x7, 0x340, 0x340, 0]),
                e(0xd, 1, [0x1, 0, 0, 0]),
                e(0xd, 2, [0x100, 0x240, 0, 0]),
                e(0x4000_0000, 0, [0x4000_0001, 0, 0, 0]),
                e(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
                e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
                e(0x8000_0001, 0, [0, 0, 0x1, 0x2010_0800]),
                e(0x8000_0007, 0, [0, 0, 0, 0x100]),
                e(0x8000_0008, 0, [0x392e, 0, 0, 0]),
            ],
            // movbe
            emulated: vec![e(1, 0, [0, 0, 1 << 22, 0])],
        }
    }

    pub(super) fn res(spec: &str) -> Resolved {
        resolve(&CpuSpec::parse(spec).unwrap(), false, &fake_kvm()).unwrap()
    }

    pub(super) fn on(r: &Resolved, name: &str) -> bool {
        let f = features::lookup(name).unwrap();
        f.is_on(word(&r.entries, f.leaf, f.subleaf, f.reg))
    }

    #[test]
    fn qemu64_is_what_qemu_gives_under_kvm() {
        let r = res("qemu64");
        assert_eq!(word(&r.entries, 0, 0, Reg::Eax), 0xd);
        assert_eq!(word(&r.entries, 0x8000_0000, 0, Reg::Eax), 0x8000_000a);
        assert_eq!(word(&r.entries, 1, 0, Reg::Eax), 0x60fb1);
        // KVM PV features of QEMU's kvm_default_props, as measured.
        assert_eq!(
            word(&r.entries, KVM_FEATURES_LEAF, 0, Reg::Eax),
            0x0100_007b
        );
        assert!(on(&r, "x2apic") && on(&r, "cx16") && on(&r, "lm") && on(&r, "hypervisor"));
        // KVM lacks SSE3 here, and svm is off under KVM.
        assert!(!on(&r, "pni") && !on(&r, "svm") && !on(&r, "tsc-deadline"));
        assert!(r
            .rows
            .iter()
            .any(|row| row.name == "pni" && row.model && !row.set));
        assert_eq!(word(&r.entries, 7, 0, Reg::Ebx), 0);
        // No XSAVE: leaf 0xD reads as zero.
        assert_eq!(word(&r.entries, 0xd, 0, Reg::Eax), 0);
        assert!(!r.entries.iter().any(|e| e.function == 0xd && e.index == 2));
        // 40 physical, 48 virtual address bits.
        assert_eq!(word(&r.entries, 0x8000_0008, 0, Reg::Eax) & 0xffff, 0x3028);
        // Leaves KVM lacks inside the limits exist (as zero).
        assert!(r.entries.iter().any(|e| e.function == 0x8000_000a));
        assert!(!r
            .entries
            .iter()
            .any(|e| e.function > 0xd && e.function < 0x4000_0000));
        let brand = word(&r.entries, 0x8000_0002, 0, Reg::Eax).to_le_bytes();
        assert_eq!(&brand, b"QEMU");
    }

    #[test]
    fn toggles_apply_in_order_and_removals_stick() {
        let r = res("qemu64,-x2apic,+tsc-deadline,pcid=off,-kvmclock,+invpcid");
        assert!(!on(&r, "x2apic") && on(&r, "tsc-deadline") && on(&r, "invpcid"));
        assert_eq!(
            word(&r.entries, KVM_FEATURES_LEAF, 0, Reg::Eax),
            0x0100_0072
        );
        let row = r.rows.iter().find(|r| r.name == "x2apic").unwrap();
        assert_eq!((row.model, row.asked, row.set), (true, Some(false), false));
        // The KVM signature stays.
        assert_eq!(word(&r.entries, 0x4000_0000, 0, Reg::Ebx), 0x4b4d_564b);
    }

    #[test]
    fn host_and_max_follow_kvm() {
        let h = res("host");
        assert!(on(&h, "la57") && on(&h, "avx") && on(&h, "invpcid") && !on(&h, "movbe"));
        assert!(!on(&h, "invtsc"), "unmigratable by default");
        assert!(on(&res("host,migratable=no"), "invtsc"));
        assert_eq!(word(&h.entries, 0, 0, Reg::Eax), 0x1f);
        // Host address widths: 46 physical; 57 virtual with LA57.
        assert_eq!(word(&h.entries, 0x8000_0008, 0, Reg::Eax) & 0xffff, 0x392e);
        let m = res("max");
        assert!(on(&m, "movbe"));
        assert_eq!(
            m.rows.iter().find(|r| r.name == "movbe").unwrap().kvm,
            Avail::Emulated
        );
        let m = res("max,-la57");
        assert_eq!(word(&m.entries, 0x8000_0008, 0, Reg::Eax) & 0xffff, 0x302e);
        // Emulated features can be asked for by name on any model.
        assert!(on(&res("qemu64,+movbe"), "movbe"));
    }

    #[test]
    fn unavailable_features_fail_or_warn() {
        let spec = CpuSpec::parse("max,+svm,+vmx").unwrap();
        let e = resolve(&spec, false, &fake_kvm()).unwrap_err().to_string();
        assert!(
            e.contains("'svm'") && e.contains("CPUID.80000001H:ECX[2]"),
            "{e}"
        );
        let r = resolve(&spec, true, &fake_kvm()).unwrap();
        assert_eq!(r.warnings.len(), 2);
        assert!(r.warnings[0].contains("svm"));
        assert!(!on(&r, "svm") && !on(&r, "vmx"));
        // Removing what KVM lacks is always fine.
        assert!(!on(&res("max,-svm,-rdtscp,-skinit"), "svm"));
    }

    #[test]
    fn vendor_and_phys_bits() {
        let r = res("Opteron_G1,vendor=AuthenticAMD");
        assert_eq!(
            word(&r.entries, 0, 0, Reg::Ebx),
            u32::from_le_bytes(*b"Auth")
        );
        assert_eq!(
            word(&r.entries, 0x8000_0000, 0, Reg::Ecx),
            u32::from_le_bytes(*b"cAMD")
        );
        // AMD repeats the leaf-1 EDX bits in CPUID.80000001H:EDX.
        let ext = word(&r.entries, 0x8000_0001, 0, Reg::Edx);
        assert_eq!(
            ext & AMD_ALIASES,
            word(&r.entries, 1, 0, Reg::Edx) & AMD_ALIASES
        );
        assert_ne!(ext & 1, 0);
        assert_eq!(word(&r.entries, 0, 0, Reg::Eax), 5);
        assert!(!r.entries.iter().any(|e| e.function == 7));
        let r = res("qemu64,vendor=GenuineIntel");
        assert_eq!(word(&r.entries, 0x8000_0001, 0, Reg::Edx) & 1, 0);
        assert_eq!(
            word(
                &res("qemu64,phys-bits=36").entries,
                0x8000_0008,
                0,
                Reg::Eax
            ) & 0xff,
            36
        );
        assert_eq!(
            word(
                &res("qemu64,host-phys-bits").entries,
                0x8000_0008,
                0,
                Reg::Eax
            ) & 0xff,
            46
        );
        assert_eq!(
            word(
                &res("max,phys-bits=36,host-phys-bits=off").entries,
                0x8000_0008,
                0,
                Reg::Eax
            ) & 0xff,
            36
        );
        let e = resolve(
            &CpuSpec::parse("qemu64,phys-bits=50").unwrap(),
            false,
            &fake_kvm(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("MAXPHYADDR of 46"), "{e}");
    }

    #[test]
    fn base_is_small() {
        let r = res("base");
        assert_eq!(word(&r.entries, KVM_FEATURES_LEAF, 0, Reg::Eax), 0);
        assert!(!on(&r, "x2apic") && on(&r, "sse2") && on(&r, "lm") && on(&r, "hypervisor"));
        let set: Vec<_> = r.rows.iter().filter(|r| r.set).map(|r| r.name).collect();
        assert!(set.len() < 25, "{set:?}");
    }
}
