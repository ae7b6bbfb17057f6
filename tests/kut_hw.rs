//! kvm-unit-tests' x86 suite on SVM: `kvmrun test` against kvm-unit-tests'
//! own run_tests.sh with QEMU, in the same boot of the AMD-V host
//! (`scripts/kut-amdv`, docs/KVM-UNIT-TESTS.md). Runs only when KUT_DIR
//! names a kvm-unit-tests x86_64 build (not in CI: over half an hour).
//! `KVMRUN_AMDV_RESULTS=FILE` compares an earlier run's results file
//! (`scripts/kut-amdv --out DIR` keeps it as DIR/results.txt) instead of
//! booting L1 again.

use std::path::Path;
use std::process::Command;

/// Entries whose verdict may differ from QEMU's, and why.
const ALLOWED: &[(&str, &str)] = &[
    (
        "hyperv_synic",
        "no Hyper-V enlightenments or hyperv-testdev",
    ),
    (
        "hyperv_connections",
        "no Hyper-V enlightenments or hyperv-testdev",
    ),
    ("hyperv_stimer", "no Hyper-V enlightenments"),
    ("hyperv_stimer_direct", "no Hyper-V enlightenments"),
    ("ept", "kvmrun knows no Skylake-Server or vmx-mbec"),
    ("ept-mbec", "kvmrun knows no Skylake-Server or vmx-mbec"),
];

#[test]
fn kvm_unit_tests_on_svm_get_qemus_verdicts() {
    let Some(kut) = std::env::var_os("KUT_DIR") else {
        eprintln!("SKIP: KUT_DIR is not set (a kvm-unit-tests x86_64 build)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("build/amdv/kut");
    let mut cmd = Command::new(root.join("scripts/kut-amdv"));
    cmd.arg("--out").arg(&out);
    if let Some(earlier) = std::env::var_os("KVMRUN_AMDV_RESULTS") {
        cmd.arg("--results").arg(earlier);
    }
    // Some entries only (scripts/kut-amdv --only), e.g. one that changed.
    if let Some(only) = std::env::var_os("KUT_ONLY") {
        cmd.arg("--only").arg(only);
    }
    let r = cmd
        .arg(&kut)
        .output()
        .expect("cannot start scripts/kut-amdv");
    let table = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.code() == Some(0) || r.status.code() == Some(1),
        "scripts/kut-amdv failed ({:?}): {}",
        r.status,
        String::from_utf8_lossy(&r.stderr)
    );
    let diffs: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_end().ends_with("DIFF"))
        .filter(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            !ALLOWED.iter().any(|(n, _)| *n == name)
        })
        .collect();
    let not_run: Vec<&str> = table
        .lines()
        .filter(|l| l.trim_end().ends_with(" -") && !l.starts_with("emulator "))
        .collect();
    assert!(
        diffs.is_empty() && not_run.is_empty(),
        "verdicts differ from QEMU's (or did not come) for:\n{}\n{}\n\n{table}",
        diffs.join("\n"),
        not_run.join("\n")
    );
}
