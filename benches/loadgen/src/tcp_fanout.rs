//! `tcp-fanout-server`: the floor of the broadcast benchmarks. What one
//! publisher writes is copied to every subscriber byte for byte, with no
//! WebSocket, no JSON and no channels, in a loop built like fanout's: one
//! edge-triggered mio poll, one shared read buffer read until a short
//! read, every subscriber's copy appended to its own buffer, and each
//! subscriber written once at the end of the loop turn. So the CPU it
//! spends per delivery is what the kernel and the loop cost before any
//! protocol work. `loadgen broadcast --url tcp://... --publish-url
//! tcp://...` drives it: the publisher sends the frames subscribers are
//! to receive.

use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const SUBSCRIBERS: Token = Token(usize::MAX);
const PUBLISHERS: Token = Token(usize::MAX - 1);

/// A subscriber that falls this far behind is dropped, as fanout bounds
/// its queues.
const MAX_PENDING: usize = 64 << 20;

struct Conn {
    stream: TcpStream,
    publisher: bool,
    /// Bytes not yet written (subscribers only).
    pending: Vec<u8>,
    /// Already listed to be written at the end of this turn.
    dirty: bool,
}

impl Conn {
    /// Writes `pending` until done or `WouldBlock`; false when the peer is gone.
    fn flush(&mut self) -> bool {
        crate::tcp_echo::flush_pending(&mut self.stream, &mut self.pending)
    }
}

pub fn run(listen: &str, publish_listen: &str) -> Result<String, String> {
    let parse = |flag: &str, v: &str| -> Result<SocketAddr, String> {
        let addr: SocketAddr = v.parse().map_err(|_| format!("{flag}: `{v}` is not an address"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{flag} {addr}: loopback only"));
        }
        Ok(addr)
    };
    let subs = parse("--listen", listen)?;
    let pubs = parse("--publish-listen", publish_listen)?;
    serve(subs, pubs).map_err(|e| format!("tcp-fanout-server: {e}"))
}

fn serve(subs_addr: SocketAddr, pubs_addr: SocketAddr) -> io::Result<String> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut subs_listener = crate::net::listen(subs_addr)?;
    let mut pubs_listener = crate::net::listen(pubs_addr)?;
    poll.registry()
        .register(&mut subs_listener, SUBSCRIBERS, Interest::READABLE)?;
    poll.registry()
        .register(&mut pubs_listener, PUBLISHERS, Interest::READABLE)?;
    // The same line shapes and order as fanout's (public, then internal),
    // so benches/compare.sh finds both ports.
    println!("listening on tcp://{}", subs_listener.local_addr()?);
    println!("listening on tcp://{}", pubs_listener.local_addr()?);
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut subscribers: Vec<usize> = Vec::new();
    let mut dirty: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut gone: Vec<usize> = Vec::new();
        for event in &events {
            let token = event.token();
            if token == SUBSCRIBERS || token == PUBLISHERS {
                let (listener, publisher) = if token == SUBSCRIBERS {
                    (&mut subs_listener, false)
                } else {
                    (&mut pubs_listener, true)
                };
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nodelay(true)?;
                            let entry = conns.vacant_entry();
                            let key = entry.key();
                            poll.registry().register(
                                &mut stream,
                                Token(key),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            entry.insert(Conn {
                                stream,
                                publisher,
                                pending: Vec::new(),
                                dirty: false,
                            });
                            if !publisher {
                                subscribers.push(key);
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let key = token.0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            if event.is_writable() && !conn.pending.is_empty() && !conn.flush() {
                gone.push(key);
                continue;
            }
            if !(event.is_readable() || event.is_read_closed()) {
                continue;
            }
            let publisher = conn.publisher;
            while let Some(conn) = conns.get_mut(key) {
                let n = match conn.stream.read(&mut buf) {
                    Ok(0) => {
                        gone.push(key);
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        gone.push(key);
                        break;
                    }
                };
                // Subscribers send nothing that matters (pongs at most).
                if publisher {
                    for &sub in &subscribers {
                        let s = &mut conns[sub];
                        s.pending.extend_from_slice(&buf[..n]);
                        if !s.dirty {
                            s.dirty = true;
                            dirty.push(sub);
                        }
                    }
                }
                // A short read emptied the socket (the same rule as fanout).
                if n < buf.len() {
                    break;
                }
            }
        }
        // Each subscriber written once per turn, whatever the turn brought.
        for key in dirty.drain(..) {
            let Some(s) = conns.get_mut(key) else {
                continue;
            };
            s.dirty = false;
            if !s.flush() || s.pending.len() > MAX_PENDING {
                gone.push(key);
            }
        }
        if !gone.is_empty() {
            for key in gone {
                if let Some(mut conn) = conns.try_remove(key) {
                    let _ = poll.registry().deregister(&mut conn.stream);
                }
            }
            // Once per turn, before any key can be reused by an accept.
            subscribers.retain(|&s| conns.contains(s));
        }
    }
}
