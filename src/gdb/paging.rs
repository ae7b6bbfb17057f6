//! Linear to guest-physical addresses through the guest's own page tables,
//! in whatever paging mode the vCPU is in (SDM "Paging": 32-bit paging,
//! PAE paging, 4-level and 5-level paging). Done here rather than with
//! KVM_TRANSLATE, which not every KVM implements (and which needs the
//! vCPU's thread): a plain function of the control registers and a reader
//! of guest memory, unit-tested with hand-made tables.

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PS: u64 = 1 << 7;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The registers that decide how a linear address translates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    /// The guest-physical address of `linear`, or None where no page is
    /// mapped. `read` reads a little-endian entry of `size` (4 or 8) bytes.
    pub fn translate(&self, linear: u64, read: impl Fn(u64, usize) -> Option<u64>) -> Option<u64> {
        if self.cr0 & CR0_PG == 0 {
            // No paging: linear is physical, 32 bits of it outside long mode.
            return Some(if self.efer & EFER_LMA != 0 {
                linear
            } else {
                linear & 0xffff_ffff
            });
        }
        if self.efer & EFER_LMA != 0 {
            let levels = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
            return walk(self.cr3 & ADDR, linear, levels, 9, 8, &read);
        }
        let linear = linear & 0xffff_ffff;
        if self.cr4 & CR4_PAE != 0 {
            // The PDPTE register's table: 4 entries at CR3 bits 31:5.
            let pdpte = read((self.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8, 8)?;
            if pdpte & PRESENT == 0 {
                return None;
            }
            return walk(pdpte & ADDR, linear, 2, 9, 8, &read);
        }
        // 32-bit paging: 4 MiB pages only with CR4.PSE.
        let pde = read((self.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4, 4)?;
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & PS != 0 && self.cr4 & CR4_PSE != 0 {
            // PSE-36: bits 20:13 are physical address bits 39:32.
            let high = ((pde >> 13) & 0xff) << 32;
            return Some(high | (pde & 0xffc0_0000) | (linear & 0x3f_ffff));
        }
        let pte = read((pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4, 4)?;
        if pte & PRESENT == 0 {
            return None;
        }
        Some((pte & 0xffff_f000) | (linear & 0xfff))
    }
}

/// Walk `levels` levels of tables of `bits`-bit indices and `size`-byte
/// entries from `table`; large pages at any level but the first and last.
fn walk(
    mut table: u64,
    linear: u64,
    levels: u32,
    bits: u32,
    size: usize,
    read: &impl Fn(u64, usize) -> Option<u64>,
) -> Option<u64> {
    let mask = (1u64 << bits) - 1;
    for level in (1..=levels).rev() {
        let shift = 12 + bits * (level - 1);
        let e = read(table + ((linear >> shift) & mask) * size as u64, size)?;
        if e & PRESENT == 0 {
            return None;
        }
        if level > 1 && level < 4 && e & PS != 0 {
            let page = 1u64 << shift;
            return Some((e & ADDR & !(page - 1)) | (linear & (page - 1)));
        }
        table = e & ADDR;
    }
    Some(table | (linear & 0xfff))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Guest memory as a map of entries.
    struct Mem(HashMap<u64, u64>);

    impl Mem {
        fn read(&self, a: u64, size: usize) -> Option<u64> {
            let v = *self.0.get(&a).unwrap_or(&0);
            Some(if size == 4 { v & 0xffff_ffff } else { v })
        }
    }

    #[test]
    fn without_paging_linear_is_physical() {
        let p = Paging::default();
        assert_eq!(p.translate(0x1_0000_1234, |_, _| None), Some(0x1234));
        let lm = Paging {
            efer: EFER_LMA,
            ..Default::default()
        };
        assert_eq!(
            lm.translate(0x1_0000_1234, |_, _| None),
            Some(0x1_0000_1234)
        );
    }

    #[test]
    fn four_level_paging_with_4k_2m_and_1g_pages() {
        let mut m = HashMap::new();
        // PML4[0] -> 0x2000; PDPT[0] -> 0x3000; PD[0] -> PT 0x4000;
        // PT[1] -> 0x9000; PD[1] is a 2 MiB page at 0x40_0000; PDPT[1] a
        // 1 GiB page at 0x8000_0000.
        m.insert(0x1000, 0x2003);
        m.insert(0x2000, 0x3003);
        m.insert(0x3000, 0x4003);
        m.insert(0x4008, 0x9003);
        m.insert(0x3008, 0x40_0083);
        m.insert(0x2008, 0x8000_0083);
        let mem = Mem(m);
        let p = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | 0x500,
        };
        let t = |a| p.translate(a, |x, s| mem.read(x, s));
        assert_eq!(t(0x1234), Some(0x9234));
        assert_eq!(t(0x2000), None);
        assert_eq!(t(0x20_0000 + 0x1_2345), Some(0x41_2345));
        assert_eq!(t(0x4000_0000 + 0x123_4567), Some(0x8123_4567));
    }

    #[test]
    fn five_level_paging_adds_a_level() {
        let mut m = HashMap::new();
        m.insert(0x1000, 0x2003);
        m.insert(0x2000, 0x3003);
        m.insert(0x3000, 0x4003);
        m.insert(0x4000, 0x5003);
        m.insert(0x5000, 0x7003);
        let mem = Mem(m);
        let p = Paging {
            cr0: CR0_PG,
            cr3: 0x1000,
            cr4: CR4_PAE | CR4_LA57,
            efer: EFER_LMA,
        };
        assert_eq!(p.translate(0x10, |x, s| mem.read(x, s)), Some(0x7010));
    }

    #[test]
    fn pae_paging_starts_at_the_pdpte() {
        let mut m = HashMap::new();
        // CR3 0x1020: PDPTE[3] (linear 0xc000_0000) -> PD 0x5000;
        // PD[0] -> PT 0x6000; PT[2] -> 0xa000; PD[1] a 2 MiB page.
        m.insert(0x1020 + 3 * 8, 0x5001);
        m.insert(0x5000, 0x6003);
        m.insert(0x6010, 0xa003);
        m.insert(0x5008, 0x1_0020_0083);
        let mem = Mem(m);
        let p = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x1020,
            cr4: CR4_PAE,
            efer: 0,
        };
        let t = |a| p.translate(a, |x, s| mem.read(x, s));
        assert_eq!(t(0xc000_2345), Some(0xa345));
        assert_eq!(t(0xc020_0010), Some(0x1_0020_0010));
        assert_eq!(t(0x1000), None);
    }

    #[test]
    fn thirty_two_bit_paging_with_and_without_pse() {
        let mut m = HashMap::new();
        // PD at 0x1000: PDE[0] -> PT 0x2000 (PT[3] -> 0x7000); PDE[1] a
        // 4 MiB page at 0xc0_0000 (with PSE).
        m.insert(0x1000, 0x2003);
        m.insert(0x200c, 0x7003);
        m.insert(0x1004, 0xc0_0083);
        let mem = Mem(m);
        let mut p = Paging {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(p.translate(0x3abc, |x, s| mem.read(x, s)), Some(0x7abc));
        assert_eq!(
            p.translate(0x40_1234, |x, s| mem.read(x, s)),
            Some(0xc0_1234)
        );
        // Without PSE the PS bit is ignored: the entry names a table.
        p.cr4 = 0;
        assert_eq!(p.translate(0x40_1234, |x, s| mem.read(x, s)), None);
    }
}
