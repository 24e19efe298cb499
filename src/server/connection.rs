//! One client connection's state: which phase it is in, what it owes the
//! socket, and when it next needs attention.

use std::time::Instant;

use mio::net::TcpStream;

use super::outbound::Outbound;
use crate::app::{ConnInfo, Endpoint};
use crate::ws::{close::close_payload, CloseCode, CloseState, Decoder, OpCode};

#[derive(Debug)]
pub enum Phase {
    /// Collecting the HTTP request head.
    Handshake { request: Vec<u8>, deadline: Instant },
    /// An HTTP response is queued; the connection closes once it is
    /// written, or at the deadline if the client stops reading.
    Responding { deadline: Instant },
    /// Upgraded.
    Open(Session),
}

#[derive(Debug)]
pub struct Session {
    pub endpoint: Endpoint,
    /// Taken out while input is being decoded, so the events it lends can
    /// be handed to the app alongside mutable access to the connections.
    pub decoder: Option<Decoder>,
    pub close: CloseState,
    /// When we stop waiting for the peer's close frame.
    pub close_deadline: Option<Instant>,
    /// The peer broke the protocol: nothing more it sends is parsed.
    pub discard_input: bool,
    pub next_ping: Instant,
}

#[derive(Debug)]
pub struct Connection {
    pub socket: TcpStream,
    pub info: ConnInfo,
    /// Distinguishes this connection from earlier ones in the same slot.
    pub serial: u64,
    pub phase: Phase,
    pub out: Outbound,
    pub last_heard: Instant,
    /// The earliest deadline queued in the timer heap for this connection.
    pub wake_at: Option<Instant>,
    /// Reading stopped because our replies to this peer filled its queue.
    pub read_paused: bool,
    /// Already in the loop's list of connections to flush.
    pub dirty: bool,
    /// Our side of the TCP stream was shut down after a failing close.
    pub write_shut: bool,
    /// A fan-out delivery found the queue full: tell the app once it drains.
    pub drain_wanted: bool,
}

impl Connection {
    pub fn new(
        socket: TcpStream,
        info: ConnInfo,
        serial: u64,
        now: Instant,
        handshake_deadline: Instant,
    ) -> Self {
        Self {
            socket,
            info,
            serial,
            phase: Phase::Handshake {
                request: Vec::new(),
                deadline: handshake_deadline,
            },
            out: Outbound::default(),
            last_heard: now,
            wake_at: None,
            read_paused: false,
            dirty: false,
            write_shut: false,
            drain_wanted: false,
        }
    }

    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.phase {
            Phase::Open(session) => Some(session),
            _ => None,
        }
    }

    /// Whether the connection is done once its queued bytes are written.
    pub fn finished_after_flush(&self) -> bool {
        match &self.phase {
            Phase::Responding { .. } => true,
            Phase::Open(session) => session.close.is_finished(),
            Phase::Handshake { .. } => false,
        }
    }

    /// Sends a close frame unless one was already sent, and returns the
    /// deadline for the peer's answer.
    pub fn begin_close(
        &mut self,
        code: CloseCode,
        reason: &str,
        deadline: Instant,
    ) -> Option<Instant> {
        let Phase::Open(session) = &mut self.phase else {
            return None;
        };
        if !session.close.close_locally() {
            return None;
        }
        self.out
            .push_frame(OpCode::Close, &close_payload(code, reason));
        session.close_deadline = Some(deadline);
        Some(deadline)
    }

    /// The next moment a timer must look at this connection.
    pub fn next_deadline(&self, idle_timeout: std::time::Duration) -> Instant {
        match &self.phase {
            Phase::Handshake { deadline, .. } | Phase::Responding { deadline } => *deadline,
            Phase::Open(session) => match session.close_deadline {
                Some(deadline) => deadline,
                None => session.next_ping.min(self.last_heard + idle_timeout),
            },
        }
    }
}
