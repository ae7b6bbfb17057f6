//! Boot once, run many. The boot-once tests of a TOML suite
//! (`RunSpec::once`) that boot the same way (image, initrd, `kvmrun run`
//! flags) form a boot group. The group's VM boots once with a control
//! socket and runs until its guest prints the ready line, after which
//! the guest waits for its command on COM1; the VM is snapshotted there,
//! stopped, into a temporary directory and ended. Every test of the group
//! is then a `kvmrun restore` of that directory (guest RAM mapped
//! copy-on-write: each test starts from the same memory and sees no
//! other test's writes) that reads the test's command on COM1
//! (`--serial-input`). A test's verdict and output are those of its
//! restore; its time runs from the restore's start to its end.
//!
//! A group whose boot fails (its VM ends or times out before the ready
//! line, or refuses the snapshot) fails each of its tests with the
//! reason; the boot's serial output stays in OUT/boot-once-N.log.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use super::scheduler::{self, SuiteOptions};
use super::{Plan, RunSpec, TestSpec};
use crate::api::{self, Request};

/// The word on the kernel command line that asks the guest to wait for
/// its command (resources/linux/init, resources/guests/ready.c).
pub const WAIT_CMD: &str = "kvmrun.wait_cmd";
/// What the guest prints when it waits for its command.
pub const READY_LINE: &str = "KVMRUN-READY";

/// Test-only: `snapshot` makes the group's snapshot fail (its directory
/// is under a regular file), `restore` damages the snapshot's state file
/// so that every restore fails: both real error paths, every time.
const FAULT_HOOK: &str = "KVMRUN_TEST_BOOT_ONCE_FAULT";

/// How often a boot is checked for an interrupt while it prints nothing.
const POLL: Duration = Duration::from_millis(100);

/// What a test host needs to tell boot groups apart.
type BootKey = (PathBuf, Option<PathBuf>, Vec<String>);

/// One boot group after its boot.
pub struct Group {
    /// Indices of its tests in the suite.
    pub tests: Vec<usize>,
    /// The snapshot directory, or why there is none.
    pub snapshot: Result<PathBuf, String>,
    /// From the boot VM's start to the end of its snapshot.
    pub boot: Duration,
}

/// Every boot group of a suite; dropping it removes the snapshots.
pub struct Boots {
    _dir: Option<tempfile::TempDir>,
    pub groups: Vec<Group>,
}

impl Boots {
    /// The snapshot test `idx` restores, or why it cannot run.
    pub fn snapshot_for(&self, idx: usize) -> Option<&Result<PathBuf, String>> {
        self.groups
            .iter()
            .find(|g| g.tests.contains(&idx))
            .map(|g| &g.snapshot)
    }

    /// The log line of the groups' boots, `None` without boot once.
    pub fn summary(&self) -> Option<String> {
        if self.groups.is_empty() {
            return None;
        }
        let boots: Vec<String> = self
            .groups
            .iter()
            .map(|g| format!("{:.2}s", g.boot.as_secs_f64()))
            .collect();
        Some(format!(
            "boot once: {} boot group(s) booted and snapshotted in {}",
            self.groups.len(),
            boots.join(", ")
        ))
    }
}

/// The boot groups of `specs`, in order of their first test.
fn group_tests(specs: &[TestSpec]) -> Vec<(BootKey, Vec<usize>)> {
    let mut groups: Vec<(BootKey, Vec<usize>)> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        let Plan::Run(rs) = &s.plan else { continue };
        let Some(once) = &rs.once else { continue };
        let key = (rs.image.clone(), rs.initrd.clone(), once.boot_args.clone());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, tests)) => tests.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

/// Boot and snapshot every boot group of `specs`, one after the other.
pub fn boot_groups(
    specs: &[TestSpec],
    opts: &SuiteOptions,
    stop: &AtomicBool,
) -> io::Result<Boots> {
    let groups = group_tests(specs);
    if groups.is_empty() {
        return Ok(Boots {
            _dir: None,
            groups: Vec::new(),
        });
    }
    let dir = tempfile::Builder::new().prefix("kvmrun-once-").tempdir()?;
    let mut out = Vec::new();
    for (n, (_, tests)) in groups.into_iter().enumerate() {
        let Plan::Run(rs) = &specs[tests[0]].plan else {
            unreachable!("groups hold planned runs")
        };
        let started = Instant::now();
        let snapshot = boot_one(n, rs, opts, dir.path(), stop).map_err(|e| {
            log::warn!("boot once: boot group {n}: {e}");
            format!("boot once: {e}")
        });
        out.push(Group {
            tests,
            snapshot,
            boot: started.elapsed(),
        });
    }
    Ok(Boots {
        _dir: Some(dir),
        groups: out,
    })
}

/// Boot group `n`'s VM, snapshot it at its ready line into a directory
/// under `work`, end it; the snapshot's directory.
fn boot_one(
    n: usize,
    rs: &RunSpec,
    opts: &SuiteOptions,
    work: &Path,
    stop: &AtomicBool,
) -> Result<PathBuf, String> {
    let once = rs.once.as_ref().expect("a boot group's test boots once");
    let socket = work.join(format!("boot{n}.sock"));
    let mut snap = work.join(format!("snapshot{n}"));
    let fault = std::env::var(FAULT_HOOK).unwrap_or_default();
    if fault == "snapshot" {
        let file = work.join(format!("not-a-directory{n}"));
        std::fs::write(&file, b"").map_err(|e| e.to_string())?;
        snap = file.join("snapshot");
    }
    let boot = RunSpec {
        args: once.boot_args.clone(),
        migrate: false,
        ..rs.clone()
    };
    let plain = SuiteOptions {
        migrate_every: None,
        ..opts.clone()
    };
    let mut args = scheduler::child_args(&boot, &plain, None);
    args.push("--api".into());
    args.push(socket.clone().into());
    let log = opts.out_dir.join(format!("boot-once-{n}.log"));
    let mut vm = BootVm::spawn(&opts.kvmrun, &args, &log)?;
    let deadline = rs
        .timeout_secs
        .and_then(|t| Duration::try_from_secs_f64(t + opts.kill_grace).ok())
        .map(|d| Instant::now() + d);
    let result = vm
        .wait_ready(deadline, stop)
        .and_then(|()| snapshot_and_quit(&socket, &snap));
    vm.end();
    let stderr = log.with_extension("stderr");
    if std::fs::metadata(&stderr).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(&stderr);
    }
    let snap = result?;
    if fault == "restore" {
        std::fs::write(snap.join(crate::snapshot::STATE_FILE), b"damaged")
            .map_err(|e| e.to_string())?;
    }
    Ok(snap)
}

fn snapshot_and_quit(socket: &Path, snap: &Path) -> Result<PathBuf, String> {
    let req = Request::Snapshot {
        dir: snap.to_path_buf(),
        stop: true,
    };
    let taken = api::call(socket, &req).map_err(|e| format!("cannot snapshot the VM: {e}"));
    // The VM goes whether or not it could be saved.
    let _ = api::call(socket, &Request::Quit {});
    taken.map(|_| snap.to_path_buf())
}

/// The `kvmrun restore` arguments of boot-once test `rs` from `snap`.
pub fn restore_args(rs: &RunSpec, snap: &Path) -> Vec<OsString> {
    let once = rs.once.as_ref().expect("a boot-once test");
    let mut args: Vec<OsString> = vec!["restore".into(), snap.into(), "--serial=stdio".into()];
    args.extend(crate::sandbox::child_flag().map(OsString::from));
    if let Some(t) = rs.timeout_secs {
        args.push(format!("--timeout={t}").into());
    }
    args.push(format!("--serial-input={}", once.input).into());
    args
}

/// A boot group's VM: its output read by a thread, copied into its log.
struct BootVm {
    child: Child,
    output: Receiver<Vec<u8>>,
    log: File,
    /// The last line not yet ended.
    line: Vec<u8>,
}

impl BootVm {
    fn spawn(exe: &Path, args: &[OsString], log: &Path) -> Result<Self, String> {
        let file = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file(&log.with_extension("stderr"))?)
            .process_group(0);
        super::scheduler::die_with_parent(&mut cmd);
        let mut child =
            crate::sandbox::spawn(cmd).map_err(|e| format!("cannot start kvmrun: {e}"))?;
        let stdout = child.stdout.take().ok_or("cannot start kvmrun: no pipe")?;
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut stdout = stdout;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok(BootVm {
            child,
            output,
            log: file(log)?,
            line: Vec::new(),
        })
    }

    /// Keep `chunk` in the log; whether it ends the ready line.
    fn take(&mut self, chunk: &[u8]) -> bool {
        let _ = self.log.write_all(chunk);
        let mut ready = false;
        for &b in chunk {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                ready |= line.trim_end().ends_with(READY_LINE);
                self.line.clear();
            } else {
                self.line.push(b);
            }
        }
        ready
    }

    /// Wait for the ready line; the VM's end, `deadline` (a backstop: the
    /// VM's own --timeout ends it first) and `stop` are errors.
    fn wait_ready(&mut self, deadline: Option<Instant>, stop: &AtomicBool) -> Result<(), String> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err("interrupted".into());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(format!("no {READY_LINE} line before the timeout"));
            }
            match self.output.recv_timeout(POLL) {
                Ok(chunk) if self.take(&chunk) => return Ok(()),
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map_err(|e| e.to_string())?;
                    return Err(format!(
                        "the VM ended before its {READY_LINE} line ({status})"
                    ));
                }
            }
        }
    }

    /// Let the VM end (a quit was asked) or kill it; keep its last output.
    fn end(mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .output
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(chunk) => {
                    self.take(&chunk);
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    scheduler::kill_group(&mut self.child);
                    break;
                }
            }
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testhost::{Judge, Once};

    fn spec(name: &str, image: &str, boot: &str) -> TestSpec {
        TestSpec {
            name: name.into(),
            groups: vec![],
            plan: Plan::Run(RunSpec {
                image: image.into(),
                args: vec![],
                migrate: false,
                env_file: None,
                initrd: None,
                timeout_secs: Some(9.0),
                timeout_text: "9s".into(),
                judge: Judge::Kut,
                once: (!boot.is_empty()).then(|| {
                    Box::new(Once {
                        boot_args: vec![boot.into()],
                        input: "x\n".into(),
                    })
                }),
            }),
        }
    }

    #[test]
    fn tests_with_the_same_boot_share_a_group() {
        let specs = [
            spec("a", "k", "--smp=1"),
            spec("plain", "k", ""),
            spec("b", "k", "--smp=2"),
            spec("c", "k", "--smp=1"),
            spec("d", "other", "--smp=1"),
        ];
        let g: Vec<Vec<usize>> = group_tests(&specs).into_iter().map(|g| g.1).collect();
        assert_eq!(g, [vec![0, 3], vec![2], vec![4]]);
    }

    #[test]
    fn the_ready_line_is_found_across_chunks() {
        let (_tx, output) = mpsc::channel();
        let dir = tempfile::tempdir().unwrap();
        let mut vm = BootVm {
            child: Command::new("true").spawn().unwrap(),
            output,
            log: File::create(dir.path().join("log")).unwrap(),
            line: Vec::new(),
        };
        assert!(!vm.take(b"kvmrun.wait_cmd\r\nKVMRUN-RE"));
        assert!(vm.take(b"ADY\r\nmore"));
        assert!(!vm.take(b" KVMRUN-READY is not at the end\n"));
        let _ = vm.child.wait();
    }

    #[test]
    fn a_restore_gets_the_command_and_the_timeout() {
        let Plan::Run(rs) = spec("a", "k", "--smp=1").plan else {
            panic!()
        };
        let args: Vec<String> = restore_args(&rs, Path::new("/s"))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| !a.starts_with("--seccomp"))
            .collect();
        assert_eq!(
            args,
            [
                "restore",
                "/s",
                "--serial=stdio",
                "--timeout=9",
                "--serial-input=x\n"
            ]
        );
    }
}
