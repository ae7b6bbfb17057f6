//! PCI on the platform: the root bus with its host bridge and
//! configuration access (0xCF8 and ECAM), and `BarPlacer`, the VMM's side
//! of BAR placement: it puts a BAR's range on the buses wherever the
//! guest programs it, and moves the ioeventfds inside it along.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::pci::{BarHost, BarKind, BarMapping, SharedPciDevice};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use crate::boot::acpi::PciWindows;
use crate::bus::IoBus;
use crate::vm::{Interrupts, IoEvent};

/// A BAR as the buses see it: accesses go to the device with the BAR's
/// index and the offset into it.
struct BarAccess {
    dev: SharedPciDevice,
    bar: u8,
}

impl DeviceMmio for BarAccess {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        lock(&self.dev).read_bar(self.bar, offset, data);
    }
    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        lock(&self.dev).write_bar(self.bar, offset, data);
    }
}

impl DevicePio for BarAccess {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        lock(&self.dev).read_bar(self.bar, u64::from(offset), data);
    }
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        lock(&self.dev).write_bar(self.bar, u64::from(offset), data);
    }
}

/// A queue notification inside a BAR: writes at `offset` into BAR `bar`
/// signal `fd`.
pub struct BarIoEvent {
    pub bar: u8,
    pub offset: u64,
    pub fd: Arc<EventFd>,
}

struct Slot {
    dev: SharedPciDevice,
    ioevents: Vec<BarIoEvent>,
}

/// Places BARs on the buses as the guest moves them.
pub struct BarPlacer {
    bus: Arc<IoBus>,
    irq: Arc<Interrupts>,
    slots: Mutex<HashMap<u8, Slot>>,
}

fn ioevent(kind: BarKind, addr: u64) -> IoEvent {
    IoEvent {
        mmio: kind != BarKind::Io,
        addr,
        datamatch: None,
    }
}

impl BarPlacer {
    pub fn new(bus: Arc<IoBus>, irq: Arc<Interrupts>) -> Self {
        BarPlacer {
            bus,
            irq,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Track the device in `slot` and place the BARs it decodes now.
    pub fn add(&self, slot: u8, dev: SharedPciDevice, ioevents: Vec<BarIoEvent>) {
        let now = lock(&dev).config().mappings();
        lock(&self.slots).insert(slot, Slot { dev, ioevents });
        for m in now {
            self.bar_moved(slot, None, Some(m));
        }
    }

    /// Take the device in `slot` off the buses.
    pub fn remove(&self, slot: u8) {
        let Some(s) = lock(&self.slots).get(&slot).map(|s| s.dev.clone()) else {
            return;
        };
        let now = lock(&s).config().mappings();
        for m in now {
            self.bar_moved(slot, Some(m), None);
        }
        lock(&self.slots).remove(&slot);
    }
}

impl BarHost for BarPlacer {
    fn bar_moved(&self, slot: u8, from: Option<BarMapping>, to: Option<BarMapping>) {
        let slots = lock(&self.slots);
        let Some(s) = slots.get(&slot) else {
            return;
        };
        if let Some(m) = from {
            for e in s.ioevents.iter().filter(|e| e.bar == m.index) {
                self.irq
                    .remove_ioevent(&e.fd, ioevent(m.kind, m.addr + e.offset));
            }
            let space = if m.kind == BarKind::Io {
                &self.bus.pio as &dyn Placement
            } else {
                &self.bus.mmio
            };
            space.take(m.addr);
        }
        let Some(m) = to else {
            return;
        };
        let access = Arc::new(BarAccess {
            dev: s.dev.clone(),
            bar: m.index,
        });
        let what = format!("PCI 00:{slot:02x}.0 BAR {}", m.index);
        let placed = if m.kind == BarKind::Io {
            self.bus.pio.insert(&what, m.addr, m.size, access)
        } else {
            self.bus.mmio.insert(&what, m.addr, m.size, access)
        };
        if let Err(e) = placed {
            // As on hardware, a BAR programmed over another range decodes
            // nothing useful; the guest sees all-ones there.
            log::debug!("{e}; left unmapped");
            return;
        }
        for e in s.ioevents.iter().filter(|e| e.bar == m.index) {
            if let Err(err) = self
                .irq
                .add_ioevent(&e.fd, ioevent(m.kind, m.addr + e.offset))
            {
                // The write then reaches the device through the bus.
                log::debug!("{what}: no ioeventfd at offset {:#x}: {err}", e.offset);
            }
        }
    }
}

/// Removal from either bus, whatever its device type.
trait Placement {
    fn take(&self, base: u64);
}

impl<D: ?Sized> Placement for crate::bus::Bus<D> {
    fn take(&self, base: u64) {
        let _ = self.remove(base);
    }
}

/// The machine's PCI root: where the host bridge decodes, the root bus
/// and the BAR placer.
pub struct PciHost {
    pub root: Arc<devices::pci::PciRoot>,
    pub placer: Arc<BarPlacer>,
    pub windows: PciWindows,
}

impl PciHost {
    pub fn windows(&self) -> PciWindows {
        self.windows
    }
}

/// Takes a PCI device off the root bus and the buses when its registry
/// entry goes.
pub struct SlotGuard {
    pub root: Arc<devices::pci::PciRoot>,
    pub placer: Arc<BarPlacer>,
    pub slot: u8,
    /// The ioeventfds' fds, kept open until then.
    pub fds: Vec<Arc<EventFd>>,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.placer.remove(self.slot);
        self.root.remove(self.slot);
    }
}
