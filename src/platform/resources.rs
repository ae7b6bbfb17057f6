//! Resources devices are given: fixed ranges claimed from the layout
//! table, and allocations from its windows (rust-vmm's vm-allocator:
//! `AddressAllocator` for address windows, `IdAllocator` for GSIs).
//!
//! A device at a fixed place (a legacy port, pc-testdev's iomem, an ISA
//! interrupt, ECAM) may only claim a range inside a fixed or reserved
//! row of the table, and
//! only once: the table stays the complete list of who owns what. Every
//! other device gets its ranges from a window. Allocation is
//! deterministic, so a restore that registers the same devices in the
//! same order gets the same ranges.

use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator, RangeInclusive};

use crate::layout::{self, Range, Space, Use};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("{who}: {space:?} {start:#x} (+{len:#x}) is not a fixed range of the machine layout")]
    NotInLayout {
        who: String,
        space: Space,
        start: u64,
        len: u64,
    },
    #[error("{who}: {space:?} {start:#x} (+{len:#x}) is already taken by {by}")]
    Taken {
        who: String,
        space: Space,
        start: u64,
        len: u64,
        by: String,
    },
    #[error("{who}: no room for {size:#x} in the {pool:?} window ({reason})")]
    Exhausted {
        who: String,
        pool: Pool,
        size: u64,
        reason: String,
    },
}

/// A window of the layout the allocator hands ranges out from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    PciIo,
    PciMmio32,
    PciMmio64,
    PlatformMmio,
    PlatformGsi,
    MsiGsi,
}

struct Claim {
    space: Space,
    start: u64,
    end: u64,
    who: String,
}

pub struct Resources {
    table: Vec<Range>,
    claims: Vec<Claim>,
    pci_io: Option<AddressAllocator>,
    pci_mmio32: Option<AddressAllocator>,
    pci_mmio64: Option<AddressAllocator>,
    platform_mmio: AddressAllocator,
    platform_gsi: IdAllocator,
    msi_gsi: Option<IdAllocator>,
}

fn window(base_len: (u64, u64)) -> AddressAllocator {
    // The layout's windows are non-empty and far from the end of the
    // address space, which a unit test of the layout checks.
    AddressAllocator::new(base_len.0, base_len.1).expect("layout window")
}

fn ids(first_count: (u32, u32)) -> IdAllocator {
    IdAllocator::new(first_count.0, first_count.0 + first_count.1 - 1).expect("layout GSI window")
}

impl Resources {
    /// The resources of a machine with the RAM regions `ram`, with or
    /// without PCI (whose windows exist only with it).
    pub fn new(ram: &[(u64, u64)], pci: bool, pit: bool) -> Self {
        Resources {
            table: layout::table(ram, pci, pit),
            claims: Vec::new(),
            pci_io: pci.then(|| window(layout::PCI_IO_WINDOW)),
            pci_mmio32: pci.then(|| window(layout::PCI_MMIO32_WINDOW)),
            pci_mmio64: pci
                .then(|| window((layout::pci_mmio64_start(ram), layout::PCI_MMIO64_SIZE))),
            platform_mmio: window(layout::PLATFORM_MMIO_WINDOW),
            platform_gsi: ids(layout::PLATFORM_GSIS),
            msi_gsi: pci.then(|| ids(layout::MSI_GSIS)),
        }
    }

    /// Claim `[start, start + len)` of `space` for `who`: it must lie in a
    /// fixed row of the layout and overlap no other claim.
    pub fn claim(
        &mut self,
        who: &str,
        space: Space,
        start: u64,
        len: u64,
    ) -> Result<(), ResourceError> {
        let end = start.saturating_add(len);
        let in_layout = self.table.iter().any(|r| {
            r.space == space
                && matches!(r.usage, Use::Fixed | Use::Reserved)
                && r.start <= start
                && end <= r.end()
        });
        if !in_layout || len == 0 {
            return Err(ResourceError::NotInLayout {
                who: who.into(),
                space,
                start,
                len,
            });
        }
        if let Some(c) = self
            .claims
            .iter()
            .find(|c| c.space == space && c.start < end && start < c.end)
        {
            return Err(ResourceError::Taken {
                who: who.into(),
                space,
                start,
                len,
                by: c.who.clone(),
            });
        }
        self.claims.push(Claim {
            space,
            start,
            end,
            who: who.into(),
        });
        Ok(())
    }

    /// Give back what `who` claimed.
    pub fn release_claims(&mut self, who: &str) {
        self.claims.retain(|c| c.who != who);
    }

    fn pool(&mut self, pool: Pool) -> Option<&mut AddressAllocator> {
        match pool {
            Pool::PciIo => self.pci_io.as_mut(),
            Pool::PciMmio32 => self.pci_mmio32.as_mut(),
            Pool::PciMmio64 => self.pci_mmio64.as_mut(),
            Pool::PlatformMmio => Some(&mut self.platform_mmio),
            Pool::PlatformGsi | Pool::MsiGsi => None,
        }
    }

    /// `size` bytes aligned to `align` (both powers of two) from `pool`.
    pub fn allocate(
        &mut self,
        who: &str,
        pool: Pool,
        size: u64,
        align: u64,
    ) -> Result<u64, ResourceError> {
        let err = |reason: String| ResourceError::Exhausted {
            who: who.into(),
            pool,
            size,
            reason,
        };
        let Some(a) = self.pool(pool) else {
            return Err(err("the machine has no such window".into()));
        };
        a.allocate(size, align, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|e| err(e.to_string()))
    }

    /// Give back `[start, start + size)` of `pool`.
    pub fn free(&mut self, pool: Pool, start: u64, size: u64) {
        let Ok(range) = RangeInclusive::new(start, start + size - 1) else {
            return;
        };
        if let Some(a) = self.pool(pool) {
            let _ = a.free(&range);
        }
    }

    /// One GSI from `pool` (`PlatformGsi` or `MsiGsi`).
    pub fn allocate_gsi(&mut self, who: &str, pool: Pool) -> Result<u32, ResourceError> {
        let a = match pool {
            Pool::PlatformGsi => Some(&mut self.platform_gsi),
            Pool::MsiGsi => self.msi_gsi.as_mut(),
            _ => None,
        };
        let err = |reason: String| ResourceError::Exhausted {
            who: who.into(),
            pool,
            size: 1,
            reason,
        };
        match a {
            Some(a) => a.allocate_id().map_err(|e| err(e.to_string())),
            None => Err(err("the machine has no such window".into())),
        }
    }

    pub fn free_gsi(&mut self, pool: Pool, gsi: u32) {
        let a = match pool {
            Pool::PlatformGsi => Some(&mut self.platform_gsi),
            Pool::MsiGsi => self.msi_gsi.as_mut(),
            _ => None,
        };
        if let Some(a) = a {
            let _ = a.free_id(gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(pci: bool) -> Resources {
        Resources::new(&crate::memory::Layout::new(128 << 20).ram, pci, true)
    }

    #[test]
    fn fixed_claims_follow_the_layout() {
        let mut r = res(false);
        r.claim("serial", Space::Port, 0x3f8, 8).unwrap();
        // Once only.
        let e = r.claim("other", Space::Port, 0x3fc, 1).unwrap_err();
        assert!(e.to_string().contains("taken by serial"), "{e}");
        // Not a fixed range of the layout: refused.
        let e = r.claim("rogue", Space::Port, 0x300, 4).unwrap_err();
        assert!(matches!(e, ResourceError::NotInLayout { .. }), "{e}");
        // Inside a window is not fixed either.
        assert!(r
            .claim("rogue", Space::Memory, 0xe010_0000, 0x1000)
            .is_err());
        // A GSI inside the ISA row.
        r.claim("serial", Space::Gsi, 4, 1).unwrap();
        r.release_claims("serial");
        r.claim("other", Space::Port, 0x3fc, 1).unwrap();
        // PCI's ports exist only with PCI.
        assert!(r.claim("pci", Space::Port, 0xcf8, 8).is_err());
        res(true).claim("pci", Space::Port, 0xcf8, 8).unwrap();
    }

    #[test]
    fn windows_hand_out_aligned_ranges_in_order() {
        let mut r = res(true);
        let a = r.allocate("a", Pool::PlatformMmio, 0x1000, 0x1000).unwrap();
        let b = r.allocate("b", Pool::PlatformMmio, 0x1000, 0x1000).unwrap();
        assert_eq!((a, b), (0xe010_0000, 0xe010_1000));
        let bar = r.allocate("bar", Pool::PciMmio32, 0x4000, 0x4000).unwrap();
        assert_eq!(bar, 0xc000_0000);
        let big = r
            .allocate("big", Pool::PciMmio32, 0x1000_0000, 0x1000_0000)
            .unwrap();
        assert_eq!(big, 0xd000_0000);
        // The 32-bit window is full now; the 64-bit one is above 4 GiB.
        assert!(r
            .allocate("more", Pool::PciMmio32, 0x1000_0000, 0x1000_0000)
            .is_err());
        assert_eq!(
            r.allocate("hi", Pool::PciMmio64, 0x4000, 0x4000).unwrap(),
            1 << 32
        );
        r.free(Pool::PlatformMmio, a, 0x1000);
        assert_eq!(
            r.allocate("c", Pool::PlatformMmio, 0x1000, 0x1000).unwrap(),
            a
        );
    }

    #[test]
    fn gsis_come_from_their_windows() {
        let mut r = res(false);
        let g: Vec<u32> = (0..4)
            .map(|_| r.allocate_gsi("v", Pool::PlatformGsi).unwrap())
            .collect();
        assert_eq!(g, vec![20, 21, 22, 23]);
        let e = r.allocate_gsi("v", Pool::PlatformGsi).unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
        r.free_gsi(Pool::PlatformGsi, 21);
        assert_eq!(r.allocate_gsi("v", Pool::PlatformGsi).unwrap(), 21);
        // MSI routes only with PCI.
        assert!(r.allocate_gsi("m", Pool::MsiGsi).is_err());
        assert_eq!(res(true).allocate_gsi("m", Pool::MsiGsi).unwrap(), 24);
        assert!(r.allocate("x", Pool::PciIo, 0x10, 0x10).is_err());
    }
}
