//! A client that closes and then stops reading must not hang the server.
//!
//! The peer's close frame arrives while our output to it cannot be
//! written (its receive window is full); when its ping time then came,
//! the server used to re-arm the connection's timer at that past time
//! forever, inside one loop turn: 100 % CPU, no answers to anyone, and
//! SIGTERM ignored. Each test builds that state one way (a channel
//! subscriber, /echo replies, a streamed echo half sent, a compressed
//! echo's fragments, TLS), lets the ping time pass, and checks that the
//! server still answers, drops the stuck connection at the close timeout
//! (counted), and exits 0 on SIGTERM. Against the real binary, so a hang
//! fails the test instead of hanging it.

use crate::support::{common, json_client, tls};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use json_client::JsonClient;
use serde_json::json;
use tls::TestCert;

/// A ping due one second after the upgrade, and two seconds for the
/// closing handshake.
const TIMERS: [&str; 4] = ["--ping-interval", "1s", "--close-timeout", "2s"];

/// Far more than loopback socket buffers hold, so that part of what the
/// server sends back stays queued in it (half of it is still more).
const FLOOD: usize = 16 << 20;

/// What the server needs to keep every echo of `FLOOD` queued.
const ROOMY_QUEUE: [&str; 2] = ["--max-outbound-buffer", "64MiB"];

fn close_frame() -> Vec<u8> {
    client_frame(0x88, &1000u16.to_be_bytes())
}

/// Bytes that do not compress (xorshift), so a compressed echo is sent
/// as is, in fragments.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// One plain HTTP GET; the response, or "" if none came within 5 s.
fn get(addr: SocketAddr, path: &str) -> String {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
}

fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// After a client closed and stopped reading on `server`: waits past the
/// ping time, then checks that `fetch` (a GET of a path, over whatever
/// transport the listener speaks) is answered, that the connection is
/// dropped at the close timeout and counted, and that SIGTERM ends the
/// process with 0.
fn assert_still_serving(server: &mut ServerProcess, fetch: impl Fn(&str) -> String) {
    std::thread::sleep(Duration::from_millis(1_500));
    for _ in 0..3 {
        let started = Instant::now();
        let health = fetch("/healthz");
        assert!(
            health.starts_with("HTTP/1.1 200"),
            "no answer to /healthz after the ping time ({:?}): {health:?}",
            started.elapsed()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = fetch("/metrics");
        if metric(&metrics, "fanout_close_timeouts_total") >= 1.0 {
            assert_eq!(metric(&metrics, "fanout_timer_stalls_total"), 0.0);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stuck connection was not dropped at the close timeout:\n{metrics}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = server.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Upgrades a raw loopback connection on `path` with `extra` headers.
fn upgrade(addr: SocketAddr, path: &str, extra: &str) -> TcpStream {
    let mut stream = connect_tcp(addr);
    let head = UPGRADE_HEAD.replacen("GET /echo ", &format!("GET {path} "), 1);
    let head = head.replacen("\r\n\r\n", &format!("\r\n{extra}\r\n"), 1);
    stream.write_all(head.as_bytes()).unwrap();
    let response = read_http_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    stream
}

/// The reproduction from the report: a channel subscriber stops reading,
/// a publisher fills its queue, and the subscriber sends a close frame.
#[test]
fn a_subscriber_that_closes_with_a_full_queue_cannot_hang_the_server() {
    let mut flags = vec!["--internal-listen", "127.0.0.1:0", "--no-sim"];
    flags.extend(TIMERS);
    let mut server = ServerProcess::start(&flags);
    let (public, internal) = (server.addrs[0], server.addrs[1]);

    let mut publisher = JsonClient::ws(internal);
    publisher.ok(json!({"type":"create","channel":"stall","id":1}));
    let mut subscriber = upgrade(public, "/ws", "");
    let subscribe = json!({"type":"subscribe","channel":"stall","id":2}).to_string();
    subscriber
        .write_all(&client_frame(0x81, subscribe.as_bytes()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // Publish until the server starts dropping deliveries to the
    // subscriber: its socket buffers and its queue are then full.
    let data = "x".repeat(16 << 10);
    let mut published = 0;
    loop {
        for _ in 0..50 {
            publisher.ok(json!({"type":"publish","channel":"stall","data":data,"id":3}));
        }
        published += 50;
        let metrics = get(internal, "/metrics");
        if metric(&metrics, "fanout_delivery_drops_total") > 0.0 {
            break;
        }
        assert!(
            published < 4_000,
            "{published} messages of 16 KiB published and none dropped"
        );
    }
    subscriber.write_all(&close_frame()).unwrap();
    assert_still_serving(&mut server, |path| get(public, path));
}

/// /echo: the replies to what the client sent pile up, then it closes.
#[test]
fn an_echo_client_that_closes_without_reading_cannot_hang_the_server() {
    let mut flags = ROOMY_QUEUE.to_vec();
    flags.extend(TIMERS);
    let mut server = ServerProcess::start(&flags);
    let mut client = upgrade(server.addr, "/echo", "");
    let message = client_frame(0x82, &[7; 64 << 10]);
    for _ in 0..FLOOD / (64 << 10) {
        client.write_all(&message).unwrap();
    }
    client.write_all(&close_frame()).unwrap();
    let addr = server.addr;
    assert_still_serving(&mut server, |path| get(addr, path));
}

/// /echo streams a large message back as it arrives: the close comes while
/// that reply is half written, and waits behind the rest of it.
#[test]
fn a_close_behind_a_half_sent_streamed_echo_cannot_hang_the_server() {
    let mut flags = ROOMY_QUEUE.to_vec();
    flags.extend(TIMERS);
    let mut server = ServerProcess::start(&flags);
    let mut client = upgrade(server.addr, "/echo", "");
    client
        .write_all(&client_frame(0x82, &noise(FLOOD / 2)))
        .unwrap();
    client.write_all(&close_frame()).unwrap();
    let addr = server.addr;
    assert_still_serving(&mut server, |path| get(addr, path));
}

/// With permessage-deflate the streamed echo goes out in fragments; the
/// close comes while they are half sent.
#[test]
fn a_close_behind_half_sent_compressed_fragments_cannot_hang_the_server() {
    let mut flags = vec!["--compression", "shared"];
    flags.extend(ROOMY_QUEUE);
    flags.extend(TIMERS);
    let mut server = ServerProcess::start(&flags);
    let mut client = upgrade(
        server.addr,
        "/echo",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    client
        .write_all(&client_frame(0x82, &noise(FLOOD / 2)))
        .unwrap();
    client.write_all(&close_frame()).unwrap();
    let addr = server.addr;
    assert_still_serving(&mut server, |path| get(addr, path));
}

/// The same over TLS: the replies wait as TLS records and queued bytes.
#[test]
fn a_tls_client_that_closes_without_reading_cannot_hang_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::generate(dir.path(), "server");
    let mut flags = vec!["--tls-cert", cert.cert(), "--tls-key", cert.key()];
    flags.extend(ROOMY_QUEUE);
    flags.extend(TIMERS);
    let mut server = ServerProcess::start(&flags);
    let addr = server.addr;
    let mut client = cert.connect(addr).expect("TLS handshake");
    client.write_all(UPGRADE_HEAD.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 4096, "head too long");
        client.read_exact(&mut byte).expect("read the 101");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let message = client_frame(0x82, &[7; 64 << 10]);
    for _ in 0..FLOOD / (64 << 10) {
        client.write_all(&message).unwrap();
    }
    client.write_all(&close_frame()).unwrap();
    client.flush().unwrap();
    let https_get = |path: &str| {
        let Ok(mut stream) = cert.connect(addr) else {
            return String::new();
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        String::from_utf8_lossy(&response).into_owned()
    };
    assert_still_serving(&mut server, https_get);
}
