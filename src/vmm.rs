//! Builds a VM from a `VmConfig`, runs the main event loop, and owns
//! shutdown: whatever ends the VM, `run()` returns its `ExitReason` after
//! every vCPU thread has stopped.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::acpi_pm::AcpiPm;
use devices::debug_exit::{self, DebugExit};
use devices::fw_cfg::{self, FwCfg};
use devices::i8042::{self, I8042};
use devices::rtc::{Rtc, RTC_INDEX_PORT, RTC_PORT_COUNT};
use devices::serial::{self, SerialDevice};
use devices::testdev::{self, PcTestDev, TestDevIomem};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;
use vmm_sys_util::timerfd::TimerFd;

use crate::boot::acpi::AcpiTables;
use crate::boot::{self, linux, multiboot, BootError, BootPlan};
use crate::bus::{BusError, IoBus};
use crate::config::{ConfigError, SerialOutput, VmConfig};
use crate::cpu::msrs::{self, MsrError};
use crate::cpu::{self, CpuError};
use crate::kvmcaps::{self, CapError};
use crate::memory::Layout;
use crate::shutdown::{ExitReason, Shutdown};
use crate::vcpu::{self, HaltWatch, Vcpu, VcpuError};
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

/// Everything a running VM is made of.
struct Machine {
    vm: Vm,
    bus: Arc<IoBus>,
    serial: Arc<Mutex<SerialDevice>>,
    vcpus: Vec<Vcpu>,
    plan: BootPlan,
    acpi: AcpiTables,
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
    let pit = cfg.pit_enabled();
    let vm = Vm::new(layout.clone(), pit)?;
    // Capabilities first: some are refused once a vCPU exists.
    kvmcaps::enable(&vm.fd, &cfg.kvm_caps)?;
    if !cfg.msr_filter.is_empty() {
        kvmcaps::set_msr_filter(&vm.fd, &cfg.msr_filter)?;
    }
    // Firmware state first, then the image over it, as a BIOS would load it.
    let platform = boot::acpi::Platform {
        com1: kind.is_linux(),
    };
    let acpi = boot::acpi::setup(&vm.mem, cfg.vcpus, platform)?;
    boot::bios::write_ivt(&vm.mem)?;
    boot::bios::setup_irqchip(&vm.fd, pit)?;
    let cmdline = cfg.kernel_cmdline(kind);
    let initrd_ref = initrd.as_ref().map(|(p, d)| (*p, d.as_slice()));
    let plan = if kind.is_linux() {
        let args = linux::LoadArgs {
            image_path: &cfg.image,
            image: &image,
            cmdline: &cmdline,
            initrd: initrd_ref,
        };
        linux::load(&args, kind, &vm.mem, &layout)?
    } else {
        let args = multiboot::LoadArgs {
            image_path: &cfg.image,
            image: &image,
            cmdline: &cmdline,
            initrd: initrd_ref,
        };
        multiboot::load(&args, &vm.mem, &layout)?
    };
    log::info!("{}: {} image", cfg.image.display(), plan.kind);

    let mut bus = IoBus::new();
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
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
    bus.add_pio(
        "serial",
        serial::COM1_BASE,
        serial::SERIAL_PORT_COUNT,
        serial.clone(),
    )?;

    let requests: Arc<dyn devices::VmRequests> = shutdown.clone();
    bus.add_pio(
        "isa-debug-exit",
        debug_exit::DEBUG_EXIT_BASE,
        debug_exit::DEBUG_EXIT_SIZE,
        Arc::new(Mutex::new(DebugExit::new(requests.clone()))),
    )?;
    let testdev = Arc::new(Mutex::new(PcTestDev::new(vm.irq_line(), vm.page_flusher())));
    bus.add_pio(
        "pc-testdev",
        testdev::PC_TESTDEV_IOPORT_BASE,
        testdev::PC_TESTDEV_IOPORT_SIZE,
        testdev.clone(),
    )?;
    bus.add_pio(
        "pc-testdev irq",
        testdev::PC_TESTDEV_IRQ_BASE,
        testdev::PC_TESTDEV_IRQ_COUNT,
        testdev,
    )?;
    bus.add_mmio(
        "pc-testdev iomem",
        testdev::TESTDEV_IOMEM_BASE,
        testdev::TESTDEV_IOMEM_SIZE,
        Arc::new(Mutex::new(TestDevIomem::new())),
    )?;
    let fw_cfg = FwCfg::for_vm(cfg.vcpus as u16, cfg.mem_bytes, plan.kernel_data.clone());
    bus.add_pio(
        "fw_cfg",
        fw_cfg::FW_CFG_PORT_SEL,
        fw_cfg::FW_CFG_PORT_COUNT,
        Arc::new(Mutex::new(fw_cfg)),
    )?;
    bus.add_pio(
        "acpi-pm",
        devices::acpi_pm::PM_BASE,
        devices::acpi_pm::PM_SIZE,
        Arc::new(Mutex::new(AcpiPm::new(requests.clone()))),
    )?;
    bus.add_pio(
        "rtc",
        RTC_INDEX_PORT,
        RTC_PORT_COUNT,
        Arc::new(Mutex::new(rtc_for(&layout, cfg.vcpus))),
    )?;
    let i8042 = Arc::new(Mutex::new(I8042::new(requests)));
    bus.add_pio("i8042 data", i8042::I8042_DATA_PORT, 1, i8042.clone())?;
    bus.add_pio("i8042 command", i8042::I8042_COMMAND_PORT, 1, i8042)?;

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

    Ok(Machine {
        vm,
        bus: Arc::new(bus),
        serial,
        vcpus,
        plan,
        acpi,
    })
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

/// Build the VM described by `cfg`, run it to the end, and say why it ended.
pub fn run(cfg: &VmConfig) -> Result<ExitReason, VmmError> {
    let started = Instant::now();
    let shutdown = Arc::new(Shutdown::new().map_err(host("eventfd"))?);
    let machine = build(cfg, &shutdown)?;
    log::debug!(
        "VM built in {:?}; entering at {:#x}",
        started.elapsed(),
        machine.plan.rip
    );

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
            serial: machine.serial.clone(),
        })));
    }

    vcpu::install_kick_handler();
    let Machine {
        vm,
        bus,
        mut vcpus,
        acpi,
        ..
    } = machine;
    let halt = Arc::new(HaltWatch::new(cfg.vcpus));
    let thread_ids = Arc::new(Mutex::new(Vec::new()));
    let mut halt_timer = TimerFd::new().map_err(sys("timerfd"))?;
    halt_timer
        .reset(HALT_POLL, Some(HALT_POLL))
        .map_err(sys("timerfd"))?;
    em.add_subscriber(Arc::new(Mutex::new(HaltPoll {
        timer: halt_timer,
        watch: halt.clone(),
        threads: thread_ids.clone(),
        shutdown: shutdown.clone(),
    })));

    // Each round runs the vCPUs until the VM ends or the guest suspends;
    // a suspended guest is woken through its firmware waking vector.
    loop {
        let threads = start_vcpus(vcpus, &bus, &shutdown, &halt);
        *thread_ids.lock().unwrap_or_else(|e| e.into_inner()) =
            threads.iter().map(|t| t.as_pthread_t()).collect();
        while !shutdown.must_stop() {
            if let Err(e) = em.run() {
                shutdown.request(ExitReason::Error(format!("event loop: {e:?}")));
            }
        }
        thread_ids.lock().unwrap_or_else(|e| e.into_inner()).clear();
        vcpus = stop_vcpus(threads);
        if shutdown.is_requested() || vcpus.len() != cfg.vcpus as usize {
            break;
        }
        if let Err(e) = wake_from_s3(&vcpus, &vm, &acpi) {
            shutdown.request(ExitReason::Error(format!("cannot wake from S3: {e}")));
            break;
        }
        log::info!("guest woke from S3");
        shutdown.resume();
    }
    if log::log_enabled!(log::Level::Info) {
        log::info!("guest RAM resident: {} KiB", resident_kib(&vm));
    }
    drop(vcpus);
    drop(vm);
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
) -> Vec<JoinHandle<Vcpu>> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        let (bus, sd, h) = (bus.clone(), shutdown.clone(), halt.clone());
        let name = format!("vcpu{}", v.id);
        match std::thread::Builder::new()
            .name(name)
            .spawn(move || v.run(bus, sd, h))
        {
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

/// Kick every vCPU out of KVM_RUN until its thread ends, and take the
/// vCPUs back. Kicks repeat because one that lands just before a thread
/// enters KVM_RUN is lost.
fn stop_vcpus(threads: Vec<JoinHandle<Vcpu>>) -> Vec<Vcpu> {
    let mut vcpus = Vec::with_capacity(threads.len());
    for t in threads {
        while !t.is_finished() {
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Ok(v) = t.join() {
            vcpus.push(v);
        }
    }
    vcpus
}

/// Resume from S3 the way firmware does after the wake event: the boot
/// CPU restarts in real mode at the FACS waking vector, the others wait
/// for INIT/SIPI. Memory is kept, as in suspend-to-RAM.
fn wake_from_s3(vcpus: &[Vcpu], vm: &Vm, acpi: &AcpiTables) -> Result<(), VmmError> {
    let vector: u32 = vm
        .mem
        .read_obj(GuestAddress(acpi.facs + boot::acpi::FACS_WAKING_VECTOR))
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
    /// The running vCPU threads; empty while they are stopped.
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    shutdown: Arc<Shutdown>,
}

impl MutEventSubscriber for HaltPoll {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        if self.watch.all_stuck_and_clear() {
            self.shutdown.request(ExitReason::Halted);
            return;
        }
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &t in threads.iter() {
            // SAFETY: the list is emptied before the threads are joined, so
            // every id in it names a live thread.
            unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
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
        if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
            // End of input or an error: stop watching so the loop does not spin.
            let _ = ops.remove(Events::new(&stdin, EventSet::IN));
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let taken = serial.enqueue_input(&buf[..n as usize]);
        if taken < n as usize {
            log::debug!(
                "serial input FIFO full: dropped {} bytes",
                n as usize - taken
            );
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
