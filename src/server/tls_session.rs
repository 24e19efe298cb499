//! One connection's TLS: rustls' sans-IO `ServerConnection` between the
//! socket and the loop. Ciphertext is pulled from the socket into it and
//! plaintext taken out into the loop's read buffer; plaintext from the
//! write queue goes in and the records it makes are pushed to the socket.
//! No threads and no blocking: every socket call may say `WouldBlock`,
//! and the loop's edges (readable, writable) bring it back.

use std::io::{self, IoSlice, Read, Write};
use std::num::NonZeroU32;
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::{ServerConfig, ServerConnection};
use slab::Slab;

#[derive(Debug)]
pub struct TlsSession {
    conn: ServerConnection,
    /// Nothing has come from the peer yet: its first byte tells a TLS
    /// client (a handshake record, 0x16) from a plain HTTP one.
    fresh: bool,
}

/// Why reading ciphertext from the socket stopped.
#[derive(Debug)]
pub enum TlsReadError {
    Io(io::Error),
    /// The peer spoke plain HTTP (its first byte was an ASCII letter).
    PlainHttp,
    /// The peer broke TLS or refused our parameters; an alert saying so
    /// is queued for the socket.
    Protocol(rustls::Error),
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            conn: ServerConnection::new(config)?,
            fresh: true,
        })
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Records are waiting for the socket.
    pub fn has_pending_records(&self) -> bool {
        self.conn.wants_write()
    }

    /// Plaintext rustls holds already decrypted: `Ok(0)` once the peer's
    /// close_notify has been read, `WouldBlock` when more ciphertext is
    /// needed.
    pub fn read_plaintext(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.reader().read(buf)
    }

    /// Reads what the socket has (a few KiB at most) and decrypts it;
    /// returns the ciphertext bytes read, 0 at EOF.
    pub fn read_ciphertext(&mut self, socket: &mut TcpStream) -> Result<usize, TlsReadError> {
        let mut source = FirstByte {
            socket,
            first: None,
        };
        let read = self.conn.read_tls(&mut source).map_err(TlsReadError::Io)?;
        let first_byte = source.first;
        let was_fresh = self.fresh;
        self.fresh = was_fresh && read == 0;
        if let Err(e) = self.conn.process_new_packets() {
            if was_fresh && first_byte.is_some_and(|b| b.is_ascii_alphabetic()) {
                return Err(TlsReadError::PlainHttp);
            }
            return Err(TlsReadError::Protocol(e));
        }
        Ok(read)
    }

    /// Writes queued records until none are left (`Ok`) or the socket is
    /// full (`WouldBlock`; a writable edge will follow).
    pub fn push_records(&mut self, socket: &mut TcpStream) -> io::Result<()> {
        while self.conn.wants_write() {
            match self.conn.write_tls(socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues close_notify and gives it, with anything queued before it,
    /// one chance to reach the socket.
    pub fn close(&mut self, socket: &mut TcpStream) {
        self.conn.send_close_notify();
        let _ = self.push_records(socket);
    }

    /// The connection's byte sink for the write queue.
    pub fn sink<'a>(&'a mut self, socket: &'a mut TcpStream) -> TlsSink<'a> {
        TlsSink {
            session: self,
            socket,
        }
    }
}

/// Plaintext in, records out to the socket. Accepted bytes may still sit
/// in the session as records when a write returns: the queue counts as
/// flushed only once [`TlsSession::has_pending_records`] is false.
pub struct TlsSink<'a> {
    session: &'a mut TlsSession,
    socket: &'a mut TcpStream,
}

impl TlsSink<'_> {
    /// Pushes records; a full socket is fine once plaintext was taken.
    fn push_after_accepting(&mut self, accepted: usize) -> io::Result<usize> {
        if accepted == 0 {
            // The session's buffer is full (plaintext held back until its
            // handshake ends): the bytes wait in the queue, not an error.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match self.session.push_records(self.socket) {
            Ok(()) => Ok(accepted),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(accepted),
            Err(e) => Err(e),
        }
    }
}

impl Write for TlsSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Records already made go first: the session's buffer is bounded,
        // and a socket that is full should stop the queue here.
        self.session.push_records(self.socket)?;
        let accepted = self.session.conn.writer().write(buf)?;
        self.push_after_accepting(accepted)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        self.session.push_records(self.socket)?;
        let accepted = self.session.conn.writer().write_vectored(bufs)?;
        self.push_after_accepting(accepted)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.session.push_records(self.socket)
    }
}

/// The socket as rustls reads it, noting the first byte of what it read.
struct FirstByte<'a> {
    socket: &'a mut TcpStream,
    first: Option<u8>,
}

impl Read for FirstByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.socket.read(buf)?;
        if self.first.is_none() && n > 0 {
            self.first = Some(buf[0]);
        }
        Ok(n)
    }
}

/// A metrics label for why a TLS connection failed.
pub fn failure_reason(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::InvalidMessage(_) => "invalid_message",
        rustls::Error::PeerIncompatible(_) => "peer_incompatible",
        rustls::Error::PeerMisbehaved(_) => "peer_misbehaved",
        rustls::Error::NoApplicationProtocol => "no_application_protocol",
        rustls::Error::DecryptError => "decrypt_error",
        _ => "other",
    }
}

/// Names a connection's [`TlsSession`] in [`TlsSessions`]. Four bytes, so
/// a connection holds it in what was padding: plain connections do not
/// grow by a pointer for a feature they do not use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsKey(NonZeroU32);

/// The TLS state of every TLS connection, beside the connection table.
#[derive(Debug, Default)]
pub struct TlsSessions(Slab<TlsSession>);

impl TlsSessions {
    /// `None` when the table cannot be named by a `TlsKey` any more.
    pub fn insert(&mut self, session: TlsSession) -> Option<TlsKey> {
        let entry = self.0.vacant_entry();
        let key = u32::try_from(entry.key() + 1)
            .ok()
            .and_then(NonZeroU32::new)?;
        entry.insert(session);
        Some(TlsKey(key))
    }

    pub fn get(&self, key: TlsKey) -> &TlsSession {
        &self.0[key.index()]
    }

    pub fn get_mut(&mut self, key: TlsKey) -> &mut TlsSession {
        &mut self.0[key.index()]
    }

    pub fn remove(&mut self, key: TlsKey) -> TlsSession {
        self.0.remove(key.index())
    }
}

impl TlsKey {
    fn index(self) -> usize {
        self.0.get() as usize - 1
    }
}
