//! kvmrun as a test host: run a suite of tests, each in its own VM (a
//! `kvmrun run` child process), in parallel, with kvm-unit-tests' verdict
//! rules, and report the results for people and for CI.
//!
//! Suites come from two formats that both turn into `TestSpec`s:
//! kvm-unit-tests' `unittests.cfg` (`cfg`, planned by `kut`) and kvmrun's
//! own TOML format for Linux functional tests (`linux`). `scheduler` runs
//! the specs, `progress` shows them, `report` writes TAP and JUnit.

pub mod cfg;
pub mod envfile;
pub mod kut;
pub mod linux;
pub mod once;
pub mod progress;
pub mod report;
pub mod scheduler;
pub mod translate;
pub mod verdict;

use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;

pub use verdict::{Outcome, Verdict};

/// Default per-test timeout, as kvm-unit-tests' runner has it.
pub const DEFAULT_TIMEOUT: &str = "90s";

/// One test of a suite, ready to run or already decided.
#[derive(Clone, Debug)]
pub struct TestSpec {
    pub name: String,
    pub groups: Vec<String>,
    pub plan: Plan,
}

#[derive(Clone, Debug)]
pub enum Plan {
    /// Decided without a VM (the runner-side skips).
    Skip(String),
    Run(RunSpec),
}

/// How to start one test's VM and judge its end.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub image: PathBuf,
    /// `kvmrun run` flags after the image, without --timeout, --initrd,
    /// --serial and the migration flags, which the scheduler adds.
    pub args: Vec<String>,
    /// Answer the guest's migration requests (`--migrate`), as
    /// kvm-unit-tests' `run_migration()` does for the `migration` group.
    pub migrate: bool,
    /// Environment file contents, written next to the log and passed as
    /// `--initrd` (kvm-unit-tests' `initrd_create()`).
    pub env_file: Option<String>,
    /// An initrd given by the suite itself (Linux tests).
    pub initrd: Option<PathBuf>,
    /// `None`: no limit (a cfg timeout of 0, as timeout(1) reads it).
    pub timeout_secs: Option<f64>,
    /// The timeout as the runner prints it in "timeout; duration=...".
    pub timeout_text: String,
    pub judge: Judge,
    /// Run from a restore of a VM booted once for every test with the
    /// same boot (`once`), instead of booting with `args`.
    pub once: Option<Box<Once>>,
}

/// How a boot-once test runs: its boot group's VM boots with
/// `boot_args`, the test host snapshots it at its ready line, and the
/// test's VM is a restore of that snapshot that reads `input` on COM1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Once {
    /// `kvmrun run` flags of the boot: `args` with the command line that
    /// asks the guest to wait for its command.
    pub boot_args: Vec<String>,
    /// The test's command and a newline.
    pub input: String,
}

#[derive(Clone, Debug)]
pub enum Judge {
    /// kvm-unit-tests' rules (`verdict::fixup_status` then `verdict::decide`).
    Kut,
    /// Linux functional tests: an exact exit status and output patterns.
    Expect {
        status: i32,
        output: Vec<Regex>,
        reject: Vec<Regex>,
    },
}

/// A finished test.
#[derive(Clone, Debug)]
pub struct TestResult {
    pub name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    /// Guest serial output (empty for runner-side skips).
    pub serial: String,
    /// kvmrun's own diagnostics.
    pub stderr: String,
    /// The child command line, for logs and reports.
    pub command: String,
}

/// Parse a duration the way timeout(1) does: a non-negative number with an
/// optional s, m, h or d suffix.
pub fn parse_duration(s: &str) -> Option<f64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last()? {
        's' => (&t[..t.len() - 1], 1.0),
        'm' => (&t[..t.len() - 1], 60.0),
        'h' => (&t[..t.len() - 1], 3600.0),
        'd' => (&t[..t.len() - 1], 86400.0),
        _ => (t, 1.0),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some(n * mult)
}

/// Test names become file names in the output directory.
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect()
}

/// The results, in suite order; `None` for tests stopped or never started
/// because of an interrupt.
pub struct SuiteRun {
    pub results: Vec<Option<TestResult>>,
    pub interrupted: bool,
    pub wall: Duration,
    /// The boot-once groups' boots, for the summary (`once::Boots`).
    pub boot_once: Option<String>,
}

impl SuiteRun {
    pub fn count(&self, v: Verdict) -> usize {
        self.results
            .iter()
            .flatten()
            .filter(|r| r.outcome.verdict == v)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_timeout_1() {
        assert_eq!(parse_duration("90s"), Some(90.0));
        assert_eq!(parse_duration("30"), Some(30.0));
        assert_eq!(parse_duration("1.5m"), Some(90.0));
        assert_eq!(parse_duration("2h"), Some(7200.0));
        assert_eq!(parse_duration("1d"), Some(86400.0));
        assert_eq!(parse_duration("0"), Some(0.0));
        for bad in ["", "s", "-1", "ten", "1e3", "5x", "nan"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_safe_file_stems() {
        assert_eq!(file_stem("a/b"), "a_b");
        assert_eq!(file_stem("vmx_pf-x.y"), "vmx_pf-x.y");
    }
}
