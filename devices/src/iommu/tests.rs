use vm_memory::{Bytes, GuestAddress};

use super::regs::*;
use super::*;
use crate::pci::msix::tests::MsiRecorder;

/// Where the tests' tables live.
const ROOT: u64 = 0x10000;
const CONTEXT: u64 = 0x11000;
const SLPT: u64 = 0x12000;
const QUEUE: u64 = 0x30000;
const IRT: u64 = 0x40000;
/// The device: 00:03.0.
const SID: u16 = 0x18;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn unit(mem: &GuestMemoryMmap) -> (Vtd, Arc<MsiRecorder>) {
    let rec = Arc::new(MsiRecorder::default());
    (Vtd::new(mem.clone(), rec.clone(), true), rec)
}

fn w32(v: &mut Vtd, off: u64, val: u32) {
    v.mmio_write(MmioAddress(0), off, &val.to_le_bytes());
}

fn w64(v: &mut Vtd, off: u64, val: u64) {
    v.mmio_write(MmioAddress(0), off, &val.to_le_bytes());
}

fn r32(v: &mut Vtd, off: u64) -> u32 {
    let mut b = [0u8; 4];
    v.mmio_read(MmioAddress(0), off, &mut b);
    u32::from_le_bytes(b)
}

fn r64(v: &mut Vtd, off: u64) -> u64 {
    let mut b = [0u8; 8];
    v.mmio_read(MmioAddress(0), off, &mut b);
    u64::from_le_bytes(b)
}

/// Set one GCMD bit the way kvm-unit-tests and Linux do: the status
/// written back with the bit added.
fn gcmd(v: &mut Vtd, bit: u32) {
    let s = r32(v, GSTS);
    w32(v, GCMD, s | bit);
}

fn put(mem: &GuestMemoryMmap, at: u64, v: u64) {
    mem.write_obj(v, GuestAddress(at)).unwrap();
}

/// Root and context entries for `SID` with a 3-level table at `SLPT`
/// (kvm-unit-tests' vtd_map_range()), FPD as asked, and IOVA 0 mapped
/// read-write to `page`.
fn map(mem: &GuestMemoryMmap, page: u64, fpd: bool) {
    put(mem, ROOT, CONTEXT | 1);
    let ce = CONTEXT + u64::from(SID & 0xff) * 16;
    put(mem, ce, SLPT | u64::from(fpd) << 1 | 1);
    put(mem, ce + 8, u64::from(SID) << 8 | 1);
    put(mem, SLPT, (SLPT + 0x1000) | 3);
    put(mem, SLPT + 0x1000, (SLPT + 0x2000) | 3);
    put(mem, SLPT + 0x2000, page | 3);
}

fn enable_translation(v: &mut Vtd) {
    w64(v, RTADDR, ROOT);
    gcmd(v, GCMD_SRTP);
    gcmd(v, GCMD_TE);
}

#[test]
fn mmio_reads_capabilities_in_either_width() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    assert_eq!(r32(&mut v, VER), VERSION);
    let cap = r64(&mut v, CAP);
    assert_eq!(u64::from(r32(&mut v, CAP + 4)), cap >> 32);
    assert_ne!(cap & CAP_SAGAW_39, 0);
    assert_eq!(cap & CAP_SLLPS, CAP_SLLPS);
    assert_eq!(r32(&mut v, FSTS), 0);
    // Unaligned and odd widths are not registers.
    let mut b = [0u8; 2];
    v.mmio_read(MmioAddress(0), VER, &mut b);
    assert_eq!(b, [0xff; 2]);
    let mut b = [0u8; 4];
    v.mmio_read(MmioAddress(0), 2, &mut b);
    assert_eq!(b, [0xff; 4]);
}

#[test]
fn dma_is_identity_until_translation_is_enabled() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    let m = v.translate(SID, 0x1234, true).unwrap();
    assert_eq!((m.gpa, m.len), (0x1234, 0xdcc));
    map(&mem, 0x20000, false);
    enable_translation(&mut v);
    assert_eq!(r32(&mut v, GSTS), GCMD_TE | GCMD_SRTP);
    let m = v.translate(SID, 0x123, false).unwrap();
    assert_eq!((m.gpa, m.len), (0x20123, 0xedd));
    assert!(v.translate(SID, 0x10, true).is_ok());
}

#[test]
fn blocked_dma_is_recorded_with_its_reason() {
    let mem = memory();
    let (mut v, rec) = unit(&mem);
    map(&mem, 0x20000, false);
    enable_translation(&mut v);
    w32(&mut v, FEDATA, 0x41);
    w32(&mut v, FEADDR, 0xfee0_0000);
    w32(&mut v, FECTL, 0);
    // IOVA 0x1000 is not mapped.
    let f = v.translate(SID, 0x1abc, false).unwrap_err();
    assert_eq!(f.reason, Reason::NoRead);
    assert_eq!(r32(&mut v, FSTS), FSTS_PPF | 0x100);
    assert_eq!(r64(&mut v, FRCD), 0x1000);
    let hi = r64(&mut v, FRCD + 8);
    assert_eq!(hi, RECORD_F | 1 << 62 | 6 << 32 | u64::from(SID));
    // The fault event went out with the message programmed.
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(*rec.routes.lock().unwrap(), [(0, Some(msg))]);
    assert_eq!(*rec.fired.lock().unwrap(), [0]);
    // Other devices: no context entry; beyond 39 bits; the next record.
    let f = v.translate(0x20, 0, true).unwrap_err();
    assert_eq!(f.reason, Reason::ContextNotPresent);
    let f = v.translate(0x100, 0, true).unwrap_err();
    assert_eq!(f.reason, Reason::RootNotPresent);
    let f = v.translate(SID, 1 << 39, true).unwrap_err();
    assert_eq!(f.reason, Reason::BeyondWidth);
    assert_eq!(r32(&mut v, FSTS) >> 8, 0);
    // No event while PPF stays set.
    assert_eq!(rec.fired.lock().unwrap().len(), 1);
    // Clearing every F leaves nothing pending.
    for i in 0..4 {
        w32(&mut v, FRCD + 16 * i + 12, 0x8000_0000);
    }
    assert_eq!(r32(&mut v, FSTS) & FSTS_PPF, 0);
}

#[test]
fn fault_processing_disable_keeps_records_clear() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    map(&mem, 0x20000, true);
    enable_translation(&mut v);
    assert!(v.translate(SID, 0x5000, true).is_err());
    assert_eq!(r32(&mut v, FSTS), 0);
}

#[test]
fn large_pages_and_pass_through_translate() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    map(&mem, 0x20000, false);
    // A 2 MiB page at IOVA 2 MiB -> 4 MiB, read-only.
    put(&mem, SLPT + 0x1000 + 8, 0x40_0000 | 1 << 7 | 1);
    enable_translation(&mut v);
    let m = v.translate(SID, 0x20_1234, false).unwrap();
    assert_eq!((m.gpa, m.len), (0x40_1234, 0x1f_edcc));
    assert_eq!(
        v.translate(SID, 0x20_1234, true).unwrap_err().reason,
        Reason::NoWrite
    );
    // A 1 GiB page needs a 1 GiB aligned address.
    put(&mem, SLPT + 8, 0x4000_1000 | 1 << 7 | 3);
    assert_eq!(
        v.translate(SID, 0x4000_0000, false).unwrap_err().reason,
        Reason::PagingEntryReserved
    );
    // Pass-through (TT 2) and a reserved type.
    let ce = CONTEXT + u64::from(SID & 0xff) * 16;
    put(&mem, ce, 2 << 2 | 1);
    assert_eq!(v.translate(SID, 0x7777, true).unwrap().gpa, 0x7777);
    put(&mem, ce, 3 << 2 | 1);
    assert_eq!(
        v.translate(SID, 0, true).unwrap_err().reason,
        Reason::ContextInvalid
    );
    // A 4-level table.
    put(&mem, ce, 0x50000 | 1);
    put(&mem, ce + 8, 2);
    put(&mem, 0x50000, SLPT | 3);
    assert_eq!(v.translate(SID, 0x10, false).unwrap().gpa, 0x20010);
}

/// Write descriptor `i` of the queue at `QUEUE`.
fn descriptor(mem: &GuestMemoryMmap, i: u64, lo: u64, hi: u64) {
    put(mem, QUEUE + i * 16, lo);
    put(mem, QUEUE + i * 16 + 8, hi);
}

#[test]
fn queued_invalidation_runs_to_the_tail_and_waits_write_status() {
    let mem = memory();
    let (mut v, rec) = unit(&mem);
    gcmd(&mut v, GCMD_QIE);
    assert_eq!(r32(&mut v, GSTS), GCMD_QIE);
    w64(&mut v, IQA, QUEUE);
    w32(&mut v, IEDATA, 0x42);
    w32(&mut v, IEADDR, 0xfee0_1000);
    w32(&mut v, IECTL, 0);
    // Context-cache global, IOTLB global, interrupt entry cache, then a
    // wait with a status write and an interrupt.
    descriptor(&mem, 0, 0x11, 0);
    descriptor(&mem, 1, 0x12, 0);
    descriptor(&mem, 2, 0x4, 0);
    descriptor(&mem, 3, 0xcafe_f00d << 32 | 0x35, 0x6000);
    w64(&mut v, IQT, 4 << 4);
    assert_eq!(r64(&mut v, IQH), 4 << 4);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x6000)).unwrap(),
        0xcafe_f00d
    );
    assert_eq!(r32(&mut v, ICS), ICS_IWC);
    let msg = MsiMessage {
        address: 0xfee0_1000,
        data: 0x42,
    };
    assert_eq!(*rec.routes.lock().unwrap(), [(1, Some(msg))]);
    assert_eq!(*rec.fired.lock().unwrap(), [1]);
    // A device-TLB descriptor is not offered: IQE, the head stays on it.
    descriptor(&mem, 4, 0x3, 0);
    descriptor(&mem, 5, 0x25, 0x6004);
    w64(&mut v, IQT, 6 << 4);
    assert_eq!(r32(&mut v, FSTS), FSTS_IQE);
    assert_eq!(r64(&mut v, IQH), 4 << 4);
    // Fixed and cleared, the queue runs on.
    descriptor(&mem, 4, 0x11, 0);
    w32(&mut v, FSTS, FSTS_IQE);
    assert_eq!(r64(&mut v, IQH), 6 << 4);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x6004)).unwrap(), 0);
    // The queue wraps after 256 descriptors (QS 0).
    for i in 6..255 {
        descriptor(&mem, i, 0x11, 0);
    }
    w64(&mut v, IQT, 255 << 4);
    descriptor(&mem, 255, 0x7 << 32 | 0x25, 0x6008);
    w64(&mut v, IQT, 0);
    assert_eq!(r64(&mut v, IQH), 0);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x6008)).unwrap(), 7);
}

#[test]
fn queue_runs_only_when_enabled() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    w64(&mut v, IQA, QUEUE);
    descriptor(&mem, 0, 1 << 32 | 0x25, 0x6000);
    w64(&mut v, IQT, 1 << 4);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x6000)).unwrap(), 0);
    assert_eq!(r64(&mut v, IQH), 0);
}

/// kvm-unit-tests' vtd_setup_irte(): fixed, physical, edge, `vector` to
/// APIC `dest`, source-id verified against `sid`.
fn irte(mem: &GuestMemoryMmap, index: u64, vector: u64, dest: u64, sid: u16) {
    put(
        mem,
        IRT + index * 16,
        dest << 40 | vector << 16 | 1 << 1 | 1,
    );
    put(mem, IRT + index * 16 + 8, 1 << 18 | u64::from(sid));
}

fn enable_remapping(v: &mut Vtd) {
    w64(v, IRTA, IRT | 0xf);
    gcmd(v, GCMD_SIRTP);
    gcmd(v, GCMD_IRE);
}

/// kvm-unit-tests' vtd_setup_msi() message for IRTE `index`.
fn remappable(index: u64) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | (index & 0x7fff) << 5 | 1 << 4 | (index >> 15) << 2,
        data: 0,
    }
}

#[test]
fn remappable_interrupts_take_their_irte() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    let compat = MsiMessage {
        address: 0xfee0_1000,
        data: 0x30,
    };
    // Off: everything passes as it is.
    assert_eq!(v.remap_interrupt(compat, Some(SID)), Ok(compat));
    irte(&mem, 2, 0xee, 1, SID);
    enable_remapping(&mut v);
    let want = MsiMessage {
        address: 0xfee0_1000,
        data: 0xee,
    };
    assert_eq!(v.remap_interrupt(remappable(2), Some(SID)), Ok(want));
    // Without verification (the IOAPIC) and with a sub-handle.
    assert_eq!(v.remap_interrupt(remappable(2), None), Ok(want));
    let shv = MsiMessage {
        address: remappable(1).address | 1 << 3,
        data: 1,
    };
    assert_eq!(v.remap_interrupt(shv, Some(SID)), Ok(want));
    // The IRTE says level-triggered lowest priority, logical.
    put(
        &mem,
        IRT + 2 * 16,
        1 << 40 | 0xee << 16 | 1 << 5 | 1 << 4 | 1 << 2 | 1,
    );
    let m = v.remap_interrupt(remappable(2), Some(SID)).unwrap();
    assert_eq!((m.address, m.data), (0xfee0_1004, 0x80ee | 1 << 8));
}

#[test]
fn blocked_interrupts_are_faults() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    irte(&mem, 2, 0xee, 0, SID);
    enable_remapping(&mut v);
    let reason = |v: &mut Vtd, m, sid| v.remap_interrupt(m, sid).unwrap_err().reason;
    let compat = MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    };
    assert_eq!(reason(&mut v, compat, Some(SID)), Reason::IrCompatBlocked);
    assert_eq!(r64(&mut v, FRCD + 8) >> 32 & 0xff, 0x25);
    assert_eq!(
        reason(&mut v, remappable(3), Some(SID)),
        Reason::IrteNotPresent
    );
    assert_eq!(
        reason(&mut v, remappable(2), Some(0x20)),
        Reason::IrSourceId
    );
    // The source-id fault went through an IRTE with FPD: two records.
    assert_eq!(r32(&mut v, FSTS) >> 8, 2);
    // With CFI compatibility-format interrupts pass.
    gcmd(&mut v, GCMD_CFI);
    assert_eq!(v.remap_interrupt(compat, Some(SID)), Ok(compat));
    // A table of 2 entries (S = 0) ends before index 2.
    w64(&mut v, IRTA, IRT);
    gcmd(&mut v, GCMD_SIRTP);
    assert_eq!(
        reason(&mut v, remappable(2), Some(SID)),
        Reason::IrIndexBeyond
    );
    assert_eq!(r64(&mut v, FRCD + 32), 2 << 48);
}

#[test]
fn remapped_vectors_route_what_the_irte_says_now() {
    let mem = memory();
    let (v, _) = unit(&mem);
    let v = Arc::new(Mutex::new(v));
    let inner = Arc::new(MsiRecorder::default());
    let vecs = RemappedVectors::new(inner.clone(), v.clone(), SID);
    irte(&mem, 1, 0xee, 0, SID);
    enable_remapping(&mut v.lock().unwrap());
    vecs.route(0, Some(remappable(1)));
    assert!(inner.routes.lock().unwrap().is_empty());
    vecs.trigger(0);
    vecs.trigger(0);
    let first = MsiMessage {
        address: 0xfee0_0000,
        data: 0xee,
    };
    assert_eq!(*inner.routes.lock().unwrap(), [(0, Some(first))]);
    assert_eq!(*inner.fired.lock().unwrap(), [0, 0]);
    // A changed IRTE changes the route; a cleared one blocks.
    irte(&mem, 1, 0xef, 0, SID);
    vecs.trigger(0);
    assert_eq!(inner.routes.lock().unwrap()[1].1.unwrap().data, 0xef);
    put(&mem, IRT + 16, 0);
    vecs.trigger(0);
    assert_eq!(inner.fired.lock().unwrap().len(), 3);
    vecs.route(0, None);
    assert_eq!(inner.routes.lock().unwrap()[2], (0, None));
}

#[test]
fn edu_dma_goes_through_the_unit() {
    use crate::edu::{regs as edu_regs, Edu, BAR};
    use crate::pci::PciDevice;
    let mem = memory();
    let (v, _) = unit(&mem);
    let v = Arc::new(Mutex::new(v));
    map(&mem, 0x20000, false);
    enable_translation(&mut v.lock().unwrap());
    put(&mem, 0x20000, 0x1234_5678);
    let mut d = Edu::new(
        mem.clone(),
        Arc::new(DmaPort::new(v.clone(), SID)),
        Arc::new(MsiRecorder::default()),
        Arc::new(crate::test_utils::IrqRecorder::default()),
        16,
    );
    d.config_mut().set_command(0x6);
    let dma = |d: &mut Edu, src: u64, dst: u64, cmd: u64| {
        for (off, val) in [
            (edu_regs::REG_DMA_SRC, src),
            (edu_regs::REG_DMA_DST, dst),
            (edu_regs::REG_DMA_COUNT, 4),
            (edu_regs::REG_DMA_CMD, cmd | edu_regs::DMA_START),
        ] {
            d.write_bar(BAR, off, &val.to_le_bytes());
        }
    };
    // kvm-unit-tests' vtd_test_dmar(): IOVA 0 in, IOVA 4 out.
    dma(&mut d, 0, edu_regs::DMA_BUFFER_ADDR, 0);
    dma(&mut d, edu_regs::DMA_BUFFER_ADDR, 4, edu_regs::DMA_TO_RAM);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x20004)).unwrap(),
        0x1234_5678
    );
    // An unmapped IOVA moves nothing and is recorded.
    dma(
        &mut d,
        edu_regs::DMA_BUFFER_ADDR,
        0x1000,
        edu_regs::DMA_TO_RAM,
    );
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0);
    let mut v = v.lock().unwrap();
    assert_eq!(r64(&mut v, FRCD + 8) >> 32 & 0xff, 5);
}

#[test]
fn state_round_trips_and_bad_states_are_refused() {
    let mem = memory();
    let (mut v, _) = unit(&mem);
    map(&mem, 0x20000, false);
    enable_translation(&mut v);
    enable_remapping(&mut v);
    gcmd(&mut v, GCMD_QIE);
    assert!(v.translate(SID, 0x3000, true).is_err());
    let s = v.save();
    let args = |ir| (mem.clone(), Arc::new(MsiRecorder::default()) as _, ir);
    let mut w = Vtd::restore(args(true), &s).unwrap();
    assert_eq!(w.save(), s);
    assert_eq!(w.translate(SID, 0x10, false).unwrap().gpa, 0x20010);
    assert_eq!(r32(&mut w, FSTS), FSTS_PPF | 0x100);
    let e = Vtd::restore(args(false), &s).err().unwrap();
    assert!(e.to_string().contains("interrupt remapping on"), "{e}");
    let mut bad = s.clone();
    bad.records.pop();
    assert!(Vtd::restore(args(true), &bad).is_err());
    let mut bad = s;
    bad.fri = 9;
    assert!(Vtd::restore(args(true), &bad).is_err());
}

#[test]
fn an_ioapic_entry_in_remappable_format_takes_its_irte() {
    use crate::ioapic::{Ioapic, IOAPIC_BASE};
    use crate::test_utils::MsiRecorder as SinkRecorder;
    use vm_device::MutDeviceMmio;
    let mem = memory();
    let (v, _) = unit(&mem);
    let v = Arc::new(Mutex::new(v));
    let inner = Arc::new(SinkRecorder::default());
    let mut apic = Ioapic::new(Arc::new(RemappedSink::new(inner.clone(), v.clone())));
    irte(&mem, 1, 0xee, 1, SID);
    enable_remapping(&mut v.lock().unwrap());
    inner.take_routes();
    // Pin 3: handle 1 in bits 63:49, the format bit, the same vector as
    // the IRTE (VT-d asks for it), edge.
    let mut w = |off: u64, val: u32| {
        apic.mmio_write(
            vm_device::bus::MmioAddress(IOAPIC_BASE),
            off,
            &val.to_le_bytes(),
        )
    };
    w(0x00, 0x10 + 2 * 3 + 1);
    w(0x10, (1 << 17) | (1 << 16));
    w(0x00, 0x10 + 2 * 3);
    w(0x10, 0xee);
    let want = MsiMessage {
        address: 0xfee0_1000,
        data: 0xee,
    };
    assert_eq!(inner.take_routes().last(), Some(&(3, want)));
    apic.set_irq(3, true);
    assert_eq!(inner.take_sent(), [want]);
    // A cleared IRTE blocks the interrupt.
    put(&mem, IRT + 16, 0);
    apic.set_irq(3, false);
    apic.set_irq(3, true);
    assert!(inner.take_sent().is_empty());
}
