//! The single-threaded, edge-triggered mio loop, which only moves bytes
//! and time. Each iteration: wait for readiness or the next deadline;
//! accept (at most `ACCEPTS_PER_TURN` per listener); read each ready
//! connection within its turn's budget (`READS_PER_TURN` reads or
//! `READ_BYTES_PER_TURN` bytes, `TLS_STEPS_PER_TURN` through TLS; a short
//! read ends it, since more data raises a new edge); run due timers (at
//! most `TIMERS_PER_TURN`); then write every connection with output once.
//! Whatever a budget leaves is taken up next turn, which then does not
//! sleep.
//!
//! What the bytes mean is decided elsewhere: the request head, upgrades
//! and plain HTTP answers in [`http`], the WebSocket protocol in
//! `ws::Session` (plumbed through [`websocket`]), `/echo`'s reflection in
//! [`reflect`], and the app behind the `Outbox` in [`delivery`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::compressors::Compressors;
use super::connection::{Connection, Expiry, Phase};
use super::listener::{is_resource_exhaustion, Listener, ACCEPT_RETRY};
use super::pending_states::PendingStates;
use super::stats::Stats;
use super::timers::{next_serial, Clock, Tick, Timer, TimerKey, Timers};
use super::tls_identity::TlsIdentity;
use super::tls_session::{failure_reason, TlsReadError, TlsSession, TlsSessions};
use crate::app::{App, ConnInfo, Role};
use crate::cluster::{LinkConfig, RedisLink};
use crate::config::Config;
use crate::ws::handshake::{Rejection, UpgradePolicy};
use crate::ws::{Limits, SessionConfig};

mod delivery;
mod http;
mod reflect;
mod signals;
mod websocket;

use delivery::{holds_states, open_conn};
pub use signals::ShutdownHandle;

const SIGNAL: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
const FIRST_LISTENER: usize = usize::MAX - 2;

/// A socket that keeps sending is read at most this many times per loop
/// iteration before the loop moves on, so one fast peer cannot starve the
/// others; it is resumed on the next iteration.
const READS_PER_TURN: usize = 16;

/// A connection's reads in one loop iteration also stop once they have
/// brought in this many bytes: with a large read buffer the count alone
/// would let one bulk sender take megabytes per turn while others wait.
const READ_BYTES_PER_TURN: usize = 1 << 20;

/// rustls reads a few KiB per call, so a TLS connection's turn is bounded
/// by `READ_BYTES_PER_TURN` of ciphertext and by this many steps (each a
/// ciphertext read or a plaintext hand-over).
const TLS_STEPS_PER_TURN: usize = 256;

/// Due timers handled in one loop iteration before the loop polls again.
const TIMERS_PER_TURN: usize = 4096;

/// Write-and-refill rounds of one connection's flush while it has held
/// states and the socket takes everything (each round moves up to
/// `--max-outbound-buffer` bytes of them into its queue).
const HELD_STATE_ROUNDS: usize = 4;

/// Connections accepted from one listener in one loop iteration: a flood
/// of connects is taken in batches, with every other socket, timer and
/// signal served between them.
const ACCEPTS_PER_TURN: usize = 1024;

/// When a read loop may stop before the socket says `WouldBlock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// A read that does not fill the buffer emptied the socket's receive
    /// queue; anything arriving later raises a new edge, so the loop skips
    /// the read that would only say `WouldBlock`.
    UntilShortRead,
    /// The peer's FIN (or an error) is already known, or the socket was
    /// left unread earlier: no new edge will come, so read until the
    /// socket says so.
    UntilWouldBlock,
}

/// Fixes the socket's SO_SNDBUF (which also turns off the kernel's
/// autotuning of it for this socket).
fn set_send_buffer(socket: &mio::net::TcpStream, size: usize) -> io::Result<()> {
    socket2::SockRef::from(socket).set_send_buffer_size(size)
}

/// Queues a timer for connection `token` at `at`, unless one at or before
/// it is queued already (entries are never removed early: see `timers`).
fn wake_at(timers: &mut Timers, token: usize, conn: &mut Connection, at: Tick) {
    if conn.wake_at.is_some_and(|scheduled| scheduled <= at) {
        return;
    }
    conn.wake_at = Some(at);
    timers.schedule(at, TimerKey::connection(token, conn.serial));
}

fn listener_token(index: usize) -> Token {
    Token(FIRST_LISTENER - index)
}

pub struct Server {
    poll: Poll,
    listeners: Vec<Listener>,
    read_buf: Vec<u8>,
    signals: Option<signal_hook_mio::v1_0::Signals>,
    shutdown: ShutdownHandle,
    /// Listeners that used their accept budget with connections still
    /// waiting: accepted from again next turn, since no new edge may come.
    accept_again: Vec<usize>,
    core: Core,
}

/// Everything the loop mutates while handling one readiness event, apart
/// from the read buffer, so the bytes just read can be borrowed alongside.
struct Core {
    config: Config,
    policy: UpgradePolicy,
    /// Limits and timeouts of every WebSocket session.
    session_config: SessionConfig,
    conns: Slab<Connection>,
    /// TLS state of the connections that have it (see `Connection::tls`).
    tls: TlsSessions,
    /// zlib state for permessage-deflate, shared where the protocol allows.
    compressors: Compressors,
    /// State updates held for slow recipients until their queues have
    /// room, by token (see `Core::queue_held_states`).
    held_states: HashMap<usize, PendingStates>,
    app: App,
    timers: Timers,
    /// Connections with queued output, flushed once at the end of the turn.
    dirty: Vec<usize>,
    /// Connections to read again next turn (budget used up or unpaused).
    resume: Vec<usize>,
    next_serial: u32,
    pending_handshakes: usize,
    open_websockets: usize,
    stopping_at: Option<Instant>,
    stats: Stats,
    now: Instant,
    /// `now` as a tick, for connection deadlines.
    tick: Tick,
    clock: Clock,
}

impl Server {
    /// Binds every configured address; the server does nothing until `run`.
    pub fn bind(config: Config) -> io::Result<Server> {
        config
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        let public = config.listen.iter().map(|a| (*a, Role::Public));
        let internal = config.internal_listen.iter().map(|a| (*a, Role::Internal));
        for (index, (addr, role)) in public.chain(internal).enumerate() {
            let files = match role {
                Role::Public => (&config.tls_cert, &config.tls_key),
                Role::Internal => (&config.internal_tls_cert, &config.internal_tls_key),
            };
            let tls = match files {
                (Some(cert), Some(key)) => Some(
                    TlsIdentity::load(cert, key)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
                ),
                _ => None,
            };
            let mut listener =
                Listener::bind(addr, role, tls, config.reuse_port, config.listen_backlog)?;
            poll.registry().register(
                &mut listener.socket,
                listener_token(index),
                Interest::READABLE,
            )?;
            listeners.push(listener);
        }
        // One waker per poll (a mio rule): shutdown requests and the Redis
        // link share it; each wake checks both.
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let shutdown = ShutdownHandle {
            requested: Arc::new(AtomicBool::new(false)),
            waker: waker.clone(),
        };
        let start = Instant::now();
        let clock = Clock::new(start);
        let core = Core {
            policy: UpgradePolicy {
                allowed_origins: config.allowed_origins.clone(),
                subprotocols: config.subprotocols.clone(),
                deflate: config.compression.policy(),
            },
            compressors: Compressors::new(config.compression_threshold, config.compression_level),
            session_config: SessionConfig {
                limits: Limits {
                    max_frame_size: config.max_frame_size.min(config.max_message_size) as u64,
                    max_message_size: config.max_message_size as u64,
                },
                ping_interval: config.ping_interval,
                idle_timeout: config.idle_timeout,
                close_timeout: config.close_timeout,
            },
            conns: Slab::new(),
            tls: TlsSessions::default(),
            held_states: HashMap::new(),
            app: App::new(&config, start)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            timers: Timers::default(),
            dirty: Vec::new(),
            resume: Vec::new(),
            next_serial: 0,
            pending_handshakes: 0,
            open_websockets: 0,
            stopping_at: None,
            stats: Stats::default(),
            now: start,
            tick: clock.tick(start),
            clock,
            config,
        };
        let mut core = core;
        if let Some(url) = &core.config.redis {
            let node_id = core.config.node_id();
            let mut link_config = LinkConfig::new(url.as_str(), node_id.as_str());
            link_config.alive_ttl = core.config.presence_ttl;
            let link = RedisLink::start(link_config, waker)?;
            info!("scale-out: node {node_id} on redis {url}");
            core.app.attach_cluster(link);
        }
        Ok(Server {
            read_buf: vec![0; core.config.read_buffer_size],
            poll,
            listeners,
            signals: None,
            shutdown,
            accept_again: Vec::new(),
            core,
        })
    }

    /// The addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// The listeners as `ws://ADDR` or `wss://ADDR`, in `local_addrs` order.
    pub fn local_urls(&self) -> Vec<String> {
        self.listeners.iter().map(Listener::url).collect()
    }

    /// What each listener is for, one line each, for the start-up log:
    /// public or internal, where the page and the WebSockets are, and a
    /// warning when a listener is open to the network.
    pub fn describe_listeners(&self) -> Vec<String> {
        let metrics_public = !self.core.config.metrics_internal_only;
        self.listeners
            .iter()
            .map(|listener| {
                let url = listener.url();
                let http = url.replacen("ws", "http", 1);
                let mut line = match listener.role {
                    Role::Public => format!(
                        "public listener {url}: the page at {http}/, WebSockets on /ws, /chat, \
                         /kline and /echo{}",
                        if metrics_public { ", /metrics" } else { "" }
                    ),
                    Role::Internal => format!(
                        "internal listener {url}: trusted publishers on /ws (create, publish, \
                         events), /metrics"
                    ),
                };
                if self.core.config.reuse_port {
                    line.push_str(" (SO_REUSEPORT: shared with other processes bound to it)");
                }
                if listener.addr.ip().is_unspecified() {
                    line.push_str(
                        " — bound to every interface, so reachable from the network; \
                         --listen 127.0.0.1:PORT keeps it on this machine",
                    );
                }
                line
            })
            .collect()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Runs until a shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let woke = Instant::now();
            self.core.set_now(woke);
            for event in events.iter() {
                match event.token() {
                    SIGNAL => self.on_signal(),
                    WAKER => {
                        let now = self.core.now;
                        let (app, mut out) = self.core.app_and_outbox();
                        app.on_cluster(now, &mut out);
                        if self.shutdown.requested.load(Ordering::SeqCst) {
                            self.begin_shutdown();
                        }
                    }
                    Token(t) if t > FIRST_LISTENER - self.listeners.len() => {
                        self.accept(FIRST_LISTENER - t)
                    }
                    Token(t) => {
                        if event.is_writable() {
                            self.core.flush(t);
                        }
                        if event.is_read_closed() || event.is_error() {
                            self.read(t, Drain::UntilWouldBlock);
                        } else if event.is_readable() {
                            self.read(t, Drain::UntilShortRead);
                        }
                    }
                }
            }
            for token in std::mem::take(&mut self.core.resume) {
                self.read(token, Drain::UntilWouldBlock);
            }
            for index in std::mem::take(&mut self.accept_again) {
                self.accept(index);
            }
            self.run_timers();
            self.core.flush_dirty();
            self.core.stats.loop_iterations += 1;
            self.core.stats.loop_busy += woke.elapsed();
            if let Some(stop_at) = self.core.stopping_at {
                if self.core.conns.is_empty() || self.core.now >= stop_at {
                    let left = self.core.conns.len();
                    if left > 0 {
                        info!("shutdown grace period over: dropping {left} connection(s) that did not finish closing");
                    }
                    info!("stopped; {}", self.core.stats);
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.core.resume.is_empty()
            || !self.core.dirty.is_empty()
            || !self.accept_again.is_empty()
        {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let app = self
            .core
            .app
            .next_deadline()
            .map(|at| at.saturating_duration_since(now));
        let heap = self
            .core
            .timers
            .next()
            .map(|at| self.core.clock.instant(at).saturating_duration_since(now));
        let timer = match (heap, app) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let stop = self
            .core
            .stopping_at
            .map(|at| at.saturating_duration_since(now));
        match (timer, stop) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn accept(&mut self, index: usize) {
        let Some(listener) = self.listeners.get_mut(index) else {
            return;
        };
        if listener.paused {
            return;
        }
        let core = &mut self.core;
        for _ in 0..ACCEPTS_PER_TURN {
            match listener.socket.accept() {
                Ok((socket, peer)) => {
                    if core.pending_handshakes >= core.config.max_pending_handshakes {
                        core.stats.refused_on_accept += 1;
                        debug!(
                            "closing {peer} on accept: {} handshakes already pending",
                            core.pending_handshakes
                        );
                        continue;
                    }
                    let info = ConnInfo {
                        role: listener.role,
                        peer,
                    };
                    let tls = listener.tls.as_ref().map(TlsIdentity::config);
                    if let Err(e) = core.add_connection(self.poll.registry(), socket, info, tls) {
                        warn!("could not register connection from {peer}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_resource_exhaustion(&e) => {
                    warn!(
                        "accept on {} failed: {e}; pausing accepts for {ACCEPT_RETRY:?}",
                        listener.addr
                    );
                    core.stats.accept_pauses += 1;
                    listener.paused = true;
                    core.timers.schedule(
                        core.tick.after(ACCEPT_RETRY),
                        TimerKey::resume_accept(index),
                    );
                    return;
                }
                // ECONNABORTED and friends concern one connection only.
                Err(e) => debug!("accept on {} failed: {e}", listener.addr),
            }
        }
        self.accept_again.push(index);
    }

    /// Reads until the socket is drained, the per-turn budget is used, or
    /// backpressure.
    fn read(&mut self, token: usize, drain: Drain) {
        let mut taken = 0;
        for _ in 0..READS_PER_TURN {
            if taken >= READ_BYTES_PER_TURN {
                break;
            }
            let Some(conn) = self.core.conns.get_mut(token) else {
                return;
            };
            if conn.tls.is_some() {
                return self.read_tls(token);
            }
            if conn.read_paused {
                return;
            }
            if conn.out.len() >= self.core.config.max_outbound_buffer
                && matches!(conn.phase, Phase::Open(_))
            {
                // TCP backpressure: the peer's own requests filled its queue.
                conn.read_paused = true;
                self.core.stats.read_pauses += 1;
                return;
            }
            // The rest of a large frame goes straight into its message
            // buffer: no pass through the read buffer, no copy out of it.
            let direct = match &mut conn.phase {
                Phase::Open(open) => open.session.direct_space(self.read_buf.len()),
                _ => None,
            };
            if let Some(room) = direct {
                let wanted = room.len();
                // Into memory not yet initialized: a large message buffer
                // is not zeroed first just to be overwritten.
                match socket2::SockRef::from(&conn.socket).recv(room) {
                    Ok(0) => {
                        self.core.on_eof(token);
                        return;
                    }
                    Ok(n) => {
                        conn.last_heard = self.core.tick;
                        self.core.stats.bytes_in += n as u64;
                        taken += n;
                        self.core.direct_input(token, n);
                        if n < wanted && drain == Drain::UntilShortRead {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("conn {token}: read error: {e}");
                        self.core.drop_conn(token, "read error");
                        return;
                    }
                }
                continue;
            }
            match conn.socket.read(&mut self.read_buf) {
                Ok(0) => {
                    self.core.on_eof(token);
                    return;
                }
                Ok(n) => {
                    conn.last_heard = self.core.tick;
                    self.core.stats.bytes_in += n as u64;
                    taken += n;
                    self.core.on_input(token, &mut self.read_buf[..n]);
                    if n < self.read_buf.len() && drain == Drain::UntilShortRead {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("conn {token}: read error: {e}");
                    self.core.drop_conn(token, "read error");
                    return;
                }
            }
        }
        self.core.resume.push(token);
    }

    /// `read` for a TLS connection: hands over the plaintext the session
    /// holds, then pulls more ciphertext, until the socket says
    /// `WouldBlock` or the turn's budget is used.
    fn read_tls(&mut self, token: usize) {
        let mut taken = 0;
        for _ in 0..TLS_STEPS_PER_TURN {
            let core = &mut self.core;
            let Some(conn) = core.conns.get_mut(token) else {
                return;
            };
            let Some(key) = conn.tls else {
                // Left TLS (a plain HTTP client being answered).
                return self.read(token, Drain::UntilWouldBlock);
            };
            if conn.read_paused {
                return;
            }
            if conn.out.len() >= core.config.max_outbound_buffer
                && matches!(conn.phase, Phase::Open(_))
            {
                conn.read_paused = true;
                core.stats.read_pauses += 1;
                return;
            }
            let session = core.tls.get_mut(key);
            match session.read_plaintext(&mut self.read_buf) {
                Ok(0) => return core.on_eof(token),
                Ok(n) => {
                    core.stats.bytes_in += n as u64;
                    core.on_input(token, &mut self.read_buf[..n]);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!("conn {token}: TLS read: {e}");
                    return core.on_eof(token);
                }
            }
            if taken >= READ_BYTES_PER_TURN {
                break;
            }
            let was_handshaking = session.is_handshaking();
            match session.read_ciphertext(&mut conn.socket) {
                Ok(0) => {
                    if was_handshaking {
                        *core.stats.tls_failures.entry("eof").or_default() += 1;
                    }
                    return core.on_eof(token);
                }
                Ok(n) => {
                    taken += n;
                    conn.last_heard = core.tick;
                    if was_handshaking && !session.is_handshaking() {
                        core.stats.tls_handshakes += 1;
                    }
                    if session.has_pending_records() {
                        // Handshake messages or a key update to answer.
                        core.mark_dirty(token);
                    }
                }
                Err(TlsReadError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(TlsReadError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(TlsReadError::Io(e)) => {
                    debug!("conn {token}: read error: {e}");
                    return core.drop_conn(token, "read error");
                }
                Err(TlsReadError::PlainHttp) => return core.plain_http_on_tls(token),
                Err(TlsReadError::Protocol(e)) => {
                    let reason = failure_reason(&e);
                    *core.stats.tls_failures.entry(reason).or_default() += 1;
                    // The alert rustls queued about it gets one try.
                    let _ = conn.flush_out(&mut core.tls);
                    return core.drop_conn(token, &format!("TLS error: {e}"));
                }
            }
        }
        self.core.resume.push(token);
    }

    fn run_timers(&mut self) {
        if self
            .core
            .app
            .next_deadline()
            .is_some_and(|at| at <= self.core.now)
        {
            let now = self.core.now;
            let (app, mut out) = self.core.app_and_outbox();
            app.on_timer(now, &mut out);
        }
        // Bounded, so that however many deadlines fall due at once (and
        // whatever a handler re-arms), the loop polls again soon: signals
        // and other sockets are served between batches. What is left is
        // due at once, so the next poll does not sleep.
        for _ in 0..TIMERS_PER_TURN {
            let Some((at, timer)) = self.core.timers.pop_due(self.core.tick) else {
                break;
            };
            match timer {
                Timer::ResumeAccept { listener } => {
                    if let Some(l) = self.listeners.get_mut(listener) {
                        l.paused = false;
                        self.accept(listener);
                    }
                }
                Timer::Connection { token, serial } => {
                    let Some(conn) = self.core.conns.get_mut(token) else {
                        continue;
                    };
                    if conn.serial != serial || conn.wake_at != Some(at) {
                        continue;
                    }
                    conn.wake_at = None;
                    self.core.on_timer(token);
                }
            }
        }
    }
}

impl Core {
    fn set_now(&mut self, now: Instant) {
        self.now = now;
        self.tick = self.clock.tick(now);
    }

    fn add_connection(
        &mut self,
        registry: &mio::Registry,
        mut socket: mio::net::TcpStream,
        info: ConnInfo,
        tls: Option<&Arc<rustls::ServerConfig>>,
    ) -> io::Result<()> {
        // Frames are written whole, once per turn: Nagle would only add latency.
        socket.set_nodelay(true)?;
        if let Some(size) = self.config.socket_send_buffer {
            set_send_buffer(&socket, size)?;
        }
        let entry = self.conns.vacant_entry();
        let token = entry.key();
        if token >= FIRST_LISTENER - 64 || u32::try_from(token).is_err() {
            return Err(io::Error::other("connection table full"));
        }
        let tls = match tls {
            None => None,
            Some(config) => {
                let session = TlsSession::new(Arc::clone(config))
                    .map_err(|e| io::Error::other(format!("TLS session: {e}")))?;
                let key = self.tls.insert(session);
                Some(key.ok_or_else(|| io::Error::other("TLS session table full"))?)
            }
        };
        if let Err(e) = registry.register(
            &mut socket,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            if let Some(key) = tls {
                self.tls.remove(key);
            }
            return Err(e);
        }
        self.next_serial = next_serial(self.next_serial);
        // Covers the TLS handshake too: a client that stalls in it is cut off.
        let deadline = self.tick.after(self.config.handshake_timeout);
        entry.insert(Connection::new(
            socket,
            info,
            self.next_serial,
            self.tick,
            deadline,
            tls,
        ));
        self.pending_handshakes += 1;
        self.schedule(token, deadline);
        Ok(())
    }

    fn schedule(&mut self, token: usize, at: Tick) {
        if let Some(conn) = self.conns.get_mut(token) {
            wake_at(&mut self.timers, token, conn, at);
        }
    }

    fn mark_dirty(&mut self, token: usize) {
        if let Some(conn) = self.conns.get_mut(token) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(token);
            }
        }
    }

    fn on_input(&mut self, token: usize, input: &mut [u8]) {
        match &self.conns[token].phase {
            Phase::Handshake(_) => self.handshake_input(token, input),
            Phase::Open(_) => self.websocket_input(token, input),
            Phase::Responding { .. } => {}
        }
    }

    fn on_eof(&mut self, token: usize) {
        // A peer that half-closed may still read: give queued bytes (our
        // close reply, an HTTP response) one last chance.
        let conn = &mut self.conns[token];
        let _ = conn.flush_out(&mut self.tls);
        let reason = match &conn.phase {
            Phase::Open(open) if open.session.can_send() => "peer closed TCP without a close frame",
            _ => "peer closed TCP",
        };
        self.drop_conn(token, reason);
    }

    fn on_timer(&mut self, token: usize) {
        let now = self.tick;
        let config = self.session_config;
        let conn = &mut self.conns[token];
        match conn.on_timer(now, &config, &mut self.compressors, token) {
            Expiry::Nothing => {}
            Expiry::Idle => {
                self.stats.idle_closes += 1;
                self.stats.closes_sent += 1;
            }
            Expiry::Handshake => {
                let tls_handshaking = conn
                    .tls
                    .is_some_and(|key| self.tls.get(key).is_handshaking());
                if tls_handshaking {
                    // No HTTP answer can reach a client without a TLS session.
                    *self.stats.tls_failures.entry("timeout").or_default() += 1;
                    let reason = format!(
                        "TLS handshake not completed within {:?}",
                        self.config.handshake_timeout
                    );
                    return self.drop_conn(token, &reason);
                }
                let reason = format!(
                    "handshake not completed within {:?}",
                    self.config.handshake_timeout
                );
                // Schedules the response's own deadline.
                return self.reject(token, Rejection::new(408, reason));
            }
            Expiry::Response => {
                self.stats.response_timeouts += 1;
                return self.drop_conn(token, "client did not read the HTTP response");
            }
            Expiry::Close => {
                self.stats.close_timeouts += 1;
                let reason = format!(
                    "closing handshake not finished within {:?}",
                    config.close_timeout
                );
                return self.drop_conn(token, &reason);
            }
        }
        if !self.conns[token].out.is_empty() {
            // A ping or an idle close the session queued.
            self.mark_dirty(token);
        }
        let deadline = self.conns[token].next_deadline(config.idle_timeout);
        if deadline <= now {
            // The session rules this out; if a future change breaks that,
            // re-arming at a past deadline would spin this turn's timer
            // loop, so the connection goes instead.
            self.stats.timer_stalls += 1;
            error!("conn {token}: a timer made no progress (deadline {deadline:?}, now {now:?}); dropping it");
            return self.drop_conn(token, "timer made no progress");
        }
        self.schedule(token, deadline);
    }

    /// Writes every connection with output. Flushing can produce more
    /// output for others (a close makes the app announce a departure; a
    /// drained queue gets its drop notice), so it goes round again; what a
    /// pathological chain leaves after a few rounds waits for the next turn,
    /// which then does not sleep.
    fn flush_dirty(&mut self) {
        for _ in 0..4 {
            if self.dirty.is_empty() {
                return;
            }
            for token in std::mem::take(&mut self.dirty) {
                self.flush(token);
            }
        }
    }

    fn flush(&mut self, token: usize) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        conn.dirty = false;
        if !conn.has_unsent(&self.tls)
            && !conn.finished_after_flush()
            && !holds_states(&self.held_states, token)
        {
            return;
        }
        // While the socket takes everything, held states move into the
        // queue and are written in the same call; a few rounds at most, so
        // one connection's backlog cannot hold up the turn.
        for round in 1..=HELD_STATE_ROUNDS {
            let conn = &mut self.conns[token];
            let before = conn.out.len();
            let result = conn.flush_out(&mut self.tls);
            self.stats.bytes_out += (before - conn.out.len()) as u64;
            match result {
                Ok(true) if conn.finished_after_flush() => return self.drop_conn(token, "closed"),
                Ok(true) => {
                    let failing = conn.open_mut().is_some_and(|open| open.session.is_failed());
                    if failing && !conn.write_shut {
                        // Our close frame is out; the FIN tells the peer nothing follows.
                        conn.write_shut = true;
                        if let Some(key) = conn.tls {
                            self.tls.get_mut(key).close(&mut conn.socket);
                        }
                        let _ = conn.socket.shutdown(Shutdown::Write);
                    }
                    if self.queue_held_states(token) {
                        if round < HELD_STATE_ROUNDS {
                            continue;
                        }
                        // Still writable, more to write: the next round
                        // of flushes (or the next turn) goes on.
                        self.mark_dirty(token);
                        break;
                    }
                    let holding = holds_states(&self.held_states, token);
                    let conn = &mut self.conns[token];
                    if !holding && std::mem::take(&mut conn.drain_wanted) {
                        // Fan-out messages were dropped or held while the
                        // queue was full: the app's notices go out at the
                        // end of this turn, after the held states.
                        let (app, mut out) = self.app_and_outbox();
                        app.on_drained(token, &mut out);
                    }
                }
                Ok(false) => {
                    // The socket is full, the queue may not be: top it up,
                    // so that the next writable edge finds it ready.
                    self.queue_held_states(token);
                }
                Err(e) => return self.drop_conn(token, &format!("write error: {e}")),
            }
            break;
        }
        let conn = &mut self.conns[token];
        if conn.read_paused && conn.out.len() < self.config.max_outbound_buffer {
            conn.read_paused = false;
            self.resume.push(token);
        }
    }

    fn drop_conn(&mut self, token: usize, reason: &str) {
        let Some(mut conn) = self.conns.try_remove(token) else {
            return;
        };
        debug!("conn {token}: dropped: {reason}");
        if !self.held_states.is_empty() {
            self.held_states.remove(&token);
        }
        if let Some(key) = conn.tls {
            // close_notify tells the peer the end is deliberate, not a cut.
            self.tls.remove(key).close(&mut conn.socket);
        }
        match conn.phase {
            Phase::Handshake(_) => self.pending_handshakes -= 1,
            Phase::Open(open) => {
                self.open_websockets -= 1;
                if open.session.deflate().is_some() {
                    self.compressors.forget(token);
                }
                let (app, mut out) = self.app_and_outbox();
                app.on_close(token, open.endpoint, &mut out);
            }
            Phase::Responding { .. } => {}
        }
    }
}
