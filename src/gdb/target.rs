//! gdb's view of the VM (gdbstub's `Target`): threads are vCPUs, memory is
//! read through the stopped vCPU's page tables (or as guest-physical
//! addresses after `monitor phys`), breakpoints live in the four debug
//! registers or as int3 bytes. Everything KVM does hides behind `Backend`,
//! so this logic runs in unit tests on a fake VM.

use gdbstub::common::{Signal, Tid};
use gdbstub::stub::MultiThreadStopReason;
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::target_description_xml_override::{
    TargetDescriptionXmlOverride, TargetDescriptionXmlOverrideOps,
};
use gdbstub::target::{Target, TargetError, TargetResult};

use super::arch::{CpuState, Layout, Regs, X86};
use super::paging::Paging;
use super::GdbError;

/// What a vCPU does when gdb resumes the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Step,
}

/// The guest-debug setting every vCPU gets on resume (KVM_SET_GUEST_DEBUG):
/// debug registers DR0-DR3 and DR7 for hardware breakpoints and
/// watchpoints, and the int3 addresses of software breakpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestDebug {
    pub dr: [u64; 4],
    pub dr7: u64,
    /// Linear addresses of the int3 bytes gdb asked for; a #BP elsewhere is
    /// the guest's own and goes back to it.
    pub sw: Vec<u64>,
}

impl GuestDebug {
    pub fn is_off(&self) -> bool {
        self.dr7 == 0 && self.sw.is_empty()
    }
}

/// A vCPU's KVM_EXIT_DEBUG, or the end of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Debug {
        id: u32,
        exception: u32,
        pc: u64,
        dr6: u64,
    },
    /// The VM ended with this exit status.
    Ended(i32),
}

/// The VM as the stub needs it. Register and resume calls apply to
/// stopped vCPUs (`stop_all()` stops them; `resume()` lets them go).
pub trait Backend {
    fn vcpus(&self) -> u32;
    fn read_state(&mut self, id: u32) -> Result<CpuState, GdbError>;
    fn write_state(&mut self, id: u32, state: &CpuState) -> Result<(), GdbError>;
    /// Guest-physical memory; false where there is no RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool;
    /// Stop every vCPU and wait until they are; Err once the VM has ended.
    fn stop_all(&mut self) -> Result<(), GdbError>;
    /// Let vCPUs go with `debug`: `actions[id]` None keeps vCPU id stopped.
    fn resume(&mut self, debug: &GuestDebug, actions: &[Option<Action>]) -> Result<(), GdbError>;
    /// The next event, if one is pending (the event fd says when).
    fn take_event(&mut self) -> Option<Event>;
    /// What this host's KVM cannot do for gdb.
    fn limits(&self) -> HostLimits;
    /// End the VM (gdb's `kill`).
    fn kill(&mut self);
    /// A gdb session opened or closed (snapshots are refused while open).
    fn set_attached(&mut self, attached: bool);
}

/// What a host's KVM cannot deliver, with the reason gdb's user reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// Software breakpoints (int3).
    pub sw_breakpoints: Option<&'static str>,
    /// Data breakpoints (hardware watchpoints).
    pub watchpoints: Option<&'static str>,
}

/// The x86 data breakpoint lengths (DR7 LENn): 1, 2, 4 and 8 bytes.
fn len_bits(len: u64) -> u64 {
    match len {
        1 => 0b00,
        2 => 0b01,
        8 => 0b10,
        _ => 0b11,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Exec(u64),
    /// Address and length of one aligned piece; `whole` is the address gdb
    /// asked for, reported when the piece fires.
    Watch {
        addr: u64,
        len: u64,
        kind: WatchKind,
        whole: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct SwBp {
    addr: u64,
    gpa: u64,
    orig: u8,
}

/// The number of debug registers for addresses (DR0-DR3).
const SLOTS: usize = 4;
const DR6_BS: u64 = 1 << 14;
const VECTOR_DB: u32 = 1;
const VECTOR_BP: u32 = 3;

pub struct GdbTarget<B: Backend> {
    pub backend: B,
    layout: Layout,
    slots: [Option<Slot>; SLOTS],
    sw: Vec<SwBp>,
    /// After `monitor phys`: gdb's addresses are guest-physical.
    physical: bool,
    /// Register state read since the vCPUs stopped.
    cache: Vec<Option<CpuState>>,
    actions: Vec<Option<Action>>,
    /// gdb's scheduler locking: vCPUs without an action stay stopped
    /// (without it they continue).
    locked: bool,
    /// The vCPU that stopped last; memory goes through its page tables.
    pub current: u32,
}

pub fn tid(id: u32) -> Tid {
    Tid::new(id as usize + 1).expect("id + 1 is not zero")
}

fn id_of(tid: Tid) -> u32 {
    (tid.get() - 1) as u32
}

impl<B: Backend> GdbTarget<B> {
    pub fn new(backend: B, layout: Layout) -> Self {
        let n = backend.vcpus() as usize;
        GdbTarget {
            backend,
            layout,
            slots: [None; SLOTS],
            sw: Vec::new(),
            physical: false,
            cache: vec![None; n],
            actions: vec![None; n],
            locked: false,
            current: 0,
        }
    }

    fn state(&mut self, id: u32) -> Result<CpuState, GdbError> {
        let slot = self
            .cache
            .get_mut(id as usize)
            .ok_or(GdbError::NoSuchVcpu(id))?;
        if let Some(s) = slot {
            return Ok(s.clone());
        }
        let s = self.backend.read_state(id)?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// DR0-DR3 and DR7 for the slots in use, and the int3 addresses.
    pub fn guest_debug(&self) -> GuestDebug {
        let mut d = GuestDebug {
            sw: self.sw.iter().map(|b| b.addr).collect(),
            ..Default::default()
        };
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(slot) = slot else { continue };
            // Gn enables slot n for every task; RW and LEN at 16 + 4n.
            let (addr, rw, len) = match *slot {
                Slot::Exec(a) => (a, 0b00, 0b00),
                Slot::Watch {
                    addr, len, kind, ..
                } => {
                    // x86 has no read-only data breakpoints: reads watch
                    // reads and writes, as gdb's own x86 code does.
                    let rw = if kind == WatchKind::Write { 0b01 } else { 0b11 };
                    (addr, rw, len_bits(len))
                }
            };
            d.dr[i] = addr;
            d.dr7 |= (1 << (2 * i + 1)) | (rw << (16 + 4 * i)) | (len << (18 + 4 * i));
        }
        if d.dr7 != 0 {
            // GE: exact data breakpoints, as the SDM recommends.
            d.dr7 |= 1 << 9;
        }
        d
    }

    /// What to tell gdb about a vCPU's debug exit.
    pub fn stop_reason(&mut self, id: u32, exception: u32, dr6: u64) -> MultiThreadStopReason<u64> {
        self.current = id;
        let t = tid(id);
        if exception == VECTOR_BP {
            return MultiThreadStopReason::SwBreak(t);
        }
        if exception == VECTOR_DB {
            for (i, slot) in self.slots.iter().enumerate() {
                if dr6 & (1 << i) == 0 {
                    continue;
                }
                match *slot {
                    Some(Slot::Exec(_)) if dr6 & DR6_BS == 0 => {
                        return MultiThreadStopReason::HwBreak(t)
                    }
                    Some(Slot::Watch { kind, whole, .. }) => {
                        return MultiThreadStopReason::Watch {
                            tid: t,
                            kind,
                            addr: whole,
                        }
                    }
                    _ => {}
                }
            }
        }
        MultiThreadStopReason::SignalWithThread {
            tid: t,
            signal: Signal::SIGTRAP,
        }
    }

    /// Forget the vCPUs' state before they run again.
    fn invalidate(&mut self) {
        self.cache.iter_mut().for_each(|c| *c = None);
    }

    /// Clear every breakpoint and let every vCPU run, as a detach leaves
    /// the guest.
    pub fn release(&mut self) -> Result<(), GdbError> {
        for bp in std::mem::take(&mut self.sw) {
            self.backend.write_phys(bp.gpa, &[bp.orig]);
        }
        self.slots = [None; SLOTS];
        self.invalidate();
        let all = vec![Some(Action::Continue); self.cache.len()];
        self.backend.set_attached(false);
        self.backend.resume(&GuestDebug::default(), &all)
    }

    /// The guest-physical address of gdb's address `addr` on the current
    /// vCPU.
    fn phys_of(&mut self, addr: u64) -> Result<Option<u64>, GdbError> {
        if self.physical {
            return Ok(Some(addr));
        }
        let s = self.state(self.current)?;
        let paging = Paging {
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        };
        let b = &self.backend;
        Ok(paging.translate(addr, |a, size| {
            let mut buf = [0u8; 8];
            b.read_phys(a, &mut buf[..size])
                .then(|| u64::from_le_bytes(buf))
        }))
    }

    /// Each page-bounded piece of `[addr, addr + len)` with its
    /// guest-physical address, up to the first unmapped one.
    fn pieces(&mut self, addr: u64, len: usize) -> Result<Vec<(usize, u64, usize)>, GdbError> {
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let at = addr.wrapping_add(done as u64);
            let n = (0x1000 - (at & 0xfff) as usize).min(len - done);
            match self.phys_of(at)? {
                Some(gpa) => out.push((done, gpa, n)),
                None => break,
            }
            done += n;
        }
        Ok(out)
    }

    fn read_mem(&mut self, addr: u64, data: &mut [u8]) -> Result<usize, GdbError> {
        let mut got = 0usize;
        for (off, gpa, n) in self.pieces(addr, data.len())? {
            if !self.backend.read_phys(gpa, &mut data[off..off + n]) {
                break;
            }
            got = off + n;
        }
        // Show the guest's bytes under the int3s gdb placed.
        if !self.physical {
            for bp in &self.sw {
                let i = bp.addr.wrapping_sub(addr);
                if i < got as u64 {
                    data[i as usize] = bp.orig;
                }
            }
        }
        Ok(got)
    }

    fn write_mem(&mut self, addr: u64, data: &[u8]) -> Result<bool, GdbError> {
        let pieces = self.pieces(addr, data.len())?;
        let mapped: usize = pieces.iter().map(|p| p.2).sum();
        if mapped < data.len() {
            return Ok(false);
        }
        for (off, gpa, n) in pieces {
            if !self.backend.write_phys(gpa, &data[off..off + n]) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn free_slots(&self) -> usize {
        self.slots.iter().filter(|s| s.is_none()).count()
    }

    fn put(&mut self, slot: Slot) {
        if let Some(free) = self.slots.iter_mut().find(|s| s.is_none()) {
            *free = Some(slot);
        }
    }
}

/// `[addr, addr + len)` as aligned pieces of 1, 2, 4 or 8 bytes, the
/// lengths a debug register can watch.
fn watch_pieces(addr: u64, len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let (mut a, end) = (addr, addr.saturating_add(len));
    while a < end {
        let size = [8u64, 4, 2, 1]
            .into_iter()
            .find(|&s| a % s == 0 && a + s <= end)
            .unwrap_or(1);
        out.push((a, size));
        a += size;
    }
    out
}

fn fail(e: GdbError) -> TargetError<GdbError> {
    match e {
        GdbError::VmEnded => TargetError::Fatal(e),
        e => {
            log::warn!("warning: gdb: {e}");
            TargetError::NonFatal
        }
    }
}

impl<B: Backend> Target for GdbTarget<B> {
    type Arch = X86;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, X86, GdbError> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_target_description_xml_override(
        &mut self,
    ) -> Option<TargetDescriptionXmlOverrideOps<'_, Self>> {
        Some(self)
    }
}

impl<B: Backend> MultiThreadBase for GdbTarget<B> {
    fn read_registers(&mut self, regs: &mut Regs, tid: Tid) -> TargetResult<(), Self> {
        regs.layout = self.layout;
        regs.state = self.state(id_of(tid)).map_err(fail)?;
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs, tid: Tid) -> TargetResult<(), Self> {
        let id = id_of(tid);
        let mut s = self.state(id).map_err(fail)?;
        match &regs.written {
            Some(bytes) => regs
                .layout
                .deserialize(bytes, &mut s)
                .map_err(|_| TargetError::NonFatal)?,
            None => s = regs.state.clone(),
        }
        self.backend.write_state(id, &s).map_err(fail)?;
        self.cache[id as usize] = Some(s);
        Ok(())
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        self.current = id_of(tid);
        match self.read_mem(start, data).map_err(fail)? {
            0 if !data.is_empty() => Err(TargetError::Errno(14)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        self.current = id_of(tid);
        match self.write_mem(start, data).map_err(fail)? {
            true => Ok(()),
            false => Err(TargetError::Errno(14)),
        }
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), GdbError> {
        for id in 0..self.backend.vcpus() {
            thread_is_active(tid(id));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl<B: Backend> MultiThreadResume for GdbTarget<B> {
    fn resume(&mut self) -> Result<(), GdbError> {
        self.invalidate();
        let debug = self.guest_debug();
        let default = (!self.locked).then_some(Action::Continue);
        let actions: Vec<Option<Action>> = self.actions.iter().map(|a| a.or(default)).collect();
        self.backend.resume(&debug, &actions)
    }

    fn clear_resume_actions(&mut self) -> Result<(), GdbError> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.locked = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), GdbError> {
        // A signal gdb would deliver has no meaning for a vCPU: ignored.
        if let Some(a) = self.actions.get_mut(id_of(tid) as usize) {
            *a = Some(Action::Continue);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }
}

impl<B: Backend> MultiThreadSchedulerLocking for GdbTarget<B> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), GdbError> {
        self.locked = true;
        Ok(())
    }
}

impl<B: Backend> MultiThreadSingleStep for GdbTarget<B> {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), GdbError> {
        if let Some(a) = self.actions.get_mut(id_of(tid) as usize) {
            *a = Some(Action::Step);
        }
        Ok(())
    }
}

impl<B: Backend> Breakpoints for GdbTarget<B> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl<B: Backend> SwBreakpoint for GdbTarget<B> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if let Some(why) = self.backend.limits().sw_breakpoints {
            // gdb shows "Cannot insert breakpoint"; the reason goes to
            // kvmrun's stderr, where the console is.
            eprintln!(
                "kvmrun: gdb: software breakpoint at {addr:#x} refused: {why}; use hbreak (up to 4)"
            );
            return Err(TargetError::Errno(95));
        }
        if self.sw.iter().any(|b| b.addr == addr) {
            return Ok(true);
        }
        let Some(gpa) = self.phys_of(addr).map_err(fail)? else {
            return Ok(false);
        };
        let mut orig = [0u8];
        if !self.backend.read_phys(gpa, &mut orig) || !self.backend.write_phys(gpa, &[0xcc]) {
            return Ok(false);
        }
        self.sw.push(SwBp {
            addr,
            gpa,
            orig: orig[0],
        });
        Ok(true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let Some(i) = self.sw.iter().position(|b| b.addr == addr) else {
            return Ok(false);
        };
        let bp = self.sw.remove(i);
        Ok(self.backend.write_phys(bp.gpa, &[bp.orig]))
    }
}

impl<B: Backend> HwBreakpoint for GdbTarget<B> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.free_slots() == 0 {
            return Ok(false);
        }
        self.put(Slot::Exec(addr));
        Ok(true)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        match self
            .slots
            .iter_mut()
            .find(|s| **s == Some(Slot::Exec(addr)))
        {
            Some(s) => {
                *s = None;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl<B: Backend> HwWatchpoint for GdbTarget<B> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        if let Some(why) = self.backend.limits().watchpoints {
            eprintln!(
                "kvmrun: gdb: hardware watchpoint at {addr:#x} refused: {why}; \
                 use `set can-use-hw-watchpoints 0` (gdb single-steps)"
            );
            return Err(TargetError::Errno(95));
        }
        let pieces = watch_pieces(addr, len);
        if pieces.is_empty() || pieces.len() > self.free_slots() {
            return Ok(false);
        }
        for (a, l) in pieces {
            self.put(Slot::Watch {
                addr: a,
                len: l,
                kind,
                whole: addr,
            });
        }
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        _len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let mut found = false;
        for s in self.slots.iter_mut() {
            if matches!(s, Some(Slot::Watch { whole, kind: k, .. }) if *whole == addr && *k == kind)
            {
                *s = None;
                found = true;
            }
        }
        Ok(found)
    }
}

impl<B: Backend> MonitorCmd for GdbTarget<B> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), GdbError> {
        match String::from_utf8_lossy(cmd).trim() {
            "phys" => {
                self.physical = true;
                outputln!(out, "memory addresses are guest-physical");
            }
            "virt" => {
                self.physical = false;
                outputln!(
                    out,
                    "memory addresses are linear, through vCPU {}'s page tables",
                    self.current
                );
            }
            "status" => {
                outputln!(
                    out,
                    "layout {}, {} vCPUs, memory {}, hardware slots in use {}/{}",
                    self.layout.name(),
                    self.backend.vcpus(),
                    if self.physical { "physical" } else { "linear" },
                    SLOTS - self.free_slots(),
                    SLOTS,
                );
                let limits = self.backend.limits();
                for (what, why) in [
                    ("software breakpoints", limits.sw_breakpoints),
                    ("hardware watchpoints", limits.watchpoints),
                ] {
                    outputln!(out, "{what}: {}", why.unwrap_or("available"));
                }
            }
            _ => {
                outputln!(out, "kvmrun monitor commands:");
                outputln!(out, "  phys    gdb's memory addresses are guest-physical");
                outputln!(
                    out,
                    "  virt    ... linear, through the guest's page tables (default)"
                );
                outputln!(out, "  status  layout, breakpoint slots, memory mode");
            }
        }
        Ok(())
    }
}

impl<B: Backend> TargetDescriptionXmlOverride for GdbTarget<B> {
    fn target_description_xml(
        &self,
        annex: &[u8],
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        if annex != b"target.xml" {
            return Err(TargetError::Errno(2));
        }
        let xml = self.layout.xml();
        let bytes = xml.as_bytes();
        let start = (offset as usize).min(bytes.len());
        let n = (bytes.len() - start).min(length).min(buf.len());
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_ranges_split_into_aligned_pieces() {
        assert_eq!(watch_pieces(0x1000, 8), vec![(0x1000, 8)]);
        assert_eq!(watch_pieces(0x1004, 4), vec![(0x1004, 4)]);
        assert_eq!(
            watch_pieces(0x1003, 6),
            vec![(0x1003, 1), (0x1004, 4), (0x1008, 1)]
        );
        assert!(watch_pieces(0x1000, 0).is_empty());
    }

    #[test]
    fn len_bits_follow_the_sdm() {
        assert_eq!(len_bits(1), 0);
        assert_eq!(len_bits(2), 1);
        assert_eq!(len_bits(8), 2);
        assert_eq!(len_bits(4), 3);
    }
}
