//! An upgraded connection's bytes through its `ws::Session`: what comes
//! out goes to the app or is reflected, per the endpoint's `Intake`, and
//! the closing handshake moving on is scheduled. The protocol's rules are
//! the session's; this is only the plumbing between it and the loop.

use log::debug;

use super::Core;
use crate::app::{Intake, Message};
use crate::ws::session::Incoming;
use crate::ws::{CloseCode, ReceiveMode, Received};

impl Core {
    pub(super) fn websocket_input(&mut self, token: usize, input: &mut [u8]) {
        let (now, config) = (self.tick, self.session_config);
        let mut pos = 0;
        while pos < input.len() {
            let Some((open, mut host)) = self
                .conns
                .get_mut(token)
                .and_then(|conn| conn.session_and_host(&mut self.compressors, token))
            else {
                return;
            };
            let intake = open.endpoint.intake();
            let mode = match intake {
                // Large single-frame binary messages go back as they
                // arrive instead of being assembled first.
                Intake::Reflect => ReceiveMode::Stream {
                    min_len: self.config.read_buffer_size as u64,
                },
                Intake::App => ReceiveMode::Whole,
            };
            let (used, received) =
                open.session
                    .receive(&mut input[pos..], mode, now, &config, &mut host);
            pos += used;
            let Some(received) = received else {
                break;
            };
            self.on_received(token, intake, received);
        }
        if self.conns.get(token).is_some_and(|c| !c.out.is_empty()) {
            // Pongs the session queued on its own.
            self.mark_dirty(token);
        }
    }

    /// `filled` bytes were read straight into the connection's message
    /// buffer (see `ws::Session::direct_space`).
    pub(super) fn direct_input(&mut self, token: usize, filled: usize) {
        let (now, config) = (self.tick, self.session_config);
        let Some((open, mut host)) =
            self.conns[token].session_and_host(&mut self.compressors, token)
        else {
            return;
        };
        let intake = open.endpoint.intake();
        // SAFETY: the read loop asked `direct_space` for room, made no other
        // call on the session, and the socket initialized `filled` bytes.
        let received = unsafe { open.session.direct_filled(filled, now, &config, &mut host) };
        if let Some(received) = received {
            self.on_received(token, intake, received);
        }
    }

    /// What the session handed out: a message for the app or to reflect,
    /// part of a message reflected as it arrives, or the closing handshake
    /// moving on.
    pub(super) fn on_received(&mut self, token: usize, intake: Intake, received: Received<'_>) {
        match received {
            Received::Message(message) => match intake {
                Intake::Reflect => self.reflect(token, message),
                Intake::App => self.app_message(token, message),
            },
            Received::StreamStart { len } => self.echo_stream_start(token, len),
            Received::StreamChunk { payload, last } => self.echo_stream_chunk(token, payload, last),
            Received::PeerClosed => self.closing(token),
            Received::Violated(violation) => {
                self.stats.protocol_errors += 1;
                debug!(
                    "conn {token}: failing with {}: {}",
                    violation.code.0, violation.reason
                );
                self.stats.closes_sent += 1;
                self.closing(token);
            }
        }
    }

    /// The session is closing (a close frame was queued or answered): its
    /// output goes out this turn and its deadline is now the close's.
    pub(super) fn closing(&mut self, token: usize) {
        self.mark_dirty(token);
        if let Some(conn) = self.conns.get(token) {
            let deadline = conn.next_deadline(self.config.idle_timeout);
            self.schedule(token, deadline);
        }
    }

    /// A whole message for the app.
    fn app_message(&mut self, token: usize, message: Incoming<'_>) {
        self.stats.messages_in += 1;
        let Some(endpoint) = self.conns[token].open_mut().map(|open| open.endpoint) else {
            return;
        };
        let now = self.now;
        let (app, mut out) = self.app_and_outbox();
        let message = match message.text() {
            Some(text) => Message::Text(text),
            None => Message::Binary(message.bytes()),
        };
        app.on_message(token, endpoint, message, now, &mut out);
    }

    /// Starts the closing handshake from our side.
    pub(super) fn close(&mut self, token: usize, code: CloseCode, reason: &str) {
        let (now, config) = (self.tick, self.session_config);
        let Some((open, mut host)) =
            self.conns[token].session_and_host(&mut self.compressors, token)
        else {
            return;
        };
        if open.session.close(code, reason, now, &config, &mut host) {
            self.stats.closes_sent += 1;
            self.closing(token);
        }
    }
}
