use super::regs::*;
use super::*;
use crate::pci::config::COMMAND_MEMORY;
use crate::pci::msix::tests::MsiRecorder;
use crate::test_utils::IrqRecorder;
use crate::MsiMessage;

const GSI: u32 = 17;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn direct() -> Arc<dyn crate::DmaSpace> {
    Arc::new(crate::DirectDma)
}

fn dev(mem: &GuestMemoryMmap) -> (Edu, Arc<MsiRecorder>, Arc<IrqRecorder>) {
    let msi = Arc::new(MsiRecorder::default());
    let irq = Arc::new(IrqRecorder::default());
    let mut d = Edu::new(
        mem.clone(),
        Arc::new(crate::DirectDma),
        msi.clone(),
        irq.clone(),
        GSI,
    );
    let c = d.config_mut();
    c.set_bar_address(0, 0xc000_0000);
    c.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
    (d, msi, irq)
}

fn w(d: &mut Edu, off: u64, v: u64, len: usize) {
    d.write_bar(BAR, off, &v.to_le_bytes()[..len]);
}

fn r(d: &mut Edu, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    d.read_bar(BAR, off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn dma(d: &mut Edu, src: u64, dst: u64, count: u64, cmd: u64) {
    w(d, REG_DMA_SRC, src, 8);
    w(d, REG_DMA_DST, dst, 8);
    w(d, REG_DMA_COUNT, count, 8);
    w(d, REG_DMA_CMD, cmd | DMA_START, 4);
}

/// Enable MSI with a message to `data`.
fn enable_msi(d: &mut Edu, data: u16) {
    let at = d.msi.offset();
    d.write_config(at + 4, &0xfee0_0000u32.to_le_bytes());
    d.write_config(at + 12, &data.to_le_bytes());
    d.write_config(at + 2, &1u16.to_le_bytes());
}

#[test]
fn header_identifies_edu() {
    let mem = memory();
    let (d, _, _) = dev(&mem);
    let mut id = [0u8; 4];
    d.config().read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x11e8_1234);
    assert_eq!(d.config().bar(0).unwrap().size, 1 << 20);
    assert_eq!(d.config().byte(crate::pci::config::INTERRUPT_PIN), 1);
    // The capability list holds MSI.
    let cap = d.config().byte(crate::pci::config::CAPABILITIES_POINTER);
    assert_eq!(d.config().byte(usize::from(cap)), crate::pci::msi::CAP_ID);
}

#[test]
fn registers_through_the_bar() {
    let mem = memory();
    let (mut d, _, _) = dev(&mem);
    assert_eq!(r(&mut d, REG_ID, 4), 0x0100_00ed);
    w(&mut d, REG_ALIVE, 1, 4);
    assert_eq!(r(&mut d, REG_ALIVE, 4), 0xffff_fffe);
    w(&mut d, REG_FACTORIAL, 6, 4);
    assert_eq!(r(&mut d, REG_FACTORIAL, 4), 720);
    // Byte reads are not decoded.
    assert_eq!(r(&mut d, REG_ID, 1), 0xff);
    assert_eq!(r(&mut d, REG_ID, 2), 0xffff);
}

#[test]
fn intx_follows_status_until_msi() {
    let mem = memory();
    let (mut d, msi, irq) = dev(&mem);
    w(&mut d, REG_INTR_RAISE, 0x40, 4);
    assert_eq!(irq.take(), [(GSI, true)]);
    // Raising again keeps the line high without driving it.
    w(&mut d, REG_INTR_RAISE, 0x1, 4);
    assert!(irq.take().is_empty());
    w(&mut d, REG_INTR_ACK, 0x40, 4);
    assert!(irq.take().is_empty());
    w(&mut d, REG_INTR_ACK, 0x1, 4);
    assert_eq!(irq.take(), [(GSI, false)]);
    // INTx disabled in the command register: the status alone.
    d.write_config(0x04, &(COMMAND_MEMORY | COMMAND_INTX_DISABLE).to_le_bytes());
    w(&mut d, REG_INTR_RAISE, 0x2, 4);
    assert!(irq.take().is_empty());
    d.write_config(0x04, &(COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes());
    assert_eq!(irq.take(), [(GSI, true)]);
    // MSI on: INTA goes down; every raise sends one message.
    enable_msi(&mut d, 0x41);
    assert_eq!(irq.take(), [(GSI, false)]);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(msi.routes.lock().unwrap().last(), Some(&(0, Some(msg))));
    w(&mut d, REG_INTR_RAISE, 0x2, 4);
    w(&mut d, REG_INTR_RAISE, 0x2, 4);
    assert_eq!(*msi.fired.lock().unwrap(), [0, 0]);
    w(&mut d, REG_INTR_ACK, 0x2, 4);
    assert!(irq.take().is_empty());
    // A raise of nothing with an empty status sends nothing.
    w(&mut d, REG_INTR_RAISE, 0, 4);
    assert_eq!(msi.fired.lock().unwrap().len(), 2);
}

#[test]
fn factorial_interrupt() {
    let mem = memory();
    let (mut d, _, irq) = dev(&mem);
    w(&mut d, REG_STATUS, u64::from(STATUS_IRQ_FACTORIAL), 4);
    w(&mut d, REG_FACTORIAL, 5, 4);
    assert_eq!(r(&mut d, REG_FACTORIAL, 4), 120);
    assert_eq!(r(&mut d, REG_INTR_STATUS, 4), u64::from(IRQ_FACTORIAL));
    assert_eq!(irq.take(), [(GSI, true)]);
}

#[test]
fn dma_round_trip_with_interrupt() {
    let mem = memory();
    let (mut d, _, irq) = dev(&mem);
    mem.write_slice(b"edu says hello", GuestAddress(0x1000))
        .unwrap();
    dma(&mut d, 0x1000, DMA_BUFFER_ADDR + 8, 14, 0);
    assert_eq!(r(&mut d, REG_DMA_CMD, 4) & DMA_START, 0);
    assert!(irq.take().is_empty());
    dma(
        &mut d,
        DMA_BUFFER_ADDR + 8,
        0x2004,
        14,
        DMA_TO_RAM | DMA_IRQ,
    );
    let mut out = [0u8; 14];
    mem.read_slice(&mut out, GuestAddress(0x2004)).unwrap();
    assert_eq!(&out, b"edu says hello");
    assert_eq!(r(&mut d, REG_INTR_STATUS, 4), u64::from(IRQ_DMA));
    assert_eq!(irq.take(), [(GSI, true)]);
}

#[test]
fn malformed_dma_moves_nothing_and_completes() {
    let mem = memory();
    let (mut d, _, irq) = dev(&mem);
    mem.write_slice(&[0xaa; 8], GuestAddress(0xf_fff8)).unwrap();
    // Past the end of RAM: nothing is read into the buffer.
    dma(&mut d, 0xf_fff8, DMA_BUFFER_ADDR, 16, DMA_IRQ);
    assert_eq!(d.regs().buffer[..16], [0; 16]);
    assert_eq!(r(&mut d, REG_DMA_CMD, 4) & DMA_START, 0);
    assert_eq!(r(&mut d, REG_INTR_STATUS, 4), u64::from(IRQ_DMA));
    assert_eq!(irq.take(), [(GSI, true)]);
    // Past the end of RAM the other way: RAM untouched.
    dma(&mut d, DMA_BUFFER_ADDR, 0xf_fff8, 16, DMA_TO_RAM);
    let mut out = [0u8; 8];
    mem.read_slice(&mut out, GuestAddress(0xf_fff8)).unwrap();
    assert_eq!(out, [0xaa; 8]);
    // Outside the device's buffer, far outside RAM, huge counts.
    for (src, dst, count) in [
        (0x1000, DMA_BUFFER_ADDR + 4090, 16),
        (0x1000, 0, 16),
        (u64::MAX - 2, DMA_BUFFER_ADDR, 4),
        (0x1000, DMA_BUFFER_ADDR, u64::MAX),
        (1 << 40, DMA_BUFFER_ADDR, 4),
    ] {
        dma(&mut d, src, dst, count, 0);
        assert_eq!(r(&mut d, REG_DMA_CMD, 4) & DMA_START, 0);
    }
    assert_eq!(d.regs().buffer, vec![0; 4096]);
    // Without bus mastering the device may not touch memory.
    d.config_mut().set_command(COMMAND_MEMORY);
    mem.write_slice(&[7; 4], GuestAddress(0x3000)).unwrap();
    dma(&mut d, 0x3000, DMA_BUFFER_ADDR, 4, 0);
    assert_eq!(d.regs().buffer[..4], [0; 4]);
    // Writes to other BARs and odd widths are ignored.
    d.write_bar(1, REG_INTR_RAISE, &1u32.to_le_bytes());
    d.write_bar(BAR, REG_INTR_RAISE, &[1; 9]);
    assert_eq!(r(&mut d, REG_INTR_STATUS, 4), u64::from(IRQ_DMA));
}

#[test]
fn state_round_trips() {
    let mem = memory();
    let (mut d, _, _) = dev(&mem);
    enable_msi(&mut d, 0x55);
    w(&mut d, REG_ALIVE, 7, 4);
    w(&mut d, REG_FACTORIAL, 7, 4);
    mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
    dma(&mut d, 0x100, DMA_BUFFER_ADDR, 4, 0);
    w(&mut d, REG_INTR_RAISE, 0x8, 4);
    let s = d.save();
    let msi = Arc::new(MsiRecorder::default());
    let irq = Arc::new(IrqRecorder::default());
    let mut e = Edu::restore((mem.clone(), direct(), msi.clone(), irq.clone(), GSI), &s).unwrap();
    assert_eq!(e.save(), s);
    assert_eq!(r(&mut e, REG_ALIVE, 4), u64::from(!7u32));
    assert_eq!(r(&mut e, REG_FACTORIAL, 4), 5040);
    assert_eq!(e.regs().buffer[..4], [1, 2, 3, 4]);
    // The MSI route is handed again; INTA stays low under MSI.
    assert_eq!(msi.routes.lock().unwrap().len(), 1);
    assert!(irq.take().is_empty());
    // Under INTx a pending status raises the line again.
    e.write_config(e.msi.offset() + 2, &0u16.to_le_bytes());
    let s = e.save();
    let irq2 = Arc::new(IrqRecorder::default());
    Edu::restore((mem.clone(), direct(), msi, irq2.clone(), GSI), &s).unwrap();
    assert_eq!(irq2.take(), [(GSI, true)]);
}

#[test]
fn bad_states_are_refused() {
    let mem = memory();
    let (d, _, _) = dev(&mem);
    let args = || {
        (
            mem.clone(),
            direct(),
            Arc::new(MsiRecorder::default()) as Arc<dyn MsiVectors>,
            Arc::new(IrqRecorder::default()) as Arc<dyn IrqLine>,
            GSI,
        )
    };
    let mut s = d.save();
    s.regs.buffer.truncate(10);
    assert!(Edu::restore(args(), &s).is_err());
    let mut s = d.save();
    s.config.bytes[0] = 0;
    assert!(Edu::restore(args(), &s).is_err());
}
