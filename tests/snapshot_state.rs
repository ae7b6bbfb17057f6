//! vCPU and VM state round trips on real KVM, in one process: state read
//! from one VM, written into a fresh one, and read back must be the same.

mod common;

use common::kvm_available;
use kvm_bindings::kvm_regs;
use kvmrun::config::Irqchip;
use kvmrun::memory::Layout;
use kvmrun::snapshot::{VcpuContext, VcpuState, VmState};
use kvmrun::vcpu::Vcpu;
use kvmrun::vm::Vm;

/// MSRs whose value moves on its own between two reads (the TSC).
const MOVING_MSRS: [u32; 1] = [0x10];

fn bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap()
}

fn comparable(s: &VcpuState) -> Vec<Vec<u8>> {
    let msrs: Vec<_> = s
        .msrs
        .iter()
        .filter(|m| !MOVING_MSRS.contains(&m.index))
        .collect();
    vec![
        bytes(&s.cpuid),
        bytes(&s.regs),
        bytes(&s.sregs),
        bytes(&s.fpu),
        bytes(&s.xsave),
        bytes(&s.xcrs),
        bytes(&msrs),
        bytes(&s.lapic),
        bytes(&s.mp_state),
        bytes(&s.debugregs),
        bytes(&s.tsc_khz),
    ]
}

#[test]
fn vcpu_and_vm_state_survive_a_round_trip() {
    if !kvm_available() {
        return;
    }
    let layout = Layout::new(16 << 20);
    let vm = Vm::new(layout.clone(), true, Irqchip::Kernel).unwrap();
    let kvm_cpuid = kvmrun::cpu::KvmCpuid::query(&vm.kvm).unwrap();
    let cpuid = kvmrun::cpu::resolve(&Default::default(), false, &kvm_cpuid).unwrap();
    let msrs = kvmrun::cpu::msrs::initial(&[]).unwrap();
    let mut vcpus: Vec<Vcpu> = (0..2)
        .map(|id| Vcpu::new(&vm, id, 2, &cpuid.entries, &msrs, &[], false).unwrap())
        .collect();
    // Recognisable values in the registers, the LAPIC and an MSR.
    let regs = kvm_regs {
        rax: 0x1111,
        rbx: 0x2222,
        rsp: 0x7000,
        rip: 0x10_0000,
        rflags: 0x2,
        r15: 0xdead_beef,
        ..Default::default()
    };
    vcpus[0].fd().set_regs(&regs).unwrap();
    let mut lapic = vcpus[1].fd().get_lapic().unwrap();
    lapic.regs[0x80] = 0x20; // TPR
    vcpus[1].fd().set_lapic(&lapic).unwrap();

    let ctx = VcpuContext::for_vm(&vm).unwrap();
    assert!(!ctx.msr_list.is_empty(), "KVM lists no MSRs");
    let saved: Vec<VcpuState> = vcpus
        .iter_mut()
        .map(|v| VcpuState::save(v, &ctx).unwrap())
        .collect();
    assert_eq!(saved[0].regs.r15, 0xdead_beef);
    assert!(saved[0].msrs.iter().any(|m| m.index == 0x10), "no TSC");
    let vm_saved = VmState::save(&vm).unwrap();
    assert!(vm_saved.pit.is_some());

    // A fresh VM gets the state and gives back the same.
    let vm2 = Vm::new(layout, true, Irqchip::Kernel).unwrap();
    let ctx2 = VcpuContext::for_vm(&vm2).unwrap();
    let mut vcpus2: Vec<Vcpu> = (0..2).map(|id| Vcpu::bare(&vm2, id).unwrap()).collect();
    for (v, s) in vcpus2.iter().zip(&saved) {
        s.restore(v, &ctx2).unwrap();
    }
    vm_saved.restore(&vm2).unwrap();
    let again: Vec<VcpuState> = vcpus2
        .iter_mut()
        .map(|v| VcpuState::save(v, &ctx2).unwrap())
        .collect();
    for (a, b) in saved.iter().zip(&again) {
        assert_eq!(comparable(a), comparable(b), "vCPU {}", a.id);
        // The TSC goes on from the saved value, not from the new VM's zero.
        let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x10).unwrap().value;
        assert!(tsc(b) >= tsc(a));
    }
    let vm_again = VmState::save(&vm2).unwrap();
    let (chips, chips_saved) = (
        vm_again.irqchip.as_ref().unwrap(),
        vm_saved.irqchip.as_ref().unwrap(),
    );
    assert_eq!(bytes(&chips.pic_master), bytes(&chips_saved.pic_master));
    assert_eq!(bytes(&chips.pic_slave), bytes(&chips_saved.pic_slave));
    assert_eq!(bytes(&chips.ioapic), bytes(&chips_saved.ioapic));
    assert!(vm_again.clock.clock >= vm_saved.clock.clock);

    // A PIT-less VM refuses a state with a PIT, and the other way round.
    let vm3 = Vm::new(Layout::new(16 << 20), false, Irqchip::Kernel).unwrap();
    assert!(vm_saved.restore(&vm3).is_err());
}
