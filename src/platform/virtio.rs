//! virtio devices on the platform: a device model on virtio-pci or
//! virtio-mmio, with an ioeventfd per queue notification (and the
//! device's own wakers, `VirtioDevice::wakers()`) and its interrupts
//! wired, and the main loop's subscriber that hands a notification to its
//! device.

use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{self, VirtioMmio};
use devices::virtio::pci::{self as vpci, VirtioPci};
use devices::virtio::{QueueNotify, VirtioDevice};
use devices::Persist;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pci::BarIoEvent;
use super::{lock, Held, Platform, PlatformError, Pool};
use crate::boot::acpi::MmioDevice;
use crate::layout;
use crate::vm::{IoEvent, KvmMsiVectors};

/// Which transport a virtio device sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    Pci,
    Mmio,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pci" => Ok(Transport::Pci),
            "mmio" => Ok(Transport::Mmio),
            _ => Err(format!(
                "unknown virtio transport '{s}': expected pci or mmio"
            )),
        }
    }
}

/// One queue notification: the fd KVM signals, and whom to tell.
pub struct QueueEvent {
    pub fd: Arc<EventFd>,
    pub dev: Arc<Mutex<dyn QueueNotify>>,
    pub queue: u16,
}

fn event_fd() -> Result<Arc<EventFd>, PlatformError> {
    EventFd::new(EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(|e| PlatformError::Io(format!("cannot create an event fd: {e}")))
}

/// Unregisters a virtio-mmio device's ioeventfds when it goes.
struct MmioIoEvents {
    irq: Arc<crate::vm::Interrupts>,
    events: Vec<(Arc<EventFd>, IoEvent)>,
}

impl Drop for MmioIoEvents {
    fn drop(&mut self) {
        for (fd, ev) in &self.events {
            self.irq.remove_ioevent(fd, *ev);
        }
    }
}

impl Platform {
    /// Register virtio device `name` (a model made by `new(args)`, or
    /// restored with `args`) on `transport`.
    pub fn attach_virtio<D>(
        &mut self,
        name: &str,
        transport: Transport,
        args: D::Args,
        new: fn(D::Args) -> D,
    ) -> Result<(), PlatformError>
    where
        D: VirtioDevice + Persist + 'static,
        D::Args: Clone,
    {
        match transport {
            Transport::Mmio => self.attach_virtio_mmio(name, args, new),
            Transport::Pci => self.attach_virtio_pci(name, args, new),
        }
    }

    fn attach_virtio_mmio<D>(
        &mut self,
        name: &str,
        dev_args: D::Args,
        new: fn(D::Args) -> D,
    ) -> Result<(), PlatformError>
    where
        D: VirtioDevice + Persist + 'static,
    {
        let (base, gsi) = {
            let mut res = lock(&self.resources);
            let base = res.allocate(
                name,
                Pool::PlatformMmio,
                mmio::WINDOW_SIZE,
                mmio::WINDOW_SIZE,
            )?;
            let gsi = match res.allocate_gsi(name, Pool::PlatformGsi) {
                Ok(g) => g,
                Err(e) => {
                    res.free(Pool::PlatformMmio, base, mmio::WINDOW_SIZE);
                    return Err(e.into());
                }
            };
            (base, gsi)
        };
        let mut held = vec![
            Held::Window(Pool::PlatformMmio, base, mmio::WINDOW_SIZE),
            Held::Gsi(Pool::PlatformGsi, gsi),
        ];
        let line = self.new_line();
        let args = (self.mem.clone(), line.clone(), gsi, dev_args);
        let made = self.make::<VirtioMmio<D>>(name, args, |(mem, line, gsi, a)| {
            VirtioMmio::new(new(a), mem, line, gsi)
        });
        let dev = match made {
            Ok(d) => Arc::new(Mutex::new(d)),
            Err(e) => {
                self.release(name, held);
                return Err(e);
            }
        };
        if let Err(e) = self
            .bus
            .add_mmio(name, base, mmio::WINDOW_SIZE, dev.clone())
        {
            self.release(name, held);
            return Err(e.into());
        }
        held.push(Held::Mmio(base));
        let mut events = Vec::new();
        let mut fds = Vec::new();
        for (off, q) in lock(&dev).notifications() {
            let fd = event_fd()?;
            fds.push(fd.clone());
            self.queue_events.push(QueueEvent {
                fd: fd.clone(),
                dev: dev.clone(),
                queue: q as u16,
            });
            let ev = IoEvent {
                mmio: true,
                addr: base + off,
                datamatch: Some(q),
            };
            // Without one, the write reaches the window on a vCPU thread,
            // which serves it or hands it to this fd.
            match self.irq.add_ioevent(&fd, ev) {
                Ok(()) => events.push((fd, ev)),
                Err(e) => log::debug!("{name}: no ioeventfd for queue {q}: {e}"),
            }
        }
        let wakers = lock(&dev).core().dev.wakers();
        self.add_wakers(wakers, &dev);
        lock(&dev).set_handoff(fds);
        held.push(Held::Other(Box::new(MmioIoEvents {
            irq: self.irq.clone(),
            events,
        })));
        self.acpi_mmio.push(MmioDevice {
            base,
            len: mmio::WINDOW_SIZE,
            gsi,
        });
        self.keep(name, &dev, held);
        Ok(())
    }

    fn attach_virtio_pci<D>(
        &mut self,
        name: &str,
        dev_args: D::Args,
        new: fn(D::Args) -> D,
    ) -> Result<(), PlatformError>
    where
        D: VirtioDevice + Persist + 'static,
        D::Args: Clone,
    {
        let slot = self.pci_slot()?;
        // One MSI-X vector per queue and one for configuration changes.
        let count = new(dev_args.clone()).queue_max_sizes().len() + 1;
        let mut gsis = Vec::with_capacity(count);
        let mut held = Vec::new();
        for _ in 0..count {
            let got = lock(&self.resources).allocate_gsi(name, Pool::MsiGsi);
            match got {
                Ok(g) => {
                    gsis.push(g);
                    held.push(Held::Gsi(Pool::MsiGsi, g));
                }
                Err(e) => {
                    self.release(name, held);
                    return Err(e.into());
                }
            }
        }
        let vectors = match KvmMsiVectors::new(&self.irq, gsis) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                self.release(name, held);
                return Err(e.into());
            }
        };
        let intx_gsi = layout::PCI_INTX_GSI_BASE + u32::from(slot) % 4;
        let args = (
            self.mem.clone(),
            vectors as _,
            self.new_line(),
            intx_gsi,
            dev_args,
        );
        let (dev, held) =
            self.attach_pci(name, slot, args, held, |(mem, vectors, line, gsi, a)| {
                VirtioPci::new(new(a), mem, vectors, line, gsi)
            })?;
        let offsets = lock(&dev).notifications();
        let mut ioevents = Vec::new();
        let mut fds = Vec::new();
        for (q, off) in offsets.into_iter().enumerate() {
            let fd = event_fd()?;
            fds.push(fd.clone());
            ioevents.push(BarIoEvent {
                bar: vpci::BAR,
                offset: off,
                fd: fd.clone(),
            });
            self.queue_events.push(QueueEvent {
                fd,
                dev: dev.clone(),
                queue: q as u16,
            });
        }
        let wakers = lock(&dev).core().dev.wakers();
        self.add_wakers(wakers, &dev);
        lock(&dev).set_handoff(fds);
        self.place_pci(name, slot, dev, held, ioevents);
        Ok(())
    }

    /// Watch a device's own event fds as notifications of their queues.
    fn add_wakers<T: QueueNotify + 'static>(
        &mut self,
        wakers: Vec<(u16, Arc<EventFd>)>,
        dev: &Arc<Mutex<T>>,
    ) {
        for (queue, fd) in wakers {
            self.queue_events.push(QueueEvent {
                fd,
                dev: dev.clone(),
                queue,
            });
        }
    }

    /// A level line of its own interrupt source (lines may be shared).
    pub(super) fn new_line(&mut self) -> Arc<dyn devices::IrqLine> {
        self.next_source = self.next_source.wrapping_add(1);
        self.irq.line(self.next_source)
    }

    /// Every queue notification of the registered devices.
    pub fn take_queue_events(&mut self) -> Vec<QueueEvent> {
        std::mem::take(&mut self.queue_events)
    }
}

/// Hands queue notifications (ioeventfds) to their devices on the main
/// loop.
pub struct QueueNotifier {
    events: Vec<QueueEvent>,
}

impl QueueNotifier {
    /// Watch `events`. Every queue is first looked at once: a
    /// notification KVM took but the main loop had not handed on when a
    /// snapshot stopped the VM is not in the snapshot, and looking at a
    /// queue without new buffers does nothing.
    pub fn new(events: Vec<QueueEvent>) -> Self {
        let n = QueueNotifier { events };
        n.look_at_all();
        n
    }

    /// Hand every queue to its device once. At the end of a run this
    /// serves what the guest queued right before it stopped: a
    /// notification the main loop had not handed on when the VM ended
    /// (a console port's last line, written just before a power-off).
    pub fn look_at_all(&self) {
        for e in &self.events {
            lock(&e.dev).notify(e.queue);
        }
    }
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(e) = self.events.get(events.data() as usize) else {
            return;
        };
        // A read resets the counter; several writes are one notification.
        let _ = e.fd.read();
        lock(&e.dev).notify(e.queue);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, e) in self.events.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(&*e.fd, i as u32, EventSet::IN)) {
                log::warn!("cannot watch a queue notification: {err:?}");
            }
        }
    }
}
