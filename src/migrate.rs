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
//! whenever that much time passed since the last migration, without a
//! key, so any test can be run across save/restore points.

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

/// How long a new VM may take to serve its control socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);

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
    let mut child = cmd
        .spawn()
        .map_err(|source| MigrateError::Spawn { what, source })?;
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

fn send_key(vm: &mut Vm) -> Result<(), MigrateError> {
    vm.stdin.write_all(b"\n").map_err(MigrateError::Io)?;
    vm.stdin.flush().map_err(MigrateError::Io)
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
    let result = supervise_in(exe, run_args, timeout, every, &work);
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
    let started = Instant::now();
    let mut vm = spawn(exe, &args, "the VM")?;
    let mut out = std::io::stdout();
    let mut line: Vec<u8> = Vec::new();
    let mut n = 0u32;
    let mut last = Instant::now();
    let mut continuous = false;
    // Between continuous migrations the VM runs at least as long as the
    // last migration took, so the guest makes progress: a snapshot stops
    // it, unlike QEMU's live migration.
    let mut cost = Duration::ZERO;
    loop {
        let wait = if continuous {
            cost.max(MIN_CONTINUOUS_RUN).saturating_sub(last.elapsed())
        } else {
            every.map_or(Duration::from_secs(3600), |e| {
                e.saturating_sub(last.elapsed())
            })
        };
        // Whether a guest waits for its key on the other side.
        let mut requested = false;
        match vm.output.recv_timeout(wait) {
            Ok(chunk) => {
                out.write_all(&chunk).map_err(MigrateError::Io)?;
                out.flush().map_err(MigrateError::Io)?;
                for &b in &chunk {
                    line.push(b);
                    if b != b'\n' {
                        continue;
                    }
                    match ask(&line) {
                        Ask::Nothing => {}
                        Ask::Migrate => requested = true,
                        Ask::Skip => send_key(&mut vm)?,
                        Ask::BeginContinuous => {
                            continuous = true;
                            send_key(&mut vm)?;
                        }
                        Ask::EndContinuous => {
                            continuous = false;
                            requested = true;
                        }
                    }
                    line.clear();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        let due = (continuous && last.elapsed() >= cost.max(MIN_CONTINUOUS_RUN))
            || every.is_some_and(|e| last.elapsed() >= e);
        if !(requested || due) {
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
        if stopped.is_err() && ended_soon(&mut vm) {
            break;
        }
        stopped?;
        // The stopped VM prints nothing more; pass on what is in flight.
        while let Ok(rest) = vm.output.recv() {
            out.write_all(&rest).map_err(MigrateError::Io)?;
        }
        let _ = vm.child.wait();
        let mut restore: Vec<OsString> =
            vec!["restore".into(), snap.clone().into(), "--api".into()];
        restore.push(socket(n).into());
        if let Some(t) = timeout {
            restore.push(format!("--timeout={:.3}", remaining(t, started)).into());
        }
        vm = spawn(exe, &restore, "the restored VM")?;
        if requested {
            send_key(&mut vm)?;
        }
        last = Instant::now();
        cost = last - migration_started;
    }
    let status = vm.child.wait().map_err(MigrateError::Io)?;
    Ok(status.code().unwrap_or(crate::shutdown::STATUS_ERROR))
}

/// Whether `vm` has ended or ends within a second.
fn ended_soon(vm: &mut Vm) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        if !matches!(vm.child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Seconds left of a `timeout` that started at `started`; at least 1 ms,
/// so an expired timeout still ends the restored VM at once.
fn remaining(timeout: f64, started: Instant) -> f64 {
    (timeout - started.elapsed().as_secs_f64()).max(0.001)
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

    #[test]
    fn the_timeout_spans_every_vm() {
        let started = Instant::now() - Duration::from_secs(2);
        let left = remaining(10.0, started);
        assert!(left > 7.0 && left <= 8.0, "{left}");
        assert_eq!(remaining(1.0, started), 0.001);
    }
}
