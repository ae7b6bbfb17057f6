//! The initramfs of a run with a host root: a cpio "newc" archive (the
//! format the kernel unpacks, Documentation/driver-api/early-userspace)
//! written with the `cpio` crate: kvmrun-init as /init, its files under
//! /kvmrun and the modules. The root itself is not packed: the guest
//! mounts it over virtio-fs.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cpio::newc::Builder;

use super::RootfsError;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

pub struct Archive {
    out: BufWriter<File>,
    /// Directories written by `dirs()`, each once.
    made: std::collections::HashSet<String>,
    ino: u32,
}

fn io(what: &Path) -> impl Fn(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        what: what.display().to_string(),
        source,
    }
}

impl Archive {
    pub fn create(path: &Path) -> Result<Archive, RootfsError> {
        let f = File::create(path).map_err(io(path))?;
        Ok(Archive {
            out: BufWriter::new(f),
            made: Default::default(),
            ino: 0,
        })
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let mut w = Builder::new(name.trim_start_matches('/'))
            .ino(self.ino)
            .mode(mode)
            .nlink(nlink)
            .write(&mut self.out, data.len() as u32);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }

    /// Directory `name` and every directory above it.
    pub fn dirs(&mut self, name: &str) -> Result<(), RootfsError> {
        let mut at = String::new();
        for part in name.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            if self.made.insert(at.clone()) {
                self.entry(&at, S_IFDIR | 0o755, &[])
                    .map_err(io(Path::new(&at)))?;
            }
        }
        Ok(())
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<(), RootfsError> {
        self.entry(name, S_IFREG | (mode & 0o7777), data)
            .map_err(io(Path::new(name)))
    }

    /// Host file `src` as `name`.
    pub fn host_file(&mut self, name: &str, src: &Path) -> Result<(), RootfsError> {
        let mut data = Vec::new();
        let meta = File::open(src)
            .and_then(|mut f| f.read_to_end(&mut data).and(f.metadata()))
            .map_err(io(src))?;
        if data.len() > u32::MAX as usize {
            return Err(RootfsError::TooBig(src.display().to_string()));
        }
        self.file(name, meta.permissions().mode(), &data)
    }

    pub fn finish(mut self, path: &Path) -> Result<(), RootfsError> {
        cpio::newc::trailer(&mut self.out).map_err(io(path))?;
        self.out.flush().map_err(io(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_read_back_with_the_cpio_reader() {
        let d = tempfile::tempdir().unwrap();
        let tool = d.path().join("tool");
        std::fs::write(&tool, b"#!x").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = d.path().join("a.cpio");
        let mut a = Archive::create(&path).unwrap();
        a.dirs("/kvmrun/x").unwrap();
        a.file("/kvmrun/argv", 0o644, b"sh\0-c\0exit 3\0").unwrap();
        a.dirs("/kvmrun/x/bin").unwrap();
        a.host_file("/kvmrun/x/bin/tool", &tool).unwrap();
        a.finish(&path).unwrap();
        let mut r = std::io::BufReader::new(File::open(&path).unwrap());
        let mut seen = Vec::new();
        loop {
            let e = cpio::NewcReader::new(r).unwrap();
            if e.entry().is_trailer() {
                break;
            }
            seen.push((e.entry().name().to_string(), e.entry().mode() >> 12));
            r = e.finish().unwrap();
        }
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "kvmrun",
                "kvmrun/x",
                "kvmrun/argv",
                "kvmrun/x/bin",
                "kvmrun/x/bin/tool"
            ]
        );
        assert_eq!(seen[4].1, 0o10, "a regular file");
    }
}
