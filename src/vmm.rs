//! Builds a VM from a `VmConfig`, runs the main event loop, and owns
//! shutdown: whatever ends the VM, `run()` returns its `ExitReason` after
//! every vCPU thread has stopped.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi_pm::AcpiPm;
use devices::debug_exit::{self, DebugExit};
use devices::fw_cfg::{self, FwCfg};
use devices::i8042::{self, I8042};
use devices::rtc::{Rtc, RTC_INDEX_PORT, RTC_PORT_COUNT};
use devices::serial::{self, SerialDevice};
use devices::testdev::{self, PcTestDev, TestDevIomem};
use devices::{Persist, RestoreError};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{self, ApiError, ApiServer, Control, Request};
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
use crate::vcpu::{self, HaltWatch, Kick, Running, Vcpu, VcpuError};
use crate::vm::{Vm, VmError};

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
    run_machine(machine, shutdown, opts, started)
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
    run_machine(machine, shutdown, opts, started)
}

/// Run a built VM to the end: the main event loop, the vCPU rounds, and
/// the control socket's requests between rounds.
fn run_machine(
    machine: Machine,
    shutdown: Arc<Shutdown>,
    opts: &RunOptions,
    started: Instant,
) -> Result<ExitReason, VmmError> {
    let cfg = machine.cfg.clone();
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new()
        .map_err(|e| VmmError::Host {
            what: "event manager",
            source: std::io::Error::other(format!("{e:?}")),
        })?;
    em.add_subscriber(Arc::new(Mutex::new(ShutdownWatch(shutdown.clone()))));
    if let Some(t) = cfg.timeout_secs {
        let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
        timer
            .reset(Duration::from_secs_f64(t), None)
            .map_err(sys("timerfd"))?;
        em.add_subscriber(Arc::new(Mutex::new(Timeout {
            timer,
            shutdown: shutdown.clone(),
        })));
    }
    // Keys go to the guest as typed while it runs; restored on return.
    let _raw_terminal = if cfg.serial == SerialOutput::Stdio {
        crate::term::RawTerminal::enter()
    } else {
        None
    };
    if cfg.serial == SerialOutput::Stdio {
        em.add_subscriber(Arc::new(Mutex::new(StdinToSerial {
            serial: machine.devices.serial.clone(),
        })));
    }
    let control = Arc::new(Control::new());
    if let Some(path) = &opts.api {
        let server = ApiServer::bind(path, control.clone(), shutdown.clone())?;
        em.add_subscriber(Arc::new(Mutex::new(server)));
    }

    vcpu::install_kick_handler();
    let mut machine = machine;
    let mut vcpus = std::mem::take(&mut machine.vcpus);
    let halt = Arc::new(HaltWatch::new(cfg.vcpus));
    let kicks = Arc::new(Mutex::new(Vec::new()));
    let mut halt_timer = TimerFd::new().map_err(sys("timerfd"))?;
    halt_timer
        .reset(HALT_POLL, Some(HALT_POLL))
        .map_err(sys("timerfd"))?;
    em.add_subscriber(Arc::new(Mutex::new(HaltPoll {
        timer: halt_timer,
        watch: halt.clone(),
        kicks: kicks.clone(),
        shutdown: shutdown.clone(),
    })));

    // The vCPUs stop at the PIT policy switch's deadline if it is late.
    let tick_hold = Arc::new(AtomicBool::new(false));
    match machine.ticks.deadline() {
        None => {}
        Some(deadline) if deadline <= Instant::now() => tick_hold.store(true, Ordering::SeqCst),
        Some(deadline) => {
            let mut timer = TimerFd::new().map_err(sys("timerfd"))?;
            // A zero duration would disarm the timer.
            let left = deadline.saturating_duration_since(Instant::now());
            timer
                .reset(left.max(Duration::from_nanos(1)), None)
                .map_err(sys("timerfd"))?;
            em.add_subscriber(Arc::new(Mutex::new(TickDeadline {
                timer,
                landed: machine.ticks.landed_flag(),
                hold: tick_hold.clone(),
                shutdown: shutdown.clone(),
            })));
        }
    }

    // Each round runs the vCPUs until the VM ends, the guest suspends, or
    // a control request needs them stopped; a suspended guest is woken
    // through its firmware waking vector, requests are served, and the
    // next round starts unless the VM is paused.
    let mut paused = false;
    let mut first_round = true;
    loop {
        if !paused {
            if tick_hold.swap(false, Ordering::SeqCst) {
                log::debug!("vCPUs wait for the PIT policy switch");
                if let Err(e) = machine.ticks.join() {
                    shutdown.request(ExitReason::Error(e.to_string()));
                    break;
                }
                log::debug!(
                    "PIT policy switch landed {:?} after start",
                    started.elapsed()
                );
            }
            let threads = start_vcpus(vcpus, &machine.bus, &shutdown, &halt);
            if first_round {
                log::debug!("vCPUs running {:?} after start", started.elapsed());
                first_round = false;
            }
            *lock(&kicks) = threads.iter().map(Running::kick).collect();
            while !shutdown.must_stop() {
                if let Err(e) = em.run() {
                    shutdown.request(ExitReason::Error(format!("event loop: {e:?}")));
                }
            }
            lock(&kicks).clear();
            vcpus = stop_vcpus(threads);
            if shutdown.is_requested() || vcpus.len() != cfg.vcpus as usize {
                break;
            }
            if shutdown.is_suspended() {
                if let Err(e) = wake_from_s3(&vcpus, &machine.vm, machine.facs) {
                    shutdown.request(ExitReason::Error(format!("cannot wake from S3: {e}")));
                    break;
                }
                log::info!("guest woke from S3");
                shutdown.resume();
            }
        } else {
            while !shutdown.is_requested() && !control.has_pending() {
                if let Err(e) = em.run() {
                    shutdown.request(ExitReason::Error(format!("event loop: {e:?}")));
                }
            }
            if shutdown.is_requested() {
                break;
            }
        }
        shutdown.clear_pause();
        for (req, reply) in control.take() {
            let answer = match req {
                Request::Pause {} => {
                    paused = true;
                    Ok(serde_json::json!({}))
                }
                Request::Resume {} => {
                    paused = false;
                    Ok(serde_json::json!({}))
                }
                Request::Snapshot { dir, stop } => match machine.snapshot(&mut vcpus, &dir) {
                    Ok(stats) => {
                        paused |= stop;
                        Ok(serde_json::json!({
                            "dir": dir,
                            "memory_bytes_written": stats.memory_bytes_written,
                            "memory_digest": format!("{:016x}", stats.memory.digest),
                            "state_bytes": stats.state_bytes,
                            "save_us": stats.elapsed.as_micros() as u64,
                        }))
                    }
                    Err(e) => Err(e.to_string()),
                },
                // Answered by the server itself.
                Request::Status {} | Request::Quit {} => Ok(serde_json::json!({})),
            };
            control.set_paused(paused);
            api::reply(reply, answer, paused);
        }
        control.set_paused(paused);
    }
    if log::log_enabled!(log::Level::Info) {
        log::info!("guest RAM resident: {} KiB", resident_kib(&machine.vm));
    }
    // A failed switch has ended the VM through its `failed` callback.
    let _ = machine.ticks.join();
    drop(vcpus);
    drop(machine);
    let _ = std::io::stdout().flush();
    Ok(shutdown
        .reason()
        .unwrap_or(ExitReason::Error("no exit reason".into())))
}

/// Start one thread per vCPU. A thread that cannot start ends the VM.
fn start_vcpus(
    vcpus: Vec<Vcpu>,
    bus: &Arc<IoBus>,
    shutdown: &Arc<Shutdown>,
    halt: &Arc<HaltWatch>,
) -> Vec<Running> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.start(bus.clone(), shutdown.clone(), halt.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                shutdown.request(ExitReason::Error(format!(
                    "cannot start a vCPU thread: {e}"
                )));
                break;
            }
        }
    }
    threads
}

/// Take the vCPUs back from their threads; `Shutdown::must_stop()` is
/// already true, so one kick each suffices.
fn stop_vcpus(threads: Vec<Running>) -> Vec<Vcpu> {
    threads.into_iter().filter_map(Running::stop).collect()
}

/// Resume from S3 the way firmware does after the wake event: the boot
/// CPU restarts in real mode at the FACS waking vector, the others wait
/// for INIT/SIPI. Memory is kept, as in suspend-to-RAM.
fn wake_from_s3(vcpus: &[Vcpu], vm: &Vm, facs: u64) -> Result<(), VmmError> {
    let vector: u32 = vm
        .mem
        .read_obj(GuestAddress(facs + boot::acpi::FACS_WAKING_VECTOR))
        .map_err(|e| VmmError::Host {
            what: "reading the FACS waking vector",
            source: std::io::Error::other(e.to_string()),
        })?;
    for v in vcpus {
        if v.id == 0 {
            v.enter_waking_vector(vector)?;
        } else {
            v.wait_for_sipi()?;
        }
    }
    Ok(())
}

/// How often the main loop checks for a guest that halted for good.
const HALT_POLL: Duration = Duration::from_millis(250);

struct HaltPoll {
    timer: TimerFd,
    watch: Arc<HaltWatch>,
    /// The running vCPUs; empty while they are stopped.
    kicks: Arc<Mutex<Vec<Kick>>>,
    shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for HaltPoll {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.watch.all_stuck_and_clear() {
            self.shutdown.request(ExitReason::Halted);
            return;
        }
        // The list is emptied before the threads are joined.
        for k in self.kicks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            k.kick();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::warn!("warning: cannot watch for halted guests: {e:?}");
        }
    }
}

struct ShutdownWatch(Arc<Shutdown>);

impl MutEventSubscriber for ShutdownWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            self.0.request(ExitReason::Error(format!(
                "cannot watch the exit event: {e:?}"
            )));
        }
    }
}

struct Timeout {
    timer: TimerFd,
    shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for Timeout {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.shutdown.request(ExitReason::Timeout);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            self.shutdown.request(ExitReason::Error(format!(
                "cannot watch the timeout: {e:?}"
            )));
        }
    }
}

/// Stops the vCPUs when the PIT's lost-tick policy switch misses its
/// deadline (see `pit`); the run loop restarts them once it lands.
struct TickDeadline {
    timer: TimerFd,
    landed: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for TickDeadline {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let _ = self.timer.wait();
        let _ = ops.remove(Events::new(&self.timer, EventSet::IN));
        if !self.landed.load(Ordering::SeqCst) {
            self.hold.store(true, Ordering::SeqCst);
            self.shutdown.request_pause();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            self.shutdown.request(ExitReason::Error(format!(
                "cannot watch the PIT policy deadline: {e:?}"
            )));
        }
    }
}

/// Host stdin to the guest's COM1 receiver.
struct StdinToSerial {
    serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        // SAFETY: fd 0 stays open for the life of the process.
        let n = unsafe { libc::read(stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let taken = serial.enqueue_input(&buf[..n as usize]);
            if taken < n as usize {
                log::debug!(
                    "serial input FIFO full: dropped {} bytes",
                    n as usize - taken
                );
            }
        }
        // A writer that closes right after writing raises IN and HANG_UP
        // together: the bytes above still count. Stop watching only at the
        // end of input or on an error, so the loop does not spin.
        if n <= 0 || (events.event_set().contains(EventSet::HANG_UP) && n < buf.len() as isize) {
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be watched; the guest just gets
        // no input then.
        if ops
            .add(Events::new(&std::io::stdin(), EventSet::IN))
            .is_err()
        {
            log::debug!("stdin cannot be polled; serial input disabled");
        }
    }
}

/// Guest RAM the host has backed with pages, for the benchmark's "RSS beyond
/// guest memory touched".
fn resident_kib(vm: &Vm) -> u64 {
    let mut pages = 0u64;
    for (_, len, host) in crate::memory::host_regions(&vm.mem) {
        let n = len.div_ceil(4096) as usize;
        let mut vec = vec![0u8; n];
        // SAFETY: `host..host + len` is one mapping of guest RAM owned by `vm`.
        if unsafe { libc::mincore(host as *mut libc::c_void, len as usize, vec.as_mut_ptr()) } == 0
        {
            pages += vec.iter().filter(|b| **b & 1 != 0).count() as u64;
        }
    }
    pages * 4
}
