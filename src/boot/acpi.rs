//! ACPI tables in the BIOS area: RSDP, XSDT, FADT (with FACS and DSDT) and
//! MADT, built with the acpi_tables crate.
//!
//! Tests read them to find the PM timer and the sleep registers; Linux reads
//! the MADT to find the CPUs and the IOAPIC.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::layout;
use crate::memory::{ACPI_TABLES_END, ACPI_TABLES_START, RSDP_ADDR};

pub const OEM_ID: [u8; 6] = *b"KVMRUN";
pub const OEM_TABLE_ID: [u8; 8] = *b"KVMRUNVM";
pub const OEM_REVISION: u32 = 1;
/// ISA IRQ of the ACPI SCI, as on PIIX4.
pub const SCI_IRQ: u16 = 9;
/// MADT flag: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flag: legacy devices. The 8042 flag stays
/// clear: the i8042 stub only carries the reset line, and a guest told of
/// an 8042 probes it and waits out its command timeouts (Linux spends a
/// second or more of each boot before "Can't read CTR").
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Recompute the checksum of a table whose bytes were changed after building.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// What the DSDT describes besides the sleep states.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Description {
    /// COM1 as a PNP0501 device with its ports and IRQ, so an OS that
    /// enumerates devices through ACPI (Linux's 8250_pnp) finds it. Off for
    /// multiboot images, which see the tables they always saw.
    pub com1: bool,
    /// The PCI host bridge, when the machine has PCI.
    pub pci: Option<PciWindows>,
    /// virtio-mmio devices (`LNRO0005`), so a stock Linux finds them
    /// without `virtio_mmio.device=` on its command line.
    pub virtio_mmio: Vec<MmioDevice>,
    /// The Intel IOMMU, which gets a DMAR table.
    pub dmar: Option<Dmar>,
}

/// One Intel IOMMU remapping unit: where its registers are and whether
/// it remaps interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dmar {
    pub base: u64,
    pub intremap: bool,
}

/// Where the PCI host bridge decodes: ECAM and its BAR windows, each
/// `(base, len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindows {
    pub ecam: (u64, u64),
    pub io: (u64, u64),
    pub mmio32: (u64, u64),
    pub mmio64: (u64, u64),
}

/// One platform MMIO device: its window and level-triggered GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// DSDT with the `\_S3` and `\_S5` packages, so an OS can suspend and
/// power off through PM1 control with the SLP_TYP values `acpi_pm` decodes,
/// and the devices `desc` asks for.
fn dsdt(desc: &Description) -> Vec<u8> {
    use acpi_tables::aml::{
        Device, EISAName, Interrupt, Name, Package, Path, ResourceTemplate, IO,
    };
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for (name, typ) in [("_S3_", acpi_pm::S3_SLP_TYP), ("_S5_", acpi_pm::S5_SLP_TYP)] {
        let pkg = Name::new(Path::new(name), &Package::new(vec![&typ, &typ, &0u8, &0u8]));
        t.append_slice(&to_bytes(&pkg));
    }
    if desc.com1 {
        let base = devices::serial::COM1_BASE;
        let io = IO::new(base, base, 1, devices::serial::SERIAL_PORT_COUNT as u8);
        // ISA IRQ 4, edge-triggered, active high, exclusive.
        let irq = Interrupt::new(true, true, false, false, devices::serial::COM1_GSI);
        let crs = ResourceTemplate::new(vec![&io, &irq]);
        let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
        let uid = Name::new(Path::new("_UID"), &0u8);
        let crs = Name::new(Path::new("_CRS"), &crs);
        let com1 = Device::new(Path::new("_SB_.COM1"), vec![&hid, &uid, &crs]);
        t.append_slice(&to_bytes(&com1));
    }
    if let Some(pci) = &desc.pci {
        t.append_slice(&pci_host_bridge(pci));
    }
    for (i, d) in desc.virtio_mmio.iter().enumerate() {
        t.append_slice(&virtio_mmio(i, d));
    }
    t.as_slice().to_vec()
}

/// `\_SB.PCI0`: a PCI Express root bridge (bus 0 only) with its windows
/// and the `_PRT` that sends INTA-INTD of slot s to GSI
/// `PCI_INTX_GSI_BASE + (s + pin) % 4`; and `\_SB.MBRD`, the motherboard
/// resources that reserve ECAM, which Linux wants before it uses the MCFG.
fn pci_host_bridge(w: &PciWindows) -> Vec<u8> {
    use acpi_tables::aml::{
        AddressSpace, AddressSpaceCacheable, Device, EISAName, Memory32Fixed, Name, Package, Path,
        ResourceTemplate, IO,
    };
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = IO::new(
        layout::PCI_CONFIG_PORTS.0 as u16,
        layout::PCI_CONFIG_PORTS.0 as u16,
        1,
        layout::PCI_CONFIG_PORTS.1 as u8,
    );
    let io = AddressSpace::new_io(w.io.0 as u16, (w.io.0 + w.io.1 - 1) as u16, None);
    let mem32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        w.mmio32.0 as u32,
        (w.mmio32.0 + w.mmio32.1 - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        w.mmio64.0,
        w.mmio64.0 + w.mmio64.1 - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io, &mem32, &mem64]);
    let routes: Vec<(u32, u8, u32)> = (0..32u32)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| {
                let gsi = layout::PCI_INTX_GSI_BASE + (slot + u32::from(pin)) % 4;
                ((slot << 16) | 0xffff, pin, gsi)
            })
        })
        .collect();
    let packages: Vec<Package> = routes
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &0u8, gsi]))
        .collect();
    let prt = Package::new(
        packages
            .iter()
            .map(|p| p as &dyn acpi_tables::Aml)
            .collect(),
    );
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let adr = Name::new(Path::new("_ADR"), &0u8);
    let seg = Name::new(Path::new("_SEG"), &0u8);
    let uid = Name::new(Path::new("_UID"), &0u8);
    let bbn = Name::new(Path::new("_BBN"), &0u8);
    let crs = Name::new(Path::new("_CRS"), &crs);
    let prt = Name::new(Path::new("_PRT"), &prt);
    let pci0 = Device::new(
        Path::new("_SB_.PCI0"),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs, &prt],
    );
    let ecam = Memory32Fixed::new(false, w.ecam.0 as u32, w.ecam.1 as u32);
    let mb_crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&ecam]));
    let mb_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let mbrd = Device::new(Path::new("_SB_.MBRD"), vec![&mb_hid, &uid, &mb_crs]);
    let mut out = to_bytes(&pci0);
    out.extend(to_bytes(&mbrd));
    out
}

/// `\_SB.VRnn`: virtio-mmio device `n` with its window and interrupt
/// (level-triggered, active high: the line stays up while the device's
/// interrupt status is non-zero).
fn virtio_mmio(n: usize, d: &MmioDevice) -> Vec<u8> {
    use acpi_tables::aml::{Device, Interrupt, Memory32Fixed, Name, Path, ResourceTemplate};
    let mem = Memory32Fixed::new(true, d.base as u32, d.len as u32);
    let irq = Interrupt::new(true, false, false, false, d.gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&mem, &irq]));
    let hid = Name::new(Path::new("_HID"), &"LNRO0005");
    let uid = Name::new(Path::new("_UID"), &(n as u32));
    let path = format!("_SB_.VR{n:02X}");
    to_bytes(&Device::new(Path::new(&path), vec![&hid, &uid, &crs]))
}

/// The MCFG: ECAM of segment 0, bus 0.
fn mcfg(ecam: u64) -> Vec<u8> {
    let mut m = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(ecam, 0, 0, 0);
    to_bytes(&m)
}

/// DMAR flags: interrupt remapping supported.
const DMAR_INTR_REMAP: u8 = 1 << 0;
/// DRHD flags: the unit covers every PCI device of its segment.
const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// Device scope type of an IOAPIC.
const SCOPE_IOAPIC: u8 = 3;

/// The DMAR (Intel VT-d specification, "DMA Remapping Reporting
/// Structure"): the host address width, then one DMA Remapping Hardware
/// Unit Definition covering all of segment 0's PCI devices, with the
/// IOAPIC (`ioapic_id`) in its scope at the source-id interrupt
/// remapping checks it by.
fn dmar(d: &Dmar, ioapic_id: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"DMAR", 48, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u8(36, (devices::iommu::regs::MGAW - 1) as u8);
    t.write_u8(37, if d.intremap { DMAR_INTR_REMAP } else { 0 });
    let sid = devices::iommu::IOAPIC_SOURCE_ID;
    let scope = [
        SCOPE_IOAPIC,
        8,
        0,
        0,
        ioapic_id,
        (sid >> 8) as u8,
        // The path: device and function on the start bus.
        (sid as u8) >> 3,
        (sid as u8) & 7,
    ];
    let mut drhd = Vec::new();
    drhd.extend_from_slice(&0u16.to_le_bytes());
    drhd.extend_from_slice(&(16 + scope.len() as u16).to_le_bytes());
    drhd.push(DRHD_INCLUDE_PCI_ALL);
    drhd.push(0);
    drhd.extend_from_slice(&0u16.to_le_bytes());
    drhd.extend_from_slice(&d.base.to_le_bytes());
    drhd.extend_from_slice(&scope);
    t.append_slice(&drhd);
    t.as_slice().to_vec()
}

fn facs() -> Vec<u8> {
    to_bytes(&acpi_tables::facs::FACS::new())
}

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_32(dsdt as u32)
        .firmware_ctrl_32(facs as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.sci_int = SCI_IRQ.into();
    let pm = acpi_pm::PM_BASE as u32;
    b.pm1a_evt_blk = (pm + acpi_pm::PM1_EVT_OFFSET as u32).into();
    b.pm1a_cnt_blk = (pm + acpi_pm::PM1_CNT_OFFSET as u32).into();
    b.pm_tmr_blk = (pm + acpi_pm::PM_TMR_OFFSET as u32).into();
    b.pm1_evt_len = 4;
    b.pm1_cnt_len = 2;
    b.pm_tmr_len = 4;
    b.iapc_boot_arch = IAPC_LEGACY_DEVICES.into();
    b.century = devices::rtc::REG_CENTURY;
    to_bytes(&b.finalize())
}

/// The IOAPIC's ID: the first after the CPUs' APIC IDs.
fn ioapic_id(vcpus: u32) -> u8 {
    vcpus as u8
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_ADDR as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(ioapic_id(vcpus), layout::IOAPIC_ADDR as u32, 0));
    let mut bytes = to_bytes(&m);
    // The crate leaves the MADT flags at 0; say the PICs are there too.
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// Where the tables went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: u64,
    /// The FACS holds the firmware waking vector an S3 resume jumps to.
    pub facs: u64,
}

/// Offset of `firmware_waking_vector` in the FACS.
pub const FACS_WAKING_VECTOR: u64 = 12;

/// Build every table for `vcpus` CPUs and write them to guest memory.
///
/// The MADT has no interrupt source overrides: KVM's default GSI routing
/// sends ISA IRQ n to IOAPIC pin n (the PIT's IRQ 0 included), which is
/// what an OS assumes without overrides. An IRQ 0 -> GSI 2 override, as on
/// real chipsets, would need the routing changed to match.
pub fn setup(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    desc: &Description,
) -> Result<AcpiTables, BootError> {
    let mut next = ACPI_TABLES_START;
    let mut place = |bytes: &[u8], align: u64| -> Result<u64, BootError> {
        let at = next.next_multiple_of(align);
        let end = at + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(BootError::AcpiTooBig {
                needed: end - ACPI_TABLES_START,
                room: ACPI_TABLES_END - ACPI_TABLES_START,
            });
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| BootError::Memory {
                addr: at,
                reason: e.to_string(),
            })?;
        next = end;
        Ok(at)
    };
    let dsdt_at = place(&dsdt(desc), 16)?;
    // The FACS must be 64-byte aligned.
    let facs_at = place(&facs(), 64)?;
    let fadt_at = place(&fadt(dsdt_at, facs_at), 16)?;
    let madt_at = place(&madt(vcpus), 16)?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    if let Some(pci) = &desc.pci {
        xsdt.add_entry(place(&mcfg(pci.ecam.0), 16)?);
    }
    if let Some(d) = &desc.dmar {
        xsdt.add_entry(place(&dmar(d, ioapic_id(vcpus)), 16)?);
    }
    place(&to_bytes(&xsdt), 16).and_then(|xsdt_at| {
        let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_at));
        mem.write_slice(&rsdp, GuestAddress(RSDP_ADDR))
            .map_err(|e| BootError::Memory {
                addr: RSDP_ADDR,
                reason: e.to_string(),
            })?;
        Ok(AcpiTables {
            rsdp: RSDP_ADDR,
            facs: facs_at,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Description {
        Description {
            com1: true,
            pci: Some(PciWindows {
                ecam: layout::PCI_ECAM,
                io: layout::PCI_IO_WINDOW,
                mmio32: layout::PCI_MMIO32_WINDOW,
                mmio64: (1 << 32, layout::PCI_MMIO64_SIZE),
            }),
            virtio_mmio: vec![MmioDevice {
                base: 0xe010_0000,
                len: 0x1000,
                gsi: 20,
            }],
            dmar: Some(Dmar {
                base: layout::IOMMU_ADDR,
                intremap: true,
            }),
        }
    }

    #[test]
    fn dsdt_describes_pci_and_virtio_mmio_on_request() {
        let plain = dsdt(&Description::default());
        let d = dsdt(&full());
        let has = |d: &[u8], n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(!has(&plain, b"PCI0") && !has(&plain, b"LNRO0005"));
        assert!(has(&d, b"PCI0") && has(&d, b"_PRT") && has(&d, b"MBRD"));
        // EISAID("PNP0A08") and ("PNP0C02").
        assert!(has(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&d, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
        assert!(has(&d, b"LNRO0005") && has(&d, b"VR00"));
        // Memory32Fixed, read-write, at 0xe0100000, 4 KiB.
        assert!(has(
            &d,
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0x10, 0xe0, 0x00, 0x10, 0, 0]
        ));
        // Extended IRQ descriptor: consumer, level, active high; GSI 20.
        assert!(has(&d, &[0x89, 0x06, 0x00, 0x01, 0x01, 20, 0, 0, 0]));
        // The _PRT's entry for slot 1, INTA: GSI 17.
        assert!(has(
            &d,
            &[0x0c, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x0a, 17]
        ));
    }

    #[test]
    fn dmar_has_one_unit_for_all_pci_devices_and_the_ioapic() {
        let d = dmar(
            &Dmar {
                base: 0xfed9_0000,
                intremap: true,
            },
            4,
        );
        assert_eq!(&d[..4], b"DMAR");
        assert_eq!(d.len(), 48 + 16 + 8);
        assert_eq!((d[36], d[37]), (47, 1));
        // DRHD: type 0, length 24, INCLUDE_PCI_ALL, segment 0, base.
        assert_eq!(&d[48..54], &[0, 0, 24, 0, 1, 0]);
        assert_eq!(
            u64::from_le_bytes(d[56..64].try_into().unwrap()),
            0xfed9_0000
        );
        // IOAPIC 4 at source-id ff:00.0.
        assert_eq!(&d[64..72], &[3, 8, 0, 0, 4, 0xff, 0, 0]);
    }

    #[test]
    fn mcfg_points_at_ecam() {
        let m = mcfg(0xe000_0000);
        assert_eq!(&m[..4], b"MCFG");
        assert_eq!(m.len(), 60);
        assert_eq!(
            u64::from_le_bytes(m[44..52].try_into().unwrap()),
            0xe000_0000
        );
        assert_eq!((m[54], m[55]), (0, 0));
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero() {
        for t in [
            dsdt(&Description::default()),
            dsdt(&Description {
                com1: true,
                ..Default::default()
            }),
            dsdt(&full()),
            mcfg(0xe000_0000),
            dmar(full().dmar.as_ref().unwrap(), 4),
            facs(),
            fadt(0x1000, 0x2000),
            madt(4),
        ] {
            if &t[..4] != b"FACS" {
                assert_eq!(sum(&t), 0, "{}", String::from_utf8_lossy(&t[..4]));
                assert_eq!(
                    u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                    t.len()
                );
            }
        }
    }

    #[test]
    fn dsdt_has_sleep_states() {
        let d = dsdt(&Description::default());
        let has = |n: &[u8]| d.windows(4).any(|w| w == n);
        assert!(has(b"_S3_") && has(b"_S5_"));
        assert!(!has(b"COM1"));
    }

    #[test]
    fn dsdt_describes_com1_on_request() {
        let d = dsdt(&Description {
            com1: true,
            ..Default::default()
        });
        let has = |n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(has(b"COM1") && has(b"_HID") && has(b"_CRS"));
        // EISAID("PNP0501") and the 16-bit decode IO descriptor for 0x3f8, 8 ports.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // Extended IRQ descriptor: consumer, edge, active high; IRQ 4.
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]));
    }

    #[test]
    fn madt_lists_every_cpu() {
        let m = madt(3);
        let mut off = 44;
        let mut cpus = 0;
        while off < m.len() {
            if m[off] == 0 {
                cpus += 1;
                assert_eq!(m[off + 3], cpus - 1);
            }
            off += m[off + 1] as usize;
        }
        assert_eq!(cpus, 3);
        assert_eq!(m[40] & 1, 1);
    }

    #[test]
    fn fadt_points_at_pm_block() {
        let f = fadt(0x1000, 0x2000);
        let u32_at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(36), 0x2000);
        assert_eq!(u32_at(40), 0x1000);
        assert_eq!(u32_at(76), 0x608);
        // IAPC_BOOT_ARCH (offset 109): legacy devices, no 8042.
        assert_eq!(u16::from_le_bytes([f[109], f[110]]), 1);
    }
}
