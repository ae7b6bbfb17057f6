//! kvmrun's command line: parse, call the library, map the outcome to an
//! exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kvmrun::config::{self, SerialOutput, VmConfig};
use kvmrun::cpu::msrs::MsrValue;
use kvmrun::cpu::CpuSpec;
use kvmrun::kvmcaps::{self, CapSetting, MsrRange};
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
    /// Where COM1 output goes: stdio, none or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialOutput,
    /// End the VM with status 124 after this many seconds.
    #[arg(long, value_parser = config::parse_timeout)]
    timeout: Option<f64>,
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
    /// Guest arguments, appended to the command line.
    #[arg(last = true)]
    args: Vec<String>,
}

impl RunArgs {
    fn into_config(self) -> VmConfig {
        let mut words: Vec<String> = Vec::new();
        if !self.append.is_empty() {
            words.push(self.append);
        }
        words.extend(self.args);
        VmConfig {
            image: self.image,
            mem_bytes: self.mem,
            vcpus: self.smp,
            initrd: self.initrd,
            base_cmdline: self.cmdline,
            cmdline: words.join(" "),
            pit: !self.no_pit,
            serial: self.serial,
            timeout_secs: self.timeout,
            cpu: self.cpu.cpu,
            cpu_lenient: self.cpu.cpu_lenient,
            kvm_caps: self.kvm_cap,
            msr_filter: self.msr_filter.into_iter().flat_map(|r| r.0).collect(),
            msrs: self.msr,
        }
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

fn run(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Run(args) => {
            let cfg = (*args).into_config();
            let reason = vmm::run(&cfg)?;
            log::info!("VM ended: {reason:?}");
            Ok(reason.status())
        }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli.cmd) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("kvmrun: error: {e:#}");
            ExitCode::from(STATUS_ERROR as u8)
        }
    }
}
