//! The `state` file: a fixed little-endian header, then the serialized
//! machine state.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "KVMRUNSS"
//!      8     2  format major (bumped on any incompatible change)
//!     10     2  format minor (compatible additions)
//!     12     2  length V of the kvmrun version string
//!     14     V  kvmrun version that wrote the file (UTF-8)
//!   14+V     8  length B of the body
//!   22+V     8  CRC-64/XZ of every byte before this field and of the body
//!   30+V     B  body: postcard-encoded `MachineState`
//! ```

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KVMRUNSS";
/// Bumped on any change an older kvmrun cannot read. 2: the state records
/// the memory file's id and digest, and the memory file has a trailer.
/// 3: devices are a map from name to a versioned state, so adding a
/// device no longer changes the format; fw_cfg keeps its items.
/// 4: the configuration names the irqchip, and KVM's PIC and IOAPIC
/// state is absent with the split one.
pub const FORMAT_MAJOR: u16 = 4;
/// Bumped on additions an older kvmrun of the same major can ignore.
pub const FORMAT_MINOR: u16 = 0;

/// Longest version string a header may carry; anything longer is damage.
const MAX_VERSION_LEN: usize = 256;

const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// What is wrong with a state file's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a kvmrun snapshot state file (bad magic)")]
    Magic,
    #[error("snapshot format {major}.{minor}, but this kvmrun (version {ours}) reads format {FORMAT_MAJOR}.x")]
    Version {
        major: u16,
        minor: u16,
        ours: &'static str,
    },
    #[error("truncated: {needed} bytes needed, {len} present")]
    Truncated { needed: u64, len: u64 },
    #[error("{extra} bytes after the end of the state")]
    Trailing { extra: u64 },
    #[error(
        "checksum mismatch (stored {stored:#018x}, computed {computed:#018x}): the file is damaged"
    )]
    Checksum { stored: u64, computed: u64 },
    #[error("version string is not valid")]
    VersionString,
}

/// The header fields a reader reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub writer: String,
}

/// The state file for `body`.
pub fn encode(body: &[u8]) -> Vec<u8> {
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let mut out = Vec::with_capacity(30 + version.len() + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    out.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let mut digest = CRC64.digest();
    digest.update(&out);
    digest.update(body);
    out.extend_from_slice(&digest.finalize().to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], FormatError> {
    let end = at.checked_add(n).filter(|&e| e <= bytes.len());
    match end {
        Some(end) => {
            let s = &bytes[*at..end];
            *at = end;
            Ok(s)
        }
        None => Err(FormatError::Truncated {
            needed: (*at as u64).saturating_add(n as u64),
            len: bytes.len() as u64,
        }),
    }
}

/// Check a state file's header, length and checksum, in that order, and
/// return the header and the body.
pub fn decode(bytes: &[u8]) -> Result<(Header, &[u8]), FormatError> {
    let mut at = 0;
    if take(bytes, &mut at, 8).map_err(|_| FormatError::Magic)? != MAGIC {
        return Err(FormatError::Magic);
    }
    let u16_at = |at: &mut usize| -> Result<u16, FormatError> {
        Ok(u16::from_le_bytes(
            take(bytes, at, 2)?.try_into().unwrap_or([0; 2]),
        ))
    };
    let major = u16_at(&mut at)?;
    let minor = u16_at(&mut at)?;
    if major != FORMAT_MAJOR {
        return Err(FormatError::Version {
            major,
            minor,
            ours: env!("CARGO_PKG_VERSION"),
        });
    }
    let vlen = u16_at(&mut at)? as usize;
    if vlen > MAX_VERSION_LEN {
        return Err(FormatError::VersionString);
    }
    let writer = take(bytes, &mut at, vlen)?;
    let blen = u64::from_le_bytes(take(bytes, &mut at, 8)?.try_into().unwrap_or([0; 8]));
    let covered = at;
    let stored = u64::from_le_bytes(take(bytes, &mut at, 8)?.try_into().unwrap_or([0; 8]));
    let body_len = usize::try_from(blen).map_err(|_| FormatError::Truncated {
        needed: blen,
        len: bytes.len() as u64,
    })?;
    let body = take(bytes, &mut at, body_len)?;
    if at != bytes.len() {
        return Err(FormatError::Trailing {
            extra: (bytes.len() - at) as u64,
        });
    }
    let mut digest = CRC64.digest();
    digest.update(&bytes[..covered]);
    digest.update(body);
    let computed = digest.finalize();
    if computed != stored {
        return Err(FormatError::Checksum { stored, computed });
    }
    let writer = std::str::from_utf8(writer)
        .map_err(|_| FormatError::VersionString)?
        .to_string();
    Ok((
        Header {
            major,
            minor,
            writer,
        },
        body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = encode(b"hello body");
        let (h, body) = decode(&f).unwrap();
        assert_eq!(body, b"hello body");
        assert_eq!((h.major, h.minor), (FORMAT_MAJOR, FORMAT_MINOR));
        assert_eq!(h.writer, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let f = encode(&[0x5a; 100]);
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x01;
            assert!(decode(&g).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn every_truncation_is_caught() {
        let f = encode(&[1, 2, 3, 4, 5]);
        for n in 0..f.len() {
            assert!(decode(&f[..n]).is_err(), "truncation to {n} went unnoticed");
        }
        let mut long = f.clone();
        long.push(0);
        assert!(matches!(
            decode(&long),
            Err(FormatError::Trailing { extra: 1 })
        ));
    }

    #[test]
    fn other_major_is_refused_and_minor_is_accepted() {
        let mut f = encode(b"x");
        f[8] = FORMAT_MAJOR as u8 + 1;
        assert!(matches!(decode(&f), Err(FormatError::Version { .. })));
        f[8] = FORMAT_MAJOR as u8 - 1;
        assert!(matches!(
            decode(&f),
            Err(FormatError::Version { major, .. }) if major == FORMAT_MAJOR - 1
        ));
        // A newer minor of the same major still reads, once its checksum
        // matches.
        let mut g = encode(b"x");
        g[10] += 1;
        let vlen = u16::from_le_bytes([g[12], g[13]]) as usize;
        let crc_at = 14 + vlen + 8;
        let mut d = CRC64.digest();
        d.update(&g[..crc_at]);
        d.update(&g[crc_at + 8..]);
        g[crc_at..crc_at + 8].copy_from_slice(&d.finalize().to_le_bytes());
        assert_eq!(decode(&g).unwrap().0.minor, FORMAT_MINOR + 1);
        assert!(matches!(decode(b"ELF\x7f...."), Err(FormatError::Magic)));
    }
}
