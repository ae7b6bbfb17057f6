//! The in-kernel PIT (i8254), in one place: its creation, the state a
//! BIOS leaves it in, save/restore, and its lost-tick policy.
//!
//! The lost-tick policy: drop ticks the guest missed instead of replaying
//! them, as QEMU's `lost_tick_policy=discard` that kvm-unit-tests asks
//! for.
//!
//! KVM_REINJECT_CONTROL unregisters the PIT's ack and mask notifiers, and
//! the kernel waits for an SRCU grace period after each: several
//! milliseconds, longer than all the rest of a restore. So the switch runs
//! on a helper thread while the VM is set up, and the vCPUs wait for it
//! only as long as the guest could tell the difference:
//!
//! - The ioctl holds the PIT's lock throughout, and so do guest accesses
//!   to the PIT ports, KVM_GET_PIT2 and KVM_SET_PIT2: a count the guest
//!   loads after the switch started runs under the new policy.
//! - Until the switch lands, KVM counts ticks the guest has not
//!   acknowledged and replays them one per acknowledgement. Loading a
//!   count restarts channel 0, so a periodic timer's second tick comes
//!   one full period after its first; before then at most one tick is
//!   outstanding, and both policies deliver the same interrupts. A
//!   one-shot count raises a single tick.
//! - Only a running vCPU acknowledges an interrupt. So the vCPUs may run
//!   for one period after the count was loaded; if the switch has not
//!   landed by then, they stop until it does (`TickSwitch::deadline()`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_pit_state2, KVM_PIT_FLAGS_HPET_LEGACY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::VmFd;

#[derive(Debug, thiserror::Error)]
pub enum PitError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start the pit-policy thread: {0}")]
    Spawn(std::io::Error),
    #[error("the pit-policy thread died")]
    Helper,
    #[error("the snapshot {0} a PIT but the configuration says otherwise")]
    Mismatch(&'static str),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PitError {
    move |source| PitError::Kvm { what, source }
}

/// The VM's in-kernel PIT.
pub struct Pit {
    fd: Arc<VmFd>,
}

impl Pit {
    /// Create the in-kernel PIT of the VM `fd` (after its irqchip), with
    /// the speaker port left to a dummy, as QEMU does.
    pub fn create(fd: Arc<VmFd>) -> Result<Pit, PitError> {
        let cfg = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(cfg).map_err(kvm("KVM_CREATE_PIT2"))?;
        Ok(Pit { fd })
    }

    /// Program channel 0 as a PC BIOS leaves it (SeaBIOS under QEMU:
    /// mode 2, count 65536, 18.2 Hz; see KUT-ABI.md, "Interrupt
    /// controllers and timers"); return the state loaded.
    pub fn load_bios_state(&self) -> Result<kvm_pit_state2, PitError> {
        let mut st = self.save()?;
        let ch = &mut st.channels[0];
        // Mode 2 (rate generator), lobyte/hibyte access, count 0 = 65536.
        ch.count = 0x1_0000;
        ch.mode = 2;
        ch.rw_mode = 3;
        ch.read_state = 3;
        ch.write_state = 3;
        ch.gate = 1;
        ch.bcd = 0;
        self.restore(&st)?;
        Ok(st)
    }

    pub fn save(&self) -> Result<kvm_pit_state2, PitError> {
        self.fd.get_pit2().map_err(kvm("KVM_GET_PIT2"))
    }

    pub fn restore(&self, state: &kvm_pit_state2) -> Result<(), PitError> {
        self.fd.set_pit2(state).map_err(kvm("KVM_SET_PIT2"))
    }

    /// Start the switch to dropping missed ticks; `loaded` is the state
    /// last loaded, and `loaded_at` when its load started. `failed` runs
    /// if the switch fails.
    pub fn drop_lost_ticks(
        &self,
        loaded: &kvm_pit_state2,
        loaded_at: Instant,
        failed: impl FnOnce(&PitError) + Send + 'static,
    ) -> Result<TickSwitch, PitError> {
        let periodic = period(loaded).map(|p| (loaded_at, p));
        TickSwitch::start(self.fd.clone(), periodic, failed)
    }
}

/// Load a snapshot's PIT state into `pit`; a snapshot with a PIT for a
/// VM without one, or the other way round, is an error.
pub fn restore_saved(pit: Option<&Pit>, saved: Option<&kvm_pit_state2>) -> Result<(), PitError> {
    match (pit, saved) {
        (Some(p), Some(s)) => p.restore(s),
        (None, None) => Ok(()),
        (None, Some(_)) => Err(PitError::Mismatch("has")),
        (Some(_), None) => Err(PitError::Mismatch("lacks")),
    }
}

/// The PIT's input clock.
const PIT_HZ: u64 = 1_193_182;

/// Below this period, the vCPUs wait for the switch before they start: a
/// stop in time cannot be counted on.
const MIN_RUNNING_PERIOD: Duration = Duration::from_millis(1);

// KVM_REINJECT_CONTROL is an _IO ioctl that takes a pointer anyway.
vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

#[repr(C)]
#[derive(Default)]
struct KvmReinjectControl {
    pit_reinject: u8,
    reserved: [u8; 31],
}

/// The interval of the periodic timer KVM arms for channel 0 of `pit`
/// when the state is loaded: modes 2 and 3, unless the HPET has taken the
/// PIT's place. A count of 0 loads as 65536.
pub fn period(pit: &kvm_pit_state2) -> Option<Duration> {
    let ch = &pit.channels[0];
    if pit.flags & KVM_PIT_FLAGS_HPET_LEGACY != 0 || !matches!(ch.mode, 2 | 3) {
        return None;
    }
    let count = match ch.count {
        0 => 0x1_0000,
        c => u64::from(c),
    };
    Some(Duration::from_nanos(count * 1_000_000_000 / PIT_HZ))
}

/// The switch to dropping missed ticks, possibly still in flight.
#[derive(Default)]
pub struct TickSwitch {
    thread: Option<JoinHandle<Result<(), PitError>>>,
    landed: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl TickSwitch {
    /// Start the switch on a helper thread. `loaded` is when channel 0's
    /// count was last loaded and the period of its timer, if periodic.
    /// `failed` runs on the helper thread if the switch fails.
    fn start(
        fd: Arc<VmFd>,
        loaded: Option<(Instant, Duration)>,
        failed: impl FnOnce(&PitError) + Send + 'static,
    ) -> Result<TickSwitch, PitError> {
        let landed = Arc::new(AtomicBool::new(false));
        let done = landed.clone();
        let switch = move || {
            let ctl = KvmReinjectControl::default();
            // SAFETY: the ioctl reads a `kvm_reinject_control`, which `ctl` is.
            let ret =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*fd, KVM_REINJECT_CONTROL(), &ctl) };
            done.store(true, Ordering::SeqCst);
            if ret < 0 {
                let e = PitError::Kvm {
                    what: "KVM_REINJECT_CONTROL",
                    source: kvm_ioctls::Error::last(),
                };
                failed(&e);
                return Err(e);
            }
            Ok(())
        };
        let thread = std::thread::Builder::new()
            .name("pit-policy".into())
            .spawn(switch)
            .map_err(PitError::Spawn)?;
        let mut s = TickSwitch {
            thread: Some(thread),
            landed,
            deadline: loaded.map(|(at, period)| at + period),
        };
        if loaded.is_some_and(|(_, period)| period < MIN_RUNNING_PERIOD) {
            s.join()?;
        }
        Ok(s)
    }

    /// Whether the switch has landed (or there is none).
    pub fn landed(&self) -> bool {
        self.thread.is_none() || self.landed.load(Ordering::SeqCst)
    }

    /// A flag that turns true when the switch lands.
    pub fn landed_flag(&self) -> Arc<AtomicBool> {
        if self.thread.is_none() {
            return Arc::new(AtomicBool::new(true));
        }
        self.landed.clone()
    }

    /// When the vCPUs must stop if the switch has not landed by then.
    pub fn deadline(&self) -> Option<Instant> {
        if self.landed() {
            None
        } else {
            self.deadline
        }
    }

    /// Block until the switch has landed; later calls return Ok.
    pub fn join(&mut self) -> Result<(), PitError> {
        match self.thread.take() {
            None => Ok(()),
            Some(h) => h.join().unwrap_or(Err(PitError::Helper)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pit(mode: u8, count: u32, flags: u32) -> kvm_pit_state2 {
        let mut p = kvm_pit_state2 {
            flags,
            ..Default::default()
        };
        p.channels[0].mode = mode;
        p.channels[0].count = count;
        p
    }

    #[test]
    fn only_modes_2_and_3_are_periodic() {
        for mode in [2, 3] {
            assert!(period(&pit(mode, 1193, 0)).is_some(), "mode {mode}");
        }
        for mode in [0, 1, 4, 5, 6, 7] {
            assert_eq!(period(&pit(mode, 1193, 0)), None, "mode {mode}");
        }
        assert_eq!(period(&pit(2, 1193, KVM_PIT_FLAGS_HPET_LEGACY)), None);
    }

    #[test]
    fn period_follows_the_count() {
        // The BIOS rate: 65536 counts, 18.2 Hz.
        let bios = period(&pit(2, 0, 0)).unwrap();
        assert_eq!(bios, period(&pit(2, 0x1_0000, 0)).unwrap());
        assert_eq!(bios.as_micros(), 54_925);
        assert_eq!(period(&pit(3, 1193, 0)).unwrap().as_micros(), 999);
    }
}
