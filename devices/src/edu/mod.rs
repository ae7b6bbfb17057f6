//! QEMU's educational PCI device "edu" (docs/specs/edu.rst), as
//! kvm-unit-tests' lib/pci-edu.c and x86/intel-iommu.c use it: 1234:11e8,
//! a 1 MiB memory BAR 0 with the registers of [`regs`], INTA by default
//! and one MSI vector once the guest enables MSI.
//!
//! DMA reads and writes guest memory through vm-memory at the addresses
//! its [`DmaSpace`] gives (guest-physical, or an IOMMU's translation); a
//! transfer that leaves the device's buffer or guest RAM, that the IOMMU
//! blocks, or that runs without bus mastering, moves nothing and still
//! completes (see
//! [`regs::Regs::finish_dma`]), so a guest that polls or waits for the
//! interrupt always goes on.

pub mod regs;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use crate::pci::config::{COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE};
use crate::pci::msi::Msi;
use crate::pci::{BarKind, BarSpec, PciConfig, PciConfigState, PciDevice, PciId};
use crate::{le_value, DmaAccess, DmaSpace, IrqLine, MsiVectors, Persist, RestoreError};
use regs::{Action, DmaError, Regs};

pub const VENDOR: u16 = 0x1234;
pub const DEVICE: u16 = 0x11e8;
pub const BAR: u8 = 0;
pub const BAR_SIZE: u64 = 1 << 20;

pub struct Edu {
    config: PciConfig,
    msi: Msi,
    regs: Regs,
    mem: GuestMemoryMmap,
    dma: Arc<dyn DmaSpace>,
    intx: Arc<dyn IrqLine>,
    intx_gsi: u32,
    /// The INTx level last set, so the line is driven only on changes.
    intx_level: bool,
}

/// Move `t`'s bytes between guest memory (through `dma`) and `buffer`,
/// all or nothing.
fn copy<M: GuestMemory>(
    mem: &M,
    dma: &dyn DmaSpace,
    t: regs::Transfer,
    buffer: &mut [u8],
) -> Result<(), DmaError> {
    let (access, perm) = if t.to_ram {
        (DmaAccess::Write, Permissions::Write)
    } else {
        (DmaAccess::Read, Permissions::Read)
    };
    // Translate and check every piece first: a partial copy would leave
    // RAM half written.
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < t.len {
        let iova = t.ram + done as u64;
        let page = dma.translate(iova, access).map_err(DmaError::Blocked)?;
        let n = page.len.min((t.len - done) as u64) as usize;
        if !mem.check_range(GuestAddress(page.gpa), n, perm) {
            return Err(DmaError::OutsideRam {
                addr: page.gpa,
                count: n as u64,
            });
        }
        pieces.push((page.gpa, done, n));
        done += n;
    }
    for (gpa, at, n) in pieces {
        let buf = &mut buffer[t.buf + at..t.buf + at + n];
        let r = if t.to_ram {
            mem.write_slice(buf, GuestAddress(gpa))
        } else {
            mem.read_slice(buf, GuestAddress(gpa))
        };
        r.map_err(|_| DmaError::OutsideRam {
            addr: gpa,
            count: n as u64,
        })?;
    }
    Ok(())
}

impl Edu {
    /// An edu device reaching `mem` through `dma`, its MSI through
    /// `vectors` (vector 0), INTA through `intx` on GSI `intx_gsi`.
    pub fn new(
        mem: GuestMemoryMmap,
        dma: Arc<dyn DmaSpace>,
        vectors: Arc<dyn MsiVectors>,
        intx: Arc<dyn IrqLine>,
        intx_gsi: u32,
    ) -> Self {
        let id = PciId {
            vendor: VENDOR,
            device: DEVICE,
            revision: 0x10,
            class: (0xff, 0, 0),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        };
        let mut config = PciConfig::new(id, true);
        config.add_bar(
            usize::from(BAR),
            BarSpec {
                kind: BarKind::Mem32,
                size: BAR_SIZE,
                prefetchable: false,
            },
        );
        let msi = Msi::new(&mut config, vectors);
        Edu {
            config,
            msi,
            regs: Regs::default(),
            mem,
            dma,
            intx,
            intx_gsi,
            intx_level: false,
        }
    }

    /// INTA follows the interrupt status while MSI is off and INTx is
    /// not disabled in the command register.
    fn update_intx(&mut self) {
        let level = self.regs.irq_status != 0
            && !self.msi.enabled(&self.config)
            && self.config.command() & COMMAND_INTX_DISABLE == 0;
        if level != self.intx_level {
            self.intx.set_level(self.intx_gsi, level);
            self.intx_level = level;
        }
    }

    /// Bits were added to the interrupt status: one MSI per raise, or
    /// INTA high.
    fn raise(&mut self) {
        if self.regs.irq_status != 0 && self.msi.signal(&self.config) {
            return;
        }
        self.update_intx();
    }

    fn dma(&mut self) {
        let done = if self.config.command() & COMMAND_BUS_MASTER == 0 {
            Err(DmaError::NoBusMaster)
        } else {
            self.regs
                .transfer()
                .and_then(|t| copy(&self.mem, self.dma.as_ref(), t, &mut self.regs.buffer))
        };
        if let Err(e) = done {
            log::debug!("edu: DMA {:x?} refused: {e}", self.regs.dma);
        }
        if self.regs.finish_dma() {
            self.raise();
        }
    }

    /// The register file, for tests and the VMM's diagnostics.
    pub fn regs(&self) -> &Regs {
        &self.regs
    }
}

impl PciDevice for Edu {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.msi.config_written(&self.config);
        // Enabling MSI or disabling INTx takes INTA down; the reverse
        // brings a pending status back onto it.
        self.update_intx();
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let v = if bar == BAR {
            self.regs.read(offset, data.len())
        } else {
            u64::MAX
        };
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        data[n..].fill(0xff);
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let Some(v) = le_value(data).filter(|_| bar == BAR) else {
            return;
        };
        match self.regs.write(offset, data.len(), v) {
            Action::None => {}
            Action::Raise => self.raise(),
            Action::Lower => self.update_intx(),
            Action::Dma => self.dma(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EduState {
    pub config: PciConfigState,
    pub regs: Regs,
}

impl Persist for Edu {
    type State = EduState;
    /// Guest memory and the device's view of it, the MSI vector, the
    /// INTx line and its GSI.
    type Args = (
        GuestMemoryMmap,
        Arc<dyn DmaSpace>,
        Arc<dyn MsiVectors>,
        Arc<dyn IrqLine>,
        u32,
    );
    type Error = RestoreError;

    fn save(&self) -> EduState {
        EduState {
            config: self.config.state(),
            regs: self.regs.clone(),
        }
    }

    fn restore(args: Self::Args, s: &EduState) -> Result<Self, RestoreError> {
        let (mem, dma, vectors, intx, gsi) = args;
        let bad = |reason: String| RestoreError::Invalid {
            device: "edu",
            reason,
        };
        if s.regs.buffer.len() != regs::DMA_BUFFER_SIZE as usize {
            return Err(bad(format!(
                "DMA buffer of {} bytes, not {}",
                s.regs.buffer.len(),
                regs::DMA_BUFFER_SIZE
            )));
        }
        let mut e = Edu::new(mem, dma, vectors, intx, gsi);
        e.config.restore(&s.config).map_err(bad)?;
        e.msi.restore(&e.config);
        e.regs = s.regs.clone();
        // A transfer is never saved running: it completes within the
        // write that starts it.
        e.regs.dma.cmd &= !regs::DMA_START;
        e.update_intx();
        Ok(e)
    }
}

#[cfg(test)]
mod tests;
