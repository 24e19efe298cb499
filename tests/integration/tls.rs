//! TLS listeners against real clients: a rustls client with a certificate
//! made at test time, WebSockets (echo, chat, channels) over it, plain HTTP
//! and garbage sent to a TLS port, a stalled handshake, bad certificate
//! files at start-up, a certificate reload on SIGHUP, and backpressure on
//! a TLS client that stops reading.

use crate::support::{common, tls};

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{connect_tcp, http_exchange, wait_for_eof, ServerProcess, TestServer, UPGRADE_HEAD};
use rustls::StreamOwned;
use serde_json::{json, Value};
use tls::{TestCert, TlsStream};
use tungstenite::Message;

type Wss = tungstenite::WebSocket<TlsStream>;

fn tls_flags<'a>(cert: &'a TestCert, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec!["--tls-cert", cert.cert(), "--tls-key", cert.key()];
    flags.extend_from_slice(extra);
    flags
}

fn next_text(ws: &mut Wss) -> String {
    for _ in 0..100 {
        match ws.read().expect("read") {
            Message::Text(text) => return text,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
    panic!("no text message within 100 frames");
}

fn next_json(ws: &mut Wss) -> Value {
    let text = next_text(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Sends a request and returns the reply carrying its `id`.
fn request(ws: &mut Wss, request: Value) -> Value {
    let id = request["id"].clone();
    ws.send(Message::Text(request.to_string())).expect("send");
    for _ in 0..100 {
        let reply = next_json(ws);
        if reply["id"] == id {
            return reply;
        }
    }
    panic!("no reply to {request}");
}

/// Closes from the client side and waits for the server's close frame.
fn close(mut ws: Wss) {
    ws.close(None).expect("close");
    for _ in 0..100 {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return,
            Err(e) => panic!("closing handshake failed: {e}"),
        }
    }
    panic!("no close frame from the server");
}

/// One HTTP request over TLS; the response, read until the server closes.
fn https_get(cert: &TestCert, addr: SocketAddr, path: &str) -> String {
    let mut stream = cert.connect(addr).expect("TLS handshake");
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = Vec::new();
    // The bytes before an error are kept; the server ends with close_notify.
    let result = stream.read_to_end(&mut response);
    assert!(result.is_ok(), "{result:?}");
    String::from_utf8_lossy(&response).into_owned()
}

/// The value of one sample in a `/metrics` text, 0 if absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

#[test]
fn echo_over_wss_with_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let server = TestServer::start(&tls_flags(&cert, &[]));
    let mut ws = cert.websocket(server.addr, "/echo");
    ws.send(Message::Text("hello over TLS".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("hello over TLS".into()));
    // Many TLS records each way, and /echo's streaming path for a large
    // binary message.
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::Binary(large.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Binary(large));
    for n in 0..50 {
        ws.send(Message::Text(format!("message {n}"))).unwrap();
    }
    for n in 0..50 {
        assert_eq!(ws.read().unwrap(), Message::Text(format!("message {n}")));
    }
    close(ws);
    let metrics = https_get(&cert, server.addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert_eq!(metric(&metrics, "fanout_tls_handshakes_total"), 2.0);
    server.stop().unwrap();
}

#[test]
fn chat_and_channels_over_wss_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let public = TestCert::generate(dir.path(), "public");
    let internal = TestCert::generate(dir.path(), "internal");
    let server = TestServer::start(&tls_flags(
        &public,
        &[
            "--internal-listen",
            "127.0.0.1:0",
            "--internal-tls-cert",
            internal.cert(),
            "--internal-tls-key",
            internal.key(),
        ],
    ));
    let (public_addr, internal_addr) = (server.addrs[0], server.addrs[1]);

    let mut ada = public.websocket(public_addr, "/chat");
    assert!(next_text(&mut ada).starts_with("* welcome to fanout chat: you are guest-1"));
    assert_eq!(
        next_text(&mut ada),
        "* joined [lobby] as guest-1; last 0 message(s):"
    );
    assert_eq!(next_text(&mut ada), "[lobby] * guest-1 joined");
    let mut bob = public.websocket(public_addr, "/chat");
    assert!(next_text(&mut bob).starts_with("* welcome to fanout chat: you are guest-2"));
    assert_eq!(
        next_text(&mut bob),
        "* joined [lobby] as guest-2; last 0 message(s):"
    );
    assert_eq!(next_text(&mut bob), "[lobby] * guest-2 joined");
    assert_eq!(next_text(&mut ada), "[lobby] * guest-2 joined");
    ada.send(Message::Text("hello over TLS".into())).unwrap();
    for ws in [&mut ada, &mut bob] {
        assert_eq!(next_text(ws), "[lobby] guest-1: hello over TLS");
    }
    close(ada);
    assert_eq!(next_text(&mut bob), "[lobby] * guest-1 left");
    close(bob);

    let mut publisher = internal.websocket(internal_addr, "/ws");
    let mut subscriber = public.websocket(public_addr, "/ws");
    assert_eq!(next_json(&mut publisher)["type"], "welcome");
    assert_eq!(next_json(&mut subscriber)["type"], "welcome");
    let created = request(
        &mut publisher,
        json!({"type":"create","channel":"news","id":1}),
    );
    assert_eq!(created["created"], true, "{created}");
    let subscribed = request(
        &mut subscriber,
        json!({"type":"subscribe","channel":"news","id":2}),
    );
    assert_eq!(subscribed["type"], "ack", "{subscribed}");
    let data = json!({"headline": "wss works"});
    let published = request(
        &mut publisher,
        json!({"type":"publish","channel":"news","data":data,"id":3}),
    );
    assert_eq!(published["delivered"], 1, "{published}");
    let message = next_json(&mut subscriber);
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["channel"], "news", "{message}");
    assert_eq!(message["data"], data, "{message}");
    close(publisher);
    close(subscriber);
    server.stop().unwrap();
}

#[test]
fn plain_http_and_garbage_on_a_tls_port_close_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let server = TestServer::start(&tls_flags(&cert, &[]));

    for request in [
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        UPGRADE_HEAD,
    ] {
        let response = http_exchange(server.addr, request.as_bytes());
        assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
        assert!(
            response.contains("this port speaks TLS only: use https:// or wss://"),
            "{response}"
        );
    }

    // A TLS record header announcing a handshake, then nonsense; and
    // bytes that are neither TLS nor HTTP.
    let garbage: [&[u8]; 2] = [
        &[
            0x16, 0x03, 0x01, 0x00, 0x08, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4,
        ],
        &[0x00, 0xff, 0x13, 0x37, 0x00, 0x00, 0x00, 0x00, 0x42],
    ];
    for bytes in garbage {
        let mut stream = connect_tcp(server.addr);
        stream.write_all(bytes).unwrap();
        assert!(
            wait_for_eof(&mut stream, Duration::from_secs(3)),
            "server kept {bytes:?} open"
        );
    }

    // A client that does not trust the certificate aborts the handshake
    // with an alert.
    let dir2 = tempfile::tempdir().unwrap();
    let stranger = TestCert::generate(dir2.path(), "stranger");
    let refused = stranger.connect(server.addr);
    assert!(refused.is_err(), "a certificate nobody signed was trusted");

    // The server is unharmed and has counted each failure.
    let mut ws = cert.websocket(server.addr, "/echo");
    ws.send(Message::Text("still here".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("still here".into()));
    close(ws);
    let metrics = https_get(&cert, server.addr, "/metrics");
    let failures = |reason: &str| {
        metric(
            &metrics,
            &format!("fanout_tls_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(failures("plain_http"), 2.0, "{metrics}");
    assert_eq!(failures("invalid_message"), 2.0, "{metrics}");
    assert_eq!(failures("alert_received"), 1.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "fanout_handshakes_rejected_total{status=\"400\"}"),
        2.0
    );
    server.stop().unwrap();
}

#[test]
fn a_stalled_tls_handshake_is_cut_off_by_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let server = TestServer::start(&tls_flags(&cert, &["--handshake-timeout", "300ms"]));

    let started = Instant::now();
    let mut silent = connect_tcp(server.addr);
    // Half a record: a handshake header announcing 512 bytes, then 4 of them.
    let mut partial = connect_tcp(server.addr);
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .unwrap();
    assert!(wait_for_eof(&mut silent, Duration::from_secs(3)));
    assert!(wait_for_eof(&mut partial, Duration::from_secs(3)));
    assert!(started.elapsed() >= Duration::from_millis(300));

    // TLS done but no HTTP request: the usual 408, encrypted.
    let mut idle = cert.connect(server.addr).expect("TLS handshake");
    let mut response = Vec::new();
    let _ = idle.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");

    let metrics = https_get(&cert, server.addr, "/metrics");
    assert_eq!(
        metric(&metrics, "fanout_tls_failures_total{reason=\"timeout\"}"),
        2.0,
        "{metrics}"
    );
    server.stop().unwrap();
}

/// Runs the binary with `args` (it must exit by itself within 10 s) and
/// returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["--listen", "127.0.0.1:0", "--no-sim"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fanout");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fanout {args:?} did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

#[test]
fn a_bad_certificate_file_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let other = TestCert::generate(dir.path(), "other");
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let not_pem = dir.path().join("not-pem.txt");
    std::fs::write(&not_pem, "this is no certificate\n").unwrap();
    let not_pem = not_pem.to_str().unwrap();

    let cases: [(&[&str], &str, &str); 5] = [
        (
            &["--tls-cert", missing, "--tls-key", cert.key()],
            missing,
            "cannot read TLS certificate file",
        ),
        (
            &["--tls-cert", not_pem, "--tls-key", cert.key()],
            not_pem,
            "holds no PEM certificate",
        ),
        (
            &["--tls-cert", cert.cert(), "--tls-key", cert.cert()],
            cert.cert(),
            "holds no PEM private key",
        ),
        (
            &["--tls-cert", cert.cert(), "--tls-key", other.key()],
            other.key(),
            "does not belong to the certificate",
        ),
        (
            &[
                "--internal-listen",
                "127.0.0.1:0",
                "--internal-tls-cert",
                cert.cert(),
                "--internal-tls-key",
                missing,
            ],
            missing,
            "cannot read TLS key file",
        ),
    ];
    for (args, named, problem) in cases {
        let (code, stderr) = run_to_exit(args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(stderr.contains(problem), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (code, stderr) = run_to_exit(&["--tls-cert", cert.cert()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--tls-cert needs --tls-key too"),
        "{stderr}"
    );
}

fn send_signal(server: &ServerProcess, signal: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    let rc = unsafe { libc::kill(server.child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill failed");
}

/// Polls `/metrics` (at most 5 s) until `sample` reaches `value`. Until
/// the server has handled the signal, `cert` may not be the one it serves.
fn wait_for_metric(cert: &TestCert, addr: SocketAddr, sample: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = match cert.connect(addr) {
            Ok(_) => {
                let metrics = https_get(cert, addr, "/metrics");
                if metric(&metrics, sample) == value {
                    return;
                }
                metrics
            }
            Err(e) => format!("TLS handshake failed: {e}"),
        };
        assert!(
            Instant::now() < deadline,
            "{sample} did not reach {value}:\n{seen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestCert::generate(dir.path(), "first");
    let second = TestCert::generate(dir.path(), "second");
    let live_cert = dir.path().join("live-cert.pem");
    let live_key = dir.path().join("live-key.pem");
    std::fs::copy(&first.cert_path, &live_cert).unwrap();
    std::fs::copy(&first.key_path, &live_key).unwrap();
    let server = ServerProcess::start(&[
        "--no-sim",
        "--tls-cert",
        live_cert.to_str().unwrap(),
        "--tls-key",
        live_key.to_str().unwrap(),
    ]);
    let mut old = first.websocket(server.addr, "/echo");
    old.send(Message::Text("before".into())).unwrap();
    assert_eq!(old.read().unwrap(), Message::Text("before".into()));
    assert!(second.connect(server.addr).is_err());

    std::fs::copy(&second.cert_path, &live_cert).unwrap();
    std::fs::copy(&second.key_path, &live_key).unwrap();
    send_signal(&server, libc::SIGHUP);
    wait_for_metric(&second, server.addr, "fanout_tls_reloads_total", 1.0);
    assert!(
        first.connect(server.addr).is_err(),
        "new connections still get the first certificate"
    );
    let mut new = second.websocket(server.addr, "/echo");
    new.send(Message::Text("after".into())).unwrap();
    assert_eq!(new.read().unwrap(), Message::Text("after".into()));
    old.send(Message::Text("still open".into())).unwrap();
    assert_eq!(old.read().unwrap(), Message::Text("still open".into()));

    // A broken file on reload is refused and the listener keeps serving.
    std::fs::write(&live_cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    send_signal(&server, libc::SIGHUP);
    wait_for_metric(
        &second,
        server.addr,
        "fanout_tls_reload_failures_total",
        1.0,
    );
    let mut newer = second.websocket(server.addr, "/echo");
    newer.send(Message::Text("kept".into())).unwrap();
    assert_eq!(newer.read().unwrap(), Message::Text("kept".into()));
    for ws in [old, new, newer] {
        close(ws);
    }
}

/// The TCP port stays plain when only the internal listener has TLS.
#[test]
fn tls_is_per_listener_kind() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "internal");
    let server = TestServer::start(&[
        "--internal-listen",
        "127.0.0.1:0",
        "--internal-tls-cert",
        cert.cert(),
        "--internal-tls-key",
        cert.key(),
    ]);
    let mut plain = server.client("/echo");
    plain.send(Message::Text("plain".into())).unwrap();
    assert_eq!(plain.read().unwrap(), Message::Text("plain".into()));
    let mut secure = cert.websocket(server.addrs[1], "/echo");
    secure.send(Message::Text("secure".into())).unwrap();
    assert_eq!(secure.read().unwrap(), Message::Text("secure".into()));
    let response = http_exchange(server.addrs[1], b"GET /healthz HTTP/1.1\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    drop(plain);
    close(secure);
    server.stop().unwrap();
}

/// Pumps a TLS client by hand over a non-blocking socket, so it can keep
/// writing without reading (which a blocking stream cannot do).
struct Pump {
    tls: rustls::ClientConnection,
    socket: std::net::TcpStream,
    received: Vec<u8>,
}

impl Pump {
    /// Moves records both ways as far as the socket allows; true if any
    /// byte moved.
    fn turn(&mut self, read: bool) -> bool {
        let mut moved = false;
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.socket) {
                Ok(n) => moved |= n > 0,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("TLS write: {e}"),
            }
        }
        if read {
            match self.tls.read_tls(&mut self.socket) {
                Ok(0) => panic!("server closed the connection"),
                Ok(_) => {
                    moved = true;
                    self.tls.process_new_packets().expect("TLS from the server");
                    let mut chunk = [0u8; 64 << 10];
                    loop {
                        match self.tls.reader().read(&mut chunk) {
                            Ok(0) => panic!("close_notify from the server"),
                            Ok(n) => self.received.extend_from_slice(&chunk[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => panic!("TLS read: {e}"),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("TLS read: {e}"),
            }
        }
        moved
    }
}

/// The frame a client sends as message `n` of the backpressure test, and
/// the payload the server echoes.
fn numbered_payload(n: u32) -> Vec<u8> {
    let mut payload = vec![(n % 251) as u8; 16 << 10];
    payload[..4].copy_from_slice(&n.to_be_bytes());
    payload
}

#[test]
fn a_tls_client_that_does_not_read_is_paused_then_gets_every_echo() {
    // Far more than socket buffers and queues can hold: a server that kept
    // reading would take it all without the client stalling.
    const SEND_CAP: usize = 256 << 20;
    const STALL: Duration = Duration::from_millis(750);
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let server = TestServer::start(&tls_flags(
        &cert,
        &[
            "--max-outbound-buffer",
            "64KiB",
            "--socket-send-buffer",
            "16KiB",
        ],
    ));
    let mut stream = cert.connect(server.addr).expect("TLS handshake");
    stream.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "head too long");
        stream.read_exact(&mut byte).expect("read the 101");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let StreamOwned { conn, sock } = stream;
    sock.set_nonblocking(true).unwrap();
    let mut pump = Pump {
        tls: conn,
        socket: sock,
        received: Vec::new(),
    };

    // Write numbered frames, never reading, until nothing moves for STALL.
    let started = Instant::now();
    let (mut sent_frames, mut accepted) = (0u32, 0usize);
    let mut frame = Vec::new();
    let mut offset = 0;
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < STALL {
        assert!(
            accepted < SEND_CAP && started.elapsed() < Duration::from_secs(60),
            "the server took {accepted} bytes from a client that never reads"
        );
        if offset == frame.len() {
            frame = common::client_frame(0x82, &numbered_payload(sent_frames));
            sent_frames += 1;
            offset = 0;
        }
        let mut moved = pump.turn(false);
        if !pump.tls.wants_write() {
            let n = pump.tls.writer().write(&frame[offset..]).unwrap();
            offset += n;
            accepted += n;
            moved |= n > 0;
        }
        if moved {
            last_progress = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    eprintln!("stalled after {accepted} bytes in {sent_frames} frames");
    let metrics = https_get(&cert, server.addr, "/metrics");
    assert!(
        metric(&metrics, "fanout_read_pauses_total") >= 1.0,
        "{metrics}"
    );

    // Now read: the rest of the last frame goes out, and every frame comes
    // back, in order.
    let echo_len = 4 + (16 << 10);
    let expected = sent_frames as usize * echo_len;
    let deadline = Instant::now() + Duration::from_secs(30);
    while pump.received.len() < expected {
        assert!(
            Instant::now() < deadline,
            "{} of {expected} echoed bytes in 30 s",
            pump.received.len()
        );
        if offset < frame.len() && !pump.tls.wants_write() {
            offset += pump.tls.writer().write(&frame[offset..]).unwrap();
        }
        if !pump.turn(true) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert_eq!(pump.received.len(), expected);
    for (n, echo) in pump.received.chunks(echo_len).enumerate() {
        assert_eq!(echo[..4], [0x82, 126, 0x40, 0x00], "frame {n}");
        assert!(echo[4..] == numbered_payload(n as u32)[..], "frame {n}");
    }
    drop(pump);
    server.stop().unwrap();
}
