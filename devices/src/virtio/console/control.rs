//! The control messages of a multiport console (virtio 1.2, "Console
//! Device", "Multiport Device Operation"): `struct
//! virtio_console_control` (le32 id, le16 event, le16 value), followed by
//! the name for PORT_NAME.

pub const DEVICE_READY: u16 = 0;
pub const DEVICE_ADD: u16 = 1;
pub const PORT_READY: u16 = 3;
pub const CONSOLE_PORT: u16 = 4;
pub const PORT_OPEN: u16 = 6;
pub const PORT_NAME: u16 = 7;

/// Bytes of the fixed part of a control message.
pub const HEADER_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub id: u32,
    pub event: u16,
    pub value: u16,
}

impl Control {
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        Control { id, event, value }
    }

    /// The message as the driver reads it, `extra` (a port's name) after
    /// the header.
    pub fn encode(&self, extra: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN + extra.len());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.event.to_le_bytes());
        b.extend_from_slice(&self.value.to_le_bytes());
        b.extend_from_slice(extra);
        b
    }

    /// A message from the driver; `None` if it is shorter than the header.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let h: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Control {
            id: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            event: u16::from_le_bytes([h[4], h[5]]),
            value: u16::from_le_bytes([h[6], h[7]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let c = Control::new(3, PORT_NAME, 1);
        let b = c.encode(b"kvmrun.stdout");
        assert_eq!(&b[..8], &[3, 0, 0, 0, 7, 0, 1, 0]);
        assert_eq!(&b[8..], b"kvmrun.stdout");
        assert_eq!(Control::decode(&b), Some(c));
        assert_eq!(Control::decode(&b[..7]), None);
    }
}
