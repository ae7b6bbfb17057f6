//! `--cpu MODEL[,+feat][,-feat][,feat=on|off][,key=value]...`, spelled the
//! way QEMU's `-cpu` is.

use serde::{Deserialize, Serialize};

use super::{features, models};

/// A parsed `--cpu` value. Names are stored canonical, so two specs that
/// mean the same compare equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuSpec {
    pub model: String,
    /// Feature toggles in the order given: (canonical name, on).
    pub toggles: Vec<(String, bool)>,
    /// `vendor=`: the 12-character vendor string.
    pub vendor: Option<String>,
    /// `phys-bits=N`.
    pub phys_bits: Option<u8>,
    /// `host-phys-bits[=on|off]`.
    pub host_phys_bits: Option<bool>,
    /// `migratable=on|off` (QEMU's, for `host` and `max`).
    pub migratable: Option<bool>,
}

impl Default for CpuSpec {
    /// QEMU's default CPU, `qemu64`, which kvm-unit-tests entries without
    /// `-cpu` get.
    fn default() -> Self {
        CpuSpec::model("qemu64")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("empty CPU model")]
    EmptyModel,
    #[error("unknown CPU model '{0}' (known: {known})", known = models::KNOWN.join(", "))]
    UnknownModel(String),
    #[error("empty item in '{0}'")]
    EmptyItem(String),
    #[error("unknown CPU feature '{name}'{hint}")]
    UnknownFeature { name: String, hint: String },
    #[error("'{item}': expected on or off")]
    BadSwitch { item: String },
    #[error("feature '{0}' is both turned on and off")]
    Conflict(String),
    #[error("'{key}' given twice with different values")]
    Duplicate { key: String },
    #[error("vendor '{0}' must be exactly 12 ASCII characters, e.g. GenuineIntel or AuthenticAMD")]
    Vendor(String),
    #[error("phys-bits '{0}': expected a number from 32 to 52")]
    PhysBits(String),
    #[error("phys-bits={0} and host-phys-bits=on contradict each other")]
    PhysBitsConflict(u8),
    #[error("'{0}' is not supported by kvmrun: it has no Hyper-V enlightenments")]
    HyperV(String),
}

fn switch(item: &str, v: &str) -> Result<bool, SpecError> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "y" => Ok(true),
        "off" | "false" | "no" | "n" => Ok(false),
        _ => Err(SpecError::BadSwitch {
            item: item.to_string(),
        }),
    }
}

fn set_once<T: PartialEq>(slot: &mut Option<T>, v: T, key: &str) -> Result<(), SpecError> {
    match slot {
        Some(old) if *old != v => Err(SpecError::Duplicate {
            key: key.to_string(),
        }),
        _ => {
            *slot = Some(v);
            Ok(())
        }
    }
}

fn unknown_feature(name: &str) -> SpecError {
    let near = features::suggest(name);
    let hint = if near.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", near.join(", "))
    };
    SpecError::UnknownFeature {
        name: name.to_string(),
        hint,
    }
}

impl CpuSpec {
    /// A bare model with nothing toggled.
    pub fn model(name: &str) -> Self {
        CpuSpec {
            model: name.to_string(),
            toggles: Vec::new(),
            vendor: None,
            phys_bits: None,
            host_phys_bits: None,
            migratable: None,
        }
    }

    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let mut items = s.split(',');
        let model = items.next().unwrap_or("").trim();
        if model.is_empty() {
            return Err(SpecError::EmptyModel);
        }
        let m = models::lookup(model).ok_or_else(|| SpecError::UnknownModel(model.into()))?;
        let mut spec = CpuSpec::model(m.name());
        for raw in items {
            let item = raw.trim();
            if item.is_empty() {
                return Err(SpecError::EmptyItem(s.to_string()));
            }
            let (name, on) = if let Some(n) = item.strip_prefix('+') {
                (n, Some(true))
            } else if let Some(n) = item.strip_prefix('-') {
                (n, Some(false))
            } else {
                (item, None)
            };
            let (key, value) = match name.split_once('=') {
                Some((k, v)) if on.is_none() => (k.trim(), Some(v.trim())),
                Some(_) => return Err(unknown_feature(name)),
                None => (name.trim(), None),
            };
            let ckey = key.to_ascii_lowercase().replace('_', "-");
            if on.is_none() {
                match ckey.as_str() {
                    "vendor" => {
                        let v = value.unwrap_or("");
                        if v.len() != 12 || !v.is_ascii() {
                            return Err(SpecError::Vendor(v.to_string()));
                        }
                        set_once(&mut spec.vendor, v.to_string(), "vendor")?;
                        continue;
                    }
                    "phys-bits" => {
                        let v = value.unwrap_or("");
                        let n: u8 = v
                            .parse()
                            .ok()
                            .filter(|n| (32..=52).contains(n))
                            .ok_or_else(|| SpecError::PhysBits(v.to_string()))?;
                        set_once(&mut spec.phys_bits, n, "phys-bits")?;
                        continue;
                    }
                    "host-phys-bits" => {
                        let b = value.map_or(Ok(true), |v| switch(item, v))?;
                        set_once(&mut spec.host_phys_bits, b, "host-phys-bits")?;
                        continue;
                    }
                    "migratable" => {
                        let b = value.map_or(Ok(true), |v| switch(item, v))?;
                        set_once(&mut spec.migratable, b, "migratable")?;
                        continue;
                    }
                    _ => {}
                }
            }
            if ckey.starts_with("hv-") {
                return Err(SpecError::HyperV(key.to_string()));
            }
            let f = features::lookup(key).ok_or_else(|| unknown_feature(key))?;
            let on = match (on, value) {
                (Some(b), None) => b,
                (None, Some(v)) => switch(item, v)?,
                // A bare name turns the feature on, as in QEMU.
                (None, None) => true,
                (Some(_), Some(_)) => unreachable!("+/- with '=' rejected above"),
            };
            let name = f.name.to_string();
            if let Some((_, old)) = spec.toggles.iter().find(|(n, _)| *n == name) {
                if *old != on {
                    return Err(SpecError::Conflict(name));
                }
                continue;
            }
            spec.toggles.push((name, on));
        }
        if let (Some(n), Some(true)) = (spec.phys_bits, spec.host_phys_bits) {
            return Err(SpecError::PhysBitsConflict(n));
        }
        Ok(spec)
    }
}

impl std::str::FromStr for CpuSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuSpec::parse(s)
    }
}

impl std::fmt::Display for CpuSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.model)?;
        for (n, on) in &self.toggles {
            write!(f, ",{}{n}", if *on { '+' } else { '-' })?;
        }
        if let Some(v) = &self.vendor {
            write!(f, ",vendor={v}")?;
        }
        if let Some(n) = self.phys_bits {
            write!(f, ",phys-bits={n}")?;
        }
        if let Some(b) = self.host_phys_bits {
            write!(f, ",host-phys-bits={}", if b { "on" } else { "off" })?;
        }
        if let Some(b) = self.migratable {
            write!(f, ",migratable={}", if b { "on" } else { "off" })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `-cpu` value kvm-unit-tests' x86/unittests.cfg passes, except
    /// the named models kvmrun does not have and the Hyper-V ones (tested
    /// below).
    const KUT_SPECS: &[&str] = &[
        "qemu64,+x2apic,+tsc-deadline",
        "qemu64,-x2apic,+tsc-deadline",
        "qemu64,+x2apic",
        "max,host-phys-bits",
        "max",
        "host",
        "host,migratable=no",
        "max,vendor=GenuineIntel",
        "qemu64,vendor=GenuineIntel",
        "Opteron_G1,vendor=AuthenticAMD",
        "max,+svm",
        "max,+svm,-rdtscp,-xsave,-invpcid,-skinit",
        "max,+svm,-npt",
        "qemu64,+pcid,+invpcid",
        "qemu64,-pcid,-invpcid",
        "qemu64,-pcid,+invpcid",
        "qemu64,+umip",
        "max,+vmx",
        "max,+vmx,-pku",
        "max,+la57",
        "qemu64",
    ];

    #[test]
    fn every_kut_spelling_parses() {
        for s in KUT_SPECS {
            let spec = CpuSpec::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            // Printing and parsing again gives the same spec.
            assert_eq!(CpuSpec::parse(&spec.to_string()).unwrap(), spec, "{s}");
        }
    }

    #[test]
    fn kut_entries_kvmrun_lacks_are_clear_errors() {
        for s in [
            "IvyBridge,phys-bits=36,host-phys-bits=off",
            "Skylake-Server,host-phys-bits,+vmx,+vmx-mbec",
        ] {
            let e = CpuSpec::parse(s).unwrap_err();
            assert!(matches!(e, SpecError::UnknownModel(_)), "{s}: {e}");
            assert!(e.to_string().contains("known: host, max, qemu64"), "{e}");
        }
        let e = CpuSpec::parse("host,hv_passthrough").unwrap_err();
        assert!(e.to_string().contains("Hyper-V"), "{e}");
        let e = CpuSpec::parse("max,host-phys-bits,+vmx,-vmx-mbec").unwrap_err();
        assert!(matches!(e, SpecError::UnknownFeature { .. }), "{e}");
    }

    #[test]
    fn toggles_values_and_keys() {
        let s = CpuSpec::parse("qemu64,+x2apic,-pcid,tsc_deadline=on,avx=off,la57").unwrap();
        assert_eq!(
            s.toggles,
            vec![
                ("x2apic".into(), true),
                ("pcid".into(), false),
                ("tsc-deadline".into(), true),
                ("avx".into(), false),
                ("la57".into(), true),
            ]
        );
        let s = CpuSpec::parse("max,phys-bits=36,host-phys-bits=off,migratable=no").unwrap();
        assert_eq!(s.phys_bits, Some(36));
        assert_eq!(s.host_phys_bits, Some(false));
        assert_eq!(s.migratable, Some(false));
        let s = CpuSpec::parse("QEMU64,vendor=AuthenticAMD,+x2apic,+x2apic").unwrap();
        assert_eq!(s.model, "qemu64");
        assert_eq!(s.vendor.as_deref(), Some("AuthenticAMD"));
        assert_eq!(s.toggles.len(), 1);
        assert_eq!(CpuSpec::default().model, "qemu64");
    }

    #[test]
    fn bad_specs_are_rejected() {
        let cases: &[(&str, &str)] = &[
            ("", "empty CPU model"),
            (",+x2apic", "empty CPU model"),
            ("pentium9", "unknown CPU model 'pentium9'"),
            ("qemu64,", "empty item"),
            ("qemu64,,+x2apic", "empty item"),
            ("qemu64,+x2apci", "did you mean x2apic"),
            ("qemu64,+nosuchthing", "unknown CPU feature 'nosuchthing'"),
            ("qemu64,+x2apic=on", "unknown CPU feature"),
            ("qemu64,x2apic=maybe", "expected on or off"),
            ("qemu64,+x2apic,-x2apic", "both turned on and off"),
            ("qemu64,x2apic=on,x2apic=off", "both turned on and off"),
            ("qemu64,+sse3,-pni", "'pni' is both"),
            ("qemu64,vendor=Intel", "exactly 12"),
            (
                "qemu64,vendor=GenuineIntel,vendor=AuthenticAMD",
                "'vendor' given twice",
            ),
            ("qemu64,phys-bits=99", "phys-bits '99'"),
            ("qemu64,phys-bits=x", "phys-bits 'x'"),
            ("qemu64,phys-bits=36,host-phys-bits", "contradict"),
            ("qemu64,host-phys-bits=sometimes", "expected on or off"),
            ("host,hv-relaxed", "Hyper-V"),
            ("qemu64,+", "unknown CPU feature ''"),
            ("qemu64,+osxsave", "unknown CPU feature 'osxsave'"),
        ];
        for (s, want) in cases {
            let e = CpuSpec::parse(s).expect_err(s).to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
