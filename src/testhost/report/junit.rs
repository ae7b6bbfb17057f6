//! JUnit XML as Jenkins, GitLab and GitHub read it: one testsuite per
//! suite file, one testcase per finished test; a failure's message is the
//! guest's summary or the runner's reason (timeout, signal), the serial
//! log is the testcase's system-out and kvmrun's stderr its system-err.

use std::path::Path;

use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};

use super::ReportError;
use crate::testhost::SuiteRun;
use crate::testhost::{TestSpec, Verdict};

pub fn render(suite_name: &str, specs: &[TestSpec], run: &SuiteRun) -> Result<String, ReportError> {
    let mut suite = TestSuite::new(suite_name);
    suite.set_time(run.wall);
    for r in run.results.iter().flatten() {
        let o = &r.outcome;
        let message = o.message();
        let status = match o.verdict {
            Verdict::Pass => TestCaseStatus::success(),
            Verdict::Skip => {
                let mut st = TestCaseStatus::skipped();
                if !message.is_empty() {
                    st.set_message(message.clone());
                }
                st
            }
            Verdict::Fail => {
                let mut st = TestCaseStatus::non_success(NonSuccessKind::Failure);
                st.set_message(if message.is_empty() {
                    "FAIL".to_string()
                } else {
                    message.clone()
                });
                if let Some(code) = o.status {
                    st.set_type(format!("exit status {code}"));
                }
                st
            }
        };
        let mut tc = TestCase::new(r.name.clone(), status);
        tc.set_classname(suite_name);
        tc.set_time(r.duration);
        if !r.serial.is_empty() {
            tc.set_system_out(r.serial.clone());
        }
        if !r.stderr.is_empty() {
            tc.set_system_err(r.stderr.clone());
        }
        suite.add_test_case(tc);
    }
    if run.interrupted {
        let done = run.results.iter().flatten().count();
        suite.set_system_err(format!("interrupted after {done} of {} tests", specs.len()));
    }
    let mut report = Report::new("kvmrun test");
    report.set_time(run.wall);
    report.add_test_suite(suite);
    Ok(report.to_string()?)
}

pub fn write(
    path: &Path,
    suite_name: &str,
    specs: &[TestSpec],
    run: &SuiteRun,
) -> Result<(), ReportError> {
    let xml = render(suite_name, specs, run)?;
    std::fs::write(path, xml).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}
