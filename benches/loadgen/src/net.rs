//! Connections on one mio poll: opening them (TCP connect, upgrade, and
//! fanout's channel setup) with a bounded number in progress, reading
//! until `WouldBlock`, and writing queued frames.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::stats::{Clock, Hist};
use crate::deflate::Offer;
use crate::tls;
use crate::ws::{self, Event, Rx};

/// A `ws://` or `wss://` (or, for the no-WebSocket floor, `tcp://`) URL
/// on loopback.
#[derive(Clone, Debug)]
pub struct Url {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    /// `tcp://`: no upgrade, and frames go unmasked, since a raw TCP echo
    /// returns them unchanged and they must parse as server frames.
    pub raw_tcp: bool,
    /// `wss://`: whether the URL asks for TLS...
    pub wss: bool,
    /// ...and the client configuration for it (from `--tls-ca`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Url {
    /// Parses `ws://HOST:PORT/PATH`, `wss://HOST:PORT/PATH` or
    /// `tcp://HOST:PORT`; refuses anything but 127.0.0.0/8 (`localhost` is
    /// taken as 127.0.0.1).
    pub fn parse(url: &str) -> Result<Url, String> {
        let (rest, raw_tcp, wss) = if let Some(rest) = url.strip_prefix("ws://") {
            (rest, false, false)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (rest, false, true)
        } else if let Some(rest) = url.strip_prefix("tcp://") {
            (rest, true, false)
        } else {
            return Err(format!("{url}: only ws://, wss:// (and tcp:// for the floor) URLs are supported"));
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let hostport = if host.starts_with("localhost:") {
            host.replacen("localhost", "127.0.0.1", 1)
        } else {
            host.to_owned()
        };
        // An IP literal only: no name lookups.
        let addr: SocketAddr = hostport
            .parse()
            .map_err(|_| format!("{url}: host must be 127.x.x.x:PORT or localhost:PORT"))?;
        match addr.ip() {
            IpAddr::V4(ip) if ip.octets()[0] == 127 => {}
            ip => return Err(format!("{url}: refusing {ip}: loopback (127.0.0.0/8) only")),
        }
        Ok(Url { addr, host: host.to_owned(), path: path.to_owned(), raw_tcp, wss, tls: None })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshake,
    Open,
    Closed,
}

/// Application-level setup after the upgrade (fanout's `/ws`).
#[derive(Debug)]
pub enum Setup {
    /// Nothing to do.
    Ready,
    /// Wait for the `welcome` message, send this frame, then wait for its ack.
    AfterWelcome(Vec<u8>),
    WaitAck,
    /// Send this frame once upgraded, then wait for any message (its echo).
    EchoOnce(Vec<u8>),
    WaitEcho,
}

pub struct Conn {
    pub stream: TcpStream,
    /// `wss://`: everything goes through this session.
    pub tls: Option<Box<rustls::ClientConnection>>,
    pub state: State,
    pub setup: Setup,
    hs: Vec<u8>,
    pub rx: Rx,
    /// Complete frames waiting to be written, and how much of them went.
    pub out: Vec<u8>,
    pub out_off: usize,
    /// False after a write met `WouldBlock`, until the next writable event.
    pub writable: bool,
    pub t_start: u64,
    pub t_open: u64,
    // echo: frames owed to the socket from the shared block, the offset
    // into the first of them, and the send times of the frames in flight.
    pub tx_pending: u32,
    pub tx_off: usize,
    pub ring: Vec<u64>,
    pub ring_head: usize,
    pub ring_len: usize,
    // broadcast subscriber: the sequence number expected next.
    pub next_seq: u64,
}

impl Conn {
    #[inline]
    pub fn ring_push(&mut self, t: u64) {
        let cap = self.ring.len();
        let at = (self.ring_head + self.ring_len) % cap;
        self.ring[at] = t;
        self.ring_len += 1;
    }

    #[inline]
    pub fn ring_pop(&mut self) -> Option<u64> {
        if self.ring_len == 0 {
            return None;
        }
        let t = self.ring[self.ring_head];
        self.ring_head = (self.ring_head + 1) % self.ring.len();
        self.ring_len -= 1;
        Some(t)
    }

    /// Queues a pong answering the ping just parsed.
    pub fn queue_pong(&mut self) {
        ws::push_frame(&mut self.out, ws::OP_PONG, self.rx.control());
    }


    /// Reads plaintext from the socket, or through TLS.
    #[inline]
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.tls.as_mut() {
            None => self.stream.read(buf),
            Some(tls) => tls::recv(tls, &mut self.stream, buf),
        }
    }

    /// On a writable event: TLS records left in the session go out (a
    /// plain connection has none). Clears `writable` if the socket is full.
    pub fn push_records(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        match tls::push_records(tls, &mut self.stream) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.writable = false;
                Ok(())
            }
            other => other,
        }
    }

    /// Writes `out` until done or `WouldBlock`; true when all of it went.
    pub fn flush_out(&mut self) -> io::Result<bool> {
        while self.out_off < self.out.len() {
            match send(&mut self.stream, &mut self.tls, &self.out[self.out_off..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.out_off += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.writable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Keeps its capacity: no allocation next time.
        self.out.clear();
        self.out_off = 0;
        Ok(true)
    }

    /// Reads until `WouldBlock`, handing every complete event to `f`.
    /// Ok(false) on end of stream.
    #[inline]
    pub fn read_events(&mut self, buf: &mut [u8], mut f: impl FnMut(&mut Conn, Event)) -> io::Result<bool> {
        loop {
            match self.recv(buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    let data = &buf[..n];
                    let mut pos = 0;
                    while let Some(ev) = self.rx.next(data, &mut pos) {
                        f(self, ev);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes with a reset (SO_LINGER 0): no TIME_WAIT left behind by runs
    /// of thousands of connections.
    pub fn reset(&mut self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
        self.state = State::Closed;
    }
}

/// Writes plaintext to the socket, or through its TLS session (fields of
/// a `Conn`, taken apart so its buffers can be written from).
#[inline]
pub fn send(stream: &mut TcpStream, tls: &mut Option<Box<rustls::ClientConnection>>, bytes: &[u8]) -> io::Result<usize> {
    match tls.as_mut() {
        None => stream.write(bytes),
        Some(tls) => tls::send(tls, stream, bytes),
    }
}

/// Source addresses connections are spread over (127.0.0.1 to 127.0.0.N):
/// with one source address, tens of thousands of connections to one port
/// make the kernel's ephemeral port search in `connect()` slow.
const SOURCES: u32 = 8;

/// A non-blocking connect from 127.0.0.(1 + n % SOURCES), the port picked
/// by `connect()` itself (IP_BIND_ADDRESS_NO_PORT).
fn connect_from(n: usize, to: SocketAddr) -> io::Result<TcpStream> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::new(ErrorKind::InvalidInput, "IPv4 only"));
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sockaddr = |ip: u32, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: ip.to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let from = sockaddr(0x7f00_0001 + (n as u32 % SOURCES), 0);
        if libc::bind(fd, &from as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let dest = sockaddr(u32::from(*to.ip()), to.port());
        if libc::connect(fd, &dest as *const _ as *const libc::sockaddr, len) != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(TcpStream::from_std(stream))
    }
}

/// What opening a batch of connections came to.
#[derive(Default)]
pub struct Opened {
    pub ready: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    /// Connect to upgrade response, per connection.
    pub handshake: Hist,
    pub first_start: u64,
    pub last_ready: u64,
}

impl Opened {
    fn fail(&mut self, why: String) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why);
        }
    }
}

pub struct Net {
    pub poll: Poll,
    pub events: Events,
    pub conns: Vec<Conn>,
    pub buf: Vec<u8>,
    pub clock: Clock,
    /// permessage-deflate to offer; the server must accept it.
    pub deflate: Option<Offer>,
    /// What the server answered (the first connection's), for the summary.
    pub agreed: Option<String>,
}

/// Raises the soft descriptor limit to the hard one.
pub fn raise_fd_limit() {
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

impl Net {
    pub fn new(clock: Clock, read_buffer: usize) -> io::Result<Net> {
        Ok(Net {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            buf: vec![0; read_buffer],
            deflate: None,
            agreed: None,
            clock,
        })
    }

    /// Opens `n` more connections to `url` (appended to `conns`, token =
    /// index), at most `concurrency` of them between connect and ready,
    /// and takes each through `setup()`. Stops at `deadline`: what is not
    /// ready then counts as failed. Connections already open are serviced
    /// meanwhile (pings answered, other input discarded).
    pub fn open(
        &mut self,
        url: &Url,
        n: usize,
        concurrency: usize,
        deadline: Instant,
        setup: impl Fn() -> Setup,
    ) -> Opened {
        let request = if url.raw_tcp {
            Vec::new()
        } else {
            ws::upgrade_request(&url.host, &url.path, self.deflate.map(Offer::header_value))
        };
        let raw_tcp = url.raw_tcp;
        let first = self.conns.len();
        let mut report = Opened { first_start: self.clock.ns(), ..Default::default() };
        let mut started = 0;
        let mut in_progress = 0usize;
        while report.ready + report.failed < n {
            let now = Instant::now();
            if now >= deadline {
                let left = n - report.ready - report.failed;
                report.fail(format!("{left} connection(s) not ready before the deadline"));
                report.failed += left - 1;
                for conn in &mut self.conns[first..] {
                    let ready = conn.state == State::Open && matches!(conn.setup, Setup::Ready);
                    if conn.state != State::Closed && !ready {
                        conn.reset();
                        let _ = self.poll.registry().deregister(&mut conn.stream);
                    }
                }
                break;
            }
            while started < n && in_progress < concurrency {
                started += 1;
                match connect_from(self.conns.len(), url.addr) {
                    Ok(mut stream) => {
                        let token = Token(self.conns.len());
                        if let Err(e) = self.poll.registry().register(
                            &mut stream,
                            token,
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            report.fail(format!("register: {e}"));
                            continue;
                        }
                        let tls = match &url.tls {
                            None => None,
                            Some(config) => match tls::session(config, &url.host) {
                                Ok(session) => Some(session),
                                Err(e) => {
                                    report.fail(format!("TLS: {e}"));
                                    continue;
                                }
                            },
                        };
                        self.conns.push(Conn {
                            stream,
                            tls,
                            state: State::Connecting,
                            setup: setup(),
                            hs: Vec::new(),
                            rx: Rx::default(),
                            out: request.clone(),
                            out_off: 0,
                            writable: false,
                            t_start: self.clock.ns(),
                            t_open: 0,
                            tx_pending: 0,
                            tx_off: 0,
                            ring: Vec::new(),
                            ring_head: 0,
                            ring_len: 0,
                            next_seq: 0,
                        });
                        in_progress += 1;
                    }
                    Err(e) => report.fail(format!("connect {}: {e}", url.addr)),
                }
            }
            let timeout = deadline.saturating_duration_since(now).min(Duration::from_millis(100));
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
                if e.kind() != ErrorKind::Interrupted {
                    report.fail(format!("poll: {e}"));
                    return report;
                }
            }
            let tokens: Vec<(usize, bool)> = self.events.iter().map(|e| (e.token().0, e.is_writable())).collect();
            for (idx, writable) in tokens {
                let conn = &mut self.conns[idx];
                if writable {
                    conn.writable = true;
                }
                let was_ready = conn.state == State::Open && matches!(conn.setup, Setup::Ready);
                if conn.state == State::Closed {
                    continue;
                }
                match self.advance(idx, raw_tcp) {
                    Ok(()) => {
                        let conn = &self.conns[idx];
                        if idx >= first && !was_ready && conn.state == State::Open && matches!(conn.setup, Setup::Ready) {
                            in_progress -= 1;
                            report.ready += 1;
                            report.last_ready = self.clock.ns();
                            report.handshake.record(conn.t_open.saturating_sub(conn.t_start));
                        }
                    }
                    Err(why) => {
                        let conn = &mut self.conns[idx];
                        conn.reset();
                        let _ = self.poll.registry().deregister(&mut conn.stream);
                        if idx >= first && !was_ready {
                            in_progress -= 1;
                            report.fail(why);
                        } else {
                            eprintln!("loadgen: connection {idx} lost while opening others: {why}");
                        }
                    }
                }
            }
        }
        report
    }

    /// Moves one connection along: connect, upgrade, setup; for a ready
    /// one, answers pings and discards the rest.
    fn advance(&mut self, idx: usize, raw_tcp: bool) -> Result<(), String> {
        let clock = self.clock;
        let conn = &mut self.conns[idx];
        if conn.state == State::Connecting {
            if let Ok(Some(e)) | Err(e) = conn.stream.take_error() {
                return Err(format!("connect: {e}"));
            }
            match conn.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
            let _ = conn.stream.set_nodelay(true);
            conn.writable = true;
            if raw_tcp {
                conn.state = State::Open;
                conn.t_open = clock.ns();
                return Ok(());
            }
            conn.state = State::Handshake;
        }
        if conn.writable {
            conn.push_records().map_err(|e| format!("write: {e}"))?;
        }
        if conn.writable && conn.out_off < conn.out.len() {
            conn.flush_out().map_err(|e| format!("write: {e}"))?;
        }
        if conn.state == State::Handshake {
            loop {
                match conn.recv(&mut self.buf) {
                    Ok(0) => return Err("closed during the upgrade".into()),
                    Ok(n) => {
                        conn.hs.extend_from_slice(&self.buf[..n]);
                        if let Some(end) = conn.hs.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head_end = end + 4;
                            ws::check_response(&conn.hs[..head_end])?;
                            if self.deflate.is_some() {
                                let agreed = ws::response_extensions(&conn.hs[..head_end])
                                    .filter(|e| e.starts_with("permessage-deflate"))
                                    .ok_or("the server declined permessage-deflate")?;
                                conn.rx.deflate = true;
                                // Standalone messages: their start can be inflated alone.
                                conn.rx.inflate_capture = agreed.contains("server_no_context_takeover");
                                if conn.rx.inflate_capture && conn.rx.capture_limit > 0 {
                                    conn.rx.capture_limit = ws::CAPTURE_DEFLATED as u16;
                                }
                                self.agreed.get_or_insert(agreed);
                            }
                            if let Setup::EchoOnce(frame) = &conn.setup {
                                conn.out.extend_from_slice(frame);
                                conn.setup = Setup::WaitEcho;
                            }
                            let hs = std::mem::take(&mut conn.hs);
                            conn.state = State::Open;
                            conn.t_open = clock.ns();
                            let mut pos = head_end;
                            let mut result = Ok(());
                            while let Some(ev) = conn.rx.next(&hs, &mut pos) {
                                if let Err(e) = setup_event(conn, ev) {
                                    result = Err(e);
                                }
                            }
                            result?;
                            break;
                        }
                        if conn.hs.len() > 16 * 1024 {
                            return Err("upgrade response head too large".into());
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
        // Open: setup messages, pings; anything else is discarded.
        let mut result = Ok(());
        let open = conn
            .read_events(&mut self.buf, |c, ev| {
                if let Err(e) = setup_event(c, ev) {
                    result = Err(e);
                }
            })
            .map_err(|e| format!("read: {e}"))?;
        result?;
        if !open {
            return Err("closed by the server".into());
        }
        if conn.writable && conn.out_off < conn.out.len() {
            conn.flush_out().map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }
}

fn setup_event(conn: &mut Conn, ev: Event) -> Result<(), String> {
    match ev {
        Event::Ping => conn.queue_pong(),
        Event::Pong => {}
        Event::Close { code } => return Err(format!("server closed with {code}")),
        Event::Error(e) => return Err(format!("protocol error: {e}")),
        Event::Message { .. } => match std::mem::replace(&mut conn.setup, Setup::Ready) {
            Setup::AfterWelcome(frame) => {
                conn.out.extend_from_slice(&frame);
                conn.setup = Setup::WaitAck;
            }
            Setup::WaitAck => {
                let text = conn.rx.captured();
                if text.starts_with(br#"{"type":"ack""#) {
                    conn.setup = Setup::Ready;
                } else if text.starts_with(br#"{"type":"error""#) {
                    return Err(format!("setup refused: {}", String::from_utf8_lossy(text)));
                } else {
                    conn.setup = Setup::WaitAck;
                }
            }
            Setup::Ready | Setup::WaitEcho => {}
            Setup::EchoOnce(_) => return Err("a message before the first was sent".into()),
        },
    }
    Ok(())
}

/// A text payload of `size` bytes (printable ASCII: valid UTF-8).
pub fn text_payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A binary payload of `size` bytes (xorshift noise).
pub fn binary_payload(size: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The accept queue of the floor servers: as large as fanout's default
/// (`--listen-backlog`), since std's and mio's 128 overflows when a
/// thousand subscribers connect at once, and a floor server cannot resend
/// what a late subscriber missed.
const FLOOR_BACKLOG: libc::c_int = 1024;

/// A non-blocking listener on `addr` with [`FLOOR_BACKLOG`].
pub fn listen(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    // listen(2) again on a listening socket only changes its backlog.
    // SAFETY: the descriptor is the live listener's own; listen has no
    // memory effects.
    if unsafe { libc::listen(listener.as_raw_fd(), FLOOR_BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(mio::net::TcpListener::from_std(listener))
}
