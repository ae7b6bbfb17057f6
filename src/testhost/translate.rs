//! From the QEMU command line a cfg entry asks for to `kvmrun run` flags.
//!
//! The runner builds `-smp N [-append ARGS] PARAMS` and `eval`s it in bash,
//! so quotes group words and backticks run commands on the host. Plain
//! strings are split here with POSIX shell quoting rules (shlex); strings
//! with a backtick or `$` go through `sh -c`, which expands them the way the
//! runner's `eval` does. Globbing is not done for plain strings (the runner
//! would glob words like `ept_access*` against its working directory, where
//! they match nothing).
//!
//! Each QEMU option either has an exact kvmrun equivalent or the test is
//! skipped with the option named: a test never runs with a silently
//! different meaning.

use std::process::Command;

use crate::config;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TranslateError {
    #[error("untranslated: {0}")]
    Untranslated(String),
    #[error("unbalanced quotes in '{0}'")]
    Quotes(String),
    #[error("shell expansion of '{text}' failed: {why}")]
    Shell { text: String, why: String },
}

/// Split `text` into words as the runner's `eval` would. `env` is added to
/// the environment of the shell that expands backticks and variables.
pub fn shell_words(text: &str, env: &[(String, String)]) -> Result<Vec<String>, TranslateError> {
    if !text.contains(['`', '$']) {
        return shlex::split(text).ok_or_else(|| TranslateError::Quotes(text.to_string()));
    }
    // printf repeats its format for every argument; the leading "x" makes
    // sure one word is printed even when the text expands to none.
    let script = format!("printf '%s\\0' x {text}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| TranslateError::Shell {
            text: text.to_string(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(TranslateError::Shell {
            text: text.to_string(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut words: Vec<String> = stdout.split('\0').map(str::to_string).collect();
    words.pop(); // after the last NUL
                 // Without the "x", the text sent printf's output elsewhere (a
                 // redirection) or ended the shell before it.
    if words.first().map(String::as_str) != Some("x") {
        return Err(TranslateError::Shell {
            text: text.to_string(),
            why: "the shell printed no words (a redirection or an exit in the text?)".into(),
        });
    }
    words.remove(0);
    Ok(words)
}

/// Options QEMU takes without an argument.
const NO_ARG: &[&str] = &[
    "enable-kvm",
    "no-reboot",
    "no-shutdown",
    "nodefaults",
    "nographic",
    "S",
    "no-hpet",
    "no-acpi",
];

/// Translate QEMU's argument words into `kvmrun run` flags (without the
/// image). Every untranslatable option is collected so the skip reason
/// names all of them.
pub fn translate(words: &[String]) -> Result<Vec<String>, TranslateError> {
    let mut smp: Option<String> = None;
    let mut mem: Option<String> = None;
    let mut append: Option<String> = None;
    let mut cpu: Option<String> = None;
    let mut no_pit = false;
    let mut cpu_pm = false;
    let mut q35 = false;
    let mut split = false;
    let mut edus = 0usize;
    let mut iommu: Option<String> = None;
    let mut bad: Vec<String> = Vec::new();

    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        i += 1;
        let Some(opt) = word.strip_prefix("--").or_else(|| word.strip_prefix('-')) else {
            bad.push(word.clone());
            continue;
        };
        // QEMU also accepts "-opt=value".
        let (name, inline) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (opt, None),
        };
        if NO_ARG.contains(&name) {
            if name != "enable-kvm" {
                bad.push(word.clone());
            }
            continue;
        }
        let value = match inline {
            Some(v) => Some(v),
            None if i < words.len() => {
                i += 1;
                Some(words[i - 1].clone())
            }
            None => None,
        };
        let Some(value) = value else {
            bad.push(word.clone());
            continue;
        };
        let flag = format!("{word} {value}");
        match name {
            "smp" => match smp_count(&value) {
                Some(n) => smp = Some(n),
                None => bad.push(flag),
            },
            "m" => {
                let size = value.strip_prefix("size=").unwrap_or(&value);
                if config::parse_mem_size(size).is_ok() {
                    mem = Some(size.to_string());
                } else {
                    bad.push(flag);
                }
            }
            "append" => append = Some(value),
            "cpu" => cpu = Some(value),
            "machine" | "M" => {
                let mut ok = true;
                let mut pit_off = false;
                let mut machine = None;
                let mut irqchip = None;
                for (i, prop) in value.split(',').enumerate() {
                    match prop {
                        "pit=off" => pit_off = true,
                        "kernel-irqchip=split" => irqchip = Some(true),
                        "kernel-irqchip=on" => irqchip = Some(false),
                        "accel=kvm" => {}
                        // The type comes first, bare or as type=.
                        "pc" | "q35" if i == 0 => machine = Some(prop == "q35"),
                        "type=pc" | "type=q35" => machine = Some(prop == "type=q35"),
                        _ => ok = false,
                    }
                }
                if ok {
                    no_pit |= pit_off;
                    // QEMU keeps the last type given.
                    q35 = machine.unwrap_or(q35);
                    split = irqchip.unwrap_or(split);
                } else {
                    bad.push(flag);
                }
            }
            "device" => match value.split_once(',').unwrap_or((&value, "")) {
                ("edu", "") => edus += 1,
                // kvmrun's --iommu takes QEMU's properties as they are.
                ("intel-iommu", props) if props.parse::<config::IommuConfig>().is_ok() => {
                    iommu = Some(props.to_string())
                }
                _ => bad.push(flag),
            },
            "accel" if value == "kvm" => {}
            // QEMU's cpu-pm=on lets the guest run MWAIT, HLT, PAUSE and
            // C-states without exits: KVM_CAP_X86_DISABLE_EXITS with every
            // one of those KVM offers (kvm_arch_init()).
            "overcommit" => match value.as_str() {
                "cpu-pm=on" => cpu_pm = true,
                "cpu-pm=off" => cpu_pm = false,
                _ => bad.push(flag),
            },
            _ => bad.push(flag),
        }
    }
    if !bad.is_empty() {
        return Err(TranslateError::Untranslated(bad.join(" ")));
    }
    let mut args = Vec::new();
    if q35 {
        args.push("--machine=q35".to_string());
    }
    if let Some(n) = smp {
        args.push(format!("--smp={n}"));
    }
    if let Some(m) = mem {
        args.push(format!("--mem={m}"));
    }
    if let Some(c) = cpu {
        // QEMU only warns about features the host cannot give; so does
        // --cpu-lenient, with a line that says "warning".
        args.push(format!("--cpu={c}"));
        args.push("--cpu-lenient".to_string());
    }
    // kvmrun's split irqchip has no PIT yet (KVM's needs KVM's PICs):
    // the test runs without one, as with QEMU's pit=off.
    if split {
        args.push("--irqchip=split".to_string());
        no_pit = true;
    }
    if no_pit {
        args.push("--no-pit".to_string());
    }
    if cpu_pm {
        args.push("--kvm-cap=X86_DISABLE_EXITS".to_string());
    }
    args.extend(std::iter::repeat_n("--edu".to_string(), edus));
    match iommu.as_deref() {
        Some("") => args.push("--iommu".to_string()),
        Some(props) => args.push(format!("--iommu={props}")),
        None => {}
    }
    if let Some(a) = append {
        args.push(format!("--append={a}"));
    }
    Ok(args)
}

/// `-smp N` or `-smp cpus=N`; topology properties have no kvmrun meaning.
fn smp_count(value: &str) -> Option<String> {
    let n = value.strip_prefix("cpus=").unwrap_or(value);
    n.parse::<u32>().ok().map(|n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        shell_words(s, &[]).unwrap()
    }

    fn t(s: &str) -> Result<Vec<String>, TranslateError> {
        translate(&w(s))
    }

    #[test]
    fn words_follow_shell_quoting() {
        assert_eq!(
            w("-append 'a b' -cpu max"),
            ["-append", "a b", "-cpu", "max"]
        );
        assert_eq!(w("-append \"x  y\"z"), ["-append", "x  yz"]);
        assert_eq!(w("  "), Vec::<String>::new());
        assert_eq!(w("ept_access*"), ["ept_access*"]);
        assert!(matches!(
            shell_words("-append 'open", &[]),
            Err(TranslateError::Quotes(_))
        ));
    }

    #[test]
    fn backticks_and_variables_are_expanded_by_the_shell() {
        assert_eq!(w("-append \"10 `echo 42`\""), ["-append", "10 42"]);
        let env = [("MAX_SMP".to_string(), "3".to_string())];
        assert_eq!(shell_words("-smp $MAX_SMP", &env).unwrap(), ["-smp", "3"]);
        assert_eq!(shell_words("$((1+1))", &env).unwrap(), ["2"]);
        assert_eq!(
            shell_words("$EMPTY_NOT_SET", &[]).unwrap(),
            Vec::<String>::new()
        );
        assert!(matches!(
            shell_words("`exit 3`; (", &[]),
            Err(TranslateError::Shell { .. })
        ));
        // The `kut_cfg` fuzz target's first crash: words sent elsewhere
        // by a redirection.
        let e = shell_words("$X > /dev/null", &[]).unwrap_err().to_string();
        assert!(e.contains("printed no words"), "{e}");
    }

    #[test]
    fn known_flags_translate() {
        assert_eq!(
            t("-smp 2 -append 'ipi halt' -cpu qemu64,+x2apic -m 2048").unwrap(),
            [
                "--smp=2",
                "--mem=2048",
                "--cpu=qemu64,+x2apic",
                "--cpu-lenient",
                "--append=ipi halt"
            ]
        );
        assert_eq!(
            t("-smp 1 -machine pit=off").unwrap(),
            ["--smp=1", "--no-pit"]
        );
        assert_eq!(t("-M pit=off,accel=kvm").unwrap(), ["--no-pit"]);
        assert_eq!(
            t("-enable-kvm -m 4g -cpu host").unwrap(),
            ["--mem=4g", "--cpu=host", "--cpu-lenient"]
        );
        assert_eq!(
            t("-machine accel=kvm -accel kvm").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            t("-smp cpus=4 --m=size=1G").unwrap(),
            ["--smp=4", "--mem=1G"]
        );
        // QEMU keeps the last of a repeated option.
        assert_eq!(
            t("-smp 1 -smp 3 -append a -append b").unwrap(),
            ["--smp=3", "--append=b"]
        );
        assert_eq!(
            t("-cpu max,+svm -overcommit cpu-pm=on -m 4g").unwrap(),
            [
                "--mem=4g",
                "--cpu=max,+svm",
                "--cpu-lenient",
                "--kvm-cap=X86_DISABLE_EXITS"
            ]
        );
        assert_eq!(t("-overcommit cpu-pm=off").unwrap(), Vec::<String>::new());
        assert_eq!(
            t("-M q35 -device edu -smp 4").unwrap(),
            ["--machine=q35", "--smp=4", "--edu"]
        );
        assert_eq!(
            t("-machine type=q35,accel=kvm -device edu -device edu").unwrap(),
            ["--machine=q35", "--edu", "--edu"]
        );
        assert_eq!(
            t("-M q35 -device intel-iommu,intremap=on,eim=off -device edu").unwrap(),
            ["--machine=q35", "--edu", "--iommu=intremap=on,eim=off"]
        );
        assert_eq!(
            t("-M q35 -device intel-iommu").unwrap(),
            ["--machine=q35", "--iommu"]
        );
        assert_eq!(t("-M q35 -M pc").unwrap(), Vec::<String>::new());
        assert_eq!(t("-M q35,pit=off").unwrap(), ["--machine=q35", "--no-pit"]);
        assert_eq!(
            t("-M q35,kernel-irqchip=split").unwrap(),
            ["--machine=q35", "--irqchip=split", "--no-pit"]
        );
        // intel_iommu's whole line.
        assert_eq!(
            t("-M q35,kernel-irqchip=split -device intel-iommu,intremap=on,eim=off -device edu")
                .unwrap(),
            [
                "--machine=q35",
                "--irqchip=split",
                "--no-pit",
                "--edu",
                "--iommu=intremap=on,eim=off"
            ]
        );
        assert_eq!(
            t("-M kernel-irqchip=split,pit=off").unwrap(),
            ["--irqchip=split", "--no-pit"]
        );
        assert_eq!(
            t("-M kernel-irqchip=split -M kernel-irqchip=on").unwrap(),
            Vec::<String>::new()
        );
        // Arguments that look like flags stay arguments.
        assert_eq!(
            t("-append '-pause_filter_test -x'").unwrap(),
            ["--append=-pause_filter_test -x"]
        );
    }

    #[test]
    fn other_flags_are_named() {
        let u = |s: &str| match t(s) {
            Err(TranslateError::Untranslated(f)) => f,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            u("-cpu max -device hyperv-testdev"),
            "-device hyperv-testdev"
        );
        assert_eq!(
            u("-device intel-iommu,eim=on"),
            "-device intel-iommu,eim=on"
        );
        assert_eq!(u("-M kernel-irqchip=off"), "-M kernel-irqchip=off");
        assert_eq!(u("-M pc,q35"), "-M pc,q35");
        assert_eq!(u("-M q35-8.2"), "-M q35-8.2");
        assert_eq!(u("-machine microvm"), "-machine microvm");
        assert_eq!(
            u("-device edu,dma_mask=0xffff"),
            "-device edu,dma_mask=0xffff"
        );
        assert_eq!(u("-device"), "-device");
        assert_eq!(u("-machine vmport=on -cpu max"), "-machine vmport=on");
        assert_eq!(
            u("-machine pit=off,vmport=on"),
            "-machine pit=off,vmport=on"
        );
        assert_eq!(
            u("-overcommit mem-lock=on,cpu-pm=on"),
            "-overcommit mem-lock=on,cpu-pm=on"
        );
        assert_eq!(
            u("-global kvm-pit.lost_tick_policy=discard"),
            "-global kvm-pit.lost_tick_policy=discard"
        );
        assert_eq!(u("-smp 2,sockets=2"), "-smp 2,sockets=2");
        assert_eq!(u("-m 1.5G"), "-m 1.5G");
        assert_eq!(u("-accel tcg"), "-accel tcg");
        assert_eq!(u("-no-reboot"), "-no-reboot");
        assert_eq!(u("stray"), "stray");
        assert_eq!(u("-cpu"), "-cpu");
    }
}
