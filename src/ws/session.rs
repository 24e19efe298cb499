//! One WebSocket connection after its opening handshake, as a state
//! machine with no I/O and no clock of its own (in the manner of
//! quinn-proto's `Connection`): received bytes and the current time go in,
//! received messages come out, and the control frames the protocol itself
//! sends go to a [`Host`].
//!
//! Every per-connection rule of RFC 6455 beyond frame syntax lives here:
//! - the closing handshake (§5.5.1, §7): a close frame is answered once,
//!   data that arrives after our close is read and dropped, nothing is
//!   decoded after the peer's close, and the whole handshake, whoever began
//!   it, must be over by one deadline (`close_timeout`);
//! - failing the connection on a violation (§7.1.7): a close frame with the
//!   violation's code, then the peer's input is ignored;
//! - pings (`ping_interval`), and the idle limit (`idle_timeout`: nothing
//!   heard, not even a pong), both of which stop counting once closing;
//! - the receive side of permessage-deflate (inflating through the host's
//!   zlib state, then the UTF-8 check the decoder could not make);
//! - messages received whole or, for a caller that forwards them as they
//!   arrive, streamed ([`ReceiveMode`]).
//!
//! It serves both roles ([`Role`]): a server reads masked frames, a client
//! unmasked ones. Sending data messages is the caller's (a server shares
//! one encoded frame among many queues; a client masks each frame, see
//! [`super::frame::write_client_frame`]); the session says whether data
//! may still be sent ([`Session::can_send`]).
//!
//! An idle session is small (24 bytes): no buffers between messages, one
//! deadline whose meaning follows the close state, and a decoder only while
//! a frame or message is partly received.

use std::mem::MaybeUninit;
use std::time::Duration;

use super::close::close_payload;
use super::close_handshake::CloseState;
use super::decoder::{Decoder, Event, Limits, Step, Violation};
use super::deflate::{check_inflated_text, InflateError};
use super::extensions::DeflateParams;
use super::frame::OpCode;
use super::tick::Tick;
use super::CloseCode;

/// Which end of the connection a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Reads masked client frames.
    Server,
    /// Reads unmasked server frames; masks what it sends.
    Client,
}

/// The limits and timeouts every session of an endpoint shares (kept once
/// by the caller, not per connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    pub limits: Limits,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub close_timeout: Duration,
}

/// How data messages are handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    /// Every message whole.
    Whole,
    /// A single-frame binary message of at least `min_len` bytes comes out
    /// as it arrives: [`Received::StreamStart`], then
    /// [`Received::StreamChunk`]s. Everything else whole.
    Stream { min_len: u64 },
}

/// What a session needs from whoever drives it.
pub trait Host {
    /// Queues a control frame the session sends by itself: a pong, a ping,
    /// or a close. A client's host masks it.
    fn send_control(&mut self, opcode: OpCode, payload: &[u8]);

    /// Inflates one whole compressed message (RFC 7692 §7.2.2) with this
    /// connection's context into a buffer with `MESSAGE_HEADROOM` bytes in
    /// front of at most `limit` bytes of payload.
    fn inflate(
        &mut self,
        params: DeflateParams,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError>;
}

/// A received message's bytes: borrowed from the caller's input when the
/// whole message was inside it, else a buffer of its own (assembled or
/// inflated) whose payload starts after `MESSAGE_HEADROOM` free bytes, so
/// that it can go back out with a header written in front, uncopied.
#[derive(Debug)]
pub enum Payload<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

/// A whole text or binary message. Text is valid UTF-8: a message is only
/// built after that was checked.
#[derive(Debug)]
pub struct Incoming<'a> {
    is_text: bool,
    payload: Payload<'a>,
}

impl<'a> Incoming<'a> {
    pub fn is_text(&self) -> bool {
        self.is_text
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.payload {
            Payload::Borrowed(bytes) => bytes,
            Payload::Owned(buffer) => &buffer[super::decoder::MESSAGE_HEADROOM..],
        }
    }

    /// The message as text, if it is a text message.
    pub fn text(&self) -> Option<&str> {
        // SAFETY: `is_text` is set only where the bytes were validated as
        // UTF-8 (by the decoder, or by `check_inflated_text` after
        // inflating), and `payload` is never changed after that.
        self.is_text
            .then(|| unsafe { std::str::from_utf8_unchecked(self.bytes()) })
    }

    pub fn into_payload(self) -> Payload<'a> {
        self.payload
    }
}

/// What [`Session::receive`] hands out.
#[derive(Debug)]
pub enum Received<'a> {
    Message(Incoming<'a>),
    /// A streamed binary message of `len` bytes begins.
    StreamStart {
        len: u64,
    },
    /// The next bytes of the streamed message; `last` completes it. Parts
    /// of a stream that began before our close keep coming after it, so
    /// that whatever the caller forwards can be finished.
    StreamChunk {
        payload: &'a [u8],
        last: bool,
    },
    /// The peer's close frame arrived and is answered; the session is now
    /// waiting for its output to be written (see [`Session::is_finished`]),
    /// and its deadline moved (see [`Session::next_deadline`]).
    PeerClosed,
    /// The peer broke the protocol: a close frame with this code and
    /// reason is queued and nothing more it sends is read.
    Violated(Violation),
}

/// What a due timer did (see [`Session::handle_timeout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing was due (a wake-up for a deadline that has moved).
    Nothing,
    /// A ping was queued; the next one is scheduled.
    Ping,
    /// Nothing was heard for `idle_timeout`: a close frame (1008) was
    /// queued and the closing handshake's deadline set.
    Idle,
    /// The closing handshake is not over by its deadline: the caller
    /// closes the transport.
    Close,
}

/// See the module docs.
#[derive(Debug)]
pub struct Session {
    /// While open: when the next ping is due. Once closing: when the
    /// closing handshake must be over. It changes meaning exactly when
    /// `close` leaves `Open`, which only this module does.
    deadline: Tick,
    /// Present only while a frame or message is partly received; between
    /// messages a fresh decoder on the stack costs less than one per idle
    /// connection.
    decoder: Option<Box<Decoder>>,
    close: CloseState,
    role: Role,
    /// The peer broke the protocol: nothing more it sends is parsed.
    failed: bool,
    /// A streamed message is being handed out: its parts keep coming even
    /// after our close.
    streaming: bool,
    deflate: Option<DeflateParams>,
}

impl Session {
    /// A session that opened at `now`, with permessage-deflate if agreed.
    pub fn new(
        role: Role,
        deflate: Option<DeflateParams>,
        now: Tick,
        config: &SessionConfig,
    ) -> Self {
        Self {
            deadline: now.after(config.ping_interval),
            decoder: None,
            close: CloseState::Open,
            role,
            failed: false,
            streaming: false,
            deflate,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn deflate(&self) -> Option<DeflateParams> {
        self.deflate
    }

    pub fn close_state(&self) -> CloseState {
        self.close
    }

    /// Whether data messages may still be sent (and received ones are
    /// still handed out): no close frame has been sent or received.
    pub fn can_send(&self) -> bool {
        self.close.is_open()
    }

    /// Both close frames have crossed: once its output is written, the
    /// transport should close (RFC 6455 §7.1.1: the server first).
    pub fn is_finished(&self) -> bool {
        self.close.is_finished()
    }

    /// The peer broke the protocol (see [`Received::Violated`]).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// When [`Session::handle_timeout`] must next be called. While open:
    /// the next ping or the idle limit, whichever comes first
    /// (`last_heard`: when the peer last sent anything). Once closing:
    /// the closing handshake's deadline only.
    pub fn next_deadline(&self, last_heard: Tick, idle_timeout: Duration) -> Tick {
        if self.close.is_open() {
            self.deadline.min(last_heard.after(idle_timeout))
        } else {
            self.deadline
        }
    }

    /// Applies the timers due at `now`. After `Nothing`, `Ping` and `Idle`
    /// the next deadline is later than `now`: a timer always moves forward.
    pub fn handle_timeout(
        &mut self,
        now: Tick,
        last_heard: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> Expiry {
        if !self.close.is_open() {
            return if now >= self.deadline {
                Expiry::Close
            } else {
                Expiry::Nothing
            };
        }
        if now >= last_heard.after(config.idle_timeout) {
            let reason = format!(
                "idle timeout: nothing received for {:?}",
                config.idle_timeout
            );
            self.close(CloseCode::POLICY_VIOLATION, &reason, now, config, host);
            Expiry::Idle
        } else if now >= self.deadline {
            self.deadline = now.after(config.ping_interval);
            host.send_control(OpCode::Ping, b"");
            Expiry::Ping
        } else {
            Expiry::Nothing
        }
    }

    /// Starts the closing handshake from our side: queues a close frame,
    /// unless one was sent already (a pending close is never replaced).
    /// Returns whether it did.
    pub fn close(
        &mut self,
        code: CloseCode,
        reason: &str,
        now: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> bool {
        // Sent only from `Open`, so this close also starts the deadline.
        if !self.close.close_locally() {
            return false;
        }
        self.deadline = now.after(config.close_timeout);
        host.send_control(OpCode::Close, &close_payload(code, reason));
        true
    }

    /// Fails the connection (§7.1.7): our close frame with the violation's
    /// code, and nothing more from the peer is read.
    pub fn fail(
        &mut self,
        violation: Violation,
        now: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> Received<'static> {
        self.failed = true;
        self.decoder = None;
        self.close(violation.code, violation.reason, now, config, host);
        Received::Violated(violation)
    }

    /// Decodes from the front of `input` (unmasking it in place) until
    /// something is there for the caller, answering control frames on the
    /// way. Returns how many bytes were used and what was received, or
    /// `None` once all of `input` is absorbed; call again with the rest.
    pub fn receive<'a>(
        &mut self,
        input: &'a mut [u8],
        mode: ReceiveMode,
        now: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> (usize, Option<Received<'a>>) {
        if self.failed || self.close.is_finished() {
            // Nothing after a violation or the peer's close is read.
            return (input.len(), None);
        }
        let mut decoder = match self.decoder.take() {
            Some(boxed) => Slot::Boxed(boxed),
            None => Slot::Stack(Decoder::for_role(
                self.role,
                config.limits,
                self.deflate.is_some(),
            )),
        };
        let mut pos = 0;
        let found = loop {
            if pos == input.len() {
                break None;
            }
            let decoded = match mode {
                ReceiveMode::Stream { min_len } => {
                    decoder.decode_streaming(&mut input[pos..], min_len)
                }
                ReceiveMode::Whole => decoder
                    .decode(&mut input[pos..])
                    .map(|(used, event)| (used, event.map(Step::Event))),
            };
            let (used, step) = match decoded {
                Ok(decoded) => decoded,
                Err(violation) => {
                    pos = input.len();
                    break Some(Found::Violated(violation));
                }
            };
            pos += used;
            match self.on_step(step, now, config, host) {
                Ok(Some(found)) => break Some(found),
                Ok(None) => {}
                Err(violation) => {
                    pos = input.len();
                    break Some(Found::Violated(violation));
                }
            }
        };
        let received = match found {
            None => None,
            Some(Found::Violated(violation)) => {
                return (pos, Some(self.fail(violation, now, config, host)));
            }
            Some(Found::Ready(received)) => Some(received),
            Some(Found::InInput { is_text, len }) => {
                // Borrowed from `input`: the last `len` bytes consumed.
                let payload = match decoder.take_message() {
                    Some(buffer) => Payload::Owned(buffer),
                    None => {
                        let input: &'a [u8] = input;
                        Payload::Borrowed(&input[pos - len..pos])
                    }
                };
                Some(Received::Message(Incoming { is_text, payload }))
            }
            Some(Found::Chunk { len, last }) => {
                let input: &'a [u8] = input;
                Some(Received::StreamChunk {
                    payload: &input[pos - len..pos],
                    last,
                })
            }
        };
        if decoder.is_mid_message() && !self.failed && !self.close.is_finished() {
            self.decoder = Some(decoder.into_boxed());
        }
        (pos, received)
    }

    /// Applies one decoded step; `Ok(Some)` when the caller must see it.
    fn on_step(
        &mut self,
        step: Option<Step<'_>>,
        now: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> Result<Option<Found>, Violation> {
        let event = match step {
            None => return Ok(None),
            Some(Step::StreamStart { len }) => {
                // Data after our close is read and dropped (§5.5.1).
                self.streaming = self.close.is_open();
                return Ok(self
                    .streaming
                    .then_some(Found::Ready(Received::StreamStart { len })));
            }
            Some(Step::Chunk { payload, last }) => {
                let forwarded = self.streaming;
                self.streaming &= !last;
                let len = payload.len();
                return Ok(forwarded.then_some(Found::Chunk { len, last }));
            }
            Some(Step::Event(event)) => event,
        };
        match event {
            Event::Text(text) => Ok(self.data(true, text.len())),
            Event::Binary(bytes) => Ok(self.data(false, bytes.len())),
            Event::Compressed { is_text, payload } => {
                if !self.close.is_open() {
                    return Ok(None);
                }
                let params = self
                    .deflate
                    .expect("only a decoder with deflate returns compressed messages");
                let limit = config.limits.max_message_size as usize;
                let inflated = host
                    .inflate(params, payload, limit)
                    .map_err(InflateError::violation)?;
                if is_text {
                    check_inflated_text(&inflated[super::decoder::MESSAGE_HEADROOM..])?;
                }
                let payload = Payload::Owned(inflated);
                Ok(Some(Found::Ready(Received::Message(Incoming {
                    is_text,
                    payload,
                }))))
            }
            Event::Ping(payload) => {
                // A ping after our close frame is not answered (§5.5.1).
                if self.close.is_open() {
                    host.send_control(OpCode::Pong, payload);
                }
                Ok(None)
            }
            Event::Pong(_) => Ok(None),
            Event::Close(received) => {
                if self.close.is_open() {
                    // Our answer (and anything queued before it) must be
                    // written in time: a peer that closes and stops
                    // reading cannot keep the connection.
                    self.deadline = now.after(config.close_timeout);
                }
                if self.close.peer_closed() {
                    // §5.5.1: answer with a close frame, typically echoing
                    // the code.
                    let reply = received.map(|(code, _)| code.0.to_be_bytes());
                    host.send_control(OpCode::Close, reply.as_ref().map_or(&[], |c| &c[..]));
                }
                Ok(Some(Found::Ready(Received::PeerClosed)))
            }
        }
    }

    /// A whole message of `len` bytes, at the end of what was consumed.
    fn data(&self, is_text: bool, len: usize) -> Option<Found> {
        // Data after our close frame is read and dropped (§5.5.1).
        self.close
            .is_open()
            .then_some(Found::InInput { is_text, len })
    }

    /// While a large data frame arrives and at least `min` of its bytes
    /// are still to come: room to read the transport straight into (see
    /// [`Decoder::direct_space`]). Report what was read with
    /// [`Session::direct_filled`] before any other call.
    pub fn direct_space(&mut self, min: usize) -> Option<&mut [MaybeUninit<u8>]> {
        if self.failed {
            return None;
        }
        self.decoder.as_mut()?.direct_space(min)
    }

    /// Takes in `filled` bytes read into the room [`Session::direct_space`]
    /// lent; a message they completed comes out (always owned).
    ///
    /// # Safety
    ///
    /// The first `filled` bytes of that room were initialized, and no other
    /// method was called since `direct_space`.
    pub unsafe fn direct_filled(
        &mut self,
        filled: usize,
        now: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> Option<Received<'static>> {
        let mut decoder = self.decoder.take()?;
        // SAFETY: forwarded from this function's own contract.
        let step = match unsafe { decoder.direct_filled(filled) } {
            Ok(event) => event.map(Step::Event),
            Err(violation) => return Some(self.fail(violation, now, config, host)),
        };
        let found = match self.on_step(step, now, config, host) {
            Ok(found) => found,
            Err(violation) => return Some(self.fail(violation, now, config, host)),
        };
        let received = match found {
            None => None,
            Some(Found::Ready(received)) => Some(received),
            Some(Found::InInput { is_text, .. }) => {
                // Direct reads only ever complete an assembled message.
                let buffer = decoder.take_message()?;
                Some(Received::Message(Incoming {
                    is_text,
                    payload: Payload::Owned(buffer),
                }))
            }
            Some(Found::Violated(violation)) => {
                return Some(self.fail(violation, now, config, host))
            }
            Some(Found::Chunk { .. }) => None,
        };
        if decoder.is_mid_message() && !self.failed {
            self.decoder = Some(decoder);
        }
        received
    }
}

/// What a step found, before it is tied to the input it came from.
enum Found {
    Ready(Received<'static>),
    /// A whole message: assembled in the decoder, or the last `len` bytes
    /// of the input consumed.
    InInput {
        is_text: bool,
        len: usize,
    },
    Chunk {
        len: usize,
        last: bool,
    },
    Violated(Violation),
}

/// The decoder a session reads with: its own while a message is partly
/// received, else a fresh one.
enum Slot {
    Boxed(Box<Decoder>),
    Stack(Decoder),
}

impl Slot {
    fn into_boxed(self) -> Box<Decoder> {
        match self {
            Slot::Boxed(boxed) => boxed,
            Slot::Stack(decoder) => Box::new(decoder),
        }
    }
}

impl std::ops::Deref for Slot {
    type Target = Decoder;
    fn deref(&self) -> &Decoder {
        match self {
            Slot::Boxed(boxed) => boxed,
            Slot::Stack(decoder) => decoder,
        }
    }
}

impl std::ops::DerefMut for Slot {
    fn deref_mut(&mut self) -> &mut Decoder {
        match self {
            Slot::Boxed(boxed) => boxed,
            Slot::Stack(decoder) => decoder,
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
