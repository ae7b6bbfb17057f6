//! Suites: kvm-unit-tests' unittests.cfg (parsed, then planned and its
//! QEMU flags translated) and kvmrun's TOML suites of Linux tests.
//!
//! Planning a cfg entry can run `bash` (`disabled_if`), read files
//! (`check`) and run `sh` to expand `$` and backquotes in `smp`,
//! `extra_params` and `test_args`; the target leaves the first two keys
//! out and turns `$` and backquotes into `x`, because a fuzzer must not
//! run the shell commands it makes up (a redirection it wrote once left
//! files in the working directory).

use kvmrun::testhost::{cfg, kut, linux, translate};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The directory of images a cfg's `file =` lines may name: a.flat,
/// t.flat and x.flat, one byte each, made once per process (guest images
/// are built, never committed).
fn image_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("cannot make the fuzz image directory");
        for name in ["a.flat", "t.flat", "x.flat"] {
            std::fs::write(d.path().join(name), b"x").expect("cannot write a fuzz image");
        }
        d
    });
    dir.path().to_path_buf()
}

pub fn kut_cfg(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("unittests.cfg");
    let Ok(mut entries) = cfg::parse(text, path) else {
        return;
    };
    let env = vec![
        ("ARCH".to_string(), "x86_64".to_string()),
        ("MAX_SMP".to_string(), "2".to_string()),
    ];
    for e in &mut entries {
        e.disabled_if = None;
        e.check = None;
        for text in [&mut e.smp, &mut e.params, &mut e.test_args]
            .into_iter()
            .flatten()
        {
            *text = text.replace(['$', '`'], "x");
        }
        if let Some(p) = &e.params {
            if let Ok(words) = translate::shell_words(p, &env) {
                let _ = translate::translate(&words);
            }
        }
    }
    let opts = kut::KutOptions {
        dir: image_dir(),
        names: Vec::new(),
        group: None,
        all: true,
        timeout_scale: 1.5,
        max_smp: 2,
    };
    let _ = kut::plan(path, &entries, &opts);
}

pub fn toml_suite(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every kernel and initrd is "found": the plan is the point, not the
    // file system.
    let find = |base: &Path, p: &str| Some(base.join(p));
    let _ = linux::parse(text, Path::new("/fuzz/suite.toml"), &[], None, 1.0, &find);
}
