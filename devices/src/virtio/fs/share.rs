//! A host directory served to the guest: fuse-backend-rs's FUSE server
//! and passthrough file system over one request and one reply, both in
//! host memory (the queue side copies them from and to the guest).
//!
//! The crate's `virtiofs` transport would read guest memory itself, but
//! it is built on vm-memory 0.17 and virtio-queue 0.17, and this tree's
//! guest memory is vm-memory 0.18. Its `fusedev` transport takes a host
//! buffer as the request and writes the reply to a file descriptor: the
//! reply goes to a memfd here and is read back. Guest memory is then only
//! ever reached through vm-memory 0.18.
//!
//! What keeps the guest inside the directory: the passthrough opens every
//! name with `openat()` on its parent's `O_PATH` descriptor and
//! `O_NOFOLLOW`, refuses names with a `/`, and turns `..` at the root into
//! `.`; a symbolic link is an inode of its own whose target the guest
//! reads and resolves in its own namespace. `ro` refuses every request
//! that could change the directory with EROFS before the server sees it.
//! On every share, MKNOD of a character or block device gets EPERM and
//! a request that would open one already in the directory gets EACCES
//! (`device_errno()`): opened on the host, it would be the host's device.
//!
//! The server keeps no open files: no_open and no_opendir (the guest
//! reads and writes through the inode), so its state is the inodes the
//! guest has looked up. Inode numbers are the host's (`use_host_ino`), so
//! looking the same paths up again after a restore gives the guest's
//! numbers back.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuse_backend_rs::api::filesystem::{Context, FileSystem, ROOT_ID};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader, Writer};
use serde::{Deserialize, Serialize};

/// Most bytes of one request or reply: the server's largest message
/// (1 MiB of data) and a page of headers.
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;
/// `struct fuse_in_header` and `struct fuse_out_header`.
pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
/// `struct fuse_entry_out`.
const ENTRY_OUT: usize = 128;

/// FUSE opcodes (linux/fuse.h) the share looks at.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const POLL: u32 = 40;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const LSEEK: u32 = 46;
    pub const SYNCFS: u32 = 50;
}

/// What a read-only share serves; everything else may change the
/// directory and is refused with EROFS.
const READ_OPS: &[u32] = &[
    op::LOOKUP,
    op::FORGET,
    op::GETATTR,
    op::READLINK,
    op::OPEN,
    op::READ,
    op::STATFS,
    op::RELEASE,
    op::FSYNC,
    op::GETXATTR,
    op::LISTXATTR,
    op::FLUSH,
    op::INIT,
    op::OPENDIR,
    op::READDIR,
    op::RELEASEDIR,
    op::FSYNCDIR,
    op::GETLK,
    op::SETLK,
    op::SETLKW,
    op::ACCESS,
    op::INTERRUPT,
    op::DESTROY,
    op::POLL,
    op::BATCH_FORGET,
    op::READDIRPLUS,
    op::LSEEK,
    op::SYNCFS,
];

/// Requests the server serves by opening the node they name without
/// `O_PATH` (no_open: every READ and WRITE opens the inode again).
const OPENING_OPS: &[u32] = &[
    op::OPEN,
    op::READ,
    op::WRITE,
    op::FSYNC,
    op::FALLOCATE,
    op::OPENDIR,
    op::READDIR,
    op::READDIRPLUS,
    op::FSYNCDIR,
];

/// `struct fuse_setattr_in`'s valid bit for a new size: the server
/// truncates through the node opened.
const FATTR_SIZE: u32 = 1 << 3;

/// `struct fuse_create_in`, which the name follows.
const CREATE_IN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{}: {e}", .path.display())]
    Open { path: PathBuf, e: std::io::Error },
    #[error("{}: not a directory", .0.display())]
    NotDir(PathBuf),
    #[error("the FUSE server: {0}")]
    Server(std::io::Error),
    #[error("cannot create the reply buffer (memfd): {0}")]
    Memfd(std::io::Error),
}

/// A FUSE request's header fields.
#[derive(Clone, Copy, Debug)]
struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn in_header(req: &[u8]) -> Option<InHeader> {
    Some(InHeader {
        opcode: u32_at(req, 4)?,
        unique: u64_at(req, 8)?,
        nodeid: u64_at(req, 16)?,
    })
}

/// A reply of only a header with `-errno`.
pub fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut r = Vec::with_capacity(OUT_HEADER);
    r.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
    r.extend_from_slice(&(-errno).to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r
}

/// Whether a read-only share refuses `req` (the header `h`).
fn writes(h: &InHeader, req: &[u8]) -> bool {
    let body = IN_HEADER;
    match h.opcode {
        // `struct fuse_open_in`: flags first.
        op::OPEN => u32_at(req, body).is_none_or(|flags| {
            let flags = flags as i32;
            flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
        }),
        // `struct fuse_access_in`: the mask first.
        op::ACCESS => u32_at(req, body).is_none_or(|mask| mask & libc::W_OK as u32 != 0),
        o => !READ_OPS.contains(&o),
    }
}

/// Whether `mode` is a character or block device's.
fn is_device(mode: u32) -> bool {
    matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK)
}

/// Make a READ on a read-only share read only: without an OPEN (no_open)
/// the server opens the file with the flags the READ carries
/// (`struct fuse_read_in`'s flags, at 32), and O_TRUNC or a write mode
/// there would change it.
fn read_only_flags(h: &InHeader, req: &mut [u8]) {
    let at = IN_HEADER + 32;
    if h.opcode != op::READ {
        return;
    }
    if let Some(flags) = u32_at(req, at) {
        let keep = !(libc::O_ACCMODE | libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) as u32;
        let flags = (flags & keep) | libc::O_RDONLY as u32;
        req[at..at + 4].copy_from_slice(&flags.to_le_bytes());
    }
}

/// The inodes the guest holds and its INIT, which a restore replays.
#[derive(Default)]
struct Held {
    /// Lookup counts by node ID (FUSE's "nlookup"), the root aside.
    lookups: BTreeMap<u64, u64>,
    init: Option<Vec<u8>>,
}

impl Held {
    fn add(&mut self, nodeid: u64, n: u64) {
        if nodeid != 0 && nodeid != ROOT_ID {
            *self.lookups.entry(nodeid).or_default() += n;
        }
    }

    fn forget(&mut self, nodeid: u64, n: u64) {
        if let Some(c) = self.lookups.get_mut(&nodeid) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.lookups.remove(&nodeid);
            }
        }
    }

    /// Count the lookups `req` gives back (FORGET, BATCH_FORGET).
    fn note_request(&mut self, h: &InHeader, req: &[u8]) {
        match h.opcode {
            op::FORGET => self.forget(h.nodeid, u64_at(req, IN_HEADER).unwrap_or(0)),
            op::BATCH_FORGET => {
                let count = u32_at(req, IN_HEADER).unwrap_or(0) as usize;
                for i in 0..count {
                    let at = IN_HEADER + 8 + 16 * i;
                    match (u64_at(req, at), u64_at(req, at + 8)) {
                        (Some(node), Some(n)) => self.forget(node, n),
                        _ => break,
                    }
                }
            }
            _ => {}
        }
    }

    /// Count the lookups a successful `reply` to `h` makes: each entry
    /// it returns is one (FUSE, "lookup count").
    fn note_reply(&mut self, h: &InHeader, reply: &[u8]) {
        if u32_at(reply, 4) != Some(0) {
            return;
        }
        match h.opcode {
            op::LOOKUP | op::MKNOD | op::MKDIR | op::SYMLINK | op::LINK | op::CREATE => {
                self.add(u64_at(reply, OUT_HEADER).unwrap_or(0), 1);
            }
            op::READDIRPLUS => {
                // `struct fuse_direntplus`: an entry, then a dirent whose
                // name is padded to 8 bytes.
                let mut at = OUT_HEADER;
                while let (Some(node), Some(namelen)) =
                    (u64_at(reply, at), u32_at(reply, at + ENTRY_OUT + 16))
                {
                    self.add(node, 1);
                    at += (ENTRY_OUT + 24 + namelen as usize).next_multiple_of(8);
                }
            }
            _ => {}
        }
    }
}

/// One inode the guest holds, as a snapshot keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldInode {
    pub nodeid: u64,
    pub lookups: u64,
    /// Its path under the shared directory, if it still has one.
    #[serde(with = "path_bytes")]
    pub path: Option<PathBuf>,
}

/// A path as its bytes: serde's own form of a path is a string, and
/// refuses one that is not UTF-8, while the guest names files as it
/// likes (one such name it held made every snapshot fail). postcard
/// writes bytes as it writes a string (a length, then the bytes), so
/// states saved with the string form read the same.
mod path_bytes {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        p.as_ref().map(|p| p.as_os_str().as_bytes()).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        let b = Option::<Vec<u8>>::deserialize(d)?;
        Ok(b.map(|b| PathBuf::from(OsString::from_vec(b))))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareState {
    /// The driver's INIT request, if it sent one.
    pub init: Option<Vec<u8>>,
    pub inodes: Vec<HeldInode>,
}

pub struct Share {
    dir: PathBuf,
    read_only: bool,
    fs: Arc<PassthroughFs>,
    server: Server<Arc<PassthroughFs>>,
    /// Where the server writes its replies.
    reply: Mutex<File>,
    held: Mutex<Held>,
}

fn memfd() -> Result<File, ShareError> {
    let name = CString::new("kvmrun-virtiofs-reply").expect("no NUL");
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(ShareError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Run `f` with the process's umask 0: the guest sends the mode it
/// wants, its own umask applied, and the host's must not cut it again;
/// kvmrun's own files keep the user's umask.
fn without_umask<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask() cannot fail.
    let old = unsafe { libc::umask(0) };
    let r = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    r
}

impl Share {
    /// Serve `dir` (read-only with `read_only`): checked and opened now,
    /// before the guest starts.
    pub fn open(dir: &Path, read_only: bool) -> Result<Share, ShareError> {
        let open_err = |e| ShareError::Open {
            path: dir.to_path_buf(),
            e,
        };
        let canon = dir.canonicalize().map_err(open_err)?;
        if !std::fs::metadata(&canon).map_err(open_err)?.is_dir() {
            return Err(ShareError::NotDir(dir.to_path_buf()));
        }
        let cfg = Config {
            root_dir: canon.to_string_lossy().into_owned(),
            cache_policy: CachePolicy::Always,
            no_open: true,
            no_opendir: true,
            use_host_ino: true,
            xattr: false,
            writeback: false,
            entry_timeout: Duration::from_secs(1),
            attr_timeout: Duration::from_secs(1),
            ..Config::default()
        };
        let fs = Arc::new(PassthroughFs::new(cfg).map_err(ShareError::Server)?);
        Ok(Share {
            dir: canon,
            read_only,
            server: Server::new(fs.clone()),
            fs,
            reply: Mutex::new(memfd()?),
            held: Mutex::new(Held::default()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serve one request; the reply (at most `reply_cap` bytes), empty
    /// for a request that takes none (FORGET) or could not be read.
    pub fn handle(&self, mut req: Vec<u8>, reply_cap: usize) -> Vec<u8> {
        let Some(h) = in_header(&req).filter(|_| req.len() >= IN_HEADER) else {
            return Vec::new();
        };
        let no_reply = matches!(h.opcode, op::FORGET | op::BATCH_FORGET);
        let refused = match self.read_only {
            // The passthrough answers LSEEK only on an open handle, and
            // there are none (no_open); ENOSYS makes Linux seek by
            // itself, SEEK_DATA and SEEK_HOLE included.
            _ if h.opcode == op::LSEEK => Some(libc::ENOSYS),
            true if writes(&h, &req) => Some(libc::EROFS),
            _ => self.device_errno(&h, &req),
        };
        let reply = match refused {
            Some(errno) => error_reply(h.unique, errno),
            None if self.read_only => {
                read_only_flags(&h, &mut req);
                self.serve(&mut req, reply_cap)
            }
            None => self.serve(&mut req, reply_cap),
        };
        let reply = match (reply.is_empty() && !no_reply, reply_cap >= OUT_HEADER) {
            // The server gives no reply to a request it could not decode;
            // the driver waits for one.
            (true, true) => error_reply(h.unique, libc::EIO),
            _ => reply,
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.note_request(&h, &req);
        held.note_reply(&h, &reply);
        if h.opcode == op::INIT && u32_at(&reply, 4) == Some(0) {
            held.init = Some(req);
        }
        reply
    }

    /// The errno refusing `req` (the header `h`) because it would make a
    /// character or block device node or open one: a device node opened
    /// on the host is the host's device (its disk, /dev/mem), and the
    /// guest has device nodes of its own. Fifos and sockets stay, as
    /// virtiofsd serves them.
    fn device_errno(&self, h: &InHeader, req: &[u8]) -> Option<i32> {
        let body = IN_HEADER;
        let mode = match h.opcode {
            // `struct fuse_mknod_in`: the mode first.
            op::MKNOD => {
                return u32_at(req, body)
                    .filter(|&m| is_device(m))
                    .map(|_| libc::EPERM);
            }
            // Without O_EXCL, the server opens a file that has the name.
            op::CREATE => self.mode_of_name(h.nodeid, req.get(body + CREATE_IN..)?)?,
            // `struct fuse_setattr_in`: valid first.
            op::SETATTR if u32_at(req, body)? & FATTR_SIZE != 0 => self.mode_of(h.nodeid)?,
            o if OPENING_OPS.contains(&o) => self.mode_of(h.nodeid)?,
            _ => return None,
        };
        is_device(mode).then_some(libc::EACCES)
    }

    /// The mode of the inode `node`, from its `O_PATH` descriptor; None
    /// for a node the server does not know (which it refuses itself).
    fn mode_of(&self, node: u64) -> Option<u32> {
        let (st, _) = self.fs.getattr(&Context::default(), node, None).ok()?;
        Some(st.st_mode)
    }

    /// The mode of the file `name` (NUL-terminated, as a request holds
    /// it) in directory `parent`, if there is one: looked up and
    /// forgotten again.
    fn mode_of_name(&self, parent: u64, name: &[u8]) -> Option<u32> {
        let name = CStr::from_bytes_until_nul(name).ok()?;
        let ctx = Context::default();
        let e = self.fs.lookup(&ctx, parent, name).ok()?;
        if e.inode != 0 {
            self.fs.forget(&ctx, e.inode, 1);
        }
        Some(e.attr.st_mode)
    }

    /// The server's reply to `req`, through the memfd.
    fn serve(&self, request: &mut [u8], reply_cap: usize) -> Vec<u8> {
        let mut file = self.reply.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = vec![0u8; reply_cap.min(MAX_MESSAGE)];
        if file.seek(SeekFrom::Start(0)).is_err() {
            return Vec::new();
        }
        let served = without_umask(|| -> Result<usize, String> {
            let r =
                Reader::<()>::from_fuse_buffer(FuseBuf::new(request)).map_err(|e| e.to_string())?;
            let w =
                FuseDevWriter::<()>::new(file.as_raw_fd(), &mut out).map_err(|e| e.to_string())?;
            self.server
                .handle_message(r, Writer::FuseDev(w), None, None)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = served {
            log::debug!("virtio-fs: request not served: {e}");
        }
        let len = file.stream_position().unwrap_or(0) as usize;
        let mut reply = vec![0u8; len.min(reply_cap)];
        if file.read_exact_at(&mut reply, 0).is_err() {
            return Vec::new();
        }
        reply
    }

    /// The inodes the guest holds, with their paths now.
    pub fn save(&self) -> ShareState {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let inodes = held
            .lookups
            .iter()
            .map(|(&nodeid, &lookups)| HeldInode {
                nodeid,
                lookups,
                path: self
                    .fs
                    .readlinkat_proc_file(nodeid)
                    .ok()
                    .and_then(|p| p.strip_prefix(&self.dir).ok().map(Path::to_path_buf)),
            })
            .collect();
        ShareState {
            init: held.init.clone(),
            inodes,
        }
    }

    /// Take up `s` on a share just opened: replay the driver's INIT and
    /// look every inode it held up again, by path. An inode whose file
    /// is gone or has another number now is left out (the guest gets
    /// errors for that file only); the count of those is returned.
    pub fn restore(&self, s: &ShareState) -> Result<usize, ShareError> {
        let Some(init) = &s.init else {
            return Ok(0);
        };
        let reply = self.handle(init.clone(), MAX_MESSAGE);
        if u32_at(&reply, 4) != Some(0) {
            return Err(ShareError::Server(std::io::Error::other(
                "the saved INIT request failed",
            )));
        }
        let ctx = Context::default();
        let mut got: BTreeMap<u64, u64> = BTreeMap::new();
        let mut lost = 0;
        let mut inodes: Vec<_> = s.inodes.iter().collect();
        inodes.sort_by_key(|i| i.path.as_ref().map(|p| p.components().count()));
        for i in inodes {
            let node = i.path.as_ref().and_then(|p| self.walk(&ctx, p, &mut got));
            if node != Some(i.nodeid) {
                log::warn!(
                    "virtio-fs {}: inode {:#x} ({:?}) not found again",
                    self.dir.display(),
                    i.nodeid,
                    i.path
                );
                lost += 1;
            }
        }
        // Bring every count to the saved one: the walks looked each
        // directory on the way up once per path under it.
        let want: BTreeMap<u64, u64> = s.inodes.iter().map(|i| (i.nodeid, i.lookups)).collect();
        for (&node, &n) in &got {
            let w = want.get(&node).copied().unwrap_or(0);
            if n > w {
                self.fs.forget(&ctx, node, n - w);
            }
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for i in &s.inodes {
            let have = got.get(&i.nodeid).copied().unwrap_or(0);
            if have == 0 {
                continue;
            }
            for _ in have..i.lookups {
                if let Some(p) = &i.path {
                    self.walk_last(&ctx, p);
                }
            }
            held.add(i.nodeid, i.lookups);
        }
        Ok(lost)
    }

    /// Look `path` up from the root, a component at a time, counting
    /// each lookup in `got`; the last node.
    fn walk(&self, ctx: &Context, path: &Path, got: &mut BTreeMap<u64, u64>) -> Option<u64> {
        let mut node = ROOT_ID;
        for c in path.components() {
            let name = CString::new(c.as_os_str().as_encoded_bytes()).ok()?;
            node = self.fs.lookup(ctx, node, &name).ok()?.inode;
            *got.entry(node).or_default() += 1;
        }
        Some(node)
    }

    /// One more lookup of `path`'s last component, the rest forgotten.
    fn walk_last(&self, ctx: &Context, path: &Path) {
        let mut got = BTreeMap::new();
        let last = self.walk(ctx, path, &mut got);
        for (node, n) in got {
            let n = if Some(node) == last { n - 1 } else { n };
            if n > 0 {
                self.fs.forget(ctx, node, n);
            }
        }
    }
}
