//! `kvmrun cpuid --probe`: ask the guest what CPUID really returns.
//!
//! A KVM may not honour every bit of the table the VMM sets (KVM-PVM
//! passes some hardware bits through), so the only trustworthy answer comes
//! from a guest. The probe needs no guest image: it builds a tiny VM, puts
//! every vCPU directly into 64-bit ring 0 (the mode kernels and
//! kvm-unit-tests run CPUID in) at a hand-assembled routine, lets each one
//! execute CPUID for a list of leaves, and reads the answers from guest
//! memory.

use kvm_bindings::{kvm_cpuid_entry2, kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress};

use super::gdt;
use crate::config::Irqchip;
use crate::memory::Layout;
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("probe VM: {0}")]
    Vm(#[from] VmError),
    #[error("probe vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("probe: cannot write guest memory: {0}")]
    Memory(String),
    #[error("probe vCPU {id}: {what}")]
    Guest { id: u32, what: String },
    #[error("probe: {0} leaves is more than the probe can ask for")]
    TooMany(usize),
}

/// The routine each vCPU runs, entered with RSI = list of (leaf, subleaf)
/// u32 pairs, RDI = result area (16 bytes per leaf: EAX, EBX, ECX, EDX),
/// R8 = number of leaves, R9 = port to signal completion on.
#[rustfmt::skip]
const ROUTINE: [u8; 43] = [
    0x4d, 0x85, 0xc0,       // 0x00 loop: test %r8, %r8
    0x74, 0x1f,             // 0x03       jz done
    0x8b, 0x06,             // 0x05       mov (%rsi), %eax
    0x8b, 0x4e, 0x04,       // 0x07       mov 4(%rsi), %ecx
    0x0f, 0xa2,             // 0x0a       cpuid
    0x89, 0x07,             // 0x0c       mov %eax, (%rdi)
    0x89, 0x5f, 0x04,       // 0x0e       mov %ebx, 4(%rdi)
    0x89, 0x4f, 0x08,       // 0x11       mov %ecx, 8(%rdi)
    0x89, 0x57, 0x0c,       // 0x14       mov %edx, 12(%rdi)
    0x48, 0x83, 0xc6, 0x08, // 0x17       add $8, %rsi
    0x48, 0x83, 0xc7, 0x10, // 0x1b       add $16, %rdi
    0x49, 0xff, 0xc8,       // 0x1f       dec %r8
    0xeb, 0xdc,             // 0x22       jmp loop
    0x44, 0x89, 0xca,       // 0x24 done: mov %r9d, %edx
    0xee,                   // 0x27       out %al, (%dx)
    0xf4,                   // 0x28       hlt
    0xeb, 0xf9,             // 0x29       jmp done
];

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
/// Null, 64-bit code, flat data.
const PROBE_GDT: [u64; 3] = [0, gdt::CODE64, gdt::DATA32];
const CODE: u64 = 0x5000;
const LIST: u64 = 0x10000;
const MAX_LEAVES: usize = 1024;
const RESULTS: u64 = 0x10_0000;
const RESULT_STRIDE: u64 = (MAX_LEAVES * 16) as u64;
/// An unused port: the routine's OUT there ends the vCPU's run.
const DONE_PORT: u16 = 0x5fe;

/// Run CPUID for every (leaf, subleaf) in `leaves` on every vCPU, vCPU
/// `i` having the table `tables[i]`. Returns, per vCPU, [EAX, EBX, ECX,
/// EDX] per leaf.
pub fn run(
    tables: &[Vec<kvm_cpuid_entry2>],
    leaves: &[(u32, u32)],
) -> Result<Vec<Vec<[u32; 4]>>, ProbeError> {
    if leaves.len() > MAX_LEAVES {
        return Err(ProbeError::TooMany(leaves.len()));
    }
    let mem_bytes = RESULTS + RESULT_STRIDE * tables.len() as u64;
    let mem_bytes = mem_bytes.next_multiple_of(2 << 20).max(4 << 20);
    let vm = Vm::new(Layout::new(mem_bytes), false, Irqchip::Kernel)?;
    let write = |data: &[u8], at: u64| {
        vm.mem
            .write_slice(data, GuestAddress(at))
            .map_err(|e| ProbeError::Memory(e.to_string()))
    };
    // Identity map of the first GiB with 2 MiB pages.
    write(&(PDPT | 3).to_le_bytes(), PML4)?;
    write(&(PD | 3).to_le_bytes(), PDPT)?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    write(&pd, PD)?;
    write(&gdt::to_bytes(&PROBE_GDT), GDT)?;
    write(&ROUTINE, CODE)?;
    let list: Vec<u8> = leaves
        .iter()
        .flat_map(|(l, s)| [l.to_le_bytes(), s.to_le_bytes()].concat())
        .collect();
    write(&list, LIST)?;

    let mut out = Vec::new();
    for (id, table) in tables.iter().enumerate() {
        let id32 = id as u32;
        let kvm_err = |what| {
            move |source| ProbeError::Kvm {
                id: id32,
                what,
                source,
            }
        };
        let fd = vm.create_vcpu(id32).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = super::to_kvm(table).map_err(|e| ProbeError::Guest {
            id: id32,
            what: e.to_string(),
        })?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        gdt::load(&mut sregs, GDT, &PROBE_GDT, 0x08, 0x10);
        gdt::enter_long_mode(&mut sregs, PML4);
        fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let mut regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        regs.rip = CODE;
        regs.rflags = 2;
        regs.rsi = LIST;
        regs.rdi = RESULTS + RESULT_STRIDE * id as u64;
        regs.r8 = leaves.len() as u64;
        regs.r9 = u64::from(DONE_PORT);
        fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        // Application processors wait for INIT/SIPI otherwise.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;

        let mut fd = fd;
        // The routine is straight-line code: a few exits at most, so a
        // bound on them turns a misbehaving KVM into an error, not a hang.
        let mut done = false;
        for _ in 0..1000 {
            match fd.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, _)) => {
                    done = true;
                    break;
                }
                Ok(VcpuExit::IoOut(..) | VcpuExit::IoIn(..) | VcpuExit::Intr) => {}
                Ok(other) => {
                    return Err(ProbeError::Guest {
                        id: id32,
                        what: format!("unexpected exit {other:?}"),
                    })
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(source) => {
                    return Err(ProbeError::Kvm {
                        id: id32,
                        what: "KVM_RUN",
                        source,
                    })
                }
            }
        }
        if !done {
            return Err(ProbeError::Guest {
                id: id32,
                what: "the CPUID routine did not finish".into(),
            });
        }
        let mut buf = vec![0u8; leaves.len() * 16];
        vm.mem
            .read_slice(&mut buf, GuestAddress(RESULTS + RESULT_STRIDE * id as u64))
            .map_err(|e| ProbeError::Memory(e.to_string()))?;
        out.push(
            buf.chunks(16)
                .map(|c| {
                    let w = |i: usize| u32::from_le_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
                    [w(0), w(4), w(8), w(12)]
                })
                .collect(),
        );
    }
    Ok(out)
}
