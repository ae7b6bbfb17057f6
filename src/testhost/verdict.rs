//! Verdicts, decided exactly as kvm-unit-tests' runner decides them.
//!
//! The runner first turns QEMU's raw exit status into a "fixed up" one
//! (`qemu_fixup_return_code()` in `scripts/vmm.bash`) and then maps that to
//! PASS/FAIL/SKIP (`run()` in `scripts/runtime.bash`). kvmrun exits with
//! QEMU's statuses, so the same two steps apply unchanged.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Pass,
    Fail,
    Skip,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        })
    }
}

/// A finished test's verdict and the text the runner prints after its
/// name: the guest's summary, or why it was skipped or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// `(SUMMARY text)` from the guest, possibly empty.
    pub summary: String,
    /// Why the runner decided without (or despite) the guest: "timeout;
    /// duration=90s", "test marked as manual run only", ...
    pub reason: Option<String>,
    /// Status after fix-up; `None` when no VM ran.
    pub status: Option<i32>,
}

impl Outcome {
    /// A verdict reached without starting a VM.
    pub fn runner_skip(reason: impl Into<String>) -> Self {
        Outcome {
            verdict: Verdict::Skip,
            summary: String::new(),
            reason: Some(reason.into()),
            status: None,
        }
    }

    /// The reason, or the guest's summary, without the parentheses.
    pub fn message(&self) -> String {
        match &self.reason {
            Some(r) => r.clone(),
            None => self
                .summary
                .lines()
                .map(|l| l.trim_start_matches('(').trim_end_matches(')'))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// What follows the test name on the runner's result line.
    pub fn detail(&self) -> String {
        match &self.reason {
            Some(r) => format!("({r})"),
            None => self.summary.clone(),
        }
    }
}

/// How the child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawExit {
    Code(i32),
    Signal(i32),
}

/// `qemu_fixup_return_code()`: 0 (no debug-exit) is a failure unless
/// stderr reports a signal; 1 is success only when every stderr line
/// mentions "warning"; a signal death reads as 128 + signal, as bash
/// reports it.
pub fn fixup_status(raw: RawExit, stderr: &str) -> i32 {
    let code = match raw {
        RawExit::Signal(sig) => return 128 + sig,
        RawExit::Code(c) => c,
    };
    let stderr = stderr.trim_end_matches('\n');
    match code {
        0 => match signal_in_stderr(stderr) {
            Some(sig) => 128 + sig,
            None => 1,
        },
        1 if stderr.is_empty()
            || stderr
                .lines()
                .all(|l| l.to_ascii_lowercase().contains("warning")) =>
        {
            0
        }
        c => c,
    }
}

/// QEMU's "terminating on signal N" message, as the runner greps for it.
fn signal_in_stderr(stderr: &str) -> Option<i32> {
    let line = stderr
        .lines()
        .find(|l| l.contains("terminating on signal"))?;
    let rest = line.split("terminating on signal ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `extract_summary()`: `SUMMARY:` lines among the last five lines of the
/// output, trailing CR removed, as "(text)".
pub fn extract_summary(serial: &str) -> String {
    let lines: Vec<&str> = serial.lines().collect();
    let tail = &lines[lines.len().saturating_sub(5)..];
    tail.iter()
        .filter_map(|l| l.strip_prefix("SUMMARY: "))
        .map(|s| format!("({})", s.strip_suffix('\r').unwrap_or(s)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Short name of a signal, for "terminated on SIGxxx".
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "HUP",
        2 => "INT",
        3 => "QUIT",
        4 => "ILL",
        5 => "TRAP",
        6 => "ABRT",
        7 => "BUS",
        8 => "FPE",
        9 => "KILL",
        10 => "USR1",
        11 => "SEGV",
        12 => "USR2",
        13 => "PIPE",
        14 => "ALRM",
        15 => "TERM",
        _ => return format!("SIG{sig}"),
    };
    format!("SIG{name}")
}

/// The runner's verdict for a fixed-up status. `timeout` is the timeout as
/// the runner prints it ("90s").
pub fn decide(status: i32, serial: &str, timeout: &str) -> Outcome {
    let summary = extract_summary(serial);
    let (verdict, reason) = match status {
        0 => (Verdict::Pass, None),
        77 => (Verdict::Skip, None),
        124 => (Verdict::Fail, Some(format!("timeout; duration={timeout}"))),
        s if s > 127 => (
            Verdict::Fail,
            Some(format!("terminated on {}", signal_name(s - 128))),
        ),
        _ => (Verdict::Fail, None),
    };
    Outcome {
        verdict,
        summary,
        reason,
        status: Some(status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixup_follows_the_runner() {
        use RawExit::*;
        assert_eq!(fixup_status(Code(1), ""), 0);
        assert_eq!(fixup_status(Code(1), "\n"), 0);
        assert_eq!(fixup_status(Code(1), "kvmrun: warning: x\nWARNING y\n"), 0);
        assert_eq!(fixup_status(Code(1), "kvmrun: warning: x\nboom\n"), 1);
        assert_eq!(fixup_status(Code(0), ""), 1);
        assert_eq!(
            fixup_status(Code(0), "qemu: terminating on signal 15 from pid 9"),
            143
        );
        assert_eq!(fixup_status(Code(3), "anything"), 3);
        assert_eq!(fixup_status(Code(77), ""), 77);
        assert_eq!(fixup_status(Code(124), ""), 124);
        assert_eq!(fixup_status(Signal(9), ""), 137);
    }

    #[test]
    fn verdicts_from_statuses() {
        let d = |s| decide(s, "", "90s");
        assert_eq!(d(0).verdict, Verdict::Pass);
        assert_eq!(d(77).verdict, Verdict::Skip);
        for s in [1, 2, 3, 4, 5, 127] {
            assert_eq!(d(s).verdict, Verdict::Fail, "{s}");
            assert_eq!(d(s).reason, None);
        }
        let t = d(124);
        assert_eq!(
            (t.verdict, t.detail()),
            (Verdict::Fail, "(timeout; duration=90s)".into())
        );
        let k = d(137);
        assert_eq!(
            (k.verdict, k.detail()),
            (Verdict::Fail, "(terminated on SIGKILL)".into())
        );
    }

    #[test]
    fn summary_comes_from_the_last_five_lines() {
        let out = "SUMMARY: old\r\na\nb\nc\nd\nSUMMARY: 12 tests, 1 unexpected failures\r\n";
        assert_eq!(extract_summary(out), "(12 tests, 1 unexpected failures)");
        let out = "SUMMARY: too early\n1\n2\n3\n4\n5\n";
        assert_eq!(extract_summary(out), "");
        assert_eq!(extract_summary(""), "");
        let o = decide(0, "PASS: x\nSUMMARY: 1 tests\n", "90s");
        assert_eq!(o.detail(), "(1 tests)");
        // A skip keeps the guest's own summary.
        let o = decide(77, "SUMMARY: 3 tests, 3 skipped\n", "90s");
        assert_eq!(
            (o.verdict, o.detail()),
            (Verdict::Skip, "(3 tests, 3 skipped)".into())
        );
    }
}
