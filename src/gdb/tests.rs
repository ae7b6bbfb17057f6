//! The stub over a Unix socket against a fake VM: one vCPU without paging,
//! 64 KiB of memory, and debug exits made up from what `resume()` asks for.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::arch::{CpuState, Layout};
use super::target::{Action, Backend, Event, GdbTarget, GuestDebug, HostLimits};
use super::*;

#[derive(Default)]
struct Shared {
    state: CpuState,
    mem: Vec<u8>,
    events: VecDeque<Event>,
    resumes: Vec<(GuestDebug, Vec<Option<Action>>)>,
    stops: u32,
    killed: bool,
}

struct Fake {
    s: Arc<Mutex<Shared>>,
    evt: Arc<EventFd>,
    /// Exit status once a plain continue finds no breakpoint.
    status: i32,
}

impl Backend for Fake {
    fn vcpus(&self) -> u32 {
        1
    }
    fn read_state(&mut self, id: u32) -> Result<CpuState, GdbError> {
        match id {
            0 => Ok(self.s.lock().unwrap().state.clone()),
            _ => Err(GdbError::NoSuchVcpu(id)),
        }
    }
    fn write_state(&mut self, _id: u32, state: &CpuState) -> Result<(), GdbError> {
        self.s.lock().unwrap().state = state.clone();
        Ok(())
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let s = self.s.lock().unwrap();
        let Some(src) = s.mem.get(gpa as usize..gpa as usize + buf.len()) else {
            return false;
        };
        buf.copy_from_slice(src);
        true
    }
    fn write_phys(&self, gpa: u64, data: &[u8]) -> bool {
        let mut s = self.s.lock().unwrap();
        let Some(dst) = s.mem.get_mut(gpa as usize..gpa as usize + data.len()) else {
            return false;
        };
        dst.copy_from_slice(data);
        true
    }
    fn stop_all(&mut self) -> Result<(), GdbError> {
        self.s.lock().unwrap().stops += 1;
        Ok(())
    }
    fn resume(&mut self, debug: &GuestDebug, actions: &[Option<Action>]) -> Result<(), GdbError> {
        let mut s = self.s.lock().unwrap();
        s.resumes.push((debug.clone(), actions.to_vec()));
        let e = match actions[0] {
            None => return Ok(()),
            Some(Action::Step) => Event::Debug {
                id: 0,
                exception: 1,
                pc: 0,
                dr6: 1 << 14,
            },
            Some(Action::Continue) if debug.dr7 & 0b11 != 0 => Event::Debug {
                id: 0,
                exception: 1,
                pc: 0,
                dr6: 1,
            },
            Some(Action::Continue) => Event::Ended(self.status),
        };
        s.events.push_back(e);
        self.evt.write(1).unwrap();
        Ok(())
    }
    fn take_event(&mut self) -> Option<Event> {
        let _ = self.evt.read();
        self.s.lock().unwrap().events.pop_front()
    }
    fn limits(&self) -> HostLimits {
        HostLimits {
            sw_breakpoints: Some("the fake cannot"),
            watchpoints: None,
        }
    }
    fn kill(&mut self) {
        self.s.lock().unwrap().killed = true;
    }
    fn set_attached(&mut self, _attached: bool) {}
}

struct Client(UnixStream);

fn checksum(p: &str) -> u8 {
    p.bytes().fold(0u8, |a, b| a.wrapping_add(b))
}

impl Client {
    fn send_raw(&mut self, bytes: &[u8]) {
        Write::write_all(&mut self.0, bytes).unwrap();
    }

    fn packet(&mut self, p: &str) -> String {
        let text = format!("${p}#{:02x}", checksum(p));
        self.send_raw(text.as_bytes());
        self.reply()
    }

    /// The next packet, acknowledged; '+' acks before it are skipped.
    fn reply(&mut self) -> String {
        let mut out = Vec::new();
        let mut b = [0u8];
        loop {
            self.0.read_exact(&mut b).unwrap();
            if b[0] == b'$' {
                break;
            }
        }
        loop {
            self.0.read_exact(&mut b).unwrap();
            if b[0] == b'#' {
                break;
            }
            out.push(b[0]);
        }
        let mut cs = [0u8; 2];
        self.0.read_exact(&mut cs).unwrap();
        // After 'W' the stub may have closed the connection already.
        let _ = Write::write_all(&mut self.0, b"+");
        // Undo run-length encoding: "x*N" is x and N - 29 more of it.
        let mut plain = Vec::new();
        let mut i = 0;
        while i < out.len() {
            if out[i] == b'*' && i + 1 < out.len() {
                let last = *plain.last().unwrap();
                plain.extend(std::iter::repeat_n(last, (out[i + 1] - 29) as usize));
                i += 2;
            } else {
                plain.push(out[i]);
                i += 1;
            }
        }
        String::from_utf8(plain).unwrap()
    }
}

fn start(status: i32) -> (Client, Arc<Mutex<Shared>>, std::thread::JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!("kvmrun-gdb-unit-{}-{status}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("gdb.sock");
    let listener = Listener::bind(&Address::Unix(path.clone())).unwrap();
    let shared = Arc::new(Mutex::new(Shared {
        mem: (0..0x10000u32).map(|i| i as u8).collect(),
        ..Default::default()
    }));
    shared.lock().unwrap().state.rip = 0x1000;
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let fake = Fake {
        s: shared.clone(),
        evt: evt.clone(),
        status,
    };
    let target = GdbTarget::new(fake, Layout::X86_64);
    let t = std::thread::spawn(move || serve(listener, target, evt.as_raw_fd()));
    let c = Client(UnixStream::connect(&path).unwrap());
    (c, shared, t)
}

#[test]
fn a_session_reads_writes_steps_breaks_and_sees_the_exit() {
    let (mut c, shared, t) = start(3);
    assert!(c
        .packet("qSupported:xmlRegisters=i386")
        .contains("qXfer:features:read+"));
    let xml = c.packet("qXfer:features:read:target.xml:0,ffff");
    assert!(xml.contains("i386:x86-64"), "{xml}");
    assert!(c.packet("?").starts_with('T'));
    let g = c.packet("g");
    assert_eq!(g.len(), 2 * Layout::X86_64.g_len());
    assert_eq!(&g[256..272], "0010000000000000", "rip in the 17th slot");
    assert_eq!(c.packet("m1000,4"), "00010203");
    assert_eq!(c.packet("M1000,2:abcd"), "OK");
    assert_eq!(c.packet("m1000,4"), "abcd0203");
    assert_eq!(
        c.packet("m20000,4").chars().next(),
        Some('E'),
        "outside memory"
    );
    // The fake host cannot take software breakpoints: an error, not OK.
    assert!(c.packet("Z0,1000,1").starts_with('E'));
    assert_eq!(c.packet("Z1,1000,1"), "OK");
    assert!(c.packet("vCont;s:1").starts_with("T05"));
    assert!(c.packet("vCont;c").contains("hwbreak"));
    let (debug, _) = shared.lock().unwrap().resumes.last().unwrap().clone();
    assert_eq!(debug.dr[0], 0x1000);
    assert_eq!(debug.dr7 & 0b11, 0b10, "G0");
    assert_eq!(c.packet("z1,1000,1"), "OK");
    assert_eq!(c.packet("Z2,2000,4"), "OK");
    let (debug, _) = {
        c.packet("vCont;c");
        shared.lock().unwrap().resumes.last().unwrap().clone()
    };
    assert_eq!((debug.dr7 >> 16) & 0xf, 0b1101, "write, 4 bytes");
    assert_eq!(c.packet("z2,2000,4"), "OK");
    assert_eq!(c.packet("vCont;c"), "W03");
    t.join().unwrap();
}

/// The fake VM was released: breakpoints cleared, every vCPU running.
fn released(shared: &Mutex<Shared>) -> bool {
    let s = shared.lock().unwrap();
    let (debug, actions) = s.resumes.last().unwrap();
    debug.is_off() && actions == &vec![Some(Action::Continue)] && !s.killed
}

#[test]
fn unknown_packets_get_empty_replies_and_malformed_ones_end_the_session() {
    let (mut c, shared, t) = start(5);
    assert_eq!(c.packet("qKvmrunNonsense"), "");
    assert_eq!(c.packet("vMustReplyEmpty"), "");
    assert!(c.packet("?").starts_with('T'));
    assert_eq!(c.packet("Z1,1000,1"), "OK");
    // gdbstub ends a session on a packet it cannot parse; the VM goes on.
    c.send_raw(b"$mzz,?#00");
    let mut rest = Vec::new();
    let _ = c.0.read_to_end(&mut rest);
    t.join().unwrap();
    assert!(released(&shared));
}

#[test]
fn a_gdb_gone_mid_packet_leaves_the_guest_running() {
    let (mut c, shared, t) = start(7);
    assert!(c.packet("?").starts_with('T'));
    assert_eq!(c.packet("Z1,1000,1"), "OK");
    c.send_raw(b"$m10");
    drop(c);
    t.join().unwrap();
    assert!(released(&shared));
}

#[test]
fn a_bad_checksum_ends_the_session_and_the_guest_runs_on() {
    let (mut c, shared, t) = start(6);
    assert!(c.packet("?").starts_with('T'));
    c.send_raw(b"$g#00");
    // The stub closes the connection; the fake ends the VM on release.
    let mut rest = Vec::new();
    let _ = c.0.read_to_end(&mut rest);
    t.join().unwrap();
    assert!(released(&shared));
}

#[test]
fn addresses_parse_and_name_the_problem() {
    assert_eq!(
        "/tmp/x.sock".parse::<Address>().unwrap(),
        Address::Unix("/tmp/x.sock".into())
    );
    assert_eq!(
        "gdb.sock".parse::<Address>().unwrap(),
        Address::Unix("gdb.sock".into())
    );
    assert_eq!(
        ":1234".parse::<Address>().unwrap(),
        Address::Tcp("127.0.0.1:1234".into())
    );
    assert_eq!(
        "localhost:1".parse::<Address>().unwrap(),
        Address::Tcp("localhost:1".into())
    );
    let e = "host:99999".parse::<Address>().unwrap_err().to_string();
    assert!(e.contains("host:99999") && e.contains("port"), "{e}");
    assert!("".parse::<Address>().is_err());
    assert!("i386".parse::<ArchChoice>().is_ok());
    assert!("arm".parse::<ArchChoice>().is_err());
}
