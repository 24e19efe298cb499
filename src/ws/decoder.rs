//! Bytes in, WebSocket events out: frame parsing, unmasking, message
//! assembly and every receive-side rule of RFC 6455 §5-§8.
//!
//! The decoder owns no socket and no read buffer. The caller passes each
//! chunk it read; the decoder unmasks it in place, and when a whole
//! single-frame message is inside the chunk it is handed out as a borrow of
//! that chunk, with no copy. Only what straddles a chunk boundary is kept:
//! up to 14 header bytes inline, a control payload, or the message being
//! assembled (allocated on demand and released when delivered).
//!
//! Large messages need not pass through the caller's read buffer at all:
//! while a data frame's payload is arriving, [`Decoder::direct_space`]
//! lends the free room of the message buffer so the caller can read the
//! socket straight into it, and [`Decoder::take_message`] hands the
//! assembled buffer over (with room in front for a frame header) instead of
//! lending it, so an echo writes it back without copying.

use std::mem::MaybeUninit;

use super::close::{parse_close_payload, BadClose, CloseCode};
use super::frame::{FrameHeader, HeaderError, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, RSV1};
use super::mask::apply_mask;
use super::session::Role;
use super::utf8::{validate, Utf8Validator};

/// Bytes kept free in front of an assembled message, so that whoever takes
/// it over ([`Decoder::take_message`]) can write a frame header there.
pub const MESSAGE_HEADROOM: usize = MAX_HEADER_LEN;

/// An assembled message's buffer is grown at most this far ahead of the
/// bytes received, whatever length a frame header announces.
const RESERVE_AHEAD: u64 = 1 << 20;

/// Receive limits, checked against frame headers before any payload byte
/// is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_frame_size: u64,
    pub max_message_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_size: 16 << 20,
            max_message_size: 16 << 20,
        }
    }
}

/// One thing the peer said.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer's close frame, already validated: `None` if it carried no code.
    Close(Option<(CloseCode, &'a str)>),
    /// A whole message with RSV1 set under permessage-deflate: still
    /// compressed (without the flush tail), its UTF-8 not yet checked. It
    /// is assembled in the decoder's buffer or borrowed from `input` like
    /// any message; inflating it is the caller's (see `ws::deflate`).
    Compressed {
        is_text: bool,
        payload: &'a [u8],
    },
}

/// What [`Decoder::decode_streaming`] returns: an event, or the parts of a
/// streamed message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    Event(Event<'a>),
    /// A single-frame binary message of `len` bytes begins; its payload
    /// follows in [`Step::Chunk`]s.
    StreamStart {
        len: u64,
    },
    /// The next bytes of the streamed message, unmasked; `last` on the one
    /// that completes it.
    Chunk {
        payload: &'a [u8],
        last: bool,
    },
}

/// The peer broke the protocol: the connection must be failed with this
/// close code and reason (§7.1.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: CloseCode,
    pub reason: &'static str,
}

const fn violation(code: CloseCode, reason: &'static str) -> Violation {
    Violation { code, reason }
}

#[derive(Debug, Clone, Copy)]
struct FrameInProgress {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    /// Payload bytes already consumed, which is also the mask phase.
    done: u64,
    len: u64,
    /// Handed out piece by piece as it arrives instead of assembled (see
    /// [`Decoder::decode_streaming`]).
    streamed: bool,
    /// The first frame of a compressed message.
    compressed: bool,
}

impl FrameInProgress {
    fn remaining(&self) -> u64 {
        self.len - self.done
    }
}

#[derive(Debug)]
struct MessageInProgress {
    is_text: bool,
    /// Holds deflate data: UTF-8 is checked after inflating, not here.
    compressed: bool,
    /// `MESSAGE_HEADROOM` unused bytes, then the payload so far.
    buffer: Vec<u8>,
    utf8: Utf8Validator,
}

impl MessageInProgress {
    /// `expected`: the payload length the first frame announced.
    fn new(frame: &FrameInProgress) -> Self {
        let ahead = frame.len.min(RESERVE_AHEAD) as usize;
        let mut buffer = Vec::with_capacity(MESSAGE_HEADROOM + ahead);
        buffer.resize(MESSAGE_HEADROOM, 0);
        Self {
            is_text: frame.opcode == OpCode::Text,
            compressed: frame.compressed,
            buffer,
            utf8: Utf8Validator::new(),
        }
    }

    fn len(&self) -> usize {
        self.buffer.len() - MESSAGE_HEADROOM
    }

    fn payload(&self) -> &[u8] {
        &self.buffer[MESSAGE_HEADROOM..]
    }

    /// Text to validate as it arrives.
    fn checks_utf8(&self) -> bool {
        self.is_text && !self.compressed
    }
}

/// What the last returned event borrowed from `self`, released on the next
/// call so buffers never outlive the event that needed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivered {
    Nothing,
    Message,
    Control,
}

#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    /// The server role reads client frames, which must be masked; the
    /// client role reads server frames, which must not be (§5.1).
    expects_mask: bool,
    /// RSV bits an extension negotiated for this connection may set.
    allowed_rsv: u8,
    header_spill: [u8; MAX_HEADER_LEN],
    header_spill_len: u8,
    frame: Option<FrameInProgress>,
    message: Option<MessageInProgress>,
    control: Vec<u8>,
    delivered: Delivered,
}

impl Decoder {
    /// A decoder for a connection that negotiated permessage-deflate:
    /// RSV1 marks a compressed message (RFC 7692 §6).
    pub fn with_deflate(limits: Limits) -> Self {
        Self {
            allowed_rsv: RSV1,
            ..Self::new(limits)
        }
    }

    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            expects_mask: true,
            allowed_rsv: 0,
            header_spill: [0; MAX_HEADER_LEN],
            header_spill_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            delivered: Delivered::Nothing,
        }
    }

    /// A decoder for one side of a connection: `Role::Server` reads masked
    /// client frames, `Role::Client` unmasked server frames; `deflate`
    /// when permessage-deflate was agreed.
    pub fn for_role(role: Role, limits: Limits, deflate: bool) -> Self {
        let decoder = if deflate {
            Self::with_deflate(limits)
        } else {
            Self::new(limits)
        };
        Self {
            expects_mask: role == Role::Server,
            ..decoder
        }
    }

    /// True while a frame or a fragmented message is only partly received.
    /// False between messages (a message just delivered counts as done),
    /// when the decoder holds nothing a fresh one would not.
    pub fn is_mid_message(&self) -> bool {
        self.header_spill_len > 0
            || self.frame.is_some()
            || (self.message.is_some() && self.delivered != Delivered::Message)
    }

    /// Consumes bytes from the front of `input` (unmasking them in place)
    /// until one event is complete. Returns how many bytes were consumed and
    /// the event, or `None` once all of `input` has been absorbed into
    /// partial state. Call again with `&mut input[consumed..]` after
    /// handling an event.
    ///
    /// A `Text` or `Binary` event is either borrowed from `input`, where it
    /// is always the last bytes consumed (`input[consumed - len..consumed]`),
    /// or was assembled in the decoder's buffer; then
    /// [`Decoder::take_message`] can take it over.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a mut [u8],
    ) -> Result<(usize, Option<Event<'a>>), Violation> {
        match self.next_step(input, None)? {
            (used, Some(Step::Event(event))) => Ok((used, Some(event))),
            (used, None) => Ok((used, None)),
            (_, Some(step)) => unreachable!("nothing is streamed without a minimum: {step:?}"),
        }
    }

    /// Like [`Decoder::decode`], except that a single-frame binary message
    /// (FIN set, not a continuation) of at least `min_len` bytes is not
    /// assembled: its start, then its payload as it arrives, unmasked and
    /// piece by piece, come back as [`Step`]s, for a caller that forwards
    /// it at once (the echo endpoint streams large binary messages back).
    /// Every rule that applies to the frame is checked on its header, so a
    /// streamed frame can only end normally or be cut off.
    pub fn decode_streaming<'a>(
        &'a mut self,
        input: &'a mut [u8],
        min_len: u64,
    ) -> Result<(usize, Option<Step<'a>>), Violation> {
        self.next_step(input, Some(min_len.max(1)))
    }

    fn next_step<'a>(
        &'a mut self,
        input: &'a mut [u8],
        stream_min: Option<u64>,
    ) -> Result<(usize, Option<Step<'a>>), Violation> {
        self.release_delivered();
        if let Some((head, len, is_text, mask)) = self.whole_data_frame(input, stream_min) {
            // The common case in one step: a whole single-frame message.
            let end = head + len;
            apply_mask(&mut input[head..end], mask, 0);
            let payload = &input[head..end];
            let event = if is_text {
                Event::Text(validate(payload).map_err(|_| invalid_utf8())?)
            } else {
                Event::Binary(payload)
            };
            return Ok((end, Some(Step::Event(event))));
        }
        let mut pos = 0;
        loop {
            if self.frame.is_none() {
                let Some((header, used)) = self.next_header(&input[pos..])? else {
                    return Ok((input.len(), None));
                };
                pos += used;
                self.begin_frame(header)?;
                let streams = stream_min.is_some_and(|min| {
                    header.opcode == OpCode::Binary
                        && header.rsv == 0
                        && header.fin
                        && header.payload_len >= min
                        && self.message.is_none()
                });
                if streams {
                    if let Some(frame) = self.frame.as_mut() {
                        frame.streamed = true;
                    }
                    let len = header.payload_len;
                    return Ok((pos, Some(Step::StreamStart { len })));
                }
            }
            let frame = self
                .frame
                .expect("a frame is in progress after begin_frame");
            let available = (input.len() - pos) as u64;
            let take = frame.remaining().min(available) as usize;
            let chunk_start = pos;
            pos += take;
            apply_mask(
                &mut input[chunk_start..pos],
                frame.mask,
                frame.done as usize,
            );
            let done = FrameInProgress {
                done: frame.done + take as u64,
                ..frame
            };
            let complete = done.remaining() == 0;
            self.frame = if complete { None } else { Some(done) };

            if frame.streamed {
                if take == 0 {
                    return Ok((pos, None));
                }
                let payload = &input[chunk_start..pos];
                return Ok((
                    pos,
                    Some(Step::Chunk {
                        payload,
                        last: complete,
                    }),
                ));
            } else if frame.opcode.is_control() {
                if complete && self.control.is_empty() {
                    let event = control_event(frame.opcode, &input[chunk_start..pos])?;
                    return Ok((pos, Some(Step::Event(event))));
                }
                self.control.extend_from_slice(&input[chunk_start..pos]);
                if complete {
                    self.delivered = Delivered::Control;
                    let event = control_event(frame.opcode, &self.control)?;
                    return Ok((pos, Some(Step::Event(event))));
                }
            } else if complete && frame.fin && frame.done == 0 && self.message.is_none() {
                // Fast path: the whole message is one frame inside `input`.
                let payload = &input[chunk_start..pos];
                let event = match frame.opcode {
                    _ if frame.compressed => Event::Compressed {
                        is_text: frame.opcode == OpCode::Text,
                        payload,
                    },
                    OpCode::Binary => Event::Binary(payload),
                    _ => Event::Text(validate(payload).map_err(|_| invalid_utf8())?),
                };
                return Ok((pos, Some(Step::Event(event))));
            } else {
                // A single-frame message cut by the end of `input` is
                // assembled like a fragmented one.
                let message = self
                    .message
                    .get_or_insert_with(|| MessageInProgress::new(&frame));
                if message.checks_utf8() {
                    message
                        .utf8
                        .feed(&input[chunk_start..pos])
                        .map_err(|_| invalid_utf8())?;
                }
                message.buffer.extend_from_slice(&input[chunk_start..pos]);
                if complete && frame.fin {
                    return Ok((pos, Some(Step::Event(self.deliver_message()?))));
                }
            }
            if pos == input.len() {
                return Ok((pos, None));
            }
        }
    }

    /// When `input` starts with a whole, unfragmented text or binary frame
    /// that breaks no rule (masked, no RSV bits, within the limits, no
    /// message in progress) and is not to be streamed: its header length,
    /// payload length, whether it is text, and its mask. Anything else
    /// takes the general path, which applies every rule.
    #[inline]
    fn whole_data_frame(
        &self,
        input: &[u8],
        stream_min: Option<u64>,
    ) -> Option<(usize, usize, bool, [u8; 4])> {
        // The client role takes the general path: it is not a hot one.
        if self.frame.is_some()
            || self.header_spill_len != 0
            || self.message.is_some()
            || !self.expects_mask
        {
            return None;
        }
        let (&b0, &b1) = (input.first()?, input.get(1)?);
        // FIN, no RSV bits, text or binary; masked.
        let is_text = match b0 {
            0x81 => true,
            0x82 => false,
            _ => return None,
        };
        let (len, head) = match b1 {
            0x80..=0xFD => (usize::from(b1 & 0x7F), 6),
            0xFE => (
                usize::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
                8,
            ),
            _ => return None,
        };
        let fits = len as u64 <= self.limits.max_frame_size.min(self.limits.max_message_size);
        let streamed = !is_text && stream_min.is_some_and(|min| len as u64 >= min);
        if input.len() < head + len || !fits || streamed {
            return None;
        }
        let mask = [
            input[head - 4],
            input[head - 3],
            input[head - 2],
            input[head - 1],
        ];
        Some((head, len, is_text, mask))
    }

    /// While a data frame's payload is arriving and at least `min` of its
    /// bytes are still to come, the free room at the end of the message
    /// buffer (never more than the frame still needs), for the caller to
    /// read its socket straight into. Report what was read with
    /// [`Decoder::direct_filled`] before any other call on the decoder.
    pub fn direct_space(&mut self, min: usize) -> Option<&mut [MaybeUninit<u8>]> {
        self.release_delivered();
        let frame = self.frame?;
        let remaining = frame.remaining();
        if frame.opcode.is_control() || frame.streamed || remaining < min as u64 {
            return None;
        }
        let message = self
            .message
            .get_or_insert_with(|| MessageInProgress::new(&frame));
        let ahead = remaining.min(RESERVE_AHEAD.max(message.len() as u64)) as usize;
        message.buffer.reserve_exact(ahead);
        let room = message.buffer.spare_capacity_mut();
        let usable = room.len().min(remaining as usize);
        Some(&mut room[..usable])
    }

    /// Takes in `filled` bytes read into the room [`Decoder::direct_space`]
    /// returned: unmasks and validates them as `decode` would, and returns
    /// the message if they completed it.
    ///
    /// # Safety
    ///
    /// The first `filled` bytes of that room must have been initialized,
    /// and no other method may have been called since `direct_space`.
    pub unsafe fn direct_filled(&mut self, filled: usize) -> Result<Option<Event<'_>>, Violation> {
        let frame = self
            .frame
            .expect("direct_filled follows a direct_space that returned room");
        let message = self
            .message
            .as_mut()
            .expect("direct_space created the message");
        let start = message.buffer.len();
        assert!(
            filled as u64 <= frame.remaining() && filled <= message.buffer.capacity() - start,
            "more bytes filled than direct_space lent"
        );
        // SAFETY: within capacity (checked above) and initialized (the
        // caller's promise).
        unsafe { message.buffer.set_len(start + filled) };
        let checks_utf8 = message.checks_utf8();
        let chunk = &mut message.buffer[start..];
        apply_mask(chunk, frame.mask, frame.done as usize);
        if checks_utf8 {
            message.utf8.feed(chunk).map_err(|_| invalid_utf8())?;
        }
        let done = FrameInProgress {
            done: frame.done + filled as u64,
            ..frame
        };
        let complete = done.remaining() == 0;
        self.frame = if complete { None } else { Some(done) };
        if complete && frame.fin {
            return self.deliver_message().map(Some);
        }
        Ok(None)
    }

    /// Hands over the message the last `decode` or `direct_filled` returned
    /// if it was assembled in the decoder's buffer (it spanned reads or
    /// frames): the payload is `buffer[MESSAGE_HEADROOM..]`, the bytes in
    /// front are free for a frame header. `None` if that message was
    /// borrowed from the caller's input, or nothing was delivered.
    pub fn take_message(&mut self) -> Option<Vec<u8>> {
        if self.delivered != Delivered::Message {
            return None;
        }
        self.delivered = Delivered::Nothing;
        self.message.take().map(|message| message.buffer)
    }

    /// The assembled message is complete: final checks, then the event.
    fn deliver_message(&mut self) -> Result<Event<'_>, Violation> {
        self.delivered = Delivered::Message;
        let message = self.message.as_mut().expect("a message is assembled");
        if message.compressed {
            return Ok(Event::Compressed {
                is_text: message.is_text,
                payload: message.payload(),
            });
        }
        if !message.is_text {
            return Ok(Event::Binary(message.payload()));
        }
        message.utf8.finish().map_err(|_| invalid_utf8())?;
        let text = validate(message.payload()).map_err(|_| invalid_utf8())?;
        Ok(Event::Text(text))
    }

    fn release_delivered(&mut self) {
        match std::mem::replace(&mut self.delivered, Delivered::Nothing) {
            Delivered::Nothing => {}
            Delivered::Message => self.message = None,
            Delivered::Control => self.control = Vec::new(),
        }
    }

    /// Parses the next header, completing one that an earlier chunk cut.
    fn next_header(&mut self, input: &[u8]) -> Result<Option<(FrameHeader, usize)>, Violation> {
        let spilled = usize::from(self.header_spill_len);
        if spilled == 0 {
            if let Some(found) = FrameHeader::decode(input).map_err(header_violation)? {
                return Ok(Some(found));
            }
            self.header_spill[..input.len()].copy_from_slice(input);
            self.header_spill_len = input.len() as u8;
            return Ok(None);
        }
        let copied = (MAX_HEADER_LEN - spilled).min(input.len());
        self.header_spill[spilled..spilled + copied].copy_from_slice(&input[..copied]);
        match FrameHeader::decode(&self.header_spill[..spilled + copied])
            .map_err(header_violation)?
        {
            Some((header, len)) => {
                self.header_spill_len = 0;
                Ok(Some((header, len - spilled)))
            }
            None => {
                self.header_spill_len = (spilled + copied) as u8;
                Ok(None)
            }
        }
    }

    /// Applies every per-frame rule before a single payload byte is kept.
    fn begin_frame(&mut self, header: FrameHeader) -> Result<(), Violation> {
        // §5.2: "If a nonzero value is received and none of the negotiated
        // extensions defines the meaning of such a nonzero value, the
        // receiving endpoint MUST _Fail the WebSocket Connection_."
        if header.rsv & !self.allowed_rsv != 0 {
            return Err(violation(
                CloseCode::PROTOCOL_ERROR,
                "reserved bits set without a negotiated extension",
            ));
        }
        let compressed = header.rsv & RSV1 != 0;
        // RFC 7692 §6.1: only a message's first frame carries RSV1, and
        // control frames are never compressed.
        if compressed && header.opcode.is_control() {
            return Err(violation(
                CloseCode::PROTOCOL_ERROR,
                "control frames must not have RSV1 (compressed) set",
            ));
        }
        if compressed && header.opcode == OpCode::Continuation {
            return Err(violation(
                CloseCode::PROTOCOL_ERROR,
                "RSV1 (compressed) set on a continuation frame",
            ));
        }
        // §5.1: "The server MUST close the connection upon receiving a
        // frame that is not masked." and "A client MUST close a connection
        // if it detects a masked frame." An unmasked frame is read with a
        // zero key, which leaves it as it is.
        let mask = match (header.mask, self.expects_mask) {
            (Some(mask), true) => mask,
            (None, false) => [0; 4],
            (None, true) => {
                return Err(violation(
                    CloseCode::PROTOCOL_ERROR,
                    "client frames must be masked",
                ))
            }
            (Some(_), false) => {
                return Err(violation(
                    CloseCode::PROTOCOL_ERROR,
                    "server frames must not be masked",
                ))
            }
        };
        if header.opcode.is_control() {
            // §5.5: "All control frames MUST have a payload length of 125
            // bytes or less and MUST NOT be fragmented."
            if !header.fin {
                return Err(violation(
                    CloseCode::PROTOCOL_ERROR,
                    "control frames must not be fragmented",
                ));
            }
            if header.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(violation(
                    CloseCode::PROTOCOL_ERROR,
                    "control frame payload longer than 125 bytes",
                ));
            }
        } else {
            if header.payload_len > self.limits.max_frame_size {
                return Err(violation(
                    CloseCode::MESSAGE_TOO_BIG,
                    "frame exceeds the maximum frame size",
                ));
            }
            let so_far = self.message.as_ref().map_or(0, |m| m.len() as u64);
            if so_far + header.payload_len > self.limits.max_message_size {
                return Err(violation(
                    CloseCode::MESSAGE_TOO_BIG,
                    "message exceeds the maximum message size",
                ));
            }
            match (header.opcode, self.message.is_some()) {
                (OpCode::Continuation, false) => {
                    return Err(violation(
                        CloseCode::PROTOCOL_ERROR,
                        "continuation frame with no message to continue",
                    ));
                }
                (OpCode::Text | OpCode::Binary, true) => {
                    return Err(violation(
                        CloseCode::PROTOCOL_ERROR,
                        "new message started before the fragmented one ended",
                    ));
                }
                _ => {}
            }
        }
        let frame = FrameInProgress {
            fin: header.fin,
            opcode: header.opcode,
            mask,
            done: 0,
            len: header.payload_len,
            streamed: false,
            compressed,
        };
        if matches!(header.opcode, OpCode::Text | OpCode::Binary) && !header.fin {
            self.message = Some(MessageInProgress::new(&frame));
        }
        self.frame = Some(frame);
        Ok(())
    }
}

fn control_event(opcode: OpCode, payload: &[u8]) -> Result<Event<'_>, Violation> {
    Ok(match opcode {
        OpCode::Ping => Event::Ping(payload),
        OpCode::Pong => Event::Pong(payload),
        _ => Event::Close(parse_close_payload(payload).map_err(|bad| match bad {
            BadClose::Truncated => violation(
                CloseCode::PROTOCOL_ERROR,
                "close frame with a 1-byte payload",
            ),
            BadClose::Code(_) => violation(
                CloseCode::PROTOCOL_ERROR,
                "close frame with an invalid status code",
            ),
            BadClose::ReasonNotUtf8 => violation(
                CloseCode::INVALID_PAYLOAD,
                "close reason is not valid UTF-8",
            ),
        })?),
    })
}

fn header_violation(error: HeaderError) -> Violation {
    match error {
        HeaderError::ReservedOpcode(_) => violation(CloseCode::PROTOCOL_ERROR, "reserved opcode"),
        HeaderError::LengthHighBitSet => violation(
            CloseCode::PROTOCOL_ERROR,
            "64-bit payload length has its high bit set",
        ),
    }
}

fn invalid_utf8() -> Violation {
    violation(
        CloseCode::INVALID_PAYLOAD,
        "text message is not valid UTF-8",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::MAX_HEADER_LEN;

    const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// A client frame with explicit first byte (FIN, RSV, opcode).
    fn raw_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let opcode = OpCode::from_bits(b0 & 0x0F).unwrap_or(OpCode::Binary);
        let header = FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 7,
            opcode,
            mask: Some(KEY),
            payload_len: payload.len() as u64,
        };
        let mut buf = [0u8; MAX_HEADER_LEN];
        let len = header.encode(&mut buf);
        buf[0] = b0;
        let mut out = buf[..len].to_vec();
        let mut masked = payload.to_vec();
        apply_mask(&mut masked, KEY, 0);
        out.extend_from_slice(&masked);
        out
    }

    fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        raw_frame((u8::from(fin) << 7) | opcode.bits(), payload)
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
        Compressed(bool, Vec<u8>),
        Failed(u16),
    }

    fn owned(event: Event<'_>) -> Owned {
        match event {
            Event::Text(t) => Owned::Text(t.to_owned()),
            Event::Binary(b) => Owned::Binary(b.to_vec()),
            Event::Ping(b) => Owned::Ping(b.to_vec()),
            Event::Pong(b) => Owned::Pong(b.to_vec()),
            Event::Close(c) => Owned::Close(c.map(|(code, r)| (code.0, r.to_owned()))),
            Event::Compressed { is_text, payload } => Owned::Compressed(is_text, payload.to_vec()),
        }
    }

    /// Feeds `bytes` cut at `splits`, collecting events until a violation.
    fn run(limits: Limits, bytes: &[u8], splits: &[usize]) -> Vec<Owned> {
        run_with(Decoder::new(limits), bytes, splits)
    }

    fn run_with(mut decoder: Decoder, bytes: &[u8], splits: &[usize]) -> Vec<Owned> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&bytes.len())) {
            let mut chunk = bytes[start..end].to_vec();
            start = end;
            let mut pos = 0;
            loop {
                match decoder.decode(&mut chunk[pos..]) {
                    Err(v) => {
                        out.push(Owned::Failed(v.code.0));
                        return out;
                    }
                    Ok((used, event)) => {
                        let Some(event) = event else { break };
                        out.push(owned(event));
                        pos += used;
                    }
                }
            }
        }
        out
    }

    fn all_splits_agree(bytes: &[u8], expected: &[Owned]) {
        assert_eq!(run(Limits::default(), bytes, &[]), expected, "whole input");
        for a in 0..=bytes.len() {
            assert_eq!(
                run(Limits::default(), bytes, &[a]),
                expected,
                "split at {a}"
            );
        }
        // Every byte in its own read.
        let singles: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(
            run(Limits::default(), bytes, &singles),
            expected,
            "byte by byte"
        );
    }

    #[test]
    fn single_frames_of_every_kind_parse_the_same_at_every_split() {
        let mut input = frame(OpCode::Text, true, "héllo".as_bytes());
        input.extend(frame(OpCode::Binary, true, &[0, 1, 2, 255]));
        input.extend(frame(OpCode::Ping, true, b"p"));
        input.extend(frame(OpCode::Pong, true, b""));
        input.extend(frame(OpCode::Text, true, b""));
        input.extend(frame(OpCode::Close, true, b"\x03\xe8bye"));
        all_splits_agree(
            &input,
            &[
                Owned::Text("héllo".into()),
                Owned::Binary(vec![0, 1, 2, 255]),
                Owned::Ping(b"p".to_vec()),
                Owned::Pong(vec![]),
                Owned::Text(String::new()),
                Owned::Close(Some((1000, "bye".into()))),
            ],
        );
    }

    #[test]
    fn all_three_length_encodings() {
        for len in [0usize, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let input = frame(OpCode::Binary, true, &payload);
            assert_eq!(
                run(Limits::default(), &input, &[]),
                vec![Owned::Binary(payload.clone())]
            );
            let n = input.len();
            assert_eq!(
                run(
                    Limits::default(),
                    &input,
                    &[(len / 2 + 3).min(7).min(n), (len / 2 + 3).min(n)]
                ),
                vec![Owned::Binary(payload)]
            );
        }
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frame() {
        let mut input = frame(OpCode::Text, false, b"fra");
        input.extend(frame(OpCode::Ping, true, b"x"));
        input.extend(frame(OpCode::Continuation, false, "gm€".as_bytes()));
        input.extend(frame(OpCode::Continuation, true, b"nt"));
        all_splits_agree(
            &input,
            &[Owned::Ping(b"x".to_vec()), Owned::Text("fragm€nt".into())],
        );
    }

    #[test]
    fn protocol_rules_fail_with_1002() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", vec![0x81, 0x00]),
            ("rsv1", raw_frame(0xC1, b"")),
            ("rsv3", raw_frame(0x91, b"")),
            ("reserved opcode 3", raw_frame(0x83, b"")),
            ("reserved opcode B", raw_frame(0x8B, b"")),
            ("fragmented ping", frame(OpCode::Ping, false, b"")),
            ("ping of 126 bytes", frame(OpCode::Ping, true, &[0; 126])),
            ("lone continuation", frame(OpCode::Continuation, true, b"x")),
            (
                "text inside fragmented message",
                [
                    frame(OpCode::Text, false, b"a"),
                    frame(OpCode::Text, true, b"b"),
                ]
                .concat(),
            ),
            ("close with 1 byte", frame(OpCode::Close, true, b"\x03")),
            ("close code 1005", frame(OpCode::Close, true, b"\x03\xed")),
            ("close code 999", frame(OpCode::Close, true, b"\x03\xe7")),
        ];
        for (name, bytes) in cases {
            assert_eq!(
                run(Limits::default(), &bytes, &[]).last(),
                Some(&Owned::Failed(1002)),
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_utf8_fails_fast_with_1007() {
        assert_eq!(
            run(Limits::default(), &frame(OpCode::Text, true, b"\xff"), &[]),
            vec![Owned::Failed(1007)]
        );
        assert_eq!(
            run(
                Limits::default(),
                &frame(OpCode::Close, true, b"\x03\xe8\xff"),
                &[]
            ),
            vec![Owned::Failed(1007)]
        );
        // The bad byte arrives in the first read of a frame whose tail never
        // comes: the decoder must fail without waiting for the rest.
        let bytes = frame(
            OpCode::Text,
            true,
            b"ok\xf4\x90 and a long tail that never arrives",
        );
        let mut decoder = Decoder::new(Limits::default());
        let mut head = bytes[..MAX_HEADER_LEN - 8 + 4].to_vec(); // 2 header + 4 mask + 4 payload bytes
        let result = decoder.decode(&mut head);
        assert_eq!(
            result.map(|_| ()).unwrap_err().code,
            CloseCode::INVALID_PAYLOAD
        );
        // Same across fragments: the first fragment already holds the bad byte.
        let mut first = frame(OpCode::Text, false, b"\xce\xba\xed\xa0\x80");
        let mut decoder = Decoder::new(Limits::default());
        assert_eq!(
            decoder.decode(&mut first).map(|_| ()).unwrap_err().code,
            CloseCode::INVALID_PAYLOAD
        );
        // A message that ends mid code point.
        let ends_short = [
            frame(OpCode::Text, false, b"a\xe2"),
            frame(OpCode::Continuation, true, b"\x82"),
        ]
        .concat();
        assert_eq!(
            run(Limits::default(), &ends_short, &[]),
            vec![Owned::Failed(1007)]
        );
    }

    #[test]
    fn size_limits_fail_with_1009_before_the_payload_arrives() {
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 150,
        };
        // Only the header of a 101-byte frame: rejected from the header alone.
        let big = frame(OpCode::Binary, true, &[0; 101]);
        let mut decoder = Decoder::new(limits);
        let mut header_only = big[..8].to_vec();
        assert_eq!(
            decoder
                .decode(&mut header_only)
                .map(|_| ())
                .unwrap_err()
                .code,
            CloseCode::MESSAGE_TOO_BIG
        );
        // Two fragments of 100 are each fine but add up to more than 150.
        let two = [
            frame(OpCode::Binary, false, &[0; 100]),
            frame(OpCode::Continuation, true, &[0; 100]),
        ]
        .concat();
        assert_eq!(run(limits, &two, &[]), vec![Owned::Failed(1009)]);
        // Exactly at the limits is fine.
        let fits = [
            frame(OpCode::Binary, false, &[7; 100]),
            frame(OpCode::Continuation, true, &[7; 50]),
        ]
        .concat();
        assert_eq!(run(limits, &fits, &[]), vec![Owned::Binary(vec![7; 150])]);
    }

    #[test]
    fn rsv1_marks_compressed_messages_once_deflate_is_negotiated() {
        // Without the extension RSV1 fails the connection.
        assert_eq!(
            run(Limits::default(), &raw_frame(0xC1, b"z"), &[]),
            vec![Owned::Failed(1002)]
        );
        let with_deflate = |bytes: &[u8], splits: &[usize]| {
            run_with(Decoder::with_deflate(Limits::default()), bytes, splits)
        };
        // Whole, cut anywhere, fragmented with a ping in between: the
        // compressed bytes come out unvalidated, with the message type.
        let single = raw_frame(0xC1, b"\xff\xfe");
        for cut in 0..=single.len() {
            assert_eq!(
                with_deflate(&single, &[cut]),
                vec![Owned::Compressed(true, b"\xff\xfe".to_vec())]
            );
        }
        let mut fragmented = raw_frame(0x42, b"ab");
        fragmented.extend(frame(OpCode::Ping, true, b"p"));
        fragmented.extend(frame(OpCode::Continuation, true, b"cd"));
        assert_eq!(
            with_deflate(&fragmented, &[3]),
            vec![
                Owned::Ping(b"p".to_vec()),
                Owned::Compressed(false, b"abcd".to_vec())
            ]
        );
        // Uncompressed messages still go through every check.
        assert_eq!(
            with_deflate(&frame(OpCode::Text, true, b"\xff"), &[]),
            vec![Owned::Failed(1007)]
        );
        // RFC 7692 §6.1: RSV1 on a continuation or a control frame fails.
        let mut continuation = raw_frame(0x01, b"a");
        continuation.extend(raw_frame(0xC0, b"b"));
        assert_eq!(with_deflate(&continuation, &[]), vec![Owned::Failed(1002)]);
        assert_eq!(
            with_deflate(&raw_frame(0xC9, b""), &[]),
            vec![Owned::Failed(1002)]
        );
        // RSV2 and RSV3 stay reserved.
        assert_eq!(
            with_deflate(&raw_frame(0xA1, b""), &[]),
            vec![Owned::Failed(1002)]
        );
    }

    #[test]
    fn compressed_frames_are_never_streamed() {
        let mut decoder = Decoder::with_deflate(Limits::default());
        let mut bytes = raw_frame(0xC2, &[7; 300]);
        let total = bytes.len();
        let (used, step) = decoder.decode_streaming(&mut bytes, 100).unwrap();
        assert_eq!(used, total);
        assert!(matches!(
            step,
            Some(Step::Event(Event::Compressed { is_text: false, payload })) if payload.len() == 300
        ));
    }

    /// Reads `stream` into the decoder the way the server does: through
    /// `decode` while no frame wants direct reads, else straight into the
    /// message buffer, at most `per_read` bytes per read.
    fn run_direct(stream: &[u8], per_read: usize, min: usize) -> (Vec<Owned>, Vec<Vec<u8>>) {
        let mut decoder = Decoder::new(Limits::default());
        let (mut events, mut taken) = (Vec::new(), Vec::new());
        let mut pos = 0;
        while pos < stream.len() {
            if let Some(room) = decoder.direct_space(min) {
                let n = room.len().min(per_read).min(stream.len() - pos);
                for (slot, byte) in room.iter_mut().zip(&stream[pos..pos + n]) {
                    slot.write(*byte);
                }
                pos += n;
                // SAFETY: the first n bytes were just written.
                match unsafe { decoder.direct_filled(n) } {
                    Err(v) => {
                        events.push(Owned::Failed(v.code.0));
                        return (events, taken);
                    }
                    Ok(None) => {}
                    Ok(Some(Event::Binary(b))) => events.push(Owned::Binary(b.to_vec())),
                    Ok(Some(Event::Text(t))) => events.push(Owned::Text(t.to_owned())),
                    Ok(Some(other)) => panic!("direct reads only complete messages: {other:?}"),
                }
                taken.extend(decoder.take_message());
                continue;
            }
            let end = (pos + per_read).min(stream.len());
            let mut chunk = stream[pos..end].to_vec();
            pos = end;
            let mut at = 0;
            loop {
                match decoder.decode(&mut chunk[at..]) {
                    Err(v) => {
                        events.push(Owned::Failed(v.code.0));
                        return (events, taken);
                    }
                    Ok((_, None)) => break,
                    Ok((used, Some(event))) => {
                        events.push(match event {
                            Event::Text(t) => Owned::Text(t.to_owned()),
                            Event::Binary(b) => Owned::Binary(b.to_vec()),
                            Event::Ping(b) => Owned::Ping(b.to_vec()),
                            other => panic!("unexpected {other:?}"),
                        });
                        at += used;
                        taken.extend(decoder.take_message());
                    }
                }
            }
        }
        (events, taken)
    }

    #[test]
    fn large_frames_can_be_read_straight_into_the_message_buffer() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let text = "ünïcödé ".repeat(20_000);
        let mut stream = frame(OpCode::Binary, true, &big);
        stream.extend(frame(OpCode::Ping, true, b"p"));
        stream.extend(frame(OpCode::Text, true, text.as_bytes()));
        stream.extend(frame(OpCode::Binary, false, &big[..100_000]));
        stream.extend(frame(OpCode::Continuation, true, &big[100_000..]));
        stream.extend(frame(OpCode::Text, true, b"small"));
        let expected = vec![
            Owned::Binary(big.clone()),
            Owned::Ping(b"p".to_vec()),
            Owned::Text(text.clone()),
            Owned::Binary(big.clone()),
            Owned::Text("small".into()),
        ];
        for per_read in [1000, 65_536, 99_999, 1 << 20] {
            let (events, taken) = run_direct(&stream, per_read, 1);
            assert_eq!(events, expected, "{per_read} bytes per read");
            // Messages that span reads are assembled and handed over, with
            // their headroom; the rest are borrowed from the read.
            let payloads: Vec<&[u8]> = taken.iter().map(|b| &b[MESSAGE_HEADROOM..]).collect();
            if per_read < 100_000 {
                assert!(payloads.contains(&&big[..]) && payloads.contains(&text.as_bytes()));
            }
        }
        // Only frames with at least `min` bytes to come are read directly.
        let (events, _) = run_direct(&stream, 65_536, 400_000);
        assert_eq!(events, expected);
    }

    #[test]
    fn direct_reads_validate_text_as_it_arrives() {
        let mut payload = vec![b'a'; 100_000];
        payload[50_000] = 0xFF;
        let stream = frame(OpCode::Text, true, &payload);
        let (events, _) = run_direct(&stream[..60_000], 1000, 1);
        assert_eq!(
            events,
            vec![Owned::Failed(1007)],
            "fails before the frame ends"
        );
    }

    #[test]
    fn direct_space_only_inside_a_data_frame() {
        let mut decoder = Decoder::new(Limits::default());
        assert!(decoder.direct_space(0).is_none(), "no frame yet");
        let ping = frame(OpCode::Ping, true, &[1; 100]);
        let mut head = ping[..10].to_vec();
        assert_eq!(decoder.decode(&mut head).unwrap(), (10, None));
        assert!(
            decoder.direct_space(0).is_none(),
            "control payloads are small"
        );
        let mut rest = ping[10..].to_vec();
        assert!(decoder.decode(&mut rest).unwrap().1.is_some());
        let data = frame(OpCode::Binary, true, &[2; 1000]);
        let mut head = data[..8].to_vec();
        decoder.decode(&mut head).unwrap();
        assert!(
            decoder.direct_space(1001).is_none(),
            "fewer bytes to come than asked"
        );
        assert_eq!(
            decoder.direct_space(1000).map(|room| room.len()),
            Some(1000)
        );
    }

    #[test]
    fn borrowed_messages_are_the_last_bytes_consumed() {
        let mut input = frame(OpCode::Text, true, b"first");
        input.extend(frame(OpCode::Binary, true, &[7; 300]));
        let copy = input.clone();
        let mut decoder = Decoder::new(Limits::default());
        let mut pos = 0;
        while pos < input.len() {
            let (used, event) = decoder.decode(&mut input[pos..]).unwrap();
            let len = match event.unwrap() {
                Event::Text(t) => t.len(),
                Event::Binary(b) => b.len(),
                other => panic!("{other:?}"),
            };
            pos += used;
            assert!(decoder.take_message().is_none(), "borrowed, not assembled");
            // Unmasked in place where the masked bytes were.
            let mut masked = copy[pos - len..pos].to_vec();
            apply_mask(&mut masked, KEY, 0);
            assert_eq!(&input[pos - len..pos], &masked[..]);
        }
    }

    /// Feeds `bytes` cut at `splits` through `decode_streaming`, joining
    /// streamed chunks back into messages (and checking their order).
    fn run_streaming(bytes: &[u8], splits: &[usize], min_len: u64) -> (Vec<Owned>, usize) {
        let mut decoder = Decoder::new(Limits::default());
        let (mut out, mut streamed) = (Vec::new(), 0);
        let mut open: Option<(u64, Vec<u8>)> = None;
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&bytes.len())) {
            let mut chunk = bytes[start..end].to_vec();
            start = end;
            let mut pos = 0;
            while pos < chunk.len() {
                let (used, step) = match decoder.decode_streaming(&mut chunk[pos..], min_len) {
                    Ok(decoded) => decoded,
                    Err(v) => {
                        out.push(Owned::Failed(v.code.0));
                        return (out, streamed);
                    }
                };
                pos += used;
                match step {
                    None => break,
                    Some(Step::StreamStart { len }) => {
                        assert!(open.is_none(), "a stream starts only between messages");
                        assert!(len >= min_len);
                        open = Some((len, Vec::new()));
                    }
                    Some(Step::Chunk { payload, last }) => {
                        let (len, mut got) = open.take().expect("chunks follow a start");
                        assert!(!payload.is_empty());
                        got.extend_from_slice(payload);
                        assert_eq!(last, got.len() as u64 == len);
                        if last {
                            streamed += 1;
                            out.push(Owned::Binary(got));
                        } else {
                            open = Some((len, got));
                        }
                    }
                    Some(Step::Event(event)) => {
                        assert!(open.is_none(), "no event inside a streamed frame");
                        out.push(owned(event));
                    }
                }
            }
        }
        (out, streamed)
    }

    #[test]
    fn large_single_frame_binary_messages_can_be_streamed() {
        let big: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let mut input = frame(OpCode::Binary, true, &big);
        input.extend(frame(OpCode::Ping, true, b"p"));
        input.extend(frame(OpCode::Text, true, &[b'x'; 2000]));
        input.extend(frame(OpCode::Binary, true, &big[..999]));
        input.extend(frame(OpCode::Binary, false, &big[..1500]));
        input.extend(frame(OpCode::Continuation, true, &big[1500..]));
        input.extend(frame(OpCode::Binary, true, &big[..1000]));
        let expected = run(Limits::default(), &input, &[]);
        assert_eq!(expected.len(), 6);
        // Streamed: the two single-frame binaries of 1000 bytes or more only.
        for splits in [
            vec![],
            vec![1],
            vec![5, 2000, 2003, 4000],
            (1..input.len()).step_by(97).collect(),
        ] {
            assert_eq!(
                run_streaming(&input, &splits, 1000),
                (expected.clone(), 2),
                "{splits:?}"
            );
        }
        // Byte by byte, too.
        let singles: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run_streaming(&input, &singles, 1000), (expected.clone(), 2));
        // Limits are checked on the header, before anything is streamed.
        let limits = Limits {
            max_frame_size: 100,
            max_message_size: 100,
        };
        let mut decoder = Decoder::new(limits);
        let mut big_frame = frame(OpCode::Binary, true, &big);
        assert_eq!(
            decoder
                .decode_streaming(&mut big_frame, 10)
                .unwrap_err()
                .code,
            CloseCode::MESSAGE_TOO_BIG
        );
    }

    #[test]
    fn releases_buffers_after_delivery() {
        let mut decoder = Decoder::new(Limits::default());
        let bytes = frame(OpCode::Binary, true, &[1; 1000]);
        let (mut a, mut b) = (bytes[..500].to_vec(), bytes[500..].to_vec());
        assert_eq!(decoder.decode(&mut a).unwrap(), (500, None));
        assert!(decoder.is_mid_message());
        assert!(
            matches!(decoder.decode(&mut b).unwrap().1, Some(Event::Binary(p)) if p.len() == 1000)
        );
        let mut empty = Vec::new();
        assert_eq!(decoder.decode(&mut empty).unwrap(), (0, None));
        assert!(!decoder.is_mid_message());
        assert!(decoder.message.is_none() && decoder.control.capacity() == 0);
    }
}
