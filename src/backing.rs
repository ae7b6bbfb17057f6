//! Whether the host can back the guest RAM `--mem` asks for.
//!
//! Guest RAM is mapped with MAP_NORESERVE and filled as the guest touches
//! it, so Linux lets any size through, and a guest that uses more than
//! the host has gets kvmrun killed by the OOM killer. kvmrun applies the
//! rule Linux applies to ordinary mappings instead, by
//! `vm.overcommit_memory`:
//!
//! - 0 (heuristic, the default): refuse more than the host's RAM plus
//!   swap, which the kernel would refuse for an ordinary mapping too;
//! - 1 (always overcommit): allow any size, as the kernel does;
//! - 2 (strict): refuse more than the commit limit left
//!   (`CommitLimit - Committed_AS`).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--mem {} MiB: {why}", mem >> 20)]
pub struct BackingError {
    pub mem: u64,
    pub why: String,
}

/// What the host reports about its memory (`/proc/meminfo` and
/// `/proc/sys/vm/overcommit_memory`), in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Host {
    pub ram: u64,
    pub swap: u64,
    pub commit_limit: u64,
    pub committed: u64,
    pub overcommit: u8,
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

impl Host {
    /// This host; `None` when /proc cannot be read (then nothing is refused).
    pub fn read() -> Option<Host> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let mut h = Host::parse(&meminfo);
        h.overcommit = overcommit;
        Some(h)
    }

    /// The fields of a `/proc/meminfo` text.
    pub fn parse(meminfo: &str) -> Host {
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kib| kib.saturating_mul(1024))
        };
        Host {
            ram: field("MemTotal"),
            swap: field("SwapTotal"),
            commit_limit: field("CommitLimit"),
            committed: field("Committed_AS"),
            overcommit: 0,
        }
    }

    /// Why `mem` bytes of guest RAM cannot be backed, if they cannot.
    pub fn refuse(&self, mem: u64) -> Result<(), BackingError> {
        let refuse = |why: String| Err(BackingError { mem, why });
        match self.overcommit {
            1 => Ok(()),
            2 => {
                let left = self.commit_limit.saturating_sub(self.committed);
                if mem > left {
                    return refuse(format!(
                        "more than this host can commit ({} MiB left of its {} MiB commit limit, vm.overcommit_memory=2)",
                        mib(left),
                        mib(self.commit_limit)
                    ));
                }
                Ok(())
            }
            _ => {
                let total = self.ram.saturating_add(self.swap);
                if mem > total {
                    return refuse(format!(
                        "more than this host's RAM and swap ({} MiB and {} MiB); a guest that used it all would be killed by the OOM killer (with vm.overcommit_memory=1 kvmrun allows it, as Linux does)",
                        mib(self.ram),
                        mib(self.swap)
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Refuse `mem` bytes of guest RAM this host cannot back.
pub fn check(mem: u64) -> Result<(), BackingError> {
    match Host::read() {
        Some(h) => h.refuse(mem),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24684084 kB\nMemFree:        1 kB\n\
                           SwapTotal:       1048576 kB\nCommitLimit:    13390618 kB\n\
                           Committed_AS:    1048576 kB\n";

    #[test]
    fn meminfo_fields_are_read() {
        let h = Host::parse(MEMINFO);
        assert_eq!(h.ram, 24684084 * 1024);
        assert_eq!(h.swap, 1 << 30);
        assert_eq!(h.commit_limit, 13390618 * 1024);
        assert_eq!(h.committed, 1 << 30);
        assert_eq!(Host::parse(""), Host::default());
    }

    #[test]
    fn limits_follow_the_overcommit_mode() {
        let mut h = Host::parse(MEMINFO);
        let total = h.ram + h.swap;
        assert!(h.refuse(total).is_ok());
        let e = h.refuse(total + 4096).unwrap_err().to_string();
        assert!(
            e.contains("more than this host's RAM and swap (24105 MiB and 1024 MiB)"),
            "{e}"
        );
        h.overcommit = 1;
        assert!(h.refuse(1 << 50).is_ok());
        h.overcommit = 2;
        assert!(h.refuse(h.commit_limit - h.committed).is_ok());
        let e = h.refuse(h.commit_limit).unwrap_err().to_string();
        assert!(e.contains("vm.overcommit_memory=2"), "{e}");
    }
}
