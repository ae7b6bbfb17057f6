//! The main thread's event sources: the exit event, the `--timeout`
//! timer, the halt poll, the PIT policy deadline, stdin to COM1 or to
//! a console port and, with the split irqchip, the irqfds of IOAPIC pins.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::serial::SerialDevice;
use devices::virtio::console::Inbox;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use vmm_sys_util::eventfd::EventFd;

use crate::shutdown::{ExitReason, Shutdown};
use crate::vcpu::{HaltWatch, Kick};
use crate::vm::{Interrupts, PitClock};
use devices::i8254::Pit;

/// How often the main loop checks for a guest that halted for good.
pub(super) const HALT_POLL: Duration = Duration::from_millis(250);

pub(super) struct HaltPoll {
    pub(super) timer: TimerFd,
    pub(super) watch: Arc<HaltWatch>,
    /// The running vCPUs; empty while they are stopped.
    pub(super) kicks: Arc<Mutex<Vec<Kick>>>,
    pub(super) shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for HaltPoll {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.watch.all_stuck_and_clear() {
            self.shutdown.request(ExitReason::Halted);
            return;
        }
        // The list is emptied before the threads are joined.
        for k in self.kicks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            k.kick();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("cannot watch for halted guests: {e:?}");
        }
    }
}

pub(super) struct ShutdownWatch(pub(super) Arc<Shutdown>);

impl MutEventSubscriber for ShutdownWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            self.0.request(ExitReason::Error(format!(
                "cannot watch the exit event: {e:?}"
            )));
        }
    }
}

pub(super) struct Timeout {
    pub(super) timer: TimerFd,
    pub(super) shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for Timeout {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.shutdown.request(ExitReason::Timeout);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            self.shutdown.request(ExitReason::Error(format!(
                "cannot watch the timeout: {e:?}"
            )));
        }
    }
}

/// Stops the vCPUs when the PIT's lost-tick policy switch misses its
/// deadline (see `pit`); the run loop restarts them once it lands.
pub(super) struct TickDeadline {
    pub(super) timer: TimerFd,
    pub(super) landed: Arc<AtomicBool>,
    pub(super) hold: Arc<AtomicBool>,
    pub(super) shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for TickDeadline {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
        if !self.landed.load(Ordering::SeqCst) {
            self.hold.store(true, Ordering::SeqCst);
            self.shutdown.request_pause();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            self.shutdown.request(ExitReason::Error(format!(
                "cannot watch the PIT policy deadline: {e:?}"
            )));
        }
    }
}

/// Host stdin to the guest's COM1 receiver.
pub(super) struct StdinToSerial {
    pub(super) serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        // SAFETY: fd 0 stays open for the life of the process.
        let n = unsafe { libc::read(stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let taken = serial.enqueue_input(&buf[..n as usize]);
            if taken < n as usize {
                log::debug!(
                    "serial input FIFO full: dropped {} bytes",
                    n as usize - taken
                );
            }
        }
        // A writer that closes right after writing raises IN and HANG_UP
        // together: the bytes above still count. Stop watching only at the
        // end of input or on an error, so the loop does not spin.
        if n <= 0 || (events.event_set().contains(EventSet::HANG_UP) && n < buf.len() as isize) {
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be watched; the guest just gets
        // no input then.
        if ops
            .add(Events::new(&std::io::stdin(), EventSet::IN))
            .is_err()
        {
            log::debug!("stdin cannot be polled; serial input disabled");
        }
    }
}

/// How often `--serial-input` text that did not fit in COM1's receive
/// FIFO is offered again.
pub(super) const SERIAL_INPUT_POLL: Duration = Duration::from_millis(1);

/// `--serial-input`: text typed into COM1 as the receive FIFO makes room
/// for it, never dropped (the FIFO holds 64 bytes, a test's command line
/// may be longer). Whatever is still waiting when the VM is snapshotted
/// is host input like unread stdin, not VM state.
pub(super) struct SerialInput {
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) pending: std::collections::VecDeque<u8>,
    pub(super) timer: TimerFd,
}

impl SerialInput {
    /// Move what fits into the FIFO; true when nothing is left.
    fn feed(&mut self) -> bool {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let (front, _) = self.pending.as_slices();
        let taken = serial.enqueue_input(front);
        self.pending.drain(..taken);
        self.pending.is_empty()
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.feed() {
            let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if self.feed() {
            return;
        }
        let armed = self
            .timer
            .reset(SERIAL_INPUT_POLL, Some(SERIAL_INPUT_POLL))
            .is_ok();
        if !armed || ops.add(Events::new(&self.timer, EventSet::IN)).is_err() {
            log::warn!(
                "cannot watch COM1's receive FIFO: {} bytes of --serial-input dropped",
                self.pending.len()
            );
        }
    }
}

/// Host stdin to a console port's inbox. While the inbox is full stdin
/// is not watched (the loop would spin on it); the inbox's resume fd
/// brings it back. Stdin that cannot be watched (a regular file,
/// /dev/null) is read as the inbox takes it.
pub(super) struct StdinToPort {
    inbox: Arc<Inbox>,
    /// stdin is in the loop's interest list.
    watching: bool,
    /// stdin can be watched at all.
    pollable: bool,
    ended: bool,
}

const STDIN_DATA: u32 = 0;
const RESUME_DATA: u32 = 1;

impl StdinToPort {
    pub(super) fn new(inbox: Arc<Inbox>) -> Self {
        StdinToPort {
            inbox,
            watching: false,
            pollable: false,
            ended: false,
        }
    }

    /// One read of stdin into the inbox; false if nothing more can come
    /// now (the inbox is full, stdin would block, or stdin ended).
    fn read_once(&mut self) -> bool {
        let room = self.inbox.room().min(4096);
        if room == 0 || self.ended {
            return false;
        }
        let mut buf = vec![0u8; room];
        // SAFETY: fd 0 stays open for the life of the process; `buf` has
        // `room` bytes.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), room) };
        match n {
            n if n > 0 => {
                self.inbox.push(&buf[..n as usize]);
                true
            }
            0 => {
                self.ended = true;
                self.inbox.close();
                false
            }
            _ => {
                let e = std::io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) {
                    log::debug!("stdin: {e}; the guest's input ends here");
                    self.ended = true;
                    self.inbox.close();
                }
                false
            }
        }
    }

    fn watch(&mut self, ops: &mut EventOps, on: bool) {
        let stdin = std::io::stdin();
        let ev = Events::with_data(&stdin, STDIN_DATA, EventSet::IN);
        let done = match on {
            true => ops.add(ev).is_ok(),
            false => ops.remove(ev).is_ok(),
        };
        if done {
            self.watching = on;
        }
    }
}

impl MutEventSubscriber for StdinToPort {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.data() == RESUME_DATA {
            let _ = self.inbox.resume().read();
            if !self.pollable {
                while self.read_once() {}
            } else if !self.watching && !self.ended {
                self.watch(ops, true);
            }
            return;
        }
        self.read_once();
        if self.ended || self.inbox.room() == 0 {
            self.watch(ops, false);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let resume = self.inbox.resume();
        if let Err(e) = ops.add(Events::with_data(&*resume, RESUME_DATA, EventSet::IN)) {
            log::warn!("cannot watch the console input's room: {e:?}");
        }
        self.watch(ops, true);
        self.pollable = self.watching;
        if !self.pollable {
            while self.read_once() {}
        }
    }
}

/// With the split irqchip, the irqfds of IOAPIC pins (COM1's): each
/// signal is an edge on its pin.
pub(super) struct PinRelay {
    pub(super) irq: Arc<Interrupts>,
    pub(super) fds: Vec<(EventFd, u32)>,
}

impl MutEventSubscriber for PinRelay {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some((fd, gsi)) = self.fds.get(events.data() as usize) else {
            return;
        };
        // A read resets the counter; several signals are one edge.
        let _ = fd.read();
        self.irq.pulse(*gsi);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, (fd, gsi)) in self.fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                log::warn!("cannot relay the interrupts of GSI {gsi}: {e:?}");
            }
        }
    }
}

/// With the split irqchip, kvmrun's PIT's timer: each expiry is a
/// channel 0 output rise (or several, coalesced by the PIT).
pub(super) struct PitTimer {
    pub(super) pit: Arc<Mutex<Pit>>,
    pub(super) clock: Arc<PitClock>,
}

impl MutEventSubscriber for PitTimer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.clock.clear();
        self.pit.lock().unwrap_or_else(|e| e.into_inner()).expire();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.clock, EventSet::IN)) {
            log::warn!("cannot watch the PIT's timer: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;

    /// Text longer than the 64-byte FIFO goes in as the guest reads,
    /// in order, none of it dropped.
    #[test]
    fn serial_input_waits_for_room_in_the_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq,
            Box::new(std::io::sink()),
        )));
        let text: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        let mut input = SerialInput {
            serial: serial.clone(),
            pending: text.iter().copied().collect(),
            timer: TimerFd::new().unwrap(),
        };
        assert!(!input.feed());
        assert_eq!(input.pending.len(), 100 - 64);
        let mut read = Vec::new();
        let read_some = |n: usize, read: &mut Vec<u8>| {
            let mut s = serial.lock().unwrap();
            for _ in 0..n {
                let mut b = [0u8];
                s.pio_read(PioAddress(0x3f8), 0, &mut b);
                read.push(b[0]);
            }
        };
        read_some(10, &mut read);
        assert!(!input.feed());
        assert_eq!(input.pending.len(), 100 - 74);
        read_some(64, &mut read);
        assert!(input.feed());
        read_some(26, &mut read);
        assert_eq!(read, text);
    }
}
