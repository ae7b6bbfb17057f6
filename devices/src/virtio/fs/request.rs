//! One virtio-fs request (virtio 1.2, "File System Device", "Device
//! Operation"): a FUSE request in the device-readable buffers, then room
//! for the reply in the device-writable ones. The request is copied out
//! of guest memory into one host buffer and the reply copied back, so the
//! FUSE server never sees guest memory (see `share.rs`).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::share::MAX_MESSAGE;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error(
        "the chain does not end (a loop, a bad next index or more descriptors than the queue)"
    )]
    Unterminated,
    #[error("descriptor {0} is device-readable after a device-writable one")]
    Order(usize),
    #[error("{0} request bytes, at most {MAX_MESSAGE}")]
    TooLong(u64),
    #[error("descriptor {0} is outside guest memory")]
    OutOfMemory(usize),
    #[error("no device-readable request")]
    Empty,
}

/// A request read out of its chain, and where its reply goes.
#[derive(Debug)]
pub struct Request {
    pub bytes: Vec<u8>,
    pub reply_to: Vec<Descriptor>,
    /// Room for the reply, at most MAX_MESSAGE.
    pub reply_cap: usize,
}

/// Read the request in `descs` (the chain as read, `ended` if its last
/// descriptor has no next). Nothing is allocated before the lengths and
/// places are checked.
pub fn read(
    descs: &[Descriptor],
    ended: bool,
    mem: &GuestMemoryMmap,
) -> Result<Request, ChainError> {
    if !ended {
        return Err(ChainError::Unterminated);
    }
    let split = descs
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    if let Some(i) = writable.iter().position(|d| !d.is_write_only()) {
        return Err(ChainError::Order(split + i));
    }
    let total: u64 = readable.iter().map(|d| u64::from(d.len())).sum();
    if total == 0 {
        return Err(ChainError::Empty);
    }
    if total > MAX_MESSAGE as u64 {
        return Err(ChainError::TooLong(total));
    }
    for (i, d) in descs.iter().enumerate() {
        let access = match d.is_write_only() {
            true => Permissions::Write,
            false => Permissions::Read,
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(ChainError::OutOfMemory(i));
        }
    }
    let mut bytes = vec![0u8; total as usize];
    let mut at = 0;
    for (i, d) in readable.iter().enumerate() {
        let n = d.len() as usize;
        mem.read_slice(&mut bytes[at..at + n], d.addr())
            .map_err(|_| ChainError::OutOfMemory(i))?;
        at += n;
    }
    let room: u64 = writable.iter().map(|d| u64::from(d.len())).sum();
    Ok(Request {
        bytes,
        reply_to: writable.to_vec(),
        reply_cap: room.min(MAX_MESSAGE as u64) as usize,
    })
}

/// Copy `reply` into the writable buffers; the bytes written (the used
/// length).
pub fn write(reply: &[u8], to: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
    let mut left = reply;
    let mut written = 0u32;
    for d in to {
        if left.is_empty() {
            break;
        }
        let n = left.len().min(d.len() as usize);
        if mem
            .write_slice(&left[..n], GuestAddress(d.addr().0))
            .is_err()
        {
            break;
        }
        written = written.saturating_add(n as u32);
        left = &left[n..];
    }
    written
}
