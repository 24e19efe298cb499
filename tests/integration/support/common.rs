//! Shared helpers for integration tests: a real server on an ephemeral
//! loopback port, in-process or as the built binary, and raw-socket tools.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fanout::config::Config;
use fanout::server::{Server, ShutdownHandle};

/// An in-process server on 127.0.0.1:0, shut down and joined on drop.
pub struct TestServer {
    /// The first bound address (the first `--listen`).
    pub addr: SocketAddr,
    /// Every bound address: the `--listen` ones first, then `--internal-listen`.
    pub addrs: Vec<SocketAddr>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with the given extra flags (on top of a loopback bind
    /// and `--no-sim`, unless the flags give `--sim-seed`).
    pub fn start(flags: &[&str]) -> TestServer {
        let mut args = vec!["fanout", "--listen", "127.0.0.1:0"];
        // The simulated market would publish into every test; tests that
        // want it pass a seed, which makes its events reproducible.
        if !flags.contains(&"--sim-seed") {
            args.push("--no-sim");
        }
        args.extend_from_slice(flags);
        let config = Config::from_args(args).unwrap_or_else(|e| panic!("test flags: {e}"));
        let server = Server::bind(config).expect("bind 127.0.0.1:0");
        let addrs = server.local_addrs();
        let addr = addrs[0];
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        TestServer {
            addr,
            addrs,
            handle,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// A tungstenite client connected to `path`.
    pub fn client(&self, path: &str) -> tungstenite::WebSocket<TcpStream> {
        let stream = connect_tcp(self.addr);
        let (ws, _) = tungstenite::client(self.url(path), stream).expect("handshake");
        ws
    }

    /// Stops the server and waits for its loop to return.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.handle.shutdown();
        self.thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.shutdown();
            let _ = thread.join();
        }
    }
}

/// An in-process server with a public and an internal listener.
pub struct Servers {
    pub server: TestServer,
    pub public: SocketAddr,
    pub internal: SocketAddr,
}

impl Servers {
    /// Starts a server with `--internal-listen 127.0.0.1:0` and `flags`.
    pub fn start(flags: &[&str]) -> Servers {
        let mut all = vec!["--internal-listen", "127.0.0.1:0"];
        all.extend_from_slice(flags);
        let server = TestServer::start(&all);
        assert_eq!(server.addrs.len(), 2, "{:?}", server.addrs);
        Servers {
            public: server.addrs[0],
            internal: server.addrs[1],
            server,
        }
    }
}

/// A TCP connection with 5 s read/write timeouts so no test can hang.
pub fn connect_tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

pub const UPGRADE_HEAD: &str = "GET /echo HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// Sends a raw request and reads the whole response until the server closes.
pub fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = connect_tcp(addr);
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// Opens a raw upgraded connection to `/echo` and consumes the 101 response.
pub fn raw_upgrade(addr: SocketAddr) -> TcpStream {
    let mut stream = connect_tcp(addr);
    stream.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Reads up to and including the blank line that ends an HTTP head.
pub fn read_http_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read head");
        assert!(
            n == 1,
            "connection closed during the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
        assert!(head.len() < 16 << 10, "head too long");
    }
    String::from_utf8(head).unwrap()
}

/// A masked client frame.
pub fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0xA1, 0xB2, 0xC3, 0xD4];
    let mut out = vec![b0];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A server frame as read from the wire.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFrame {
    pub b0: u8,
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }

    /// For a close frame: the status code, if any.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode() == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// Reads one unmasked server frame; `None` on EOF.
pub fn read_frame(stream: &mut TcpStream) -> Option<ServerFrame> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    assert_eq!(head[1] & 0x80, 0, "server frames must not be masked");
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            stream.read_exact(&mut b).ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            stream.read_exact(&mut b).ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).ok()?;
    Some(ServerFrame {
        b0: head[0],
        payload,
    })
}

/// Reads frames until a close frame arrives, skipping pings.
pub fn read_until_close(stream: &mut TcpStream) -> ServerFrame {
    for _ in 0..1000 {
        let frame = read_frame(stream).expect("connection ended before a close frame");
        if frame.opcode() == 8 {
            return frame;
        }
    }
    panic!("no close frame within 1000 frames");
}

/// True if the server closed the TCP connection within `within`.
pub fn wait_for_eof(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// The built `fanout` binary, started with loopback flags; killed on drop.
pub struct ServerProcess {
    pub child: Child,
    /// The first bound address (with `start`, the implicit `--listen
    /// 127.0.0.1:0`).
    pub addr: SocketAddr,
    /// Every bound address, in the order the server announced them: the
    /// `--listen` ones first, then `--internal-listen`.
    pub addrs: Vec<SocketAddr>,
}

impl ServerProcess {
    pub fn start(flags: &[&str]) -> ServerProcess {
        ServerProcess::start_exactly(&[&["--listen", "127.0.0.1:0"], flags].concat())
    }

    /// With these flags and no implicit listener: they must name each one
    /// as `--listen ADDR` or `--internal-listen ADDR`.
    pub fn start_exactly(flags: &[&str]) -> ServerProcess {
        let listeners = flags
            .iter()
            .filter(|f| matches!(**f, "--listen" | "--internal-listen"))
            .count();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fanout");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut addrs = Vec::new();
        while addrs.len() < listeners {
            let line = lines
                .next()
                .expect("fanout printed fewer listening lines than it has listeners")
                .expect("read stdout");
            let addr: SocketAddr = line
                .strip_prefix("fanout listening on ws://")
                .or_else(|| line.strip_prefix("fanout listening on wss://"))
                .unwrap_or_else(|| panic!("unexpected line: {line}"))
                .parse()
                .unwrap();
            addrs.push(addr);
        }
        // Keep draining stdout so later lines never meet a closed pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        ServerProcess {
            child,
            addr: addrs[0],
            addrs,
        }
    }

    /// Sends a signal and waits (at most 10 s) for the exit status.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "fanout did not exit within 10 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
