//! The machine's devices: one registration call each, in a fixed order
//! (allocation follows it, so a restore gets the same places).

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::acpi_pm::{self, AcpiPm};
use devices::debug_exit::{self, DebugExit};
use devices::fw_cfg::{self, FwCfg};
use devices::i8042::{self, I8042};
use devices::i8254::{self, Pit};
use devices::i8259::{self, Pic};
use devices::ioapic::{self, Ioapic};
use devices::iommu::RemappedSink;
use devices::rtc::{self, Rtc};
use devices::serial::{self, SerialDevice};
use devices::testdev::{self, PcTestDev, TestDevIomem};
use devices::virtio::blk::{Blk, Disk, DiskMode};
use devices::virtio::console::{Console, ConsoleArgs, Inbox, PortSpec};
use devices::virtio::fs::{Fs, FsArgs, Share};
use devices::virtio::rng::Rng;
use devices::VmRequests;

use super::{Attach, Platform, PlatformError};
use crate::boot::bios::{BIOS_PIC_BASES, BIOS_PIC_MASKS};
use crate::config::{
    ConsoleConfig, DeviceConfig, Irqchip, Machine, PortHost, SerialOutput, VmConfig,
};
use crate::memory::Layout;
use crate::serial_out::Output;
use crate::vm::{PitClock, Vm};

/// The devices the VMM itself reaches after registration.
pub struct Handles {
    /// COM1, which host stdin feeds.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// fw_cfg, which gets KERNEL_DATA once the image is loaded.
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    /// The writer of COM1's output (none with `--serial none`).
    pub output: Option<Output>,
    /// The writers of the console ports' output.
    pub port_outputs: Vec<Output>,
    /// The console port that host stdin feeds.
    pub stdin_port: Option<Arc<Inbox>>,
}

/// Register every device `cfg` asks for; `stopping` says when COM1's
/// output writer may give up on a reader that stalls.
pub fn attach(
    p: &mut Platform,
    cfg: &VmConfig,
    vm: &Vm,
    requests: &Arc<dyn VmRequests>,
    stopping: impl Fn() -> bool + Send + Sync + 'static,
) -> Result<Handles, PlatformError> {
    // The chipset first: its functions take slots 0 and 31 before any
    // device is given one. The IOMMU before the devices behind it and
    // the IOAPIC whose interrupts it remaps; neither raises a line.
    if cfg.machine() == Machine::Q35 {
        p.attach_q35()?;
    }
    if let Some(iommu) = cfg.iommu() {
        p.attach_iommu(iommu)?;
    }
    // The interrupt controllers next: devices restored with a line
    // raised raise it again as they attach.
    if cfg.irqchip == Irqchip::Split {
        let mut sink = p.interrupts().msi_sink();
        if let Some(remapper) = p.interrupt_remapper() {
            sink = Arc::new(RemappedSink::new(sink, remapper));
        }
        let apic = p.attach(
            Attach::new("ioapic", sink, Ioapic::new).mmio(ioapic::IOAPIC_BASE, ioapic::IOAPIC_SIZE),
        )?;
        p.interrupts().set_ioapic(apic);
        attach_legacy(p, cfg, vm)?;
    }
    let irq = p.interrupts().irqfd(serial::COM1_GSI)?;
    let (out, output) = serial_output(&cfg.serial, stopping)?;
    let serial = p.attach(
        Attach::new("serial", (irq, out), |(irq, out)| {
            SerialDevice::new(irq, out)
        })
        .pio(serial::COM1_BASE, serial::SERIAL_PORT_COUNT)
        .gsi(serial::COM1_GSI),
    )?;
    p.attach(
        Attach::new("isa-debug-exit", requests.clone(), DebugExit::new)
            .pio(debug_exit::DEBUG_EXIT_BASE, debug_exit::DEBUG_EXIT_SIZE),
    )?;
    p.attach(
        Attach::new(
            "pc-testdev",
            (vm.irq_line(), vm.page_flusher()),
            |(irq, flush)| PcTestDev::new(irq, flush),
        )
        .pio(
            testdev::PC_TESTDEV_IOPORT_BASE,
            testdev::PC_TESTDEV_IOPORT_SIZE,
        )
        .pio(testdev::PC_TESTDEV_IRQ_BASE, testdev::PC_TESTDEV_IRQ_COUNT),
    )?;
    p.attach(
        Attach::new("pc-testdev-iomem", (), |()| TestDevIomem::new())
            .mmio(testdev::TESTDEV_IOMEM_BASE, testdev::TESTDEV_IOMEM_SIZE),
    )?;
    let (vcpus, mem) = (cfg.vcpus as u16, cfg.mem_bytes);
    let fw_cfg = p.attach(
        Attach::new("fw_cfg", (), move |()| {
            FwCfg::for_vm(vcpus, mem, Vec::new())
        })
        .pio(fw_cfg::FW_CFG_PORT_SEL, fw_cfg::FW_CFG_PORT_COUNT),
    )?;
    p.attach(
        Attach::new("acpi-pm", requests.clone(), AcpiPm::new)
            .pio(acpi_pm::PM_BASE, acpi_pm::PM_SIZE),
    )?;
    p.attach(
        Attach::new("i8042", requests.clone(), I8042::new)
            .pio(i8042::I8042_DATA_PORT, 1)
            .pio(i8042::I8042_COMMAND_PORT, 1),
    )?;
    let layout = Layout::new(cfg.mem_bytes);
    let vcpus = cfg.vcpus;
    p.attach(
        Attach::new("rtc", (), move |()| rtc_for(&layout, vcpus))
            .pio(rtc::RTC_INDEX_PORT, rtc::RTC_PORT_COUNT),
    )?;
    let (mut rngs, mut disks, mut edus, mut shares) = (0, 0, 0, 0);
    let (mut port_outputs, mut stdin_port) = (Vec::new(), None);
    for d in &cfg.devices {
        match d {
            DeviceConfig::Q35 | DeviceConfig::Iommu(_) => {}
            DeviceConfig::Edu => {
                p.attach_edu(&format!("edu{edus}"))?;
                edus += 1;
            }
            DeviceConfig::Rng(transport) => {
                p.attach_virtio(&format!("rng{rngs}"), *transport, (), |()| Rng::new())?;
                rngs += 1;
            }
            DeviceConfig::Disk(disk) => {
                let mode = DiskMode {
                    read_only: disk.read_only,
                    snapshot: disk.snapshot,
                };
                let opened = Arc::new(Disk::open(&disk.path, mode)?);
                p.attach_virtio(&format!("disk{disks}"), disk.transport, opened, Blk::new)?;
                disks += 1;
            }
            DeviceConfig::Share(s) => {
                let args = FsArgs {
                    tag: s.tag.clone(),
                    share: Arc::new(Share::open(&s.path, s.read_only)?),
                };
                p.attach_virtio(&format!("share{shares}"), s.transport, args, Fs::new)?;
                shares += 1;
            }
            DeviceConfig::Console(c) => {
                let serial = output.as_ref().map(|o| (&cfg.serial, o));
                let (args, outputs, inbox) = console_ports(c, serial)?;
                p.attach_virtio("console0", c.transport, args, Console::new)?;
                port_outputs = outputs;
                stdin_port = inbox;
            }
        }
    }
    Ok(Handles {
        serial,
        fw_cfg,
        output,
        port_outputs,
        stdin_port,
    })
}

/// The split irqchip's 8259 pair and, unless `--no-pit`, its PIT: KVM
/// has neither without its own PICs. Both start as a PC BIOS leaves
/// them (`boot::bios`).
fn attach_legacy(p: &mut Platform, cfg: &VmConfig, vm: &Vm) -> Result<(), PlatformError> {
    let kick: Arc<dyn devices::IntrKick> = p.interrupts().extint_kick();
    let pic = p.attach(
        Attach::new("pic", kick, |kick| {
            let mut pic = Pic::new(kick);
            pic.load_bios_state(BIOS_PIC_BASES, BIOS_PIC_MASKS);
            pic
        })
        .pio(i8259::PIC_MASTER_BASE, i8259::PIC_PORT_COUNT)
        .pio(i8259::PIC_SLAVE_BASE, i8259::PIC_PORT_COUNT)
        .pio(i8259::ELCR_BASE, i8259::ELCR_PORT_COUNT),
    )?;
    p.interrupts().set_pic(pic);
    if !cfg.pit_enabled() {
        return Ok(());
    }
    let clock = Arc::new(PitClock::new()?);
    let args: (Arc<dyn devices::IrqLine>, Arc<dyn devices::TimerClock>) =
        (vm.irq_line(), clock.clone());
    let pit = p.attach(
        Attach::new("pit", args, |(irq, clock)| Pit::new(irq, clock))
            .pio(i8254::PIT_BASE, i8254::PIT_PORT_COUNT)
            .pio(i8254::PORT_B, 1),
    )?;
    p.interrupts().set_pit(pit, clock);
    Ok(())
}

/// The console ports' host sides: a writer thread per host file (as
/// COM1's, without ever making the device wait), shared by COM1 and
/// every port writing to the same stdout or stderr so their output stays
/// in the guest's order, and the inbox stdin feeds.
type PortSides = (ConsoleArgs, Vec<Output>, Option<Arc<Inbox>>);

fn console_ports(
    c: &ConsoleConfig,
    serial: Option<(&SerialOutput, &Output)>,
) -> Result<PortSides, PlatformError> {
    let io = |what: String| move |e: std::io::Error| PlatformError::Io(format!("{what}: {e}"));
    let (mut ports, mut outputs, mut stdin) = (Vec::new(), Vec::new(), None);
    // Which of `outputs` writes to stdout and to stderr, for the ports
    // after the first; COM1's when it writes there.
    let (mut to_stdout, mut to_stderr) = (None, None);
    for port in &c.ports {
        let what = format!("console port {}", port.name);
        let mut spec = PortSpec {
            name: port.name.clone(),
            output: None,
            input: None,
        };
        let shared = match (&port.host, serial) {
            (PortHost::Stdout, Some((SerialOutput::Stdio, o)))
            | (PortHost::Stderr, Some((SerialOutput::Stderr, o))) => Some(o),
            (PortHost::Stdout, _) => to_stdout.map(|i: usize| &outputs[i]),
            (PortHost::Stderr, _) => to_stderr.map(|i: usize| &outputs[i]),
            _ => None,
        };
        if let Some(o) = shared {
            spec.output = Some(Arc::new(o.port_end().map_err(io(what.clone()))?));
            ports.push(spec);
            continue;
        }
        let out: Option<(Box<dyn Write + Send>, String)> = match &port.host {
            PortHost::Stdout => {
                to_stdout = Some(outputs.len());
                Some((
                    crate::serial_out::stdout_writer().map_err(io(what.clone()))?,
                    "stdout".into(),
                ))
            }
            PortHost::Stderr => {
                to_stderr = Some(outputs.len());
                Some((
                    crate::serial_out::stderr_writer().map_err(io(what.clone()))?,
                    "stderr".into(),
                ))
            }
            PortHost::File(path) => Some((
                Box::new(File::create(path).map_err(io(path.display().to_string()))?),
                path.display().to_string(),
            )),
            PortHost::Stdin => None,
        };
        if let Some((w, to)) = out {
            let (output, sink) = Output::start_port(w, &to).map_err(io(what.clone()))?;
            outputs.push(output);
            spec.output = Some(Arc::new(sink));
        } else {
            let inbox = Inbox::new().map_err(io(what.clone()))?;
            stdin = Some(inbox.clone());
            spec.input = Some(inbox);
        }
        ports.push(spec);
    }
    let control_wake = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
        .map(Arc::new)
        .map_err(io("virtio-console".into()))?;
    Ok((
        ConsoleArgs {
            ports,
            control_wake,
        },
        outputs,
        stdin,
    ))
}

/// COM1's host side: stdout or a file behind a writer thread
/// (`serial_out`), so no reader can stall a vCPU, or nothing.
fn serial_output(
    s: &SerialOutput,
    stopping: impl Fn() -> bool + Send + Sync + 'static,
) -> Result<(Box<dyn Write + Send>, Option<Output>), PlatformError> {
    let (out, what): (Box<dyn Write + Send>, String) = match s {
        SerialOutput::None => return Ok((Box::new(std::io::sink()), None)),
        SerialOutput::Stdio => (
            crate::serial_out::stdout_writer()
                .map_err(|e| PlatformError::Io(format!("stdout: {e}")))?,
            "stdout".into(),
        ),
        SerialOutput::Stderr => (
            crate::serial_out::stderr_writer()
                .map_err(|e| PlatformError::Io(format!("stderr: {e}")))?,
            "stderr".into(),
        ),
        SerialOutput::File(p) => (
            Box::new(
                File::create(p).map_err(|e| PlatformError::Io(format!("{}: {e}", p.display())))?,
            ),
            p.display().to_string(),
        ),
    };
    let (output, sender) = Output::start(out, &what, stopping)
        .map_err(|e| PlatformError::Io(format!("cannot start the serial output thread: {e}")))?;
    Ok((Box::new(sender), Some(output)))
}

/// The RTC with the CMOS fields PC firmware fills in (QEMU's layout):
/// memory sizes and the CPU count, for guests that still read them.
fn rtc_for(layout: &Layout, vcpus: u32) -> Rtc {
    let mut rtc = Rtc::new();
    let low = layout.low_ram_end();
    let ext_kib = ((low.saturating_sub(1 << 20)) >> 10).min(0xffff) as u16;
    let above_16m = ((low.saturating_sub(16 << 20)) >> 16).min(0xffff) as u16;
    let above_4g = (layout.mem - layout.low_ram_end()) >> 16;
    for (idx, v) in [
        (0x17u8, ext_kib as u8),
        (0x18, (ext_kib >> 8) as u8),
        (0x30, ext_kib as u8),
        (0x31, (ext_kib >> 8) as u8),
        (0x34, above_16m as u8),
        (0x35, (above_16m >> 8) as u8),
        (0x5b, above_4g as u8),
        (0x5c, (above_4g >> 8) as u8),
        (0x5d, (above_4g >> 16) as u8),
        (0x5f, (vcpus - 1) as u8),
    ] {
        rtc.set_cmos(idx, v);
    }
    rtc
}
