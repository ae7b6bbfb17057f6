//! Diagnostics for a vCPU that KVM could not run (KVM_EXIT_INTERNAL_ERROR):
//! where it stopped, in which CPU mode, the instruction there decoded with
//! iced-x86, and which KVM the host has, with a hint on what that means.

use std::fmt::Write as _;
use std::path::Path;

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, MemorySizeOptions,
};

/// KVM_INTERNAL_ERROR_* suberrors (api.rst, "KVM_EXIT_INTERNAL_ERROR").
pub const SUBERROR_EMULATION: u32 = 1;

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// The mode the vCPU executes in, as far as instruction decoding cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Virtual8086,
    Protected16,
    Protected32,
    Compat16,
    Compat32,
    Long64,
}

impl CpuMode {
    /// The mode from CR0.PE, EFER.LMA, RFLAGS.VM and the CS descriptor's
    /// L and D bits.
    pub fn new(cr0: u64, efer: u64, rflags: u64, cs_l: bool, cs_db: bool) -> CpuMode {
        const CR0_PE: u64 = 1;
        const EFER_LMA: u64 = 1 << 10;
        const RFLAGS_VM: u64 = 1 << 17;
        if cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if efer & EFER_LMA != 0 {
            match (cs_l, cs_db) {
                (true, _) => CpuMode::Long64,
                (false, true) => CpuMode::Compat32,
                (false, false) => CpuMode::Compat16,
            }
        } else if rflags & RFLAGS_VM != 0 {
            CpuMode::Virtual8086
        } else if cs_db {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }

    /// Default operand width for the decoder.
    pub fn bitness(self) -> u32 {
        match self {
            CpuMode::Real | CpuMode::Virtual8086 | CpuMode::Protected16 | CpuMode::Compat16 => 16,
            CpuMode::Protected32 | CpuMode::Compat32 => 32,
            CpuMode::Long64 => 64,
        }
    }
}

impl std::fmt::Display for CpuMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuMode::Real => "real mode",
            CpuMode::Virtual8086 => "virtual-8086 mode",
            CpuMode::Protected16 => "16-bit protected mode",
            CpuMode::Protected32 => "32-bit protected mode",
            CpuMode::Compat16 => "16-bit compatibility mode",
            CpuMode::Compat32 => "32-bit compatibility mode",
            CpuMode::Long64 => "64-bit mode",
        })
    }
}

/// Decode the first instruction of `bytes` at `rip`: its text in Intel
/// syntax and its length, or `None` when the bytes do not form a complete,
/// valid instruction.
pub fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<(String, usize)> {
    let mut d = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    if !d.can_decode() {
        return None;
    }
    d.decode_out(&mut insn);
    if insn.is_invalid() {
        return None;
    }
    let mut text = String::new();
    let mut f = IntelFormatter::new();
    f.options_mut().set_space_after_operand_separator(true);
    f.options_mut()
        .set_memory_size_options(MemorySizeOptions::Always);
    f.format(&insn, &mut text);
    Some((text, insn.len()))
}

/// The host's KVM module, from the modules loaded under `sys_module`
/// (normally /sys/module).
pub fn kvm_module_in(sys_module: &Path) -> Option<&'static str> {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| sys_module.join(m).exists())
}

/// The host's KVM module, looked up once: a vCPU thread's crash report
/// asks for it where its seccomp filter allows no file system access.
pub fn kvm_module() -> Option<&'static str> {
    static MODULE: std::sync::OnceLock<Option<&'static str>> = std::sync::OnceLock::new();
    *MODULE.get_or_init(|| kvm_module_in(Path::new("/sys/module")))
}

/// One line on what an internal error means on a host with `module`.
pub fn hint(module: Option<&str>) -> &'static str {
    match module {
        Some("kvm_pvm") => {
            "KVM-PVM runs guest ring-0 code through KVM's instruction emulator, which cannot \
             execute this instruction; run this guest on a VT-x or AMD-V host (kvm_intel, kvm_amd)"
        }
        Some("kvm_intel") | Some("kvm_amd") => {
            "KVM had to emulate this instruction (MMIO, a real-mode or big-real-mode stretch, \
             or code outside RAM) and could not; see KVM_EXIT_INTERNAL_ERROR in the KVM API document"
        }
        _ => "unknown KVM module: see KVM_EXIT_INTERNAL_ERROR in the KVM API document",
    }
}

/// Name of a KVM_INTERNAL_ERROR_* suberror.
pub fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event failure",
        4 => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

/// Where the instruction bytes of a report came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InsnBytes {
    /// KVM's emulation-failure data (flag INSTRUCTION_BYTES).
    FromKvm(Vec<u8>),
    /// Read from guest memory at CS:RIP, through the page tables.
    FromMemory(Vec<u8>),
    /// Neither could give them: why.
    Unavailable(String),
}

/// Everything a report on an internal error says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalErrorReport {
    pub vcpu: u32,
    pub suberror: u32,
    pub data: Vec<u64>,
    pub rip: u64,
    pub cs: u16,
    pub mode: CpuMode,
    pub cpl: u8,
    pub bytes: InsnBytes,
    pub module: Option<&'static str>,
}

impl InternalErrorReport {
    /// The report, one fact a line.
    pub fn format(&self) -> String {
        let mut s = String::new();
        let data: Vec<String> = self.data.iter().map(|d| format!("{d:#x}")).collect();
        let _ = writeln!(
            s,
            "KVM internal error, suberror {} ({}), data [{}]",
            self.suberror,
            suberror_name(self.suberror),
            data.join(", ")
        );
        let _ = writeln!(
            s,
            "  vCPU {} at rip {:#x} (cs {:#06x}), {}, CPL {}",
            self.vcpu, self.rip, self.cs, self.mode, self.cpl
        );
        let (bytes, from) = match &self.bytes {
            InsnBytes::FromKvm(b) => (b, "from KVM"),
            InsnBytes::FromMemory(b) => (b, "from guest memory"),
            InsnBytes::Unavailable(why) => {
                let _ = writeln!(s, "  instruction: bytes unavailable: {why}");
                return self.finish(s);
            }
        };
        match decode(bytes, self.mode.bitness(), self.rip) {
            Some((text, len)) => {
                let _ = writeln!(
                    s,
                    "  instruction: {text}   [{}] ({from})",
                    hex(&bytes[..len])
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  instruction: does not decode   [{}] ({from})",
                    hex(bytes)
                );
            }
        }
        self.finish(s)
    }

    fn finish(&self, mut s: String) -> String {
        let _ = write!(
            s,
            "  host KVM: {}: {}",
            self.module.unwrap_or("unknown"),
            hint(self.module)
        );
        s
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The instruction bytes in KVM's emulation-failure data, when it says it
/// gave them: `data[0]` holds the flags, then one byte of length and up to
/// 15 bytes of instruction.
pub fn insn_from_kvm(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    const FLAG_INSTRUCTION_BYTES: u64 =
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES as u64;
    if suberror != SUBERROR_EMULATION || data.len() < 3 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let len = (raw[0] as usize).min(MAX_INSN_LEN);
    (len > 0).then(|| raw[1..1 + len].to_vec())
}

/// Translate a linear address through 4-level paging rooted at `cr3`,
/// reading page-table entries with `read`. For hosts whose KVM refuses
/// KVM_TRANSLATE.
pub fn walk_4level(cr3: u64, linear: u64, read: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const PRESENT: u64 = 1;
    const LARGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for (level, shift) in [(4, 39), (3, 30), (2, 21), (1, 12)] {
        let idx = (linear >> shift) & 0x1ff;
        let e = read(table + idx * 8)?;
        if e & PRESENT == 0 {
            return None;
        }
        if level != 1 && level != 4 && e & LARGE != 0 {
            let size = 1u64 << shift;
            return Some((e & ADDR & !(size - 1)) | (linear & (size - 1)));
        }
        table = e & ADDR;
    }
    Some(table | (linear & 0xfff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_cr0_efer_and_cs() {
        assert_eq!(CpuMode::new(0x10, 0, 2, false, false), CpuMode::Real);
        assert_eq!(CpuMode::new(0x11, 0, 2, false, true), CpuMode::Protected32);
        assert_eq!(
            CpuMode::new(0x11, 0, 2 | 1 << 17, false, false),
            CpuMode::Virtual8086
        );
        assert_eq!(
            CpuMode::new(0x8000_0011, 0x500, 2, true, false),
            CpuMode::Long64
        );
        assert_eq!(
            CpuMode::new(0x8000_0011, 0x500, 2, false, true),
            CpuMode::Compat32
        );
        assert_eq!(CpuMode::Long64.bitness(), 64);
        assert_eq!(CpuMode::Real.bitness(), 16);
    }

    #[test]
    fn decodes_what_kvm_pvm_cannot_run() {
        let cases: [(&[u8], u32, &str); 5] = [
            (
                &[0x48, 0x0f, 0xc7, 0x0e],
                64,
                "cmpxchg16b xmmword ptr [rsi]",
            ),
            (&[0xcc], 64, "int3"),
            (&[0xf3, 0x0f, 0xb8, 0xc3], 32, "popcnt eax, ebx"),
            (&[0x0f, 0x01, 0xca], 64, "clac"),
            (&[0x0f, 0xae, 0x55, 0xfc], 64, "ldmxcsr dword ptr [rbp-4]"),
        ];
        for (bytes, bits, want) in cases {
            let (text, len) = decode(bytes, bits, 0x1000).unwrap();
            assert_eq!(text, want);
            assert_eq!(len, bytes.len());
        }
        assert!(decode(&[0x0f], 64, 0).is_none());
        assert!(decode(&[], 64, 0).is_none());
    }

    #[test]
    fn reads_instruction_bytes_from_kvm_data() {
        // Captured layout: flags, then length 4 and the bytes of cmpxchg16b.
        let mut raw = [0u8; 16];
        raw[0] = 4;
        raw[1..5].copy_from_slice(&[0x48, 0x0f, 0xc7, 0x0e]);
        let data = [
            1,
            u64::from_le_bytes(raw[..8].try_into().unwrap()),
            u64::from_le_bytes(raw[8..].try_into().unwrap()),
            0x30,
        ];
        assert_eq!(insn_from_kvm(1, &data), Some(vec![0x48, 0x0f, 0xc7, 0x0e]));
        assert_eq!(insn_from_kvm(1, &[0, data[1], data[2]]), None);
        assert_eq!(insn_from_kvm(3, &data), None);
        assert_eq!(insn_from_kvm(1, &data[..2]), None);
    }

    #[test]
    fn report_names_mode_instruction_and_host() {
        let r = InternalErrorReport {
            vcpu: 1,
            suberror: 1,
            data: vec![1, 0x000e_c70f_4804, 0],
            rip: 0xffff_ffff_8100_0000,
            cs: 0x10,
            mode: CpuMode::Long64,
            cpl: 0,
            bytes: InsnBytes::FromKvm(vec![0x48, 0x0f, 0xc7, 0x0e]),
            module: Some("kvm_pvm"),
        };
        let t = r.format();
        assert!(
            t.starts_with("KVM internal error, suberror 1 (emulation failure)"),
            "{t}"
        );
        assert!(
            t.contains("vCPU 1 at rip 0xffffffff81000000 (cs 0x0010), 64-bit mode, CPL 0"),
            "{t}"
        );
        assert!(
            t.contains("instruction: cmpxchg16b xmmword ptr [rsi]   [48 0f c7 0e] (from KVM)"),
            "{t}"
        );
        assert!(
            t.contains("host KVM: kvm_pvm: KVM-PVM runs guest ring-0 code"),
            "{t}"
        );
        let r = InternalErrorReport {
            bytes: InsnBytes::Unavailable("rip 0xd0000000 is outside guest RAM".into()),
            module: None,
            ..r
        };
        let t = r.format();
        assert!(
            t.contains("bytes unavailable: rip 0xd0000000 is outside guest RAM"),
            "{t}"
        );
        assert!(t.contains("host KVM: unknown:"), "{t}");
    }

    #[test]
    fn module_comes_from_sys_module() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(kvm_module_in(d.path()), None);
        std::fs::create_dir(d.path().join("kvm_amd")).unwrap();
        assert_eq!(kvm_module_in(d.path()), Some("kvm_amd"));
        assert!(hint(Some("kvm_amd")).contains("emulate"));
    }

    #[test]
    fn walks_four_level_tables() {
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 with a 2 MiB page at 0x40_0000.
        let read = |a: u64| match a {
            0x1000 => Some(0x2003),
            0x2000 => Some(0x3003),
            0x3008 => Some(0x40_0083),
            _ => Some(0),
        };
        assert_eq!(walk_4level(0x1000, 0x20_1234, read), Some(0x40_1234));
        assert_eq!(walk_4level(0x1000, 0x40_0000, read), None);
    }
}
