//! kvmrun's own suite format for functional tests of guest kernels (TOML,
//! documented in docs/TESTHOST.md): each test boots an image with an
//! optional initrd and a command line, and passes when kvmrun's exit status
//! is the expected one, every `expect_output` regex matches the serial
//! output and no `reject_output` regex does. Patterns are multi-line
//! (`^` and `$` match at line boundaries) and see the output with CR LF
//! line ends turned into LF. The format does not care what
//! the image is: a Linux bzImage or a multiboot ELF both work.

use std::path::{Path, PathBuf};

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use super::{Judge, Once, Plan, RunSpec, TestSpec};
use crate::config;

/// Default timeout of a Linux test, in seconds.
pub const DEFAULT_TIMEOUT_SECS: f64 = 90.0;

#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Toml {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: test '{test}': {what}")]
    Bad {
        path: PathBuf,
        test: String,
        what: String,
    },
    #[error("invalid --timeout-scale {0}: expected a positive number")]
    Scale(f64),
    #[error("{path}: no test named '{name}'")]
    UnknownTest { path: PathBuf, name: String },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum Timeout {
    Secs(f64),
    Text(String),
}

/// Keys shared by `[defaults]` and every `[[test]]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    kernel: Option<String>,
    initrd: Option<String>,
    cmdline: Option<String>,
    smp: Option<u32>,
    mem: Option<String>,
    timeout: Option<Timeout>,
    expect_status: Option<i32>,
    expect_output: Option<Vec<String>>,
    reject_output: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    /// The guest's test command: `kvmrun.cmd="CMD"` on the kernel command
    /// line, or with `boot_once` the line typed into a restored VM.
    cmd: Option<String>,
    boot_once: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestEntry {
    name: String,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    #[serde(default)]
    defaults: Common,
    #[serde(default)]
    test: Vec<TestEntry>,
}

/// Resolve a path from the suite file: relative to the suite's directory,
/// with `*`/`?`/`[...]` wildcards allowed; the last match in sorted order
/// (the newest version for names like vmlinuz-6.1.0-NN-cloud-amd64).
fn resolve(base: &Path, pattern: &str) -> Option<PathBuf> {
    let full = base.join(pattern);
    let text = full.to_string_lossy().into_owned();
    if !text.contains(['*', '?', '[']) {
        return full.is_file().then_some(full);
    }
    let mut found: Vec<PathBuf> = glob::glob(&text)
        .ok()?
        .flatten()
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// Parse a suite file and plan the selected tests; every timeout is
/// multiplied by `timeout_scale`.
pub fn load(
    path: &Path,
    names: &[String],
    group: Option<&str>,
    timeout_scale: f64,
) -> Result<Vec<TestSpec>, SuiteError> {
    let text = std::fs::read_to_string(path).map_err(|source| SuiteError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, path, names, group, timeout_scale, &resolve)
}

/// Where a suite's `kernel` and `initrd` values are found: the suite's
/// directory and a value in, the file it names (`None`: not found).
pub type Finder<'a> = &'a dyn Fn(&Path, &str) -> Option<PathBuf>;

/// Parse the suite text of `path` and plan the selected tests, with
/// `find` looking up kernels and initrds.
pub fn parse(
    text: &str,
    path: &Path,
    names: &[String],
    group: Option<&str>,
    timeout_scale: f64,
    find: Finder,
) -> Result<Vec<TestSpec>, SuiteError> {
    if !(timeout_scale.is_finite() && timeout_scale > 0.0) {
        return Err(SuiteError::Scale(timeout_scale));
    }
    let suite: SuiteFile = toml::from_str(text).map_err(|e| SuiteError::Toml {
        path: path.into(),
        source: Box::new(e),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for n in names {
        if !suite.test.iter().any(|t| &t.name == n) {
            return Err(SuiteError::UnknownTest {
                path: path.into(),
                name: n.clone(),
            });
        }
    }
    let mut specs = Vec::new();
    for (i, t) in suite.test.iter().enumerate() {
        if suite.test[..i].iter().any(|o| o.name == t.name) {
            return Err(SuiteError::Bad {
                path: path.into(),
                test: t.name.clone(),
                what: "defined twice".into(),
            });
        }
        let spec = plan_one(path, base, &suite.defaults, t, timeout_scale, find)?;
        if !names.is_empty() && !names.contains(&t.name) {
            continue;
        }
        if group.is_some_and(|g| !spec.groups.iter().any(|x| x == g)) {
            continue;
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn plan_one(
    path: &Path,
    base: &Path,
    d: &Common,
    t: &TestEntry,
    timeout_scale: f64,
    find: Finder,
) -> Result<TestSpec, SuiteError> {
    let bad = |what: String| SuiteError::Bad {
        path: path.into(),
        test: t.name.clone(),
        what,
    };
    if t.name.is_empty() {
        return Err(bad("empty name".into()));
    }
    let c = &t.common;
    let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
    let kernel = pick(&c.kernel, &d.kernel).ok_or_else(|| bad("no kernel".into()))?;
    let initrd = pick(&c.initrd, &d.initrd);
    let cmdline = pick(&c.cmdline, &d.cmdline).unwrap_or_default();
    let boot_once = c.boot_once.or(d.boot_once).unwrap_or(false);
    let (cmdline, once) =
        command_lines(&cmdline, pick(&c.cmd, &d.cmd).as_deref(), boot_once).map_err(bad)?;
    let smp = c.smp.or(d.smp).unwrap_or(1);
    let mem = pick(&c.mem, &d.mem);
    if let Some(m) = &mem {
        config::parse_mem_size(m).map_err(|e| bad(e.to_string()))?;
    }
    let timeout = match c.timeout.clone().or_else(|| d.timeout.clone()) {
        None => DEFAULT_TIMEOUT_SECS,
        Some(Timeout::Secs(s)) => s,
        Some(Timeout::Text(s)) => {
            super::parse_duration(&s).ok_or_else(|| bad(format!("invalid timeout '{s}'")))?
        }
    };
    let timeout = timeout * timeout_scale;
    if !config::timeout_ok(timeout) {
        return Err(bad(format!(
            "invalid timeout {timeout}: expected a positive number of seconds, at most {} after --timeout-scale",
            config::MAX_TIMEOUT_SECS
        )));
    }
    let regexes = |list: &Option<Vec<String>>| -> Result<Vec<Regex>, SuiteError> {
        list.iter()
            .flatten()
            .map(|p| {
                RegexBuilder::new(p)
                    .multi_line(true)
                    .build()
                    .map_err(|e| bad(format!("bad pattern /{p}/: {e}")))
            })
            .collect()
    };
    let output = regexes(if c.expect_output.is_some() {
        &c.expect_output
    } else {
        &d.expect_output
    })?;
    let reject = regexes(if c.reject_output.is_some() {
        &c.reject_output
    } else {
        &d.reject_output
    })?;
    let groups = c
        .groups
        .clone()
        .or_else(|| d.groups.clone())
        .unwrap_or_default();

    let plan = match find(base, &kernel) {
        None => Plan::Skip(format!("kernel '{kernel}' not found")),
        Some(image) => {
            let initrd_path = match &initrd {
                None => Ok(None),
                Some(i) => find(base, i).map(Some).ok_or(i),
            };
            match initrd_path {
                Err(i) => Plan::Skip(format!("initrd '{i}' not found")),
                Ok(initrd) => {
                    let mut base = vec![format!("--smp={smp}")];
                    if let Some(m) = mem {
                        base.push(format!("--mem={m}"));
                    }
                    let with_cmdline = |line: &str| {
                        let mut args = base.clone();
                        if !line.is_empty() {
                            args.push(format!("--append={line}"));
                        }
                        args
                    };
                    let args = with_cmdline(&cmdline);
                    let once = once.map(|(line, input)| {
                        Box::new(Once {
                            boot_args: with_cmdline(&line),
                            input,
                        })
                    });
                    Plan::Run(RunSpec {
                        image,
                        args,
                        migrate: false,
                        env_file: None,
                        initrd,
                        timeout_secs: Some(timeout),
                        timeout_text: format!("{timeout}s"),
                        judge: Judge::Expect {
                            status: c.expect_status.or(d.expect_status).unwrap_or(0),
                            output,
                            reject,
                        },
                        once,
                    })
                }
            }
        }
    };
    Ok(TestSpec {
        name: t.name.clone(),
        groups,
        plan,
    })
}

/// The command line of a test booted with its command (`cmd` added as
/// `kvmrun.cmd="CMD"`, which /init and the ready guest read) and, for
/// boot once, the command line of its boot group's VM (asking the guest
/// to wait for its command) with the line the restored guest reads.
type CommandLines = (String, Option<(String, String)>);

fn command_lines(
    cmdline: &str,
    cmd: Option<&str>,
    boot_once: bool,
) -> Result<CommandLines, String> {
    if cmdline.contains(super::once::WAIT_CMD) {
        return Err(format!(
            "cmdline holds {}, which boot_once adds itself",
            super::once::WAIT_CMD
        ));
    }
    let Some(cmd) = cmd else {
        if boot_once {
            return Err("boot_once needs a cmd: the command the restored guest runs".into());
        }
        return Ok((cmdline.to_string(), None));
    };
    if cmdline.contains("kvmrun.cmd=") {
        return Err("both cmd and kvmrun.cmd= in cmdline give the command".into());
    }
    if cmd.trim().is_empty() {
        return Err("empty cmd".into());
    }
    if cmd.contains('"') {
        return Err("cmd holds '\"', which the kernel command line quotes it with".into());
    }
    if cmd.chars().any(char::is_control) {
        return Err("cmd must be one line without control characters".into());
    }
    let join = |extra: &str| {
        if cmdline.is_empty() {
            extra.to_string()
        } else {
            format!("{cmdline} {extra}")
        }
    };
    let once = boot_once.then(|| (join(super::once::WAIT_CMD), format!("{cmd}\n")));
    Ok((join(&format!("kvmrun.cmd=\"{cmd}\"")), once))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("suite.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz-6.1.0-9-cloud-amd64"), b"k").unwrap();
        std::fs::write(dir.path().join("vmlinuz-6.1.0-10-cloud-amd64"), b"k").unwrap();
        std::fs::write(dir.path().join("initrd.gz"), b"i").unwrap();
        let p = write(
            dir.path(),
            r#"
[defaults]
kernel = "vmlinuz-*-cloud-amd64"
initrd = "initrd.gz"
cmdline = "console=ttyS0"
mem = "256M"
timeout = "2m"
expect_output = ["^ok$"]
groups = ["smoke"]

[[test]]
name = "a"

[[test]]
name = "b"
smp = 2
cmdline = "console=ttyS0 quiet"
timeout = 5
expect_status = 1
expect_output = []
reject_output = ["panic"]
groups = ["slow"]

[[test]]
name = "c"
initrd = "missing.gz"

[[test]]
name = "d"
kernel = "nothing-*"
"#,
        );
        let s = load(&p, &[], None, 1.0).unwrap();
        assert_eq!(s.len(), 4);
        let Plan::Run(a) = &s[0].plan else { panic!() };
        // Sorted last: "...-9-..." sorts after "...-10-...".
        assert!(
            a.image.ends_with("vmlinuz-6.1.0-9-cloud-amd64"),
            "{:?}",
            a.image
        );
        assert_eq!(a.args, ["--smp=1", "--mem=256M", "--append=console=ttyS0"]);
        assert_eq!(
            a.initrd.as_deref(),
            Some(dir.path().join("initrd.gz").as_path())
        );
        assert_eq!(a.timeout_secs, Some(120.0));
        let Judge::Expect {
            status,
            output,
            reject,
        } = &a.judge
        else {
            panic!()
        };
        assert_eq!((*status, output.len(), reject.len()), (0, 1, 0));
        let Plan::Run(b) = &s[1].plan else { panic!() };
        assert_eq!(
            b.args,
            ["--smp=2", "--mem=256M", "--append=console=ttyS0 quiet"]
        );
        assert_eq!(b.timeout_secs, Some(5.0));
        let Judge::Expect {
            status,
            output,
            reject,
        } = &b.judge
        else {
            panic!()
        };
        assert_eq!((*status, output.len(), reject.len()), (1, 0, 1));
        assert!(matches!(&s[2].plan, Plan::Skip(r) if r == "initrd 'missing.gz' not found"));
        assert!(matches!(&s[3].plan, Plan::Skip(r) if r == "kernel 'nothing-*' not found"));
        assert_eq!(load(&p, &[], Some("slow"), 1.0).unwrap().len(), 1);
        let Plan::Run(a) = &load(&p, &[], None, 0.5).unwrap()[0].plan else {
            panic!()
        };
        assert_eq!(
            (a.timeout_secs, a.timeout_text.as_str()),
            (Some(60.0), "60s")
        );
        assert!(load(&p, &[], None, 0.0).is_err());
        assert_eq!(load(&p, &["d".into()], None, 1.0).unwrap()[0].name, "d");
    }

    #[test]
    fn bad_suites_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = |text: &str| {
            load(&write(dir.path(), text), &[], None, 1.0)
                .unwrap_err()
                .to_string()
        };
        assert!(err("[[test]]\nname = \"a\"\nkernal = \"x\"\n").contains("unknown field `kernal`"));
        assert!(err("[[test]]\nname = \"a\"\n").ends_with("test 'a': no kernel"));
        assert!(
            err("[[test]]\nname = \"a\"\nkernel = \"k\"\nmem = \"lots\"\n")
                .contains("test 'a': invalid memory size")
        );
        assert!(err("[[test]]\nname = \"a\"\nkernel = \"k\"\ntimeout = 0\n")
            .contains("invalid timeout 0"));
        assert!(
            err("[[test]]\nname = \"a\"\nkernel = \"k\"\ntimeout = 1e300\n")
                .contains("at most 4294967295")
        );
        assert!(
            err("[[test]]\nname = \"a\"\nkernel = \"k\"\nexpect_output = [\"(\"]\n")
                .contains("bad pattern /(/")
        );
        assert!(err(
            "[[test]]\nname = \"a\"\nkernel = \"k\"\n[[test]]\nname = \"a\"\nkernel = \"k\"\n"
        )
        .contains("defined twice"));
        assert!(err("[[test]\n").contains("suite.toml"));
        let p = write(dir.path(), "[[test]]\nname = \"a\"\nkernel = \"k\"\n");
        assert!(load(&p, &["b".into()], None, 1.0)
            .unwrap_err()
            .to_string()
            .ends_with("no test named 'b'"));
        assert!(load(Path::new("/nonexistent.toml"), &[], None, 1.0)
            .unwrap_err()
            .to_string()
            .starts_with("cannot read"));
    }

    #[test]
    fn cmd_goes_on_the_command_line_or_into_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"k").unwrap();
        let p = write(
            dir.path(),
            r#"
[defaults]
kernel = "k"
cmdline = "console=ttyS0"
boot_once = true

[[test]]
name = "once"
cmd = "echo hi"

[[test]]
name = "each"
boot_once = false
cmd = "echo each"

[[test]]
name = "plain"
boot_once = false
"#,
        );
        let s = load(&p, &[], None, 1.0).unwrap();
        let Plan::Run(once) = &s[0].plan else {
            panic!()
        };
        assert_eq!(
            once.args,
            ["--smp=1", "--append=console=ttyS0 kvmrun.cmd=\"echo hi\""]
        );
        assert_eq!(
            once.once,
            Some(Box::new(Once {
                boot_args: vec![
                    "--smp=1".into(),
                    "--append=console=ttyS0 kvmrun.wait_cmd".into()
                ],
                input: "echo hi\n".into(),
            }))
        );
        let Plan::Run(each) = &s[1].plan else {
            panic!()
        };
        assert_eq!(each.once, None);
        assert_eq!(
            each.args[1],
            "--append=console=ttyS0 kvmrun.cmd=\"echo each\""
        );
        let Plan::Run(plain) = &s[2].plan else {
            panic!()
        };
        assert_eq!(plain.args, ["--smp=1", "--append=console=ttyS0"]);
    }

    #[test]
    fn bad_boot_once_tests_are_errors_naming_the_test() {
        let dir = tempfile::tempdir().unwrap();
        let err = |test: &str| {
            let text = format!("[defaults]\nkernel = \"k\"\n[[test]]\nname = \"t\"\n{test}\n");
            load(&write(dir.path(), &text), &[], None, 1.0)
                .unwrap_err()
                .to_string()
        };
        let cases = [
            ("boot_once = true", "boot_once needs a cmd"),
            ("boot_once = true\ncmd = \" \"", "empty cmd"),
            ("cmd = 'echo \"x\"'", "cmd holds '\"'"),
            ("cmd = \"a\\nb\"", "one line without control characters"),
            (
                "cmd = \"x\"\ncmdline = 'kvmrun.cmd=\"y\"'",
                "both cmd and kvmrun.cmd= in cmdline",
            ),
            (
                "boot_once = true\ncmd = \"x\"\ncmdline = \"kvmrun.wait_cmd\"",
                "cmdline holds kvmrun.wait_cmd",
            ),
            ("boot_once = \"yes\"", "invalid type"),
        ];
        for (test, want) in cases {
            let e = err(test);
            // serde names the line of the test, not the test.
            assert!(
                e.contains("test 't': ") || want == "invalid type",
                "{test}: {e}"
            );
            assert!(e.contains(want), "{test}: {e}");
        }
    }
}
