//! Multi-queue virtio devices (virtio-fs, the multiport virtio-console)
//! driven by a driver the input steers: it lays descriptor chains and
//! messages out in guest memory, offers them on any queue, notifies,
//! resets the device mid-traffic and sends it through snapshot round
//! trips, while the host side does what the VMM would (console input,
//! a full output, the device's wakers served as the VMM serves them).
//!
//! `virtio_chain` and `virtio_blk` put the whole input in guest memory,
//! so most of it goes to ring bytes; here the input is a program of
//! driver operations, and the rings are written the way a driver writes
//! them, so requests reach the devices' logic instead of the rings'.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use devices::virtio::console::{self, Console, ConsoleArgs, Inbox, PortSink, PortSpec};
use devices::virtio::fs::{Fs, FsArgs, Share};
use devices::virtio::mmio::{self, VirtioMmio};
use devices::virtio::{
    QueueNotify, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use devices::Persist;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::platform::{memory, through, MEM_SIZE};
use crate::{fakes, Input};

/// The rings of queue q sit at RINGS + q * RING_AREA: descriptor table,
/// then the driver ring at +0x100, the device ring at +0x200 (room for
/// 16 entries each); buffers go below RINGS.
const RINGS: u64 = MEM_SIZE - 8 * RING_AREA;
const RING_AREA: u64 = 0x400;
/// Queue sizes the driver asks for: mostly what fits the ring areas,
/// sometimes one the device refuses.
const SIZES: [u16; 8] = [16, 16, 8, 4, 2, 1, 0, 3];
/// Descriptor flags (virtio 1.2, "The Virtqueue Descriptor Table").
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const GSI: u32 = 20;
/// The device's configuration in the virtio-mmio window.
const CONFIG: u64 = 0x100;

/// The driver's view of one queue.
#[derive(Clone, Copy, Default)]
struct Ring {
    base: u64,
    size: u16,
    /// Next descriptor slot to fill.
    slot: u16,
    /// The driver ring's index.
    avail: u16,
}

/// What one target brings: its device, how to restore it, what a
/// message's bytes need before they are offered, and the host events.
trait Rig {
    type Dev: VirtioDevice + Persist;
    fn device(&self) -> Self::Dev;
    fn args(&self) -> <Self::Dev as Persist>::Args;
    /// Features the driver takes besides VERSION_1 (low word).
    fn features(&self) -> u32;
    /// Make `msg` look like a request of the device (a length field).
    fn fix(&self, msg: &mut [u8]);
    /// Something the host side does, as the input says.
    fn host_event(&self, input: &mut Input);
}

struct Driver<R: Rig> {
    rig: R,
    mem: GuestMemoryMmap,
    t: VirtioMmio<R::Dev>,
    rings: Vec<Ring>,
    /// Next free byte of the buffer area.
    heap: u64,
}

fn wr<D: VirtioDevice>(t: &mut VirtioMmio<D>, off: u64, v: u32) {
    t.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
}

impl<R: Rig> Driver<R> {
    fn new(rig: R) -> Self {
        let mem = memory();
        let t = VirtioMmio::new(rig.device(), mem.clone(), fakes::irq(), GSI);
        Driver {
            rig,
            mem,
            t,
            rings: Vec::new(),
            heap: 0,
        }
    }

    /// Bring the device up as a driver does, with queue sizes from
    /// `sizes` (an index into SIZES each, two queues per byte).
    fn bring_up(&mut self, sizes: &[u8]) {
        let t = &mut self.t;
        wr(t, 0x70, 0);
        wr(t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
        wr(t, 0x24, 0);
        wr(t, 0x20, self.rig.features());
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        wr(t, 0x70, u32::from(ok));
        let n = t.core().num_queues().min(8);
        self.rings = (0..n)
            .map(|q| {
                let pick = sizes.get(q / 2).copied().unwrap_or(0) >> (4 * (q % 2));
                let base = RINGS + q as u64 * RING_AREA;
                let size = SIZES[usize::from(pick & 7)];
                wr(t, 0x30, q as u32);
                wr(t, 0x38, u32::from(size));
                for (off, a) in [(0x80u64, base), (0x90, base + 0x100), (0xa0, base + 0x200)] {
                    wr(t, off, a as u32);
                    wr(t, off + 4, 0);
                }
                wr(t, 0x44, 1);
                // A size the device refuses (not a power of two, or past
                // QueueNumMax) leaves its largest.
                let mut max = [0u8; 4];
                t.mmio_read(MmioAddress(0), 0x34, &mut max);
                let max = u32::from_le_bytes(max) as u16;
                let size = match size.is_power_of_two() && size <= max {
                    true => size,
                    false => max,
                };
                // The driver ring starts over (a reset left it as it was).
                let _ = self.mem.write_obj(0u32, GuestAddress(base + 0x100));
                Ring {
                    base,
                    size,
                    ..Ring::default()
                }
            })
            .collect();
        wr(t, 0x70, u32::from(ok | STATUS_DRIVER_OK));
    }

    /// A buffer of `len` bytes below the rings (reused round the area).
    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.min(RINGS);
        if self.heap + len > RINGS {
            self.heap = 0;
        }
        let at = self.heap;
        self.heap += len;
        at
    }

    fn ring(&mut self, q: u8) -> Option<(usize, Ring)> {
        let i = usize::from(q) % self.rings.len().max(1);
        let r = *self.rings.get(i)?;
        (r.size > 0).then_some((i, r))
    }

    /// Write descriptors `descs` (address, length, flags, next or None
    /// for the following slot) in consecutive slots of queue `q` and
    /// offer the first.
    fn offer(&mut self, q: u8, descs: &[(u64, u32, u16, Option<u16>)]) {
        let Some((i, r)) = self.ring(q) else {
            return;
        };
        let slot = |k: usize| (r.slot as usize + k) % usize::from(r.size);
        for (k, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let last = k + 1 == descs.len();
            let (flags, next) = match next {
                Some(n) => (flags | F_NEXT, n),
                None if last => (flags, 0),
                None => (flags | F_NEXT, slot(k + 1) as u16),
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            let at = r.base + 16 * slot(k) as u64;
            let _ = self.mem.write_slice(&d, GuestAddress(at));
        }
        let entry = r.base + 0x104 + 2 * u64::from(r.avail % r.size);
        let _ = self.mem.write_obj(r.slot, GuestAddress(entry));
        let avail = r.avail.wrapping_add(1);
        let _ = self.mem.write_obj(avail, GuestAddress(r.base + 0x102));
        self.rings[i].avail = avail;
        self.rings[i].slot = slot(descs.len()) as u16;
    }

    /// A chain spelled out descriptor by descriptor: per descriptor a
    /// flags byte (bit 0 device-writable, 1 indirect, 2 length times 256,
    /// 3 address outside memory, 4 an explicit next index follows), a
    /// 16-bit address and a 16-bit length.
    fn chain(&mut self, input: &mut Input) {
        let q = input.u8();
        let n = usize::from(input.u8() % 8) + 1;
        let descs: Vec<_> = (0..n)
            .map(|_| {
                let f = input.u8();
                let mut addr = u64::from(input.u16());
                let mut len = u32::from(input.u16());
                if f & 4 != 0 {
                    len <<= 8;
                }
                if f & 8 != 0 {
                    addr |= 0xffff_0000;
                }
                let flags = (u16::from(f & 1) * F_WRITE) | (u16::from(f & 2) * F_INDIRECT / 2);
                let next = (f & 16 != 0).then(|| u16::from(input.u8()));
                (addr, len, flags, next)
            })
            .collect();
        self.offer(q, &descs);
    }

    /// A message as a driver sends it: a shape byte (bit 0 split the
    /// message over two descriptors, bit 1 leave it as it is rather
    /// than `Rig::fix` it, bits 2-3 how many device-writable buffers
    /// follow), its 16-bit length and bytes, then each writable
    /// buffer's 16-bit length.
    fn message(&mut self, input: &mut Input) {
        let q = input.u8();
        let shape = input.u8();
        let len = usize::from(input.u16() % 4096);
        let mut msg = input.bytes(len).to_vec();
        if shape & 2 == 0 {
            self.rig.fix(&mut msg);
        }
        let at = self.alloc(msg.len() as u64);
        let _ = self.mem.write_slice(&msg, GuestAddress(at));
        let mut descs = Vec::new();
        let cut = if shape & 1 != 0 { msg.len() / 2 } else { 0 };
        if cut > 0 {
            descs.push((at, cut as u32, 0, None));
        }
        descs.push((at + cut as u64, (msg.len() - cut) as u32, 0, None));
        for _ in 0..(shape >> 2) & 3 {
            let n = u64::from(input.u16());
            descs.push((self.alloc(n), n as u32, F_WRITE, None));
        }
        self.offer(q, &descs);
    }

    /// Notify queue `q` (one past the last too), as the ioeventfd
    /// delivers it or, with `register`, through the register.
    fn notify(&mut self, q: u8, register: bool) {
        let q = u16::from(q) % (self.t.core().num_queues() as u16 + 1);
        match register {
            true => wr(&mut self.t, mmio::QUEUE_NOTIFY, u32::from(q)),
            false => self.t.notify(q),
        }
    }

    /// What the VMM does when the device's wakers fire: look at the
    /// queues paired with them.
    fn serve_wakers(&mut self) {
        for (q, fd) in self.t.core().dev.wakers() {
            if fd.read().is_ok() {
                self.t.notify(q);
            }
        }
    }

    fn round_trip(&mut self) {
        let args = (self.mem.clone(), fakes::irq(), GSI, self.rig.args());
        self.t = through(&self.t, args);
    }

    /// Run the program in `input`: a queue-size byte per two queues,
    /// then operations, each a byte whose low three bits say what: 0
    /// write bytes to memory (16-bit address, 8-bit length, bytes), 1 a
    /// chain, 2 a message (see `chain()`, `message()`), 3 notify (bit 7
    /// of the byte: through the register), 4 a snapshot round trip, 5 a
    /// reset (bit 7: and no new start; new queue sizes follow), 6 a host
    /// event, 7 a configuration access (offset, bit 7: write a byte).
    fn run(&mut self, input: &mut Input) {
        let sizes = input.array::<4>();
        self.bring_up(&sizes);
        while !input.is_empty() {
            let op = input.u8();
            match op & 7 {
                0 => {
                    let at = u64::from(input.u16());
                    let n = usize::from(input.u8());
                    let _ = self.mem.write_slice(input.bytes(n), GuestAddress(at));
                }
                1 => self.chain(input),
                2 => self.message(input),
                3 => {
                    let q = input.u8();
                    self.notify(q, op & 0x80 != 0);
                }
                4 => self.round_trip(),
                5 if op & 0x80 != 0 => wr(&mut self.t, 0x70, 0),
                5 => {
                    let sizes = input.array::<4>();
                    self.bring_up(&sizes);
                }
                6 => self.rig.host_event(input),
                _ => {
                    let off = CONFIG + u64::from(input.u8());
                    match op & 0x80 != 0 {
                        true => self.t.mmio_write(MmioAddress(0), off, &[input.u8()]),
                        false => self.t.mmio_read(MmioAddress(0), off, &mut [0u8; 4]),
                    }
                }
            }
            self.serve_wakers();
        }
        self.round_trip();
    }
}

/// The files a share starts with, and a file beside it that no request
/// may reach.
struct FsRig {
    dir: tempfile::TempDir,
    root: PathBuf,
    read_only: bool,
}

const OUTSIDE: &[u8] = b"outside the share\n";

/// Where the shares live: a tmpfs of SCRATCH_SIZE mounted nodev, nosuid
/// and noexec when the process may mount one, else the temporary
/// directory. The guest may FALLOCATE with KEEP_SIZE (past
/// RLIMIT_FSIZE) or MKNOD a block device as root: on the host's file
/// system a fuzzer's input could fill the disk or write to it.
fn scratch() -> &'static Path {
    SCRATCH.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("kvmrun-fuzz-fs")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let path = CString::new(dir.as_os_str().as_bytes()).expect("no NUL");
        let opts = CString::new(format!("size={SCRATCH_SIZE},mode=0700")).expect("no NUL");
        let flags = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC;
        // SAFETY: valid C strings; the result is checked.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                opts.as_ptr().cast(),
            )
        };
        if r == 0 {
            // SAFETY: a function without arguments that only unmounts.
            unsafe { libc::atexit(unmount_scratch) };
        } else {
            eprintln!(
                "virtio_fs: no tmpfs at {} ({}); shares on the host's file system",
                dir.display(),
                std::io::Error::last_os_error()
            );
        }
        dir
    })
}

static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
const SCRATCH_SIZE: u64 = 64 << 20;

extern "C" fn unmount_scratch() {
    if let Some(dir) = SCRATCH.get() {
        let path = CString::new(dir.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(dir);
    }
}

impl FsRig {
    fn new(read_only: bool) -> Self {
        let dir = tempfile::tempdir_in(scratch()).expect("a temporary directory");
        let root = dir.path().join("share");
        std::fs::create_dir_all(root.join("d/e")).expect("share directories");
        std::fs::write(root.join("f"), b"0123456789abcdef").expect("a file");
        std::fs::write(root.join("d/g"), vec![0x5a; 8192]).expect("a file");
        std::os::unix::fs::symlink("../outside", root.join("l")).expect("a symbolic link");
        std::fs::write(dir.path().join("outside"), OUTSIDE).expect("a file outside");
        FsRig {
            dir,
            root,
            read_only,
        }
    }

    /// Panic if anything outside the share changed.
    fn check_outside(&self) {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("the share's parent")
            .map(|e| e.expect("an entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["outside", "share"], "entries beside the share");
        let outside = std::fs::read(self.dir.path().join("outside")).expect("outside");
        assert_eq!(outside, OUTSIDE, "the file outside the share changed");
    }
}

impl Rig for FsRig {
    type Dev = Fs;

    fn device(&self) -> Fs {
        Fs::new(self.args())
    }

    /// A share of the directory, opened again for each restore as a
    /// restored VM opens it.
    fn args(&self) -> FsArgs {
        let share = Share::open(&self.root, self.read_only).expect("opening the share");
        FsArgs {
            tag: "fuzz".into(),
            share: Arc::new(share),
        }
    }

    fn features(&self) -> u32 {
        0
    }

    /// `struct fuse_in_header`'s len: the message's length.
    fn fix(&self, msg: &mut [u8]) {
        let len = msg.len() as u32;
        if let Some(h) = msg.get_mut(..4) {
            h.copy_from_slice(&len.to_le_bytes());
        }
    }

    fn host_event(&self, _input: &mut Input) {}
}

/// A port's output: counted, and full when the input says.
#[derive(Default)]
pub struct PortOut {
    bytes: AtomicU64,
    full: AtomicBool,
    waker: OnceLock<Arc<EventFd>>,
}

impl PortOut {
    fn waker_fd(&self) -> &Arc<EventFd> {
        self.waker
            .get_or_init(|| Arc::new(EventFd::new(EFD_NONBLOCK).expect("an event fd")))
    }

    fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::Relaxed);
        if !full {
            let _ = self.waker_fd().write(1);
        }
    }
}

impl PortSink for PortOut {
    fn has_room(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }
    fn put(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
    fn waker(&self) -> Option<Arc<EventFd>> {
        Some(self.waker_fd().clone())
    }
}

/// Three ports: "out" (output only), "io" (input and output) and
/// "none" (neither).
struct ConsoleRig {
    out: [Arc<PortOut>; 2],
    inbox: Arc<Inbox>,
    control_wake: Arc<EventFd>,
}

impl ConsoleRig {
    fn new() -> Self {
        ConsoleRig {
            out: [Arc::default(), Arc::default()],
            inbox: Inbox::new().expect("an inbox"),
            control_wake: Arc::new(EventFd::new(EFD_NONBLOCK).expect("an event fd")),
        }
    }
}

impl Rig for ConsoleRig {
    type Dev = Console;

    fn device(&self) -> Console {
        Console::new(self.args())
    }

    fn args(&self) -> ConsoleArgs {
        let port = |name: &str, output: Option<Arc<PortOut>>, input| PortSpec {
            name: name.into(),
            output: output.map(|o| o as Arc<dyn PortSink>),
            input,
        };
        ConsoleArgs {
            ports: vec![
                port("out", Some(self.out[0].clone()), None),
                port("io", Some(self.out[1].clone()), Some(self.inbox.clone())),
                port("none", None, None),
            ],
            control_wake: self.control_wake.clone(),
        }
    }

    fn features(&self) -> u32 {
        console::F_MULTIPORT as u32
    }

    fn fix(&self, _msg: &mut [u8]) {}

    /// A byte: bits 0-1 say what: 0 input for "io" (a length byte and
    /// that many bytes), 1 the end of its input, 2 and 3 an output
    /// (bit 2 which) full or with room again (bit 3).
    fn host_event(&self, input: &mut Input) {
        let e = input.u8();
        match e & 3 {
            0 => {
                let n = usize::from(input.u8());
                self.inbox.push(input.bytes(n));
            }
            1 => self.inbox.close(),
            _ => self.out[usize::from(e >> 2) & 1].set_full(e & 8 == 0),
        }
    }
}

/// Input: flag byte (bit 0 a read-only share), then a driver program
/// (`Driver::run`) for virtio-fs on virtio-mmio over a fresh share: a
/// directory, a subdirectory, two files and a symbolic link out of it.
/// Queue 0 is hiprio, 1 the request queue; `Rig::fix` sets
/// `struct fuse_in_header`'s len. Anything that changes beside the share
/// is a bug.
pub fn virtio_fs(data: &[u8]) {
    let mut input = Input::new(data);
    let rig = FsRig::new(input.u8() & 1 != 0);
    let mut d = Driver::new(rig);
    d.run(&mut input);
    d.rig.check_outside();
}

/// Input: a driver program (`Driver::run`) for the multiport
/// virtio-console on virtio-mmio with three ports: control messages on
/// queue 3, output on the transmit queues, receive buffers for the
/// input port, ports that do not exist, resets mid-traffic.
pub fn virtio_console(data: &[u8]) {
    let mut input = Input::new(data);
    let mut d = Driver::new(ConsoleRig::new());
    d.run(&mut input);
}
