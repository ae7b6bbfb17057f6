//! seccomp filters, one per kind of thread (`lists::Kind`), compiled with
//! seccompiler from the lists in `lists.rs` and installed by each thread
//! on itself before it handles anything a guest controls: the VMM thread
//! before the first vCPU starts, a vCPU thread before its first KVM_RUN.
//!
//! `--seccomp on` (the default) makes a forbidden call raise SIGSYS,
//! whose handler names the thread and the call on stderr and ends kvmrun
//! with `STATUS_SECCOMP`; `log` lets the call through and the kernel logs
//! it (audit, or the kernel log); `off` installs nothing. The library's
//! default is off, so tests that build VMs in-process stay unfiltered;
//! `main.rs` sets the mode from the flag.
//!
//! Filters pass from a thread to the threads and processes it starts,
//! through execve too. So processes (the VMs of `run --migrate`, the
//! tests of `kvmrun test`) are started by `spawn()`, on a launcher thread
//! that was started before any filter, and each child installs its own.

mod launcher;
pub mod lists;
mod names;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Once;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

pub use launcher::spawn;
pub use lists::Kind;

/// Exit status after a forbidden system call: what a shell reports for a
/// process killed by SIGSYS (128 + 31).
pub const STATUS_SECCOMP: i32 = 159;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A forbidden call ends kvmrun with a message.
    On,
    /// A forbidden call is allowed and the kernel logs it.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("invalid --seccomp '{s}': expected on, log or off")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot build the {kind} seccomp filter: {reason}")]
    Compile { kind: &'static str, reason: String },
    #[error("cannot install the {kind} seccomp filter: {reason} (--seccomp off runs without)")]
    Install { kind: &'static str, reason: String },
    #[error("cannot start the launcher thread: {0}")]
    Launcher(std::io::Error),
}

/// The mode `set_mode()` chose; `UNSET` until then (no filters).
static MODE: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

/// Set the mode for every filter installed from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::SeqCst);
}

pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        0 => Mode::On,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

/// The `--seccomp` a child kvmrun process needs to run in this mode;
/// none for the default, or when no mode was chosen (in-process use).
pub fn child_flag() -> Option<String> {
    match MODE.load(Ordering::SeqCst) {
        UNSET => None,
        _ if mode() == Mode::On => None,
        _ => Some(format!("--seccomp={}", mode())),
    }
}

/// Install `kind`'s filter on the calling thread, in the current mode.
/// Kinds that start processes get the launcher thread first, so it stays
/// unfiltered.
pub fn enter(kind: Kind) -> Result<(), SandboxError> {
    if !matches!(kind, Kind::Vmm | Kind::Supervisor | Kind::Scheduler) {
        block_ending_signals();
    }
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    if matches!(kind, Kind::Supervisor | Kind::Scheduler) {
        launcher::start().map_err(SandboxError::Launcher)?;
    }
    // What a crash report reads later, read now while files may be opened.
    let _ = crate::diag::kvm_module();
    let program = compile(kind, mode)?;
    install(kind, &program)?;
    forbidden_call_for_tests(kind);
    Ok(())
}

/// Test-only: with `KVMRUN_TEST_FORBIDDEN_CALL=KIND:CALL` in the
/// environment (KIND as `Kind::name()`, CALL `openat` or `execve`), a
/// thread of that kind makes that call right after its filter is in
/// place, so a test sees what a forbidden call does in a real VM.
const FORBIDDEN_CALL_HOOK: &str = "KVMRUN_TEST_FORBIDDEN_CALL";

fn forbidden_call_for_tests(kind: Kind) {
    let Some(v) = std::env::var_os(FORBIDDEN_CALL_HOOK) else {
        return;
    };
    let v = v.to_string_lossy();
    let Some((k, call)) = v.split_once(':') else {
        return;
    };
    if k != kind.name() {
        return;
    }
    // SAFETY: plain calls with constant, NUL-terminated arguments; a
    // filter that allows them makes them do nothing lasting (the file is
    // closed, /bin/true replaces kvmrun only where the test asks for it).
    unsafe {
        match call {
            "openat" => {
                let fd = libc::openat(libc::AT_FDCWD, c"/proc/self/status".as_ptr(), 0);
                if fd >= 0 {
                    libc::close(fd);
                }
            }
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            _ => {}
        }
    }
}

/// Install `program`, compiled for `kind`, on the calling thread; no
/// allocation from here on, so a child process may call it after fork.
fn install(kind: Kind, program: &BpfProgram) -> Result<(), SandboxError> {
    install_report_handler();
    THREAD.set(Label::of(kind));
    seccompiler::apply_filter(program).map_err(|e| SandboxError::Install {
        kind: kind.name(),
        reason: e.to_string(),
    })
}

/// Leave SIGINT, SIGTERM, SIGHUP and SIGQUIT to the thread that started
/// this one: their handlers (term.rs) restore the terminal, which only
/// the VMM thread's filter allows.
fn block_ending_signals() {
    // SAFETY: a sigset built with sigemptyset/sigaddset; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The BPF program of `kind` in `mode` (`On` or `Log`).
pub fn compile(kind: Kind, mode: Mode) -> Result<BpfProgram, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Compile {
        kind: kind.name(),
        reason: e.to_string(),
    };
    let mut any = BTreeSet::new();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for r in kind.rules() {
        let list = rules.entry(r.nr).or_default();
        match r.args {
            lists::Args::Any => {
                any.insert(r.nr);
            }
            lists::Args::OneOf { index, values } => {
                for &v in values {
                    let c =
                        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                            .map_err(err)?;
                    list.push(SeccompRule::new(vec![c]).map_err(err)?);
                }
            }
            lists::Args::HasBits { index, bits } => {
                let c = SeccompCondition::new(
                    index,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(bits),
                    bits,
                )
                .map_err(err)?;
                list.push(SeccompRule::new(vec![c]).map_err(err)?);
            }
        }
    }
    // An empty rule list allows the call whatever its arguments.
    for nr in any {
        rules.insert(nr, Vec::new());
    }
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    let program: BpfProgram = filter.try_into().map_err(err)?;
    Ok(with_clone3_enosys(program))
}

/// `program` behind a prefix that answers `clone3` with ENOSYS (see
/// `lists`): glibc then starts threads with `clone`, whose flags the
/// filter checks.
fn with_clone3_enosys(program: BpfProgram) -> BpfProgram {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut out = vec![
        // seccomp_data.arch; another architecture goes to the program,
        // which refuses it.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        // seccomp_data.nr
        op(LD_W_ABS, 0, 0, 0),
        op(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    out.extend(program);
    out
}

/// Which thread this is, for the report of a forbidden call; read in a
/// signal handler, so a plain `Copy` value in const-initialized TLS.
#[derive(Clone, Copy)]
struct Label {
    name: [u8; 16],
    len: u8,
    kind: Option<Kind>,
}

impl Label {
    const NONE: Label = Label {
        name: [0; 16],
        len: 0,
        kind: None,
    };

    fn of(kind: Kind) -> Label {
        let mut l = Label {
            kind: Some(kind),
            ..Label::NONE
        };
        let t = std::thread::current();
        let name = t.name().unwrap_or("unnamed").as_bytes();
        let n = name.len().min(l.name.len());
        l.name[..n].copy_from_slice(&name[..n]);
        l.len = n as u8;
        l
    }
}

thread_local! {
    static THREAD: Cell<Label> = const { Cell::new(Label::NONE) };
}

/// A message built without allocating, for the signal handler.
struct Msg {
    buf: [u8; 384],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = v.saturating_neg();
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report of a forbidden call `nr` made by `thread`.
fn report(thread: Label, nr: i64) -> Msg {
    let mut m = Msg {
        buf: [0; 384],
        len: 0,
    };
    m.push(b"kvmrun: error: seccomp: thread '");
    m.push(&thread.name[..thread.len as usize]);
    m.push(b"' made the system call ");
    m.push(names::name(nr).unwrap_or("(unknown)").as_bytes());
    m.push(b" (");
    m.number(nr);
    m.push(b"), which the ");
    m.push(thread.kind.map_or("", Kind::name).as_bytes());
    m.push(b" filter of src/sandbox/lists.rs forbids: a kvmrun bug, or a guest exploiting one; ending kvmrun\n");
    m
}

/// Byte offset of `si_syscall` in the x86-64 `siginfo_t` of a SIGSYS:
/// signo, errno, code, padding, then `void *si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a siginfo_t filled for SIGSYS (the
    // handler is installed with SA_SIGINFO), which holds si_syscall here.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let m = report(THREAD.get(), i64::from(nr));
    // SAFETY: write() and _exit() are async-signal-safe, and every
    // filter allows them.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(STATUS_SECCOMP);
    }
}

fn install_report_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a valid handler and flags; the
        // handler only uses async-signal-safe calls.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                log::warn!(
                    "cannot catch SIGSYS: a forbidden system call will kill kvmrun without a report"
                );
            }
        }
    });
}

#[cfg(test)]
mod tests;
