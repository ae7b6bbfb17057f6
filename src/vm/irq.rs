//! The KVM side of the interrupt and notification traits devices use:
//! interrupt lines (KVM_IRQ_LINE), irqfds, MSI routes (KVM_SET_GSI_ROUTING)
//! and ioeventfds. Devices get these as `devices` traits or event fds and
//! never see the VM fd.
//!
//! With the split irqchip the IOAPIC is kvmrun's (`devices::ioapic`):
//! interrupt lines drive its pins instead of KVM_IRQ_LINE, an irqfd of an
//! IOAPIC pin is an event fd the main loop relays to the pin
//! (`PinRelay`), and the routes of GSIs 0-23 mirror the IOAPIC's
//! redirection table as MSIs, so KVM's local APICs report the EOIs of
//! level-triggered vectors (KVM_EXIT_IOAPIC_EOI). The IOAPIC delivers
//! through `KvmMsiSink` (KVM_SIGNAL_MSI).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use devices::ioapic::Ioapic;
use devices::{IrqLine, MsiMessage, MsiSink, MsiVectors};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::VmError;
use crate::layout::IOAPIC_PINS;

fn setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { what, source }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where a queue notification lands, and which written value it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEvent {
    pub mmio: bool,
    pub addr: u64,
    /// A 4-byte write of this value; `None`: a write of any width and value.
    pub datamatch: Option<u32>,
}

/// The interrupt source that relayed irqfds drive their pins as.
const RELAY_SOURCE: u64 = 1 << 63;

/// The GSI routes kvmrun sets.
#[derive(Default)]
struct Routes {
    /// MSI routes by GSI; empty until a device routes a vector, so a VM
    /// without MSIs keeps KVM's default routing untouched.
    msi: BTreeMap<u32, MsiMessage>,
    /// With the split irqchip, what each IOAPIC pin delivers as.
    pins: Option<Vec<MsiMessage>>,
}

/// The VM's interrupt routing and notification fds.
pub struct Interrupts {
    fd: Arc<VmFd>,
    /// Per GSI, the sources holding it high: a line shared by several
    /// devices stays high while any of them asserts it.
    levels: Mutex<HashMap<u32, u64>>,
    routes: Mutex<Routes>,
    /// kvmrun's IOAPIC, with the split irqchip, once it is attached.
    ioapic: OnceLock<Arc<Mutex<Ioapic>>>,
    /// With the split irqchip, irqfds of IOAPIC pins for the main loop to
    /// relay.
    relays: Mutex<Vec<(EventFd, u32)>>,
}

impl Interrupts {
    pub(super) fn new(fd: Arc<VmFd>, split: bool) -> Self {
        let routes = Routes {
            msi: BTreeMap::new(),
            pins: split.then(|| vec![MsiMessage::default(); IOAPIC_PINS as usize]),
        };
        Interrupts {
            fd,
            levels: Mutex::new(HashMap::new()),
            routes: Mutex::new(routes),
            ioapic: OnceLock::new(),
            relays: Mutex::new(Vec::new()),
        }
    }

    /// Whether the IOAPIC is kvmrun's (the split irqchip).
    pub fn split(&self) -> bool {
        lock(&self.routes).pins.is_some()
    }

    /// Where kvmrun's IOAPIC delivers its interrupts.
    pub fn msi_sink(self: &Arc<Self>) -> Arc<dyn MsiSink> {
        Arc::new(KvmMsiSink(Arc::downgrade(self)))
    }

    /// Send the lines to kvmrun's IOAPIC from now on.
    pub fn set_ioapic(&self, ioapic: Arc<Mutex<Ioapic>>) {
        if self.ioapic.set(ioapic).is_err() {
            log::warn!("a second IOAPIC was attached; the first keeps the lines");
        }
    }

    /// An event fd whose writes raise an edge on `gsi` (an irqfd). With
    /// the split irqchip an IOAPIC pin's is relayed by the main loop
    /// (`take_relays()`).
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
        if self.split() && gsi < IOAPIC_PINS {
            let relay = evt.try_clone().map_err(VmError::EventFd)?;
            lock(&self.relays).push((relay, gsi));
            return Ok(evt);
        }
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(setup("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// The irqfds the main loop must relay to IOAPIC pins, by pin.
    pub fn take_relays(&self) -> Vec<(EventFd, u32)> {
        std::mem::take(&mut *lock(&self.relays))
    }

    /// An edge on `gsi`, for a relayed irqfd.
    pub fn pulse(&self, gsi: u32) {
        self.set_level(RELAY_SOURCE, gsi, true);
        self.set_level(RELAY_SOURCE, gsi, false);
    }

    pub fn remove_irqfd(&self, evt: &EventFd, gsi: u32) {
        if let Err(e) = self.fd.unregister_irqfd(evt, gsi) {
            log::debug!("KVM_IRQFD deassign of GSI {gsi}: {e}");
        }
    }

    /// A level-triggered line any GSI can be driven through, as source
    /// `source` (0-63): the GSI is high while any source holds it high.
    pub fn line(self: &Arc<Self>, source: u8) -> Arc<dyn IrqLine> {
        Arc::new(SharedLine {
            irq: self.clone(),
            bit: 1u64 << (source & 63),
        })
    }

    fn set_level(&self, bit: u64, gsi: u32, level: bool) {
        let mut levels = lock(&self.levels);
        let held = levels.entry(gsi).or_insert(0);
        if level {
            *held |= bit;
        } else {
            *held &= !bit;
        }
        let after = *held != 0;
        drop(levels);
        if let Some(ioapic) = self.ioapic.get() {
            lock(ioapic).set_irq(gsi as usize, after);
            return;
        }
        // Every write reaches KVM, as a raise of a raised line did before
        // lines were shared; KVM finds the edges itself.
        if let Err(e) = self.fd.set_irq_line(gsi, after) {
            log::warn!("KVM_IRQ_LINE gsi {gsi} level {after}: {e}");
        }
    }

    /// Route `gsi` to `msg`, or remove its route, and load the routing
    /// table into KVM.
    pub fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), VmError> {
        let mut routes = lock(&self.routes);
        let changed = match msg {
            Some(m) => routes.msi.insert(gsi, m) != Some(m),
            None => routes.msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        self.load_routes(&routes)
    }

    /// Mirror IOAPIC pin `pin`'s message in GSI `pin`'s route.
    fn set_pin_route(&self, pin: u8, msg: MsiMessage) -> Result<(), VmError> {
        let mut routes = lock(&self.routes);
        let Some(slot) = routes
            .pins
            .as_mut()
            .and_then(|p| p.get_mut(usize::from(pin)))
        else {
            return Ok(());
        };
        *slot = msg;
        self.load_routes(&routes)
    }

    /// Load the whole routing table into KVM.
    fn load_routes(&self, routes: &Routes) -> Result<(), VmError> {
        let table = routing_table(routes);
        let mut routing = KvmIrqRouting::new(0).map_err(|_| VmError::Routing(table.len()))?;
        for e in &table {
            routing
                .push(*e)
                .map_err(|_| VmError::Routing(table.len()))?;
        }
        self.fd
            .set_gsi_routing(&routing)
            .map_err(setup("KVM_SET_GSI_ROUTING"))
    }

    /// Signal `evt` when the guest writes to `ev` instead of exiting.
    pub fn add_ioevent(&self, evt: &EventFd, ev: IoEvent) -> Result<(), VmError> {
        let addr = ev.addr();
        match ev.datamatch {
            Some(v) => self.fd.register_ioevent(evt, &addr, v),
            None => self.fd.register_ioevent(evt, &addr, NoDatamatch),
        }
        .map_err(setup("KVM_IOEVENTFD"))
    }

    pub fn remove_ioevent(&self, evt: &EventFd, ev: IoEvent) {
        let addr = ev.addr();
        let r = match ev.datamatch {
            Some(v) => self.fd.unregister_ioevent(evt, &addr, v),
            None => self.fd.unregister_ioevent(evt, &addr, NoDatamatch),
        };
        if let Err(e) = r {
            log::debug!("KVM_IOEVENTFD deassign at {:#x}: {e}", ev.addr);
        }
    }
}

impl IoEvent {
    fn addr(&self) -> IoEventAddress {
        if self.mmio {
            IoEventAddress::Mmio(self.addr)
        } else {
            IoEventAddress::Pio(self.addr)
        }
    }
}

/// KVM's default routes (each ISA IRQ to its PIC pin and IOAPIC pin, the
/// other IOAPIC pins to themselves, as kvm_setup_default_irq_routing()
/// builds them), or with the split irqchip the IOAPIC pins' messages;
/// then the MSI routes: KVM_SET_GSI_ROUTING replaces the whole table.
fn routing_table(routes: &Routes) -> Vec<kvm_irq_routing_entry> {
    let mut out = Vec::new();
    if let Some(pins) = &routes.pins {
        out.extend((0u32..).zip(pins).map(|(gsi, m)| msi_entry(gsi, m)));
        out.extend(routes.msi.iter().map(|(&gsi, m)| msi_entry(gsi, m)));
        return out;
    }
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    for gsi in 0..IOAPIC_PINS {
        out.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let pic = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            out.push(chip(gsi, pic, gsi % 8));
        }
    }
    out.extend(routes.msi.iter().map(|(&gsi, m)| msi_entry(gsi, m)));
    out
}

fn msi_entry(gsi: u32, m: &MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

/// kvmrun's IOAPIC's way to KVM's local APICs. Weak: the IOAPIC is
/// reached from `Interrupts`, which must not be kept alive by it.
struct KvmMsiSink(Weak<Interrupts>);

impl MsiSink for KvmMsiSink {
    fn send(&self, msg: MsiMessage) {
        let Some(irq) = self.0.upgrade() else {
            return;
        };
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        if let Err(e) = irq.fd.signal_msi(m) {
            log::warn!("KVM_SIGNAL_MSI {:#x}/{:#x}: {e}", msg.address, msg.data);
        }
    }

    fn route_pin(&self, pin: u8, msg: MsiMessage) {
        if let Some(irq) = self.0.upgrade() {
            if let Err(e) = irq.set_pin_route(pin, msg) {
                log::warn!("IOAPIC pin {pin}: {e}");
            }
        }
    }
}

struct SharedLine {
    irq: Arc<Interrupts>,
    bit: u64,
}

impl IrqLine for SharedLine {
    fn set_level(&self, gsi: u32, level: bool) {
        self.irq.set_level(self.bit, gsi, level);
    }
}

/// One device's MSI vectors: vector i is GSI `gsis[i]`, raised through
/// irqfd `fds[i]`.
pub struct KvmMsiVectors {
    irq: Arc<Interrupts>,
    gsis: Vec<u32>,
    fds: Vec<EventFd>,
}

impl KvmMsiVectors {
    /// An irqfd for each of `gsis`.
    pub fn new(irq: &Arc<Interrupts>, gsis: Vec<u32>) -> Result<Self, VmError> {
        let fds = gsis
            .iter()
            .map(|&g| irq.irqfd(g))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KvmMsiVectors {
            irq: irq.clone(),
            gsis,
            fds,
        })
    }

    pub fn gsis(&self) -> &[u32] {
        &self.gsis
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        for (fd, &gsi) in self.fds.iter().zip(&self.gsis) {
            self.irq.remove_irqfd(fd, gsi);
            let _ = self.irq.set_msi_route(gsi, None);
        }
    }
}

impl MsiVectors for KvmMsiVectors {
    fn route(&self, index: u16, msg: Option<MsiMessage>) {
        let Some(&gsi) = self.gsis.get(usize::from(index)) else {
            return;
        };
        if let Err(e) = self.irq.set_msi_route(gsi, msg) {
            log::warn!("MSI vector {index} (GSI {gsi}): {e}");
        }
    }

    fn trigger(&self, index: u16) {
        if let Some(fd) = self.fds.get(usize::from(index)) {
            if let Err(e) = fd.write(1) {
                log::warn!("MSI vector {index}: irqfd write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table_keeps_kvm_defaults_first() {
        let mut routes = Routes::default();
        let t = routing_table(&routes);
        // 24 IOAPIC pins and 16 PIC pins.
        assert_eq!(t.len(), 40);
        let msi = &mut routes.msi;
        msi.insert(
            30,
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x41,
            },
        );
        let t = routing_table(&routes);
        let last = t.last().unwrap();
        assert_eq!((last.gsi, last.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: an MSI entry's union member is `msi`.
        let m = unsafe { last.u.msi };
        assert_eq!((m.address_lo, m.address_hi, m.data), (0xfee0_1000, 0, 0x41));
        let pin2: Vec<_> = t.iter().filter(|e| e.gsi == 2).collect();
        assert_eq!(pin2.len(), 2);
    }

    #[test]
    fn split_routes_mirror_the_pins_then_the_msis() {
        let mut routes = Routes {
            pins: Some(vec![MsiMessage::default(); IOAPIC_PINS as usize]),
            ..Default::default()
        };
        routes.pins.as_mut().unwrap()[14] = MsiMessage {
            address: 0xfee0_0000,
            data: 0x8077,
        };
        routes.msi.insert(24, MsiMessage::default());
        let t = routing_table(&routes);
        assert_eq!(t.len(), 25);
        assert!(t.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_MSI));
        // SAFETY: every entry is an MSI one.
        let m = unsafe { t[14].u.msi };
        assert_eq!((t[14].gsi, m.data), (14, 0x8077));
    }
}
