//! Snapshots: the `state` file (header, checksum, postcard body, the
//! checks on the decoded state, every device restored from it) and the
//! `memory` file (size, trailer and digest checks, the copy-on-write
//! mapping).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use std::sync::Arc;

use devices::acpi_pm::AcpiPm;
use devices::debug_exit::DebugExit;
use devices::edu::Edu;
use devices::fw_cfg::FwCfg;
use devices::i8042::I8042;
use devices::ioapic::{Ioapic, IOAPIC_PINS};
use devices::iommu::Vtd;
use devices::pci::q35::Ich9Lpc;
use devices::pci::{Chipset, HostBridge, PciConfigIo, PciConfigMmio, PciRoot};
use devices::rtc::Rtc;
use devices::serial::SerialDevice;
use devices::testdev::{PcTestDev, TestDevIomem};
use devices::virtio::blk::Blk;
use devices::virtio::console::{Console, ConsoleArgs, PortSpec};
use devices::virtio::mmio::VirtioMmio;
use devices::virtio::pci::VirtioPci;
use devices::virtio::rng::Rng;
use devices::Persist;
use kvmrun::memory::Layout;
use kvmrun::pit;
use kvmrun::snapshot::{
    self, format, memory, vcpu, DeviceState, MachineState, MemoryInfo, MemoryLoad,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{fakes, Input};

/// Restore `saved` as device `D`, as `Platform::make_saved()` does: the
/// version must match and the data decode.
fn restore_one<D: Persist>(saved: &DeviceState, args: D::Args) -> Option<D> {
    if saved.version != D::STATE_VERSION {
        return None;
    }
    let state: D::State = postcard::from_bytes(&saved.data).ok()?;
    D::restore(args, &state).ok()
}

/// Restore every device of `state` by its name, as the device registry
/// does, with fakes for what the devices ask of the VM.
fn restore_devices(state: &MachineState) {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory");
    let root = Arc::new(PciRoot::new(fakes::bar_host()));
    for (name, saved) in &state.devices {
        match name.as_str() {
            "serial" => {
                let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                let out: Box<dyn std::io::Write + Send> = Box::new(std::io::sink());
                restore_one::<SerialDevice>(saved, (irq, out));
            }
            "isa-debug-exit" => {
                restore_one::<DebugExit>(saved, fakes::requests());
            }
            "pc-testdev" => {
                restore_one::<PcTestDev>(saved, (fakes::irq(), fakes::flusher()));
            }
            "pc-testdev-iomem" => {
                restore_one::<TestDevIomem>(saved, ());
            }
            "fw_cfg" => {
                restore_one::<FwCfg>(saved, ());
            }
            "acpi-pm" => {
                restore_one::<AcpiPm>(saved, fakes::requests());
            }
            "i8042" => {
                restore_one::<I8042>(saved, fakes::requests());
            }
            "rtc" => {
                if let Some(rtc) = restore_one::<Rtc>(saved, ()) {
                    read_clock(rtc);
                }
            }
            "ioapic" => {
                if let Some(apic) = restore_one::<Ioapic>(saved, fakes::msi_sink()) {
                    interrupt(apic);
                }
            }
            "pci-host-bridge" => {
                for chipset in [Chipset::Generic, Chipset::Q35] {
                    restore_one::<HostBridge>(saved, chipset);
                }
            }
            "ich9-lpc" => {
                restore_one::<Ich9Lpc>(saved, 0x600);
            }
            n if n.starts_with("edu") => {
                let dma = Arc::new(devices::DirectDma);
                restore_one::<Edu>(saved, (mem.clone(), dma, fakes::msi(), fakes::irq(), 16));
            }
            "intel-iommu" => {
                for intremap in [false, true] {
                    if let Some(v) =
                        restore_one::<Vtd>(saved, (mem.clone(), fakes::msi(), intremap))
                    {
                        use_iommu(v);
                    }
                }
            }
            "pci-config-io" => {
                restore_one::<PciConfigIo>(saved, root.clone());
            }
            "pci-ecam" => {
                restore_one::<PciConfigMmio>(saved, root.clone());
            }
            // A disk (on the fuzz targets' snapshot-mode image): its
            // transport is in its state.
            n if n.starts_with("disk") => {
                let disk = crate::platform::fuzz_disk();
                let args = (mem.clone(), fakes::irq(), 20, disk.clone());
                restore_one::<VirtioMmio<Blk>>(saved, args);
                let args = (mem.clone(), fakes::msi(), fakes::irq(), 16, disk);
                restore_one::<VirtioPci<Blk>>(saved, args);
            }
            // The console: its ports without host sides, named as saved
            // (a mismatch is refused, which the first bytes exercise).
            n if n.starts_with("console") => {
                let args = console_args();
                restore_one::<VirtioMmio<Console>>(saved, (mem.clone(), fakes::irq(), 20, args));
                let args = (mem.clone(), fakes::msi(), fakes::irq(), 16, console_args());
                restore_one::<VirtioPci<Console>>(saved, args);
            }
            // Another virtio device: its transport is in its state.
            _ => {
                restore_one::<VirtioMmio<Rng>>(saved, (mem.clone(), fakes::irq(), 20, ()));
                let args = (mem.clone(), fakes::msi(), fakes::irq(), 16, ());
                restore_one::<VirtioPci<Rng>>(saved, args);
            }
        }
    }
}

/// Two ports named as `kvmrun run --rootfs` names its first two.
fn console_args() -> ConsoleArgs {
    let port = |name: &str| PortSpec {
        name: name.into(),
        output: None,
        input: None,
    };
    ConsoleArgs {
        ports: vec![port("kvmrun.stdout"), port("kvmrun.stderr")],
        control_wake: std::sync::Arc::new(EventFd::new(EFD_NONBLOCK).expect("an event fd")),
    }
}

/// Devices behind a restored IOMMU go on at once: its tables are walked
/// with whatever the state points at.
fn use_iommu(mut v: Vtd) {
    for iova in [0, 0x1000, 0x20_0000, 1 << 39] {
        let _ = v.translate(0x08, iova, true);
    }
    let msg = devices::MsiMessage {
        address: 0xfee0_0050,
        data: 0,
    };
    let _ = v.remap_interrupt(msg, Some(0x08));
    // Resuming the invalidation queue.
    use vm_device::MutDeviceMmio;
    v.mmio_write(vm_device::bus::MmioAddress(0), 0x34, &0x10u32.to_le_bytes());
}

/// A restored IOAPIC takes every line and every EOI.
fn interrupt(mut apic: Ioapic) {
    for pin in 0..IOAPIC_PINS {
        apic.set_irq(pin, true);
    }
    for vector in 0..=u8::MAX {
        apic.end_of_interrupt(vector);
    }
}

/// A guest reads the clock right after a restore.
fn read_clock(mut rtc: Rtc) {
    use vm_device::MutDevicePio;
    let mut b = [0u8; 1];
    for reg in [0u8, 4, 7, 9, 0x32] {
        rtc.pio_write(vm_device::bus::PioAddress(0x70), 0, &[reg]);
        rtc.pio_read(vm_device::bus::PioAddress(0x70), 1, &mut b);
    }
}

/// Input: one byte of mode, then either a whole state file (mode bit 0
/// clear) or only its body, which gets a good header and checksum so the
/// fuzzer reaches the decoder behind them.
pub fn state(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let rest = input.rest();
    let file;
    let bytes = if mode & 1 == 0 {
        rest
    } else {
        file = format::encode(rest);
        &file
    };
    let path = Path::new("fuzz-snapshot/state");
    let Ok(state) = snapshot::decode_state(bytes, path) else {
        return;
    };
    restore_devices(&state);
    for v in &state.vcpus {
        let _ = kvmrun::cpu::to_kvm(&v.cpuid);
        let _ = vcpu::ordered_msrs(&v.msrs);
    }
    if let Some(pit) = &state.vm.pit {
        if let Some(period) = pit::period(pit) {
            // What TickSwitch::start() makes of it.
            let _ = Instant::now() + period;
        }
    }
    // A state that decodes encodes again, to a state that decodes.
    let body = postcard::to_stdvec(&state).expect("encoding a decoded state");
    snapshot::decode_state(&format::encode(&body), path).expect("decoding a re-encoded state");
}

/// Input: flags (bit 0: `--verify-memory`; bit 1: the file is as long
/// as the layout needs; bit 2: zero pages left as holes; bit 3:
/// `--memory copy` instead of map), the RAM size in
/// pages, the state's memory id, length and digest, the trailer's 40
/// bytes, then RAM.
pub fn memory_file(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.u8();
    let pages = u64::from(input.u8() % 16) + 1;
    let info = MemoryInfo {
        id: u128::from_le_bytes(input.array()),
        len: input.u64(),
        digest: input.u64(),
    };
    let trailer: [u8; 40] = input.array();
    let ram = input.rest();

    let layout = Layout::new(pages * 4096);
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join(snapshot::MEMORY_FILE);
    let mut f = std::fs::File::create(&path).expect("memory file");
    let ram_len = memory::ram_len(&layout);
    let len = if flags & 2 != 0 {
        memory::file_len(&layout)
    } else {
        (ram.len() as u64).min(memory::file_len(&layout) + 4096)
    };
    f.set_len(len).expect("file length");
    for (i, page) in ram.chunks(4096).enumerate() {
        let at = i as u64 * 4096;
        if at >= len.min(ram_len) || (flags & 4 != 0 && page.iter().all(|&b| b == 0)) {
            continue;
        }
        let n = (page.len() as u64).min(len - at) as usize;
        f.write_all_at(&page[..n], at).expect("RAM");
    }
    if len >= ram_len + 40 {
        f.write_all_at(&trailer, ram_len).expect("trailer");
    }
    f.flush().expect("flush");
    drop(f);

    let load = if flags & 8 != 0 {
        MemoryLoad::Copy
    } else {
        MemoryLoad::Map
    };
    let Ok(mem) = snapshot::map_memory(dir.path(), &layout, &info, flags & 1 != 0, load) else {
        return;
    };
    // The mapping or copy is the guest's RAM: every page reads, and
    // writes stay private.
    let mut b = [0u8; 1];
    for p in 0..pages {
        mem.read_slice(&mut b, GuestAddress(p * 4096))
            .expect("read RAM");
        mem.write_slice(&[!b[0]], GuestAddress(p * 4096))
            .expect("write RAM");
    }
}
