//! The guest TSCs and kvmclock of a snapshot, taken and given back at one
//! instant by the recipe of KVM's vCPU attribute KVM_VCPU_TSC_OFFSET
//! (Documentation/virt/kvm/devices/vcpu.rst, "KVM_VCPU_TSC_CTRL").
//!
//! KVM_GET_MSRS reads a vCPU's TSC when that vCPU's state is read, and
//! KVM_GET_CLOCK reads kvmclock later; the saved pair disagrees by the
//! time between the reads (117 ms once on the AMD-V host under TCG, 1 s
//! with `KVMRUN_TEST_SLOW_SAVE=1000`). A restore wrote the TSC with
//! KVM_SET_MSRS, which KVM drops when the value is within a second of
//! what it expects, and set the clock later. A restored Linux guest then
//! sees its TSC and kvm-clock skewed and marks the TSC unstable.
//!
//! Save: `tie_to_clock()` sets each saved TSC to its value at the
//! clock's instant. Restore: `resume_at_clock()` sets each vCPU's TSC
//! offset (a guest TSC is the host TSC plus the offset) so the TSC reads
//! the saved value moved on by the kvmclock time since. KVM_GET_CLOCK
//! names the host TSC of its instant when KVM runs a master clock
//! (KVM_CLOCK_HOST_TSC); otherwise (an unstable host TSC, as L1's on the
//! AMD-V host) vCPU 0's TSC, read right after the clock, less its offset
//! stands for it.
//!
//! Without the attribute or with a scaled guest TSC, the MSR values and
//! the clock stay as read and written, and `-vv` says why.

use kvm_bindings::{
    kvm_clock_data, kvm_device_attr, kvm_msr_entry, Msrs, KVMIO, KVM_CLOCK_HOST_TSC,
    KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::vcpu::VcpuState;
use crate::cpu::msrs::IA32_TSC;
use crate::vcpu::Vcpu;
use crate::vm::Vm;

vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

/// The guest TSC of a vCPU whose offset is `offset` when the host TSC
/// reads `host_tsc` (no TSC scaling).
pub fn tsc_at(host_tsc: u64, offset: u64) -> u64 {
    host_tsc.wrapping_add(offset)
}

/// The offset that makes a guest TSC saved as `saved_tsc` at kvmclock
/// `saved_ns` read on at `khz` when kvmclock reads `now_ns` and the host
/// TSC `now_host_tsc`: the guest TSC at kvmclock zero stays what it was.
pub fn offset_for(saved_tsc: u64, saved_ns: u64, now_ns: u64, now_host_tsc: u64, khz: u32) -> u64 {
    moved_on(saved_tsc, saved_ns, now_ns, khz).wrapping_sub(now_host_tsc)
}

/// The offset attribute, its value at `addr` (a u64).
fn offset_attr(addr: u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr,
    }
}

/// The vCPU's TSC offset, if KVM has the attribute.
fn tsc_offset(fd: &VcpuFd) -> Option<u64> {
    let mut value = 0u64;
    let attr = offset_attr(&mut value as *mut u64 as u64);
    // SAFETY: `attr` points KVM at `value`, a u64, all it writes.
    let ret = unsafe { ioctl_with_ref(fd, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(value)
}

fn set_tsc_offset(fd: &VcpuFd, value: u64) -> Result<(), kvm_ioctls::Error> {
    let attr = offset_attr(&value as *const u64 as u64);
    // SAFETY: `attr` points KVM at `value`, a u64, all it reads.
    let ret = unsafe { ioctl_with_ref(fd, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
}

/// The vCPU's TSC as KVM_GET_MSRS reads it now.
fn read_tsc(fd: &VcpuFd) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: IA32_TSC,
        ..Default::default()
    }])
    .ok()?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Why the TSCs stay as the MSRs have them (`-vv` prints it).
pub type Untied = String;

/// Each vCPU's TSC offset, if every vCPU's TSC runs unscaled at the
/// host's rate and KVM has the attribute.
pub fn offsets(vm: &Vm, vcpus: &[Vcpu]) -> Result<Vec<u64>, Untied> {
    let host_khz = vm
        .host_tsc_khz()
        .ok_or("KVM does not say the host's TSC rate (KVM_GET_TSC_KHZ on the VM)")?;
    vcpus
        .iter()
        .enumerate()
        .map(|(id, v)| match v.fd().get_tsc_khz() {
            Ok(khz) if khz == host_khz => tsc_offset(v.fd())
                .ok_or_else(|| format!("vCPU {id}: no KVM_VCPU_TSC_OFFSET attribute")),
            Ok(khz) => Err(format!(
                "vCPU {id}: its TSC runs at {khz} kHz, the host's at {host_khz} kHz"
            )),
            Err(e) => Err(format!("vCPU {id}: KVM_GET_TSC_KHZ: {e}")),
        })
        .collect()
}

/// The host TSC at the instant of `clock`, read a moment ago: KVM's own,
/// or vCPU 0's TSC read now less its offset.
fn host_tsc_of(clock: &kvm_clock_data, vcpu0: &Vcpu, offset0: u64) -> Result<u64, Untied> {
    if clock.flags & KVM_CLOCK_HOST_TSC != 0 {
        return Ok(clock.host_tsc);
    }
    let tsc = read_tsc(vcpu0.fd()).ok_or("vCPU 0: KVM_GET_MSRS of IA32_TSC failed")?;
    Ok(tsc.wrapping_sub(offset0))
}

/// kvmclock and each vCPU's TSC read as a save begins, right after the
/// vCPUs stopped.
pub struct SaveStart {
    clock_ns: u64,
    tscs: Vec<u64>,
}

/// Read kvmclock, then each vCPU's TSC (`SaveStart`).
pub fn save_start(vm: &Vm, vcpus: &[Vcpu]) -> Result<SaveStart, Untied> {
    let clock_ns = vm.clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?.clock;
    let tscs = vcpus
        .iter()
        .enumerate()
        .map(|(id, v)| {
            read_tsc(v.fd()).ok_or_else(|| format!("vCPU {id}: KVM_GET_MSRS of IA32_TSC failed"))
        })
        .collect::<Result<_, _>>()?;
    Ok(SaveStart { clock_ns, tscs })
}

/// A TSC read at kvmclock `then_ns`, moved on at `khz` to kvmclock
/// `now_ns`.
pub fn moved_on(tsc: u64, then_ns: u64, now_ns: u64, khz: u32) -> u64 {
    let elapsed_ns = i128::from(now_ns) - i128::from(then_ns);
    (i128::from(tsc) + elapsed_ns * i128::from(khz) / 1_000_000) as u64
}

/// Right after `clock` was read for a snapshot: set each saved IA32_TSC
/// to the vCPU's TSC at the clock's instant.
///
/// With a KVM master clock (KVM_CLOCK_HOST_TSC, a stable host TSC) the
/// TSCs run while the VM is paused: each is the host TSC of the clock's
/// instant plus the vCPU's offset (`offsets`, read before the clock), so
/// vCPUs in step stay exactly in step. Without one, KVM holds a stopped
/// vCPU's TSC where the vCPU left it and catches it up by kvmclock when
/// the vCPU runs again: each is its TSC at `start` moved on by the
/// kvmclock time since.
pub fn tie_to_clock(
    clock: &kvm_clock_data,
    start: Result<SaveStart, Untied>,
    offsets: Result<Vec<u64>, Untied>,
    states: &mut [VcpuState],
) -> Result<(), Untied> {
    let tscs: Vec<u64> = if clock.flags & KVM_CLOCK_HOST_TSC != 0 {
        offsets?
            .into_iter()
            .map(|off| tsc_at(clock.host_tsc, off))
            .collect()
    } else {
        let start = start?;
        let mut tscs = Vec::with_capacity(states.len());
        for (state, &tsc) in states.iter().zip(&start.tscs) {
            let khz = state
                .tsc_khz
                .ok_or_else(|| format!("vCPU {}: KVM did not say its TSC rate", state.id))?;
            tscs.push(moved_on(tsc, start.clock_ns, clock.clock, khz));
        }
        tscs
    };
    for (state, tsc) in states.iter_mut().zip(tscs) {
        for m in state.msrs.iter_mut().filter(|m| m.index == IA32_TSC) {
            m.value = tsc;
        }
    }
    Ok(())
}

/// After KVM_SET_CLOCK of a restore: set each vCPU's TSC offset so its
/// TSC reads what it was saved as, moved on by the kvmclock time since
/// `saved_ns`. When it cannot (the error says why), the TSCs stay as
/// written with the MSRs, which still run the guest.
pub fn resume_at_clock(
    vm: &Vm,
    saved_ns: u64,
    vcpus: &[Vcpu],
    states: &[VcpuState],
) -> Result<(), Untied> {
    let offs = offsets(vm, vcpus)?;
    let v0 = vcpus.first().ok_or("no vCPU")?;
    let now = vm.clock().map_err(|e| format!("KVM_GET_CLOCK: {e}"))?;
    let host = host_tsc_of(&now, v0, offs[0])?;
    let mut new = Vec::with_capacity(vcpus.len());
    for (id, (v, s)) in vcpus.iter().zip(states).enumerate() {
        let saved = s
            .msrs
            .iter()
            .find(|m| m.index == IA32_TSC)
            .ok_or_else(|| format!("vCPU {id}: no saved IA32_TSC"))?;
        let khz = v
            .fd()
            .get_tsc_khz()
            .map_err(|e| format!("vCPU {id}: KVM_GET_TSC_KHZ: {e}"))?;
        new.push((offset_for(saved.value, saved_ns, now.clock, host, khz), khz));
    }
    for (id, (v, &(offset, khz))) in vcpus.iter().zip(&new).enumerate() {
        set_tsc_offset(v.fd(), offset)
            .map_err(|e| format!("vCPU {id}: KVM_SET_DEVICE_ATTR (TSC offset): {e}"))?;
        let now = tsc_offset(v.fd()).unwrap_or(0);
        if !kept(offset, now, khz) {
            return Err(format!(
                "vCPU {id}: KVM did not keep the TSC offset {offset:#x} (reads {now:#x})"
            ));
        }
    }
    Ok(())
}

/// Whether KVM kept a TSC offset `set` that now reads `now`. With an
/// unstable host TSC, KVM moves the offset at every vCPU load so the
/// guest TSC does not run while the vCPU is not loaded (it catches up
/// later), so a second of cycles is allowed, the window KVM itself
/// treats as one TSC value; a KVM that runs guests on the host's TSC
/// (KVM-PVM) reads back 0.
fn kept(set: u64, now: u64, khz: u32) -> bool {
    let drift = (i128::from(now as i64) - i128::from(set as i64)).unsigned_abs();
    now == set || (now != 0 && drift <= u128::from(khz) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_moved_by_less_than_a_second_of_cycles_is_kept() {
        let khz = 2_000_000;
        let set = 0u64.wrapping_sub(20_000_000_000);
        assert!(kept(set, set, khz));
        assert!(kept(set, set.wrapping_add(5_000), khz));
        assert!(kept(set, set.wrapping_sub(2_000_000_000), khz));
        assert!(!kept(set, set.wrapping_add(2_000_000_001), khz));
        // KVM-PVM's: the offset reads back 0, however near.
        assert!(!kept(set, 0, khz));
        assert!(!kept(1_000, 0, khz));
        assert!(kept(0, 0, khz));
    }

    #[test]
    fn a_held_tsc_moves_on_by_the_kvmclock_time() {
        // Read 3 s into kvmclock, tied to a clock read at 4.25 s, 2 GHz.
        assert_eq!(
            moved_on(100, 3_000_000_000, 4_250_000_000, 2_000_000),
            2_500_000_100
        );
        assert_eq!(moved_on(7, 5, 5, 2_000_000), 7);
    }

    #[test]
    fn the_guest_tsc_is_the_host_tsc_plus_the_offset() {
        assert_eq!(tsc_at(1000, 5), 1005);
        // Offsets are two's complement: a guest behind the host.
        assert_eq!(tsc_at(1000, 0u64.wrapping_sub(400)), 600);
    }

    #[test]
    fn a_restored_tsc_moves_on_by_the_kvmclock_time_since_the_save() {
        // Saved: TSC 5_000_000 at kvmclock 2 s. Now kvmclock reads 2.5 s
        // and the host TSC 9_000_000; at 1 GHz the guest TSC must read
        // 5_000_000 + 500_000_000.
        let off = offset_for(
            5_000_000,
            2_000_000_000,
            2_500_000_000,
            9_000_000,
            1_000_000,
        );
        assert_eq!(tsc_at(9_000_000, off), 505_000_000);
        // The same instant: the saved TSC itself.
        let off = offset_for(7, 10, 10, 1 << 40, 2_100_018);
        assert_eq!(tsc_at(1 << 40, off), 7);
        // A clock read a little behind the saved one moves the TSC back
        // as much, not to a huge value.
        let off = offset_for(1_000_000, 1_000_000_000, 999_000_000, 0, 1_000_000);
        assert_eq!(tsc_at(0, off), 0);
    }
}
