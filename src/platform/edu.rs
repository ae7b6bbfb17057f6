//! QEMU's edu device on the platform (`--edu`): a PCI function with one
//! MSI vector (a GSI from the MSI pool behind an irqfd) and INTA on its
//! slot's `_PRT` line; its DMA and MSI go through the IOMMU if the
//! machine has one.

use std::sync::Arc;

use devices::edu::Edu;

use super::{lock, Held, Platform, PlatformError, Pool};
use crate::layout;
use crate::vm::KvmMsiVectors;

impl Platform {
    /// Register edu device `name` in the next free slot.
    pub fn attach_edu(&mut self, name: &str) -> Result<(), PlatformError> {
        let slot = self.pci_slot()?;
        let gsi = lock(&self.resources).allocate_gsi(name, Pool::MsiGsi)?;
        let held = vec![Held::Gsi(Pool::MsiGsi, gsi)];
        let vectors = match KvmMsiVectors::new(&self.irq, vec![gsi]) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                self.release(name, held);
                return Err(e.into());
            }
        };
        let intx_gsi = layout::PCI_INTX_GSI_BASE + u32::from(slot) % 4;
        let (dma, vectors) = self.behind_iommu(slot, vectors);
        let args = (self.mem.clone(), dma, vectors, self.new_line(), intx_gsi);
        let (dev, held) = self.attach_pci(name, slot, args, held, |(mem, d, v, line, g)| {
            Edu::new(mem, d, v, line, g)
        })?;
        self.place_pci(name, slot, dev, held, Vec::new());
        Ok(())
    }
}
