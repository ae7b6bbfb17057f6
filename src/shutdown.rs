//! The single shutdown path: every way a VM can end is an `ExitReason`
//! handed to `Shutdown::request()`; the first one wins and becomes the
//! process exit status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use devices::{VmRequest, VmRequests};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM ended.
#[derive(Clone, Debug, PartialEq)]
pub enum ExitReason {
    /// The guest wrote `value` to isa-debug-exit.
    DebugExit(u32),
    /// ACPI power-off.
    PowerOff,
    /// Reset request; kvmrun does not reboot (like QEMU's `--no-reboot`).
    Reset,
    /// Every vCPU halted with interrupts off: nothing can wake the guest.
    Halted,
    /// The guest crashed: triple fault, KVM internal error, failed entry or an
    /// exit kvmrun does not handle.
    Crash { vcpu: u32, what: String },
    /// `--timeout` expired.
    Timeout,
    /// A `quit` request on the control socket.
    Quit,
    /// kvmrun itself failed while the VM ran.
    Error(String),
}

/// Exit status for kvmrun's own errors and bad input.
pub const STATUS_ERROR: i32 = 2;
/// Exit status for a guest crash.
pub const STATUS_CRASH: i32 = 4;
/// Exit status when `--timeout` expires, as timeout(1) reports it.
pub const STATUS_TIMEOUT: i32 = 124;

impl ExitReason {
    /// The process exit status: isa-debug-exit follows QEMU's
    /// `(value << 1) | 1`, truncated to the 8 bits a status has.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::DebugExit(v) => (((*v as u64) << 1 | 1) & 0xff) as i32,
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Halted | ExitReason::Quit => 0,
            ExitReason::Crash { .. } => STATUS_CRASH,
            ExitReason::Timeout => STATUS_TIMEOUT,
            ExitReason::Error(_) => STATUS_ERROR,
        }
    }
}

pub struct Shutdown {
    reason: Mutex<Option<ExitReason>>,
    requested: AtomicBool,
    /// The guest entered ACPI S3; the main loop wakes it again.
    suspended: AtomicBool,
    /// A control request needs the vCPUs stopped and handed back.
    pause: AtomicBool,
    /// Wakes the main loop.
    evt: EventFd,
}

impl Shutdown {
    pub fn new() -> std::io::Result<Self> {
        Ok(Shutdown {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            suspended: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Record `reason` unless another one came first, and wake the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            log::debug!("shutdown: {reason:?}");
            *r = Some(reason);
            self.requested.store(true, Ordering::SeqCst);
            // A failed write can only mean the counter is saturated, which
            // already wakes the loop.
            let _ = self.evt.write(1);
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Record that the guest entered S3 and wake the main loop.
    pub fn suspend(&self) {
        self.suspended.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    /// Ask the vCPU threads to stop and hand their vCPUs back, without
    /// ending the VM, and wake the main loop.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// Clear a pause request once the vCPUs are stopped.
    pub fn clear_pause(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Whether vCPU threads must leave their run loop.
    pub fn must_stop(&self) -> bool {
        self.is_requested() || self.is_suspended() || self.pause.load(Ordering::SeqCst)
    }

    /// Clear the suspend state once the guest is woken.
    pub fn resume(&self) {
        self.suspended.store(false, Ordering::SeqCst);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.evt
    }
}

impl VmRequests for Shutdown {
    fn request(&self, req: VmRequest) {
        if req == VmRequest::Suspend {
            self.suspend();
            return;
        }
        Shutdown::request(
            self,
            match req {
                VmRequest::DebugExit(v) => ExitReason::DebugExit(v),
                VmRequest::Reset => ExitReason::Reset,
                VmRequest::PowerOff => ExitReason::PowerOff,
                VmRequest::Suspend => unreachable!("handled above"),
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_qemu_and_timeout() {
        assert_eq!(ExitReason::DebugExit(0).status(), 1);
        assert_eq!(ExitReason::DebugExit(1).status(), 3);
        assert_eq!(ExitReason::DebugExit(38).status(), 77);
        assert_eq!(ExitReason::DebugExit(63).status(), 127);
        assert_eq!(ExitReason::DebugExit(0x80).status(), 1);
        assert_eq!(ExitReason::PowerOff.status(), 0);
        assert_eq!(ExitReason::Timeout.status(), 124);
        assert_eq!(
            ExitReason::Crash {
                vcpu: 0,
                what: String::new()
            }
            .status(),
            4
        );
    }

    #[test]
    fn first_reason_wins() {
        let s = Shutdown::new().unwrap();
        assert!(!s.is_requested());
        s.request(ExitReason::DebugExit(3));
        VmRequests::request(&s, VmRequest::Reset);
        assert_eq!(s.reason(), Some(ExitReason::DebugExit(3)));
        assert_eq!(s.event().read().unwrap(), 1);
    }

    #[test]
    fn suspend_stops_vcpus_without_ending_the_vm() {
        let s = Shutdown::new().unwrap();
        VmRequests::request(&s, VmRequest::Suspend);
        assert!(s.must_stop() && s.is_suspended() && !s.is_requested());
        s.resume();
        assert!(!s.must_stop());
    }

    #[test]
    fn pause_stops_vcpus_without_ending_the_vm() {
        let s = Shutdown::new().unwrap();
        s.request_pause();
        assert!(s.must_stop() && !s.is_requested() && !s.is_suspended());
        assert_eq!(s.event().read().unwrap(), 1);
        s.clear_pause();
        assert!(!s.must_stop());
        assert_eq!(ExitReason::Quit.status(), 0);
    }
}
