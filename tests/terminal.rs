//! The host terminal: raw while the guest runs, restored however kvmrun
//! ends.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;

use common::{kvm_available, kvmrun, raw_image};

fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; the null pointers ask for defaults.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both fds are fresh and owned here.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

fn lflag(fd: &OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: plain data filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid to write.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

fn image(code: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    std::fs::write(&p, raw_image(code)).unwrap();
    (d, p)
}

#[test]
fn terminal_is_restored_after_a_guest_exit() {
    if !kvm_available() {
        return;
    }
    let (_master, slave) = openpty();
    let before = lflag(&slave);
    assert_ne!(before & libc::ICANON, 0);
    // mov al, 1; out 0xf4, al
    let (_d, p) = image(&[0xb0, 0x01, 0xe6, 0xf4, 0xeb, 0xfe]);
    let st = kvmrun()
        .args(["run", "--timeout", "60"])
        .arg(&p)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(3));
    assert_eq!(lflag(&slave), before);
}

#[test]
fn terminal_is_restored_when_kvmrun_is_killed() {
    if !kvm_available() {
        return;
    }
    let (_master, slave) = openpty();
    let before = lflag(&slave);
    // jmp $: runs until killed.
    let (_d, p) = image(&[0xeb, 0xfe]);
    let mut child = kvmrun()
        .args(["run", "--timeout", "120"])
        .arg(&p)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for raw mode (no line editing), however long start-up takes.
    while lflag(&slave) & libc::ICANON != 0 {
        assert!(child.try_wait().unwrap().is_none(), "kvmrun ended early");
        std::thread::yield_now();
    }
    assert_ne!(lflag(&slave) & libc::ISIG, 0, "Ctrl-C must still work");
    // SAFETY: the pid is our live child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGTERM));
    assert_eq!(lflag(&slave), before);
}
