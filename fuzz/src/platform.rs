//! The PCI and virtio inputs a guest controls: configuration space
//! through 0xCF8/0xCFC and ECAM with a virtio-pci device behind it, and
//! virtio descriptor chains in guest memory the input fills.

use std::sync::{Arc, Mutex, OnceLock};

use devices::pci::{HostBridge, PciConfigIo, PciConfigMmio, PciDevice, PciRoot};
use devices::virtio::blk::{Blk, Disk, DiskMode};
use devices::virtio::mmio::{self, VirtioMmio};
use devices::virtio::pci::{self as vpci, VirtioPci};
use devices::virtio::rng::Rng;
use devices::virtio::{
    QueueNotify, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use devices::Persist;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{fakes, Input};

/// Guest memory of the targets: small, so addresses from the input land
/// in it often, and past it as often as the input likes.
pub(crate) const MEM_SIZE: u64 = 64 << 10;
/// ECAM of bus 0.
const ECAM_SIZE: u64 = 1 << 20;
const WIDTHS: [usize; 8] = [1, 2, 4, 8, 3, 0, 16, 1];

pub(crate) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory")
}

type Shared = Arc<Mutex<VirtioPci<Rng>>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The root bus with the host bridge at 00:00.0 and virtio-rng at 00:01.0.
struct Pci {
    root: Arc<PciRoot>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    rng: Shared,
    mem: GuestMemoryMmap,
}

impl Pci {
    fn new(mem: GuestMemoryMmap) -> Self {
        let root = Arc::new(PciRoot::new(fakes::bar_host()));
        assert!(root.add(0, Arc::new(Mutex::new(HostBridge::new()))));
        let rng = Arc::new(Mutex::new(VirtioPci::new(
            Rng::new(),
            mem.clone(),
            fakes::msi(),
            fakes::irq(),
            17,
        )));
        assert!(root.add(1, rng.clone()));
        Pci {
            io: PciConfigIo::new(root.clone()),
            ecam: PciConfigMmio::new(root.clone()),
            root,
            rng,
            mem,
        }
    }

    /// Save the configuration mechanism and the device, send both
    /// through postcard as a snapshot does, and put the restored ones in
    /// their places; every state they reach must restore.
    fn round_trip(&mut self) {
        self.io = through(&self.io, self.root.clone());
        self.ecam = through(&self.ecam, self.root.clone());
        let args = (self.mem.clone(), fakes::msi(), fakes::irq(), 17, ());
        let rng = Arc::new(Mutex::new(through(&*lock(&self.rng), args)));
        self.root.remove(1);
        assert!(self.root.add(1, rng.clone()));
        self.rng = rng;
    }
}

pub(crate) fn through<D: Persist>(dev: &D, args: D::Args) -> D
where
    D::Error: std::fmt::Debug,
{
    let bytes = postcard::to_stdvec(&dev.save()).expect("encoding a saved state");
    let state: D::State = postcard::from_bytes(&bytes).expect("decoding a saved state");
    D::restore(args, &state).expect("restoring a state the device saved")
}

/// Input: a sequence of operations, each a byte of kind and width
/// (bits 0-2 kind, 3-5 width), a 32-bit offset, and for writes `width`
/// bytes of value. Kinds: 0/1 read/write 0xCF8-0xCFF, 2/3 read/write
/// ECAM, 4/5 read/write the virtio function's BAR 0 (common, ISR,
/// device, notify, MSI-X table and PBA), 6 a queue notification as the
/// ioeventfd delivers it, 7 a snapshot round trip. Guest memory is
/// zeros, so rings the guest programs point at zeros or outside it.
pub fn pci_config(data: &[u8]) {
    let mut input = Input::new(data);
    let mut pci = Pci::new(memory());
    let mut buf = [0u8; 16];
    while !input.is_empty() {
        let op = input.u8();
        let width = WIDTHS[usize::from(op >> 3) & 7];
        let offset = u64::from(input.u32());
        buf.fill(0xa5);
        match op & 7 {
            0 => pci
                .io
                .pio_read(PioAddress(0xcf8), (offset % 8) as u16, &mut buf[..width]),
            1 => {
                let v = input.bytes(width);
                pci.io.pio_write(PioAddress(0xcf8), (offset % 8) as u16, v);
            }
            2 => pci.ecam.mmio_read(
                MmioAddress(0xe000_0000),
                offset % ECAM_SIZE,
                &mut buf[..width],
            ),
            3 => {
                let v = input.bytes(width);
                pci.ecam
                    .mmio_write(MmioAddress(0xe000_0000), offset % ECAM_SIZE, v);
            }
            4 => lock(&pci.rng).read_bar(vpci::BAR, offset % vpci::BAR_SIZE, &mut buf[..width]),
            5 => {
                let v = input.bytes(width);
                lock(&pci.rng).write_bar(vpci::BAR, offset % vpci::BAR_SIZE, v);
            }
            6 => lock(&pci.rng).notify(offset as u16 % 2),
            _ => pci.round_trip(),
        }
    }
    pci.round_trip();
}

fn wr<D: VirtioDevice>(t: &mut VirtioMmio<D>, off: u64, v: u32) {
    t.mmio_write(MmioAddress(0), off, &v.to_le_bytes());
}

/// Input: flags (bit 0: negotiate features properly; bit 1: notify
/// through the register rather than as the ioeventfd does), the queue
/// size, the descriptor table, available and used ring addresses (each
/// 32 bits, taken modulo twice the memory size so that half land
/// outside), the number of notifications, then guest memory from
/// address 0: descriptors, rings and buffers as the input lays them out
/// (loops, addresses past memory, wrong directions, lengths past the
/// end, indexes beyond the queue). The device is virtio-rng on
/// virtio-mmio, brought up as a driver does; chains are popped with
/// virtio-queue and served as the VMM serves them. Between
/// notifications the device goes through a snapshot round trip.
pub fn virtio_chain(data: &[u8]) {
    drive_chains(data, Rng::new(), ());
}

/// `virtio_chain` with virtio-blk on a 1 MiB disk: flag bit 2 makes it
/// read-only, bit 3 a snapshot-mode disk (writes to the overlay). The
/// same descriptor chains meet request headers, sectors and segment
/// lists from the input.
pub fn virtio_blk(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let disk = match (flags & 4 != 0, flags & 8 != 0) {
        (true, _) => &disks().ro,
        (false, true) => &disks().snapshot,
        (false, false) => &disks().rw,
    };
    drive_chains(data, Blk::new(disk.clone()), disk.clone());
}

/// A disk for the targets that restore one from a state: read-write as
/// the guest sees it, without writing the image.
pub fn fuzz_disk() -> Arc<Disk> {
    disks().snapshot.clone()
}

/// One image of each mode, made once per process and kept open (a
/// read-write image is locked against every other open).
struct Disks {
    _dir: tempfile::TempDir,
    rw: Arc<Disk>,
    ro: Arc<Disk>,
    snapshot: Arc<Disk>,
}

fn disks() -> &'static Disks {
    static DISKS: OnceLock<Disks> = OnceLock::new();
    DISKS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let open = |name: &str, read_only, snapshot| {
            let path = dir.path().join(name);
            // 2048 sectors, as the blk guest's disks whose states seed
            // snapshot_state.
            std::fs::write(&path, vec![0x5a; 1 << 20]).expect("a disk image");
            let mode = DiskMode {
                read_only,
                snapshot,
            };
            Arc::new(Disk::open(&path, mode).expect("opening a disk image"))
        };
        Disks {
            rw: open("rw.img", false, false),
            ro: open("ro.img", true, false),
            snapshot: open("snapshot.img", false, true),
            _dir: dir,
        }
    })
}

/// Bring device `dev` up on virtio-mmio as the input says and notify
/// it, through a snapshot round trip after each notification.
fn drive_chains<D>(data: &[u8], dev: D, args: D::Args)
where
    D: VirtioDevice + Persist,
    D::Args: Clone,
    D::Error: std::fmt::Debug,
{
    let mut input = Input::new(data);
    let flags = input.u8();
    let size = u32::from(input.u16());
    let rings = [input.u32(), input.u32(), input.u32()].map(|a| u64::from(a) % (2 * MEM_SIZE));
    let notifications = input.u8() % 8 + 1;
    let image = input.rest();
    let mem = memory();
    let n = image.len().min(MEM_SIZE as usize);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("guest memory image");

    let mut t = VirtioMmio::new(dev, mem.clone(), fakes::irq(), 20);
    wr(&mut t, 0x70, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER));
    if flags & 1 != 0 {
        // VIRTIO_F_VERSION_1, in the high word.
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
    }
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    wr(&mut t, 0x70, u32::from(ok));
    wr(&mut t, 0x30, 0);
    wr(&mut t, 0x38, size);
    for (off, a) in [0x80u64, 0x90, 0xa0].into_iter().zip(rings) {
        wr(&mut t, off, a as u32);
        wr(&mut t, off + 4, (a >> 32) as u32);
    }
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, u32::from(ok | STATUS_DRIVER_OK));
    for _ in 0..notifications {
        if flags & 2 != 0 {
            wr(&mut t, mmio::QUEUE_NOTIFY, 0);
        } else {
            t.notify(0);
        }
        t = through(&t, (mem.clone(), fakes::irq(), 20, args.clone()));
    }
}
