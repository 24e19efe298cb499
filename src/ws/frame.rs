//! Frame header decoding and encoding (RFC 6455 §5.2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! ```

use byteorder::{BigEndian, ByteOrder};

use super::mask::apply_mask;

/// Longest possible header: 2 fixed bytes, 8 length bytes, 4 mask bytes.
pub const MAX_HEADER_LEN: usize = 14;

/// The RSV1 bit in `FrameHeader::rsv`: permessage-deflate's "compressed".
pub const RSV1: u8 = 0b100;

/// Control frames carry at most this many payload bytes (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Control opcodes have the high bit of the opcode nibble set (§5.5).
    pub fn is_control(self) -> bool {
        self.bits() & 0x8 != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// RSV1..RSV3 in the low three bits.
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
}

/// A header that no reading of the RFC can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    ReservedOpcode(u8),
    /// §5.2: "the most significant bit MUST be 0" in the 64-bit length.
    LengthHighBitSet,
}

impl FrameHeader {
    /// Decodes a header from the start of `buf`. Returns `Ok(None)` without
    /// consuming anything when `buf` is too short to hold the whole header,
    /// so the caller can wait for more bytes.
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, HeaderError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let opcode_bits = b0 & 0x0F;
        let opcode =
            OpCode::from_bits(opcode_bits).ok_or(HeaderError::ReservedOpcode(opcode_bits))?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut len) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u64::from(BigEndian::read_u16(&buf[2..4])), 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let len = BigEndian::read_u64(&buf[2..10]);
                if len >> 63 != 0 {
                    return Err(HeaderError::LengthHighBitSet);
                }
                (len, 10)
            }
            short => (u64::from(short), 2),
        };
        let mask = if masked {
            if buf.len() < len + 4 {
                return Ok(None);
            }
            let key = [buf[len], buf[len + 1], buf[len + 2], buf[len + 3]];
            len += 4;
            Some(key)
        } else {
            None
        };
        let header = FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, len)))
    }

    /// Encodes the header into `out` using the shortest length form and
    /// returns how many bytes were written.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | ((self.rsv & 0x07) << 4) | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut len = match self.payload_len {
            n if n < 126 => {
                out[1] = mask_bit | n as u8;
                2
            }
            n if n <= u64::from(u16::MAX) => {
                out[1] = mask_bit | 126;
                BigEndian::write_u16(&mut out[2..4], n as u16);
                4
            }
            n => {
                out[1] = mask_bit | 127;
                BigEndian::write_u64(&mut out[2..10], n);
                10
            }
        };
        if let Some(key) = self.mask {
            out[len..len + 4].copy_from_slice(&key);
            len += 4;
        }
        len
    }
}

/// Appends one complete, unmasked (server-to-client) frame to `out`.
pub fn write_frame(out: &mut Vec<u8>, opcode: OpCode, fin: bool, payload: &[u8]) {
    let header = FrameHeader {
        fin,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut buf = [0u8; MAX_HEADER_LEN];
    let len = header.encode(&mut buf);
    out.reserve(len + payload.len());
    out.extend_from_slice(&buf[..len]);
    out.extend_from_slice(payload);
}

/// Appends one complete frame as a client sends it, masked with `key`
/// (§5.3: a fresh, unpredictable key for every frame).
pub fn write_client_frame(
    out: &mut Vec<u8>,
    opcode: OpCode,
    fin: bool,
    rsv: u8,
    payload: &[u8],
    key: [u8; 4],
) {
    let header = FrameHeader {
        fin,
        rsv,
        opcode,
        mask: Some(key),
        payload_len: payload.len() as u64,
    };
    let mut buf = [0u8; MAX_HEADER_LEN];
    let len = header.encode(&mut buf);
    out.reserve(len + payload.len());
    out.extend_from_slice(&buf[..len]);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

/// A complete server frame encoded once and shared by every recipient's
/// write queue: fan-out costs a reference count per recipient, not a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFrame(std::sync::Arc<[u8]>);

impl SharedFrame {
    pub fn text(text: &str) -> Self {
        Self::new(OpCode::Text, text.as_bytes())
    }

    pub fn binary(bytes: &[u8]) -> Self {
        Self::new(OpCode::Binary, bytes)
    }

    fn new(opcode: OpCode, payload: &[u8]) -> Self {
        let mut frame = Vec::with_capacity(server_header_len(payload.len()) + payload.len());
        write_frame(&mut frame, opcode, true, payload);
        Self(frame.into())
    }

    /// A message already compressed under permessage-deflate: RSV1 set
    /// (RFC 7692 §6).
    pub fn deflated(opcode: OpCode, compressed: &[u8]) -> Self {
        let header = FrameHeader {
            fin: true,
            rsv: RSV1,
            opcode,
            mask: None,
            payload_len: compressed.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut head);
        let mut frame = Vec::with_capacity(len + compressed.len());
        frame.extend_from_slice(&head[..len]);
        frame.extend_from_slice(compressed);
        Self(frame.into())
    }

    /// The frame's opcode (`None` only for bytes no constructor makes).
    pub fn opcode(&self) -> Option<OpCode> {
        OpCode::from_bits(self.0[0] & 0x0F)
    }

    /// The very same frame (a clone of it), not merely equal bytes.
    pub fn same_as(&self, other: &SharedFrame) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }

    /// The encoded frame, header included.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The payload, without the header.
    pub fn payload(&self) -> &[u8] {
        let header = match self.0[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        &self.0[header..]
    }

    pub fn share(&self) -> std::sync::Arc<[u8]> {
        self.0.clone()
    }
}

/// Length of the header `write_frame` emits for a payload of `len` bytes.
pub fn server_header_len(len: usize) -> usize {
    match len {
        n if n < 126 => 2,
        n if n <= usize::from(u16::MAX) => 4,
        _ => 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(header: FrameHeader) {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut buf);
        assert_eq!(FrameHeader::decode(&buf[..len]), Ok(Some((header, len))));
        for short in 0..len {
            assert_eq!(
                FrameHeader::decode(&buf[..short]),
                Ok(None),
                "prefix {short}"
            );
        }
    }

    #[test]
    fn roundtrips_all_three_length_encodings_masked_and_not() {
        for len in [0u64, 1, 125, 126, 127, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                roundtrip(FrameHeader {
                    fin: true,
                    rsv: 0,
                    opcode: OpCode::Binary,
                    mask,
                    payload_len: len,
                });
            }
        }
    }

    #[test]
    fn uses_minimal_length_form() {
        let mut buf = [0u8; MAX_HEADER_LEN];
        let header = |n| FrameHeader {
            fin: true,
            rsv: 0,
            opcode: OpCode::Text,
            mask: None,
            payload_len: n,
        };
        assert_eq!(header(125).encode(&mut buf), 2);
        assert_eq!(header(126).encode(&mut buf), 4);
        assert_eq!(header(65535).encode(&mut buf), 4);
        assert_eq!(header(65536).encode(&mut buf), 10);
        assert_eq!(server_header_len(125), 2);
        assert_eq!(server_header_len(126), 4);
        assert_eq!(server_header_len(65536), 10);
    }

    #[test]
    fn decodes_rfc_examples() {
        // §5.7: single-frame unmasked text "Hello".
        let (h, len) = FrameHeader::decode(&[0x81, 0x05, 0x48]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, len),
            (true, OpCode::Text, None, 5, 2)
        );
        // §5.7: masked ping.
        let (h, len) = FrameHeader::decode(&[0x89, 0x85, 0x37, 0xfa, 0x21, 0x3d])
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.opcode, h.mask, len),
            (OpCode::Ping, Some([0x37, 0xfa, 0x21, 0x3d]), 6)
        );
        // §5.7: 256 bytes binary in a single unmasked frame.
        let (h, len) = FrameHeader::decode(&[0x82, 0x7E, 0x01, 0x00])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, len), (256, 4));
    }

    #[test]
    fn reads_rsv_bits_and_rejects_reserved_opcodes_and_huge_lengths() {
        let (h, _) = FrameHeader::decode(&[0xF1, 0x80, 0, 0, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!(h.rsv, 0x07);
        for bits in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                FrameHeader::decode(&[0x80 | bits, 0x80]),
                Err(HeaderError::ReservedOpcode(bits))
            );
        }
        let huge = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            FrameHeader::decode(&huge),
            Err(HeaderError::LengthHighBitSet)
        );
    }

    #[test]
    fn shared_frames_are_complete_server_frames() {
        assert_eq!(SharedFrame::text("hi").bytes(), b"\x81\x02hi");
        let big = SharedFrame::binary(&[7; 300]);
        assert_eq!(&big.bytes()[..4], &[0x82, 126, 1, 44]);
        assert_eq!(big.bytes().len(), 304);
        assert_eq!(big.payload(), &[7; 300][..]);
        assert_eq!(SharedFrame::text("hi").payload(), b"hi");
        let deflated = SharedFrame::deflated(OpCode::Text, &[1, 2, 3]);
        assert_eq!(deflated.bytes(), &[0xC1, 3, 1, 2, 3]);
        assert_eq!(deflated.opcode(), Some(OpCode::Text));
        assert_eq!(deflated.payload(), &[1, 2, 3]);
        assert!(deflated.same_as(&deflated.clone()));
        assert!(!deflated.same_as(&SharedFrame::deflated(OpCode::Text, &[1, 2, 3])));
    }

    #[test]
    fn control_opcodes_are_the_high_ones() {
        assert!(
            OpCode::Close.is_control() && OpCode::Ping.is_control() && OpCode::Pong.is_control()
        );
        assert!(
            !OpCode::Text.is_control()
                && !OpCode::Binary.is_control()
                && !OpCode::Continuation.is_control()
        );
    }
}
