//! Bad input gets a clear error naming the file and the problem, exit
//! status 2, and never a panic.

mod common;

use std::path::Path;

use common::{kvmrun, raw_image, Run};

fn run_args(args: &[&str]) -> Run {
    Run::from(kvmrun().args(args).output().expect("cannot start kvmrun"))
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.to_string_lossy().into_owned()
}

fn assert_clean_error(r: &Run, needle: &str) {
    r.expect(2).err_has(needle);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn missing_image() {
    let r = run_args(&["run", "/nonexistent/x.flat"]);
    assert_clean_error(&r, "/nonexistent/x.flat");
}

#[test]
fn empty_and_garbage_images() {
    let d = tempfile::tempdir().unwrap();
    let empty = write(d.path(), "empty.flat", b"");
    assert_clean_error(&run_args(&["run", &empty]), "empty.flat: an empty file");
    let junk = write(d.path(), "junk.flat", &[0x55u8; 9000]);
    assert_clean_error(
        &run_args(&["run", &junk]),
        "junk.flat: not a multiboot image",
    );
}

#[test]
fn wrong_magic_and_truncated() {
    let d = tempfile::tempdir().unwrap();
    // The header asks for more bytes than the file has.
    let mut img = raw_image(&[0xeb, 0xfe]);
    img[20..24].copy_from_slice(&0x10_1000u32.to_le_bytes());
    let trunc = write(d.path(), "trunc.flat", &img);
    assert_clean_error(&run_args(&["run", &trunc]), "trunc.flat: truncated");
    let mut img = raw_image(&[0xeb, 0xfe]);
    img[0] = 0;
    let bad = write(d.path(), "magic.flat", &img);
    assert_clean_error(
        &run_args(&["run", &bad]),
        "magic.flat: not a multiboot image",
    );
    let mut elf = vec![0u8; 64];
    elf[..4].copy_from_slice(b"\x7fELF");
    let elf = write(d.path(), "plain.elf", &elf);
    assert_clean_error(
        &run_args(&["run", &elf]),
        "plain.elf: ELF file is not little-endian",
    );
}

#[test]
fn bzimage_is_named() {
    let d = tempfile::tempdir().unwrap();
    let mut img = vec![0u8; 0x400];
    img[0x202..0x206].copy_from_slice(b"HdrS");
    let p = write(d.path(), "bz", &img);
    assert_clean_error(&run_args(&["run", &p]), "bzImage");
}

#[test]
fn segment_outside_ram() {
    if !common::kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // bss_end far beyond 32 MiB of RAM.
    let mut img = raw_image(&[0xeb, 0xfe]);
    img[24..28].copy_from_slice(&0x400_0000u32.to_le_bytes());
    let img = write(d.path(), "big.flat", &img);
    assert_clean_error(
        &run_args(&["run", &img, "--mem", "32M"]),
        "lies outside guest RAM",
    );
}

#[test]
fn initrd_problems() {
    if !common::kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = write(d.path(), "ok.flat", &raw_image(&[0xeb, 0xfe]));
    assert_clean_error(
        &run_args(&["run", &img, "--initrd", "/nonexistent/env"]),
        "/nonexistent/env",
    );
    let big = write(d.path(), "big.env", &vec![b'x'; 8 << 20]);
    assert_clean_error(
        &run_args(&["run", &img, "--mem", "8M", "--initrd", &big]),
        "big.env: initrd of",
    );
}

#[test]
fn bad_flags() {
    for (args, needle) in [
        (&["run", "x", "--mem", "lots"][..], "invalid memory size"),
        (&["run", "x", "--mem", "1M"][..], "need at least 2 MiB"),
        (&["run", "x", "--smp", "0"][..], "invalid vCPU count 0"),
        (&["run", "x", "--smp", "999"][..], "invalid vCPU count 999"),
        (
            &["run", "x", "--serial", "tty"][..],
            "invalid serial output",
        ),
        (&["run", "x", "--timeout", "0"][..], "invalid timeout"),
        (&["run", "x", "--timeout=-3"][..], "invalid timeout"),
        (&["run", "x", "--frobnicate"][..], "--frobnicate"),
        (&["launch"][..], "launch"),
    ] {
        let r = run_args(args);
        assert_clean_error(&r, needle);
    }
}

#[test]
fn tiny_image_exits_through_debug_exit() {
    if !common::kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // mov al, 7; out 0xf4, al; hlt
    let img = write(
        d.path(),
        "tiny.flat",
        &raw_image(&[0xb0, 0x07, 0xe6, 0xf4, 0xf4]),
    );
    run_args(&["run", &img]).expect(15);
}

#[test]
fn bad_device_flags() {
    let img = common::guest("hello");
    let img = img.to_str().unwrap();
    let r = run_args(&["run", img, "--rng=usb"]);
    r.expect(2)
        .err_has("unknown virtio transport 'usb': expected pci or mmio");
    let r = run_args(&["run", img, "--rng", "--rng", "--rng", "--rng", "--rng"]);
    assert_clean_error(&r, "5 virtio-rng devices, at most 4");
    // Without '=', a value is not taken: "mmio" is then the image.
    let r = run_args(&["run", "--rng", "mmio"]);
    assert_clean_error(&r, "mmio: cannot read");
    let r = run_args(&["run", img, "--edu", "--edu", "--edu", "--edu", "--edu"]);
    assert_clean_error(&r, "5 edu devices, at most 4");
    // --edu takes no value: "pci" is then an extra word.
    let r = run_args(&["run", img, "--edu=pci"]);
    assert_clean_error(&r, "--edu");
    // The Intel IOMMU needs the Q35 machine and takes QEMU's options.
    let r = run_args(&["run", img, "--iommu"]);
    assert_clean_error(&r, "--iommu (the Intel IOMMU) needs --machine q35");
    let r = run_args(&["run", img, "--machine", "q35", "--iommu=eim=on"]);
    assert_clean_error(&r, "eim=on (x2APIC interrupt remapping) is not supported");
    let r = run_args(&["run", img, "--machine", "q35", "--iommu", "--rng"]);
    assert_clean_error(&r, "--iommu cannot be combined with virtio-pci devices yet");
    let r = run_args(&[
        "run",
        img,
        "--machine",
        "q35",
        "--iommu",
        "--vport",
        "o=stdout",
    ]);
    assert_clean_error(&r, "--iommu cannot be combined with --vport yet");
    let r = run_args(&["run", img, "--machine", "q35", "--iommu=caching-mode=on"]);
    assert_clean_error(&r, "unknown option 'caching-mode=on'");
    for m in ["q35,kernel-irqchip=split", "i440fx", ""] {
        let r = run_args(&["run", img, "--machine", m]);
        assert_clean_error(&r, "expected pc or q35");
    }
    for chip in ["off", "on", ""] {
        let r = run_args(&["run", img, "--irqchip", chip]);
        assert_clean_error(&r, "expected kernel or split");
    }
}

#[test]
fn bad_rootfs_runs() {
    let img = common::guest("hello");
    let img = img.to_str().unwrap();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let r = run_args(&["run", img, "--rootfs", "/nonexistent/root", "--", "true"]);
    assert_clean_error(&r, "--rootfs /nonexistent/root: not a directory");
    let r = run_args(&["run", img, "--rootfs", dir]);
    assert_clean_error(&r, "--rootfs needs a command after `--`");
    // The root is the share tagged rootfs; another share may not take it.
    let other = format!("{dir},tag=rootfs");
    let args = ["--init", img, "--share", &other, "--", "true"];
    let r = run_args(&[&["run", img, "--rootfs", "/"][..], &args].concat());
    assert_clean_error(&r, "tag 'rootfs' is taken by another share");
    let r = run_args(&[
        "run",
        img,
        "--rootfs",
        dir,
        "--init",
        "/nonexistent/init",
        "--",
        "true",
    ]);
    assert_clean_error(&r, "/nonexistent/init");
    for extra in [
        &["--vport", "a=stdout"][..],
        &["--initrd", "x"][..],
        &["--migrate"][..],
    ] {
        let mut args = vec!["run", img, "--rootfs", dir];
        args.extend_from_slice(extra);
        args.extend(["--", "true"]);
        assert_clean_error(&run_args(&args), "cannot be used with");
    }
    let r = run_args(&["run", img, "--modules", dir]);
    assert_clean_error(&r, "--rootfs");
}

/// A boot-once test without its command, or with a command the kernel
/// command line cannot quote, is an error naming the suite and the test.
#[test]
fn bad_boot_once_suites() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str); 3] = [
        ("boot_once = true", "test 'a': boot_once needs a cmd"),
        (
            "boot_once = true\ncmd = 'say \"x\"'",
            "test 'a': cmd holds '\"'",
        ),
        (
            "cmd = \"x\"\ncmdline = 'kvmrun.cmd=y'",
            "test 'a': both cmd and kvmrun.cmd=",
        ),
    ];
    for (keys, want) in cases {
        let text = format!("[[test]]\nname = \"a\"\nkernel = \"k\"\n{keys}\n");
        let suite = write(dir.path(), "once.toml", text.as_bytes());
        let r = run_args(&["test", &suite]);
        assert_clean_error(&r, want);
        r.err_has(&suite);
    }
}
