//! One vCPU's KVM state: read while the vCPU is stopped (its thread has
//! handed it back, so no ioctl races KVM_RUN) and written back in an
//! order KVM accepts.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVMIO, KVM_MAX_CPUID_ENTRIES,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{Cap, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_ptr};

use crate::cpu::msrs::{MsrValue, IA32_TSC, IA32_TSC_DEADLINE};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

/// `KVM_MAX_MSR_ENTRIES` of one `Msrs` batch.
const MSR_BATCH: usize = 200;
/// Size of the legacy `struct kvm_xsave`.
const XSAVE_LEGACY_BYTES: usize = 4096;
/// EFER.SVME: SVM instructions enabled (AMD APM, "Extended Feature Enable
/// Register (EFER)").
const EFER_SVME: u64 = 1 << 12;
/// CR4.VMXE: VMX operation enabled (Intel SDM, "Control Registers").
const CR4_VMXE: u64 = 1 << 13;

vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: this host's KVM refuses the saved CPUID ({entries} entries): {source}")]
    Cpuid {
        id: u32,
        entries: usize,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM refuses the saved value {value:#x} of MSR {index:#x}")]
    Msr { id: u32, index: u32, value: u64 },
    #[error("vCPU {id}: saved xsave area has {saved} bytes, but this host's KVM uses {host}")]
    XsaveSize { id: u32, saved: usize, host: usize },
    #[error(
        "cannot snapshot: vCPU {id} has {bit} set (the guest runs virtual machines of its own), \
         and kvmrun does not save nested virtualization state (KVM_GET_NESTED_STATE); \
         snapshot once the guest's hypervisor has no VM (a Linux guest clears it when its \
         last KVM VM closes)"
    )]
    Nested { id: u32, bit: &'static str },
}

/// The bit by which a vCPU's guest has turned hardware virtualization on,
/// if it has. While it is on, KVM holds state of the guest's own
/// hypervisor that no other ioctl reads (the nested guest's VMCB or
/// VMCS, guest mode, GIF, the host save area): only KVM_GET_NESTED_STATE
/// does, which kvmrun does not save, so a snapshot is refused.
pub fn nested_virt_enabled(sregs: &kvm_sregs) -> Option<&'static str> {
    if sregs.efer & EFER_SVME != 0 {
        Some("EFER.SVME")
    } else if sregs.cr4 & CR4_VMXE != 0 {
        Some("CR4.VMXE")
    } else {
        None
    }
}

/// What this VM's KVM needs to read vCPU state: the MSRs it lists and
/// the size of its xsave area. Found once per VM.
#[derive(Clone, Debug)]
pub struct VcpuContext {
    /// KVM_GET_MSR_INDEX_LIST.
    pub msr_list: Vec<u32>,
    /// Bytes of the xsave area: KVM_CAP_XSAVE2's answer where KVM gives
    /// one, else the legacy 4096; 0 without KVM_CAP_XSAVE.
    pub xsave_bytes: usize,
}

impl VcpuContext {
    pub fn for_vm(vm: &Vm) -> Result<Self, VcpuStateError> {
        let msr_list = vm
            .kvm
            .get_msr_index_list()
            .map_err(|source| VcpuStateError::Kvm {
                id: 0,
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?
            .as_slice()
            .to_vec();
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let xsave_bytes = if xsave2 > 0 {
            (xsave2 as usize).max(XSAVE_LEGACY_BYTES)
        } else if vm.check_extension_int(Cap::Xsave) > 0 {
            XSAVE_LEGACY_BYTES
        } else {
            0
        };
        Ok(VcpuContext {
            msr_list,
            xsave_bytes,
        })
    }
}

/// `kvm_fpu`, which kvm-bindings does not make serializable.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM keeps for one vCPU.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VcpuState {
    pub id: u32,
    /// The CPUID table as set (KVM_GET_CPUID2).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// KVM_GET_TSC_KHZ; `None` where KVM cannot tell.
    pub tsc_khz: Option<u32>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    /// The xsave area as 32-bit words, as `struct kvm_xsave` holds it;
    /// empty without KVM_CAP_XSAVE.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that this vCPU lets KVM read.
    pub msrs: Vec<MsrValue>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

fn kvm(id: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { id, what, source }
}

impl VcpuState {
    /// Read the state of a stopped vCPU. A port or MMIO read the vCPU last
    /// exited for is completed first: KVM finishes it only on the next
    /// KVM_RUN, so an immediate-exit KVM_RUN makes the registers whole.
    pub fn save(vcpu: &mut Vcpu, ctx: &VcpuContext) -> Result<VcpuState, VcpuStateError> {
        let id = vcpu.id;
        {
            let fd = vcpu.fd_mut();
            fd.set_kvm_immediate_exit(1);
            let res = fd.run().map(|_| ()).map_err(|e| e.errno());
            fd.set_kvm_immediate_exit(0);
            match res {
                Ok(()) | Err(libc::EINTR) | Err(libc::EAGAIN) => {}
                Err(errno) => {
                    return Err(VcpuStateError::Kvm {
                        id,
                        what: "KVM_RUN (completing the last exit)",
                        source: kvm_ioctls::Error::new(errno),
                    })
                }
            }
        }
        let fd = vcpu.fd();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(id, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let tsc_khz = fd.get_tsc_khz().ok();
        let sregs = fd.get_sregs().map_err(kvm(id, "KVM_GET_SREGS"))?;
        if let Some(bit) = nested_virt_enabled(&sregs) {
            return Err(VcpuStateError::Nested { id, bit });
        }
        Ok(VcpuState {
            id,
            cpuid,
            tsc_khz,
            regs: fd.get_regs().map_err(kvm(id, "KVM_GET_REGS"))?,
            sregs,
            fpu: (&fd.get_fpu().map_err(kvm(id, "KVM_GET_FPU"))?).into(),
            xsave: get_xsave(fd, id, ctx.xsave_bytes)?,
            xcrs: if ctx.xsave_bytes > 0 {
                fd.get_xcrs().map_err(kvm(id, "KVM_GET_XCRS"))?
            } else {
                kvm_xcrs::default()
            },
            msrs: get_msrs(fd, id, &ctx.msr_list)?,
            lapic: fd.get_lapic().map_err(kvm(id, "KVM_GET_LAPIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(kvm(id, "KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(kvm(id, "KVM_GET_MP_STATE"))?,
            debugregs: fd.get_debug_regs().map_err(kvm(id, "KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Write the state into a vCPU created with [`Vcpu::bare`]. CPUID
    /// first (everything else is checked against it), the TSC frequency
    /// before any TSC value, the LAPIC before the MSRs, and among the MSRs
    /// IA32_TSC first and IA32_TSC_DEADLINE last.
    pub fn restore(&self, vcpu: &Vcpu, ctx: &VcpuContext) -> Result<(), VcpuStateError> {
        let id = vcpu.id;
        let fd = vcpu.fd();
        let cpuid = crate::cpu::to_kvm(&self.cpuid).map_err(|_| VcpuStateError::Cpuid {
            id,
            entries: self.cpuid.len(),
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuStateError::Cpuid {
                id,
                entries: self.cpuid.len(),
                source,
            })?;
        if let Some(khz) = self.tsc_khz {
            let host = fd.get_tsc_khz().ok();
            if host != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    log::warn!(
                        "vCPU {id}: cannot set the saved TSC frequency {khz} kHz (KVM runs it at {}): {e}; guest time may drift",
                        host.map_or("an unknown rate".to_string(), |h| format!("{h} kHz"))
                    );
                }
            }
        }
        fd.set_sregs(&self.sregs)
            .map_err(kvm(id, "KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm(id, "KVM_SET_REGS"))?;
        fd.set_fpu(&(&self.fpu).into())
            .map_err(kvm(id, "KVM_SET_FPU"))?;
        if !self.xsave.is_empty() {
            set_xsave(fd, id, &self.xsave, ctx.xsave_bytes)?;
            fd.set_xcrs(&self.xcrs).map_err(kvm(id, "KVM_SET_XCRS"))?;
        }
        fd.set_lapic(&self.lapic)
            .map_err(kvm(id, "KVM_SET_LAPIC"))?;
        set_msrs(fd, id, &ordered_msrs(&self.msrs))?;
        let mut events = self.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        fd.set_vcpu_events(&events)
            .map_err(kvm(id, "KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm(id, "KVM_SET_MP_STATE"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm(id, "KVM_SET_DEBUGREGS"))?;
        Ok(())
    }
}

/// The MSRs in restore order: IA32_TSC first, so the TSC-based ones
/// (TSC_DEADLINE, kvmclock) see the saved time base; IA32_TSC_DEADLINE
/// last, because KVM only takes it when the LAPIC timer is already in
/// TSC-deadline mode; the rest as KVM listed them.
pub fn ordered_msrs(msrs: &[MsrValue]) -> Vec<MsrValue> {
    let rank = |m: &MsrValue| match m.index {
        IA32_TSC => 0,
        IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut out = msrs.to_vec();
    out.sort_by_key(rank);
    out
}

/// Read every MSR of `list` that KVM lets user space read. KVM_GET_MSRS
/// stops at the first MSR it refuses; that one is left out and the rest
/// read again.
fn get_msrs(fd: &VcpuFd, id: u32, list: &[u32]) -> Result<Vec<MsrValue>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut todo: &[u32] = list;
    while !todo.is_empty() {
        let batch = &todo[..todo.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Kvm {
            id,
            what: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm(id, "KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| MsrValue {
            index: e.index,
            value: e.data,
        }));
        if n < batch.len() {
            log::debug!(
                "vCPU {id}: MSR {:#x} is listed but not readable; left out",
                batch[n]
            );
            todo = &todo[n + 1..];
        } else {
            todo = &todo[batch.len()..];
        }
    }
    Ok(out)
}

fn set_msrs(fd: &VcpuFd, id: u32, msrs: &[MsrValue]) -> Result<(), VcpuStateError> {
    for chunk in msrs.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::Kvm {
            id,
            what: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = fd.set_msrs(&kvm_msrs).map_err(kvm(id, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(VcpuStateError::Msr {
                id,
                index: chunk[n].index,
                value: chunk[n].value,
            });
        }
    }
    Ok(())
}

fn get_xsave(fd: &VcpuFd, id: u32, bytes: usize) -> Result<Vec<u32>, VcpuStateError> {
    if bytes == 0 {
        return Ok(Vec::new());
    }
    let mut buf = vec![0u32; bytes.div_ceil(4)];
    let (req, what) = if bytes > XSAVE_LEGACY_BYTES {
        (KVM_GET_XSAVE2(), "KVM_GET_XSAVE2")
    } else {
        (KVM_GET_XSAVE(), "KVM_GET_XSAVE")
    };
    // SAFETY: `buf` holds the `bytes` KVM reported for this VM's xsave
    // area (at least the 4096 of `struct kvm_xsave`), all it writes.
    let ret = unsafe { ioctl_with_mut_ptr(fd, req, buf.as_mut_ptr()) };
    if ret < 0 {
        return Err(VcpuStateError::Kvm {
            id,
            what,
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(buf)
}

fn set_xsave(fd: &VcpuFd, id: u32, saved: &[u32], host_bytes: usize) -> Result<(), VcpuStateError> {
    if host_bytes == 0 {
        return Err(VcpuStateError::XsaveSize {
            id,
            saved: saved.len() * 4,
            host: 0,
        });
    }
    // KVM reads as many bytes as the guest's CPUID makes the area, at most
    // `host_bytes`: pad a shorter saved area with zeros (components it
    // lacks stay in their initial state).
    let mut buf = saved.to_vec();
    if buf.len() * 4 < host_bytes {
        buf.resize(host_bytes.div_ceil(4), 0);
    }
    // SAFETY: `buf` has at least the bytes KVM reads for this VM.
    let ret = unsafe { ioctl_with_ptr(fd, KVM_SET_XSAVE(), buf.as_ptr()) };
    if ret < 0 {
        return Err(VcpuStateError::Kvm {
            id,
            what: "KVM_SET_XSAVE",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_first_and_deadline_last() {
        let m = |index| MsrValue { index, value: 0 };
        let order: Vec<u32> = ordered_msrs(&[m(0x6e0), m(0x1b), m(0x10), m(0xc0000080)])
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(order, vec![0x10, 0x1b, 0xc0000080, 0x6e0]);
    }

    #[test]
    fn nested_virtualization_in_use_is_named() {
        let mut s = kvm_sregs {
            efer: 0xd01,
            cr4: 0x3506f0,
            ..Default::default()
        };
        assert_eq!(nested_virt_enabled(&s), None);
        s.efer |= EFER_SVME;
        assert_eq!(nested_virt_enabled(&s), Some("EFER.SVME"));
        s.efer &= !EFER_SVME;
        s.cr4 |= CR4_VMXE;
        assert_eq!(nested_virt_enabled(&s), Some("CR4.VMXE"));
        let e = VcpuStateError::Nested {
            id: 1,
            bit: "EFER.SVME",
        }
        .to_string();
        assert!(
            e.starts_with("cannot snapshot: vCPU 1 has EFER.SVME set")
                && e.contains("KVM_GET_NESTED_STATE"),
            "{e}"
        );
    }

    #[test]
    fn fpu_state_round_trips() {
        let f = kvm_fpu {
            fcw: 0x37f,
            fsw: 0x1234,
            ftwx: 0x55,
            mxcsr: 0x1f80,
            last_ip: 0xdead,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        let s = FpuState::from(&f);
        assert_eq!(kvm_fpu::from(&s), f);
    }
}
