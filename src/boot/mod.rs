//! Image loaders. Each turns an image file into guest memory contents and a
//! `BootPlan`: the register state the boot vCPU starts from.

pub mod acpi;
pub mod bios;
pub mod multiboot;

use std::path::{Path, PathBuf};

/// How the boot vCPU enters the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, flat segments (multiboot).
    Protected32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    pub kind: ImageKind,
    pub mode: EntryMode,
    pub rip: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rsp: u64,
    /// What QEMU's fw_cfg `KERNEL_DATA` item holds for this image: the
    /// start of the loaded image. kvm-unit-tests reads its first 8 bytes as
    /// a RAM limit (`FW_CFG_MAX_RAM`), so matching QEMU keeps verdicts equal.
    pub kernel_data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Multiboot,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageKind::Multiboot => write!(f, "multiboot"),
        }
    }
}

/// Errors of the boot layer; each names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadImage { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    DoesNotFit { path: PathBuf, reason: String },
    #[error("cannot write boot data to guest memory at {addr:#x}: {reason}")]
    Memory { addr: u64, reason: String },
    #[error("ACPI tables need {needed} bytes, more than the {room} bytes reserved for them")]
    AcpiTooBig { needed: u64, room: u64 },
}

pub(crate) fn bad_image(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::BadImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Detect what kind of image `data` is. Only multiboot is supported so far;
/// anything else is refused with what was found.
pub fn detect(path: &Path, data: &[u8]) -> Result<ImageKind, BootError> {
    if multiboot::find_header(data).is_some() {
        return Ok(ImageKind::Multiboot);
    }
    let what = if data.len() >= 0x206 && &data[0x202..0x206] == b"HdrS" {
        "a Linux bzImage, which this kvmrun cannot boot yet"
    } else if data.starts_with(b"\x7fELF") {
        "an ELF file without a multiboot header in its first 8 KiB"
    } else if data.is_empty() {
        "an empty file"
    } else {
        "not a multiboot image (no multiboot header in the first 8 KiB)"
    };
    Err(bad_image(path, what))
}
