//! CPU models, feature toggles, KVM capabilities and MSRs, checked from
//! inside real guests: the cpuid guest, the probe, and tiny raw images.

mod common;

use std::collections::BTreeMap;

use common::{boot, kvm_available, kvmrun, run_guest, Run};
use kvmrun::cpu::features::{self, Reg};
use serde_json::Value;

const PASS: i32 = 1;

fn kvmrun_args(args: &[&str]) -> Run {
    Run::from(kvmrun().args(args).output().expect("cannot start kvmrun"))
}

fn assert_clean_error(r: &Run, needle: &str) {
    r.expect(2).err_has(needle);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn default_cpu_is_qemu64_as_qemu_gives_it() {
    if !kvm_available() {
        return;
    }
    // The values QEMU 7.2 -cpu qemu64 gives under KVM (KUT-ABI, "CPU").
    run_guest("cpuid", &[])
        .expect(PASS)
        .has("max basic leaf: 0xd")
        .has("leaf 0x1: eax=0x00060fb1")
        .has("max extended leaf: 0x8000000a")
        .has("brand: QEMU Virtual CPU version 2.5+");
    // Same as asking for it.
    run_guest("cpuid", &["--cpu", "qemu64"])
        .expect(PASS)
        .has("leaf 0x1: eax=0x00060fb1");
}

#[test]
fn vendor_override_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    run_guest(
        "cpuid",
        &[
            "--cpu",
            "Opteron_G1,vendor=AuthenticAMD",
            "--",
            "expect-vendor=AuthenticAMD",
        ],
    )
    .expect(PASS)
    .has("max basic leaf: 0x5");
    run_guest(
        "cpuid",
        &[
            "--cpu",
            "max,vendor=GenuineIntel",
            "--",
            "expect-vendor=GenuineIntel",
        ],
    )
    .expect(PASS);
}

fn reg_code(r: Reg) -> u32 {
    match r {
        Reg::Eax => 0,
        Reg::Ebx => 1,
        Reg::Ecx => 2,
        Reg::Edx => 3,
    }
}

fn probe_json(spec: &str, smp: &str) -> Value {
    let r = kvmrun_args(&["cpuid", "--probe", "--json", "--smp", smp, "--cpu", spec]);
    r.expect(0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    serde_json::from_str(&r.stdout).expect("cpuid --json is JSON")
}

/// The probe's verdicts, checked by a second, independent guest: every
/// bit the probe says this host honours must read exactly as kvmrun set
/// it, and every bit it reports as overridden must read as the probe saw.
fn probe_and_guest_agree(spec: &str) {
    let report = probe_json(spec, "2");
    assert_eq!(report["apic_ids_match"], Value::Bool(true), "{spec}");
    // (leaf, subleaf, reg) -> (mask, value) for honoured and overridden bits.
    let mut honoured: BTreeMap<(u32, u32, u32), (u32, u32)> = BTreeMap::new();
    let mut overridden: BTreeMap<(u32, u32, u32), (u32, u32)> = BTreeMap::new();
    let mut names_overridden = Vec::new();
    for f in report["features"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let feat = features::lookup(name).unwrap();
        let key = (feat.leaf, feat.subleaf, reg_code(feat.reg));
        let set = f["set"].as_bool().unwrap();
        // Not probed: the leaf is beyond the model's limits.
        let Some(guest) = f["guest"].as_bool() else {
            continue;
        };
        if f["honoured"].as_bool().unwrap() {
            assert_eq!(set, guest, "{spec}: {name}");
            let e = honoured.entry(key).or_default();
            e.0 |= feat.mask;
            if set {
                e.1 |= feat.mask;
            }
        } else {
            names_overridden.push(name.to_string());
            let e = overridden.entry(key).or_default();
            e.0 |= feat.mask;
            if guest {
                e.1 |= feat.mask;
            }
        }
        // What was asked for and honoured is what the guest sees.
        if let Some(asked) = f["asked"].as_bool() {
            if f["honoured"].as_bool().unwrap() && f["kvm"] != "no" {
                assert_eq!(guest, asked, "{spec}: {name} asked {asked}");
            }
        }
    }
    let listed: Vec<String> = report["overridden"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, names_overridden, "{spec}");

    let mut args: Vec<String> = vec![
        "--smp".into(),
        "2".into(),
        "--cpu".into(),
        spec.into(),
        "--".into(),
    ];
    for map in [&honoured, &overridden] {
        for ((leaf, sub, reg), (mask, value)) in map {
            args.push(format!("w={leaf:x}:{sub:x}:{reg:x}:{mask:x}:{value:x}"));
        }
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let r = run_guest("cpuid", &a);
    r.expect(PASS);
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
}

#[test]
fn probe_matches_a_real_guest_for_several_specs() {
    if !kvm_available() {
        return;
    }
    for spec in [
        "qemu64",
        "qemu64,-x2apic,+tsc-deadline,-cx16",
        "qemu64,-pcid,-invpcid,-kvmclock,-kvm-pv-eoi",
        "max,-la57,-umip,-tsc-adjust",
        "host",
        "base",
        "Opteron_G1,vendor=AuthenticAMD",
    ] {
        probe_and_guest_agree(spec);
    }
}

#[test]
fn removals_of_vmm_controlled_bits_are_honoured() {
    if !kvm_available() {
        return;
    }
    // x2APIC, TSC-deadline, CX16 and the KVM leaves follow the VMM on
    // every KVM, KVM-PVM included.
    let report = probe_json("qemu64,-x2apic,+tsc-deadline,-cx16,-kvmclock", "1");
    for (name, want) in [
        ("x2apic", false),
        ("tsc-deadline", true),
        ("cx16", false),
        ("kvmclock", false),
        ("kvm-pv-eoi", true),
    ] {
        let f = report["features"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap();
        assert_eq!(f["set"], Value::Bool(want), "{name}");
        assert_eq!(f["guest"], Value::Bool(want), "{name}");
    }
}

#[test]
fn cpuid_table_names_every_feature() {
    if !kvm_available() {
        return;
    }
    let r = kvmrun_args(&["cpuid", "--cpu", "qemu64,+tsc-deadline"]);
    r.expect(0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    for f in features::all() {
        assert!(r.stdout.contains(f.name), "{} missing", f.name);
    }
    assert!(r.stdout.contains("tsc-deadline"));
    let r = kvmrun_args(&["cpuid", "--probe", "--smp", "2"]);
    r.expect(0).has("guest").has("APIC IDs");
}

#[test]
fn unavailable_features_are_errors_or_lenient_warnings() {
    if !kvm_available() {
        return;
    }
    // A feature no KVM offers a guest: the hypervisor-only KVM hint is
    // asserted by the VMM, so find a bit this host's KVM lacks instead.
    let report = probe_json("host", "1");
    let missing = report["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kvm"] == "no")
        .map(|f| f["name"].as_str().unwrap().to_string())
        .expect("this KVM supports every named feature");
    let spec = format!("qemu64,+{missing}");
    let r = run_guest("cpuid", &["--cpu", &spec]);
    assert_clean_error(&r, &format!("CPU feature '{missing}'"));
    assert!(r.stderr.contains("--cpu-lenient"));
    let r = run_guest("cpuid", &["--cpu", &spec, "--cpu-lenient"]);
    r.expect(PASS);
    // kvm-unit-tests' runner fails a test on stderr lines without "warning".
    for line in r.stderr.lines() {
        assert!(line.contains("warning"), "{line}");
    }
    assert!(r.stderr.contains(&missing));
}

#[test]
fn bad_cpu_specs_are_clear_errors() {
    for (spec, want) in [
        ("qemu64,+x2apci", "did you mean x2apic"),
        ("qemu64,,+x2apic", "empty item"),
        ("qemu64,+x2apic,-x2apic", "both turned on and off"),
        (
            "IvyBridge,phys-bits=36",
            "known: host, max, qemu64, base, Opteron_G1",
        ),
        ("", "empty CPU model"),
        ("qemu64,x2apic=sometimes", "expected on or off"),
        ("host,hv_passthrough", "Hyper-V"),
        ("qemu64,vendor=Foo", "12 ASCII"),
    ] {
        let r = kvmrun_args(&["run", "/nonexistent.elf", "--cpu", spec]);
        assert_clean_error(&r, want);
        let r = kvmrun_args(&["cpuid", "--cpu", spec]);
        assert_clean_error(&r, want);
    }
}

#[test]
fn bad_caps_msrs_and_filters_are_clear_errors() {
    for (args, want) in [
        (
            &["--kvm-cap", "NO_SUCH"][..],
            "unknown capability 'NO_SUCH'",
        ),
        (
            &["--kvm-cap", "X86_DISABLE_EXITS=nap"],
            "mwait, hlt, pause, cstate",
        ),
        (&["--kvm-cap", "EXCEPTION_PAYLOAD=7"], "on or off"),
        (&["--msr", "0x277"], "expected INDEX=VALUE"),
        (&["--msr", "zz=1"], "expected INDEX=VALUE"),
        (&["--msr-filter", "9-3"], "--msr-filter '9-3'"),
    ] {
        let mut a = vec!["run", "/nonexistent.elf"];
        a.extend_from_slice(args);
        assert_clean_error(&kvmrun_args(&a), want);
    }
    // Conflicts are found before the image is read.
    let r = kvmrun_args(&[
        "run",
        "/nonexistent.elf",
        "--kvm-cap",
        "EXCEPTION_PAYLOAD=on",
        "--kvm-cap",
        "EXCEPTION_PAYLOAD=off",
    ]);
    assert_clean_error(&r, "given twice");
    let r = kvmrun_args(&[
        "run",
        "/nonexistent.elf",
        "--msr",
        "0x10=1",
        "--msr",
        "0x10=2",
    ]);
    assert_clean_error(&r, "given twice");
}

fn caps() -> BTreeMap<String, i64> {
    let r = kvmrun_args(&["caps", "--json"]);
    r.expect(0);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["value"].as_i64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn caps_are_listed_and_settable_ones_work() {
    if !kvm_available() {
        return;
    }
    let caps = caps();
    for name in [
        "X86_DISABLE_EXITS",
        "X2APIC_API",
        "X86_USER_SPACE_MSR",
        "EXCEPTION_PAYLOAD",
        "X86_TRIPLE_FAULT_EVENT",
        "PMU_CAPABILITY",
        "PIT2",
        "IRQCHIP",
    ] {
        assert!(caps.contains_key(name), "{name}");
    }
    kvmrun_args(&["caps"]).expect(0).has("--kvm-cap");
    let mut args: Vec<String> = Vec::new();
    for name in [
        "X86_DISABLE_EXITS",
        "X2APIC_API",
        "EXCEPTION_PAYLOAD",
        "X86_TRIPLE_FAULT_EVENT",
        "PMU_CAPABILITY",
    ] {
        if caps[name] > 0 {
            args.push("--kvm-cap".into());
            args.push(name.into());
        } else {
            // Asking for what this KVM lacks is an error naming it.
            let r = run_guest("hello", &["--kvm-cap", name]);
            assert_clean_error(&r, &format!("KVM_CAP_{name} is not supported"));
        }
    }
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_guest("hello", &a).expect(PASS);
    // The PIT off switch, both spellings.
    run_guest(
        "smp",
        &["--smp", "2", "--kvm-cap", "PIT2=off", "--", "cpus=2"],
    )
    .expect(PASS);
    // More flags than KVM offers.
    let offered = caps["X86_DISABLE_EXITS"];
    if offered & 1 == 0 {
        let r = run_guest("hello", &["--kvm-cap", "X86_DISABLE_EXITS=mwait"]);
        assert_clean_error(&r, "offers only");
    }
}

/// mov ecx, MSR; rdmsr; out 0xf4, al; hlt
fn read_msr_low_byte(msr: u32) -> Vec<u8> {
    let mut c = vec![0xb9];
    c.extend_from_slice(&msr.to_le_bytes());
    c.extend_from_slice(&[0x0f, 0x32, 0xe6, 0xf4, 0xf4]);
    c
}

#[test]
fn msrs_start_at_reset_values_and_can_be_set() {
    if !kvm_available() {
        return;
    }
    const PAT: u32 = 0x277;
    const MISC_ENABLE: u32 = 0x1a0;
    // PAT's low byte after reset is 0x06 (WB): status (6 << 1) | 1.
    boot(&read_msr_low_byte(PAT), &[]).expect(13);
    // IA32_MISC_ENABLE: fast strings on.
    boot(&read_msr_low_byte(MISC_ENABLE), &[]).expect(3);
    boot(
        &read_msr_low_byte(PAT),
        &["--msr", "0x277=0x0007040600070405"],
    )
    .expect(11);
    // An MSR KVM does not have is refused, by name.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    std::fs::write(&p, common::raw_image(&read_msr_low_byte(PAT))).unwrap();
    let r = kvmrun_args(&["run", p.to_str().unwrap(), "--msr", "0x4b564dff=1"]);
    assert_clean_error(&r, "--msr 0x4b564dff=0x1: KVM refused");
}

#[test]
fn filtered_msrs_fault_through_user_space() {
    if !kvm_available() {
        return;
    }
    let caps = caps();
    if caps["X86_USER_SPACE_MSR"] & 4 == 0 {
        eprintln!("SKIP: KVM lacks X86_USER_SPACE_MSR with the filter reason");
        return;
    }
    // The raw image has no IDT, so the #GP kvmrun injects ends in a triple
    // fault (status 4); without the filter the read works.
    let code = read_msr_low_byte(0x277);
    boot(&code, &["--msr-filter", "0x277"]).expect(4);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    std::fs::write(&p, common::raw_image(&code)).unwrap();
    let r = Run::from(
        kvmrun()
            .env("KVMRUN_LOG", "debug")
            .args([
                "run",
                p.to_str().unwrap(),
                "--timeout",
                "60",
                "--kvm-cap",
                "X86_USER_SPACE_MSR=filter",
                "--msr-filter",
                "0x270-0x27f,0xc0000080",
            ])
            .output()
            .unwrap(),
    );
    r.expect(4).err_has("RDMSR 0x277");
    boot(&code, &["--kvm-cap", "X86_USER_SPACE_MSR=filter"]).expect(13);
}
