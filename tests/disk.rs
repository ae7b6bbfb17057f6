//! virtio-blk disks (`--disk`) with our blk guest on both transports: the
//! image file afterwards (changed read-write, untouched ro and snapshot),
//! several disks at once, and every bad `--disk` refused before the guest
//! starts with a message naming the file and the problem.

mod common;

use std::path::{Path, PathBuf};

use common::console::Console as Vm;
use common::{guest, kvm_available, run_guest, Run};

const PASS: i32 = 1;
const SECTORS: usize = 2048;

/// A 1 MiB image in `dir`, sector s filled with byte s (mod 256), as the
/// guest expects.
fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, original()).unwrap();
    path
}

fn original() -> Vec<u8> {
    (0..SECTORS).flat_map(|s| [s as u8; 512]).collect()
}

/// What the guest leaves on a read-write disk: sectors 16-23 written with
/// 0xc0 + n, 32-35 and 40-47 zeroed.
fn after_rw() -> Vec<u8> {
    let mut v = original();
    for s in 16..24 {
        v[s * 512..][..512].fill(0xc0 + (s - 16) as u8);
    }
    for s in (32..36).chain(40..48) {
        v[s * 512..][..512].fill(0);
    }
    v
}

fn disk_arg(path: &Path, opts: &str) -> String {
    format!("{}{opts}", path.display())
}

fn run_blk(disks: &[String], guest_args: &[&str]) -> Run {
    let mut args: Vec<&str> = Vec::new();
    for d in disks {
        args.extend(["--disk", d]);
    }
    args.push("--");
    args.extend(guest_args);
    run_guest("blk", &args)
}

#[test]
fn a_read_write_disk_is_read_written_and_zeroed_on_both_transports() {
    if !kvm_available() {
        return;
    }
    for t in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), "rw.img");
        let arg = format!("transport={t}");
        run_blk(&[disk_arg(&img, &format!(",transport={t}"))], &[&arg])
            .expect(PASS)
            .has(&format!("{t}: capacity 2048 sectors"))
            .has(&format!("{t}: id 'rw.img'"))
            .has(&format!("PASS: {t}-discard-read"))
            .has("SUMMARY: 15 tests, 0 unexpected failures");
        assert!(std::fs::read(&img).unwrap() == after_rw(), "{t}: image");
    }
}

#[test]
fn ro_and_snapshot_disks_leave_the_file_untouched() {
    if !kvm_available() {
        return;
    }
    for t in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        let img = image(d.path(), "base.img");
        let arg = format!("transport={t}");
        let ro = disk_arg(&img, &format!(",ro,transport={t}"));
        run_blk(&[ro], &[&arg, "mode=ro"])
            .expect(PASS)
            .has(&format!("PASS: {t}-ro-feature"))
            .has(&format!("PASS: {t}-ro-write-refused"))
            .has(&format!("PASS: {t}-ro-discard-refused"))
            .has(&format!("PASS: {t}-ro-unchanged"));
        // The guest reads back what it wrote, from the overlay.
        let snap = disk_arg(&img, &format!(",snapshot,transport={t}"));
        run_blk(&[snap], &[&arg, "mode=snapshot"])
            .expect(PASS)
            .has(&format!("PASS: {t}-read-back"))
            .has(&format!("PASS: {t}-discard-read"));
        assert!(std::fs::read(&img).unwrap() == original(), "{t}: image");
    }
}

/// A relative path is taken from the directory kvmrun starts in (and
/// kept absolute, for a restore elsewhere).
#[test]
fn a_relative_path_is_found() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    image(d.path(), "here.img");
    let r = Run::from(
        common::kvmrun()
            .current_dir(d.path())
            .arg("run")
            .arg(guest("blk"))
            .args(["--disk", "here.img,ro", "--timeout", "120"])
            .args(["--", "transport=pci", "mode=ro"])
            .output()
            .unwrap(),
    );
    r.expect(PASS).has("pci: id 'here.img'");
}

#[test]
fn several_disks_each_on_its_transport() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let a = image(d.path(), "a.img");
    let b = image(d.path(), "b.img");
    run_blk(
        &[disk_arg(&a, ""), disk_arg(&b, ",transport=mmio")],
        &["transport=both"],
    )
    .expect(PASS)
    .has("pci: id 'a.img'")
    .has("mmio: id 'b.img'")
    .has("SUMMARY: 30 tests, 0 unexpected failures");
    assert!(std::fs::read(&a).unwrap() == after_rw());
    assert!(std::fs::read(&b).unwrap() == after_rw());
}

/// A bad `--disk`: status 2, the message, no panic, no guest output.
fn refused(disks: &[String], needle: &str) {
    let r = run_blk(disks, &["transport=pci"]);
    r.expect(2).err_has(needle);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!r.stdout.contains("PASS"), "the guest ran: {}", r.stdout);
}

#[test]
fn bad_disks_are_refused_before_the_guest_starts() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("missing.img");
    refused(
        &[disk_arg(&missing, "")],
        "missing.img: cannot open: No such file or directory",
    );
    refused(&[disk_arg(d.path(), "")], "is a directory");
    refused(&[disk_arg(d.path(), ",ro")], "is a directory");
    let img = image(d.path(), "x.img");
    refused(&[disk_arg(&img, ",rw")], "invalid --disk");
    refused(&[disk_arg(&img, ",rw")], "unknown option 'rw'");
    refused(
        &[disk_arg(&img, ",transport=usb")],
        "unknown virtio transport 'usb'",
    );
    let empty = d.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    refused(&[disk_arg(&empty, "")], "less than one 512-byte sector");
    // The same read-write file twice in one VM is locked, like two VMs.
    refused(
        &[disk_arg(&img, ""), disk_arg(&img, ",transport=mmio")],
        "x.img: locked by another process",
    );
    let nine: Vec<String> = (0..9).map(|_| disk_arg(&img, ",ro")).collect();
    refused(&nine, "9 disks, at most 8");
}

#[test]
fn an_unreadable_disk_is_refused() {
    if !kvm_available() {
        return;
    }
    // root reads any file whatever its mode: nothing to check as root.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path(), "secret.img");
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o000)).unwrap();
    refused(
        &[disk_arg(&img, ",ro")],
        "secret.img: cannot open: Permission denied",
    );
}

/// A second kvmrun on a read-write disk another one uses is refused;
/// shared (ro, snapshot) users are refused too while it runs.
#[test]
fn a_disk_in_use_by_another_kvmrun_is_refused() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = image(d.path(), "busy.img");
    let image = guest("blk");
    let disk = disk_arg(&img, "");
    let args = [
        "run",
        image.to_str().unwrap(),
        "--disk",
        &disk,
        "--timeout",
        "120",
        "--",
        "transport=pci",
        "wait",
    ];
    let mut first = Vm::spawn(&args);
    first.wait_for("waiting for a key");
    refused(
        &[disk_arg(&img, "")],
        "busy.img: locked by another process (another kvmrun?); a read-write disk is used by one VM at a time",
    );
    refused(
        &[disk_arg(&img, ",snapshot")],
        "busy.img: locked by another process (another kvmrun?); another VM uses it read-write",
    );
    first.key();
    first
        .finish()
        .expect(PASS)
        .has("PASS: after-restore-read-back");
}
