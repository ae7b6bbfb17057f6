//! One virtio-blk request (virtio 1.2, "Device Operation"): a header the
//! device reads (type, reserved, sector), data buffers, and a status byte
//! the device writes last. The header is taken from the first descriptor
//! and the status from the last byte of the last one, as every driver
//! lays them out.
//!
//! Every check is made before the disk is touched: a request the device
//! cannot serve is answered with IOERR (or UNSUPP for an unknown type or
//! flag), and one without a status byte to answer in is returned with
//! nothing written.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::disk::{Disk, SECTOR_SIZE};

/// Most data buffers in one request (offered as seg_max).
pub const SEG_MAX: u32 = 254;
/// Most sectors of one discard or write-zeroes segment (2 GiB).
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;
/// Segments of one discard or write-zeroes request.
pub const MAX_ZERO_SEGS: u32 = 1;
/// Bytes of the ID GET_ID returns.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most bytes moved between the disk and guest memory at once.
const CHUNK: usize = 128 << 10;
const HEADER: u32 = 16;
const SEGMENT: u64 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(
        "the chain does not end (a loop, a bad next index or more descriptors than the queue)"
    )]
    Unterminated,
    #[error("the last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("no device-readable 16-byte header in the first descriptor")]
    Header,
    #[error("{0} data buffers, at most {SEG_MAX}")]
    TooManySegments(usize),
    #[error("data buffer {0} has the wrong direction for the request")]
    Direction(usize),
    #[error("data buffer {0} is outside guest memory")]
    OutOfMemory(usize),
    #[error("{0} data bytes, not whole sectors")]
    Unaligned(u64),
    #[error("sectors {sector}+{bytes} bytes are beyond the disk's end")]
    Beyond { sector: u64, bytes: u64 },
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("a malformed discard or write-zeroes segment list")]
    Segments,
    #[error("unsupported request type {0}")]
    Type(u32),
    #[error("unsupported segment flags {0:#x}")]
    Flags(u32),
    #[error("host I/O error: {0}")]
    Io(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Type(_) | RequestError::Flags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

fn io(e: std::io::Error) -> RequestError {
    RequestError::Io(e.to_string())
}

/// What serving a request came to: bytes written to device-writable
/// buffers (the used length) and the error, if any.
pub struct Outcome {
    pub used: u32,
    pub error: Option<RequestError>,
}

/// Serve the request in `descs` (the chain as read, `ended` if its last
/// descriptor has no next) on `disk`.
pub fn serve(
    disk: &Disk,
    id: &[u8; ID_LEN],
    descs: &[Descriptor],
    ended: bool,
    mem: &GuestMemoryMmap,
) -> Outcome {
    let fail = |error| Outcome {
        used: 0,
        error: Some(error),
    };
    let Some(last) = descs.last().filter(|_| ended) else {
        return fail(RequestError::Unterminated);
    };
    if !last.is_write_only() || last.len() == 0 {
        return fail(RequestError::NoStatus);
    }
    let Some(status_at) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return fail(RequestError::NoStatus);
    };
    let (written, result) = match descs.len() {
        1 => (0, Err(RequestError::Header)),
        n => execute(disk, id, &descs[0], &descs[1..n - 1], mem),
    };
    let status = match &result {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => e.status(),
    };
    if mem.write_obj(status, status_at).is_err() {
        return fail(RequestError::NoStatus);
    }
    Outcome {
        used: written.saturating_add(1),
        error: result.err(),
    }
}

/// Run the request; the data bytes written to the guest, and the result.
fn execute(
    disk: &Disk,
    id: &[u8; ID_LEN],
    head: &Descriptor,
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> (u32, Result<(), RequestError>) {
    let header = match read_header(head, mem) {
        Ok(h) => h,
        Err(e) => return (0, Err(e)),
    };
    let (kind, sector) = header;
    if data.len() > SEG_MAX as usize {
        return (0, Err(RequestError::TooManySegments(data.len())));
    }
    let to_guest = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let known = matches!(
        kind,
        VIRTIO_BLK_T_IN
            | VIRTIO_BLK_T_OUT
            | VIRTIO_BLK_T_FLUSH
            | VIRTIO_BLK_T_GET_ID
            | VIRTIO_BLK_T_DISCARD
            | VIRTIO_BLK_T_WRITE_ZEROES
    );
    if !known {
        return (0, Err(RequestError::Type(kind)));
    }
    if let Err(e) = check_buffers(data, to_guest, mem) {
        return (0, Err(e));
    }
    match kind {
        VIRTIO_BLK_T_IN => read(disk, sector, data, mem),
        VIRTIO_BLK_T_OUT => (0, write(disk, sector, data, mem)),
        VIRTIO_BLK_T_FLUSH => (0, disk.flush().map_err(io)),
        VIRTIO_BLK_T_GET_ID => get_id(id, data, mem),
        _ => (0, zero(disk, kind == VIRTIO_BLK_T_DISCARD, data, mem)),
    }
}

/// The request type and sector.
fn read_header(head: &Descriptor, mem: &GuestMemoryMmap) -> Result<(u32, u64), RequestError> {
    if head.is_write_only() || head.len() < HEADER {
        return Err(RequestError::Header);
    }
    let mut h = [0u8; HEADER as usize];
    mem.read_slice(&mut h, head.addr())
        .map_err(|_| RequestError::Header)?;
    let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    Ok((kind, sector))
}

/// Every data buffer goes the request's way and lies in guest memory.
fn check_buffers(
    data: &[Descriptor],
    to_guest: bool,
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    for (i, d) in data.iter().enumerate() {
        if d.is_write_only() != to_guest {
            return Err(RequestError::Direction(i));
        }
        let access = match to_guest {
            true => Permissions::Write,
            false => Permissions::Read,
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::OutOfMemory(i));
        }
    }
    Ok(())
}

/// The byte range of the disk `data` covers from `sector`, checked.
fn range(disk: &Disk, sector: u64, data: &[Descriptor]) -> Result<u64, RequestError> {
    let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if !bytes.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::Unaligned(bytes));
    }
    match sector.checked_mul(SECTOR_SIZE) {
        Some(off) if disk.contains(off, bytes) => Ok(off),
        _ => Err(RequestError::Beyond { sector, bytes }),
    }
}

/// Each buffer in `data` with its disk offset, in chunks of at most CHUNK.
fn chunks(
    offset: u64,
    data: &[Descriptor],
) -> impl Iterator<Item = (GuestAddress, u64, usize)> + '_ {
    let mut at = offset;
    data.iter().flat_map(move |d| {
        let start = at;
        at += u64::from(d.len());
        (0..u64::from(d.len())).step_by(CHUNK).map(move |o| {
            let n = (u64::from(d.len()) - o).min(CHUNK as u64) as usize;
            (GuestAddress(d.addr().0 + o), start + o, n)
        })
    })
}

fn read(
    disk: &Disk,
    sector: u64,
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> (u32, Result<(), RequestError>) {
    let offset = match range(disk, sector, data) {
        Ok(o) => o,
        Err(e) => return (0, Err(e)),
    };
    let mut buf = Vec::new();
    let mut written = 0u32;
    for (addr, off, n) in chunks(offset, data) {
        buf.resize(n, 0);
        if let Err(e) = disk.read(&mut buf, off) {
            return (written, Err(io(e)));
        }
        if mem.write_slice(&buf, addr).is_err() {
            return (written, Err(RequestError::OutOfMemory(0)));
        }
        written = written.saturating_add(n as u32);
    }
    (written, Ok(()))
}

fn write(
    disk: &Disk,
    sector: u64,
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    if disk.mode().read_only {
        return Err(RequestError::ReadOnly);
    }
    let offset = range(disk, sector, data)?;
    let mut buf = Vec::new();
    for (addr, off, n) in chunks(offset, data) {
        buf.resize(n, 0);
        mem.read_slice(&mut buf, addr)
            .map_err(|_| RequestError::OutOfMemory(0))?;
        disk.write(&buf, off).map_err(io)?;
    }
    Ok(())
}

fn get_id(
    id: &[u8; ID_LEN],
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> (u32, Result<(), RequestError>) {
    let Some(d) = data.first() else {
        return (0, Err(RequestError::Segments));
    };
    let n = (d.len() as usize).min(ID_LEN);
    match mem.write_slice(&id[..n], d.addr()) {
        Ok(()) => (n as u32, Ok(())),
        Err(_) => (0, Err(RequestError::OutOfMemory(0))),
    }
}

/// DISCARD or WRITE_ZEROES: a list of (sector, sectors, flags) segments.
fn zero(
    disk: &Disk,
    discard: bool,
    data: &[Descriptor],
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    if disk.mode().read_only {
        return Err(RequestError::ReadOnly);
    }
    let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
    if bytes == 0 || !bytes.is_multiple_of(SEGMENT) || bytes / SEGMENT > u64::from(MAX_ZERO_SEGS) {
        return Err(RequestError::Segments);
    }
    let mut list = Vec::with_capacity(bytes as usize);
    for d in data {
        let at = list.len();
        list.resize(at + d.len() as usize, 0);
        mem.read_slice(&mut list[at..], d.addr())
            .map_err(|_| RequestError::Segments)?;
    }
    for seg in list.chunks_exact(SEGMENT as usize) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
        let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
        // Discard takes no flags; write-zeroes takes "unmap".
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(RequestError::Flags(flags));
        }
        if count > MAX_ZERO_SECTORS {
            return Err(RequestError::Segments);
        }
        let len = u64::from(count) * SECTOR_SIZE;
        let off = sector
            .checked_mul(SECTOR_SIZE)
            .filter(|&o| disk.contains(o, len))
            .ok_or(RequestError::Beyond { sector, bytes: len })?;
        let unmap = discard || flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        disk.zero(off, len, unmap).map_err(io)?;
    }
    Ok(())
}
