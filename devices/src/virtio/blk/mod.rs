//! virtio-blk (virtio 1.2, "Block Device", device ID 2) on a raw image
//! file: one request queue; IN, OUT, FLUSH, GET_ID, DISCARD and
//! WRITE_ZEROES. The disk (`disk.rs`) is opened and locked by the VMM
//! before the guest starts and handed in; requests are parsed and served
//! in `request.rs`. A malformed request is answered with IOERR (UNSUPP
//! for an unknown type), logged once, and the next one is served as
//! usual.

pub mod disk;
pub mod overlay;
pub mod request;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::*;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{serve_request, serve_ring, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{Persist, RestoreError};
pub use disk::{Disk, DiskError, DiskMode, SECTOR_SIZE};
use request::{ID_LEN, MAX_ZERO_SECTORS, MAX_ZERO_SEGS, SEG_MAX};

pub const DEVICE_TYPE: u32 = 2;
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of `struct virtio_blk_config` up to the write-zeroes fields.
const CONFIG_SIZE: usize = 60;

pub struct Blk {
    disk: Arc<Disk>,
    config: [u8; CONFIG_SIZE],
    id: [u8; ID_LEN],
    /// Malformed requests seen; the first is logged.
    bad_requests: u64,
}

impl Blk {
    pub fn new(disk: Arc<Disk>) -> Self {
        let config = config_space(&disk);
        let id = id_of(&disk);
        Blk {
            disk,
            config,
            id,
            bad_requests: 0,
        }
    }

    /// Serve the next available request; false if there was none or it
    /// could not be returned.
    fn serve_one(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_request(queue, mem, "virtio-blk", |r| {
            let out = request::serve(&self.disk, &self.id, &r.descs, r.ended, mem);
            if let Some(e) = out.error {
                if self.bad_requests == 0 {
                    log::warn!(
                        "virtio-blk {}: request {} failed: {e}",
                        self.disk.path().display(),
                        r.head
                    );
                }
                self.bad_requests += 1;
            }
            out.used
        })
    }
}

/// `struct virtio_blk_config`, little-endian, for the offered features.
fn config_space(disk: &Disk) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(0, &disk.sectors().to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(34, &1u16.to_le_bytes());
    put(36, &MAX_ZERO_SECTORS.to_le_bytes());
    put(40, &MAX_ZERO_SEGS.to_le_bytes());
    put(44, &1u32.to_le_bytes());
    put(48, &MAX_ZERO_SECTORS.to_le_bytes());
    put(52, &MAX_ZERO_SEGS.to_le_bytes());
    put(56, &[1]);
    c
}

/// The serial GET_ID returns: the image's file name, cut to 20 bytes.
fn id_of(disk: &Disk) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    let name = disk
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = name.len().min(ID_LEN);
    id[..n].copy_from_slice(&name.as_bytes()[..n]);
    id
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ];
        let ro = match self.disk.mode().read_only {
            true => 1 << VIRTIO_BLK_F_RO,
            false => 0,
        };
        bits.iter()
            .fold(VIRTIO_F_VERSION_1 | ro, |f, &b| f | 1 << b)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get(o..))
        else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_ring(queue, |q| self.serve_one(q, mem))
    }
}

/// What a restore checks the reopened disk against: the guest has read
/// the capacity and the features.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    pub sectors: u64,
    pub read_only: bool,
}

impl Persist for Blk {
    type State = BlkState;
    /// The disk, opened again from the VM's configuration.
    type Args = Arc<Disk>;
    type Error = RestoreError;

    fn save(&self) -> BlkState {
        BlkState {
            sectors: self.disk.sectors(),
            read_only: self.disk.mode().read_only,
        }
    }

    fn restore(disk: Arc<Disk>, s: &BlkState) -> Result<Self, RestoreError> {
        let bad = |reason: String| RestoreError::Invalid {
            device: "virtio-blk",
            reason,
        };
        if disk.sectors() != s.sectors {
            return Err(bad(format!(
                "{}: {} sectors saved, the file now has {}",
                disk.path().display(),
                s.sectors,
                disk.sectors()
            )));
        }
        if disk.mode().read_only != s.read_only {
            return Err(bad(format!(
                "{}: saved read-only {}, now {}",
                disk.path().display(),
                s.read_only,
                disk.mode().read_only
            )));
        }
        Ok(Blk::new(disk))
    }
}

#[cfg(test)]
mod tests;
