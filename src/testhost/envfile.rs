//! The environment file kvm-unit-tests' runner hands every test as
//! `-initrd` (`initrd_create()` in `scripts/arch-run.bash`): `NAME=value`
//! lines the guest library can read with `getenv()`.
//!
//! kvmrun writes the same lines the runner writes when it finds no QEMU
//! binary (the QEMU_* version lines empty), with `QEMU_ACCEL=kvm`, the host
//! kernel version, and one `ERRATA_<commit>=y|n` line per entry of
//! kvm-unit-tests' `errata.txt` when that file is found.

use std::collections::BTreeMap;
use std::path::Path;

/// Host kernel version split the way `env_params()` splits `uname -r`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelVersion {
    pub string: String,
    pub version: Option<u64>,
    pub patchlevel: Option<u64>,
    pub sublevel: Option<u64>,
    pub extraversion: Option<u64>,
}

/// Leading digits of `s`, as `${x%%[!0-9]*}` keeps them.
fn leading_number(s: &str) -> Option<u64> {
    let d: String = s.chars().take_while(char::is_ascii_digit).collect();
    d.parse().ok()
}

impl KernelVersion {
    pub fn parse(release: &str) -> Self {
        let mut dots = release.splitn(3, '.');
        let version = dots.next().and_then(|s| s.parse().ok());
        let patchlevel = dots.next().and_then(|s| s.parse().ok());
        let rest = dots.next().unwrap_or("");
        let (sub, extra) = rest.split_once('-').unwrap_or((rest, ""));
        KernelVersion {
            string: release.to_string(),
            version,
            patchlevel,
            sublevel: leading_number(sub),
            extraversion: leading_number(extra),
        }
    }

    pub fn host() -> Self {
        // SAFETY: uname() fills the struct it is given.
        let mut u: libc::utsname = unsafe { std::mem::zeroed() };
        if unsafe { libc::uname(&mut u) } != 0 {
            return KernelVersion::default();
        }
        // SAFETY: release is NUL-terminated by uname().
        let rel = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
        Self::parse(&rel.to_string_lossy())
    }

    /// Whether this kernel is at least `minver` ("4.9", "5.6.3-2"), by the
    /// rules of `env_generate_errata()`. `None` for a malformed `minver`.
    pub fn at_least(&self, minver: &str) -> Option<bool> {
        let mut dots = minver.splitn(3, '.');
        let v: u64 = dots.next()?.parse().ok()?;
        let p: u64 = dots.next()?.parse().ok()?;
        let rest = dots.next().unwrap_or("");
        let (s, x) = rest.split_once('-').unwrap_or((rest, ""));
        let (s, x) = (leading_number(s), leading_number(x));
        let (kv, kp) = (self.version.unwrap_or(0), self.patchlevel.unwrap_or(0));
        Some(if (kv, kp) != (v, p) {
            (kv, kp) > (v, p)
        } else {
            match (self.sublevel, s) {
                (Some(ks), Some(s)) if ks != s => ks > s,
                (Some(_), Some(_)) => match (self.extraversion, x) {
                    (Some(kx), Some(x)) => kx >= x,
                    (_, Some(x)) => x == 0,
                    _ => true,
                },
                (_, Some(s)) => s == 0,
                _ => true,
            }
        })
    }
}

/// `ERRATA_<commit>` values: those already in `env` win, the rest are
/// computed from `errata_txt` ("commit : minimum kernel : summary" lines).
pub fn errata(
    errata_txt: Option<&str>,
    kernel: &KernelVersion,
    env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = env
        .iter()
        .filter(|(k, _)| k.starts_with("ERRATA_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for line in errata_txt.unwrap_or("").lines() {
        if line.starts_with('#') {
            continue;
        }
        let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
        let mut fields = compact.split(':');
        let (Some(commit), Some(minver)) = (fields.next(), fields.next()) else {
            continue;
        };
        if commit.is_empty() {
            continue;
        }
        let key = format!("ERRATA_{commit}");
        if out.contains_key(&key) {
            continue;
        }
        if let Some(have) = kernel.at_least(minver) {
            out.insert(key, if have { "y" } else { "n" }.to_string());
        }
    }
    out
}

/// The whole file. `kut_root` is where `errata.txt` may be; `force_errata`
/// adds `ERRATA_FORCE=y` as `run_tests.sh -a` does.
pub fn contents(kut_root: Option<&Path>, force_errata: bool) -> String {
    let kernel = KernelVersion::host();
    let mut env: BTreeMap<String, String> = std::env::vars().collect();
    if force_errata {
        env.insert("ERRATA_FORCE".into(), "y".into());
    }
    let txt = kut_root.and_then(|r| std::fs::read_to_string(r.join("errata.txt")).ok());
    let opt = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
    let mut s = String::new();
    for (k, v) in [
        ("TARGET", String::new()),
        ("QEMU_ACCEL", "kvm".to_string()),
        ("QEMU_VERSION_STRING", String::new()),
        ("QEMU_MAJOR", String::new()),
        ("QEMU_MINOR", String::new()),
        ("QEMU_MICRO", String::new()),
        ("KERNEL_VERSION_STRING", kernel.string.clone()),
        ("KERNEL_VERSION", opt(kernel.version)),
        ("KERNEL_PATCHLEVEL", opt(kernel.patchlevel)),
        ("KERNEL_SUBLEVEL", opt(kernel.sublevel)),
        ("KERNEL_EXTRAVERSION", opt(kernel.extraversion)),
    ] {
        s.push_str(&format!("{k}={v}\n"));
    }
    for (k, v) in errata(txt.as_deref(), &kernel, &env) {
        s.push_str(&format!("{k}={v}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_release_is_split_like_the_runner() {
        let k = KernelVersion::parse("6.18.44-fc-v445");
        assert_eq!(
            (k.version, k.patchlevel, k.sublevel, k.extraversion),
            (Some(6), Some(18), Some(44), None)
        );
        let k = KernelVersion::parse("5.10.0-28-cloud-amd64");
        assert_eq!((k.sublevel, k.extraversion), (Some(0), Some(28)));
    }

    #[test]
    fn errata_versions_compare() {
        let k = KernelVersion::parse("5.10.3-7");
        assert_eq!(k.at_least("4.9"), Some(true));
        assert_eq!(k.at_least("5.10"), Some(true));
        assert_eq!(k.at_least("5.11"), Some(false));
        assert_eq!(k.at_least("5.10.3"), Some(true));
        assert_eq!(k.at_least("5.10.4"), Some(false));
        assert_eq!(k.at_least("5.10.3-8"), Some(false));
        assert_eq!(k.at_least("5.10.3-7"), Some(true));
        assert_eq!(k.at_least("x.1"), None);
    }

    #[test]
    fn errata_lines() {
        let txt =
            "#--- header\nabc123 : 4.9 : old fix\ndef456 : 9.1 : future fix\n: 1.0 : no commit\n";
        let mut env = BTreeMap::new();
        env.insert("ERRATA_def456".to_string(), "y".to_string());
        env.insert("PATH".to_string(), "/bin".to_string());
        let e = errata(Some(txt), &KernelVersion::parse("6.1.0"), &env);
        let lines: Vec<String> = e.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(lines, ["ERRATA_abc123=y", "ERRATA_def456=y"]);
    }

    #[test]
    fn file_has_the_runner_lines() {
        let c = contents(None, true);
        for key in [
            "TARGET=",
            "QEMU_ACCEL=kvm",
            "KERNEL_VERSION_STRING=",
            "ERRATA_FORCE=y",
        ] {
            assert!(
                c.lines().any(|l| l.starts_with(key)),
                "{key} missing in {c}"
            );
        }
    }
}
