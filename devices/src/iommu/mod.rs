//! An Intel IOMMU (VT-d) remapping unit, as QEMU's `-device
//! intel-iommu` offers it to a Q35 machine and kvm-unit-tests'
//! x86/intel-iommu.c drives it: DMA remapping in legacy mode with
//! 3- and 4-level second-level tables and 2 MiB/1 GiB pages,
//! register-based and queued invalidation, fault recording with its
//! event interrupt, and (with `intremap`) interrupt remapping in xAPIC
//! mode.
//!
//! The unit is one register page ([`regs`]); devices behind it reach
//! memory through a [`DmaPort`] (a [`DmaSpace`]) and send their MSIs
//! through [`RemappedVectors`]; any other interrupt source (an IOAPIC)
//! calls [`InterruptRemap::remap`].

pub mod fault;
pub mod queue;
pub mod regs;
pub mod remap;
pub mod translate;

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vm_memory::GuestMemoryMmap;

use crate::{
    fill_all_ones, DmaAccess, DmaFault, DmaPage, DmaSpace, MsiMessage, MsiVectors, Persist,
    RestoreError,
};
pub use fault::{Fault, Reason};
use regs::{Action, Registers};
pub use remap::{InterruptRemap, RemappedSink, RemappedVectors};

/// The source-id the DMAR table gives the IOAPIC (QEMU's: the
/// platform's pseudo bus 0xff, devfn 0).
pub const IOAPIC_SOURCE_ID: u16 = 0xff00;

/// The unit's own interrupts: vectors of its `MsiVectors`.
const FAULT_EVENT: u16 = 0;
const INVALIDATION_EVENT: u16 = 1;
/// How many vectors the unit needs from the VMM.
pub const EVENT_VECTORS: usize = 2;

pub struct Vtd {
    regs: Registers,
    mem: GuestMemoryMmap,
    /// The fault event and invalidation completion interrupts. The unit's
    /// own messages are not remapped.
    events: Arc<dyn MsiVectors>,
    /// What each event vector is routed to now.
    routed: [Option<MsiMessage>; EVENT_VECTORS],
}

impl Vtd {
    /// A unit after reset reaching `mem`, its interrupts through
    /// `events` (vector 0: fault event, 1: invalidation completion);
    /// `intremap` offers interrupt remapping.
    pub fn new(mem: GuestMemoryMmap, events: Arc<dyn MsiVectors>, intremap: bool) -> Self {
        Vtd {
            regs: Registers::new(intremap),
            mem,
            events,
            routed: [None; EVENT_VECTORS],
        }
    }

    pub fn regs(&self) -> &Registers {
        &self.regs
    }

    /// Translate `iova` for `sid`'s DMA; a blocked request is recorded.
    pub fn translate(
        &mut self,
        sid: u16,
        iova: u64,
        write: bool,
    ) -> Result<translate::Mapping, Fault> {
        translate::translate(&self.mem, &self.regs, sid, iova, write).inspect_err(|f| self.fault(f))
    }

    /// Remap an interrupt; a blocked one is recorded.
    pub fn remap_interrupt(
        &mut self,
        msg: MsiMessage,
        source_id: Option<u16>,
    ) -> Result<MsiMessage, Fault> {
        remap::remap(&self.mem, &self.regs, msg, source_id).inspect_err(|f| self.fault(f))
    }

    fn fault(&mut self, f: &Fault) {
        if self.regs.record_fault(f) {
            self.send(FAULT_EVENT);
        }
    }

    /// Send event `vector` with the message its registers hold now.
    fn send(&mut self, vector: u16) {
        let (data, lo, hi) = if vector == FAULT_EVENT {
            (self.regs.fedata, self.regs.feaddr, self.regs.feuaddr)
        } else {
            (self.regs.iedata, self.regs.ieaddr, self.regs.ieuaddr)
        };
        let msg = MsiMessage {
            address: u64::from(hi) << 32 | u64::from(lo),
            data,
        };
        let routed = &mut self.routed[usize::from(vector)];
        if *routed != Some(msg) {
            self.events.route(vector, Some(msg));
            *routed = Some(msg);
        }
        self.events.trigger(vector);
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::None => {}
            Action::RunQueue => {
                let ev = queue::run(&self.mem, &mut self.regs);
                if ev.fault {
                    self.send(FAULT_EVENT);
                }
                if ev.invalidation {
                    self.send(INVALIDATION_EVENT);
                }
            }
            Action::FaultEvent => self.send(FAULT_EVENT),
            Action::InvalidationEvent => self.send(INVALIDATION_EVENT),
        }
    }
}

/// Registers take aligned 32- and 64-bit accesses; others read all-ones
/// and write nothing.
fn access_ok(offset: u64, len: usize) -> bool {
    (len == 4 || len == 8) && offset.is_multiple_of(len as u64) && offset + len as u64 <= regs::SIZE
}

impl MutDeviceMmio for Vtd {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if !access_ok(offset, data.len()) {
            fill_all_ones(data);
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let v = self.regs.read32(offset + 4 * i as u64);
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if !access_ok(offset, data.len()) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let a = self.regs.write32(offset + 4 * i as u64, v);
            self.act(a);
        }
    }
}

impl InterruptRemap for Mutex<Vtd> {
    fn remap(&self, msg: MsiMessage, source_id: Option<u16>) -> Result<MsiMessage, Fault> {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remap_interrupt(msg, source_id)
    }
}

/// One device's memory behind the unit: its DMA carries its source-id.
pub struct DmaPort {
    unit: Arc<Mutex<Vtd>>,
    source_id: u16,
}

impl DmaPort {
    /// The port of the device at `source_id` (bus << 8 | devfn).
    pub fn new(unit: Arc<Mutex<Vtd>>, source_id: u16) -> Self {
        DmaPort { unit, source_id }
    }
}

impl DmaSpace for DmaPort {
    fn translate(&self, iova: u64, access: DmaAccess) -> Result<DmaPage, DmaFault> {
        let mut unit = self.unit.lock().unwrap_or_else(|e| e.into_inner());
        unit.translate(self.source_id, iova, access == DmaAccess::Write)
            .map(|m| DmaPage {
                gpa: m.gpa,
                len: m.len,
            })
            .map_err(|f| DmaFault {
                iova,
                reason: f.reason.to_string(),
            })
    }
}

impl Persist for Vtd {
    type State = Registers;
    /// Guest memory, the event vectors and whether interrupt remapping
    /// is offered.
    type Args = (GuestMemoryMmap, Arc<dyn MsiVectors>, bool);
    type Error = RestoreError;

    fn save(&self) -> Registers {
        self.regs.clone()
    }

    fn restore(args: Self::Args, s: &Registers) -> Result<Self, RestoreError> {
        let (mem, events, intremap) = args;
        let bad = |reason: String| RestoreError::Invalid {
            device: "intel-iommu",
            reason,
        };
        if s.intremap != intremap {
            return Err(bad(format!(
                "saved with interrupt remapping {}, restored with it {}",
                on_off(s.intremap),
                on_off(intremap)
            )));
        }
        if s.records.len() != regs::FAULT_RECORDS || usize::from(s.fri) >= s.records.len() {
            return Err(bad(format!(
                "{} fault records with index {}, not {}",
                s.records.len(),
                s.fri,
                regs::FAULT_RECORDS
            )));
        }
        let mut v = Vtd::new(mem, events, intremap);
        v.regs = s.clone();
        Ok(v)
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests;
