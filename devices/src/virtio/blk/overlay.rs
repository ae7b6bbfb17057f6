//! Snapshot mode's copy-on-write overlay: a sparse anonymous file in the
//! temporary directory, as long as the disk, and one bit per block saying
//! whether the block lives in the overlay (written since start) or still
//! in the image. The image is only read; the overlay goes with the
//! process.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of a copy-on-write block: a page, what most guests write.
pub const BLOCK: u64 = 4096;

pub struct Overlay {
    file: File,
    len: u64,
    /// Bit n: block n is in the overlay.
    written: Vec<AtomicU64>,
}

impl Overlay {
    /// An empty overlay for a disk of `len` bytes.
    pub fn new(len: u64) -> std::io::Result<Overlay> {
        let file = anonymous_file()?;
        file.set_len(len)?;
        let blocks = len.div_ceil(BLOCK);
        let written = (0..blocks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(Overlay { file, len, written })
    }

    fn is_written(&self, block: u64) -> bool {
        self.written[(block / 64) as usize].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }

    fn mark(&self, block: u64) {
        self.written[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::Relaxed);
    }

    /// Read `buf` at `offset`, each block from where it lives.
    pub fn read(&self, base: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = (BLOCK - pos % BLOCK).min((buf.len() - done) as u64) as usize;
            let src = match self.is_written(pos / BLOCK) {
                true => &self.file,
                false => base,
            };
            src.read_exact_at(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Write `buf` at `offset` into the overlay; a block written in part
    /// for the first time is first copied from the image.
    pub fn write(&self, base: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        let mut block_buf = vec![0u8; BLOCK as usize];
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / BLOCK;
            let n = (BLOCK - pos % BLOCK).min((buf.len() - done) as u64) as usize;
            let part = &buf[done..done + n];
            if self.is_written(block) || n as u64 == BLOCK {
                self.file.write_all_at(part, pos)?;
            } else {
                let start = block * BLOCK;
                let have = (self.len - start).min(BLOCK) as usize;
                base.read_exact_at(&mut block_buf[..have], start)?;
                let at = (pos - start) as usize;
                block_buf[at..at + n].copy_from_slice(part);
                self.file.write_all_at(&block_buf[..have], start)?;
            }
            self.mark(block);
            done += n;
        }
        Ok(())
    }
}

/// An unnamed file in the temporary directory: O_TMPFILE, or where the
/// file system lacks it, a new file unlinked at once.
fn anonymous_file() -> std::io::Result<File> {
    let dir = std::env::temp_dir();
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a NUL-terminated path; the fd returned is owned by the File.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh fd nothing else owns.
        return Ok(unsafe { File::from_raw_fd(fd) });
    }
    let name = dir.join(format!(
        "kvmrun-overlay-{}-{:x}",
        std::process::id(),
        nonce()
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&name)?;
    std::fs::remove_file(&name)?;
    Ok(file)
}

/// A value that differs between calls in one process.
fn nonce() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
