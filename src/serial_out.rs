//! Where the guest's serial output goes on the host: a bounded queue that
//! a writer thread empties into stdout or a file.
//!
//! A vCPU that writes to the UART never waits on the host's output
//! itself, so a consumer that reads slowly, or not at all, cannot keep
//! the VM from stopping (a timeout, a pause, a snapshot):
//!
//! - While the VM runs and the queue is full, the vCPU waits for room:
//!   nothing is lost, and memory stays at `CAPACITY`.
//! - Once the vCPUs must stop, a full queue takes the byte anyway: each
//!   vCPU leaves the guest right after, so the queue outgrows `CAPACITY`
//!   by at most a byte per vCPU per stop.
//! - When the VM ends, `Output::finish()` lets the writer drain the queue
//!   for as long as the consumer takes bytes; once it took none for
//!   `STALL`, the rest is dropped, counted and reported.
//!
//! Output the host refuses (a closed pipe, a full disk) is dropped too,
//! and counted and reported the same way.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::virtio::console::PortSink;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes the queue holds before a running vCPU waits for the writer.
pub const CAPACITY: usize = 64 << 10;
/// How long `finish()` waits for a consumer that takes nothing.
pub const STALL: Duration = Duration::from_secs(1);
/// Longest wait of a vCPU for room before it looks at its stop flag again
/// (a kick usually wakes it sooner).
const RECHECK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Queue {
    bytes: VecDeque<u8>,
    /// `finish()` was called: the writer leaves once the queue is empty.
    closing: bool,
    /// The writer has left: drained, or its output failed.
    done: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when bytes arrive or `closing` is set.
    filled: Condvar,
    /// Signalled when the writer took or wrote bytes, or left.
    drained: Condvar,
    /// Bytes written to the host.
    written: AtomicU64,
    /// Bytes taken from the queue and not written yet.
    in_flight: AtomicU64,
    /// Bytes the host output refused.
    refused: AtomicU64,
    /// Whether the vCPUs must stop (`Shutdown::must_stop()`).
    stopping: Box<dyn Fn() -> bool + Send + Sync>,
    /// Signalled when the writer takes bytes from a full queue (each
    /// console port writing here then takes the guest's next buffers).
    wakers: Mutex<Vec<Arc<EventFd>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The vCPUs' end: the `Write` the serial device writes into.
pub struct Sender(Arc<Shared>);

impl Write for Sender {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = &self.0;
        let mut q = s.lock();
        while q.bytes.len() >= CAPACITY && !q.done && !(s.stopping)() {
            q = s
                .drained
                .wait_timeout(q, RECHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if q.done {
            s.refused.fetch_add(buf.len() as u64, Ordering::Relaxed);
        } else {
            q.bytes.extend(buf);
            s.filled.notify_one();
        }
        Ok(buf.len())
    }

    /// The writer thread writes as soon as bytes arrive.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A virtio-console port's end: queues what the device takes, which it
/// takes only while the queue is below `CAPACITY`.
pub struct PortOutput {
    shared: Arc<Shared>,
    waker: Arc<EventFd>,
}

impl PortSink for PortOutput {
    fn has_room(&self) -> bool {
        let q = self.shared.lock();
        q.done || q.bytes.len() < CAPACITY
    }

    fn put(&self, data: &[u8]) {
        let s = &self.shared;
        let mut q = s.lock();
        if q.done {
            s.refused.fetch_add(data.len() as u64, Ordering::Relaxed);
        } else {
            q.bytes.extend(data);
            s.filled.notify_one();
        }
    }

    fn waker(&self) -> Option<Arc<EventFd>> {
        Some(self.waker.clone())
    }
}

/// What became of the guest's output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub written: u64,
    /// Bytes the host output refused.
    pub refused: u64,
    /// Bytes still queued (or being written) when the consumer stalled.
    pub dropped: u64,
}

/// The VMM's end: the writer thread, and `finish()` at the end.
pub struct Output {
    shared: Arc<Shared>,
    what: String,
}

impl Output {
    /// Start a writer thread that writes into `out`, named `what` in
    /// messages; `stopping` tells whether the vCPUs must stop.
    pub fn start(
        out: Box<dyn Write + Send>,
        what: &str,
        stopping: impl Fn() -> bool + Send + Sync + 'static,
    ) -> io::Result<(Output, Sender)> {
        let (output, shared) = Self::spawn(out, what, Box::new(stopping))?;
        Ok((output, Sender(shared)))
    }

    /// Start a writer thread for a virtio-console port: the device asks
    /// `PortOutput::has_room()` before it takes a buffer, so nothing ever
    /// waits for room.
    pub fn start_port(out: Box<dyn Write + Send>, what: &str) -> io::Result<(Output, PortOutput)> {
        let (output, _) = Self::spawn(out, what, Box::new(|| true))?;
        let port = output.port_end()?;
        Ok((output, port))
    }

    /// Another console port's end of this queue: output that shares a
    /// host file (COM1's and a port's on stdout) reaches it in the order
    /// the guest wrote it, which one writer thread per sink would not
    /// keep.
    pub fn port_end(&self) -> io::Result<PortOutput> {
        let waker = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let mut wakers = self.shared.wakers.lock().unwrap_or_else(|e| e.into_inner());
        wakers.push(waker.clone());
        Ok(PortOutput {
            shared: self.shared.clone(),
            waker,
        })
    }

    fn spawn(
        out: Box<dyn Write + Send>,
        what: &str,
        stopping: Box<dyn Fn() -> bool + Send + Sync>,
    ) -> io::Result<(Output, Arc<Shared>)> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            filled: Condvar::new(),
            drained: Condvar::new(),
            written: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stopping,
            wakers: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let name = what.to_string();
        std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || {
                if let Err(e) = crate::sandbox::enter(crate::sandbox::Kind::SerialOut) {
                    log::debug!("{e}");
                }
                drain(&s, out, &name);
            })?;
        let output = Output {
            shared: shared.clone(),
            what: what.to_string(),
        };
        Ok((output, shared))
    }

    /// Let the writer write what is queued for as long as the consumer
    /// takes it, then report what was not written.
    pub fn finish(&self) -> Outcome {
        let s = &self.shared;
        let mut q = s.lock();
        q.closing = true;
        s.filled.notify_one();
        let mut seen = s.written.load(Ordering::Relaxed);
        let mut progress = Instant::now();
        while !q.done && progress.elapsed() < STALL {
            q = s
                .drained
                .wait_timeout(q, STALL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            let now = s.written.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                progress = Instant::now();
            }
        }
        let dropped = if q.done {
            0
        } else {
            q.bytes.len() as u64 + s.in_flight.load(Ordering::Relaxed)
        };
        drop(q);
        let o = Outcome {
            written: s.written.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            dropped,
        };
        if o.dropped > 0 {
            log::warn!(
                "{} bytes of guest output dropped: {} took none for {} s",
                o.dropped,
                self.what,
                STALL.as_secs()
            );
        }
        if o.refused > 0 {
            log::warn!(
                "{} bytes of guest output dropped: {} refused them",
                o.refused,
                self.what
            );
        }
        o
    }
}

/// Where COM1's output goes with `--serial stdio`: a copy of fd 1, so
/// the writer never waits on the lock of Rust's stdout, which kvmrun's
/// own messages take. A pipe gets an open file of its own (through
/// /proc/self/fd/1), non-blocking: a blocking write to a pipe returns
/// only once all of it is in, so a large one into a slow reader would
/// show no progress to `Output::finish()` for seconds while the reader
/// takes bytes all along. O_NONBLOCK on a mere copy of fd 1 would change
/// the file kvmrun's parent shares.
pub fn stdout_writer() -> io::Result<Box<dyn Write + Send>> {
    std_writer(io::stdout().as_fd(), "/proc/self/fd/1")
}

/// Where a console port's output goes for stderr, as `stdout_writer()`.
pub fn stderr_writer() -> io::Result<Box<dyn Write + Send>> {
    std_writer(io::stderr().as_fd(), "/proc/self/fd/2")
}

fn std_writer(
    fd: std::os::fd::BorrowedFd<'_>,
    proc_path: &str,
) -> io::Result<Box<dyn Write + Send>> {
    // SAFETY: fstat writes one struct stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let fifo = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0
        && st.st_mode & libc::S_IFMT == libc::S_IFIFO;
    if fifo {
        let own = std::fs::OpenOptions::new()
            .write(true)
            .open(proc_path)
            .and_then(|f| set_nonblocking(&f).map(|()| f));
        match own {
            Ok(f) => return Ok(Box::new(PipeWriter(f))),
            Err(e) => log::debug!("a pipe, but {proc_path}: {e}"),
        }
    }
    Ok(Box::new(File::from(fd.try_clone_to_owned()?)))
}

fn set_nonblocking(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL only read and set this file's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A non-blocking pipe that writes like a blocking one, but returns as
/// soon as any of the bytes went in.
struct PipeWriter(File);

impl Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: self.0.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: poll reads and writes the one pollfd given.
                    unsafe { libc::poll(&mut p, 1, -1) };
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The writer thread: write whatever is queued, until `finish()` and an
/// empty queue, or until the output fails.
fn drain(s: &Shared, mut out: Box<dyn Write + Send>, what: &str) {
    let mut batch: Vec<u8> = Vec::new();
    loop {
        {
            let mut q = s.lock();
            while q.bytes.is_empty() && !q.closing {
                q = s.filled.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.bytes.is_empty() {
                q.done = true;
                s.drained.notify_all();
                return;
            }
            if q.bytes.len() >= CAPACITY {
                for w in s.wakers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    let _ = w.write(1);
                }
            }
            batch.clear();
            batch.extend(q.bytes.drain(..));
            s.in_flight.store(batch.len() as u64, Ordering::Relaxed);
        }
        s.drained.notify_all();
        let mut at = 0;
        while at < batch.len() {
            match out.write(&batch[at..]) {
                Ok(n) if n > 0 => {
                    at += n;
                    s.written.fetch_add(n as u64, Ordering::Relaxed);
                    s.in_flight.fetch_sub(n as u64, Ordering::Relaxed);
                    s.drained.notify_all();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                res => {
                    let why = res
                        .err()
                        .map_or("it took 0 bytes".to_string(), |e| e.to_string());
                    log::debug!("serial output to {what} failed: {why}; dropping the rest");
                    let mut q = s.lock();
                    let lost = (batch.len() - at) as u64 + q.bytes.len() as u64;
                    s.refused.fetch_add(lost, Ordering::Relaxed);
                    s.in_flight.store(0, Ordering::Relaxed);
                    q.bytes.clear();
                    q.done = true;
                    s.drained.notify_all();
                    return;
                }
            }
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::AtomicBool;

    /// An output that takes bytes only while `open`, into `got`.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<AtomicBool>,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            while !self.open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.got.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_byte_arrives_in_order() {
        let gate = Gate::default();
        gate.open.store(true, Ordering::SeqCst);
        let (out, mut tx) = Output::start(Box::new(gate.clone()), "test", || false).unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for b in &data {
            tx.write_all(std::slice::from_ref(b)).unwrap();
        }
        let o = out.finish();
        assert_eq!(
            o,
            Outcome {
                written: data.len() as u64,
                refused: 0,
                dropped: 0
            }
        );
        assert_eq!(*gate.got.lock().unwrap(), data);
    }

    /// A reader that takes nothing: a pipe writer returns what fitted,
    /// at once, and the next write waits for room.
    #[test]
    fn a_pipe_takes_what_fits_and_says_so() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two fds it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned here.
        let (rx, tx) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ only resizes this pipe.
        assert!(unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) } > 0);
        set_nonblocking(&tx).unwrap();
        let mut w = PipeWriter(tx);
        assert_eq!(w.write(&[b'x'; 10_000]).unwrap(), 4096);
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 8192];
            let n = (&rx).read(&mut buf).unwrap();
            (n, rx)
        });
        assert_eq!(w.write(&[b'y'; 100]).unwrap(), 100);
        assert_eq!(reader.join().unwrap().0, 4096);
    }

    /// A consumer that never reads: the queue fills to CAPACITY, a vCPU
    /// that must stop still gets through, and the end reports the rest.
    #[test]
    fn a_stalled_consumer_holds_the_queue_at_capacity() {
        let gate = Gate::default();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (out, mut tx) = Output::start(Box::new(gate.clone()), "test", move || {
            flag.load(Ordering::SeqCst)
        })
        .unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..(4 * CAPACITY) {
                tx.write_all(b"x").unwrap();
            }
        });
        // The writer thread holds one batch; the vCPU fills the queue
        // behind it and waits.
        let s = out.shared.clone();
        while s.lock().bytes.len() < CAPACITY {
            std::thread::yield_now();
        }
        assert!(!writer.is_finished());
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let o = out.finish();
        assert_eq!(o.written, 0);
        assert_eq!(o.dropped, 4 * CAPACITY as u64);
        // The consumer wakes up later; nothing is left to write.
        gate.open.store(true, Ordering::SeqCst);
    }

    /// COM1 and two ports on one host file: the bytes come out in the
    /// order the guest wrote them, however slowly the consumer reads, and
    /// once a full queue drains every port's device is told.
    #[test]
    fn serial_and_ports_sharing_a_file_keep_the_guests_order() {
        let gate = Gate::default();
        let (out, mut com1) = Output::start(Box::new(gate.clone()), "test", || false).unwrap();
        let (a, b) = (out.port_end().unwrap(), out.port_end().unwrap());
        a.put(b"echo: one\n");
        com1.write_all(b"waiting").unwrap();
        b.put(b"[b]");
        com1.write_all(b" for a line\n").unwrap();
        a.put(&vec![b'x'; CAPACITY]);
        assert!(!a.has_room() && !b.has_room());
        gate.open.store(true, Ordering::SeqCst);
        for port in [&a, &b] {
            let w = port.waker().unwrap();
            while w.read().is_err() {
                std::thread::yield_now();
            }
        }
        let o = out.finish();
        assert_eq!(o.dropped + o.refused, 0);
        let got = gate.got.lock().unwrap();
        let head = b"echo: one\nwaiting[b] for a line\n";
        assert_eq!(&got[..head.len()], head);
        assert_eq!(got.len(), head.len() + CAPACITY);
    }

    #[test]
    fn refused_output_is_counted() {
        let (out, mut tx) = Output::start(Box::new(Broken), "test", || false).unwrap();
        tx.write_all(b"hello").unwrap();
        // Once the writer has seen the error, later bytes are refused at once.
        while !out.shared.lock().done {
            std::thread::yield_now();
        }
        tx.write_all(b" world").unwrap();
        let o = out.finish();
        assert_eq!(
            o,
            Outcome {
                written: 0,
                refused: 11,
                dropped: 0
            }
        );
    }
}
