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

pub mod machine;
pub mod resources;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::Persist;
use serde::{Deserialize, Serialize};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::boot::acpi::{Description, MmioDevice};
use crate::bus::{BusError, IoBus, MmioDevice as MmioBusDevice, PioDevice};
use crate::layout::Space;
use crate::vm::{Interrupts, VmError};
pub use resources::{Pool, ResourceError, Resources};

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
    #[allow(dead_code)] // Until the first allocated window.
    Window(Pool, u64, u64),
    #[allow(dead_code)]
    Gsi(Pool, u32),
    /// Torn down by its own drop (irqfds, ioeventfds, MSI routes, a PCI
    /// slot).
    #[allow(dead_code)]
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
}

impl Platform {
    /// An empty machine; `saved` holds the devices' states when it is a
    /// restored VM.
    pub fn new(irq: Arc<Interrupts>, resources: Resources, saved: Option<DeviceStates>) -> Self {
        Platform {
            bus: Arc::new(IoBus::new()),
            irq,
            resources: Arc::new(Mutex::new(resources)),
            entries: Vec::new(),
            saved: saved.unwrap_or_default(),
            acpi_mmio: Vec::new(),
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
        if self.entries.iter().any(|e| e.name == name) {
            return Err(PlatformError::Duplicate(name.into()));
        }
        let Some(saved) = self.saved.remove(name) else {
            return Ok(new(args));
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
        D::restore(args, &state).map_err(|e| bad(e.to_string()))
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

    /// What the ACPI tables describe of this machine's devices; `com1`
    /// lists COM1 too (for Linux).
    pub fn acpi_description(&self, com1: bool) -> Description {
        Description {
            com1,
            pci: None,
            virtio_mmio: self.acpi_mmio.clone(),
        }
    }

    /// The names of the registered devices, in registration order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }
}
