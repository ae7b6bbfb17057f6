//! One vCPU: its KVM state at creation and its thread's run loop; the
//! dispatch of every exit to the bus or the shutdown path is `exit`.

pub mod debug;
mod exit;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use devices::i8259::Pic;
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, Msrs, KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{BootPlan, EntryMode};
use crate::bus::IoBus;
use crate::cpu;
use crate::cpu::gdt;
use crate::cpu::msrs::MsrValue;
use crate::diag;
use crate::memory::BOOT_GDT_ADDR;
use crate::shutdown::{ExitReason, Shutdown};
use crate::vm::Vm;
use debug::DebugHub;
use exit::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {source}")]
    Cpuid { id: u32, source: cpu::CpuError },
    #[error("cannot write the boot GDT: {0}")]
    Gdt(String),
    #[error("--msr {index:#x}={value:#x}: KVM refused to set it on vCPU {id}")]
    MsrRefused { id: u32, index: u32, value: u64 },
}

/// Signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick handler once per process: with a handler (rather than
/// the default action) the signal only interrupts KVM_RUN with EINTR.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            log::warn!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// IA32_APIC_BASE after reset on the BSP: xAPIC at 0xfee00000, enabled, BSP.
const APIC_BASE_BSP: u64 = 0xfee0_0900;

/// LAPIC LVT registers and the delivery modes firmware leaves in them.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// Delivery mode, level-triggered and unmasked, as SeaBIOS writes them.
const APIC_MODE_EXTINT: u32 = 0x8700;
const APIC_MODE_NMI: u32 = 0x8400;

/// Flat 4 GiB code and data descriptors at selectors 0x08 and 0x10, then
/// 16-bit ones, as a PC BIOS's multiboot loader leaves them.
const BOOT_GDT: [u64; 5] = [0, gdt::CODE32, gdt::DATA32, gdt::CODE16, gdt::DATA16];

/// The Linux boot protocol's GDT: flat 64-bit code at __BOOT_CS (0x10)
/// and flat data at __BOOT_DS (0x18).
const LINUX_GDT: [u64; 4] = [0, 0, gdt::CODE64, gdt::DATA32];
const LINUX_BOOT_CS: u16 = 0x10;
const LINUX_BOOT_DS: u16 = 0x18;

pub struct Vcpu {
    pub id: u32,
    fd: VcpuFd,
    /// Guest memory, to read the instruction at RIP for crash reports.
    mem: GuestMemoryMmap,
    /// On vCPU 0 with the split irqchip, kvmrun's PIC, whose interrupts
    /// arrive as ExtINT through LINT0 (`inject_extint()`).
    extint: Option<Arc<Mutex<Pic>>>,
}

impl Vcpu {
    /// Create vCPU `id` with KVM's defaults only, for a snapshot's saved
    /// state to overwrite.
    pub fn bare(vm: &Vm, id: u32) -> Result<Vcpu, VcpuError> {
        let fd = vm.create_vcpu(id).map_err(|source| VcpuError::Kvm {
            id,
            what: "KVM_CREATE_VCPU",
            source,
        })?;
        Ok(Vcpu {
            extint: None,
            id,
            fd,
            mem: vm.mem.clone(),
        })
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Create vCPU `id` of `count` with its CPUID and the LAPIC and FPU state
    /// firmware would leave; `timing_leaf` adds KVM's TSC frequency leaf
    /// (0x40000010) with this vCPU's TSC rate.
    pub fn new(
        vm: &Vm,
        id: u32,
        count: u32,
        cpuid: &[kvm_bindings::kvm_cpuid_entry2],
        msrs: &[MsrValue],
        required: &[MsrValue],
        timing_leaf: bool,
    ) -> Result<Vcpu, VcpuError> {
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let fd = vm.create_vcpu(id).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let mut entries = cpu::for_vcpu(cpuid, id, count);
        if timing_leaf {
            let khz = fd.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
            cpu::add_timing_leaf(&mut entries, khz);
        }
        let kvm_cpuid = cpu::to_kvm(&entries).map_err(|source| VcpuError::Cpuid { id, source })?;
        fd.set_cpuid2(&kvm_cpuid)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;

        // On the BSP, LINT0 takes the PIC's interrupts (ExtINT, virtual wire
        // mode) and LINT1 is NMI, as firmware sets them up; kvm-unit-tests'
        // realmode test relies on it. Only the BSP may take ExtINT, or an AP
        // could acknowledge the PIC's interrupts.
        let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let lints: &[(usize, u32)] = if id == 0 {
            &[(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)]
        } else {
            &[(APIC_LVT1, APIC_MODE_NMI)]
        };
        for &(reg, mode) in lints {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[reg + i] as u8;
            }
            let v = (u32::from_le_bytes(b) & !0x1_8700) | mode;
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *x as _;
            }
        }
        fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

        // The x87 and SSE control words of a CPU after reset.
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;

        // One MSR per call, so a refusal names the MSR. A reset value KVM
        // refuses (the CPUID left its feature out) is skipped; a value the
        // user asked for is an error.
        for m in msrs {
            let one = Msrs::from_entries(&[kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            }])
            .map_err(|_| VcpuError::MsrRefused {
                id,
                index: m.index,
                value: m.value,
            })?;
            let ok = matches!(fd.set_msrs(&one), Ok(1));
            if !ok {
                if required.iter().any(|r| r.index == m.index) {
                    return Err(VcpuError::MsrRefused {
                        id,
                        index: m.index,
                        value: m.value,
                    });
                }
                log::debug!(
                    "vCPU {id}: KVM refused reset value {:#x} for MSR {:#x}",
                    m.value,
                    m.index
                );
            }
        }
        Ok(Vcpu {
            extint: None,
            id,
            fd,
            mem: vm.mem.clone(),
        })
    }

    /// Put the boot vCPU in the state `plan` asks for.
    pub fn apply_boot_plan(&self, plan: &BootPlan, mem: &GuestMemoryMmap) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let write_gdt = |gdt: &[u64]| {
            mem.write_slice(&gdt::to_bytes(gdt), GuestAddress(BOOT_GDT_ADDR))
                .map_err(|e| VcpuError::Gdt(e.to_string()))
        };
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        match plan.mode {
            EntryMode::Protected32 | EntryMode::Pvh32 => {
                write_gdt(&BOOT_GDT)?;
                gdt::load(&mut sregs, BOOT_GDT_ADDR, &BOOT_GDT, 0x08, 0x10);
                // Protection on, paging off.
                sregs.cr0 = gdt::CR0_PE_ET;
                if plan.mode == EntryMode::Pvh32 {
                    // The PVH ABI's TSS: 32-bit, busy, base 0, limit 0x67.
                    sregs.tr.base = 0;
                    sregs.tr.limit = 0x67;
                    sregs.tr.type_ = 0xb;
                    sregs.tr.present = 1;
                }
            }
            EntryMode::Long64 { cr3 } => {
                write_gdt(&LINUX_GDT)?;
                gdt::load(
                    &mut sregs,
                    BOOT_GDT_ADDR,
                    &LINUX_GDT,
                    LINUX_BOOT_CS,
                    LINUX_BOOT_DS,
                );
                // No IDT: the protocol enters with interrupts off.
                sregs.idt.limit = 0;
                gdt::enter_long_mode(&mut sregs, cr3);
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = plan.rip;
        regs.rax = plan.rax;
        regs.rbx = plan.rbx;
        regs.rsi = plan.rsi;
        regs.rsp = plan.rsp;
        regs.rflags = 0x2;
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
    }

    /// Whether this vCPU can make no progress on its own: halted with
    /// interrupts off and no NMI pending, or never started.
    fn is_stuck(&self) -> bool {
        let Ok(mp) = self.fd.get_mp_state() else {
            return false;
        };
        match mp.mp_state {
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => true,
            KVM_MP_STATE_HALTED => {
                let if_off = self.fd.get_regs().is_ok_and(|r| r.rflags & (1 << 9) == 0);
                let nmi_idle = self
                    .fd
                    .get_vcpu_events()
                    .is_ok_and(|e| e.nmi.pending == 0 && e.nmi.injected == 0);
                if_off && nmi_idle
            }
            _ => false,
        }
    }

    /// Take the interrupts of `pic` (vCPU 0 with the split irqchip).
    pub fn set_extint(&mut self, pic: Option<Arc<Mutex<Pic>>>) {
        self.extint = pic;
    }

    /// Hand the PIC's interrupt to KVM before entering the guest: with a
    /// split irqchip KVM_INTERRUPT queues an ExtINT for the local APIC's
    /// LINT0, allowed while `ready_for_interrupt_injection` says KVM has
    /// none queued and the guest takes interrupts (KVM API documentation,
    /// "KVM_INTERRUPT" and "KVM_CAP_SPLIT_IRQCHIP"). Otherwise ask KVM to
    /// exit when the guest's interrupt window opens. INTA happens only
    /// when the vector is handed over, as on the wire.
    fn inject_extint(&mut self) {
        let Some(pic) = self.extint.clone() else {
            return;
        };
        let mut pic = pic.lock().unwrap_or_else(|e| e.into_inner());
        let run = self.fd.get_kvm_run();
        if !pic.output() {
            run.request_interrupt_window = 0;
            return;
        }
        if run.ready_for_interrupt_injection == 0 || run.if_flag == 0 {
            run.request_interrupt_window = 1;
            return;
        }
        run.request_interrupt_window = 0;
        let vector = pic.acknowledge();
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // kvm-ioctls has no wrapper for KVM_INTERRUPT.
        // SAFETY: `irq` is the kvm_interrupt the ioctl reads, and the fd
        // is this vCPU's.
        let r = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(
                &self.fd,
                crate::sandbox::lists::KVM_INTERRUPT as _,
                &irq,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            log::warn!("vCPU {}: KVM_INTERRUPT of vector {vector:#x}: {e}", self.id);
        }
    }

    /// This vCPU's `kvm_run.immediate_exit`, shared with the threads that
    /// kick it (`Kick`).
    fn immediate_exit(&mut self) -> *mut u8 {
        &mut self.fd.get_kvm_run().immediate_exit
    }

    /// Start this vCPU's thread, which runs it until the VM shuts down or
    /// must stop, then hands it back through `Running::stop()`.
    pub fn start(
        mut self,
        bus: Arc<IoBus>,
        shutdown: Arc<Shutdown>,
        halt: Arc<HaltWatch>,
        debug: Option<Arc<DebugHub>>,
    ) -> std::io::Result<Running> {
        let immediate_exit = self.immediate_exit();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", self.id))
            .spawn(move || {
                if let Err(e) = crate::sandbox::enter(crate::sandbox::Kind::Vcpu) {
                    shutdown.request(ExitReason::Error(e.to_string()));
                    return self;
                }
                // Keep the vCPU, and with it the kvm_run mapping a `Kick`
                // writes to, alive until the thread is joined, even when
                // the loop panics.
                let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    self.run(&bus, &shutdown, &halt, debug.as_deref())
                }));
                if ran.is_err() {
                    shutdown.request(ExitReason::Error(format!("vCPU {} panicked", self.id)));
                }
                self
            })?;
        let kick = Kick {
            immediate_exit,
            thread: std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread),
        };
        Ok(Running { thread, kick })
    }

    /// The vCPU thread's loop: run until the VM shuts down or must stop.
    /// With gdb (`debug`), park whenever the stub holds this vCPU.
    fn run(
        &mut self,
        bus: &IoBus,
        shutdown: &Shutdown,
        halt: &HaltWatch,
        debug: Option<&DebugHub>,
    ) {
        while !shutdown.must_stop() {
            if let Some(hub) = debug.filter(|h| h.must_park(self.id)) {
                match hub.park(self) {
                    Some((d, step)) => {
                        if let Err(e) = self.set_guest_debug(&d, step, false) {
                            shutdown.request(ExitReason::Error(format!("gdb: {e}")));
                        }
                    }
                    None => break,
                }
                continue;
            }
            self.inject_extint();
            let outcome = match self.fd.run() {
                Ok(exit) => exit::dispatch(exit, bus, self.id),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Cleared before `must_stop()` is read again, so a stop
                    // whose kick this clears is still seen (`Kick::kick()`).
                    // SAFETY: the field lives in this vCPU's kvm_run mapping.
                    unsafe { AtomicU8::from_ptr(self.immediate_exit()) }.store(0, Ordering::SeqCst);
                    halt.report(self.id, self.is_stuck());
                    None
                }
                Err(e) => Some(Outcome::Exit(ExitReason::Error(format!(
                    "KVM_RUN on vCPU {}: {e}",
                    self.id
                )))),
            };
            match outcome {
                None => {}
                Some(Outcome::Exit(reason)) => shutdown.request(reason),
                Some(Outcome::Crash(what)) => self.crash(shutdown, what),
                Some(Outcome::InternalError) => {
                    let what = self.internal_error();
                    self.crash(shutdown, what)
                }
                Some(Outcome::Debug(d)) => match debug {
                    Some(hub) => {
                        hub.debug_exit(self, &d);
                    }
                    None => self.crash(shutdown, format!("unhandled exit Debug({d:?})")),
                },
            }
        }
    }

    /// Put the vCPU where firmware's S3 resume path leaves it: just reset,
    /// in real mode at `vector` (CS = vector >> 4, IP = vector & 0xf), with
    /// the LAPIC back in xAPIC mode.
    pub fn enter_waking_vector(&self, vector: u32) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm_err = |what| move |source| VcpuError::Kvm { id, what, source };
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let cs = (vector >> 4) as u16;
        // Execute/read code and read/write data, both accessed.
        gdt::set_segments(&mut sregs, gdt::real_mode(cs, 0xb), gdt::real_mode(0, 0x3));
        sregs.gdt.base = 0;
        sregs.gdt.limit = 0xffff;
        sregs.cr0 = gdt::CR0_ET;
        sregs.apic_base = APIC_BASE_BSP;
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = (vector & 0xf) as u64;
        regs.rflags = 0x2;
        regs.rsp = crate::memory::BOOT_STACK;
        self.fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        self.set_mp_state(KVM_MP_STATE_RUNNABLE)
    }

    /// Make an AP wait for INIT/SIPI again, as after a platform reset.
    pub fn wait_for_sipi(&self) -> Result<(), VcpuError> {
        self.set_mp_state(KVM_MP_STATE_UNINITIALIZED)
    }

    fn set_mp_state(&self, mp_state: u32) -> Result<(), VcpuError> {
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state })
            .map_err(|source| VcpuError::Kvm {
                id: self.id,
                what: "KVM_SET_MP_STATE",
                source,
            })
    }

    /// Describe a KVM_EXIT_INTERNAL_ERROR: where, in which mode, which
    /// instruction, and what the host's KVM can do about it.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data = internal.data[..n].to_vec();
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let rip = regs.map_or(0, |r| r.rip);
        let mode = match (regs, sregs) {
            (Some(r), Some(s)) => {
                diag::CpuMode::new(s.cr0, s.efer, r.rflags, s.cs.l != 0, s.cs.db != 0)
            }
            _ => diag::CpuMode::Long64,
        };
        let bytes = match diag::insn_from_kvm(internal.suberror, &data) {
            Some(b) => diag::InsnBytes::FromKvm(b),
            None => match sregs {
                Some(s) => match self.read_insn(&s, rip, mode) {
                    Ok(b) => diag::InsnBytes::FromMemory(b),
                    Err(why) => diag::InsnBytes::Unavailable(why),
                },
                None => diag::InsnBytes::Unavailable("KVM_GET_SREGS failed".into()),
            },
        };
        diag::InternalErrorReport {
            vcpu: self.id,
            suberror: internal.suberror,
            data,
            rip,
            cs: sregs.map_or(0, |s| s.cs.selector),
            mode,
            // CPL is the DPL of SS (CS's RPL in real mode, which is 0).
            cpl: sregs.map_or(0, |s| s.ss.dpl),
            bytes,
            module: diag::kvm_module(),
        }
        .format()
    }

    /// Read the instruction at CS:RIP from guest memory, page by page
    /// through the guest's page tables.
    fn read_insn(
        &self,
        sregs: &kvm_bindings::kvm_sregs,
        rip: u64,
        mode: diag::CpuMode,
    ) -> Result<Vec<u8>, String> {
        let linear = if mode == diag::CpuMode::Long64 {
            rip
        } else {
            sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
        };
        let paging = sregs.cr0 & gdt::CR0_PG != 0;
        let mut out = Vec::new();
        let mut at = linear;
        while out.len() < diag::MAX_INSN_LEN {
            let gpa = if !paging {
                Some(at)
            } else {
                match self.fd.translate_gva(at) {
                    Ok(t) if t.valid != 0 => Some(t.physical_address),
                    Ok(_) => None,
                    // Some KVMs refuse KVM_TRANSLATE: walk 4-level tables here.
                    Err(_) if sregs.efer & gdt::EFER_LMA != 0 => {
                        diag::walk_4level(sregs.cr3, at, |a| {
                            self.mem.read_obj::<u64>(GuestAddress(a)).ok()
                        })
                    }
                    Err(e) => return Err(format!("KVM_TRANSLATE of {at:#x} failed: {e}")),
                }
            };
            let Some(gpa) = gpa else {
                if out.is_empty() {
                    return Err(format!("linear address {at:#x} is not mapped"));
                }
                break;
            };
            let page_left = 0x1000 - (at & 0xfff) as usize;
            let want = (diag::MAX_INSN_LEN - out.len()).min(page_left);
            let mut buf = vec![0u8; want];
            if self.mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
                if out.is_empty() {
                    return Err(format!(
                        "rip {rip:#x} lies at guest physical {gpa:#x}, outside guest RAM"
                    ));
                }
                break;
            }
            out.extend_from_slice(&buf);
            at = at.wrapping_add(want as u64);
        }
        Ok(out)
    }

    /// Report a guest crash with the vCPU's registers and end the VM.
    fn crash(&self, shutdown: &Shutdown, what: String) {
        if !shutdown.is_requested() {
            eprintln!("kvmrun: vCPU {} crashed: {what}\n{}", self.id, self.dump());
        }
        shutdown.request(ExitReason::Crash {
            vcpu: self.id,
            what,
        });
    }

    /// The registers, as text for a crash report.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        if let Ok(r) = self.fd.get_regs() {
            s += &format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        if let Ok(sr) = self.fd.get_sregs() {
            s += &format!(
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} apic_base={:#x}\n  cs={:#06x} (base {:#x}, l={} db={}) ss={:#06x} ds={:#06x}\n  gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.efer, sr.apic_base,
                sr.cs.selector, sr.cs.base, sr.cs.l, sr.cs.db, sr.ss.selector, sr.ds.selector,
                sr.gdt.base, sr.gdt.limit, sr.idt.base, sr.idt.limit
            );
        }
        s
    }
}

/// A vCPU whose thread runs it.
pub struct Running {
    thread: JoinHandle<Vcpu>,
    kick: Kick,
}

impl Running {
    pub fn kick(&self) -> Kick {
        self.kick
    }

    /// Kick the vCPU out of KVM_RUN and take it back once its thread
    /// ends; the caller has made `Shutdown::must_stop()` true. None if the
    /// thread could not hand it back.
    pub fn stop(self) -> Option<Vcpu> {
        self.kick.kick();
        self.thread.join().ok()
    }
}

/// What another thread needs to kick one vCPU out of KVM_RUN.
#[derive(Clone, Copy)]
pub struct Kick {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
}

// SAFETY: both fields name things that outlive every use of a `Kick`: the
// vCPU's kvm_run mapping lives as long as the `Vcpu`, which its thread
// hands back when it ends, and the pthread id stays valid until the
// thread is joined. Kicks are only sent before `Running::stop()` joins.
unsafe impl Send for Kick {}
unsafe impl Sync for Kick {}

impl Kick {
    /// Set `immediate_exit`, then signal the thread, as the KVM API
    /// documentation prescribes: KVM_RUN returns EINTR at once while the
    /// field is set, so a signal that lands before the thread enters
    /// KVM_RUN is not lost, and one inside KVM_RUN interrupts it.
    pub fn kick(&self) {
        // SAFETY: see `unsafe impl Send for Kick`.
        unsafe {
            AtomicU8::from_ptr(self.immediate_exit).store(1, Ordering::SeqCst);
            libc::pthread_kill(self.thread, kick_signal());
        }
    }
}

/// Notices a guest that halted for good: every vCPU halted with interrupts
/// off (or never started). With the in-kernel irqchip KVM never reports HLT
/// to user space, so the main loop kicks the vCPUs now and then and each
/// one says whether it is stuck; two stuck reports in a row from all of them
/// end the VM like a power-off.
pub struct HaltWatch {
    stuck: Vec<AtomicBool>,
}

impl HaltWatch {
    pub fn new(vcpus: u32) -> Self {
        HaltWatch {
            stuck: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    fn report(&self, id: u32, stuck: bool) {
        if let Some(s) = self.stuck.get(id as usize) {
            s.store(stuck, Ordering::SeqCst);
        }
    }

    /// Whether every vCPU reported stuck since the last call; clears the
    /// reports so the next call needs fresh ones.
    pub fn all_stuck_and_clear(&self) -> bool {
        let all = self.stuck.iter().all(|s| s.load(Ordering::SeqCst));
        for s in &self.stuck {
            s.store(false, Ordering::SeqCst);
        }
        all
    }
}
