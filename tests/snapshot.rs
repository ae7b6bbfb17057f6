//! Snapshot and restore on real KVM with our checksum guest: a run that
//! is snapshotted anywhere and restored must end exactly as an
//! uninterrupted run does, however often and from wherever it is restored.
//!
//! The guest waits for a key on COM1 between its two phases, so the VM
//! cannot end before the test has taken its snapshots: where each one
//! lands is left to chance, and the assertions hold wherever it lands.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use common::console::{ctl, wait_socket, Console as Vm};
use common::{guest, kvm_available, kvmrun, Run};

const PASS: i32 = 1;

fn snapshot(sock: &Path, dir: &Path) {
    ctl(&["snapshot", sock.to_str().unwrap(), dir.to_str().unwrap()])
        .expect(0)
        .has("\"ok\":true")
        .has("\"memory_digest\":\"");
}

fn checksum_args(smp: &str) -> Vec<String> {
    let image = guest("checksum");
    vec![
        "run".into(),
        image.to_str().unwrap().into(),
        "--smp".into(),
        smp.into(),
        "--timeout".into(),
        "120".into(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A run with no snapshot, the key sent at once.
fn reference(smp: &str, guest_args: &[&str]) -> Run {
    let mut args = checksum_args(smp);
    args.extend(["--".into(), "wait".into()]);
    args.extend(guest_args.iter().map(|a| a.to_string()));
    let mut vm = Vm::spawn(&strs(&args));
    vm.key();
    let r = vm.finish();
    r.expect(PASS)
        .has("checksum: 0x")
        .has("SUMMARY: 3 tests, 0 unexpected failures");
    r
}

/// Restore `dir` with the key already typed, and run to the end.
fn restore(dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["restore", dir.to_str().unwrap(), "--timeout", "120"];
    args.extend_from_slice(extra);
    let mut vm = Vm::spawn(&args);
    vm.key();
    vm.finish()
}

fn final_lines(r: &Run) -> String {
    let from = r.stdout.find("cpu 0 checksum").unwrap_or_else(|| {
        panic!("no checksum in output\n{}\n{}", r.stdout, r.stderr);
    });
    r.stdout[from..].to_string()
}

fn snapshot_anywhere_and_restore(smp: &str, early_snapshots: usize, guest_args: &[&str]) {
    let reference = reference(smp, guest_args);
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let mut args = checksum_args(smp);
    args.extend([
        "--api".into(),
        sock.to_str().unwrap().into(),
        "--".into(),
        "wait".into(),
    ]);
    args.extend(guest_args.iter().map(|a| a.to_string()));
    let mut vm = Vm::spawn(&strs(&args));
    wait_socket(&sock);
    // Wherever these land: during boot, phase 1 or the wait.
    let mut dirs: Vec<PathBuf> = Vec::new();
    for i in 0..early_snapshots {
        let dir = d.path().join(format!("early{i}"));
        snapshot(&sock, &dir);
        dirs.push(dir);
    }
    vm.wait_for("waiting for a key");
    let at_wait = d.path().join("at-wait");
    snapshot(&sock, &at_wait);
    dirs.push(at_wait.clone());
    vm.key();
    let original = vm.finish();
    // Snapshots do not change what the running VM computes.
    original.expect(PASS);
    assert_eq!(original.stdout, reference.stdout);
    assert!(original.stderr.is_empty(), "{}", original.stderr);

    for dir in &dirs {
        let r = restore(dir, &[]);
        r.expect(PASS);
        assert!(
            reference.stdout.ends_with(&r.stdout),
            "restored output is not the end of the reference output\n--- restored\n{}\n--- reference\n{}",
            r.stdout,
            reference.stdout
        );
        assert_eq!(final_lines(&r), final_lines(&reference));
        assert!(r.stderr.is_empty(), "{}", r.stderr);
    }
    // Restored at the wait, the guest picks up exactly where it waited.
    let r = restore(&at_wait, &[]);
    assert!(r.stdout.starts_with("key: k"), "{}", r.stdout);
}

/// With the PIT ticking as the firmware left it (a 55 ms period), the
/// vCPUs start at once and stop only if the PIT's lost-tick policy switch
/// is still in flight a period later.
#[test]
fn snapshots_anywhere_restore_to_the_same_result_on_1_cpu() {
    if !kvm_available() {
        return;
    }
    snapshot_anywhere_and_restore("1", 1, &[]);
}

/// With a PIT period just above `pit`'s floor, the vCPUs start at
/// once and, if the policy switch is late, stop until it lands.
#[test]
fn snapshots_anywhere_restore_to_the_same_result_on_2_cpus() {
    if !kvm_available() {
        return;
    }
    snapshot_anywhere_and_restore("2", 2, &["pit-count=1194"]);
}

/// Snapshot a running VM once, restore that snapshot twice: both restores
/// print the same and exit the same. Then restore, snapshot the restored
/// VM, and restore that: the chain ends as the original. The PIT is
/// stopped, so restores do not wait for its lost-tick policy switch.
#[test]
fn restore_twice_and_snapshot_a_restored_vm() {
    if !kvm_available() {
        return;
    }
    let reference = reference("2", &["pit-off"]);
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let mut args = checksum_args("2");
    args.extend([
        "--api".into(),
        sock.to_str().unwrap().into(),
        "--".into(),
        "wait".into(),
        "pit-off".into(),
    ]);
    let mut vm = Vm::spawn(&strs(&args));
    wait_socket(&sock);
    let first = d.path().join("first");
    // --stop leaves the VM paused; `resume` lets it go on.
    ctl(&[
        "snapshot",
        sock.to_str().unwrap(),
        first.to_str().unwrap(),
        "--stop",
    ])
    .expect(0)
    .has("\"state\":\"paused\"");
    ctl(&["status", sock.to_str().unwrap()])
        .expect(0)
        .has("\"state\":\"paused\"");
    ctl(&["resume", sock.to_str().unwrap()])
        .expect(0)
        .has("\"state\":\"running\"");
    vm.key();
    vm.finish().expect(PASS);

    let a = restore(&first, &[]);
    let b = restore(&first, &["--verify-memory"]);
    let c = restore(&first, &["--memory", "copy"]);
    a.expect(PASS);
    for r in [&b, &c] {
        assert_eq!(a.stdout, r.stdout);
        assert_eq!(a.status, r.status);
    }
    let bad = restore(&first, &["--memory", "mmap"]);
    assert_eq!(bad.status, 2, "{}", bad.stderr);
    assert!(
        bad.stderr
            .contains("invalid --memory 'mmap': expected map or copy"),
        "{}",
        bad.stderr
    );
    assert_eq!(final_lines(&a), final_lines(&reference));

    // snapshot -> restore -> snapshot -> restore.
    let sock2 = d.path().join("api2.sock");
    let mut vm = Vm::spawn(&[
        "restore",
        first.to_str().unwrap(),
        "--timeout",
        "120",
        "--api",
        sock2.to_str().unwrap(),
    ]);
    wait_socket(&sock2);
    let second = d.path().join("second");
    snapshot(&sock2, &second);
    // Into the same directory again: the old snapshot is replaced whole,
    // though the running VM still maps its memory file.
    snapshot(&sock2, &second);
    vm.key();
    let chained = vm.finish();
    chained.expect(PASS);
    assert_eq!(final_lines(&chained), final_lines(&reference));
    // Its memory file was written from a mapping of `first`'s.
    let r = restore(&second, &["--verify-memory"]);
    r.expect(PASS);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    assert_eq!(final_lines(&r), final_lines(&reference));
    assert!(reference.stdout.ends_with(&r.stdout));
}

#[test]
fn pause_resume_and_quit_through_the_socket() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let mut args = checksum_args("1");
    args.extend(["--api".into(), s.into(), "--".into(), "wait".into()]);
    let vm = Vm::spawn(&strs(&args));
    wait_socket(&sock);
    ctl(&["pause", s]).expect(0).has("\"state\":\"paused\"");
    ctl(&["pause", s]).expect(0).has("\"state\":\"paused\"");
    ctl(&["status", s]).expect(0).has("\"state\":\"paused\"");
    ctl(&["resume", s]).expect(0).has("\"state\":\"running\"");
    // A bad request gets an error answer; the VM goes on.
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"{\"cmd\":\"explode\"}\nnot json\n").unwrap();
    let mut r = BufReader::new(c);
    for _ in 0..2 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":false"), "{line}");
        assert!(line.contains("bad request"), "{line}");
    }
    // One client at a time: leave before the next one connects.
    drop(r);
    // Snapshot into a path that cannot be a directory: an error answer,
    // status 2 from the client, and the VM still runs.
    let file = d.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    ctl(&["snapshot", s, file.to_str().unwrap()])
        .expect(2)
        .err_has("plain-file");
    ctl(&["status", s]).expect(0).has("\"state\":\"running\"");
    ctl(&["quit", s]).expect(0);
    let r = vm.finish();
    r.expect(0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn clients_report_a_missing_socket() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("nothing.sock");
    for cmd in ["pause", "resume", "status", "quit"] {
        ctl(&[cmd, sock.to_str().unwrap()])
            .expect(2)
            .err_has("nothing.sock");
    }
    ctl(&["snapshot", sock.to_str().unwrap(), "/tmp/x"])
        .expect(2)
        .err_has("nothing.sock");
}

/// Good snapshots of one paused checksum guest, one per name, for the
/// negative tests: all alike but for their ids.
fn good_snapshots(root: &Path, names: &[&str]) -> Vec<PathBuf> {
    let sock = root.join("api.sock");
    let mut args = checksum_args("1");
    args.extend([
        "--api".into(),
        sock.to_str().unwrap().into(),
        "--".into(),
        "wait".into(),
    ]);
    let vm = Vm::spawn(&strs(&args));
    wait_socket(&sock);
    let dirs: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
    for dir in &dirs {
        ctl(&[
            "snapshot",
            sock.to_str().unwrap(),
            dir.to_str().unwrap(),
            "--stop",
        ])
        .expect(0);
    }
    ctl(&["quit", sock.to_str().unwrap()]).expect(0);
    vm.finish().expect(0);
    dirs
}

fn copy_snapshot(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["state", "memory"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// Spoils a copy of a good snapshot.
type Damage = Box<dyn Fn(&Path)>;

/// XOR `mask` into the byte at `at(len)` of `file`, `len` its length.
fn flip(file: &Path, at: impl Fn(u64) -> u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let at = at(f.metadata().unwrap().len());
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, at).unwrap();
}

/// Grow (`delta` > 0) or shrink `file` by `delta` bytes.
fn resize(file: &Path, delta: i64) {
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len.checked_add_signed(delta).unwrap()).unwrap();
}

/// The memory file's trailer: the last page.
const TRAILER: u64 = 4096;

#[test]
fn damaged_snapshots_are_refused_with_status_2() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let dirs = good_snapshots(d.path(), &["good", "other"]);
    let (good, other) = (dirs[0].clone(), dirs[1].clone());
    // The good one restores.
    restore(&good, &[]).expect(PASS);

    let state = std::fs::read(good.join("state")).unwrap();
    let cases: Vec<(&str, Damage, &str, &str)> = vec![
        (
            "truncated",
            Box::new(|p: &Path| {
                let s = std::fs::read(p.join("state")).unwrap();
                std::fs::write(p.join("state"), &s[..s.len() / 2]).unwrap();
            }),
            "state",
            "truncated",
        ),
        (
            "flipped",
            Box::new(|p: &Path| {
                let mut s = std::fs::read(p.join("state")).unwrap();
                let at = s.len() - 100;
                s[at] ^= 0x40;
                std::fs::write(p.join("state"), &s).unwrap();
            }),
            "state",
            "checksum mismatch",
        ),
        (
            "version",
            Box::new(|p: &Path| {
                let mut s = std::fs::read(p.join("state")).unwrap();
                s[8] = s[8].wrapping_add(1);
                std::fs::write(p.join("state"), &s).unwrap();
            }),
            "state",
            "format",
        ),
        (
            "magic",
            Box::new(|p: &Path| {
                let mut s = std::fs::read(p.join("state")).unwrap();
                s[0] = b'X';
                std::fs::write(p.join("state"), &s).unwrap();
            }),
            "state",
            "bad magic",
        ),
        (
            "memory-long",
            Box::new(|p: &Path| resize(&p.join("memory"), 4096)),
            "memory",
            "memory file has",
        ),
        (
            "memory-short",
            Box::new(|p: &Path| resize(&p.join("memory"), -2 * 4096)),
            "memory",
            "memory file has",
        ),
        (
            // A memory file as format 1 wrote it: RAM only.
            "no-trailer",
            Box::new(|p: &Path| resize(&p.join("memory"), -4096)),
            "memory",
            "memory file has no kvmrun trailer",
        ),
        (
            "truncated-trailer",
            Box::new(|p: &Path| resize(&p.join("memory"), -100)),
            "memory",
            "memory file has no kvmrun trailer (truncated",
        ),
        (
            "trailer-magic",
            Box::new(|p: &Path| flip(&p.join("memory"), |len| len - TRAILER, 0x20)),
            "memory",
            "memory file has no kvmrun trailer (bad magic",
        ),
        (
            "trailer-id",
            Box::new(|p: &Path| flip(&p.join("memory"), |len| len - TRAILER + 8, 1)),
            "memory",
            "memory file belongs to a different snapshot",
        ),
        (
            "trailer-digest",
            Box::new(|p: &Path| flip(&p.join("memory"), |len| len - TRAILER + 32, 1)),
            "memory",
            "memory file trailer does not match the state",
        ),
        (
            // The same guest, the same RAM, another snapshot.
            "other-snapshot",
            Box::new(move |p: &Path| {
                std::fs::copy(other.join("memory"), p.join("memory")).unwrap();
            }),
            "memory",
            "memory file belongs to a different snapshot",
        ),
        (
            "no-memory",
            Box::new(|p: &Path| std::fs::remove_file(p.join("memory")).unwrap()),
            "memory",
            "No such file",
        ),
        (
            "no-state",
            Box::new(|p: &Path| std::fs::remove_file(p.join("state")).unwrap()),
            "state",
            "No such file",
        ),
    ];
    assert!(state.len() > 200);
    for (name, damage, file, why) in cases {
        let dir = d.path().join(name);
        copy_snapshot(&good, &dir);
        damage(&dir);
        let r = ctl(&["restore", dir.to_str().unwrap(), "--serial", "none"]);
        r.expect(2)
            .err_has(&format!("{}/{file}", dir.display()))
            .err_has(why);
        assert!(r.stdout.is_empty(), "{name}: {}", r.stdout);
    }
    ctl(&["restore", d.path().join("absent").to_str().unwrap()])
        .expect(2)
        .err_has("absent/state");
}

/// A flipped byte inside guest RAM: a plain restore does not read RAM, so
/// it neither notices nor minds (the byte is in the ACPI RSDP, which the
/// checksum guest never reads); `--verify-memory` refuses the file.
#[test]
fn damage_inside_memory_is_found_with_verify_memory() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let good = good_snapshots(d.path(), &["good"]).remove(0);
    let r = restore(&good, &["--verify-memory"]);
    r.expect(PASS);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    // The RSDP's OEM ID, at guest (and file) address 0xe0009.
    const RSDP_OEM_ID: u64 = 0xe_0009;
    let bad = d.path().join("bad");
    copy_snapshot(&good, &bad);
    let memory = bad.join("memory");
    let mut page = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(
        &std::fs::File::open(&memory).unwrap(),
        &mut page,
        RSDP_OEM_ID & !4095,
    )
    .unwrap();
    assert_eq!(&page[..8], b"RSD PTR ", "the RSDP moved");
    flip(&memory, |_| RSDP_OEM_ID, 0x20);

    let r = restore(&bad, &[]);
    r.expect(PASS);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = ctl(&[
        "restore",
        bad.to_str().unwrap(),
        "--serial",
        "none",
        "--verify-memory",
    ]);
    r.expect(2)
        .err_has(&format!("{}: memory digest mismatch", memory.display()))
        .err_has("damaged");
    assert!(r.stdout.is_empty(), "{}", r.stdout);
}

#[test]
fn migrate_answers_every_request_with_a_fresh_vm() {
    if !common::kvm_available() {
        return;
    }
    let args = ["--", "words=4096", "rounds=4", "ticks=20"];
    for smp in ["1", "2"] {
        let plain = common::run_guest("checksum", &[&["--smp", smp][..], &args[..]].concat());
        plain.expect(1);
        let mut margs = vec!["--smp", smp, "--migrate"];
        margs.extend_from_slice(&args);
        margs.push("migrate=3");
        let migrated = common::run_guest("checksum", &margs);
        migrated.expect(1).has("migration 3 done");
        let sums = |out: &str| -> Vec<String> {
            out.lines()
                .filter(|l| l.contains("checksum 0x") || l.starts_with("checksum:"))
                .map(|l| l.trim_end().to_string())
                .collect()
        };
        assert_eq!(sums(&plain.stdout), sums(&migrated.stdout));
        assert_eq!(
            migrated.stdout.matches("Now migrate the VM").count(),
            3,
            "{}",
            migrated.stdout
        );
    }
    // A guest that never asks runs as usual.
    common::run_guest("hello", &["--migrate"])
        .expect(1)
        .has("Hello from kvmrun guest");
    // The requests are read from the serial output, which must be stdout.
    common::run_guest("hello", &["--migrate", "--serial", "none"])
        .expect(2)
        .err_has("--migrate needs");
}

#[test]
fn migrate_every_keeps_the_result_of_an_uninterrupted_run() {
    if !common::kvm_available() {
        return;
    }
    let work = ["--", "words=16384", "rounds=8", "ticks=100"];
    let plain = common::run_guest("checksum", &[&["--smp", "2"][..], &work[..]].concat());
    plain.expect(1);
    // Timed migrations land wherever they land; the requested one always
    // happens, so at least one restore is exercised whatever the timing.
    let mut args = vec!["--smp", "2", "--migrate-every", "0.2"];
    args.extend_from_slice(&work);
    args.push("migrate=1");
    let migrated = common::run_guest("checksum", &args);
    migrated.expect(1).has("migration 1 done");
    assert_eq!(total(&plain.stdout), total(&migrated.stdout));
    common::run_guest("hello", &["--migrate-every", "0"])
        .expect(2)
        .err_has("invalid timeout");
}

/// kvm-unit-tests' other requests: a skipped migration gets its key at
/// once, and continuous migration migrates back to back between its begin
/// and end lines; the result is that of an uninterrupted run.
#[test]
fn migrate_answers_skip_and_continuous_requests() {
    if !common::kvm_available() {
        return;
    }
    let work = ["--", "words=4096", "rounds=4", "ticks=20"];
    let plain = common::run_guest("checksum", &[&["--smp", "2"][..], &work[..]].concat());
    plain.expect(1);
    let mut args = vec!["--smp", "2", "--migrate", "-v"];
    args.extend_from_slice(&work);
    args.extend(["migrate-skip", "continuous"]);
    let migrated = common::run_guest("checksum", &args);
    migrated
        .expect(1)
        .has("migration skipped")
        .has("continuous migration done");
    assert_eq!(total(&plain.stdout), total(&migrated.stdout));
    // The end line always comes with a migration, so at least one ran.
    assert!(
        migrated.stderr.contains("migration 1: snapshot"),
        "{}",
        migrated.stderr
    );
}

/// Every request the guest prints while a migration falls due is still
/// answered: the supervisor's test hook holds each request back until the
/// VM is stopped, so it always arrives as output in flight at the stop,
/// the race a loaded machine produces only by chance.
#[test]
fn requests_in_flight_at_a_stop_are_answered() {
    if !common::kvm_available() {
        return;
    }
    let work = ["--", "words=4096", "rounds=4", "ticks=20"];
    let plain = common::run_guest("checksum", &[&["--smp", "2"][..], &work[..]].concat());
    plain.expect(1);
    let mut args = vec!["--smp", "2", "--migrate", "-v"];
    args.extend_from_slice(&work);
    args.extend(["migrate-skip", "migrate=2", "continuous"]);
    let image = guest("checksum");
    let migrated = Run::from(
        kvmrun()
            .env("KVMRUN_TEST_STOP_BEFORE_REQUEST", "1")
            .arg("run")
            .arg(&image)
            .args(["--timeout", "120"])
            .args(&args)
            .output()
            .expect("cannot start kvmrun"),
    );
    migrated
        .expect(1)
        .has("migration skipped")
        .has("migration 2 done")
        .has("continuous migration done");
    assert_eq!(total(&plain.stdout), total(&migrated.stdout));
    // One migration per held request: skip, two migrations, begin, end.
    assert!(
        migrated.stderr.contains("migration 5: snapshot"),
        "{}",
        migrated.stderr
    );
}

/// `--timeout` spans every VM of a migrating run, so a hung guest still
/// ends with the timeout status however often it is migrated.
#[test]
fn the_timeout_spans_every_migrated_vm() {
    if !common::kvm_available() {
        return;
    }
    common::run_guest("hang", &["--migrate-every", "0.1", "--timeout", "2"]).expect(124);
}

/// The checksum guest's overall checksum line.
fn total(out: &str) -> Option<String> {
    out.lines()
        .find(|l| l.starts_with("checksum:"))
        .map(|l| l.trim_end().to_string())
}

/// A VM without the in-kernel PIT saves no PIT state and restores without
/// a lost-tick policy switch; the guest finishes as an uninterrupted run.
#[test]
fn a_vm_without_a_pit_survives_save_and_restore() {
    if !kvm_available() {
        return;
    }
    let mut plain = checksum_args("1");
    plain.push("--no-pit".into());
    let reference = Vm::spawn(&strs(&plain)).finish();
    reference.expect(PASS);
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let mut args = plain.clone();
    args.extend(["--api".into(), sock.to_str().unwrap().into()]);
    args.extend(["--".into(), "wait".into()]);
    let mut vm = Vm::spawn(&strs(&args));
    wait_socket(&sock);
    vm.wait_for("waiting for a key");
    let dir = d.path().join("snap");
    snapshot(&sock, &dir);
    vm.key();
    let original = vm.finish();
    original.expect(PASS);
    let restored = restore(&dir, &[]);
    restored.expect(PASS);
    assert_eq!(final_lines(&restored), final_lines(&original));
    assert_eq!(final_lines(&original), final_lines(&reference));
}

/// Run guest `name` (in `wait` mode, with `guest_args`) with the VM
/// flags `extra` until it waits for a key, snapshot it into DIR/snap
/// through its control socket and press the key: the original, to
/// finish, and the snapshot's directory.
fn snapshot_at_key(dir: &Path, name: &str, extra: &[&str], guest_args: &[&str]) -> (Vm, PathBuf) {
    let sock = dir.join("api.sock");
    let image = guest(name);
    let mut args = vec!["run", image.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend(["--timeout", "120", "--api", sock.to_str().unwrap(), "--"]);
    args.extend_from_slice(guest_args);
    args.push("wait");
    let mut vm = Vm::spawn(&args);
    wait_socket(&sock);
    vm.wait_for("waiting for a key");
    let snap = dir.join("snap");
    snapshot(&sock, &snap);
    vm.key();
    (vm, snap)
}

/// kvmclock and the TSC stay together across a snapshot and its restore
/// (`snapshot::tsc`), on 1 and 2 vCPUs, even when reading the vCPUs'
/// states takes half a second before the clock is read: the clock guest
/// reads both before and after its wait and fails when their intervals
/// differ by more than 100 ms. Without tying the TSCs to the clock's
/// instant the restored copy's skew is the half second. Where KVM does
/// not offset guest TSCs (KVM-PVM runs guests on the host's TSC, so a
/// restored guest's TSC is ahead of its kvmclock by the time between
/// save and restore) kvmrun says so under -vv and only the original's
/// verdict and the restored copy's report are asserted; the AMD-V host's
/// `clock-1cpu` and `clock-2cpu` assert it on real KVM.
#[test]
fn kvmclock_and_the_tsc_stay_together_across_a_restore() {
    if !kvm_available() {
        return;
    }
    for smp in ["1", "2"] {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("api.sock");
        let image = guest("clock");
        let args = [
            "run",
            image.to_str().unwrap(),
            "--smp",
            smp,
            "--timeout",
            "120",
            "--api",
            sock.to_str().unwrap(),
        ];
        let mut vm = Vm::spawn_with_env(&args, &[("KVMRUN_TEST_SLOW_SAVE", "500")]);
        wait_socket(&sock);
        vm.wait_for("waiting for a key");
        let snap = d.path().join("snap");
        snapshot(&sock, &snap);
        vm.key();
        let original = vm.finish();
        original.expect(PASS).has("PASS: kvmclock-follows-the-tsc");
        let restored = restore(&snap, &["-vv"]);
        let restored = restored.has("key: k").has("kvmclock-follows-the-tsc");
        if restored
            .stderr
            .contains("TSCs resumed at the kvmclock instant")
        {
            restored.expect(PASS).has("PASS: kvmclock-follows-the-tsc");
        } else {
            let said = "TSCs not resumed at the kvmclock instant";
            assert!(restored.stderr.contains(said), "{}", restored.stderr);
        }
    }
}

/// virtio-rng over each transport, read before and after a snapshot:
/// the original and the restored VM both go on reading from the queue
/// where it was.
#[test]
fn virtio_rng_survives_save_and_restore_on_both_transports() {
    if !kvm_available() {
        return;
    }
    for transport in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        let rng = format!("--rng={transport}");
        let arg = format!("transport={transport}");
        let (vm, dir) = snapshot_at_key(d.path(), "rng", &[&rng], &[&arg]);
        vm.finish()
            .expect(PASS)
            .has("PASS: random-after")
            .has("SUMMARY: 4 tests, 0 unexpected failures");
        restore(&dir, &[])
            .expect(PASS)
            .has("PASS: random-after")
            .has("SUMMARY: 4 tests, 0 unexpected failures");
    }
}

/// A virtio-blk disk over each transport, used before a snapshot and
/// after the restore: the restored VM reopens the file its configuration
/// names and goes on with the queue where it was. The sectors the guest
/// writes after the key are wiped between the two runs, so the file
/// shows the restored guest's writes.
#[test]
fn virtio_blk_survives_save_and_restore_on_both_transports() {
    if !kvm_available() {
        return;
    }
    for transport in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("disk.img");
        let sectors: Vec<u8> = (0..2048usize).flat_map(|s| [s as u8; 512]).collect();
        std::fs::write(&img, &sectors).unwrap();
        let disk = format!("{},transport={transport}", img.display());
        let arg = format!("transport={transport}");
        let (vm, dir) = snapshot_at_key(d.path(), "blk", &["--disk", &disk], &[&arg]);
        vm.finish()
            .expect(PASS)
            .has("PASS: after-restore-read-back")
            .has("SUMMARY: 18 tests, 0 unexpected failures");
        let written_after = |f: &[u8]| (24..32).all(|s| f[s * 512] == 0xd0 + (s - 24) as u8);
        let mut file = std::fs::read(&img).unwrap();
        assert!(written_after(&file), "{transport}: the original's writes");
        file[24 * 512..32 * 512].fill(0);
        std::fs::write(&img, &file).unwrap();
        restore(&dir, &[])
            .expect(PASS)
            .has("PASS: after-restore-read")
            .has("PASS: after-restore-read-back")
            .has("SUMMARY: 18 tests, 0 unexpected failures");
        assert!(
            written_after(&std::fs::read(&img).unwrap()),
            "{transport}: the restored guest's writes"
        );
    }
}

/// What a guest printed from the key on: a restored VM's whole output.
fn from_key(r: &Run) -> &str {
    let at = r.stdout.find("key: k").unwrap_or_else(|| {
        panic!("no key in output\n{}\n{}", r.stdout, r.stderr);
    });
    &r.stdout[at..]
}

/// QEMU's edu device on each machine, snapshotted halfway through its
/// work: MSI on, a factorial's interrupt taken, a pattern DMAed into its
/// 4 KiB buffer and an interrupt raised but not yet taken. After the key
/// the guest finds its registers, takes the pending interrupt, DMAs the
/// buffer back and takes another factorial's MSI, so the original and
/// the restored VM end alike only if the registers, the buffer, the
/// interrupt status and the MSI route are all restored. The machine type
/// is restored with the devices (`DeviceConfig::Q35`): the guest checks
/// its host bridge again after the key.
#[test]
fn edu_survives_save_and_restore_on_both_machines() {
    if !kvm_available() {
        return;
    }
    let machines: [(&str, &[&str], &str, &str); 2] = [
        ("pc", &[], "PASS: pc-host-bridge", "11"),
        ("q35", &["q35"], "PASS: q35-lpc-1f.0", "18"),
    ];
    for (machine, guest_args, bridge, tests) in machines {
        let d = tempfile::tempdir().unwrap();
        let extra = ["--machine", machine, "--edu"];
        let (vm, dir) = snapshot_at_key(d.path(), "edu", &extra, guest_args);
        let summary = format!("SUMMARY: {tests} tests, 0 unexpected failures");
        let original = vm.finish();
        original
            .expect(PASS)
            .has("PASS: edu-status-kept")
            .has("PASS: edu-buffer-kept")
            .has("PASS: edu-factorial-msi-after")
            .has(bridge)
            .has(&summary);
        let restored = restore(&dir, &[]);
        restored
            .expect(PASS)
            .has("PASS: edu-registers-kept")
            .has("PASS: edu-held-msi-taken")
            .has("PASS: edu-buffer-kept")
            .has(bridge)
            .has(&summary);
        assert!(!restored.stdout.contains("FAIL"), "{}", restored.stdout);
        assert_eq!(from_key(&restored), from_key(&original), "{machine}");
        assert_eq!(from_key(&restored), restored.stdout, "{machine}");
    }
}

/// The Intel IOMMU with everything programmed (queued invalidation,
/// root, context and second-level tables, translation and interrupt
/// remapping on, a fault recorded and its event pending), snapshotted:
/// after the key the guest finds the status, the record and the queue as
/// it left them, queues more, DMAs through the same tables and takes a
/// remapped MSI, so the restored VM passes only with the unit's state;
/// the fault event held pending since before the snapshot then goes to
/// the guest through the event route the restored VM makes anew.
#[test]
fn iommu_survives_save_and_restore() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let extra = ["--machine", "q35", "--edu", "--iommu=intremap=on"];
    let (vm, dir) = snapshot_at_key(d.path(), "vtd", &extra, &[]);
    let summary = "SUMMARY: 16 tests, 0 unexpected failures";
    let original = vm.finish();
    original.expect(PASS).has(summary);
    let restored = restore(&dir, &[]);
    restored
        .expect(PASS)
        .has("PASS: vtd-status-kept")
        .has("PASS: vtd-fault-record-kept")
        .has("PASS: vtd-queue-goes-on")
        .has("PASS: vtd-dma-after")
        .has("PASS: vtd-msi-remapped-after")
        .has("PASS: vtd-fault-event")
        .has(summary);
    assert!(!restored.stdout.contains("FAIL"), "{}", restored.stdout);
    assert_eq!(from_key(&restored), from_key(&original));
}

/// A snapshot-mode disk's overlay is not saved: a snapshot is refused
/// with the reason, and the VM runs on.
#[test]
fn a_snapshot_mode_disk_refuses_a_snapshot() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let img = d.path().join("disk.img");
    let sectors: Vec<u8> = (0..2048usize).flat_map(|s| [s as u8; 512]).collect();
    std::fs::write(&img, &sectors).unwrap();
    let image = guest("blk");
    let disk = format!("{},snapshot", img.display());
    let args = [
        "run",
        image.to_str().unwrap(),
        "--disk",
        &disk,
        "--timeout",
        "120",
        "--api",
        sock.to_str().unwrap(),
        "--",
        "transport=pci",
        "mode=snapshot",
        "wait",
    ];
    let mut vm = Vm::spawn(&args);
    wait_socket(&sock);
    vm.wait_for("waiting for a key");
    let dir = d.path().join("snap");
    let r = ctl(&["snapshot", sock.to_str().unwrap(), dir.to_str().unwrap()]);
    assert!(
        format!("{}{}", r.stdout, r.stderr)
            .contains("disk.img is in snapshot mode and its overlay of guest writes is not saved"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert!(!dir.join("state").exists());
    vm.key();
    vm.finish()
        .expect(PASS)
        .has("PASS: after-restore-read-back");
    assert!(std::fs::read(&img).unwrap() == sectors);
}

/// The PCI guest's moved BAR and enabled MSI-X survive a migration.
#[test]
fn a_moved_bar_and_msix_survive_migration() {
    if !kvm_available() {
        return;
    }
    let image = guest("pci");
    let r = Run::from(
        kvmrun()
            .args(["run", image.to_str().unwrap(), "--rng", "--timeout", "120"])
            .args(["--migrate-every", "0.05"])
            .output()
            .unwrap(),
    );
    r.expect(PASS)
        .has("SUMMARY: 14 tests, 0 unexpected failures");
}

/// virtio-console ports, used before a snapshot and after the restore:
/// the guest waits for its second line on the input port with its
/// receive buffers offered; the original and the restored VM (its
/// stdin a new one) each echo the line they are sent.
#[test]
fn virtio_console_ports_survive_save_and_restore() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let image = guest("console");
    let ports = ["--vport", "out=stdout", "--vport", "in=stdin"];
    let mut args = vec!["run", image.to_str().unwrap(), "--timeout", "120"];
    args.extend(ports);
    args.extend(["--api", sock.to_str().unwrap(), "--", "wait"]);
    let mut vm = Vm::spawn(&args);
    wait_socket(&sock);
    vm.send(b"one\n");
    vm.wait_for("waiting for a line");
    let snap = d.path().join("snap");
    snapshot(&sock, &snap);
    vm.send(b"two\n");
    let r = vm.finish();
    r.expect(PASS)
        .has("echo: one")
        .has("echo: two")
        .has("SUMMARY: 6 tests, 0 unexpected failures");
    let mut vm = Vm::spawn(&["restore", snap.to_str().unwrap(), "--timeout", "120"]);
    vm.send(b"three\n");
    let r = vm.finish();
    r.expect(PASS)
        .has("echo: three")
        .has("SUMMARY: 6 tests, 0 unexpected failures");
    assert!(!r.stdout.contains("echo: two"), "{}", r.stdout);
}

/// A virtio-fs share over each transport, snapshotted with a READ in
/// the queue that the device has not been told of (a request in flight)
/// and with inodes the guest looked up: the restored VM opens the
/// directory again, finds those inodes by path under the node IDs the
/// guest holds, answers the READ and takes a write.
#[test]
fn virtio_fs_survives_save_and_restore_on_both_transports() {
    if !kvm_available() {
        return;
    }
    for transport in ["pci", "mmio"] {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("secret"), b"outside").unwrap();
        let share = d.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("hello"), "hello from the host\n").unwrap();
        std::os::unix::fs::symlink("/etc", share.join("etc")).unwrap();
        let arg = format!("{},tag=data,transport={transport}", share.display());
        let targ = format!("transport={transport}");
        let (vm, dir) = snapshot_at_key(d.path(), "fs", &["--share", &arg], &[&targ, "tag=data"]);
        vm.finish()
            .expect(PASS)
            .has("PASS: after-restore-read-in-flight")
            .has("SUMMARY: 21 tests, 0 unexpected failures");
        let file = share.join("from-guest");
        let both = "written by the guest\nafter the key\n";
        assert_eq!(std::fs::read_to_string(&file).unwrap(), both);
        std::fs::write(&file, "written by the guest\n").unwrap();
        let r = restore(&dir, &[]);
        r.expect(PASS)
            .has("PASS: after-restore-read-in-flight")
            .has("PASS: after-restore-read")
            .has("PASS: after-restore-write")
            .has("SUMMARY: 21 tests, 0 unexpected failures");
        assert!(!r.stderr.contains("not found again"), "{}", r.stderr);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), both, "{transport}");
    }
}

/// The split irqchip, snapshotted while a level interrupt is in flight:
/// kvmrun's IOAPIC holds Remote IRR and the raised line, KVM's local
/// APIC the pending vector. Both the original and the restored VM take
/// the interrupt once and see the EOI clear Remote IRR, which needs the
/// IOAPIC's routes back in KVM after the restore.
#[test]
fn the_split_irqchip_survives_save_and_restore_mid_interrupt() {
    if !kvm_available() {
        return;
    }
    let split = ["--irqchip", "split"];
    let d = tempfile::tempdir().unwrap();
    let (vm, dir) = snapshot_at_key(d.path(), "testdev", &split, &[]);
    for r in [vm.finish(), restore(&dir, &[])] {
        r.expect(PASS)
            .has("PASS: irq-level-once")
            .has("PASS: irq-level-remote-irr-clear")
            .has("SUMMARY: 18 tests, 0 unexpected failures");
    }
    // Two vCPUs with their local APIC timers ticking across the snapshot.
    let d = tempfile::tempdir().unwrap();
    let smp = [&split[..], &["--smp", "2"]].concat();
    let (vm, dir) = snapshot_at_key(d.path(), "checksum", &smp, &[]);
    let original = vm.finish();
    original.expect(PASS);
    let restored = restore(&dir, &[]);
    restored.expect(PASS);
    assert_eq!(final_lines(&restored), final_lines(&original));
}
