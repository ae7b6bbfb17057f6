//! Builds a VM from a `VmConfig`, runs the main event loop, and owns
//! shutdown: whatever ends the VM, `run()` returns its `ExitReason` after
//! every vCPU thread has stopped.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::acpi_pm::AcpiPm;
use devices::debug_exit::{self, DebugExit};
use devices::fw_cfg::{self, FwCfg};
use devices::i8042::{self, I8042};
use devices::rtc::{Rtc, RTC_INDEX_PORT, RTC_PORT_COUNT};
use devices::serial::{self, SerialDevice};
use devices::testdev::{self, PcTestDev, TestDevIomem};
use devices::{Persist, RestoreError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::ApiError;
use crate::boot::{self, linux, multiboot, BootError};
use crate::bus::{BusError, IoBus};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::cpu::msrs::{self, MsrError};
use crate::cpu::{self, CpuError};
use crate::kvmcaps::CapError;
use crate::memory::Layout;
use crate::pit::{PitError, TickSwitch};
use crate::shutdown::{ExitReason, Shutdown};
use crate::snapshot::{
    self, DeviceStates, MachineState, SnapshotError, VcpuContext, VcpuState, VcpuStateError,
    VmState, VmStateError, WriteStats,
};
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::{Vm, VmError};

mod events;
mod run;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Cap(#[from] CapError),
    #[error(transparent)]
    Msr(#[from] MsrError),
    #[error(transparent)]
    Bios(#[from] boot::bios::BiosError),
    #[error(transparent)]
    Pit(#[from] PitError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    VmState(#[from] VmStateError),
    #[error("restoring a device: {0}")]
    Device(#[from] RestoreError),
    #[error("{}: {what}", path.display())]
    Restore { path: PathBuf, what: String },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
}

fn host(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Host { what, source }
}

fn sys(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VmmError {
    move |e| VmmError::Host {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Every device, kept so a snapshot can save each one.
struct Devices {
    serial: Arc<Mutex<SerialDevice>>,
    debug_exit: Arc<Mutex<DebugExit>>,
    testdev: Arc<Mutex<PcTestDev>>,
    testdev_iomem: Arc<Mutex<TestDevIomem>>,
    fw_cfg: Arc<Mutex<FwCfg>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    i8042: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Devices {
    fn save(&self) -> DeviceStates {
        DeviceStates {
            serial: lock(&self.serial).save(),
            debug_exit: lock(&self.debug_exit).save(),
            testdev: lock(&self.testdev).save(),
            testdev_iomem: lock(&self.testdev_iomem).save(),
            fw_cfg: lock(&self.fw_cfg).save(),
            acpi_pm: lock(&self.acpi_pm).save(),
            i8042: lock(&self.i8042).save(),
            rtc: lock(&self.rtc).save(),
        }
    }
}

/// Everything a running VM is made of.
struct Machine {
    cfg: VmConfig,
    /// COM1, which host stdin feeds.
    serial: Arc<Mutex<SerialDevice>>,
    vm: Vm,
    bus: Arc<IoBus>,
    devices: Devices,
    vcpus: Vec<Vcpu>,
    /// Guest address of the FACS, for S3 wake-up.
    facs: u64,
    /// fw_cfg KERNEL_DATA, saved with snapshots.
    kernel_data: Vec<u8>,
    /// The PIT's lost-tick policy switch, if the vCPUs did not wait for it.
    ticks: TickSwitch,
}

/// Load the image and build the VM, ready to run.
fn build(cfg: &VmConfig, shutdown: &Arc<Shutdown>) -> Result<Machine, VmmError> {
    cfg.validate()?;
    let image = read_file(&cfg.image)?;
    let kind = boot::detect(&cfg.image, &image)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some((p.as_path(), read_file(p)?)),
        None => None,
    };

    let layout = Layout::new(cfg.mem_bytes);
    let vm = Vm::new(layout.clone(), cfg.pit_enabled())?;
    vm.enable_caps(cfg)?;
    // Firmware state first, then the image over it, as a BIOS would load it.
    let platform = boot::acpi::Platform {
        com1: kind.is_linux(),
    };
    let acpi = boot::acpi::setup(&vm.mem, cfg.vcpus, platform)?;
    boot::bios::write_ivt(&vm.mem)?;
    boot::bios::setup_pics(&vm)?;
    let ticks = match vm.pit() {
        Some(pit) => {
            let loaded_at = Instant::now();
            let loaded = pit.load_bios_state()?;
            pit.drop_lost_ticks(&loaded, loaded_at, failed_switch(shutdown))?
        }
        None => TickSwitch::default(),
    };
    let cmdline = cfg.kernel_cmdline(kind);
    let initrd_ref = initrd.as_ref().map(|(p, d)| (*p, d.as_slice()));
    let args = boot::LoadArgs {
        image_path: &cfg.image,
        image: &image,
        cmdline: &cmdline,
        initrd: initrd_ref,
    };
    let plan = if kind.is_linux() {
        linux::load(&args, kind, &vm.mem, &layout)?
    } else {
        multiboot::load(&args, &vm.mem, &layout)?
    };
    log::info!("{}: {} image", cfg.image.display(), plan.kind);
    let (bus, devices) = attach_devices(cfg, &vm, shutdown, &plan.kernel_data, None)?;

    let resolved = cpu::resolve(&cfg.cpu, cfg.cpu_lenient, &cpu::KvmCpuid::query(&vm.kvm)?)?;
    for w in &resolved.warnings {
        // The log prefix says "warning", which kvm-unit-tests' runner needs.
        log::warn!("{w}");
    }
    let initial_msrs = msrs::initial(&cfg.msrs)?;
    let vcpus = (0..cfg.vcpus)
        .map(|id| {
            Vcpu::new(
                &vm,
                id,
                cfg.vcpus,
                &resolved.entries,
                &initial_msrs,
                &cfg.msrs,
                kind.is_linux(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    vcpus[0].apply_boot_plan(&plan, &vm.mem)?;
    log::debug!("entering at {:#x}", plan.rip);

    Ok(Machine {
        cfg: cfg.clone(),
        serial: devices.serial.clone(),
        vm,
        bus: Arc::new(bus),
        devices,
        vcpus,
        facs: acpi.facs,
        kernel_data: plan.kernel_data,
        ticks,
    })
}

/// Build the VM a snapshot in `dir` describes, with `cfg` (the saved
/// configuration with this run's serial and timeout): guest memory mapped
/// from the memory file, every vCPU, the irqchip, PIT, clock and devices
/// set to their saved state. `verify_memory` checks the memory file's
/// digest first, reading all of it.
fn build_restored(
    dir: &Path,
    state: &MachineState,
    cfg: &VmConfig,
    shutdown: &Arc<Shutdown>,
    verify_memory: bool,
) -> Result<Machine, VmmError> {
    let layout = Layout::new(cfg.mem_bytes);
    let mem = snapshot::map_memory(dir, &layout, &state.memory, verify_memory)?;
    let vm = Vm::with_memory(layout, cfg.pit_enabled(), mem)?;
    vm.enable_caps(cfg)?;
    let (bus, devices) =
        attach_devices(cfg, &vm, shutdown, &state.kernel_data, Some(&state.devices))?;
    let ctx = VcpuContext::for_vm(&vm)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for s in &state.vcpus {
        let v = Vcpu::bare(&vm, s.id)?;
        s.restore(&v, &ctx).map_err(|e| match e {
            VcpuStateError::Cpuid { .. } => VmmError::Restore {
                path: dir.join(snapshot::STATE_FILE),
                what: e.to_string(),
            },
            e => VmmError::VcpuState(e),
        })?;
        vcpus.push(v);
    }
    let loaded_at = Instant::now();
    state.vm.restore(&vm)?;
    let ticks = match (vm.pit(), &state.vm.pit) {
        (Some(pit), Some(loaded)) => {
            pit.drop_lost_ticks(loaded, loaded_at, failed_switch(shutdown))?
        }
        _ => TickSwitch::default(),
    };
    Ok(Machine {
        cfg: cfg.clone(),
        serial: devices.serial.clone(),
        vm,
        bus: Arc::new(bus),
        devices,
        vcpus,
        facs: state.facs,
        kernel_data: state.kernel_data.clone(),
        ticks,
    })
}

/// End the VM if the PIT's lost-tick policy switch fails.
fn failed_switch(shutdown: &Arc<Shutdown>) -> impl FnOnce(&PitError) + Send + 'static {
    let shutdown = shutdown.clone();
    move |e| shutdown.request(ExitReason::Error(e.to_string()))
}

/// Make every device, fresh or (with `saved`) from a snapshot, and put it
/// on the bus.
fn attach_devices(
    cfg: &VmConfig,
    vm: &Vm,
    shutdown: &Arc<Shutdown>,
    kernel_data: &[u8],
    saved: Option<&DeviceStates>,
) -> Result<(IoBus, Devices), VmmError> {
    let bus = IoBus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(host("eventfd"))?;
    vm.register_irqfd(&serial_irq, serial::COM1_GSI)?;
    let out: Box<dyn Write + Send> = match &cfg.serial {
        SerialOutput::Stdio => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(p) => Box::new(File::create(p).map_err(|source| VmmError::File {
            path: p.clone(),
            source,
        })?),
    };
    let requests: Arc<dyn devices::VmRequests> = shutdown.clone();
    let layout = Layout::new(cfg.mem_bytes);
    let fw_cfg = FwCfg::for_vm(cfg.vcpus as u16, cfg.mem_bytes, kernel_data.to_vec());
    let d = match saved {
        None => Devices {
            serial: Arc::new(Mutex::new(SerialDevice::new(serial_irq, out))),
            debug_exit: Arc::new(Mutex::new(DebugExit::new(requests.clone()))),
            testdev: Arc::new(Mutex::new(PcTestDev::new(vm.irq_line(), vm.page_flusher()))),
            testdev_iomem: Arc::new(Mutex::new(TestDevIomem::new())),
            fw_cfg: Arc::new(Mutex::new(fw_cfg)),
            acpi_pm: Arc::new(Mutex::new(AcpiPm::new(requests.clone()))),
            i8042: Arc::new(Mutex::new(I8042::new(requests))),
            rtc: Arc::new(Mutex::new(rtc_for(&layout, cfg.vcpus))),
        },
        Some(s) => Devices {
            serial: Arc::new(Mutex::new(SerialDevice::restore(
                (serial_irq, out),
                &s.serial,
            )?)),
            debug_exit: Arc::new(Mutex::new(DebugExit::restore(
                requests.clone(),
                &s.debug_exit,
            )?)),
            testdev: Arc::new(Mutex::new(PcTestDev::restore(
                (vm.irq_line(), vm.page_flusher()),
                &s.testdev,
            )?)),
            testdev_iomem: Arc::new(Mutex::new(TestDevIomem::restore((), &s.testdev_iomem)?)),
            fw_cfg: Arc::new(Mutex::new(FwCfg::restore(fw_cfg, &s.fw_cfg)?)),
            acpi_pm: Arc::new(Mutex::new(AcpiPm::restore(requests.clone(), &s.acpi_pm)?)),
            i8042: Arc::new(Mutex::new(I8042::restore(requests, &s.i8042)?)),
            rtc: Arc::new(Mutex::new(Rtc::restore((), &s.rtc)?)),
        },
    };
    bus.add_pio(
        "serial",
        serial::COM1_BASE,
        serial::SERIAL_PORT_COUNT,
        d.serial.clone(),
    )?;
    bus.add_pio(
        "isa-debug-exit",
        debug_exit::DEBUG_EXIT_BASE,
        debug_exit::DEBUG_EXIT_SIZE,
        d.debug_exit.clone(),
    )?;
    bus.add_pio(
        "pc-testdev",
        testdev::PC_TESTDEV_IOPORT_BASE,
        testdev::PC_TESTDEV_IOPORT_SIZE,
        d.testdev.clone(),
    )?;
    bus.add_pio(
        "pc-testdev irq",
        testdev::PC_TESTDEV_IRQ_BASE,
        testdev::PC_TESTDEV_IRQ_COUNT,
        d.testdev.clone(),
    )?;
    bus.add_mmio(
        "pc-testdev iomem",
        testdev::TESTDEV_IOMEM_BASE,
        testdev::TESTDEV_IOMEM_SIZE,
        d.testdev_iomem.clone(),
    )?;
    bus.add_pio(
        "fw_cfg",
        fw_cfg::FW_CFG_PORT_SEL,
        fw_cfg::FW_CFG_PORT_COUNT,
        d.fw_cfg.clone(),
    )?;
    bus.add_pio(
        "acpi-pm",
        devices::acpi_pm::PM_BASE,
        devices::acpi_pm::PM_SIZE,
        d.acpi_pm.clone(),
    )?;
    bus.add_pio("rtc", RTC_INDEX_PORT, RTC_PORT_COUNT, d.rtc.clone())?;
    bus.add_pio("i8042 data", i8042::I8042_DATA_PORT, 1, d.i8042.clone())?;
    bus.add_pio(
        "i8042 command",
        i8042::I8042_COMMAND_PORT,
        1,
        d.i8042.clone(),
    )?;
    Ok((bus, d))
}

impl Machine {
    /// Save everything but guest RAM. The vCPUs must be stopped and handed
    /// back (`vcpus`), so no ioctl races KVM_RUN.
    fn save(&self, vcpus: &mut [Vcpu]) -> Result<MachineState, VmmError> {
        let ctx = VcpuContext::for_vm(&self.vm)?;
        let vcpu_states = vcpus
            .iter_mut()
            .map(|v| VcpuState::save(v, &ctx))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            config: self.cfg.clone(),
            memory: Default::default(),
            kernel_data: self.kernel_data.clone(),
            facs: self.facs,
            vm: VmState::save(&self.vm)?,
            vcpus: vcpu_states,
            devices: self.devices.save(),
        })
    }

    /// Write a snapshot of the stopped VM into `dir`.
    fn snapshot(&self, vcpus: &mut [Vcpu], dir: &Path) -> Result<WriteStats, VmmError> {
        let started = Instant::now();
        let mut state = self.save(vcpus)?;
        let mut stats = snapshot::write(dir, &mut state, &self.vm.mem)?;
        stats.elapsed = started.elapsed();
        log::info!(
            "snapshot to {}: {} bytes of memory written, state {} bytes, {:?}",
            dir.display(),
            stats.memory_bytes_written,
            stats.state_bytes,
            stats.elapsed
        );
        Ok(stats)
    }
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

/// What a run serves besides the VM itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Serve the control socket (`--api`) at this path.
    pub api: Option<PathBuf>,
}

/// Build the VM described by `cfg`, run it to the end, and say why it ended.
pub fn run(cfg: &VmConfig, opts: &RunOptions) -> Result<ExitReason, VmmError> {
    let started = Instant::now();
    let shutdown = Arc::new(Shutdown::new().map_err(host("eventfd"))?);
    let machine = build(cfg, &shutdown)?;
    log::debug!("VM built in {:?}", started.elapsed());
    run::run_machine(machine, shutdown, opts, started)
}

/// Bring back the snapshot in `dir` with this run's `serial` and
/// `timeout_secs` (checking the memory digest first if `verify_memory`),
/// run it to the end, and say why it ended.
pub fn restore(
    dir: &Path,
    serial: SerialOutput,
    timeout_secs: Option<f64>,
    verify_memory: bool,
    opts: &RunOptions,
) -> Result<ExitReason, VmmError> {
    let started = Instant::now();
    let state = snapshot::read_state(dir)?;
    let mut cfg = state.config.clone();
    cfg.serial = serial;
    cfg.timeout_secs = timeout_secs;
    cfg.validate()?;
    let shutdown = Arc::new(Shutdown::new().map_err(host("eventfd"))?);
    let machine = build_restored(dir, &state, &cfg, &shutdown, verify_memory)?;
    log::debug!("VM restored in {:?}", started.elapsed());
    run::run_machine(machine, shutdown, opts, started)
}
