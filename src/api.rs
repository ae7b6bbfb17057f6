//! The control socket (`kvmrun run --api PATH`): a Unix stream socket
//! speaking line-delimited JSON, one request object per line and one
//! response object per line. docs/API.md describes the protocol.
//!
//! The server is an event-manager subscriber on the main thread. `status`
//! and `quit` are answered at once; `pause`, `resume` and `snapshot` need
//! the vCPUs stopped, so they are queued in [`Control`], the vCPUs are
//! asked to stop, and the main loop answers them between rounds.

use std::collections::VecDeque;
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
pub const MAX_LINE: usize = 64 * 1024;

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
pub fn reply(to: UnixStream, answer: Result<serde_json::Value, String>, paused: bool) {
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
    if let Err(e) = send_bounded(&to, line.as_bytes(), REPLY_WAIT) {
        log::debug!("control socket: cannot answer: {e}");
    }
}

/// Longest a reply waits for a client that does not read.
const REPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Send `bytes` on `to`, waiting at most `wait` in all for room. `to` is
/// a copy of the connection the server reads, so its O_NONBLOCK flag,
/// shared by every copy, is left as it is: a reply that made the
/// connection blocking would leave the event loop stuck in its next read.
fn send_bounded(to: &UnixStream, bytes: &[u8], wait: std::time::Duration) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        // SAFETY: `rest` is valid for its length; send() only reads it.
        let n = unsafe {
            libc::send(
                to.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            at += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                let mut p = libc::pollfd {
                    fd: to.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as libc::c_int) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// Splits the bytes of one connection into request lines, holding at
/// most `MAX_LINE` bytes of a line that has not ended yet.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
}

/// A line longer than `MAX_LINE`: the connection cannot be read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTooLong;

impl LineReader {
    /// Take `bytes` and return the lines they complete, without their
    /// `\n`, in order; `Err` once the line being read grows beyond
    /// `MAX_LINE` (nothing is returned after that).
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Vec<u8>>, LineTooLong> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if self.buf.len() + nl > MAX_LINE {
                return Err(LineTooLong);
            }
            self.buf.extend_from_slice(&rest[..nl]);
            lines.push(std::mem::take(&mut self.buf));
            rest = &rest[nl + 1..];
        }
        if self.buf.len() + rest.len() > MAX_LINE {
            return Err(LineTooLong);
        }
        self.buf.extend_from_slice(rest);
        Ok(lines)
    }

    /// Bytes of a line that has not ended yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The request on one line, `None` for a blank line, or the error to
/// answer: not UTF-8, not JSON, not a request.
pub fn parse_request(line: &[u8]) -> Result<Option<Request>, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "bad request: not UTF-8 (invalid byte at offset {}); send one JSON object per line",
            e.valid_up_to()
        )
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    serde_json::from_str::<Request>(text)
        .map(Some)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Eof => {
                format!("bad request: incomplete JSON object ({e})")
            }
            _ => format!("bad request: {e}"),
        })
}

struct Conn {
    stream: UnixStream,
    lines: LineReader,
}

/// The listening socket and its one client: a second client while one
/// is connected gets an error answer and is closed.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conn: Option<Conn>,
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
    match bind_private(&tmp) {
        Ok(l) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(l),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        },
        // A temporary name past the socket path limit: bind in place.
        Err(_) => bind_private(path),
    }
}

impl ApiServer {
    /// Listen at `path`, a socket only its owner may use (mode 0600). A
    /// stale socket there is replaced; any other file is left alone and
    /// is an error.
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
            conn: None,
            control,
            shutdown,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            // A client that has gone may not have been noticed yet: read
            // what it left first, so the slot is free if it has.
            if let Some(fd) = self.conn.as_ref().map(|c| c.stream.as_raw_fd()) {
                self.readable(fd, ops);
            }
            if self.conn.is_some() {
                reply(
                    stream,
                    Err("another client is connected to this control socket; one at a time".into()),
                    self.control.is_paused(),
                );
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.conn = Some(Conn {
                    stream,
                    lines: LineReader::default(),
                });
            }
        }
    }

    fn close(&mut self, ops: &mut EventOps) {
        if let Some(c) = self.conn.take() {
            let _ = ops.remove(Events::new(&c.stream, EventSet::IN));
            if c.lines.pending() > 0 {
                log::debug!(
                    "control socket: client left in the middle of a request ({} bytes unanswered)",
                    c.lines.pending()
                );
            }
        }
    }

    fn readable(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.conn.as_mut().filter(|c| c.stream.as_raw_fd() == fd) else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut lines = Vec::new();
        let mut eof = false;
        let mut overlong = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => match conn.lines.feed(&chunk[..n]) {
                    Ok(mut l) => lines.append(&mut l),
                    Err(LineTooLong) => {
                        overlong = true;
                        break;
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
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
                    Err(format!(
                        "bad request: line longer than {MAX_LINE} bytes; closing the connection"
                    )),
                    self.control.is_paused(),
                );
            }
            eof = true;
        }
        if eof {
            self.close(ops);
        }
    }

    fn handle_line(&self, line: &[u8], stream: UnixStream) {
        let paused = self.control.is_paused();
        match parse_request(line) {
            Ok(None) => {}
            Err(e) => reply(stream, Err(e), paused),
            Ok(Some(Request::Status {})) => reply(stream, Ok(serde_json::json!({})), paused),
            Ok(Some(Request::Quit {})) => {
                reply(stream, Ok(serde_json::json!({})), paused);
                self.shutdown.request(ExitReason::Quit);
            }
            Ok(Some(req)) => {
                self.control.lock().push_back((req, stream));
                self.shutdown.request_pause();
            }
        }
    }
}

/// Bind a Unix socket at `path` that only this user can connect to: the
/// umask is narrowed around bind(), because a socket's mode is fixed when
/// it is created and a chmod() after would leave a window.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    // SAFETY: umask() only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
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
        } else if self
            .conn
            .as_ref()
            .is_some_and(|c| c.stream.as_raw_fd() == fd)
        {
            self.close(ops);
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

    #[test]
    fn lines_are_split_wherever_the_reads_cut_them() {
        let input = b"{\"cmd\":\"status\"}\n\n{\"cmd\":\"pause\"}\r\n";
        for cut in 0..=input.len() {
            let mut r = LineReader::default();
            let mut lines = r.feed(&input[..cut]).unwrap();
            lines.extend(r.feed(&input[cut..]).unwrap());
            assert_eq!(lines.len(), 3, "cut at {cut}");
            assert_eq!(r.pending(), 0);
            let reqs: Vec<_> = lines.iter().map(|l| parse_request(l).unwrap()).collect();
            assert_eq!(
                reqs,
                vec![Some(Request::Status {}), None, Some(Request::Pause {})]
            );
        }
    }

    #[test]
    fn an_overlong_line_is_refused_without_holding_it() {
        let mut r = LineReader::default();
        assert!(r.feed(&vec![b'x'; MAX_LINE]).unwrap().is_empty());
        assert_eq!(r.feed(b"x"), Err(LineTooLong));
        // A line of exactly MAX_LINE bytes and its newline is fine.
        let mut r = LineReader::default();
        let mut line = vec![b' '; MAX_LINE];
        line.push(b'\n');
        assert_eq!(r.feed(&line).unwrap().len(), 1);
        // So is a long run of short lines in one read.
        let many = b"{}\n".repeat(MAX_LINE);
        let mut r = LineReader::default();
        assert_eq!(r.feed(&many).unwrap().len(), MAX_LINE);
    }

    /// A reply went through a copy of the connection made blocking, which
    /// made the connection itself blocking (one open file description):
    /// the server's next read then waited for the client, freezing the
    /// VMM's event loop while a client kept its connection open.
    #[test]
    fn a_reply_leaves_the_connection_non_blocking() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        reply(ours.try_clone().unwrap(), Ok(serde_json::json!({})), false);
        // SAFETY: F_GETFL only reads the fd's flags.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
        let mut buf = [0u8; 64];
        assert!(matches!(
            (&ours).read(&mut buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ));
        let mut line = String::new();
        BufReader::new(&theirs).read_line(&mut line).unwrap();
        assert_eq!(line, "{\"ok\":true,\"state\":\"running\"}\n");
    }

    /// A client that reads nothing: the reply gives up after its wait.
    #[test]
    fn a_reply_to_a_client_that_never_reads_gives_up() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let big = vec![b'x'; 8 << 20];
        let e = send_bounded(&ours, &big, std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn bad_lines_get_clear_errors() {
        let e = parse_request(b"{\"cmd\":\"sta\xfftus\"}").unwrap_err();
        assert!(e.contains("not UTF-8") && e.contains("offset 11"), "{e}");
        let e = parse_request(b"{\"cmd\":").unwrap_err();
        assert!(e.contains("incomplete JSON object"), "{e}");
        let e = parse_request(b"[1, 2]").unwrap_err();
        assert!(e.starts_with("bad request: "), "{e}");
        assert_eq!(parse_request(b" \t\r").unwrap(), None);
    }
}
