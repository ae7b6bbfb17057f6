//! 16550A UART on COM1, built on `vm_superio::Serial`.
//!
//! The VMM registers the device at port [`COM1_BASE`] with [`SERIAL_PORT_COUNT`]
//! ports and hands in an event fd that the VMM has registered as a KVM irqfd for
//! GSI [`COM1_GSI`]; every interrupt the UART raises is a write to that fd.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{fill_all_ones, Persist, RestoreError};

/// I/O port base of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports a 16550 decodes.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// Legacy ISA interrupt line of COM1.
pub const COM1_GSI: u32 = 4;

/// Where the guest's output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// `vm_superio::Trigger` over an event fd: triggering writes 1 to the fd, which
/// KVM turns into an edge on the irqfd's GSI.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// Returns a second handle on the same event fd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(EventFdTrigger)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<EventFdTrigger, NoEvents, SerialOut>;

/// Modem control register loopback bit, needed to tell when the UART refuses
/// host input.
const MCR_LOOP_BIT: u8 = 0x10;

/// A 16550A serial port.
pub struct SerialDevice {
    uart: Uart,
    /// Set after the first failed output write, so that a closed output does
    /// not flood the log with one message per guest byte.
    tx_error_logged: bool,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.uart.state())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Creates a UART in its reset state that raises interrupts through `irq`
    /// and writes the guest's output to `out`.
    ///
    /// `vm_superio::Serial` flushes `out` after every byte the guest
    /// transmits, so a line-buffered writer such as stdout shows output
    /// immediately.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        SerialDevice {
            uart: Serial::new(EventFdTrigger(irq), out),
            tx_error_logged: false,
        }
    }

    /// Queues host input (e.g. stdin) into the guest's RX FIFO and raises the
    /// receive interrupt if the guest enabled that interrupt.
    ///
    /// Returns how many bytes of `bytes` were taken; the rest does not fit
    /// (full FIFO) or is refused (loopback mode) and should be offered again
    /// once [`SerialDevice::fifo_has_room`] is true.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        // Count from the FIFO's fill level rather than the call's result: a
        // failed interrupt trigger reports an error after the bytes went in.
        let before = self.uart.fifo_capacity();
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(_) | Err(SerialError::FullFifo) => {}
            Err(e) => log::debug!("serial: enqueue input: {e:?}"),
        }
        before.saturating_sub(self.uart.fifo_capacity())
    }

    /// Tells whether [`SerialDevice::enqueue_input`] would take at least one
    /// byte now: the FIFO has room and the UART is not in loopback mode.
    pub fn fifo_has_room(&self) -> bool {
        self.fifo_capacity() > 0
    }

    /// Number of bytes [`SerialDevice::enqueue_input`] would take now.
    pub fn fifo_capacity(&self) -> usize {
        if self.in_loopback() {
            return 0;
        }
        self.uart.fifo_capacity()
    }

    /// The event fd that interrupts are written to.
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    fn in_loopback(&self) -> bool {
        // Read the MCR through the state snapshot: `Serial::read` needs
        // `&mut self`, and the MCR has no read side effects to preserve.
        self.uart.state().modem_control & MCR_LOOP_BIT != 0
    }

    fn handle_write(&mut self, offset: u8, value: u8) {
        match self.uart.write(offset, value) {
            Ok(()) => {}
            Err(SerialError::IOError(e)) => {
                if !self.tx_error_logged {
                    self.tx_error_logged = true;
                    log::debug!("serial: output write failed, dropping guest output: {e}");
                }
            }
            Err(e) => log::debug!("serial: write at offset {offset}: {e:?}"),
        }
    }
}

impl MutDevicePio for SerialDevice {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (data, offset) {
            ([byte], 0..=7) => *byte = self.uart.read(offset as u8),
            (data, _) => fill_all_ones(data),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let ([value], 0..=7) = (data, offset) {
            self.handle_write(offset as u8, *value);
        }
    }
}

/// Saved registers and RX FIFO of a [`SerialDevice`], mirroring
/// `vm_superio::SerialState` (which is not serde-serializable).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = (EventFd, SerialOut);
    type Error = RestoreError;

    fn save(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    /// Rebuilds the UART; re-raises a pending THR-empty or RX interrupt so
    /// that a guest waiting for one is not left hanging.
    fn restore(args: Self::Args, state: &SerialDeviceState) -> Result<Self, RestoreError> {
        let (irq, out) = args;
        let uart =
            Serial::from_state(&state.into(), EventFdTrigger(irq), NoEvents, out).map_err(|e| {
                RestoreError::Invalid {
                    device: "serial",
                    reason: format!("{e:?}"),
                }
            })?;
        Ok(SerialDevice {
            uart,
            tx_error_logged: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const DATA: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const SCR: u16 = 7;

    /// Output writer whose bytes and flushes the test can inspect.
    #[derive(Clone, Default)]
    struct SharedOut {
        bytes: Arc<Mutex<Vec<u8>>>,
        flushes: Arc<Mutex<u32>>,
    }

    impl SharedOut {
        fn bytes(&self) -> Vec<u8> {
            self.bytes.lock().expect("lock").clone()
        }
        fn flushes(&self) -> u32 {
            *self.flushes.lock().expect("lock")
        }
    }

    impl Write for SharedOut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.bytes.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            *self.flushes.lock().expect("lock") += 1;
            Ok(())
        }
    }

    /// Output writer that always fails, like a closed pipe.
    struct BrokenOut;

    impl Write for BrokenOut {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")
    }

    fn device() -> (SerialDevice, SharedOut) {
        let out = SharedOut::default();
        (SerialDevice::new(evt(), Box::new(out.clone())), out)
    }

    fn rd(dev: &mut SerialDevice, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        dev.pio_read(PioAddress(COM1_BASE), offset, &mut b);
        b[0]
    }

    fn wr(dev: &mut SerialDevice, offset: u16, value: u8) {
        dev.pio_write(PioAddress(COM1_BASE), offset, &[value]);
    }

    #[test]
    fn guest_output_is_written_and_flushed_per_byte() {
        let (mut dev, out) = device();
        for b in b"hi\n" {
            wr(&mut dev, DATA, *b);
        }
        assert_eq!(out.bytes(), b"hi\n");
        assert!(out.flushes() >= 3);
    }

    #[test]
    fn input_reaches_rx_fifo_and_raises_interrupt() {
        let (mut dev, _out) = device();
        // Enable the received-data interrupt.
        wr(&mut dev, IER, 0x01);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(dev.irq_evt().read().expect("interrupt raised"), 1);
        assert_eq!(rd(&mut dev, LSR) & 0x01, 0x01);
        assert_eq!(rd(&mut dev, DATA), b'a');
        assert_eq!(rd(&mut dev, DATA), b'b');
        assert_eq!(rd(&mut dev, LSR) & 0x01, 0x00);
    }

    #[test]
    fn enqueue_stops_at_full_fifo() {
        let (mut dev, _out) = device();
        let input = [b'x'; 100];
        let taken = dev.enqueue_input(&input);
        assert_eq!(taken, 64);
        assert!(!dev.fifo_has_room());
        assert_eq!(dev.enqueue_input(&input), 0);
        assert_eq!(dev.enqueue_input(&[]), 0);
        rd(&mut dev, DATA);
        assert!(dev.fifo_has_room());
        assert_eq!(dev.fifo_capacity(), 1);
        assert_eq!(dev.enqueue_input(&input), 1);
    }

    #[test]
    fn loopback_refuses_host_input() {
        let (mut dev, out) = device();
        wr(&mut dev, MCR, MCR_LOOP_BIT);
        assert!(!dev.fifo_has_room());
        assert_eq!(dev.enqueue_input(b"abc"), 0);
        // Transmitted bytes come back on the receive side, not the output.
        wr(&mut dev, DATA, b'z');
        assert_eq!(rd(&mut dev, DATA), b'z');
        assert!(out.bytes().is_empty());
        wr(&mut dev, MCR, 0x08);
        assert!(dev.fifo_has_room());
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let (mut dev, out) = device();
        for width in 0..=8usize {
            for offset in [0u16, 3, 7, 8, 0xffff] {
                let mut buf = vec![0u8; width];
                dev.pio_read(PioAddress(COM1_BASE), offset, &mut buf);
                if width != 1 || offset > 7 {
                    assert!(buf.iter().all(|b| *b == 0xff));
                }
                dev.pio_write(PioAddress(COM1_BASE), offset, &vec![b'q'; width]);
            }
        }
        // Only the 1-byte writes at offset 0 reached the output.
        assert_eq!(out.bytes(), b"q");
    }

    #[test]
    fn broken_output_is_not_fatal() {
        let mut dev = SerialDevice::new(evt(), Box::new(BrokenOut));
        wr(&mut dev, IER, 0x02);
        for _ in 0..3 {
            wr(&mut dev, DATA, b'x');
        }
        // The THR-empty interrupt still fires so the guest does not stall.
        assert!(dev.irq_evt().read().is_ok());
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut dev, out) = device();
        // 8N1 at 115200 baud with DLAB, then RX interrupt on and some input.
        wr(&mut dev, LCR, 0x80);
        wr(&mut dev, DATA, 0x01);
        wr(&mut dev, IER, 0x00);
        wr(&mut dev, LCR, 0x03);
        wr(&mut dev, MCR, 0x0b);
        wr(&mut dev, SCR, 0x5a);
        wr(&mut dev, IER, 0x01);
        assert_eq!(dev.enqueue_input(b"xyz"), 3);

        let state = dev.save();
        assert_eq!(state.in_buffer, b"xyz");
        assert_eq!(state.scratch, 0x5a);

        let restored_evt = evt();
        let mut restored = SerialDevice::restore(
            (
                restored_evt.try_clone().expect("clone"),
                Box::new(out.clone()),
            ),
            &state,
        )
        .expect("restore");
        assert_eq!(restored.save(), state);
        // The pending RX interrupt is re-raised on restore.
        assert_eq!(restored_evt.read().expect("interrupt re-raised"), 1);

        // Both devices now answer every register identically.
        for offset in [IER, IIR, IIR, LCR, MCR, LSR, SCR, DATA, DATA, DATA, LSR] {
            assert_eq!(rd(&mut dev, offset), rd(&mut restored, offset), "{offset}");
        }
        wr(&mut restored, LCR, 0x83);
        assert_eq!(rd(&mut restored, DATA), 0x01);
        assert_eq!(rd(&mut restored, IER), 0x00);
        wr(&mut restored, LCR, 0x03);
        wr(&mut restored, DATA, b'!');
        assert_eq!(out.bytes(), b"!");
    }

    #[test]
    fn restore_rejects_oversized_fifo() {
        let (dev, _out) = device();
        let mut state = dev.save();
        state.in_buffer = vec![0u8; 65];
        let res = SerialDevice::restore((evt(), Box::new(io::sink())), &state);
        assert!(matches!(res, Err(RestoreError::Invalid { .. })));
    }
}
