//! Interrupt remapping in xAPIC mode (Intel VT-d specification,
//! "Interrupt Remapping"; `eim=off`): a remappable-format MSI names an
//! entry of the interrupt remapping table, and the entry says which
//! interrupt is delivered. [`RemappedVectors`] puts it between a
//! device's MSI and the VMM's routes.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::fault::{Fault, Reason};
use super::regs::{Registers, GCMD_CFI, GCMD_IRE, PAGE_MASK};
use crate::{MsiMessage, MsiSink, MsiVectors};

/// Interrupt requests are writes to 0xFEEx_xxxx.
const INTERRUPT_WINDOW: u64 = 0xfee0_0000;
const WINDOW_MASK: u64 = 0xffff_ffff_fff0_0000;
/// Remappable-format address fields: format, sub-handle valid, and the
/// handle in bits 19:5 with its bit 15 in bit 2.
const ADDR_REMAPPABLE: u64 = 1 << 4;
const ADDR_SHV: u64 = 1 << 3;
/// IRTE, low quadword: present, FPD, destination mode, redirection hint,
/// trigger mode, delivery mode, IRTE mode (posted), vector, and the xAPIC
/// destination in bits 47:40.
const IRTE_PRESENT: u64 = 1 << 0;
const IRTE_FPD: u64 = 1 << 1;
const IRTE_POSTED: u64 = 1 << 15;
/// Reserved in xAPIC mode: bits 14:12, 31:24, 39:32 and 63:48.
const IRTE_RESERVED_LO: u64 = 0xffff_00ff_ff00_7000;
/// IRTE, high quadword: source-id, its qualifier and validation type;
/// bits 63:20 reserved.
const IRTE_RESERVED_HI: u64 = !0xf_ffff;

/// An interrupt remapper: the unit's side of every interrupt source.
pub trait InterruptRemap: Send + Sync {
    /// The interrupt `msg` from `source_id` (bus << 8 | devfn) becomes.
    /// `None` skips source-id verification: QEMU's IOAPIC sends without
    /// a requester id, and kvm-unit-tests programs the edu device's id
    /// into the IOAPIC's entries. A blocked interrupt is recorded as a
    /// fault (unless its entry disables that) and returned.
    fn remap(&self, msg: MsiMessage, source_id: Option<u16>) -> Result<MsiMessage, Fault>;
}

/// Remap `msg` with the table the registers point at.
pub fn remap<M: GuestMemory>(
    mem: &M,
    regs: &Registers,
    msg: MsiMessage,
    source_id: Option<u16>,
) -> Result<MsiMessage, Fault> {
    if !regs.enabled(GCMD_IRE) || msg.address & WINDOW_MASK != INTERRUPT_WINDOW {
        return Ok(msg);
    }
    let sid = source_id.unwrap_or(0);
    let fault = |reason, index: u64, disabled| Fault {
        reason,
        source_id: sid,
        info: index << 48,
        read: false,
        disabled,
    };
    if msg.address & ADDR_REMAPPABLE == 0 {
        if regs.enabled(GCMD_CFI) {
            return Ok(msg);
        }
        return Err(fault(Reason::IrCompatBlocked, 0, false));
    }
    let handle = ((msg.address >> 5) & 0x7fff) | ((msg.address >> 2) & 1) << 15;
    let index = if msg.address & ADDR_SHV != 0 {
        handle + u64::from(msg.data & 0xffff)
    } else {
        handle
    };
    let entries = 2u64 << (regs.irt & 0xf);
    if index >= entries {
        return Err(fault(Reason::IrIndexBeyond, index, false));
    }
    let at = (regs.irt & PAGE_MASK) + index * 16;
    let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
    let (Some(lo), Some(hi)) = (read(at), read(at + 8)) else {
        return Err(fault(Reason::IrteAccess, index, false));
    };
    let fpd = lo & IRTE_FPD != 0;
    if lo & IRTE_PRESENT == 0 {
        return Err(fault(Reason::IrteNotPresent, index, fpd));
    }
    let svt_reserved = (hi >> 18) & 3 == 3;
    if lo & (IRTE_RESERVED_LO | IRTE_POSTED) != 0 || hi & IRTE_RESERVED_HI != 0 || svt_reserved {
        return Err(fault(Reason::IrteReserved, index, fpd));
    }
    if let Some(sid) = source_id {
        if !source_matches(hi, sid) {
            return Err(fault(Reason::IrSourceId, index, fpd));
        }
    }
    Ok(compose(lo))
}

/// Source-id validation ("SVT"): none, the whole id under the qualifier's
/// mask of function bits, or a bus range (the fourth type is reserved,
/// refused with the other reserved bits).
fn source_matches(hi: u64, sid: u16) -> bool {
    let want = hi as u16;
    match (hi >> 18) & 3 {
        0 => true,
        1 => {
            let ignore: u16 = [0, 0b100, 0b110, 0b111][((hi >> 16) & 3) as usize];
            want & !ignore == sid & !ignore
        }
        _ => (want >> 8..=want & 0xff).contains(&(sid >> 8)),
    }
}

/// The compatibility-format MSI an IRTE stands for.
fn compose(lo: u64) -> MsiMessage {
    let dest = (lo >> 40) & 0xff;
    let dm = (lo >> 2) & 1;
    let rh = (lo >> 3) & 1;
    let tm = ((lo >> 4) & 1) as u32;
    let dlm = ((lo >> 5) & 7) as u32;
    let vector = ((lo >> 16) & 0xff) as u32;
    MsiMessage {
        address: INTERRUPT_WINDOW | dest << 12 | rh << 3 | dm << 2,
        data: vector | dlm << 8 | tm << 15,
    }
}

/// A device's MSI vectors behind interrupt remapping: each trigger is
/// remapped with the table as it is then, and the VMM's route changes
/// only when the result does. Remapping at trigger time, not at route
/// time, follows the guest's IRTE changes without watching for
/// interrupt entry cache invalidations.
pub struct RemappedVectors {
    inner: Arc<dyn MsiVectors>,
    remapper: Arc<dyn InterruptRemap>,
    source_id: u16,
    /// Per vector: the message the device asks for and the one routed.
    slots: Mutex<Vec<(Option<MsiMessage>, Option<MsiMessage>)>>,
}

impl RemappedVectors {
    pub fn new(
        inner: Arc<dyn MsiVectors>,
        remapper: Arc<dyn InterruptRemap>,
        source_id: u16,
    ) -> Self {
        RemappedVectors {
            inner,
            remapper,
            source_id,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<(Option<MsiMessage>, Option<MsiMessage>)>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MsiVectors for RemappedVectors {
    fn route(&self, index: u16, msg: Option<MsiMessage>) {
        let mut slots = self.slots();
        let i = usize::from(index);
        if slots.len() <= i {
            slots.resize(i + 1, (None, None));
        }
        slots[i].0 = msg;
        if msg.is_none() && slots[i].1.take().is_some() {
            self.inner.route(index, None);
        }
    }

    fn trigger(&self, index: u16) {
        let mut slots = self.slots();
        let Some(slot) = slots.get_mut(usize::from(index)) else {
            return;
        };
        let Some(msg) = slot.0 else {
            return;
        };
        match self.remapper.remap(msg, Some(self.source_id)) {
            Ok(m) => {
                if slot.1 != Some(m) {
                    self.inner.route(index, Some(m));
                    slot.1 = Some(m);
                }
                self.inner.trigger(index);
            }
            Err(f) => log::debug!(
                "interrupt {msg:x?} of {:04x} blocked: {}",
                self.source_id,
                f.reason
            ),
        }
    }
}

/// An interrupt controller's MSIs (the split irqchip's IOAPIC) behind
/// interrupt remapping. As for [`RemappedVectors`], a message is remapped
/// each time it is sent, and a pin's route follows the result, so KVM's
/// end-of-interrupt tracking sees the vector and destination the remapped
/// interrupt really has. The IOAPIC sends without a source-id (as QEMU's
/// does).
pub struct RemappedSink {
    inner: Arc<dyn MsiSink>,
    remapper: Arc<dyn InterruptRemap>,
    /// Per pin: the message the IOAPIC asks for and the one routed.
    pins: Mutex<Vec<(MsiMessage, Option<MsiMessage>)>>,
}

impl RemappedSink {
    pub fn new(inner: Arc<dyn MsiSink>, remapper: Arc<dyn InterruptRemap>) -> Self {
        RemappedSink {
            inner,
            remapper,
            pins: Mutex::new(Vec::new()),
        }
    }

    fn pins(&self) -> std::sync::MutexGuard<'_, Vec<(MsiMessage, Option<MsiMessage>)>> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Route `pin` as `msg` remapped now, if that changes its route.
    fn reroute(&self, pin: usize, slot: &mut (MsiMessage, Option<MsiMessage>)) {
        if let Ok(m) = self.remapper.remap(slot.0, None) {
            if slot.1 != Some(m) {
                self.inner.route_pin(pin as u8, m);
                slot.1 = Some(m);
            }
        }
    }
}

impl MsiSink for RemappedSink {
    fn send(&self, msg: MsiMessage) {
        let mut pins = self.pins();
        for (pin, slot) in pins.iter_mut().enumerate() {
            if slot.0 == msg {
                self.reroute(pin, slot);
            }
        }
        match self.remapper.remap(msg, None) {
            Ok(m) => self.inner.send(m),
            Err(f) => log::debug!("IOAPIC interrupt {msg:x?} blocked: {}", f.reason),
        }
    }

    fn route_pin(&self, pin: u8, msg: MsiMessage) {
        let mut pins = self.pins();
        let i = usize::from(pin);
        if pins.len() <= i {
            pins.resize(i + 1, (msg, None));
        }
        pins[i].0 = msg;
        let mut slot = pins[i];
        self.reroute(i, &mut slot);
        pins[i] = slot;
    }
}
