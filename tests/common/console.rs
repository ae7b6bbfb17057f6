//! A kvmrun process whose serial console (stdio) a test drives: lines of
//! guest output as they come, keys to the guest, the end.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::Run;

/// Backstop for waits on a guest; never a verdict.
pub const SAFETY: Duration = Duration::from_secs(180);

pub struct Console {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Console {
    pub fn spawn(args: &[&str]) -> Console {
        Console::spawn_with_env(args, &[])
    }

    /// `spawn()` with `envs` added to kvmrun's environment.
    pub fn spawn_with_env(args: &[&str], envs: &[(&str, &str)]) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvmrun"))
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start kvmrun");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Console {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Block until the guest printed a line containing `text`.
    pub fn wait_for(&mut self, text: &str) {
        if self.seen.iter().any(|l| l.contains(text)) {
            return;
        }
        let deadline = Instant::now() + SAFETY;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let hit = l.contains(text);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("guest never printed {text:?}; output: {:?}", self.seen),
            }
        }
    }

    pub fn key(&mut self) {
        self.send(b"k");
    }

    /// Write `bytes` to kvmrun's stdin. A kvmrun that has ended (a
    /// broken pipe) fails the test with its status and output.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            drop(self.stdin.take());
            let status = self.child.wait().map(|s| s.code());
            self.seen.extend(self.lines.iter());
            let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
            panic!(
                "cannot write {bytes:?} to kvmrun: {e}; it ended with {status:?}\n--- stdout\n{}\n--- stderr\n{}",
                self.seen.join("\n"),
                stderr.join().unwrap_or_default()
            );
        }
    }

    /// Wait for the end and collect everything.
    pub fn finish(mut self) -> Run {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        Run {
            status: status.code().unwrap_or(-1),
            stdout: self.seen.join("\n") + "\n",
            stderr: self.stderr.join().unwrap(),
        }
    }
}

/// Wait until the control socket `path` exists.
pub fn wait_socket(path: &Path) {
    let deadline = Instant::now() + SAFETY;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run a client command (`kvmrun status SOCKET`, ...).
pub fn ctl(args: &[&str]) -> Run {
    Run::from(
        super::kvmrun()
            .args(args)
            .output()
            .expect("cannot start kvmrun"),
    )
}
