//! A tungstenite client for fanout's JSON protocol (`/ws`, `/kline`) and
//! the checks every JSON test makes of a reply: shared by the channel and
//! market tests. Each test file adds its own domain helpers in its own
//! `impl JsonClient` block. Uses `support::common`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// How long `recv` waits for a message before failing the test.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a read gave instead of a text message.
#[derive(Debug)]
pub enum Ended {
    TimedOut,
    Closed(Option<CloseFrame<'static>>),
    Error(String),
}

pub struct JsonClient {
    pub ws: WebSocket<TcpStream>,
}

impl JsonClient {
    /// Upgrades a new loopback connection on `path`.
    pub fn connect_path(addr: SocketAddr, path: &str) -> JsonClient {
        let stream = super::common::connect_tcp(addr);
        let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).expect("handshake");
        JsonClient { ws }
    }

    /// A `/ws` client that has consumed its `welcome`.
    pub fn ws(addr: SocketAddr) -> JsonClient {
        let mut client = JsonClient::connect_path(addr, "/ws");
        let welcome = client.recv();
        assert_eq!(welcome["type"], "welcome", "first message: {welcome}");
        client
    }

    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned()))
            .expect("send a message");
    }

    pub fn send(&mut self, request: &Value) {
        self.send_text(&request.to_string());
    }

    /// The next text message within `within`, skipping control frames.
    pub fn next_text(&mut self, within: Duration) -> Result<String, Ended> {
        let deadline = Instant::now() + within;
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Ended::TimedOut);
            }
            self.ws.get_mut().set_read_timeout(Some(left)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(text)) => return Ok(text),
                Ok(Message::Close(frame)) => {
                    return Err(Ended::Closed(frame.map(|f| f.into_owned())))
                }
                Ok(Message::Binary(bytes)) => panic!("unexpected binary message {bytes:?}"),
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(Ended::Error(e.to_string())),
            }
        }
        panic!("more than 10000 control frames in a row");
    }

    /// The next JSON message within `within`; invalid JSON fails the test.
    pub fn next(&mut self, within: Duration) -> Result<Value, Ended> {
        self.next_text(within).map(|text| {
            serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("server sent invalid JSON ({e}): {text}"))
        })
    }

    pub fn recv_text(&mut self) -> String {
        match self.next_text(READ_TIMEOUT) {
            Ok(text) => text,
            Err(Ended::Error(e)) => panic!("expected a message, the connection failed: {e}"),
            Err(e) => panic!("expected a message within {READ_TIMEOUT:?}: {e:?}"),
        }
    }

    pub fn recv(&mut self) -> Value {
        match self.next(READ_TIMEOUT) {
            Ok(value) => value,
            Err(Ended::Error(e)) => panic!("expected a message, the connection failed: {e}"),
            Err(e) => panic!("expected a message within {READ_TIMEOUT:?}: {e:?}"),
        }
    }

    /// Sends a request and returns the next message (the reply, on a
    /// connection that receives nothing else meanwhile).
    pub fn request(&mut self, request: Value) -> Value {
        self.send(&request);
        self.recv()
    }

    /// Sends a request and checks it was acknowledged.
    pub fn ok(&mut self, request: Value) -> Value {
        let kind = request["type"].as_str().unwrap().to_owned();
        let reply = self.request(request);
        assert_ack(&reply, &kind);
        reply
    }

    /// Sends a request and returns the error message after checking the code.
    pub fn fails(&mut self, request: Value, code: &str) -> String {
        let reply = self.request(request.clone());
        error_message(&reply, code, &format!("for {request}"))
    }

    /// A fence on `/ws`: everything the server queued for this client
    /// before it reads this request arrives before the reply, which is
    /// returned with the messages that came first.
    pub fn until_fence(&mut self) -> Vec<Value> {
        self.send(&serde_json::json!({"type":"market.symbols","id":"fence"}));
        let mut before = Vec::new();
        for _ in 0..1_000_000 {
            let message = self.recv();
            if message["type"] == "ack" && message["id"] == "fence" {
                return before;
            }
            before.push(message);
        }
        panic!("no fence reply within 1000000 messages");
    }

    pub fn expect_nothing(&mut self, within: Duration) {
        match self.next_text(within) {
            Err(Ended::TimedOut) => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }
}

pub fn assert_ack(reply: &Value, request: &str) {
    assert_eq!(reply["type"], "ack", "expected an ack: {reply}");
    assert_eq!(reply["request"], request, "{reply}");
}

/// Checks an error reply's code and returns its (non-empty) message.
pub fn error_message(reply: &Value, code: &str, context: &str) -> String {
    assert_eq!(
        reply["type"], "error",
        "expected an error {context}: {reply}"
    );
    assert_eq!(reply["code"], code, "{context}: {reply}");
    let message = reply["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {reply}"));
    assert!(!message.is_empty(), "empty message: {reply}");
    message.to_owned()
}
