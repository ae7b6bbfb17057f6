//! Kernel images: the multiboot loader (ELF32, ELF64, address fields) and
//! the Linux loaders (bzImage, ELF vmlinux, PVH), into guest memory.
//!
//! Input: one byte of options, then the image. The options pick the
//! guest's RAM (2, 16 or 64 MiB: small enough that zeroing a huge BSS
//! cannot exhaust the fuzzer's memory), an initrd and the command line's
//! length.

use std::path::Path;
use std::sync::OnceLock;

use kvmrun::boot::{self, linux, multiboot, ImageKind, LoadArgs};
use kvmrun::memory::{self, Layout};
use vm_memory::GuestMemoryMmap;

use crate::Input;

const MEM_SIZES: [u64; 4] = [2 << 20, 16 << 20, 64 << 20, 16 << 20];

/// Guest memory of each size, made once and reused: a loader writes all
/// it needs, so what an earlier input left does not matter.
fn memory(pick: usize) -> &'static (Layout, GuestMemoryMmap) {
    static MEMS: [OnceLock<(Layout, GuestMemoryMmap)>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    MEMS[pick].get_or_init(|| {
        let layout = Layout::new(MEM_SIZES[pick]);
        let mem = memory::create_guest_memory(&layout).expect("guest memory for fuzzing");
        (layout, mem)
    })
}

static INITRD: [u8; 64 << 10] = [0x5a; 64 << 10];

struct Options {
    mem: usize,
    initrd: Option<&'static [u8]>,
    cmdline: String,
}

fn options(opts: u8) -> Options {
    let initrd = match (opts >> 2) & 3 {
        0 => None,
        1 => Some(&INITRD[..1]),
        2 => Some(&INITRD[..4096]),
        _ => Some(&INITRD[..]),
    };
    let cmdline = if opts & 0x10 != 0 {
        // Longer than any kernel's COMMAND_LINE_SIZE default.
        "a".repeat(5000)
    } else {
        "console=ttyS0 x".to_string()
    };
    Options {
        mem: (opts & 3) as usize,
        initrd,
        cmdline,
    }
}

/// What `vmm::build()` runs for a multiboot image.
pub fn multiboot(data: &[u8]) {
    let mut input = Input::new(data);
    let o = options(input.u8());
    let image = input.rest();
    let path = Path::new("fuzz.flat");
    if !matches!(boot::detect(path, image), Ok(ImageKind::Multiboot)) {
        return;
    }
    let (layout, mem) = memory(o.mem);
    let args = LoadArgs {
        image_path: path,
        image,
        cmdline: &o.cmdline,
        initrd: o.initrd.map(|d| (Path::new("initrd"), d)),
    };
    let _ = multiboot::load(&args, mem, layout);
}

/// What `vmm::build()` runs for a Linux kernel. Images with a multiboot
/// header are loaded as Linux too, so the fuzzer is not sent elsewhere.
pub fn linux(data: &[u8]) {
    let mut input = Input::new(data);
    let o = options(input.u8());
    let image = input.rest();
    let path = Path::new("fuzz-vmlinuz");
    let _ = boot::detect(path, image);
    let kind = if linux::is_bzimage(image) {
        ImageKind::BzImage
    } else {
        ImageKind::Elf
    };
    let (layout, mem) = memory(o.mem);
    let args = LoadArgs {
        image_path: path,
        image,
        cmdline: &o.cmdline,
        initrd: o.initrd.map(|d| (Path::new("initrd"), d)),
    };
    let _ = linux::load(&args, kind, mem, layout);
}
