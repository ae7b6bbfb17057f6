//! seccomp in real runs: a forbidden call in a thread ends kvmrun with
//! status 159 and a message naming the thread, the call and the filter;
//! `--seccomp log` and `off` let it through. The calls are made through
//! the sandbox's test hook (KVMRUN_TEST_FORBIDDEN_CALL=KIND:CALL), right
//! after the thread's filter is in place.

mod common;

use common::{guest, kvm_available, kvmrun, Run};

const SECCOMP: i32 = 159;
const PASS: i32 = 1;

fn run_with_call(call: &str, args: &[&str]) -> Run {
    let mut c = kvmrun();
    c.env("KVMRUN_TEST_FORBIDDEN_CALL", call).args(args);
    Run::from(c.output().expect("cannot start kvmrun"))
}

fn hello_args(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "run".to_string(),
        guest("hello").to_string_lossy().into_owned(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.extend(["--timeout".to_string(), "60".to_string()]);
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_vcpu_thread_cannot_open_or_exec() {
    if !kvm_available() {
        return;
    }
    for (call, nr) in [("openat", 257), ("execve", 59)] {
        let r = run_with_call(&format!("vcpu:{call}"), &strs(&hello_args(&[])));
        r.expect(SECCOMP).err_has(&format!(
            "seccomp: thread 'vcpu0' made the system call {call} ({nr}), which the vcpu filter"
        ));
        assert!(
            !r.stdout.contains("Hello"),
            "the guest never ran: {}",
            r.stdout
        );
    }
}

#[test]
fn log_and_off_let_the_call_through() {
    if !kvm_available() {
        return;
    }
    for mode in ["log", "off"] {
        let r = run_with_call("vcpu:openat", &strs(&hello_args(&["--seccomp", mode])));
        r.expect(PASS).has("Hello from kvmrun guest");
        assert!(!r.stderr.contains("seccomp"), "{}", r.stderr);
    }
}

#[test]
fn the_vmm_thread_cannot_exec() {
    if !kvm_available() {
        return;
    }
    run_with_call("vmm:execve", &strs(&hello_args(&[])))
        .expect(SECCOMP)
        .err_has("thread 'main' made the system call execve (59), which the vmm filter");
}

#[test]
fn the_supervisor_and_the_scheduler_cannot_exec_but_their_vms_run() {
    if !kvm_available() {
        return;
    }
    // The supervisor's filter goes on before it starts its first VM, and
    // the call comes right after it.
    run_with_call(
        "migration supervisor:execve",
        &strs(&hello_args(&["--migrate"])),
    )
    .expect(SECCOMP)
    .err_has(
        "thread 'main' made the system call execve (59), which the migration supervisor filter",
    );
    let d = tempfile::tempdir().unwrap();
    let suite = d.path().join("suite.toml");
    std::fs::write(
        &suite,
        format!(
            "[[test]]\nname = \"hello\"\nkernel = \"{}\"\nexpect_status = 1\n",
            guest("hello").display()
        ),
    )
    .unwrap();
    let logs = d.path().join("logs");
    let test = |call: &str| {
        run_with_call(
            call,
            &[
                "test",
                suite.to_str().unwrap(),
                "-o",
                logs.to_str().unwrap(),
            ],
        )
    };
    test("test scheduler:execve")
        .expect(SECCOMP)
        .err_has("which the test scheduler filter");
    // Without the call, the scheduler's filter lets its tests run.
    test("none:none").expect(0).has("PASS");
}

#[test]
fn a_bad_mode_is_a_clear_error() {
    let r = Run::from(
        kvmrun()
            .args(["run", "x.flat", "--seccomp", "maybe"])
            .output()
            .unwrap(),
    );
    r.expect(2)
        .err_has("invalid --seccomp 'maybe': expected on, log or off");
}
