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
/// FADT IA-PC boot architecture flags: legacy devices and an 8042.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Platform {
    /// COM1 as a PNP0501 device with its ports and IRQ, so an OS that
    /// enumerates devices through ACPI (Linux's 8250_pnp) finds it. Off for
    /// multiboot images, which see the tables they always saw.
    pub com1: bool,
}

/// DSDT with the `\_S3` and `\_S5` packages, so an OS can suspend and
/// power off through PM1 control with the SLP_TYP values `acpi_pm` decodes,
/// and the devices `platform` asks for.
fn dsdt(platform: Platform) -> Vec<u8> {
    use acpi_tables::aml::{
        Device, EISAName, Interrupt, Name, Package, Path, ResourceTemplate, IO,
    };
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for (name, typ) in [("_S3_", acpi_pm::S3_SLP_TYP), ("_S5_", acpi_pm::S5_SLP_TYP)] {
        let pkg = Name::new(Path::new(name), &Package::new(vec![&typ, &typ, &0u8, &0u8]));
        t.append_slice(&to_bytes(&pkg));
    }
    if platform.com1 {
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
    b.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042).into();
    b.century = devices::rtc::REG_CENTURY;
    to_bytes(&b.finalize())
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
    m.add_structure(IoApic::new(vcpus as u8, layout::IOAPIC_ADDR as u32, 0));
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
    platform: Platform,
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
    let dsdt_at = place(&dsdt(platform), 16)?;
    // The FACS must be 64-byte aligned.
    let facs_at = place(&facs(), 64)?;
    let fadt_at = place(&fadt(dsdt_at, facs_at), 16)?;
    let madt_at = place(&madt(vcpus), 16)?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
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

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero() {
        for t in [
            dsdt(Platform::default()),
            dsdt(Platform { com1: true }),
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
        let d = dsdt(Platform::default());
        let has = |n: &[u8]| d.windows(4).any(|w| w == n);
        assert!(has(b"_S3_") && has(b"_S5_"));
        assert!(!has(b"COM1"));
    }

    #[test]
    fn dsdt_describes_com1_on_request() {
        let d = dsdt(Platform { com1: true });
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
    }
}
