//! The VM-wide KVM state: the in-kernel PICs and IOAPIC, the PIT, and
//! the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the snapshot {0} a PIT but the configuration says otherwise")]
    Pit(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// KVM_GET_PIT2, for a VM with the in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock at the time of the save (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &Vm, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.fd.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

impl VmState {
    /// Read the VM's state; `pit` says whether the VM has the in-kernel PIT.
    pub fn save(vm: &Vm, pit: bool) -> Result<VmState, VmStateError> {
        Ok(VmState {
            pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: if pit {
                Some(vm.fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))?)
            } else {
                None
            },
            clock: vm.fd.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Write the state back after the vCPUs are restored. The clock goes
    /// last and without flags, so kvmclock resumes at the saved value and
    /// guest time does not jump over the time spent on disk.
    pub fn restore(&self, vm: &Vm, pit: bool) -> Result<(), VmStateError> {
        for (chip, what) in [
            (&self.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
            (&self.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
            (&self.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
        ] {
            vm.fd.set_irqchip(chip).map_err(kvm(what))?;
        }
        match (&self.pit, pit) {
            (Some(p), true) => vm.fd.set_pit2(p).map_err(kvm("KVM_SET_PIT2"))?,
            (None, false) => {}
            (Some(_), false) => return Err(VmStateError::Pit("has")),
            (None, true) => return Err(VmStateError::Pit("lacks")),
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.fd.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
    }
}
