//! `kvmrun run --migrate`: answer a guest's migration requests the way
//! kvm-unit-tests' migration harness does with two QEMUs.
//!
//! The guest asks by printing `Now migrate the VM` and then waits for a key
//! on its serial port. The supervisor runs the VM as a child `kvmrun run
//! --api SOCKET`, copies its output through and watches it; at each request
//! it snapshots the VM (stopped), ends it, restores the snapshot into a
//! fresh `kvmrun restore` process and sends the key there. This repeats for
//! every request; the exit status is the last VM's. With an interval
//! (`--migrate-every SECS`) the VM is also migrated whenever that much time
//! passed since the last migration, without a key, so any test can be run
//! across save/restore points.

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

fn call(n: u32, socket: &Path, req: &Request) -> Result<(), MigrateError> {
    let answer = api::call(socket, req).map_err(|source| MigrateError::Api { n, source })?;
    if answer.get("ok") == Some(&serde_json::Value::Bool(true)) {
        Ok(())
    } else {
        Err(MigrateError::Refused {
            n,
            answer: answer.to_string(),
        })
    }
}

/// Whether `line` is a complete line asking for a migration.
fn asks_to_migrate(line: &[u8]) -> bool {
    line.windows(MIGRATE_REQUEST.len())
        .any(|w| w == MIGRATE_REQUEST)
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
    let mut vm = spawn(exe, &args, "the VM")?;
    let mut out = std::io::stdout();
    let mut line: Vec<u8> = Vec::new();
    let mut n = 0u32;
    let mut last = Instant::now();
    loop {
        let wait = every.map_or(Duration::from_secs(3600), |e| {
            e.saturating_sub(last.elapsed())
        });
        let requested = match vm.output.recv_timeout(wait) {
            Ok(chunk) => {
                out.write_all(&chunk).map_err(MigrateError::Io)?;
                out.flush().map_err(MigrateError::Io)?;
                let mut requested = false;
                for &b in &chunk {
                    line.push(b);
                    if b == b'\n' {
                        requested |= asks_to_migrate(&line);
                        line.clear();
                    }
                }
                requested
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let due = every.is_some_and(|e| last.elapsed() >= e);
        if !(requested || due) {
            continue;
        }
        n += 1;
        log::info!("migration {n}: snapshot, restore into a new VM");
        let saved = call(
            n,
            &vm.socket,
            &Request::Snapshot {
                dir: snap.clone(),
                stop: true,
            },
        );
        // A VM that ended just as a timed migration came due has nothing
        // left to migrate.
        if saved.is_err() && !requested {
            if let Ok(Some(_)) = vm.child.try_wait() {
                break;
            }
        }
        saved?;
        call(n, &vm.socket, &Request::Quit {})?;
        // The stopped VM prints nothing more; pass on what is in flight.
        while let Ok(rest) = vm.output.recv() {
            out.write_all(&rest).map_err(MigrateError::Io)?;
        }
        let _ = vm.child.wait();
        let mut restore: Vec<OsString> =
            vec!["restore".into(), snap.clone().into(), "--api".into()];
        restore.push(socket(n).into());
        if let Some(t) = timeout {
            restore.push(format!("--timeout={t}").into());
        }
        vm = spawn(exe, &restore, "the restored VM")?;
        if requested {
            vm.stdin.write_all(b"\n").map_err(MigrateError::Io)?;
            vm.stdin.flush().map_err(MigrateError::Io)?;
        }
        last = Instant::now();
    }
    let status = vm.child.wait().map_err(MigrateError::Io)?;
    Ok(status.code().unwrap_or(crate::shutdown::STATUS_ERROR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_recognised() {
        assert!(asks_to_migrate(
            b"Now migrate the VM, then press a key to continue...\r\n"
        ));
        assert!(asks_to_migrate(b"Now migrate the VM (quiet)\n"));
        assert!(!asks_to_migrate(b"Skipped VM migration (quiet)\n"));
    }
}
