//! The host side of a console port: where the guest's bytes go (a
//! [`PortSink`] the VMM implements) and where the guest's input comes
//! from (an [`Inbox`] the VMM fills). Neither ever makes the device
//! wait: a full sink leaves the guest's buffers in the ring until its
//! waker says there is room, and an empty inbox leaves the receive
//! buffers unused until its waker says bytes arrived.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Bytes an inbox holds before its feeder must wait for the guest.
pub const INBOX_CAPACITY: usize = 64 << 10;

/// Where a port's output goes. Implementations queue the bytes and write
/// them on a thread of their own.
pub trait PortSink: Send + Sync {
    /// Whether the sink takes more bytes now.
    fn has_room(&self) -> bool;
    /// Queue `data`; a sink with room takes all of it.
    fn put(&self, data: &[u8]);
    /// Signalled when a sink that had no room has some again.
    fn waker(&self) -> Option<Arc<EventFd>>;
}

#[derive(Default)]
struct InboxState {
    bytes: VecDeque<u8>,
    /// The host's input ended: once the bytes are taken, the port is
    /// closed on the host side and the guest reads end of file.
    eof: bool,
}

/// The guest's input on one port: bytes the VMM pushes, and two event
/// fds: `waker` tells the device that bytes (or the end) arrived,
/// `resume` tells the feeder that a full inbox has room again.
pub struct Inbox {
    state: Mutex<InboxState>,
    waker: Arc<EventFd>,
    resume: Arc<EventFd>,
}

impl Inbox {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Inbox {
            state: Mutex::new(InboxState::default()),
            waker: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            resume: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes `push` takes now.
    pub fn room(&self) -> usize {
        INBOX_CAPACITY.saturating_sub(self.lock().bytes.len())
    }

    /// Queue up to `room()` bytes of `data`; the bytes taken.
    pub fn push(&self, data: &[u8]) -> usize {
        let mut s = self.lock();
        let n = data.len().min(INBOX_CAPACITY.saturating_sub(s.bytes.len()));
        s.bytes.extend(&data[..n]);
        drop(s);
        if n > 0 {
            let _ = self.waker.write(1);
        }
        n
    }

    /// The host's input ended.
    pub fn close(&self) {
        self.lock().eof = true;
        let _ = self.waker.write(1);
    }

    /// Move up to `out.len()` bytes into `out`; the count.
    pub(super) fn take(&self, out: &mut [u8]) -> usize {
        let mut s = self.lock();
        let was_full = s.bytes.len() >= INBOX_CAPACITY;
        let n = out.len().min(s.bytes.len());
        for (o, b) in out.iter_mut().zip(s.bytes.drain(..n)) {
            *o = b;
        }
        drop(s);
        if was_full && n > 0 {
            let _ = self.resume.write(1);
        }
        n
    }

    /// Put back the bytes `take()` gave that the guest did not get.
    pub(super) fn untake(&self, data: &[u8]) {
        let mut s = self.lock();
        for &b in data.iter().rev() {
            s.bytes.push_front(b);
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().bytes.is_empty()
    }

    /// Whether the input ended and every byte was taken.
    pub(super) fn drained(&self) -> bool {
        let s = self.lock();
        s.eof && s.bytes.is_empty()
    }

    /// Have the device look at the input again.
    pub(super) fn wake(&self) {
        let _ = self.waker.write(1);
    }

    pub fn waker(&self) -> Arc<EventFd> {
        self.waker.clone()
    }

    pub fn resume(&self) -> Arc<EventFd> {
        self.resume.clone()
    }
}

/// One port as the VMM configures it.
#[derive(Clone)]
pub struct PortSpec {
    /// The name the guest sees (/sys/class/virtio-ports/*/name).
    pub name: String,
    pub output: Option<Arc<dyn PortSink>>,
    pub input: Option<Arc<Inbox>>,
}
