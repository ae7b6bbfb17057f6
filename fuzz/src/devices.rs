//! Register accesses to each device in devices/, as a guest makes them
//! through the bus: any sequence of reads and writes of any width at any
//! offset of the device's ports or MMIO window, with host-side events
//! (serial input, a snapshot round trip) mixed in.
//!
//! Input: a sequence of 4-byte operations and their values:
//!   byte 0: bits 0-1 kind (0 read, 1 write, 2 host event, 3 round trip),
//!           bits 2-4 width (1, 2, 4, 8, 3, 0, 16, 1 bytes)
//!   byte 1: window (modulo the device's windows)
//!   byte 2-3: offset in the window (modulo its length)
//!   then `width` bytes of value for a write.
//! A round trip saves the device, encodes the state as a snapshot does,
//! decodes it and replaces the device by the restored one, which must
//! succeed for every state a device can reach.
//!
//! A new device is one `Bench` (its windows and how to build and restore
//! it) and one function below.

use std::io::sink;

use devices::acpi_pm::{self, AcpiPm};
use devices::debug_exit::{self, DebugExit};
use devices::fw_cfg::{self, FwCfg};
use devices::i8042::{self, I8042};
use devices::ioapic::{self, Ioapic};
use devices::iommu::Vtd;
use devices::rtc::{self, Rtc};
use devices::serial::{self, SerialDevice};
use devices::testdev::{self, PcTestDev, TestDevIomem};
use devices::Persist;
use serde::{de::DeserializeOwned, Serialize};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{fakes, Input};

const WIDTHS: [usize; 8] = [1, 2, 4, 8, 3, 0, 16, 1];

/// A bus window of a device: where the VMM registers it.
#[derive(Clone, Copy)]
pub struct Window {
    pub base: u64,
    pub len: u64,
    pub mmio: bool,
}

const fn pio(base: u16, len: u16) -> Window {
    Window {
        base: base as u64,
        len: len as u64,
        mmio: false,
    }
}

/// One device under test.
trait Bench {
    fn windows(&self) -> &'static [Window];
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]);
    fn write(&mut self, w: Window, offset: u64, data: &[u8]);
    /// A host-side event with `arg` (default: none).
    fn host(&mut self, _arg: &[u8]) {}
    fn round_trip(&mut self);
}

/// Save `dev`'s state, send it through postcard as a snapshot does, and
/// restore from what comes back.
fn through_snapshot<D: Persist>(dev: &D, args: D::Args) -> D
where
    D::State: Serialize + DeserializeOwned,
    D::Error: std::fmt::Debug,
{
    let bytes = postcard::to_stdvec(&dev.save()).expect("encoding a saved state");
    let state: D::State = postcard::from_bytes(&bytes).expect("decoding a saved state");
    D::restore(args, &state).expect("restoring a state the device saved")
}

fn pio_read(dev: &mut impl MutDevicePio, w: Window, offset: u64, data: &mut [u8]) {
    dev.pio_read(PioAddress(w.base as u16), offset as u16, data);
}

fn pio_write(dev: &mut impl MutDevicePio, w: Window, offset: u64, data: &[u8]) {
    dev.pio_write(PioAddress(w.base as u16), offset as u16, data);
}

fn drive(bench: &mut dyn Bench, data: &[u8]) {
    let mut input = Input::new(data);
    let windows = bench.windows();
    let mut buf = [0u8; 16];
    while !input.is_empty() {
        let op = input.u8();
        let w = windows[usize::from(input.u8()) % windows.len()];
        let offset = u64::from(input.u16()) % w.len;
        let width = WIDTHS[usize::from(op >> 2) & 7];
        match op & 3 {
            0 => {
                buf.fill(0xa5);
                bench.read(w, offset, &mut buf[..width]);
            }
            1 => {
                let v = input.bytes(width);
                bench.write(w, offset, v);
            }
            2 => {
                let arg = input.bytes(width);
                bench.host(arg);
            }
            _ => bench.round_trip(),
        }
    }
    bench.round_trip();
}

struct Serial(SerialDevice);

fn serial_args() -> (EventFd, devices::serial::SerialOut) {
    (
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        Box::new(sink()),
    )
}

impl Bench for Serial {
    fn windows(&self) -> &'static [Window] {
        const W: [Window; 1] = [pio(serial::COM1_BASE, serial::SERIAL_PORT_COUNT)];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        pio_read(&mut self.0, w, offset, data);
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        pio_write(&mut self.0, w, offset, data);
    }
    fn host(&mut self, arg: &[u8]) {
        let room = self.0.fifo_capacity();
        let taken = self.0.enqueue_input(arg);
        assert!(
            taken <= arg.len() && taken <= room,
            "{taken} of {arg:?}, room {room}"
        );
    }
    fn round_trip(&mut self) {
        self.0 = through_snapshot(&self.0, serial_args());
    }
}

pub fn serial(data: &[u8]) {
    let (irq, out) = serial_args();
    drive(&mut Serial(SerialDevice::new(irq, out)), data);
}

struct RtcBench(Rtc);

impl Bench for RtcBench {
    fn windows(&self) -> &'static [Window] {
        const W: [Window; 1] = [pio(rtc::RTC_INDEX_PORT, rtc::RTC_PORT_COUNT)];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        pio_read(&mut self.0, w, offset, data);
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        pio_write(&mut self.0, w, offset, data);
    }
    fn host(&mut self, arg: &[u8]) {
        // The CMOS fields the VMM fills at start-up.
        if let [index, value, ..] = arg {
            self.0.set_cmos(*index, *value);
        }
    }
    fn round_trip(&mut self) {
        self.0 = through_snapshot(&self.0, ());
    }
}

pub fn rtc(data: &[u8]) {
    drive(&mut RtcBench(Rtc::new()), data);
}

struct FwCfgBench(FwCfg);

fn fw_cfg_items() -> FwCfg {
    FwCfg::for_vm(2, 128 << 20, b"kernel data".to_vec())
}

impl Bench for FwCfgBench {
    fn windows(&self) -> &'static [Window] {
        const W: [Window; 1] = [pio(fw_cfg::FW_CFG_PORT_SEL, fw_cfg::FW_CFG_PORT_COUNT)];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        pio_read(&mut self.0, w, offset, data);
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        pio_write(&mut self.0, w, offset, data);
    }
    fn round_trip(&mut self) {
        self.0 = through_snapshot(&self.0, ());
        self.0.set_kernel_data(b"kernel data".to_vec());
    }
}

pub fn fw_cfg(data: &[u8]) {
    drive(&mut FwCfgBench(fw_cfg_items()), data);
}

/// A device on port I/O alone, restored with the arguments `args` makes:
/// the Bench of every device without host events or MMIO.
struct PioBench<D: Persist> {
    dev: D,
    windows: &'static [Window],
    args: fn() -> D::Args,
}

impl<D: Persist> PioBench<D> {
    fn new(windows: &'static [Window], args: fn() -> D::Args, new: fn(D::Args) -> D) -> Self {
        PioBench {
            dev: new(args()),
            windows,
            args,
        }
    }
}

impl<D> Bench for PioBench<D>
where
    D: Persist + MutDevicePio,
    D::State: Serialize + DeserializeOwned,
    D::Error: std::fmt::Debug,
{
    fn windows(&self) -> &'static [Window] {
        self.windows
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        pio_read(&mut self.dev, w, offset, data);
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        pio_write(&mut self.dev, w, offset, data);
    }
    fn round_trip(&mut self) {
        self.dev = through_snapshot(&self.dev, (self.args)());
    }
}

pub fn acpi_pm(data: &[u8]) {
    const W: [Window; 1] = [pio(acpi_pm::PM_BASE, acpi_pm::PM_SIZE)];
    drive(&mut PioBench::new(&W, fakes::requests, AcpiPm::new), data);
}

pub fn i8042(data: &[u8]) {
    const W: [Window; 2] = [
        pio(i8042::I8042_DATA_PORT, 1),
        pio(i8042::I8042_COMMAND_PORT, 1),
    ];
    drive(&mut PioBench::new(&W, fakes::requests, I8042::new), data);
}

pub fn debug_exit(data: &[u8]) {
    const W: [Window; 1] = [pio(
        debug_exit::DEBUG_EXIT_BASE,
        debug_exit::DEBUG_EXIT_SIZE,
    )];
    drive(
        &mut PioBench::new(&W, fakes::requests, DebugExit::new),
        data,
    );
}

/// pc-testdev: its ports, its interrupt lines and its MMIO window.
struct TestDevBench(PcTestDev, TestDevIomem);

impl Bench for TestDevBench {
    fn windows(&self) -> &'static [Window] {
        const W: [Window; 3] = [
            pio(
                testdev::PC_TESTDEV_IOPORT_BASE,
                testdev::PC_TESTDEV_IOPORT_SIZE,
            ),
            pio(testdev::PC_TESTDEV_IRQ_BASE, testdev::PC_TESTDEV_IRQ_COUNT),
            Window {
                base: testdev::TESTDEV_IOMEM_BASE,
                len: testdev::TESTDEV_IOMEM_SIZE,
                mmio: true,
            },
        ];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        if w.mmio {
            self.1.mmio_read(MmioAddress(w.base), offset, data);
        } else {
            pio_read(&mut self.0, w, offset, data);
        }
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        if w.mmio {
            self.1.mmio_write(MmioAddress(w.base), offset, data);
        } else {
            pio_write(&mut self.0, w, offset, data);
        }
    }
    fn round_trip(&mut self) {
        self.0 = through_snapshot(&self.0, (fakes::irq(), fakes::flusher()));
        self.1 = through_snapshot(&self.1, ());
    }
}

pub fn testdev(data: &[u8]) {
    let dev = PcTestDev::new(fakes::irq(), fakes::flusher());
    drive(&mut TestDevBench(dev, TestDevIomem::new()), data);
}

/// The Intel IOMMU: its register page, and guest memory (the second
/// window) where the tables it walks are. A host event is a device's DMA
/// or interrupt through the unit: 2 bytes of source-id, then an I/O
/// virtual address or an MSI address and data.
struct IommuBench(Vtd, vm_memory::GuestMemoryMmap);

const IOMMU_MEM: u64 = 0x10_0000;

impl Bench for IommuBench {
    fn windows(&self) -> &'static [Window] {
        static W: [Window; 2] = [
            Window {
                base: 0xfed9_0000,
                len: devices::iommu::regs::SIZE,
                mmio: true,
            },
            Window {
                base: 0,
                len: IOMMU_MEM,
                mmio: false,
            },
        ];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        if w.mmio {
            self.0.mmio_read(MmioAddress(w.base), offset, data);
        }
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        use vm_memory::{Bytes, GuestAddress};
        if w.mmio {
            self.0.mmio_write(MmioAddress(w.base), offset, data);
        } else {
            // Table entries: 8-byte aligned.
            let _ = self.1.write_slice(data, GuestAddress(offset & !7));
        }
    }
    fn host(&mut self, arg: &[u8]) {
        let mut input = Input::new(arg);
        let sid = input.u16();
        let addr = input.u64();
        let _ = self.0.translate(sid, addr, sid & 1 != 0);
        let msg = devices::MsiMessage {
            address: 0xfee0_0000 | (addr & 0xf_ffff),
            data: (addr >> 32) as u32,
        };
        let _ = self.0.remap_interrupt(msg, (sid & 2 != 0).then_some(sid));
    }
    fn round_trip(&mut self) {
        let intremap = self.0.regs().intremap;
        self.0 = through_snapshot(&self.0, (self.1.clone(), fakes::msi(), intremap));
    }
}

pub fn iommu(data: &[u8]) {
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
        vm_memory::GuestAddress(0),
        IOMMU_MEM as usize,
    )])
    .expect("guest memory");
    let intremap = data.first().is_some_and(|b| b & 1 != 0);
    let unit = Vtd::new(mem.clone(), fakes::msi(), intremap);
    drive(&mut IommuBench(unit, mem), data);
}

/// The split irqchip's IOAPIC: its registers, and from the host side
/// line changes (`arg[0]`: pin and level) and EOIs (`arg[1]`: vector).
struct IoapicBench(Ioapic);

impl Bench for IoapicBench {
    fn windows(&self) -> &'static [Window] {
        const W: [Window; 1] = [Window {
            base: ioapic::IOAPIC_BASE,
            len: ioapic::IOAPIC_SIZE,
            mmio: true,
        }];
        &W
    }
    fn read(&mut self, w: Window, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(MmioAddress(w.base), offset, data);
    }
    fn write(&mut self, w: Window, offset: u64, data: &[u8]) {
        self.0.mmio_write(MmioAddress(w.base), offset, data);
    }
    fn host(&mut self, arg: &[u8]) {
        if let Some(&b) = arg.first() {
            // Pins past the table (up to 63) must be ignored.
            self.0.set_irq(usize::from(b & 0x3f), b & 0x80 != 0);
        }
        if let Some(&v) = arg.get(1) {
            self.0.end_of_interrupt(v);
        }
    }
    fn round_trip(&mut self) {
        self.0 = through_snapshot(&self.0, fakes::msi_sink());
    }
}

pub fn ioapic(data: &[u8]) {
    drive(&mut IoapicBench(Ioapic::new(fakes::msi_sink())), data);
}
