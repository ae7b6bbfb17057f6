//! The control socket and host resources under abuse: each abuse gets a
//! clear error where it came from, and the VM runs on unharmed (the
//! checksum guest still ends with the right result).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::console::{ctl, wait_socket, Console};
use common::{guest, kvm_available, run_guest};

const PASS: i32 = 1;

/// The checksum guest, waiting for a key, serving `sock`.
fn checksum_vm(sock: &Path) -> Console {
    let image = guest("checksum");
    let vm = Console::spawn(&[
        "run",
        image.to_str().unwrap(),
        "--timeout",
        "300",
        "--api",
        sock.to_str().unwrap(),
        "--",
        "wait",
    ]);
    wait_socket(sock);
    vm
}

/// The VM goes on: it answers, takes its key and ends as it should.
fn unharmed(mut vm: Console, sock: &Path) {
    ctl(&["status", sock.to_str().unwrap()])
        .expect(0)
        .has("\"state\":\"running\"");
    vm.wait_for("waiting for a key");
    vm.key();
    let r = vm.finish();
    r.expect(PASS)
        .has("SUMMARY: 3 tests, 0 unexpected failures");
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

fn answer(s: &UnixStream) -> String {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn the_socket_is_private_and_serves_one_client() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let vm = checksum_vm(&sock);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let mut first = UnixStream::connect(&sock).unwrap();
    first.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(answer(&first).contains("\"ok\":true"));
    // A second client while the first is connected: an error, then EOF.
    let second = UnixStream::connect(&sock).unwrap();
    let a = answer(&second);
    assert!(a.contains("\"ok\":false"), "{a}");
    assert!(a.contains("another client is connected"), "{a}");
    assert_eq!(answer(&second), "", "the second client is closed");
    // The first is served on.
    first.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(answer(&first).contains("\"ok\":true"));
    drop(first);
    unharmed(vm, &sock);
}

#[test]
fn bad_requests_get_errors_on_their_connection() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    let vm = checksum_vm(&sock);
    let cases: [(&[u8], &str); 3] = [
        (b"{\"cmd\":\"sta\xfftus\"}\n", "not UTF-8"),
        (b"{\"cmd\":\n", "incomplete JSON object"),
        (b"{\"cmd\":\"snapshot\",\"dir\":7}\n", "bad request"),
    ];
    for (line, error) in cases {
        let mut c = UnixStream::connect(&sock).unwrap();
        c.write_all(line).unwrap();
        let a = answer(&c);
        assert!(a.contains("\"ok\":false") && a.contains(error), "{a}");
        // The connection stays: the next request is answered.
        c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
        assert!(answer(&c).contains("\"ok\":true"));
    }
    // 10 MiB without a newline: an error once the line passes 64 KiB,
    // then the connection is closed.
    let c = UnixStream::connect(&sock).unwrap();
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..10 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut all = String::new();
    let _ = (&c).read_to_string(&mut all);
    writer.join().unwrap();
    assert!(all.contains("longer than 65536 bytes"), "{all}");
    // A client that leaves in the middle of a request.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(b"{\"cmd\":\"sta").unwrap();
    drop(c);
    unharmed(vm, &sock);
}

/// A 1 MiB tmpfs at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a 1 MiB tmpfs at {} (needs root)",
            dir.display()
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Bytes free on the file system of `p`.
fn free(p: &Path) -> u64 {
    // SAFETY: statvfs is plain data, filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

/// The touch guest (16 MiB of non-zero pages), ready and waiting.
fn touch_vm(sock: &Path) -> Console {
    let image = guest("touch");
    let mut vm = Console::spawn(&[
        "run",
        image.to_str().unwrap(),
        "--mem",
        "32M",
        "--timeout",
        "300",
        "--api",
        sock.to_str().unwrap(),
        "--",
        "touch",
    ]);
    wait_socket(sock);
    vm.wait_for("ready");
    vm
}

#[test]
fn a_snapshot_into_a_full_file_system_fails_cleanly() {
    if !kvm_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let full = Tmpfs::mount(&d.path().join("full"));
    let sock = d.path().join("api.sock");
    let s = sock.to_str().unwrap();
    let snap = full.0.join("snap");
    let mut vm = touch_vm(&sock);
    // The memory file does not fit.
    ctl(&["snapshot", s, snap.to_str().unwrap()])
        .expect(2)
        .err_has("No space left on device");
    assert_eq!(names(&snap), Vec::<String>::new(), "left behind");
    ctl(&["status", s]).expect(0).has("\"state\":\"running\"");
    vm.key();
    vm.finish().expect(PASS).has("touched 16 MiB");

    // The memory fits, the state does not: no memory file stays behind
    // without its state. A guest with little data, and room for it only.
    let vm = Console::spawn(&[
        "run",
        guest("hang").to_str().unwrap(),
        "--timeout",
        "300",
        "--api",
        s,
    ]);
    wait_socket(&sock);
    let pad = full.0.join("pad");
    let room = 100 << 10;
    std::fs::write(&pad, vec![1u8; (free(&full.0) - room) as usize]).unwrap();
    ctl(&["snapshot", s, snap.to_str().unwrap()])
        .expect(2)
        .err_has("No space left on device");
    assert_eq!(names(&snap), Vec::<String>::new(), "left behind");
    assert!(free(&full.0) >= room, "the space came back");
    ctl(&["status", s]).expect(0).has("\"state\":\"running\"");
    ctl(&["quit", s]).expect(0);
    vm.finish().expect(0);
}

#[test]
fn memory_beyond_the_host_is_refused_or_allowed_by_overcommit() {
    if !kvm_available() {
        return;
    }
    let host = kvmrun::backing::Host::read().expect("/proc/meminfo");
    let gib = ((host.ram + host.swap) >> 30) + 2;
    let mem = format!("{gib}G");
    let r = run_guest("hello", &["--mem", &mem]);
    match host.overcommit {
        1 => {
            r.expect(PASS);
        }
        2 => {
            r.expect(2).err_has("vm.overcommit_memory=2");
        }
        _ => {
            r.expect(2).err_has(&format!(
                "--mem {} MiB: more than this host's RAM and swap",
                gib << 10
            ));
        }
    }
}
