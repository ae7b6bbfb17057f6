//! kvmrun's command line: parse, call the library, map the outcome to an
//! exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kvmrun::api::{self, Request};
use kvmrun::config::{
    self, ConsoleConfig, DeviceConfig, DiskConfig, Irqchip, Machine, PortConfig, PortHost,
    SerialOutput, ShareConfig, Transport, VmConfig,
};
use kvmrun::cpu::msrs::MsrValue;
use kvmrun::cpu::CpuSpec;
use kvmrun::kvmcaps::{self, CapSetting, MsrRange};
use kvmrun::rootfs::{KernelLog, RootfsOptions};
use kvmrun::shutdown::STATUS_ERROR;
use kvmrun::vmm;

#[derive(Parser)]
#[command(
    name = "kvmrun",
    version,
    about = "A small, fast VMM on Linux KVM that doubles as a test host"
)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// seccomp filters on kvmrun's threads: on (a forbidden system call
    /// ends kvmrun with status 159 and a message naming the thread and the
    /// call), log (the kernel logs it and lets it through) or off.
    #[arg(long, global = true, value_name = "MODE", default_value = "on")]
    seccomp: kvmrun::sandbox::Mode,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot an image and exit with the guest's verdict.
    ///
    /// Exit status: (v << 1) | 1 when the guest writes v to isa-debug-exit
    /// (port 0xf4); 0 on guest power-off, reset or halt; 2 on a kvmrun error
    /// or bad input; 4 when the guest crashes (triple fault, KVM internal
    /// error); 124 when --timeout expires.
    Run(Box<RunArgs>),
    /// Show, for every named CPUID feature, whether the host has it, KVM
    /// supports it, the model turns it on, and kvmrun sets it; with
    /// --probe, also what the guest sees.
    Cpuid(CpuidArgs),
    /// Show the KVM capabilities of this host by name (KVM_CHECK_EXTENSION
    /// on a VM), and which ones --kvm-cap can set.
    Caps(CapsArgs),
    /// Run a suite, every test in its own VM, and report the verdicts.
    ///
    /// SUITE is kvm-unit-tests' unittests.cfg or a kvmrun TOML suite
    /// (docs/TESTHOST.md). Exit status: 0 when no test failed, 1 when one
    /// did, 2 on bad input, 130 when interrupted (reports are still written).
    Test(TestArgs),
    /// Bring back a VM from a snapshot directory, in this new process, and
    /// run it to the end. Exit status as for `run`; 2 when the snapshot is
    /// damaged, of another format version, or not for this host's KVM.
    Restore(RestoreArgs),
    /// Snapshot the VM served at SOCKET into DIR; the VM goes on running
    /// unless --stop is given.
    Snapshot {
        /// The VM's control socket (`run --api`).
        socket: PathBuf,
        /// Directory to write (created if missing; an older snapshot in it
        /// is replaced).
        dir: PathBuf,
        /// Leave the VM paused after the snapshot.
        #[arg(long)]
        stop: bool,
    },
    /// Pause the VM served at SOCKET (its vCPUs stop).
    Pause { socket: PathBuf },
    /// Resume the VM served at SOCKET.
    Resume { socket: PathBuf },
    /// Print whether the VM served at SOCKET is running or paused.
    Status { socket: PathBuf },
    /// End the VM served at SOCKET (its kvmrun exits with status 0).
    Quit { socket: PathBuf },
}

#[derive(Args)]
struct RestoreArgs {
    /// A snapshot directory (holding `state` and `memory`).
    dir: PathBuf,
    #[command(flatten)]
    io: HostSideArgs,
    /// Check guest RAM against the digest in the state before starting;
    /// reads the whole memory file (without it, restore reads no RAM).
    #[arg(long)]
    verify_memory: bool,
    /// How guest RAM comes from the memory file: map (copy-on-write, read
    /// as the guest touches it: fastest to start) or copy (read whole
    /// before the guest runs, into memory that can use huge pages: the
    /// guest runs faster, notably under nested paging).
    #[arg(long, value_name = "HOW", default_value = "map")]
    memory: kvmrun::snapshot::MemoryLoad,
}

/// The host side of a VM that a snapshot does not fix: `--serial`,
/// `--timeout`, `--api`, `--gdb` and `--serial-input`, shared by `run` and
/// `restore`.
#[derive(Args)]
struct HostSideArgs {
    /// Where COM1 output goes: stdio, none or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialOutput,
    /// End the VM with status 124 after this many seconds.
    #[arg(long, value_parser = config::parse_timeout)]
    timeout: Option<f64>,
    /// Serve the control socket at this path: pause, resume, snapshot,
    /// status, quit (see docs/API.md).
    #[arg(long)]
    api: Option<PathBuf>,
    /// Serve a gdb stub at this Unix socket PATH or TCP HOST:PORT (:PORT
    /// is localhost); docs/DEBUGGING.md.
    #[arg(long, value_name = "PATH|HOST:PORT")]
    gdb: Option<kvmrun::gdb::Address>,
    /// With --gdb: stop before the first guest instruction until gdb
    /// continues.
    #[arg(long, requires = "gdb")]
    gdb_wait: bool,
    /// With --gdb: the registers gdb sees, i386:x86-64 or i386; auto picks
    /// i386 when the image's symbols are ELF32.
    #[arg(
        long,
        value_name = "auto|x86-64|i386",
        default_value = "auto",
        requires = "gdb"
    )]
    gdb_arch: kvmrun::gdb::ArchChoice,
    /// Type TEXT into COM1 once the guest runs (after a restore, into the
    /// restored guest), as fast as the guest empties the UART's receive
    /// FIFO, none of it dropped; e.g. $'exit:3\n' for a line. Host stdin
    /// feeds COM1 too: give it no input of its own alongside.
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    serial_input: Option<String>,
}

impl HostSideArgs {
    fn run_options(&self) -> vmm::RunOptions {
        vmm::RunOptions {
            api: self.api.clone(),
            gdb: self.gdb.clone().map(|address| kvmrun::gdb::GdbOptions {
                address,
                wait: self.gdb_wait,
                arch: self.gdb_arch,
            }),
            serial_input: self.serial_input.clone().map(String::into_bytes),
        }
    }
}

/// `--cpu` and `--cpu-lenient`, shared by `run` and `cpuid`.
#[derive(Args)]
struct CpuArgs {
    /// CPU model and toggles in QEMU's -cpu spelling:
    /// MODEL[,+FEAT][,-FEAT][,FEAT=on|off][,vendor=STR][,phys-bits=N][,host-phys-bits].
    /// Models: host, max, qemu64 (the default, as QEMU's), base, Opteron_G1.
    #[arg(long, value_name = "SPEC", default_value = "qemu64")]
    cpu: CpuSpec,
    /// Drop features this host's KVM cannot give with a warning, instead
    /// of failing (QEMU's behaviour).
    #[arg(long)]
    cpu_lenient: bool,
}

#[derive(Args)]
struct CpuidArgs {
    #[command(flatten)]
    cpu: CpuArgs,
    /// Boot a tiny VM whose vCPUs run CPUID, and show what they saw.
    #[arg(long)]
    probe: bool,
    /// vCPUs for --probe.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=config::MAX_VCPUS as i64))]
    smp: u32,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TestArgs {
    /// The suite: unittests.cfg, or a .toml Linux functional suite.
    suite: PathBuf,
    /// Only these tests (by name).
    tests: Vec<String>,
    /// Where the images of a unittests.cfg are (default: the cfg's directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Tests run in parallel (default: the number of online CPUs).
    #[arg(short, long)]
    jobs: Option<usize>,
    /// Only tests in this group (a unittests.cfg's nodefault tests included).
    #[arg(short, long)]
    group: Option<String>,
    /// Also run the tests in the nodefault group (run_tests.sh -a).
    #[arg(short, long)]
    all: bool,
    /// Run only part K of N of the selected tests (1 <= K <= N), for CI
    /// matrices; test i (from 0, in suite order) belongs to part i % N + 1.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Per-test logs: NAME.log (serial output), NAME.stderr, NAME.env.
    #[arg(short, long, default_value = "logs")]
    output_dir: PathBuf,
    /// Multiply every test's timeout by this factor.
    #[arg(long, default_value_t = 1.0)]
    timeout_scale: f64,
    /// Stress save/restore: every test also migrates (snapshot, restore
    /// into a new VM process) every SECS seconds (`run --migrate-every`).
    #[arg(long, value_name = "SECS", value_parser = parse_migrate_every)]
    migrate_every: Option<f64>,
    /// Run every test with this irqchip (`run --irqchip`).
    #[arg(long, value_name = "kernel|split", default_value = "kernel")]
    irqchip: Irqchip,
    /// Write a TAP 13 report here.
    #[arg(long)]
    tap: Option<PathBuf>,
    /// Write a JUnit XML report here.
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Live progress bar (default: when stdout is a terminal) or plain lines.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// After the suite, run each failed test again, stopped before its
    /// first instruction with a gdb stub (run --gdb-wait), after printing
    /// the gdb command line that attaches with the image's symbols.
    #[arg(long, conflicts_with = "migrate_every")]
    gdb_on_fail: bool,
    /// Boot every test, those of a TOML suite's boot_once groups too
    /// (their cmd then goes on the kernel command line as kvmrun.cmd);
    /// --migrate-every implies it.
    #[arg(long)]
    boot_each: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ProgressMode {
    Auto,
    Bar,
    Lines,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let err = || format!("invalid shard '{s}': expected K/N with 1 <= K <= N");
    let (k, n) = s.split_once('/').ok_or_else(err)?;
    let k: usize = k.trim().parse().map_err(|_| err())?;
    let n: usize = n.trim().parse().map_err(|_| err())?;
    if k == 0 || k > n {
        return Err(err());
    }
    Ok((k, n))
}

/// `test --migrate-every`: what `run --migrate-every` accepts, checked once
/// here so a bad value is one error, not a failure of every test.
fn parse_migrate_every(s: &str) -> Result<f64, String> {
    config::parse_timeout(s).map_err(|_| "expected a positive, finite number of seconds".into())
}

#[derive(Args)]
struct CapsArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `--msr-filter` value: ranges, comma-separated.
#[derive(Clone)]
struct MsrRanges(Vec<MsrRange>);

impl std::str::FromStr for MsrRanges {
    type Err = kvmcaps::CapError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        kvmcaps::parse_msr_filter(s).map(MsrRanges)
    }
}

#[derive(Args)]
struct RunArgs {
    /// The image: a multiboot ELF (kvm-unit-tests .flat files), a Linux
    /// bzImage, or an ELF kernel (vmlinux; PVH entry when it has the note).
    image: PathBuf,
    /// Guest RAM: a number with K, M, G or T; a bare number is MiB, as QEMU's -m.
    #[arg(short, long, default_value = "128M", value_parser = config::parse_mem_size)]
    mem: u64,
    /// Number of vCPUs; vCPU 0 boots, the others wait for INIT/SIPI.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// Multiboot: module 0 (kvm-unit-tests' environment file). Linux: the
    /// initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Base of the kernel command line; --append and the words after `--`
    /// follow it. Default for Linux kernels: "console=ttyS0 reboot=k
    /// panic=1"; for multiboot images: empty (the image name always comes
    /// first there).
    #[arg(long, allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Words added to the command line (after --cmdline or its default).
    /// Values may start with '-' (kvm-unit-tests passes "-test_name" to
    /// deselect tests).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    append: String,
    /// Leave out the in-kernel PIT (QEMU's -machine pit=off).
    #[arg(long)]
    no_pit: bool,
    #[command(flatten)]
    io: HostSideArgs,
    /// Answer the guest's migration requests (kvm-unit-tests' "Now migrate
    /// the VM" line): snapshot it, restore it into a new VM process, and
    /// send the key it waits for, as often as it asks.
    #[arg(long, conflicts_with_all = ["api", "gdb"])]
    migrate: bool,
    /// Also migrate (snapshot, restore into a new VM process) whenever the
    /// VM has run SECS seconds since it started or was restored, so any
    /// test runs across save/restore points; implies --migrate.
    #[arg(long, value_name = "SECS", value_parser = config::parse_timeout, conflicts_with_all = ["api", "gdb"])]
    migrate_every: Option<f64>,
    #[command(flatten)]
    cpu: CpuArgs,
    /// Enable a VM-wide KVM capability (repeatable); `kvmrun caps` lists them.
    #[arg(long = "kvm-cap", value_name = "NAME[=VALUE]")]
    kvm_cap: Vec<CapSetting>,
    /// Deny the guest these MSRs: INDEX or FIRST-LAST, comma-separated
    /// (repeatable). With --kvm-cap X86_USER_SPACE_MSR=filter the accesses
    /// exit to kvmrun, which injects #GP; otherwise KVM injects it.
    #[arg(long = "msr-filter", value_name = "RANGES")]
    msr_filter: Vec<MsrRanges>,
    /// Initial MSR value on every vCPU (repeatable), e.g. --msr 0x1a0=0x1.
    #[arg(long = "msr", value_name = "INDEX=VALUE")]
    msr: Vec<MsrValue>,
    /// Add a virtio-rng device (random bytes from the host's getrandom)
    /// on virtio-pci (the default; brings the PCI host bridge) or
    /// virtio-mmio (announced in the DSDT); repeatable, up to 4.
    #[arg(
        long = "rng",
        value_name = "TRANSPORT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "pci"
    )]
    rng: Vec<Transport>,
    /// Add a virtio-blk disk on a raw image file (repeatable, up to 8):
    /// `ro` makes it read-only, `snapshot` sends the guest's writes to a
    /// temporary overlay dropped at exit; either leaves FILE untouched.
    /// Transport as for --rng, virtio-pci by default.
    #[arg(
        long = "disk",
        value_name = "FILE[,ro][,snapshot][,transport=pci|mmio]"
    )]
    disk: Vec<DiskConfig>,
    /// Share a host directory over virtio-fs (repeatable, up to 8); the
    /// guest mounts it with `mount -t virtiofs TAG DIR`. The tag is the
    /// directory's name unless `tag=` gives one; `ro` refuses every
    /// change with EROFS. Transport as for --rng, virtio-pci by default.
    #[arg(long = "share", value_name = "DIR[,tag=T][,ro][,transport=pci|mmio]")]
    share: Vec<ShareConfig>,
    /// Add QEMU's edu device (a PCI function with a factorial unit, a DMA
    /// engine, INTx and MSI; kvm-unit-tests' intel_iommu drives it);
    /// repeatable, up to 4.
    #[arg(long = "edu", action = clap::ArgAction::Count)]
    edu: u8,
    /// Add an Intel IOMMU (VT-d) at 0xfed90000, described by the ACPI
    /// DMAR table, in front of every PCI device (--machine q35 only):
    /// DMA remapping, queued invalidation, fault recording, and with
    /// intremap=on interrupt remapping in xAPIC mode (eim=off), as
    /// QEMU's -device intel-iommu.
    #[arg(
        long = "iommu",
        value_name = "intremap=on|off[,eim=off]",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    iommu: Option<config::IommuConfig>,
    /// Add a named port of a virtio-console device (repeatable, up to
    /// 16; one device holds them all, on virtio-pci): the guest sees it
    /// as /dev/vportNpM named NAME in /sys/class/virtio-ports/*/name;
    /// the guest's output goes to kvmrun's stdout, stderr or a file, or
    /// kvmrun's stdin becomes the guest's input (COM1 then gets none).
    #[arg(long = "vport", value_name = "NAME=stdout|stderr|stdin|file:PATH")]
    vport: Vec<PortConfig>,
    /// Boot the Linux IMAGE with DIR as its read-only root under a tmpfs
    /// overlay and run the command after `--` there (through
    /// kvmrun-init): its stdin, stdout and stderr are kvmrun's, and its
    /// status is kvmrun's (128 + N for signal N; 125 when the kernel
    /// panics, with the panic on stderr). The kernel log goes to
    /// --serial file:PATH, to stderr with -v, else nowhere. DIR reaches
    /// the guest as a read-only virtio-fs share tagged rootfs (`/` is
    /// the host's own root).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["initrd", "vport", "migrate", "migrate_every"])]
    rootfs: Option<PathBuf>,
    /// With --rootfs: the kernel's module tree (lib/modules/RELEASE, or
    /// the directory holding RELEASE); default /lib/modules/RELEASE, the
    /// release read from IMAGE. The virtio, console, virtio-fs and
    /// overlay modules in it (and what they need) go into the initramfs.
    #[arg(long, value_name = "DIR", requires = "rootfs")]
    modules: Option<PathBuf>,
    /// With --rootfs: the kvmrun-init to use (default: $KVMRUN_INIT, next
    /// to kvmrun, or build/rootfs from `make init`).
    #[arg(long, value_name = "FILE", requires = "rootfs")]
    init: Option<PathBuf>,
    /// Machine type: pc (kvmrun's PC, PCI only with a PCI device) or q35
    /// (the Q35 chipset: MCH host bridge 8086:29c0, ICH9 LPC 8086:2918
    /// at 00:1f.0, always PCI with ECAM).
    #[arg(long, value_name = "pc|q35", default_value = "pc")]
    machine: Machine,
    /// Interrupt controllers: kernel (KVM's PICs, IOAPIC and PIT) or
    /// split (KVM_CAP_SPLIT_IRQCHIP: local APICs in KVM, the IOAPIC,
    /// PICs and PIT in kvmrun; QEMU's -machine kernel-irqchip=split).
    #[arg(long, value_name = "kernel|split", default_value = "kernel")]
    irqchip: Irqchip,
    /// Guest arguments, appended to the command line.
    #[arg(last = true)]
    args: Vec<String>,
}

impl RunArgs {
    /// With --rootfs: the words after `--` are the command, not kernel
    /// arguments.
    fn take_rootfs(&mut self, verbose: u8) -> Option<RootfsOptions> {
        let root = self.rootfs.take()?;
        let log = match &self.io.serial {
            SerialOutput::File(p) => KernelLog::File(p.clone()),
            _ if verbose > 0 => KernelLog::Stderr,
            _ => KernelLog::Temporary,
        };
        Some(RootfsOptions {
            root,
            command: std::mem::take(&mut self.args),
            modules: self.modules.take(),
            init: self.init.take(),
            log,
        })
    }

    fn into_config(self) -> (VmConfig, vmm::RunOptions) {
        let mut words: Vec<String> = Vec::new();
        if !self.append.is_empty() {
            words.push(self.append);
        }
        words.extend(self.args);
        let opts = self.io.run_options();
        let cfg = VmConfig {
            image: self.image,
            mem_bytes: self.mem,
            vcpus: self.smp,
            initrd: self.initrd,
            base_cmdline: self.cmdline,
            cmdline: words.join(" "),
            pit: !self.no_pit,
            irqchip: self.irqchip,
            serial: self.io.serial,
            timeout_secs: self.io.timeout,
            cpu: self.cpu.cpu,
            cpu_lenient: self.cpu.cpu_lenient,
            kvm_caps: self.kvm_cap,
            msr_filter: self.msr_filter.into_iter().flat_map(|r| r.0).collect(),
            msrs: self.msr,
            devices: (self.machine == Machine::Q35)
                .then_some(DeviceConfig::Q35)
                .into_iter()
                .chain(self.rng.into_iter().map(DeviceConfig::Rng))
                .chain(
                    self.disk
                        .into_iter()
                        .map(|d| DeviceConfig::Disk(absolute(d))),
                )
                .chain(std::iter::repeat_n(
                    DeviceConfig::Edu,
                    usize::from(self.edu),
                ))
                .chain(self.iommu.map(DeviceConfig::Iommu))
                .chain(self.share.into_iter().map(|s| {
                    let path = std::path::absolute(&s.path).unwrap_or(s.path);
                    DeviceConfig::Share(ShareConfig { path, ..s })
                }))
                .chain((!self.vport.is_empty()).then(|| {
                    DeviceConfig::Console(ConsoleConfig {
                        ports: self.vport.into_iter().map(absolute_port).collect(),
                        transport: Transport::Pci,
                    })
                }))
                .collect(),
        };
        (cfg, opts)
    }
}

/// `d` with its file named from the root: a snapshot keeps the path, and
/// a restore may run in another directory.
fn absolute(d: DiskConfig) -> DiskConfig {
    match std::path::absolute(&d.path) {
        Ok(path) => DiskConfig { path, ..d },
        Err(_) => d,
    }
}

/// A port's output file named from the root, as `absolute()`.
fn absolute_port(p: PortConfig) -> PortConfig {
    match &p.host {
        PortHost::File(f) => match std::path::absolute(f) {
            Ok(f) => PortConfig {
                host: PortHost::File(f),
                ..p
            },
            Err(_) => p,
        },
        _ => p,
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .parse_env("KVMRUN_LOG")
        .format(|buf, record| {
            // kvm-unit-tests' runner fails a test whose stderr has a line
            // without "warning", so warnings must say so.
            // virtio-queue reports a guest's malformed ring as an error
            // of its own: the guest's fault, which the device answers and
            // the VM survives, so a warning that names the crate.
            if record.target().starts_with("virtio_queue") {
                return writeln!(buf, "kvmrun: warning: virtio queue: {}", record.args());
            }
            let level = match record.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            writeln!(buf, "kvmrun: {level}: {}", record.args())
        })
        .init();
}

fn run(cmd: Cmd, verbose: u8) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Run(mut args) => {
            if let Some(r) = args.take_rootfs(verbose) {
                let (cfg, opts) = (*args).into_config();
                return Ok(kvmrun::rootfs::run(cfg, &opts, &r)?);
            }
            if args.migrate || args.migrate_every.is_some() {
                if args.io.serial != SerialOutput::Stdio {
                    return Err(kvmrun::migrate::MigrateError::Serial.into());
                }
                // The same command line without --migrate, for the child VM.
                let argv = without_migrate_flags(std::env::args_os().skip(1));
                let exe = std::env::current_exe()?;
                let every = args.migrate_every.map(std::time::Duration::from_secs_f64);
                return Ok(kvmrun::migrate::supervise(
                    &exe,
                    &argv,
                    args.io.timeout,
                    every,
                )?);
            }
            let (cfg, opts) = (*args).into_config();
            let reason = vmm::run(&cfg, &opts)?;
            log::info!("VM ended: {reason:?}");
            Ok(reason.status())
        }
        Cmd::Restore(a) => {
            let opts = a.io.run_options();
            let reason = vmm::restore(
                &a.dir,
                a.io.serial,
                a.io.timeout,
                a.verify_memory,
                a.memory,
                &opts,
            )?;
            log::info!("VM ended: {reason:?}");
            Ok(reason.status())
        }
        Cmd::Snapshot { socket, dir, stop } => {
            // The VM resolves the path in its own working directory.
            let dir = std::path::absolute(&dir)?;
            client(&socket, &Request::Snapshot { dir, stop })
        }
        Cmd::Pause { socket } => client(&socket, &Request::Pause {}),
        Cmd::Resume { socket } => client(&socket, &Request::Resume {}),
        Cmd::Status { socket } => client(&socket, &Request::Status {}),
        Cmd::Quit { socket } => client(&socket, &Request::Quit {}),
        Cmd::Cpuid(args) => {
            let report = kvmrun::cpu::report::build(
                &args.cpu.cpu,
                args.cpu.cpu_lenient,
                args.smp,
                args.probe,
            )?;
            for w in &report.warnings {
                log::warn!("{w}");
            }
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(0)
        }
        Cmd::Test(args) => run_suite(args),
        Cmd::Caps(args) => {
            let caps = kvmcaps::report()?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&caps)?);
            } else {
                println!(
                    "{:<24} {:>6}  {:<9} description",
                    "capability", "value", "settable"
                );
                for c in &caps {
                    println!(
                        "{:<24} {:>6}  {:<9} {}",
                        c.name,
                        c.value,
                        if c.settable { "--kvm-cap" } else { "" },
                        c.what
                    );
                }
            }
            Ok(0)
        }
    }
}

fn run_suite(a: TestArgs) -> anyhow::Result<i32> {
    use kvmrun::testhost::{cfg, kut, linux, progress, report, scheduler};
    use std::io::IsTerminal;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let is_toml = a.suite.extension().is_some_and(|e| e == "toml");
    let mut specs = if is_toml {
        if a.dir.is_some() || a.all {
            anyhow::bail!("--dir and --all apply to unittests.cfg suites only");
        }
        linux::load(&a.suite, &a.tests, a.group.as_deref(), a.timeout_scale)?
    } else {
        let entries = cfg::parse_file(&a.suite)?;
        let dir = match a.dir {
            Some(d) => d,
            None => a
                .suite
                .parent()
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        PathBuf::from(".")
                    } else {
                        p.to_path_buf()
                    }
                })
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let opts = kut::KutOptions {
            dir,
            names: a.tests.clone(),
            group: a.group.clone(),
            all: a.all,
            timeout_scale: a.timeout_scale,
            max_smp: kut::online_cpus(),
        };
        kut::plan(&a.suite, &entries, &opts)?
    };
    if a.boot_each || a.migrate_every.is_some() {
        for s in &mut specs {
            if let kvmrun::testhost::Plan::Run(rs) = &mut s.plan {
                rs.once = None;
            }
        }
    }
    if let Some((k, n)) = a.shard {
        specs = specs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % n == k - 1)
            .map(|(_, s)| s)
            .collect();
    }
    let jobs = match a.jobs {
        Some(0) => anyhow::bail!("invalid --jobs 0: need at least 1"),
        Some(j) => j,
        None => kut::online_cpus() as usize,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal ends kvmrun at once; the children die with it
        // (they carry PR_SET_PDEATHSIG).
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    // gdb may attach from another directory.
    let out_dir = if a.gdb_on_fail {
        std::path::absolute(&a.output_dir)?
    } else {
        a.output_dir.clone()
    };
    // The suite is read; from here on the scheduler only starts, watches
    // and reports tests (started by the launcher thread, unfiltered).
    kvmrun::sandbox::enter(kvmrun::sandbox::Kind::Scheduler)?;
    let opts = scheduler::SuiteOptions {
        jobs,
        out_dir,
        kvmrun: std::env::current_exe()?,
        kill_grace: 5.0,
        migrate_every: a.migrate_every,
        split_irqchip: a.irqchip == Irqchip::Split,
    };
    let bar = match a.progress {
        ProgressMode::Auto => std::io::stdout().is_terminal(),
        ProgressMode::Bar => true,
        ProgressMode::Lines => false,
    };
    let mut shown: Box<dyn progress::Progress> = if bar {
        Box::new(progress::Bar::new())
    } else {
        Box::new(progress::Lines)
    };
    let run = scheduler::run(&specs, &opts, &stop, shown.as_mut())?;
    print!("{}", progress::summary_table(&specs, &run, jobs));
    let suite_name = a
        .suite
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "suite".into());
    if let Some(p) = &a.tap {
        report::tap::write(p, &specs, &run)?;
    }
    if let Some(p) = &a.junit {
        report::junit::write(p, &suite_name, &specs, &run)?;
    }
    if a.gdb_on_fail && !run.interrupted {
        for (spec, result) in specs.iter().zip(&run.results) {
            let failed = result
                .as_ref()
                .is_some_and(|r| r.outcome.verdict == kvmrun::testhost::Verdict::Fail);
            if let (true, kvmrun::testhost::Plan::Run(rs)) = (failed, &spec.plan) {
                let status = scheduler::rerun_for_gdb(&spec.name, rs, &opts)?;
                println!("{} ended again with status {status}", spec.name);
            }
        }
    }
    Ok(if run.interrupted {
        130
    } else if run.count(kvmrun::testhost::Verdict::Fail) > 0 {
        1
    } else {
        0
    })
}

/// A `run` command line without --migrate and --migrate-every (in either
/// spelling), for the VM the supervisor starts.
fn without_migrate_flags(
    args: impl Iterator<Item = std::ffi::OsString>,
) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    let mut after_dashes = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if !after_dashes {
            if a == "--" {
                after_dashes = true;
            } else if a == "--migrate" {
                continue;
            } else if a == "--migrate-every" {
                skip_value = true;
                continue;
            } else if a.to_string_lossy().starts_with("--migrate-every=") {
                continue;
            }
        }
        out.push(a);
    }
    out
}

/// Send one request and print the VM's answer (a JSON line) on stdout.
fn client(socket: &std::path::Path, req: &Request) -> anyhow::Result<i32> {
    let answer = api::call(socket, req)?;
    println!("{answer}");
    Ok(0)
}

fn main() -> ExitCode {
    vmm::note_process_start();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    kvmrun::sandbox::set_mode(cli.seccomp);
    match run(cli.cmd, cli.verbose) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("kvmrun: error: {}", error_text(&e));
            ExitCode::from(STATUS_ERROR as u8)
        }
    }
}

/// The error and its causes, leaving out a cause an error's own message
/// already quotes (most layers name their source in the message).
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
