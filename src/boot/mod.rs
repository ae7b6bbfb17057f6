//! Image loaders. Each turns an image file into guest memory contents and a
//! `BootPlan`: the register state the boot vCPU starts from.

pub mod acpi;
pub mod bios;
pub mod linux;
pub mod multiboot;

use std::path::{Path, PathBuf};

/// What a loader needs besides guest memory and its layout.
pub struct LoadArgs<'a> {
    pub image_path: &'a Path,
    pub image: &'a [u8],
    /// The command line: for multiboot the words after the image name
    /// (the loader puts the name first, as QEMU does); for Linux all of it.
    pub cmdline: &'a str,
    /// Multiboot module 0 or the Linux initramfs: its path as given and
    /// its contents.
    pub initrd: Option<(&'a Path, &'a [u8])>,
}

/// How the boot vCPU enters the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, flat segments (multiboot).
    Protected32,
    /// 64-bit mode on the identity map rooted at `cr3`, with the Linux boot
    /// protocol's GDT (code at 0x10, data at 0x18) and interrupts off.
    Long64 { cr3: u64 },
    /// 32-bit protected mode as the PVH boot ABI asks: flat segments,
    /// paging off, CR4 and EFER clear, a 32-bit TSS with limit 0x67.
    Pvh32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    pub kind: ImageKind,
    pub mode: EntryMode,
    pub rip: u64,
    pub rax: u64,
    pub rbx: u64,
    pub rsi: u64,
    pub rsp: u64,
    /// What QEMU's fw_cfg `KERNEL_DATA` item holds for this image: the
    /// start of the loaded image. kvm-unit-tests reads its first 8 bytes as
    /// a RAM limit (`FW_CFG_MAX_RAM`), so matching QEMU keeps verdicts equal.
    pub kernel_data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Multiboot,
    /// A Linux bzImage ("HdrS" setup header).
    BzImage,
    /// An ELF kernel (vmlinux) without a multiboot header, entered in 64-bit mode.
    Elf,
    /// An ELF kernel with a Xen PVH entry note.
    Pvh,
}

impl ImageKind {
    /// Whether the image is a Linux kernel (any Linux boot protocol).
    pub fn is_linux(self) -> bool {
        self != ImageKind::Multiboot
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageKind::Multiboot => write!(f, "multiboot"),
            ImageKind::BzImage => write!(f, "Linux bzImage (64-bit boot protocol)"),
            ImageKind::Elf => write!(f, "ELF kernel (64-bit boot protocol)"),
            ImageKind::Pvh => write!(f, "ELF kernel with a PVH entry (32-bit PVH boot)"),
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
    #[error("--cmdline: {0}")]
    BadCmdline(String),
    #[error("ACPI tables need {needed} bytes, more than the {room} bytes reserved for them")]
    AcpiTooBig { needed: u64, room: u64 },
}

pub(crate) fn bad_image(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::BadImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Detect what kind of image `data` is: multiboot (a header in the first
/// 8 KiB, looked for first so kvm-unit-tests images keep their loader), a
/// bzImage, or an ELF kernel; whether an ELF kernel has a PVH entry is
/// known once it is loaded.
pub fn detect(path: &Path, data: &[u8]) -> Result<ImageKind, BootError> {
    if multiboot::find_header(data).is_some() {
        return Ok(ImageKind::Multiboot);
    }
    if linux::is_bzimage(data) {
        return Ok(ImageKind::BzImage);
    }
    if data.starts_with(b"\x7fELF") {
        return Ok(ImageKind::Elf);
    }
    let what = if data.is_empty() {
        "an empty file"
    } else {
        "not a multiboot image (no multiboot header in the first 8 KiB), a Linux bzImage (no \"HdrS\" header) or an ELF kernel"
    };
    Err(bad_image(path, what))
}
