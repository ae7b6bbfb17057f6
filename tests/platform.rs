//! The device registry on a real VM: every device saved under its name
//! and restored into another VM, saved states that do not fit refused by
//! name, devices torn down, and a guest's BAR write moving a device.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use common::kvm_available;
use kvmrun::config::{DeviceConfig, DiskConfig, SerialOutput, Transport, VmConfig};
use kvmrun::memory::Layout;
use kvmrun::platform::{machine, DeviceState, DeviceStates, Platform, PlatformError};
use kvmrun::shutdown::Shutdown;
use kvmrun::vm::Vm;

/// A read-only disk image both machines of a test can open at once.
fn disk_image() -> PathBuf {
    static IMAGE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = IMAGE.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("disk.img");
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        (d, path)
    });
    path.clone()
}

fn config() -> VmConfig {
    let mut c = VmConfig::new("unused".into());
    c.serial = SerialOutput::None;
    c.devices = vec![
        DeviceConfig::Rng(Transport::Pci),
        DeviceConfig::Rng(Transport::Mmio),
        DeviceConfig::Disk(DiskConfig {
            path: disk_image(),
            read_only: true,
            snapshot: false,
            transport: Transport::Pci,
        }),
    ];
    c
}

fn machine(saved: Option<DeviceStates>) -> Result<(Vm, Platform), PlatformError> {
    let cfg = config();
    let vm = Vm::new(
        Layout::new(cfg.mem_bytes).with_pci(cfg.has_pci()),
        true,
        cfg.irqchip,
    )
    .unwrap();
    let requests: Arc<dyn devices::VmRequests> = Arc::new(Shutdown::new().unwrap());
    let mut p = Platform::new(&vm, true, saved);
    machine::attach(&mut p, &cfg, &vm, &requests, || false)?;
    p.check_restored()?;
    Ok((vm, p))
}

#[test]
fn every_device_is_saved_by_name_and_restored() {
    if !kvm_available() {
        return;
    }
    let (_vm, p) = machine(None).unwrap();
    let saved = p.save().unwrap();
    let names: Vec<&str> = saved.keys().map(String::as_str).collect();
    for n in [
        "serial",
        "isa-debug-exit",
        "pc-testdev",
        "pc-testdev-iomem",
        "fw_cfg",
        "acpi-pm",
        "i8042",
        "rtc",
        "pci-host-bridge",
        "pci-config-io",
        "pci-ecam",
        "rng0",
        "rng1",
        "disk0",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let (_vm2, p2) = machine(Some(saved.clone())).unwrap();
    let again = p2.save().unwrap();
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    // The clocks (RTC, PM timer) go on; everything else comes back as saved.
    let differ: Vec<&String> = saved
        .keys()
        .filter(|k| !matches!(k.as_str(), "rtc" | "acpi-pm") && again[*k] != saved[*k])
        .collect();
    assert!(differ.is_empty(), "restored differently: {differ:?}");
    // The DSDT of both lists the same virtio-mmio window and PCI windows.
    assert_eq!(p.acpi_description(true), p2.acpi_description(true));
}

fn error(saved: DeviceStates) -> String {
    match machine(Some(saved)) {
        Ok(_) => panic!("a bad saved state was taken"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn saved_states_that_do_not_fit_are_refused_by_name() {
    if !kvm_available() {
        return;
    }
    let (_vm, p) = machine(None).unwrap();
    let good = p.save().unwrap();

    let mut s = good.clone();
    s.insert(
        "floppy".into(),
        DeviceState {
            version: 1,
            data: vec![],
        },
    );
    assert!(error(s).contains("device floppy, which this machine does not have"));

    let mut s = good.clone();
    s.get_mut("rng1").unwrap().version = 9;
    assert!(error(s).contains("device rng1: saved state version 9, but this kvmrun's is 1"));

    let mut s = good.clone();
    s.get_mut("rng0").unwrap().data.truncate(3);
    assert!(error(s).contains("device rng0: cannot decode"));

    // A device missing from the snapshot starts new: what a later kvmrun
    // adding a device sees in an older snapshot.
    let mut s = good;
    s.remove("i8042");
    machine(Some(s)).unwrap();
}

#[test]
fn removed_devices_leave_the_buses_and_give_back_their_resources() {
    if !kvm_available() {
        return;
    }
    let (_vm, mut p) = machine(None).unwrap();
    let window = p.acpi_description(false).virtio_mmio[0];
    assert!(p.bus().mmio.lookup(window.base, 4).is_some());
    p.remove("rng1").unwrap();
    assert!(p.bus().mmio.lookup(window.base, 4).is_none());
    // The same window and GSI come back for the next device.
    p.attach_virtio("rng9", Transport::Mmio, (), |()| {
        devices::virtio::rng::Rng::new()
    })
    .unwrap();
    let again = p.acpi_description(false).virtio_mmio;
    assert_eq!(again.last().unwrap().base, window.base);
    assert_eq!(again.last().unwrap().gsi, window.gsi);
    // The PCI device: off the root bus and its BAR unmapped.
    let bar0 = 0xc000_0000;
    assert!(p.bus().mmio.lookup(bar0, 4).is_some());
    p.remove("rng0").unwrap();
    assert!(p.bus().mmio.lookup(bar0, 4).is_none());
    let mut id = [0u8; 4];
    p.bus()
        .pio_write(0xcf8, &(0x8000_0000u32 | 1 << 11).to_le_bytes());
    p.bus().pio_read(0xcfc, &mut id);
    assert_eq!(id, [0xff; 4]);
    assert!(p.remove("rng0").is_err());
}

#[test]
fn a_bar_write_moves_the_device_on_the_bus() {
    if !kvm_available() {
        return;
    }
    let (_vm, p) = machine(None).unwrap();
    let bus = p.bus();
    let cfg = |reg: u32| (0x8000_0000u32 | 1 << 11 | reg).to_le_bytes();
    let num_queues = |at: u64| {
        let mut d = [0u8; 2];
        bus.mmio_read(at + 0x12, &mut d);
        u16::from_le_bytes(d)
    };
    assert_eq!(num_queues(0xc000_0000), 1);
    bus.pio_write(0xcf8, &cfg(0x10));
    bus.pio_write(0xcfc, &0xc800_0000u32.to_le_bytes());
    assert_eq!(num_queues(0xc800_0000), 1);
    assert_eq!(num_queues(0xc000_0000), 0xffff);
    // Decoding off: nowhere.
    bus.pio_write(0xcf8, &cfg(0x04));
    bus.pio_write(0xcfc, &0u32.to_le_bytes());
    assert_eq!(num_queues(0xc800_0000), 0xffff);
    // Onto pc-testdev's iomem: refused, unmapped, no panic.
    bus.pio_write(0xcf8, &cfg(0x10));
    bus.pio_write(0xcfc, &0xff00_0000u32.to_le_bytes());
    bus.pio_write(0xcf8, &cfg(0x04));
    bus.pio_write(0xcfc, &2u32.to_le_bytes());
    let mut d = [0u8; 4];
    bus.mmio_read(0xff00_0000, &mut d);
    assert_eq!(d, [0; 4], "pc-testdev's iomem still answers");
}
