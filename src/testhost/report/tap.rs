//! TAP version 13: one line per finished test, a YAML block for failures,
//! and "Bail out!" when the suite was interrupted.

use std::fmt::Write;
use std::path::Path;

use super::ReportError;
use crate::testhost::SuiteRun;
use crate::testhost::{TestSpec, Verdict};

/// TAP descriptions end at a '#', which starts a directive.
fn clean(s: &str) -> String {
    s.replace('#', "\\#").replace('\n', " ")
}

pub fn render(specs: &[TestSpec], run: &SuiteRun) -> String {
    let done: Vec<_> = run.results.iter().flatten().collect();
    let mut s = String::from("TAP version 13\n");
    let _ = writeln!(s, "1..{}", done.len());
    for (n, r) in done.iter().enumerate() {
        let n = n + 1;
        let o = &r.outcome;
        let detail = o.detail();
        let desc = if detail.is_empty() {
            clean(&r.name)
        } else {
            clean(&format!("{} {}", r.name, detail))
        };
        match o.verdict {
            Verdict::Pass => {
                let _ = writeln!(s, "ok {n} - {desc}");
            }
            Verdict::Skip => {
                let line = format!("ok {n} - {} # SKIP {}", clean(&r.name), clean(&o.message()));
                let _ = writeln!(s, "{}", line.trim_end());
            }
            Verdict::Fail => {
                let _ = writeln!(s, "not ok {n} - {desc}");
                let _ = writeln!(s, "  ---");
                if let Some(st) = o.status {
                    let _ = writeln!(s, "  status: {st}");
                }
                let _ = writeln!(s, "  duration_ms: {}", r.duration.as_millis());
                if !r.command.is_empty() {
                    let _ = writeln!(s, "  command: {:?}", r.command);
                }
                let _ = writeln!(s, "  ...");
            }
        }
    }
    if run.interrupted {
        let _ = writeln!(
            s,
            "Bail out! Interrupted after {} of {} tests",
            done.len(),
            specs.len()
        );
    }
    s
}

pub fn write(path: &Path, specs: &[TestSpec], run: &SuiteRun) -> Result<(), ReportError> {
    std::fs::write(path, render(specs, run)).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}
