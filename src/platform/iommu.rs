//! The Intel IOMMU on the platform (`--iommu`, Q35 only): its register
//! page at QEMU's address, two MSI routes for its own interrupts, and the
//! ports the PCI devices behind it reach memory and send interrupts
//! through.

use std::sync::{Arc, Mutex};

use devices::iommu::{self, DmaPort, InterruptRemap, RemappedVectors, Vtd};
use devices::{DirectDma, DmaSpace, MsiVectors};

use super::{lock, Attach, Held, Platform, PlatformError, Pool};
use crate::config::IommuConfig;
use crate::layout;
use crate::vm::KvmMsiVectors;

/// The unit and its options, for the devices registered after it.
#[derive(Clone)]
pub struct IommuHandle {
    pub unit: Arc<Mutex<Vtd>>,
    pub intremap: bool,
}

impl Platform {
    /// Register the Intel IOMMU; it must come before the PCI devices it
    /// translates for.
    pub fn attach_iommu(&mut self, cfg: IommuConfig) -> Result<(), PlatformError> {
        let name = "intel-iommu";
        let mut gsis = Vec::new();
        for _ in 0..iommu::EVENT_VECTORS {
            let allocated = lock(&self.resources).allocate_gsi(name, Pool::MsiGsi);
            match allocated {
                Ok(g) => gsis.push(g),
                Err(e) => {
                    self.release(name, gsis_held(&gsis));
                    return Err(e.into());
                }
            }
        }
        let events = match KvmMsiVectors::new(&self.irq, gsis.clone()) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                self.release(name, gsis_held(&gsis));
                return Err(e.into());
            }
        };
        let args = (
            self.mem.clone(),
            events as Arc<dyn MsiVectors>,
            cfg.intremap,
        );
        let attached = self.attach(
            Attach::new(name, args, |(mem, ev, ir)| Vtd::new(mem, ev, ir))
                .mmio(layout::IOMMU_ADDR, iommu::regs::SIZE),
        );
        let unit = match attached {
            Ok(u) => u,
            Err(e) => {
                self.release(name, gsis_held(&gsis));
                return Err(e);
            }
        };
        self.hold(name, gsis_held(&gsis));
        if cfg.intremap {
            // Until the IOAPIC is kvmrun's (a split irqchip) and calls
            // interrupt_remapper(), KVM's IOAPIC delivers its entries
            // as it reads them.
            log::warn!(
                "--iommu=intremap=on: the in-kernel IOAPIC's interrupts are not remapped, \
                 only MSIs of the PCI devices"
            );
        }
        self.iommu = Some(IommuHandle {
            unit,
            intremap: cfg.intremap,
        });
        Ok(())
    }

    /// The IOMMU's interrupt remapping, for interrupt sources outside
    /// PCI (an IOAPIC in kvmrun), if the machine has it.
    pub fn interrupt_remapper(&self) -> Option<Arc<dyn InterruptRemap>> {
        let h = self.iommu.as_ref().filter(|h| h.intremap)?;
        Some(h.unit.clone())
    }

    /// How the PCI function at `slot` (bus 0, function 0) reaches memory
    /// and sends `vectors`: through the IOMMU if the machine has one.
    pub(super) fn behind_iommu(
        &self,
        slot: u8,
        vectors: Arc<dyn MsiVectors>,
    ) -> (Arc<dyn DmaSpace>, Arc<dyn MsiVectors>) {
        let Some(h) = &self.iommu else {
            return (Arc::new(DirectDma), vectors);
        };
        let sid = u16::from(slot) << 3;
        let dma = Arc::new(DmaPort::new(h.unit.clone(), sid));
        if !h.intremap {
            return (dma, vectors);
        }
        let remapped = RemappedVectors::new(vectors, h.unit.clone(), sid);
        (dma, Arc::new(remapped))
    }
}

fn gsis_held(gsis: &[u32]) -> Vec<Held> {
    gsis.iter().map(|&g| Held::Gsi(Pool::MsiGsi, g)).collect()
}
