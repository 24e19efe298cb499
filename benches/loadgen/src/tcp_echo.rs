//! `tcp-echo-server`: the floor of the echo benchmarks. A TCP echo with no
//! WebSocket at all, built like fanout's loop (one edge-triggered mio poll,
//! one shared read buffer, read until a short read, write back at once),
//! so the CPU it spends per message is what the kernel and the loop cost
//! before any protocol work. `loadgen echo --url tcp://...` drives it.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);

struct Client {
    stream: TcpStream,
    /// Bytes read but not yet written back (the socket said `WouldBlock`).
    pending: Vec<u8>,
}

/// Writes `pending` to `stream` until done or `WouldBlock`, keeping what
/// is left; false when the peer is gone.
pub fn flush_pending(stream: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut sent = 0;
    while sent < pending.len() {
        match stream.write(&pending[sent..]) {
            Ok(0) => return false,
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    pending.drain(..sent);
    true
}

impl Client {
    fn flush(&mut self) -> bool {
        flush_pending(&mut self.stream, &mut self.pending)
    }

    /// Reads what is there and echoes it; false when the peer is gone.
    fn echo(&mut self, buf: &mut [u8]) -> bool {
        loop {
            let n = match self.stream.read(buf) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            if self.pending.is_empty() {
                let mut sent = 0;
                while sent < n {
                    match self.stream.write(&buf[sent..n]) {
                        Ok(0) => return false,
                        Ok(m) => sent += m,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(_) => return false,
                    }
                }
                self.pending.extend_from_slice(&buf[sent..n]);
            } else {
                self.pending.extend_from_slice(&buf[..n]);
                if !self.flush() {
                    return false;
                }
            }
            // Same rule as fanout: a short read emptied the socket, and
            // anything arriving later raises a new edge.
            if n < buf.len() {
                return true;
            }
        }
    }
}

pub fn run(listen: &str) -> Result<String, String> {
    let addr: SocketAddr = listen.parse().map_err(|_| format!("--listen: `{listen}` is not an address"))?;
    if !addr.ip().is_loopback() {
        return Err(format!("--listen {addr}: loopback only"));
    }
    serve(addr).map_err(|e| format!("tcp-echo-server: {e}"))
}

fn serve(addr: SocketAddr) -> io::Result<String> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut listener = crate::net::listen(addr)?;
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    // The same line shape as fanout's, so benches/compare.sh finds the port.
    println!("listening on tcp://{}", listener.local_addr()?);
    let mut clients: slab::Slab<Client> = slab::Slab::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            stream.set_nodelay(true)?;
                            let entry = clients.vacant_entry();
                            poll.registry().register(
                                &mut stream,
                                Token(entry.key()),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            entry.insert(Client { stream, pending: Vec::new() });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                continue;
            }
            let key = event.token().0;
            let Some(client) = clients.get_mut(key) else { continue };
            let mut alive = true;
            if event.is_writable() && !client.pending.is_empty() {
                alive = client.flush();
            }
            if alive && (event.is_readable() || event.is_read_closed()) {
                alive = client.echo(&mut buf);
            }
            if !alive {
                let mut gone = clients.remove(key);
                let _ = poll.registry().deregister(&mut gone.stream);
            }
        }
    }
}
