//! Multiboot v1 loader, for kvm-unit-tests `.flat` images and our own
//! guests.
//!
//! Follows the Multiboot Specification 0.6.96 and, where the specification
//! leaves freedom, QEMU's `hw/i386/multiboot.c`, because kvm-unit-tests is
//! written against QEMU: the command line starts with the image name, the
//! `--initrd` file is module 0, and the info structure and memory map sit at
//! 0x9500 and 0x9000, below anything an image's allocator hands out.

use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{bad_image, BootError, BootPlan, EntryMode, ImageKind, LoadArgs};
use crate::memory::{E820Type, Layout, BOOT_STACK, EBDA_START};

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// Value of EAX at entry, telling the image a multiboot loader started it.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must be within this many bytes of the file start, 4-aligned.
const HEADER_SEARCH: usize = 8192;

/// Header flags (bits 0-15 are requirements the loader must meet).
const HDR_PAGE_ALIGN: u32 = 1 << 0;
const HDR_MEMORY_INFO: u32 = 1 << 1;
const HDR_VIDEO_MODE: u32 = 1 << 2;
const HDR_ADDRESS: u32 = 1 << 16;

/// Info structure flags.
const MBI_MEMORY: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;

pub const MMAP_ADDR: u64 = 0x9000;
pub const MBI_ADDR: u64 = 0x9500;
const MBI_SIZE: u64 = 0x58;
const MODS_ADDR: u64 = 0x9580;
/// Strings (command lines, loader name) go here while they fit below the EBDA.
const STRINGS_ADDR: u64 = 0x9600;
const PAGE: u64 = 4096;

/// A multiboot header found in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub offset: usize,
    pub flags: u32,
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

fn u32_at(data: &[u8], off: usize) -> Option<u32> {
    data.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u16_at(data: &[u8], off: usize) -> Option<u16> {
    data.get(off..off + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u64_at(data: &[u8], off: usize) -> Option<u64> {
    data.get(off..off + 8).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    })
}

/// Find a valid multiboot header: magic, and a checksum that makes the
/// three words sum to zero.
pub fn find_header(data: &[u8]) -> Option<Header> {
    let end = data.len().min(HEADER_SEARCH);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = u32_at(data, off)?;
        let flags = u32_at(data, off + 4)?;
        let sum = u32_at(data, off + 8)?;
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            return None;
        }
        let word = |i: usize| u32_at(data, off + 12 + 4 * i).unwrap_or(0);
        Some(Header {
            offset: off,
            flags,
            header_addr: word(0),
            load_addr: word(1),
            load_end_addr: word(2),
            bss_end_addr: word(3),
            entry_addr: word(4),
        })
    })
}

/// One piece of the image to place in guest memory.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub paddr: u64,
    pub file_off: usize,
    pub filesz: usize,
    pub memsz: u64,
}

/// Segments and entry point from the header's address fields.
fn address_segments(
    path: &Path,
    data: &[u8],
    h: &Header,
) -> Result<(Vec<Segment>, u64), BootError> {
    if h.header_addr < h.load_addr {
        return Err(bad_image(
            path,
            "multiboot header_addr lies below load_addr",
        ));
    }
    let start = (h.offset as u64)
        .checked_sub((h.header_addr - h.load_addr) as u64)
        .ok_or_else(|| {
            bad_image(
                path,
                "multiboot load_addr lies before the start of the file",
            )
        })?;
    let filesz = if h.load_end_addr == 0 {
        data.len() as u64 - start
    } else if h.load_end_addr < h.load_addr {
        return Err(bad_image(
            path,
            "multiboot load_end_addr lies below load_addr",
        ));
    } else {
        (h.load_end_addr - h.load_addr) as u64
    };
    if start + filesz > data.len() as u64 {
        return Err(bad_image(
            path,
            format!(
                "truncated: the multiboot header asks for {filesz} bytes from offset {start:#x} but the file has {} bytes",
                data.len()
            ),
        ));
    }
    let memsz = if h.bss_end_addr == 0 {
        filesz
    } else if (h.bss_end_addr as u64) < h.load_addr as u64 + filesz {
        return Err(bad_image(
            path,
            "multiboot bss_end_addr lies below the loaded data",
        ));
    } else {
        (h.bss_end_addr - h.load_addr) as u64
    };
    let seg = Segment {
        paddr: h.load_addr as u64,
        file_off: start as usize,
        filesz: filesz as usize,
        memsz,
    };
    Ok((vec![seg], h.entry_addr as u64))
}

/// Loadable segments and entry point of an ELF32 or ELF64 little-endian image.
pub(crate) fn elf_segments(path: &Path, data: &[u8]) -> Result<(Vec<Segment>, u64), BootError> {
    let trunc = |what: &str| {
        bad_image(
            path,
            format!(
                "truncated ELF file: {what} lies past the end of the file ({} bytes)",
                data.len()
            ),
        )
    };
    if !data.starts_with(b"\x7fELF") {
        return Err(bad_image(
            path,
            "multiboot header without address fields (flag 16), and the file is not ELF",
        ));
    }
    let class = *data.get(4).ok_or_else(|| trunc("the ELF header"))?;
    if data.get(5) != Some(&1) {
        return Err(bad_image(path, "ELF file is not little-endian"));
    }
    let is64 = match class {
        1 => false,
        2 => true,
        c => return Err(bad_image(path, format!("unknown ELF class {c}"))),
    };
    let machine = u16_at(data, 18).ok_or_else(|| trunc("the ELF header"))?;
    if machine != 3 && machine != 62 {
        return Err(bad_image(path, format!("ELF machine {machine} is not x86")));
    }
    let (entry, phoff, phentsize, phnum) = if is64 {
        (
            u64_at(data, 24),
            u64_at(data, 32),
            u16_at(data, 54),
            u16_at(data, 56),
        )
    } else {
        (
            u32_at(data, 24).map(u64::from),
            u32_at(data, 28).map(u64::from),
            u16_at(data, 42),
            u16_at(data, 44),
        )
    };
    let (Some(entry), Some(phoff), Some(phentsize), Some(phnum)) = (entry, phoff, phentsize, phnum)
    else {
        return Err(trunc("the ELF header"));
    };
    let min_ent = if is64 { 56 } else { 32 };
    if (phentsize as usize) < min_ent && phnum > 0 {
        return Err(bad_image(
            path,
            format!("ELF program header size {phentsize} is too small"),
        ));
    }
    let mut segs = Vec::new();
    for i in 0..phnum as u64 {
        let off = phoff
            .checked_add(i * phentsize as u64)
            .filter(|o| {
                o.checked_add(min_ent as u64)
                    .is_some_and(|e| e <= data.len() as u64)
            })
            .ok_or_else(|| trunc("the program header table"))? as usize;
        let p_type = u32_at(data, off).unwrap_or(0);
        if p_type != 1 {
            continue;
        }
        let (p_offset, p_paddr, p_filesz, p_memsz) = if is64 {
            (
                u64_at(data, off + 8),
                u64_at(data, off + 24),
                u64_at(data, off + 32),
                u64_at(data, off + 40),
            )
        } else {
            (
                u32_at(data, off + 4).map(u64::from),
                u32_at(data, off + 12).map(u64::from),
                u32_at(data, off + 16).map(u64::from),
                u32_at(data, off + 20).map(u64::from),
            )
        };
        let (p_offset, p_paddr, p_filesz, p_memsz) = (
            p_offset.unwrap_or(0),
            p_paddr.unwrap_or(0),
            p_filesz.unwrap_or(0),
            p_memsz.unwrap_or(0),
        );
        if p_offset
            .checked_add(p_filesz)
            .is_none_or(|e| e > data.len() as u64)
        {
            return Err(bad_image(
                path,
                format!(
                    "truncated: segment {i} needs file bytes {p_offset:#x}..{:#x} but the file has {} bytes",
                    p_offset.saturating_add(p_filesz),
                    data.len()
                ),
            ));
        }
        if p_filesz > p_memsz {
            return Err(bad_image(
                path,
                format!("segment {i} has a file size larger than its memory size"),
            ));
        }
        segs.push(Segment {
            paddr: p_paddr,
            file_off: p_offset as usize,
            filesz: p_filesz as usize,
            memsz: p_memsz,
        });
    }
    if segs.is_empty() {
        return Err(bad_image(path, "ELF file has no loadable segment"));
    }
    Ok((segs, entry))
}

/// A bump allocator over guest addresses.
struct Cursor {
    next: u64,
    end: u64,
}

impl Cursor {
    fn take(&mut self, len: u64, align: u64) -> Option<u64> {
        let at = self.next.checked_next_multiple_of(align)?;
        let end = at.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }
}

fn write(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) -> Result<(), BootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|e| BootError::Memory {
            addr,
            reason: e.to_string(),
        })
}

/// Load a multiboot image into `mem` and describe how to enter it.
pub fn load(
    args: &LoadArgs,
    mem: &GuestMemoryMmap,
    layout: &Layout,
) -> Result<BootPlan, BootError> {
    let path = args.image_path;
    let data = args.image;
    let h = find_header(data).ok_or_else(|| {
        bad_image(
            path,
            "no multiboot header (magic 0x1BADB002 with a valid checksum) in the first 8 KiB",
        )
    })?;
    // Memory information is always given; a video mode is not, as with QEMU.
    let unsupported = h.flags & 0xffff & !(HDR_PAGE_ALIGN | HDR_MEMORY_INFO | HDR_VIDEO_MODE);
    if unsupported != 0 {
        return Err(bad_image(
            path,
            format!("the multiboot header requires features kvmrun does not provide (flags {unsupported:#x})"),
        ));
    }
    let (segs, entry) = if h.flags & HDR_ADDRESS != 0 {
        address_segments(path, data, &h)?
    } else {
        elf_segments(path, data)?
    };

    let mut image_end = 0u64;
    for s in &segs {
        if !layout.contains(s.paddr, s.memsz) {
            return Err(BootError::DoesNotFit {
                path: path.to_path_buf(),
                reason: format!(
                    "segment {:#x}..{:#x} lies outside guest RAM ({} MiB); give more with --mem",
                    s.paddr,
                    s.paddr.saturating_add(s.memsz),
                    layout.mem >> 20
                ),
            });
        }
        write(mem, s.paddr, &data[s.file_off..s.file_off + s.filesz])?;
        let zeros = s.memsz - s.filesz as u64;
        if zeros > 0 {
            // Fresh anonymous memory is already zero; write anyway so a
            // reused region (restore, reboot) gets the same contents.
            let addr = s.paddr + s.filesz as u64;
            let zero_chunk = vec![0u8; zeros.min(1 << 20) as usize];
            let mut done = 0u64;
            while done < zeros {
                let n = (zeros - done).min(zero_chunk.len() as u64);
                write(mem, addr + done, &zero_chunk[..n as usize])?;
                done += n;
            }
        }
        image_end = image_end.max(s.paddr + s.memsz);
    }
    if entry > u32::MAX as u64 {
        return Err(bad_image(
            path,
            format!("entry point {entry:#x} is above 4 GiB"),
        ));
    }

    // Modules and overflowing strings go above the image, in low RAM, as QEMU does.
    let mut high = Cursor {
        next: image_end.max(crate::memory::HIGH_MEMORY),
        end: layout.low_ram_end(),
    };
    // The info structures sit at QEMU's addresses unless the image itself
    // lives there (kvm-unit-tests' realmode test is linked at 0x8000); then
    // they move above the image, which must not be overwritten.
    let low_is_free = !segs
        .iter()
        .any(|s| s.paddr < EBDA_START && s.paddr + s.memsz > MMAP_ADDR);
    let mut low = if low_is_free {
        Cursor {
            next: STRINGS_ADDR,
            end: EBDA_START,
        }
    } else {
        Cursor { next: 0, end: 0 }
    };
    let mut mod_entries: Vec<u8> = Vec::new();
    if let Some((ipath, idata)) = args.initrd {
        let at = high
            .take(idata.len() as u64, PAGE)
            .ok_or_else(|| BootError::DoesNotFit {
                path: ipath.to_path_buf(),
                reason: format!(
                    "initrd of {} bytes does not fit in guest RAM above the image ({} MiB); give more with --mem",
                    idata.len(),
                    layout.mem >> 20
                ),
            })?;
        write(mem, at, idata)?;
        let name = ipath.to_string_lossy().into_owned();
        let name_at = place_string(mem, &mut low, &mut high, &name, ipath)?;
        for v in [
            at as u32,
            (at + idata.len() as u64) as u32,
            name_at as u32,
            0,
        ] {
            mod_entries.extend_from_slice(&v.to_le_bytes());
        }
    }

    // QEMU joins the image name and the arguments with one space, always.
    let cmdline = format!("{} {}", path.to_string_lossy(), args.cmdline);
    let cmdline_at = place_string(mem, &mut low, &mut high, &cmdline, path)?;
    let loader_at = place_string(mem, &mut low, &mut high, "kvmrun", path)?;

    let mut mmap = Vec::new();
    for e in layout.e820() {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        let kind = match e.kind {
            E820Type::Ram => 1u32,
            E820Type::Reserved => 2u32,
        };
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    let (mmap_at, mbi_at, mods_at) = if low_is_free {
        (MMAP_ADDR, MBI_ADDR, MODS_ADDR)
    } else {
        let no_room = || BootError::DoesNotFit {
            path: path.to_path_buf(),
            reason: "no room in guest RAM for the multiboot information".into(),
        };
        (
            high.take(mmap.len() as u64, 8).ok_or_else(no_room)?,
            high.take(MBI_SIZE, 8).ok_or_else(no_room)?,
            high.take(mod_entries.len() as u64, 8).ok_or_else(no_room)?,
        )
    };
    debug_assert!(!low_is_free || MMAP_ADDR + mmap.len() as u64 <= MBI_ADDR);
    write(mem, mmap_at, &mmap)?;
    write(mem, mods_at, &mod_entries)?;

    let mem_lower_kib = (EBDA_START / 1024) as u32;
    let mem_upper_kib = ((layout.low_ram_end() - crate::memory::HIGH_MEMORY) / 1024) as u32;
    let mut mbi = vec![0u8; MBI_SIZE as usize];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
    );
    put(4, mem_lower_kib);
    put(8, mem_upper_kib);
    put(16, cmdline_at as u32);
    put(20, (mod_entries.len() / 16) as u32);
    put(24, mods_at as u32);
    put(44, mmap.len() as u32);
    put(48, mmap_at as u32);
    put(64, loader_at as u32);
    write(mem, mbi_at, &mbi)?;

    // QEMU's KERNEL_DATA blob starts at the lowest load address.
    let first = segs
        .iter()
        .min_by_key(|s| s.paddr)
        .expect("at least one segment");
    let kernel_data =
        data[first.file_off..first.file_off + first.filesz.min(PAGE as usize)].to_vec();

    Ok(BootPlan {
        kind: ImageKind::Multiboot,
        mode: EntryMode::Protected32,
        rip: entry,
        rax: BOOTLOADER_MAGIC as u64,
        rbx: mbi_at,
        rsi: 0,
        rsp: BOOT_STACK,
        kernel_data,
    })
}

/// Put a NUL-terminated string in the low string area, or above the image
/// when it does not fit there.
fn place_string(
    mem: &GuestMemoryMmap,
    low: &mut Cursor,
    high: &mut Cursor,
    s: &str,
    path: &Path,
) -> Result<u64, BootError> {
    let mut bytes = s.as_bytes().to_vec();
    bytes.push(0);
    let len = bytes.len() as u64;
    let at = low
        .take(len, 1)
        .or_else(|| high.take(len, 1))
        .ok_or_else(|| BootError::DoesNotFit {
            path: path.to_path_buf(),
            reason: format!(
                "command line of {} bytes does not fit in guest RAM",
                s.len()
            ),
        })?;
    write(mem, at, &bytes)?;
    Ok(at)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, Layout};
    use vm_memory::Bytes;

    /// A minimal ELF32 multiboot image: one PT_LOAD at `paddr` holding the
    /// header and a few bytes, with `bss` extra bytes of memory.
    pub(crate) fn tiny_elf(paddr: u32, bss: u32) -> Vec<u8> {
        let mut f = vec![0u8; 0x100];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 1;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&3u16.to_le_bytes());
        f[24..28].copy_from_slice(&(paddr + 12).to_le_bytes());
        f[28..32].copy_from_slice(&52u32.to_le_bytes());
        f[42..44].copy_from_slice(&32u16.to_le_bytes());
        f[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = 52;
        let code_off = 0x80u32;
        let code_len = 0x20u32;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&code_off.to_le_bytes());
        f[ph + 8..ph + 12].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 12..ph + 16].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 16..ph + 20].copy_from_slice(&code_len.to_le_bytes());
        f[ph + 20..ph + 24].copy_from_slice(&(code_len + bss).to_le_bytes());
        let h = code_off as usize;
        f[h..h + 4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        f[h + 8..h + 12].copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC)).to_le_bytes());
        f[h + 12] = 0xf4; // hlt
        f
    }

    /// The `multiboot` fuzz target's first crash: a program header table
    /// offset so close to u64's end that the end of its first entry
    /// overflowed.
    #[test]
    fn a_program_header_table_at_the_end_of_u64_is_truncated() {
        let mut f = vec![0u8; 0x80];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        f[0x40..0x44].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        f[0x48..0x4c].copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC)).to_le_bytes());
        let e = load_tiny(&f, 32 << 20, None).unwrap_err().to_string();
        assert!(e.contains("program header table"), "{e}");
    }

    fn load_tiny(
        image: &[u8],
        mem_size: u64,
        initrd: Option<&[u8]>,
    ) -> Result<(BootPlan, GuestMemoryMmap), BootError> {
        let layout = Layout::new(mem_size);
        let mem = create_guest_memory(&layout).unwrap();
        let ip = Path::new("env.txt");
        let args = LoadArgs {
            image_path: Path::new("x.flat"),
            image,
            cmdline: "a1 a2",
            initrd: initrd.map(|d| (ip, d)),
        };
        load(&args, &mem, &layout).map(|p| (p, mem))
    }

    #[test]
    fn loads_elf_and_builds_info() {
        let img = tiny_elf(0x40_0000, 0x1000);
        let (plan, mem) = load_tiny(&img, 32 << 20, Some(b"NR_CPUS=1\n")).unwrap();
        assert_eq!(plan.rip, 0x40_000c);
        assert_eq!(plan.rax, 0x2bad_b002);
        assert_eq!(plan.rbx, MBI_ADDR);
        assert_eq!(
            &plan.kernel_data[..8],
            &[0x02, 0xb0, 0xad, 0x1b, 0, 0, 0, 0]
        );
        let magic: u32 = mem.read_obj(GuestAddress(0x40_0000)).unwrap();
        assert_eq!(magic, HEADER_MAGIC);
        let flags: u32 = mem.read_obj(GuestAddress(MBI_ADDR)).unwrap();
        assert_eq!(flags, 0x24d);
        let mem_upper: u32 = mem.read_obj(GuestAddress(MBI_ADDR + 8)).unwrap();
        assert_eq!(mem_upper as u64 * 1024, (32 << 20) - (1 << 20));
        let cmd_at: u32 = mem.read_obj(GuestAddress(MBI_ADDR + 16)).unwrap();
        let mut cmd = [0u8; 13];
        mem.read_slice(&mut cmd, GuestAddress(cmd_at as u64))
            .unwrap();
        assert_eq!(&cmd, b"x.flat a1 a2\0");
        let nmods: u32 = mem.read_obj(GuestAddress(MBI_ADDR + 20)).unwrap();
        assert_eq!(nmods, 1);
        let mstart: u32 = mem.read_obj(GuestAddress(MODS_ADDR)).unwrap();
        let mend: u32 = mem.read_obj(GuestAddress(MODS_ADDR + 4)).unwrap();
        assert_eq!(mend - mstart, 10);
        assert!(mstart as u64 >= 0x40_0000 + 0x1020);
        let mlen: u32 = mem.read_obj(GuestAddress(MBI_ADDR + 44)).unwrap();
        assert_eq!(mlen % 24, 0);
    }

    #[test]
    fn refuses_bad_images() {
        let mut img = tiny_elf(0x40_0000, 0);
        // Segment beyond RAM.
        let e = load_tiny(&img, 4 << 20, None).unwrap_err().to_string();
        assert!(e.contains("outside guest RAM"), "{e}");
        // Truncated: cut the file inside the segment.
        let e = load_tiny(&img[..0x90], 32 << 20, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        // Wrong magic.
        img[0x80] ^= 0xff;
        let e = load_tiny(&img, 32 << 20, None).unwrap_err().to_string();
        assert!(e.contains("no multiboot header"), "{e}");
        // Bad checksum is the same as no header.
        let mut img = tiny_elf(0x40_0000, 0);
        img[0x88] ^= 1;
        assert!(find_header(&img).is_none());
        // Unsupported required feature bits.
        let mut img = tiny_elf(0x40_0000, 0);
        img[0x84] = 0x08;
        img[0x88..0x8c].copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC + 8)).to_le_bytes());
        let e = load_tiny(&img, 32 << 20, None).unwrap_err().to_string();
        assert!(e.contains("requires features"), "{e}");
    }

    #[test]
    fn info_moves_above_an_image_in_low_memory() {
        // Linked at 0x8000 and running over 0x9000, like kvm-unit-tests' realmode.
        let img = tiny_elf(0x8000, 0x2000);
        let (plan, mem) = load_tiny(&img, 16 << 20, Some(b"X=1\n")).unwrap();
        assert!(plan.rbx >= 0x10_0000, "{:#x}", plan.rbx);
        // The image's bytes at 0x9000 are untouched (zeroed bss, not an mmap).
        let v: u64 = mem.read_obj(GuestAddress(MMAP_ADDR)).unwrap();
        assert_eq!(v, 0);
        let mods: u32 = mem.read_obj(GuestAddress(plan.rbx + 24)).unwrap();
        assert!(mods as u64 >= 0x10_0000);
    }

    #[test]
    fn refuses_initrd_that_does_not_fit() {
        let img = tiny_elf(0x40_0000, 0);
        let big = vec![1u8; 8 << 20];
        let e = load_tiny(&img, 8 << 20, Some(&big))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("env.txt: initrd of"), "{e}");
    }

    #[test]
    fn address_fields_load_raw_images() {
        // A raw image with the a.out kludge: header at file offset 0, loaded at 1 MiB.
        let mut img = vec![0u8; 64];
        let flags = HDR_ADDRESS;
        img[0..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        img[4..8].copy_from_slice(&flags.to_le_bytes());
        img[8..12].copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC + flags)).to_le_bytes());
        for (i, v) in [0x10_0000u32, 0x10_0000, 0, 0x10_2000, 0x10_0020]
            .iter()
            .enumerate()
        {
            img[12 + 4 * i..16 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        let (plan, _) = load_tiny(&img, 16 << 20, None).unwrap();
        assert_eq!(plan.rip, 0x10_0020);
    }
}
