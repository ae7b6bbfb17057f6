//! The gdb stub (`run --gdb`): a thread that listens on a Unix or TCP
//! socket, speaks the GDB remote protocol through the `gdbstub` crate to
//! one gdb at a time, and drives the vCPUs through a `target::Backend`
//! (`vcpu::debug` on KVM). A gdb that detaches or goes away leaves the
//! guest running, with no breakpoint left behind; another may attach.

pub mod arch;
pub mod paging;
pub mod target;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use gdbstub::common::Signal;
use gdbstub::conn::Connection;
use gdbstub::stub::state_machine::GdbStubStateMachine;
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};

pub use arch::Layout;
use target::{Backend, Event, GdbTarget};

#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    #[error("--gdb {0:?}: {1}")]
    BadAddress(String, &'static str),
    #[error("--gdb {addr}: cannot listen: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("--gdb-arch {0:?}: expected auto, x86-64 or i386")]
    BadArch(String),
    #[error("there is no vCPU {0}")]
    NoSuchVcpu(u32),
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0} left before answering (the VM is pausing or ending)")]
    VcpuGone(u32),
    #[error("the VM has ended")]
    VmEnded,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Where the stub listens: a Unix socket path, or HOST:PORT for TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Address {
    type Err = GdbError;

    /// A value with a '/' or without a ':' is a path; HOST:PORT and :PORT
    /// (localhost) are TCP.
    fn from_str(s: &str) -> Result<Self, GdbError> {
        let bad = |why| GdbError::BadAddress(s.to_string(), why);
        if s.is_empty() {
            return Err(bad("expected a socket path or HOST:PORT"));
        }
        if s.contains('/') || !s.contains(':') {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        let (host, port) = s.rsplit_once(':').ok_or(bad("expected HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
        let host = match host.trim_matches(|c| c == '[' || c == ']') {
            "" => "127.0.0.1",
            h => h,
        };
        let spelled = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        spelled
            .to_socket_addrs()
            .map_err(|_| bad("cannot resolve the host"))?
            .next()
            .ok_or(bad("cannot resolve the host"))?;
        Ok(Address::Tcp(spelled))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// `--gdb-arch`: which target description gdb gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ArchChoice {
    /// From the image's symbols file (`symbols_for()`): i386 for ELF32,
    /// i386:x86-64 otherwise.
    #[default]
    Auto,
    Fixed(Layout),
}

impl std::str::FromStr for ArchChoice {
    type Err = GdbError;
    fn from_str(s: &str) -> Result<Self, GdbError> {
        match s {
            "auto" => Ok(ArchChoice::Auto),
            "x86-64" | "x86_64" | "i386:x86-64" => Ok(ArchChoice::Fixed(Layout::X86_64)),
            "i386" => Ok(ArchChoice::Fixed(Layout::I386)),
            _ => Err(GdbError::BadArch(s.to_string())),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GdbOptions {
    pub address: Address,
    /// Stop before the first guest instruction until gdb resumes.
    pub wait: bool,
    pub arch: ArchChoice,
}

/// The file with the image's symbols: the `.elf` kvm-unit-tests builds
/// next to a `.flat`, the ELF64 our guests keep in `obj/`, else the image.
pub fn symbols_for(image: &Path) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    let dir = image.parent().unwrap_or(Path::new(""));
    let candidates = [
        (image.extension().is_some_and(|e| e == "flat")).then(|| image.with_extension("elf")),
        Some(dir.join("obj").join(format!("{stem}.elf64"))),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .unwrap_or_else(|| image.to_path_buf())
}

/// The layout `choice` means for `image`: ELF32 symbols are 32-bit code.
pub fn layout_for(choice: ArchChoice, image: &Path) -> Layout {
    if let ArchChoice::Fixed(l) = choice {
        return l;
    }
    let mut head = [0u8; 5];
    let elf32 = std::fs::File::open(symbols_for(image))
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|_| head[..4] == *b"\x7fELF" && head[4] == 1);
    if elf32 {
        Layout::I386
    } else {
        Layout::X86_64
    }
}

/// The gdb command line that attaches to `address` with `image`'s symbols.
pub fn gdb_command(address: &Address, image: &Path) -> String {
    let symbols = symbols_for(image);
    let quote = |s: &str| shlex::try_quote(s).map_or(s.to_string(), |q| q.into_owned());
    format!(
        "gdb -q -ex {} {}",
        quote(&format!("target remote {address}")),
        quote(&symbols.to_string_lossy())
    )
}

/// A bound socket gdb connects to.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Bind `address`; a stale Unix socket there is replaced, any other
    /// file is an error.
    pub fn bind(address: &Address) -> Result<Listener, GdbError> {
        let err = |source| GdbError::Listen {
            addr: address.to_string(),
            source,
        };
        match address {
            Address::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if !meta.file_type().is_socket() {
                        return Err(err(std::io::Error::other("exists and is not a socket")));
                    }
                    std::fs::remove_file(path).map_err(err)?;
                }
                let l = UnixListener::bind(path).map_err(err)?;
                Ok(Listener::Unix(l, path.clone()))
            }
            Address::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a).map_err(err)?)),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Packets are small and answered one by one.
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => Read::read(s, buf),
            Stream::Tcp(s) => Read::read(s, buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => Write::write_all(s, buf),
            Stream::Tcp(s) => Write::write_all(s, buf),
        }
    }
}

/// gdbstub's connection: bytes gathered into one write per packet.
struct Conn {
    stream: Stream,
    out: Vec<u8>,
}

impl Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.out.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r
    }
}

/// Wait until one of `fds` is readable; which ones are.
fn wait_readable(fds: &[RawFd]) -> std::io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid array of `p.len()` pollfds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if n >= 0 {
            return Ok(p.iter().map(|x| x.revents != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How a session ended.
enum SessionEnd {
    /// gdb detached or went away: the guest runs on.
    Gone(String),
    /// The VM ended.
    VmEnded,
}

/// Serve gdb connections on `listener` until the VM ends; `events` is the
/// backend's event fd (readable when `take_event()` has something).
pub fn serve<B: Backend>(listener: Listener, mut target: GdbTarget<B>, events: RawFd) {
    loop {
        let ready = match wait_readable(&[listener.fd(), events]) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("warning: gdb: cannot wait for a connection: {e}");
                return;
            }
        };
        if ready[1] && drain_until_end(&mut target) {
            return;
        }
        if !ready[0] {
            continue;
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("warning: gdb: accept failed: {e}");
                continue;
            }
        };
        log::info!("gdb attached");
        match session(stream, &mut target, events) {
            Ok(SessionEnd::VmEnded) => return,
            Ok(SessionEnd::Gone(why)) => eprintln!("kvmrun: gdb: {why}; the guest runs on"),
            Err(e) => eprintln!("kvmrun: gdb: session ended: {e}; the guest runs on"),
        }
        if target.release().is_err() {
            return;
        }
    }
}

/// Consume pending events while no gdb is attached; true once the VM ended.
fn drain_until_end<B: Backend>(target: &mut GdbTarget<B>) -> bool {
    while let Some(e) = target.backend.take_event() {
        if let Event::Ended(_) = e {
            return true;
        }
    }
    false
}

type Machine<'a, B> = GdbStubStateMachine<'a, GdbTarget<B>, Conn>;

/// One gdb connection: stop the VM, then serve packets and report stops
/// until gdb leaves or the VM ends.
fn session<B: Backend>(
    stream: Stream,
    target: &mut GdbTarget<B>,
    events: RawFd,
) -> Result<SessionEnd, GdbError> {
    let sock = stream.fd();
    target.backend.set_attached(true);
    if target.backend.stop_all().is_err() {
        return Ok(SessionEnd::VmEnded);
    }
    let conn = Conn {
        stream,
        out: Vec::new(),
    };
    let stub = GdbStub::new(conn);
    let mut gdb: Machine<'_, B> = stub
        .run_state_machine(target)
        .map_err(|e| GdbError::Protocol(e.to_string()))?;
    let mut pending: VecDeque<u8> = VecDeque::new();
    let proto = |e: gdbstub::stub::GdbStubError<GdbError, std::io::Error>| {
        GdbError::Protocol(e.to_string())
    };
    loop {
        gdb = match gdb {
            GdbStubStateMachine::Disconnected(d) => {
                return Ok(match d.get_reason() {
                    DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_) => {
                        SessionEnd::VmEnded
                    }
                    DisconnectReason::Kill => {
                        target.backend.kill();
                        SessionEnd::VmEnded
                    }
                    DisconnectReason::Disconnect => SessionEnd::Gone("gdb detached".into()),
                });
            }
            GdbStubStateMachine::CtrlCInterrupt(c) => {
                target.backend.stop_all()?;
                let reason = MultiThreadStopReason::SignalWithThread {
                    tid: target::tid(target.current),
                    signal: Signal::SIGINT,
                };
                c.interrupt_handled(target, Some(reason)).map_err(proto)?
            }
            GdbStubStateMachine::Idle(mut s) => {
                if let Some(b) = pending.pop_front() {
                    s.incoming_data(target, b).map_err(proto)?
                } else {
                    let ready = wait_readable(&[sock, events])?;
                    if ready[1] && drain_until_end(target) {
                        return Ok(SessionEnd::VmEnded);
                    }
                    if ready[0] && !read_into(s.borrow_conn(), &mut pending)? {
                        return Ok(SessionEnd::Gone("gdb closed the connection".into()));
                    }
                    GdbStubStateMachine::Idle(s)
                }
            }
            GdbStubStateMachine::Running(mut s) => {
                if let Some(b) = pending.pop_front() {
                    s.incoming_data(target, b).map_err(proto)?
                } else {
                    let ready = wait_readable(&[sock, events])?;
                    if ready[1] {
                        match target.backend.take_event() {
                            Some(Event::Ended(status)) => {
                                let r = MultiThreadStopReason::Exited(status as u8);
                                s.report_stop(target, r).map_err(proto)?
                            }
                            Some(Event::Debug {
                                id, exception, dr6, ..
                            }) => {
                                target.backend.stop_all()?;
                                let r = target.stop_reason(id, exception, dr6);
                                s.report_stop(target, r).map_err(proto)?
                            }
                            None => GdbStubStateMachine::Running(s),
                        }
                    } else if ready[0] && !read_into(s.borrow_conn(), &mut pending)? {
                        return Ok(SessionEnd::Gone("gdb closed the connection".into()));
                    } else {
                        GdbStubStateMachine::Running(s)
                    }
                }
            }
        };
    }
}

/// Read what gdb sent; false at the end of the stream.
fn read_into(conn: &mut Conn, pending: &mut VecDeque<u8>) -> Result<bool, GdbError> {
    let mut buf = [0u8; 4096];
    let n = match conn.stream.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    pending.extend(&buf[..n]);
    Ok(n > 0)
}

#[cfg(test)]
mod tests;
