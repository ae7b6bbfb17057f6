//! Named CPUID feature bits: one table from name to leaf, subleaf,
//! register and bit.
//!
//! The names are the ones QEMU's `-cpu` accepts (QEMU `target/i386/cpu.c`,
//! `feature_word_info[].feat_names`), which are also Linux's
//! `/proc/cpuinfo` names for most bits; a few Linux spellings are accepted
//! as aliases. Bit positions are the ones the Intel SDM ("CPUID—CPU
//! Identification") and the AMD APM ("CPUID Specification") give; the KVM
//! paravirtual bits are those of Linux's `Documentation/virt/kvm/x86/cpuid.rst`.
//! Dynamic bits (OSXSAVE, OSPKE) are left out: the CPU computes them from
//! CR4, so they cannot be toggled.

use serde::{Deserialize, Serialize};

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl std::fmt::Display for Reg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        })
    }
}

/// One 32-bit feature register: leaf, subleaf (0 for leaves without
/// subleaves), register, and the name of each bit ("" = unnamed).
pub struct Word {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub names: [&'static str; 32],
}

/// Leaf of the KVM paravirtual feature bits.
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

#[rustfmt::skip]
pub static WORDS: &[Word] = &[
    Word { leaf: 1, subleaf: 0, reg: Reg::Edx, names: [
        "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce",
        "cx8", "apic", "", "sep", "mtrr", "pge", "mca", "cmov",
        "pat", "pse36", "pn", "clflush", "", "ds", "acpi", "mmx",
        "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe",
    ] },
    Word { leaf: 1, subleaf: 0, reg: Reg::Ecx, names: [
        "pni", "pclmulqdq", "dtes64", "monitor", "ds-cpl", "vmx", "smx", "est",
        "tm2", "ssse3", "cid", "", "fma", "cx16", "xtpr", "pdcm",
        "", "pcid", "dca", "sse4.1", "sse4.2", "x2apic", "movbe", "popcnt",
        "tsc-deadline", "aes", "xsave", "", "avx", "f16c", "rdrand", "hypervisor",
    ] },
    Word { leaf: 6, subleaf: 0, reg: Reg::Eax, names: [
        "", "", "arat", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    Word { leaf: 7, subleaf: 0, reg: Reg::Ebx, names: [
        "fsgsbase", "tsc-adjust", "sgx", "bmi1", "hle", "avx2", "fdp-excptn-only", "smep",
        "bmi2", "erms", "invpcid", "rtm", "", "zero-fcs-fds", "mpx", "",
        "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit", "clflushopt",
        "clwb", "intel-pt", "avx512pf", "avx512er", "avx512cd", "sha-ni", "avx512bw", "avx512vl",
    ] },
    Word { leaf: 7, subleaf: 0, reg: Reg::Ecx, names: [
        "", "avx512vbmi", "umip", "pku", "", "waitpkg", "avx512vbmi2", "",
        "gfni", "vaes", "vpclmulqdq", "avx512vnni", "avx512bitalg", "", "avx512-vpopcntdq", "",
        "la57", "", "", "", "", "", "rdpid", "",
        "bus-lock-detect", "cldemote", "", "movdiri", "movdir64b", "", "sgxlc", "pks",
    ] },
    Word { leaf: 7, subleaf: 0, reg: Reg::Edx, names: [
        "", "", "avx512-4vnniw", "avx512-4fmaps", "fsrm", "", "", "",
        "avx512-vp2intersect", "", "md-clear", "", "", "", "serialize", "",
        "tsx-ldtrk", "", "", "arch-lbr", "", "", "amx-bf16", "avx512-fp16",
        "amx-tile", "amx-int8", "spec-ctrl", "stibp", "flush-l1d", "arch-capabilities", "core-capability", "ssbd",
    ] },
    Word { leaf: 7, subleaf: 1, reg: Reg::Eax, names: [
        "sha512", "sm3", "sm4", "", "avx-vnni", "avx512-bf16", "", "cmpccxadd",
        "", "", "fzrm", "fsrs", "fsrc", "", "", "",
        "", "fred", "lkgs", "wrmsrns", "", "amx-fp16", "", "avx-ifma",
        "", "", "lam", "", "", "", "", "",
    ] },
    Word { leaf: 0xd, subleaf: 1, reg: Reg::Eax, names: [
        "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    Word { leaf: KVM_FEATURES_LEAF, subleaf: 0, reg: Reg::Eax, names: [
        "kvmclock", "kvm-nopiodelay", "kvm-mmu", "kvmclock", "kvm-asyncpf", "kvm-steal-time", "kvm-pv-eoi", "kvm-pv-unhalt",
        "", "kvm-pv-tlb-flush", "kvm-asyncpf-vmexit", "kvm-pv-ipi", "kvm-poll-control", "kvm-pv-sched-yield", "kvm-asyncpf-int", "kvm-msi-ext-dest-id",
        "", "", "", "", "", "", "", "",
        "kvmclock-stable-bit", "", "", "", "", "", "", "",
    ] },
    Word { leaf: KVM_FEATURES_LEAF, subleaf: 0, reg: Reg::Edx, names: [
        "kvm-hint-dedicated", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    Word { leaf: 0x8000_0001, subleaf: 0, reg: Reg::Edx, names: [
        "", "", "", "", "", "", "", "",
        "", "", "", "syscall", "", "", "", "",
        "", "", "", "", "nx", "", "mmxext", "",
        "", "fxsr-opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
    ] },
    Word { leaf: 0x8000_0001, subleaf: 0, reg: Reg::Ecx, names: [
        "lahf-lm", "cmp-legacy", "svm", "extapic", "cr8legacy", "abm", "sse4a", "misalignsse",
        "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", "", "lwp",
        "fma4", "tce", "", "nodeid-msr", "", "tbm", "topoext", "perfctr-core",
        "perfctr-nb", "", "", "", "", "", "", "",
    ] },
    Word { leaf: 0x8000_0007, subleaf: 0, reg: Reg::Edx, names: [
        "", "", "", "", "", "", "", "",
        "invtsc", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
        "", "", "", "", "", "", "", "",
    ] },
    Word { leaf: 0x8000_0008, subleaf: 0, reg: Reg::Ebx, names: [
        "clzero", "", "xsaveerptr", "", "", "", "", "",
        "", "wbnoinvd", "", "", "ibpb", "", "ibrs", "amd-stibp",
        "", "stibp-always-on", "", "", "", "", "", "",
        "amd-ssbd", "virt-ssbd", "amd-no-ssb", "", "amd-psfd", "", "", "",
    ] },
    Word { leaf: 0x8000_000a, subleaf: 0, reg: Reg::Edx, names: [
        "npt", "lbrv", "svm-lock", "nrip-save", "tsc-scale", "vmcb-clean", "flushbyasid", "decodeassists",
        "", "", "pause-filter", "", "pfthreshold", "avic", "", "v-vmsave-vmload",
        "vgif", "", "", "", "", "", "", "",
        "", "vnmi", "", "", "svme-addr-chk", "", "", "",
    ] },
];

/// Other spellings (Linux's /proc/cpuinfo names and QEMU's legacy aliases)
/// and the canonical name each stands for. Lookup has already turned `_`
/// into `-` and lowered the case.
static ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("sse4-1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("pclmuldq", "pclmulqdq"),
    ("xd", "nx"),
    ("i64", "lm"),
    ("ffxsr", "fxsr-opt"),
    ("tsc-deadline-timer", "tsc-deadline"),
    ("avx512-vbmi", "avx512vbmi"),
    ("avx512-vbmi2", "avx512vbmi2"),
    ("avx512-vnni", "avx512vnni"),
    ("avx512-bitalg", "avx512bitalg"),
    ("avx512-ifma", "avx512ifma"),
    ("avx512-vpopcntdq", "avx512-vpopcntdq"),
    ("kvmclock2", "kvmclock"),
];

/// A named feature: all its bits live in one register of one leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    /// Usually one bit; `kvmclock` owns two (the old and new MSR sets).
    pub mask: u32,
}

impl Feature {
    /// Whether this feature is on in register value `v`.
    pub fn is_on(&self, v: u32) -> bool {
        v & self.mask == self.mask
    }

    /// Where the feature lives, as "CPUID.07H.0:ECX[16]".
    pub fn location(&self) -> String {
        let sub = if self.subleaf != 0 || has_subleaves(self.leaf) {
            format!(".{}", self.subleaf)
        } else {
            String::new()
        };
        let bits: Vec<String> = (0..32)
            .filter(|b| self.mask & (1 << b) != 0)
            .map(|b| b.to_string())
            .collect();
        format!(
            "CPUID.{:02X}H{sub}:{}[{}]",
            self.leaf,
            self.reg,
            bits.join(",")
        )
    }
}

/// Leaves whose output depends on ECX.
pub fn has_subleaves(leaf: u32) -> bool {
    matches!(
        leaf,
        4 | 7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x20
            | 0x23
            | 0x24
            | 0x8000_001d
            | 0x8000_0020
            | 0x8000_0026
    )
}

/// Every named feature, in table order, one entry per name.
pub fn all() -> Vec<Feature> {
    let mut out: Vec<Feature> = Vec::new();
    for w in WORDS {
        for (bit, name) in w.names.iter().enumerate() {
            if name.is_empty() {
                continue;
            }
            if let Some(f) = out
                .iter_mut()
                .find(|f| f.name == *name && f.leaf == w.leaf && f.reg == w.reg)
            {
                f.mask |= 1 << bit;
                continue;
            }
            out.push(Feature {
                name,
                leaf: w.leaf,
                subleaf: w.subleaf,
                reg: w.reg,
                mask: 1 << bit,
            });
        }
    }
    out
}

/// The canonical spelling of a feature name: lower case, `_` as `-`,
/// aliases resolved. Unknown names come back normalised but unresolved.
pub fn canonical(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    match ALIASES.iter().find(|(a, _)| *a == n) {
        Some((_, c)) => (*c).to_string(),
        None => n,
    }
}

/// Look a feature up by any accepted spelling.
pub fn lookup(name: &str) -> Option<Feature> {
    let c = canonical(name);
    all().into_iter().find(|f| f.name == c)
}

/// The few known names closest to an unknown one, for "did you mean".
pub fn suggest(name: &str) -> Vec<&'static str> {
    let c = canonical(name);
    let mut scored: Vec<(usize, &'static str)> = all()
        .iter()
        .map(|f| (distance(&c, f.name), f.name))
        .collect();
    scored.sort();
    let limit = (c.len() / 3).clamp(1, 3);
    let mut out: Vec<&'static str> = scored
        .iter()
        .filter(|(d, _)| *d <= limit)
        .map(|(_, n)| *n)
        .take(3)
        .collect();
    // A name that contains the input (or the reverse) is a good hint too:
    // "deadline" -> "tsc-deadline".
    if out.is_empty() && c.len() >= 3 {
        out = all()
            .iter()
            .map(|f| f.name)
            .filter(|n| n.contains(c.as_str()) || c.contains(n))
            .take(3)
            .collect();
    }
    out
}

/// Levenshtein edit distance.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Every distinct feature register the table names, as (leaf, subleaf, reg).
pub fn words() -> impl Iterator<Item = (u32, u32, Reg)> {
    WORDS.iter().map(|w| (w.leaf, w.subleaf, w.reg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(name: &str) -> (u32, u32, Reg, u32) {
        let f = lookup(name).unwrap_or_else(|| panic!("{name} unknown"));
        (f.leaf, f.subleaf, f.reg, f.mask)
    }

    #[test]
    fn bits_match_the_manuals() {
        assert_eq!(at("x2apic"), (1, 0, Reg::Ecx, 1 << 21));
        assert_eq!(at("tsc-deadline"), (1, 0, Reg::Ecx, 1 << 24));
        assert_eq!(at("pcid"), (1, 0, Reg::Ecx, 1 << 17));
        assert_eq!(at("vmx"), (1, 0, Reg::Ecx, 1 << 5));
        assert_eq!(at("xsave"), (1, 0, Reg::Ecx, 1 << 26));
        assert_eq!(at("cx16"), (1, 0, Reg::Ecx, 1 << 13));
        assert_eq!(at("popcnt"), (1, 0, Reg::Ecx, 1 << 23));
        assert_eq!(at("hypervisor"), (1, 0, Reg::Ecx, 1 << 31));
        assert_eq!(at("sse2"), (1, 0, Reg::Edx, 1 << 26));
        assert_eq!(at("apic"), (1, 0, Reg::Edx, 1 << 9));
        assert_eq!(at("invpcid"), (7, 0, Reg::Ebx, 1 << 10));
        assert_eq!(at("avx512f"), (7, 0, Reg::Ebx, 1 << 16));
        assert_eq!(at("smap"), (7, 0, Reg::Ebx, 1 << 20));
        assert_eq!(at("umip"), (7, 0, Reg::Ecx, 1 << 2));
        assert_eq!(at("pku"), (7, 0, Reg::Ecx, 1 << 3));
        assert_eq!(at("la57"), (7, 0, Reg::Ecx, 1 << 16));
        assert_eq!(at("rdpid"), (7, 0, Reg::Ecx, 1 << 22));
        assert_eq!(at("pks"), (7, 0, Reg::Ecx, 1 << 31));
        assert_eq!(at("spec-ctrl"), (7, 0, Reg::Edx, 1 << 26));
        assert_eq!(at("lam"), (7, 1, Reg::Eax, 1 << 26));
        assert_eq!(at("xsaves"), (0xd, 1, Reg::Eax, 1 << 3));
        assert_eq!(at("rdtscp"), (0x8000_0001, 0, Reg::Edx, 1 << 27));
        assert_eq!(at("lm"), (0x8000_0001, 0, Reg::Edx, 1 << 29));
        assert_eq!(at("svm"), (0x8000_0001, 0, Reg::Ecx, 1 << 2));
        assert_eq!(at("skinit"), (0x8000_0001, 0, Reg::Ecx, 1 << 12));
        assert_eq!(at("npt"), (0x8000_000a, 0, Reg::Edx, 1));
        assert_eq!(at("invtsc"), (0x8000_0007, 0, Reg::Edx, 1 << 8));
        assert_eq!(at("kvmclock"), (KVM_FEATURES_LEAF, 0, Reg::Eax, 0b1001));
        assert_eq!(
            at("kvmclock-stable-bit"),
            (KVM_FEATURES_LEAF, 0, Reg::Eax, 1 << 24)
        );
        assert_eq!(at("kvm-pv-ipi"), (KVM_FEATURES_LEAF, 0, Reg::Eax, 1 << 11));
    }

    #[test]
    fn aliases_and_spellings() {
        assert_eq!(lookup("sse3").unwrap().name, "pni");
        assert_eq!(lookup("SSE4_2").unwrap().name, "sse4.2");
        assert_eq!(lookup("sse4-1").unwrap().name, "sse4.1");
        assert_eq!(lookup("tsc_deadline").unwrap().name, "tsc-deadline");
        assert_eq!(lookup("tsc_deadline_timer").unwrap().name, "tsc-deadline");
        assert_eq!(lookup("lahf_lm").unwrap().name, "lahf-lm");
        assert_eq!(lookup("kvm_pv_eoi").unwrap().name, "kvm-pv-eoi");
        assert_eq!(lookup("sha_ni").unwrap().name, "sha-ni");
        assert!(lookup("osxsave").is_none());
        assert!(lookup("").is_none());
    }

    #[test]
    fn names_are_unique_and_bits_do_not_overlap() {
        let all = all();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.name, b.name);
                if (a.leaf, a.subleaf, a.reg) == (b.leaf, b.subleaf, b.reg) {
                    assert_eq!(a.mask & b.mask, 0, "{} and {}", a.name, b.name);
                }
            }
        }
        assert!(all.len() > 200, "{}", all.len());
        for (_, c) in ALIASES {
            assert!(lookup(c).is_some(), "alias target {c}");
        }
    }

    #[test]
    fn suggestions_name_the_nearest() {
        assert!(suggest("x2apci").contains(&"x2apic"));
        assert!(suggest("tsc-dedline").contains(&"tsc-deadline"));
        assert!(suggest("avx512").contains(&"avx512f"));
        assert!(suggest("deadline").contains(&"tsc-deadline"));
        assert!(suggest("zzzzzzzzzzzz").is_empty());
        assert_eq!(distance("kitten", "sitting"), 3);
    }

    #[test]
    fn locations_read_like_the_sdm() {
        assert_eq!(lookup("la57").unwrap().location(), "CPUID.07H.0:ECX[16]");
        assert_eq!(lookup("x2apic").unwrap().location(), "CPUID.01H:ECX[21]");
        assert_eq!(
            lookup("kvmclock").unwrap().location(),
            "CPUID.40000001H:EAX[0,3]"
        );
    }
}
