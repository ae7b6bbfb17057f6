//! Linux boot protocols, through linux-loader:
//!
//! * bzImage and ELF vmlinux, entered in 64-bit mode with a zero page
//!   (`boot_params`) in RSI, as the kernel's boot protocol document
//!   ("64-bit Boot Protocol") describes;
//! * ELF images with a Xen `PHYS32_ENTRY` note, entered in 32-bit protected
//!   mode with an `hvm_start_info` in EBX, as Xen's "PVH boot ABI" describes.
//!
//! All of them get the same memory map as multiboot images (`Layout::e820()`),
//! the command line at `CMDLINE_ADDR` and the initrd as high as the kernel's
//! `initrd_addr_max` and low RAM allow.

use std::io::Cursor;
use std::path::Path;

use linux_loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, LOADED_HIGH, XLF_KERNEL_64,
};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{bad_image, multiboot, BootError, BootPlan, EntryMode, ImageKind, LoadArgs};
use crate::memory::{E820Type, Layout, HIGH_MEMORY, RSDP_ADDR};

/// The command line when `--cmdline` is not given: the serial console, and
/// a reset through the keyboard controller and a reboot right after a panic,
/// so that a failing kernel ends the VM instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the boot structures go, all in conventional memory below the EBDA.
pub const PVH_INFO_ADDR: u64 = 0x6000;
const PVH_MODLIST_ADDR: u64 = 0x6040;
const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Stack pointer at entry; the protocols leave it undefined, so give one
/// that does not overlap any boot structure.
pub const LINUX_STACK: u64 = 0x8ff0;
/// Identity map of the first 4 GiB with 2 MiB pages for the 64-bit entry:
/// one PML4, one PDPT and four page directories.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const IDENTITY_MAPPED: u64 = 4 << 30;
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86's `COMMAND_LINE_SIZE`, for kernels whose header does not say.
const CMDLINE_MAX_DEFAULT: u32 = 2048;
/// Highest initrd address for kernels that do not give `initrd_addr_max`
/// (the boot protocol's default for old kernels).
const INITRD_ADDR_MAX_DEFAULT: u64 = 0x37ff_ffff;
const PAGE: u64 = 4096;

/// Boot protocol fields of the setup header.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// `type_of_loader`: a loader with no assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Offset of the setup header in a bzImage and in the zero page.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// The 64-bit entry lies this far into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// Boot protocol version kvmrun writes into a zero page it builds from
/// scratch (ELF vmlinux): the fields it fills exist from 2.15 on.
const ZERO_PAGE_VERSION: u16 = 0x020f;
/// Xen's magic for `hvm_start_info`; version 1 has `memmap_*` and `rsdp_paddr`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const XEN_HVM_START_VERSION: u32 = 1;

fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::Memory {
            addr,
            reason: e.to_string(),
        })
}

/// Whether `data` starts like a bzImage: the "HdrS" magic of the setup header.
pub fn is_bzimage(data: &[u8]) -> bool {
    data.get(0x202..0x206) == Some(b"HdrS")
}

/// Load a bzImage or ELF kernel and describe how to enter it; `kind` is
/// what `detect()` found. ELF images with a PVH note come back as `Pvh`.
pub fn load(
    args: &LoadArgs,
    kind: ImageKind,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<BootPlan, BootError> {
    match kind {
        ImageKind::BzImage => load_bzimage(args, mem, layout),
        _ => load_elf(args, mem, layout),
    }
}

fn read_setup_header(path: &Path, data: &[u8]) -> Result<setup_header, BootError> {
    let size = std::mem::size_of::<setup_header>();
    let bytes = data
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or_else(|| {
            bad_image(
                path,
                format!(
                    "truncated bzImage: the setup header needs {} bytes, the file has {}",
                    SETUP_HEADER_OFFSET + size,
                    data.len()
                ),
            )
        })?;
    let mut h = setup_header::default();
    h.as_mut_slice().copy_from_slice(bytes);
    Ok(h)
}

/// Check what linux-loader does not: the protocol version and flags the
/// 64-bit entry needs, and a file as long as its header says.
fn check_bzimage(path: &Path, data: &[u8], h: &setup_header) -> Result<(), BootError> {
    let version = h.version;
    if h.header != HDRS_MAGIC {
        return Err(bad_image(path, "not a bzImage: no \"HdrS\" setup header"));
    }
    if version < 0x020c {
        return Err(bad_image(
            path,
            format!(
                "bzImage with boot protocol {}.{:02}, older than 2.12, the first with a 64-bit entry",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    let (loadflags, xloadflags) = (h.loadflags, h.xloadflags);
    if loadflags & LOADED_HIGH == 0 {
        return Err(bad_image(
            path,
            "a zImage (loadflags LOADED_HIGH clear): only bzImages load at 1 MiB",
        ));
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad_image(
            path,
            "bzImage without a 64-bit entry point (xloadflags XLF_KERNEL_64 clear)",
        ));
    }
    let setup_len = (if h.setup_sects == 0 { 4 } else { h.setup_sects } as u64 + 1) * 512;
    let kernel_len = h.syssize as u64 * 16;
    if (data.len() as u64) < setup_len + kernel_len || data.len() as u64 <= setup_len {
        return Err(bad_image(
            path,
            format!(
                "truncated bzImage: the header says {} bytes of setup code and {} bytes of kernel, the file has {} bytes",
                setup_len,
                kernel_len,
                data.len()
            ),
        ));
    }
    Ok(())
}

fn load_bzimage(
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<BootPlan, BootError> {
    let path = args.image_path;
    let h = read_setup_header(path, args.image)?;
    check_bzimage(path, args.image, &h)?;
    let load_addr = h.code32_start as u64;
    // A relocatable kernel decompresses at the load address rounded up to
    // its alignment, or at its preferred address if that is higher; it
    // needs `init_size` bytes from there.
    let align = (h.kernel_alignment as u64).max(PAGE);
    let run_at = if h.relocatable_kernel != 0 {
        load_addr.next_multiple_of(align).max(h.pref_address)
    } else {
        h.pref_address.max(load_addr)
    };
    // Saturate: a forged pref_address near 2^64 must end in DoesNotFit.
    let kernel_end = run_at.saturating_add(h.init_size as u64);
    let file_end = load_addr + (args.image.len() as u64);
    let kernel_end = kernel_end.max(file_end);
    if load_addr < HIGH_MEMORY || !layout.contains(load_addr, kernel_end - load_addr) {
        return Err(BootError::DoesNotFit {
            path: path.to_path_buf(),
            reason: format!(
                "the kernel needs RAM from {load_addr:#x} to {kernel_end:#x} (init_size {:#x}) but the guest has {} MiB; give more with --mem",
                { h.init_size },
                layout.mem >> 20
            ),
        });
    }
    let res = BzImage::load(
        mem,
        Some(GuestAddress(load_addr)),
        &mut Cursor::new(args.image),
        Some(GuestAddress(HIGH_MEMORY)),
    )
    .map_err(|e| bad_image(path, e.to_string()))?;
    let mut params = boot_params {
        hdr: res.setup_header.unwrap_or(h),
        ..Default::default()
    };
    let cmdline_max = if h.version >= 0x0206 {
        h.cmdline_size
    } else {
        255
    };
    let initrd_max = if h.version >= 0x0203 && h.initrd_addr_max != 0 {
        h.initrd_addr_max as u64
    } else {
        INITRD_ADDR_MAX_DEFAULT
    };
    let initrd = place_initrd(args, mem, layout, kernel_end, initrd_max)?;
    finish_zero_page(&mut params, args, mem, layout, cmdline_max, initrd)?;
    write_page_tables(mem)?;
    Ok(BootPlan {
        kind: ImageKind::BzImage,
        mode: EntryMode::Long64 { cr3: PML4_ADDR },
        rip: load_addr + STARTUP_64_OFFSET,
        rax: 0,
        rbx: 0,
        rsi: ZERO_PAGE_ADDR,
        rsp: LINUX_STACK,
        kernel_data: Vec::new(),
    })
}

fn load_elf(
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<BootPlan, BootError> {
    let path = args.image_path;
    let data = args.image;
    // The multiboot loader's ELF reader gives the clear messages for
    // truncated files and missing segments; linux-loader loads.
    let (segs, _) = multiboot::elf_segments(path, data)?;
    if data.get(4) != Some(&2) || data.get(18..20) != Some(&62u16.to_le_bytes()[..]) {
        return Err(bad_image(
            path,
            "a 32-bit ELF file without a multiboot header: kvmrun boots 64-bit (x86-64) ELF kernels",
        ));
    }
    for s in &segs {
        if s.memsz > 0 && (s.paddr < HIGH_MEMORY || !layout.contains(s.paddr, s.memsz)) {
            return Err(BootError::DoesNotFit {
                path: path.to_path_buf(),
                reason: format!(
                    "segment {:#x}..{:#x} lies outside guest RAM above 1 MiB ({} MiB); give more with --mem",
                    s.paddr,
                    s.paddr.saturating_add(s.memsz),
                    layout.mem >> 20
                ),
            });
        }
    }
    let res = Elf::load(
        mem,
        None,
        &mut Cursor::new(data),
        Some(GuestAddress(HIGH_MEMORY)),
    )
    .map_err(|e| bad_image(path, e.to_string()))?;
    let kernel_end = segs
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(HIGH_MEMORY)
        .max(res.kernel_end);
    let initrd = place_initrd(args, mem, layout, kernel_end, INITRD_ADDR_MAX_DEFAULT)?;
    if let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap {
        write_start_info(args, mem, layout, initrd)?;
        return Ok(BootPlan {
            kind: ImageKind::Pvh,
            mode: EntryMode::Pvh32,
            rip: entry.0,
            rax: 0,
            rbx: PVH_INFO_ADDR,
            rsi: 0,
            rsp: LINUX_STACK,
            kernel_data: Vec::new(),
        });
    }
    let mut params = boot_params {
        hdr: setup_header {
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            version: ZERO_PAGE_VERSION,
            loadflags: LOADED_HIGH,
            kernel_alignment: 0x20_0000,
            cmdline_size: CMDLINE_MAX_DEFAULT - 1,
            initrd_addr_max: INITRD_ADDR_MAX_DEFAULT as u32,
            ..Default::default()
        },
        ..Default::default()
    };
    finish_zero_page(
        &mut params,
        args,
        mem,
        layout,
        CMDLINE_MAX_DEFAULT - 1,
        initrd,
    )?;
    write_page_tables(mem)?;
    Ok(BootPlan {
        kind: ImageKind::Elf,
        mode: EntryMode::Long64 { cr3: PML4_ADDR },
        rip: res.kernel_load.0,
        rax: 0,
        rbx: 0,
        rsi: ZERO_PAGE_ADDR,
        rsp: LINUX_STACK,
        kernel_data: Vec::new(),
    })
}

/// Put the initrd at the highest page-aligned address that keeps it below
/// both `addr_max` and the end of low RAM, as other loaders do; it must not
/// reach down into the kernel. Returns its address and size.
fn place_initrd(
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    kernel_end: u64,
    addr_max: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some((ipath, idata)) = args.initrd else {
        return Ok(None);
    };
    let size = idata.len() as u64;
    let top = layout.low_ram_end().min(addr_max.saturating_add(1));
    let at = top.checked_sub(size).map(|a| a & !(PAGE - 1));
    match at {
        Some(at) if at >= kernel_end => {
            write(mem, at, idata)?;
            Ok(Some((at, size)))
        }
        _ => Err(BootError::DoesNotFit {
            path: ipath.to_path_buf(),
            reason: format!(
                "initrd of {size} bytes does not fit between the kernel's end ({kernel_end:#x}) and {top:#x} in guest RAM ({} MiB); give more with --mem",
                layout.mem >> 20
            ),
        }),
    }
}

/// Write the command line, checking it against the kernel's limit.
fn write_cmdline(args: &LoadArgs, mem: &GuestMemoryMmap, max: u32) -> Result<(), BootError> {
    let c = args.cmdline.as_bytes();
    if c.len() as u64 > max as u64 {
        return Err(BootError::BadCmdline(format!(
            "{} bytes, more than the {max} the kernel takes",
            c.len()
        )));
    }
    if c.contains(&0) {
        return Err(BootError::BadCmdline("contains a NUL byte".into()));
    }
    let mut b = c.to_vec();
    b.push(0);
    write(mem, CMDLINE_ADDR, &b)
}

/// Fill in what the loader owns in the zero page and write it.
fn finish_zero_page(
    params: &mut boot_params,
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    cmdline_max: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    write_cmdline(args, mem, cmdline_max)?;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    if let Some((at, size)) = initrd {
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (at >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = RSDP_ADDR;
    let map = layout.e820();
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e820_type(e.kind),
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    write(mem, ZERO_PAGE_ADDR, params.as_slice())
}

fn e820_type(kind: E820Type) -> u32 {
    match kind {
        E820Type::Ram => 1,
        E820Type::Reserved => 2,
    }
}

/// The `hvm_start_info` with the memory map, command line and the initrd
/// as module 0.
fn write_start_info(
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    write_cmdline(args, mem, CMDLINE_MAX_DEFAULT - 1)?;
    let map: Vec<u8> = layout
        .e820()
        .iter()
        .flat_map(|e| {
            hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e820_type(e.kind),
                reserved: 0,
            }
            .as_slice()
            .to_vec()
        })
        .collect();
    debug_assert!(PVH_MEMMAP_ADDR + map.len() as u64 <= ZERO_PAGE_ADDR);
    write(mem, PVH_MEMMAP_ADDR, &map)?;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: XEN_HVM_START_VERSION,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: RSDP_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: layout.e820().len() as u32,
        ..Default::default()
    };
    if let Some((at, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: at,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        write(mem, PVH_MODLIST_ADDR, m.as_slice())?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    write(mem, PVH_INFO_ADDR, info.as_slice())
}

/// Identity-map the first 4 GiB with 2 MiB pages: the 64-bit protocol
/// needs the kernel, zero page and command line mapped, and mapping all of
/// the 32-bit space also covers the initrd and the ACPI tables.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let dirs = IDENTITY_MAPPED >> 30;
    write(mem, PML4_ADDR, &(PDPT_ADDR | PRESENT_RW).to_le_bytes())?;
    let pdpt: Vec<u8> = (0..dirs)
        .flat_map(|i| ((PD_ADDR + i * PAGE) | PRESENT_RW).to_le_bytes())
        .collect();
    write(mem, PDPT_ADDR, &pdpt)?;
    let pd: Vec<u8> = (0..dirs * 512)
        .flat_map(|i| ((i << 21) | PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    write(mem, PD_ADDR, &pd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    /// A bzImage skeleton: one setup sector after the boot sector, a
    /// protected-mode part of `body` bytes.
    pub(crate) fn tiny_bzimage(body: usize) -> Vec<u8> {
        let mut f = vec![0u8; 1024 + body];
        f[0x1f1] = 1;
        f[0x1f4..0x1f8].copy_from_slice(&((body as u32).div_ceil(16)).to_le_bytes());
        f[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1;
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        f[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        f[0x236..0x238].copy_from_slice(&1u16.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        f[0x258..0x260].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f
    }

    fn load_with(
        image: &[u8],
        mem_size: u64,
        initrd: Option<&[u8]>,
    ) -> Result<(BootPlan, GuestMemoryMmap), BootError> {
        let layout = Layout::new(mem_size);
        let mem = create_guest_memory(&layout).unwrap();
        let args = LoadArgs {
            image_path: Path::new("k"),
            image,
            cmdline: "console=ttyS0 x=1",
            initrd: initrd.map(|d| (Path::new("rd"), d)),
        };
        let kind = if is_bzimage(image) {
            ImageKind::BzImage
        } else {
            ImageKind::Elf
        };
        load(&args, kind, &mem, &layout).map(|p| (p, mem))
    }

    #[test]
    fn bzimage_gets_a_zero_page() {
        let img = tiny_bzimage(0x400);
        let (plan, mem) = load_with(&img, 64 << 20, Some(&[7u8; 5000])).unwrap();
        assert_eq!(plan.rip, 0x10_0200);
        assert_eq!(plan.rsi, ZERO_PAGE_ADDR);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
        assert_eq!({ p.acpi_rsdp_addr }, RSDP_ADDR);
        let rd = { p.hdr.ramdisk_image } as u64;
        assert_eq!({ p.hdr.ramdisk_size }, 5000);
        assert_eq!(rd % PAGE, 0);
        assert!(rd + 5000 <= 64 << 20 && rd + 5000 > (64 << 20) - PAGE);
        let map = Layout::new(64 << 20).e820();
        assert_eq!(p.e820_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            assert_eq!({ p.e820_table[i].addr }, e.addr);
            assert_eq!({ p.e820_table[i].size }, e.size);
        }
        let mut c = [0u8; 18];
        mem.read_slice(&mut c, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&c, b"console=ttyS0 x=1\0");
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde, 0x20_0083);
    }

    #[test]
    fn bad_bzimages_are_refused() {
        let img = tiny_bzimage(0x400);
        let e = load_with(&img[..0x300], 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("truncated bzImage"), "{e}");
        let e = load_with(&img[..1200], 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("truncated bzImage"), "{e}");
        let mut old = img.clone();
        old[0x236] = 0;
        let e = load_with(&old, 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("XLF_KERNEL_64"), "{e}");
        let e = load_with(&img, 64 << 20, Some(&vec![0u8; 64 << 20])).unwrap_err();
        assert!(e.to_string().starts_with("rd: initrd of"), "{e}");
    }

    #[test]
    fn a_preferred_address_at_the_end_of_u64_does_not_fit() {
        let mut img = tiny_bzimage(0x400);
        img[0x258..0x260].copy_from_slice(&(u64::MAX - 0x1000).to_le_bytes());
        let e = load_with(&img, 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("give more with --mem"), "{e}");
    }

    #[test]
    fn elf_without_segments_is_refused() {
        let mut img = multiboot::tests::tiny_elf(0x40_0000, 0);
        img[52] = 4; // PT_LOAD -> PT_NOTE
        let e = load_with(&img, 64 << 20, None).unwrap_err();
        assert!(e.to_string().contains("no loadable segment"), "{e}");
    }

    #[test]
    fn long_command_lines_are_refused() {
        let img = tiny_bzimage(0x400);
        let layout = Layout::new(64 << 20);
        let mem = create_guest_memory(&layout).unwrap();
        let long = "x".repeat(3000);
        let args = LoadArgs {
            image_path: Path::new("k"),
            image: &img,
            cmdline: &long,
            initrd: None,
        };
        let e = load(&args, ImageKind::BzImage, &mem, &layout).unwrap_err();
        assert!(e.to_string().contains("--cmdline"), "{e}");
    }
}
