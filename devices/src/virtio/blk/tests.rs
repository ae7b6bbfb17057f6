use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::memory;

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const HDR: u64 = 0x8000;
const DATA: u64 = 0x9000;
const STATUS: u64 = 0xf_0000;
const SECTORS: u64 = 64;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A disk image of SECTORS sectors, sector n filled with byte n.
fn image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut f = std::fs::File::create(&path).unwrap();
    for s in 0..SECTORS {
        f.write_all(&[s as u8; 512]).unwrap();
    }
    (dir, path)
}

fn blk(path: &std::path::Path, mode: DiskMode) -> Blk {
    Blk::new(Arc::new(Disk::open(path, mode).unwrap()))
}

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

/// Offer `chain` and run the device once: the used length and the status
/// byte (0xff if none was written).
fn run(b: &mut Blk, mem: &GuestMemoryMmap, chain: &[RawDescriptor]) -> (u32, u8) {
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(chain, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(b.process_queue(0, &mut q, mem));
    let used = mock.used().ring().ref_at(0).unwrap().load();
    (used.len(), mem.read_obj(GuestAddress(STATUS)).unwrap())
}

/// A well-formed request of `kind` at `sector` with one data buffer.
fn request(b: &mut Blk, mem: &GuestMemoryMmap, kind: u32, sector: u64, len: u32) -> (u32, u8) {
    header(mem, kind, sector);
    let dir = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => WRITE,
        _ => 0,
    };
    run(
        b,
        mem,
        &[
            desc(HDR, 16, NEXT, 1),
            desc(DATA, len, dir | NEXT, 2),
            desc(STATUS, 1, WRITE, 0),
        ],
    )
}

fn sector_of(path: &std::path::Path, s: u64) -> Vec<u8> {
    std::fs::read(path).unwrap()[(s * 512) as usize..][..512].to_vec()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_and_writes_sectors() {
    let (_d, path) = image();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_IN, 3, 1024), (1025, OK));
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(&got[..512], &[3u8; 512][..]);
    assert_eq!(&got[512..], &[4u8; 512][..]);
    mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_OUT, 7, 512), (1, OK));
    assert_eq!(sector_of(&path, 7), vec![0x5a; 512]);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
}

#[test]
fn config_and_features_describe_the_disk() {
    let (_d, path) = image();
    let b = blk(&path, DiskMode::default());
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut far = [1u8; 4];
    b.read_config(0x1000, &mut far);
    assert_eq!(far, [0; 4]);
    assert_eq!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
    drop(b);
    let ro = blk(
        &path,
        DiskMode {
            read_only: true,
            snapshot: false,
        },
    );
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(ro.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
}

#[test]
fn get_id_names_the_file() {
    let (_d, path) = image();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_GET_ID, 0, 20), (21, OK));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..8], b"disk.img");
    assert_eq!(&id[8..], &[0; 12]);
}

fn segment(mem: &GuestMemoryMmap, sector: u64, count: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&count.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(DATA)).unwrap();
}

#[test]
fn discard_and_write_zeroes_read_as_zeros() {
    let (_d, path) = image();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    segment(&mem, 8, 16, 0);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 16), (1, OK));
    segment(&mem, 30, 2, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16),
        (1, OK)
    );
    segment(&mem, 40, 1, 0);
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16),
        (1, OK)
    );
    for s in (8..24).chain(30..32).chain(40..41) {
        assert_eq!(sector_of(&path, s), vec![0; 512], "sector {s}");
    }
    assert_eq!(sector_of(&path, 7), vec![7; 512]);
    assert_eq!(sector_of(&path, 24), vec![24; 512]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SECTORS * 512);
    // Discard takes no flags; beyond the end is an error.
    segment(&mem, 0, 1, 1);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 16).1, UNSUPP);
    segment(&mem, SECTORS - 1, 2, 0);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 16).1, IOERR);
    // Two segments, more than offered; a partial one.
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 32).1, IOERR);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 8).1, IOERR);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let (_d, path) = image();
    let before = std::fs::read(&path).unwrap();
    let mem = memory();
    let mode = DiskMode {
        read_only: true,
        snapshot: false,
    };
    let mut b = blk(&path, mode);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_OUT, 0, 512).1, IOERR);
    segment(&mem, 0, 1, 0);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 16).1, IOERR);
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_WRITE_ZEROES, 0, 16).1,
        IOERR
    );
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_IN, 0, 512).1, OK);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn snapshot_mode_writes_to_the_overlay_only() {
    let (_d, path) = image();
    let before = std::fs::read(&path).unwrap();
    let mem = memory();
    let mode = DiskMode {
        read_only: false,
        snapshot: true,
    };
    let mut b = blk(&path, mode);
    // A sector in the middle of a block, then the block's neighbours
    // must still read from the image.
    mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_OUT, 9, 512).1, OK);
    segment(&mem, 20, 3, 0);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_DISCARD, 0, 16).1, OK);
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_IN, 8, 512 * 16).1, OK);
    let mut got = vec![0u8; 512 * 16];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    for (i, s) in got.chunks(512).enumerate() {
        let sector = 8 + i as u8;
        let want = match sector {
            9 => 0xee,
            20..=22 => 0,
            s => s,
        };
        assert_eq!(s, &[want; 512][..], "sector {sector}");
    }
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_FLUSH, 0, 0).1, OK);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn malformed_chains_get_ioerr() {
    let (_d, path) = image();
    let before = std::fs::read(&path).unwrap();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // Too short: a status byte alone.
    assert_eq!(run(&mut b, &mem, &[desc(STATUS, 1, WRITE, 0)]), (1, IOERR));
    // A header shorter than 16 bytes, and a write-only header.
    let short = [desc(HDR, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
    assert_eq!(run(&mut b, &mem, &short), (1, IOERR));
    let wo = [desc(HDR, 16, WRITE | NEXT, 1), desc(STATUS, 1, WRITE, 0)];
    assert_eq!(run(&mut b, &mem, &wo), (1, IOERR));
    // A read into a device-readable buffer; a write from a writable one.
    let wrong = [
        desc(HDR, 16, NEXT, 1),
        desc(DATA, 512, NEXT, 2),
        desc(STATUS, 1, WRITE, 0),
    ];
    assert_eq!(run(&mut b, &mem, &wrong), (1, IOERR));
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let wrong = [
        desc(HDR, 16, NEXT, 1),
        desc(DATA, 512, WRITE | NEXT, 2),
        desc(STATUS, 1, WRITE, 0),
    ];
    assert_eq!(run(&mut b, &mem, &wrong), (1, IOERR));
    // Beyond the end, overflowing sector numbers, parts of sectors.
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_IN, SECTORS, 512).1,
        IOERR
    );
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_OUT, SECTORS - 1, 1024).1,
        IOERR
    );
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_IN, u64::MAX / 4, 512).1,
        IOERR
    );
    assert_eq!(request(&mut b, &mem, VIRTIO_BLK_T_IN, 0, 100).1, IOERR);
    // Huge lengths: beyond guest memory and beyond the disk.
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_IN, 0, 0xffff_fe00).1,
        IOERR
    );
    assert_eq!(
        request(&mut b, &mem, VIRTIO_BLK_T_OUT, 0, 0xffff_fe00).1,
        IOERR
    );
    // Unknown types.
    assert_eq!(request(&mut b, &mem, 0x7777, 0, 512).1, UNSUPP);
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn chains_without_a_status_byte_are_returned_untouched() {
    let (_d, path) = image();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    header(&mem, VIRTIO_BLK_T_IN, 0);
    // The last descriptor is readable; a status outside memory.
    assert_eq!(run(&mut b, &mem, &[desc(HDR, 16, 0, 0)]), (0, 0xff));
    let far = [desc(HDR, 16, NEXT, 1), desc(0xff_ffff_0000, 1, WRITE, 0)];
    assert_eq!(run(&mut b, &mem, &far), (0, 0xff));
    // A loop: 0 -> 1 -> 0, longer than the queue; a bad next index.
    let looped = [desc(HDR, 16, NEXT, 1), desc(STATUS, 1, WRITE | NEXT, 0)];
    assert_eq!(run(&mut b, &mem, &looped), (0, 0xff));
    let bad_next = [desc(HDR, 16, NEXT, 999)];
    assert_eq!(run(&mut b, &mem, &bad_next), (0, 0xff));
}

#[test]
fn a_bad_request_does_not_stop_the_next() {
    let (_d, path) = image();
    let mem = memory();
    let mut b = blk(&path, DiskMode::default());
    header(&mem, VIRTIO_BLK_T_IN, 1);
    let mock = MockSplitQueue::new(&mem, 16);
    mock.add_desc_chains(
        &[
            desc(HDR, 16, 0, 0),
            desc(HDR, 16, NEXT, 2),
            desc(DATA, 512, WRITE | NEXT, 3),
            desc(STATUS, 1, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(b.process_queue(0, &mut q, &mem));
    assert_eq!(q.next_used(), 2);
    assert_eq!(mock.used().ring().ref_at(1).unwrap().load().len(), 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
}

#[test]
fn open_errors_name_the_file_and_the_problem() {
    let (dir, path) = image();
    let err = |p: &std::path::Path, m| Disk::open(p, m).err().unwrap().to_string();
    let missing = dir.path().join("none.img");
    assert!(err(&missing, DiskMode::default()).contains("none.img: cannot open: No such file"));
    assert!(err(dir.path(), DiskMode::default()).contains("is a directory"));
    let ro = DiskMode {
        read_only: true,
        snapshot: false,
    };
    assert!(err(dir.path(), ro).contains("is a directory"));
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    assert!(err(&empty, DiskMode::default()).contains("less than one 512-byte sector"));
    // A read-write disk excludes everyone; shared locks share.
    let held = Disk::open(&path, DiskMode::default()).unwrap();
    let e = err(&path, DiskMode::default());
    assert!(e.contains("disk.img: locked by another process"), "{e}");
    assert!(e.contains("one VM at a time"), "{e}");
    assert!(err(&path, ro).contains("another VM uses it read-write"));
    drop(held);
    let a = Disk::open(&path, ro).unwrap();
    let snap = DiskMode {
        read_only: false,
        snapshot: true,
    };
    let b = Disk::open(&path, snap).unwrap();
    assert!(err(&path, DiskMode::default()).contains("one VM at a time"));
    drop((a, b));
}

#[test]
fn state_round_trips_and_checks_the_disk() {
    let (_d, path) = image();
    let b = blk(&path, DiskMode::default());
    let s = b.save();
    assert_eq!(s.sectors, SECTORS);
    drop(b);
    let disk = Arc::new(Disk::open(&path, DiskMode::default()).unwrap());
    assert_eq!(Blk::restore(disk.clone(), &s).unwrap().save(), s);
    let other = BlkState {
        sectors: SECTORS + 1,
        read_only: false,
    };
    let e = Blk::restore(disk, &other).err().unwrap().to_string();
    assert!(e.contains("65 sectors saved, the file now has 64"), "{e}");
}
