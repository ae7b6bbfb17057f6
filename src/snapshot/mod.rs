//! Snapshots: a running VM frozen to a directory and brought back, in the
//! same process or a new one.
//!
//! A snapshot directory holds two files:
//! - `state`: header (magic, format version, kvmrun version, CRC-64) and
//!   the postcard-encoded [`MachineState`] (see [`format`]);
//! - `memory`: guest RAM, sparse, then a trailer with the snapshot's
//!   random id and a digest of the RAM (see [`memory`]).
//!
//! The state records the same id, length and digest ([`MemoryInfo`]):
//! restore refuses a memory file whose trailer does not match, and with
//! `--verify-memory` also one whose RAM does not match the digest. Without
//! it, restore reads no guest RAM, so damage inside RAM goes unnoticed.
//!
//! Both are written to a temporary name, fsynced and renamed into place,
//! memory first, then the directory is fsynced: a directory is a valid
//! snapshot only once `state` is there, and `state` appears last.

pub mod format;
pub mod memory;
pub mod tsc;
pub mod vcpu;
pub mod vm;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::memory::Layout;
pub use crate::platform::{DeviceState, DeviceStates};

pub use self::memory::MemoryInfo;
pub use self::vcpu::{VcpuContext, VcpuState, VcpuStateError};
pub use self::vm::{VmState, VmStateError};

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Everything but guest RAM.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MachineState {
    pub config: VmConfig,
    /// The memory file's id, length and digest; filled in by [`write()`].
    pub memory: MemoryInfo,
    /// Guest address of the ACPI FACS, for waking from S3 after a restore.
    pub facs: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    /// Every device's state, by name (the device registry's).
    pub devices: DeviceStates,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format {
        path: PathBuf,
        source: format::FormatError,
    },
    #[error("{}: cannot decode the state: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("{}: invalid state: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: memory file has {actual} bytes, but the state describes {ram} bytes of guest RAM and a {} byte trailer", path.display(), memory::TRAILER_LEN)]
    MemorySize {
        path: PathBuf,
        ram: u64,
        actual: u64,
    },
    #[error("{}: memory file has no kvmrun trailer ({what})", path.display())]
    NoTrailer { path: PathBuf, what: String },
    #[error("{}: memory file belongs to a different snapshot (id {found:032x}, the state's {expected:032x})", path.display())]
    OtherSnapshot {
        path: PathBuf,
        expected: u128,
        found: u128,
    },
    #[error("{}: memory file trailer does not match the state ({what}): one of them is damaged", path.display())]
    TrailerMismatch { path: PathBuf, what: String },
    #[error("{}: memory digest mismatch (state {stored:#018x}, file {computed:#018x}): the file is damaged", path.display())]
    MemoryDigest {
        path: PathBuf,
        stored: u64,
        computed: u64,
    },
    #[error("cannot draw a random snapshot id: {0}")]
    Random(std::io::Error),
    #[error("{}: cannot make guest memory of it: {reason}", path.display())]
    Map { path: PathBuf, reason: String },
    #[error("cannot encode the state: {0}")]
    Encode(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What writing a snapshot cost.
#[derive(Clone, Debug, Default)]
pub struct WriteStats {
    pub memory_bytes_written: u64,
    pub memory: MemoryInfo,
    pub state_bytes: u64,
    pub elapsed: Duration,
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// A random snapshot id from the kernel's CSPRNG, so the memory file of
/// another snapshot is told apart even when it holds the same RAM.
fn new_id() -> Result<u128, SnapshotError> {
    let mut id = [0u8; 16];
    let mut got = 0;
    while got < id.len() {
        // SAFETY: the buffer is `id[got..]`, writable and that long.
        let n = unsafe {
            libc::getrandom(
                id[got..].as_mut_ptr().cast::<libc::c_void>(),
                id.len() - got,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(SnapshotError::Random(e));
            }
            continue;
        }
        got += n as usize;
    }
    Ok(u128::from_le_bytes(id))
}

/// Write `state` and `mem` into `dir` (created if missing; an older
/// snapshot in it is invalidated first, then replaced), with a new
/// snapshot id; `state.memory` is set to what the memory file holds.
pub fn write(
    dir: &Path,
    state: &mut MachineState,
    mem: &GuestMemoryMmap,
) -> Result<WriteStats, SnapshotError> {
    let written = write_files(dir, state, mem);
    if written.is_err() {
        // A snapshot that failed half-way (a full file system) leaves no
        // `state`, so nothing that looks valid; take away the rest too,
        // so the space comes back: the temporary files, and a memory
        // file without its state.
        for name in [".memory.tmp", ".state.tmp"] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        if !dir.join(STATE_FILE).exists() {
            let _ = std::fs::remove_file(dir.join(MEMORY_FILE));
        }
    }
    written
}

fn write_files(
    dir: &Path,
    state: &mut MachineState,
    mem: &GuestMemoryMmap,
) -> Result<WriteStats, SnapshotError> {
    let started = Instant::now();
    let id = new_id()?;

    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let state_path = dir.join(STATE_FILE);
    match std::fs::remove_file(&state_path) {
        Ok(()) => fsync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&state_path)(e)),
    }

    // Memory first: without `state` the directory is not a snapshot yet.
    let mem_tmp = dir.join(".memory.tmp");
    let mem_path = dir.join(MEMORY_FILE);
    let f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
    let written = memory::write(&f, mem, id).map_err(io(&mem_tmp))?;
    f.sync_all().map_err(io(&mem_tmp))?;
    drop(f);
    std::fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    fsync_dir(dir)?;

    state.memory = written.info;
    let body = postcard::to_stdvec(&*state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let bytes = format::encode(&body);
    let state_tmp = dir.join(".state.tmp");
    let f = File::create(&state_tmp).map_err(io(&state_tmp))?;
    std::io::Write::write_all(&mut &f, &bytes).map_err(io(&state_tmp))?;
    f.sync_all().map_err(io(&state_tmp))?;
    drop(f);
    std::fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    fsync_dir(dir)?;
    Ok(WriteStats {
        memory_bytes_written: written.bytes,
        memory: written.info,
        state_bytes: bytes.len() as u64,
        elapsed: started.elapsed(),
    })
}

/// Read and check `dir/state`: magic, version, length, checksum, then the
/// decoded state's own consistency.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    decode_state(&bytes, &path)
}

/// Check and decode the bytes of a state file; `path` names it in errors.
pub fn decode_state(bytes: &[u8], path: &Path) -> Result<MachineState, SnapshotError> {
    let path = path.to_path_buf();
    let (_, body) = format::decode(bytes).map_err(|source| SnapshotError::Format {
        path: path.clone(),
        source,
    })?;
    let state: MachineState = postcard::from_bytes(body).map_err(|e| SnapshotError::Decode {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let invalid = |reason: String| SnapshotError::Invalid {
        path: path.clone(),
        reason,
    };
    state
        .config
        .validate()
        .map_err(|e| invalid(e.to_string()))?;
    if state.vcpus.len() != state.config.vcpus as usize {
        return Err(invalid(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    if let Some((i, v)) = state
        .vcpus
        .iter()
        .enumerate()
        .find(|(i, v)| v.id != *i as u32)
    {
        return Err(invalid(format!("vCPU state {i} is for vCPU {}", v.id)));
    }
    let layout = Layout::new(state.config.mem_bytes);
    // S3 wake-up reads the waking vector there.
    if !layout.contains(state.facs, 64) {
        return Err(invalid(format!(
            "the ACPI FACS at {:#x} is outside guest RAM",
            state.facs
        )));
    }
    let ram = memory::ram_len(&layout);
    if state.memory.len != ram {
        return Err(invalid(format!(
            "memory file described as {} bytes of RAM, but the configuration has {ram}",
            state.memory.len
        )));
    }
    Ok(state)
}

/// How restore makes guest RAM of the memory file (`--memory`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryLoad {
    /// Map the file copy-on-write: nothing is read before the guest runs,
    /// pages come in as the guest touches them.
    #[default]
    Map,
    /// Read the file's data into anonymous RAM before the guest runs:
    /// restore takes longer, the guest then runs on (possibly huge)
    /// anonymous pages, as after a boot.
    Copy,
}

impl std::str::FromStr for MemoryLoad {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "map" => Ok(MemoryLoad::Map),
            "copy" => Ok(MemoryLoad::Copy),
            _ => Err(format!("invalid --memory '{s}': expected map or copy")),
        }
    }
}

impl std::fmt::Display for MemoryLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryLoad::Map => "map",
            MemoryLoad::Copy => "copy",
        })
    }
}

/// Open `dir/memory`, check its size and trailer against `info` (the
/// state's), with `verify` also its RAM against the digest (this reads
/// the whole file), and make it guest RAM for `layout` as `load` says.
pub fn map_memory(
    dir: &Path,
    layout: &Layout,
    info: &MemoryInfo,
    verify: bool,
    load: MemoryLoad,
) -> Result<GuestMemoryMmap, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let actual = f.metadata().map_err(io(&path))?.len();
    let ram = memory::ram_len(layout);
    if actual == ram {
        return Err(SnapshotError::NoTrailer {
            path,
            what: format!("{actual} bytes, exactly the guest RAM"),
        });
    }
    if actual > ram && actual < memory::file_len(layout) {
        return Err(SnapshotError::NoTrailer {
            path,
            what: format!(
                "truncated to {} of its {} bytes",
                actual - ram,
                memory::TRAILER_LEN
            ),
        });
    }
    if actual != memory::file_len(layout) {
        return Err(SnapshotError::MemorySize { path, ram, actual });
    }
    let Some(found) = memory::read_trailer(&f, ram).map_err(io(&path))? else {
        return Err(SnapshotError::NoTrailer {
            path,
            what: format!("bad magic at offset {ram:#x}"),
        });
    };
    if found.id != info.id {
        return Err(SnapshotError::OtherSnapshot {
            path,
            expected: info.id,
            found: found.id,
        });
    }
    if found != *info {
        return Err(SnapshotError::TrailerMismatch {
            path,
            what: format!(
                "{} bytes with digest {:#018x}, the state's {} bytes with digest {:#018x}",
                found.len, found.digest, info.len, info.digest
            ),
        });
    }
    if verify {
        let computed = memory::digest_file(&f, ram).map_err(io(&path))?;
        if computed != info.digest {
            return Err(SnapshotError::MemoryDigest {
                path,
                stored: info.digest,
                computed,
            });
        }
    }
    match load {
        MemoryLoad::Map => memory::map(&f, layout),
        MemoryLoad::Copy => memory::copy(&f, layout),
    }
    .map_err(|reason| SnapshotError::Map { path, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of a real VM (the hang guest), as the fuzz seeds hold it.
    fn real_state() -> MachineState {
        let seed = include_bytes!("../../fuzz/seeds/snapshot_state/hang-body");
        postcard::from_bytes(&seed[1..]).expect(
            "fuzz/seeds/snapshot_state/hang-body no longer decodes: regenerate the \
             snapshot seeds (docs/RELIABILITY.md, \"Fuzzing\")",
        )
    }

    fn decode(state: &MachineState) -> Result<MachineState, SnapshotError> {
        let body = postcard::to_stdvec(state).unwrap();
        decode_state(&format::encode(&body), Path::new("snap/state"))
    }

    #[test]
    fn a_facs_outside_guest_ram_is_refused() {
        let mut st = real_state();
        assert!(decode(&st).is_ok());
        for facs in [u64::MAX - 4, st.config.mem_bytes - 8, 0xc000_0000] {
            st.facs = facs;
            let e = decode(&st).unwrap_err().to_string();
            assert!(e.contains("FACS") && e.contains("outside guest RAM"), "{e}");
        }
    }
}
