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

use super::compressors::Compressors;
use super::outbound::Outbound;
use super::timers::Tick;
use super::tls_session::{TlsKey, TlsSessions};
use crate::app::{ConnInfo, Endpoint, Role};
use crate::ws::deflate::InflateError;
use crate::ws::extensions::DeflateParams;
use crate::ws::session::{self, Host, Session, SessionConfig};
use crate::ws::OpCode;

#[derive(Debug)]
pub enum Phase {
    /// Collecting the HTTP request head.
    Handshake(Box<Handshake>),
    /// An HTTP response is queued; the connection closes once it is
    /// written, or at the deadline if the client stops reading.
    Responding { deadline: Tick },
    /// Upgraded.
    Open(Open),
}

#[derive(Debug)]
pub struct Handshake {
    pub request: Vec<u8>,
    pub deadline: Tick,
    /// Handed to the app when the connection upgrades.
    pub info: ConnInfo,
}

/// An upgraded connection: the protocol's state, and what the server
/// needs beside it.
#[derive(Debug)]
pub struct Open {
    pub session: Session,
    pub endpoint: Endpoint,
    /// The listener it came in on (for metrics; the app keeps its own).
    pub role: Role,
    /// A reflecting endpoint is sending a large message back in fragments
    /// as it arrives, to a client that negotiated permessage-deflate.
    pub fragmented_echo: Option<FragmentedEcho>,
}

/// What a due timer asks of the loop, decided by [`Connection::on_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing to do beyond what the session queued (a ping), if anything.
    Nothing,
    /// Nothing was heard for the idle timeout: a close frame (1008) is
    /// queued.
    Idle,
    /// The request head did not arrive in time: answer 408 (see
    /// [`Phase::respond`]), or drop a connection still in its TLS
    /// handshake, which could read no answer.
    Handshake,
    /// The client did not read its HTTP response in time: drop it.
    Response,
    /// The closing handshake did not finish in time (the peer sent no
    /// close frame, or did not read ours or our reply to its own): drop.
    Close,
}

/// The session's way out to the loop: control frames go to the
/// connection's queue, inflating uses the loop's zlib state.
pub struct ServerHost<'a> {
    pub out: &'a mut Outbound,
    pub compressors: &'a mut Compressors,
    pub token: usize,
}

impl Host for ServerHost<'_> {
    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) {
        self.out.push_frame(opcode, payload);
    }

    fn inflate(
        &mut self,
        params: DeflateParams,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        self.compressors
            .inflate(self.token, params, compressed, limit)
    }
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

    pub fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    /// The session and the host it answers through, if upgraded.
    pub fn session_and_host<'a>(
        &'a mut self,
        compressors: &'a mut Compressors,
        token: usize,
    ) -> Option<(&'a mut Open, ServerHost<'a>)> {
        let Phase::Open(open) = &mut self.phase else {
            return None;
        };
        let host = ServerHost {
            out: &mut self.out,
            compressors,
            token,
        };
        Some((open, host))
    }

    /// Whether the connection is done once its queued bytes are written.
    pub fn finished_after_flush(&self) -> bool {
        match &self.phase {
            Phase::Responding { .. } => true,
            Phase::Open(open) => open.session.is_finished(),
            Phase::Handshake(_) => false,
        }
    }

    /// Decides what a timer that fired at `now` does (see
    /// [`Phase::on_timer`]).
    pub fn on_timer(
        &mut self,
        now: Tick,
        config: &SessionConfig,
        compressors: &mut Compressors,
        token: usize,
    ) -> Expiry {
        let mut host = ServerHost {
            out: &mut self.out,
            compressors,
            token,
        };
        self.phase.on_timer(now, self.last_heard, config, &mut host)
    }

    /// The next moment a timer must look at this connection.
    pub fn next_deadline(&self, idle_timeout: Duration) -> Tick {
        self.phase.next_deadline(self.last_heard, idle_timeout)
    }
}

impl Phase {
    /// Decides what a timer that fired at `now` does (a ping or an idle
    /// close is queued by the session itself). Every outcome but `Nothing`
    /// and `Idle` ends the phase or the connection, and after those two
    /// [`Phase::next_deadline`] is later than `now`: a timer always makes
    /// progress.
    pub fn on_timer(
        &mut self,
        now: Tick,
        last_heard: Tick,
        config: &SessionConfig,
        host: &mut impl Host,
    ) -> Expiry {
        match self {
            Phase::Handshake(handshake) if now >= handshake.deadline => Expiry::Handshake,
            Phase::Responding { deadline } if now >= *deadline => Expiry::Response,
            Phase::Handshake(_) | Phase::Responding { .. } => Expiry::Nothing,
            Phase::Open(open) => match open.session.handle_timeout(now, last_heard, config, host) {
                session::Expiry::Nothing | session::Expiry::Ping => Expiry::Nothing,
                session::Expiry::Idle => Expiry::Idle,
                session::Expiry::Close => Expiry::Close,
            },
        }
    }

    /// The next moment a timer must look at a connection in this phase.
    pub fn next_deadline(&self, last_heard: Tick, idle_timeout: Duration) -> Tick {
        match self {
            Phase::Handshake(handshake) => handshake.deadline,
            Phase::Responding { deadline } => *deadline,
            Phase::Open(open) => open.session.next_deadline(last_heard, idle_timeout),
        }
    }

    /// Becomes `Responding`: a final HTTP response is queued, and the
    /// client has until the returned deadline to read it.
    pub fn respond(&mut self, now: Tick, close_timeout: Duration) -> Tick {
        let deadline = now.after(close_timeout);
        *self = Phase::Responding { deadline };
        deadline
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
            size_of::<Session>() <= 24,
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

/// The connection-level timer rules: the handshake and HTTP-response
/// phases beside the session's own (tested in `ws::session`), every phase
/// at every due time making progress.
#[cfg(test)]
mod timer_tests {
    use std::time::Instant;

    use super::*;
    use crate::server::timers::Clock;
    use crate::ws::{Limits, OpCode};

    const CONFIG: SessionConfig = SessionConfig {
        limits: Limits {
            max_frame_size: 1 << 20,
            max_message_size: 1 << 20,
        },
        ping_interval: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
        close_timeout: Duration::from_secs(1),
    };

    /// Control frames queued, as (opcode, payload).
    #[derive(Default)]
    struct Sent(Vec<(OpCode, Vec<u8>)>);

    impl Host for Sent {
        fn send_control(&mut self, opcode: OpCode, payload: &[u8]) {
            self.0.push((opcode, payload.to_vec()));
        }

        fn inflate(
            &mut self,
            _: DeflateParams,
            _: &[u8],
            _: usize,
        ) -> Result<Vec<u8>, InflateError> {
            unreachable!("timers never inflate")
        }
    }

    fn handshake(deadline: Tick) -> Phase {
        Phase::Handshake(Box::new(Handshake {
            request: Vec::new(),
            deadline,
            info: ConnInfo {
                role: Role::Public,
                peer: "127.0.0.1:1".parse().unwrap(),
            },
        }))
    }

    fn open(t0: Tick) -> Phase {
        Phase::Open(Open {
            session: Session::new(session::Role::Server, None, t0, &CONFIG),
            endpoint: Endpoint::Ws,
            role: Role::Public,
            fragmented_echo: None,
        })
    }

    fn states(t0: Tick) -> Vec<(&'static str, Phase)> {
        let mut closing = open(t0);
        if let Phase::Open(o) = &mut closing {
            o.session.close(
                crate::ws::CloseCode::NORMAL,
                "",
                t0,
                &CONFIG,
                &mut Sent::default(),
            );
        }
        let mut responding = handshake(t0);
        responding.respond(t0, CONFIG.close_timeout);
        vec![
            ("handshake", handshake(t0.after(Duration::from_secs(5)))),
            ("responding", responding),
            ("open", open(t0)),
            ("closing", closing),
        ]
    }

    /// Runs the timers of one loop turn at `now` the way the loop does
    /// (including the 408 a handshake timeout turns into).
    fn one_turn(phase: &mut Phase, now: Tick, last_heard: Tick) -> Vec<Expiry> {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let expiry = phase.on_timer(now, last_heard, &CONFIG, &mut Sent::default());
            seen.push(expiry);
            match expiry {
                Expiry::Response | Expiry::Close => return seen,
                Expiry::Handshake => {
                    phase.respond(now, CONFIG.close_timeout);
                }
                Expiry::Nothing | Expiry::Idle => {}
            }
            let next = phase.next_deadline(last_heard, CONFIG.idle_timeout);
            if next > now {
                return seen;
            }
        }
        panic!("re-armed at or before {now:?} after {seen:?}");
    }

    #[test]
    fn every_phase_at_every_due_time_moves_forward_or_ends() {
        let t0 = Clock::new(Instant::now()).tick(Instant::now());
        for ms in [
            0, 999, 1_000, 2_000, 2_500, 5_000, 10_000, 11_000, 3_600_000,
        ] {
            let now = t0.after(Duration::from_millis(ms));
            for (name, mut phase) in states(t0) {
                let seen = one_turn(&mut phase, now, t0);
                let last = *seen.last().unwrap();
                if !matches!(last, Expiry::Response | Expiry::Close) {
                    let next = phase.next_deadline(t0, CONFIG.idle_timeout);
                    assert!(next > now, "{name} at +{ms} ms: {seen:?}");
                }
            }
        }
    }

    #[test]
    fn handshakes_and_responses_time_out_once() {
        let t0 = Clock::new(Instant::now()).tick(Instant::now());
        let deadline = t0.after(Duration::from_secs(5));
        let mut phase = handshake(deadline);
        assert_eq!(one_turn(&mut phase, t0, t0), [Expiry::Nothing]);
        assert_eq!(one_turn(&mut phase, deadline, t0), [Expiry::Handshake]);
        assert!(matches!(phase, Phase::Responding { .. }));
        let read_by = deadline.after(CONFIG.close_timeout);
        assert_eq!(phase.next_deadline(t0, CONFIG.idle_timeout), read_by);
        assert_eq!(one_turn(&mut phase, read_by, t0), [Expiry::Response]);
    }
}
