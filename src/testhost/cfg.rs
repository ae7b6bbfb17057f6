//! Parser for kvm-unit-tests' `unittests.cfg`.
//!
//! The format is whatever `for_each_unittest()` in kvm-unit-tests'
//! `scripts/common.bash` accepts, so the rules below follow it line by line:
//!
//! * a line is trimmed of leading and trailing blanks (bash `read` does that);
//! * `[name]` on its own line starts an entry;
//! * `key = value` lines set a key of the current entry; the key must start
//!   the line, blanks around `=` are optional, the value is the rest of the
//!   line, kept verbatim (quotes, backticks and `#` included: the runner
//!   hands it to the shell later);
//! * `extra_params` and `qemu_params` are the same key; either may open a
//!   `"""` block that runs until a line ending in `"""`, in which a
//!   backslash before the line end joins the next line;
//! * every other line (comments, blank lines, unknown keys, keys before the
//!   first entry) is ignored, as the runner ignores them.
//!
//! Values stay raw strings here; `plan` decides what they mean.

use std::path::{Path, PathBuf};

/// One `[name]` entry with its raw values, `None` where the key is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// 1-based line of the `[name]` header, for messages.
    pub line: usize,
    pub file: Option<String>,
    pub smp: Option<String>,
    pub test_args: Option<String>,
    /// `extra_params` / `qemu_params`.
    pub params: Option<String>,
    pub groups: Vec<String>,
    pub arch: Option<String>,
    pub machine: Option<String>,
    pub check: Option<String>,
    pub accel: Option<String>,
    pub timeout: Option<String>,
    pub disabled_if: Option<String>,
}

impl Entry {
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CfgError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: empty test name in '[]'")]
    EmptyName { path: PathBuf, line: usize },
    #[error("{path}:{line}: test [{name}] is defined twice (first at line {first})")]
    Duplicate {
        path: PathBuf,
        line: usize,
        first: usize,
        name: String,
    },
    #[error("{path}:{line}: the \"\"\" block of [{name}] is never closed")]
    UnclosedBlock {
        path: PathBuf,
        line: usize,
        name: String,
    },
}

/// Read and parse a cfg file.
pub fn parse_file(path: &Path) -> Result<Vec<Entry>, CfgError> {
    let text = std::fs::read_to_string(path).map_err(|source| CfgError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Split `key = value` the way the runner's `^key\ *=\ *(.*)$` does.
fn key_value(line: &str) -> Option<(&str, &str)> {
    let key_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(line.len());
    let (key, rest) = line.split_at(key_end);
    if key.is_empty() {
        return None;
    }
    let rest = rest.trim_start_matches(' ').strip_prefix('=')?;
    Some((key, rest.trim_start_matches(' ')))
}

/// Parse cfg text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Vec<Entry>, CfgError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut cur: Option<Entry> = None;
    let mut lines = text.lines().enumerate();
    while let Some((idx, raw)) = lines.next() {
        let line = raw.trim_matches([' ', '\t']);
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if name.is_empty() {
                return Err(CfgError::EmptyName {
                    path: path.into(),
                    line: idx + 1,
                });
            }
            if let Some(e) = cur.take() {
                entries.push(e);
            }
            if let Some(first) = entries.iter().find(|e| e.name == name) {
                return Err(CfgError::Duplicate {
                    path: path.into(),
                    line: idx + 1,
                    first: first.line,
                    name: name.to_string(),
                });
            }
            cur = Some(Entry {
                name: name.to_string(),
                line: idx + 1,
                ..Entry::default()
            });
            continue;
        }
        let Some(e) = cur.as_mut() else { continue };
        let Some((key, value)) = key_value(line) else {
            continue;
        };
        let value = value.to_string();
        match key {
            "file" => e.file = Some(value),
            "smp" => e.smp = Some(value),
            "test_args" => e.test_args = Some(value),
            "extra_params" | "qemu_params" => {
                e.params = Some(match value.strip_prefix("\"\"\"") {
                    Some(first) => {
                        read_block(first, &mut lines).ok_or_else(|| CfgError::UnclosedBlock {
                            path: path.into(),
                            line: idx + 1,
                            name: e.name.clone(),
                        })?
                    }
                    None => value,
                })
            }
            "groups" => e.groups = value.split_whitespace().map(str::to_string).collect(),
            "arch" => e.arch = Some(value),
            "machine" => e.machine = Some(value),
            "check" => e.check = Some(value),
            "accel" => e.accel = Some(value),
            "timeout" => e.timeout = Some(value),
            "disabled_if" => e.disabled_if = Some(value),
            _ => {}
        }
    }
    if let Some(e) = cur.take() {
        entries.push(e);
    }
    Ok(entries)
}

/// The rest of a `"""` block, `first` being the text after the opening
/// quotes. Lines are joined with newlines, except that an odd number of
/// backslashes at a line end joins the next line directly (the runner's
/// "escape backslash newline, but not double backslash"). Newlines become
/// blanks: the runner would hand them to `eval`, which takes them for
/// command separators, so only joined lines are meaningful there.
fn read_block<'a>(
    first: &str,
    lines: &mut impl Iterator<Item = (usize, &'a str)>,
) -> Option<String> {
    let mut out = String::new();
    let push = |out: &mut String, piece: &str| {
        let trailing = piece.len() - piece.trim_end_matches('\\').len();
        if trailing % 2 == 1 {
            out.push_str(&piece[..piece.len() - 1]);
        } else {
            out.push_str(piece);
            out.push(' ');
        }
    };
    if let Some(body) = first.trim_end_matches([' ', '\t']).strip_suffix("\"\"\"") {
        out.push_str(body);
        return Some(out.trim().to_string());
    }
    push(&mut out, first.trim_end_matches([' ', '\t']));
    for (_, raw) in lines {
        let l = raw.trim_matches([' ', '\t']);
        if let Some(body) = l.strip_suffix("\"\"\"") {
            out.push_str(body);
            return Some(out.trim().to_string());
        }
        push(&mut out, l);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Vec<Entry> {
        parse(text, Path::new("t.cfg")).unwrap()
    }

    const SAMPLE: &str = r#"
##############################################################
# A sample written for these tests, in the style of x86/unittests.cfg.
##############################################################
this_line = is ignored, it precedes every entry

[boot_smoke]
file = smoke.flat

[two_cpus]
file = smoke.flat
smp = 2
  groups = basic smp
timeout = 30

# A comment between keys is ignored.
[with_args]
file=args.flat
test_args = 'alpha beta'
qemu_params = -cpu max,+x2apic -m 256
arch = x86_64
accel = kvm
check = /sys/module/kvm/parameters/flag=Y /proc/x=0
disabled_if = [[ "$TARGET" != qemu ]]
machine = pc
unknown_key = whatever

[legacy_alias]
file = legacy.flat
extra_params = -machine pit=off
groups = nodefault
"#;

    #[test]
    fn every_key_is_read() {
        let e = p(SAMPLE);
        assert_eq!(
            e.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["boot_smoke", "two_cpus", "with_args", "legacy_alias"]
        );
        assert_eq!(e[0].file.as_deref(), Some("smoke.flat"));
        assert_eq!(e[0].smp, None);
        assert_eq!(e[0].line, 7);
        assert_eq!(e[1].smp.as_deref(), Some("2"));
        assert_eq!(e[1].groups, ["basic", "smp"]);
        assert_eq!(e[1].timeout.as_deref(), Some("30"));
        let w = &e[2];
        assert_eq!(w.file.as_deref(), Some("args.flat"));
        assert_eq!(w.test_args.as_deref(), Some("'alpha beta'"));
        assert_eq!(w.params.as_deref(), Some("-cpu max,+x2apic -m 256"));
        assert_eq!(w.arch.as_deref(), Some("x86_64"));
        assert_eq!(w.accel.as_deref(), Some("kvm"));
        assert_eq!(
            w.check.as_deref(),
            Some("/sys/module/kvm/parameters/flag=Y /proc/x=0")
        );
        assert_eq!(w.disabled_if.as_deref(), Some("[[ \"$TARGET\" != qemu ]]"));
        assert_eq!(w.machine.as_deref(), Some("pc"));
        assert_eq!(e[3].params.as_deref(), Some("-machine pit=off"));
        assert!(e[3].in_group("nodefault"));
    }

    #[test]
    fn values_stay_verbatim() {
        let e = p("[t]\nfile = a.flat # not a comment\ntest_args = \"10 `date +%s`\"\n");
        assert_eq!(e[0].file.as_deref(), Some("a.flat # not a comment"));
        assert_eq!(e[0].test_args.as_deref(), Some("\"10 `date +%s`\""));
    }

    #[test]
    fn later_keys_win_and_whitespace_is_trimmed() {
        let e = p("  [t]  \nsmp = 2\nsmp = 4\t\n\tfile =   x.flat  \n");
        assert_eq!(e[0].smp.as_deref(), Some("4"));
        assert_eq!(e[0].file.as_deref(), Some("x.flat"));
    }

    #[test]
    fn keys_must_start_the_line() {
        // "groupsx" and "# file" are not keys; "file:" lacks '='.
        let e = p("[t]\ngroupsx = a\n# file = b.flat\nfile: c.flat\n");
        assert_eq!(
            e[0],
            Entry {
                name: "t".into(),
                line: 1,
                ..Entry::default()
            }
        );
    }

    #[test]
    fn triple_quoted_blocks_join_continuation_lines() {
        let text = "[t]\nfile = a.flat\nqemu_params = \"\"\"-cpu max \\\n-m 256 \\\n-smp 2\n\"\"\"\ngroups = g\n";
        let e = p(text);
        assert_eq!(e[0].params.as_deref(), Some("-cpu max -m 256 -smp 2"));
        assert_eq!(e[0].groups, ["g"]);
        // An even number of backslashes is not a continuation.
        let e = p("[t]\nqemu_params = \"\"\"-a x\\\\\n-b\"\"\"\n");
        assert_eq!(e[0].params.as_deref(), Some("-a x\\\\ -b"));
        // Opened and closed on one line.
        let e = p("[t]\nextra_params = \"\"\"-m 64\"\"\"\n");
        assert_eq!(e[0].params.as_deref(), Some("-m 64"));
    }

    #[test]
    fn bad_files_are_errors_naming_the_line() {
        let err = parse("[t]\nqemu_params = \"\"\"-m 1\n", Path::new("x.cfg")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.cfg:2: the \"\"\" block of [t] is never closed"
        );
        let err = parse("[a]\n[b]\n[a]\n", Path::new("x.cfg")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.cfg:3: test [a] is defined twice (first at line 1)"
        );
        let err = parse("[]\n", Path::new("x.cfg")).unwrap_err();
        assert!(err.to_string().starts_with("x.cfg:1: empty test name"));
        let err = parse_file(Path::new("/nonexistent/u.cfg")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("cannot read /nonexistent/u.cfg"));
    }

    #[test]
    fn empty_and_comment_only_files_have_no_entries() {
        assert!(p("").is_empty());
        assert!(p("# nothing\n\nfile = x.flat\n").is_empty());
    }
}
