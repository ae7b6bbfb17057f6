use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::control::*;
use super::*;
use crate::virtio::test_utils::memory;

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const BUF: u64 = 0x8_0000;
const QSIZE: u16 = 16;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

#[derive(Default)]
struct Recorder {
    bytes: Mutex<Vec<u8>>,
    full: AtomicBool,
}

impl PortSink for Recorder {
    fn has_room(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }
    fn put(&self, data: &[u8]) {
        self.bytes.lock().unwrap().extend_from_slice(data);
    }
    fn waker(&self) -> Option<Arc<EventFd>> {
        None
    }
}

/// A console with an output port "out" (port 0) and an input port "in"
/// (port 1), and a mock queue for each of the first six queues.
struct Rig<'a> {
    mem: &'a GuestMemoryMmap,
    dev: Console,
    out: Arc<Recorder>,
    inbox: Arc<Inbox>,
    mocks: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    queues: Vec<Queue>,
}

impl<'a> Rig<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let out = Arc::new(Recorder::default());
        let inbox = Inbox::new().unwrap();
        let args = args(out.clone(), inbox.clone());
        let mocks: Vec<_> = (0..6)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1000), QSIZE))
            .collect();
        let queues = mocks.iter().map(|m| m.create_queue().unwrap()).collect();
        Rig {
            mem,
            dev: Console::new(args),
            out,
            inbox,
            mocks,
            queues,
        }
    }

    /// Offer `chain` on queue `q` at descriptor `at`.
    fn offer(&self, q: usize, chain: &[RawDescriptor], at: u16) {
        self.mocks[q].add_desc_chains(chain, at).unwrap();
    }

    fn run(&mut self, q: usize) -> bool {
        self.dev.process_queue(q, &mut self.queues[q], self.mem)
    }

    /// Used entry `i` of queue `q`: its length.
    fn used_len(&self, q: usize, i: u16) -> u32 {
        self.mocks[q]
            .used()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .load()
            .len()
    }

    /// Send `c` from the driver on the control transmit queue.
    fn driver_says(&mut self, c: Control, at: u16) {
        let addr = BUF + 0x1_0000 + u64::from(at) * 0x100;
        self.mem
            .write_slice(&c.encode(&[]), GuestAddress(addr))
            .unwrap();
        self.offer(CONTROL_TX, &[desc(addr, 8, 0, 0)], at);
        assert!(self.run(CONTROL_TX));
    }

    /// Give the device `n` control receive buffers from descriptor `at`
    /// and take the messages it wrote.
    fn device_says(&mut self, at: u16, n: u16) -> Vec<(Control, Vec<u8>)> {
        let chains: Vec<_> = (0..n)
            .map(|i| desc(BUF + u64::from(at + i) * 0x100, 0x100, WRITE, 0))
            .collect();
        self.offer(CONTROL_RX, &chains, at);
        let before = self.queues[CONTROL_RX].next_used();
        self.run(CONTROL_RX);
        (before..self.queues[CONTROL_RX].next_used())
            .map(|u| {
                let e = self.mocks[CONTROL_RX]
                    .used()
                    .ring()
                    .ref_at(u as usize)
                    .unwrap()
                    .load();
                let mut b = vec![0u8; e.len() as usize];
                let addr = BUF + u64::from(e.id()) * 0x100;
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                (Control::decode(&b).unwrap(), b[8..].to_vec())
            })
            .collect()
    }

    /// The driver's handshake: device ready, then both ports ready, and
    /// a program opens the input port.
    fn bring_up(&mut self) -> Vec<(Control, Vec<u8>)> {
        self.driver_says(Control::new(0, DEVICE_READY, 1), 0);
        self.driver_says(Control::new(0, PORT_READY, 1), 1);
        self.driver_says(Control::new(1, PORT_READY, 1), 2);
        self.driver_says(Control::new(1, PORT_OPEN, 1), 3);
        self.device_says(0, 8)
    }
}

fn args(out: Arc<Recorder>, inbox: Arc<Inbox>) -> ConsoleArgs {
    ConsoleArgs {
        ports: vec![
            PortSpec {
                name: "out".into(),
                output: Some(out),
                input: None,
            },
            PortSpec {
                name: "in".into(),
                output: None,
                input: Some(inbox),
            },
        ],
        control_wake: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
    }
}

#[test]
fn queues_are_numbered_as_the_spec_says() {
    assert_eq!((rx_queue(0), tx_queue(0)), (0, 1));
    assert_eq!((rx_queue(1), tx_queue(1)), (4, 5));
    assert_eq!(port_of(5), Some((1, true)));
    assert_eq!(port_of(6), Some((2, false)));
    assert_eq!(port_of(2), None);
    let mem = memory();
    let rig = Rig::new(&mem);
    assert_eq!(rig.dev.queue_max_sizes().len(), 6);
    let mut c = [0u8; 4];
    rig.dev.read_config(4, &mut c);
    assert_eq!(u32::from_le_bytes(c), 2);
}

#[test]
fn ports_are_added_named_and_opened() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    let msgs = rig.bring_up();
    let events: Vec<_> = msgs
        .iter()
        .map(|(c, x)| (c.id, c.event, c.value, x.clone()))
        .collect();
    assert_eq!(
        events,
        [
            (0, DEVICE_ADD, 1, vec![]),
            (1, DEVICE_ADD, 1, vec![]),
            (0, PORT_NAME, 1, b"out".to_vec()),
            (0, PORT_OPEN, 1, vec![]),
            (1, PORT_NAME, 1, b"in".to_vec()),
            (1, PORT_OPEN, 1, vec![]),
        ]
    );
    assert!(rig.dev.port_state(1).unwrap().guest_open);
    // A port that does not exist is ignored.
    rig.driver_says(Control::new(9, PORT_READY, 1), 4);
    assert!(rig.device_says(8, 2).is_empty());
}

#[test]
fn output_reaches_the_sink() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.bring_up();
    mem.write_slice(b"hello, world", GuestAddress(BUF)).unwrap();
    rig.offer(1, &[desc(BUF, 7, NEXT, 1), desc(BUF + 7, 5, 0, 0)], 0);
    assert!(rig.run(1));
    assert_eq!(rig.used_len(1, 0), 0);
    assert_eq!(*rig.out.bytes.lock().unwrap(), b"hello, world");
}

#[test]
fn a_full_sink_leaves_output_in_the_ring() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.bring_up();
    mem.write_slice(b"abc", GuestAddress(BUF)).unwrap();
    rig.out.full.store(true, Ordering::Relaxed);
    rig.offer(1, &[desc(BUF, 3, 0, 0)], 0);
    assert!(!rig.run(1));
    assert_eq!(rig.queues[1].next_avail(), 0);
    rig.out.full.store(false, Ordering::Relaxed);
    assert!(rig.run(1));
    assert_eq!(*rig.out.bytes.lock().unwrap(), b"abc");
}

#[test]
fn malformed_output_is_used_and_the_next_served() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.bring_up();
    mem.write_slice(b"ok", GuestAddress(BUF)).unwrap();
    rig.offer(
        1,
        &[
            // Device-writable, outside memory, a good one, a loop.
            desc(BUF, 2, WRITE, 0),
            desc(0xff_fff0, 0x20, 0, 0),
            desc(BUF, 2, 0, 0),
            desc(BUF, 1, NEXT, 4),
            desc(BUF, 1, NEXT, 3),
        ],
        0,
    );
    assert!(rig.run(1));
    assert_eq!(*rig.out.bytes.lock().unwrap(), b"ok");
    assert_eq!(rig.queues[1].next_used(), 4);
    assert_eq!(rig.dev.bad_requests, 3);
}

#[test]
fn input_fills_receive_buffers() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    // Input before the port is ready waits.
    assert_eq!(rig.inbox.push(b"line one\n"), 9);
    rig.offer(
        4,
        &[desc(BUF, 4, WRITE, 0), desc(BUF + 0x100, 0x100, WRITE, 0)],
        0,
    );
    assert!(!rig.run(4));
    rig.bring_up();
    assert!(rig.run(4));
    assert_eq!((rig.used_len(4, 0), rig.used_len(4, 1)), (4, 5));
    let mut b = [0u8; 5];
    mem.read_slice(&mut b, GuestAddress(BUF + 0x100)).unwrap();
    assert_eq!(&b, b" one\n");
    // No input: the next buffer stays.
    rig.offer(4, &[desc(BUF + 0x200, 0x10, WRITE, 0)], 2);
    assert!(!rig.run(4));
    assert_eq!(rig.queues[4].next_avail(), 2);
}

#[test]
fn input_waits_for_a_program_to_open_the_port() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.driver_says(Control::new(0, DEVICE_READY, 1), 0);
    rig.driver_says(Control::new(1, PORT_READY, 1), 1);
    rig.inbox.push(b"early");
    rig.offer(4, &[desc(BUF, 8, WRITE, 0)], 0);
    assert!(!rig.run(4));
    rig.driver_says(Control::new(1, PORT_OPEN, 1), 2);
    assert!(rig.run(4));
    assert_eq!(rig.used_len(4, 0), 5);
    // Closed again: the input waits again.
    rig.driver_says(Control::new(1, PORT_OPEN, 0), 3);
    rig.inbox.push(b"late");
    rig.offer(4, &[desc(BUF, 8, WRITE, 0)], 1);
    assert!(!rig.run(4));
}

#[test]
fn malformed_receive_buffers_keep_the_input() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.bring_up();
    rig.inbox.push(b"xyz");
    // Read-only, then outside memory, then good.
    rig.offer(
        4,
        &[
            desc(BUF, 4, 0, 0),
            desc(0xff_fff0, 0x20, WRITE, 0),
            desc(BUF, 8, WRITE, 0),
        ],
        0,
    );
    assert!(rig.run(4));
    assert_eq!(rig.queues[4].next_used(), 3);
    assert_eq!(rig.used_len(4, 2), 3);
    let mut b = [0u8; 3];
    mem.read_slice(&mut b, GuestAddress(BUF)).unwrap();
    assert_eq!(&b, b"xyz");
}

#[test]
fn the_end_of_input_closes_the_host_side() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.bring_up();
    rig.inbox.push(b"z");
    rig.inbox.close();
    rig.offer(4, &[desc(BUF, 8, WRITE, 0)], 0);
    assert!(rig.run(4));
    let msgs = rig.device_says(8, 2);
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].0, Control::new(1, PORT_OPEN, 0));
    assert!(!rig.dev.port_state(1).unwrap().host_open);
}

#[test]
fn input_that_ended_before_the_guest_looked_is_closed_at_once() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.inbox.close();
    let msgs = rig.bring_up();
    assert_eq!(msgs.last().unwrap().0, Control::new(1, PORT_OPEN, 0));
}

#[test]
fn small_or_bad_control_buffers_keep_the_message() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.driver_says(Control::new(0, DEVICE_READY, 1), 0);
    rig.offer(CONTROL_RX, &[desc(BUF, 4, WRITE, 0), desc(BUF, 8, 0, 0)], 0);
    assert!(rig.run(CONTROL_RX));
    assert_eq!(rig.dev.pending.len(), 2);
    assert_eq!(rig.device_says(2, 4).len(), 2);
    // A short message from the driver is used and ignored.
    rig.offer(CONTROL_TX, &[desc(BUF, 3, 0, 0)], 1);
    assert!(rig.run(CONTROL_TX));
    assert_eq!(rig.dev.bad_requests, 3);
}

#[test]
fn state_survives_save_and_restore() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.driver_says(Control::new(0, DEVICE_READY, 1), 0);
    rig.driver_says(Control::new(1, PORT_READY, 1), 1);
    let saved = rig.dev.save();
    assert_eq!(saved.pending.len(), 4);
    let a = args(Arc::new(Recorder::default()), Inbox::new().unwrap());
    let wake = a.control_wake.clone();
    let back = Console::restore(a, &saved).unwrap();
    assert_eq!(back.save(), saved);
    // The restored device asks for its pending messages to be sent.
    assert_eq!(wake.read().unwrap(), 1);
    let mut a = args(Arc::new(Recorder::default()), Inbox::new().unwrap());
    a.ports.pop();
    let e = Console::restore(a, &saved).err().unwrap().to_string();
    assert!(e.contains("ports"), "{e}");
}

#[test]
fn wakers_pair_with_their_queues() {
    let mem = memory();
    let rig = Rig::new(&mem);
    let queues: Vec<u16> = rig.dev.wakers().iter().map(|(q, _)| *q).collect();
    assert_eq!(queues, [2, 4]);
}

#[test]
fn a_driver_that_never_takes_control_messages_cannot_grow_them() {
    let mem = memory();
    let mut rig = Rig::new(&mem);
    rig.driver_says(Control::new(0, DEVICE_READY, 1), 0);
    rig.driver_says(Control::new(1, PORT_READY, 1), 1);
    // PORT_READY again and again, two replies each, none taken.
    for _ in 0..100 {
        rig.dev.handle_control(Control::new(1, PORT_READY, 1));
    }
    assert_eq!(rig.dev.pending.len(), MAX_PENDING);
    assert!(rig.dev.dropped > 0);
    // The oldest messages are still the ones delivered first.
    let first = rig.device_says(0, 2);
    assert_eq!(first[0].0, Control::new(0, DEVICE_ADD, 1));
    // A state with more than a device keeps is refused.
    let mut saved = rig.dev.save();
    saved.pending.resize(MAX_PENDING + 1, vec![0; 8]);
    let a = args(Arc::new(Recorder::default()), Inbox::new().unwrap());
    let e = Console::restore(a, &saved).err().unwrap().to_string();
    assert!(e.contains("pending"), "{e}");
}
