//! Shared helpers for integration tests: they boot real guests on
//! /dev/kvm with the kvmrun binary and look at its output and exit status.

#![allow(dead_code)]

pub mod amdv;
pub mod console;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Whether this machine can run VMs. Without /dev/kvm a test fails with a
/// clear message, unless `KVMRUN_ALLOW_NO_KVM=1` asks to skip instead.
pub fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        if std::env::var("KVMRUN_ALLOW_NO_KVM").as_deref() == Ok("1") {
            eprintln!("SKIP: /dev/kvm is not usable here and KVMRUN_ALLOW_NO_KVM=1");
            return false;
        }
        panic!("/dev/kvm is missing or not accessible: these tests boot real VMs (set KVMRUN_ALLOW_NO_KVM=1 to skip them)");
    }
    true
}

/// Path of one of our guests, built by `make guests`.
pub fn guest(name: &str) -> PathBuf {
    guest_file(&format!("{name}.elf"))
}

/// Path of a file `make guests` builds, by its file name.
pub fn guest_file(file: &str) -> PathBuf {
    built("guests", file)
}

/// Path of `build/DIR/FILE`, which `make DIR` builds.
pub fn built(dir: &str, file: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("build")
        .join(dir)
        .join(file);
    assert!(
        p.exists(),
        "{} is missing: run `make {dir}` (or `make test`) first",
        p.display()
    );
    p
}

pub fn kvmrun() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvmrun"));
    c.stdin(Stdio::null());
    c
}

/// The result of one run.
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    pub fn expect(&self, status: i32) -> &Self {
        assert_eq!(
            self.status, status,
            "exit status {} (expected {status})\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        );
        self
    }

    pub fn has(&self, text: &str) -> &Self {
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn err_has(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// `kvmrun run IMAGE ARGS...` with a generous safety timeout so a broken
/// guest fails the test instead of hanging it (not a timing assertion).
pub fn run(image: &Path, args: &[&str]) -> Run {
    let mut c = kvmrun();
    c.arg("run").arg(image);
    if !args.contains(&"--timeout") {
        c.args(["--timeout", "120"]);
    }
    let o = c.args(args).output().expect("cannot start kvmrun");
    Run::from(o)
}

/// Run a guest by name.
pub fn run_guest(name: &str, args: &[&str]) -> Run {
    run(&guest(name), args)
}

/// A raw multiboot image using the header's address fields: loaded at
/// 1 MiB, entered right after the header in 32-bit protected mode.
pub fn raw_image(code: &[u8]) -> Vec<u8> {
    const LOAD: u32 = 0x10_0000;
    const FLAGS: u32 = 1 << 16;
    let mut img = Vec::new();
    let entry = LOAD + 32;
    for v in [
        0x1bad_b002u32,
        FLAGS,
        0u32.wrapping_sub(0x1bad_b002 + FLAGS),
        LOAD,
        LOAD,
        0,
        0,
        entry,
    ] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    img.extend_from_slice(code);
    img
}

pub fn boot(code: &[u8], args: &[&str]) -> Run {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    std::fs::write(&p, raw_image(code)).unwrap();
    run(&p, args)
}

/// The host's KVM module (kvm_intel, kvm_amd or kvm_pvm), for tests whose
/// outcome depends on what the host's KVM can run.
pub fn kvm_module() -> Option<&'static str> {
    kvmrun::diag::kvm_module()
}

/// Whether the host runs guest kernels on hardware virtualization.
pub fn hardware_kvm() -> bool {
    matches!(kvm_module(), Some("kvm_intel") | Some("kvm_amd"))
}
