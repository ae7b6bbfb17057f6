//! The share driven with FUSE messages (the escapes a guest could try),
//! and the device with virtio-queue's mock rings (malformed chains).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::share::{HeldInode, MAX_MESSAGE, OUT_HEADER};
use super::*;
use crate::virtio::test_utils::memory;

const ROOT: u64 = 1;
const S_IFMT: u32 = 0o170000;
const S_IFLNK: u32 = 0o120000;
/// FUSE_NO_OPEN_SUPPORT and FUSE_NO_OPENDIR_SUPPORT, as Linux sends them.
const INIT_FLAGS: u32 = (1 << 17) | (1 << 24);

/// A FUSE client over a share, as the guest's driver speaks.
struct Client {
    share: Arc<Share>,
    unique: u64,
}

/// A reply: the error (0 or -errno) and the body after the header.
#[derive(Debug)]
struct Reply {
    error: i32,
    body: Vec<u8>,
}

impl Reply {
    /// `struct fuse_entry_out`'s node ID.
    fn node(&self) -> u64 {
        assert_eq!(self.error, 0, "{self:?}");
        u64::from_le_bytes(self.body[0..8].try_into().unwrap())
    }

    /// The mode in an entry's `struct fuse_attr` (at 40 + 60).
    fn entry_mode(&self) -> u32 {
        u32::from_le_bytes(self.body[100..104].try_into().unwrap())
    }
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn le32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Client {
    fn new(share: Arc<Share>) -> Self {
        Client::with_init_flags(share, INIT_FLAGS)
    }

    fn with_init_flags(share: Arc<Share>, flags: u32) -> Self {
        let mut c = Client { share, unique: 0 };
        let r = c.call(26, 0, &le32(&[7, 31, 0, flags]));
        assert_eq!(r.error, 0, "INIT: {r:?}");
        c
    }

    fn message(&mut self, opcode: u32, node: u64, body: &[u8]) -> Vec<u8> {
        self.unique += 2;
        let mut m = Vec::new();
        m.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
        m.extend_from_slice(&opcode.to_le_bytes());
        m.extend_from_slice(&self.unique.to_le_bytes());
        m.extend_from_slice(&node.to_le_bytes());
        // uid, gid, pid, extension length, padding: root's request.
        m.extend_from_slice(&[0u8; 16]);
        m.extend_from_slice(body);
        m
    }

    fn call(&mut self, opcode: u32, node: u64, body: &[u8]) -> Reply {
        let m = self.message(opcode, node, body);
        let r = self.share.handle(m, MAX_MESSAGE);
        assert!(r.len() >= OUT_HEADER, "opcode {opcode}: reply {r:?}");
        assert_eq!(
            u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(
            u64::from_le_bytes(r[8..16].try_into().unwrap()),
            self.unique
        );
        Reply {
            error: i32::from_le_bytes(r[4..8].try_into().unwrap()),
            body: r[OUT_HEADER..].to_vec(),
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(1, parent, &cstr(name))
    }

    fn getattr(&mut self, node: u64) -> Reply {
        self.call(3, node, &[0u8; 16])
    }

    fn readlink(&mut self, node: u64) -> Reply {
        self.call(5, node, &[])
    }

    /// READ with `flags` as a file opened with them carries.
    fn read(&mut self, node: u64, size: u32, flags: u32) -> Reply {
        let mut b = vec![0u8; 40];
        b[16..20].copy_from_slice(&size.to_le_bytes());
        b[32..36].copy_from_slice(&flags.to_le_bytes());
        self.call(15, node, &b)
    }

    fn write(&mut self, node: u64, data: &[u8]) -> Reply {
        let mut b = vec![0u8; 40];
        b[16..20].copy_from_slice(&(data.len() as u32).to_le_bytes());
        b[32..36].copy_from_slice(&(libc::O_WRONLY as u32).to_le_bytes());
        b.extend_from_slice(data);
        self.call(16, node, &b)
    }

    fn create(&mut self, parent: u64, name: &str) -> Reply {
        let mut b = le32(&[
            libc::O_WRONLY as u32 | libc::O_CREAT as u32,
            0o100644,
            0o022,
            0,
        ]);
        b.extend_from_slice(&cstr(name));
        self.call(35, parent, &b)
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Reply {
        let mut b = le32(&[0o755, 0o022]);
        b.extend_from_slice(&cstr(name));
        self.call(9, parent, &b)
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Reply {
        let mut b = cstr(name);
        b.extend_from_slice(&cstr(target));
        self.call(6, parent, &b)
    }

    fn link(&mut self, old: u64, parent: u64, name: &str) -> Reply {
        let mut b = old.to_le_bytes().to_vec();
        b.extend_from_slice(&cstr(name));
        self.call(13, parent, &b)
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Reply {
        let mut b = le32(&[mode, rdev, 0o022, 0]);
        b.extend_from_slice(&cstr(name));
        self.call(8, parent, &b)
    }

    fn open(&mut self, node: u64, flags: u32) -> Reply {
        self.call(14, node, &le32(&[flags, 0]))
    }

    fn forget(&mut self, node: u64, n: u64) {
        let m = self.message(2, node, &n.to_le_bytes());
        assert!(self.share.handle(m, MAX_MESSAGE).is_empty());
    }
}

/// A directory `outside` holding `secret` and the shared `share`, which
/// holds `file`, `sub/inner`, and symbolic links out.
fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
    let top = tempfile::tempdir().unwrap();
    std::fs::write(top.path().join("secret"), b"outside").unwrap();
    let share = top.path().join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("file"), b"hello").unwrap();
    std::fs::write(share.join("sub/inner"), b"inner").unwrap();
    let secret = top.path().join("secret");
    std::os::unix::fs::symlink(&secret, share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("rel")).unwrap();
    std::os::unix::fs::symlink("/etc", share.join("etc")).unwrap();
    (top, share)
}

fn client(dir: &Path, ro: bool) -> Client {
    Client::new(Arc::new(Share::open(dir, ro).unwrap()))
}

#[test]
fn serves_reads_and_writes() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let f = c.lookup(ROOT, "file").node();
    let r = c.read(f, 100, libc::O_RDONLY as u32);
    assert_eq!((r.error, r.body.as_slice()), (0, &b"hello"[..]));
    let n = c.create(ROOT, "new").node();
    assert_eq!(c.write(n, b"from the guest").error, 0);
    assert_eq!(std::fs::read(dir.join("new")).unwrap(), b"from the guest");
    assert_eq!(c.mkdir(ROOT, "d").error, 0);
    assert!(dir.join("d").is_dir());
}

#[test]
fn dotdot_at_the_root_is_the_root() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let up = c.lookup(ROOT, "..").node();
    assert_eq!(up, ROOT);
    assert_eq!(c.lookup(up, "secret").error, -libc::ENOENT);
    let sub = c.lookup(ROOT, "sub").node();
    let up = c.lookup(sub, "..").node();
    assert_eq!(up, ROOT);
    assert_eq!(c.lookup(up, "secret").error, -libc::ENOENT);
}

#[test]
fn names_with_a_slash_are_refused() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    for name in ["../secret", "/etc/passwd", "sub/../../secret", "sub/inner"] {
        assert_eq!(c.lookup(ROOT, name).error, -libc::EINVAL, "{name}");
        assert_eq!(c.create(ROOT, name).error, -libc::EINVAL, "{name}");
        assert_eq!(c.mkdir(ROOT, name).error, -libc::EINVAL, "{name}");
    }
    for name in ["..", "."] {
        assert_eq!(c.mkdir(ROOT, name).error, -libc::EINVAL, "{name}");
        assert_eq!(c.symlink(ROOT, name, "/etc").error, -libc::EINVAL, "{name}");
    }
}

#[test]
fn symbolic_links_are_not_followed() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    for (name, target) in [
        ("abs", None),
        ("rel", Some("../secret")),
        ("etc", Some("/etc")),
    ] {
        let e = c.lookup(ROOT, name);
        assert_eq!(e.entry_mode() & S_IFMT, S_IFLNK, "{name}");
        let link = e.node();
        let r = c.readlink(link);
        assert_eq!(r.error, 0);
        if let Some(t) = target {
            assert_eq!(r.body, t.as_bytes());
        }
        // The link itself is never opened for I/O or as a directory.
        let read = c.read(link, 100, libc::O_RDONLY as u32);
        assert_ne!(read.error, 0, "{name}: read through the link");
        assert_ne!(c.lookup(link, "passwd").error, 0, "{name}");
    }
    // A link the guest makes is text only, resolved by the guest.
    let l = c.symlink(ROOT, "mine", "/etc/passwd").node();
    assert_ne!(c.read(l, 100, libc::O_RDONLY as u32).error, 0);
    assert!(std::fs::symlink_metadata(dir.join("mine"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn node_ids_are_only_those_looked_up() {
    let (t, dir) = tree();
    let mut c = client(&dir, false);
    let f = c.lookup(ROOT, "file").node();
    // Node IDs are the host's inode numbers under the device's bits: an
    // inode outside forged the same way is unknown to the server.
    let ino = std::fs::metadata(dir.join("file")).unwrap().ino();
    let secret_ino = std::fs::metadata(t.path().join("secret")).unwrap().ino();
    let forged = (f & !ino) | secret_ino;
    assert_ne!(c.getattr(forged).error, 0);
    assert_ne!(c.read(forged, 100, libc::O_RDONLY as u32).error, 0);
    assert_ne!(c.link(forged, ROOT, "stolen").error, 0);
    assert!(!dir.join("stolen").exists());
    // A hard link of a file inside stays inside.
    assert_eq!(c.link(f, ROOT, "again").error, 0);
    assert_eq!(std::fs::read(dir.join("again")).unwrap(), b"hello");
    // Forgotten, a node is gone.
    let inner_dir = c.lookup(ROOT, "sub").node();
    c.forget(inner_dir, 1);
    assert_ne!(c.getattr(inner_dir).error, 0);
}

#[test]
fn read_only_refuses_every_change() {
    let (_t, dir) = tree();
    let mut c = client(&dir, true);
    let f = c.lookup(ROOT, "file").node();
    assert_eq!(c.read(f, 100, libc::O_RDONLY as u32).body, b"hello");
    // A READ carrying O_TRUNC (no OPEN comes first) reads, truncates
    // nothing.
    let trunc = (libc::O_RDWR | libc::O_TRUNC) as u32;
    assert_eq!(c.read(f, 100, trunc).body, b"hello");
    let erofs = -libc::EROFS;
    assert_eq!(c.write(f, b"x").error, erofs);
    assert_eq!(c.create(ROOT, "new").error, erofs);
    assert_eq!(c.mkdir(ROOT, "d").error, erofs);
    assert_eq!(c.symlink(ROOT, "l", "file").error, erofs);
    assert_eq!(c.link(f, ROOT, "again").error, erofs);
    assert_eq!(c.call(10, ROOT, &cstr("file")).error, erofs, "UNLINK");
    assert_eq!(c.call(11, ROOT, &cstr("sub")).error, erofs, "RMDIR");
    let mut rename = ROOT.to_le_bytes().to_vec();
    rename.extend_from_slice(&cstr("file"));
    rename.extend_from_slice(&cstr("moved"));
    assert_eq!(c.call(12, ROOT, &rename).error, erofs, "RENAME");
    assert_eq!(c.call(4, f, &[0u8; 88]).error, erofs, "SETATTR");
    assert_eq!(c.call(43, f, &[0u8; 32]).error, erofs, "FALLOCATE");
    let open_w = le32(&[libc::O_WRONLY as u32, 0]);
    assert_eq!(c.call(14, f, &open_w).error, erofs, "OPEN for writing");
    assert_eq!(c.call(34, f, &le32(&[2, 0])).error, erofs, "ACCESS W_OK");
    assert_eq!(std::fs::read(dir.join("file")).unwrap(), b"hello");
    assert!(!dir.join("new").exists() && !dir.join("d").exists());
}

/// A disk's device number (sda): what a guest would reach for.
fn disk_rdev() -> u32 {
    libc::makedev(8, 0) as u32
}

#[test]
fn device_nodes_cannot_be_made() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let blk = c.mknod(ROOT, "disk", libc::S_IFBLK | 0o600, disk_rdev());
    assert_eq!(blk.error, -libc::EPERM);
    let chr = c.mknod(
        ROOT,
        "mem",
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 1) as u32,
    );
    assert_eq!(chr.error, -libc::EPERM);
    assert!(!dir.join("disk").exists() && !dir.join("mem").exists());
}

#[test]
fn fifos_sockets_and_files_can_be_made() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    for (name, mode) in [
        ("fifo", libc::S_IFIFO),
        ("sock", libc::S_IFSOCK),
        ("plain", libc::S_IFREG),
    ] {
        let r = c.mknod(ROOT, name, mode | 0o644, disk_rdev());
        assert_eq!(r.entry_mode() & S_IFMT, mode, "{name}: {r:?}");
        let host = std::fs::symlink_metadata(dir.join(name)).unwrap();
        assert_eq!(host.mode() & S_IFMT, mode, "{name}");
    }
}

/// `dir/null`, the host's /dev/null's twin, made as root; None (and a
/// message) when the test does not run as root.
fn host_null(dir: &Path) -> Option<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a device node needs root");
        return None;
    }
    let path = std::ffi::CString::new(dir.join("null").into_os_string().into_encoded_bytes());
    let path = path.unwrap();
    let dev = libc::makedev(1, 3);
    // SAFETY: a valid C string; the result is checked.
    let r = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, dev) };
    assert_eq!(r, 0, "mknod: {}", std::io::Error::last_os_error());
    Some(())
}

#[test]
fn device_nodes_in_the_directory_are_not_opened() {
    for ro in [false, true] {
        let (_t, dir) = tree();
        if host_null(&dir).is_none() {
            return;
        }
        // Without FUSE_NO_OPEN_SUPPORT, OPEN reaches the server.
        let mut c = Client::with_init_flags(Arc::new(Share::open(&dir, ro).unwrap()), 0);
        let null = c.lookup(ROOT, "null");
        assert_eq!(null.entry_mode() & S_IFMT, libc::S_IFCHR);
        let null = null.node();
        let eacces = -libc::EACCES;
        assert_eq!(c.open(null, libc::O_RDONLY as u32).error, eacces, "OPEN");
        assert_eq!(c.read(null, 100, 0).error, eacces, "READ");
        assert_eq!(c.getattr(null).error, 0, "GETATTR opens nothing");
        if !ro {
            assert_eq!(c.write(null, b"x").error, eacces, "WRITE");
            assert_eq!(c.create(ROOT, "null").error, eacces, "CREATE");
            let mut size = le32(&[1 << 3, 0]);
            size.resize(88, 0);
            assert_eq!(c.call(4, null, &size).error, eacces, "SETATTR size");
            assert_eq!(c.call(43, null, &[0u8; 32]).error, eacces, "FALLOCATE");
            assert_eq!(c.call(20, null, &[0u8; 16]).error, eacces, "FSYNC");
        }
        // A regular file still opens and reads.
        let f = c.lookup(ROOT, "file").node();
        let open = c.open(f, libc::O_RDONLY as u32);
        assert_eq!(open.error, 0, "OPEN a file");
        // `struct fuse_read_in` with the handle `struct fuse_open_out`
        // gave.
        let mut read = open.body[0..8].to_vec();
        read.extend_from_slice(&[0u8; 8]);
        read.extend_from_slice(&le32(&[100, 0, 0, 0, 0, 0]));
        assert_eq!(c.call(15, f, &read).body, b"hello");
    }
}

#[test]
fn restore_finds_the_guests_inodes_again() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let sub = c.lookup(ROOT, "sub").node();
    let inner = c.lookup(sub, "inner").node();
    let file = c.lookup(ROOT, "file").node();
    c.lookup(ROOT, "file");
    let saved = c.share.save();
    assert_eq!(saved.inodes.len(), 3);
    let share = Arc::new(Share::open(&dir, false).unwrap());
    assert_eq!(share.restore(&saved).unwrap(), 0);
    assert_eq!(share.save(), saved);
    let mut c = Client { share, unique: 100 };
    assert_eq!(c.read(inner, 100, 0).body, b"inner");
    assert_eq!(c.lookup(sub, "inner").node(), inner);
    // Two lookups of `file` were held: both forgets are taken.
    c.forget(file, 1);
    assert_eq!(c.read(file, 100, 0).body, b"hello");
    c.forget(file, 1);
    assert_ne!(c.getattr(file).error, 0);
}

#[test]
fn restore_leaves_out_what_is_gone() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let f = c.lookup(ROOT, "file").node();
    let saved = c.share.save();
    std::fs::remove_file(dir.join("file")).unwrap();
    let share = Arc::new(Share::open(&dir, false).unwrap());
    assert_eq!(share.restore(&saved).unwrap(), 1);
    let mut c = Client { share, unique: 0 };
    assert_ne!(c.getattr(f).error, 0);
}

#[test]
fn a_name_that_is_not_utf8_survives_a_snapshot() {
    use std::os::unix::ffi::OsStrExt;
    let (_t, dir) = tree();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9");
    std::fs::write(dir.join(name), b"latin-1").unwrap();
    let mut c = client(&dir, false);
    let mut m = c.message(1, ROOT, b"caf\xe9\0");
    let len = m.len() as u32;
    m[0..4].copy_from_slice(&len.to_le_bytes());
    let node = u64::from_le_bytes(c.share.handle(m, MAX_MESSAGE)[16..24].try_into().unwrap());
    let saved = c.share.save();
    assert_eq!(saved.inodes[0].path.as_deref(), Some(Path::new(name)));
    let bytes = postcard::to_stdvec(&saved).expect("encoding the share's state");
    let back: ShareState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, saved);
    let share = Arc::new(Share::open(&dir, false).unwrap());
    assert_eq!(share.restore(&back).unwrap(), 0);
    let mut c = Client { share, unique: 100 };
    assert_eq!(c.read(node, 100, 0).body, b"latin-1");
}

/// A state as the string form of a path wrote it reads the same.
#[test]
fn a_path_saved_as_a_string_reads_back() {
    #[derive(serde::Serialize)]
    struct Old {
        nodeid: u64,
        lookups: u64,
        path: Option<std::path::PathBuf>,
    }
    let old = Old {
        nodeid: 7,
        lookups: 2,
        path: Some("sub/inner".into()),
    };
    let bytes = postcard::to_stdvec(&old).unwrap();
    let new: HeldInode = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(new.path.as_deref(), Some(Path::new("sub/inner")));
    assert_eq!(postcard::to_stdvec(&new).unwrap(), bytes);
}

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const REQ: u64 = 0x8000;
const REPLY: u64 = 0x9000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn device(dir: &Path) -> Fs {
    Fs::new(FsArgs {
        tag: "t".into(),
        share: Arc::new(Share::open(dir, false).unwrap()),
    })
}

/// Offer `chain` on `queue` and run the device once: the used length.
fn run(fs: &mut Fs, mem: &GuestMemoryMmap, queue: usize, chain: &[RawDescriptor]) -> u32 {
    let mock = MockSplitQueue::new(mem, 16);
    mock.add_desc_chains(chain, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(fs.process_queue(queue, &mut q, mem));
    mock.used().ring().ref_at(0).unwrap().load().len()
}

fn init_message() -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&56u32.to_le_bytes());
    m.extend_from_slice(&26u32.to_le_bytes());
    m.extend_from_slice(&7u64.to_le_bytes());
    m.extend_from_slice(&[0u8; 24]);
    m.extend_from_slice(&le32(&[7, 31, 0, INIT_FLAGS]));
    m
}

#[test]
fn config_space_holds_the_tag_and_one_queue() {
    let (_t, dir) = tree();
    let fs = device(&dir);
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes().len(), 2);
    let mut c = [0xffu8; 40];
    fs.read_config(0, &mut c);
    assert_eq!(&c[..2], b"t\0");
    assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 1);
}

#[test]
fn a_request_split_over_buffers_is_answered() {
    let (_t, dir) = tree();
    let mem = memory();
    let mut fs = device(&dir);
    let m = init_message();
    mem.write_slice(&m[..20], GuestAddress(REQ)).unwrap();
    mem.write_slice(&m[20..], GuestAddress(REQ + 0x100))
        .unwrap();
    let chain = [
        desc(REQ, 20, NEXT, 1),
        desc(REQ + 0x100, m.len() as u32 - 20, NEXT, 2),
        desc(REPLY, 16, WRITE | NEXT, 3),
        desc(REPLY + 0x100, 4096, WRITE, 0),
    ];
    let used = run(&mut fs, &mem, 1, &chain);
    assert!(used > 16, "{used}");
    let mut h = [0u8; 16];
    mem.read_slice(&mut h, GuestAddress(REPLY)).unwrap();
    assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), used);
    assert_eq!(i32::from_le_bytes(h[4..8].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), 7);
}

#[test]
fn malformed_chains_are_returned_unanswered() {
    let (_t, dir) = tree();
    let mem = memory();
    let mut fs = device(&dir);
    mem.write_slice(&init_message(), GuestAddress(REQ)).unwrap();
    let end = 1 << 20;
    let cases: [(&str, Vec<RawDescriptor>); 6] = [
        (
            "shorter than a header",
            vec![desc(REQ, 8, NEXT, 1), desc(REPLY, 4096, WRITE, 0)],
        ),
        (
            "readable after writable",
            vec![desc(REPLY, 4096, WRITE | NEXT, 1), desc(REQ, 56, 0, 0)],
        ),
        ("only writable", vec![desc(REPLY, 4096, WRITE, 0)]),
        (
            "huge request",
            vec![desc(0, u32::MAX, NEXT, 1), desc(REPLY, 4096, WRITE, 0)],
        ),
        (
            "past the end of memory",
            vec![desc(end - 16, 56, NEXT, 1), desc(REPLY, 4096, WRITE, 0)],
        ),
        (
            "reply past the end of memory",
            vec![desc(REQ, 56, NEXT, 1), desc(end - 8, 4096, WRITE, 0)],
        ),
    ];
    for (what, chain) in cases {
        assert_eq!(run(&mut fs, &mem, 1, &chain), 0, "{what}");
    }
    // No room for a reply: nothing is written, the request still runs.
    assert_eq!(run(&mut fs, &mem, 0, &[desc(REQ, 56, 0, 0)]), 0);
    // A huge reply buffer is only used as far as the reply goes.
    let used = run(
        &mut fs,
        &mem,
        1,
        &[desc(REQ, 56, NEXT, 1), desc(REPLY, 0xf_0000, WRITE, 0)],
    );
    assert!(used > 16 && used < 4096, "{used}");
}

#[test]
fn an_unterminated_chain_is_returned() {
    let (_t, dir) = tree();
    let mem = memory();
    let mut fs = device(&dir);
    // 0 -> 1 -> 0: a loop longer than the queue.
    let chain = [desc(REQ, 56, NEXT, 1), desc(REPLY, 64, WRITE | NEXT, 0)];
    let mock = MockSplitQueue::new(&mem, 16);
    mock.add_desc_chains(&chain, 0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    assert!(fs.process_queue(1, &mut q, &mem));
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 0);
}

/// What a guest's `ls -l`, `cp`, `mv`, `rm -r`, `touch`, `chmod`, `df`
/// and `sync` send (the system calls these make are the ones the
/// seccomp lists allow the thread serving the share).
#[test]
fn serves_a_guests_everyday_operations() {
    let (_t, dir) = tree();
    let mut c = client(&dir, false);
    let sub = c.lookup(ROOT, "sub").node();
    // READDIRPLUS from offset 0, 4 KiB of entries.
    let mut rd = vec![0u8; 40];
    rd[16..20].copy_from_slice(&4096u32.to_le_bytes());
    let r = c.call(44, sub, &rd);
    assert_eq!(r.error, 0);
    assert!(r.body.windows(5).any(|w| w == b"inner"));
    assert_eq!(c.call(17, ROOT, &[]).error, 0, "STATFS");
    let f = c.create(ROOT, "f").node();
    assert_eq!(c.write(f, b"data").error, 0);
    assert_eq!(c.call(20, f, &[0u8; 16]).error, 0, "FSYNC");
    // SETATTR: mode 0600 (FATTR_MODE), then size 2 (FATTR_SIZE).
    let mut sa = vec![0u8; 88];
    sa[0..4].copy_from_slice(&1u32.to_le_bytes());
    sa[68..72].copy_from_slice(&0o100600u32.to_le_bytes());
    assert_eq!(c.call(4, f, &sa).error, 0, "SETATTR mode");
    let mut sa = vec![0u8; 88];
    sa[0..4].copy_from_slice(&8u32.to_le_bytes());
    sa[16..24].copy_from_slice(&2u64.to_le_bytes());
    assert_eq!(c.call(4, f, &sa).error, 0, "SETATTR size");
    assert_eq!(std::fs::read(dir.join("f")).unwrap(), b"da");
    let mut mv = sub.to_le_bytes().to_vec();
    mv.extend_from_slice(&cstr("f"));
    mv.extend_from_slice(&cstr("g"));
    assert_eq!(c.call(12, ROOT, &mv).error, 0, "RENAME");
    assert_eq!(std::fs::read(dir.join("sub/g")).unwrap(), b"da");
    assert_eq!(c.call(10, sub, &cstr("g")).error, 0, "UNLINK");
    assert_eq!(c.call(10, sub, &cstr("inner")).error, 0, "UNLINK");
    assert_eq!(c.call(11, ROOT, &cstr("sub")).error, 0, "RMDIR");
    assert!(!dir.join("sub").exists());
    let mut rn2 = ROOT.to_le_bytes().to_vec();
    rn2.extend_from_slice(&0u32.to_le_bytes());
    rn2.extend_from_slice(&0u32.to_le_bytes());
    rn2.extend_from_slice(&cstr("file"));
    rn2.extend_from_slice(&cstr("file2"));
    assert_eq!(c.call(45, ROOT, &rn2).error, 0, "RENAME2");
    // The passthrough has no SYNCFS; Linux stops sending it.
    assert_eq!(c.call(50, ROOT, &[0u8; 8]).error, -libc::ENOSYS, "SYNCFS");
}

/// A notification written to the register (on a vCPU thread, whose
/// filter cannot open files) goes to the queue's event fd for the VMM
/// thread, on either transport.
#[test]
fn register_notifications_are_handed_to_the_vmm_thread() {
    use vm_device::bus::MmioAddress;
    use vm_device::MutDeviceMmio;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let (_t, dir) = tree();
    let irq = Arc::new(crate::test_utils::IrqRecorder::default());
    let mut t = crate::virtio::mmio::VirtioMmio::new(device(&dir), memory(), irq, 5);
    let fds: Vec<_> = (0..2)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    t.set_handoff(fds.clone());
    t.mmio_write(
        MmioAddress(0),
        crate::virtio::mmio::QUEUE_NOTIFY,
        &1u32.to_le_bytes(),
    );
    assert_eq!(fds[1].read().unwrap(), 1);
    assert!(fds[0].read().is_err(), "queue 0 was not notified");
}
