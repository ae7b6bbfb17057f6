//! Soaks: the same thing many times, and nothing may pile up: file
//! descriptors, memory, threads, processes, temporary files, sockets.
//!
//! `make test` runs short versions; `make soak` (scripts/soak) sets
//! KVMRUN_SOAK=full for the long ones: 1000 snapshot-and-resume cycles
//! and 1000 pause/resume pairs on one VM, 1000 `kvmrun run`s, a
//! 200-test suite, and a 60 s serial flood into a slow reader. Each
//! prints its first and last measurements (run with --nocapture).

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::console::{ctl, wait_socket, SAFETY};
use common::{guest, kvm_available, kvmrun, Run};

/// One soak at a time: they count this process's children, which a
/// soak running beside them would change.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A VM that is killed if the test fails before it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn full() -> bool {
    std::env::var("KVMRUN_SOAK").as_deref() == Ok("full")
}

/// `short` in `make test`, `long` in `make soak`.
fn count(short: usize, long: usize) -> usize {
    if full() {
        long
    } else {
        short
    }
}

/// What a process holds: open fds other than sockets, sockets,
/// resident memory (KiB), threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    fds: usize,
    sockets: usize,
    rss_kib: u64,
    threads: u64,
}

/// Sockets a VM may hold while it answers a client: the listener, the
/// connection, and the two copies its handler writes through.
const MAX_SOCKETS: usize = 4;

fn held(pid: u32) -> Held {
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let sockets = links.iter().filter(|l| l.starts_with("socket:")).count();
    let fds = links.len() - sockets;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Held {
        fds,
        sockets,
        rss_kib: field("VmRSS:"),
        threads: field("Threads:"),
    }
}

/// The resident memory may wobble (allocator, page cache of the
/// snapshot's reads), but not grow with the number of cycles.
fn assert_flat(what: &str, first: Held, last: Held) {
    eprintln!("{what}: first {first:?}, last {last:?}");
    assert_eq!(first.fds, last.fds, "{what}: fds");
    // A client's connection is closed when the next one comes, and its
    // handler's copies when it returns, which a probe cannot wait for.
    assert!(
        last.sockets <= MAX_SOCKETS,
        "{what}: {} sockets",
        last.sockets
    );
    assert_eq!(first.threads, last.threads, "{what}: threads");
    assert!(
        last.rss_kib <= first.rss_kib + 2048,
        "{what}: RSS grew from {} KiB to {} KiB",
        first.rss_kib,
        last.rss_kib
    );
}

/// What the VM at `pid` holds, seen from a connection to its socket
/// that has just been answered: the VM has closed every earlier client
/// (it serves one at a time) and its vCPUs run (status is answered
/// between rounds only once they are started again).
fn held_by_vm(pid: u32, sock: &Path) -> Held {
    use std::io::{BufRead, BufReader, Write};
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&c).read_line(&mut line).unwrap();
    assert!(line.contains("\"state\":\"running\""), "{line}");
    held(pid)
}

#[test]
fn snapshots_and_pauses_leave_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let _one = exclusive();
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let snap = d.path().join("snap");
    let mut vm = Guard(
        kvmrun()
            .args(["run"])
            .arg(guest("hang"))
            .args(["--serial", "none", "--timeout", "3600", "--api", s])
            .spawn()
            .unwrap(),
    );
    wait_socket(&sock);
    let pid = vm.0.id();
    let cycles = count(40, 1000);
    // Measured after a few cycles, when every buffer has its size.
    let warm = 5;
    let mut first = None;
    for i in 0..cycles {
        ctl(&["snapshot", s, snap.to_str().unwrap()])
            .expect(0)
            .has("\"state\":\"running\"");
        if i + 1 == warm {
            first = Some(held_by_vm(pid, &sock));
        }
    }
    assert_flat(
        &format!("{cycles} snapshots and resumes"),
        first.unwrap(),
        held_by_vm(pid, &sock),
    );
    let first = held_by_vm(pid, &sock);
    for _ in 0..cycles {
        ctl(&["pause", s]).expect(0).has("\"state\":\"paused\"");
        ctl(&["resume", s]).expect(0).has("\"state\":\"running\"");
    }
    assert_flat(
        &format!("{cycles} pauses and resumes"),
        first,
        held_by_vm(pid, &sock),
    );
    ctl(&["quit", s]).expect(0);
    assert_eq!(vm.0.wait().unwrap().code(), Some(0));
}

/// Everything in `dir`, as names.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// The processes whose parent is this one.
fn children() -> Vec<(u32, String)> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        if ppid == Some(me.as_str()) {
            let state = status
                .lines()
                .find_map(|l| l.strip_prefix("State:"))
                .unwrap_or("")
                .trim()
                .to_string();
            out.push((pid, state));
        }
    }
    out
}

#[test]
fn sequential_runs_leave_nothing_behind() {
    if !kvm_available() {
        return;
    }
    let _one = exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let before = held(me);
    let fds_before = open_fds(me);
    let runs = count(24, 1000);
    for i in 0..runs {
        let mut c = kvmrun();
        // Temporary files kvmrun makes land in a directory of their own.
        c.env("TMPDIR", tmp.path()).arg("run").arg(guest("hello"));
        let sock = work.path().join("vm.sock");
        match i % 3 {
            0 => {}
            1 => {
                c.arg("--api").arg(&sock);
            }
            _ => {
                c.arg("--migrate");
            }
        }
        let r = Run::from(c.args(["--timeout", "60"]).output().unwrap());
        r.expect(1).has("Hello from kvmrun guest");
        assert!(r.stderr.is_empty(), "run {i}: {}", r.stderr);
    }
    assert_eq!(listing(tmp.path()), BTreeSet::new(), "temporary files left");
    assert_eq!(listing(work.path()), BTreeSet::new(), "sockets left");
    assert_eq!(children(), Vec::new(), "processes left");
    let after = held(me);
    eprintln!("{runs} runs: the test process held {before:?} before, {after:?} after");
    let new: Vec<String> = open_fds(me).difference(&fds_before).cloned().collect();
    assert!(
        new.is_empty(),
        "fds the runs left open in the test process: {new:?}"
    );
}

/// The process's open files as "FD -> TARGET", without the directory that
/// lists them. A leak is an entry that was not there before the runs; an
/// entry that went away was a test that ran before this one, whose reader
/// threads let go of their pipes only after it had ended.
fn open_fds(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy();
            (!target.starts_with("/proc/"))
                .then(|| format!("{} -> {target}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// A deterministic sequence for the generated suite.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// What a generated entry should get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Pass,
    Fail,
    Skip,
}

fn suite(dir: &Path, n: usize, seed: u64) -> (PathBuf, Vec<(String, Want)>) {
    let mut rng = Xorshift(seed);
    let mut text = String::new();
    let mut want = Vec::new();
    for i in 0..n {
        let name = format!("t{i:03}");
        let kind = rng.next(10);
        let (entry, w) = match kind {
            // A guest that ends with a random code, and a random expected
            // status: the same or not.
            0..=5 => {
                let code = rng.next(64);
                let same = rng.next(2) == 0;
                let status = if same {
                    (code << 1) | 1
                } else {
                    ((code << 1) | 1) ^ 2
                };
                (
                    format!(
                        "kernel = \"{}\"\ncmdline = \"code={code}\"\nexpect_status = {status}\ntimeout = {}\n",
                        guest("exitcode").display(),
                        10 + rng.next(20)
                    ),
                    if same { Want::Pass } else { Want::Fail },
                )
            }
            // A guest that never ends, with a short random timeout.
            6..=7 => (
                format!(
                    "kernel = \"{}\"\ntimeout = \"{}.{}s\"\n",
                    guest("hang").display(),
                    rng.next(2),
                    1 + rng.next(9)
                ),
                Want::Fail,
            ),
            // A kernel that is not there.
            _ => ("kernel = \"no-such-kernel\"\n".to_string(), Want::Skip),
        };
        text += &format!("[[test]]\nname = \"{name}\"\n{entry}\n");
        want.push((name, w));
    }
    let path = dir.join("generated.toml");
    std::fs::write(&path, text).unwrap();
    (path, want)
}

/// `kvmrun test` as a subreaper's child: a VM it leaves running or
/// unreaped would become this process's child.
fn become_subreaper() {
    // SAFETY: prctl only changes how this process adopts orphans.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
}

#[test]
fn a_generated_suite_reports_every_test_once() {
    if !kvm_available() {
        return;
    }
    let _one = exclusive();
    become_subreaper();
    let d = tempfile::tempdir().unwrap();
    let n = count(16, 200);
    let seed = 0x5eed_0014 + n as u64;
    let (path, want) = suite(d.path(), n, seed);
    let tap = d.path().join("r.tap");
    let junit = d.path().join("r.xml");
    let mut child: Child = kvmrun()
        .arg("test")
        .arg(&path)
        .args(["-j", "2", "--progress", "lines", "-o"])
        .arg(d.path().join("logs"))
        .arg("--tap")
        .arg(&tap)
        .arg("--junit")
        .arg(&junit)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let fails = want.iter().filter(|(_, w)| *w == Want::Fail).count();
    assert_eq!(status.code(), Some(if fails > 0 { 1 } else { 0 }), "{err}");
    // Every test once in the TAP report, with the verdict it should get.
    let tap = std::fs::read_to_string(&tap).unwrap();
    for (name, w) in &want {
        let lines: Vec<&str> = tap
            .lines()
            .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
            .filter(|l| {
                l.split(" - ")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    == Some(name)
            })
            .collect();
        assert_eq!(lines.len(), 1, "{name} in the TAP report: {lines:?}");
        let l = lines[0];
        let got = if l.contains("# SKIP") {
            Want::Skip
        } else if l.starts_with("ok ") {
            Want::Pass
        } else {
            Want::Fail
        };
        assert_eq!(got, *w, "{name}: {l}");
    }
    let results = tap
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("not ok "))
        .count();
    assert_eq!(results, n, "results in the TAP report");
    let junit = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(junit.matches("<testcase ").count(), n, "JUnit test cases");
    // Nothing left: every VM ended and was reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    let left = loop {
        let left = children();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        left,
        Vec::new(),
        "processes left behind (zombies are state Z)"
    );
    eprintln!(
        "{n} generated tests (seed {seed:#x}): {} pass, {fails} fail, {} skip, each reported once",
        want.iter().filter(|(_, w)| *w == Want::Pass).count(),
        want.iter().filter(|(_, w)| *w == Want::Skip).count()
    );
}

/// A 60 s serial flood into a reader slower than the guest: memory stays
/// flat, and every line arrives in order.
#[test]
fn a_long_flood_into_a_slow_reader() {
    if !kvm_available() || !full() {
        return;
    }
    let _one = exclusive();
    let secs = 60;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmrun"))
        .arg("run")
        .arg(guest("hostile"))
        .args(["--timeout", &secs.to_string(), "--", "case=flood"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        // About 10 KB/s: slower than the guest's output on any host.
        let mut all = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        all
    });
    let started = Instant::now();
    let mut samples = Vec::new();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < SAFETY + Duration::from_secs(secs),
            "kvmrun did not end"
        );
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(rss) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                samples.push(rss);
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let text = String::from_utf8(reader.join().unwrap()).unwrap();
    assert_eq!(status.code(), Some(124), "{err}");
    assert!(!err.contains("dropped"), "{err}");
    // Every complete line is the next number; the last may be cut.
    let mut n = 0u64;
    let lines: Vec<&str> = text.split('\n').collect();
    for line in &lines[..lines.len() - 1] {
        assert_eq!(*line, format!("f {n:016x} abcdefghijklmnopqrstuvwxyz"));
        n += 1;
    }
    let (first, last) = (samples[2.min(samples.len() - 1)], *samples.last().unwrap());
    let max = *samples.iter().max().unwrap();
    eprintln!(
        "{secs} s flood into a slow reader: {n} lines, {} bytes, none lost; RSS {first} KiB after 2 s, {last} KiB at the end, {max} KiB at most",
        text.len()
    );
    assert!(
        max <= first + 2048,
        "RSS grew from {first} KiB to {max} KiB"
    );
}
