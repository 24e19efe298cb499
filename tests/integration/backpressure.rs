//! TCP backpressure over real loopback sockets: a client that sends
//! requests and never reads their replies is stopped (the server stops
//! reading it) without hurting anyone else, and gets every reply once it
//! reads again; many short-lived connections leave the server healthy.

use crate::support::common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

const MAX_OUTBOUND: usize = 1 << 20;
const FLAGS: [&str; 2] = ["--max-outbound-buffer", "1MiB"];

/// Far more than loopback socket buffers plus the server's queue can hold:
/// a server that kept reading would take all of it without stalling.
const SEND_CAP: usize = 256 << 20;

/// How long writes must make no progress at all to count as stopped.
const STALL: Duration = Duration::from_millis(750);

/// A stream of fixed-size client frames, frame `i` being `make(i)`.
struct FrameStream {
    frame_len: usize,
    per_batch: usize,
    make: fn(u64) -> Vec<u8>,
}

impl FrameStream {
    fn batch(&self, first: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.frame_len * self.per_batch);
        for i in first..first + self.per_batch as u64 {
            let frame = (self.make)(i);
            assert_eq!(frame.len(), self.frame_len);
            out.extend_from_slice(&frame);
        }
        out
    }
}

/// Writes frames without ever reading until the socket accepts nothing for
/// `STALL`. Returns the bytes the server side accepted, or panics if it
/// never stalls within `SEND_CAP` bytes (or 60 s).
fn send_until_stalled(stream: &mut TcpStream, frames: &FrameStream) -> usize {
    stream.set_nonblocking(true).unwrap();
    let started = Instant::now();
    let mut accepted = 0usize;
    let mut next_frame = 0u64;
    let mut batch = Vec::new();
    let mut offset = 0;
    let mut last_progress = Instant::now();
    loop {
        if offset == batch.len() {
            assert!(
                accepted < SEND_CAP,
                "the server accepted {accepted} bytes from a client that never reads: it did not stop reading"
            );
            batch = frames.batch(next_frame);
            next_frame += frames.per_batch as u64;
            offset = 0;
        }
        match stream.write(&batch[offset..]) {
            Ok(0) => panic!("write returned 0"),
            Ok(n) => {
                offset += n;
                accepted += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= STALL {
                    break;
                }
                sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("write failed after {accepted} bytes: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never stalled; {accepted} bytes accepted"
        );
    }
    stream.set_nonblocking(false).unwrap();
    accepted
}

/// True if nothing more is accepted for `for_how_long`.
fn still_stalled(stream: &mut TcpStream, probe: &[u8], for_how_long: Duration) -> bool {
    stream.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + for_how_long;
    let mut stalled = true;
    while Instant::now() < deadline {
        match stream.write(probe) {
            Ok(n) if n > 0 => {
                stalled = false;
                break;
            }
            _ => sleep(Duration::from_millis(20)),
        }
    }
    stream.set_nonblocking(false).unwrap();
    stalled
}

/// A second client's echo roundtrips, each within `bound`.
fn assert_others_get_prompt_echoes(server: &TestServer, bound: Duration) {
    let mut other = server.client("/echo");
    for round in 0..5u8 {
        let payload = vec![round; 4096];
        let started = Instant::now();
        other.send(Message::Binary(payload.clone())).unwrap();
        assert_eq!(other.read().unwrap(), Message::Binary(payload));
        let took = started.elapsed();
        assert!(
            took < bound,
            "second client's roundtrip {round} took {took:?} while another client was stalled"
        );
    }
    let started = Instant::now();
    let mut fresh = server.client("/echo");
    fresh.send(Message::Text("new connection".into())).unwrap();
    assert_eq!(
        fresh.read().unwrap(),
        Message::Text("new connection".into())
    );
    assert!(
        started.elapsed() < bound,
        "a new connection took {:?}",
        started.elapsed()
    );
    other.close(None).unwrap();
    fresh.close(None).unwrap();
}

/// After the stall: finishes the frame that was cut, while a thread reads
/// and checks every reply (`check(i, frame)` for reply `i`).
fn drain_and_check(
    stream: &mut TcpStream,
    frames: &FrameStream,
    accepted: usize,
    check: fn(u64, &ServerFrame),
) -> u64 {
    let complete = (accepted / frames.frame_len) as u64;
    let cut = accepted % frames.frame_len;
    let expected = complete + u64::from(cut > 0);
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let handle = std::thread::spawn(move || {
        let started = Instant::now();
        for i in 0..expected {
            let frame = read_frame(&mut reader).unwrap_or_else(|| {
                panic!("connection ended or stalled after {i} of {expected} replies")
            });
            check(i, &frame);
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "draining took too long"
            );
        }
        reader
    });
    if cut > 0 {
        let rest = &(frames.make)(complete)[cut..];
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(rest).unwrap();
    }
    let mut reader = handle.join().expect("reader thread failed");
    // Nothing beyond the expected replies.
    reader
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut extra = [0u8; 1];
    match reader.read(&mut extra) {
        Ok(n) if n > 0 => panic!("more replies than requests"),
        Ok(_) => panic!("server closed the connection"),
        Err(_) => {}
    }
    expected
}

// -------------------------------------------------------------- echo flood

const ECHO_PAYLOAD: usize = 64 << 10;
const ECHO_FRAME: usize = ECHO_PAYLOAD + 14; // 2 + 8 length + 4 mask

fn echo_payload(i: u64) -> Vec<u8> {
    let mut payload = vec![0u8; ECHO_PAYLOAD];
    payload[..8].copy_from_slice(&i.to_be_bytes());
    let fill = (i as u8).wrapping_mul(7).wrapping_add(1);
    for (j, byte) in payload[8..].iter_mut().enumerate() {
        *byte = fill ^ (j as u8);
    }
    payload
}

fn echo_request(i: u64) -> Vec<u8> {
    client_frame(0x82, &echo_payload(i))
}

fn check_echo(i: u64, frame: &ServerFrame) {
    assert_eq!(frame.b0, 0x82, "reply {i}: not a final binary frame");
    assert_eq!(frame.payload.len(), ECHO_PAYLOAD, "reply {i}: wrong length");
    let seq = u64::from_be_bytes(frame.payload[..8].try_into().unwrap());
    assert_eq!(seq, i, "replies out of order or dropped");
    assert!(
        frame.payload == echo_payload(i),
        "reply {i}: payload corrupted"
    );
}

#[test]
fn client_that_never_reads_is_paused_without_hurting_others_and_loses_nothing() {
    let server = TestServer::start(&FLAGS);
    let mut flooder = raw_upgrade(server.addr);
    let frames = FrameStream {
        frame_len: ECHO_FRAME,
        per_batch: 1,
        make: echo_request,
    };

    let accepted = send_until_stalled(&mut flooder, &frames);
    eprintln!(
        "echo flood: {accepted} bytes ({} requests) accepted before the stall",
        accepted / ECHO_FRAME
    );
    assert!(
        accepted > MAX_OUTBOUND,
        "stalled after only {accepted} bytes, before the queue could fill"
    );

    assert_others_get_prompt_echoes(&server, Duration::from_secs(2));
    assert!(
        still_stalled(&mut flooder, &[0u8; 1], Duration::from_millis(300)),
        "the flooder's writes progressed again without it reading"
    );

    let replies = drain_and_check(&mut flooder, &frames, accepted, check_echo);
    assert!(replies > 16);

    // And it is an ordinary connection again.
    flooder
        .write_all(&client_frame(0x81, b"after the flood"))
        .unwrap();
    let echo = read_frame(&mut flooder).expect("echo after the flood");
    assert_eq!(
        (echo.b0, echo.payload.as_slice()),
        (0x81, &b"after the flood"[..])
    );
    flooder.write_all(&client_frame(0x88, b"\x03\xe8")).unwrap();
    assert_eq!(read_until_close(&mut flooder).close_code(), Some(1000));
    assert!(wait_for_eof(&mut flooder, Duration::from_secs(2)));
    server.stop().unwrap();
}

// -------------------------------------------------------------- ping flood

const PING_PAYLOAD: usize = 125;
const PING_FRAME: usize = PING_PAYLOAD + 6;

fn ping_payload(i: u64) -> [u8; PING_PAYLOAD] {
    let mut payload = [0u8; PING_PAYLOAD];
    payload[..8].copy_from_slice(&i.to_be_bytes());
    for (j, byte) in payload[8..].iter_mut().enumerate() {
        *byte = (i as u8) ^ (j as u8);
    }
    payload
}

fn ping_request(i: u64) -> Vec<u8> {
    client_frame(0x89, &ping_payload(i))
}

fn check_pong(i: u64, frame: &ServerFrame) {
    assert_eq!(frame.b0, 0x8A, "reply {i}: not a pong");
    let seq = u64::from_be_bytes(frame.payload[..8].try_into().unwrap());
    assert_eq!(seq, i, "pongs out of order or dropped");
    assert_eq!(frame.payload, ping_payload(i), "pong {i}: payload differs");
}

#[test]
fn ping_flood_without_reading_pongs_is_paused_and_others_stay_served() {
    let server = TestServer::start(&FLAGS);
    let mut flooder = raw_upgrade(server.addr);
    let frames = FrameStream {
        frame_len: PING_FRAME,
        per_batch: 500,
        make: ping_request,
    };

    let accepted = send_until_stalled(&mut flooder, &frames);
    eprintln!(
        "ping flood: {accepted} bytes ({} pings) accepted before the stall",
        accepted / PING_FRAME
    );
    assert!(
        accepted > MAX_OUTBOUND,
        "stalled after only {accepted} bytes, before the queue could fill"
    );

    assert_others_get_prompt_echoes(&server, Duration::from_secs(2));
    assert!(
        still_stalled(&mut flooder, &[0u8; 1], Duration::from_millis(300)),
        "the flooder's writes progressed again without it reading"
    );

    let pongs = drain_and_check(&mut flooder, &frames, accepted, check_pong);
    assert!(pongs > (MAX_OUTBOUND / PING_FRAME) as u64);

    flooder.write_all(&client_frame(0x89, b"last")).unwrap();
    let pong = read_frame(&mut flooder).expect("pong after the flood");
    assert_eq!((pong.b0, pong.payload.as_slice()), (0x8A, &b"last"[..]));
    drop(flooder);
    server.stop().unwrap();
}

// ------------------------------------------------- many short connections

#[test]
fn many_short_lived_connections_leave_the_server_healthy() {
    let server = TestServer::start(&FLAGS);
    let started = Instant::now();
    for i in 0..200u32 {
        match i % 4 {
            // Clean tungstenite close.
            0 | 1 => {
                let mut ws = server.client("/echo");
                let text = format!("message {i}");
                ws.send(Message::Text(text.clone())).unwrap();
                assert_eq!(ws.read().unwrap(), Message::Text(text));
                ws.close(None).unwrap();
                let mut closed = false;
                for _ in 0..10 {
                    match ws.read() {
                        Ok(_) => {}
                        Err(tungstenite::Error::ConnectionClosed) => {
                            closed = true;
                            break;
                        }
                        Err(e) => panic!("connection {i}: unclean close: {e}"),
                    }
                }
                assert!(closed, "connection {i}: close did not complete");
            }
            // Raw close handshake, waiting for the server to close TCP.
            2 => {
                let mut stream = raw_upgrade(server.addr);
                stream
                    .write_all(&client_frame(0x82, &i.to_be_bytes()))
                    .unwrap();
                assert_eq!(
                    read_frame(&mut stream).expect("echo").payload,
                    i.to_be_bytes()
                );
                stream.write_all(&client_frame(0x88, b"\x03\xe8")).unwrap();
                assert_eq!(read_until_close(&mut stream).close_code(), Some(1000));
                assert!(
                    wait_for_eof(&mut stream, Duration::from_secs(2)),
                    "connection {i}: TCP not closed"
                );
            }
            // Abrupt: TCP dropped mid-message without a close frame.
            _ => {
                let mut stream = raw_upgrade(server.addr);
                stream
                    .write_all(&client_frame(0x82, &i.to_be_bytes()))
                    .unwrap();
                assert_eq!(
                    read_frame(&mut stream).expect("echo").payload,
                    i.to_be_bytes()
                );
                let half = client_frame(0x82, &[1; 1000]);
                stream.write_all(&half[..500]).unwrap();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "200 connections took over 60 s"
        );
    }
    // Still healthy: health check, several concurrent clients, large echo.
    let health = http_exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let mut clients: Vec<_> = (0..10).map(|_| server.client("/echo")).collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::Binary(vec![i as u8; 100_000])).unwrap();
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        assert_eq!(ws.read().unwrap(), Message::Binary(vec![i as u8; 100_000]));
    }
    drop(clients);
    server.stop().unwrap();
}
