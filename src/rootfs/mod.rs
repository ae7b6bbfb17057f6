//! `kvmrun run KERNEL --rootfs DIR -- CMD ARGS...`: boot a kernel with
//! DIR as its read-only root under a tmpfs overlay, run CMD there through
//! kvmrun-init (resources/rootfs/init.c) and exit with CMD's status.
//!
//! The root is a read-only virtio-fs share of DIR tagged `rootfs`
//! (`share_root()`), so DIR may be as big as the host's own root: the
//! guest reads files as it needs them instead of holding a copy in RAM.
//! kvmrun writes a small initramfs (`initramfs.rs`): the init, the
//! command, where the root is, and the modules the kernel needs from its
//! own module tree (`modules.rs`). CMD's stdin, stdout and stderr are
//! virtio-console ports on kvmrun's own; a fourth port carries CMD's
//! ending ("exit N" or "signal S"). The kernel log (COM1) goes to a
//! file, or to stderr with -v. A panic resets the guest at once
//! (`panic=-1`), which ends the run with `STATUS_PANIC` and the panic's
//! text on stderr.

pub mod initramfs;
pub mod modules;

use std::path::{Path, PathBuf};

use crate::config::{
    ConsoleConfig, DeviceConfig, PortConfig, PortHost, SerialOutput, ShareConfig, VmConfig,
};
use crate::platform::virtio::Transport;
use crate::shutdown::{ExitReason, STATUS_ERROR};
use crate::vmm::{self, RunOptions, VmmError};

/// kvmrun's status when the guest kernel panicked (or reset) before
/// the command ended. A command's own status may be any of 0-255; this
/// one also comes with the panic's text on stderr.
pub const STATUS_PANIC: i32 = 125;
/// What Linux prints when it panics (kernel/panic.c).
pub const PANIC_MARK: &str = "Kernel panic - not syncing";
/// The base command line: the log on COM1, a panic resets at once,
/// and a reset goes through the i8042 (which kvmrun has).
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// The virtio-fs tag of the root share, as kvmrun-init mounts it.
pub const SHARE_TAG: &str = "rootfs";
/// The console ports kvmrun-init looks for.
pub const PORT_STDIN: &str = "kvmrun.stdin";
pub const PORT_STDOUT: &str = "kvmrun.stdout";
pub const PORT_STDERR: &str = "kvmrun.stderr";
pub const PORT_STATUS: &str = "kvmrun.status";

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("--rootfs {0}: not a directory")]
    NotADir(PathBuf),
    #[error("{0}: too big for the initramfs (a cpio entry holds at most 4 GiB)")]
    TooBig(String),
    #[error("--rootfs needs a command after `--`")]
    NoCommand,
    #[error("no kvmrun-init (make init builds it); looked at: {0}")]
    NoInit(String),
    #[error(transparent)]
    Vmm(#[from] Box<VmmError>),
}

/// Where the kernel log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelLog {
    /// A file kept after the run (`--serial file:PATH`).
    File(PathBuf),
    /// kvmrun's stderr (-v).
    Stderr,
    /// A file dropped at the end (its panic text is shown).
    Temporary,
}

pub struct RootfsOptions {
    pub root: PathBuf,
    pub command: Vec<String>,
    /// The kernel's module tree (`--modules`); /lib/modules/RELEASE else.
    pub modules: Option<PathBuf>,
    /// kvmrun-init (`--init`); found by `find_init()` else.
    pub init: Option<PathBuf>,
    pub log: KernelLog,
}

/// How the command ended, as kvmrun-init reports it.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    Exit(u8),
    Signal(u8),
    /// kvmrun-init itself failed.
    Init(String),
}

impl Ending {
    pub fn parse(report: &str) -> Option<Ending> {
        let line = report.lines().next()?;
        let (kind, rest) = line.split_once(' ')?;
        match kind {
            "exit" => rest.parse().ok().map(Ending::Exit),
            "signal" => rest.parse().ok().map(Ending::Signal),
            "init" => Some(Ending::Init(rest.to_string())),
            _ => None,
        }
    }

    /// kvmrun's status: the command's own, or 128 + the signal as a
    /// shell gives it.
    pub fn status(&self) -> i32 {
        match self {
            Ending::Exit(n) => i32::from(*n),
            Ending::Signal(s) => 128 + i32::from(*s),
            Ending::Init(_) => STATUS_ERROR,
        }
    }
}

/// Run `r.command` in a VM made from `cfg` with `r.root` as its root;
/// kvmrun's status.
pub fn run(mut cfg: VmConfig, opts: &RunOptions, r: &RootfsOptions) -> Result<i32, RootfsError> {
    let work = tempfile::Builder::new()
        .prefix("kvmrun-rootfs")
        .tempdir()
        .map_err(|e| RootfsError::Io {
            what: "a temporary directory".into(),
            source: e,
        })?;
    let prepared = prepare(&mut cfg, r, work.path())?;
    let reason = vmm::run(&cfg, opts).map_err(Box::new)?;
    log::info!("VM ended: {reason:?}");
    let report = std::fs::read_to_string(&prepared.status).unwrap_or_default();
    Ok(verdict(&reason, &report, prepared.log.as_deref()))
}

/// What `prepare()` set up.
#[derive(Debug)]
pub struct Prepared {
    /// The file the status port writes into.
    pub status: PathBuf,
    /// The kernel log's file, if there is one.
    pub log: Option<PathBuf>,
}

/// Turn `cfg` into the VM of a run with a host root: the initramfs,
/// the command line, the console ports and the kernel log, with files
/// in `work`.
pub fn prepare(
    cfg: &mut VmConfig,
    r: &RootfsOptions,
    work: &Path,
) -> Result<Prepared, RootfsError> {
    if r.command.is_empty() {
        return Err(RootfsError::NoCommand);
    }
    if !r.root.is_dir() {
        return Err(RootfsError::NotADir(r.root.clone()));
    }
    let tag = share_root(cfg, &r.root);
    let init = match &r.init {
        Some(p) => p.clone(),
        None => find_init()?,
    };
    let image = std::fs::read(&cfg.image).map_err(|e| RootfsError::Io {
        what: cfg.image.display().to_string(),
        source: e,
    })?;
    let initrd = work.join("initramfs.cpio");
    let mut a = initramfs::Archive::create(&initrd)?;
    a.dirs("/kvmrun")?;
    a.host_file("/init", &init)?;
    let argv: Vec<u8> = r
        .command
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    a.file("/kvmrun/argv", 0o644, &argv)?;
    a.file(
        "/kvmrun/root",
        0o644,
        format!("virtiofs {tag}\n").as_bytes(),
    )?;
    pack_modules(&mut a, &image, r.modules.as_deref())?;
    a.finish(&initrd)?;
    cfg.initrd = Some(initrd);
    if cfg.base_cmdline.is_none() {
        cfg.base_cmdline = Some(CMDLINE.to_string());
    }
    let status = work.join("status");
    cfg.devices.push(DeviceConfig::Console(ConsoleConfig {
        ports: ports(&status),
        transport: Transport::Pci,
    }));
    let log = match &r.log {
        KernelLog::File(p) => Some(p.clone()),
        KernelLog::Stderr => None,
        KernelLog::Temporary => Some(work.join("kernel.log")),
    };
    cfg.serial = match &log {
        Some(p) => SerialOutput::File(p.clone()),
        None => SerialOutput::Stderr,
    };
    Ok(Prepared { status, log })
}

fn ports(status: &Path) -> Vec<PortConfig> {
    let port = |name: &str, host| PortConfig {
        name: name.into(),
        host,
    };
    vec![
        port(PORT_STDIN, PortHost::Stdin),
        port(PORT_STDOUT, PortHost::Stdout),
        port(PORT_STDERR, PortHost::Stderr),
        port(PORT_STATUS, PortHost::File(status.to_path_buf())),
    ]
}

/// Share `dir` as the guest's root, as `--share DIR,tag=rootfs,ro`
/// would; the tag kvmrun-init mounts. Read-only so that the guest's
/// writes, which the init's overlay keeps in a tmpfs, never reach the
/// host's files. A `--share` already tagged `rootfs` is refused when
/// the configuration is checked.
fn share_root(cfg: &mut VmConfig, dir: &Path) -> &'static str {
    let path = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    cfg.devices.push(DeviceConfig::Share(ShareConfig {
        path,
        tag: SHARE_TAG.into(),
        read_only: true,
        transport: Transport::Pci,
    }));
    SHARE_TAG
}

/// The modules the guest needs from the kernel's tree, with a list
/// kvmrun-init loads in order. A kernel whose tree is not found is
/// taken to have its drivers built in.
fn pack_modules(
    a: &mut initramfs::Archive,
    image: &[u8],
    dir: Option<&Path>,
) -> Result<(), RootfsError> {
    let Some(release) = modules::kernel_release(image) else {
        log::warn!("the kernel's release is not in its image: no modules packed");
        return Ok(());
    };
    let Some(tree) = modules::tree(dir, &release) else {
        let at = dir.map_or(format!("/lib/modules/{release}"), |d| {
            d.display().to_string()
        });
        log::info!("no module tree for {release} at {at}: taking the drivers as built in");
        return Ok(());
    };
    let order = modules::Deps::read(&tree)?.load_order(modules::WANTED);
    let mut list = String::new();
    for file in &order {
        let name = format!("/lib/modules/{release}/{file}");
        if let Some(parent) = Path::new(&name).parent() {
            a.dirs(&parent.to_string_lossy())?;
        }
        a.host_file(&name, &tree.join(file))?;
        list.push_str(&name);
        list.push('\n');
    }
    log::info!("modules from {}: {}", tree.display(), order.len());
    a.file("/kvmrun/modules", 0o644, list.as_bytes())
}

/// kvmrun-init: `$KVMRUN_INIT`, next to kvmrun's executable, or in the
/// build tree kvmrun was built in (make init).
pub fn find_init() -> Result<PathBuf, RootfsError> {
    let mut tried = Vec::new();
    if let Some(p) = std::env::var_os("KVMRUN_INIT") {
        tried.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        tried.push(dir.join("kvmrun-init"));
    }
    tried.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("build/rootfs/kvmrun-init"));
    tried.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        let names: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
        RootfsError::NoInit(names.join(", "))
    })
}

/// The last report kvmrun-init wrote to the serial console, if any.
fn logged_report(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').split_once("kvmrun-init: report: "))
        .map(|(_, r)| r)
}

/// kvmrun's status for a VM that ended for `reason` with `report` on
/// the status port; says on stderr what went wrong.
pub fn verdict(reason: &ExitReason, report: &str, log: Option<&Path>) -> i32 {
    let log_text = log.and_then(|p| std::fs::read_to_string(p).ok());
    let from_log = || {
        let line = log_text.as_deref().and_then(logged_report)?;
        log::warn!("the status port lost the guest's report; the kernel log has '{line}'");
        Ending::parse(line)
    };
    if let Some(e) = Ending::parse(report).or_else(from_log) {
        if let Ending::Init(msg) = &e {
            eprintln!("kvmrun: error: the guest's init: {msg}");
        }
        return e.status();
    }
    match reason {
        ExitReason::Reset => {
            match log_text.as_deref().and_then(panic_text) {
                Some(t) => eprintln!("kvmrun: the guest kernel panicked:\n{t}"),
                None => eprintln!(
                    "kvmrun: the guest kernel reset before the command ended (a panic: see the kernel log)"
                ),
            }
            STATUS_PANIC
        }
        ExitReason::PowerOff | ExitReason::Halted | ExitReason::Quit => {
            let kept = match &log {
                Some(p) if p.exists() => format!(" (kernel log: {})", p.display()),
                _ => String::new(),
            };
            eprintln!("kvmrun: error: the guest ended without the command's status{kept}");
            if let Some(tail) = log_text.as_deref().map(last_lines) {
                eprintln!("{tail}");
            }
            STATUS_ERROR
        }
        other => other.status(),
    }
}

/// The panic's lines, from PANIC_MARK to its end marker (at most 60).
pub fn panic_text(log: &str) -> Option<String> {
    let start = log.find(PANIC_MARK)?;
    let from = log[..start].rfind('\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for line in log[from..].lines().take(60) {
        let line = line.trim_end_matches('\r');
        out.push(line);
        if line.contains("---[ end Kernel panic") {
            break;
        }
    }
    Some(out.join("\n"))
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_map_to_statuses() {
        assert_eq!(Ending::parse("exit 0\n"), Some(Ending::Exit(0)));
        assert_eq!(Ending::parse("exit 77\n").unwrap().status(), 77);
        assert_eq!(Ending::parse("exit 255").unwrap().status(), 255);
        assert_eq!(Ending::parse("signal 11\n").unwrap().status(), 139);
        assert_eq!(
            Ending::parse("init no command\n"),
            Some(Ending::Init("no command".into()))
        );
        for bad in ["", "exit", "exit 256", "exit -1", "signal x", "quit 0"] {
            assert_eq!(Ending::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_report_lost_on_the_port_is_taken_from_the_kernel_log() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        std::fs::write(
            &log,
            "[ 1.0] boot\r\nkvmrun-init: report: exit 3\r\n[ 2.0] reboot: Power down\n",
        )
        .unwrap();
        assert_eq!(verdict(&ExitReason::PowerOff, "", Some(&log)), 3);
        // The port's line wins when both are there.
        assert_eq!(verdict(&ExitReason::PowerOff, "exit 4\n", Some(&log)), 4);
        std::fs::write(&log, "[ 1.0] boot\n").unwrap();
        assert_eq!(verdict(&ExitReason::PowerOff, "", Some(&log)), STATUS_ERROR);
    }

    #[test]
    fn a_reset_without_a_status_is_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        std::fs::write(
            &log,
            "boot\r\nsysrq: Trigger a crash\r\nKernel panic - not syncing: sysrq triggered crash\r\nCPU: 0\r\n---[ end Kernel panic - not syncing: sysrq triggered crash ]---\r\nafter\r\n",
        )
        .unwrap();
        assert_eq!(verdict(&ExitReason::Reset, "", Some(&log)), STATUS_PANIC);
        let t = panic_text(&std::fs::read_to_string(&log).unwrap()).unwrap();
        assert!(t.starts_with("Kernel panic - not syncing: sysrq"), "{t}");
        assert!(t.ends_with("crash ]---"), "{t}");
        assert_eq!(verdict(&ExitReason::Reset, "exit 3\n", Some(&log)), 3);
        assert_eq!(verdict(&ExitReason::PowerOff, "", None), STATUS_ERROR);
        assert_eq!(verdict(&ExitReason::Timeout, "", None), 124);
    }

    /// A fake bzImage of `release`, a module tree with modules.dep, a
    /// root and an init in `d`.
    fn fixture(d: &Path, release: &str) -> (VmConfig, RootfsOptions) {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        img[0x500..0x500 + release.len()].copy_from_slice(release.as_bytes());
        std::fs::write(d.join("bzImage"), &img).unwrap();
        let tree = d.join("modules").join(release);
        std::fs::create_dir_all(tree.join("kernel")).unwrap();
        std::fs::write(
            tree.join("modules.dep"),
            "kernel/virtio_console.ko: kernel/virtio.ko\nkernel/virtio.ko:\nkernel/other.ko:\n\
             kernel/virtiofs.ko: kernel/fuse.ko kernel/virtio.ko\nkernel/fuse.ko:\n",
        )
        .unwrap();
        for m in ["virtio_console", "virtio", "other", "virtiofs", "fuse"] {
            std::fs::write(tree.join(format!("kernel/{m}.ko")), m).unwrap();
        }
        std::fs::create_dir_all(d.join("root/bin")).unwrap();
        std::fs::write(d.join("init"), b"\x7fELF").unwrap();
        let cfg = VmConfig::new(d.join("bzImage"));
        let r = RootfsOptions {
            root: d.join("root"),
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
            modules: Some(d.join("modules")),
            init: Some(d.join("init")),
            log: KernelLog::Temporary,
        };
        (cfg, r)
    }

    /// The archive's entries: name -> data.
    fn entries(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        use std::io::Read;
        let mut r = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        let mut out = std::collections::BTreeMap::new();
        loop {
            let mut e = cpio::NewcReader::new(r).unwrap();
            if e.entry().is_trailer() {
                return out;
            }
            let name = e.entry().name().to_string();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.insert(name, data);
            r = e.finish().unwrap();
        }
    }

    #[test]
    fn the_vm_gets_the_initramfs_ports_and_log() {
        let d = tempfile::tempdir().unwrap();
        let (mut cfg, r) = fixture(d.path(), "6.1.0-test");
        let work = d.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let p = prepare(&mut cfg, &r, &work).unwrap();
        assert_eq!(cfg.base_cmdline.as_deref(), Some(CMDLINE));
        assert_eq!(cfg.serial, SerialOutput::File(work.join("kernel.log")));
        assert_eq!(p.status, work.join("status"));
        let names: Vec<&str> = cfg
            .console()
            .unwrap()
            .ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, [PORT_STDIN, PORT_STDOUT, PORT_STDERR, PORT_STATUS]);
        let e = entries(cfg.initrd.as_ref().unwrap());
        assert_eq!(e["init"], b"\x7fELF");
        assert_eq!(e["kvmrun/argv"], b"sh\0-c\0exit 3\0");
        assert_eq!(e["kvmrun/root"], b"virtiofs rootfs\n");
        assert!(
            !e.keys().any(|k| k.contains("bin")),
            "the root is not packed: {:?}",
            e.keys()
        );
        let share = ShareConfig {
            path: r.root.clone(),
            tag: SHARE_TAG.into(),
            read_only: true,
            transport: Transport::Pci,
        };
        assert!(cfg.devices.contains(&DeviceConfig::Share(share)));
        cfg.validate().unwrap();
        let m = "/lib/modules/6.1.0-test/kernel";
        assert_eq!(
            String::from_utf8_lossy(&e["kvmrun/modules"]),
            format!("{m}/virtio.ko\n{m}/virtio_console.ko\n{m}/fuse.ko\n{m}/virtiofs.ko\n")
        );
        assert!(!e.contains_key("lib/modules/6.1.0-test/kernel/other.ko"));
    }

    #[test]
    fn bad_roots_and_commands_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (mut cfg, mut r) = fixture(d.path(), "6.1.0-test");
        r.root = d.path().join("init");
        let e = prepare(&mut cfg, &r, d.path()).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        r.command.clear();
        let e = prepare(&mut cfg, &r, d.path()).unwrap_err().to_string();
        assert!(e.contains("needs a command"), "{e}");
    }

    #[test]
    fn the_hosts_root_is_shared_whole() {
        let d = tempfile::tempdir().unwrap();
        let (mut cfg, mut r) = fixture(d.path(), "6.1.0-test");
        r.root = "/".into();
        prepare(&mut cfg, &r, d.path()).unwrap();
        let share = cfg.devices.iter().find_map(|d| match d {
            DeviceConfig::Share(s) => Some(s),
            _ => None,
        });
        let share = share.unwrap();
        assert_eq!(share.path, Path::new("/"));
        assert!(share.read_only);
        let size = std::fs::metadata(cfg.initrd.as_ref().unwrap())
            .unwrap()
            .len();
        assert!(size < 1 << 20, "the initramfs holds no root: {size} bytes");
    }

    #[test]
    fn a_kernel_without_a_module_tree_gets_no_modules() {
        let d = tempfile::tempdir().unwrap();
        let (mut cfg, mut r) = fixture(d.path(), "6.1.0-test");
        r.modules = Some(d.path().join("nowhere"));
        prepare(&mut cfg, &r, d.path()).unwrap();
        let e = entries(cfg.initrd.as_ref().unwrap());
        assert!(!e.contains_key("kvmrun/modules"));
    }
}
