//! One client connection's state: which phase it is in, what it owes the
//! socket, and when it next needs attention.
//!
//! Thousands of these sit idle in the slab, so an upgraded connection keeps
//! only what it needs between messages: no buffers (the write queue and the
//! decoder are boxed and exist only while bytes are pending), times as
//! 8-byte ticks, and the handshake's state boxed away once it is over.

use std::io;
use std::time::Duration;

use mio::net::TcpStream;

use super::outbound::Outbound;
use super::timers::Tick;
use super::tls_session::{TlsKey, TlsSessions};
use crate::app::{ConnInfo, Endpoint, Role};
use crate::ws::extensions::DeflateParams;
use crate::ws::{close::close_payload, CloseCode, CloseState, Decoder, OpCode};

#[derive(Debug)]
pub enum Phase {
    /// Collecting the HTTP request head.
    Handshake(Box<Handshake>),
    /// An HTTP response is queued; the connection closes once it is
    /// written, or at the deadline if the client stops reading.
    Responding { deadline: Tick },
    /// Upgraded.
    Open(Session),
}

#[derive(Debug)]
pub struct Handshake {
    pub request: Vec<u8>,
    pub deadline: Tick,
    /// Handed to the app when the connection upgrades.
    pub info: ConnInfo,
}

#[derive(Debug)]
pub struct Session {
    pub next_ping: Tick,
    /// When we stop waiting for the peer's close frame.
    pub close_deadline: Option<Tick>,
    /// Present only while a frame or message is partly received; between
    /// messages the loop decodes with a fresh decoder on its stack.
    pub decoder: Option<Box<Decoder>>,
    pub endpoint: Endpoint,
    /// The listener it came in on (for metrics; the app keeps its own).
    pub role: Role,
    pub close: CloseState,
    /// The peer broke the protocol: nothing more it sends is parsed.
    pub discard_input: bool,
    /// permessage-deflate as negotiated; any zlib state it needs is the
    /// loop's (see `Compressors`), not the connection's.
    pub deflate: Option<DeflateParams>,
    /// /echo is sending a large message back in fragments as it arrives,
    /// to a client that negotiated permessage-deflate.
    pub fragmented_echo: Option<FragmentedEcho>,
}

/// Where /echo is in sending a large message back in fragments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentedEcho {
    /// Nothing received yet: the first part decides whether the message is
    /// worth compressing (see `ws::deflate::PROBE_LEN`).
    Starting,
    /// Compressing; zlib holds what it has, no fragment is out yet.
    Compressing,
    /// Compressing, and fragments are out: the next are continuations.
    CompressingSent,
    /// The first part did not compress: the rest goes as is, in
    /// continuation frames.
    Uncompressed,
}

#[derive(Debug)]
pub struct Connection {
    pub socket: TcpStream,
    /// Distinguishes this connection from earlier ones in the same slot.
    pub serial: u32,
    pub phase: Phase,
    pub out: Outbound,
    pub last_heard: Tick,
    /// The earliest deadline queued in the timer heap for this connection.
    pub wake_at: Option<Tick>,
    /// Reading stopped because our replies to this peer filled its queue.
    pub read_paused: bool,
    /// Already in the loop's list of connections to flush.
    pub dirty: bool,
    /// Our side of the TCP stream was shut down after a failing close.
    pub write_shut: bool,
    /// A fan-out delivery found the queue full: tell the app once it drains.
    pub drain_wanted: bool,
    /// Set on a TLS listener's connections: everything read and written
    /// passes through this session.
    pub tls: Option<TlsKey>,
}

impl Connection {
    pub fn new(
        socket: TcpStream,
        info: ConnInfo,
        serial: u32,
        now: Tick,
        handshake_deadline: Tick,
        tls: Option<TlsKey>,
    ) -> Self {
        Self {
            socket,
            serial,
            phase: Phase::Handshake(Box::new(Handshake {
                request: Vec::new(),
                deadline: handshake_deadline,
                info,
            })),
            out: Outbound::default(),
            last_heard: now,
            wake_at: None,
            read_paused: false,
            dirty: false,
            write_shut: false,
            drain_wanted: false,
            tls,
        }
    }

    /// Writes the queue as far as the socket takes it, through TLS if the
    /// connection has it; `Ok(true)` once every byte is on the socket.
    pub fn flush_out(&mut self, sessions: &mut TlsSessions) -> io::Result<bool> {
        let Some(key) = self.tls else {
            return self.out.flush_to(&mut self.socket);
        };
        let session = sessions.get_mut(key);
        let queue_done = self.out.flush_to(&mut session.sink(&mut self.socket))?;
        // The queue may be done while its last records still wait in the
        // session (or, in the TLS handshake, with no queue at all).
        match session.push_records(&mut self.socket) {
            Ok(()) => Ok(queue_done),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The next piece of a streamed frame (see [`Outbound::stream`]).
    pub fn stream_out(
        &mut self,
        sessions: &mut TlsSessions,
        payload: &[u8],
        last: bool,
    ) -> io::Result<usize> {
        match self.tls {
            None => self.out.stream(&mut self.socket, payload, last),
            Some(key) => {
                let session = sessions.get_mut(key);
                self.out
                    .stream(&mut session.sink(&mut self.socket), payload, last)
            }
        }
    }

    /// Bytes wait for the socket: in the queue, or as TLS records.
    pub fn has_unsent(&self, sessions: &TlsSessions) -> bool {
        !self.out.is_empty()
            || self
                .tls
                .is_some_and(|key| sessions.get(key).has_pending_records())
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
            Phase::Handshake(_) => false,
        }
    }

    /// Sends a close frame unless one was already sent, and returns the
    /// deadline for the peer's answer.
    pub fn begin_close(&mut self, code: CloseCode, reason: &str, deadline: Tick) -> Option<Tick> {
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
    pub fn next_deadline(&self, idle_timeout: Duration) -> Tick {
        match &self.phase {
            Phase::Handshake(handshake) => handshake.deadline,
            Phase::Responding { deadline } => *deadline,
            Phase::Open(session) => match session.close_deadline {
                Some(deadline) => deadline,
                None => session.next_ping.min(self.last_heard.after(idle_timeout)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;

    /// What an idle upgraded connection costs in the slab. A regression
    /// here shows up as RSS per connection (`loadgen connections`).
    #[test]
    fn an_idle_connection_stays_small() {
        assert!(
            size_of::<Session>() <= 32,
            "Session: {}",
            size_of::<Session>()
        );
        assert!(size_of::<Phase>() <= 32, "Phase: {}", size_of::<Phase>());
        // In debug builds mio keeps the id of the poll a socket is
        // registered with beside the descriptor (to catch a second
        // registration); the budget is for the release layout.
        let mio_debug_extra =
            (size_of::<TcpStream>() - size_of::<std::os::fd::RawFd>()).next_multiple_of(8);
        assert!(
            size_of::<Connection>() <= 72 + mio_debug_extra,
            "Connection: {}",
            size_of::<Connection>()
        );
        // The shape of slab's own (private) entry type.
        #[allow(dead_code)]
        enum SlabEntry {
            Vacant(usize),
            Occupied(Connection),
        }
        assert!(
            size_of::<SlabEntry>() <= 72 + mio_debug_extra,
            "slab entry: {}",
            size_of::<SlabEntry>()
        );
    }
}
