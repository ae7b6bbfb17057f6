//! Starting child processes from a thread without a seccomp filter.
//!
//! A filter passes to every process its thread starts, and past execve,
//! so a filtered supervisor or scheduler cannot start a VM that needs
//! more than it may do. A launcher thread, started before the caller's
//! filter is installed, does the fork and exec instead; the children then
//! install their own filters. The launcher lives until kvmrun exits, so a
//! child's `PR_SET_PDEATHSIG` (tied to the thread that forked it) fires
//! only when kvmrun ends.

use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};

type Job = (Command, Sender<io::Result<Child>>);

static LAUNCHER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Start the launcher thread if it is not running yet.
pub(super) fn start() -> io::Result<()> {
    if LAUNCHER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        })?;
    // Two callers racing here would each start a thread; the loser's
    // thread ends at once, its channel dropped.
    let _ = LAUNCHER.set(Mutex::new(tx));
    Ok(())
}

/// Start `cmd` on the launcher thread (started now if needed, which is
/// only right before any filter is installed on this thread).
pub fn spawn(cmd: Command) -> io::Result<Child> {
    start()?;
    let Some(launcher) = LAUNCHER.get() else {
        return Err(io::Error::other("no launcher thread"));
    };
    let (reply, answer) = mpsc::channel();
    launcher
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .map_err(|_| io::Error::other("the launcher thread has ended"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the launcher thread has ended"))?
}
