//! `kvmrun run --migrate`: answer a guest's migration requests the way
//! kvm-unit-tests' migration harness does with two QEMUs.
//!
//! The guest asks by printing a line and then waits for a key on its
//! serial port (kvm-unit-tests' lib/migrate.c). The supervisor runs the VM
//! as a child `kvmrun run --api SOCKET`, copies its output through and
//! watches it, line by line:
//!
//! - `Now migrate the VM`: snapshot the VM (stopped), end it, restore the
//!   snapshot into a fresh `kvmrun restore` process, send the key there.
//! - `Skipped VM migration`: send the key; no migration.
//! - `Begin continuous migration`: send the key, then migrate back to back
//!   until `End continuous migration`, after which the key goes to the new
//!   VM. The guest prints the end line twice, once with ` (quiet)`, for
//!   harnesses that may see only one; the quiet copies of the begin and
//!   end lines are ignored here.
//!
//! The exit status is the last VM's, and `--timeout` spans all of them.
//! With an interval (`--migrate-every SECS`) the VM is also migrated
//! whenever it ran that long since the last migration, without a key, so
//! any test can be run across save/restore points.
//!
//! Each window of running lasts at least as long as the last migration
//! took, interval or continuous. Otherwise a host on which a migration
//! costs more than the window (nested virtualization under emulation, or
//! a loaded machine) gives the guest an ever smaller share of the time:
//! twice as slow a host means twice as many migrations each costing
//! twice as much. Restored VMs read guest RAM whole (`restore --memory
//! copy`): a guest migrated all along would otherwise spend each window
//! refaulting its working set page by page from the memory file, where
//! anonymous memory can use huge pages (measured on the AMD-V host,
//! docs/TESTHOST.md).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::api::{self, ApiError, Request};

/// What the guest prints to ask for a migration (kvm-unit-tests'
/// `migrate()` and `migrate_quiet()`).
pub const MIGRATE_REQUEST: &[u8] = b"Now migrate the VM";
/// `migrate_skip()`: no migration will come; the key lets the guest go on.
const SKIP_REQUEST: &[u8] = b"Skipped VM migration";
/// `migrate_begin_continuous()` and `migrate_end_continuous()`.
const BEGIN_CONTINUOUS: &[u8] = b"Begin continuous migration";
const END_CONTINUOUS: &[u8] = b"End continuous migration";
const QUIET_END_COPY: &[u8] = b"End continuous migration (quiet)";
const QUIET_BEGIN_COPY: &[u8] = b"Begin continuous migration (quiet)";

/// Least time a VM runs between continuous migrations.
const MIN_CONTINUOUS_RUN: Duration = Duration::from_millis(10);

/// Backstops, never verdicts: how long a new VM may take to serve its
/// control socket, and a VM that failed a request to end.
const SOCKET_WAIT: Duration = Duration::from_secs(60);
const ENDING_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("--migrate needs the guest's serial output on stdout (--serial stdio)")]
    Serial,
    #[error("cannot make a work directory for --migrate: {0}")]
    WorkDir(std::io::Error),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("migration {n}: {source}")]
    Api { n: u32, source: ApiError },
    #[error("migration {n}: the VM answered {answer}")]
    Refused { n: u32, answer: String },
    #[error("copying the guest's output: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    Sandbox(crate::sandbox::SandboxError),
}

/// One VM process and the ends of its pipes.
struct Vm {
    child: Child,
    /// The VM's output, read by a thread so a timer can interrupt waiting.
    output: Receiver<Vec<u8>>,
    // Kept open: the guest's serial input; the key is written here.
    stdin: ChildStdin,
    socket: PathBuf,
}

/// Forward everything `stdout` produces to a channel, until end of file.
fn reader(mut stdout: ChildStdout) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    rx
}

fn spawn(exe: &Path, args: &[OsString], what: &'static str) -> Result<Vm, MigrateError> {
    let socket = args
        .windows(2)
        .find(|w| w[0] == "--api")
        .map(|w| PathBuf::from(&w[1]))
        .unwrap_or_default();
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
    // SAFETY: prctl() is async-signal-safe and touches no memory of the
    // parent. A VM must not outlive its supervisor (killed by `kvmrun
    // test`, or failed mid-migration): nothing would read its output or
    // answer its requests.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        crate::sandbox::spawn(cmd).map_err(|source| MigrateError::Spawn { what, source })?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err(MigrateError::Spawn {
            what,
            source: std::io::Error::other("no pipes"),
        });
    };
    Ok(Vm {
        child,
        output: reader(stdout),
        stdin,
        socket,
    })
}

/// Send `req` to `vm`'s control socket. A VM just started may not serve
/// it yet: retry while the socket is missing or refuses, the VM lives, and
/// for at most `SOCKET_WAIT`.
fn call(n: u32, vm: &mut Vm, req: &Request) -> Result<(), MigrateError> {
    let started = Instant::now();
    let answer = loop {
        match api::call(&vm.socket, req) {
            Err(ApiError::Socket { ref source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && started.elapsed() < SOCKET_WAIT
                    && matches!(vm.child.try_wait(), Ok(None)) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            r => break r.map_err(|source| MigrateError::Api { n, source })?,
        }
    };
    if answer.get("ok") == Some(&serde_json::Value::Bool(true)) {
        Ok(())
    } else {
        Err(MigrateError::Refused {
            n,
            answer: answer.to_string(),
        })
    }
}

/// What a line of guest output asks of the supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Nothing,
    Migrate,
    Skip,
    BeginContinuous,
    EndContinuous,
}

fn contains(line: &[u8], what: &[u8]) -> bool {
    line.windows(what.len()).any(|w| w == what)
}

/// What the complete line `line` asks for.
fn ask(line: &[u8]) -> Ask {
    if contains(line, MIGRATE_REQUEST) {
        Ask::Migrate
    } else if contains(line, SKIP_REQUEST) {
        Ask::Skip
    } else if contains(line, QUIET_BEGIN_COPY) || contains(line, QUIET_END_COPY) {
        Ask::Nothing
    } else if contains(line, BEGIN_CONTINUOUS) {
        Ask::BeginContinuous
    } else if contains(line, END_CONTINUOUS) {
        Ask::EndContinuous
    } else {
        Ask::Nothing
    }
}

/// The guest's requests, read from its output. Every byte any VM of the
/// run prints goes through `feed()` exactly once and in order, so a
/// request printed just before a stop, or split between the stopped VM
/// and its restored copy, is answered like any other.
#[derive(Debug, Default)]
struct Requests {
    /// The line read so far; it outlives the VM that started it.
    line: Vec<u8>,
    /// Between the begin and end of continuous migration.
    continuous: bool,
    /// Keys the guest waits for that no migration has to precede.
    keys: u32,
    /// A guest waits for its key after the next migration.
    migrate: bool,
}

impl Requests {
    fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            self.line.push(b);
            if b != b'\n' {
                continue;
            }
            match ask(&self.line) {
                Ask::Nothing => {}
                Ask::Migrate => self.migrate = true,
                Ask::Skip => self.keys += 1,
                Ask::BeginContinuous => {
                    self.continuous = true;
                    self.keys += 1;
                }
                Ask::EndContinuous => {
                    self.continuous = false;
                    self.migrate = true;
                }
            }
            self.line.clear();
        }
    }

    /// Keys owed now; with `migrated`, also the key of a request the
    /// migration just done answers.
    fn take_keys(&mut self, migrated: bool) -> u32 {
        let keys = std::mem::take(&mut self.keys);
        if migrated && std::mem::take(&mut self.migrate) {
            keys + 1
        } else {
            keys
        }
    }
}

fn send_keys(vm: &mut Vm, keys: u32) -> Result<(), MigrateError> {
    for _ in 0..keys {
        vm.stdin.write_all(b"\n").map_err(MigrateError::Io)?;
    }
    vm.stdin.flush().map_err(MigrateError::Io)
}

/// Copy `chunk` of guest output to stdout and read the requests in it.
fn pass_on(out: &mut impl Write, reqs: &mut Requests, chunk: &[u8]) -> Result<(), MigrateError> {
    out.write_all(chunk).map_err(MigrateError::Io)?;
    out.flush().map_err(MigrateError::Io)?;
    reqs.feed(chunk);
    Ok(())
}

/// Test-only: with this set in the environment, a chunk of output that
/// holds a request is held back until the VM has been stopped for a
/// migration, so the request reaches the supervisor as output in flight
/// at the stop: the race a loaded machine produces by chance, every time.
const RACE_HOOK: &str = "KVMRUN_TEST_STOP_BEFORE_REQUEST";

fn holds_request(chunk: &[u8]) -> bool {
    [
        MIGRATE_REQUEST,
        SKIP_REQUEST,
        BEGIN_CONTINUOUS,
        END_CONTINUOUS,
    ]
    .iter()
    .any(|r| contains(chunk, r))
}

/// Run `kvmrun` with `run_args` (a `run` command line without --migrate),
/// migrating at every request. `timeout` is forwarded to restored VMs.
pub fn supervise(
    exe: &Path,
    run_args: &[OsString],
    timeout: Option<f64>,
    every: Option<Duration>,
) -> Result<i32, MigrateError> {
    let work = std::env::temp_dir().join(format!("kvmrun-migrate-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(MigrateError::WorkDir)?;
    let result = crate::sandbox::enter(crate::sandbox::Kind::Supervisor)
        .map_err(MigrateError::Sandbox)
        .and_then(|()| supervise_in(exe, run_args, timeout, every, &work));
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn supervise_in(
    exe: &Path,
    run_args: &[OsString],
    timeout: Option<f64>,
    every: Option<Duration>,
    work: &Path,
) -> Result<i32, MigrateError> {
    let snap = work.join("snapshot");
    let socket = |n: u32| work.join(format!("vm{n}.sock"));
    // --api goes right after `run`, before any `--` and guest arguments.
    let mut args: Vec<OsString> = Vec::with_capacity(run_args.len() + 2);
    for a in run_args {
        args.push(a.clone());
        if a == "run" && !args.iter().any(|x| x == "--api") {
            args.push("--api".into());
            args.push(socket(0).into());
        }
    }
    let race_hook = std::env::var_os(RACE_HOOK).is_some();
    let started = Instant::now();
    let mut vm = spawn(exe, &args, "the VM")?;
    let mut out = std::io::stdout();
    let mut reqs = Requests::default();
    let mut held: Option<Vec<u8>> = None;
    let mut n = 0u32;
    let mut last = running_since(&mut vm, every);
    // How long the last migration took (see `window()`).
    let mut cost = Duration::ZERO;
    loop {
        let run_for = window(reqs.continuous, every, cost);
        let wait = run_for.map_or(Duration::from_secs(3600), |w| {
            w.saturating_sub(last.elapsed())
        });
        match vm.output.recv_timeout(wait) {
            Ok(chunk) if race_hook && holds_request(&chunk) => held = Some(chunk),
            Ok(chunk) => pass_on(&mut out, &mut reqs, &chunk)?,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        send_keys(&mut vm, reqs.take_keys(false))?;
        let due = reqs.migrate || held.is_some() || run_for.is_some_and(|w| last.elapsed() >= w);
        if !due {
            continue;
        }
        n += 1;
        let migration_started = Instant::now();
        log::info!("migration {n}: snapshot, restore into a new VM");
        let saved = call(
            n,
            &mut vm,
            &Request::Snapshot {
                dir: snap.clone(),
                stop: true,
            },
        );
        // A VM that ended as a migration came due (its guest finished, or
        // its timeout expired, even while stopped) has nothing left to
        // migrate; its status is the run's.
        let stopped = saved.and_then(|()| call(n, &mut vm, &Request::Quit {}));
        if let Some(chunk) = held.take() {
            pass_on(&mut out, &mut reqs, &chunk)?;
        }
        if stopped.is_err() && ended(&mut vm, &mut out, &mut reqs)? {
            break;
        }
        stopped?;
        // The stopped VM prints nothing more; what it printed before the
        // stop is still in flight and may hold a request.
        while let Ok(rest) = vm.output.recv() {
            pass_on(&mut out, &mut reqs, &rest)?;
        }
        let _ = vm.child.wait();
        let mut restore: Vec<OsString> = vec![
            "restore".into(),
            snap.clone().into(),
            "--memory=copy".into(),
            "--api".into(),
        ];
        restore.push(socket(n).into());
        restore.extend(crate::sandbox::child_flag().map(OsString::from));
        if let Some(t) = timeout {
            restore.push(format!("--timeout={:.3}", remaining(t, started.elapsed())).into());
        }
        vm = spawn(exe, &restore, "the restored VM")?;
        send_keys(&mut vm, reqs.take_keys(true))?;
        last = running_since(&mut vm, every);
        cost = last - migration_started;
        if let Some(w) = window(reqs.continuous, every, cost) {
            log::info!("migration {n}: took {cost:.2?}; the next comes after {w:.2?} of running");
        }
    }
    // The last VM's output, to its end.
    while let Ok(rest) = vm.output.recv() {
        pass_on(&mut out, &mut reqs, &rest)?;
    }
    let status = vm.child.wait().map_err(MigrateError::Io)?;
    Ok(status.code().unwrap_or(crate::shutdown::STATUS_ERROR))
}

/// How long the VM runs before the next unrequested migration: without
/// one due (`None`), until a request; continuous, as long as the last
/// migration took (`cost`); with an interval, the interval or `cost`,
/// whichever is longer. A snapshot stops the guest, unlike QEMU's live
/// migration, so windows no shorter than a migration keep the guest's
/// share of the time at a half or more however slow the host.
fn window(continuous: bool, every: Option<Duration>, cost: Duration) -> Option<Duration> {
    if continuous {
        Some(cost.max(MIN_CONTINUOUS_RUN))
    } else {
        every.map(|e| e.max(cost))
    }
}

/// When `vm` started running. With an interval, that is when it serves its
/// control socket (its vCPUs start right after), so a VM that takes longer
/// to build or restore than the interval (a slow host, nested
/// virtualization) still runs the guest for the interval before the next
/// migration, instead of being migrated again at once and never getting
/// anywhere. A VM that ends first is left to the loop, which sees its end.
fn running_since(vm: &mut Vm, every: Option<Duration>) -> Instant {
    if every.is_some() {
        let _ = call(0, vm, &Request::Status {});
    }
    Instant::now()
}

/// Whether `vm` is ending: its output reaches its end (passed on like
/// any other) within `ENDING_WAIT`, a backstop for a VM that refused a
/// request and lives on.
fn ended(vm: &mut Vm, out: &mut impl Write, reqs: &mut Requests) -> Result<bool, MigrateError> {
    let deadline = Instant::now() + ENDING_WAIT;
    loop {
        match vm
            .output
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(chunk) => pass_on(out, reqs, &chunk)?,
            Err(RecvTimeoutError::Disconnected) => return Ok(true),
            Err(RecvTimeoutError::Timeout) => return Ok(false),
        }
    }
}

/// Seconds left of a `timeout` after `elapsed`; at least 1 ms,
/// so an expired timeout still ends the restored VM at once.
fn remaining(timeout: f64, elapsed: Duration) -> f64 {
    (timeout - elapsed.as_secs_f64()).max(0.001)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_recognised() {
        let cases: [(&[u8], Ask); 8] = [
            (
                b"Now migrate the VM, then press a key to continue...\r\n",
                Ask::Migrate,
            ),
            (b"Now migrate the VM (quiet)\n", Ask::Migrate),
            (b"Skipped VM migration (quiet)\n", Ask::Skip),
            (b"Begin continuous migration\n", Ask::BeginContinuous),
            (b"End continuous migration\n", Ask::EndContinuous),
            (b"End continuous migration (quiet)\n", Ask::Nothing),
            (b"Begin continuous migration (quiet)\n", Ask::Nothing),
            (b"PASS: migration\n", Ask::Nothing),
        ];
        for (line, want) in cases {
            assert_eq!(ask(line), want, "{}", String::from_utf8_lossy(line));
        }
    }

    /// A request line cut at every byte between the stopped VM's output
    /// and its restored copy's is still one request.
    #[test]
    fn a_request_split_across_a_migration_is_recognised() {
        let output = b"phase 1 done\nNow migrate the VM, then press a key\r\n";
        for cut in 0..=output.len() {
            let mut r = Requests::default();
            r.feed(&output[..cut]);
            r.feed(&output[cut..]);
            assert!(r.migrate, "cut at {cut}");
            assert!(r.line.is_empty(), "cut at {cut}");
            assert_eq!(r.take_keys(true), 1, "cut at {cut}");
        }
    }

    #[test]
    fn every_request_asks_for_its_key() {
        let mut r = Requests::default();
        r.feed(b"Skipped VM migration (quiet)\n");
        assert_eq!(r.take_keys(false), 1);
        assert_eq!(r.take_keys(true), 0);
        r.feed(b"Begin continuous migration\nBegin continuous migration (quiet)\n");
        assert!(r.continuous);
        assert_eq!(r.take_keys(false), 1);
        r.feed(b"End continuous migration\nEnd continuous migration (quiet)\n");
        assert!(!r.continuous);
        // The end's key waits for the migration after it.
        assert_eq!(r.take_keys(false), 0);
        assert_eq!(r.take_keys(true), 1);
        assert_eq!(r.take_keys(true), 0);
    }

    /// A request the stopped VM printed before its stop, read only from
    /// the output in flight, is answered after the migration under way.
    #[test]
    fn a_request_in_flight_at_a_stop_is_answered_after_it() {
        for line in [
            &b"End continuous migration\n"[..],
            b"Now migrate the VM, then press a key to continue...\n",
        ] {
            let mut r = Requests {
                continuous: true,
                ..Requests::default()
            };
            // A timed migration fell due; the stopped VM's last output:
            r.feed(line);
            assert_eq!(r.take_keys(true), 1, "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn the_race_hook_holds_back_only_requests() {
        assert!(holds_request(b"x\nEnd continuous migration\n"));
        assert!(holds_request(b"Now migrate the VM"));
        assert!(!holds_request(b"PASS: migration\n"));
    }

    #[test]
    fn a_window_lasts_at_least_as_long_as_a_migration() {
        let ms = Duration::from_millis;
        assert_eq!(window(false, None, ms(900)), None);
        assert_eq!(window(false, Some(ms(500)), ms(20)), Some(ms(500)));
        assert_eq!(window(false, Some(ms(500)), ms(3000)), Some(ms(3000)));
        assert_eq!(window(true, None, ms(0)), Some(MIN_CONTINUOUS_RUN));
        assert_eq!(window(true, Some(ms(500)), ms(40)), Some(ms(40)));
    }

    #[test]
    fn the_timeout_spans_every_vm() {
        let elapsed = Duration::from_millis(2500);
        assert_eq!(remaining(10.0, elapsed), 7.5);
        assert_eq!(remaining(1.0, elapsed), 0.001);
    }
}
