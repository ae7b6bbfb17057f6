//! kvmrun's emulated devices.
//!
//! A device here is plain data and logic: it gets bytes from a bus access
//! and returns bytes. It never holds a KVM file descriptor; what it needs from
//! the VM (an interrupt line, an exit request, a page flush) it asks through
//! the small traits below, which the VMM implements.
//!
//! Every device implements [`vm_device::MutDevicePio`] and/or
//! [`vm_device::MutDeviceMmio`] and is registered on the VMM's buses wrapped
//! in a `Mutex`, and implements [`Persist`] so its state can be saved.

pub mod acpi_pm;
pub mod debug_exit;
pub mod edu;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod iommu;
pub mod pci;
pub mod rtc;
pub mod serial;
pub mod testdev;
pub mod virtio;

use serde::{de::DeserializeOwned, Serialize};

/// Save and restore of one stateful component.
///
/// `State` is what goes into a snapshot; `Args` is what the restored
/// component needs from its surroundings that a snapshot cannot carry (an
/// output writer, an event fd, a callback into the VMM).
pub trait Persist: Sized {
    type State: Serialize + DeserializeOwned;
    type Args;
    type Error: std::error::Error;
    /// Version of `State`'s encoding, kept with it in a snapshot; bump it
    /// on any change an older state would not decode as, and a snapshot
    /// holding another version of this device is refused by name.
    const STATE_VERSION: u16 = 1;

    fn save(&self) -> Self::State;
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A guest interrupt line (GSI) that a device can drive.
///
/// The VMM implements it with KVM_IRQ_LINE; level semantics: `true` asserts,
/// `false` deasserts. An edge is a raise followed by a lower.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, gsi: u32, level: bool);
}

/// A message-signalled interrupt: what a device writes where (PCI Local
/// Bus specification, "Message Signaled Interrupts"). On x86 the address
/// names the destination APIC and the data the vector.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The VMM's side of one device's MSI vectors: a route per vector
/// (KVM_SET_GSI_ROUTING) raised through an irqfd, so the device holds no
/// KVM fd. An IOMMU's interrupt remapping wraps it
/// (`iommu::RemappedVectors`).
pub trait MsiVectors: Send + Sync {
    /// Point vector `index` at `msg`, or take its route away (`None`)
    /// while it is masked or MSI-X is off.
    fn route(&self, index: u16, msg: Option<MsiMessage>);
    /// Raise vector `index` once, through its route.
    fn trigger(&self, index: u16);
}

/// Whether a DMA access reads or writes memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaAccess {
    Read,
    Write,
}

/// Where a DMA address lands in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaPage {
    pub gpa: u64,
    /// Bytes from `gpa` that the same translation covers.
    pub len: u64,
}

/// A DMA access an IOMMU blocked (and recorded as a fault).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the IOMMU blocked DMA at {iova:#x}: {reason}")]
pub struct DmaFault {
    pub iova: u64,
    pub reason: String,
}

/// A device's view of memory: the address it puts on the bus (an I/O
/// virtual address behind an IOMMU) to guest-physical. A device
/// translates every page of a transfer before it moves a byte, so a
/// blocked page moves nothing.
pub trait DmaSpace: Send + Sync {
    fn translate(&self, iova: u64, access: DmaAccess) -> Result<DmaPage, DmaFault>;
}

/// DMA without an IOMMU: bus addresses are guest-physical.
pub struct DirectDma;

impl DmaSpace for DirectDma {
    fn translate(&self, iova: u64, _access: DmaAccess) -> Result<DmaPage, DmaFault> {
        Ok(DmaPage {
            gpa: iova,
            len: (u64::MAX - iova).saturating_add(1),
        })
    }
}

/// Where an interrupt controller of kvmrun's (the split irqchip's I/O
/// APIC) sends its interrupts as MSIs to KVM's local APICs.
pub trait MsiSink: Send + Sync {
    /// Deliver `msg` once (KVM_SIGNAL_MSI).
    fn send(&self, msg: MsiMessage);
    /// Pin `pin` now delivers as `msg`: the VMM mirrors it in a GSI route
    /// so KVM knows which vectors are level-triggered and reports their
    /// EOI.
    fn route_pin(&self, pin: u8, msg: MsiMessage);
}

/// Something a device asks of the whole VM, not of itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// isa-debug-exit: end the VM with status `(value << 1) | 1`.
    DebugExit(u32),
    /// The guest asked for a reset (i8042 pulse, reset port).
    Reset,
    /// The guest asked for power-off (ACPI S5).
    PowerOff,
    /// The guest entered ACPI S3 (suspend to RAM) and waits to be woken
    /// through its firmware waking vector.
    Suspend,
}

/// Where devices send [`VmRequest`]s; the VMM turns them into its single
/// shutdown path.
pub trait VmRequests: Send + Sync {
    fn request(&self, req: VmRequest);
}

/// Forces the host mapping of one guest page to be dropped and re-faulted
/// (pc-testdev's flush-page port).
pub trait PageFlusher: Send + Sync {
    fn flush_page(&self, gpa: u64);
}

/// Error of a device's restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid {device} state: {reason}")]
    Invalid {
        device: &'static str,
        reason: String,
    },
}

/// Fills a read buffer with all-ones, the value an ISA bus returns for a
/// port or width that nothing decodes.
pub(crate) fn fill_all_ones(data: &mut [u8]) {
    data.fill(0xff);
}

/// Returns the little-endian value of an access of 1 to 8 bytes, or `None`
/// for any other width so that callers ignore accesses they cannot decode.
pub(crate) fn le_value(data: &[u8]) -> Option<u64> {
    if data.is_empty() || data.len() > 8 {
        return None;
    }
    let mut bytes = [0u8; 8];
    bytes[..data.len()].copy_from_slice(data);
    Some(u64::from_le_bytes(bytes))
}

/// Fakes of the VMM-side traits, shared by the devices' unit tests.
#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::Mutex;

    use super::{IrqLine, MsiMessage, MsiSink, PageFlusher, VmRequest, VmRequests};

    /// Records the messages sent and the pin routes announced, in order.
    #[derive(Default)]
    pub(crate) struct MsiRecorder {
        sent: Mutex<Vec<MsiMessage>>,
        routes: Mutex<Vec<(u8, MsiMessage)>>,
    }

    impl MsiRecorder {
        pub(crate) fn take_sent(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut *self.sent.lock().expect("recorder lock poisoned"))
        }

        pub(crate) fn take_routes(&self) -> Vec<(u8, MsiMessage)> {
            std::mem::take(&mut *self.routes.lock().expect("recorder lock poisoned"))
        }
    }

    impl MsiSink for MsiRecorder {
        fn send(&self, msg: MsiMessage) {
            self.sent.lock().expect("recorder lock poisoned").push(msg);
        }

        fn route_pin(&self, pin: u8, msg: MsiMessage) {
            self.routes
                .lock()
                .expect("recorder lock poisoned")
                .push((pin, msg));
        }
    }

    /// Records every request in order.
    #[derive(Default)]
    pub(crate) struct RequestRecorder {
        pub(crate) requests: Mutex<Vec<VmRequest>>,
    }

    impl RequestRecorder {
        pub(crate) fn take(&self) -> Vec<VmRequest> {
            std::mem::take(&mut *self.requests.lock().expect("recorder lock poisoned"))
        }
    }

    impl VmRequests for RequestRecorder {
        fn request(&self, req: VmRequest) {
            self.requests
                .lock()
                .expect("recorder lock poisoned")
                .push(req);
        }
    }

    /// Records every `(gsi, level)` change in order.
    #[derive(Default)]
    pub(crate) struct IrqRecorder {
        pub(crate) levels: Mutex<Vec<(u32, bool)>>,
    }

    impl IrqRecorder {
        pub(crate) fn take(&self) -> Vec<(u32, bool)> {
            std::mem::take(&mut *self.levels.lock().expect("recorder lock poisoned"))
        }
    }

    impl IrqLine for IrqRecorder {
        fn set_level(&self, gsi: u32, level: bool) {
            self.levels
                .lock()
                .expect("recorder lock poisoned")
                .push((gsi, level));
        }
    }

    /// Records every flushed guest-physical address in order.
    #[derive(Default)]
    pub(crate) struct FlushRecorder {
        pub(crate) pages: Mutex<Vec<u64>>,
    }

    impl FlushRecorder {
        pub(crate) fn take(&self) -> Vec<u64> {
            std::mem::take(&mut *self.pages.lock().expect("recorder lock poisoned"))
        }
    }

    impl PageFlusher for FlushRecorder {
        fn flush_page(&self, gpa: u64) {
            self.pages.lock().expect("recorder lock poisoned").push(gpa);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_value_decodes_widths_one_to_eight() {
        assert_eq!(le_value(&[0x12]), Some(0x12));
        assert_eq!(le_value(&[0x34, 0x12]), Some(0x1234));
        assert_eq!(
            le_value(&[1, 2, 3, 4, 5, 6, 7, 8]),
            Some(0x0807_0605_0403_0201)
        );
        assert_eq!(le_value(&[]), None);
        assert_eq!(le_value(&[0u8; 9]), None);
    }

    #[test]
    fn fill_all_ones_sets_every_byte() {
        let mut data = [0u8; 5];
        fill_all_ones(&mut data);
        assert_eq!(data, [0xff; 5]);
    }
}

#[cfg(test)]
mod send_tests {
    fn assert_send<T: Send>() {}

    /// The VMM shares devices as `Arc<Mutex<Dev>>` across vCPU threads, which
    /// needs every device to be `Send`.
    #[test]
    fn devices_are_send() {
        assert_send::<crate::serial::SerialDevice>();
        assert_send::<crate::debug_exit::DebugExit>();
        assert_send::<crate::testdev::PcTestDev>();
        assert_send::<crate::testdev::TestDevIomem>();
        assert_send::<crate::fw_cfg::FwCfg>();
        assert_send::<crate::acpi_pm::AcpiPm>();
        assert_send::<crate::i8042::I8042>();
        assert_send::<crate::rtc::Rtc>();
        assert_send::<crate::pci::HostBridge>();
        assert_send::<crate::edu::Edu>();
        assert_send::<crate::iommu::Vtd>();
        assert_send::<crate::pci::q35::Ich9Lpc>();
        assert_send::<crate::pci::PciConfigIo>();
        assert_send::<crate::pci::PciConfigMmio>();
        assert_send::<crate::virtio::mmio::VirtioMmio<crate::virtio::rng::Rng>>();
        assert_send::<crate::virtio::pci::VirtioPci<crate::virtio::rng::Rng>>();
        assert_send::<crate::virtio::mmio::VirtioMmio<crate::virtio::blk::Blk>>();
        assert_send::<crate::virtio::pci::VirtioPci<crate::virtio::blk::Blk>>();
    }
}
