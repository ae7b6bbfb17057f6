//! The platform state a PC BIOS leaves behind, which images entered
//! directly (without firmware) may still rely on: kvm-unit-tests' realmode
//! test waits in `sti; hlt` for the BIOS's timer tick.
//!
//! Matches what SeaBIOS leaves under QEMU (measured, see KUT-ABI.md, "Interrupt
//! controllers and timers"): 8259 vector bases 0x08/0x70 with the timer
//! unmasked, and a real-mode IVT whose timer vector acknowledges the PIC.
//! The PIT's part (channel 0 in mode 2 counting 65536, 18.2 Hz) lives
//! with the rest of the PIT in `pit.rs`.

use kvm_bindings::{KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::memory::BIOS_STUBS_ADDR;
use crate::vm::Vm;

const MASTER_VECTOR_BASE: u8 = 0x08;
const SLAVE_VECTOR_BASE: u8 = 0x70;
/// Master mask: only IRQ0 (timer) and IRQ2 (cascade) get through.
const MASTER_IMR: u8 = !0b101;
const SLAVE_IMR: u8 = 0xff;
/// The vector bases, master first, for kvmrun's PIC (split irqchip).
pub const BIOS_PIC_BASES: [u8; 2] = [MASTER_VECTOR_BASE, SLAVE_VECTOR_BASE];
/// The masks, master first, for kvmrun's PIC (split irqchip).
pub const BIOS_PIC_MASKS: [u8; 2] = [MASTER_IMR, SLAVE_IMR];

/// Real-mode handlers: the default `iret`, and hardware IRQ handlers that
/// send a non-specific EOI to the master (and slave) PIC first.
const STUB_IRET: [u8; 1] = [0xcf];
/// push ax; mov al, 0x20; out 0x20, al; pop ax; iret
const STUB_MASTER_EOI: [u8; 7] = [0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
/// push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret
const STUB_SLAVE_EOI: [u8; 9] = [0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];

#[derive(Debug, thiserror::Error)]
pub enum BiosError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BiosError {
    move |source| BiosError::Kvm { what, source }
}

/// Write the real-mode IVT and its handlers to guest memory.
pub fn write_ivt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let seg = (BIOS_STUBS_ADDR >> 4) as u16;
    let base = BIOS_STUBS_ADDR & 0xf;
    let iret = base as u16;
    let master = iret + STUB_IRET.len() as u16;
    let slave = master + STUB_MASTER_EOI.len() as u16;
    let mut stubs = Vec::new();
    stubs.extend_from_slice(&STUB_IRET);
    stubs.extend_from_slice(&STUB_MASTER_EOI);
    stubs.extend_from_slice(&STUB_SLAVE_EOI);
    let mut ivt = Vec::with_capacity(256 * 4);
    for v in 0u16..256 {
        let off = match v as u8 {
            x if (MASTER_VECTOR_BASE..MASTER_VECTOR_BASE + 8).contains(&x) => master,
            x if (SLAVE_VECTOR_BASE..SLAVE_VECTOR_BASE + 8).contains(&x) => slave,
            _ => iret,
        };
        ivt.extend_from_slice(&off.to_le_bytes());
        ivt.extend_from_slice(&seg.to_le_bytes());
    }
    let w = |data: &[u8], addr: u64| {
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| BootError::Memory {
                addr,
                reason: e.to_string(),
            })
    };
    w(&stubs, BIOS_STUBS_ADDR)?;
    w(&ivt, 0)
}

/// Program the in-kernel PICs as the BIOS leaves them (the PIT's part is
/// `Pit::load_bios_state()`).
pub fn setup_pics(vm: &Vm) -> Result<(), BiosError> {
    for (chip, base, imr) in [
        (KVM_IRQCHIP_PIC_MASTER, MASTER_VECTOR_BASE, MASTER_IMR),
        (KVM_IRQCHIP_PIC_SLAVE, SLAVE_VECTOR_BASE, SLAVE_IMR),
    ] {
        let mut c = vm.irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        // SAFETY: `pic` is the member KVM fills for the PIC chip ids.
        let pic = unsafe { &mut c.chip.pic };
        pic.irq_base = base;
        pic.imr = imr;
        pic.init_state = 0;
        // ICW4 was given: 8086 mode, as every PC BIOS programs it.
        pic.init4 = 1;
        vm.set_irqchip(&c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_guest_memory, Layout};

    #[test]
    fn timer_vector_acknowledges_the_pic() {
        let mem = create_guest_memory(&Layout::new(4 << 20)).unwrap();
        write_ivt(&mem).unwrap();
        let off: u16 = mem.read_obj(GuestAddress(8 * 4)).unwrap();
        let seg: u16 = mem.read_obj(GuestAddress(8 * 4 + 2)).unwrap();
        let at = ((seg as u64) << 4) + off as u64;
        let mut code = [0u8; 7];
        mem.read_slice(&mut code, GuestAddress(at)).unwrap();
        assert_eq!(code, STUB_MASTER_EOI);
        let off0: u16 = mem.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(((seg as u64) << 4) + off0 as u64))
                .unwrap(),
            0xcf
        );
    }
}
