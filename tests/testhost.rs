//! `kvmrun test` end to end: suites of our own guests (a unittests.cfg and
//! a TOML suite), real VMs, real reports parsed back.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, kvm_available, kvmrun, Run};

fn guests_dir() -> PathBuf {
    guest("hello").parent().unwrap().to_path_buf()
}

/// A unittests.cfg of our guests covering every kind of verdict.
fn suite_cfg(dir: &Path, with_hang: bool) -> PathBuf {
    let mut text = String::from(
        "# Our guests in kvm-unit-tests' format.\n\
         [hello]\nfile = hello.elf\ntest_args = 'a1 \"b 2\"'\ngroups = quick\n\n\
         [fail]\nfile = exitcode.elf\ntest_args = code=1\n\n\
         [skip]\nfile = exitcode.elf\ntest_args = code=38\n\n\
         [smp2]\nfile = smp.elf\nsmp = 2\ntest_args = cpus=2\n\
         qemu_params = -m 256 -machine pit=off\ngroups = quick\n\n\
         [manual]\nfile = hello.elf\ngroups = nodefault\n\n\
         [missing]\nfile = nothing.elf\n\n\
         [checked]\nfile = hello.elf\ncheck = /nonexistent/kvmrun-check=Y\n\n\
         [device]\nfile = hello.elf\nqemu_params = -device hyperv-testdev\n",
    );
    if with_hang {
        text.push_str("\n[hang]\nfile = hang.elf\ntimeout = 1\n");
    }
    let p = dir.join("unittests.cfg");
    std::fs::write(&p, text).unwrap();
    p
}

fn kvmrun_test(suite: &Path, out: &Path, extra: &[&str]) -> Run {
    let o = kvmrun()
        .arg("test")
        .arg(suite)
        .arg("--dir")
        .arg(guests_dir())
        .arg("-o")
        .arg(out)
        .args(["--progress", "lines"])
        .args(extra)
        .output()
        .expect("cannot start kvmrun");
    Run::from(o)
}

/// (name, verdict) pairs from a JUnit report, checked with a real parser.
fn junit_verdicts(path: &Path) -> Vec<(String, String, Option<String>)> {
    let xml = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&xml).expect("JUnit report is not well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    let suites: Vec<_> = root
        .children()
        .filter(|n| n.has_tag_name("testsuite"))
        .collect();
    assert_eq!(suites.len(), 1);
    let cases: Vec<_> = suites[0]
        .children()
        .filter(|n| n.has_tag_name("testcase"))
        .collect();
    assert_eq!(
        suites[0].attribute("tests").unwrap(),
        cases.len().to_string(),
        "tests= attribute disagrees with the testcases"
    );
    cases
        .iter()
        .map(|c| {
            let name = c.attribute("name").unwrap().to_string();
            assert!(c.attribute("time").unwrap().parse::<f64>().is_ok());
            let fail = c.children().find(|n| n.has_tag_name("failure"));
            let skip = c.children().find(|n| n.has_tag_name("skipped"));
            match (fail, skip) {
                (Some(f), None) => (
                    name,
                    "FAIL".into(),
                    f.attribute("message").map(str::to_string),
                ),
                (None, Some(s)) => (
                    name,
                    "SKIP".into(),
                    s.attribute("message").map(str::to_string),
                ),
                (None, None) => (name, "PASS".into(), None),
                _ => panic!("testcase {name} both failed and skipped"),
            }
        })
        .collect()
}

fn system_out(path: &Path, test: &str) -> String {
    let xml = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let case = doc
        .descendants()
        .find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some(test))
        .unwrap();
    case.children()
        .find(|n| n.has_tag_name("system-out"))
        .and_then(|n| n.text())
        .unwrap_or("")
        .to_string()
}

#[test]
fn cfg_suite_verdicts_logs_and_reports() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = suite_cfg(dir.path(), true);
    let out = dir.path().join("logs");
    let tap = dir.path().join("r.tap");
    let junit = dir.path().join("r.xml");
    let r = kvmrun_test(
        &cfg,
        &out,
        &[
            "-j",
            "2",
            "--tap",
            tap.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    r.expect(1)
        .has("PASS hello\n")
        .has("FAIL fail\n")
        .has("SKIP skip\n")
        .has("PASS smp2 (6 tests, 0 unexpected failures)\n")
        .has("SKIP manual (test marked as manual run only)\n")
        .has("nothing.elf' not found)\n")
        .has("SKIP checked (/nonexistent/kvmrun-check not equal to Y)\n")
        .has("SKIP device (untranslated: -device hyperv-testdev)\n")
        .has("FAIL hang (timeout; duration=1)\n")
        .has("9 tests: 2 passed, 2 failed, 5 skipped");
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);

    // Logs: serial output as the guest wrote it, and the env file.
    let hello = std::fs::read_to_string(out.join("hello.log")).unwrap();
    assert!(hello.contains("argv[1]: a1"), "{hello}");
    assert!(hello.contains("argv[2]: \"b"), "{hello}");
    let env = std::fs::read_to_string(out.join("hello.env")).unwrap();
    assert!(env.contains("QEMU_ACCEL=kvm\n"), "{env}");
    let cmd = cmd_words(&out, "hello");
    assert!(cmd.iter().any(|w| w == "--append=a1 \"b 2\""), "{cmd:?}");
    assert!(std::fs::read_to_string(out.join("hang.log"))
        .unwrap()
        .contains("hanging"));

    // TAP: plan first, one line per test in suite order.
    let tap = std::fs::read_to_string(&tap).unwrap();
    let lines: Vec<&str> = tap
        .lines()
        .filter(|l| l.starts_with("ok") || l.starts_with("not ok"))
        .collect();
    assert!(tap.starts_with("TAP version 13\n1..9\n"), "{tap}");
    assert_eq!(
        lines,
        [
            "ok 1 - hello",
            "not ok 2 - fail",
            "ok 3 - skip # SKIP",
            "ok 4 - smp2 (6 tests, 0 unexpected failures)",
            "ok 5 - manual # SKIP test marked as manual run only",
            lines[5],
            "ok 7 - checked # SKIP /nonexistent/kvmrun-check not equal to Y",
            "ok 8 - device # SKIP untranslated: -device hyperv-testdev",
            "not ok 9 - hang (timeout; duration=1)",
        ]
    );
    assert!(lines[5].starts_with("ok 6 - missing # SKIP Test file"));
    assert!(tap.contains("  status: 3\n") && tap.contains("  status: 124\n"));

    // JUnit, read back with an XML parser.
    let v = junit_verdicts(&junit);
    let names: Vec<_> = v
        .iter()
        .map(|(n, verdict, _)| format!("{n}={verdict}"))
        .collect();
    assert_eq!(
        names,
        [
            "hello=PASS",
            "fail=FAIL",
            "skip=SKIP",
            "smp2=PASS",
            "manual=SKIP",
            "missing=SKIP",
            "checked=SKIP",
            "device=SKIP",
            "hang=FAIL"
        ]
    );
    assert_eq!(v[1].2.as_deref(), Some("FAIL"));
    assert_eq!(v[4].2.as_deref(), Some("test marked as manual run only"));
    assert_eq!(v[8].2.as_deref(), Some("timeout; duration=1"));
    assert!(system_out(&junit, "hello").contains("Hello from kvmrun guest"));
    assert!(system_out(&junit, "smp2").contains("SUMMARY: 6 tests"));
}

#[test]
fn exit_status_is_zero_without_failures_and_groups_select() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = suite_cfg(dir.path(), false);
    let out = dir.path().join("logs");
    kvmrun_test(&cfg, &out, &["-g", "quick"])
        .expect(0)
        .has("PASS hello\n")
        .has("PASS smp2")
        .has("2 tests: 2 passed, 0 failed, 0 skipped");
    kvmrun_test(&cfg, &out, &["skip", "manual", "device"])
        .expect(0)
        .has("3 tests: 0 passed, 0 failed, 3 skipped");
    // -a runs the nodefault test.
    kvmrun_test(&cfg, &out, &["-a", "manual"])
        .expect(0)
        .has("PASS manual\n");
}

#[test]
fn five_runs_give_identical_verdicts() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = suite_cfg(dir.path(), false);
    let mut seen: Vec<Vec<(String, String, Option<String>)>> = Vec::new();
    for i in 0..5 {
        let junit = dir.path().join(format!("r{i}.xml"));
        kvmrun_test(
            &cfg,
            &dir.path().join(format!("logs{i}")),
            &["-j", "3", "--junit", junit.to_str().unwrap()],
        )
        .expect(1);
        seen.push(junit_verdicts(&junit));
    }
    for (i, v) in seen.iter().enumerate().skip(1) {
        assert_eq!(v, &seen[0], "run {i} differs from run 0");
    }
}

#[test]
fn shards_split_the_suite_without_overlap() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = suite_cfg(dir.path(), false);
    let mut all: Vec<String> = Vec::new();
    for k in 1..=3 {
        let junit = dir.path().join(format!("s{k}.xml"));
        let shard = format!("{k}/3");
        kvmrun_test(
            &cfg,
            &dir.path().join("logs"),
            &["--shard", &shard, "--junit", junit.to_str().unwrap()],
        );
        let names: Vec<String> = junit_verdicts(&junit).into_iter().map(|v| v.0).collect();
        assert!(!names.is_empty(), "shard {shard} is empty");
        all.extend(names);
    }
    all.sort();
    let mut want = vec![
        "checked", "device", "fail", "hello", "manual", "missing", "skip", "smp2",
    ];
    want.sort();
    assert_eq!(all, want);
}

#[test]
fn toml_suite_runs_our_guests_as_kernels() {
    if !kvm_available() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("g.xml");
    let r = Run::from(
        kvmrun()
            .arg("test")
            .arg(root.join("resources/testhost/guests.toml"))
            .args(["--progress", "lines", "-o"])
            .arg(dir.path().join("logs"))
            .arg("--junit")
            .arg(&junit)
            .output()
            .unwrap(),
    );
    r.expect(0).has("4 tests: 4 passed, 0 failed, 0 skipped");
    assert!(junit_verdicts(&junit).iter().all(|v| v.1 == "PASS"));

    // Every way a Linux-style test can fail or skip.
    let hello = guest("hello");
    let suite = dir.path().join("bad.toml");
    std::fs::write(
        &suite,
        format!(
            "[defaults]\nkernel = \"{k}\"\nexpect_status = 1\ntimeout = \"30s\"\n\
             [[test]]\nname = \"ok\"\nexpect_output = [\"^Hello from kvmrun guest$\"]\n\
             [[test]]\nname = \"status\"\nexpect_status = 0\n\
             [[test]]\nname = \"lacks\"\nexpect_output = [\"Goodbye\"]\n\
             [[test]]\nname = \"rejects\"\nreject_output = [\"^argv\\\\[0\\\\]\"]\n\
             [[test]]\nname = \"nokernel\"\nkernel = \"no-such-image\"\n\
             [[test]]\nname = \"noinitrd\"\ninitrd = \"no-such-initrd\"\n\
             [[test]]\nname = \"hangs\"\nkernel = \"{h}\"\ntimeout = 1\n",
            k = hello.display(),
            h = guest("hang").display()
        ),
    )
    .unwrap();
    let r = Run::from(
        kvmrun()
            .arg("test")
            .arg(&suite)
            .args(["--progress", "lines", "-j", "3", "-o"])
            .arg(dir.path().join("logs2"))
            .output()
            .unwrap(),
    );
    r.expect(1)
        .has("PASS ok\n")
        .has("FAIL status (exit status 1, expected 0)\n")
        .has("FAIL lacks (output lacks /Goodbye/)\n")
        .has("FAIL rejects (output has /^argv\\[0\\]/)\n")
        .has("SKIP nokernel (kernel 'no-such-image' not found)\n")
        .has("SKIP noinitrd (initrd 'no-such-initrd' not found)\n")
        .has("FAIL hangs (timeout; duration=1s)\n");
}

#[test]
fn bad_input_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logs");
    let cfg = dir.path().join("u.cfg");
    std::fs::write(&cfg, "[a]\nqemu_params = \"\"\"-m 1\n").unwrap();
    kvmrun_test(&cfg, &out, &[])
        .expect(2)
        .err_has("u.cfg:2: the \"\"\" block of [a] is never closed");
    std::fs::write(&cfg, "[a]\nfile = hello.elf\ntimeout = soon\n").unwrap();
    kvmrun_test(&cfg, &out, &[])
        .expect(2)
        .err_has("invalid timeout 'soon'");
    std::fs::write(&cfg, "[a]\nfile = hello.elf\n").unwrap();
    kvmrun_test(&cfg, &out, &["zz"])
        .expect(2)
        .err_has("no test named 'zz'");
    kvmrun_test(&cfg, &out, &["-j", "0"])
        .expect(2)
        .err_has("invalid --jobs 0");
    kvmrun_test(&cfg, &out, &["--shard", "3/2"])
        .expect(2)
        .err_has("invalid shard '3/2'");
    kvmrun_test(&cfg, &out, &["--timeout-scale=-1"])
        .expect(2)
        .err_has("--timeout-scale");
    for bad in ["0", "-1", "0s", "nan", "inf", "soon", ""] {
        kvmrun_test(&cfg, &out, &[&format!("--migrate-every={bad}")])
            .expect(2)
            .err_has("--migrate-every")
            .err_has("expected a positive, finite number of seconds");
    }
    kvmrun_test(&dir.path().join("none.cfg"), &out, &[])
        .expect(2)
        .err_has("cannot read");
    let toml = dir.path().join("s.toml");
    std::fs::write(&toml, "[[test]]\nname = \"a\"\nkernal = \"x\"\n").unwrap();
    let r = Run::from(kvmrun().arg("test").arg(&toml).output().unwrap());
    r.expect(2).err_has("unknown field `kernal`");
    // The output directory cannot be created under a file.
    let r = Run::from(
        kvmrun()
            .arg("test")
            .arg(&cfg)
            .arg("-o")
            .arg(cfg.join("sub"))
            .output()
            .unwrap(),
    );
    r.expect(2).err_has("cannot create the output directory");
}

/// Children of `pid` (all threads), from /proc.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|w| w.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Whether `pid` is still a live (not zombie) process.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn sigint_stops_every_vm_and_writes_partial_reports() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("u.cfg");
    std::fs::write(
        &cfg,
        "[hello]\nfile = hello.elf\n[hang]\nfile = hang.elf\ntimeout = 600\n[after]\nfile = hello.elf\n",
    )
    .unwrap();
    let out = dir.path().join("logs");
    let tap = dir.path().join("r.tap");
    let junit = dir.path().join("r.xml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmrun"))
        .arg("test")
        .arg(&cfg)
        .arg("--dir")
        .arg(guests_dir())
        .arg("-o")
        .arg(&out)
        .args(["-j", "1", "--progress", "lines", "--tap"])
        .arg(&tap)
        .arg("--junit")
        .arg(&junit)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // With -j 1, "hanging" in hang.log means hello has finished and the
    // hung VM is the one running.
    wait_for_hanging(&mut child, &out.join("hang.log"));
    let vms = children(child.id());
    assert_eq!(vms.len(), 1, "expected one running VM, found {vms:?}");
    // SAFETY: kill() on a child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let o = child.wait_with_output().unwrap();
    let r = Run::from(o);
    r.expect(130)
        .has("PASS hello\n")
        .has("3 tests: 1 passed, 0 failed, 0 skipped, 2 not finished (interrupted)");
    for pid in vms {
        assert!(!alive(pid), "VM process {pid} survived the interrupt");
    }
    let tap = std::fs::read_to_string(&tap).unwrap();
    assert_eq!(
        tap,
        "TAP version 13\n1..1\nok 1 - hello\nBail out! Interrupted after 1 of 3 tests\n"
    );
    let v = junit_verdicts(&junit);
    assert_eq!(v, [("hello".to_string(), "PASS".to_string(), None)]);
}

#[test]
fn options_kvmrun_rejects_skip_like_the_runners_preflight() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("unittests.cfg");
    std::fs::write(
        &cfg,
        "[nocpu]\nfile = hello.elf\nqemu_params = -cpu qemu64,+frobnicator\n\n\
         [okcpu]\nfile = hello.elf\nqemu_params = -cpu qemu64,+x2apic\n",
    )
    .unwrap();
    let out = dir.path().join("logs");
    kvmrun_test(&cfg, &out, &[])
        .expect(0)
        .has("SKIP nocpu (")
        .has("frobnicator")
        .has("PASS okcpu");
}

/// The words of a test's recorded command line (`NAME.cmd`).
fn cmd_words(out: &Path, name: &str) -> Vec<String> {
    let line = std::fs::read_to_string(out.join(format!("{name}.cmd"))).unwrap();
    shlex::split(&line).unwrap_or_else(|| panic!("{name}.cmd is not shell words: {line}"))
}

/// A migration-group entry in kvm-unit-tests' syntax, and one outside it
/// (the checksum guest's default work, about 2 s, so that timed migrations
/// have time to land).
fn migration_cfg(dir: &Path) -> PathBuf {
    let p = dir.join("unittests.cfg");
    std::fs::write(
        &p,
        "[migrating]\nfile = checksum.elf\n\
         extra_params = -append 'words=4096 rounds=4 ticks=20 migrate=2'\n\
         groups = checksum migration\n\n\
         [plain]\nfile = checksum.elf\n",
    )
    .unwrap();
    p
}

#[test]
fn migration_group_tests_are_migrated_at_every_request() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = migration_cfg(dir.path());
    let out = dir.path().join("logs");
    // Without --migrate the guest would wait for its key until the timeout.
    let r = kvmrun_test(&cfg, &out, &["migrating"]);
    r.expect(0)
        .has("PASS migrating (3 tests, 0 unexpected failures)\n");
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);
    let log = std::fs::read_to_string(out.join("migrating.log")).unwrap();
    assert_eq!(log.matches("Now migrate the VM").count(), 2, "{log}");
    assert!(log.contains("migration 2 done"), "{log}");
    let cmd = cmd_words(&out, "migrating");
    assert!(cmd.iter().any(|w| w == "--migrate"), "{cmd:?}");
    assert!(
        !cmd.iter().any(|w| w.starts_with("--migrate-every")),
        "{cmd:?}"
    );
    // The guest's environment stays the runner's.
    let env = std::fs::read_to_string(out.join("migrating.env")).unwrap();
    assert!(!env.contains("MIGRAT"), "{env}");
}

#[test]
fn migrate_every_reaches_every_test() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = migration_cfg(dir.path());
    let out = dir.path().join("logs");
    // How many timed migrations land in a run is up to the clock; the
    // verdicts are not.
    let r = kvmrun_test(&cfg, &out, &["-j", "1", "--migrate-every", "0.2"]);
    r.expect(0)
        .has("PASS migrating (3 tests, 0 unexpected failures)\n")
        .has("PASS plain (3 tests, 0 unexpected failures)\n");
    assert!(r.stderr.is_empty(), "stderr: {}", r.stderr);
    let log = std::fs::read_to_string(out.join("migrating.log")).unwrap();
    assert!(log.contains("migration 2 done"), "{log}");
    let has = |name: &str, flag: &str| cmd_words(&out, name).iter().any(|w| w == flag);
    assert!(has("migrating", "--migrate") && has("migrating", "--migrate-every=0.2"));
    assert!(!has("plain", "--migrate") && has("plain", "--migrate-every=0.2"));
}

#[test]
fn sigint_stops_the_vms_of_a_migrating_test() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("u.cfg");
    std::fs::write(
        &cfg,
        "[hang]\nfile = hang.elf\ngroups = migration\ntimeout = 600\n",
    )
    .unwrap();
    let out = dir.path().join("logs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmrun"))
        .arg("test")
        .arg(&cfg)
        .arg("--dir")
        .arg(guests_dir())
        .arg("-o")
        .arg(&out)
        .args(["--progress", "lines"])
        // The killed supervisor cannot remove its work directory; keep it
        // in the test's own.
        .env("TMPDIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "hanging" in the log means the supervisor and its VM both run.
    wait_for_hanging(&mut child, &out.join("hang.log"));
    let supervisors = children(child.id());
    assert_eq!(supervisors.len(), 1, "{supervisors:?}");
    let vms = children(supervisors[0]);
    assert_eq!(
        vms.len(),
        1,
        "expected one VM under the supervisor: {vms:?}"
    );
    // SAFETY: kill() on a child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let r = Run::from(child.wait_with_output().unwrap());
    r.expect(130);
    assert!(
        !alive(supervisors[0]),
        "the supervisor survived the interrupt"
    );
    // The VM is not kvmrun test's child, so nothing waits for its end;
    // SIGKILL ends it soon, the bound only catches one that survived.
    let killed = Instant::now();
    while alive(vms[0]) {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "VM process {} survived the interrupt",
            vms[0]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `log` says "hanging" while `child` (kvmrun test) still runs.
/// The bound only keeps a broken build from hanging the test suite.
fn wait_for_hanging(child: &mut std::process::Child, log: &Path) {
    let start = Instant::now();
    while !std::fs::read_to_string(log).is_ok_and(|s| s.contains("hanging")) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "hang.elf never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "kvmrun test ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// resources/testhost/once.toml with the ready guest named from the root
/// and two tests that fail (a wrong status, a hang past its timeout), in
/// `dir`.
fn once_suite(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("resources/testhost/once.toml")).unwrap();
    let ready = guest("ready");
    let text = text.replace(
        "kernel = \"../../build/guests/ready.elf\"",
        &format!("kernel = \"{}\"", ready.display()),
    );
    assert!(text.contains(&ready.display().to_string()));
    let text = format!(
        "{text}\n[[test]]\nname = \"wrong-status\"\ncmd = \"exit:1\"\n\n\
         [[test]]\nname = \"hangs\"\ncmd = \"say:stuck hang\"\ntimeout = 2\n"
    );
    let p = dir.join("once.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn run_suite(suite: &Path, out: &Path, extra: &[&str]) -> (Run, Vec<(String, String)>) {
    let junit = out.with_extension("xml");
    let r = Run::from(
        kvmrun()
            .arg("test")
            .arg(suite)
            .args(["--progress", "lines", "-o"])
            .arg(out)
            .arg("--junit")
            .arg(&junit)
            .args(extra)
            .output()
            .unwrap(),
    );
    let verdicts = junit_verdicts(&junit)
        .into_iter()
        .map(|(n, v, _)| (n, v))
        .collect();
    (r, verdicts)
}

/// Issue 13: a boot-once suite of at least 10 tests gives the verdicts
/// of booting each test, in parallel too, and each boot-once test's
/// output is that of its restore.
#[test]
fn boot_once_gives_the_verdicts_of_booting_each() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = once_suite(dir.path());
    let (each, each_v) = run_suite(&suite, &dir.path().join("each"), &["--boot-each"]);
    each.expect(1).has("14 tests: 12 passed, 2 failed");
    assert!(!each.stdout.contains("boot once:"), "{}", each.stdout);
    let failed: Vec<&str> = each_v
        .iter()
        .filter(|v| v.1 != "PASS")
        .map(|v| v.0.as_str())
        .collect();
    assert_eq!(failed, ["wrong-status", "hangs"]);
    for jobs in ["1", "2"] {
        let out = dir.path().join(format!("once-j{jobs}"));
        let (once, once_v) = run_suite(&suite, &out, &["-j", jobs]);
        once.expect(1)
            .has("14 tests: 12 passed, 2 failed")
            .has("boot once: 4 boot group(s) booted and snapshotted in ")
            .has("13 tests ran from a restore, restore to exit: mean ");
        assert_eq!(once_v, each_v, "-j {jobs}");
        // The test's log is its restore's: no boot, the command from COM1.
        let log = std::fs::read_to_string(out.join("say-hello.log")).unwrap();
        assert!(
            log.starts_with("kvmrun: running: say:hello (from COM1)"),
            "{log}"
        );
        let boot = std::fs::read_to_string(out.join("boot-once-0.log")).unwrap();
        assert!(boot.contains("KVMRUN-READY"), "{boot}");
        let booted = std::fs::read_to_string(out.join("booted.log")).unwrap();
        assert!(!booted.contains("(from COM1)"), "{booted}");
    }
    let log = std::fs::read_to_string(dir.path().join("each/say-hello.log")).unwrap();
    assert!(log.starts_with("kvmrun: running: say:hello\r\n"), "{log}");
}

/// A boot group whose snapshot cannot be taken or restored, or whose
/// guest never gets ready, fails each of its tests with the reason,
/// without a hang; the other tests run.
#[test]
fn a_boot_group_that_cannot_be_snapshotted_fails_its_tests() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = once_suite(dir.path());
    let names = ["say-hello", "smp-2", "booted"];
    let fail = |fault: &str, n: usize| {
        let r = Run::from(
            kvmrun()
                .env("KVMRUN_TEST_BOOT_ONCE_FAULT", fault)
                .arg("test")
                .arg(&suite)
                .args(names)
                .args(["--progress", "lines", "-o"])
                .arg(dir.path().join(format!("{fault}{n}")))
                .output()
                .unwrap(),
        );
        r.expect(1)
            .has("3 tests: 1 passed, 2 failed")
            .has("PASS booted");
        r
    };
    let r = fail("snapshot", 0);
    r.has("FAIL say-hello (boot once: cannot snapshot the VM: control socket ")
        .has("Not a directory");
    let r = fail("restore", 0);
    r.has("FAIL smp-2 (exit status 2, expected 1; kvmrun: error: ");

    // Guests that end, or hang, before their ready line.
    let text = format!(
        "[defaults]\nboot_once = true\ncmd = \"say:x\"\ntimeout = 2\n\
         [[test]]\nname = \"ends\"\nkernel = \"{}\"\n\
         [[test]]\nname = \"hangs\"\nkernel = \"{}\"\n",
        guest("hello").display(),
        guest("hang").display()
    );
    let bad = dir.path().join("never-ready.toml");
    std::fs::write(&bad, text).unwrap();
    let (r, _) = run_suite(&bad, &dir.path().join("never"), &[]);
    r.expect(1)
        .has("FAIL ends (boot once: the VM ended before its KVMRUN-READY line (exit status: 1))")
        .has(
            "FAIL hangs (boot once: the VM ended before its KVMRUN-READY line (exit status: 124))",
        );
}
