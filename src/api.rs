//! The control socket (`kvmrun run --api PATH`): a Unix stream socket
//! speaking line-delimited JSON, one request object per line and one
//! response object per line. docs/API.md describes the protocol.
//!
//! The server is an event-manager subscriber on the main thread. `status`
//! and `quit` are answered at once; `pause`, `resume` and `snapshot` need
//! the vCPUs stopped, so they are queued in [`Control`], the vCPUs are
//! asked to stop, and the main loop answers them between rounds.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

use crate::shutdown::{ExitReason, Shutdown};

/// Longest request line accepted; a longer one is an error, not a buffer
/// that grows without bound.
const MAX_LINE: usize = 64 * 1024;

/// One request. On the wire: `{"cmd": "snapshot", "dir": "/x", "stop": false}`.
/// Variants without arguments are empty structs so that unknown fields
/// are refused for them too.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Pause {},
    Resume {},
    Snapshot {
        dir: PathBuf,
        #[serde(default)]
        stop: bool,
    },
    Status {},
    Quit {},
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: {what}", path.display())]
    Bad { path: PathBuf, what: String },
    #[error("control socket {}: the VM answered: {error}", path.display())]
    Refused { path: PathBuf, error: String },
}

/// Requests waiting for the main loop, and what `status` reports.
pub struct Control {
    pending: Mutex<VecDeque<(Request, UnixStream)>>,
    paused: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Self::new()
    }
}

impl Control {
    pub fn new() -> Self {
        Control {
            pending: Mutex::new(VecDeque::new()),
            paused: AtomicBool::new(false),
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.lock().is_empty()
    }

    pub fn take(&self) -> Vec<(Request, UnixStream)> {
        self.lock().drain(..).collect()
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Request, UnixStream)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn state_name(paused: bool) -> &'static str {
    if paused {
        "paused"
    } else {
        "running"
    }
}

/// Send one response line: `{"ok": true, "state": ..., more fields}` or
/// `{"ok": false, "error": "...", "state": ...}`. A client that went away
/// is not an error of the VM.
pub fn reply(mut to: UnixStream, answer: Result<serde_json::Value, String>, paused: bool) {
    let mut v = match answer {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("ok".into(), true.into());
            serde_json::Value::Object(m)
        }
        Ok(_) => serde_json::json!({ "ok": true }),
        Err(e) => serde_json::json!({ "ok": false, "error": e }),
    };
    v["state"] = state_name(paused).into();
    let mut line = v.to_string();
    line.push('\n');
    // Responses are small and go to an idle socket; a client that does
    // not read cannot stall the VM for long.
    let _ = to.set_nonblocking(false);
    let _ = to.set_write_timeout(Some(std::time::Duration::from_secs(1)));
    if let Err(e) = to.write_all(line.as_bytes()) {
        log::debug!("control socket: cannot answer: {e}");
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The listening socket and its connections.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<RawFd, Conn>,
    control: Arc<Control>,
    shutdown: Arc<Shutdown>,
}

/// A listening socket at `path` that appears there only once it listens:
/// bound under a temporary name beside it and renamed into place, so a
/// client that waits for the path never finds a socket that refuses it
/// (bind() and listen() are two steps).
fn listen_at(path: &Path) -> std::io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    match UnixListener::bind(&tmp) {
        Ok(l) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(l),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        },
        // A temporary name past the socket path limit: bind in place.
        Err(_) => UnixListener::bind(path),
    }
}

impl ApiServer {
    /// Listen at `path`. A stale socket there is replaced; any other file
    /// is left alone and is an error.
    pub fn bind(
        path: &Path,
        control: Arc<Control>,
        shutdown: Arc<Shutdown>,
    ) -> Result<Self, ApiError> {
        let err = |source| ApiError::Socket {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiError::Bad {
                    path: path.to_path_buf(),
                    what: "exists and is not a socket".into(),
                });
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = listen_at(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            control,
            shutdown,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conns.insert(
                    stream.as_raw_fd(),
                    Conn {
                        stream,
                        buf: Vec::new(),
                    },
                );
            }
        }
    }

    fn close(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(c) = self.conns.remove(&fd) {
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
        }
    }

    fn readable(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let mut lines = Vec::new();
        while let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') {
            lines.push(conn.buf.drain(..=nl).collect::<Vec<u8>>());
        }
        let overlong = conn.buf.len() > MAX_LINE;
        let stream = conn.stream.try_clone();
        for line in lines {
            let Ok(s) = stream.as_ref().map(|s| s.try_clone()) else {
                break;
            };
            let Ok(s) = s else { break };
            self.handle_line(&line, s);
        }
        if overlong {
            if let Ok(s) = stream {
                reply(
                    s,
                    Err(format!("request longer than {MAX_LINE} bytes")),
                    self.control.is_paused(),
                );
            }
            eof = true;
        }
        if eof {
            self.close(fd, ops);
        }
    }

    fn handle_line(&self, line: &[u8], stream: UnixStream) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let paused = self.control.is_paused();
        match serde_json::from_str::<Request>(text) {
            Err(e) => reply(stream, Err(format!("bad request: {e}")), paused),
            Ok(Request::Status {}) => reply(stream, Ok(serde_json::json!({})), paused),
            Ok(Request::Quit {}) => {
                reply(stream, Ok(serde_json::json!({})), paused);
                self.shutdown.request(ExitReason::Quit);
            }
            Ok(req) => {
                self.control.lock().push_back((req, stream));
                self.shutdown.request_pause();
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if events.event_set().contains(EventSet::IN) {
            self.readable(fd, ops);
        } else {
            self.close(fd, ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            self.shutdown.request(ExitReason::Error(format!(
                "cannot watch the control socket {}: {e:?}",
                self.path.display()
            )));
        }
    }
}

/// Client side: send `req` to the socket at `path` and return the
/// response object, or the VM's error.
pub fn call(path: &Path, req: &Request) -> Result<serde_json::Value, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(path).map_err(err)?;
    let mut line = serde_json::to_string(req).map_err(|e| ApiError::Bad {
        path: path.to_path_buf(),
        what: e.to_string(),
    })?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(err)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(err)?;
    if answer.is_empty() {
        return Err(ApiError::Bad {
            path: path.to_path_buf(),
            what: "the VM closed the connection without an answer".into(),
        });
    }
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|e| ApiError::Bad {
        path: path.to_path_buf(),
        what: format!("unreadable answer {answer:?}: {e}"),
    })?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok(v)
    } else {
        Err(ApiError::Refused {
            path: path.to_path_buf(),
            error: v["error"].as_str().unwrap_or("unknown error").to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_the_documented_lines() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"cmd":"pause"}"#).unwrap(), Request::Pause {});
        assert_eq!(
            p(r#"{"cmd":"snapshot","dir":"/tmp/s"}"#).unwrap(),
            Request::Snapshot {
                dir: "/tmp/s".into(),
                stop: false
            }
        );
        assert_eq!(
            p(r#"{"cmd":"snapshot","dir":"d","stop":true}"#).unwrap(),
            Request::Snapshot {
                dir: "d".into(),
                stop: true
            }
        );
        assert!(p(r#"{"cmd":"snapshot"}"#).is_err());
        assert!(p(r#"{"cmd":"explode"}"#).is_err());
        assert!(p(r#"{"cmd":"status","x":1}"#).is_err());
        assert!(p("pause").is_err());
    }
}
