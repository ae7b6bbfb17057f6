//! The KVM side of the gdb stub: where vCPU threads stop for gdb, the
//! register and guest-debug ioctls gdb's requests become, and the
//! `gdb::target::Backend` the stub thread drives.
//!
//! A vCPU the stub holds parks in its own thread, outside KVM_RUN, and runs
//! there the jobs the stub thread sends it (register reads and writes,
//! KVM_SET_GUEST_DEBUG), so the vCPU's fd never leaves its thread. The
//! stub stops vCPUs by holding them and kicking them out of KVM_RUN
//! (`Kick`); a vCPU that hits a breakpoint or finishes a step queues an
//! `Event` and parks. The main loop wakes parked vCPUs when the VM must
//! stop (`DebugHub::wake()`), so a pause or a shutdown never waits for gdb.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_guest_debug_arch, KVM_GUESTDBG_BLOCKIRQ,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_BP, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Kick, Vcpu};
use crate::gdb::arch::CpuState;
use crate::gdb::target::{Action, Backend, Event, GuestDebug, HostLimits};
use crate::gdb::GdbError;
use crate::shutdown::{ExitReason, Shutdown};

type Job = Box<dyn FnOnce(&mut Vcpu) + Send>;

#[derive(Default)]
struct HubState {
    /// vCPU i must park (and stay parked) while `hold[i]`.
    hold: Vec<bool>,
    parked: Vec<bool>,
    /// Single-step vCPU i when it next runs.
    step: Vec<bool>,
    debug: GuestDebug,
    jobs: Vec<VecDeque<Job>>,
    events: VecDeque<Event>,
    /// The VM's exit status once it has ended.
    ended: Option<i32>,
    /// A gdb session is open.
    attached: bool,
}

/// Where vCPU threads and the stub thread meet.
pub struct DebugHub {
    state: Mutex<HubState>,
    cv: Condvar,
    /// Readable when `events` has something for the stub thread.
    evt: EventFd,
    /// The running vCPUs' kicks (the main loop's list, cleared under its
    /// lock before the threads are joined).
    kicks: Arc<Mutex<Vec<Kick>>>,
    shutdown: Arc<Shutdown>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DebugHub {
    /// A hub for `vcpus` vCPUs; with `wait` they park before their first
    /// instruction.
    pub fn new(
        vcpus: u32,
        wait: bool,
        kicks: Arc<Mutex<Vec<Kick>>>,
        shutdown: Arc<Shutdown>,
    ) -> std::io::Result<DebugHub> {
        let n = vcpus as usize;
        Ok(DebugHub {
            state: Mutex::new(HubState {
                hold: vec![wait; n],
                parked: vec![false; n],
                step: vec![false; n],
                jobs: (0..n).map(|_| VecDeque::new()).collect(),
                ..Default::default()
            }),
            cv: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
            kicks,
            shutdown,
        })
    }

    pub fn event_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.evt.as_raw_fd()
    }

    /// Whether a gdb is attached (snapshots are refused then).
    pub fn is_attached(&self) -> bool {
        lock(&self.state).attached
    }

    /// Let parked vCPUs see that the VM must stop.
    pub fn wake(&self) {
        let _s = lock(&self.state);
        self.cv.notify_all();
    }

    /// The VM ended with `status`: tell the stub thread, drop its jobs.
    pub fn end(&self, status: i32) {
        let mut s = lock(&self.state);
        s.ended = Some(status);
        s.events.push_back(Event::Ended(status));
        s.jobs.iter_mut().for_each(VecDeque::clear);
        let _ = self.evt.write(1);
        self.cv.notify_all();
    }

    /// vCPU side: whether `id` must park before running.
    pub(super) fn must_park(&self, id: u32) -> bool {
        lock(&self.state).hold[id as usize]
    }

    /// vCPU side: park until released (then the guest-debug setting to run
    /// with) or until the VM must stop (None); serve jobs meanwhile.
    pub(super) fn park(&self, vcpu: &mut Vcpu) -> Option<(GuestDebug, bool)> {
        let i = vcpu.id as usize;
        let mut s = lock(&self.state);
        s.parked[i] = true;
        self.cv.notify_all();
        loop {
            if let Some(job) = s.jobs[i].pop_front() {
                drop(s);
                job(vcpu);
                s = lock(&self.state);
                continue;
            }
            if self.shutdown.must_stop() || !s.hold[i] {
                s.parked[i] = false;
                s.jobs[i].clear();
                self.cv.notify_all();
                if self.shutdown.must_stop() {
                    return None;
                }
                return Some((s.debug.clone(), s.step[i]));
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// vCPU side: a KVM_EXIT_DEBUG. True when the vCPU goes on at once
    /// (the guest's own int3, given back to it); otherwise gdb hears of it
    /// and the vCPU parks at the top of its loop.
    pub(super) fn debug_exit(&self, vcpu: &Vcpu, exit: &kvm_debug_exit_arch) -> bool {
        let mut s = lock(&self.state);
        if exit.exception == 3 && !s.debug.sw.contains(&exit.pc) {
            let step = s.step[vcpu.id as usize];
            let debug = s.debug.clone();
            drop(s);
            if let Err(e) = vcpu.set_guest_debug(&debug, step, true) {
                log::warn!(
                    "warning: gdb: cannot give vCPU {} its int3 back: {e}",
                    vcpu.id
                );
            }
            return true;
        }
        s.events.push_back(Event::Debug {
            id: vcpu.id,
            exception: exit.exception,
            pc: exit.pc,
            dr6: exit.dr6,
        });
        s.hold[vcpu.id as usize] = true;
        let _ = self.evt.write(1);
        false
    }

    /// Stub side: hold every vCPU, kick the running ones, and wait until
    /// all are parked.
    fn stop_all(&self) -> Result<(), GdbError> {
        {
            let mut s = lock(&self.state);
            s.hold.iter_mut().for_each(|h| *h = true);
        }
        for k in lock(&self.kicks).iter() {
            k.kick();
        }
        let mut s = lock(&self.state);
        loop {
            if s.ended.is_some() {
                return Err(GdbError::VmEnded);
            }
            if s.parked.iter().all(|p| *p) {
                return Ok(());
            }
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Stub side: run `f` on parked vCPU `id`'s thread and return its result.
    fn on_vcpu<R: Send + 'static>(
        &self,
        id: u32,
        f: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Result<R, GdbError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut s = lock(&self.state);
            if s.ended.is_some() {
                return Err(GdbError::VmEnded);
            }
            let q = s
                .jobs
                .get_mut(id as usize)
                .ok_or(GdbError::NoSuchVcpu(id))?;
            q.push_back(Box::new(move |v: &mut Vcpu| {
                let _ = tx.send(f(v));
            }));
            self.cv.notify_all();
        }
        rx.recv().map_err(|_| GdbError::VcpuGone(id))
    }

    fn resume(&self, debug: &GuestDebug, actions: &[Option<Action>]) {
        let mut s = lock(&self.state);
        if !s.events.is_empty() {
            // Another vCPU stopped too: report that first, run nothing.
            let _ = self.evt.write(1);
            return;
        }
        s.debug = debug.clone();
        for (i, a) in actions.iter().enumerate() {
            if let Some(a) = a {
                s.hold[i] = false;
                s.step[i] = *a == Action::Step;
            }
        }
        self.cv.notify_all();
    }

    fn take_event(&self) -> Option<Event> {
        let _ = self.evt.read();
        let mut s = lock(&self.state);
        let e = s.events.pop_front();
        if !s.events.is_empty() {
            let _ = self.evt.write(1);
        }
        e
    }

    fn set_attached(&self, attached: bool) {
        lock(&self.state).attached = attached;
    }
}

/// The stub's view of a KVM VM.
pub struct KvmBackend {
    hub: Arc<DebugHub>,
    mem: GuestMemoryMmap,
    vcpus: u32,
    limits: HostLimits,
}

impl KvmBackend {
    pub fn new(hub: Arc<DebugHub>, mem: GuestMemoryMmap, vcpus: u32) -> KvmBackend {
        KvmBackend {
            hub,
            mem,
            vcpus,
            limits: host_limits(crate::diag::kvm_module()),
        }
    }
}

/// What gdb cannot have with `module`. KVM-PVM runs guest ring 0
/// through KVM's instruction emulator, which cannot execute int3 (a
/// breakpoint would end the VM with an internal error) and checks only
/// instruction breakpoints, never data breakpoints, in what it emulates.
pub fn host_limits(module: Option<&str>) -> HostLimits {
    if module != Some("kvm_pvm") {
        return HostLimits::default();
    }
    HostLimits {
        sw_breakpoints: Some("KVM-PVM's instruction emulator cannot execute int3 in guest ring 0"),
        watchpoints: Some(
            "KVM-PVM's instruction emulator does not check data breakpoints in guest ring 0",
        ),
    }
}

impl Backend for KvmBackend {
    fn vcpus(&self) -> u32 {
        self.vcpus
    }

    fn read_state(&mut self, id: u32) -> Result<CpuState, GdbError> {
        self.hub.on_vcpu(id, |v| v.cpu_state())?
    }

    fn write_state(&mut self, id: u32, state: &CpuState) -> Result<(), GdbError> {
        let s = state.clone();
        self.hub.on_vcpu(id, move |v| v.set_cpu_state(&s))?
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.mem.read_slice(buf, GuestAddress(gpa)).is_ok()
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool {
        self.mem.write_slice(data, GuestAddress(gpa)).is_ok()
    }

    fn stop_all(&mut self) -> Result<(), GdbError> {
        self.hub.stop_all()
    }

    fn resume(&mut self, debug: &GuestDebug, actions: &[Option<Action>]) -> Result<(), GdbError> {
        self.hub.resume(debug, actions);
        log::info!("gdb: vCPUs resumed");
        Ok(())
    }

    fn take_event(&mut self) -> Option<Event> {
        self.hub.take_event()
    }

    fn limits(&self) -> HostLimits {
        self.limits
    }

    fn kill(&mut self) {
        self.hub
            .shutdown
            .request(ExitReason::Error("gdb killed the VM".into()));
        self.hub.wake();
    }

    fn set_attached(&mut self, attached: bool) {
        self.hub.set_attached(attached);
    }
}

const EFER_LMA: u64 = 1 << 10;

impl Vcpu {
    fn kvm_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> GdbError {
        let id = self.id;
        move |source| GdbError::Kvm { id, what, source }
    }

    /// The registers gdb shows, from KVM_GET_REGS, _SREGS and _FPU.
    fn cpu_state(&mut self) -> Result<CpuState, GdbError> {
        let r = self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?;
        let sr = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        let f = self.fd.get_fpu().map_err(self.kvm_err("KVM_GET_FPU"))?;
        let mut s = CpuState {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
            seg: [
                sr.cs.selector,
                sr.ss.selector,
                sr.ds.selector,
                sr.es.selector,
                sr.fs.selector,
                sr.gs.selector,
            ],
            cs_base: sr.cs.base,
            fs_base: sr.fs.base,
            gs_base: sr.gs.base,
            cr0: sr.cr0,
            cr2: sr.cr2,
            cr3: sr.cr3,
            cr4: sr.cr4,
            cr8: sr.cr8,
            efer: sr.efer,
            mxcsr: f.mxcsr,
            ..Default::default()
        };
        if sr.efer & EFER_LMA == 0 {
            // Outside long mode only the low halves exist (QEMU's stub
            // zero-extends the same way).
            s.gpr.iter_mut().for_each(|g| *g &= 0xffff_ffff);
            s.rip &= 0xffff_ffff;
        }
        for (st, fpr) in s.st.iter_mut().zip(f.fpr.iter()) {
            st.copy_from_slice(&fpr[..10]);
        }
        // The FXSAVE abridged tag (1 bit per register, 1 = valid) as the
        // full tag word gdb shows (2 bits, 11 = empty, 00 = valid).
        let ftag = (0..8).fold(0u32, |t, i| {
            t | if f.ftwx & (1 << i) != 0 {
                0
            } else {
                3 << (2 * i)
            }
        });
        s.fpu_ctl = [
            u32::from(f.fcw),
            u32::from(f.fsw),
            ftag,
            0,
            f.last_ip as u32,
            0,
            f.last_dp as u32,
            u32::from(f.last_opcode),
        ];
        s.xmm = f.xmm;
        Ok(s)
    }

    /// Write back what gdb changed. A segment register takes the selector
    /// only: its hidden base, limit and attributes stay as they are.
    fn set_cpu_state(&mut self, s: &CpuState) -> Result<(), GdbError> {
        let mut r = self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?;
        let g = &s.gpr;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = s.rip;
        r.rflags = s.rflags | 2;
        self.fd.set_regs(&r).map_err(self.kvm_err("KVM_SET_REGS"))?;
        let mut sr = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
        let old = sr;
        for (seg, sel) in [
            &mut sr.cs, &mut sr.ss, &mut sr.ds, &mut sr.es, &mut sr.fs, &mut sr.gs,
        ]
        .into_iter()
        .zip(s.seg)
        {
            seg.selector = sel;
        }
        sr.fs.base = s.fs_base;
        sr.gs.base = s.gs_base;
        (sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8, sr.efer) =
            (s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer);
        if !same_sregs(&old, &sr) {
            self.fd
                .set_sregs(&sr)
                .map_err(self.kvm_err("KVM_SET_SREGS"))?;
        }
        let mut f = self.fd.get_fpu().map_err(self.kvm_err("KVM_GET_FPU"))?;
        for (fpr, st) in f.fpr.iter_mut().zip(s.st.iter()) {
            fpr[..10].copy_from_slice(st);
        }
        f.fcw = s.fpu_ctl[0] as u16;
        f.fsw = s.fpu_ctl[1] as u16;
        f.ftwx = (0..8).fold(0u8, |t, i| {
            t | if (s.fpu_ctl[2] >> (2 * i)) & 3 != 3 {
                1 << i
            } else {
                0
            }
        });
        f.last_ip = u64::from(s.fpu_ctl[4]);
        f.last_dp = u64::from(s.fpu_ctl[6]);
        f.last_opcode = s.fpu_ctl[7] as u16;
        f.xmm = s.xmm;
        f.mxcsr = s.mxcsr;
        self.fd.set_fpu(&f).map_err(self.kvm_err("KVM_SET_FPU"))
    }

    /// KVM_SET_GUEST_DEBUG with `d`, single-stepping when `step` (with
    /// interrupts blocked where KVM can, so a step does not land in a
    /// handler), and `inject_bp` giving the guest the #BP it raised.
    pub(super) fn set_guest_debug(
        &self,
        d: &GuestDebug,
        step: bool,
        inject_bp: bool,
    ) -> Result<(), GdbError> {
        let mut control = 0;
        if d.dr7 != 0 {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        }
        if !d.sw.is_empty() {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        if step {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP | KVM_GUESTDBG_BLOCKIRQ;
        }
        if inject_bp {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_INJECT_BP;
        }
        let mut debugreg = [0u64; 8];
        debugreg[..4].copy_from_slice(&d.dr);
        debugreg[7] = d.dr7;
        let mut dbg = kvm_guest_debug {
            control,
            pad: 0,
            arch: kvm_guest_debug_arch { debugreg },
        };
        match self.fd.set_guest_debug(&dbg) {
            // Older KVMs lack BLOCKIRQ: step without it.
            Err(e) if step && e.errno() == libc::EINVAL => {
                dbg.control &= !KVM_GUESTDBG_BLOCKIRQ;
                self.fd.set_guest_debug(&dbg)
            }
            r => r,
        }
        .map_err(self.kvm_err("KVM_SET_GUEST_DEBUG"))
    }
}

/// Whether two sregs are the same, field by field of what gdb can change.
fn same_sregs(a: &kvm_bindings::kvm_sregs, b: &kvm_bindings::kvm_sregs) -> bool {
    let segs = |s: &kvm_bindings::kvm_sregs| {
        [
            s.cs.selector,
            s.ss.selector,
            s.ds.selector,
            s.es.selector,
            s.fs.selector,
            s.gs.selector,
        ]
    };
    segs(a) == segs(b)
        && (
            a.fs.base, a.gs.base, a.cr0, a.cr2, a.cr3, a.cr4, a.cr8, a.efer,
        ) == (
            b.fs.base, b.gs.base, b.cr0, b.cr2, b.cr3, b.cr4, b.cr8, b.efer,
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kvm_pvm_has_limits() {
        let pvm = host_limits(Some("kvm_pvm"));
        assert!(pvm.sw_breakpoints.is_some() && pvm.watchpoints.is_some());
        for m in [Some("kvm_intel"), Some("kvm_amd"), None] {
            assert_eq!(host_limits(m), HostLimits::default());
        }
    }
}
