//! The VM-wide KVM state: the in-kernel PICs and IOAPIC (none with the
//! split irqchip, whose IOAPIC is a device of the registry), the PIT,
//! and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::config::Irqchip;
use crate::pit::{self, PitError};
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Pit(#[from] PitError),
    #[error("the snapshot {0}")]
    Irqchip(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

/// KVM's PICs and IOAPIC (KVM_GET_IRQCHIP).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct KernelIrqchip {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VmState {
    /// For a VM with KVM's whole irqchip; `None` with the split one.
    pub irqchip: Option<KernelIrqchip>,
    /// KVM_GET_PIT2, for a VM with the in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock at the time of the save (KVM_GET_CLOCK).
    pub clock: kvm_clock_data,
}

impl VmState {
    /// Read the VM's state.
    pub fn save(vm: &Vm) -> Result<VmState, VmStateError> {
        let irqchip = match vm.irqchip_kind() {
            Irqchip::Split => None,
            Irqchip::Kernel => Some(KernelIrqchip {
                pic_master: vm
                    .irqchip(KVM_IRQCHIP_PIC_MASTER)
                    .map_err(kvm("KVM_GET_IRQCHIP (PIC master)"))?,
                pic_slave: vm
                    .irqchip(KVM_IRQCHIP_PIC_SLAVE)
                    .map_err(kvm("KVM_GET_IRQCHIP (PIC slave)"))?,
                ioapic: vm
                    .irqchip(KVM_IRQCHIP_IOAPIC)
                    .map_err(kvm("KVM_GET_IRQCHIP (IOAPIC)"))?,
            }),
        };
        Ok(VmState {
            irqchip,
            pit: vm.pit().map(|p| p.save()).transpose()?,
            clock: vm.clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Write the state back after the vCPUs are restored. The clock goes
    /// last and without flags, so kvmclock resumes at the saved value and
    /// guest time does not jump over the time spent on disk.
    pub fn restore(&self, vm: &Vm) -> Result<(), VmStateError> {
        match (&self.irqchip, vm.irqchip_kind()) {
            (Some(c), Irqchip::Kernel) => {
                for (chip, what) in [
                    (&c.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
                    (&c.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
                    (&c.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
                ] {
                    vm.set_irqchip(chip).map_err(kvm(what))?;
                }
            }
            (None, Irqchip::Split) => {}
            (saved, _) => {
                return Err(VmStateError::Irqchip(if saved.is_some() {
                    "has KVM's irqchip but the VM has the split one"
                } else {
                    "has the split irqchip but the VM has KVM's"
                }))
            }
        }
        pit::restore_saved(vm.pit(), self.pit.as_ref())?;
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
    }
}
