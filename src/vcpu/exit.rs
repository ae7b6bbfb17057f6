//! What a vCPU does with each KVM exit: port and MMIO accesses go to the
//! bus, MSR exits get #GP, everything that ends the VM becomes an
//! `Outcome`. A plain function of the exit and the bus, so unit tests
//! drive it with hand-made exits and no KVM.

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use crate::bus::IoBus;
use crate::shutdown::ExitReason;

/// An exit that ends the vCPU's run (and the VM's).
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome {
    Exit(ExitReason),
    Crash(String),
    /// KVM_EXIT_INTERNAL_ERROR: the caller reads the details from kvm_run.
    InternalError,
    /// KVM_EXIT_DEBUG, which only comes while gdb debugs the guest.
    Debug(kvm_bindings::kvm_debug_exit_arch),
}

/// Handle one exit of vCPU `id`; `None` means run on.
pub(crate) fn dispatch(exit: VcpuExit<'_>, bus: &IoBus, id: u32) -> Option<Outcome> {
    match exit {
        VcpuExit::IoIn(port, data) => bus.pio_read(port, data),
        VcpuExit::IoOut(port, data) => bus.pio_write(port, data),
        VcpuExit::MmioRead(addr, data) => bus.mmio_read(addr, data),
        VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
        VcpuExit::Intr => {}
        // With the split irqchip: a local APIC's EOI of a level-triggered
        // vector, for kvmrun's IOAPIC, through its EOI register.
        VcpuExit::IoapicEoi(vector) => {
            let eoi = devices::ioapic::IOAPIC_BASE + devices::ioapic::IOAPIC_EOI;
            bus.mmio_write(eoi, &[vector, 0, 0, 0]);
        }
        // Only with --kvm-cap X86_USER_SPACE_MSR: an MSR KVM would fault
        // or --msr-filter denies. Inject #GP, as QEMU does for an MSR it
        // does not know.
        VcpuExit::X86Rdmsr(exit) => {
            log::debug!(
                "vCPU {id}: RDMSR {:#x} ({:?}): #GP",
                exit.index,
                exit.reason
            );
            *exit.error = 1;
        }
        VcpuExit::X86Wrmsr(exit) => {
            log::debug!(
                "vCPU {id}: WRMSR {:#x} = {:#x} ({:?}): #GP",
                exit.index,
                exit.data,
                exit.reason
            );
            *exit.error = 1;
        }
        VcpuExit::Hlt => return Some(Outcome::Exit(ExitReason::Halted)),
        VcpuExit::Shutdown => {
            return Some(Outcome::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()))
        }
        VcpuExit::SystemEvent(kind, _) => return Some(system_event(kind)),
        VcpuExit::InternalError => return Some(Outcome::InternalError),
        VcpuExit::Debug(arch) => return Some(Outcome::Debug(arch)),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(Outcome::Crash(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            )))
        }
        other => return Some(Outcome::Crash(format!("unhandled exit {other:?}"))),
    }
    None
}

fn system_event(kind: u32) -> Outcome {
    match kind {
        KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Exit(ExitReason::PowerOff),
        KVM_SYSTEM_EVENT_RESET => Outcome::Exit(ExitReason::Reset),
        KVM_SYSTEM_EVENT_CRASH => {
            Outcome::Crash("guest reported a crash (KVM_SYSTEM_EVENT_CRASH)".into())
        }
        k => Outcome::Crash(format!("unhandled KVM system event {k}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kvm_ioctls::{MsrExitReason, ReadMsrExit, WriteMsrExit};
    use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    use super::*;

    /// Records every access and answers reads with a fixed byte.
    #[derive(Default)]
    struct Recorder(Vec<(&'static str, u64, Vec<u8>)>);

    impl MutDevicePio for Recorder {
        fn pio_read(&mut self, b: PioAddress, o: PioAddressOffset, data: &mut [u8]) {
            data.fill(0x5a);
            self.0.push(("in", u64::from(b.0 + o), data.to_vec()));
        }
        fn pio_write(&mut self, b: PioAddress, o: PioAddressOffset, data: &[u8]) {
            self.0.push(("out", u64::from(b.0 + o), data.to_vec()));
        }
    }

    impl MutDeviceMmio for Recorder {
        fn mmio_read(&mut self, b: MmioAddress, o: MmioAddressOffset, data: &mut [u8]) {
            data.fill(0xa5);
            self.0.push(("read", b.0 + o, data.to_vec()));
        }
        fn mmio_write(&mut self, b: MmioAddress, o: MmioAddressOffset, data: &[u8]) {
            self.0.push(("write", b.0 + o, data.to_vec()));
        }
    }

    fn bus() -> (IoBus, Arc<Mutex<Recorder>>) {
        let bus = IoBus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.add_pio("rec", 0x80, 4, dev.clone()).unwrap();
        bus.add_mmio("rec", 0xd000_0000, 0x1000, dev.clone())
            .unwrap();
        (bus, dev)
    }

    #[test]
    fn port_and_mmio_exits_reach_the_device() {
        let (bus, dev) = bus();
        let mut four = [0u8; 4];
        assert_eq!(
            dispatch(VcpuExit::IoIn(0x81, &mut four[..1]), &bus, 0),
            None
        );
        assert_eq!(four[0], 0x5a);
        assert_eq!(dispatch(VcpuExit::IoOut(0x80, &[1, 2]), &bus, 0), None);
        assert_eq!(
            dispatch(VcpuExit::MmioRead(0xd000_0010, &mut four), &bus, 0),
            None
        );
        assert_eq!(four, [0xa5; 4]);
        assert_eq!(
            dispatch(VcpuExit::MmioWrite(0xd000_0ffc, &[9; 4]), &bus, 0),
            None
        );
        let seen = std::mem::take(&mut dev.lock().unwrap().0);
        assert_eq!(
            seen,
            vec![
                ("in", 0x81, vec![0x5a]),
                ("out", 0x80, vec![1, 2]),
                ("read", 0xd000_0010, vec![0xa5; 4]),
                ("write", 0xd000_0ffc, vec![9; 4]),
            ]
        );
    }

    #[test]
    fn unowned_accesses_read_all_ones_and_run_on() {
        let (bus, _) = bus();
        let mut d = [0u8; 4];
        assert_eq!(dispatch(VcpuExit::IoIn(0x1234, &mut d), &bus, 0), None);
        assert_eq!(d, [0xff; 4]);
        let mut d = [0u8; 8];
        assert_eq!(
            dispatch(VcpuExit::MmioRead(0x1_0000, &mut d), &bus, 0),
            None
        );
        assert_eq!(d, [0xff; 8]);
    }

    #[test]
    fn msr_exits_inject_gp() {
        let (bus, _) = bus();
        let (mut error, mut data) = (0u8, 0u64);
        let rd = ReadMsrExit {
            error: &mut error,
            reason: MsrExitReason::Filter,
            index: 0x10,
            data: &mut data,
        };
        assert_eq!(dispatch(VcpuExit::X86Rdmsr(rd), &bus, 1), None);
        assert_eq!(error, 1);
        let mut error = 0u8;
        let wr = WriteMsrExit {
            error: &mut error,
            reason: MsrExitReason::Unknown,
            index: 0x10,
            data: 5,
        };
        assert_eq!(dispatch(VcpuExit::X86Wrmsr(wr), &bus, 1), None);
        assert_eq!(error, 1);
    }

    #[test]
    fn ending_exits_become_outcomes() {
        let (bus, _) = bus();
        let d = |e| dispatch(e, &bus, 0);
        assert_eq!(d(VcpuExit::Hlt), Some(Outcome::Exit(ExitReason::Halted)));
        assert!(
            matches!(d(VcpuExit::Shutdown), Some(Outcome::Crash(w)) if w.contains("triple fault"))
        );
        assert_eq!(
            d(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            Some(Outcome::Exit(ExitReason::PowerOff))
        );
        assert_eq!(
            d(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            Some(Outcome::Exit(ExitReason::Reset))
        );
        assert!(matches!(
            d(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])),
            Some(Outcome::Crash(_))
        ));
        assert!(matches!(
            d(VcpuExit::SystemEvent(99, &[])),
            Some(Outcome::Crash(w)) if w.contains("99")
        ));
        assert_eq!(d(VcpuExit::InternalError), Some(Outcome::InternalError));
        assert!(matches!(
            d(VcpuExit::FailEntry(0x21, 3)),
            Some(Outcome::Crash(w)) if w.contains("0x21") && w.contains("CPU 3")
        ));
        assert!(matches!(
            d(VcpuExit::Debug(Default::default())),
            Some(Outcome::Debug(_))
        ));
        assert!(
            matches!(d(VcpuExit::Unknown), Some(Outcome::Crash(w)) if w.contains("unhandled exit"))
        );
        assert_eq!(d(VcpuExit::Intr), None);
    }
}
