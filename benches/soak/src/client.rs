//! One WebSocket client of the soak: a tungstenite session over a
//! non-blocking socket registered with the harness's mio poll. The upgrade
//! itself is blocking (a few hundred µs on loopback), which keeps the
//! client simple; everything after it never blocks.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use socket2::{Domain, Protocol, Socket, Type};
use tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tungstenite::{Message, WebSocket};

use crate::filters::Filters;
use crate::offsets::OffsetTracker;

/// What a client is for, and what it has seen so far (kept across
/// reconnects: a subscriber resumes where it was).
pub enum Role {
    /// A channel subscriber on the public listener.
    Subscriber {
        channel: String,
        tracker: OffsetTracker,
        /// The last `subscribe` asked for a replay (`since`).
        with_since: bool,
        /// This connection's subscription exists (its ack arrived).
        subscribed: bool,
        /// It may be paused (a socket with a small receive buffer).
        slow: bool,
    },
    /// A registration-protocol consumer.
    Registered { filters: Filters },
    /// A JSON chat client in one room.
    Chat {
        room: String,
        next_say: Instant,
        said: u64,
    },
    /// A trusted publisher on the internal listener.
    Publisher,
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub role: Role,
    /// Reading is paused until then (a slow consumer).
    pub paused_until: Option<Instant>,
    /// We sent a close (churn): its end is expected.
    pub leaving: bool,
    /// The connection ended (closed, failed); it is dropped next.
    pub ended: bool,
    /// The server's close code, if one came.
    pub close_code: Option<u16>,
}

/// How a client sees the end of a read.
pub enum ReadOutcome {
    Message(String),
    /// Nothing more for now.
    Idle,
    /// A close frame (its code), or the connection ended without one.
    Closed(Option<u16>, String),
}

impl Client {
    /// Connects and upgrades to `ws://addr/path`, then registers the
    /// socket for edge-triggered readiness.
    pub fn open(
        addr: SocketAddr,
        path: &str,
        role: Role,
        registry: &Registry,
        token: Token,
    ) -> Result<Client, String> {
        let slow = matches!(role, Role::Subscriber { slow: true, .. });
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| format!("socket: {e}"))?;
        if slow {
            // So a paused reader backs up into the server's queue soon.
            let _ = socket.set_recv_buffer_size(4096);
        }
        socket
            .connect_timeout(&addr.into(), Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true).ok();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}{path}");
        let (ws, _) =
            tungstenite::client(url.as_str(), stream).map_err(|e| format!("upgrade {url}: {e}"))?;
        ws.get_ref()
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let fd = ws.get_ref().as_raw_fd();
        registry
            .register(
                &mut SourceFd(&fd),
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("register: {e}"))?;
        Ok(Client {
            ws,
            role,
            paused_until: None,
            leaving: false,
            ended: false,
            close_code: None,
        })
    }

    pub fn deregister(&self, registry: &Registry) {
        let fd = self.ws.get_ref().as_raw_fd();
        let _ = registry.deregister(&mut SourceFd(&fd));
    }

    /// Queues a text message and writes what the socket takes.
    pub fn send(&mut self, text: String) -> Result<(), String> {
        match self.ws.send(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Writes what is queued (on writable).
    pub fn flush(&mut self) {
        match self.ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {}
        }
    }

    /// The next message, or why there is none.
    pub fn read(&mut self) -> ReadOutcome {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => return ReadOutcome::Message(text),
                Ok(Message::Close(frame)) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code));
                    let reason = frame.map(|f| f.reason.into_owned()).unwrap_or_default();
                    self.close_code = code;
                    // tungstenite queued the answer; write it.
                    self.flush();
                    return ReadOutcome::Closed(code, reason);
                }
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return ReadOutcome::Idle
                }
                Err(e) => return ReadOutcome::Closed(None, e.to_string()),
            }
        }
    }

    /// Leaves cleanly: a close frame (1000), written at once.
    pub fn leave(&mut self) {
        self.leaving = true;
        let _ = self.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "soak churn".into(),
        }));
        self.flush();
    }
}
