//! What a reflecting endpoint (`Intake::Reflect`, which `/echo` declares)
//! does with a message: straight back to its sender without the app. A
//! message received whole goes back in its own buffer, uncopied (or
//! compressed, if agreed); a large single-frame binary message goes back
//! as it arrives, written through as one frame, or, under
//! permessage-deflate, compressed into fragments (its compressed length is
//! unknown until its end), or sent as is in fragments once its first part
//! proved incompressible.

use log::{debug, error};

use super::{open_conn, Core};
use crate::app::Intake;
use crate::server::compressors::Part;
use crate::server::connection::{FragmentedEcho, Phase};
use crate::ws::decoder::MESSAGE_HEADROOM;
use crate::ws::extensions::DeflateParams;
use crate::ws::frame::{FrameHeader, RSV1};
use crate::ws::session::{Incoming, Payload};
use crate::ws::{CloseCode, OpCode, Violation};

impl Core {
    /// A whole message to a reflecting endpoint goes straight back: its own
    /// buffer when it has one (no copy), else a copy of the bytes it
    /// borrowed from the read buffer; compressed if that was agreed.
    pub(super) fn reflect(&mut self, token: usize, message: Incoming<'_>) {
        self.stats.messages_in += 1;
        let Some(conn) = open_conn(&mut self.conns, &mut self.dirty, token) else {
            return;
        };
        let Phase::Open(open) = &conn.phase else {
            return;
        };
        let opcode = if message.is_text() {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        if let Some(params) = open.session.deflate() {
            if let Some(buffer) = self.compressors.deflate(token, params, message.bytes()) {
                conn.out.push_deflated(opcode, buffer, MESSAGE_HEADROOM);
                return;
            }
        }
        match message.into_payload() {
            Payload::Owned(buffer) => conn.out.push_message(opcode, buffer, MESSAGE_HEADROOM),
            Payload::Borrowed(bytes) => conn.out.push_frame(opcode, bytes),
        }
    }

    /// A binary message being streamed back by a reflecting endpoint
    /// begins: its reply frame's header is queued, or, with
    /// permessage-deflate, its reply is to go out compressed in fragments.
    pub(super) fn echo_stream_start(&mut self, token: usize, len: u64) {
        let conn = &mut self.conns[token];
        let Phase::Open(open) = &mut conn.phase else {
            return;
        };
        if open.session.deflate().is_some() && self.compressors.worth_compressing(len as usize) {
            // The compressed length is unknown until the end: fragments.
            open.fragmented_echo = Some(FragmentedEcho::Starting);
            conn.out.begin_fragments();
        } else {
            conn.out.begin_stream(OpCode::Binary, len);
            self.mark_dirty(token);
        }
    }

    /// The next piece of a message streamed back: written through at once,
    /// or compressed into the next fragment. A close frame or ping queued
    /// meanwhile waits for the message's end.
    pub(super) fn echo_stream_chunk(&mut self, token: usize, payload: &[u8], last: bool) {
        let conn = &mut self.conns[token];
        if !conn.out.is_streaming() {
            return;
        }
        if let Some((params, state)) = conn
            .open_mut()
            .and_then(|open| Some((open.session.deflate()?, open.fragmented_echo?)))
        {
            return self.fragmented_echo_part(token, params, state, payload, last);
        }
        match conn.stream_out(&mut self.tls, payload, last) {
            Ok(written) => self.stats.bytes_out += written as u64,
            // What was not written stays queued; the flush at the end of the
            // turn meets the error again and drops the connection.
            Err(e) => debug!("conn {token}: write error while streaming: {e}"),
        }
        if last {
            self.stats.messages_in += 1;
        }
        if !self.conns[token].out.is_empty() {
            self.mark_dirty(token);
        }
    }

    /// The next piece of a message sent back in fragments: compressed,
    /// with what zlib has ready queued as the next fragment, or as is once
    /// the first piece proved incompressible.
    fn fragmented_echo_part(
        &mut self,
        token: usize,
        params: DeflateParams,
        state: FragmentedEcho,
        part: &[u8],
        last: bool,
    ) {
        use FragmentedEcho::*;
        let (payload, rsv, opcode, next) = if state == Uncompressed {
            (uncompressed(part), 0, OpCode::Continuation, Uncompressed)
        } else {
            let first = state == Starting;
            match self
                .compressors
                .deflate_part(token, params, part, first, last)
            {
                // Kept by the compressors until the probe can judge it.
                Ok(Part::Held) => return,
                Ok(Part::Incompressible(raw)) => (raw, 0, OpCode::Binary, Uncompressed),
                Ok(Part::Compressed(compressed))
                    if compressed.len() == MESSAGE_HEADROOM && !last =>
                {
                    if let Some(open) = self.conns[token].open_mut() {
                        let held = if state == Starting {
                            Compressing
                        } else {
                            state
                        };
                        open.fragmented_echo = Some(held);
                    }
                    return;
                }
                Ok(Part::Compressed(compressed)) if state == CompressingSent => {
                    (compressed, 0, OpCode::Continuation, CompressingSent)
                }
                Ok(Part::Compressed(compressed)) => {
                    (compressed, RSV1, OpCode::Binary, CompressingSent)
                }
                Err(e) => {
                    // Half a compressed message cannot be finished any
                    // other way: the close follows its fragments sent so far.
                    error!("conn {token}: deflate failed mid-message: {e}");
                    self.conns[token].out.abandon_fragments();
                    let failure = Violation {
                        code: CloseCode::INTERNAL_ERROR,
                        reason: "compression failed",
                    };
                    let (now, config) = (self.tick, self.session_config);
                    if let Some((open, mut host)) =
                        self.conns[token].session_and_host(&mut self.compressors, token)
                    {
                        let failed = open.session.fail(failure, now, &config, &mut host);
                        self.on_received(token, Intake::Reflect, failed);
                    }
                    return;
                }
            }
        };
        if last {
            self.stats.messages_in += 1;
        }
        let head = FrameHeader {
            fin: last,
            rsv,
            opcode,
            mask: None,
            payload_len: 0,
        };
        let conn = &mut self.conns[token];
        if let Some(open) = conn.open_mut() {
            open.fragmented_echo = (!last).then_some(next);
        }
        conn.out.push_fragment(head, payload, MESSAGE_HEADROOM);
        self.mark_dirty(token);
    }
}

/// `part` in a buffer with `MESSAGE_HEADROOM` bytes in front, for
/// `Outbound::push_fragment`.
fn uncompressed(part: &[u8]) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(MESSAGE_HEADROOM + part.len());
    buffer.resize(MESSAGE_HEADROOM, 0);
    buffer.extend_from_slice(part);
    buffer
}
