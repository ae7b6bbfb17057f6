//! Our own test guests (resources/guests) under kvmrun: each checks one
//! part of the platform from inside and exits through isa-debug-exit with
//! 0 (status 1) when every check passed.

mod common;

use common::{kvm_available, run_guest};

const PASS: i32 = 1;

#[test]
fn hello_prints_and_sees_its_command_line() {
    if !kvm_available() {
        return;
    }
    run_guest("hello", &["--", "a1", "a2"])
        .expect(PASS)
        .has("Hello from kvmrun guest")
        .has("hello.elf a1 a2");
    // kvm-unit-tests deselects tests with arguments that start with '-'.
    run_guest("hello", &["--append", "-x_test -y", "--", "z"])
        .expect(PASS)
        .has("hello.elf -x_test -y z");
}

#[test]
fn exit_codes_follow_qemu() {
    if !kvm_available() {
        return;
    }
    for (code, status) in [(0, 1), (1, 3), (38, 77), (63, 127), (127, 255)] {
        let arg = format!("code={code}");
        run_guest("exitcode", &["--", &arg]).expect(status);
    }
}

#[test]
fn smp_brings_up_1_2_and_4_cpus() {
    if !kvm_available() {
        return;
    }
    for n in ["1", "2", "4"] {
        let arg = format!("cpus={n}");
        run_guest("smp", &["--smp", n, "--", &arg])
            .expect(PASS)
            .has(&format!("CPUs online: {n}"));
    }
}

#[test]
fn fw_cfg_and_memory_map_agree() {
    if !kvm_available() {
        return;
    }
    for (mem, bytes, cpus) in [
        ("128M", 128u64 << 20, "1"),
        ("512M", 512 << 20, "2"),
        ("3G", 3 << 30, "4"),
    ] {
        let a1 = format!("cpus={cpus}");
        let a2 = format!("mem={bytes}");
        run_guest("fwcfg", &["--mem", mem, "--smp", cpus, "--", &a1, &a2]).expect(PASS);
    }
}

#[test]
fn acpi_tables_describe_the_cpus() {
    if !kvm_available() {
        return;
    }
    for n in ["1", "2", "4"] {
        let arg = format!("cpus={n}");
        run_guest("acpi", &["--smp", n, "--", &arg])
            .expect(PASS)
            .has("FACP")
            .has("APIC");
    }
}

#[test]
fn testdev_scratch_iomem_and_irq_lines() {
    if !kvm_available() {
        return;
    }
    run_guest("testdev", &[]).expect(PASS);
}

/// With the split irqchip, kvmrun's IOAPIC takes the interrupt lines
/// (pc-testdev's, edu's INTx, virtio-mmio's) and KVM's local APICs the
/// rest: the SMP and interrupt guests pass as with KVM's irqchip.
#[test]
fn the_split_irqchip_runs_the_smp_and_interrupt_guests() {
    if !kvm_available() {
        return;
    }
    let split = ["--irqchip", "split"];
    for (name, args) in [
        ("testdev", &[][..]),
        ("smp", &["--smp", "4", "--", "cpus=4"][..]),
        ("edu", &["--edu", "--smp", "2"][..]),
        ("rng", &["--rng=mmio", "--", "transport=mmio"][..]),
        ("checksum", &["--smp", "2"][..]),
    ] {
        run_guest(name, &[&split[..], args].concat())
            .expect(PASS)
            .has("0 unexpected failures");
    }
}

#[test]
fn cpuid_apic_ids_match_on_every_cpu() {
    if !kvm_available() {
        return;
    }
    for n in ["1", "2", "4"] {
        run_guest("cpuid", &["--smp", n]).expect(PASS);
    }
}

#[test]
fn demo_runs() {
    if !kvm_available() {
        return;
    }
    run_guest("demo", &["--smp", "2"])
        .expect(PASS)
        .has("kvmrun demo guest");
}

#[test]
fn serial_output_can_go_to_a_file_or_nowhere() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("serial.log");
    let spec = format!("file:{}", f.display());
    let r = run_guest("hello", &["--serial", &spec]);
    r.expect(PASS);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let log = std::fs::read_to_string(&f).unwrap();
    assert!(log.contains("Hello from kvmrun guest"), "{log}");
    let r = run_guest("hello", &["--serial", "none"]);
    r.expect(PASS);
    assert!(r.stdout.is_empty());
    // The environment file arrives as module 0.
    let env = d.path().join("env");
    std::fs::write(&env, "NR_CPUS=1\n").unwrap();
    run_guest("hello", &["--initrd", env.to_str().unwrap()]).expect(PASS);
}

#[test]
fn rtc_ticks_and_s3_resumes_through_the_waking_vector() {
    if !kvm_available() {
        return;
    }
    for mem in ["128M", "512M"] {
        run_guest("s3rtc", &["-v", "--mem", mem])
            .expect(PASS)
            .has("entering S3")
            .err_has("guest woke from S3");
    }
}

#[test]
fn pci_enumerates_sizes_moves_a_bar_and_takes_msix() {
    if !kvm_available() {
        return;
    }
    for smp in ["1", "2"] {
        run_guest("pci", &["--rng", "--smp", smp])
            .expect(PASS)
            .has("00:00.0 1b36:0008 class 060000")
            .has("00:01.0 1af4:1044 class ff0000")
            .has("ECAM at 0xe0000000")
            .has("MSI-X interrupts: 1")
            .has("SUMMARY: 14 tests, 0 unexpected failures");
    }
    // Without a PCI device there is no PCI: the configuration ports and
    // ECAM float, as they always did.
    run_guest("pci", &[])
        .expect(3)
        .has("FAIL: host-bridge-00.0")
        .has("FAIL: mcfg-ecam");
    run_guest("pci", &["--rng=mmio"])
        .expect(3)
        .has("FAIL: virtio-rng-found");
}

/// The Intel IOMMU in front of edu: the DMAR table names it, DMA goes
/// through root, context and second-level tables, a blocked write fills
/// a fault record, edu's MSI goes through an IRTE, and the unit's fault
/// and invalidation events reach the guest.
#[test]
fn iommu_translates_edu_dma_and_remaps_its_msi() {
    if !kvm_available() {
        return;
    }
    for smp in ["1", "2"] {
        let args = [
            "--machine",
            "q35",
            "--edu",
            "--iommu=intremap=on",
            "--smp",
            smp,
        ];
        run_guest("vtd", &args)
            .expect(PASS)
            .has("PASS: vtd-blocked-write-recorded")
            .has("PASS: vtd-msi-remapped")
            .has("PASS: vtd-fault-event")
            .has("PASS: vtd-invalidation-event")
            .has("SUMMARY: 10 tests, 0 unexpected failures");
    }
}

#[test]
fn edu_computes_copies_and_interrupts_on_both_machines() {
    if !kvm_available() {
        return;
    }
    for smp in ["1", "2"] {
        run_guest("edu", &["--edu", "--smp", smp])
            .expect(PASS)
            .has("edu at 00:01.0")
            .has("SUMMARY: 11 tests, 0 unexpected failures");
        run_guest(
            "edu",
            &["--machine", "q35", "--edu", "--smp", smp, "--", "q35"],
        )
        .expect(PASS)
        .has("PASS: q35-mch-00.0")
        .has("PASS: q35-lpc-1f.0")
        .has("SUMMARY: 15 tests, 0 unexpected failures");
    }
    // q35 without a device still has its chipset; the default machine
    // without one has no PCI at all.
    run_guest("edu", &["--machine", "q35", "--", "q35"])
        .expect(3)
        .has("PASS: q35-lpc-1f.0")
        .has("FAIL: edu-found");
    run_guest("edu", &["--", "q35"])
        .expect(3)
        .has("FAIL: q35-mch-00.0")
        .has("FAIL: edu-found");
    // The default machine's bridge stays QEMU's generic one.
    run_guest("pci", &["--rng", "--edu"])
        .has("00:00.0 1b36:0008 class 060000")
        .has("00:02.0 1234:11e8 class ff0000");
}

#[test]
fn virtio_rng_gives_random_bytes_over_both_transports() {
    if !kvm_available() {
        return;
    }
    run_guest("rng", &["--rng=pci", "--", "transport=pci"])
        .expect(PASS)
        .has("PASS: random-before");
    run_guest("rng", &["--rng=mmio", "--", "transport=mmio"])
        .expect(PASS)
        .has("virtio-mmio window from the DSDT: 0xe0100000")
        .has("PASS: random-before");
    // Both at once, each found on its own transport.
    for t in ["pci", "mmio"] {
        let arg = format!("transport={t}");
        run_guest("rng", &["--rng=mmio", "--rng", "--", &arg]).expect(PASS);
    }
    // The device missing: a FAIL, not a hang.
    run_guest("rng", &["--", "transport=mmio"])
        .expect(3)
        .has("FAIL: dsdt-lnro0005");
    run_guest("rng", &["--", "transport=pci"])
        .expect(3)
        .has("FAIL: pci-1af4-1044");
}

/// `--serial-input` types a line longer than COM1's 64-byte receive FIFO
/// without losing a byte; without a command the ready guest says why.
#[test]
fn serial_input_reaches_the_guest_whole() {
    if !kvm_available() {
        return;
    }
    let words: Vec<String> = (0..15).map(|i| format!("say:word{i:02}")).collect();
    let line = format!("{} count exit:4\n", words.join(" "));
    assert!(line.len() > 128 && line.len() < 256, "{}", line.len());
    let r = run_guest(
        "ready",
        &["--append", "kvmrun.wait_cmd", "--serial-input", &line],
    );
    r.expect(9).has("KVMRUN-READY").has("count=1");
    for w in &words {
        r.has(&format!("\n{}\r\n", &w[4..]));
    }
    run_guest("ready", &[]).expect(5).has("no kvmrun.cmd");
}
