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
    /// When the closing handshake must be over. Set exactly when `close`
    /// leaves `Open` (see [`Session::begin_close`] and
    /// [`Session::on_peer_close`]), so a closing connection always has a
    /// deadline of its own and its ping and idle times no longer count.
    close_deadline: Option<Tick>,
    /// Present only while a frame or message is partly received; between
    /// messages the loop decodes with a fresh decoder on its stack.
    pub decoder: Option<Box<Decoder>>,
    pub endpoint: Endpoint,
    /// The listener it came in on (for metrics; the app keeps its own).
    pub role: Role,
    /// Private so it changes only with `close_deadline`.
    close: CloseState,
    /// The peer broke the protocol: nothing more it sends is parsed.
    pub discard_input: bool,
    /// permessage-deflate as negotiated; any zlib state it needs is the
    /// loop's (see `Compressors`), not the connection's.
    pub deflate: Option<DeflateParams>,
    /// /echo is sending a large message back in fragments as it arrives,
    /// to a client that negotiated permessage-deflate.
    pub fragmented_echo: Option<FragmentedEcho>,
}

/// The connection timeouts a timer applies (from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub ping_interval: Duration,
    pub idle: Duration,
    pub close: Duration,
}

/// What a due timer asks of the loop, decided by [`Phase::on_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing is due yet (a wake-up for a deadline that has moved).
    Nothing,
    /// A ping is due; the next one is already scheduled.
    Ping,
    /// Nothing was heard for the idle timeout: the session is now closing
    /// and its close frame (1008) must be queued.
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
        if !session.begin_close(deadline) {
            return None;
        }
        self.queue_close_frame(code, reason);
        Some(deadline)
    }

    pub fn queue_close_frame(&mut self, code: CloseCode, reason: &str) {
        self.out
            .push_frame(OpCode::Close, &close_payload(code, reason));
    }

    /// The next moment a timer must look at this connection.
    pub fn next_deadline(&self, idle_timeout: Duration) -> Tick {
        self.phase.next_deadline(self.last_heard, idle_timeout)
    }
}

impl Phase {
    /// Decides what a timer that fired at `now` does. Every outcome but
    /// `Nothing` and `Ping` ends the phase or the connection, and after
    /// `Nothing` and `Ping` [`Phase::next_deadline`] is later than `now`:
    /// a timer always makes progress.
    pub fn on_timer(&mut self, now: Tick, last_heard: Tick, timeouts: &Timeouts) -> Expiry {
        match self {
            Phase::Handshake(handshake) if now >= handshake.deadline => Expiry::Handshake,
            Phase::Responding { deadline } if now >= *deadline => Expiry::Response,
            Phase::Open(session) => session.on_timer(now, last_heard, timeouts),
            Phase::Handshake(_) | Phase::Responding { .. } => Expiry::Nothing,
        }
    }

    /// The next moment a timer must look at this connection.
    pub fn next_deadline(&self, last_heard: Tick, idle_timeout: Duration) -> Tick {
        match self {
            Phase::Handshake(handshake) => handshake.deadline,
            Phase::Responding { deadline } => *deadline,
            Phase::Open(session) => session.next_deadline(last_heard, idle_timeout),
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

impl Session {
    pub fn new(
        endpoint: Endpoint,
        role: Role,
        deflate: Option<DeflateParams>,
        next_ping: Tick,
    ) -> Self {
        Self {
            next_ping,
            close_deadline: None,
            decoder: None,
            endpoint,
            role,
            close: CloseState::Open,
            discard_input: false,
            deflate,
            fragmented_echo: None,
        }
    }

    pub fn close_state(&self) -> CloseState {
        self.close
    }

    /// We decided to close: returns whether a close frame must be sent
    /// (not if one already was). The first close, ours or the peer's,
    /// sets the deadline for the whole closing handshake.
    pub fn begin_close(&mut self, deadline: Tick) -> bool {
        let send = self.close.close_locally();
        self.close_deadline.get_or_insert(deadline);
        send
    }

    /// The peer's close frame arrived: returns whether we must answer it.
    /// Our answer (and anything queued before it) must be written by
    /// `deadline`, or by the deadline our own close already set: a peer
    /// that closes and stops reading cannot keep the connection.
    pub fn on_peer_close(&mut self, deadline: Tick) -> bool {
        let reply = self.close.peer_closed();
        self.close_deadline.get_or_insert(deadline);
        reply
    }

    /// While open: the next ping or the idle limit, whichever is first.
    /// Once closing: only the close deadline.
    pub fn next_deadline(&self, last_heard: Tick, idle_timeout: Duration) -> Tick {
        match self.close_deadline {
            Some(deadline) => deadline,
            None => self.next_ping.min(last_heard.after(idle_timeout)),
        }
    }

    fn on_timer(&mut self, now: Tick, last_heard: Tick, timeouts: &Timeouts) -> Expiry {
        if let Some(deadline) = self.close_deadline {
            return if now >= deadline {
                Expiry::Close
            } else {
                Expiry::Nothing
            };
        }
        if now >= last_heard.after(timeouts.idle) {
            self.begin_close(now.after(timeouts.close));
            Expiry::Idle
        } else if now >= self.next_ping {
            self.next_ping = now.after(timeouts.ping_interval);
            Expiry::Ping
        } else {
            Expiry::Nothing
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

/// The timer rules of [`Phase::on_timer`]: every phase and close state,
/// with every kind of deadline due, makes progress.
#[cfg(test)]
mod timer_tests {
    use std::time::Instant;

    use super::*;
    use crate::server::timers::Clock;

    const TIMEOUTS: Timeouts = Timeouts {
        ping_interval: Duration::from_secs(2),
        idle: Duration::from_secs(10),
        close: Duration::from_secs(1),
    };

    fn start() -> Tick {
        Clock::new(Instant::now()).tick(Instant::now())
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
        Phase::Open(Session::new(
            Endpoint::Ws,
            Role::Public,
            None,
            t0.after(TIMEOUTS.ping_interval),
        ))
    }

    fn session(phase: &mut Phase) -> &mut Session {
        match phase {
            Phase::Open(session) => session,
            _ => unreachable!(),
        }
    }

    /// Every state a connection's timer can meet, built at `t0`.
    fn states(t0: Tick) -> Vec<(&'static str, Phase)> {
        let close_at = t0.after(TIMEOUTS.close);
        let mut closed_by_us = open(t0);
        assert!(session(&mut closed_by_us).begin_close(close_at));
        let mut closed_by_peer = open(t0);
        assert!(session(&mut closed_by_peer).on_peer_close(close_at));
        let mut both = open(t0);
        session(&mut both).begin_close(close_at);
        assert!(!session(&mut both).on_peer_close(t0.after(TIMEOUTS.idle)));
        let mut by_peer_then_us = open(t0);
        session(&mut by_peer_then_us).on_peer_close(close_at);
        assert!(!session(&mut by_peer_then_us).begin_close(t0.after(TIMEOUTS.idle)));
        vec![
            ("handshake", handshake(t0.after(Duration::from_secs(5)))),
            ("responding", {
                let mut phase = handshake(t0);
                phase.respond(t0, TIMEOUTS.close);
                phase
            }),
            ("open", open(t0)),
            ("closed by us", closed_by_us),
            ("closed by the peer", closed_by_peer),
            ("closed by us, then the peer", both),
            ("closed by the peer, then us", by_peer_then_us),
        ]
    }

    /// Moments at which each kind of deadline is due: before any, at the
    /// ping, the close deadline, the handshake deadline, the idle limit,
    /// and long after all of them.
    fn moments(t0: Tick) -> Vec<Tick> {
        [
            0, 999, 1_000, 2_000, 2_500, 5_000, 10_000, 11_000, 3_600_000,
        ]
        .into_iter()
        .map(|ms| t0.after(Duration::from_millis(ms)))
        .collect()
    }

    /// Runs the timers of one loop turn at `now` the way the loop does
    /// (including the 408 a handshake timeout turns into), and returns
    /// the expiries seen. Panics if a re-armed deadline is not later than
    /// `now` (the loop would spin).
    fn one_turn(phase: &mut Phase, now: Tick, last_heard: Tick) -> Vec<Expiry> {
        let mut seen = Vec::new();
        loop {
            let expiry = phase.on_timer(now, last_heard, &TIMEOUTS);
            seen.push(expiry);
            match expiry {
                Expiry::Response | Expiry::Close => return seen,
                Expiry::Handshake => {
                    phase.respond(now, TIMEOUTS.close);
                }
                Expiry::Nothing | Expiry::Ping | Expiry::Idle => {}
            }
            let next = phase.next_deadline(last_heard, TIMEOUTS.idle);
            if next > now {
                return seen;
            }
            assert!(
                seen.len() < 2,
                "re-armed at {next:?} <= {now:?} after {seen:?}"
            );
        }
    }

    #[test]
    fn every_state_at_every_due_time_moves_forward_or_ends() {
        let t0 = start();
        for now in moments(t0) {
            for (name, mut phase) in states(t0) {
                let seen = one_turn(&mut phase, now, t0);
                let last = *seen.last().unwrap();
                if !matches!(last, Expiry::Response | Expiry::Close) {
                    assert!(
                        phase.next_deadline(t0, TIMEOUTS.idle) > now,
                        "{name} at {now:?}: {seen:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_closing_session_ignores_its_ping_and_idle_times() {
        let t0 = start();
        for (name, mut phase) in states(t0).into_iter().skip(3) {
            let close_at = t0.after(TIMEOUTS.close);
            assert_eq!(phase.next_deadline(t0, TIMEOUTS.idle), close_at, "{name}");
            // At the ping time, past the close deadline, it is the close
            // that fires, never a ping.
            let before = t0.after(Duration::from_millis(500));
            assert_eq!(phase.on_timer(before, t0, &TIMEOUTS), Expiry::Nothing);
            let ping_time = t0.after(TIMEOUTS.ping_interval);
            assert_eq!(phase.on_timer(ping_time, t0, &TIMEOUTS), Expiry::Close);
        }
    }

    /// The hang of issue 12: the peer's close arrives, our reply cannot be
    /// written, and the ping time passes. Before the fix the session had
    /// no close deadline and was re-armed at the past ping time forever.
    #[test]
    fn a_peer_close_that_is_never_flushed_ends_at_the_close_timeout() {
        let t0 = start();
        let mut phase = open(t0);
        let closed_at = t0.after(Duration::from_millis(1_500));
        session(&mut phase).on_peer_close(closed_at.after(TIMEOUTS.close));
        let ping_time = t0.after(TIMEOUTS.ping_interval);
        assert_eq!(one_turn(&mut phase, ping_time, t0), [Expiry::Nothing]);
        assert_eq!(
            phase.next_deadline(t0, TIMEOUTS.idle),
            closed_at.after(TIMEOUTS.close)
        );
        let later = closed_at.after(TIMEOUTS.close);
        assert_eq!(one_turn(&mut phase, later, t0), [Expiry::Close]);
    }

    #[test]
    fn open_sessions_ping_then_go_idle() {
        let t0 = start();
        let mut phase = open(t0);
        let early = t0.after(Duration::from_millis(100));
        assert_eq!(one_turn(&mut phase, early, t0), [Expiry::Nothing]);
        let ping_time = t0.after(TIMEOUTS.ping_interval);
        assert_eq!(one_turn(&mut phase, ping_time, t0), [Expiry::Ping]);
        assert_eq!(
            phase.next_deadline(t0, TIMEOUTS.idle),
            ping_time.after(TIMEOUTS.ping_interval)
        );
        let idle_time = t0.after(TIMEOUTS.idle);
        assert_eq!(one_turn(&mut phase, idle_time, t0), [Expiry::Idle]);
        assert!(!session(&mut phase).close_state().is_open());
        assert_eq!(
            phase.next_deadline(t0, TIMEOUTS.idle),
            idle_time.after(TIMEOUTS.close)
        );
        // Hearing from the peer again does not reopen anything.
        let heard = idle_time;
        let close_time = idle_time.after(TIMEOUTS.close);
        assert_eq!(one_turn(&mut phase, close_time, heard), [Expiry::Close]);
    }

    #[test]
    fn handshakes_and_responses_time_out_once() {
        let t0 = start();
        let deadline = t0.after(Duration::from_secs(5));
        let mut phase = handshake(deadline);
        assert_eq!(one_turn(&mut phase, t0, t0), [Expiry::Nothing]);
        assert_eq!(one_turn(&mut phase, deadline, t0), [Expiry::Handshake]);
        assert!(matches!(phase, Phase::Responding { .. }));
        let read_by = deadline.after(TIMEOUTS.close);
        assert_eq!(phase.next_deadline(t0, TIMEOUTS.idle), read_by);
        assert_eq!(one_turn(&mut phase, read_by, t0), [Expiry::Response]);
    }
}
