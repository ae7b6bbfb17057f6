//! Bad input gets a clear error naming the file and the problem, exit
//! status 2, and never a panic.

mod common;

use std::path::Path;

use common::{kvmrun, Run};

fn run_args(args: &[&str]) -> Run {
    Run::from(kvmrun().args(args).output().expect("cannot start kvmrun"))
}

/// A minimal ELF32 multiboot image: one PT_LOAD at `paddr` with `bss`
/// extra bytes; the code is `out %al, $0xf4` after setting al = 0.
fn tiny_multiboot(paddr: u32, bss: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0xa0];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&3u16.to_le_bytes());
    f[24..28].copy_from_slice(&(paddr + 12).to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes());
    f[42..44].copy_from_slice(&32u16.to_le_bytes());
    f[44..46].copy_from_slice(&1u16.to_le_bytes());
    let ph = 52;
    let (off, len) = (0x80u32, 0x20u32);
    for (i, v) in [1, off, paddr, paddr, len, len + bss].iter().enumerate() {
        f[ph + 4 * i..ph + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    let h = off as usize;
    f[h..h + 4].copy_from_slice(&0x1bad_b002u32.to_le_bytes());
    f[h + 8..h + 12].copy_from_slice(&0u32.wrapping_sub(0x1bad_b002).to_le_bytes());
    // mov $0x07, %al; out %al, $0xf4; hlt
    f[h + 12..h + 17].copy_from_slice(&[0xb0, 0x07, 0xe6, 0xf4, 0xf4]);
    f
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
    let mut img = tiny_multiboot(0x40_0000, 0);
    let trunc = write(d.path(), "trunc.flat", &img[..0x90]);
    assert_clean_error(&run_args(&["run", &trunc]), "trunc.flat: truncated");
    img[0x80] = 0;
    let bad = write(d.path(), "magic.flat", &img);
    assert_clean_error(
        &run_args(&["run", &bad]),
        "magic.flat: an ELF file without a multiboot header",
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
    let img = write(d.path(), "big.flat", &tiny_multiboot(0x40_0000, 64 << 20));
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
    let img = write(d.path(), "ok.flat", &tiny_multiboot(0x40_0000, 0));
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
    let img = write(d.path(), "tiny.flat", &tiny_multiboot(0x40_0000, 0x1000));
    run_args(&["run", &img]).expect(15);
}
