//! The filters at work: each case forks a child process that installs a
//! filter and makes one system call; the parent reads the child's exit
//! status and what it wrote on stderr.

use std::io::Read;
use std::os::fd::FromRawFd;

use super::*;

/// What one child did.
#[derive(Debug)]
struct Outcome {
    status: i32,
    stderr: String,
}

/// Fork; in the child, install `kind`'s filter in `mode` and run `call`,
/// then exit with what it returns.
fn in_child(kind: Kind, mode: Mode, call: fn() -> i32) -> Outcome {
    let program = compile(kind, mode).expect("filter compiles");
    install_report_handler();
    let mut fds = [0; 2];
    // SAFETY: pipe() fills two fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the child only makes async-signal-safe calls (dup2, the
    // filter's prctl and seccomp, the call under test, _exit): install()
    // does not allocate.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            libc::dup2(fds[1], 2);
            let code = match install(kind, &program) {
                Ok(()) => call(),
                Err(_) => 100,
            };
            libc::_exit(code);
        }
    }
    // SAFETY: the write end belongs to this process; the read end is
    // owned by the File from now on.
    unsafe { libc::close(fds[1]) };
    let mut stderr = String::new();
    let _ = unsafe { std::fs::File::from_raw_fd(fds[0]) }.read_to_string(&mut stderr);
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -libc::WTERMSIG(status)
    };
    Outcome { status, stderr }
}

fn open_file() -> i32 {
    // SAFETY: a plain openat of a constant path.
    let fd = unsafe { libc::openat(libc::AT_FDCWD, c"/proc/self/status".as_ptr(), 0) };
    if fd >= 0 {
        0
    } else {
        1
    }
}

fn exec_true() -> i32 {
    let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid, NULL-terminated argv and envp.
    unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    1
}

fn kvm_run_on_a_bad_fd() -> i32 {
    // SAFETY: an ioctl on an fd that is not open only fails.
    let r = unsafe { libc::ioctl(-1, lists::KVM_RUN as _, 0) };
    let e = std::io::Error::last_os_error().raw_os_error();
    if r < 0 && e == Some(libc::EBADF) {
        0
    } else {
        1
    }
}

fn tcgets_on_stdin() -> i32 {
    let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
    // SAFETY: TCGETS fills a termios.
    unsafe { libc::ioctl(0, libc::TCGETS, t.as_mut_ptr()) };
    0
}

fn clone3() -> i32 {
    // SAFETY: a clone3 with a null argument block fails either way; the
    // filter must answer it before the kernel sees it.
    let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
    let e = std::io::Error::last_os_error().raw_os_error();
    if r < 0 && e == Some(libc::ENOSYS) {
        0
    } else {
        1
    }
}

fn fork_by_clone() -> i32 {
    // SAFETY: clone with SIGCHLD only is fork(); the filter must stop it.
    let r = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
    if r == 0 {
        // SAFETY: the grandchild leaves at once.
        unsafe { libc::_exit(0) };
    }
    1
}

fn inet_socket() -> i32 {
    // SAFETY: socket() only returns an fd or fails.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    0
}

#[test]
fn every_filter_compiles_in_every_mode() {
    for kind in Kind::ALL {
        for mode in [Mode::On, Mode::Log] {
            let p = compile(kind, mode).unwrap();
            assert!(
                p.len() < 4096,
                "{} has {} instructions",
                kind.name(),
                p.len()
            );
        }
    }
}

/// What a vCPU thread cannot do: open a file or run a program.
#[test]
fn a_vcpu_thread_cannot_open_or_exec() {
    let o = in_child(Kind::Vcpu, Mode::On, open_file);
    assert_eq!(o.status, STATUS_SECCOMP, "{o:?}");
    assert!(o.stderr.contains("system call openat (257)"), "{o:?}");
    assert!(o.stderr.contains("the vcpu filter"), "{o:?}");
    let o = in_child(Kind::Vcpu, Mode::On, exec_true);
    assert_eq!(o.status, STATUS_SECCOMP, "{o:?}");
    assert!(o.stderr.contains("system call execve (59)"), "{o:?}");
    // And what it does every exit.
    assert_eq!(
        in_child(Kind::Vcpu, Mode::On, kvm_run_on_a_bad_fd).status,
        0
    );
    let o = in_child(Kind::Vcpu, Mode::On, tcgets_on_stdin);
    assert_eq!(o.status, STATUS_SECCOMP, "{o:?}");
    assert!(o.stderr.contains("system call ioctl (16)"), "{o:?}");
}

#[test]
fn log_mode_lets_the_call_through() {
    let o = in_child(Kind::Vcpu, Mode::Log, open_file);
    assert_eq!(o.status, 0, "{o:?}");
    assert!(o.stderr.is_empty(), "{o:?}");
}

#[test]
fn threads_may_start_threads_but_not_processes() {
    for kind in [Kind::Vmm, Kind::Supervisor, Kind::Scheduler] {
        assert_eq!(
            in_child(kind, Mode::On, clone3).status,
            0,
            "{}",
            kind.name()
        );
        let o = in_child(kind, Mode::On, fork_by_clone);
        assert_eq!(o.status, STATUS_SECCOMP, "{}: {o:?}", kind.name());
        assert!(o.stderr.contains("system call clone (56)"), "{o:?}");
        let o = in_child(kind, Mode::On, exec_true);
        assert_eq!(o.status, STATUS_SECCOMP, "{}: {o:?}", kind.name());
    }
    let o = in_child(Kind::Supervisor, Mode::On, inet_socket);
    assert_eq!(o.status, STATUS_SECCOMP, "{o:?}");
    assert!(o.stderr.contains("system call socket"), "{o:?}");
}

#[test]
fn the_report_names_thread_call_and_filter() {
    let mut l = Label {
        kind: Some(Kind::Vcpu),
        ..Label::NONE
    };
    l.name[..5].copy_from_slice(b"vcpu3");
    l.len = 5;
    let m = report(l, 257);
    let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
    assert_eq!(
        text,
        "kvmrun: error: seccomp: thread 'vcpu3' made the system call openat (257), which the \
         vcpu filter of src/sandbox/lists.rs forbids: a kvmrun bug, or a guest exploiting one; \
         ending kvmrun\n"
    );
    let m = report(Label::NONE, 999);
    let text = std::str::from_utf8(&m.buf[..m.len]).unwrap();
    assert!(text.contains("system call (unknown) (999)"), "{text}");
}

#[test]
fn modes_parse() {
    for m in ["on", "log", "off"] {
        assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
    }
    assert!("yes"
        .parse::<Mode>()
        .unwrap_err()
        .contains("on, log or off"));
}
