//! The Linux boot protocols: our linuxboot guest as a bzImage and as a PVH
//! ELF checks what it was handed; malformed kernels get a clear error;
//! Debian's cloud kernel (`make linux` fetches it) boots as far as this
//! host's KVM lets it.

mod common;

use std::path::{Path, PathBuf};

use common::{kvm_available, kvm_module, run, Run};
use kvmrun::memory::{E820Type, Layout};

fn linuxboot(form: &str) -> PathBuf {
    common::guest_file(match form {
        "bzimage" => "linuxboot.bzImage",
        _ => "linuxboot-pvh.elf",
    })
}

/// An initrd the guest recognizes: "KVMRUNRD", then byte i is i % 251.
fn initrd(dir: &Path, size: usize) -> PathBuf {
    let mut b = b"KVMRUNRD".to_vec();
    b.extend((8..size).map(|i| (i % 251) as u8));
    let p = dir.join("rd.img");
    std::fs::write(&p, b).unwrap();
    p
}

fn check_guest(form: &str, smp: u32, mem: &str, rd: Option<usize>) {
    let d = tempfile::tempdir().unwrap();
    let mut cmdline = format!("kind={form} mem={mem} cpus={smp}");
    let rd_path = rd.map(|n| {
        cmdline += &format!(" initrd={n}");
        initrd(d.path(), n)
    });
    let smp_s = smp.to_string();
    let mut args = vec!["--smp", &smp_s, "-m", mem, "--cmdline", &cmdline];
    let rd_s = rd_path.map(|p| p.to_string_lossy().into_owned());
    if let Some(p) = &rd_s {
        args.extend(["--initrd", p.as_str()]);
    }
    run(&linuxboot(form), &args)
        .expect(1)
        .has(&format!("cmdline: {cmdline}\r\n"))
        .has(&format!("MADT enabled CPUs: {smp}"))
        .has("SUMMARY: ");
}

#[test]
fn bzimage_guest_checks_its_boot_params() {
    if !kvm_available() {
        return;
    }
    check_guest("bzimage", 1, "128M", None);
    check_guest("bzimage", 2, "256M", Some(65_536 + 123));
}

#[test]
fn pvh_guest_checks_its_start_info() {
    if !kvm_available() {
        return;
    }
    check_guest("pvh", 1, "64M", Some(4096));
    check_guest("pvh", 2, "128M", None);
}

#[test]
fn verbose_names_the_kernel_format() {
    if !kvm_available() {
        return;
    }
    run(&linuxboot("bzimage"), &["-v", "--cmdline", "kind=bzimage"])
        .expect(1)
        .err_has("linuxboot.bzImage: Linux bzImage (64-bit boot protocol) image");
    run(&linuxboot("pvh"), &["-v", "--cmdline", "kind=pvh"])
        .expect(1)
        .err_has("linuxboot-pvh.elf: ELF kernel with a PVH entry (32-bit PVH boot) image");
}

fn assert_clean_error(r: &Run, needles: &[&str]) {
    r.expect(2);
    for n in needles {
        r.err_has(n);
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn truncated_bzimage_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = std::fs::read(linuxboot("bzimage")).unwrap();
    let p = d.path().join("short.bzImage");
    std::fs::write(&p, &img[..img.len() / 2]).unwrap();
    let ps = p.to_string_lossy().into_owned();
    assert_clean_error(&run(&p, &[]), &[&format!("{ps}: truncated bzImage")]);
    std::fs::write(&p, &img[..0x240]).unwrap();
    assert_clean_error(&run(&p, &[]), &[&format!("{ps}: truncated bzImage")]);
}

#[test]
fn elf_kernel_without_loadable_segment_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut img = std::fs::read(linuxboot("pvh")).unwrap();
    let phoff = u64::from_le_bytes(img[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes(img[56..58].try_into().unwrap()) as usize;
    for i in 0..phnum {
        let t = phoff + 56 * i;
        if img[t..t + 4] == 1u32.to_le_bytes() {
            img[t..t + 4].copy_from_slice(&0u32.to_le_bytes());
        }
    }
    let p = d.path().join("noload.elf");
    std::fs::write(&p, img).unwrap();
    let ps = p.to_string_lossy().into_owned();
    assert_clean_error(
        &run(&p, &[]),
        &[&format!("{ps}: ELF file has no loadable segment")],
    );
}

#[test]
fn initrd_larger_than_memory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let rd = d.path().join("huge.cpio");
    std::fs::write(&rd, vec![0u8; 40 << 20]).unwrap();
    let rds = rd.to_string_lossy().into_owned();
    for form in ["bzimage", "pvh"] {
        assert_clean_error(
            &run(&linuxboot(form), &["-m", "32M", "--initrd", &rds]),
            &[
                &format!("{rds}: initrd of {} bytes does not fit", 40 << 20),
                "--mem",
            ],
        );
    }
}

#[test]
fn overlong_command_line_is_refused() {
    let long = "x".repeat(4096);
    assert_clean_error(
        &run(&linuxboot("bzimage"), &["--cmdline", &long]),
        &["--cmdline: 4096 bytes, more than the 2047 the kernel takes"],
    );
}

/// Debian's cloud kernel, its ELF vmlinux and our initramfs, built by
/// `make linux`.
fn debian(name: &str) -> PathBuf {
    common::built("linux", name)
}

/// The lines Linux prints for kvmrun's e820 map of `mem` bytes.
fn e820_lines(mem: u64, pvh: bool) -> Vec<String> {
    let mut map: Vec<(u64, u64, E820Type)> = Layout::new(mem)
        .e820()
        .iter()
        .map(|e| (e.addr, e.addr + e.size, e.kind))
        .collect();
    if pvh {
        // Linux's PVH entry reserves the ISA hole [0xa0000, 1 MiB) itself
        // and merges it with its reserved neighbours.
        map.retain(|e| e.2 == E820Type::Ram);
        map.insert(1, (0x9_fc00, 0x10_0000, E820Type::Reserved));
    }
    map.iter()
        .map(|(start, end, kind)| {
            format!(
                "BIOS-e820: [mem {start:#018x}-{:#018x}] {}",
                end - 1,
                if *kind == E820Type::Ram {
                    "usable"
                } else {
                    "reserved"
                }
            )
        })
        .collect()
}

/// Boot Debian's kernel with `--smp 2` and check its early log, then the
/// verdict this host's KVM allows.
fn boot_debian(kernel: &str, pvh: bool) {
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1 kvmrun.cmd=nproc";
    let rd = debian("initramfs.cpio.gz");
    let r = run(
        &debian(kernel),
        &[
            "--smp",
            "2",
            "-m",
            "256M",
            "--initrd",
            rd.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--timeout",
            "900",
        ],
    );
    r.has("Linux version ")
        .has(&format!("Command line: {cmdline}\r\n"))
        .has("ACPI: RSDP 0x00000000000E0000 000024 (v02 KVMRUN)")
        .has("ACPI: APIC 0x")
        .has("smpboot: Allowing 2 CPUs, 0 hotplug CPUs");
    for line in e820_lines(256 << 20, pvh) {
        r.has(&line);
    }
    match kvm_module() {
        Some("kvm_intel") | Some("kvm_amd") => {
            r.expect(1)
                .has("kvmrun: running: nproc\r\n")
                .has("\n2\r\n")
                .has("kvmrun: exit status 0");
        }
        Some("kvm_pvm") => {
            // KVM-PVM cannot run a Linux kernel to user space: a clear
            // diagnostic and status 4, never a hang.
            r.expect(4)
                .err_has("KVM internal error, suberror 1 (emulation failure)")
                .err_has(", 64-bit mode, CPL 0")
                .err_has("instruction: ")
                .err_has("host KVM: kvm_pvm: ");
        }
        other => {
            assert!(
                r.status == 1 || r.status == 4,
                "host KVM {other:?}: status {}\n{}",
                r.status,
                r.stderr
            );
        }
    }
}

#[test]
fn debian_kernel_bzimage_boots_with_two_vcpus() {
    if !kvm_available() {
        return;
    }
    boot_debian("vmlinuz", false);
}

#[test]
fn debian_kernel_pvh_boots_with_two_vcpus() {
    if !kvm_available() {
        return;
    }
    boot_debian("vmlinux", true);
}
