//! Guests that do what a VMM least expects (resources/guests/hostile.c):
//! each must end with the status kvmrun documents for what it did, never
//! with a panic (status 101 or 134), a hang, or unbounded memory.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{hardware_kvm, kvm_available, kvmrun, run_guest, Run};

const PASS: i32 = 1;
const HALTED: i32 = 0;
const CRASH: i32 = 4;
const TIMEOUT: i32 = 124;

/// Backstop for a VM that should end on its own; never a verdict.
const SAFETY: Duration = Duration::from_secs(180);

fn hostile(args: &[&str]) -> Run {
    let r = run_guest("hostile", args);
    assert!(
        !r.stderr.contains("panicked") && ![101, 134].contains(&r.status),
        "{}",
        r.stderr
    );
    r
}

#[test]
fn every_port_read_and_written() {
    if !kvm_available() {
        return;
    }
    hostile(&["--", "case=ports"])
        .expect(PASS)
        .has("ports: 196608 reads, 131064 writes");
}

#[test]
fn mmio_across_the_gap_and_above_ram() {
    if !kvm_available() {
        return;
    }
    hostile(&["--", "case=mmio"]).expect(PASS).has("mmio: ");
}

#[test]
fn firmware_areas_overwritten() {
    if !kvm_available() {
        return;
    }
    hostile(&["--", "case=firmware"])
        .expect(PASS)
        .has("firmware: overwritten with 0xf4");
    // The FACS is gone too: the waking vector read from it sends the CPU
    // into a HLT sled, with interrupts off.
    hostile(&["--", "case=firmware", "s3"])
        .expect(HALTED)
        .has("entering S3");
}

#[test]
fn init_sipi_storms_to_absent_apic_ids() {
    if !kvm_available() {
        return;
    }
    for cpu in ["qemu64", "qemu64,+x2apic"] {
        hostile(&["--smp", "2", "--cpu", cpu, "--", "case=sipi"])
            .expect(PASS)
            .has("IPIs to absent xAPIC IDs")
            .has("PASS: aps-online-after-storm");
    }
}

#[test]
fn triple_faults_in_long_and_protected_mode() {
    if !kvm_available() {
        return;
    }
    hostile(&["--", "case=triple-long"])
        .expect(CRASH)
        .err_has("vCPU 0 crashed: triple fault");
    hostile(&["--smp", "2", "--", "case=triple-protected"])
        .expect(CRASH)
        .err_has("vCPU 1 crashed: triple fault");
}

/// A push with SP = 1 in real mode faults, and so does every exception
/// delivery after it: a shutdown on hardware. KVM-PVM's emulator loops on
/// the delivery instead, so there only the timeout ends the VM.
#[test]
fn triple_fault_in_real_mode() {
    if !kvm_available() {
        return;
    }
    let r = hostile(&["--smp", "2", "--timeout", "3", "--", "case=triple-real"]);
    if hardware_kvm() {
        r.expect(CRASH).err_has("vCPU 1 crashed: triple fault");
    } else {
        assert!([CRASH, TIMEOUT].contains(&r.status), "{}", r.stderr);
    }
}

#[test]
fn every_vcpu_halted_with_interrupts_off() {
    if !kvm_available() {
        return;
    }
    hostile(&["--smp", "4", "--", "case=halt"])
        .expect(HALTED)
        .has("halting 4 CPUs");
}

#[test]
fn a_guest_that_never_ends_meets_its_timeout() {
    if !kvm_available() {
        return;
    }
    hostile(&["--timeout", "1", "--", "case=spin"]).expect(TIMEOUT);
}

/// Check flood output: numbered lines, each the next number; a partial
/// last line is allowed (the VM was stopped mid-line). Returns the count.
pub fn check_flood(out: &str) -> u64 {
    let mut n = 0u64;
    let lines: Vec<&str> = out.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let last = i + 1 == lines.len();
        if last || line.starts_with("flood: ") {
            break;
        }
        let want = format!("f {n:016x} abcdefghijklmnopqrstuvwxyz");
        assert_eq!(*line, want, "line {i} of the flood");
        n += 1;
    }
    n
}

#[test]
fn a_serial_flood_arrives_whole() {
    if !kvm_available() {
        return;
    }
    let r = hostile(&["--", "case=flood", "lines=3000"]);
    r.expect(PASS).has("flood: 3000 lines");
    assert_eq!(check_flood(&r.stdout), 3000);
}

/// Start a flood whose stdout is a pipe of one page, which this test reads.
fn flood(args: &[&str]) -> Child {
    let child = kvmrun()
        .args(["run"])
        .arg(common::guest("hostile"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kvmrun");
    let fd = child.stdout.as_ref().unwrap().as_raw_fd();
    // SAFETY: F_SETPIPE_SZ only resizes the pipe this fd reads.
    assert!(unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, 4096) } > 0);
    child
}

/// Bytes waiting in the pipe `fd` reads.
fn pending(fd: i32) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    n
}

/// Wait until kvmrun can write no more into the pipe `fd` reads: its
/// writer thread waits in `poll` for room, which it does only after the
/// pipe refused a whole write. How many bytes the pipe then holds says
/// nothing: a one-page pipe takes a write into the room left on its page
/// only if that write's last partial page fits there, so it can refuse
/// the next batch with most of the page still free.
fn wait_full(child: &Child, fd: i32) {
    let started = Instant::now();
    while !matches!(
        thread_syscall(child.id(), "serial-out"),
        Some(libc::SYS_poll | libc::SYS_ppoll)
    ) {
        assert!(started.elapsed() < SAFETY, "the pipe never filled");
        std::thread::sleep(Duration::from_millis(5));
    }
    // An empty pipe takes part of any write, and nothing reads this one.
    assert!(pending(fd) > 0, "kvmrun waits for room in an empty pipe");
}

/// Wait until kvmrun's output queue is full behind the full pipe: vCPU 0
/// waits for room in `futex` instead of running the guest in `ioctl`
/// (KVM_RUN). The flood guest never halts, so nothing else parks it.
fn wait_queue_full(child: &Child) {
    let started = Instant::now();
    loop {
        if thread_syscall(child.id(), "vcpu0") == Some(libc::SYS_futex) {
            return;
        }
        assert!(started.elapsed() < SAFETY, "kvmrun's queue never filled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The system call the thread `name` of process `pid` waits in, if any.
fn thread_syscall(pid: u32, name: &str) -> Option<i64> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim_end() == name {
            let call = std::fs::read_to_string(dir.join("syscall")).ok()?;
            return call.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

fn wait(child: &mut Child) -> (i32, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code().unwrap_or(-1);
        }
        assert!(started.elapsed() < SAFETY, "kvmrun did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// A reader slower than the guest: the output backs up into kvmrun's
/// queue, the guest waits for room, and every byte arrives in order.
#[test]
fn a_slow_reader_gets_every_byte() {
    if !kvm_available() {
        return;
    }
    let mut child = flood(&["--", "case=flood", "lines=4000"]);
    let mut out = child.stdout.take().unwrap();
    wait_full(&child, out.as_raw_fd());
    wait_queue_full(&child);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        String::from_utf8(all).unwrap()
    });
    let (status, err) = wait(&mut child);
    let text = reader.join().unwrap();
    assert_eq!(status, PASS, "{err}");
    assert!(!err.contains("dropped"), "{err}");
    assert_eq!(check_flood(&text), 4000);
    assert!(
        text.ends_with("flood: 4000 lines\r\n"),
        "{}",
        &text[text.len() - 100..]
    );
}

/// A reader that stops reading: the VM still ends when asked, kvmrun
/// waits one second for the reader, then counts and reports what it
/// could not write. (Before the output queue, a vCPU blocked in a write
/// to the full pipe kept kvmrun alive past its timeout.)
#[test]
fn a_stalled_reader_cannot_hold_kvmrun() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let mut child = flood(&["--api", s, "--", "case=flood"]);
    let out = child.stdout.take().unwrap();
    wait_full(&child, out.as_raw_fd());
    // The writer holds what the pipe refused, and the vCPU fills the
    // queue behind it: all of that must be dropped at the end.
    wait_queue_full(&child);
    Run::from(kvmrun().args(["quit", s]).output().unwrap()).expect(0);
    let (status, err) = wait(&mut child);
    assert_eq!(status, 0, "{err}");
    assert!(
        err.contains("bytes of guest output dropped: stdout took none for 1 s"),
        "{err}"
    );
    drop(out);
}

#[test]
fn pci_configuration_space_swept_and_bars_moved() {
    if !kvm_available() {
        return;
    }
    // virtio-rng on both transports, so the sweep meets a PCI device
    // with MSI-X and a machine with virtio-mmio beside it.
    hostile(&["--rng", "--rng=mmio", "--", "case=pci"])
        .expect(PASS)
        .has("pci: ECAM at 0xe0000000, virtio-rng at 8")
        .has("pci: 131072 configuration writes; 00:00.0 reads 0x81b36");
    // Without PCI the ports float and there is no ECAM.
    hostile(&["--", "case=pci"])
        .expect(PASS)
        .has("pci: ECAM at 0x0, virtio-rng at -1")
        .has("pci: 98304 configuration writes; 00:00.0 reads 0xffffffff");
}

#[test]
fn virtio_chains_a_driver_must_not_offer() {
    if !kvm_available() {
        return;
    }
    for t in ["pci", "mmio"] {
        let r = hostile(&[
            &format!("--rng={t}"),
            "--",
            "case=virtio",
            &format!("transport={t}"),
        ]);
        r.expect(PASS)
            .has("virtio: longer-than-queue answered, 0 bytes")
            .has("PASS: good-request-after-bad-ones")
            .has("virtio: head beyond the queue and index 1000 ahead offered")
            .err_has("kvmrun: warning: virtio queue: ");
        // The guest's malformed rings are warnings, not kvmrun's errors,
        // and each says so once ("warning: warning:" no more).
        assert!(!r.stderr.contains("kvmrun: error"), "{}", r.stderr);
        assert!(!r.stderr.contains("warning: warning"), "{}", r.stderr);
        // A malformed request is logged once, however many come.
        assert_eq!(
            r.stderr.matches("malformed request").count(),
            1,
            "{}",
            r.stderr
        );
    }
}
