//! The edu device's register file (QEMU's docs/specs/edu.rst): plain
//! state and logic, no interrupts or guest memory. A write returns what
//! the device must do next ([`Action`]); `Edu` in `mod.rs` does it.
//!
//! The factorial completes within the write that starts it: the result
//! of a 32-bit factorial is 0 from 34 on (34! holds 2^32), so at most 33
//! multiplications are ever needed, and the guest never sees the
//! "computing" bit. DMA is 4 KiB at most and also completes within the
//! write of the command, so no vCPU waits on a worker.

use serde::{Deserialize, Serialize};

/// Offsets in BAR 0.
pub const REG_ID: u64 = 0x00;
pub const REG_ALIVE: u64 = 0x04;
pub const REG_FACTORIAL: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_INTR_STATUS: u64 = 0x24;
pub const REG_INTR_RAISE: u64 = 0x60;
pub const REG_INTR_ACK: u64 = 0x64;
pub const REG_DMA_SRC: u64 = 0x80;
pub const REG_DMA_DST: u64 = 0x88;
pub const REG_DMA_COUNT: u64 = 0x90;
pub const REG_DMA_CMD: u64 = 0x98;

/// Version 1.0 and the magic 0xed.
pub const ID: u32 = 0x0100_00ed;

/// Status: a factorial is being computed (never seen here), and raise
/// interrupt 0x001 when one finishes.
pub const STATUS_COMPUTING: u32 = 0x01;
pub const STATUS_IRQ_FACTORIAL: u32 = 0x80;

/// Interrupt status bits the device raises itself.
pub const IRQ_FACTORIAL: u32 = 0x001;
pub const IRQ_DMA: u32 = 0x100;

/// DMA command bits.
pub const DMA_START: u64 = 0x01;
/// Set: from the device's buffer to RAM; clear: from RAM to the buffer.
pub const DMA_TO_RAM: u64 = 0x02;
pub const DMA_IRQ: u64 = 0x04;

/// The device's DMA buffer, in the device's own DMA address space.
pub const DMA_BUFFER_ADDR: u64 = 0x40000;
pub const DMA_BUFFER_SIZE: u64 = 4096;

/// What the device does after a register write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// Bits were added to the interrupt status (an MSI fires even if the
    /// status was already non-zero, as on QEMU).
    Raise,
    /// Bits were taken from the interrupt status.
    Lower,
    /// A DMA command was started: run `Regs::dma()` now.
    Dma,
}

/// One DMA transfer, as the guest programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaRegs {
    pub src: u64,
    pub dst: u64,
    pub count: u64,
    pub cmd: u64,
}

/// Where a transfer goes: between RAM at `ram` and the buffer at `buf`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transfer {
    pub ram: u64,
    /// Offset into the buffer.
    pub buf: usize,
    pub len: usize,
    pub to_ram: bool,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DmaError {
    #[error(
        "buffer range {start:#x}+{count:#x} is outside the device's buffer at \
         {DMA_BUFFER_ADDR:#x}+{DMA_BUFFER_SIZE:#x}"
    )]
    OutsideBuffer { start: u64, count: u64 },
    #[error("guest memory {addr:#x}+{count:#x} is not all RAM")]
    OutsideRam { addr: u64, count: u64 },
    #[error(transparent)]
    Blocked(crate::DmaFault),
    #[error("bus mastering is off")]
    NoBusMaster,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// The inverse of the last liveness write.
    pub alive: u32,
    pub factorial: u32,
    pub status: u32,
    pub irq_status: u32,
    pub dma: DmaRegs,
    pub buffer: Vec<u8>,
}

impl Default for Regs {
    fn default() -> Self {
        Regs {
            alive: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma: DmaRegs::default(),
            buffer: vec![0; DMA_BUFFER_SIZE as usize],
        }
    }
}

/// n! modulo 2^32.
pub fn factorial(n: u32) -> u32 {
    // From 34 on the product holds 2^32 and is 0 modulo it.
    if n >= 34 {
        return 0;
    }
    (1..=n).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// Registers below 0x80 take 4-byte accesses, the DMA registers 4 or 8.
fn width_ok(offset: u64, len: usize) -> bool {
    match offset {
        0..0x80 => len == 4,
        _ => len == 4 || len == 8,
    }
}

impl Regs {
    /// A read of `len` bytes at `offset`; what the device does not decode
    /// (other offsets, other widths) reads all-ones.
    pub fn read(&self, offset: u64, len: usize) -> u64 {
        if !width_ok(offset, len) {
            return u64::MAX;
        }
        match offset {
            REG_ID => u64::from(ID),
            REG_ALIVE => u64::from(self.alive),
            REG_FACTORIAL => u64::from(self.factorial),
            REG_STATUS => u64::from(self.status),
            REG_INTR_STATUS => u64::from(self.irq_status),
            REG_DMA_SRC => self.dma.src,
            REG_DMA_DST => self.dma.dst,
            REG_DMA_COUNT => self.dma.count,
            REG_DMA_CMD => self.dma.cmd,
            _ => u64::MAX,
        }
    }

    /// A write of `len` bytes (`value`, zero-extended) at `offset`.
    pub fn write(&mut self, offset: u64, len: usize, value: u64) -> Action {
        if !width_ok(offset, len) {
            return Action::None;
        }
        let v32 = value as u32;
        // The DMA registers are fixed while a transfer runs.
        let dma_busy = self.dma.cmd & DMA_START != 0;
        match offset {
            REG_ALIVE => self.alive = !v32,
            REG_FACTORIAL => {
                self.factorial = factorial(v32);
                if self.status & STATUS_IRQ_FACTORIAL != 0 {
                    self.irq_status |= IRQ_FACTORIAL;
                    return Action::Raise;
                }
            }
            REG_STATUS => {
                self.status = (self.status & !STATUS_IRQ_FACTORIAL) | (v32 & STATUS_IRQ_FACTORIAL)
            }
            REG_INTR_RAISE => {
                self.irq_status |= v32;
                return Action::Raise;
            }
            REG_INTR_ACK => {
                self.irq_status &= !v32;
                return Action::Lower;
            }
            REG_DMA_SRC if !dma_busy => self.dma.src = value,
            REG_DMA_DST if !dma_busy => self.dma.dst = value,
            REG_DMA_COUNT if !dma_busy => self.dma.count = value,
            // A command without the start bit is ignored, as on QEMU.
            REG_DMA_CMD if !dma_busy && value & DMA_START != 0 => {
                self.dma.cmd = value;
                return Action::Dma;
            }
            _ => {}
        }
        Action::None
    }

    /// The transfer the DMA registers describe, checked against the
    /// buffer (RAM is checked by whoever moves the bytes).
    pub fn transfer(&self) -> Result<Transfer, DmaError> {
        let d = &self.dma;
        let to_ram = d.cmd & DMA_TO_RAM != 0;
        let (buf_addr, ram) = if to_ram {
            (d.src, d.dst)
        } else {
            (d.dst, d.src)
        };
        let outside = DmaError::OutsideBuffer {
            start: buf_addr,
            count: d.count,
        };
        let end = buf_addr.checked_add(d.count).ok_or(outside.clone())?;
        if buf_addr < DMA_BUFFER_ADDR || end > DMA_BUFFER_ADDR + DMA_BUFFER_SIZE {
            return Err(outside);
        }
        if ram.checked_add(d.count).is_none() {
            return Err(DmaError::OutsideRam {
                addr: ram,
                count: d.count,
            });
        }
        Ok(Transfer {
            ram,
            buf: (buf_addr - DMA_BUFFER_ADDR) as usize,
            len: d.count as usize,
            to_ram,
        })
    }

    /// End the running transfer, done or refused alike: the start bit
    /// clears, and the DMA interrupt is raised if the command asked for
    /// it (true then), so a guest waiting either way goes on.
    pub fn finish_dma(&mut self) -> bool {
        self.dma.cmd &= !DMA_START;
        if self.dma.cmd & DMA_IRQ != 0 {
            self.irq_status |= IRQ_DMA;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_liveness() {
        let mut r = Regs::default();
        assert_eq!(r.read(REG_ID, 4), 0x0100_00ed);
        assert_eq!(r.write(REG_ALIVE, 4, 0x1234_5678), Action::None);
        assert_eq!(r.read(REG_ALIVE, 4), 0xedcb_a987);
        // The ID is read-only.
        r.write(REG_ID, 4, 0);
        assert_eq!(r.read(REG_ID, 4), u64::from(ID));
    }

    #[test]
    fn factorial_wraps_and_raises_when_asked() {
        assert_eq!(factorial(0), 1);
        assert_eq!(factorial(5), 120);
        assert_eq!(factorial(12), 479_001_600);
        // 13! modulo 2^32.
        assert_eq!(factorial(13), (6_227_020_800u64 % (1 << 32)) as u32);
        assert_eq!(
            factorial(33),
            (1..=33u32).fold(1u32, |a, k| a.wrapping_mul(k))
        );
        assert_eq!(factorial(34), 0);
        assert_eq!(factorial(u32::MAX), 0);
        let mut r = Regs::default();
        assert_eq!(r.write(REG_FACTORIAL, 4, 10), Action::None);
        assert_eq!(r.read(REG_FACTORIAL, 4), 3_628_800);
        assert_eq!(r.read(REG_STATUS, 4) & u64::from(STATUS_COMPUTING), 0);
        // Only the interrupt-enable bit of the status is writable.
        r.write(REG_STATUS, 4, 0xffff_ffff);
        assert_eq!(r.read(REG_STATUS, 4), u64::from(STATUS_IRQ_FACTORIAL));
        assert_eq!(r.write(REG_FACTORIAL, 4, 4), Action::Raise);
        assert_eq!(r.read(REG_FACTORIAL, 4), 24);
        assert_eq!(r.read(REG_INTR_STATUS, 4), u64::from(IRQ_FACTORIAL));
        r.write(REG_STATUS, 4, 0);
        assert_eq!(r.read(REG_STATUS, 4), 0);
    }

    #[test]
    fn interrupt_raise_and_acknowledge() {
        let mut r = Regs::default();
        assert_eq!(r.write(REG_INTR_RAISE, 4, 0x5), Action::Raise);
        assert_eq!(r.write(REG_INTR_RAISE, 4, 0x100), Action::Raise);
        assert_eq!(r.read(REG_INTR_STATUS, 4), 0x105);
        assert_eq!(r.write(REG_INTR_ACK, 4, 0x104), Action::Lower);
        assert_eq!(r.read(REG_INTR_STATUS, 4), 0x1);
        // The status register itself is read-only.
        r.write(REG_INTR_STATUS, 4, 0);
        assert_eq!(r.read(REG_INTR_STATUS, 4), 0x1);
    }

    #[test]
    fn widths_and_unknown_offsets_read_all_ones() {
        let mut r = Regs::default();
        assert_eq!(r.read(REG_ID, 2), u64::MAX);
        assert_eq!(r.read(REG_ID, 8), u64::MAX);
        assert_eq!(r.read(0x0c, 4), u64::MAX);
        assert_eq!(r.read(REG_DMA_SRC + 4, 4), u64::MAX);
        assert_eq!(r.read(0xf_fff0, 8), u64::MAX);
        assert_eq!(r.write(REG_ALIVE, 1, 5), Action::None);
        assert_eq!(r.read(REG_ALIVE, 4), 0);
        assert_eq!(r.write(REG_INTR_RAISE, 8, 1), Action::None);
        assert_eq!(r.read(REG_INTR_STATUS, 4), 0);
    }

    #[test]
    fn dma_registers_take_both_widths_and_hold_while_busy() {
        let mut r = Regs::default();
        r.write(REG_DMA_SRC, 8, 0x1_2345_6000);
        assert_eq!(r.read(REG_DMA_SRC, 8), 0x1_2345_6000);
        // A 4-byte write zero-extends, as on QEMU.
        r.write(REG_DMA_SRC, 4, 0x7000);
        assert_eq!(r.read(REG_DMA_SRC, 8), 0x7000);
        r.write(REG_DMA_DST, 8, DMA_BUFFER_ADDR);
        r.write(REG_DMA_COUNT, 8, 16);
        // Without the start bit the command is ignored.
        assert_eq!(r.write(REG_DMA_CMD, 4, DMA_IRQ), Action::None);
        assert_eq!(r.read(REG_DMA_CMD, 4), 0);
        assert_eq!(r.write(REG_DMA_CMD, 4, DMA_START | DMA_IRQ), Action::Dma);
        assert_eq!(
            r.transfer(),
            Ok(Transfer {
                ram: 0x7000,
                buf: 0,
                len: 16,
                to_ram: false
            })
        );
        assert_eq!(r.write(REG_DMA_COUNT, 8, 99), Action::None);
        assert_eq!(r.write(REG_DMA_CMD, 4, DMA_START), Action::None);
        assert_eq!(r.read(REG_DMA_COUNT, 8), 16);
        assert!(r.finish_dma());
        assert_eq!(r.read(REG_DMA_CMD, 4), DMA_IRQ);
        assert_eq!(r.read(REG_INTR_STATUS, 4), u64::from(IRQ_DMA));
    }

    #[test]
    fn transfers_outside_the_buffer_are_refused() {
        let mut r = Regs::default();
        let mut check = |src: u64, dst: u64, count: u64, cmd: u64| {
            r.dma = DmaRegs {
                src,
                dst,
                count,
                cmd: cmd | DMA_START,
            };
            r.transfer()
        };
        let end = DMA_BUFFER_ADDR + DMA_BUFFER_SIZE;
        assert!(check(0x1000, DMA_BUFFER_ADDR + 4092, 4, 0).is_ok());
        assert!(matches!(
            check(0x1000, DMA_BUFFER_ADDR + 4093, 4, 0),
            Err(DmaError::OutsideBuffer { .. })
        ));
        assert!(matches!(
            check(DMA_BUFFER_ADDR - 1, 0, 2, DMA_TO_RAM),
            Err(DmaError::OutsideBuffer { .. })
        ));
        assert!(matches!(
            check(end, 0, 0, DMA_TO_RAM),
            Ok(Transfer { len: 0, .. })
        ));
        assert!(matches!(
            check(u64::MAX, 0, 2, DMA_TO_RAM),
            Err(DmaError::OutsideBuffer { .. })
        ));
        assert!(matches!(
            check(0x1000, DMA_BUFFER_ADDR, u64::MAX, 0),
            Err(DmaError::OutsideBuffer { .. })
        ));
        assert!(matches!(
            check(DMA_BUFFER_ADDR, u64::MAX - 1, 4, DMA_TO_RAM),
            Err(DmaError::OutsideRam { .. })
        ));
    }
}
