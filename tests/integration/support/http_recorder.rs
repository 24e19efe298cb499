//! A small HTTP/1.1 server on 127.0.0.1:0 that records every request and
//! answers from a script: what a webhook receiver or the Telegram Bot API
//! looks like to fanout's sinks. One thread, non-blocking accepts, every
//! wait bounded; it stops (closing every connection, answered or held)
//! when dropped.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the server answers one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// This status, an empty JSON body, and the connection closed.
    Status(u16),
    /// Nothing: the connection is held open, unanswered, until the server
    /// is dropped.
    Never,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names in lowercase, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("a UTF-8 body")
    }
}

/// How long the server runs at most, whatever the test does.
const LIFETIME: Duration = Duration::from_secs(120);
/// Largest request it reads.
const MAX_REQUEST: usize = 1 << 20;

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    arrived: Condvar,
    stop: AtomicBool,
}

pub struct HttpRecorder {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl HttpRecorder {
    /// Answers the n-th request with `script[n]`, and every request past
    /// the script with its last entry.
    pub fn start(script: &[Answer]) -> HttpRecorder {
        assert!(!script.is_empty());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let script = script.to_vec();
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || serve(listener, &script, &shared))
        };
        HttpRecorder {
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until `n` requests have arrived; returns
    /// all of them.
    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + within;
        let mut requests = self.shared.requests.lock().unwrap();
        while requests.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} request(s) arrived within {within:?}, not {n}",
                requests.len()
            );
            requests = self.shared.arrived.wait_timeout(requests, left).unwrap().0;
        }
        requests.clone()
    }
}

impl Drop for HttpRecorder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: TcpListener, script: &[Answer], shared: &Shared) {
    let end = Instant::now() + LIFETIME;
    // Held (unanswered) connections stay open until the server stops.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut served = 0usize;
    while !shared.stop.load(Ordering::SeqCst) && Instant::now() < end {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => panic!("accept: {e}"),
        };
        let mut stream = stream;
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let Some(request) = read_request(&mut stream) else {
            continue;
        };
        let answer = script[served.min(script.len() - 1)];
        served += 1;
        {
            let mut requests = shared.requests.lock().unwrap();
            requests.push(request);
            shared.arrived.notify_all();
        }
        match answer {
            Answer::Never => held.push(stream),
            Answer::Status(status) => {
                let body = "{}";
                let response = format!(
                    "HTTP/1.1 {status} Scripted\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
        }
    }
}

/// One request: its head, then `Content-Length` bytes of body. None when
/// the client went away first.
fn read_request(stream: &mut TcpStream) -> Option<Recorded> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 || data.len() > MAX_REQUEST {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let method = request_line.next()?.to_owned();
    let path = request_line.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("a numeric Content-Length"));
    assert!(length <= MAX_REQUEST, "a {length}-byte body");
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}
