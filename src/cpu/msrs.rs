//! Initial MSR values: those of a CPU after reset, then `--msr INDEX=VALUE`.

use serde::{Deserialize, Serialize};

pub const IA32_TSC: u32 = 0x10;
pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
pub const IA32_MISC_ENABLE: u32 = 0x1a0;
pub const IA32_PAT: u32 = 0x277;

/// IA32_MISC_ENABLE after reset as firmware leaves it: fast-string
/// operations enabled (bit 0), the value QEMU also starts with.
pub const MISC_ENABLE_RESET: u64 = 1;
/// IA32_PAT at power-up: WB, WT, UC-, UC, repeated (Intel SDM, "Programming
/// the PAT").
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// One MSR and its value: an `--msr INDEX=VALUE`, a reset value, or a
/// saved one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    pub index: u32,
    pub value: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsrError {
    #[error("--msr '{0}': expected INDEX=VALUE, e.g. 0x1a0=0x1 (numbers in decimal or 0x hex)")]
    Syntax(String),
    #[error("--msr 0x{index:x} given twice with different values")]
    Duplicate { index: u32 },
}

fn number(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl std::str::FromStr for MsrValue {
    type Err = MsrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MsrError::Syntax(s.to_string());
        let (i, v) = s.split_once('=').ok_or_else(err)?;
        let index = number(i)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(err)?;
        let value = number(v).ok_or_else(err)?;
        Ok(MsrValue { index, value })
    }
}

/// The reset values, then `extra` (later entries win over reset values;
/// the same MSR twice with different values is an error).
pub fn initial(extra: &[MsrValue]) -> Result<Vec<MsrValue>, MsrError> {
    for (i, a) in extra.iter().enumerate() {
        if extra[..i]
            .iter()
            .any(|b| b.index == a.index && b.value != a.value)
        {
            return Err(MsrError::Duplicate { index: a.index });
        }
    }
    let mut out: Vec<MsrValue> = reset_values()
        .into_iter()
        .filter(|r| !extra.iter().any(|e| e.index == r.index))
        .collect();
    for e in extra {
        if !out.iter().any(|o| o.index == e.index) {
            out.push(*e);
        }
    }
    Ok(out)
}

/// MSRs whose KVM default differs from a reset CPU, or that the SDM gives
/// a defined reset value kvm-unit-tests checks.
pub fn reset_values() -> Vec<MsrValue> {
    vec![
        MsrValue {
            index: IA32_MISC_ENABLE,
            value: MISC_ENABLE_RESET,
        },
        MsrValue {
            index: IA32_PAT,
            value: PAT_RESET,
        },
        MsrValue {
            index: IA32_TSC_DEADLINE,
            value: 0,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_values() {
        let m: MsrValue = "0x1a0=0x1".parse().unwrap();
        assert_eq!((m.index, m.value), (0x1a0, 1));
        let m: MsrValue = "631=18446744073709551615".parse().unwrap();
        assert_eq!((m.index, m.value), (631, u64::MAX));
        for bad in [
            "",
            "0x1a0",
            "=1",
            "0x1a0=",
            "x=1",
            "0x1ffffffff=0",
            "1=0x1_0000_0000_0000_0000",
            "1=2=3",
        ] {
            assert!(bad.parse::<MsrValue>().is_err(), "{bad}");
        }
    }

    #[test]
    fn extra_values_replace_reset_ones() {
        let v = initial(&["0x277=0".parse().unwrap(), "0x10=5".parse().unwrap()]).unwrap();
        assert_eq!(v.iter().find(|m| m.index == IA32_PAT).unwrap().value, 0);
        assert_eq!(v.iter().filter(|m| m.index == IA32_PAT).count(), 1);
        assert!(v.iter().any(|m| m.index == 0x10 && m.value == 5));
        assert!(v.iter().any(|m| m.index == IA32_MISC_ENABLE));
        let e = initial(&["0x10=5".parse().unwrap(), "0x10=6".parse().unwrap()]).unwrap_err();
        assert_eq!(e, MsrError::Duplicate { index: 0x10 });
        assert!(initial(&["0x10=5".parse().unwrap(), "0x10=5".parse().unwrap()]).is_ok());
    }
}
