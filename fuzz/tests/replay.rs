//! Replays every seed of every fuzz target (seeds/NAME/*): the inputs
//! the targets start from and every crash the fuzzer found, so a fixed
//! crash stays fixed. Runs on the stable toolchain as part of `make test`.

use std::path::{Path, PathBuf};

use kvmrun_fuzz::TARGETS;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn seeds(name: &str) -> Vec<PathBuf> {
    let dir = root().join("seeds").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_of_every_target_runs_clean() {
    let mut runs = 0;
    let mut failed = Vec::new();
    for t in TARGETS {
        let files = seeds(t.name);
        assert!(!files.is_empty(), "seeds/{} is empty", t.name);
        for f in files {
            let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if std::panic::catch_unwind(|| (t.run)(&data)).is_err() {
                failed.push(format!("{}: {}", t.name, f.display()));
            }
            runs += 1;
        }
    }
    eprintln!("{runs} seeds replayed over {} targets", TARGETS.len());
    assert!(
        failed.is_empty(),
        "targets panicked on:\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_target_has_a_binary_and_every_binary_a_target() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    for t in TARGETS {
        let src = root().join("fuzz_targets").join(format!("{}.rs", t.name));
        let text =
            std::fs::read_to_string(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        assert!(
            text.contains(&format!("target(\"{}\")", t.name)),
            "{}",
            src.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "no [[bin]] for {} in fuzz/Cargo.toml",
            t.name
        );
    }
    for e in std::fs::read_dir(root().join("fuzz_targets")).expect("fuzz_targets") {
        let p = e.expect("entry").path();
        let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        assert!(
            kvmrun_fuzz::target(stem).is_some(),
            "{} is not in TARGETS",
            p.display()
        );
    }
}
