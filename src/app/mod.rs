//! What each endpoint does with messages. Nothing here knows about
//! sockets: the server hands the app (connection, message) pairs and an
//! [`Outbox`] to answer through, addressed by connection id.

mod echo;
pub mod routes;

use crate::ws::CloseCode;
pub use routes::{resolve, Endpoint, Target};

/// Identifies a WebSocket connection for as long as it is open. The server
/// calls [`App::on_close`] before an id can be reused.
pub type ConnId = usize;

/// A data message received from, or sent to, a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// How the app sends. The server implements it over its connection table.
pub trait Outbox {
    /// A reply to something the recipient itself asked for. When the
    /// recipient's queue is full the server stops reading its requests
    /// until the queue drains (TCP backpressure): nothing is dropped.
    fn reply(&mut self, to: ConnId, message: Message<'_>);

    /// Closes a connection with a close frame.
    fn close(&mut self, to: ConnId, code: CloseCode, reason: &str);
}

/// The application: one value, owned by the event loop.
#[derive(Debug, Default)]
pub struct App {}

impl App {
    pub fn new() -> Self {
        Self::default()
    }

    /// A WebSocket handshake on `endpoint` completed.
    pub fn on_open(&mut self, _conn: ConnId, _endpoint: Endpoint, _out: &mut impl Outbox) {}

    pub fn on_message(
        &mut self,
        conn: ConnId,
        endpoint: Endpoint,
        message: Message<'_>,
        out: &mut impl Outbox,
    ) {
        match endpoint {
            Endpoint::Echo => echo::on_message(conn, message, out),
        }
    }

    /// The connection is gone; forget everything about it.
    pub fn on_close(&mut self, _conn: ConnId, _endpoint: Endpoint) {}
}
