//! virtio-rng (virtio 1.2, "Entropy Device"): one queue of buffers the
//! device fills with random bytes from the host kernel (getrandom(2)).
//!
//! A request is a descriptor chain of device-writable buffers. A
//! malformed one (a readable or empty buffer, an address outside guest
//! memory, a chain that loops or does not end) is answered with the bytes
//! written before the fault (zero for a chain that does not end) and
//! logged once; the next request is served as usual.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{Persist, RestoreError};

pub const DEVICE_TYPE: u32 = 4;
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes one request gets, so a guest cannot make one notification
/// cost unbounded host work.
pub const MAX_REQUEST: u32 = 64 << 10;

/// Where random bytes come from; a test can put a pattern there.
pub type Source = fn(&mut [u8]) -> std::io::Result<()>;

/// getrandom(2), without blocking once the kernel's pool is ready.
pub fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length name the unfilled part of `buf`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        got += n as usize;
    }
    Ok(())
}

/// Why a request could not be served in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor {0} is not device-writable")]
    Readable(u16),
    #[error("descriptor {0} has length 0")]
    Empty(u16),
    #[error("descriptor {index} at {addr:#x} (+{len:#x}) is outside guest memory")]
    OutOfRange { index: u16, addr: u64, len: u32 },
    #[error("the chain does not end (a loop, a bad next index or an unreadable descriptor)")]
    Unterminated,
    #[error("no random bytes from the host: {0}")]
    Source(String),
}

pub struct Rng {
    source: Source,
    /// Malformed requests seen; the first is logged.
    bad_requests: u64,
}

impl Rng {
    pub fn new() -> Self {
        Self::with_source(host_random)
    }

    pub fn with_source(source: Source) -> Self {
        Rng {
            source,
            bad_requests: 0,
        }
    }

    /// Fill the chain's buffers; the bytes written, or the error with the
    /// bytes written before it.
    fn serve<M>(
        &self,
        chain: virtio_queue::DescriptorChain<M>,
        mem: &GuestMemoryMmap,
    ) -> (u32, Option<RequestError>)
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let mut written = 0u32;
        let mut ended = false;
        let mut buf = Vec::new();
        for (i, desc) in chain.enumerate() {
            let i = i as u16;
            if !desc.is_write_only() {
                return (written, Some(RequestError::Readable(i)));
            }
            if desc.len() == 0 {
                return (written, Some(RequestError::Empty(i)));
            }
            let len = desc.len().min(MAX_REQUEST - written);
            buf.resize(len as usize, 0);
            if let Err(e) = (self.source)(&mut buf) {
                return (written, Some(RequestError::Source(e.to_string())));
            }
            if mem.write_slice(&buf, desc.addr()).is_err() {
                return (
                    written,
                    Some(RequestError::OutOfRange {
                        index: i,
                        addr: desc.addr().0,
                        len: desc.len(),
                    }),
                );
            }
            written += len;
            ended = !desc.has_next();
            if written == MAX_REQUEST {
                // The rest of the chain is left unwritten.
                ended = true;
                break;
            }
        }
        if !ended {
            return (0, Some(RequestError::Unterminated));
        }
        (written, None)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        // At most one pass over the ring per notification.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let (len, err) = self.serve(chain, mem);
            if let Some(e) = err {
                if self.bad_requests == 0 {
                    log::warn!("virtio-rng: malformed request (head {head}): {e}");
                }
                self.bad_requests += 1;
            }
            if let Err(e) = queue.add_used(mem, head, len) {
                log::warn!("virtio-rng: cannot return request {head}: {e}");
                break;
            }
            used = true;
        }
        used
    }
}

/// virtio-rng keeps nothing beyond its queue (the transport's state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

impl Persist for Rng {
    type State = RngState;
    type Args = ();
    type Error = RestoreError;

    fn save(&self) -> RngState {
        RngState {}
    }

    fn restore(_: (), _: &RngState) -> Result<Self, RestoreError> {
        Ok(Rng::new())
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::virtio::test_utils::memory;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    fn pattern(buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0xa5);
        Ok(())
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Offer `chain` (descriptors from index 0) and run the device once;
    /// the used length, and the bytes at 0x8000.
    fn run(mem: &GuestMemoryMmap, chain: &[RawDescriptor]) -> (u32, Vec<u8>) {
        let mock = MockSplitQueue::new(mem, 16);
        mock.add_desc_chains(chain, 0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut rng = Rng::with_source(pattern);
        assert!(rng.process_queue(0, &mut q, mem));
        let used = mock.used().ring().ref_at(0).unwrap().load();
        let mut out = vec![0u8; 8];
        mem.read_slice(&mut out, GuestAddress(0x8000)).unwrap();
        (used.len(), out)
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = memory();
        let (len, out) = run(
            &mem,
            &[desc(0x8000, 4, WRITE | NEXT, 1), desc(0x8004, 2, WRITE, 0)],
        );
        assert_eq!(len, 6);
        assert_eq!(out, [0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0, 0]);
    }

    #[test]
    fn readable_buffers_are_refused() {
        let mem = memory();
        let (len, out) = run(&mem, &[desc(0x8000, 4, 0, 0)]);
        assert_eq!((len, out), (0, vec![0; 8]));
    }

    #[test]
    fn zero_lengths_are_refused() {
        let mem = memory();
        let (len, _) = run(
            &mem,
            &[desc(0x8000, 4, WRITE | NEXT, 1), desc(0x8004, 0, WRITE, 0)],
        );
        assert_eq!(len, 4);
    }

    #[test]
    fn addresses_outside_memory_are_refused() {
        let mem = memory();
        let (len, _) = run(
            &mem,
            &[
                desc(0x8000, 2, WRITE | NEXT, 1),
                desc(0xff_fff0, 0x20, WRITE, 0),
            ],
        );
        assert_eq!(len, 2);
        let (len, _) = run(&mem, &[desc(u64::MAX - 1, 8, WRITE, 0)]);
        assert_eq!(len, 0);
    }

    #[test]
    fn loops_and_bad_next_indices_are_refused() {
        let mem = memory();
        // 0 -> 1 -> 0 -> ...
        let (len, _) = run(
            &mem,
            &[
                desc(0x8000, 1, WRITE | NEXT, 1),
                desc(0x8001, 1, WRITE | NEXT, 0),
            ],
        );
        assert_eq!(len, 0);
        // A next index past the queue's end.
        let (len, _) = run(&mem, &[desc(0x8000, 1, WRITE | NEXT, 999)]);
        assert_eq!(len, 0);
    }

    #[test]
    fn requests_are_capped() {
        let mem = memory();
        let (len, _) = run(&mem, &[desc(0x1_0000, 0x8_0000, WRITE, 0)]);
        assert_eq!(len, MAX_REQUEST);
    }

    #[test]
    fn a_bad_request_does_not_stop_the_next() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        mock.add_desc_chains(&[desc(0x8000, 4, 0, 0), desc(0x8010, 4, WRITE, 0)], 0)
            .unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        let mut rng = Rng::with_source(pattern);
        assert!(rng.process_queue(0, &mut q, &mem));
        assert_eq!(q.next_used(), 2);
        assert_eq!(mock.used().ring().ref_at(1).unwrap().load().len(), 4);
    }

    #[test]
    fn host_random_fills() {
        let mut a = [0u8; 64];
        host_random(&mut a).unwrap();
        assert!(a.iter().any(|&b| b != 0));
    }
}
