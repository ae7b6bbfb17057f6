//! MSI (PCI Local Bus specification, "Message Signaled Interrupts"): the
//! capability in configuration space with one vector, a 64-bit address
//! and no per-vector masking, as QEMU's edu device has it. The route is
//! handed to the VMM (`MsiVectors`, vector 0) while MSI is enabled and
//! taken away when the guest disables it, so the VMM's routing table
//! changes only when the guest reprograms the capability.

use std::sync::Arc;

use super::config::PciConfig;
use crate::{MsiMessage, MsiVectors};

pub const CAP_ID: u8 = 0x05;
const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;
/// Offsets from the capability's start.
const CONTROL: usize = 2;
const ADDRESS_LO: usize = 4;
const ADDRESS_HI: usize = 8;
const DATA: usize = 12;

pub struct Msi {
    /// Offset of the capability in configuration space.
    cap: usize,
    vectors: Arc<dyn MsiVectors>,
    /// The route last handed to the VMM.
    routed: Option<MsiMessage>,
}

impl std::fmt::Debug for Msi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msi")
            .field("cap", &self.cap)
            .field("routed", &self.routed)
            .finish_non_exhaustive()
    }
}

impl Msi {
    /// A one-vector, 64-bit MSI capability in `config`, disabled.
    pub fn new(config: &mut PciConfig, vectors: Arc<dyn MsiVectors>) -> Self {
        // Body after ID and next pointer: control, address low and high,
        // data and two bytes of padding.
        let mut body = [0u8; 12];
        body[0..2].copy_from_slice(&CONTROL_64BIT.to_le_bytes());
        let mut wmask = [0u8; 12];
        // Enable only: one vector, so Multiple Message Enable stays 0.
        wmask[0] = CONTROL_ENABLE as u8;
        // The address is dword aligned.
        wmask[2..6].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        wmask[6..10].fill(0xff);
        wmask[10..12].fill(0xff);
        let cap = config.add_capability(CAP_ID, &body, &wmask);
        Msi {
            cap,
            vectors,
            routed: None,
        }
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> usize {
        self.cap
    }

    pub fn enabled(&self, config: &PciConfig) -> bool {
        config.read16(self.cap + CONTROL) & CONTROL_ENABLE != 0
    }

    fn message(&self, config: &PciConfig) -> MsiMessage {
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        config.read(self.cap + ADDRESS_LO, &mut lo);
        config.read(self.cap + ADDRESS_HI, &mut hi);
        MsiMessage {
            address: u64::from(u32::from_le_bytes(hi)) << 32 | u64::from(u32::from_le_bytes(lo)),
            data: u32::from(config.read16(self.cap + DATA)),
        }
    }

    /// After a configuration write: hand the VMM the route the capability
    /// now asks for, if it changed.
    pub fn config_written(&mut self, config: &PciConfig) {
        let want = self.enabled(config).then(|| self.message(config));
        if want != self.routed {
            self.vectors.route(0, want);
            self.routed = want;
        }
    }

    /// Send the message once; false if MSI is disabled (the caller then
    /// uses INTx).
    pub fn signal(&self, config: &PciConfig) -> bool {
        if !self.enabled(config) {
            return false;
        }
        self.vectors.trigger(0);
        true
    }

    /// The route handed to the VMM now.
    pub fn routed(&self) -> Option<MsiMessage> {
        self.routed
    }

    /// After a restore of configuration space: hand the route again. The
    /// route follows from configuration space alone, so a snapshot keeps
    /// nothing else of MSI.
    pub fn restore(&mut self, config: &PciConfig) {
        self.routed = None;
        self.config_written(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciId;
    use crate::pci::msix::tests::MsiRecorder;

    fn setup() -> (PciConfig, Msi, Arc<MsiRecorder>) {
        let mut c = PciConfig::new(PciId::default(), true);
        let rec = Arc::new(MsiRecorder::default());
        let m = Msi::new(&mut c, rec.clone());
        (c, m, rec)
    }

    #[test]
    fn capability_is_one_vector_64_bit() {
        let (mut c, m, _) = setup();
        assert_eq!(c.byte(m.offset()), CAP_ID);
        assert_eq!(c.read16(m.offset() + CONTROL), CONTROL_64BIT);
        // Multiple Message Enable and the capable bits are read-only.
        c.write(m.offset() + CONTROL, &0xffffu16.to_le_bytes());
        assert_eq!(
            c.read16(m.offset() + CONTROL),
            CONTROL_64BIT | CONTROL_ENABLE
        );
        c.write(m.offset() + ADDRESS_LO, &0xfee0_0003u32.to_le_bytes());
        let mut d = [0u8; 4];
        c.read(m.offset() + ADDRESS_LO, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xfee0_0000);
    }

    #[test]
    fn route_follows_enable_and_signal_needs_it() {
        let (mut c, mut m, rec) = setup();
        let at = m.offset();
        c.write(at + ADDRESS_LO, &0xfee0_1000u32.to_le_bytes());
        c.write(at + ADDRESS_HI, &0u32.to_le_bytes());
        c.write(at + DATA, &0x41u16.to_le_bytes());
        m.config_written(&c);
        assert!(rec.routes.lock().unwrap().is_empty());
        assert!(!m.signal(&c));
        c.write(at + CONTROL, &1u16.to_le_bytes());
        m.config_written(&c);
        let msg = MsiMessage {
            address: 0xfee0_1000,
            data: 0x41,
        };
        assert_eq!(*rec.routes.lock().unwrap(), [(0, Some(msg))]);
        assert!(m.signal(&c));
        assert_eq!(*rec.fired.lock().unwrap(), [0]);
        // Unchanged: no new route; disabled: the route goes.
        m.config_written(&c);
        c.write(at + CONTROL, &0u16.to_le_bytes());
        m.config_written(&c);
        assert_eq!(rec.routes.lock().unwrap()[1..], [(0, None)]);
    }

    #[test]
    fn restore_routes_again() {
        let (mut c, mut m, _) = setup();
        let at = m.offset();
        c.write(at + ADDRESS_LO, &0xfee0_0000u32.to_le_bytes());
        c.write(at + CONTROL, &1u16.to_le_bytes());
        m.config_written(&c);
        let rec = Arc::new(MsiRecorder::default());
        let mut c2 = PciConfig::new(PciId::default(), true);
        let mut m2 = Msi::new(&mut c2, rec.clone());
        c2.restore(&c.state()).unwrap();
        m2.restore(&c2);
        assert_eq!(m2.routed(), m.routed());
        assert_eq!(rec.routes.lock().unwrap().len(), 1);
    }
}
