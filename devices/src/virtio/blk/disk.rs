//! A raw disk image: opened and locked as its mode asks, read and written
//! with pread/pwrite, flushed with fdatasync, zeroed with fallocate. In
//! snapshot mode writes go to an overlay (see `overlay.rs`) and the file
//! is only read.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::overlay::Overlay;

/// Bytes of a virtio-blk sector, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Most bytes one zeroing write (the fallback of fallocate) takes.
const ZERO_CHUNK: usize = 64 << 10;

/// How a disk is opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskMode {
    /// The guest may not write (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// The guest writes to an overlay dropped at exit.
    pub snapshot: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {}: cannot open: {source}", .path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {}: is a directory, not a raw image file", .path.display())]
    Directory { path: PathBuf },
    #[error("disk {}: not a regular file", .path.display())]
    NotFile { path: PathBuf },
    #[error("disk {}: {size} bytes, less than one 512-byte sector", .path.display())]
    TooSmall { path: PathBuf, size: u64 },
    #[error("disk {}: locked by another process (another kvmrun?); {}", .path.display(), if *.exclusive { "a read-write disk is used by one VM at a time" } else { "another VM uses it read-write" })]
    Locked { path: PathBuf, exclusive: bool },
    #[error("disk {}: cannot lock: {source}", .path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk {}: cannot create the snapshot overlay in the temporary directory: {source}", .path.display())]
    Overlay {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An open, locked disk image.
pub struct Disk {
    file: File,
    path: PathBuf,
    mode: DiskMode,
    sectors: u64,
    overlay: Option<Overlay>,
}

impl Disk {
    /// Open `path` in `mode`: read-write under an exclusive lock, or
    /// read-only under a shared one (ro and snapshot), so a second VM on a
    /// read-write disk is refused before either guest sees a torn image.
    pub fn open(path: &Path, mode: DiskMode) -> Result<Disk, DiskError> {
        let p = || path.to_path_buf();
        let writable = !mode.read_only && !mode.snapshot;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EISDIR) => DiskError::Directory { path: p() },
                _ => DiskError::Open { path: p(), source },
            })?;
        let meta = file
            .metadata()
            .map_err(|source| DiskError::Open { path: p(), source })?;
        if meta.is_dir() {
            return Err(DiskError::Directory { path: p() });
        }
        if !meta.is_file() {
            return Err(DiskError::NotFile { path: p() });
        }
        lock(&file, writable).map_err(|source| match source.kind() {
            ErrorKind::WouldBlock => DiskError::Locked {
                path: p(),
                exclusive: writable,
            },
            _ => DiskError::Lock { path: p(), source },
        })?;
        let sectors = meta.len() / SECTOR_SIZE;
        if sectors == 0 {
            return Err(DiskError::TooSmall {
                path: p(),
                size: meta.len(),
            });
        }
        let overlay = match mode.snapshot && !mode.read_only {
            true => Some(
                Overlay::new(sectors * SECTOR_SIZE)
                    .map_err(|source| DiskError::Overlay { path: p(), source })?,
            ),
            false => None,
        };
        Ok(Disk {
            file,
            path: p(),
            mode,
            sectors,
            overlay,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mode(&self) -> DiskMode {
        self.mode
    }

    /// The capacity in 512-byte sectors (a partial last sector is left out).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether `[offset, offset + len)` lies inside the capacity.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.sectors * SECTOR_SIZE)
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        match &self.overlay {
            Some(o) => o.read(&self.file, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    /// Write `buf` at `offset`.
    pub fn write(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writable()?;
        match &self.overlay {
            Some(o) => o.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    /// Make written data durable; nothing to do without writes to the file.
    pub fn flush(&self) -> std::io::Result<()> {
        match self.overlay.is_none() && !self.mode.read_only {
            true => self.file.sync_data(),
            false => Ok(()),
        }
    }

    /// Make `[offset, offset + len)` read as zeros: a hole punched when
    /// `unmap` allows it, a zeroed range otherwise, written zeros where
    /// the file system supports neither (or in the overlay).
    pub fn zero(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.writable()?;
        if self.overlay.is_none() {
            let mode = match unmap {
                true => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                false => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            };
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {}
                Err(e) => return Err(e),
            }
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn writable(&self) -> std::io::Result<()> {
        match self.mode.read_only {
            true => Err(std::io::Error::from_raw_os_error(libc::EROFS)),
            false => Ok(()),
        }
    }
}

/// flock(2) without blocking: exclusive or shared.
fn lock(file: &File, exclusive: bool) -> std::io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock on an fd this function borrows; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on an fd this function borrows; no memory is passed.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
        return Ok(());
    }
    Err(std::io::Error::last_os_error())
}
