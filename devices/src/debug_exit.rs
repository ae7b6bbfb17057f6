//! QEMU's isa-debug-exit: a guest write ends the VM with a chosen status.
//!
//! Test guests (kvm-unit-tests, bare-metal test kernels) write a value `v` to
//! the port; the VMM exits with status `(v << 1) | 1`, so a guest can never
//! fake a plain exit 0.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, le_value, Persist, RestoreError, VmRequest, VmRequests};

/// QEMU's default isa-debug-exit `iobase`.
pub const DEBUG_EXIT_BASE: u16 = 0xf4;
/// QEMU's default isa-debug-exit `iosize`.
pub const DEBUG_EXIT_SIZE: u16 = 4;

/// The isa-debug-exit port.
pub struct DebugExit {
    requests: Arc<dyn VmRequests>,
}

impl DebugExit {
    /// Creates the device; exit requests go to `requests`.
    pub fn new(requests: Arc<dyn VmRequests>) -> Self {
        DebugExit { requests }
    }
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit").finish_non_exhaustive()
    }
}

impl MutDevicePio for DebugExit {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        fill_all_ones(data);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        // Accept the widths QEMU accepts (1 to 4 bytes), at any offset, as
        // QEMU ignores the offset too.
        if data.len() > 4 {
            return;
        }
        if let Some(value) = le_value(data) {
            self.requests.request(VmRequest::DebugExit(value as u32));
        }
    }
}

/// isa-debug-exit keeps no state; the struct exists so a snapshot has a
/// place to grow into.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct DebugExitState {}

impl Persist for DebugExit {
    type State = DebugExitState;
    type Args = Arc<dyn VmRequests>;
    type Error = RestoreError;

    fn save(&self) -> DebugExitState {
        DebugExitState {}
    }

    fn restore(args: Self::Args, _state: &DebugExitState) -> Result<Self, RestoreError> {
        Ok(DebugExit::new(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RequestRecorder;

    fn device() -> (DebugExit, Arc<RequestRecorder>) {
        let rec = Arc::new(RequestRecorder::default());
        (DebugExit::new(rec.clone()), rec)
    }

    const BASE: PioAddress = PioAddress(DEBUG_EXIT_BASE);

    #[test]
    fn writes_of_one_to_four_bytes_request_exit() {
        let (mut dev, rec) = device();
        dev.pio_write(BASE, 0, &[0x01]);
        dev.pio_write(BASE, 1, &[0x34, 0x12]);
        dev.pio_write(BASE, 0, &[0x01, 0x02, 0x03]);
        dev.pio_write(BASE, 3, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            rec.take(),
            vec![
                VmRequest::DebugExit(1),
                VmRequest::DebugExit(0x1234),
                VmRequest::DebugExit(0x03_0201),
                VmRequest::DebugExit(0xffff_ffff),
            ]
        );
    }

    #[test]
    fn other_widths_are_ignored_and_reads_are_all_ones() {
        let (mut dev, rec) = device();
        dev.pio_write(BASE, 0, &[]);
        dev.pio_write(BASE, 0, &[1u8; 5]);
        dev.pio_write(BASE, 0, &[1u8; 8]);
        dev.pio_write(BASE, 0, &[1u8; 9]);
        assert!(rec.take().is_empty());
        for width in 0..=8usize {
            let mut buf = vec![0u8; width];
            dev.pio_read(BASE, 0xffff, &mut buf);
            assert!(buf.iter().all(|b| *b == 0xff));
        }
        assert!(rec.take().is_empty());
    }

    #[test]
    fn save_restore_round_trip() {
        let (dev, _rec) = device();
        let state = dev.save();
        let rec = Arc::new(RequestRecorder::default());
        let mut restored = DebugExit::restore(rec.clone(), &state).expect("restore");
        assert_eq!(restored.save(), state);
        restored.pio_write(BASE, 0, &[0x10]);
        assert_eq!(rec.take(), vec![VmRequest::DebugExit(0x10)]);
    }
}
