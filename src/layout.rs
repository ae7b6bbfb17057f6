//! The machine's layout: who owns which range of memory, ports and
//! interrupt lines. One table, read by the e820 map (and with it the
//! multiboot map and the Linux zero page), the ACPI tables, the resource
//! allocator and docs/ARCHITECTURE.md (a unit test checks the page's copy
//! against `doc_table()`).
//!
//! Fixed ranges are those a PC has at fixed addresses (legacy ports, the
//! IOAPIC and LAPIC, the BIOS area) or that kvm-unit-tests expects at
//! QEMU's addresses (pc-testdev's iomem). Windows are pools the allocator
//! hands out from; nothing in them is fixed.

/// Start of the 32-bit hole for MMIO (IOAPIC, LAPIC, PCI BARs, ...): RAM
/// that does not fit below it continues at 4 GiB, as on a PC.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// End of conventional memory: the EBDA starts here, as on a PC.
pub const EBDA_START: u64 = 0x9_fc00;
/// The BIOS area, reserved in the e820 map; ACPI tables and the boot GDT
/// live here.
pub const BIOS_START: u64 = 0xe_0000;
pub const BIOS_END: u64 = 0x10_0000;
/// High memory starts here; the kernel-side boundary of "conventional" RAM.
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// Addresses KVM needs for its private use on Intel hosts (TSS, identity
/// map), inside the MMIO gap where no device lives.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Memory,
    Port,
    /// Global system interrupts: IOAPIC pins, then KVM routes for MSIs.
    Gsi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Guest RAM (e820 type 1).
    Ram,
    /// Firmware data the OS must leave alone (e820 type 2).
    Reserved,
    /// Registers of a device (or of KVM) at a fixed place.
    Fixed,
    /// A pool the resource allocator hands ranges out from.
    Window,
}

/// When a range is part of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    Always,
    /// With the in-kernel PIT.
    Pit,
    /// With a PCI device configured (the host bridge comes with it).
    Pci,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub space: Space,
    pub start: u64,
    pub len: u64,
    pub owner: &'static str,
    pub usage: Use,
    pub when: When,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The I/O window PCI I/O BARs come from (where SeaBIOS puts them).
pub const PCI_IO_WINDOW: (u64, u64) = (0xc000, 0x4000);
/// The 32-bit window PCI memory BARs come from: the MMIO gap below ECAM.
pub const PCI_MMIO32_WINDOW: (u64, u64) = (MMIO_GAP_START, 0x2000_0000);
/// PCI Express enhanced configuration (ECAM), bus 0 only: 32 devices of
/// 8 functions of 4 KiB.
pub const PCI_ECAM: (u64, u64) = (0xe000_0000, 0x10_0000);
/// The window platform (non-PCI) MMIO devices come from: virtio-mmio.
pub const PLATFORM_MMIO_WINDOW: (u64, u64) = (0xe010_0000, 0xf0_0000);
pub const IOAPIC_ADDR: u64 = devices::ioapic::IOAPIC_BASE;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The Intel IOMMU's register page (`--iommu`), where QEMU's Q35 puts
/// it and kvm-unit-tests' lib/x86/intel-iommu.h looks for it.
pub const IOMMU_ADDR: u64 = 0xfed9_0000;
/// The PCI configuration ports 0xCF8 (address) and 0xCFC-0xCFF (data).
pub const PCI_CONFIG_PORTS: (u64, u64) = (0xcf8, 8);
/// Size of the 64-bit window PCI memory BARs may come from, above RAM.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// ISA interrupts are GSIs 0-15; PCI INTA-INTD of slot s go to
/// `PCI_INTX_GSI_BASE + (s + pin) % 4` (the `_PRT`), platform devices get
/// the IOAPIC pins after those, and MSI routes start above the IOAPIC.
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PLATFORM_GSIS: (u32, u32) = (20, 4);
pub const IOAPIC_PINS: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES on x86) bounds the
/// GSI numbers MSI routes may use.
pub const MSI_GSIS: (u32, u32) = (IOAPIC_PINS, 4096 - IOAPIC_PINS);

const fn r(
    space: Space,
    start: u64,
    len: u64,
    owner: &'static str,
    usage: Use,
    when: When,
) -> Range {
    Range {
        space,
        start,
        len,
        owner,
        usage,
        when,
    }
}

use Space::{Gsi, Memory, Port};
use Use::{Fixed, Reserved, Window};
use When::{Always, Pci, Pit};

/// Every fixed range and window, RAM aside (it depends on the RAM size;
/// see `table()`).
#[rustfmt::skip]
pub const FIXED: &[Range] = &[
    r(Memory, EBDA_START, 0xa_0000 - EBDA_START, "EBDA", Reserved, Always),
    r(Memory, BIOS_START, BIOS_END - BIOS_START, "BIOS area: RSDP, ACPI tables, boot GDT, real-mode IVT stubs", Reserved, Always),
    r(Memory, PCI_MMIO32_WINDOW.0, PCI_MMIO32_WINDOW.1, "PCI 32-bit memory BARs", Window, Pci),
    r(Memory, PCI_ECAM.0, PCI_ECAM.1, "PCI ECAM, bus 0 (ACPI MCFG)", Reserved, Pci),
    r(Memory, PLATFORM_MMIO_WINDOW.0, PLATFORM_MMIO_WINDOW.1, "virtio-mmio windows", Window, Always),
    r(Memory, IOAPIC_ADDR, 0x1000, "IOAPIC (KVM; kvmrun with --irqchip split)", Fixed, Always),
    r(Memory, IOMMU_ADDR, 0x1000, "Intel IOMMU (VT-d) registers, with --iommu (ACPI DMAR)", Fixed, Pci),
    r(Memory, LAPIC_ADDR, 0x1000, "LAPIC (KVM)", Fixed, Always),
    r(Memory, devices::testdev::TESTDEV_IOMEM_BASE, devices::testdev::TESTDEV_IOMEM_SIZE, "pc-testdev iomem", Fixed, Always),
    r(Memory, KVM_IDENTITY_MAP_ADDR, 0x1000, "KVM identity map page", Fixed, Always),
    r(Memory, KVM_TSS_ADDR, 0x3000, "KVM TSS", Fixed, Always),
    r(Port, 0x20, 2, "PIC master (KVM)", Fixed, Always),
    r(Port, 0x40, 4, "PIT (KVM)", Fixed, Pit),
    r(Port, devices::i8042::I8042_DATA_PORT as u64, 1, "i8042 data", Fixed, Always),
    r(Port, 0x61, 1, "PIT speaker port (KVM)", Fixed, Pit),
    r(Port, devices::i8042::I8042_COMMAND_PORT as u64, 1, "i8042 command", Fixed, Always),
    r(Port, devices::rtc::RTC_INDEX_PORT as u64, devices::rtc::RTC_PORT_COUNT as u64, "RTC/CMOS", Fixed, Always),
    r(Port, 0xa0, 2, "PIC slave (KVM)", Fixed, Always),
    r(Port, devices::testdev::PC_TESTDEV_IOPORT_BASE as u64, devices::testdev::PC_TESTDEV_IOPORT_SIZE as u64, "pc-testdev", Fixed, Always),
    r(Port, devices::debug_exit::DEBUG_EXIT_BASE as u64, devices::debug_exit::DEBUG_EXIT_SIZE as u64, "isa-debug-exit", Fixed, Always),
    r(Port, devices::serial::COM1_BASE as u64, devices::serial::SERIAL_PORT_COUNT as u64, "COM1", Fixed, Always),
    r(Port, 0x4d0, 2, "ELCR (KVM)", Fixed, Always),
    r(Port, devices::fw_cfg::FW_CFG_PORT_SEL as u64, devices::fw_cfg::FW_CFG_PORT_COUNT as u64, "fw_cfg", Fixed, Always),
    r(Port, devices::acpi_pm::PM_BASE as u64, devices::acpi_pm::PM_SIZE as u64, "ACPI PM1a, PM timer", Fixed, Always),
    r(Port, PCI_CONFIG_PORTS.0, PCI_CONFIG_PORTS.1, "PCI configuration ports", Fixed, Pci),
    r(Port, devices::testdev::PC_TESTDEV_IRQ_BASE as u64, devices::testdev::PC_TESTDEV_IRQ_COUNT as u64, "pc-testdev interrupt lines", Fixed, Always),
    r(Port, PCI_IO_WINDOW.0, PCI_IO_WINDOW.1, "PCI I/O BARs", Window, Pci),
    r(Gsi, 0, 16, "ISA interrupts (PIT 0, i8042 1, COM1 4, RTC 8, SCI 9)", Fixed, Always),
    r(Gsi, PCI_INTX_GSI_BASE as u64, 4, "PCI INTx (_PRT)", Fixed, Pci),
    r(Gsi, PLATFORM_GSIS.0 as u64, PLATFORM_GSIS.1 as u64, "virtio-mmio interrupts", Window, Always),
    r(Gsi, MSI_GSIS.0 as u64, MSI_GSIS.1 as u64, "MSI-X vectors (KVM routes)", Window, Pci),
];

/// Start of the 64-bit PCI window: the first 1 GiB boundary above RAM
/// and above 4 GiB. `ram`: the RAM regions as `(start, len)`.
pub fn pci_mmio64_start(ram: &[(u64, u64)]) -> u64 {
    let top = ram
        .iter()
        .map(|&(s, l)| s + l)
        .max()
        .unwrap_or(0)
        .max(1 << 32);
    top.next_multiple_of(1 << 30)
}

/// The ranges of a machine with the RAM regions `ram` (`(start, len)`,
/// ascending, the first at 0), with or without PCI and the PIT, in
/// address order per space.
pub fn table(ram: &[(u64, u64)], pci: bool, pit: bool) -> Vec<Range> {
    let present = |w: When| match w {
        Always => true,
        Pit => pit,
        Pci => pci,
    };
    let mut out: Vec<Range> = Vec::new();
    let ram_range = |start: u64, len: u64, owner| r(Memory, start, len, owner, Use::Ram, Always);
    out.push(ram_range(0, EBDA_START, "RAM (conventional)"));
    let low_end = ram.first().map_or(0, |&(s, l)| s + l);
    if low_end > HIGH_MEMORY {
        out.push(ram_range(HIGH_MEMORY, low_end - HIGH_MEMORY, "RAM"));
    }
    for &(start, len) in ram.iter().skip(1) {
        out.push(ram_range(start, len, "RAM above 4 GiB"));
    }
    out.extend(FIXED.iter().filter(|x| present(x.when)).copied());
    if pci {
        out.push(r(
            Memory,
            pci_mmio64_start(ram),
            PCI_MMIO64_SIZE,
            "PCI 64-bit memory BARs",
            Window,
            Pci,
        ));
    }
    out.sort_by_key(|x| (x.space as u8, x.start));
    out
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// The table as docs/ARCHITECTURE.md shows it: fixed rows with their
/// addresses, RAM and the 64-bit window by rule.
pub fn doc_table() -> String {
    let mut s = String::from("| space | range | owner | kind | present |\n|---|---|---|---|---|\n");
    let row = |s: &mut String, space: &str, range: String, owner: &str, usage: &str, when: &str| {
        s.push_str(&format!(
            "| {space} | {range} | {owner} | {usage} | {when} |\n"
        ));
    };
    row(
        &mut s,
        "memory",
        format!("0x0-{}", hex(EBDA_START - 1)),
        "RAM (conventional)",
        "RAM",
        "always",
    );
    let mut rows: Vec<&Range> = FIXED.iter().collect();
    rows.sort_by_key(|x| (x.space as u8, x.start));
    let mut ram_done = false;
    for x in rows {
        if x.space == Memory && x.start >= MMIO_GAP_START && !ram_done {
            row(
                &mut s,
                "memory",
                format!("{}-min(RAM, {})", hex(HIGH_MEMORY), hex(MMIO_GAP_START)),
                "RAM",
                "RAM",
                "always",
            );
            ram_done = true;
        }
        let space = match x.space {
            Memory => "memory",
            Port => "port",
            Gsi => "GSI",
        };
        let range = if x.space == Gsi {
            format!("{}-{}", x.start, x.end() - 1)
        } else {
            format!("{}-{}", hex(x.start), hex(x.end() - 1))
        };
        let usage = match x.usage {
            Use::Ram => "RAM",
            Reserved => "reserved (e820)",
            Fixed => "fixed",
            Window => "window",
        };
        let when = match x.when {
            Always => "always",
            Pit => "with the PIT",
            Pci => "with PCI",
        };
        row(&mut s, space, range, x.owner, usage, when);
        if x.space == Memory && x.start == KVM_TSS_ADDR {
            row(
                &mut s,
                "memory",
                "0x100000000-(RAM beyond 3 GiB)".into(),
                "RAM above 4 GiB",
                "RAM",
                "with > 3 GiB",
            );
            row(
                &mut s,
                "memory",
                "next 1 GiB above RAM and 4 GiB, 64 GiB".into(),
                "PCI 64-bit memory BARs",
                "window",
                "with PCI",
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(mem: u64) -> Vec<(u64, u64)> {
        crate::memory::Layout::new(mem).ram
    }

    #[test]
    fn no_two_ranges_overlap() {
        for mem in [128u64 << 20, 3 << 30, 5 << 30] {
            let t = table(&ram(mem), true, true);
            for w in t.windows(2) {
                if w[0].space == w[1].space {
                    assert!(w[0].end() <= w[1].start, "{:?} overlaps {:?}", w[0], w[1]);
                }
            }
        }
    }

    #[test]
    fn fixed_ranges_stay_in_the_gap_or_low_memory() {
        for x in FIXED.iter().filter(|x| x.space == Memory) {
            assert!(
                x.end() <= 0x10_0000 || (x.start >= MMIO_GAP_START && x.end() <= 1 << 32),
                "{x:?}"
            );
        }
        for x in FIXED.iter().filter(|x| x.space == Port) {
            assert!(x.end() <= 0x1_0000, "{x:?}");
        }
    }

    #[test]
    fn high_window_sits_above_ram() {
        assert_eq!(pci_mmio64_start(&ram(128 << 20)), 1 << 32);
        assert_eq!(pci_mmio64_start(&ram(6 << 30)), 7 << 30);
    }

    #[test]
    fn pci_ranges_come_only_with_pci() {
        let without = table(&ram(128 << 20), false, true);
        assert!(without.iter().all(|x| x.when != Pci));
        let with = table(&ram(128 << 20), true, true);
        assert!(with.iter().any(|x| x.start == PCI_ECAM.0));
    }

    /// docs/ARCHITECTURE.md shows this table; it must be the code's.
    #[test]
    fn architecture_doc_shows_this_table() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ARCHITECTURE.md"))
                .unwrap();
        let table = doc_table();
        assert!(
            doc.contains(&table),
            "docs/ARCHITECTURE.md's machine layout differs from layout::doc_table(); put this there:\n{table}"
        );
    }
}
