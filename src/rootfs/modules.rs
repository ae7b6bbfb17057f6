//! The kernel modules a run with a host root needs, from the kernel's
//! own module tree: its release read from the image, its modules.dep
//! for what each module needs first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::RootfsError;

/// The drivers the guest needs where the kernel builds them as modules
/// (Debian's): both virtio transports, the console ports, the root's
/// virtio-fs and the overlay over it. Absent ones are taken to be built
/// in.
pub const WANTED: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_console",
    "virtiofs",
    "overlay",
];

/// The release (`uname -r`) of the kernel in `image`: a bzImage's
/// setup header names it (kernel_version, boot protocol 2.00+); an ELF
/// kernel holds the "Linux version " banner.
pub fn kernel_release(image: &[u8]) -> Option<String> {
    let from_header = || {
        if image.get(0x202..0x206)? != b"HdrS" {
            return None;
        }
        let at = u16::from_le_bytes([*image.get(0x20e)?, *image.get(0x20f)?]);
        let s = image.get(usize::from(at) + 0x200..)?;
        first_word(s)
    };
    let from_banner = || {
        const BANNER: &[u8] = b"Linux version ";
        let at = image.windows(BANNER.len()).position(|w| w == BANNER)?;
        first_word(&image[at + BANNER.len()..])
    };
    from_header().or_else(from_banner)
}

fn first_word(s: &[u8]) -> Option<String> {
    let end = s
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .unwrap_or(s.len())
        .min(256);
    let w = std::str::from_utf8(&s[..end]).ok()?;
    (!w.is_empty() && w.bytes().all(|b| b.is_ascii_graphic())).then(|| w.to_string())
}

/// The module tree for `release`: `--modules DIR` (the tree itself, or
/// a directory holding it under `release`), else /lib/modules/RELEASE.
pub fn tree(modules: Option<&Path>, release: &str) -> Option<PathBuf> {
    let candidates = match modules {
        Some(d) => vec![d.join(release), d.to_path_buf()],
        None => vec![Path::new("/lib/modules").join(release)],
    };
    candidates
        .into_iter()
        .find(|d| d.join("modules.dep").is_file())
}

/// modules.dep: a module's file (relative to the tree) and the files it
/// needs, by the module's name (`-` as `_`).
pub struct Deps {
    by_name: HashMap<String, (String, Vec<String>)>,
}

fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl Deps {
    pub fn parse(text: &str) -> Deps {
        let by_name = text
            .lines()
            .filter_map(|l| {
                let (file, deps) = l.split_once(':')?;
                let deps = deps.split_whitespace().map(str::to_string).collect();
                Some((module_name(file), (file.trim().to_string(), deps)))
            })
            .collect();
        Deps { by_name }
    }

    pub fn read(tree: &Path) -> Result<Deps, RootfsError> {
        let path = tree.join("modules.dep");
        let text = std::fs::read_to_string(&path).map_err(|e| RootfsError::Io {
            what: path.display().to_string(),
            source: e,
        })?;
        Ok(Deps::parse(&text))
    }

    /// The files to load for `names`, each after the files it needs,
    /// each once; names the tree does not have are left out.
    pub fn load_order(&self, names: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for n in names {
            self.visit(&n.replace('-', "_"), &mut out, 0);
        }
        out
    }

    fn visit(&self, name: &str, out: &mut Vec<String>, depth: usize) {
        // modules.dep lists every module needed, so a chain is short; a
        // cycle in a damaged file stops here.
        let Some((file, deps)) = self.by_name.get(name) else {
            return;
        };
        if out.contains(file) || depth > 64 {
            return;
        }
        // modprobe loads the last needed module first.
        for d in deps.iter().rev() {
            self.visit(&module_name(d), out, depth + 1);
        }
        if !out.contains(file) {
            out.push(file.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/fs/fuse/fuse.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/crypto/x-y.ko.xz:
";

    #[test]
    fn modules_come_after_what_they_need() {
        let d = Deps::parse(DEP);
        let order = d.load_order(&["virtio_pci", "virtio_console", "virtiofs", "nope"]);
        let at = |f: &str| order.iter().position(|o| o.ends_with(f)).unwrap();
        assert!(at("virtio_ring.ko") < at("virtio.ko") || at("virtio.ko") < at("virtio_pci.ko"));
        assert!(at("virtio.ko") < at("virtio_pci.ko"));
        assert!(at("virtio_ring.ko") < at("virtio_console.ko"));
        assert!(at("fuse.ko") < at("virtiofs.ko"));
        assert_eq!(order.len(), 8, "{order:?}");
        assert_eq!(d.load_order(&["x_y"]), ["kernel/crypto/x-y.ko.xz"]);
    }

    #[test]
    fn releases_come_from_the_header_or_the_banner() {
        let mut img = vec![0u8; 0x1000];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x20e..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        img[0x500..0x520].copy_from_slice(b"6.1.0-57-cloud-amd64 (debian@x) ");
        assert_eq!(
            kernel_release(&img).as_deref(),
            Some("6.1.0-57-cloud-amd64")
        );
        let elf = b"\x7fELF....Linux version 6.12.3 (gcc) #1".to_vec();
        assert_eq!(kernel_release(&elf).as_deref(), Some("6.12.3"));
        assert_eq!(kernel_release(b"nothing"), None);
    }
}
