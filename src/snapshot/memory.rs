//! The `memory` file: guest RAM, region after region in guest address
//! order, written sparsely.
//!
//! Only pages that can hold data are read: for anonymous memory the pages
//! /proc/self/pagemap reports present or swapped (a page never touched is
//! zero), plus, for memory mapped from an earlier snapshot, the data
//! extents of that file (SEEK_DATA). Of those, all-zero pages are skipped
//! too, so the file keeps holes wherever the guest has zeros and the
//! bytes written follow what the guest actually uses. mincore is not used:
//! it misses swapped-out pages.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::memory::Layout;

const PAGE: usize = 4096;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// Bytes of the memory file for `layout`: every RAM region, back to back.
pub fn file_len(layout: &Layout) -> u64 {
    layout.ram.iter().map(|&(_, len)| len).sum()
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

/// Mark the pages of `[start, start + pages * PAGE)` of `file` that hold
/// data (not holes).
fn mark_file_data(file: &File, start: u64, marks: &mut [bool]) {
    let end = start + (marks.len() * PAGE) as u64;
    let fd = file.as_raw_fd();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on an open fd only moves its offset.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        let first = (data as u64 - start) as usize / PAGE;
        let last = ((hole - start) as usize).div_ceil(PAGE);
        let last = last.min(marks.len());
        for m in &mut marks[first..last] {
            *m = true;
        }
        at = hole;
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Write all of guest RAM into `out` (already `file_len()` long and
/// empty) and return the bytes written.
pub fn write(out: &File, mem: &GuestMemoryMmap) -> std::io::Result<u64> {
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
                    out.write_all_at(bytes, file_at + (s * PAGE) as u64)?;
                    written += bytes.len() as u64;
                    run = None;
                }
                _ => {}
            }
        }
        file_at += len as u64;
    }
    Ok(written)
}

/// Map the memory file copy-on-write (MAP_PRIVATE) as guest RAM for
/// `layout`: nothing is read now, pages come in as the guest touches them,
/// and guest writes never reach the file.
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
