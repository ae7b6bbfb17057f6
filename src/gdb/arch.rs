//! The register file gdb sees: one `CpuState` (general, segment, control,
//! x87 and SSE registers) laid out as an i386:x86-64 or an i386 target
//! description, which `Layout` picks. Values follow the vCPU's mode as
//! QEMU's stub has them: in the 64-bit layout a 32-bit or real-mode vCPU's
//! registers are zero-extended; in the 32-bit layout a long-mode vCPU's
//! are truncated (and r8-r15, xmm8-15 are not shown).

use gdbstub::arch::{Arch, RegId, Registers};

/// The architectural state gdb reads and writes, independent of KVM's
/// structures (`vcpu::debug` converts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuState {
    /// rax, rbx, rcx, rdx, rsi, rdi, rbp, rsp, r8-r15: gdb's amd64 order.
    pub gpr: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// Selectors of cs, ss, ds, es, fs, gs.
    pub seg: [u16; 6],
    /// Base of cs (for real-mode linear addresses in reports).
    pub cs_base: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    /// st0-st7, 80 bits each.
    pub st: [[u8; 10]; 8],
    /// fctrl, fstat, ftag (full tag word), fiseg, fioff, foseg, fooff, fop.
    pub fpu_ctl: [u32; 8],
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// Indices into `CpuState::gpr`.
pub const RSP: usize = 7;

/// Which target description gdb gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// i386:x86-64, as qemu-system-x86_64 presents every vCPU.
    #[default]
    X86_64,
    /// i386, for 32-bit code and its symbols (kvm-unit-tests i386 builds).
    I386,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::X86_64 => "i386:x86-64",
            Layout::I386 => "i386",
        }
    }

    fn width(self) -> usize {
        match self {
            Layout::X86_64 => 8,
            Layout::I386 => 4,
        }
    }

    fn gprs(self) -> usize {
        match self {
            Layout::X86_64 => 16,
            Layout::I386 => 8,
        }
    }

    /// Size of a 'g' packet's data in this layout.
    pub fn g_len(self) -> usize {
        let w = self.width();
        let n = self.gprs();
        n * w + w + 4 + 6 * 4 + 2 * w + 6 * w + 8 * 10 + 8 * 4 + n * 16 + 4
    }

    /// The target description (`target.xml`) for this layout.
    pub fn xml(self) -> String {
        let (w, gprs, pc): (u32, &[&str], &str) = match self {
            Layout::X86_64 => (
                64,
                &[
                    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                    "r11", "r12", "r13", "r14", "r15",
                ],
                "rip",
            ),
            Layout::I386 => (
                32,
                &["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"],
                "eip",
            ),
        };
        let int = if w == 64 { "int64" } else { "int32" };
        let mut x = String::from(
            "<?xml version=\"1.0\"?><!DOCTYPE target SYSTEM \"gdb-target.dtd\"><target version=\"1.0\">",
        );
        x += &format!("<architecture>{}</architecture>", self.name());
        x += "<feature name=\"org.gnu.gdb.i386.core\">";
        x += "<flags id=\"i386_eflags\" size=\"4\">";
        for (bit, name) in [
            (0, "CF"),
            (2, "PF"),
            (4, "AF"),
            (6, "ZF"),
            (7, "SF"),
            (8, "TF"),
            (9, "IF"),
            (10, "DF"),
            (11, "OF"),
            (14, "NT"),
            (16, "RF"),
            (17, "VM"),
            (18, "AC"),
            (19, "VIF"),
            (20, "VIP"),
            (21, "ID"),
        ] {
            x += &format!("<field name=\"{name}\" start=\"{bit}\" end=\"{bit}\"/>");
        }
        x += "</flags>";
        for (i, r) in gprs.iter().enumerate() {
            let ty = match (i, self) {
                (RSP, Layout::X86_64) | (4, Layout::I386) => "data_ptr",
                (6, Layout::X86_64) | (5, Layout::I386) => "data_ptr",
                _ => int,
            };
            x += &format!("<reg name=\"{r}\" bitsize=\"{w}\" type=\"{ty}\"/>");
        }
        x += &format!("<reg name=\"{pc}\" bitsize=\"{w}\" type=\"code_ptr\"/>");
        x += "<reg name=\"eflags\" bitsize=\"32\" type=\"i386_eflags\"/>";
        for s in ["cs", "ss", "ds", "es", "fs", "gs"] {
            x += &format!("<reg name=\"{s}\" bitsize=\"32\" type=\"int32\"/>");
        }
        for r in [
            "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
        ] {
            x += &format!("<reg name=\"{r}\" bitsize=\"{w}\" type=\"{int}\" group=\"system\"/>");
        }
        for i in 0..8 {
            x += &format!("<reg name=\"st{i}\" bitsize=\"80\" type=\"i387_ext\"/>");
        }
        for r in [
            "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop",
        ] {
            x += &format!("<reg name=\"{r}\" bitsize=\"32\" type=\"int\" group=\"float\"/>");
        }
        x += "</feature><feature name=\"org.gnu.gdb.i386.sse\">";
        for i in 0..gprs.len() {
            x += &format!("<reg name=\"xmm{i}\" bitsize=\"128\" type=\"uint128\"/>");
        }
        x += "<reg name=\"mxcsr\" bitsize=\"32\" type=\"int\" group=\"vector\"/>";
        x += "</feature></target>";
        x
    }

    /// The state as a 'g' packet's bytes.
    pub fn serialize(self, s: &CpuState) -> Vec<u8> {
        let w = self.width();
        let mut out = Vec::with_capacity(self.g_len());
        let word = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes()[..w]);
        for i in 0..self.gprs() {
            word(&mut out, s.gpr[self.gpr_index(i)]);
        }
        word(&mut out, s.rip);
        out.extend_from_slice(&(s.rflags as u32).to_le_bytes());
        for sel in s.seg {
            out.extend_from_slice(&u32::from(sel).to_le_bytes());
        }
        for v in [
            s.fs_base, s.gs_base, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
        ] {
            word(&mut out, v);
        }
        for st in &s.st {
            out.extend_from_slice(st);
        }
        for v in s.fpu_ctl {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for x in &s.xmm[..self.gprs()] {
            out.extend_from_slice(x);
        }
        out.extend_from_slice(&s.mxcsr.to_le_bytes());
        out
    }

    /// A 'G' packet's bytes over `s`: what the layout cannot express (the
    /// upper halves in the 32-bit layout) keeps its value.
    pub fn deserialize(self, bytes: &[u8], s: &mut CpuState) -> Result<(), BadLength> {
        if bytes.len() != self.g_len() {
            return Err(BadLength(bytes.len()));
        }
        let w = self.width();
        let mut at = 0usize;
        let mut take = |n: usize| {
            let b = &bytes[at..at + n];
            at += n;
            b
        };
        let word = |b: &[u8], old: u64| {
            let mut v = [0u8; 8];
            v[..b.len()].copy_from_slice(b);
            let new = u64::from_le_bytes(v);
            if b.len() == 8 {
                new
            } else {
                (old & !0xffff_ffff) | new
            }
        };
        let u32_of = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap_or_default());
        for i in 0..self.gprs() {
            let r = self.gpr_index(i);
            s.gpr[r] = word(take(w), s.gpr[r]);
        }
        s.rip = word(take(w), s.rip);
        s.rflags = (s.rflags & !0xffff_ffff) | u64::from(u32_of(take(4)));
        for sel in s.seg.iter_mut() {
            *sel = u32_of(take(4)) as u16;
        }
        for v in [
            &mut s.fs_base,
            &mut s.gs_base,
            &mut s.cr0,
            &mut s.cr2,
            &mut s.cr3,
            &mut s.cr4,
            &mut s.cr8,
            &mut s.efer,
        ] {
            *v = word(take(w), *v);
        }
        for st in s.st.iter_mut() {
            st.copy_from_slice(take(10));
        }
        for v in s.fpu_ctl.iter_mut() {
            *v = u32_of(take(4));
        }
        for x in s.xmm[..self.gprs()].iter_mut() {
            x.copy_from_slice(take(16));
        }
        s.mxcsr = u32_of(take(4));
        Ok(())
    }

    /// `CpuState::gpr` index of the layout's `i`th general register.
    fn gpr_index(self, i: usize) -> usize {
        match self {
            Layout::X86_64 => i,
            // eax, ecx, edx, ebx, esp, ebp, esi, edi.
            Layout::I386 => [0, 2, 3, 1, 7, 6, 4, 5][i],
        }
    }
}

/// A 'G' packet of the wrong size for the layout.
#[derive(Debug, thiserror::Error)]
#[error("a register packet of {0} bytes fits no layout")]
pub struct BadLength(pub usize);

/// gdbstub's register file: the state and the layout it is shown in.
/// `Default` is the 64-bit layout; a 'G' packet's length says which one
/// gdb used.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Regs {
    pub layout: Layout,
    pub state: CpuState,
    /// Bytes of a 'G' packet, applied over the current state by the target
    /// (which knows the upper halves the 32-bit layout leaves out).
    pub written: Option<Vec<u8>>,
}

impl Registers for Regs {
    type ProgramCounter = u64;

    fn pc(&self) -> u64 {
        self.state.rip
    }

    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        for b in self.layout.serialize(&self.state) {
            write_byte(Some(b));
        }
    }

    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.layout = if bytes.len() == Layout::I386.g_len() {
            Layout::I386
        } else if bytes.len() == Layout::X86_64.g_len() {
            Layout::X86_64
        } else {
            return Err(());
        };
        self.written = Some(bytes.to_vec());
        Ok(())
    }
}

/// Single registers ('p'/'P') are not offered: gdb reads and writes the
/// whole file ('g'/'G').
#[derive(Debug)]
pub enum NoRegId {}

impl RegId for NoRegId {
    fn from_raw_id(_id: usize) -> Option<(Self, Option<std::num::NonZeroUsize>)> {
        None
    }
}

/// x86 in either layout; the description comes from the target
/// (`TargetDescriptionXmlOverride`), so it can follow `Layout`.
pub enum X86 {}

impl Arch for X86 {
    type Usize = u64;
    type Registers = Regs;
    type BreakpointKind = usize;
    type RegId = NoRegId;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuState {
        let mut s = CpuState::default();
        for (i, r) in s.gpr.iter_mut().enumerate() {
            *r = 0x0101_0101_0000_0000u64.wrapping_mul(i as u64 + 1) + i as u64;
        }
        s.rip = 0xffff_8000_0010_0000;
        s.rflags = 0x246;
        s.seg = [8, 0x10, 0x10, 0x10, 0, 0];
        s.cr0 = 0x8000_0011;
        s.cr3 = 0x1000;
        s.efer = 0x500;
        s.st[3] = [3; 10];
        s.fpu_ctl = [0x37f, 0, 0xffff, 0, 0, 0, 0, 0];
        s.xmm[15] = [0xab; 16];
        s.mxcsr = 0x1f80;
        s
    }

    #[test]
    fn the_64_bit_layout_round_trips() {
        let s = sample();
        let g = Layout::X86_64.serialize(&s);
        assert_eq!(g.len(), Layout::X86_64.g_len());
        assert_eq!(g.len(), 600);
        assert_eq!(&g[0..8], &s.gpr[0].to_le_bytes());
        assert_eq!(&g[128..136], &s.rip.to_le_bytes());
        let mut back = CpuState::default();
        Layout::X86_64.deserialize(&g, &mut back).unwrap();
        // cs_base is not part of the file.
        assert_eq!(back, s);
    }

    #[test]
    fn the_32_bit_layout_keeps_upper_halves_and_uses_i386_order() {
        let s = sample();
        let g = Layout::I386.serialize(&s);
        assert_eq!(g.len(), 340);
        // ecx is the second register, from rcx (index 2).
        assert_eq!(&g[4..8], &(s.gpr[2] as u32).to_le_bytes());
        // esp is the fifth, from rsp.
        assert_eq!(&g[16..20], &(s.gpr[RSP] as u32).to_le_bytes());
        let mut back = s.clone();
        let mut changed = g.clone();
        changed[0] = 0x99;
        Layout::I386.deserialize(&changed, &mut back).unwrap();
        assert_eq!(back.gpr[0], (s.gpr[0] & !0xff) | 0x99);
        assert_eq!(back.gpr[8], s.gpr[8], "r8 is not in the 32-bit file");
        assert_eq!(back.xmm[15], s.xmm[15]);
    }

    #[test]
    fn a_g_packet_of_another_length_is_refused() {
        let mut r = Regs::default();
        assert!(r.gdb_deserialize(&[0; 17]).is_err());
        assert!(r.gdb_deserialize(&[0; 340]).is_ok());
        assert_eq!(r.layout, Layout::I386);
        let mut s = CpuState::default();
        assert!(Layout::X86_64.deserialize(&[0; 340], &mut s).is_err());
    }

    #[test]
    fn the_descriptions_name_every_register_once() {
        for (l, n) in [(Layout::X86_64, 16), (Layout::I386, 8)] {
            let x = l.xml();
            assert!(x.contains(&format!("<architecture>{}</architecture>", l.name())));
            assert_eq!(
                x.matches("<reg ").count(),
                n + 1 + 1 + 6 + 8 + 8 + 8 + n + 1
            );
            assert!(x.contains("name=\"cr3\""));
        }
    }
}
