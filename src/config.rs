//! `VmConfig`: everything a VM is made from, validated once, here.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::boot::linux::DEFAULT_CMDLINE;
use crate::boot::ImageKind;
use crate::cpu::msrs::{self, MsrError, MsrValue};
use crate::cpu::CpuSpec;
use crate::kvmcaps::{self, CapError, CapSetting, MsrRange};
use crate::memory::MIN_MEM;
pub use crate::platform::virtio::Transport;

/// Most vCPUs a guest may have: the xAPIC ID is one byte and 0xff is the
/// broadcast ID.
pub const MAX_VCPUS: u32 = 254;

/// Most virtio-rng devices: a handful tests the transports; more would
/// only use up interrupt lines.
pub const MAX_RNGS: usize = 4;

/// Where the guest's COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialOutput {
    Stdio,
    None,
    File(PathBuf),
}

impl std::str::FromStr for SerialOutput {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(SerialOutput::File(PathBuf::from(path))),
                _ => Err(ConfigError::Serial(s.to_string())),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The image to boot.
    pub image: PathBuf,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// Loaded as multiboot module 0, as QEMU's `-initrd` does.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`: the base of the kernel command line. `None` means
    /// `linux::DEFAULT_CMDLINE` for Linux kernels and nothing for multiboot.
    #[serde(default)]
    pub base_cmdline: Option<String>,
    /// Words appended to the base (`--append` and the words after `--`).
    pub cmdline: String,
    /// In-kernel PIT (QEMU's `-machine pit=off` turns it off).
    pub pit: bool,
    pub serial: SerialOutput,
    /// Wall-clock limit in seconds; the VM ends with status 124 when it expires.
    pub timeout_secs: Option<f64>,
    /// CPU model and feature toggles (`--cpu`).
    pub cpu: CpuSpec,
    /// Drop features KVM cannot give with a warning instead of failing.
    pub cpu_lenient: bool,
    /// VM-wide KVM capabilities to enable (`--kvm-cap`).
    pub kvm_caps: Vec<CapSetting>,
    /// MSRs denied to the guest (`--msr-filter`).
    pub msr_filter: Vec<MsrRange>,
    /// Initial MSR values on every vCPU beyond the reset ones (`--msr`).
    pub msrs: Vec<MsrValue>,
    /// Devices beyond the fixed PC ones, in the order given (each is
    /// registered under a name from its kind and place in this list).
    pub devices: Vec<DeviceConfig>,
}

/// A device the configuration adds. New kinds go at the end: a snapshot
/// stores the configuration, and postcard numbers variants in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// virtio-rng (`--rng[=pci|mmio]`).
    Rng(Transport),
}

impl VmConfig {
    /// A configuration with QEMU's defaults for everything but the image.
    pub fn new(image: PathBuf) -> Self {
        VmConfig {
            image,
            mem_bytes: 128 << 20,
            vcpus: 1,
            initrd: None,
            base_cmdline: None,
            cmdline: String::new(),
            pit: true,
            serial: SerialOutput::Stdio,
            timeout_secs: None,
            cpu: CpuSpec::default(),
            cpu_lenient: false,
            kvm_caps: Vec::new(),
            msr_filter: Vec::new(),
            msrs: Vec::new(),
            devices: Vec::new(),
        }
    }

    /// The command line a kernel of `kind` gets: the base (`--cmdline`, or
    /// the default for Linux), then the appended words, one space apart.
    /// Multiboot loaders put the image name in front of it.
    pub fn kernel_cmdline(&self, kind: ImageKind) -> String {
        let base = match (&self.base_cmdline, kind.is_linux()) {
            (Some(b), _) => b.as_str(),
            (None, true) => DEFAULT_CMDLINE,
            (None, false) => "",
        };
        [base, self.cmdline.as_str()]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the machine has PCI: the host bridge comes with the first
    /// PCI device.
    pub fn has_pci(&self) -> bool {
        self.devices
            .iter()
            .any(|d| matches!(d, DeviceConfig::Rng(Transport::Pci)))
    }

    /// Whether the in-kernel PIT is created: `pit` unless `--kvm-cap
    /// PIT2=off` says otherwise.
    pub fn pit_enabled(&self) -> bool {
        kvmcaps::pit_wanted(&self.kvm_caps, self.pit)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.mem_bytes < MIN_MEM || !self.mem_bytes.is_multiple_of(4096) {
            return Err(ConfigError::Mem(self.mem_bytes));
        }
        if let Some(t) = self.timeout_secs {
            if !(t.is_finite() && t > 0.0) {
                return Err(ConfigError::Timeout(t.to_string()));
            }
        }
        // Re-parse the spec's canonical form: a config built in code (or
        // read back from a snapshot) gets the same checks as `--cpu`.
        CpuSpec::parse(&self.cpu.to_string())
            .map_err(|e| ConfigError::Cpu(self.cpu.to_string(), e))?;
        kvmcaps::check_duplicates(&self.kvm_caps)?;
        for c in &self.kvm_caps {
            kvmcaps::info(&c.name).ok_or_else(|| CapError::Unknown {
                name: c.name.clone(),
            })?;
        }
        if self.msr_filter.len() > kvm_bindings::KVM_MSR_FILTER_MAX_RANGES as usize {
            return Err(ConfigError::MsrFilterRanges(self.msr_filter.len()));
        }
        msrs::initial(&self.msrs)?;
        let rngs = self
            .devices
            .iter()
            .filter(|d| matches!(d, DeviceConfig::Rng(_)))
            .count();
        if rngs > MAX_RNGS {
            return Err(ConfigError::Devices(format!(
                "{rngs} virtio-rng devices, at most {MAX_RNGS}"
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid memory size '{0}': expected a number with an optional K, M, G or T suffix (no suffix means MiB, as QEMU's -m)")]
    MemSyntax(String),
    #[error("invalid memory size {0} bytes: need at least 2 MiB, in whole 4 KiB pages")]
    Mem(u64),
    #[error("invalid vCPU count {0}: need 1 to {MAX_VCPUS}")]
    Vcpus(u32),
    #[error("invalid serial output '{0}': expected stdio, none or file:PATH")]
    Serial(String),
    #[error("invalid timeout '{0}': expected a positive number of seconds")]
    Timeout(String),
    #[error("invalid --cpu '{0}': {1}")]
    Cpu(String, crate::cpu::SpecError),
    #[error(transparent)]
    Cap(#[from] CapError),
    #[error(transparent)]
    Msr(#[from] MsrError),
    #[error("--msr-filter: {0} ranges, KVM takes at most 16")]
    MsrFilterRanges(usize),
    #[error("invalid devices: {0}")]
    Devices(String),
}

/// Parse a memory size the way QEMU's `-m` does: a bare number is MiB, a
/// suffix K/M/G/T (either case, optional trailing B) scales by 1024s.
pub fn parse_mem_size(s: &str) -> Result<u64, ConfigError> {
    let err = || ConfigError::MemSyntax(s.to_string());
    let t = s.trim();
    let t = t.strip_suffix(['b', 'B']).unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 20),
        _ => return Err(err()),
    };
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Parse a `--timeout` value in seconds (fractions allowed).
pub fn parse_timeout(s: &str) -> Result<f64, ConfigError> {
    let t: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| ConfigError::Timeout(s.to_string()))?;
    if t.is_finite() && t > 0.0 {
        Ok(t)
    } else {
        Err(ConfigError::Timeout(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes_follow_qemu() {
        assert_eq!(parse_mem_size("2048").unwrap(), 2048 << 20);
        assert_eq!(parse_mem_size("4g").unwrap(), 4 << 30);
        assert_eq!(parse_mem_size("512M").unwrap(), 512 << 20);
        assert!(parse_mem_size("64MiB").is_err());
        assert_eq!(parse_mem_size("65536k").unwrap(), 64 << 20);
        assert_eq!(parse_mem_size("1GB").unwrap(), 1 << 30);
        for bad in ["", "x", "-1", "1.5G", "99999999999999T", "G"] {
            assert!(parse_mem_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_rejects_nonsense() {
        let mut c = VmConfig::new("x".into());
        assert!(c.validate().is_ok());
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus(0))));
        c.vcpus = 1;
        c.mem_bytes = 1 << 20;
        assert!(matches!(c.validate(), Err(ConfigError::Mem(_))));
        c.mem_bytes = (128 << 20) + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn cpu_caps_and_msrs_are_validated() {
        let mut c = VmConfig::new("x".into());
        assert_eq!(c.cpu.model, "qemu64");
        c.cpu = CpuSpec::parse("max,+la57").unwrap();
        assert!(c.validate().is_ok());
        c.cpu.model = "nosuch".into();
        assert!(matches!(c.validate(), Err(ConfigError::Cpu(..))));
        c.cpu = CpuSpec::default();
        c.cpu.toggles = vec![("x2apic".into(), true), ("x2apic".into(), false)];
        assert!(matches!(c.validate(), Err(ConfigError::Cpu(..))));
        c.cpu = CpuSpec::default();
        c.kvm_caps = vec!["PIT2=off".parse().unwrap()];
        assert!(c.validate().is_ok());
        assert!(!c.pit_enabled());
        c.kvm_caps.push("PIT2=on".parse().unwrap());
        assert!(matches!(c.validate(), Err(ConfigError::Cap(_))));
        c.kvm_caps = vec![CapSetting {
            name: "BOGUS".into(),
            value: None,
        }];
        assert!(matches!(c.validate(), Err(ConfigError::Cap(_))));
        c.kvm_caps.clear();
        c.msrs = vec!["0x10=1".parse().unwrap(), "0x10=2".parse().unwrap()];
        assert!(matches!(c.validate(), Err(ConfigError::Msr(_))));
        c.msrs.clear();
        c.msr_filter = vec![MsrRange { first: 1, last: 1 }; 17];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MsrFilterRanges(17))
        ));
    }

    #[test]
    fn devices_decide_pci_and_are_bounded() {
        let mut c = VmConfig::new("x".into());
        assert!(!c.has_pci());
        c.devices.push(DeviceConfig::Rng(Transport::Mmio));
        assert!(!c.has_pci());
        c.devices.push(DeviceConfig::Rng(Transport::Pci));
        assert!(c.has_pci());
        assert!(c.validate().is_ok());
        c.devices = vec![DeviceConfig::Rng(Transport::Pci); MAX_RNGS + 1];
        assert!(matches!(c.validate(), Err(ConfigError::Devices(_))));
    }

    #[test]
    fn command_lines_join_base_and_appended_words() {
        let mut c = VmConfig::new("x".into());
        assert_eq!(c.kernel_cmdline(ImageKind::Multiboot), "");
        assert_eq!(c.kernel_cmdline(ImageKind::BzImage), DEFAULT_CMDLINE);
        c.cmdline = "a b".into();
        assert_eq!(c.kernel_cmdline(ImageKind::Multiboot), "a b");
        assert_eq!(
            c.kernel_cmdline(ImageKind::Pvh),
            format!("{DEFAULT_CMDLINE} a b")
        );
        c.base_cmdline = Some("console=ttyS0".into());
        assert_eq!(c.kernel_cmdline(ImageKind::Elf), "console=ttyS0 a b");
        assert_eq!(c.kernel_cmdline(ImageKind::Multiboot), "console=ttyS0 a b");
        c.base_cmdline = Some(String::new());
        c.cmdline.clear();
        assert_eq!(c.kernel_cmdline(ImageKind::BzImage), "");
    }

    #[test]
    fn serial_and_timeout_parse() {
        assert_eq!(
            "stdio".parse::<SerialOutput>().unwrap(),
            SerialOutput::Stdio
        );
        assert_eq!(
            "file:/tmp/x".parse::<SerialOutput>().unwrap(),
            SerialOutput::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialOutput>().is_err());
        assert!("tty".parse::<SerialOutput>().is_err());
        assert_eq!(parse_timeout("90s").unwrap(), 90.0);
        assert_eq!(parse_timeout("0.5").unwrap(), 0.5);
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("nan").is_err());
    }
}
