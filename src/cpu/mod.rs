//! CPUID for each vCPU: a CPU model and the toggles of `--cpu` turned into
//! a CPUID table (`resolve()`), then the per-vCPU fields real hardware
//! reports (APIC IDs, topology counts; `for_vcpu()`).

pub mod features;
pub mod models;
pub mod msrs;
pub mod probe;
pub mod report;
pub mod spec;

use std::collections::BTreeSet;

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;
use serde::Serialize;

use features::{Feature, Reg, KVM_FEATURES_LEAF};
use models::Model;
pub use spec::{CpuSpec, SpecError};

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

fn set(e: &mut kvm_cpuid_entry2, reg: Reg, v: u32) {
    match reg {
        Reg::Eax => e.eax = v,
        Reg::Ebx => e.ebx = v,
        Reg::Ecx => e.ecx = v,
        Reg::Edx => e.edx = v,
    }
}

/// The entry for `leaf`/`subleaf`, added (all zero) if missing.
fn entry(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32, subleaf: u32) -> &mut kvm_cpuid_entry2 {
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

/// The hardware CPUID of the machine kvmrun runs on, for reports.
pub fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = std::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
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
    let find = |n: &str| all.iter().find(|f| f.name == n).copied();
    let sup = &kvm.supported;

    // What the model turns on.
    let mut on: BTreeSet<&'static str> = BTreeSet::new();
    match model {
        Model::Host | Model::Max => {
            for f in &all {
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
                    if find(n).is_some_and(|f| kvm.avail(&f) != Avail::No) {
                        on.insert(find(n).map_or("", |f| f.name));
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
                if let Some(f) = find(n) {
                    on.insert(f.name);
                }
            }
        }
    }
    let model_on = on.clone();
    // A model's own bits that KVM lacks are left out, as QEMU does (it
    // warns); the report shows them as "model: yes, set: no".
    on.retain(|n| find(n).is_some_and(|f| kvm.avail(&f) != Avail::No));

    let mut warnings = Vec::new();
    for (name, want) in &spec.toggles {
        let Some(f) = find(name) else {
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

/// Make leaf 0xD describe exactly the state components of the features
/// left on: XCR0's supported mask (subleaf 0 EAX/EDX), the largest save
/// area (ECX), and one subleaf per component. Without XSAVE the leaf is
/// all zero.
fn fix_xsave(
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

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

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

pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, CpuError> {
    CpuId::from_entries(entries).map_err(|e| CpuError::TooBig(format!("{e:?}")))
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

    fn res(spec: &str) -> Resolved {
        resolve(&CpuSpec::parse(spec).unwrap(), false, &fake_kvm()).unwrap()
    }

    fn on(r: &Resolved, name: &str) -> bool {
        let f = features::lookup(name).unwrap();
        f.is_on(word(&r.entries, f.leaf, f.subleaf, f.reg))
    }

    #[test]
    fn timing_leaf_raises_the_hypervisor_limit() {
        let mut v = vec![e(0x4000_0000, 0, [0x4000_0001, 1, 2, 3])];
        add_timing_leaf(&mut v, 2_000_000);
        assert_eq!(word(&v, 0x4000_0000, 0, Reg::Eax), KVM_TIMING_LEAF);
        assert_eq!(word(&v, 0x4000_0000, 0, Reg::Ebx), 1);
        assert_eq!(word(&v, KVM_TIMING_LEAF, 0, Reg::Eax), 2_000_000);
        assert_eq!(word(&v, KVM_TIMING_LEAF, 0, Reg::Ebx), 1_000_000);
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
