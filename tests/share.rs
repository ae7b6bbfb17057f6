//! virtio-fs shares (`--share`) with our fs guest, which speaks FUSE on
//! the device's queue, on both transports: a host file read, one
//! written (and found on the host), `ro` refusing changes, the escapes
//! (`..` at the root, a name with a slash, a symbolic link to /etc)
//! staying inside, no device node made or opened, and every bad `--share` refused before the guest
//! starts with a message naming the directory and the problem.

mod common;

use std::path::{Path, PathBuf};

use common::{kvm_available, run_guest, Run};

const PASS: i32 = 1;
const HELLO: &str = "hello from the host\n";

/// `top/secret` and the shared `top/share` with `hello` and a link `etc`
/// to /etc, as the guest expects; the share's path.
fn share_tree(top: &Path) -> PathBuf {
    std::fs::write(top.join("secret"), b"outside").unwrap();
    let share = top.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello"), HELLO).unwrap();
    std::os::unix::fs::symlink("/etc", share.join("etc")).unwrap();
    share
}

/// Put a character device `null` (1:3) in `share` when running as root
/// (only root makes one): whether it is there, the guest's `null`
/// argument.
fn host_null(share: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: no device node in the share to check");
        return false;
    }
    let path = std::ffi::CString::new(share.join("null").into_os_string().into_encoded_bytes());
    let path = path.unwrap();
    // SAFETY: a valid C string; the result is checked.
    let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
    true
}

/// The guest's arguments, `null` added when the share holds one.
fn with_null<'a>(args: &[&'a str], null: bool) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if null {
        v.push("null");
    }
    v
}

fn run_fs(shares: &[String], guest_args: &[&str]) -> Run {
    let mut args: Vec<&str> = Vec::new();
    for s in shares {
        args.extend(["--share", s]);
    }
    args.push("--");
    args.extend(guest_args);
    run_guest("fs", &args)
}

#[test]
fn a_share_is_read_and_written_on_both_transports() {
    if !kvm_available() {
        return;
    }
    for t in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        let share = share_tree(d.path());
        let null = host_null(&share);
        let arg = format!("{},tag=data,transport={t}", share.display());
        let transport = format!("transport={t}");
        let r = run_fs(&[arg], &with_null(&[&transport, "tag=data"], null));
        let r = r
            .expect(PASS)
            .has("tag 'data', 1 request queues")
            .has("PASS: dotdot-is-root")
            .has("PASS: secret-not-found")
            .has("PASS: slash-refused")
            .has("PASS: link-not-followed")
            .has("PASS: mknod-device-refused")
            .has("PASS: mknod-fifo");
        if null {
            r.has("PASS: device-not-opened")
                .has("SUMMARY: 19 tests, 0 unexpected failures");
        } else {
            r.has("SUMMARY: 18 tests, 0 unexpected failures");
        }
        let written = std::fs::read_to_string(share.join("from-guest")).unwrap();
        assert_eq!(written, "written by the guest\n", "{t}");
        assert!(!share.join("disk").exists(), "{t}: a device node made");
    }
}

#[test]
fn a_read_only_share_refuses_every_change() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let share = share_tree(d.path());
    let null = host_null(&share);
    // The default tag is the directory's name.
    let r = run_fs(
        &[format!("{},ro", share.display())],
        &with_null(&["transport=pci", "tag=share", "mode=ro"], null),
    );
    let r = r
        .expect(PASS)
        .has("PASS: ro-create-refused")
        .has("PASS: ro-mkdir-refused")
        .has("PASS: ro-write-refused");
    if null {
        r.has("PASS: device-not-opened")
            .has("SUMMARY: 19 tests, 0 unexpected failures");
    } else {
        r.has("SUMMARY: 18 tests, 0 unexpected failures");
    }
    assert_eq!(std::fs::read_to_string(share.join("hello")).unwrap(), HELLO);
    let names: Vec<_> = std::fs::read_dir(&share).unwrap().collect();
    assert_eq!(names.len(), 2 + usize::from(null), "nothing created");
}

/// A bad `--share`: status 2, the message, no panic, no guest output.
fn refused(shares: &[String], needle: &str) {
    let r = run_fs(shares, &["transport=pci", "tag=x"]);
    r.expect(2).err_has(needle);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!r.stdout.contains("PASS"), "the guest ran: {}", r.stdout);
}

#[test]
fn bad_shares_are_refused_before_the_guest_starts() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let share = share_tree(d.path());
    let s = share.display().to_string();
    refused(
        &[format!("{}/missing", s)],
        "missing: No such file or directory",
    );
    refused(&[format!("{s}/hello")], "hello: not a directory");
    refused(&[format!("{s},rw")], "unknown option 'rw'");
    refused(&[format!("{s},tag=")], "must be 1 to 36 bytes");
    refused(
        &[format!("{s},tag={}", "t".repeat(37))],
        "must be 1 to 36 bytes",
    );
    refused(
        &[format!("{s},transport=usb")],
        "unknown virtio transport 'usb'",
    );
    refused(
        &[s.clone(), format!("{s},ro,transport=mmio")],
        "tag 'share' is taken by another share",
    );
    let nine: Vec<String> = (0..9).map(|i| format!("{s},tag=t{i}")).collect();
    refused(&nine, "9 shared directories, at most 8");
}
