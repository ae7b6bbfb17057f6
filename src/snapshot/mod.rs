//! Snapshots: a running VM frozen to a directory and brought back, in the
//! same process or a new one.
//!
//! A snapshot directory holds two files:
//! - `state`: header (magic, format version, kvmrun version, CRC-64) and
//!   the postcard-encoded [`MachineState`] (see [`format`]);
//! - `memory`: guest RAM, sparse (see [`memory`]).
//!
//! Both are written to a temporary name, fsynced and renamed into place,
//! memory first, then the directory is fsynced: a directory is a valid
//! snapshot only once `state` is there, and `state` appears last.

pub mod format;
pub mod memory;
pub mod vcpu;
pub mod vm;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devices::acpi_pm::AcpiPmState;
use devices::debug_exit::DebugExitState;
use devices::fw_cfg::FwCfgState;
use devices::i8042::I8042State;
use devices::rtc::RtcState;
use devices::serial::SerialDeviceState;
use devices::testdev::{PcTestDevState, TestDevIomemState};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::memory::Layout;

pub use self::vcpu::{VcpuContext, VcpuState, VcpuStateError};
pub use self::vm::{VmState, VmStateError};

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Every device's saved state.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DeviceStates {
    pub serial: SerialDeviceState,
    pub debug_exit: DebugExitState,
    pub testdev: PcTestDevState,
    pub testdev_iomem: TestDevIomemState,
    pub fw_cfg: FwCfgState,
    pub acpi_pm: AcpiPmState,
    pub i8042: I8042State,
    pub rtc: RtcState,
}

/// Everything but guest RAM.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MachineState {
    pub config: VmConfig,
    /// fw_cfg's KERNEL_DATA item, which a restore cannot rebuild without
    /// the image.
    pub kernel_data: Vec<u8>,
    /// Guest address of the ACPI FACS, for waking from S3 after a restore.
    pub facs: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
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
    #[error("{}: memory file has {actual} bytes, but the state describes {expected} bytes of guest RAM", path.display())]
    MemorySize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{}: cannot map guest memory: {reason}", path.display())]
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
    pub state_bytes: u64,
    pub elapsed: Duration,
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Write `state` and `mem` into `dir` (created if missing; an older
/// snapshot in it is invalidated first, then replaced).
pub fn write(
    dir: &Path,
    state: &MachineState,
    mem: &GuestMemoryMmap,
) -> Result<WriteStats, SnapshotError> {
    let started = Instant::now();
    let body = postcard::to_stdvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let bytes = format::encode(&body);

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
    let layout_len: u64 = mem.iter().map(|r| r.len()).sum();
    f.set_len(layout_len).map_err(io(&mem_tmp))?;
    let written = memory::write(&f, mem).map_err(io(&mem_tmp))?;
    f.sync_all().map_err(io(&mem_tmp))?;
    drop(f);
    std::fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    fsync_dir(dir)?;

    let state_tmp = dir.join(".state.tmp");
    let f = File::create(&state_tmp).map_err(io(&state_tmp))?;
    std::io::Write::write_all(&mut &f, &bytes).map_err(io(&state_tmp))?;
    f.sync_all().map_err(io(&state_tmp))?;
    drop(f);
    std::fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    fsync_dir(dir)?;
    Ok(WriteStats {
        memory_bytes_written: written,
        state_bytes: bytes.len() as u64,
        elapsed: started.elapsed(),
    })
}

/// Read and check `dir/state`: magic, version, length, checksum, then the
/// decoded state's own consistency.
pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let (_, body) = format::decode(&bytes).map_err(|source| SnapshotError::Format {
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
    Ok(state)
}

/// Open `dir/memory`, check its size against `layout`, and map it
/// copy-on-write as guest RAM.
pub fn map_memory(dir: &Path, layout: &Layout) -> Result<GuestMemoryMmap, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let actual = f.metadata().map_err(io(&path))?.len();
    let expected = memory::file_len(layout);
    if actual != expected {
        return Err(SnapshotError::MemorySize {
            path,
            expected,
            actual,
        });
    }
    memory::map(&f, layout).map_err(|reason| SnapshotError::Map { path, reason })
}
