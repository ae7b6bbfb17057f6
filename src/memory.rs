//! Guest physical memory: the layout every loader, table and device agrees on,
//! and its backing on vm-memory.
//!
//! RAM starts at GPA 0 (page 0 is ordinary RAM: kvm-unit-tests puts its AP
//! trampoline there) and runs up to `mem` bytes, except that nothing is placed
//! in the 32-bit MMIO gap `[MMIO_GAP_START, 4 GiB)`; RAM that does not fit
//! below the gap continues at 4 GiB, as on a PC.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{self, Use};
pub use crate::layout::{
    BIOS_END, BIOS_START, EBDA_START, HIGH_MEMORY, HIGH_RAM_START, KVM_IDENTITY_MAP_ADDR,
    KVM_TSS_ADDR, MMIO_GAP_START,
};

/// RSDP: within the range ACPI says to scan (`0xE0000..0xFFFFF`).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// ACPI tables, after the RSDP.
pub const ACPI_TABLES_START: u64 = 0xe_0100;
pub const ACPI_TABLES_END: u64 = 0xf_0000;
/// Boot GDT for the 32-bit protected-mode entry.
pub const BOOT_GDT_ADDR: u64 = 0xf_0000;
/// Real-mode interrupt handlers the IVT points at.
pub const BIOS_STUBS_ADDR: u64 = 0xf_0100;
/// Stack pointer handed to the boot vCPU; the multiboot spec leaves it
/// undefined, so pick one below the boot structures, where QEMU's sits.
pub const BOOT_STACK: u64 = 0x7000;
/// Minimum guest memory: room for the low 1 MiB and a small image.
pub const MIN_MEM: u64 = 2 << 20;
/// Type of an e820 / multiboot memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Where RAM is for a guest of `mem` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub mem: u64,
    /// RAM regions as `(start, len)`, in ascending order.
    pub ram: Vec<(u64, u64)>,
    /// Whether the machine has PCI, whose ECAM the e820 map reserves.
    pub pci: bool,
}

impl Layout {
    pub fn new(mem: u64) -> Self {
        let low = mem.min(MMIO_GAP_START);
        let mut ram = vec![(0, low)];
        if mem > low {
            ram.push((HIGH_RAM_START, mem - low));
        }
        Layout {
            mem,
            ram,
            pci: false,
        }
    }

    /// The same RAM in a machine with PCI (`pci`) or without.
    pub fn with_pci(mut self, pci: bool) -> Self {
        self.pci = pci;
        self
    }

    /// End of RAM below 4 GiB.
    pub fn low_ram_end(&self) -> u64 {
        self.ram[0].1
    }

    /// Whether `[addr, addr + len)` lies entirely inside guest RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.ram
            .iter()
            .any(|&(start, size)| addr >= start && end <= start + size)
    }

    /// The memory map the guest is told about, as on a PC, from the
    /// machine's layout table: RAM and the reserved ranges (EBDA, BIOS
    /// area, and ECAM with PCI), in address order.
    pub fn e820(&self) -> Vec<E820Entry> {
        layout::table(&self.ram, self.pci, true)
            .into_iter()
            .filter(|r| r.space == layout::Space::Memory)
            .filter_map(|r| {
                let kind = match r.usage {
                    Use::Ram => E820Type::Ram,
                    Use::Reserved => E820Type::Reserved,
                    Use::Fixed | Use::Window => return None,
                };
                Some(E820Entry {
                    addr: r.start,
                    size: r.len,
                    kind,
                })
            })
            .collect()
    }
}

/// Errors of the memory layer.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot allocate {0} bytes of guest memory: {1}")]
    Alloc(u64, String),
}

/// Map anonymous memory for every RAM region of `layout`.
pub fn create_guest_memory(layout: &Layout) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .ram
        .iter()
        .map(|&(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Alloc(layout.mem, e.to_string()))
}

/// Host virtual address of each region, with its guest range, for KVM
/// memory slots.
pub fn host_regions(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u64)> {
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map(|p| p as u64)
                .unwrap_or(0);
            (r.start_addr().0, r.len(), host)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        let l = Layout::new(128 << 20);
        assert_eq!(l.ram, vec![(0, 128 << 20)]);
        assert_eq!(l.low_ram_end(), 128 << 20);
        let e = l.e820();
        assert_eq!(
            e[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(e.last().unwrap().addr + e.last().unwrap().size, 128 << 20);
    }

    #[test]
    fn large_guest_splits_around_the_gap() {
        let l = Layout::new(4 << 30);
        assert_eq!(
            l.ram,
            vec![
                (0, MMIO_GAP_START),
                (HIGH_RAM_START, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let ram: u64 = l
            .e820()
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // The EBDA, VGA hole and BIOS area are not reported as RAM.
        assert_eq!(ram, (4 << 30) - (HIGH_MEMORY - EBDA_START));
    }

    #[test]
    fn contains_checks_bounds() {
        let l = Layout::new(16 << 20);
        assert!(l.contains(0, 16 << 20));
        assert!(!l.contains(1, 16 << 20));
        assert!(!l.contains(u64::MAX, 2));
        assert!(!l.contains(MMIO_GAP_START, 1));
    }
}
