//! MSI-X (PCI Local Bus specification, "MSI-X Capability and Table
//! Structure"): the capability in configuration space, the vector table
//! and the pending-bit array in a BAR. A vector that fires while masked
//! (by its own mask bit or the function mask) sets its pending bit and is
//! delivered when unmasked. Routes are handed to the VMM (`MsiVectors`)
//! only for vectors that can fire, so the VMM's routing table changes
//! only when the guest unmasks or reprograms one.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::PciConfig;
use crate::{MsiMessage, MsiVectors};

pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl Entry {
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<Entry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    /// Offset of the capability in configuration space.
    cap: usize,
    vectors: Arc<dyn MsiVectors>,
    /// The route last handed to the VMM per vector.
    routed: Vec<Option<MsiMessage>>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("entries", &self.entries)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `count` vectors, all masked, with the table at `table` and the PBA
    /// at `pba` (each `(bar, offset)`); the capability goes into `config`.
    pub fn new(
        config: &mut PciConfig,
        count: u16,
        table: (u8, u32),
        pba: (u8, u32),
        vectors: Arc<dyn MsiVectors>,
    ) -> Self {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(count - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table.1 | u32::from(table.0)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba.1 | u32::from(pba.0)).to_le_bytes());
        // Only Enable and Function Mask are writable.
        let cap = config.add_capability(CAP_ID, &body, &[0, 0xc0]);
        let n = usize::from(count);
        Msix {
            entries: vec![
                Entry {
                    control: VECTOR_MASKED,
                    ..Default::default()
                };
                n
            ],
            pending: vec![false; n],
            enabled: false,
            function_masked: false,
            cap,
            vectors,
            routed: vec![None; n],
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Bytes of the table (for the BAR it lives in).
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of the PBA, in whole qwords.
    pub fn pba_len(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// After a configuration write: take Enable and Function Mask.
    pub fn config_written(&mut self, config: &PciConfig) {
        let control = config.read16(self.cap + 2);
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.update_all();
    }

    fn can_fire(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.entries[v].masked()
    }

    /// Hand vector `v`'s route to the VMM if it changed, and deliver what
    /// became deliverable.
    fn update(&mut self, v: usize) {
        let want = self.can_fire(v).then(|| self.entries[v].message());
        if want != self.routed[v] {
            self.vectors.route(v as u16, want);
            self.routed[v] = want;
        }
        if want.is_some() && self.pending[v] {
            self.pending[v] = false;
            self.vectors.trigger(v as u16);
        }
    }

    fn update_all(&mut self) {
        for v in 0..self.entries.len() {
            self.update(v);
        }
    }

    /// Raise vector `v`, or mark it pending while masked.
    pub fn signal(&mut self, v: u16) {
        let v = usize::from(v);
        if v >= self.entries.len() {
            return;
        }
        if self.can_fire(v) {
            self.vectors.trigger(v as u16);
        } else {
            self.pending[v] = true;
        }
    }

    /// A read of the table at `offset`: dword or qword accesses.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some(e) = self.entries.get((at / ENTRY_SIZE) as usize) else {
                continue;
            };
            let v = match at % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                12 => e.control,
                _ => continue,
            };
            let n = chunk.len();
            chunk.copy_from_slice(&v.to_le_bytes()[..n]);
        }
    }

    /// A write of the table at `offset`: dword or qword accesses.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(4).enumerate() {
            if chunk.len() != 4 {
                continue;
            }
            let at = offset + 4 * i as u64;
            let idx = (at / ENTRY_SIZE) as usize;
            let Some(e) = self.entries.get_mut(idx) else {
                continue;
            };
            let v = u32::from_le_bytes(chunk.try_into().unwrap_or([0; 4]));
            match at % ENTRY_SIZE {
                0 => e.addr_lo = v & !0x3,
                4 => e.addr_hi = v,
                8 => e.data = v,
                12 => e.control = v & VECTOR_MASKED,
                _ => continue,
            }
            self.update(idx);
        }
    }

    /// A read of the pending-bit array at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | 1 << bit);
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Take a saved state (of as many vectors) and route what can fire.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.entries.len() != self.entries.len() || s.pending.len() != self.pending.len() {
            return Err(format!(
                "{} MSI-X vectors saved, the device has {}",
                s.entries.len(),
                self.entries.len()
            ));
        }
        self.entries = s.entries.clone();
        self.pending = s.pending.clone();
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        self.update_all();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::config::PciId;

    /// Records routes and triggers.
    #[derive(Default)]
    pub(crate) struct MsiRecorder {
        pub(crate) routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub(crate) fired: Mutex<Vec<u16>>,
    }

    impl MsiVectors for MsiRecorder {
        fn route(&self, index: u16, msg: Option<MsiMessage>) {
            self.routes.lock().unwrap().push((index, msg));
        }
        fn trigger(&self, index: u16) {
            self.fired.lock().unwrap().push(index);
        }
    }

    fn setup() -> (PciConfig, Msix, Arc<MsiRecorder>) {
        let mut c = PciConfig::new(PciId::default(), false);
        let rec = Arc::new(MsiRecorder::default());
        let m = Msix::new(&mut c, 3, (0, 0x2000), (0, 0x3000), rec.clone());
        (c, m, rec)
    }

    fn control(c: &mut PciConfig, m: &mut Msix, v: u16) {
        c.write(m.cap + 2, &v.to_le_bytes());
        m.config_written(c);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (c, m, _) = setup();
        assert_eq!(c.byte(m.cap), CAP_ID);
        assert_eq!(c.read16(m.cap + 2), 2);
        let mut d = [0u8; 4];
        c.read(m.cap + 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x2000);
        assert_eq!(m.table_len(), 48);
        assert_eq!(m.pba_len(), 8);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut c, mut m, rec) = setup();
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(24, &0x41u32.to_le_bytes());
        // Disabled: pending.
        m.signal(1);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        assert!(rec.fired.lock().unwrap().is_empty());
        control(&mut c, &mut m, CONTROL_ENABLE);
        // Still masked per vector: nothing routed yet.
        assert!(rec.routes.lock().unwrap().is_empty());
        m.write_table(28, &0u32.to_le_bytes());
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        };
        assert_eq!(*rec.routes.lock().unwrap(), vec![(1, Some(msg))]);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1]);
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        m.signal(1);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1, 1]);
        // Function mask: pending again, and the route goes.
        control(&mut c, &mut m, CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.signal(1);
        assert_eq!(rec.fired.lock().unwrap().len(), 2);
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(1, None)));
        control(&mut c, &mut m, CONTROL_ENABLE);
        assert_eq!(rec.fired.lock().unwrap().len(), 3);
    }

    #[test]
    fn table_reads_back_and_ignores_out_of_range() {
        let (_, mut m, _) = setup();
        m.write_table(0, &[1, 0, 0, 0, 2, 0, 0, 0]);
        let mut d = [0u8; 8];
        m.read_table(0, &mut d);
        assert_eq!(d, [0, 0, 0, 0, 2, 0, 0, 0]);
        m.read_table(12, &mut d[..4]);
        assert_eq!(d[..4], [1, 0, 0, 0]);
        m.write_table(0x1000, &[1; 4]);
        m.read_table(0x1000, &mut d[..4]);
        assert_eq!(d[..4], [0; 4]);
        m.signal(99);
    }

    #[test]
    fn state_round_trips() {
        let (mut c, mut m, _) = setup();
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(12, &0u32.to_le_bytes());
        control(&mut c, &mut m, CONTROL_ENABLE);
        let s = m.state();
        let (_, mut m2, rec2) = setup();
        m2.restore(&s).unwrap();
        assert_eq!(m2.state(), s);
        assert_eq!(rec2.routes.lock().unwrap().len(), 1);
        let mut bad = s.clone();
        bad.entries.pop();
        assert!(m2.restore(&bad).is_err());
    }
}
