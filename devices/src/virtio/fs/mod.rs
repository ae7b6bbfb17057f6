//! virtio-fs (virtio 1.2, "File System Device", device ID 26): a host
//! directory the guest mounts with `mount -t virtiofs TAG DIR`. Two
//! queues, hiprio (FORGET and INTERRUPT) and one request queue, both
//! served the same way: the FUSE request is copied out of the chain
//! (`request.rs`), answered by the share (`share.rs`, fuse-backend-rs's
//! server and passthrough file system), and the reply copied back. A
//! malformed chain is returned with nothing written, logged once.
//!
//! Requests are served to the end within a notification, so none is
//! half done when a snapshot is taken: a request is either still in the
//! ring (served after the restore) or answered.

pub mod request;
pub mod share;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::{serve_request, serve_ring, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{Persist, RestoreError};
pub use share::{Share, ShareError, ShareState};

pub const DEVICE_TYPE: u32 = 26;
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the tag in `struct virtio_fs_config`.
pub const TAG_LEN: usize = 36;
/// `struct virtio_fs_config`: the tag, then num_request_queues.
const CONFIG_SIZE: usize = TAG_LEN + 4;

/// A share and the tag the guest mounts it by.
#[derive(Clone)]
pub struct FsArgs {
    pub tag: String,
    pub share: Arc<Share>,
}

pub struct Fs {
    args: FsArgs,
    config: [u8; CONFIG_SIZE],
    /// Malformed chains seen; the first is logged.
    bad_requests: u64,
}

impl Fs {
    /// The device for `args`; a tag longer than TAG_LEN bytes is cut
    /// (the configuration checks it first).
    pub fn new(args: FsArgs) -> Self {
        let mut config = [0u8; CONFIG_SIZE];
        let tag = args.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        config[..n].copy_from_slice(&tag[..n]);
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Fs {
            args,
            config,
            bad_requests: 0,
        }
    }

    /// Serve the next available request; false if there was none or it
    /// could not be returned.
    fn serve_one(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_request(queue, mem, "virtio-fs", |r| {
            match request::read(&r.descs, r.ended, mem) {
                Ok(req) => {
                    let reply = self.args.share.handle(req.bytes, req.reply_cap);
                    request::write(&reply, &req.reply_to, mem)
                }
                Err(e) => {
                    if self.bad_requests == 0 {
                        log::warn!("virtio-fs {}: request {}: {e}", self.args.tag, r.head);
                    }
                    self.bad_requests += 1;
                    0
                }
            }
        })
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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

    fn serves_on_vmm_thread(&self) -> bool {
        true
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        serve_ring(queue, |q| self.serve_one(q, mem))
    }
}

/// What a restore checks and takes up again: the tag and mode the guest
/// saw, and the inodes it holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub tag: String,
    pub read_only: bool,
    pub share: ShareState,
}

impl Persist for Fs {
    type State = FsState;
    /// The share, opened again from the VM's configuration.
    type Args = FsArgs;
    type Error = RestoreError;

    fn save(&self) -> FsState {
        FsState {
            tag: self.args.tag.clone(),
            read_only: self.args.share.read_only(),
            share: self.args.share.save(),
        }
    }

    fn restore(args: FsArgs, s: &FsState) -> Result<Self, RestoreError> {
        let bad = |reason: String| RestoreError::Invalid {
            device: "virtio-fs",
            reason,
        };
        let dir = args.share.dir().display().to_string();
        if args.tag != s.tag || args.share.read_only() != s.read_only {
            return Err(bad(format!(
                "{dir}: saved tag '{}' read-only {}, now '{}' {}",
                s.tag,
                s.read_only,
                args.tag,
                args.share.read_only()
            )));
        }
        let lost = args
            .share
            .restore(&s.share)
            .map_err(|e| bad(format!("{dir}: {e}")))?;
        if lost > 0 {
            log::warn!("virtio-fs {dir}: {lost} inodes the guest held are gone");
        }
        Ok(Fs::new(args))
    }
}

#[cfg(test)]
mod tests;
