//! The single-threaded, edge-triggered mio loop. Each iteration: wait for
//! readiness or the next deadline, accept and read until `WouldBlock`, run
//! due timers, then write every connection that has output once.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::compressors::{BroadcastCache, Compressors, Part};
use super::connection::{Connection, Expiry, FragmentedEcho, Handshake, Open, Phase};
use super::listener::{is_resource_exhaustion, Listener, ACCEPT_RETRY};
use super::stats::Stats;
use super::timers::{next_serial, Clock, Tick, Timer, TimerKey, Timers};
use super::tls_identity::TlsIdentity;
use super::tls_session::{failure_reason, TlsReadError, TlsSession, TlsSessions};
use crate::app::{
    resolve, App, ConnId, ConnInfo, Endpoint, Intake, Message, Outbox, Role, SharedFrame, Target,
};
use crate::cluster::{LinkConfig, RedisLink};
use crate::config::Config;
use crate::metrics::{Labels, Metrics};
use crate::ws::decoder::MESSAGE_HEADROOM;
use crate::ws::extensions::DeflateParams;
use crate::ws::frame::{FrameHeader, RSV1};
use crate::ws::handshake::{self, Rejection, UpgradePolicy};
use crate::ws::session::{Incoming, Payload};
use crate::ws::{
    self, CloseCode, Limits, OpCode, ReceiveMode, Received, Session, SessionConfig, Violation,
};

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

fn listener_token(index: usize) -> Token {
    Token(FIRST_LISTENER - index)
}

/// Asks a running server to shut down gracefully, from any thread.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    requested: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            warn!("could not wake the event loop for shutdown: {e}");
        }
    }
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
            let mut listener = Listener::bind(addr, role, tls)?;
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
            link_config.presence_ttl = core.config.presence_ttl;
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

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Makes SIGINT and SIGTERM start a graceful shutdown, and SIGHUP
    /// reload the TLS listeners' certificates.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        let mut signals = signal_hook_mio::v1_0::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNAL, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
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

    fn on_signal(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let received: Vec<i32> = signals.pending().collect();
        if received.contains(&signal_hook::consts::SIGHUP) {
            self.reload_tls();
        }
        let stopping: Vec<i32> = received
            .into_iter()
            .filter(|&s| s != signal_hook::consts::SIGHUP)
            .collect();
        if !stopping.is_empty() {
            info!("received signal {stopping:?}: shutting down");
            self.begin_shutdown();
        }
    }

    /// Re-reads every TLS listener's certificate and key. Connections
    /// already open keep the identity they started with; a bad file keeps
    /// the listener on its previous one.
    fn reload_tls(&mut self) {
        let stats = &mut self.core.stats;
        let mut any = false;
        for listener in &mut self.listeners {
            let Some(identity) = listener.tls.as_mut() else {
                continue;
            };
            any = true;
            match identity.reload() {
                Ok(()) => {
                    stats.tls_reloads += 1;
                    info!(
                        "SIGHUP: {} now serves the certificate in {}",
                        listener.addr,
                        identity.cert_path().display()
                    );
                }
                Err(e) => {
                    stats.tls_reload_failures += 1;
                    error!(
                        "SIGHUP: {} keeps its previous certificate: {e}",
                        listener.addr
                    );
                }
            }
        }
        if !any {
            info!("SIGHUP: no TLS listener, nothing to reload");
        }
    }

    /// Stops accepting, sends 1001 to every WebSocket, and lets the loop
    /// run until they have all closed or the grace period is over.
    fn begin_shutdown(&mut self) {
        if self.core.stopping_at.is_some() {
            return;
        }
        let core = &mut self.core;
        core.stopping_at = Some(core.now + core.config.shutdown_grace);
        for listener in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut listener.socket);
        }
        self.listeners.clear();
        let tokens: Vec<usize> = core.conns.iter().map(|(token, _)| token).collect();
        for token in tokens {
            match core.conns[token].phase {
                Phase::Open(_) => core.close(token, CloseCode::GOING_AWAY, "server shutting down"),
                Phase::Handshake(_) => core.drop_conn(token, "server shutting down"),
                Phase::Responding { .. } => {}
            }
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
    /// The whole `GET /metrics` document.
    fn metrics(&self) -> String {
        let mut m = Metrics::new();
        let mut open: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        let (mut queued, mut deepest) = (0usize, 0usize);
        for (_, conn) in &self.conns {
            let (role, endpoint) = match &conn.phase {
                Phase::Open(open) => (Some(open.role), endpoint_name(open.endpoint)),
                Phase::Handshake(handshake) => (Some(handshake.info.role), "handshake"),
                Phase::Responding { .. } => (None, "http"),
            };
            let listener = match role {
                Some(Role::Public) => "public",
                Some(Role::Internal) => "internal",
                None => "unknown",
            };
            *open.entry((listener, endpoint)).or_default() += 1;
            queued += conn.out.len();
            deepest = deepest.max(conn.out.len());
        }
        let samples: Vec<([(&str, &str); 2], f64)> = open
            .iter()
            .map(|((l, e), n)| ([("listener", *l), ("endpoint", *e)], *n as f64))
            .collect();
        let samples: Vec<(Labels<'_>, f64)> = samples.iter().map(|(l, n)| (&l[..], *n)).collect();
        m.family(
            "fanout_connections",
            "Open connections by listener and endpoint (handshake and http: not upgraded).",
            "gauge",
            &samples,
        );
        m.gauge(
            "fanout_outbound_queued_bytes",
            "Bytes queued for all clients.",
            queued as f64,
        );
        m.gauge(
            "fanout_outbound_queue_max_bytes",
            "The deepest client queue, in bytes.",
            deepest as f64,
        );
        self.stats.write_metrics(&mut m);
        self.compressors.write_metrics(&mut m);
        self.app.write_metrics(&mut m);
        m.finish()
    }

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
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.wake_at.is_some_and(|scheduled| scheduled <= at) {
            return;
        }
        conn.wake_at = Some(at);
        self.timers
            .schedule(at, TimerKey::connection(token, conn.serial));
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

    fn handshake_input(&mut self, token: usize, input: &[u8]) {
        let max = self.config.max_header_bytes;
        let too_large = || Rejection::new(431, format!("request head larger than {max} bytes"));
        let Phase::Handshake(handshake) = &mut self.conns[token].phase else {
            return;
        };
        let request = &mut handshake.request;
        let scan_from = request.len().saturating_sub(2);
        request.extend_from_slice(input);
        // Parse only once a blank line may have arrived, so a client that
        // dribbles one byte at a time does not cost a full parse per byte.
        let blank_line = request[scan_from..].windows(2).any(|w| w == b"\n\n")
            || request[scan_from.saturating_sub(1)..]
                .windows(3)
                .any(|w| w == b"\n\r\n");
        let received = request.len();
        let parsed = if blank_line {
            handshake::parse_request(request)
        } else {
            Ok(None)
        };
        let (request_head, consumed) = match parsed {
            Err(rejection) => return self.reject(token, rejection),
            Ok(None) if received > max => return self.reject(token, too_large()),
            Ok(None) => return,
            Ok(Some((_, consumed))) if consumed > max => return self.reject(token, too_large()),
            Ok(Some(found)) => found,
        };
        match resolve(&request_head.path) {
            Target::Page => {
                let page = crate::app::PAGE_HTML.as_bytes();
                let response = handshake::http_response(200, &[], "text/html; charset=utf-8", page);
                self.respond(token, &response, "web page");
            }
            Target::Health => {
                let response =
                    handshake::http_response(200, &[], "text/plain; charset=utf-8", b"ok\n");
                self.respond(token, &response, "health check");
            }
            Target::Ready if self.stopping_at.is_some() => {
                self.reject(token, Rejection::new(503, "shutting down"));
            }
            Target::Ready if self.app.cluster_ready() == Some(false) => {
                self.reject(token, Rejection::new(503, "redis link not up"));
            }
            Target::Ready => {
                // Listeners are bound before the loop runs; a node with a
                // cluster link also requires it to be up.
                let response =
                    handshake::http_response(200, &[], "text/plain; charset=utf-8", b"ready\n");
                self.respond(token, &response, "readiness check");
            }
            Target::Metrics
                if self.config.metrics_internal_only && handshake.info.role != Role::Internal =>
            {
                self.reject(
                    token,
                    Rejection::new(403, "metrics are served on internal listeners only"),
                );
            }
            Target::Metrics => {
                let text = self.metrics();
                let response = handshake::http_response(
                    200,
                    &[],
                    "text/plain; version=0.0.4; charset=utf-8",
                    text.as_bytes(),
                );
                self.respond(token, &response, "metrics");
            }
            Target::NotFound => {
                let reason = format!("no endpoint at {}", request_head.path);
                self.reject(token, Rejection::new(404, reason));
            }
            Target::WebSocket(endpoint) => {
                match handshake::validate_upgrade(&request_head, &self.policy) {
                    Err(rejection) => self.reject(token, rejection),
                    Ok(_) if self.open_websockets >= self.config.max_connections => {
                        let reason = format!(
                            "connection limit of {} reached",
                            self.config.max_connections
                        );
                        self.reject(token, Rejection::new(503, reason));
                    }
                    Ok(accepted) => self.upgrade(
                        token,
                        endpoint,
                        &handshake::accept_response(&accepted),
                        consumed,
                        accepted.deflate.map(|(params, _)| params),
                    ),
                }
            }
        }
    }

    fn upgrade(
        &mut self,
        token: usize,
        endpoint: Endpoint,
        response: &[u8],
        consumed: usize,
        deflate: Option<DeflateParams>,
    ) {
        let conn = &mut self.conns[token];
        let Phase::Handshake(handshake) = &conn.phase else {
            unreachable!("upgrade is only called during the handshake");
        };
        let open = Phase::Open(Open {
            session: Session::new(ws::Role::Server, deflate, self.tick, &self.session_config),
            endpoint,
            role: handshake.info.role,
            fragmented_echo: None,
        });
        let Phase::Handshake(handshake) = std::mem::replace(&mut conn.phase, open) else {
            unreachable!("upgrade is only called during the handshake");
        };
        // The request buffer goes with the handshake; frames the client
        // sent right behind its request are decoded from it once.
        let Handshake {
            mut request, info, ..
        } = *handshake;
        conn.out.push_bytes(response);
        self.pending_handshakes -= 1;
        self.open_websockets += 1;
        self.stats.upgrades += 1;
        self.mark_dirty(token);
        let deadline = self.conns[token].next_deadline(self.config.idle_timeout);
        self.schedule(token, deadline);
        let now = self.now;
        let (app, mut out) = self.app_and_outbox();
        app.on_open(token, endpoint, info, now, &mut out);
        if request.len() > consumed {
            self.websocket_input(token, &mut request[consumed..]);
        }
    }

    /// A client spoke plain HTTP to a TLS listener: it gets a plain HTTP
    /// 400 saying so (it could read nothing else), then the close.
    fn plain_http_on_tls(&mut self, token: usize) {
        *self.stats.tls_failures.entry("plain_http").or_default() += 1;
        let conn = &mut self.conns[token];
        if let Some(key) = conn.tls.take() {
            self.tls.remove(key);
        }
        let reason = "this port speaks TLS only: use https:// or wss://";
        self.reject(token, Rejection::new(400, reason));
    }

    fn reject(&mut self, token: usize, rejection: Rejection) {
        *self.stats.rejections.entry(rejection.status).or_default() += 1;
        let response = rejection.to_response();
        self.respond(token, &response, &rejection.reason);
    }

    /// Queues a final HTTP response; the connection closes once it is sent.
    fn respond(&mut self, token: usize, response: &[u8], what: &str) {
        let conn = &mut self.conns[token];
        debug!("conn {token}: HTTP response: {what}");
        if matches!(conn.phase, Phase::Handshake(_)) {
            self.pending_handshakes -= 1;
        }
        let deadline = conn.phase.respond(self.tick, self.config.close_timeout);
        conn.out.push_bytes(response);
        self.mark_dirty(token);
        self.schedule(token, deadline);
    }

    fn websocket_input(&mut self, token: usize, input: &mut [u8]) {
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
    /// buffer (see [`Session::direct_space`]).
    fn direct_input(&mut self, token: usize, filled: usize) {
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
    fn on_received(&mut self, token: usize, intake: Intake, received: Received<'_>) {
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
    fn closing(&mut self, token: usize) {
        self.mark_dirty(token);
        if let Some(conn) = self.conns.get(token) {
            let deadline = conn.next_deadline(self.config.idle_timeout);
            self.schedule(token, deadline);
        }
    }

    /// A whole message to a reflecting endpoint goes straight back: its own
    /// buffer when it has one (no copy), else a copy of the bytes it
    /// borrowed from the read buffer; compressed if that was agreed.
    fn reflect(&mut self, token: usize, message: Incoming<'_>) {
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

    /// A binary message being streamed back by a reflecting endpoint
    /// begins: its reply frame's header is queued, or, with
    /// permessage-deflate, its reply is to go out compressed in fragments.
    fn echo_stream_start(&mut self, token: usize, len: u64) {
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
    fn echo_stream_chunk(&mut self, token: usize, payload: &[u8], last: bool) {
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

    /// Starts the closing handshake from our side.
    fn close(&mut self, token: usize, code: CloseCode, reason: &str) {
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
        if !conn.has_unsent(&self.tls) && !conn.finished_after_flush() {
            return;
        }
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
                if std::mem::take(&mut conn.drain_wanted) {
                    // Fan-out messages were dropped while the queue was full:
                    // the app's notices go out at the end of this turn.
                    let (app, mut out) = self.app_and_outbox();
                    app.on_drained(token, &mut out);
                }
            }
            Ok(false) => {}
            Err(e) => return self.drop_conn(token, &format!("write error: {e}")),
        }
        let conn = &mut self.conns[token];
        if conn.read_paused && conn.out.len() < self.config.max_outbound_buffer {
            conn.read_paused = false;
            self.resume.push(token);
        }
    }

    /// Splits the core into the app and the outbox it answers through.
    fn app_and_outbox(&mut self) -> (&mut App, Delivery<'_>) {
        let Core {
            app,
            conns,
            tls,
            compressors,
            dirty,
            timers,
            config,
            stats,
            tick,
            session_config,
            ..
        } = self;
        (
            app,
            Delivery {
                session_config: *session_config,
                conns,
                tls,
                dirty,
                timers,
                config,
                stats,
                tick: *tick,
                compressors,
                broadcast: BroadcastCache::default(),
            },
        )
    }

    fn drop_conn(&mut self, token: usize, reason: &str) {
        let Some(mut conn) = self.conns.try_remove(token) else {
            return;
        };
        debug!("conn {token}: dropped: {reason}");
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

/// What an open connection agreed for permessage-deflate.
fn deflate_params(conn: &Connection) -> Option<DeflateParams> {
    match &conn.phase {
        Phase::Open(open) => open.session.deflate(),
        _ => None,
    }
}

fn endpoint_name(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Echo => "echo",
        Endpoint::Ws => "ws",
        Endpoint::Chat => "chat",
        Endpoint::Kline => "kline",
    }
}

/// The app's view of the connection table.
struct Delivery<'a> {
    session_config: SessionConfig,
    conns: &'a mut Slab<Connection>,
    tls: &'a mut TlsSessions,
    dirty: &'a mut Vec<usize>,
    timers: &'a mut Timers,
    config: &'a Config,
    stats: &'a mut Stats,
    tick: Tick,
    compressors: &'a mut Compressors,
    /// A fan-out's compressed frames, so it compresses once per window.
    broadcast: BroadcastCache,
}

impl Delivery<'_> {
    /// The frame to queue for `to` in place of `frame` when `to` agreed to
    /// permessage-deflate and the frame is worth compressing.
    fn deflated_frame(
        &mut self,
        to: ConnId,
        params: Option<DeflateParams>,
        frame: &SharedFrame,
    ) -> Option<SharedFrame> {
        self.broadcast
            .frame_for(self.compressors, to, params?, frame)
    }

    fn open_conn(&mut self, to: ConnId) -> Option<&mut Connection> {
        open_conn(self.conns, self.dirty, to)
    }
}

/// The connection `to` if it is open for messages, marked for this
/// turn's flush.
fn open_conn<'c>(
    conns: &'c mut Slab<Connection>,
    dirty: &mut Vec<usize>,
    to: ConnId,
) -> Option<&'c mut Connection> {
    let conn = conns.get_mut(to)?;
    let open = matches!(&conn.phase, Phase::Open(o) if o.session.can_send());
    if !conn.dirty && open {
        conn.dirty = true;
        dirty.push(to);
    }
    open.then_some(conn)
}

/// `part` in a buffer with `MESSAGE_HEADROOM` bytes in front, for
/// `Outbound::push_fragment`.
fn uncompressed(part: &[u8]) -> Vec<u8> {
    let mut buffer = Vec::with_capacity(MESSAGE_HEADROOM + part.len());
    buffer.resize(MESSAGE_HEADROOM, 0);
    buffer.extend_from_slice(part);
    buffer
}

impl Outbox for Delivery<'_> {
    fn reply_shared(&mut self, to: ConnId, frame: &SharedFrame) {
        let Some(conn) = self.open_conn(to) else {
            return;
        };
        let params = deflate_params(conn);
        let deflated = self.deflated_frame(to, params, frame);
        self.conns[to]
            .out
            .push_shared(deflated.as_ref().unwrap_or(frame));
    }

    fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool {
        let limit = self.config.max_outbound_buffer;
        // A connection that is gone or closing is not slow: nothing to report.
        let Some(conn) = open_conn(self.conns, self.dirty, to) else {
            return true;
        };
        let params = deflate_params(conn);
        let deflated = self.deflated_frame(to, params, frame);
        let frame = deflated.as_ref().unwrap_or(frame);
        let conn = &mut self.conns[to];
        let mut written = 0;
        if conn.out.len() + frame.bytes().len() > limit {
            // The queue may be full only because this turn has not written
            // yet: give the socket what it takes before calling it slow.
            let before = conn.out.len();
            let _ = conn.flush_out(self.tls);
            written = before - conn.out.len();
        }
        let fits = conn.out.len() + frame.bytes().len() <= limit;
        if fits {
            conn.out.push_shared(frame);
            self.stats.deliveries += 1;
        } else {
            conn.drain_wanted = true;
            self.stats.delivery_drops += 1;
        }
        self.stats.bytes_out += written as u64;
        fits
    }

    fn reply(&mut self, to: ConnId, message: Message<'_>) {
        let (opcode, payload) = match message {
            Message::Text(text) => (OpCode::Text, text.as_bytes()),
            Message::Binary(bytes) => (OpCode::Binary, bytes),
        };
        let Some(conn) = self.open_conn(to) else {
            return;
        };
        if let Some(params) = deflate_params(conn) {
            if let Some(buffer) = self.compressors.deflate(to, params, payload) {
                self.conns[to]
                    .out
                    .push_deflated(opcode, buffer, MESSAGE_HEADROOM);
                return;
            }
        }
        self.conns[to].out.push_frame(opcode, payload);
    }

    fn close(&mut self, to: ConnId, code: CloseCode, reason: &str) {
        let Some(conn) = open_conn(self.conns, self.dirty, to) else {
            return;
        };
        let Some((open, mut host)) = conn.session_and_host(self.compressors, to) else {
            return;
        };
        let config = &self.session_config;
        if !open
            .session
            .close(code, reason, self.tick, config, &mut host)
        {
            return;
        }
        self.stats.closes_sent += 1;
        let at = conn.next_deadline(config.idle_timeout);
        if conn.wake_at.is_none_or(|w| at < w) {
            conn.wake_at = Some(at);
            let key = TimerKey::connection(to, conn.serial);
            self.timers.schedule(at, key);
        }
    }
}
