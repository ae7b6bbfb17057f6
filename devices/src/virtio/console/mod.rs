//! virtio-console (virtio 1.2, "Console Device", device ID 3) with
//! VIRTIO_CONSOLE_F_MULTIPORT: named ports the guest sees as
//! /dev/vportNpM, each with a receive and a transmit queue, and the
//! control queues through which the device adds the ports, names them
//! (PORT_NAME) and tells the driver whether the host side is open.
//!
//! The host side of a port (`port.rs`) is a sink the VMM writes out on a
//! thread of its own and an inbox the VMM fills; the device never waits
//! on either. What the device has to do without a driver's notification
//! (control messages to send, input that arrived, room in a sink) it
//! asks for through event fds the VMM watches as the queues'
//! notifications ([`VirtioDevice::wakers`]).
//!
//! A malformed buffer (a transmit buffer the device may write, a receive
//! buffer it may only read, an address outside guest memory, a chain
//! that does not end) is used with the bytes moved before the fault,
//! logged once, and the next one is served as usual.

pub mod control;
pub mod port;

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{serve_ring, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{Persist, RestoreError};
use control::Control;
pub use port::{Inbox, PortSink, PortSpec};

pub const DEVICE_TYPE: u32 = 3;
/// Feature bit VIRTIO_CONSOLE_F_MULTIPORT.
pub const F_MULTIPORT: u64 = 1 << 1;
pub const QUEUE_SIZE: u16 = 128;
/// Most ports of one device.
pub const MAX_PORTS: usize = 16;
/// Most bytes taken from one transmit buffer chain (Linux sends at most
/// 32 KiB at a time); the rest is dropped, so one notification costs
/// bounded host work.
pub const MAX_CHUNK: usize = 64 << 10;
/// Most bytes of a control message the device reads.
const MAX_CONTROL: usize = 256;
/// Most control messages waiting for a buffer: a port's DEVICE_ADD,
/// PORT_NAME and two PORT_OPENs each. A driver that sends PORT_READY
/// again and again without taking the replies would otherwise grow
/// host memory (and the snapshot) without bound.
pub const MAX_PENDING: usize = 4 * MAX_PORTS;
const CONTROL_RX: usize = 2;
const CONTROL_TX: usize = 3;

/// Port `port`'s receive queue (port 0 keeps queues 0 and 1; the
/// control queues come next).
pub fn rx_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 + 2 * port
    }
}

pub fn tx_queue(port: usize) -> usize {
    rx_queue(port) + 1
}

/// Which port a data queue belongs to, and whether it transmits.
fn port_of(queue: usize) -> Option<(usize, bool)> {
    match queue {
        0 | 1 => Some((0, queue == 1)),
        CONTROL_RX | CONTROL_TX => None,
        q => Some(((q - 2) / 2, q % 2 == 1)),
    }
}

/// What a restore needs from the VMM: the ports' host sides, and the
/// event fd through which the device asks to look at its control
/// receive queue.
#[derive(Clone)]
pub struct ConsoleArgs {
    pub ports: Vec<PortSpec>,
    pub control_wake: Arc<EventFd>,
}

/// The driver's view of one port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortState {
    /// DEVICE_ADD was sent.
    pub added: bool,
    /// The driver set the port up (PORT_READY).
    pub ready: bool,
    /// A guest program has the port open (PORT_OPEN from the driver).
    pub guest_open: bool,
    /// The last PORT_OPEN value sent to the driver.
    pub host_open: bool,
}

pub struct Console {
    ports: Vec<PortSpec>,
    state: Vec<PortState>,
    /// Control messages not yet in a buffer of the control receive queue.
    pending: VecDeque<Vec<u8>>,
    control_wake: Arc<EventFd>,
    queue_sizes: Vec<u16>,
    /// Malformed buffers seen; the first is logged.
    bad_requests: u64,
    /// Control messages dropped for want of room; the first is logged.
    dropped: u64,
}

/// Why a buffer could not be served in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    #[error("descriptor {0} is device-writable in a buffer the device reads")]
    Writable(usize),
    #[error("descriptor {0} is read-only in a buffer the device writes")]
    Readable(usize),
    #[error("descriptor {index} at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutOfRange { index: usize, addr: u64, len: u32 },
    #[error("the chain does not end (a loop, a bad next index or an unreadable descriptor)")]
    Unterminated,
    #[error("control message of {0} bytes, shorter than its header")]
    ShortControl(usize),
    #[error("buffer of {have} bytes for a control message of {need}")]
    TooSmall { need: usize, have: usize },
}

type Descs = Vec<virtio_queue::desc::split::Descriptor>;

/// The chain's descriptors, if it ends.
fn descriptors(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<Descs, BufferError> {
    let descs: Descs = chain.collect();
    match descs.last() {
        Some(d) if !d.has_next() => Ok(descs),
        _ => Err(BufferError::Unterminated),
    }
}

/// The bytes of a device-readable chain, up to `max`.
fn read_chain(descs: &Descs, mem: &GuestMemoryMmap, max: usize) -> Result<Vec<u8>, BufferError> {
    let mut out = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        if d.is_write_only() {
            return Err(BufferError::Writable(i));
        }
        let n = (d.len() as usize).min(max - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            return Err(BufferError::OutOfRange {
                index: i,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if out.len() == max {
            break;
        }
    }
    Ok(out)
}

/// Write `data` into a device-writable chain; the bytes written, and the
/// error that stopped it early.
fn write_chain(descs: &Descs, mem: &GuestMemoryMmap, data: &[u8]) -> (usize, Option<BufferError>) {
    let mut done = 0;
    for (i, d) in descs.iter().enumerate() {
        if done == data.len() {
            break;
        }
        if !d.is_write_only() {
            return (done, Some(BufferError::Readable(i)));
        }
        let n = (d.len() as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], d.addr()).is_err() {
            let (addr, len) = (d.addr().0, d.len());
            return (
                done,
                Some(BufferError::OutOfRange {
                    index: i,
                    addr,
                    len,
                }),
            );
        }
        done += n;
    }
    (done, None)
}

/// Bytes a device-writable chain holds.
fn writable_len(descs: &Descs) -> usize {
    descs.iter().map(|d| d.len() as usize).sum()
}

impl Console {
    /// A console with `args.ports` (1 to `MAX_PORTS`; the VMM's
    /// configuration checks the count).
    pub fn new(args: ConsoleArgs) -> Self {
        let mut ports = args.ports;
        ports.truncate(MAX_PORTS);
        let n = ports.len().max(1);
        Console {
            state: vec![PortState::default(); ports.len()],
            ports,
            pending: VecDeque::new(),
            control_wake: args.control_wake,
            queue_sizes: vec![QUEUE_SIZE; 2 * n + 2],
            bad_requests: 0,
            dropped: 0,
        }
    }

    pub fn port_state(&self, port: usize) -> Option<PortState> {
        self.state.get(port).copied()
    }

    fn bad(&mut self, queue: usize, head: u16, e: &BufferError) {
        if self.bad_requests == 0 {
            log::warn!("virtio-console: queue {queue}: malformed buffer (head {head}): {e}");
        }
        self.bad_requests += 1;
    }

    fn send(&mut self, c: Control, extra: &[u8]) {
        if self.pending.len() >= MAX_PENDING {
            if self.dropped == 0 {
                log::warn!(
                    "virtio-console: {MAX_PENDING} control messages wait for buffers; dropping {c:?}"
                );
            }
            self.dropped += 1;
            return;
        }
        self.pending.push_back(c.encode(extra));
        let _ = self.control_wake.write(1);
    }

    /// Whether the host side of `port` is open: an output-only port
    /// always, an input port until its input ended and was read.
    fn host_open(&self, port: usize) -> bool {
        self.ports[port].input.as_ref().is_none_or(|i| !i.drained())
    }

    fn handle_control(&mut self, c: Control) {
        let port = c.id as usize;
        match c.event {
            control::DEVICE_READY if c.value == 1 => {
                for id in 0..self.ports.len() {
                    if !self.state[id].added {
                        self.state[id].added = true;
                        self.send(Control::new(id as u32, control::DEVICE_ADD, 1), &[]);
                    }
                }
            }
            control::PORT_READY if c.value == 1 && port < self.ports.len() => {
                self.state[port].ready = true;
                let name = self.ports[port].name.clone();
                self.send(Control::new(c.id, control::PORT_NAME, 1), name.as_bytes());
                let open = self.host_open(port);
                self.state[port].host_open = open;
                self.send(Control::new(c.id, control::PORT_OPEN, u16::from(open)), &[]);
            }
            control::PORT_OPEN if port < self.ports.len() => {
                self.state[port].guest_open = c.value != 0;
                // Input waits for a reader: Linux drops what reaches a
                // port no program has open.
                if let Some(inbox) = self.ports[port].input.as_ref().filter(|_| c.value != 0) {
                    inbox.wake();
                }
            }
            _ => log::debug!("virtio-console: control message {c:?} ignored"),
        }
    }

    /// Messages from the driver.
    fn control_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_ring(queue, |queue| {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let msg = descriptors(chain).and_then(|d| read_chain(&d, mem, MAX_CONTROL));
            match msg.and_then(|b| Control::decode(&b).ok_or(BufferError::ShortControl(b.len()))) {
                Ok(c) => self.handle_control(c),
                Err(e) => self.bad(CONTROL_TX, head, &e),
            }
            self.add_used(queue, mem, head, 0)
        })
    }

    /// Messages to the driver, one per buffer.
    fn control_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_ring(queue, |queue| {
            let Some(msg) = self.pending.front() else {
                return false;
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let (n, err) = match descriptors(chain) {
                Ok(d) if writable_len(&d) < msg.len() => {
                    let (need, have) = (msg.len(), writable_len(&d));
                    (0, Some(BufferError::TooSmall { need, have }))
                }
                Ok(d) => write_chain(&d, mem, msg),
                Err(e) => (0, Some(e)),
            };
            match err {
                // Keep the message for the next buffer.
                Some(e) => self.bad(CONTROL_RX, head, &e),
                None => {
                    self.pending.pop_front();
                }
            }
            self.add_used(queue, mem, head, n as u32)
        })
    }

    /// The guest's output on `port`, into its sink while it has room.
    fn port_tx(&mut self, port: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let sink = self.ports[port].output.clone();
        serve_ring(queue, |queue| {
            if sink.as_ref().is_some_and(|s| !s.has_room()) {
                return false;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            match descriptors(chain).and_then(|d| read_chain(&d, mem, MAX_CHUNK)) {
                Ok(bytes) => {
                    if let Some(s) = &sink {
                        s.put(&bytes);
                    }
                }
                Err(e) => self.bad(tx_queue(port), head, &e),
            }
            self.add_used(queue, mem, head, 0)
        })
    }

    /// Host input on `port`, into the driver's receive buffers; the end
    /// of the input, once read, closes the port's host side.
    fn port_rx(&mut self, port: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let Some(inbox) = self.ports[port].input.clone() else {
            return false;
        };
        if !self.state[port].ready || !self.state[port].guest_open {
            return false;
        }
        let used = serve_ring(queue, |queue| {
            if inbox.is_empty() {
                return false;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return false;
            };
            let head = chain.head_index();
            let (n, err) = match descriptors(chain) {
                Ok(d) => {
                    let mut buf = vec![0u8; writable_len(&d).min(MAX_CHUNK)];
                    let got = inbox.take(&mut buf);
                    let (n, err) = write_chain(&d, mem, &buf[..got]);
                    inbox.untake(&buf[n..got]);
                    (n, err)
                }
                Err(e) => (0, Some(e)),
            };
            if let Some(e) = err {
                self.bad(rx_queue(port), head, &e);
            }
            self.add_used(queue, mem, head, n as u32)
        });
        if self.state[port].host_open && !self.host_open(port) {
            self.state[port].host_open = false;
            self.send(Control::new(port as u32, control::PORT_OPEN, 0), &[]);
        }
        used
    }

    fn add_used(&self, queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
        match queue.add_used(mem, head, len) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("virtio-console: cannot return buffer {head}: {e}");
                false
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MULTIPORT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    /// `struct virtio_console_config`: cols, rows (0: no size), then
    /// max_nr_ports.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&(self.ports.len().max(1) as u32).to_le_bytes());
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| c.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        match (index, port_of(index)) {
            (CONTROL_RX, _) => self.control_rx(queue, mem),
            (CONTROL_TX, _) => self.control_tx(queue, mem),
            (_, Some((port, _))) if port >= self.ports.len() => false,
            (_, Some((port, true))) => self.port_tx(port, queue, mem),
            (_, Some((port, false))) => self.port_rx(port, queue, mem),
            (_, None) => false,
        }
    }

    fn drains_before_reset(&self, index: usize) -> bool {
        matches!(port_of(index), Some((port, true)) if port < self.ports.len())
    }

    fn reset(&mut self) {
        self.state.fill(PortState::default());
        self.pending.clear();
    }

    fn wakers(&self) -> Vec<(u16, Arc<EventFd>)> {
        let mut w = vec![(CONTROL_RX as u16, self.control_wake.clone())];
        for (i, p) in self.ports.iter().enumerate() {
            if let Some(inbox) = &p.input {
                w.push((rx_queue(i) as u16, inbox.waker()));
            }
            if let Some(fd) = p.output.as_ref().and_then(|s| s.waker()) {
                w.push((tx_queue(i) as u16, fd));
            }
        }
        w
    }
}

/// The ports as the driver knows them and the control messages it has
/// not received yet; the host sides come from the VMM again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    pub names: Vec<String>,
    pub ports: Vec<PortState>,
    pub pending: Vec<Vec<u8>>,
}

impl Persist for Console {
    type State = ConsoleState;
    type Args = ConsoleArgs;
    type Error = RestoreError;

    fn save(&self) -> ConsoleState {
        ConsoleState {
            names: self.ports.iter().map(|p| p.name.clone()).collect(),
            ports: self.state.clone(),
            pending: self.pending.iter().cloned().collect(),
        }
    }

    fn restore(args: ConsoleArgs, s: &ConsoleState) -> Result<Self, RestoreError> {
        let names: Vec<String> = args.ports.iter().map(|p| p.name.clone()).collect();
        if s.pending.len() > MAX_PENDING {
            return Err(RestoreError::Invalid {
                device: "virtio-console",
                reason: format!(
                    "{} control messages pending, at most {MAX_PENDING}",
                    s.pending.len()
                ),
            });
        }
        if names != s.names || s.ports.len() != names.len() {
            return Err(RestoreError::Invalid {
                device: "virtio-console",
                reason: format!("ports {:?} saved, the VM now has {names:?}", s.names),
            });
        }
        let mut c = Console::new(args);
        c.state = s.ports.clone();
        c.pending = s.pending.iter().cloned().collect();
        if !c.pending.is_empty() {
            let _ = c.control_wake.write(1);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
