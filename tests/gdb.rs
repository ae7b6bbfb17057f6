//! The gdb stub with Debian's gdb in batch mode on the gdbtarget guest:
//! hardware breakpoints on a symbol, stepping, reading and writing
//! globals, a watchpoint that fires, Ctrl-C, the exit status, and what
//! the host's KVM cannot do refused with its reason. Every wait is on an
//! event (a line of output, a process's end); the timeouts only stop a
//! broken run from hanging the suite.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use common::{guest, guest_file, kvm_available, kvm_module, kvmrun, Run};

const GDB: &str = "/usr/bin/gdb";
/// gdbtarget's status: 3 untouched, 4 with poke set, as (v << 1) | 1.
const UNTOUCHED: i32 = 7;
const POKED: i32 = 9;
const BACKSTOP: Duration = Duration::from_secs(120);

fn ready() -> bool {
    if !kvm_available() {
        return false;
    }
    assert!(
        Path::new(GDB).exists(),
        "{GDB} is missing: `make test` installs Debian's gdb"
    );
    true
}

fn symbols() -> PathBuf {
    guest_file("obj/gdbtarget.elf64")
}

fn pvm() -> bool {
    kvm_module() == Some("kvm_pvm")
}

/// A kvmrun VM whose stdout and stderr lines arrive on one channel.
struct Vm {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

fn pipe_lines(r: impl std::io::Read + Send + 'static, tx: std::sync::mpsc::Sender<String>) {
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
}

impl Vm {
    fn start(args: &[&str]) -> Vm {
        let mut c = kvmrun();
        c.arg("run")
            .arg(guest("gdbtarget"))
            .args(["--timeout", "120"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("cannot start kvmrun");
        let (tx, lines) = channel();
        pipe_lines(child.stdout.take().unwrap(), tx.clone());
        pipe_lines(child.stderr.take().unwrap(), tx);
        Vm {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn wait_for(&mut self, text: &str) {
        loop {
            match self.lines.recv_timeout(BACKSTOP) {
                Ok(l) => {
                    let hit = l.contains(text);
                    self.seen.push(l);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!(
                    "no {text:?} from kvmrun; it said:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn finish(mut self) -> Run {
        let status = self.child.wait().unwrap().code().unwrap_or(-1);
        self.seen.extend(self.lines.iter());
        let text = self.seen.join("\n");
        Run {
            status,
            stdout: text.clone(),
            stderr: text,
        }
    }
}

fn sock(dir: &tempfile::TempDir) -> String {
    dir.path().join("gdb.sock").to_string_lossy().into_owned()
}

/// Start gdbtarget stopped before its first instruction, as --gdb-wait.
fn waiting(dir: &tempfile::TempDir, extra: &[&str]) -> Vm {
    let s = sock(dir);
    let mut args = vec!["--gdb", s.as_str(), "--gdb-wait"];
    args.extend_from_slice(extra);
    let mut vm = Vm::start(&args);
    vm.wait_for("waiting for gdb");
    vm
}

fn gdb_command(target: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new(GDB);
    c.args(["-q", "-nx", "-batch", "-ex", "set pagination off"])
        .args(["-ex", &format!("target remote {target}")]);
    for x in cmds {
        c.args(["-ex", x]);
    }
    c.arg(symbols()).stdin(Stdio::null());
    c
}

/// Run gdb in batch mode to its end; its output.
fn gdb(target: &str, cmds: &[&str]) -> String {
    let o = gdb_command(target, cmds).output().expect("cannot run gdb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("--- gdb transcript\n{text}");
    text
}

#[test]
fn gdb_breaks_on_a_symbol_steps_reads_watches_and_sees_the_exit() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = waiting(&dir, &[]);
    // KVM-PVM's emulator checks no data breakpoints: gdb watches by
    // single-stepping there (docs/DEBUGGING.md).
    let hw_watch = if pvm() { "0" } else { "1" };
    let out = gdb(
        &sock(&dir),
        &[
            "hbreak bump",
            "continue",
            "print counter",
            "print by",
            "next",
            "print counter",
            "info registers rip cr0 efer",
            "stepi",
            "delete",
            &format!("set can-use-hw-watchpoints {hw_watch}"),
            "watch counter",
            "continue",
            "delete",
            "continue",
        ],
    );
    for want in [
        "Breakpoint 1, bump (by=by@entry=1)",
        "$1 = 0",
        "$2 = 1",
        "$3 = 1",
        "cr0            0x80000011",
        "atchpoint 2: counter\n\nOld value = 1\nNew value = 3",
        "[Inferior 1 (process 1) exited with code 07]",
    ] {
        assert!(out.contains(want), "gdb's output lacks {want:?}");
    }
    vm.finish().expect(UNTOUCHED).has("gdbtarget: counter=15");
}

#[test]
fn ctrl_c_stops_a_running_guest_and_gdb_writes_a_global() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = sock(&dir);
    let mut vm = Vm::start(&["-v", "--gdb", &s, "--", "spin=1"]);
    vm.wait_for("gdbtarget: spinning");
    let mut g = gdb_command(
        &s,
        &[
            "continue",
            "info threads",
            "set var poke = 1",
            "print poke",
            "continue",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // Interrupt once the stub has let the vCPUs go again for `continue`.
    vm.wait_for("gdb: vCPUs resumed");
    // SAFETY: kill() only sends a signal to our own child.
    unsafe { libc::kill(g.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    std::io::Read::read_to_string(g.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(g.stderr.as_mut().unwrap(), &mut out).unwrap();
    g.wait().unwrap();
    eprintln!("--- gdb transcript\n{out}");
    for want in [
        "received signal SIGINT",
        "Thread 1.1",
        "$1 = 1",
        "exited with code 011",
    ] {
        assert!(out.contains(want), "gdb's output lacks {want:?}");
    }
    vm.finish().expect(POKED);
}

#[test]
fn software_breakpoints_work_or_are_refused_with_the_reason() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = waiting(&dir, &[]);
    let out = gdb(&sock(&dir), &["break bump", "continue", "detach"]);
    if pvm() {
        assert!(out.contains("Cannot insert breakpoint 1"), "{out}");
        // gdb gave up on `continue`; detach lets the guest run to its end.
        let r = vm.finish();
        r.expect(UNTOUCHED)
            .err_has("refused: KVM-PVM's instruction emulator cannot execute int3");
    } else {
        assert!(out.contains("Breakpoint 1, bump"), "{out}");
        vm.finish().expect(UNTOUCHED);
    }
}

#[test]
fn a_tcp_stub_serves_gdb_and_refuses_a_port_in_use() {
    if !ready() {
        return;
    }
    // Port 0 would pick a free port we could not name: find one first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut vm = Vm::start(&["--gdb", &addr, "--gdb-wait"]);
    vm.wait_for("waiting for gdb");
    let r = Run::from(
        kvmrun()
            .args(["run", &guest("hello").to_string_lossy(), "--gdb", &addr])
            .output()
            .unwrap(),
    );
    r.expect(2).err_has(&format!(
        "--gdb {addr}: cannot listen: Address already in use"
    ));
    let out = gdb(&addr, &["hbreak main", "continue", "continue"]);
    assert!(out.contains("Breakpoint 1, main"), "{out}");
    vm.finish().expect(UNTOUCHED);
}

#[test]
fn bad_gdb_flags_are_refused_by_name() {
    if !ready() {
        return;
    }
    let hello = guest("hello").to_string_lossy().into_owned();
    let run =
        |args: &[&str]| Run::from(kvmrun().arg("run").arg(&hello).args(args).output().unwrap());
    run(&["--gdb", "host:port"])
        .expect(2)
        .err_has("the port is not a number");
    run(&["--gdb", "/no/such/dir/gdb.sock"])
        .expect(2)
        .err_has("--gdb /no/such/dir/gdb.sock: cannot listen");
    run(&["--gdb-wait"])
        .expect(2)
        .err_has("--gdb <PATH|HOST:PORT>");
    run(&["--gdb", "x.sock", "--gdb-arch", "arm"])
        .expect(2)
        .err_has("expected auto, x86-64 or i386");
    run(&["--gdb", "x.sock", "--migrate"])
        .expect(2)
        .err_has("cannot be used with");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    std::fs::write(&file, "").unwrap();
    run(&["--gdb", &file.to_string_lossy()])
        .expect(2)
        .err_has("exists and is not a socket");
}

#[test]
fn garbage_and_a_gdb_gone_mid_packet_leave_the_guest_running() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let vm = waiting(&dir, &[]);
    let s = sock(&dir);
    // Garbage: the stub ends that session and waits for another gdb.
    let mut c = std::os::unix::net::UnixStream::connect(&s).unwrap();
    c.write_all(b"$mzz,?#00").unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut c, &mut rest);
    // Half a packet, then gone: the guest is released and runs to its end.
    let mut c = std::os::unix::net::UnixStream::connect(&s).unwrap();
    c.write_all(b"$qSupported:multipro").unwrap();
    drop(c);
    let r = vm.finish();
    r.expect(UNTOUCHED)
        .has("gdbtarget: counter=15")
        .err_has("kvmrun: gdb: session ended: protocol:");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn a_snapshot_is_refused_while_gdb_is_attached() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    let snap = dir.path().join("snap");
    let vm = waiting(&dir, &["--api", &api.to_string_lossy()]);
    let snapshot = format!(
        "shell {} snapshot {} {}",
        env!("CARGO_BIN_EXE_kvmrun"),
        api.display(),
        snap.display()
    );
    let out = gdb(&sock(&dir), &[&snapshot, "continue"]);
    assert!(
        out.contains("cannot snapshot while gdb is attached"),
        "{out}"
    );
    assert!(out.contains("exited with code 07"), "{out}");
    assert!(!snap.join("state").exists());
    vm.finish().expect(UNTOUCHED);
}

#[test]
fn the_gdb_thread_runs_under_its_own_seccomp_filter() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let r = Run::from(
        kvmrun()
            .env("KVMRUN_TEST_FORBIDDEN_CALL", "gdb:openat")
            .args(["run", &guest("gdbtarget").to_string_lossy()])
            .args(["--gdb", &sock(&dir), "--gdb-wait", "--timeout", "120"])
            .output()
            .unwrap(),
    );
    r.expect(159)
        .err_has("seccomp: thread 'gdb' made the system call openat");
}

#[test]
fn test_gdb_on_fail_reruns_a_failed_test_for_the_printed_gdb_command() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let suite = dir.path().join("s.toml");
    std::fs::write(
        &suite,
        format!(
            "[[test]]\nname = \"wants-zero\"\nkernel = \"{}\"\nexpect_status = 0\n",
            guest("gdbtarget").display()
        ),
    )
    .unwrap();
    let mut t = kvmrun()
        .arg("test")
        .arg(&suite)
        .args(["--gdb-on-fail", "--progress", "lines", "-o"])
        .arg(dir.path().join("logs"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(t.stdout.take().unwrap()).lines();
    let cmd = loop {
        let l = lines
            .next()
            .expect("kvmrun test printed no gdb command")
            .unwrap();
        if let Some(c) = l.trim().strip_prefix("gdb ") {
            break c.to_string();
        }
    };
    let words = shlex::split(&cmd).expect("a shell command line");
    assert!(
        words.iter().any(|w| w.ends_with("obj/gdbtarget.elf64")),
        "{cmd}"
    );
    let o = Command::new(GDB)
        .args(&words)
        .args([
            "-nx",
            "-batch",
            "-ex",
            "hbreak bump",
            "-ex",
            "continue",
            "-ex",
            "continue",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Breakpoint 1, bump"), "{out}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(t.wait().unwrap().code(), Some(1));
    assert!(
        rest.iter()
            .any(|l| l == "wants-zero ended again with status 7"),
        "{rest:?}"
    );
}
