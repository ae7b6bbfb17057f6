//! The least of an i8042 keyboard controller a guest needs: the CPU reset
//! line behind command 0xfe (`reboot=k`, kvm-unit-tests) and a status port
//! that never has data. The FADT does not announce an 8042, so Linux does
//! not probe it; a guest that probes anyway finds no keyboard or mouse.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::{fill_all_ones, Persist, RestoreError, VmRequest, VmRequests};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Command that pulses the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// Status register value: output buffer empty, input buffer empty.
const STATUS_IDLE: u8 = 0;

/// The i8042 controller stub.
pub struct I8042 {
    requests: Arc<dyn VmRequests>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Creates the controller; reset requests go to `requests`.
    pub fn new(requests: Arc<dyn VmRequests>) -> Self {
        I8042 { requests }
    }
}

/// Absolute port of an access; decoding on it serves both a registration per
/// port and a single range covering 0x60-0x64.
fn port(base: PioAddress, offset: PioAddressOffset) -> Option<u16> {
    base.0.checked_add(offset)
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (port(base, offset), data) {
            (Some(I8042_COMMAND_PORT), [byte]) => *byte = STATUS_IDLE,
            // No keyboard or mouse data ever.
            (Some(I8042_DATA_PORT), [byte]) => *byte = 0,
            (_, data) => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(I8042_COMMAND_PORT), [I8042_CMD_RESET_CPU]) = (port(base, offset), data) {
            self.requests.request(VmRequest::Reset);
        }
        // Other commands and data bytes are accepted and ignored.
    }
}

/// The i8042 stub keeps no state; the struct exists so a snapshot has a place
/// to grow into.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    type Args = Arc<dyn VmRequests>;
    type Error = RestoreError;

    fn save(&self) -> I8042State {
        I8042State {}
    }

    fn restore(args: Self::Args, _state: &I8042State) -> Result<Self, RestoreError> {
        Ok(I8042::new(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::RequestRecorder;

    const DATA: PioAddress = PioAddress(I8042_DATA_PORT);
    const CMD: PioAddress = PioAddress(I8042_COMMAND_PORT);

    fn device() -> (I8042, Arc<RequestRecorder>) {
        let rec = Arc::new(RequestRecorder::default());
        (I8042::new(rec.clone()), rec)
    }

    fn rd(dev: &mut I8042, base: PioAddress, offset: u16) -> u8 {
        let mut b = [0xaau8; 1];
        dev.pio_read(base, offset, &mut b);
        b[0]
    }

    #[test]
    fn status_and_data_read_zero() {
        let (mut dev, _) = device();
        assert_eq!(rd(&mut dev, CMD, 0), 0);
        assert_eq!(rd(&mut dev, DATA, 0), 0);
        // A single range over 0x60-0x64 decodes the same.
        assert_eq!(rd(&mut dev, DATA, 4), 0);
        assert_eq!(rd(&mut dev, DATA, 1), 0xff);
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut dev, rec) = device();
        dev.pio_write(CMD, 0, &[0xaa]);
        dev.pio_write(CMD, 0, &[0x60]);
        dev.pio_write(DATA, 0, &[0xfe]);
        assert!(rec.take().is_empty());
        dev.pio_write(CMD, 0, &[I8042_CMD_RESET_CPU]);
        assert_eq!(rec.take(), vec![VmRequest::Reset]);
        assert_eq!(rd(&mut dev, CMD, 0), 0);
    }

    #[test]
    fn odd_widths_and_ports_are_ignored() {
        let (mut dev, rec) = device();
        for base in [DATA, CMD, PioAddress(0xffff)] {
            for offset in [0u16, 1, 4, 0xffff] {
                for width in 0..=8usize {
                    let mut buf = vec![0u8; width];
                    dev.pio_read(base, offset, &mut buf);
                    if width != 1 {
                        assert!(buf.iter().all(|b| *b == 0xff));
                    }
                    if width != 1 {
                        dev.pio_write(base, offset, &vec![I8042_CMD_RESET_CPU; width]);
                    }
                }
            }
        }
        dev.pio_write(PioAddress(0x65), 0, &[I8042_CMD_RESET_CPU]);
        assert!(rec.take().is_empty());
    }

    #[test]
    fn save_restore_round_trip() {
        let (dev, _) = device();
        let state = dev.save();
        let rec = Arc::new(RequestRecorder::default());
        let mut restored = I8042::restore(rec.clone(), &state).expect("restore");
        assert_eq!(restored.save(), state);
        assert_eq!(rd(&mut restored, CMD, 0), 0);
        restored.pio_write(CMD, 0, &[I8042_CMD_RESET_CPU]);
        assert_eq!(rec.take(), vec![VmRequest::Reset]);
    }
}
