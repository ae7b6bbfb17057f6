//! Turn `unittests.cfg` entries into `TestSpec`s, with the selection and
//! the runner-side decisions of kvm-unit-tests' `run()`
//! (`scripts/runtime.bash`), in its order: selection by name and group,
//! `nodefault`, `arch`, `accel`, `disabled_if`, `check`, missing file;
//! then the QEMU flags are translated (the runner's pre-flight QEMU start
//! is where an unusable flag turns into a SKIP there).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cfg::Entry;
use super::translate::{self, TranslateError};
use super::{envfile, parse_duration, Judge, Plan, RunSpec, TestSpec, DEFAULT_TIMEOUT};
use crate::config;

/// The architecture kvmrun runs (kvm-unit-tests' `$ARCH`).
pub const ARCH: &str = "x86_64";
/// The accelerator (`$ACCEL`): kvmrun only has KVM.
pub const ACCEL: &str = "kvm";

#[derive(Clone, Debug)]
pub struct KutOptions {
    /// Where the images are (the cfg's directory unless `--dir`).
    pub dir: PathBuf,
    /// Test names given on the command line (empty: all).
    pub names: Vec<String>,
    /// `-g GROUP`.
    pub group: Option<String>,
    /// `-a`: nodefault tests too.
    pub all: bool,
    pub timeout_scale: f64,
    /// `$MAX_SMP` for cfg values that use it.
    pub max_smp: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum KutError {
    #[error("{cfg}: no test named '{name}'")]
    UnknownTest { cfg: PathBuf, name: String },
    #[error("{cfg}:{line}: [{name}]: invalid timeout '{value}': expected a number with an optional s, m, h or d suffix, at most {} seconds after --timeout-scale", config::MAX_TIMEOUT_SECS)]
    Timeout {
        cfg: PathBuf,
        line: usize,
        name: String,
        value: String,
    },
    #[error("invalid --timeout-scale {0}: expected a positive number")]
    Scale(f64),
}

/// Number of online CPUs, as `getconf _NPROCESSORS_ONLN` (the runner's
/// default `$MAX_SMP`).
pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// Plan every selected entry of `cfg_path`.
pub fn plan(
    cfg_path: &Path,
    entries: &[Entry],
    opts: &KutOptions,
) -> Result<Vec<TestSpec>, KutError> {
    if !(opts.timeout_scale.is_finite() && opts.timeout_scale > 0.0) {
        return Err(KutError::Scale(opts.timeout_scale));
    }
    for n in &opts.names {
        if !entries.iter().any(|e| &e.name == n) {
            return Err(KutError::UnknownTest {
                cfg: cfg_path.into(),
                name: n.clone(),
            });
        }
    }
    // The errata file sits in kvm-unit-tests' top directory, one level
    // above x86/.
    let kut_root = opts.dir.parent().map(Path::to_path_buf);
    let env = envfile::contents(kut_root.as_deref(), opts.all);
    let mut specs = Vec::new();
    for e in entries {
        if !opts.names.is_empty() && !opts.names.contains(&e.name) {
            continue;
        }
        if let Some(g) = &opts.group {
            if !e.in_group(g) {
                continue;
            }
        }
        let plan = plan_one(cfg_path, e, opts, &env)?;
        specs.push(TestSpec {
            name: e.name.clone(),
            groups: e.groups.clone(),
            plan,
        });
    }
    Ok(specs)
}

/// Values the runner's shell would see while handling this entry.
fn shell_env(e: &Entry, opts: &KutOptions, kernel: &str, timeout: &str) -> Vec<(String, String)> {
    let v = |k: &str, s: &str| (k.to_string(), s.to_string());
    vec![
        v("ARCH", ARCH),
        v("ACCEL", ACCEL),
        v("MAX_SMP", &opts.max_smp.to_string()),
        v("testname", &e.name),
        v("groups", &e.groups.join(" ")),
        v("smp", &format!("-smp {}", e.smp.as_deref().unwrap_or("1"))),
        v("kernel", kernel),
        v("test_args", e.test_args.as_deref().unwrap_or("")),
        v("opts", e.params.as_deref().unwrap_or("")),
        v("arch", e.arch.as_deref().unwrap_or("")),
        v("machine", e.machine.as_deref().unwrap_or("")),
        v("check", e.check.as_deref().unwrap_or("")),
        v("accel", e.accel.as_deref().unwrap_or(ACCEL)),
        v("timeout", timeout),
    ]
}

fn plan_one(
    cfg_path: &Path,
    e: &Entry,
    opts: &KutOptions,
    env_file: &str,
) -> Result<Plan, KutError> {
    let timeout_raw = e.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT);
    let secs = parse_duration(timeout_raw).ok_or_else(|| KutError::Timeout {
        cfg: cfg_path.into(),
        line: e.line,
        name: e.name.clone(),
        value: timeout_raw.to_string(),
    })?;
    let (timeout_secs, timeout_text) = if secs == 0.0 {
        (None, timeout_raw.to_string())
    } else if opts.timeout_scale == 1.0 {
        (Some(secs), timeout_raw.to_string())
    } else {
        let s = secs * opts.timeout_scale;
        (Some(s), format!("{s}s"))
    };
    if timeout_secs.is_some_and(|t| !config::timeout_ok(t)) {
        return Err(KutError::Timeout {
            cfg: cfg_path.into(),
            line: e.line,
            name: e.name.clone(),
            value: timeout_text,
        });
    }
    let kernel = match &e.file {
        Some(f) => opts.dir.join(f),
        None => opts.dir.clone(),
    };
    let kernel_text = kernel.display().to_string();

    if opts.group.is_none() && !opts.all && e.in_group("nodefault") {
        return Ok(Plan::Skip("test marked as manual run only".into()));
    }
    if let Some(arch) = e.arch.as_deref().filter(|a| !a.is_empty()) {
        if arch != ARCH {
            return Ok(Plan::Skip(format!("{arch} only")));
        }
    }
    if let Some(accel) = e.accel.as_deref().filter(|a| !a.is_empty()) {
        if !accel_matches(accel, ACCEL) {
            return Ok(Plan::Skip(format!("{accel} only, but ACCEL={ACCEL}")));
        }
    }
    let env = shell_env(e, opts, &kernel_text, timeout_raw);
    if let Some(cond) = e.disabled_if.as_deref().filter(|c| !c.is_empty()) {
        if shell_true(cond, &env) {
            return Ok(Plan::Skip(format!("disabled because: {cond}")));
        }
    }
    if let Some(check) = &e.check {
        if let Some(reason) = failed_check(check) {
            return Ok(Plan::Skip(reason));
        }
    }
    if e.file.is_none() || !kernel.is_file() {
        return Ok(Plan::Skip(format!("Test file '{kernel_text}' not found")));
    }

    // The runner's command line: "-smp N [-append ARGS] PARAMS".
    let mut line = format!("-smp {}", e.smp.as_deref().unwrap_or("1"));
    if let Some(a) = &e.test_args {
        line.push_str(" -append ");
        line.push_str(a);
    }
    if let Some(p) = &e.params {
        line.push(' ');
        line.push_str(p);
    }
    let args = match translate::shell_words(&line, &env).and_then(|w| translate::translate(&w)) {
        Ok(a) => a,
        Err(err @ TranslateError::Untranslated(_)) => return Ok(Plan::Skip(err.to_string())),
        Err(err) => return Ok(Plan::Skip(err.to_string())),
    };
    Ok(Plan::Run(RunSpec {
        image: kernel,
        args,
        migrate: e.in_group("migration"),
        env_file: Some(env_file.to_string()),
        initrd: None,
        timeout_secs,
        timeout_text,
        judge: Judge::Kut,
        once: None,
    }))
}

/// `[[ "$ACCEL" =~ ^$accel(,|$) ]]`, for the plain names cfg files use.
fn accel_matches(accel: &str, have: &str) -> bool {
    have.strip_prefix(accel)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(','))
}

/// Evaluate a `disabled_if` condition with bash, as the runner's
/// `(eval $disabled_if)` does; a condition that cannot be evaluated counts
/// as false, as a failing command does there.
fn shell_true(cond: &str, env: &[(String, String)]) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(cond)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `check = path=value ...`: the first file that is missing or whose
/// contents (without trailing newlines) differ, as the runner words it.
fn failed_check(check: &str) -> Option<String> {
    for param in check.split_whitespace() {
        let (path, value) = param.split_once('=').unwrap_or((param, param));
        let ok = Path::new(path).is_file()
            && std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches('\n') == value)
                .unwrap_or(false);
        if !ok {
            return Some(format!("{path} not equal to {value}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testhost::cfg;

    fn opts(dir: &Path) -> KutOptions {
        KutOptions {
            dir: dir.to_path_buf(),
            names: vec![],
            group: None,
            all: false,
            timeout_scale: 1.0,
            max_smp: 2,
        }
    }

    fn specs(text: &str, o: &KutOptions) -> Vec<TestSpec> {
        let entries = cfg::parse(text, Path::new("u.cfg")).unwrap();
        plan(Path::new("u.cfg"), &entries, o).unwrap()
    }

    fn skip_reason(s: &TestSpec) -> &str {
        match &s.plan {
            Plan::Skip(r) => r,
            Plan::Run(_) => panic!("{} runs", s.name),
        }
    }

    fn run_spec(s: &TestSpec) -> &RunSpec {
        match &s.plan {
            Plan::Run(r) => r,
            Plan::Skip(r) => panic!("{} skipped: {r}", s.name),
        }
    }

    #[test]
    fn runner_side_skips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.flat"), b"x").unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "Y\n").unwrap();
        let text = format!(
            "[manual]\nfile = t.flat\ngroups = a nodefault\n\
             [i386]\nfile = t.flat\narch = i386\n\
             [tcg]\nfile = t.flat\naccel = tcg\n\
             [kvm]\nfile = t.flat\naccel = kvm\narch = x86_64\n\
             [disabled]\nfile = t.flat\ndisabled_if = [[ \"$ACCEL\" == kvm ]]\n\
             [enabled]\nfile = t.flat\ndisabled_if = [[ \"$testname\" != enabled ]]\n\
             [check_ok]\nfile = t.flat\ncheck = {g}=Y\n\
             [check_bad]\nfile = t.flat\ncheck = {g}=Y {g}=N\n\
             [check_missing]\nfile = t.flat\ncheck = /nonexistent/x=1\n\
             [no_file]\nfile = missing.flat\n\
             [device]\nfile = t.flat\nqemu_params = -device hyperv-testdev\n",
            g = good.display()
        );
        let s = specs(&text, &opts(dir.path()));
        let by = |n: &str| s.iter().find(|t| t.name == n).unwrap();
        assert_eq!(skip_reason(by("manual")), "test marked as manual run only");
        assert_eq!(skip_reason(by("i386")), "i386 only");
        assert_eq!(skip_reason(by("tcg")), "tcg only, but ACCEL=kvm");
        run_spec(by("kvm"));
        assert_eq!(
            skip_reason(by("disabled")),
            "disabled because: [[ \"$ACCEL\" == kvm ]]"
        );
        run_spec(by("enabled"));
        run_spec(by("check_ok"));
        assert_eq!(
            skip_reason(by("check_bad")),
            format!("{} not equal to N", good.display())
        );
        assert_eq!(
            skip_reason(by("check_missing")),
            "/nonexistent/x not equal to 1"
        );
        assert_eq!(
            skip_reason(by("no_file")),
            format!(
                "Test file '{}' not found",
                dir.path().join("missing.flat").display()
            )
        );
        assert_eq!(
            skip_reason(by("device")),
            "untranslated: -device hyperv-testdev"
        );
    }

    #[test]
    fn selection_by_name_group_and_all() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[a]\ngroups = g1\n[b]\ngroups = g2 nodefault\n[c]\n";
        let mut o = opts(dir.path());
        assert_eq!(specs(text, &o).len(), 3);
        o.group = Some("g2".into());
        let s = specs(text, &o);
        // A group selection runs the nodefault tests in it.
        assert_eq!(s.len(), 1);
        assert!(matches!(&s[0].plan, Plan::Skip(r) if r.contains("not found")));
        o.group = None;
        o.names = vec!["c".into(), "b".into()];
        let s = specs(text, &o);
        assert_eq!(
            s.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["b", "c"]
        );
        // Naming a nodefault test does not run it (as run_tests.sh).
        assert_eq!(skip_reason(&s[0]), "test marked as manual run only");
        o.all = true;
        let s = specs(text, &o);
        assert!(skip_reason(&s[0]).contains("not found"));
        o.names = vec!["zz".into()];
        let entries = cfg::parse(text, Path::new("u.cfg")).unwrap();
        let err = plan(Path::new("u.cfg"), &entries, &o).unwrap_err();
        assert_eq!(err.to_string(), "u.cfg: no test named 'zz'");
    }

    #[test]
    fn command_lines_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.flat"), b"x").unwrap();
        let text = "[a]\nfile = t.flat\n\
                    [b]\nfile = t.flat\nsmp = $MAX_SMP\ntest_args = \"10 `echo 7`\"\n\
                    qemu_params = -cpu max -m 256 -machine pit=off\ntimeout = 30\n\
                    [c]\nfile = t.flat\ntimeout = 0\n";
        let mut o = opts(dir.path());
        let s = specs(text, &o);
        let a = run_spec(&s[0]);
        assert_eq!(a.args, ["--smp=1"]);
        assert_eq!(
            (a.timeout_secs, a.timeout_text.as_str()),
            (Some(90.0), "90s")
        );
        assert!(a.env_file.as_deref().unwrap().contains("QEMU_ACCEL=kvm\n"));
        let b = run_spec(&s[1]);
        assert_eq!(
            b.args,
            [
                "--smp=2",
                "--mem=256",
                "--cpu=max",
                "--cpu-lenient",
                "--no-pit",
                "--append=10 7"
            ]
        );
        assert_eq!(
            (b.timeout_secs, b.timeout_text.as_str()),
            (Some(30.0), "30")
        );
        assert_eq!(run_spec(&s[2]).timeout_secs, None);
        o.timeout_scale = 0.5;
        let s = specs(text, &o);
        assert_eq!(run_spec(&s[0]).timeout_text, "45s");
        assert_eq!(run_spec(&s[1]).timeout_secs, Some(15.0));
    }

    #[test]
    fn migration_group_tests_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.flat"), b"x").unwrap();
        let text = "[mig]\nfile = t.flat\nextra_params = -append 'migrate=2'\n\
                    groups = a migration\n\
                    [plain]\nfile = t.flat\ngroups = migrationx\n";
        let s = specs(text, &opts(dir.path()));
        let mig = run_spec(&s[0]);
        assert!(mig.migrate);
        // The flag is the scheduler's to add: the pre-flight start runs
        // without it, as the runner's does without MIGRATION=yes.
        assert_eq!(mig.args, ["--smp=1", "--append=migrate=2"]);
        assert!(!run_spec(&s[1]).migrate);
    }

    #[test]
    fn bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let entries = cfg::parse("[a]\ntimeout = soon\n", Path::new("u.cfg")).unwrap();
        let err = plan(Path::new("u.cfg"), &entries, &opts(dir.path())).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("u.cfg:1: [a]: invalid timeout 'soon'"),
            "{err}"
        );
        let mut o = opts(dir.path());
        o.timeout_scale = 0.0;
        assert!(plan(Path::new("u.cfg"), &[], &o).is_err());
        // A timeout no timer can hold is refused, before or after scaling,
        // rather than panicking the scheduler.
        let huge = format!("[a]\ntimeout = 1{}\n", "0".repeat(300));
        let entries = cfg::parse(&huge, Path::new("u.cfg")).unwrap();
        let err = plan(Path::new("u.cfg"), &entries, &opts(dir.path())).unwrap_err();
        assert!(err.to_string().contains("at most 4294967295"), "{err}");
        let entries = cfg::parse("[a]\ntimeout = 4000000000\n", Path::new("u.cfg")).unwrap();
        let mut o = opts(dir.path());
        o.timeout_scale = 2.0;
        assert!(plan(Path::new("u.cfg"), &entries, &o).is_err());
    }

    #[test]
    fn accel_match_is_the_runner_regex() {
        assert!(accel_matches("kvm", "kvm"));
        assert!(accel_matches("kvm", "kvm,prop=1"));
        assert!(!accel_matches("kv", "kvm"));
        assert!(!accel_matches("tcg", "kvm"));
    }
}
