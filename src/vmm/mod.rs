//! Builds a VM from a `VmConfig`, runs the main event loop, and owns
//! shutdown: whatever ends the VM, `run()` returns its `ExitReason` after
//! every vCPU thread has stopped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::serial::SerialDevice;

use crate::api::ApiError;
use crate::boot::{self, linux, multiboot, BootError};
use crate::bus::BusError;
use crate::config::{ConfigError, DeviceConfig, Irqchip, SerialOutput, VmConfig};
use crate::cpu::msrs::{self, MsrError};
use crate::cpu::{self, CpuError};
use crate::kvmcaps::CapError;
use crate::memory::Layout;
use crate::pit::{PitError, TickSwitch};
use crate::platform::{machine, Platform, PlatformError};
use crate::serial_out::Output;
use crate::shutdown::{ExitReason, Shutdown};
use crate::snapshot::{
    self, tsc, MachineState, SnapshotError, VcpuContext, VcpuState, VcpuStateError, VmState,
    VmStateError, WriteStats,
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
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("{}: {what}", path.display())]
    Restore { path: PathBuf, what: String },
    #[error("cannot snapshot: disk {} is in snapshot mode and its overlay of guest writes is not saved; use a read-write or ro disk", .0.display())]
    OverlayDisk(PathBuf),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Gdb(#[from] crate::gdb::GdbError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Backing(#[from] crate::backing::BackingError),
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

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything a running VM is made of.
struct Machine {
    cfg: VmConfig,
    /// COM1, which host stdin feeds.
    serial: Arc<Mutex<SerialDevice>>,
    vm: Vm,
    /// The device registry: buses, resources and every device.
    platform: Platform,
    vcpus: Vec<Vcpu>,
    /// Guest address of the FACS, for S3 wake-up.
    facs: u64,
    /// The PIT's lost-tick policy switch, if the vCPUs did not wait for it.
    ticks: TickSwitch,
    /// The writer of COM1's output (none with `--serial none`).
    output: Option<Output>,
    /// The writers of the console ports' output.
    port_outputs: Vec<Output>,
    /// The console port that host stdin feeds, instead of COM1.
    stdin_port: Option<Arc<devices::virtio::console::Inbox>>,
}

/// Where a VM comes from: an image, or a snapshot directory whose state
/// was read (`verify`: check the memory file's digest first).
enum Origin<'a> {
    Boot,
    Snapshot {
        dir: &'a Path,
        state: &'a MachineState,
        verify: bool,
        load: snapshot::MemoryLoad,
    },
}

/// Build the VM `cfg` describes, ready to run: booted from its image, or
/// restored from a snapshot (with `cfg` the saved configuration with this
/// run's serial and timeout). Both take the same path through the VM and
/// its devices; only memory, firmware and vCPU state come from different
/// places.
fn build(cfg: &VmConfig, shutdown: &Arc<Shutdown>, origin: Origin) -> Result<Machine, VmmError> {
    cfg.validate()?;
    crate::backing::check(cfg.mem_bytes)?;
    let image = match origin {
        Origin::Boot => Some((read_image(cfg)?, resolve_cpuid(cfg)?)),
        Origin::Snapshot { .. } => None,
    };
    let layout = Layout::new(cfg.mem_bytes).with_pci(cfg.has_pci());
    let vm = match origin {
        Origin::Boot => Vm::new(layout.clone(), cfg.pit_enabled(), cfg.irqchip)?,
        Origin::Snapshot {
            dir,
            state,
            verify,
            load,
        } => {
            let mem = snapshot::map_memory(dir, &layout, &state.memory, verify, load)?;
            Vm::with_memory(layout.clone(), cfg.pit_enabled(), cfg.irqchip, mem)?
        }
    };
    vm.enable_caps(cfg)?;
    let saved = match origin {
        Origin::Boot => None,
        Origin::Snapshot { state, .. } => Some(state.devices.clone()),
    };
    let mut platform = Platform::new(&vm, cfg.pit_enabled(), saved);
    let requests: Arc<dyn devices::VmRequests> = shutdown.clone();
    let stop = shutdown.clone();
    let handles = machine::attach(&mut platform, cfg, &vm, &requests, move || stop.must_stop())?;
    platform.check_restored()?;
    let (vcpus, facs, ticks) = match (origin, image) {
        (Origin::Boot, Some((image, cpuid))) => {
            let cpuid = cpuid.join().map_err(|_| VmmError::Host {
                what: "the cpuid thread",
                source: std::io::Error::other("panicked"),
            })??;
            boot_vcpus(cfg, &vm, &platform, &handles, shutdown, image, cpuid)?
        }
        (Origin::Snapshot { dir, state, .. }, _) => {
            let vcpus = restore_vcpus(dir, state, &vm)?;
            let loaded_at = Instant::now();
            state.vm.restore(&vm)?;
            match tsc::resume_at_clock(&vm, state.vm.clock.clock, &vcpus, &state.vcpus) {
                Ok(()) => log::debug!("TSCs resumed at the kvmclock instant"),
                Err(why) => log::debug!("TSCs not resumed at the kvmclock instant: {why}"),
            }
            let ticks = match (vm.pit(), &state.vm.pit) {
                (Some(pit), Some(loaded)) => {
                    pit.drop_lost_ticks(loaded, loaded_at, failed_switch(shutdown))?
                }
                _ => TickSwitch::default(),
            };
            (vcpus, state.facs, ticks)
        }
        (Origin::Boot, None) => unreachable!("a boot reads its image"),
    };
    Ok(Machine {
        cfg: cfg.clone(),
        serial: handles.serial,
        vm,
        platform,
        vcpus,
        facs,
        ticks,
        output: handles.output,
        port_outputs: handles.port_outputs,
        stdin_port: handles.stdin_port,
    })
}

/// The image, its kind and the initrd.
struct Image {
    data: Vec<u8>,
    kind: boot::ImageKind,
    initrd: Option<(PathBuf, Vec<u8>)>,
}

fn read_image(cfg: &VmConfig) -> Result<Image, VmmError> {
    let data = read_file(&cfg.image)?;
    let kind = boot::detect(&cfg.image, &data)?;
    let initrd = match &cfg.initrd {
        Some(p) => Some((p.clone(), read_file(p)?)),
        None => None,
    };
    Ok(Image { data, kind, initrd })
}

/// The CPUID table `cfg` asks for, resolved against KVM on a thread of
/// its own: KVM_GET_SUPPORTED_CPUID needs no VM, so it overlaps the VM's
/// creation instead of following it.
fn resolve_cpuid(
    cfg: &VmConfig,
) -> Result<std::thread::JoinHandle<Result<cpu::Resolved, VmmError>>, VmmError> {
    let (spec, lenient) = (cfg.cpu.clone(), cfg.cpu_lenient);
    std::thread::Builder::new()
        .name("cpuid".into())
        .spawn(move || {
            let kvm = kvm_ioctls::Kvm::new().map_err(VmError::OpenKvm)?;
            Ok(cpu::resolve(&spec, lenient, &cpu::KvmCpuid::query(&kvm)?)?)
        })
        .map_err(host("cannot start the cpuid thread"))
}

/// Firmware state first, then the image over it, as a BIOS would load
/// it; then every vCPU with the `resolved` CPUID, the boot vCPU at the
/// image's entry. Returns the vCPUs, the FACS address and the PIT policy
/// switch.
fn boot_vcpus(
    cfg: &VmConfig,
    vm: &Vm,
    platform: &Platform,
    handles: &machine::Handles,
    shutdown: &Arc<Shutdown>,
    image: Image,
    resolved: cpu::Resolved,
) -> Result<(Vec<Vcpu>, u64, TickSwitch), VmmError> {
    let kind = image.kind;
    let acpi = boot::acpi::setup(
        &vm.mem,
        cfg.vcpus,
        &platform.acpi_description(kind.is_linux()),
    )?;
    boot::bios::write_ivt(&vm.mem)?;
    if vm.irqchip_kind() == Irqchip::Kernel {
        boot::bios::setup_pics(vm)?;
    }
    let ticks = match vm.pit() {
        Some(pit) => {
            let loaded_at = Instant::now();
            let loaded = pit.load_bios_state()?;
            pit.drop_lost_ticks(&loaded, loaded_at, failed_switch(shutdown))?
        }
        None => TickSwitch::default(),
    };
    let cmdline = cfg.kernel_cmdline(kind);
    let args = boot::LoadArgs {
        image_path: &cfg.image,
        image: &image.data,
        cmdline: &cmdline,
        initrd: image
            .initrd
            .as_ref()
            .map(|(p, d)| (p.as_path(), d.as_slice())),
    };
    let plan = if kind.is_linux() {
        linux::load(&args, kind, &vm.mem, &vm.layout)?
    } else {
        multiboot::load(&args, &vm.mem, &vm.layout)?
    };
    log::info!("{}: {} image", cfg.image.display(), plan.kind);
    lock(&handles.fw_cfg).set_kernel_data(plan.kernel_data.clone());

    for w in &resolved.warnings {
        // The log prefix says "warning", which kvm-unit-tests' runner needs.
        log::warn!("{w}");
    }
    let initial_msrs = msrs::initial(&cfg.msrs)?;
    let vcpus = (0..cfg.vcpus)
        .map(|id| {
            Vcpu::new(
                vm,
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
    Ok((vcpus, acpi.facs, ticks))
}

/// Every vCPU with its saved state.
fn restore_vcpus(dir: &Path, state: &MachineState, vm: &Vm) -> Result<Vec<Vcpu>, VmmError> {
    let ctx = VcpuContext::for_vm(vm)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for s in &state.vcpus {
        let v = Vcpu::bare(vm, s.id)?;
        s.restore(&v, &ctx).map_err(|e| match e {
            VcpuStateError::Cpuid { .. } => VmmError::Restore {
                path: dir.join(snapshot::STATE_FILE),
                what: e.to_string(),
            },
            e => VmmError::VcpuState(e),
        })?;
        vcpus.push(v);
    }
    Ok(vcpus)
}

/// End the VM if the PIT's lost-tick policy switch fails.
fn failed_switch(shutdown: &Arc<Shutdown>) -> impl FnOnce(&PitError) + Send + 'static {
    let shutdown = shutdown.clone();
    move |e| shutdown.request(ExitReason::Error(e.to_string()))
}

/// Test-only: with `KVMRUN_TEST_SLOW_SAVE=MS` in the environment, a
/// snapshot waits MS milliseconds between reading the vCPUs' states and
/// kvmclock, as a loaded host may: the saved TSCs must still be those of
/// the clock's instant (`snapshot::tsc`).
const SLOW_SAVE_HOOK: &str = "KVMRUN_TEST_SLOW_SAVE";

fn slow_save_hook() {
    let ms = std::env::var(SLOW_SAVE_HOOK)
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = ms {
        // Spin: the VMM thread's seccomp filter has no sleep.
        let until = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

impl Machine {
    /// Save everything but guest RAM. The vCPUs must be stopped and handed
    /// back (`vcpus`), so no ioctl races KVM_RUN.
    fn save(&self, vcpus: &mut [Vcpu]) -> Result<MachineState, VmmError> {
        let start = tsc::save_start(&self.vm, vcpus);
        let ctx = VcpuContext::for_vm(&self.vm)?;
        let mut vcpu_states = vcpus
            .iter_mut()
            .map(|v| VcpuState::save(v, &ctx))
            .collect::<Result<Vec<_>, _>>()?;
        slow_save_hook();
        // The clock is read last: the TSCs are tied to it right after.
        let offsets = tsc::offsets(&self.vm, vcpus);
        let vm = VmState::save(&self.vm)?;
        match tsc::tie_to_clock(&vm.clock, start, offsets, &mut vcpu_states) {
            Ok(()) => log::debug!("TSCs saved at the kvmclock instant"),
            Err(why) => log::debug!("TSCs not saved at the kvmclock instant: {why}"),
        }
        Ok(MachineState {
            config: self.cfg.clone(),
            memory: Default::default(),
            facs: self.facs,
            vm,
            vcpus: vcpu_states,
            devices: self.platform.save()?,
        })
    }

    /// Write a snapshot of the stopped VM into `dir`.
    fn snapshot(&self, vcpus: &mut [Vcpu], dir: &Path) -> Result<WriteStats, VmmError> {
        // The overlay of a snapshot-mode disk lives in an unnamed file
        // that goes with the process: a restore could not find the
        // guest's writes.
        let overlay = self.cfg.devices.iter().find_map(|d| match d {
            DeviceConfig::Disk(d) if d.snapshot && !d.read_only => Some(d.path.clone()),
            _ => None,
        });
        if let Some(path) = overlay {
            return Err(VmmError::OverlayDisk(path));
        }
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
/// When the process started, if main() said so (`note_process_start()`);
/// start-up times are counted from it.
static PROCESS_START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Record the process's start, first thing in main().
pub fn note_process_start() {
    let _ = PROCESS_START.set(Instant::now());
}

fn start_time() -> Instant {
    PROCESS_START.get().copied().unwrap_or_else(Instant::now)
}

/// What a run serves besides the VM itself.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Serve the control socket (`--api`) at this path.
    pub api: Option<PathBuf>,
    /// Serve a gdb stub (`--gdb`).
    pub gdb: Option<crate::gdb::GdbOptions>,
    /// Bytes typed into COM1 once the VM runs (`--serial-input`).
    pub serial_input: Option<Vec<u8>>,
}

/// Build the VM described by `cfg`, run it to the end, and say why it ended.
pub fn run(cfg: &VmConfig, opts: &RunOptions) -> Result<ExitReason, VmmError> {
    let started = start_time();
    let shutdown = Arc::new(Shutdown::new().map_err(host("eventfd"))?);
    let machine = build(cfg, &shutdown, Origin::Boot)?;
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
    load: snapshot::MemoryLoad,
    opts: &RunOptions,
) -> Result<ExitReason, VmmError> {
    let started = start_time();
    let state = snapshot::read_state(dir)?;
    let mut cfg = state.config.clone();
    cfg.serial = serial;
    cfg.timeout_secs = timeout_secs;
    cfg.validate()?;
    let shutdown = Arc::new(Shutdown::new().map_err(host("eventfd"))?);
    let origin = Origin::Snapshot {
        dir,
        state: &state,
        verify: verify_memory,
        load,
    };
    let machine = build(&cfg, &shutdown, origin)?;
    log::debug!("VM restored in {:?}", started.elapsed());
    run::run_machine(machine, shutdown, opts, started)
}
