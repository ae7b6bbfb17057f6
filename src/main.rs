//! kvmrun's command line: parse, call the library, map the outcome to an
//! exit status.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kvmrun::api::{self, Request};
use kvmrun::config::{self, SerialOutput, VmConfig};
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
    Run(RunArgs),
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
    /// Where COM1 output goes: stdio, none or file:PATH.
    #[arg(long, default_value = "stdio")]
    serial: SerialOutput,
    /// End the VM with status 124 after this many seconds.
    #[arg(long, value_parser = config::parse_timeout)]
    timeout: Option<f64>,
    /// Serve the control socket at this path (see docs/API.md).
    #[arg(long)]
    api: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The image: a multiboot ELF (kvm-unit-tests .flat files).
    image: PathBuf,
    /// Guest RAM: a number with K, M, G or T; a bare number is MiB, as QEMU's -m.
    #[arg(short, long, default_value = "128M", value_parser = config::parse_mem_size)]
    mem: u64,
    /// Number of vCPUs; vCPU 0 boots, the others wait for INIT/SIPI.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// File loaded as multiboot module 0 (kvm-unit-tests' environment file).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Command line after the image name; words after `--` are appended too.
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
    /// Serve the control socket at this path: pause, resume, snapshot,
    /// status, quit (see docs/API.md).
    #[arg(long)]
    api: Option<PathBuf>,
    /// Guest arguments, appended to the command line.
    #[arg(last = true)]
    args: Vec<String>,
}

impl RunArgs {
    fn into_config(self) -> (VmConfig, vmm::RunOptions) {
        let mut words: Vec<String> = Vec::new();
        if !self.append.is_empty() {
            words.push(self.append);
        }
        words.extend(self.args);
        let opts = vmm::RunOptions { api: self.api };
        let cfg = VmConfig {
            image: self.image,
            mem_bytes: self.mem,
            vcpus: self.smp,
            initrd: self.initrd,
            cmdline: words.join(" "),
            pit: !self.no_pit,
            serial: self.serial,
            timeout_secs: self.timeout,
        };
        (cfg, opts)
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
            let (cfg, opts) = args.into_config();
            let reason = vmm::run(&cfg, &opts)?;
            log::info!("VM ended: {reason:?}");
            Ok(reason.status())
        }
        Cmd::Restore(a) => {
            let opts = vmm::RunOptions { api: a.api };
            let reason = vmm::restore(&a.dir, a.serial, a.timeout, &opts)?;
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
    }
}

/// Send one request and print the VM's answer (a JSON line) on stdout.
fn client(socket: &std::path::Path, req: &Request) -> anyhow::Result<i32> {
    let answer = api::call(socket, req)?;
    println!("{answer}");
    Ok(0)
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
