//! The AMD-V host (`scripts/amdv`): Debian's cloud kernel as L1 under QEMU
//! TCG, whose own kvm-amd.ko gives a real SVM /dev/kvm. One L1 boot runs a
//! batch of checks (`resources/amdv/*.batch`); each check's exit status and
//! files come back here through the results port, for the tests to assert on.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::Run;

/// One check's result.
pub struct Check {
    pub name: String,
    /// The batch line's command.
    pub cmd: String,
    pub status: i32,
    pub seconds: f64,
    /// `stdout`, `stderr` and the files the check wrote into `$OUT`.
    pub files: BTreeMap<String, String>,
}

impl Check {
    /// The check as a run: its status, stdout and stderr.
    pub fn run(&self) -> Run {
        Run {
            status: self.status,
            stdout: self.file("stdout").to_string(),
            stderr: self.file("stderr").to_string(),
        }
    }

    /// One of its files; a missing file fails the test with the check's output.
    pub fn file(&self, name: &str) -> &str {
        self.files.get(name).map(String::as_str).unwrap_or_else(|| {
            panic!(
                "check {} has no file {name} (status {})\n--- stdout\n{}\n--- stderr\n{}",
                self.name,
                self.status,
                self.files.get("stdout").map_or("", |s| s),
                self.files.get("stderr").map_or("", |s| s)
            )
        })
    }
}

/// A batch's results, as far as L1 got.
pub struct Batch {
    pub checks: BTreeMap<String, Check>,
    /// Whether the batch ran to its end (`@@done`).
    pub done: bool,
    pub console: PathBuf,
    pub wall_seconds: f64,
    /// L1 boots it took (`scripts/amdv --boots`).
    pub boots: u32,
    /// Why each lost L1 was stopped early, as far as L1 said
    /// (`@@l1-unsound`).
    pub unsound: Vec<String>,
}

impl Batch {
    /// The checks run again (a crashed or stalled guest before), each with
    /// the status lines of its earlier runs.
    pub fn second_runs(&self) -> Vec<(String, Vec<String>)> {
        self.checks
            .values()
            .filter_map(|c| {
                let earlier: Vec<String> = ["first-attempt", "second-attempt"]
                    .iter()
                    .filter_map(|f| c.files.get(*f))
                    .map(|t| t.lines().next().unwrap_or("").to_string())
                    .collect();
                (!earlier.is_empty()).then(|| (c.name.clone(), earlier))
            })
            .collect()
    }

    /// A check by name; a check that never reported fails the test with the
    /// end of L1's console, where the reason is.
    pub fn check(&self, name: &str) -> &Check {
        self.checks.get(name).unwrap_or_else(|| {
            let console = std::fs::read_to_string(&self.console).unwrap_or_default();
            let tail: Vec<&str> = console.lines().rev().take(40).collect();
            panic!(
                "check {name} did not report (batch {}finished; L1 console {}):\n{}",
                if self.done { "" } else { "not " },
                self.console.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }
}

/// The L1 boots in the results port's text (one `@@batch` each) and the
/// reasons L1s were lost (`@@l1-unsound`).
pub fn boots(text: &str) -> (u32, Vec<String>) {
    let mut n = 0;
    let mut unsound = Vec::new();
    for line in text.split('\n') {
        if line.starts_with("@@batch ") {
            n += 1;
        } else if let Some(why) = line.strip_prefix("@@l1-unsound ") {
            unsound.push(why.to_string());
        }
    }
    (n, unsound)
}

/// Parse the results port's text (`resources/amdv/run-batch` writes it).
pub fn parse(text: &str) -> (BTreeMap<String, Check>, bool) {
    let mut checks = BTreeMap::new();
    let mut done = false;
    let mut cur: Option<Check> = None;
    let mut file: Option<String> = None;
    for line in text.split('\n') {
        if let Some(data) = line.strip_prefix('|') {
            if let (Some(c), Some(f)) = (cur.as_mut(), file.as_ref()) {
                let s = c.files.entry(f.clone()).or_default();
                s.push_str(data);
                s.push('\n');
            }
            continue;
        }
        let mut words = line.splitn(2, ' ');
        let (tag, rest) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        match tag {
            "@@check" => {
                cur = Some(Check {
                    name: rest.to_string(),
                    cmd: String::new(),
                    status: -1,
                    seconds: 0.0,
                    files: BTreeMap::new(),
                });
                file = None;
            }
            "@@cmd" => {
                if let Some(c) = cur.as_mut() {
                    c.cmd = rest.to_string();
                }
            }
            "@@file" => {
                if let Some(c) = cur.as_mut() {
                    c.files.entry(rest.to_string()).or_default();
                }
                file = Some(rest.to_string());
            }
            "@@end" => {
                let f: Vec<&str> = rest.split(' ').collect();
                if let (Some(mut c), [name, status, secs]) = (cur.take(), f.as_slice()) {
                    if c.name == *name {
                        c.status = status.parse().unwrap_or(-1);
                        c.seconds = secs.parse().unwrap_or(0.0);
                        checks.insert(c.name.clone(), c);
                    }
                }
                file = None;
            }
            "@@done" => done = true,
            _ => {}
        }
    }
    (checks, done)
}

/// Boot L1 once and run `batch` (resources/amdv/BATCH.batch) with
/// `scripts/amdv`, which packs target/release/kvmrun. Err says why the host
/// cannot run it (QEMU missing, `make amdv` not run), as scripts/amdv does.
/// `KVMRUN_AMDV_RESULTS=FILE` asserts on an earlier run's results instead,
/// without booting L1.
pub fn run_batch(batch: &str) -> Result<Batch, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("build/amdv");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let results = dir.join(format!("{batch}-results.txt"));
    let console = dir.join(format!("{batch}-console.log"));
    if let Some(earlier) = std::env::var_os("KVMRUN_AMDV_RESULTS") {
        let text = std::fs::read(&earlier)
            .map_err(|e| format!("KVMRUN_AMDV_RESULTS={}: {e}", earlier.to_string_lossy()))?;
        let text = String::from_utf8_lossy(&text);
        let (checks, done) = parse(&text);
        let (boots, unsound) = boots(&text);
        return Ok(Batch {
            checks,
            done,
            console,
            wall_seconds: 0.0,
            boots,
            unsound,
        });
    }
    eprintln!(
        "amdv: booting L1 for batch {batch}; progress in {}",
        console.display()
    );
    let t0 = Instant::now();
    let mut cmd = Command::new(root.join("scripts/amdv"));
    // A backstop under CI's 90 minutes for all L1 boots together (the
    // rest of `make test` takes about 12): the batch takes 9-17 minutes
    // in one boot; lost L1s (docs/TESTHOST.md, "Failures of the
    // platform") cost a boot each and the checks rerun.
    cmd.args(["--batch", batch, "--timeout", "4200", "--results"])
        .arg(&results)
        .arg("--console")
        .arg(&console);
    // SAFETY: prctl() is async-signal-safe and touches no memory of the
    // parent. L1 must not outlive the test (scripts/amdv stops QEMU on
    // SIGTERM).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start scripts/amdv: {e}"))?;
    let wall_seconds = t0.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() == Some(3) {
        return Err(stderr.trim().to_string());
    }
    // Its account of the boots: which L1 was lost, why, what ran again.
    eprint!("{stderr}");
    let text =
        std::fs::read(&results).map_err(|e| format!("{}: {e}\n{stderr}", results.display()))?;
    let text = String::from_utf8_lossy(&text);
    let (checks, done) = parse(&text);
    let (boots, unsound) = boots(&text);
    let b = Batch {
        checks,
        done,
        console,
        wall_seconds,
        boots,
        unsound,
    };
    eprintln!(
        "amdv: batch {batch}: {} checks in {wall_seconds:.0} s, {} L1 boot(s){}",
        b.checks.len(),
        b.boots,
        if b.done { "" } else { " (did not finish)" }
    );
    for why in &b.unsound {
        eprintln!("amdv: an L1 was lost: its kernel logged {why}");
    }
    for (name, earlier) in b.second_runs() {
        eprintln!(
            "amdv: check {name} ran {} times: the earlier runs ended with {}",
            earlier.len() + 1,
            earlier.join("; ")
        );
    }
    Ok(b)
}

/// Whether the batch was asked for (`make test-amdv` sets KVMRUN_AMDV=1).
pub fn wanted() -> bool {
    std::env::var("KVMRUN_AMDV").as_deref() == Ok("1")
}

/// Whether a test may skip when the AMD-V host cannot run here.
pub fn allowed_missing() -> bool {
    std::env::var("KVMRUN_ALLOW_NO_AMDV").as_deref() == Ok("1")
}
