//! What a person sees while a suite runs: a live indicatif bar on a
//! terminal, one plain result line per test otherwise (CI logs), and a
//! summary table at the end.

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Plan, SuiteRun, TestResult, TestSpec, Verdict};

pub trait Progress {
    fn begin(&mut self, total: usize);
    fn started(&mut self, name: &str);
    fn finished(&mut self, result: &TestResult);
    /// Called every poll; redraws what needs it.
    fn tick(&mut self) {}
    fn end(&mut self);
}

/// The runner's result line: "PASS name (summary)".
pub fn result_line(r: &TestResult) -> String {
    let detail = r.outcome.detail();
    if detail.is_empty() {
        format!("{} {}", r.outcome.verdict, r.name)
    } else {
        format!("{} {} {}", r.outcome.verdict, r.name, detail)
    }
}

/// Plain lines on stdout, one per finished test.
pub struct Lines;

impl Progress for Lines {
    fn begin(&mut self, _total: usize) {}
    fn started(&mut self, _name: &str) {}
    fn finished(&mut self, r: &TestResult) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", result_line(r));
        let _ = out.flush();
    }
    fn end(&mut self) {}
}

/// A progress bar on the terminal with the running tests' names.
pub struct Bar {
    bar: ProgressBar,
    running: Vec<String>,
}

impl Bar {
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stdout());
        bar.set_style(
            ProgressStyle::with_template("[{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar {
            bar,
            running: Vec::new(),
        }
    }

    fn show_running(&self) {
        self.bar
            .set_message(format!("running: {}", self.running.join(" ")));
    }
}

impl Default for Bar {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bar {
    fn begin(&mut self, total: usize) {
        self.bar.set_length(total as u64);
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }
    fn started(&mut self, name: &str) {
        self.running.push(name.to_string());
        self.show_running();
    }
    fn finished(&mut self, r: &TestResult) {
        self.running.retain(|n| n != &r.name);
        self.bar.println(result_line(r));
        self.bar.inc(1);
        self.show_running();
    }
    fn end(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// The final table: every test in suite order, then the totals.
pub fn summary_table(specs: &[TestSpec], run: &SuiteRun, jobs: usize) -> String {
    let width = specs.iter().map(|s| s.name.len()).max().unwrap_or(4).max(4);
    let mut s = format!(
        "\n{:<7} {:>9}  {:<width$}  detail\n",
        "verdict", "time", "test"
    );
    for (spec, r) in specs.iter().zip(&run.results) {
        match r {
            Some(r) => s.push_str(&format!(
                "{:<7} {:>9}  {:<width$}  {}\n",
                r.outcome.verdict.to_string(),
                secs(r.duration),
                r.name,
                r.outcome.detail()
            )),
            None => s.push_str(&format!(
                "{:<7} {:>9}  {:<width$}  (interrupted)\n",
                "-", "-", spec.name
            )),
        }
    }
    let done = run.results.iter().flatten().count();
    s.push_str(&format!(
        "\n{} tests: {} passed, {} failed, {} skipped{}; wall time {} with -j {jobs}\n",
        specs.len(),
        run.count(Verdict::Pass),
        run.count(Verdict::Fail),
        run.count(Verdict::Skip),
        if run.interrupted {
            format!(", {} not finished (interrupted)", specs.len() - done)
        } else {
            String::new()
        },
        secs(run.wall),
    ));
    if let Some(boots) = &run.boot_once {
        s.push_str(&format!("{boots}; {}\n", per_test_cost(specs, run)));
    }
    s
}

/// What a boot-once test cost, from its restore's start to its end.
fn per_test_cost(specs: &[TestSpec], run: &SuiteRun) -> String {
    let times: Vec<f64> = specs
        .iter()
        .zip(&run.results)
        .filter(|(s, _)| matches!(&s.plan, Plan::Run(rs) if rs.once.is_some()))
        .filter_map(|(_, r)| r.as_ref())
        .filter(|r| r.outcome.status.is_some())
        .map(|r| r.duration.as_secs_f64())
        .collect();
    if times.is_empty() {
        return "no test ran from a restore".into();
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let max = times.iter().copied().fold(0.0, f64::max);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    format!(
        "{} tests ran from a restore, restore to exit: mean {:.3}s, min {:.3}s, max {:.3}s",
        times.len(),
        mean,
        min,
        max
    )
}
