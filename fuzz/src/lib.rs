//! Fuzz targets for every input kvmrun reads: images, suites, command-line
//! values, snapshots, control-socket lines, and the register accesses a
//! guest makes to each device.
//!
//! Each target is a plain function over bytes, listed in [`TARGETS`], so
//! two things drive the same code: `cargo fuzz` (fuzz_targets/NAME.rs,
//! built with the `libfuzzer` feature by `make fuzz`), and the replay test
//! (tests/replay.rs, part of `make test`), which runs every file of
//! seeds/NAME/ through target NAME on the stable toolchain. A crash the
//! fuzzer finds goes into seeds/NAME/ once fixed, so it stays fixed.
//!
//! A target panics only on a bug: an input kvmrun refuses is an `Err` and
//! ignored here, as long as producing it did not panic.
//!
//! Adding a target: a function here, its line in `TARGETS`, a
//! three-line fuzz_targets/NAME.rs, a `[[bin]]` in Cargo.toml and a
//! seeds/NAME/ directory; the replay test checks that all five exist.

pub mod api;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod fakes;
pub mod platform;
pub mod snapshot;
pub mod suite;
pub mod virtio;

/// One fuzz target: its name (of fuzz_targets/NAME.rs and seeds/NAME/)
/// and the function the fuzzer drives.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every fuzz target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "multiboot",
        run: boot::multiboot,
    },
    Target {
        name: "linux",
        run: boot::linux,
    },
    Target {
        name: "kut_cfg",
        run: suite::kut_cfg,
    },
    Target {
        name: "toml_suite",
        run: suite::toml_suite,
    },
    Target {
        name: "cpu_spec",
        run: cli::cpu_spec,
    },
    Target {
        name: "cli_values",
        run: cli::values,
    },
    Target {
        name: "snapshot_state",
        run: snapshot::state,
    },
    Target {
        name: "memory_file",
        run: snapshot::memory_file,
    },
    Target {
        name: "api_lines",
        run: api::lines,
    },
    Target {
        name: "dev_serial",
        run: devices::serial,
    },
    Target {
        name: "dev_rtc",
        run: devices::rtc,
    },
    Target {
        name: "dev_iommu",
        run: devices::iommu,
    },
    Target {
        name: "dev_ioapic",
        run: devices::ioapic,
    },
    Target {
        name: "dev_fw_cfg",
        run: devices::fw_cfg,
    },
    Target {
        name: "dev_acpi_pm",
        run: devices::acpi_pm,
    },
    Target {
        name: "dev_i8042",
        run: devices::i8042,
    },
    Target {
        name: "dev_debug_exit",
        run: devices::debug_exit,
    },
    Target {
        name: "dev_testdev",
        run: devices::testdev,
    },
    Target {
        name: "pci_config",
        run: platform::pci_config,
    },
    Target {
        name: "virtio_chain",
        run: platform::virtio_chain,
    },
    Target {
        name: "virtio_blk",
        run: platform::virtio_blk,
    },
    Target {
        name: "virtio_fs",
        run: virtio::virtio_fs,
    },
    Target {
        name: "virtio_console",
        run: virtio::virtio_console,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Reads an input front to back; past its end every read gives zeros, so
/// any byte string is a valid input.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}
