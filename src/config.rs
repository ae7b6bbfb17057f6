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

/// Most disks: each takes a PCI slot or one of the four virtio-mmio
/// interrupt lines.
pub const MAX_DISKS: usize = 8;

/// Most shared directories: each takes a PCI slot or one of the four
/// virtio-mmio interrupt lines.
pub const MAX_SHARES: usize = 8;

/// Most edu devices: kvm-unit-tests uses one; each takes a PCI slot and
/// an MSI route.
pub const MAX_EDUS: usize = 4;

/// The machine type (`--machine`, QEMU's `-M`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Machine {
    /// kvmrun's PC: PCI only with a PCI device, behind a generic host
    /// bridge.
    #[default]
    Pc,
    /// The PC with a Q35 chipset: always PCI, the MCH host bridge at
    /// 00:00.0 and the ICH9 LPC bridge at 00:1f.0.
    Q35,
}

impl std::str::FromStr for Machine {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "pc" => Ok(Machine::Pc),
            "q35" => Ok(Machine::Q35),
            _ => Err(ConfigError::Machine(s.to_string())),
        }
    }
}

/// Where the interrupt controllers live (`--irqchip`, QEMU's
/// `-machine kernel-irqchip=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Irqchip {
    /// KVM's PICs, IOAPIC and local APICs (KVM_CREATE_IRQCHIP).
    #[default]
    Kernel,
    /// KVM's local APICs, kvmrun's IOAPIC, PICs and PIT
    /// (KVM_CAP_SPLIT_IRQCHIP).
    Split,
}

impl std::str::FromStr for Irqchip {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "kernel" => Ok(Irqchip::Kernel),
            "split" => Ok(Irqchip::Split),
            _ => Err(ConfigError::Irqchip(s.to_string())),
        }
    }
}

/// Where the guest's COM1 output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialOutput {
    Stdio,
    None,
    File(PathBuf),
    /// kvmrun's stderr (the kernel log of `run --rootfs -v`).
    Stderr,
}

impl std::str::FromStr for SerialOutput {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(SerialOutput::Stdio),
            "none" => Ok(SerialOutput::None),
            "stderr" => Ok(SerialOutput::Stderr),
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
    /// Where the interrupt controllers live (`--irqchip`).
    pub irqchip: Irqchip,
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceConfig {
    /// virtio-rng (`--rng[=pci|mmio]`).
    Rng(Transport),
    /// virtio-blk (`--disk FILE[,ro][,snapshot][,transport=pci|mmio]`).
    Disk(DiskConfig),
    /// The Q35 chipset's functions (`--machine q35`). The machine type
    /// lives in this list rather than in a field of its own so that the
    /// configurations of older snapshots keep decoding.
    Q35,
    /// QEMU's edu device (`--edu`).
    Edu,
    /// An Intel IOMMU (VT-d) in front of the PCI devices (`--iommu`,
    /// QEMU's `-device intel-iommu`); Q35 only.
    Iommu(IommuConfig),
    /// virtio-fs (`--share DIR[,tag=T][,ro][,transport=pci|mmio]`).
    Share(ShareConfig),
    /// virtio-console with named ports (`--vport`).
    Console(ConsoleConfig),
}

/// The Intel IOMMU's options (`--iommu[=intremap=on|off][,eim=off]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuConfig {
    /// Interrupt remapping (xAPIC mode), QEMU's `intremap`; off by
    /// default as there.
    pub intremap: bool,
}

impl std::str::FromStr for IommuConfig {
    type Err = ConfigError;

    /// Empty, or comma-separated `intremap=on|off` and `eim=off`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Iommu(s.to_string(), why);
        let mut c = IommuConfig::default();
        for opt in s.split(',').filter(|o| !o.is_empty()) {
            match opt {
                "intremap=on" => c.intremap = true,
                "intremap=off" => c.intremap = false,
                "eim=off" => {}
                "eim=on" => {
                    return Err(bad(
                        "eim=on (x2APIC interrupt remapping) is not supported".into()
                    ))
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}': expected intremap=on|off or eim=off"
                    )))
                }
            }
        }
        Ok(c)
    }
}

impl DeviceConfig {
    pub fn transport(&self) -> Transport {
        match self {
            DeviceConfig::Rng(t) => *t,
            DeviceConfig::Disk(d) => d.transport,
            DeviceConfig::Share(s) => s.transport,
            DeviceConfig::Console(c) => c.transport,
            DeviceConfig::Q35 | DeviceConfig::Edu | DeviceConfig::Iommu(_) => Transport::Pci,
        }
    }
}

/// A raw image file as a virtio-blk disk. A snapshot stores it, and a
/// restore opens the file again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest may only read (`ro`).
    pub read_only: bool,
    /// Guest writes go to an overlay dropped at exit (`snapshot`).
    pub snapshot: bool,
    pub transport: Transport,
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// `FILE[,ro][,snapshot][,transport=pci|mmio]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Disk(s.to_string(), why);
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("no file named".into()));
        }
        let mut d = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            snapshot: false,
            transport: Transport::Pci,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => d.read_only = true,
                None if opt == "snapshot" => d.snapshot = true,
                Some(("transport", t)) => d.transport = t.parse().map_err(bad)?,
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}': expected ro, snapshot or transport=pci|mmio"
                    )))
                }
            }
        }
        Ok(d)
    }
}

/// Most ports of the console device.
pub const MAX_PORTS: usize = devices::virtio::console::MAX_PORTS;
/// Longest port name (the driver reads it into one control buffer).
pub const MAX_PORT_NAME: usize = 64;

/// The host side of a console port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortHost {
    /// The guest's output to kvmrun's stdout.
    Stdout,
    /// The guest's output to kvmrun's stderr.
    Stderr,
    /// kvmrun's stdin to the guest; the end of it closes the port.
    Stdin,
    /// The guest's output to a file, created (or truncated).
    File(PathBuf),
}

/// A named console port (`--vport NAME=HOST`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortConfig {
    pub name: String,
    pub host: PortHost,
}

impl std::str::FromStr for PortConfig {
    type Err = ConfigError;

    /// `NAME=stdout|stderr|stdin|file:PATH`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| ConfigError::Port(s.to_string(), why.to_string());
        let (name, host) = s
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=stdout|stderr|stdin|file:PATH"))?;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_PORT_NAME
            && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
        if !name_ok {
            return Err(bad(&format!(
                "the name must be 1 to {MAX_PORT_NAME} printable ASCII characters, no '/'"
            )));
        }
        let host = match host {
            "stdout" => PortHost::Stdout,
            "stderr" => PortHost::Stderr,
            "stdin" => PortHost::Stdin,
            _ => match host.strip_prefix("file:") {
                Some(p) if !p.is_empty() => PortHost::File(PathBuf::from(p)),
                _ => return Err(bad("expected stdout, stderr, stdin or file:PATH after '='")),
            },
        };
        Ok(PortConfig {
            name: name.to_string(),
            host,
        })
    }
}

/// The virtio-console device and its ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleConfig {
    pub ports: Vec<PortConfig>,
    pub transport: Transport,
}

impl ConsoleConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: String| Err(ConfigError::Devices(format!("virtio-console: {why}")));
        if self.ports.is_empty() || self.ports.len() > MAX_PORTS {
            return bad(format!("{} ports, need 1 to {MAX_PORTS}", self.ports.len()));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if self.ports[..i].iter().any(|q| q.name == p.name) {
                return bad(format!("port name '{}' given twice", p.name));
            }
        }
        if self
            .ports
            .iter()
            .filter(|p| p.host == PortHost::Stdin)
            .count()
            > 1
        {
            return bad("more than one port reads stdin".into());
        }
        Ok(())
    }

    /// Whether a port reads kvmrun's stdin (COM1 then does not).
    pub fn reads_stdin(&self) -> bool {
        self.ports.iter().any(|p| p.host == PortHost::Stdin)
    }
}

/// A host directory as a virtio-fs share. A snapshot stores it, and a
/// restore opens the directory again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareConfig {
    pub path: PathBuf,
    /// What the guest mounts it by (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The guest may only read (`ro`).
    pub read_only: bool,
    pub transport: Transport,
}

/// The tag of a share of `path` with none given: its last name, or
/// `root` for `/`.
fn default_tag(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
}

impl std::str::FromStr for ShareConfig {
    type Err = ConfigError;

    /// `DIR[,tag=T][,ro][,transport=pci|mmio]`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::Share(s.to_string(), why);
        let mut parts = s.split(',');
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(bad("no directory named".into()));
        }
        let mut c = ShareConfig {
            path: PathBuf::from(path),
            tag: default_tag(path),
            read_only: false,
            transport: Transport::Pci,
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => c.read_only = true,
                Some(("tag", t)) => c.tag = t.to_string(),
                Some(("transport", t)) => c.transport = t.parse().map_err(bad)?,
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}': expected tag=T, ro or transport=pci|mmio"
                    )))
                }
            }
        }
        c.check_tag().map_err(bad)?;
        Ok(c)
    }
}

impl ShareConfig {
    /// The tag fits the configuration space (virtio 1.2, "File System
    /// Device": 36 bytes) and is one word a mount command can name.
    pub fn check_tag(&self) -> Result<(), String> {
        let t = &self.tag;
        if t.is_empty() || t.len() > devices::virtio::fs::TAG_LEN {
            return Err(format!(
                "tag '{t}' must be 1 to {} bytes; name one with tag=",
                devices::virtio::fs::TAG_LEN
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("tag '{t}' has a space or a control character"));
        }
        Ok(())
    }
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
            irqchip: Irqchip::Kernel,
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

    pub fn machine(&self) -> Machine {
        if self.devices.contains(&DeviceConfig::Q35) {
            Machine::Q35
        } else {
            Machine::Pc
        }
    }

    /// The Intel IOMMU's options, if the machine has one.
    pub fn iommu(&self) -> Option<IommuConfig> {
        self.devices.iter().find_map(|d| match d {
            DeviceConfig::Iommu(c) => Some(*c),
            _ => None,
        })
    }

    /// Whether the machine has PCI: the host bridge comes with the first
    /// PCI device (with the Q35 chipset, always).
    pub fn has_pci(&self) -> bool {
        self.devices.iter().any(|d| d.transport() == Transport::Pci)
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
            if !timeout_ok(t) {
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
        let count = |f: fn(&DeviceConfig) -> bool| self.devices.iter().filter(|d| f(d)).count();
        for (n, max, what) in [
            (
                count(|d| matches!(d, DeviceConfig::Rng(_))),
                MAX_RNGS,
                "virtio-rng devices",
            ),
            (
                count(|d| matches!(d, DeviceConfig::Disk(_))),
                MAX_DISKS,
                "disks",
            ),
            (
                count(|d| matches!(d, DeviceConfig::Share(_))),
                MAX_SHARES,
                "shared directories",
            ),
            (count(|d| *d == DeviceConfig::Edu), MAX_EDUS, "edu devices"),
            (count(|d| *d == DeviceConfig::Q35), 1, "Q35 chipsets"),
            (
                count(|d| matches!(d, DeviceConfig::Console(_))),
                1,
                "virtio-console devices",
            ),
            (count(|d| matches!(d, DeviceConfig::Iommu(_))), 1, "IOMMUs"),
        ] {
            if n > max {
                return Err(ConfigError::Devices(format!("{n} {what}, at most {max}")));
            }
        }
        if let Some(c) = self.console() {
            c.validate()?;
        }
        if self.iommu().is_some() && self.machine() != Machine::Q35 {
            return Err(ConfigError::Devices(
                "--iommu (the Intel IOMMU) needs --machine q35".into(),
            ));
        }
        // The DMAR table puts every PCI device behind the unit, but
        // virtio's queues reach guest memory directly: a guest that maps
        // their DMA would see it ignored.
        let virtio_pci = self.devices.iter().any(|d| {
            matches!(
                d,
                DeviceConfig::Rng(_)
                    | DeviceConfig::Disk(_)
                    | DeviceConfig::Share(_)
                    | DeviceConfig::Console(_)
            ) && d.transport() == Transport::Pci
        });
        if self.iommu().is_some() && self.console().is_some() {
            return Err(ConfigError::Devices(
                "--iommu cannot be combined with --vport yet (virtio-console is on virtio-pci, \
                 whose DMA does not go through the IOMMU)"
                    .into(),
            ));
        }
        if self.iommu().is_some() && virtio_pci {
            return Err(ConfigError::Devices(
                "--iommu cannot be combined with virtio-pci devices yet (their DMA does not \
                 go through it); use transport=mmio"
                    .into(),
            ));
        }
        self.check_shares()
    }

    /// Every share's tag is valid and its own: the guest mounts by tag.
    fn check_shares(&self) -> Result<(), ConfigError> {
        let shares: Vec<&ShareConfig> = self
            .devices
            .iter()
            .filter_map(|d| match d {
                DeviceConfig::Share(s) => Some(s),
                _ => None,
            })
            .collect();
        for (i, s) in shares.iter().enumerate() {
            let bad = |why: String| ConfigError::Share(s.path.display().to_string(), why);
            s.check_tag().map_err(bad)?;
            if shares[..i].iter().any(|o| o.tag == s.tag) {
                return Err(bad(format!(
                    "tag '{}' is taken by another share; name another with tag=",
                    s.tag
                )));
            }
        }
        Ok(())
    }

    /// The virtio-console device, if there is one.
    pub fn console(&self) -> Option<&ConsoleConfig> {
        self.devices.iter().find_map(|d| match d {
            DeviceConfig::Console(c) => Some(c),
            _ => None,
        })
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
    #[error("invalid serial output '{0}': expected stdio, stderr, none or file:PATH")]
    Serial(String),
    #[error(
        "invalid timeout '{0}': expected a positive number of seconds, at most {MAX_TIMEOUT_SECS}"
    )]
    Timeout(String),
    #[error("invalid --cpu '{0}': {1}")]
    Cpu(String, crate::cpu::SpecError),
    #[error(transparent)]
    Cap(#[from] CapError),
    #[error(transparent)]
    Msr(#[from] MsrError),
    #[error("--msr-filter: {0} ranges, KVM takes at most 16")]
    MsrFilterRanges(usize),
    #[error("invalid machine '{0}': expected pc or q35")]
    Machine(String),
    #[error("invalid --irqchip '{0}': expected kernel or split")]
    Irqchip(String),
    #[error("invalid devices: {0}")]
    Devices(String),
    #[error("invalid --disk '{0}': {1}")]
    Disk(String, String),
    #[error("invalid --vport '{0}': {1}")]
    Port(String, String),
    #[error("invalid --iommu '{0}': {1}")]
    Iommu(String, String),
    #[error("invalid --share '{0}': {1}")]
    Share(String, String),
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

/// Longest timeout accepted, in seconds (about 136 years): every timer
/// and deadline built from a timeout must be able to hold it.
pub const MAX_TIMEOUT_SECS: f64 = u32::MAX as f64;

/// Whether `t` seconds is a timeout kvmrun can keep: positive, finite
/// and at most `MAX_TIMEOUT_SECS`.
pub fn timeout_ok(t: f64) -> bool {
    t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_SECS
}

/// Parse a `--timeout` value in seconds (fractions allowed).
pub fn parse_timeout(s: &str) -> Result<f64, ConfigError> {
    let t: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| ConfigError::Timeout(s.to_string()))?;
    if timeout_ok(t) {
        Ok(t)
    } else {
        Err(ConfigError::Timeout(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse() {
        let d: DiskConfig = "a.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a.img"));
        assert!(!d.read_only && !d.snapshot);
        assert_eq!(d.transport, Transport::Pci);
        let d: DiskConfig = "/x/b.raw,ro,snapshot,transport=mmio".parse().unwrap();
        assert!(d.read_only && d.snapshot);
        assert_eq!(d.transport, Transport::Mmio);
        let e = |s: &str| s.parse::<DiskConfig>().unwrap_err().to_string();
        assert!(e("a.img,rw").contains("unknown option 'rw'"));
        assert!(e("a.img,transport=usb").contains("unknown virtio transport 'usb'"));
        assert!(e(",ro").contains("no file named"));
    }

    #[test]
    fn port_options_parse() {
        let p: PortConfig = "kvmrun.stdout=stdout".parse().unwrap();
        assert_eq!(
            (p.name.as_str(), p.host),
            ("kvmrun.stdout", PortHost::Stdout)
        );
        let p: PortConfig = "log=file:/tmp/x=y".parse().unwrap();
        assert_eq!(p.host, PortHost::File(PathBuf::from("/tmp/x=y")));
        let e = |s: &str| s.parse::<PortConfig>().unwrap_err().to_string();
        assert!(e("noequals").contains("expected NAME="));
        assert!(e("=stdout").contains("the name must be"));
        assert!(e("a b=stdout").contains("the name must be"));
        assert!(e("a=tty").contains("expected stdout, stderr"));
        assert!(e("a=file:").contains("expected stdout, stderr"));
    }

    #[test]
    fn console_ports_are_checked() {
        let port = |n: &str, host| PortConfig {
            name: n.into(),
            host,
        };
        let mut cfg = VmConfig::new("x".into());
        let console = |ports| {
            DeviceConfig::Console(ConsoleConfig {
                ports,
                transport: Transport::Pci,
            })
        };
        cfg.devices = vec![console(vec![
            port("a", PortHost::Stdout),
            port("a", PortHost::Stderr),
        ])];
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("'a' given twice"));
        cfg.devices = vec![console(vec![
            port("a", PortHost::Stdin),
            port("b", PortHost::Stdin),
        ])];
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than one"));
        cfg.devices = vec![console(vec![])];
        assert!(cfg.validate().unwrap_err().to_string().contains("0 ports"));
        cfg.devices = vec![console(vec![port("a", PortHost::Stdin)])];
        cfg.validate().unwrap();
        assert!(cfg.console().unwrap().reads_stdin());
    }

    #[test]
    fn share_options_parse() {
        let s: ShareConfig = "/srv/data".parse().unwrap();
        assert_eq!((s.tag.as_str(), s.read_only), ("data", false));
        assert_eq!("/".parse::<ShareConfig>().unwrap().tag, "root");
        let s: ShareConfig = "d,tag=t1,ro,transport=mmio".parse().unwrap();
        assert_eq!((s.tag.as_str(), s.read_only), ("t1", true));
        assert_eq!(s.transport, Transport::Mmio);
        let e = |s: &str| s.parse::<ShareConfig>().unwrap_err().to_string();
        assert!(e("d,rw").contains("unknown option 'rw'"));
        assert!(e(",ro").contains("no directory named"));
        assert!(e("d,tag=").contains("1 to 36 bytes"));
        assert!(e(&format!("d,tag={}", "x".repeat(37))).contains("1 to 36 bytes"));
        assert!(e("d,tag=a b").contains("a space"));
        let mut c = VmConfig::new("x".into());
        let a: ShareConfig = "/a/x".parse().unwrap();
        c.devices = vec![DeviceConfig::Share(a.clone()), DeviceConfig::Share(a)];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("tag 'x' is taken"), "{e}");
    }

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

    /// Found by the cli_values fuzz target: `--timeout 1e300` parsed,
    /// and turning it into a timer's Duration panicked.
    #[test]
    fn timeouts_fit_a_duration() {
        for good in ["0.001", "1", "2.5s", "4294967295"] {
            let t = parse_timeout(good).unwrap();
            let _ = std::time::Duration::from_secs_f64(t);
        }
        for bad in ["0", "-1", "nan", "inf", "1e300", "4294967296", "x"] {
            let e = parse_timeout(bad).unwrap_err().to_string();
            assert!(e.contains("at most 4294967295"), "{bad}: {e}");
        }
        let mut c = VmConfig::new("x".into());
        c.timeout_secs = Some(1e300);
        assert!(matches!(c.validate(), Err(ConfigError::Timeout(_))));
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
        c.devices = vec![DeviceConfig::Edu; MAX_EDUS];
        assert!(c.validate().is_ok());
        assert!(c.has_pci());
        c.devices.push(DeviceConfig::Edu);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("5 edu devices, at most 4"), "{e}");
        // Disks and edu devices are counted apart.
        c.devices = vec![DeviceConfig::Edu; MAX_EDUS];
        c.devices.push(DeviceConfig::Rng(Transport::Mmio));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_iommu_needs_q35_and_parses_qemus_options() {
        let mut c = VmConfig::new("x".into());
        let iommu = DeviceConfig::Iommu(IommuConfig::default());
        c.devices.push(iommu.clone());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--iommu (the Intel IOMMU) needs --machine q35"),
            "{e}"
        );
        c.devices.push(DeviceConfig::Q35);
        c.validate().unwrap();
        assert_eq!(c.iommu(), Some(IommuConfig::default()));
        c.devices.push(DeviceConfig::Rng(Transport::Mmio));
        c.validate().unwrap();
        c.devices.push(DeviceConfig::Rng(Transport::Pci));
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--iommu cannot be combined with virtio-pci"),
            "{e}"
        );
        c.devices.pop();
        c.devices.push(iommu);
        assert!(c.validate().unwrap_err().to_string().contains("2 IOMMUs"));
        let p = |s: &str| s.parse::<IommuConfig>();
        assert!(!p("").unwrap().intremap);
        assert!(p("intremap=on,eim=off").unwrap().intremap);
        assert!(!p("intremap=on,intremap=off").unwrap().intremap);
        let e = p("intremap=on,eim=on").unwrap_err().to_string();
        assert!(
            e.contains("eim=on (x2APIC interrupt remapping) is not supported"),
            "{e}"
        );
        let e = p("caching-mode=on").unwrap_err().to_string();
        assert!(e.contains("unknown option 'caching-mode=on'"), "{e}");
    }

    #[test]
    fn q35_is_a_pci_machine_once() {
        let mut c = VmConfig::new("x".into());
        assert_eq!(c.machine(), Machine::Pc);
        c.devices.push(DeviceConfig::Q35);
        assert_eq!(c.machine(), Machine::Q35);
        assert!(c.has_pci());
        assert!(c.validate().is_ok());
        c.devices.push(DeviceConfig::Q35);
        assert!(matches!(c.validate(), Err(ConfigError::Devices(_))));
        assert_eq!("q35".parse::<Machine>().unwrap(), Machine::Q35);
        assert_eq!("pc".parse::<Machine>().unwrap(), Machine::Pc);
        let e = "q35,kernel-irqchip=split".parse::<Machine>().unwrap_err();
        assert!(e.to_string().contains("expected pc or q35"), "{e}");
    }

    #[test]
    fn irqchip_parses_and_split_keeps_the_pit() {
        assert_eq!("kernel".parse::<Irqchip>().unwrap(), Irqchip::Kernel);
        assert_eq!("split".parse::<Irqchip>().unwrap(), Irqchip::Split);
        let e = "off".parse::<Irqchip>().unwrap_err().to_string();
        assert!(e.contains("expected kernel or split"), "{e}");
        let mut c = VmConfig::new("x".into());
        assert_eq!(c.irqchip, Irqchip::Kernel);
        c.irqchip = Irqchip::Split;
        assert!(c.validate().is_ok());
        c.pit = false;
        assert!(c.validate().is_ok());
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
