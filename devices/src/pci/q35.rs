//! The Q35 chipset's PCI identities, as QEMU's `-M q35` shows them and
//! kvm-unit-tests (lib/pci.c, lib/x86/intel-iommu.c) and OSes look for:
//! the MCH host bridge (8086:29c0) at 00:00.0 and the ICH9 LPC bridge
//! (8086:2918) at 00:1f.0.
//!
//! Only identities and read-only registers that describe where kvmrun put
//! things: the chipset's programmable windows (PCIEXBAR, PAM, SMRAM, the
//! LPC decode ranges) are fixed by the machine's layout and not
//! reprogrammable here, because no firmware runs to program them; the
//! guest learns ECAM from the ACPI MCFG and the PM block from the FADT.

use super::config::PciConfig;
use super::{PciConfigState, PciDevice, PciId};
use crate::{Persist, RestoreError};

/// The slot QEMU's q35 puts the LPC bridge in.
pub const LPC_SLOT: u8 = 0x1f;

/// QEMU's default subsystem IDs (Red Hat, QEMU).
const SUBSYSTEM_VENDOR: u16 = 0x1af4;
const SUBSYSTEM: u16 = 0x1100;

/// The Q35 MCH as a host bridge (class 06 00 00).
pub const MCH_ID: PciId = PciId {
    vendor: 0x8086,
    device: 0x29c0,
    revision: 0,
    class: (0x06, 0x00, 0x00),
    subsystem_vendor: SUBSYSTEM_VENDOR,
    subsystem: SUBSYSTEM,
};

/// The ICH9 LPC interface, an ISA bridge (class 06 01 00), A2 stepping.
pub const LPC_ID: PciId = PciId {
    vendor: 0x8086,
    device: 0x2918,
    revision: 0x02,
    class: (0x06, 0x01, 0x00),
    subsystem_vendor: SUBSYSTEM_VENDOR,
    subsystem: SUBSYSTEM,
};

/// LPC registers (ICH9 datasheet, "LPC Interface Bridge Registers").
const PMBASE: usize = 0x40;
const ACPI_CNTL: usize = 0x44;
const ACPI_EN: u8 = 0x80;
const PIRQA_ROUT: usize = 0x60;
const PIRQE_ROUT: usize = 0x68;
/// A PIRQ not routed to an 8259 input (the IOAPIC takes it).
const PIRQ_ROUT_DISABLED: u8 = 0x80;

/// The ICH9 LPC bridge at 00:1f.0: its header, the ACPI PM base the
/// FADT also names, and PIRQ routes that say "IOAPIC only".
pub struct Ich9Lpc {
    config: PciConfig,
}

impl Ich9Lpc {
    /// `pm_base`: where the machine's ACPI PM block decodes.
    pub fn new(pm_base: u16) -> Self {
        let mut config = PciConfig::new(LPC_ID, false);
        // Bit 0: an I/O space address.
        for (i, b) in (u32::from(pm_base) | 1).to_le_bytes().iter().enumerate() {
            config.set_byte(PMBASE + i, *b);
        }
        // ACPI decoding on, SCI on IRQ 9 (select 0).
        config.set_byte(ACPI_CNTL, ACPI_EN);
        for at in (PIRQA_ROUT..PIRQA_ROUT + 4).chain(PIRQE_ROUT..PIRQE_ROUT + 4) {
            config.set_byte(at, PIRQ_ROUT_DISABLED);
        }
        Ich9Lpc { config }
    }
}

impl PciDevice for Ich9Lpc {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
}

impl Persist for Ich9Lpc {
    type State = PciConfigState;
    /// The PM base.
    type Args = u16;
    type Error = RestoreError;

    fn save(&self) -> PciConfigState {
        self.config.state()
    }

    fn restore(pm_base: u16, state: &PciConfigState) -> Result<Self, RestoreError> {
        let mut l = Ich9Lpc::new(pm_base);
        l.config
            .restore(state)
            .map_err(|reason| RestoreError::Invalid {
                device: "ich9-lpc",
                reason,
            })?;
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r32(c: &PciConfig, at: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(at, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn lpc_identity_and_fixed_registers() {
        let mut l = Ich9Lpc::new(0x600);
        assert_eq!(r32(l.config(), 0), 0x2918_8086);
        assert_eq!(r32(l.config(), 8), 0x0601_0002);
        assert_eq!(r32(l.config(), PMBASE), 0x601);
        // Read-only: a guest cannot move the PM block or the routes.
        l.write_config(PMBASE, &0xb000u32.to_le_bytes());
        l.write_config(PIRQA_ROUT, &[0x0b]);
        assert_eq!(r32(l.config(), PMBASE), 0x601);
        assert_eq!(l.config().byte(PIRQA_ROUT), PIRQ_ROUT_DISABLED);
        assert_eq!(l.config().byte(ACPI_CNTL), ACPI_EN);
        // No interrupt pin, no BARs.
        assert_eq!(l.config().byte(super::super::config::INTERRUPT_PIN), 0);
        assert!(l.config().mappings().is_empty());
        let s = l.save();
        let l2 = Ich9Lpc::restore(0x600, &s).unwrap();
        assert_eq!(l2.save(), s);
    }
}
