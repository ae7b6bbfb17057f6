//! The whole Linux path, up to /init running a command: only on hosts
//! whose KVM runs guest kernels on VT-x or AMD-V (kvm_intel, kvm_amd).
//! Elsewhere (KVM-PVM) the test prints one SKIP line naming the reason.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use common::{kvm_available, kvm_module, kvmrun, Run};

/// A file `make linux` builds.
fn built(name: &str) -> PathBuf {
    common::built("linux", name)
}

const CONSOLE: &str = "console=ttyS0 reboot=k panic=1";

/// Boot Debian's kernel with our initramfs; `stdin` goes to the console.
fn boot(kernel: &str, smp: u32, cmd: Option<&str>, stdin: &[u8]) -> Run {
    let mut cmdline = CONSOLE.to_string();
    if let Some(c) = cmd {
        cmdline += &format!(" kvmrun.cmd=\"{c}\"");
    }
    let mut child = kvmrun()
        .arg("run")
        .arg(built(kernel))
        .args(["--smp", &smp.to_string(), "-m", "256M", "--timeout", "300"])
        .arg("--initrd")
        .arg(built("initramfs.cpio.gz"))
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kvmrun");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    // Keep stdin open until the guest ends: EOF must not race the shell.
    let out = child.wait_with_output().unwrap();
    drop(input);
    Run::from(out)
}

#[test]
fn linux_runs_commands_on_hardware_hosts() {
    if !kvm_available() {
        return;
    }
    let module = kvm_module();
    if !matches!(module, Some("kvm_intel") | Some("kvm_amd")) {
        eprintln!(
            "SKIP: Linux to user space needs kvm_intel or kvm_amd; this host's KVM is {} \
             (see docs/LINUX.md)",
            module.unwrap_or("unknown")
        );
        return;
    }
    for kernel in ["vmlinuz", "vmlinux"] {
        for smp in [1u32, 2] {
            let r = boot(kernel, smp, Some("nproc; grep MemTotal /proc/meminfo"), b"");
            r.expect(1)
                .has(&format!("\n{smp}\r\n"))
                .has("kvmrun: exit status 0");
            let kib: u64 = r
                .stdout
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("MemTotal line");
            assert!(kib > 200 << 10 && kib <= 256 << 10, "MemTotal {kib} kB");
        }
    }
    // A failing command's status comes back as (status << 1) | 1.
    boot("vmlinuz", 1, Some("exit 3"), b"").expect(7);
    // poweroff goes through ACPI S5, reboot through the i8042 (reboot=k).
    boot("vmlinuz", 2, Some("poweroff -f"), b"").expect(0);
    boot("vmlinuz", 2, Some("reboot -f"), b"").expect(0);
    // Without a command /init starts a shell on the console.
    boot("vmlinuz", 1, None, b"echo hello-$((6 * 7))\npoweroff -f\n")
        .expect(0)
        .has("hello-42");
}
