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

/// A FUSE request as the guest's virtio-fs driver sends it, from guest
/// user `user` (its uid and gid).
fn fuse(opcode: u32, node: u64, user: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&u64::from(opcode).to_le_bytes());
    m.extend_from_slice(&node.to_le_bytes());
    for v in [user, user, 1, 0] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m.extend_from_slice(body);
    m
}

/// `words` little-endian, then `names` each with its NUL.
fn body(words: &[u64], names: &[&str]) -> Vec<u8> {
    let mut b: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    for n in names {
        b.extend_from_slice(n.as_bytes());
        b.push(0);
    }
    b
}

/// The node ID in a reply's `struct fuse_entry_out`.
fn node_of(reply: &[u8]) -> u64 {
    assert_eq!(&reply[4..8], &[0; 4], "error reply {reply:?}");
    u64::from_le_bytes(reply[16..24].try_into().unwrap())
}

/// A virtio-fs share's every kind of request under the VMM thread's
/// filter, as the VMM thread serves them (a forbidden call ends the
/// test binary with the report naming it).
#[test]
fn the_vmm_thread_serves_a_share() {
    use devices::virtio::fs::share::MAX_MESSAGE;
    use devices::virtio::fs::Share;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"hello").unwrap();
    // The guest user may create files in the directory.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let share = Share::open(dir.path(), false).unwrap();
    let program = compile(Kind::Vmm, Mode::On).unwrap();
    // A guest user the share switches to to create files when kvmrun may
    // (as root), else the guest's root (files are then kvmrun's user's).
    // SAFETY: geteuid has no preconditions.
    let user: u32 = if unsafe { libc::geteuid() } == 0 {
        1000
    } else {
        0
    };
    // SAFETY: as above.
    let me = u64::from(unsafe { libc::geteuid() }) | u64::from(unsafe { libc::getegid() }) << 32;
    let worker = std::thread::spawn(move || {
        install(Kind::Vmm, &program).unwrap();
        let call = |op, node, b: &[u8]| {
            let r = share.handle(fuse(op, node, user, b), MAX_MESSAGE);
            // Every request reached the file system (LSEEK is answered
            // before it, FORGET has no reply).
            assert!(matches!(op, 2 | 46) || r[4..8] == [0; 4], "{op}: {r:?}");
            r
        };
        // INIT 7.31 with no_open and no_opendir support.
        call(
            26,
            0,
            &body(&[31 << 32 | 7, (1 << 17 | 1 << 24) << 32], &[]),
        );
        let file = node_of(&call(1, 1, &body(&[], &["file"])));
        // READ 5 bytes; WRITE 3 at offset 5 (flags O_RDWR).
        call(15, file, &body(&[0, 0, 5, 0, 0], &[]));
        let mut w = body(&[0, 5, 3, 0, 2], &[]);
        w.extend_from_slice(b"abc");
        call(16, file, &w);
        // CREATE, MKDIR, SYMLINK, LINK as the guest user.
        let created = node_of(&call(35, 1, &body(&[0o100644 << 32 | 0o101, 0], &["new"])));
        let sub = node_of(&call(9, 1, &body(&[0o755], &["sub"])));
        let link = node_of(&call(6, 1, &body(&[], &["l", "file"])));
        call(5, link, &[]);
        call(13, sub, &body(&[created], &["hard"]));
        // SETATTR mode, size, times, owner (to kvmrun's IDs, which any
        // user may give); FALLOCATE; FSYNC; LSEEK.
        for (valid, at, v) in [
            (1u64, 68, 0o100600u64),
            (8, 16, 2),
            (48, 32, 1),
            (6, 76, me),
        ] {
            let mut sa = vec![0u8; 88];
            sa[0..8].copy_from_slice(&valid.to_le_bytes());
            sa[at..at + 8].copy_from_slice(&v.to_le_bytes());
            call(4, created, &sa);
        }
        call(43, created, &body(&[0, 0, 4096, 0], &[]));
        call(20, created, &body(&[0, 0], &[]));
        call(46, created, &body(&[0, 0, 3], &[]));
        // READDIRPLUS, STATFS, GETATTR, RENAME, RENAME2, UNLINK, RMDIR.
        call(44, sub, &body(&[0, 0, 4096, 0, 0], &[]));
        call(17, 1, &[]);
        call(3, file, &body(&[0, 0], &[]));
        call(12, 1, &body(&[sub], &["new", "moved"]));
        call(45, sub, &body(&[1, 0], &["moved", "back"]));
        call(10, 1, &body(&[], &["back"]));
        call(10, sub, &body(&[], &["hard"]));
        call(11, 1, &body(&[], &["sub"]));
        // FORGET; the snapshot's paths of what the guest holds.
        call(2, link, &body(&[1], &[]));
        share.save()
    });
    let saved = worker.join().unwrap();
    assert!(!saved.inodes.is_empty());
    assert!(!dir.path().join("sub").exists());
}
