//! The system calls each kind of kvmrun thread may make: the one place
//! to review them. Anything not listed here ends kvmrun (`--seccomp on`)
//! or is logged by the kernel (`--seccomp log`).
//!
//! A thread's filter stacks on the filters of the thread that started
//! it, and the kernel allows a call only if every filter does: the vCPU
//! threads start from the VMM thread, so the vCPU list must be part of
//! the VMM list (a unit test checks it), and the VMM list also holds what
//! a new thread does before its own filter is in place.
//!
//! `clone3` is answered with ENOSYS rather than allowed: its flags sit in
//! memory a filter cannot read, and glibc then falls back to `clone`,
//! whose flags it can (only new threads, `CLONE_THREAD`, are allowed).
//!
//! When a device needs a new call (a disk file's `pread64`, say), it
//! goes into the list of the thread that runs the device code: `VCPU`
//! for register accesses, `VMM` for the event loop.

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_device_attr, kvm_fpu, kvm_guest_debug,
    kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state,
    kvm_mp_state, kvm_msi, kvm_msr_list, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use libc::*;

/// The kinds of thread that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The VMM's main thread: the event loop, the control socket, snapshots,
    /// starting and stopping the vCPU threads.
    Vmm,
    /// A vCPU thread: KVM_RUN and the device register accesses it exits for.
    Vcpu,
    /// The helper that switches the PIT's lost-tick policy (`pit`).
    PitPolicy,
    /// `run --migrate`: the supervisor and its output readers.
    Supervisor,
    /// `kvmrun test`: the scheduler and its progress display.
    Scheduler,
    /// The writer of the guest's serial output (`serial_out`).
    SerialOut,
    /// The gdb stub (`gdb`): its socket, and kicking vCPUs out of KVM_RUN.
    Gdb,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Vmm,
        Kind::Vcpu,
        Kind::PitPolicy,
        Kind::Supervisor,
        Kind::Scheduler,
        Kind::SerialOut,
        Kind::Gdb,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Vcpu => "vcpu",
            Kind::PitPolicy => "pit-policy",
            Kind::Supervisor => "migration supervisor",
            Kind::Scheduler => "test scheduler",
            Kind::SerialOut => "serial-out",
            Kind::Gdb => "gdb",
        }
    }

    /// Everything this kind may call.
    pub fn rules(self) -> Vec<Rule> {
        let groups: &[&[Rule]] = match self {
            Kind::Vmm => &[
                RUNTIME,
                ABORT,
                NEW_THREADS,
                INSTALL,
                VMM,
                VCPU,
                SHARE,
                GUEST_DEBUG,
                KVM_SNAPSHOT,
            ],
            Kind::Vcpu => &[RUNTIME, ABORT, VCPU, GUEST_DEBUG],
            Kind::PitPolicy => &[RUNTIME, ABORT, CLOSE, PIT_POLICY],
            Kind::Supervisor => &[RUNTIME, ABORT, NEW_THREADS, FILES, SUPERVISOR],
            Kind::Scheduler => &[RUNTIME, ABORT, NEW_THREADS, FILES, SCHEDULER],
            // Writing to stdout or a file, waiting for bytes and for
            // room in a pipe, closing the file at the end.
            Kind::SerialOut => &[RUNTIME, ABORT, CLOSE, SERIAL_OUT],
            Kind::Gdb => &[RUNTIME, ABORT, CLOSE, GDB],
        };
        groups.iter().flat_map(|g| g.iter().copied()).collect()
    }
}

/// One allowed system call: any arguments, or only these values of one.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub nr: i64,
    pub args: Args,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Args {
    Any,
    /// Argument `index` equals one of `values`.
    OneOf {
        index: u8,
        values: &'static [u64],
    },
    /// Argument `index` has every bit of `bits` set.
    HasBits {
        index: u8,
        bits: u64,
    },
}

const fn any(nr: i64) -> Rule {
    Rule {
        nr,
        args: Args::Any,
    }
}

const fn one_of(nr: i64, index: u8, values: &'static [u64]) -> Rule {
    Rule {
        nr,
        args: Args::OneOf { index, values },
    }
}

/// ioctl request numbers, as `_IOC()` builds them.
const KVMIO: u64 = 0xae;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(0, nr, 0)
}
const fn iow(nr: u64, size: usize) -> u64 {
    ioc(1, nr, size)
}
const fn ior(nr: u64, size: usize) -> u64 {
    ioc(2, nr, size)
}
const fn iowr(nr: u64, size: usize) -> u64 {
    ioc(3, nr, size)
}
pub const KVM_RUN: u64 = io(0x80);
pub const KVM_INTERRUPT: u64 = iow(0x86, size_of::<u32>());
pub const KVM_GET_REGS: u64 = ior(0x81, size_of::<kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(0x82, size_of::<kvm_regs>());
pub const KVM_GET_SREGS: u64 = ior(0x83, size_of::<kvm_sregs>());
pub const KVM_SET_SREGS: u64 = iow(0x84, size_of::<kvm_sregs>());
pub const KVM_TRANSLATE: u64 = iowr(0x85, size_of::<kvm_translation>());
pub const KVM_GET_MSRS: u64 = iowr(0x88, size_of::<kvm_msrs>());
pub const KVM_GET_FPU: u64 = ior(0x8c, size_of::<kvm_fpu>());
pub const KVM_SET_FPU: u64 = iow(0x8d, size_of::<kvm_fpu>());
pub const KVM_SET_GUEST_DEBUG: u64 = iow(0x9b, size_of::<kvm_guest_debug>());
pub const KVM_GET_LAPIC: u64 = ior(0x8e, size_of::<kvm_lapic_state>());
pub const KVM_GET_CPUID2: u64 = iowr(0x91, size_of::<kvm_cpuid2>());
pub const KVM_GET_MP_STATE: u64 = ior(0x98, size_of::<kvm_mp_state>());
pub const KVM_SET_MP_STATE: u64 = iow(0x99, size_of::<kvm_mp_state>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_GET_DEBUGREGS: u64 = ior(0xa1, size_of::<kvm_debugregs>());
pub const KVM_GET_TSC_KHZ: u64 = io(0xa3);
pub const KVM_GET_XSAVE: u64 = ior(0xa4, size_of::<kvm_xsave>());
pub const KVM_GET_XCRS: u64 = ior(0xa6, size_of::<kvm_xcrs>());
pub const KVM_GET_XSAVE2: u64 = ior(0xcf, size_of::<kvm_xsave>());
pub const KVM_IRQ_LINE: u64 = iow(0x61, size_of::<kvm_irq_level>());
pub const KVM_SIGNAL_MSI: u64 = iow(0xa5, size_of::<kvm_msi>());
pub const KVM_GET_IRQCHIP: u64 = iowr(0x62, size_of::<kvm_irqchip>());
pub const KVM_GET_CLOCK: u64 = ior(0x7c, size_of::<kvm_clock_data>());
/// A vCPU's TSC offset (`snapshot::tsc`).
pub const KVM_GET_DEVICE_ATTR: u64 = iow(0xe2, size_of::<kvm_device_attr>());
pub const KVM_GET_PIT2: u64 = ior(0x9f, size_of::<kvm_pit_state2>());
pub const KVM_GET_MSR_INDEX_LIST: u64 = iowr(0x02, size_of::<kvm_msr_list>());
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, size_of::<kvm_irq_routing>());
pub const KVM_IRQFD: u64 = iow(0x76, size_of::<kvm_irqfd>());
pub const KVM_IOEVENTFD: u64 = iow(0x79, size_of::<kvm_ioeventfd>());
/// `_IO(KVMIO, 0x71)`, though it takes a pointer (see `pit`).
pub const KVM_REINJECT_CONTROL: u64 = io(0x71);

/// What Rust's runtime and the C library do in any thread: locks,
/// memory, signal returns (the vCPU kick), clocks, writing to stderr
/// (logs, this filter's own report), and ending the thread.
const RUNTIME: &[Rule] = &[
    any(SYS_futex),
    any(SYS_mmap),
    any(SYS_munmap),
    any(SYS_mremap),
    any(SYS_mprotect),
    any(SYS_madvise),
    any(SYS_brk),
    any(SYS_rt_sigprocmask),
    any(SYS_rt_sigreturn),
    any(SYS_sigaltstack),
    any(SYS_clock_gettime),
    any(SYS_sched_yield),
    any(SYS_write),
    any(SYS_exit),
    any(SYS_exit_group),
];

/// Closing files; debug builds check an fd is open before they close it.
const CLOSE: &[Rule] = &[any(SYS_close), one_of(SYS_fcntl, 1, &[F_GETFD as u64])];

/// Signals that end kvmrun, and what their handlers do on the way out:
/// a panic aborts (`panic = "abort"`), so abort() may raise SIGABRT and a
/// panic shows as one (status 134), not as a forbidden call; term.rs's
/// handler puts back the terminal's settings (an ioctl the VMM list
/// allows), sets the default action and raises the signal again. Only the
/// threads that start others take these signals (`sandbox::enter()`
/// blocks them elsewhere).
const ENDING: &[u64] = &[
    SIGABRT as u64,
    SIGINT as u64,
    SIGTERM as u64,
    SIGHUP as u64,
    SIGQUIT as u64,
];
const ABORT: &[Rule] = &[
    any(SYS_getpid),
    any(SYS_gettid),
    one_of(SYS_tgkill, 2, ENDING),
    one_of(SYS_rt_sigaction, 0, ENDING),
];

/// Starting threads (glibc's pthread_create and what a new thread does
/// before its own filter). glibc sets up its two internal signals
/// (SIGCANCEL, SIGSETXID: the first two real-time ones) when the process
/// starts its first thread.
const NEW_THREADS: &[Rule] = &[
    one_of(SYS_rt_sigaction, 0, &[32, 33]),
    Rule {
        nr: SYS_clone,
        args: Args::HasBits {
            index: 0,
            bits: CLONE_THREAD as u64,
        },
    },
    any(SYS_set_robust_list),
    any(SYS_rseq),
    any(SYS_sched_getaffinity),
    one_of(SYS_prctl, 0, &[PR_SET_NAME as u64]),
];

/// A new thread putting its own filter on top (vCPU threads).
const INSTALL: &[Rule] = &[
    one_of(SYS_prctl, 0, &[PR_SET_NO_NEW_PRIVS as u64]),
    one_of(SYS_seccomp, 0, &[SECCOMP_SET_MODE_FILTER as u64]),
];

/// A vCPU thread: KVM_RUN, the halt check, the crash report's registers
/// and address translation, interrupt lines (pc-testdev, PCI INTx,
/// virtio-mmio; with the split irqchip, the IOAPIC's KVM_SIGNAL_MSI),
/// and the page flush (mprotect, in RUNTIME). Device output
/// and interrupts are writes (the serial queue, an irqfd, MSI-X vectors),
/// in RUNTIME. The PCI register accesses a guest makes from here: MSI-X
/// vectors routed and unrouted as the guest unmasks, masks and
/// reprograms them (KVM_SET_GSI_ROUTING), BARs moved with the queue
/// notifications inside them (KVM_IOEVENTFD). A virtio queue notified
/// through its register rather than an ioeventfd is served here:
/// virtio-rng's getrandom, virtio-blk's DISK_IO (virtio-fs opens files:
/// its queues are handed to the VMM thread, `serves_on_vmm_thread()`).
const VCPU: &[Rule] = &[
    one_of(
        SYS_ioctl,
        1,
        &[
            KVM_RUN,
            KVM_INTERRUPT,
            KVM_GET_MP_STATE,
            KVM_GET_REGS,
            KVM_GET_SREGS,
            KVM_GET_VCPU_EVENTS,
            KVM_TRANSLATE,
            KVM_IRQ_LINE,
            KVM_SIGNAL_MSI,
            KVM_SET_GSI_ROUTING,
            KVM_IOEVENTFD,
        ],
    ),
    any(SYS_getrandom),
    any(SYS_pread64),
    any(SYS_pwrite64),
    any(SYS_fdatasync),
    DISK_ZERO,
    // The split irqchip's PIT re-arms its timer on guest writes, and its
    // PIC kicks vCPU 0 (tgkill) when a device on any vCPU raises a line.
    any(SYS_timerfd_settime),
    one_of(SYS_tgkill, 2, KICK),
];

/// virtio-fs (`devices::virtio::fs`): fuse-backend-rs's passthrough file
/// system serving a guest's FUSE requests on the shared directory. Every
/// path is resolved with the `*at()` calls from a descriptor the share
/// holds (or the share's `/proc/self/fd`), never from the working
/// directory: openat, statx/newfstatat, getdents64, readlinkat and the
/// calls that change the tree (mkdirat, mknodat, symlinkat, linkat,
/// unlinkat, renameat2, fchmodat/fchmod, fchownat, utimensat,
/// ftruncate, fallocate in any mode on the guest's files); file data
/// with preadv/pwritev, fsync/fdatasync, fstatfs, lseek and dup. The
/// reply goes to a memfd (writev, lseek, pread64, in RUNTIME or here).
/// umask is cleared around each request so the guest's modes are kept;
/// setresuid and setresgid switch the serving thread's effective IDs to
/// the guest caller's for creating files (the passthrough's own calls,
/// `syscall()` on this thread only) and back.
const SHARE: &[Rule] = &[
    any(SYS_openat),
    any(SYS_close),
    any(SYS_dup),
    any(SYS_fcntl),
    any(SYS_lseek),
    any(SYS_statx),
    any(SYS_newfstatat),
    any(SYS_getdents64),
    any(SYS_readlinkat),
    any(SYS_mkdirat),
    any(SYS_mknodat),
    any(SYS_symlinkat),
    any(SYS_linkat),
    any(SYS_unlinkat),
    any(SYS_renameat2),
    any(SYS_fchmodat),
    any(SYS_fchmod),
    any(SYS_fchownat),
    any(SYS_utimensat),
    any(SYS_ftruncate),
    any(SYS_fallocate),
    any(SYS_preadv),
    any(SYS_pwritev),
    any(SYS_writev),
    any(SYS_fsync),
    any(SYS_fstatfs),
    any(SYS_umask),
    any(SYS_setresuid),
    any(SYS_setresgid),
];

/// virtio-blk's requests on its image (and snapshot overlay) beyond
/// pread64/pwrite64/fdatasync: DISCARD punches a hole, WRITE_ZEROES
/// zeroes a range, neither changing the file's size.
const DISK_ZERO: Rule = one_of(
    SYS_fallocate,
    1,
    &[
        (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
        (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) as u64,
    ],
);

/// What a vCPU stopped for gdb runs for the stub (`vcpu::debug`): its
/// registers read and written, guest debugging (breakpoints, single
/// steps, the guest's own int3 given back). Only the guest is touched.
const GUEST_DEBUG: &[Rule] = &[one_of(
    SYS_ioctl,
    1,
    &[
        KVM_GET_FPU,
        KVM_SET_FPU,
        KVM_SET_REGS,
        KVM_SET_SREGS,
        KVM_SET_GUEST_DEBUG,
    ],
)];

/// The signal that kicks a vCPU (`vcpu::kick_signal()`, glibc's first
/// real-time signal free for applications).
const KICK: &[u64] = &[34];

/// The gdb stub thread: accepting gdb and talking to it, waiting on the
/// socket and the vCPUs' event fd, kicking vCPUs out of KVM_RUN, removing
/// its Unix socket at the end. It starts before the VMM thread's filter,
/// so this list is all that applies to it.
const GDB: &[Rule] = &[
    any(SYS_accept4),
    any(SYS_read),
    any(SYS_recvfrom),
    any(SYS_sendto),
    any(SYS_poll),
    any(SYS_ppoll),
    any(SYS_setsockopt),
    any(SYS_unlink),
    any(SYS_unlinkat),
    one_of(SYS_tgkill, 2, KICK),
];

/// Reading and writing files: suites, logs, reports, work directories.
const FILES: &[Rule] = &[
    any(SYS_read),
    any(SYS_close),
    any(SYS_openat),
    any(SYS_lseek),
    any(SYS_fstat),
    any(SYS_newfstatat),
    any(SYS_statx),
    any(SYS_getdents64),
    any(SYS_mkdir),
    any(SYS_mkdirat),
    any(SYS_unlink),
    any(SYS_unlinkat),
    any(SYS_rmdir),
    any(SYS_rename),
    any(SYS_renameat),
    any(SYS_renameat2),
    any(SYS_fcntl),
    any(SYS_readlink),
    any(SYS_getrandom),
    any(SYS_clock_nanosleep),
    any(SYS_nanosleep),
    any(SYS_poll),
    any(SYS_ppoll),
    // A terminal's size (the progress bar), non-blocking pipes (reading
    // a child's stdout and stderr together).
    one_of(SYS_ioctl, 1, &[TCGETS, TIOCGWINSZ, FIONBIO]),
];

/// The VMM thread once the guest runs: the event loop (timers, eventfds,
/// stdin, virtio queue notifications: ioeventfd reads, virtio-rng's
/// getrandom, virtio-blk's pread64/pwrite64/fdatasync and DISK_ZERO,
/// virtio-fs's SHARE, interrupts as irqfd writes), the control socket, kicking
/// and joining vCPU threads, S3 wake-up, the terminal restored at the
/// end, writing snapshots (`KVM_SNAPSHOT` for the KVM side), tearing
/// the devices down (their irqfds, MSI routes and ioeventfds), and after
/// `run --rootfs`, reading the status port's file and the kernel log and
/// removing the run's work directory.
const VMM: &[Rule] = &[
    any(SYS_read),
    any(SYS_close),
    any(SYS_epoll_wait),
    any(SYS_epoll_pwait),
    any(SYS_epoll_ctl),
    any(SYS_timerfd_settime),
    any(SYS_accept4),
    any(SYS_recvfrom),
    any(SYS_sendto),
    any(SYS_poll),
    any(SYS_fcntl),
    any(SYS_tgkill),
    any(SYS_mincore),
    any(SYS_openat),
    any(SYS_mkdir),
    any(SYS_mkdirat),
    any(SYS_unlink),
    any(SYS_unlinkat),
    any(SYS_rmdir),
    any(SYS_getdents64),
    any(SYS_rename),
    any(SYS_renameat),
    any(SYS_renameat2),
    any(SYS_fsync),
    any(SYS_fdatasync),
    any(SYS_ftruncate),
    any(SYS_pread64),
    any(SYS_pwrite64),
    any(SYS_lseek),
    any(SYS_fstat),
    any(SYS_newfstatat),
    any(SYS_statx),
    any(SYS_getrandom),
    DISK_ZERO,
    one_of(
        SYS_ioctl,
        1,
        &[
            FIONBIO,
            TCGETS,
            TCSETS,
            TCSETSW,
            TCSETSF,
            KVM_SET_REGS,
            KVM_SET_SREGS,
            KVM_SET_MP_STATE,
            KVM_IRQFD,
        ],
    ),
];

/// What `Machine::save()` reads from KVM for a snapshot.
const KVM_SNAPSHOT: &[Rule] = &[one_of(
    SYS_ioctl,
    1,
    &[
        KVM_CHECK_EXTENSION,
        KVM_GET_MSR_INDEX_LIST,
        KVM_GET_CPUID2,
        KVM_GET_TSC_KHZ,
        KVM_GET_FPU,
        KVM_GET_XSAVE,
        KVM_GET_XSAVE2,
        KVM_GET_XCRS,
        KVM_GET_MSRS,
        KVM_GET_LAPIC,
        KVM_GET_DEBUGREGS,
        KVM_GET_IRQCHIP,
        KVM_GET_PIT2,
        KVM_GET_CLOCK,
        KVM_GET_DEVICE_ATTR,
    ],
)];

/// Waiting for room in a non-blocking pipe (`serial_out::PipeWriter`).
const SERIAL_OUT: &[Rule] = &[any(SYS_poll), any(SYS_ppoll)];

const PIT_POLICY: &[Rule] = &[one_of(SYS_ioctl, 1, &[KVM_REINJECT_CONTROL])];

/// `run --migrate`: pipes to and from the VMs, their control sockets,
/// waiting for them to end. The VMs are started by a launcher thread
/// without this filter (`sandbox::Launcher`).
const SUPERVISOR: &[Rule] = &[
    one_of(SYS_socket, 0, &[AF_UNIX as u64]),
    any(SYS_connect),
    any(SYS_recvfrom),
    any(SYS_sendto),
    any(SYS_wait4),
];

/// `kvmrun test`: waiting for and killing the tests' processes (started
/// by the launcher thread), reading their logs, writing reports, and
/// asking a boot-once group's VM for its snapshot on its control socket.
const SCHEDULER: &[Rule] = &[
    one_of(SYS_socket, 0, &[AF_UNIX as u64]),
    any(SYS_connect),
    any(SYS_recvfrom),
    any(SYS_sendto),
    any(SYS_wait4),
    any(SYS_kill),
    any(SYS_ftruncate),
    any(SYS_fsync),
    any(SYS_pwrite64),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_kvm() {
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};
        ioctl_io_nr!(RUN, KVMIO as u32, 0x80);
        ioctl_ior_nr!(GET_REGS, KVMIO as u32, 0x81, kvm_regs);
        ioctl_iowr_nr!(TRANSLATE, KVMIO as u32, 0x85, kvm_translation);
        ioctl_iow_nr!(IRQ_LINE, KVMIO as u32, 0x61, kvm_irq_level);
        assert_eq!(KVM_RUN, RUN() as u64);
        assert_eq!(KVM_GET_REGS, GET_REGS() as u64);
        assert_eq!(KVM_TRANSLATE, TRANSLATE() as u64);
        assert_eq!(KVM_IRQ_LINE, IRQ_LINE() as u64);
        // From <linux/kvm.h> as compiled for x86-64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_INTERRUPT, 0x4004_ae86);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(KVM_IRQFD, 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(KVM_GET_DEVICE_ATTR, 0x4018_aee2);
    }

    /// What `b` allows of `a`'s rule for the same call.
    fn covers(b: &[Rule], a: &Rule) -> bool {
        let same: Vec<&Rule> = b.iter().filter(|r| r.nr == a.nr).collect();
        if same.iter().any(|r| r.args == Args::Any) {
            return true;
        }
        match a.args {
            Args::Any => false,
            Args::OneOf { index, values } => values.iter().all(|v| {
                same.iter().any(|r| match r.args {
                    Args::OneOf {
                        index: i,
                        values: vs,
                    } => i == index && vs.contains(v),
                    _ => false,
                })
            }),
            Args::HasBits { .. } => same.iter().any(|r| r.args == a.args),
        }
    }

    /// vCPU threads start under the VMM thread's filter: every call the
    /// vCPU list allows must pass the VMM list too.
    #[test]
    fn the_vcpu_list_is_part_of_the_vmm_list() {
        let vmm = Kind::Vmm.rules();
        for r in Kind::Vcpu.rules() {
            assert!(
                covers(&vmm, &r),
                "{:?} ({:?})",
                super::super::names::name(r.nr),
                r
            );
        }
    }

    #[test]
    fn the_kick_signal_is_the_one_the_gdb_list_allows() {
        assert_eq!(KICK, &[crate::vcpu::kick_signal() as u64]);
    }

    #[test]
    fn no_thread_may_exec_or_ptrace() {
        for k in Kind::ALL {
            for r in k.rules() {
                assert!(
                    ![
                        SYS_execve,
                        SYS_execveat,
                        SYS_ptrace,
                        SYS_process_vm_writev,
                        SYS_fork
                    ]
                    .contains(&r.nr),
                    "{} may call {:?}",
                    k.name(),
                    super::super::names::name(r.nr)
                );
            }
        }
        let vcpu = Kind::Vcpu.rules();
        for nr in [SYS_open, SYS_openat, SYS_socket, SYS_clone, SYS_read] {
            assert!(
                vcpu.iter().all(|r| r.nr != nr),
                "{:?}",
                super::super::names::name(nr)
            );
        }
    }
}
