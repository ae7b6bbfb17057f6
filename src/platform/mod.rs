//! The device registry: every device of the machine is made, placed on
//! the buses, given its resources, saved, restored and torn down here.
//!
//! A device is one file in `devices/` and one registration call in
//! `machine.rs`. The registration names the device (its snapshot key),
//! says how to make it new, and what it needs (fixed legacy ranges, an
//! allocated MMIO window, a GSI, a PCI slot). The registry makes the
//! device new or, when the VM is restored, from the state the snapshot
//! holds under that name, so boot and restore take the same path.
//!
//! A snapshot's devices are a map from name to a versioned blob
//! (`DeviceState`): a snapshot keeps restoring when a later kvmrun adds
//! devices (a device without saved state starts new), and a state of
//! another version, or of a device this machine lacks, is refused by
//! name.

pub mod edu;
pub mod iommu;
pub mod machine;
pub mod pci;
pub mod resources;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::q35::{self, Ich9Lpc};
use devices::pci::{
    BarKind, Chipset, HostBridge, PciConfigIo, PciConfigMmio, PciDevice, PciRoot, SharedPciDevice,
};
use devices::Persist;
use serde::{Deserialize, Serialize};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::GuestMemoryMmap;

use crate::boot::acpi::PciWindows;
use crate::boot::acpi::{Description, Dmar, MmioDevice};
use crate::bus::{BusError, IoBus, MmioDevice as MmioBusDevice, PioDevice};
use crate::layout::{self, Space};
use crate::vm::{Interrupts, Vm, VmError};
use pci::{BarIoEvent, BarPlacer, PciHost, SlotGuard};
pub use resources::{Pool, ResourceError, Resources};
use virtio::QueueEvent;

/// One device's saved state: `Persist::STATE_VERSION` and the
/// postcard-encoded `Persist::State`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub version: u16,
    pub data: Vec<u8>,
}

/// Every device's saved state, by name.
pub type DeviceStates = BTreeMap<String, DeviceState>;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("device {name}: {reason}")]
    Device { name: String, reason: String },
    #[error("device {name}: saved state version {saved}, but this kvmrun's is {ours}")]
    Version { name: String, saved: u16, ours: u16 },
    #[error("the snapshot holds state of device {0}, which this machine does not have")]
    Unknown(String),
    #[error("two devices are named {0}")]
    Duplicate(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Disk(#[from] devices::virtio::blk::DiskError),
    #[error("--share {0}")]
    Share(#[from] devices::virtio::fs::ShareError),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Saver = Box<dyn Fn() -> Result<DeviceState, PlatformError> + Send>;
type ToPio<D> = fn(&Arc<Mutex<D>>) -> Arc<PioDevice>;
type ToMmio<D> = fn(&Arc<Mutex<D>>) -> Arc<MmioBusDevice>;

/// Something a device holds that goes when the device goes.
enum Held {
    Pio(u64),
    Mmio(u64),
    Window(Pool, u64, u64),
    Gsi(Pool, u32),
    /// Torn down by its own drop (irqfds, ioeventfds, MSI routes, a PCI
    /// slot).
    Other(Box<dyn Send>),
}

struct Entry {
    name: String,
    save: Saver,
    held: Vec<Held>,
}

/// How to make one device and what it needs: the registration call.
pub struct Attach<D: Persist> {
    name: String,
    args: D::Args,
    new: Box<dyn FnOnce(D::Args) -> D>,
    pio: Vec<(u16, u16, ToPio<D>)>,
    mmio: Vec<(u64, u64, ToMmio<D>)>,
    gsis: Vec<u32>,
}

impl<D: Persist + Send + 'static> Attach<D> {
    /// Device `name` (its snapshot key), made by `new(args)` at boot or
    /// restored with `args` from its saved state.
    pub fn new(name: &str, args: D::Args, new: impl FnOnce(D::Args) -> D + 'static) -> Self {
        Attach {
            name: name.to_string(),
            args,
            new: Box::new(new),
            pio: Vec::new(),
            mmio: Vec::new(),
            gsis: Vec::new(),
        }
    }

    /// Decode the fixed ports `[base, base + len)`, a range of the layout.
    pub fn pio(mut self, base: u16, len: u16) -> Self
    where
        D: MutDevicePio,
    {
        self.pio.push((base, len, |d| d.clone()));
        self
    }

    /// Decode the fixed MMIO range `[base, base + len)` of the layout.
    pub fn mmio(mut self, base: u64, len: u64) -> Self
    where
        D: MutDeviceMmio,
    {
        self.mmio.push((base, len, |d| d.clone()));
        self
    }

    /// Drive the fixed (ISA) interrupt `gsi`.
    pub fn gsi(mut self, gsi: u32) -> Self {
        self.gsis.push(gsi);
        self
    }
}

/// The registry of one machine.
pub struct Platform {
    bus: Arc<IoBus>,
    irq: Arc<Interrupts>,
    resources: Arc<Mutex<Resources>>,
    entries: Vec<Entry>,
    /// A restored VM's saved device states, taken as devices register.
    saved: DeviceStates,
    /// Platform MMIO devices the DSDT lists.
    acpi_mmio: Vec<MmioDevice>,
    /// Guest memory, for devices that reach it (virtio).
    mem: GuestMemoryMmap,
    /// The PCI root, from the first PCI device on (from the start on q35).
    pci: Option<PciHost>,
    /// Which host bridge the PCI root gets.
    chipset: Chipset,
    pci_windows: Option<PciWindows>,
    /// Queue notifications for the main loop.
    queue_events: Vec<QueueEvent>,
    /// The last interrupt source handed out (0 is pc-testdev's).
    next_source: u8,
    /// The Intel IOMMU, which PCI devices registered after it sit behind.
    iommu: Option<iommu::IommuHandle>,
}

impl Platform {
    /// An empty machine for `vm`; `saved` holds the devices' states when
    /// it is a restored VM.
    pub fn new(vm: &Vm, pit: bool, saved: Option<DeviceStates>) -> Self {
        let l = &vm.layout;
        let pci_windows = l.pci.then(|| PciWindows {
            ecam: layout::PCI_ECAM,
            io: layout::PCI_IO_WINDOW,
            mmio32: layout::PCI_MMIO32_WINDOW,
            mmio64: (layout::pci_mmio64_start(&l.ram), layout::PCI_MMIO64_SIZE),
        });
        Platform {
            bus: Arc::new(IoBus::new()),
            irq: vm.interrupts().clone(),
            resources: Arc::new(Mutex::new(Resources::new(&l.ram, l.pci, pit))),
            entries: Vec::new(),
            saved: saved.unwrap_or_default(),
            acpi_mmio: Vec::new(),
            mem: vm.mem.clone(),
            pci: None,
            chipset: Chipset::Generic,
            pci_windows,
            queue_events: Vec::new(),
            next_source: 0,
            iommu: None,
        }
    }

    pub fn bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irq
    }

    /// Make device `name`: from its saved state if the snapshot has one,
    /// else new.
    fn make<D: Persist>(
        &mut self,
        name: &str,
        args: D::Args,
        new: impl FnOnce(D::Args) -> D,
    ) -> Result<D, PlatformError> {
        self.make_saved(name, args, new).map(|(d, _)| d)
    }

    /// `make()`, and whether the device came from saved state.
    fn make_saved<D: Persist>(
        &mut self,
        name: &str,
        args: D::Args,
        new: impl FnOnce(D::Args) -> D,
    ) -> Result<(D, bool), PlatformError> {
        if self.entries.iter().any(|e| e.name == name) {
            return Err(PlatformError::Duplicate(name.into()));
        }
        let Some(saved) = self.saved.remove(name) else {
            return Ok((new(args), false));
        };
        if saved.version != D::STATE_VERSION {
            return Err(PlatformError::Version {
                name: name.into(),
                saved: saved.version,
                ours: D::STATE_VERSION,
            });
        }
        let bad = |reason: String| PlatformError::Device {
            name: name.into(),
            reason,
        };
        let state: D::State =
            postcard::from_bytes(&saved.data).map_err(|e| bad(format!("cannot decode: {e}")))?;
        D::restore(args, &state)
            .map(|d| (d, true))
            .map_err(|e| bad(e.to_string()))
    }

    /// Keep `dev` as device `name`, to be saved and torn down with what
    /// it holds.
    fn keep<D: Persist + Send + 'static>(
        &mut self,
        name: &str,
        dev: &Arc<Mutex<D>>,
        held: Vec<Held>,
    ) {
        let d = dev.clone();
        let n = name.to_string();
        let save: Saver = Box::new(move || {
            let data =
                postcard::to_stdvec(&lock(&d).save()).map_err(|e| PlatformError::Device {
                    name: n.clone(),
                    reason: format!("cannot encode the state: {e}"),
                })?;
            Ok(DeviceState {
                version: D::STATE_VERSION,
                data,
            })
        });
        self.entries.push(Entry {
            name: name.into(),
            save,
            held,
        });
    }

    /// Add `held` to what the registered device `name` holds.
    fn hold(&mut self, name: &str, held: Vec<Held>) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.name == name) {
            e.held.extend(held);
        }
    }

    /// Register a device at fixed places: make it, claim its ranges and
    /// interrupts from the layout, and place it on the buses.
    pub fn attach<D: Persist + Send + 'static>(
        &mut self,
        a: Attach<D>,
    ) -> Result<Arc<Mutex<D>>, PlatformError> {
        let dev = Arc::new(Mutex::new(self.make(&a.name, a.args, a.new)?));
        let mut held = Vec::new();
        let placed = (|| {
            let mut res = lock(&self.resources);
            for &(base, len, _) in &a.pio {
                res.claim(&a.name, Space::Port, u64::from(base), u64::from(len))?;
            }
            for &(base, len, _) in &a.mmio {
                res.claim(&a.name, Space::Memory, base, len)?;
            }
            for &gsi in &a.gsis {
                res.claim(&a.name, Space::Gsi, u64::from(gsi), 1)?;
            }
            drop(res);
            for &(base, len, to) in &a.pio {
                self.bus.add_pio(&a.name, base, len, to(&dev))?;
                held.push(Held::Pio(u64::from(base)));
            }
            for &(base, len, to) in &a.mmio {
                self.bus.add_mmio(&a.name, base, len, to(&dev))?;
                held.push(Held::Mmio(base));
            }
            Ok::<_, PlatformError>(())
        })();
        if let Err(e) = placed {
            self.release(&a.name, held);
            return Err(e);
        }
        self.keep(&a.name, &dev, held);
        Ok(dev)
    }

    /// Tear device `name` down: off the buses, its resources back to the
    /// allocator, its fds and routes closed.
    pub fn remove(&mut self, name: &str) -> Result<(), PlatformError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| PlatformError::Device {
                name: name.into(),
                reason: "no such device".into(),
            })?;
        let e = self.entries.remove(i);
        self.release(&e.name, e.held);
        Ok(())
    }

    fn release(&mut self, name: &str, held: Vec<Held>) {
        let mut res = lock(&self.resources);
        for h in held {
            match h {
                Held::Pio(base) => drop(self.bus.pio.remove(base)),
                Held::Mmio(base) => drop(self.bus.mmio.remove(base)),
                Held::Window(pool, start, size) => res.free(pool, start, size),
                Held::Gsi(pool, gsi) => res.free_gsi(pool, gsi),
                Held::Other(x) => drop(x),
            }
        }
        res.release_claims(name);
    }

    /// Every device's state, by name.
    pub fn save(&self) -> Result<DeviceStates, PlatformError> {
        self.entries
            .iter()
            .map(|e| Ok((e.name.clone(), (e.save)()?)))
            .collect()
    }

    /// End a restore: a saved device this machine did not register is an
    /// error.
    pub fn check_restored(&self) -> Result<(), PlatformError> {
        match self.saved.keys().next() {
            Some(name) => Err(PlatformError::Unknown(name.clone())),
            None => Ok(()),
        }
    }

    /// The PCI root, made with the first PCI device: the host bridge at
    /// 00:00.0 and configuration access through 0xCF8 and ECAM.
    fn pci_root(&mut self) -> Result<Arc<PciRoot>, PlatformError> {
        if let Some(p) = &self.pci {
            return Ok(p.root.clone());
        }
        let Some(windows) = self.pci_windows else {
            return Err(PlatformError::Device {
                name: "pci".into(),
                reason: "the machine was built without PCI".into(),
            });
        };
        let placer = Arc::new(BarPlacer::new(self.bus.clone(), self.irq.clone()));
        let root = Arc::new(PciRoot::for_chipset(placer.clone(), self.chipset));
        let bridge = Arc::new(Mutex::new(self.make(
            "pci-host-bridge",
            self.chipset,
            HostBridge::for_chipset,
        )?));
        root.add(0, bridge.clone());
        self.keep("pci-host-bridge", &bridge, Vec::new());
        self.attach(
            Attach::new("pci-config-io", root.clone(), PciConfigIo::new).pio(
                layout::PCI_CONFIG_PORTS.0 as u16,
                layout::PCI_CONFIG_PORTS.1 as u16,
            ),
        )?;
        self.attach(
            Attach::new("pci-ecam", root.clone(), PciConfigMmio::new)
                .mmio(windows.ecam.0, windows.ecam.1),
        )?;
        self.pci = Some(PciHost {
            root: root.clone(),
            placer,
            windows,
        });
        Ok(root)
    }

    /// Make the machine a Q35 (`--machine q35`): the PCI root with the
    /// MCH as its host bridge and the ICH9 LPC bridge at 00:1f.0, before
    /// any other PCI device, so they hold their slots at boot and restore
    /// alike.
    pub fn attach_q35(&mut self) -> Result<(), PlatformError> {
        if self.pci.is_some() {
            return Err(PlatformError::Device {
                name: "ich9-lpc".into(),
                reason: "the chipset must come before every PCI device".into(),
            });
        }
        self.chipset = Chipset::Q35;
        let root = self.pci_root()?;
        let lpc = Arc::new(Mutex::new(self.make(
            "ich9-lpc",
            devices::acpi_pm::PM_BASE,
            Ich9Lpc::new,
        )?));
        root.add(q35::LPC_SLOT, lpc.clone());
        self.keep("ich9-lpc", &lpc, Vec::new());
        Ok(())
    }

    /// The slot the next PCI device goes to.
    fn pci_slot(&mut self) -> Result<u8, PlatformError> {
        self.pci_root()?
            .free_slot()
            .ok_or_else(|| PlatformError::Device {
                name: "pci".into(),
                reason: "all 32 slots of bus 0 are taken".into(),
            })
    }

    /// Make PCI device `name` for `slot` and put it on the root bus; at
    /// boot, program its BARs from the windows and enable decoding, as
    /// firmware does (a restored device keeps what the guest programmed).
    /// Returns the device and what it holds with `held`, for
    /// `place_pci()`.
    fn attach_pci<D: PciDevice + Persist + 'static>(
        &mut self,
        name: &str,
        slot: u8,
        args: D::Args,
        mut held: Vec<Held>,
        new: impl FnOnce(D::Args) -> D,
    ) -> Result<(Arc<Mutex<D>>, Vec<Held>), PlatformError> {
        let (mut dev, restored) = match self.make_saved(name, args, new) {
            Ok(d) => d,
            Err(e) => {
                self.release(name, held);
                return Err(e);
            }
        };
        let mut command = 0;
        for i in 0..devices::pci::config::NUM_BARS {
            let Some(spec) = dev.config().bar(i) else {
                continue;
            };
            let placed = {
                let mut res = lock(&self.resources);
                match spec.kind {
                    BarKind::Io => res
                        .allocate(name, Pool::PciIo, spec.size, spec.size)
                        .map(|a| (Pool::PciIo, a)),
                    BarKind::Mem32 => res
                        .allocate(name, Pool::PciMmio32, spec.size, spec.size)
                        .map(|a| (Pool::PciMmio32, a)),
                    BarKind::Mem64 => res
                        .allocate(name, Pool::PciMmio32, spec.size, spec.size)
                        .map(|a| (Pool::PciMmio32, a))
                        .or_else(|_| {
                            res.allocate(name, Pool::PciMmio64, spec.size, spec.size)
                                .map(|a| (Pool::PciMmio64, a))
                        }),
                }
            };
            let (pool, addr) = match placed {
                Ok(p) => p,
                Err(e) => {
                    self.release(name, held);
                    return Err(e.into());
                }
            };
            held.push(Held::Window(pool, addr, spec.size));
            if !restored {
                dev.config_mut().set_bar_address(i, addr);
            }
            command |= match spec.kind {
                BarKind::Io => devices::pci::config::COMMAND_IO,
                _ => devices::pci::config::COMMAND_MEMORY,
            };
        }
        if !restored {
            let c = dev.config_mut();
            c.set_command(command);
            c.set_interrupt_line((layout::PCI_INTX_GSI_BASE + u32::from(slot) % 4) as u8);
        }
        let dev = Arc::new(Mutex::new(dev));
        Ok((dev, held))
    }

    /// Put PCI device `dev` in `slot`, its BARs on the buses where its
    /// configuration says (with `ioevents` inside them), and keep it.
    fn place_pci<D: PciDevice + Persist + 'static>(
        &mut self,
        name: &str,
        slot: u8,
        dev: Arc<Mutex<D>>,
        mut held: Vec<Held>,
        ioevents: Vec<BarIoEvent>,
    ) {
        let Some(host) = &self.pci else {
            return;
        };
        let shared: SharedPciDevice = dev.clone();
        host.root.add(slot, shared.clone());
        let fds = ioevents.iter().map(|e| e.fd.clone()).collect();
        host.placer.add(slot, shared, ioevents);
        held.push(Held::Other(Box::new(SlotGuard {
            root: host.root.clone(),
            placer: host.placer.clone(),
            slot,
            fds,
        })));
        self.keep(name, &dev, held);
    }

    /// What the ACPI tables describe of this machine's devices; `com1`
    /// lists COM1 too (for Linux).
    pub fn acpi_description(&self, com1: bool) -> Description {
        Description {
            com1,
            pci: self.pci.as_ref().map(PciHost::windows),
            virtio_mmio: self.acpi_mmio.clone(),
            dmar: self.iommu.as_ref().map(|h| Dmar {
                base: layout::IOMMU_ADDR,
                intremap: h.intremap,
            }),
        }
    }

    /// The names of the registered devices, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }
}
