//! QEMU's pc-testdev, the device kvm-unit-tests drive to exercise KVM's
//! instruction emulation, page-fault paths and interrupt routing.
//!
//! The port half ([`PcTestDev`]) is registered at [`PC_TESTDEV_IOPORT_BASE`]
//! ([`PC_TESTDEV_IOPORT_SIZE`] ports: scratch register, flush-page port,
//! byte-wise scratch register) and at [`PC_TESTDEV_IRQ_BASE`]
//! ([`PC_TESTDEV_IRQ_COUNT`] ports, one per interrupt line). The memory half
//! ([`TestDevIomem`]) is a [`TESTDEV_IOMEM_SIZE`]-byte buffer that the VMM
//! maps as MMIO at [`TESTDEV_IOMEM_BASE`], so that every guest access exits
//! to the VMM and goes through KVM's MMIO emulation.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::{fill_all_ones, le_value, IrqLine, PageFlusher, Persist, RestoreError};

/// First port of the scratch/flush block.
pub const PC_TESTDEV_IOPORT_BASE: u16 = 0xe0;
/// Ports in the scratch/flush block: 0xe0-0xe3 scratch, 0xe4-0xe7 flush page,
/// 0xe8-0xeb byte-wise scratch.
pub const PC_TESTDEV_IOPORT_SIZE: u16 = 12;
/// First port of the interrupt-line block.
pub const PC_TESTDEV_IRQ_BASE: u16 = 0x2000;
/// Ports in the interrupt-line block, one per ISA/IOAPIC line.
pub const PC_TESTDEV_IRQ_COUNT: u16 = 0x18;
/// Guest-physical address of the MMIO buffer.
pub const TESTDEV_IOMEM_BASE: u64 = 0xff00_0000;
/// Size of the MMIO buffer.
pub const TESTDEV_IOMEM_SIZE: u64 = 0x1_0000;

const SCRATCH_PORT: u16 = PC_TESTDEV_IOPORT_BASE;
const FLUSH_PORT: u16 = PC_TESTDEV_IOPORT_BASE + 4;
const SCRATCH_BYTE_PORT: u16 = PC_TESTDEV_IOPORT_BASE + 8;
const SCRATCH_LEN: u16 = 4;

/// Which register an access lands on, decided by the port of its first byte.
enum Target {
    /// The scratch register, with the byte lane of the first byte.
    Scratch(u16),
    Flush(u16),
    Irq(u16),
    None,
}

fn decode(base: PioAddress, offset: PioAddressOffset) -> Target {
    // Decode on the absolute port so that the device answers the same however
    // the VMM splits its ranges.
    let Some(port) = base.0.checked_add(offset) else {
        return Target::None;
    };
    match port {
        p if (SCRATCH_PORT..SCRATCH_PORT + SCRATCH_LEN).contains(&p) => {
            Target::Scratch(p - SCRATCH_PORT)
        }
        p if (FLUSH_PORT..FLUSH_PORT + 4).contains(&p) => Target::Flush(p - FLUSH_PORT),
        p if (SCRATCH_BYTE_PORT..SCRATCH_BYTE_PORT + SCRATCH_LEN).contains(&p) => {
            Target::Scratch(p - SCRATCH_BYTE_PORT)
        }
        p if (PC_TESTDEV_IRQ_BASE..PC_TESTDEV_IRQ_BASE + PC_TESTDEV_IRQ_COUNT).contains(&p) => {
            Target::Irq(p - PC_TESTDEV_IRQ_BASE)
        }
        _ => Target::None,
    }
}

/// The port half of pc-testdev.
pub struct PcTestDev {
    scratch: u32,
    irq: Arc<dyn IrqLine>,
    flusher: Arc<dyn PageFlusher>,
}

impl std::fmt::Debug for PcTestDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcTestDev")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl PcTestDev {
    /// Creates the device with a zero scratch register; interrupt-line writes
    /// go to `irq`, flush-page writes to `flusher`.
    pub fn new(irq: Arc<dyn IrqLine>, flusher: Arc<dyn PageFlusher>) -> Self {
        PcTestDev {
            scratch: 0,
            irq,
            flusher,
        }
    }

    fn read_scratch(&self, lane: u16, data: &mut [u8]) {
        let bytes = self.scratch.to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            // Bytes past the register read as 0, as QEMU's masking yields.
            *out = usize::from(lane)
                .checked_add(i)
                .and_then(|idx| bytes.get(idx))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_scratch(&mut self, lane: u16, data: &[u8]) {
        let mut bytes = self.scratch.to_le_bytes();
        let start = usize::from(lane);
        // Drop bytes past the register.
        for (dst, src) in bytes.iter_mut().skip(start).zip(data) {
            *dst = *src;
        }
        self.scratch = u32::from_le_bytes(bytes);
    }
}

impl MutDevicePio for PcTestDev {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match decode(base, offset) {
            Target::Scratch(lane) => self.read_scratch(lane, data),
            // Write-only registers; QEMU has no read handler for either.
            Target::Flush(_) | Target::Irq(_) => data.fill(0),
            Target::None => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match decode(base, offset) {
            Target::Scratch(lane) => self.write_scratch(lane, data),
            // QEMU only accepts aligned 4-byte writes of the address.
            Target::Flush(0) if data.len() == 4 => {
                if let Some(gpa) = le_value(data) {
                    self.flusher.flush_page(gpa & !0xfff);
                }
            }
            // QEMU only accepts 1-byte writes to the interrupt lines.
            Target::Irq(line) => {
                if let [value] = data {
                    self.irq.set_level(u32::from(line), *value != 0);
                }
            }
            Target::Flush(_) | Target::None => {}
        }
    }
}

/// Saved state of a [`PcTestDev`]: the scratch register. Interrupt line
/// levels live in the interrupt controllers, which the VMM saves.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PcTestDevState {
    pub scratch: u32,
}

impl Persist for PcTestDev {
    type State = PcTestDevState;
    type Args = (Arc<dyn IrqLine>, Arc<dyn PageFlusher>);
    type Error = RestoreError;

    fn save(&self) -> PcTestDevState {
        PcTestDevState {
            scratch: self.scratch,
        }
    }

    fn restore(args: Self::Args, state: &PcTestDevState) -> Result<Self, RestoreError> {
        let (irq, flusher) = args;
        let mut dev = PcTestDev::new(irq, flusher);
        dev.scratch = state.scratch;
        Ok(dev)
    }
}

/// The MMIO half of pc-testdev: plain bytes behind an MMIO window.
#[derive(Clone, PartialEq, Eq)]
pub struct TestDevIomem {
    buf: Vec<u8>,
}

impl std::fmt::Debug for TestDevIomem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDevIomem")
            .field("len", &self.buf.len())
            .finish_non_exhaustive()
    }
}

impl Default for TestDevIomem {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDevIomem {
    /// Creates a zero-filled buffer.
    pub fn new() -> Self {
        TestDevIomem {
            buf: vec![0u8; TESTDEV_IOMEM_SIZE as usize],
        }
    }

    /// Returns the in-bounds part of `buf` for an access at `offset`, if any.
    fn window(&mut self, offset: MmioAddressOffset, len: usize) -> &mut [u8] {
        let Ok(start) = usize::try_from(offset) else {
            return &mut [];
        };
        if start >= self.buf.len() {
            return &mut [];
        }
        let end = start.saturating_add(len).min(self.buf.len());
        &mut self.buf[start..end]
    }
}

impl MutDeviceMmio for TestDevIomem {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let window = self.window(offset, data.len());
        let (inside, outside) = data.split_at_mut(window.len());
        inside.copy_from_slice(window);
        fill_all_ones(outside);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let window = self.window(offset, data.len());
        let n = window.len();
        window.copy_from_slice(&data[..n]);
    }
}

/// Saved state of a [`TestDevIomem`]: the whole buffer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TestDevIomemState {
    pub buf: Vec<u8>,
}

impl Persist for TestDevIomem {
    type State = TestDevIomemState;
    type Args = ();
    type Error = RestoreError;

    fn save(&self) -> TestDevIomemState {
        TestDevIomemState {
            buf: self.buf.clone(),
        }
    }

    fn restore(_args: (), state: &TestDevIomemState) -> Result<Self, RestoreError> {
        if state.buf.len() as u64 != TESTDEV_IOMEM_SIZE {
            return Err(RestoreError::Invalid {
                device: "pc-testdev iomem",
                reason: format!(
                    "buffer is {} bytes, expected {}",
                    state.buf.len(),
                    TESTDEV_IOMEM_SIZE
                ),
            });
        }
        Ok(TestDevIomem {
            buf: state.buf.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{FlushRecorder, IrqRecorder};

    const IO: PioAddress = PioAddress(PC_TESTDEV_IOPORT_BASE);
    const IRQ: PioAddress = PioAddress(PC_TESTDEV_IRQ_BASE);
    const MEM: MmioAddress = MmioAddress(TESTDEV_IOMEM_BASE);

    fn device() -> (PcTestDev, Arc<IrqRecorder>, Arc<FlushRecorder>) {
        let irq = Arc::new(IrqRecorder::default());
        let flush = Arc::new(FlushRecorder::default());
        (PcTestDev::new(irq.clone(), flush.clone()), irq, flush)
    }

    fn rd(dev: &mut PcTestDev, base: PioAddress, offset: u16, width: usize) -> Vec<u8> {
        let mut buf = vec![0xaau8; width];
        dev.pio_read(base, offset, &mut buf);
        buf
    }

    #[test]
    fn scratch_register_byte_lanes() {
        let (mut dev, _, _) = device();
        dev.pio_write(IO, 0, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(rd(&mut dev, IO, 0, 4), [0x78, 0x56, 0x34, 0x12]);
        assert_eq!(rd(&mut dev, IO, 1, 2), [0x56, 0x34]);
        assert_eq!(rd(&mut dev, IO, 3, 1), [0x12]);
        // Bytes past the register read as 0 and are dropped on write.
        assert_eq!(rd(&mut dev, IO, 2, 4), [0x34, 0x12, 0, 0]);
        dev.pio_write(IO, 2, &[0xcc, 0xdd, 0xee, 0xff]);
        assert_eq!(rd(&mut dev, IO, 0, 4), [0x78, 0x56, 0xcc, 0xdd]);
        // Nothing leaked into the flush port.
        assert_eq!(rd(&mut dev, IO, 4, 4), [0, 0, 0, 0]);
    }

    #[test]
    fn byte_port_aliases_scratch_register() {
        let (mut dev, _, _) = device();
        dev.pio_write(IO, 8, &[0x11]);
        dev.pio_write(IO, 9, &[0x22]);
        dev.pio_write(IO, 10, &[0x33, 0x44]);
        assert_eq!(rd(&mut dev, IO, 0, 4), [0x11, 0x22, 0x33, 0x44]);
        dev.pio_write(IO, 0, &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(rd(&mut dev, IO, 8, 4), [0xaa, 0xbb, 0xcc, 0xdd]);
        assert_eq!(rd(&mut dev, IO, 11, 2), [0xdd, 0]);
        // Separately registered ranges decode the same.
        let byte_base = PioAddress(PC_TESTDEV_IOPORT_BASE + 8);
        assert_eq!(rd(&mut dev, byte_base, 1, 1), [0xbb]);
    }

    #[test]
    fn flush_page_takes_aligned_four_byte_writes() {
        let (mut dev, _, flush) = device();
        dev.pio_write(IO, 4, &0x1234_5678u32.to_le_bytes());
        dev.pio_write(IO, 4, &[0x00, 0x10]);
        dev.pio_write(IO, 5, &0x1000u32.to_le_bytes());
        dev.pio_write(IO, 4, &[0u8; 8]);
        assert_eq!(flush.take(), vec![0x1234_5000]);
        assert_eq!(rd(&mut dev, IO, 4, 4), [0, 0, 0, 0]);
        assert_eq!(rd(&mut dev, IO, 0, 4), [0, 0, 0, 0]);
    }

    #[test]
    fn irq_lines_take_byte_writes() {
        let (mut dev, irq, _) = device();
        dev.pio_write(IRQ, 4, &[1]);
        dev.pio_write(IRQ, 4, &[0]);
        dev.pio_write(IRQ, 23, &[0x80]);
        dev.pio_write(IRQ, 0, &[1, 0]);
        dev.pio_write(IRQ, 0, &[1, 0, 0, 0]);
        dev.pio_write(IRQ, 24, &[1]);
        assert_eq!(irq.take(), vec![(4, true), (4, false), (23, true)]);
        assert_eq!(rd(&mut dev, IRQ, 0, 1), [0]);
        assert_eq!(rd(&mut dev, IRQ, 23, 4), [0, 0, 0, 0]);
        assert_eq!(rd(&mut dev, IRQ, 24, 1), [0xff]);
    }

    #[test]
    fn unknown_ports_and_widths_do_not_panic() {
        let (mut dev, irq, flush) = device();
        for base in [IO, IRQ, PioAddress(0), PioAddress(0xffff)] {
            for offset in [0u16, 3, 11, 12, 0x17, 0x18, 0xffff] {
                for width in 0..=8usize {
                    let mut buf = vec![0u8; width];
                    dev.pio_read(base, offset, &mut buf);
                    dev.pio_write(base, offset, &vec![0u8; width]);
                }
            }
        }
        // Everything written was zero, so only level-low IRQ writes appear.
        assert!(irq.take().iter().all(|(_, level)| !level));
        assert!(flush.take().iter().all(|gpa| *gpa == 0));
        assert_eq!(rd(&mut dev, IO, 12, 2), [0xff, 0xff]);
        assert_eq!(rd(&mut dev, PioAddress(0xffff), 1, 1), [0xff]);
    }

    #[test]
    fn pc_testdev_save_restore_round_trip() {
        let (mut dev, _, _) = device();
        dev.pio_write(IO, 0, &[1, 2, 3, 4]);
        let state = dev.save();
        assert_eq!(state.scratch, 0x0403_0201);

        let irq = Arc::new(IrqRecorder::default());
        let flush = Arc::new(FlushRecorder::default());
        let mut restored =
            PcTestDev::restore((irq.clone(), flush.clone()), &state).expect("restore");
        assert_eq!(restored.save(), state);
        for (offset, width) in [(0u16, 4usize), (1, 2), (8, 1), (11, 1), (4, 4)] {
            assert_eq!(
                rd(&mut dev, IO, offset, width),
                rd(&mut restored, IO, offset, width)
            );
        }
        restored.pio_write(IRQ, 2, &[1]);
        restored.pio_write(IO, 4, &0x2345u32.to_le_bytes());
        assert_eq!(irq.take(), vec![(2, true)]);
        assert_eq!(flush.take(), vec![0x2000]);
    }

    fn mrd(mem: &mut TestDevIomem, offset: u64, width: usize) -> Vec<u8> {
        let mut buf = vec![0u8; width];
        mem.mmio_read(MEM, offset, &mut buf);
        buf
    }

    #[test]
    fn iomem_reads_back_writes_of_every_width() {
        let mut mem = TestDevIomem::new();
        assert_eq!(mrd(&mut mem, 0, 8), [0u8; 8]);
        for width in 1..=8usize {
            let offset = (width * 16) as u64 + 3;
            let data: Vec<u8> = (1..=width as u8).collect();
            mem.mmio_write(MEM, offset, &data);
            assert_eq!(mrd(&mut mem, offset, width), data);
        }
        mem.mmio_write(MEM, 0x100, &0x1122_3344u32.to_le_bytes());
        assert_eq!(mrd(&mut mem, 0x101, 2), [0x33, 0x22]);
    }

    #[test]
    fn iomem_truncates_accesses_past_the_end() {
        let mut mem = TestDevIomem::new();
        let last = TESTDEV_IOMEM_SIZE - 2;
        mem.mmio_write(MEM, last, &[1, 2, 3, 4]);
        assert_eq!(mrd(&mut mem, last, 4), [1, 2, 0xff, 0xff]);
        assert_eq!(mrd(&mut mem, TESTDEV_IOMEM_SIZE, 2), [0xff, 0xff]);
        assert_eq!(mrd(&mut mem, u64::MAX, 8), [0xff; 8]);
        mem.mmio_write(MEM, u64::MAX, &[1; 8]);
        mem.mmio_write(MEM, TESTDEV_IOMEM_SIZE, &[1; 8]);
        assert_eq!(mrd(&mut mem, 0, 0), Vec::<u8>::new());
        assert_eq!(mem.save().buf.len() as u64, TESTDEV_IOMEM_SIZE);
    }

    #[test]
    fn iomem_save_restore_round_trip() {
        let mut mem = TestDevIomem::new();
        mem.mmio_write(MEM, 0x10, &[9, 8, 7, 6, 5, 4, 3, 2]);
        mem.mmio_write(MEM, TESTDEV_IOMEM_SIZE - 1, &[0x42]);
        let state = mem.save();
        let mut restored = TestDevIomem::restore((), &state).expect("restore");
        assert_eq!(restored.save(), state);
        for (offset, width) in [(0x10u64, 8usize), (0x12, 4), (TESTDEV_IOMEM_SIZE - 1, 2)] {
            assert_eq!(
                mrd(&mut mem, offset, width),
                mrd(&mut restored, offset, width)
            );
        }
    }

    #[test]
    fn iomem_restore_rejects_wrong_size() {
        for len in [0usize, 0xffff, 0x1_0001] {
            let state = TestDevIomemState { buf: vec![0; len] };
            assert!(matches!(
                TestDevIomem::restore((), &state),
                Err(RestoreError::Invalid { .. })
            ));
        }
    }
}
