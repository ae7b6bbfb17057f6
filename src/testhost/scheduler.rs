//! Run a suite: every test is a `kvmrun run` child process with its serial
//! output in `OUT/NAME.log`, at most `jobs` at a time.
//!
//! All children are polled and killed from the calling thread, and
//! started by the sandbox's launcher thread (unfiltered, so each child
//! installs its own seccomp filters), which lives as long as this
//! process: each child can carry `PR_SET_PDEATHSIG` (it dies with this
//! process even on SIGKILL) and sits in its own process group (a
//! terminal's Ctrl-C reaches only this process, which then stops every VM
//! and still writes reports).
//! A child gets `--timeout T` and is SIGKILLed if it is still alive
//! `kill_grace` seconds later, so a stuck VMM cannot hang the suite. Kills
//! go to the child's whole process group: a migrating child (`--migrate`)
//! is a supervisor whose VMs are its own children.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::once;
use super::progress::Progress;
use super::verdict::{self, Outcome, RawExit, Verdict};
use super::{file_stem, Judge, Plan, RunSpec, SuiteRun, TestResult, TestSpec};

/// How often running children are polled.
const POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
pub struct SuiteOptions {
    pub jobs: usize,
    pub out_dir: PathBuf,
    /// The binary that runs one VM (normally this executable).
    pub kvmrun: PathBuf,
    /// Seconds between a test's timeout and its hard kill.
    pub kill_grace: f64,
    /// Give every child `--migrate-every SECS` (a save/restore stress run).
    pub migrate_every: Option<f64>,
    /// Run every test with the split irqchip (`--irqchip=split`).
    pub split_irqchip: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot create the output directory {path}: {source}")]
    OutDir { path: PathBuf, source: io::Error },
    #[error("cannot make a directory for the boot-once snapshots: {0}")]
    OnceDir(io::Error),
}

struct Running {
    idx: usize,
    child: Child,
    start: Instant,
    hard_deadline: Option<Instant>,
    command: String,
    log: PathBuf,
    err: PathBuf,
}

/// Run `specs`; `stop` is set by the SIGINT/SIGTERM handler.
pub fn run(
    specs: &[TestSpec],
    opts: &SuiteOptions,
    stop: &AtomicBool,
    progress: &mut dyn Progress,
) -> Result<SuiteRun, SchedulerError> {
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| SchedulerError::OutDir {
        path: opts.out_dir.clone(),
        source,
    })?;
    let started = Instant::now();
    let jobs = opts.jobs.max(1);
    let mut results: Vec<Option<TestResult>> = vec![None; specs.len()];
    let mut running: Vec<Running> = Vec::new();
    let mut next = 0;
    progress.begin(specs.len());
    let boots = once::boot_groups(specs, opts, stop).map_err(SchedulerError::OnceDir)?;

    while next < specs.len() || !running.is_empty() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        while next < specs.len() && running.len() < jobs {
            let spec = &specs[next];
            match &spec.plan {
                Plan::Skip(reason) => {
                    let r = skipped(&spec.name, reason.clone());
                    progress.finished(&r);
                    results[next] = Some(r);
                }
                Plan::Run(rs) => {
                    let args = match boots.snapshot_for(next) {
                        None => preflight(rs, opts)
                            .map_or_else(|| Ok(child_args_of(&spec.name, rs, opts)), Err),
                        Some(Ok(snap)) => Ok(once::restore_args(rs, snap)),
                        Some(Err(why)) => Err(why.clone()),
                    };
                    match args {
                        // Only a preflight skips; a failed boot fails.
                        Err(why) if rs.once.is_none() => {
                            let r = skipped(&spec.name, why);
                            progress.finished(&r);
                            results[next] = Some(r);
                        }
                        Err(why) => {
                            let r = not_started(&spec.name, why);
                            progress.finished(&r);
                            results[next] = Some(r);
                        }
                        Ok(args) => match start(next, &spec.name, rs, opts, args) {
                            Ok(r) => {
                                progress.started(&spec.name);
                                running.push(r);
                            }
                            Err(e) => {
                                let r =
                                    not_started(&spec.name, format!("cannot start kvmrun: {e}"));
                                progress.finished(&r);
                                results[next] = Some(r);
                            }
                        },
                    }
                }
            }
            next += 1;
        }

        let mut i = 0;
        while i < running.len() {
            let r = &mut running[i];
            let now = Instant::now();
            let done = match r.child.try_wait() {
                Ok(Some(status)) => Some((status, false)),
                Ok(None) if r.hard_deadline.is_some_and(|d| now >= d) => {
                    kill_group(&mut r.child);
                    r.child.wait().ok().map(|s| (s, true))
                }
                Ok(None) => None,
                Err(_) => r.child.wait().ok().map(|s| (s, false)),
            };
            if let Some((status, killed)) = done {
                let r = running.swap_remove(i);
                let spec = &specs[r.idx];
                let Plan::Run(rs) = &spec.plan else {
                    unreachable!("only planned runs are started")
                };
                let raw = match (status.code(), status.signal()) {
                    (Some(c), _) => RawExit::Code(c),
                    (None, Some(s)) => RawExit::Signal(s),
                    (None, None) => RawExit::Code(-1),
                };
                let result = finish(&spec.name, rs, &r, raw, killed);
                progress.finished(&result);
                results[r.idx] = Some(result);
            } else {
                i += 1;
            }
        }
        progress.tick();
        if !running.is_empty() {
            std::thread::sleep(POLL);
        }
    }

    let interrupted = stop.load(Ordering::SeqCst) && results.iter().any(Option::is_none);
    for mut r in running {
        kill_group(&mut r.child);
        let _ = r.child.wait();
    }
    progress.end();
    Ok(SuiteRun {
        results,
        interrupted,
        wall: started.elapsed(),
        boot_once: boots.summary(),
    })
}

/// A test that failed without a VM of its own to judge.
fn not_started(name: &str, why: String) -> TestResult {
    TestResult {
        name: name.to_string(),
        outcome: Outcome {
            verdict: Verdict::Fail,
            summary: String::new(),
            reason: Some(why),
            status: None,
        },
        duration: Duration::ZERO,
        serial: String::new(),
        stderr: String::new(),
        command: String::new(),
    }
}

/// The result of a test the runner skips without starting a VM.
fn skipped(name: &str, why: String) -> TestResult {
    TestResult {
        name: name.to_string(),
        outcome: Outcome::runner_skip(why),
        duration: Duration::ZERO,
        serial: String::new(),
        stderr: String::new(),
        command: String::new(),
    }
}

/// Image name of the pre-flight run; no such file exists.
const PREFLIGHT_IMAGE: &str = "_NO_FILE_4Uhere_";

/// kvm-unit-tests' runner first starts the VMM with the test's options and
/// a kernel that does not exist; when the VMM fails for any other reason
/// than the missing kernel, the test is SKIPped with the VMM's last line
/// (that is how QEMU's unknown CPU properties become SKIP). Do the same
/// for kvm-unit-tests' tests: a command line kvmrun rejects is a SKIP with
/// kvmrun's reason, not a FAIL.
fn preflight(rs: &RunSpec, opts: &SuiteOptions) -> Option<String> {
    rs.env_file.as_ref()?;
    let mut cmd = Command::new(&opts.kvmrun);
    cmd.arg("run")
        .arg(PREFLIGHT_IMAGE)
        .args(&rs.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = crate::sandbox::spawn(cmd).ok()?.wait_with_output().ok()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains(PREFLIGHT_IMAGE) {
        return None;
    }
    // The runner shows QEMU's last line; kvmrun's reason is its error line.
    let why = err
        .lines()
        .find(|l| l.contains("error"))
        .or_else(|| err.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("");
    Some(why.trim().to_string())
}

/// SIGKILL `child` and every process of its group (it leads its own, see
/// `start()`); `child` is not reaped yet, so its id still names the group.
pub(super) fn kill_group(child: &mut Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill() only sends a signal.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
}

/// The `kvmrun run` arguments of a test; `env` is its environment file.
pub(super) fn child_args(rs: &RunSpec, opts: &SuiteOptions, env: Option<&Path>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "run".into(),
        rs.image.clone().into(),
        "--serial=stdio".into(),
    ];
    args.extend(crate::sandbox::child_flag().map(OsString::from));
    if let Some(initrd) = env.or(rs.initrd.as_deref()) {
        args.push("--initrd".into());
        args.push(initrd.into());
    }
    if let Some(t) = rs.timeout_secs {
        args.push(format!("--timeout={t}").into());
    }
    if rs.migrate {
        args.push("--migrate".into());
    }
    if let Some(every) = opts.migrate_every {
        args.push(format!("--migrate-every={every}").into());
    }
    if opts.split_irqchip {
        // Once each: a test's own flags may already say so.
        if !rs.args.iter().any(|a| a == "--irqchip=split") {
            args.push("--irqchip=split".into());
        }
    }
    args.extend(rs.args.iter().map(OsString::from));
    args
}

/// The `kvmrun run` arguments of a test that boots, with its
/// environment file (written at the start) in the output directory.
fn child_args_of(name: &str, rs: &RunSpec, opts: &SuiteOptions) -> Vec<OsString> {
    let env = rs
        .env_file
        .as_ref()
        .map(|_| opts.out_dir.join(format!("{}.env", file_stem(name))));
    child_args(rs, opts, env.as_deref())
}

/// Start test `idx` as `kvmrun ARGS`.
fn start(
    idx: usize,
    name: &str,
    rs: &RunSpec,
    opts: &SuiteOptions,
    args: Vec<OsString>,
) -> io::Result<Running> {
    let stem = file_stem(name);
    let log = opts.out_dir.join(format!("{stem}.log"));
    let err = opts.out_dir.join(format!("{stem}.stderr"));
    if let Some(text) = &rs.env_file {
        std::fs::write(opts.out_dir.join(format!("{stem}.env")), text)?;
    }
    let mut cmd = Command::new(&opts.kvmrun);
    cmd.args(args);
    let command = describe(&cmd);
    // Keep every flag the test ran with (the migration flags too) next to
    // its log, as the runner's log starts with its command line.
    std::fs::write(
        opts.out_dir.join(format!("{stem}.cmd")),
        format!("{command}\n"),
    )?;
    cmd.stdin(Stdio::null())
        .stdout(File::create(&log)?)
        .stderr(File::create(&err)?)
        .process_group(0);
    die_with_parent(&mut cmd);
    let start = Instant::now();
    let child = crate::sandbox::spawn(cmd)?;
    let hard_deadline = rs
        .timeout_secs
        .and_then(|t| Duration::try_from_secs_f64(t + opts.kill_grace).ok())
        .and_then(|d| start.checked_add(d));
    Ok(Running {
        idx,
        child,
        start,
        hard_deadline,
        command,
        log,
        err,
    })
}

/// Make the kernel SIGKILL the child `cmd` starts when the thread that
/// forks it ends (the launcher, which lives as long as kvmrun), so no VM
/// outlives the test host.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl() is async-signal-safe and touches no memory of the
    // parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The command as a shell-quoted line, for logs and reports.
fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    shlex::try_join(words.iter().map(String::as_str)).unwrap_or_else(|_| words.join(" "))
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn finish(name: &str, rs: &RunSpec, r: &Running, raw: RawExit, killed: bool) -> TestResult {
    let serial = read_lossy(&r.log);
    let stderr = read_lossy(&r.err);
    if stderr.is_empty() {
        // Keep the output directory to the files that say something.
        let _ = std::fs::remove_file(&r.err);
    }
    let outcome = if killed {
        let mut o = verdict::decide(124, &serial, &rs.timeout_text);
        o.reason = Some(format!("timeout; duration={}, killed", rs.timeout_text));
        o
    } else {
        judge(rs, raw, &serial, &stderr)
    };
    TestResult {
        name: name.to_string(),
        outcome,
        duration: r.start.elapsed(),
        serial,
        stderr,
        command: r.command.clone(),
    }
}

fn judge(rs: &RunSpec, raw: RawExit, serial: &str, stderr: &str) -> Outcome {
    match &rs.judge {
        Judge::Kut => verdict::decide(verdict::fixup_status(raw, stderr), serial, &rs.timeout_text),
        Judge::Expect {
            status,
            output,
            reject,
        } => {
            let code = match raw {
                RawExit::Code(c) => c,
                RawExit::Signal(s) => 128 + s,
            };
            let summary = verdict::extract_summary(serial);
            let text = serial.replace("\r\n", "\n");
            let fail = |why: String| Outcome {
                verdict: Verdict::Fail,
                summary: summary.clone(),
                reason: Some(why),
                status: Some(code),
            };
            if code == 124 && *status != 124 {
                return fail(format!("timeout; duration={}", rs.timeout_text));
            }
            if code != *status {
                // kvmrun's own error (a restore refused, say) is the cause.
                return fail(
                    match stderr.lines().find(|l| l.contains("kvmrun: error:")) {
                        Some(e) => format!("exit status {code}, expected {status}; {}", e.trim()),
                        None => format!("exit status {code}, expected {status}"),
                    },
                );
            }
            if let Some(p) = output.iter().find(|p| !p.is_match(&text)) {
                return fail(format!("output lacks /{p}/"));
            }
            if let Some(p) = reject.iter().find(|p| p.is_match(&text)) {
                return fail(format!("output has /{p}/"));
            }
            Outcome {
                verdict: Verdict::Pass,
                summary,
                reason: None,
                status: Some(code),
            }
        }
    }
}

/// Run failed test `name` again in the foreground, stopped before its
/// first instruction with a gdb stub at a socket in the output directory,
/// after printing the gdb command line that attaches with the image's
/// symbols; no timeout, no migration. Its exit status, when it ends.
pub fn rerun_for_gdb(name: &str, rs: &RunSpec, opts: &SuiteOptions) -> io::Result<i32> {
    let stem = file_stem(name);
    // The caller made `out_dir` absolute, so gdb may attach from anywhere.
    let sock = opts.out_dir.join(format!("{stem}.gdb"));
    let env = rs
        .env_file
        .as_ref()
        .map(|_| opts.out_dir.join(format!("{stem}.env")));
    let plain = RunSpec {
        timeout_secs: None,
        migrate: false,
        ..rs.clone()
    };
    let plain_opts = SuiteOptions {
        migrate_every: None,
        ..opts.clone()
    };
    let mut cmd = Command::new(&opts.kvmrun);
    cmd.args(child_args(&plain, &plain_opts, env.as_deref()))
        .arg("--gdb")
        .arg(&sock)
        .arg("--gdb-wait")
        .stdin(Stdio::null());
    let address = crate::gdb::Address::Unix(sock);
    println!(
        "{name} failed; it runs again, waiting for gdb:\n  {}",
        crate::gdb::gdb_command(&address, &rs.image)
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let status = crate::sandbox::spawn(cmd)?.wait()?;
    Ok(status.code().unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(migrate: bool) -> RunSpec {
        RunSpec {
            image: "t.flat".into(),
            args: vec!["--smp=1".into()],
            migrate,
            env_file: Some(String::new()),
            initrd: None,
            timeout_secs: Some(90.0),
            timeout_text: "90s".into(),
            judge: Judge::Kut,
            once: None,
        }
    }

    fn opts(migrate_every: Option<f64>) -> SuiteOptions {
        SuiteOptions {
            jobs: 1,
            out_dir: "out".into(),
            kvmrun: "kvmrun".into(),
            kill_grace: 5.0,
            migrate_every,
            split_irqchip: false,
        }
    }

    fn args(rs: &RunSpec, o: &SuiteOptions) -> Vec<String> {
        child_args(rs, o, Some(Path::new("out/t.env")))
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn migration_flags_reach_the_child() {
        let base = [
            "run",
            "t.flat",
            "--serial=stdio",
            "--initrd",
            "out/t.env",
            "--timeout=90",
        ];
        assert_eq!(
            args(&spec(false), &opts(None)),
            [&base[..], &["--smp=1"]].concat()
        );
        assert_eq!(
            args(&spec(true), &opts(None)),
            [&base[..], &["--migrate", "--smp=1"]].concat()
        );
        assert_eq!(
            args(&spec(false), &opts(Some(0.25))),
            [&base[..], &["--migrate-every=0.25", "--smp=1"]].concat()
        );
        assert_eq!(
            args(&spec(true), &opts(Some(2.0))),
            [&base[..], &["--migrate", "--migrate-every=2", "--smp=1"]].concat()
        );
    }

    #[test]
    fn split_irqchip_reaches_the_child_once() {
        let split = SuiteOptions {
            split_irqchip: true,
            ..opts(None)
        };
        let a = args(&spec(false), &split);
        assert!(a.ends_with(&["--irqchip=split".into(), "--smp=1".into()]));
        let mut own = spec(false);
        own.args = vec!["--irqchip=split".into(), "--no-pit".into()];
        let a = args(&own, &split);
        assert_eq!(a.iter().filter(|x| *x == "--irqchip=split").count(), 1);
        assert_eq!(a.iter().filter(|x| *x == "--no-pit").count(), 1);
    }
}
