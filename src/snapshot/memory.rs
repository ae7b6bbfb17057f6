//! The `memory` file: guest RAM, region after region in guest address
//! order, written sparsely, then one page of trailer.
//!
//! Only pages that can hold data are read: for anonymous memory the pages
//! /proc/self/pagemap reports present or swapped (a page never touched is
//! zero), plus, for memory mapped from an earlier snapshot, the data
//! extents of that file (SEEK_DATA). Of those, all-zero pages are skipped
//! too, so the file keeps holes wherever the guest has zeros and the
//! bytes written follow what the guest actually uses. mincore is not used:
//! it misses swapped-out pages.
//!
//! RAM starts at offset 0, so restore maps it as it is. The trailer, at
//! offset L (the RAM length), ties the file to its `state`; all fields
//! little-endian:
//!
//! ```text
//! offset  size  field
//!    L+0     8  magic "KVMRUNMM"
//!    L+8    16  snapshot id, random per snapshot, the same as the state's
//!   L+24     8  RAM length L in bytes
//!   L+32     8  RAM digest
//!   L+40  4056  zero (reserved, ignored on read)
//! ```
//!
//! The RAM digest is XXH3-64 (seed 0) over, for each 4 KiB page of RAM
//! with a non-zero byte, in file order: the page's file offset (u64),
//! then its 4096 bytes. Zero pages, holes or not, add nothing, so the
//! digest can be recomputed from the file alone, reading only its data
//! extents, whatever was left sparse.

use std::fs::File;
use std::hash::Hasher;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::memory::Layout;

const PAGE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// First bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"KVMRUNMM";
/// Bytes of the trailer: one page, so RAM and file stay page-aligned.
pub const TRAILER_LEN: u64 = PAGE as u64;

/// What the state records of its memory file, and the trailer repeats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Random, new for every snapshot.
    pub id: u128,
    /// Bytes of guest RAM: the file without its trailer.
    pub len: u64,
    /// Digest of guest RAM (see the module doc).
    pub digest: u64,
}

/// Bytes of guest RAM in the memory file for `layout`: every RAM region,
/// back to back.
pub fn ram_len(layout: &Layout) -> u64 {
    layout.ram.iter().map(|&(_, len)| len).sum()
}

/// Bytes of the memory file for `layout`: RAM, then the trailer.
pub fn file_len(layout: &Layout) -> u64 {
    ram_len(layout) + TRAILER_LEN
}

/// Bytes digested and then written at a time: small enough that the
/// write copies them from the cache the digest just filled.
const WRITE_CHUNK: usize = 256 << 10;

/// The RAM digest, fed page by page in file order.
struct Digest(XxHash3_64);

impl Digest {
    fn new() -> Self {
        Digest(XxHash3_64::with_seed(0))
    }

    /// Add the non-zero pages `bytes`, which start at file offset `at`.
    fn pages(&mut self, at: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
            self.0.write(&(at + (i * PAGE) as u64).to_le_bytes());
            self.0.write(page);
        }
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// Mark the pages of `[host, host + pages * PAGE)` that pagemap says are
/// backed by a page in memory or swap. Returns false if pagemap cannot be
/// read, and the caller must treat every page as possibly data.
fn mark_backed(host: u64, marks: &mut [bool]) -> bool {
    let Ok(pm) = File::open("/proc/self/pagemap") else {
        return false;
    };
    const CHUNK: usize = 1 << 16;
    let mut buf = vec![0u8; CHUNK * 8];
    let first = host / PAGE as u64;
    let mut done = 0usize;
    while done < marks.len() {
        let n = (marks.len() - done).min(CHUNK);
        let bytes = &mut buf[..n * 8];
        if pm.read_exact_at(bytes, (first + done as u64) * 8).is_err() {
            return false;
        }
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                marks[done + i] = true;
            }
        }
        done += n;
    }
    true
}

/// The data extents (not holes) of `file` that meet `[start, end)`,
/// clipped to it, in order. A file system that cannot tell holes reports
/// everything as data.
fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an open fd only moves its offset.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `at`; anything else: assume data.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                extents.push((at, end));
            }
            break;
        }
        if data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        extents.push((data as u64, hole));
        at = hole;
    }
    extents
}

/// Mark the pages of `[start, start + pages * PAGE)` of `file` that hold
/// data (not holes).
fn mark_file_data(file: &File, start: u64, marks: &mut [bool]) {
    let end = start + (marks.len() * PAGE) as u64;
    for (data, hole) in data_extents(file, start, end) {
        let first = (data - start) as usize / PAGE;
        let last = ((hole - start) as usize).div_ceil(PAGE).min(marks.len());
        for m in &mut marks[first..last] {
            *m = true;
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// What writing the memory file did.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    /// Bytes of RAM written (the rest are holes).
    pub bytes: u64,
    pub info: MemoryInfo,
}

/// Digest and write `run`, non-zero pages for file offset `at`, a chunk
/// at a time.
fn write_run(out: &File, digest: &mut Digest, at: u64, run: &[u8]) -> std::io::Result<()> {
    for (i, chunk) in run.chunks(WRITE_CHUNK).enumerate() {
        let at = at + (i * WRITE_CHUNK) as u64;
        digest.pages(at, chunk);
        out.write_all_at(chunk, at)?;
    }
    Ok(())
}

/// Write all of guest RAM and the trailer with snapshot `id` into `out`
/// (an empty file).
pub fn write(out: &File, mem: &GuestMemoryMmap, id: u128) -> std::io::Result<Written> {
    let ram_len: u64 = mem.iter().map(|r| r.len()).sum();
    out.set_len(ram_len + TRAILER_LEN)?;
    let mut digest = Digest::new();
    let mut written = 0u64;
    let mut file_at = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| std::io::Error::other(e.to_string()))? as u64;
        let pages = len / PAGE;
        let mut marks = vec![false; pages];
        if !mark_backed(host, &mut marks) {
            marks.fill(true);
        }
        if let Some(fo) = region.file_offset() {
            mark_file_data(fo.file(), fo.start(), &mut marks);
        }
        // SAFETY: `host..host + len` is this region's mapping, alive as
        // long as `mem`; the vCPUs are stopped, so nothing writes to it.
        let ram = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let mut run: Option<usize> = None;
        for p in 0..=pages {
            let data = p < pages && marks[p] && !is_zero(&ram[p * PAGE..(p + 1) * PAGE]);
            match (data, run) {
                (true, None) => run = Some(p),
                (false, Some(s)) => {
                    let bytes = &ram[s * PAGE..p * PAGE];
                    write_run(out, &mut digest, file_at + (s * PAGE) as u64, bytes)?;
                    written += bytes.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
        file_at += len as u64;
    }
    let info = MemoryInfo {
        id,
        len: ram_len,
        digest: digest.finish(),
    };
    out.write_all_at(&encode_trailer(&info), ram_len)?;
    Ok(Written {
        bytes: written,
        info,
    })
}

fn encode_trailer(info: &MemoryInfo) -> Vec<u8> {
    let mut t = vec![0u8; PAGE];
    t[0..8].copy_from_slice(&TRAILER_MAGIC);
    t[8..24].copy_from_slice(&info.id.to_le_bytes());
    t[24..32].copy_from_slice(&info.len.to_le_bytes());
    t[32..40].copy_from_slice(&info.digest.to_le_bytes());
    t
}

/// Read the trailer at `ram_len` (the file must be `ram_len + TRAILER_LEN`
/// long); `None` when it lacks the magic.
pub fn read_trailer(file: &File, ram_len: u64) -> std::io::Result<Option<MemoryInfo>> {
    let mut t = [0u8; 40];
    file.read_exact_at(&mut t, ram_len)?;
    if t[0..8] != TRAILER_MAGIC {
        return Ok(None);
    }
    let u64_at = |at: usize| u64::from_le_bytes(t[at..at + 8].try_into().unwrap_or([0; 8]));
    Ok(Some(MemoryInfo {
        id: u128::from_le_bytes(t[8..24].try_into().unwrap_or([0; 16])),
        len: u64_at(24),
        digest: u64_at(32),
    }))
}

/// Recompute the RAM digest of the first `ram_len` bytes of `file`,
/// reading only its data extents.
pub fn digest_file(file: &File, ram_len: u64) -> std::io::Result<u64> {
    const CHUNK: u64 = 1 << 20;
    let page = PAGE as u64;
    let mut d = Digest::new();
    let mut buf = vec![0u8; CHUNK as usize];
    // Extents rounded out to whole pages may meet; read each page once.
    let mut next = 0u64;
    for (data, hole) in data_extents(file, 0, ram_len) {
        let mut at = (data / page * page).max(next);
        let end = hole.div_ceil(page).saturating_mul(page).min(ram_len);
        while at < end {
            let n = (end - at).min(CHUNK) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, p) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !is_zero(p) {
                    d.pages(at + (i * PAGE) as u64, p);
                }
            }
            at += n as u64;
        }
        next = next.max(end);
    }
    Ok(d.finish())
}

/// Map the RAM of the memory file copy-on-write (MAP_PRIVATE) as guest
/// RAM for `layout`: nothing is read now, pages come in as the guest
/// touches them, and guest writes never reach the file.
pub fn map(file: &File, layout: &Layout) -> Result<GuestMemoryMmap, String> {
    let mut regions = Vec::with_capacity(layout.ram.len());
    let mut file_at = 0u64;
    for &(start, len) in &layout.ram {
        let fo = FileOffset::new(file.try_clone().map_err(|e| e.to_string())?, file_at);
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| format!("mmap of {len:#x} bytes at offset {file_at:#x}: {e}"))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| format!("region at {start:#x} (+{len:#x}) overflows"))?;
        regions.push(region);
        file_at += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}

/// Read the RAM of the memory file into fresh anonymous guest RAM for
/// `layout`: only the file's data extents are read and only non-zero pages
/// written, so untouched RAM stays unallocated. Anonymous memory can be
/// backed by transparent huge pages, which a private file mapping cannot:
/// the guest then runs on large nested-paging entries at once instead of
/// faulting in each 4 KiB page (and copying it again on its first write).
pub fn copy(file: &File, layout: &Layout) -> Result<GuestMemoryMmap, String> {
    let mem = crate::memory::create_guest_memory(layout).map_err(|e| e.to_string())?;
    const CHUNK: u64 = 1 << 20;
    let page = PAGE as u64;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut file_at = 0u64;
    for &(start, len) in &layout.ram {
        for (data, hole) in data_extents(file, file_at, file_at + len) {
            let mut at = data / page * page;
            let end = hole.div_ceil(page).saturating_mul(page).min(file_at + len);
            while at < end {
                let n = (end - at).min(CHUNK) as usize;
                file.read_exact_at(&mut buf[..n], at)
                    .map_err(|e| format!("read of {n} bytes at offset {at:#x}: {e}"))?;
                for (i, p) in buf[..n].chunks_exact(PAGE).enumerate() {
                    if is_zero(p) {
                        continue;
                    }
                    let gpa = start + (at - file_at) + (i * PAGE) as u64;
                    mem.write_slice(p, GuestAddress(gpa))
                        .map_err(|e| format!("copy to guest address {gpa:#x}: {e}"))?;
                }
                at += n as u64;
            }
        }
        file_at += len;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: usize = 48;

    /// RAM of `PAGES` pages with data in some and zeros in the rest,
    /// including pages that are zero but were written.
    fn ram() -> Vec<u8> {
        let mut ram = vec![0u8; PAGES * PAGE];
        for p in [0usize, 1, 2, 7, 20, 21, 47] {
            ram[p * PAGE + (p * 37) % PAGE] = p as u8 + 1;
            ram[p * PAGE + PAGE - 1] = 0xa5;
        }
        ram
    }

    /// A file of `ram` and a trailer page of zeros, written whole
    /// (`sparse` false) or only its non-zero pages.
    fn file_of(ram: &[u8], sparse: bool) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(ram.len() as u64 + TRAILER_LEN).unwrap();
        for (i, page) in ram.chunks_exact(PAGE).enumerate() {
            if !sparse || !is_zero(page) {
                f.write_all_at(page, (i * PAGE) as u64).unwrap();
            }
        }
        f
    }

    /// The digest as the module doc defines it, over a whole buffer.
    fn digest_of(ram: &[u8]) -> u64 {
        let mut d = Digest::new();
        for (i, page) in ram.chunks_exact(PAGE).enumerate() {
            if !is_zero(page) {
                d.pages((i * PAGE) as u64, page);
            }
        }
        d.finish()
    }

    #[test]
    fn zero_pages_digest_as_holes() {
        let ram = ram();
        let len = ram.len() as u64;
        let sparse_file = file_of(&ram, true);
        // The hole path is exercised: the file has holes.
        assert!(data_extents(&sparse_file, 0, len).len() > 1);
        let whole = digest_file(&file_of(&ram, false), len).unwrap();
        let sparse = digest_file(&sparse_file, len).unwrap();
        assert_eq!(whole, sparse);
        assert_eq!(whole, digest_of(&ram));
        assert_ne!(whole, digest_of(&vec![0u8; ram.len()]));
    }

    #[test]
    fn digest_covers_every_byte_and_where_it_is() {
        let ram = ram();
        let d = digest_of(&ram);
        let mut flipped = ram.clone();
        flipped[20 * PAGE + 100] ^= 1;
        assert_ne!(digest_of(&flipped), d);
        // A data page moved to where a zero page was.
        let mut moved = ram.clone();
        moved.copy_within(7 * PAGE..8 * PAGE, 10 * PAGE);
        moved[7 * PAGE..8 * PAGE].fill(0);
        assert_ne!(digest_of(&moved), d);
    }

    #[test]
    fn write_digests_what_it_writes_and_reads_back() {
        // Two regions, as below and above the 32-bit gap.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 32 * PAGE),
            (GuestAddress(1 << 32), 16 * PAGE),
        ])
        .unwrap();
        let ram = ram();
        mem.write_slice(&ram[..32 * PAGE], GuestAddress(0)).unwrap();
        mem.write_slice(&ram[32 * PAGE..], GuestAddress(1 << 32))
            .unwrap();
        let f = tempfile::tempfile().unwrap();
        let id = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        let w = write(&f, &mem, id).unwrap();
        let len = ram.len() as u64;
        assert_eq!(w.info.id, id);
        assert_eq!(w.info.len, len);
        assert_eq!(w.info.digest, digest_of(&ram));
        // Only the data pages are written.
        assert_eq!(w.bytes, 7 * PAGE as u64);
        assert_eq!(f.metadata().unwrap().len(), len + TRAILER_LEN);
        let mut back = vec![0u8; ram.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, ram);
        assert_eq!(read_trailer(&f, len).unwrap(), Some(w.info));
        assert_eq!(digest_file(&f, len).unwrap(), w.info.digest);
    }

    #[test]
    fn trailer_layout_and_magic() {
        let info = MemoryInfo {
            id: 0x1122_3344_5566_7788_99aa_bbcc_ddee_ff00,
            len: 0x4000,
            digest: 0xdead_beef_0bad_f00d,
        };
        let t = encode_trailer(&info);
        assert_eq!(t.len() as u64, TRAILER_LEN);
        assert_eq!(&t[0..8], b"KVMRUNMM");
        assert_eq!(t[8], 0x00);
        assert_eq!(t[23], 0x11);
        assert_eq!(u64::from_le_bytes(t[24..32].try_into().unwrap()), 0x4000);
        assert!(t[40..].iter().all(|&b| b == 0));
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&t, 0x4000).unwrap();
        assert_eq!(read_trailer(&f, 0x4000).unwrap(), Some(info));
        f.write_all_at(b"X", 0x4000).unwrap();
        assert_eq!(read_trailer(&f, 0x4000).unwrap(), None);
    }

    #[test]
    fn copy_reads_the_same_ram_as_map() {
        let layout = Layout {
            mem: (PAGES * PAGE) as u64,
            ram: vec![(0, (32 * PAGE) as u64), (1 << 32, (16 * PAGE) as u64)],
            pci: false,
        };
        let ram = ram();
        let f = file_of(&ram, true);
        for mem in [map(&f, &layout).unwrap(), copy(&f, &layout).unwrap()] {
            let mut low = vec![0u8; 32 * PAGE];
            let mut high = vec![0u8; 16 * PAGE];
            mem.read_slice(&mut low, GuestAddress(0)).unwrap();
            mem.read_slice(&mut high, GuestAddress(1 << 32)).unwrap();
            assert_eq!(low, ram[..32 * PAGE]);
            assert_eq!(high, ram[32 * PAGE..]);
        }
        // A copy is the guest's own: its writes never reach the file.
        let mem = copy(&f, &layout).unwrap();
        assert!(mem.iter().all(|r| r.file_offset().is_none()));
        mem.write_slice(&[0xff; 8], GuestAddress(0)).unwrap();
        let mut back = [0u8; 8];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back[..], ram[..8]);
    }

    #[test]
    fn copy_of_a_short_file_names_the_offset() {
        let layout = Layout::new((PAGES * PAGE) as u64);
        let f = tempfile::tempfile().unwrap();
        f.set_len((PAGES * PAGE) as u64).unwrap();
        f.write_all_at(&[1u8; PAGE], 0).unwrap();
        f.set_len(PAGE as u64 / 2).unwrap();
        let e = copy(&f, &layout).unwrap_err();
        assert!(e.contains("offset 0x0"), "{e}");
    }
}
