//! VM-wide KVM capabilities by name: the ones `--kvm-cap NAME[=VALUE]`
//! turns on (KVM_ENABLE_CAP on the VM), the ones `kvmrun caps` reports
//! (KVM_CHECK_EXTENSION), and `--msr-filter` (KVM_X86_SET_MSR_FILTER).
//! Names are KVM's, without the `KVM_CAP_` prefix (Linux
//! `Documentation/virt/kvm/api.rst`).

use kvm_bindings as kb;
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use serde::{Deserialize, Serialize};

/// How a capability's value is given and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// On (1) or off; KVM_CHECK_EXTENSION must be non-zero.
    Bool,
    /// A set of flags (names below); each must be in the mask
    /// KVM_CHECK_EXTENSION returns. Without a value: every flag KVM offers.
    Flags(&'static [(&'static str, u64)]),
    /// A device kvmrun creates by default; `=off` leaves it out.
    DefaultOn,
}

pub struct CapInfo {
    pub name: &'static str,
    pub cap: u32,
    pub kind: Kind,
    pub what: &'static str,
}

/// The capabilities `--kvm-cap` can set.
pub static SETTABLE: &[CapInfo] = &[
    CapInfo {
        name: "X86_DISABLE_EXITS",
        cap: kb::KVM_CAP_X86_DISABLE_EXITS,
        kind: Kind::Flags(&[("mwait", 1), ("hlt", 2), ("pause", 4), ("cstate", 8)]),
        what: "let the guest run MWAIT/HLT/PAUSE/C-states without exiting",
    },
    CapInfo {
        name: "X2APIC_API",
        cap: kb::KVM_CAP_X2APIC_API,
        kind: Kind::Flags(&[("use-32bit-ids", 1), ("disable-broadcast-quirk", 2)]),
        what: "32-bit x2APIC IDs in KVM_SET/GET_LAPIC and routes",
    },
    CapInfo {
        name: "X86_USER_SPACE_MSR",
        cap: kb::KVM_CAP_X86_USER_SPACE_MSR,
        kind: Kind::Flags(&[("inval", 1), ("unknown", 2), ("filter", 4)]),
        what: "MSR accesses KVM would fault (or --msr-filter denies) exit to kvmrun, which injects #GP",
    },
    CapInfo {
        name: "EXCEPTION_PAYLOAD",
        cap: kb::KVM_CAP_EXCEPTION_PAYLOAD,
        kind: Kind::Bool,
        what: "defer #PF/#DB payloads (CR2/DR6) until exception delivery",
    },
    CapInfo {
        name: "X86_TRIPLE_FAULT_EVENT",
        cap: kb::KVM_CAP_X86_TRIPLE_FAULT_EVENT,
        kind: Kind::Bool,
        what: "triple faults become pending events user space can see",
    },
    CapInfo {
        name: "PMU_CAPABILITY",
        cap: kb::KVM_CAP_PMU_CAPABILITY,
        kind: Kind::Flags(&[("disable", 1)]),
        what: "turn the vPMU off for this VM",
    },
    CapInfo {
        name: "PIT2",
        cap: kb::KVM_CAP_PIT2,
        kind: Kind::DefaultOn,
        what: "in-kernel PIT (on by default; PIT2=off is QEMU's -machine pit=off)",
    },
];

/// Further capabilities `kvmrun caps` shows, read-only.
pub static INFO: &[(&str, u32)] = &[
    ("IRQCHIP", kb::KVM_CAP_IRQCHIP),
    ("HLT", kb::KVM_CAP_HLT),
    ("USER_MEMORY", kb::KVM_CAP_USER_MEMORY),
    ("SET_TSS_ADDR", kb::KVM_CAP_SET_TSS_ADDR),
    ("EXT_CPUID", kb::KVM_CAP_EXT_CPUID),
    ("NR_VCPUS", kb::KVM_CAP_NR_VCPUS),
    ("MAX_VCPUS", kb::KVM_CAP_MAX_VCPUS),
    ("NR_MEMSLOTS", kb::KVM_CAP_NR_MEMSLOTS),
    ("MP_STATE", kb::KVM_CAP_MP_STATE),
    ("IRQFD", kb::KVM_CAP_IRQFD),
    ("XSAVE", kb::KVM_CAP_XSAVE),
    ("XCRS", kb::KVM_CAP_XCRS),
    ("TSC_CONTROL", kb::KVM_CAP_TSC_CONTROL),
    ("TSC_DEADLINE_TIMER", kb::KVM_CAP_TSC_DEADLINE_TIMER),
    ("GET_TSC_KHZ", kb::KVM_CAP_GET_TSC_KHZ),
    ("KVMCLOCK_CTRL", kb::KVM_CAP_KVMCLOCK_CTRL),
    ("SPLIT_IRQCHIP", kb::KVM_CAP_SPLIT_IRQCHIP),
    ("IMMEDIATE_EXIT", kb::KVM_CAP_IMMEDIATE_EXIT),
    ("X86_MSR_FILTER", kb::KVM_CAP_X86_MSR_FILTER),
    ("NESTED_STATE", kb::KVM_CAP_NESTED_STATE),
    ("HYPERV", kb::KVM_CAP_HYPERV),
    ("X86_SMM", kb::KVM_CAP_X86_SMM),
    ("VM_TYPES", kb::KVM_CAP_VM_TYPES),
];

/// One `--kvm-cap NAME[=VALUE]`, parsed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSetting {
    pub name: String,
    /// None: the default for the kind (on, or every flag KVM offers).
    pub value: Option<u64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapError {
    #[error("--kvm-cap: unknown capability '{name}' (settable: {known})", known = SETTABLE.iter().map(|c| c.name).collect::<Vec<_>>().join(", "))]
    Unknown { name: String },
    #[error("--kvm-cap {name}: bad value '{value}': expected {expected}")]
    Value {
        name: String,
        value: String,
        expected: String,
    },
    #[error("--kvm-cap {0} given twice with different values")]
    Duplicate(String),
    #[error("--kvm-cap {name}: KVM_CAP_{name} is not supported by this host's KVM")]
    Unsupported { name: String },
    #[error("--kvm-cap {name}={value:#x}: this host's KVM offers only {offered:#x}")]
    Partial {
        name: String,
        value: u64,
        offered: u64,
    },
    #[error("--kvm-cap {name}: KVM_ENABLE_CAP failed: {source}")]
    Enable {
        name: String,
        source: kvm_ioctls::Error,
    },
    #[error("--msr-filter '{0}': expected INDEX or FIRST-LAST (decimal or 0x hex), comma-separated, at most 16 ranges")]
    FilterSyntax(String),
    #[error("--msr-filter: KVM_X86_SET_MSR_FILTER failed: {0}")]
    Filter(kvm_ioctls::Error),
}

pub fn info(name: &str) -> Option<&'static CapInfo> {
    let n = name
        .trim()
        .to_ascii_uppercase()
        .replace('-', "_")
        .trim_start_matches("KVM_CAP_")
        .to_string();
    SETTABLE.iter().find(|c| c.name == n)
}

fn number(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl std::str::FromStr for CapSetting {
    type Err = CapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = match s.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        let c = info(name).ok_or_else(|| CapError::Unknown {
            name: name.to_string(),
        })?;
        let bad = |expected: String| CapError::Value {
            name: c.name.to_string(),
            value: value.unwrap_or("").to_string(),
            expected,
        };
        let value = match (c.kind, value) {
            (_, None) => None,
            (Kind::Bool | Kind::DefaultOn, Some(v)) => match v.to_ascii_lowercase().as_str() {
                "on" | "1" | "yes" | "true" => Some(1),
                "off" | "0" | "no" | "false" => Some(0),
                _ => return Err(bad("on or off".into())),
            },
            (Kind::Flags(flags), Some(v)) => {
                let names: Vec<&str> = flags.iter().map(|(n, _)| *n).collect();
                let expected = format!("a number or flags joined by '|' ({})", names.join(", "));
                if let Some(n) = number(v) {
                    let all = flags.iter().fold(0, |m, (_, b)| m | b);
                    if n & !all != 0 {
                        return Err(bad(expected));
                    }
                    Some(n)
                } else {
                    let mut m = 0;
                    for part in v.split('|') {
                        let p = part.trim().to_ascii_lowercase().replace('_', "-");
                        match flags.iter().find(|(n, _)| *n == p) {
                            Some((_, b)) => m |= b,
                            None => return Err(bad(expected)),
                        }
                    }
                    Some(m)
                }
            }
        };
        Ok(CapSetting {
            name: c.name.to_string(),
            value,
        })
    }
}

/// Reject the same capability given twice with different values.
pub fn check_duplicates(caps: &[CapSetting]) -> Result<(), CapError> {
    for (i, a) in caps.iter().enumerate() {
        if caps[..i]
            .iter()
            .any(|b| b.name == a.name && b.value != a.value)
        {
            return Err(CapError::Duplicate(a.name.clone()));
        }
    }
    Ok(())
}

/// Whether the in-kernel PIT stays, given `--kvm-cap PIT2=...`.
pub fn pit_wanted(caps: &[CapSetting], default: bool) -> bool {
    match caps.iter().find(|c| c.name == "PIT2") {
        Some(c) => c.value != Some(0),
        None => default,
    }
}

/// The KVM_CHECK_EXTENSION value of `cap` on this VM.
pub fn check(vm: &VmFd, cap: u32) -> i32 {
    vm.check_extension_raw(u64::from(cap))
}

/// Enable every setting on `vm`; call before any vCPU exists (some
/// capabilities are refused afterwards).
pub fn enable(vm: &VmFd, caps: &[CapSetting]) -> Result<(), CapError> {
    for s in caps {
        let Some(c) = info(&s.name) else {
            return Err(CapError::Unknown {
                name: s.name.clone(),
            });
        };
        let offered = check(vm, c.cap);
        if offered <= 0 {
            if c.kind == Kind::DefaultOn || s.value == Some(0) {
                continue;
            }
            return Err(CapError::Unsupported {
                name: c.name.to_string(),
            });
        }
        let arg = match c.kind {
            Kind::DefaultOn => continue,
            Kind::Bool => s.value.unwrap_or(1),
            Kind::Flags(_) => {
                let offered = offered as u64;
                let v = s.value.unwrap_or(offered);
                if v & !offered != 0 {
                    return Err(CapError::Partial {
                        name: c.name.to_string(),
                        value: v,
                        offered,
                    });
                }
                v
            }
        };
        if arg == 0 {
            // Off is KVM's default for every settable capability.
            continue;
        }
        let mut ec = kb::kvm_enable_cap {
            cap: c.cap,
            ..Default::default()
        };
        ec.args[0] = arg;
        vm.enable_cap(&ec).map_err(|source| CapError::Enable {
            name: c.name.to_string(),
            source,
        })?;
        log::info!("KVM_CAP_{} enabled with {arg:#x}", c.name);
    }
    Ok(())
}

/// One line of `kvmrun caps`.
#[derive(Clone, Debug, Serialize)]
pub struct CapReport {
    pub name: &'static str,
    pub value: i32,
    pub settable: bool,
    pub what: &'static str,
}

/// KVM_CHECK_EXTENSION on a fresh VM for every capability kvmrun knows.
pub fn report() -> Result<Vec<CapReport>, crate::vm::VmError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(crate::vm::VmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(crate::vm::VmError::CreateVm)?;
    let mut out: Vec<CapReport> = SETTABLE
        .iter()
        .map(|c| CapReport {
            name: c.name,
            value: check(&vm, c.cap),
            settable: true,
            what: c.what,
        })
        .collect();
    out.extend(INFO.iter().map(|(name, cap)| CapReport {
        name,
        value: check(&vm, *cap),
        settable: false,
        what: "",
    }));
    Ok(out)
}

/// One `--msr-filter` range: MSRs `first..=last` denied for reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrRange {
    pub first: u32,
    pub last: u32,
}

/// Parse `INDEX` or `FIRST-LAST`, comma-separated.
pub fn parse_msr_filter(s: &str) -> Result<Vec<MsrRange>, CapError> {
    let err = || CapError::FilterSyntax(s.to_string());
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let n = |x: &str| number(x).and_then(|v| u32::try_from(v).ok());
        let (first, last) = (n(a).ok_or_else(err)?, n(b).ok_or_else(err)?);
        if last < first || last - first >= 0x10000 {
            return Err(err());
        }
        out.push(MsrRange { first, last });
    }
    if out.is_empty() || out.len() > kb::KVM_MSR_FILTER_MAX_RANGES as usize {
        return Err(err());
    }
    Ok(out)
}

/// Install a filter that allows every MSR but those in `ranges`. A denied
/// access exits to user space if X86_USER_SPACE_MSR has the filter flag,
/// or makes KVM inject #GP.
pub fn set_msr_filter(vm: &VmFd, ranges: &[MsrRange]) -> Result<(), CapError> {
    // A zero bit denies; one bitmap long enough for the largest range.
    let longest = ranges
        .iter()
        .map(|r| r.last - r.first + 1)
        .max()
        .unwrap_or(0);
    let bitmap = vec![0u8; longest.div_ceil(8) as usize];
    let raw: Vec<MsrFilterRange> = ranges
        .iter()
        .map(|r| MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: r.first,
            msr_count: r.last - r.first + 1,
            bitmap: &bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &raw)
        .map_err(CapError::Filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_parse() {
        let c: CapSetting = "X86_DISABLE_EXITS=hlt|pause".parse().unwrap();
        assert_eq!((c.name.as_str(), c.value), ("X86_DISABLE_EXITS", Some(6)));
        let c: CapSetting = "kvm_cap_x2apic_api=0x3".parse().unwrap();
        assert_eq!((c.name.as_str(), c.value), ("X2APIC_API", Some(3)));
        let c: CapSetting = "exception-payload".parse().unwrap();
        assert_eq!((c.name.as_str(), c.value), ("EXCEPTION_PAYLOAD", None));
        let c: CapSetting = "X86_TRIPLE_FAULT_EVENT=on".parse().unwrap();
        assert_eq!(c.value, Some(1));
        let c: CapSetting = "PIT2=off".parse().unwrap();
        assert_eq!(c.value, Some(0));
        assert!(!pit_wanted(&[c], true));
        assert!(pit_wanted(&[], true));
        let c: CapSetting = "X86_USER_SPACE_MSR=filter|unknown".parse().unwrap();
        assert_eq!(c.value, Some(6));
        let c: CapSetting = "PMU_CAPABILITY=disable".parse().unwrap();
        assert_eq!(c.value, Some(1));
    }

    #[test]
    fn bad_names_and_values_are_errors() {
        for (s, want) in [
            ("NO_SUCH_CAP", "unknown capability 'NO_SUCH_CAP'"),
            ("", "unknown capability ''"),
            (
                "X86_DISABLE_EXITS=sleep",
                "flags joined by '|' (mwait, hlt, pause, cstate)",
            ),
            ("X86_DISABLE_EXITS=0x100", "bad value '0x100'"),
            ("EXCEPTION_PAYLOAD=2", "on or off"),
            ("PIT2=maybe", "on or off"),
            ("X86_USER_SPACE_MSR=filter|", "bad value"),
        ] {
            let e = s.parse::<CapSetting>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
        let a: CapSetting = "EXCEPTION_PAYLOAD=on".parse().unwrap();
        let b: CapSetting = "EXCEPTION_PAYLOAD=off".parse().unwrap();
        assert!(check_duplicates(&[a.clone(), a.clone()]).is_ok());
        assert_eq!(
            check_duplicates(&[a, b]).unwrap_err(),
            CapError::Duplicate("EXCEPTION_PAYLOAD".into())
        );
    }

    #[test]
    fn msr_filter_ranges() {
        assert_eq!(
            parse_msr_filter("0x10,0xc0000080-0xc0000084").unwrap(),
            vec![
                MsrRange {
                    first: 0x10,
                    last: 0x10
                },
                MsrRange {
                    first: 0xc000_0080,
                    last: 0xc000_0084
                }
            ]
        );
        for bad in ["", "x", "5-4", "0x1-0x20000", "1,,2", "0x100000000"] {
            assert!(parse_msr_filter(bad).is_err(), "{bad}");
        }
        let many = vec!["1"; 17].join(",");
        assert!(parse_msr_filter(&many).is_err());
    }
}
