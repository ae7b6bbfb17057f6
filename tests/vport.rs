//! virtio-console ports (`--vport`) with our console guest: the ports
//! added and named through the control queues, the guest's output on
//! kvmrun's stdout, kvmrun's stdin as the guest's input and its end as
//! the port's host side closing; every bad `--vport` refused before the
//! guest starts.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{guest, kvm_available, kvmrun, Run};

const PASS: i32 = 1;

/// The console guest with `out` on stdout and `in` on stdin fed `input`,
/// COM1 into `serial`.
fn run_console(input: &[u8], serial: &std::path::Path, guest_args: &[&str]) -> Run {
    let serial = format!("file:{}", serial.display());
    let mut child = kvmrun()
        .arg("run")
        .arg(guest("console"))
        .args(["--timeout", "120", "--serial", &serial])
        .args(["--vport", "out=stdout", "--vport", "in=stdin", "--"])
        .args(guest_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kvmrun");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    Run::from(child.wait_with_output().unwrap())
}

#[test]
fn ports_carry_output_and_input_and_the_end_of_input() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let serial = d.path().join("serial.txt");
    let r = run_console(b"ping\n", &serial, &["eof"]);
    r.expect(PASS);
    assert_eq!(
        r.stdout, "hello from the guest\necho: ping\n",
        "{}",
        r.stderr
    );
    let log = std::fs::read_to_string(&serial).unwrap();
    for want in [
        "PASS: multiport-feature",
        "max_nr_ports 2",
        "PASS: ports-named",
        "PASS: in-closed-at-eof",
        "SUMMARY: 6 tests, 0 unexpected failures",
    ] {
        assert!(log.contains(want), "serial lacks {want:?}:\n{log}");
    }
}

#[test]
fn a_port_writes_into_a_file() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out.txt");
    let r = Run::from(
        kvmrun()
            .arg("run")
            .arg(guest("console"))
            .args(["--timeout", "120", "--serial", "none"])
            .arg("--vport")
            .arg(format!("out=file:{}", out.display()))
            .args(["--vport", "in=stdin"])
            .stdin(Stdio::null())
            .output()
            .unwrap(),
    );
    // No input: the guest reads the end at once.
    r.expect(PASS);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello from the guest\neof\n"
    );
}

#[test]
fn bad_vports_are_refused_before_the_guest_starts() {
    for (arg, want) in [
        ("out", "invalid --vport 'out': expected NAME="),
        ("=stdout", "the name must be"),
        ("a=tty", "expected stdout, stderr, stdin or file:PATH"),
    ] {
        let r = Run::from(
            kvmrun()
                .arg("run")
                .arg(guest("console"))
                .args(["--vport", arg])
                .output()
                .unwrap(),
        );
        assert_eq!(r.status, 2, "{arg}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{arg}: {}", r.stderr);
    }
    for (args, want) in [
        (
            &["--vport", "a=stdout", "--vport", "a=stderr"][..],
            "'a' given twice",
        ),
        (
            &["--vport", "a=stdin", "--vport", "b=stdin"][..],
            "more than one port reads stdin",
        ),
    ] {
        let r = Run::from(
            kvmrun()
                .arg("run")
                .arg(guest("console"))
                .args(args)
                .output()
                .unwrap(),
        );
        assert_ne!(r.status, 0, "{args:?}");
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
    }
    let r = Run::from(
        kvmrun()
            .arg("run")
            .arg(guest("console"))
            .args(["--vport", "a=file:/nonexistent/dir/x"])
            .output()
            .unwrap(),
    );
    assert_ne!(r.status, 0);
    assert!(r.stderr.contains("/nonexistent/dir/x"), "{}", r.stderr);
}
