//! The split irqchip's PC legacy interrupt path, host side: the clock
//! and timer kvmrun's PIT (`devices::i8254`) runs on, and the kick that
//! wakes vCPU 0 when the 8259 pair's output rises (`devices::i8259`).
//! vCPU 0 takes the PIC's vector itself (`Vcpu::inject_extint()`).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use devices::{IntrKick, TimerClock};
use vmm_sys_util::timerfd::TimerFd;

use super::VmError;
use crate::vcpu::Kick;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// CLOCK_MONOTONIC and a timerfd on it, which the main loop watches
/// and answers with `Pit::expire()`.
pub struct PitClock {
    timer: Mutex<TimerFd>,
    fd: RawFd,
}

impl PitClock {
    pub fn new() -> Result<Self, VmError> {
        let timer = TimerFd::new().map_err(|e| VmError::EventFd(e.into()))?;
        let fd = timer.as_raw_fd();
        Ok(PitClock {
            timer: Mutex::new(timer),
            fd,
        })
    }

    /// Consume an expiry (the count is of no interest: the PIT
    /// coalesces missed ticks itself).
    pub fn clear(&self) {
        let _ = lock(&self.timer).wait();
    }
}

impl AsRawFd for PitClock {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl TimerClock for PitClock {
    fn now_ns(&self) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn arm(&self, deadline: Option<u64>) {
        let mut timer = lock(&self.timer);
        let r = match deadline {
            // A zero expiry would disarm: fire in 1 ns for a past deadline.
            Some(d) => {
                let wait = d.saturating_sub(self.now_ns()).max(1);
                timer.reset(Duration::from_nanos(wait), None)
            }
            None => timer.clear(),
        };
        if let Err(e) = r {
            log::warn!("pit: cannot set its timer: {e}");
        }
    }
}

/// Wakes vCPU 0 for the PIC's ExtINT; holds no kick while the vCPUs are
/// stopped.
#[derive(Default)]
pub struct ExtIntKick(Mutex<Option<Kick>>);

impl ExtIntKick {
    pub fn set(&self, kick: Option<Kick>) {
        *lock(&self.0) = kick;
    }
}

impl IntrKick for ExtIntKick {
    fn kick(&self) {
        if let Some(k) = *lock(&self.0) {
            k.kick();
        }
    }
}
