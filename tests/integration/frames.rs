//! Frame-level behaviour over real loopback sockets: echo at every length
//! encoding, frames cut at every byte, every protocol violation's close
//! code, size limits checked on the header alone, pings, and the timers
//! (idle close, close timeout).

use crate::support::common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::Message;

// ---------------------------------------------------------------- helpers

/// Only the masked header (shortest length form, then the mask key) of a
/// client frame claiming `len` payload bytes.
fn header_only(b0: u8, len: u64) -> Vec<u8> {
    let mut out = vec![b0];
    match len {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
    out.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    out
}

/// An unmasked (client-illegal) frame.
fn unmasked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut out = vec![b0, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// Parses one server frame from the front of `buf`.
fn parse_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, mut pos) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10)
        }
        n => (u64::from(n), 2),
    };
    let len = len as usize;
    if buf.len() < pos + len {
        return None;
    }
    let payload = buf[pos..pos + len].to_vec();
    pos += len;
    Some((
        ServerFrame {
            b0: buf[0],
            payload,
        },
        pos,
    ))
}

#[derive(Debug)]
enum Next {
    Frame(ServerFrame),
    Eof,
    Timeout,
}

/// Reads server frames with deadlines and no risk of losing a partly read
/// frame to a read timeout (unlike `read_exact` with a socket timeout).
struct FrameReader {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl FrameReader {
    fn new(stream: TcpStream) -> Self {
        FrameReader {
            stream,
            buf: Vec::new(),
        }
    }

    fn next(&mut self, within: Duration) -> Next {
        let deadline = Instant::now() + within;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Next::Frame(frame);
            }
            let now = Instant::now();
            if now >= deadline {
                return Next::Timeout;
            }
            let wait = (deadline - now).clamp(Duration::from_millis(1), Duration::from_millis(50));
            self.stream.set_read_timeout(Some(wait)).unwrap();
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Next::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Next::Eof,
            }
        }
    }

    fn frame(&mut self, within: Duration) -> ServerFrame {
        match self.next(within) {
            Next::Frame(frame) => frame,
            other => panic!("expected a frame within {within:?}, got {other:?}"),
        }
    }

    /// True if the server closes TCP within `within` (frames are skipped).
    fn eof_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Next::Eof => return true,
                Next::Timeout => return false,
                Next::Frame(_) => {}
            }
        }
        false
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }
}

fn raw(server: &TestServer) -> FrameReader {
    FrameReader::new(raw_upgrade(server.addr))
}

/// Sends `bytes` on a fresh connection and expects a close frame with
/// `code` within 2 s, followed by the server closing TCP.
fn expect_failure(server: &TestServer, name: &str, bytes: &[u8], code: u16) {
    let mut conn = raw(server);
    conn.write(bytes);
    let started = Instant::now();
    let close = conn.frame(Duration::from_secs(2));
    assert_eq!(
        close.opcode(),
        8,
        "{name}: expected a close frame, got {close:?}"
    );
    assert_eq!(
        close.b0 & 0x80,
        0x80,
        "{name}: close frame must have FIN set"
    );
    assert_eq!(
        close.close_code(),
        Some(code),
        "{name}: reason {:?}",
        close.close_reason()
    );
    assert!(close.payload.len() <= 125, "{name}: close frame too long");
    assert!(
        std::str::from_utf8(&close.payload[2..]).is_ok(),
        "{name}: close reason not UTF-8"
    );
    assert!(
        conn.eof_within(Duration::from_secs(2)),
        "{name}: server did not close TCP after the close frame"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{name}: took {:?}",
        started.elapsed()
    );
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn text_of(len: usize) -> String {
    (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

// ------------------------------------------------------------------ echo

#[test]
fn echo_text_and_binary_at_every_length_encoding() {
    let server = TestServer::start(&[]);
    let mut ws = server.client("/echo");
    for size in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
        let text = text_of(size);
        ws.send(Message::Text(text.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Text(t) => assert!(
                t == text,
                "text echo of {size} bytes differs (got {} bytes)",
                t.len()
            ),
            other => panic!("text of {size} bytes: got {other:?}"),
        }
        let bytes = pattern(size, size as u8);
        ws.send(Message::Binary(bytes.clone())).unwrap();
        match ws.read().unwrap() {
            Message::Binary(b) => assert!(
                b == bytes,
                "binary echo of {size} bytes differs (got {} bytes)",
                b.len()
            ),
            other => panic!("binary of {size} bytes: got {other:?}"),
        }
    }
    ws.close(None).unwrap();
    server.stop().unwrap();
}

#[test]
fn multibyte_text_straddling_read_boundaries_echoes_intact() {
    let server = TestServer::start(&[]);
    let mut ws = server.client("/echo");
    // ~300 KiB of 1-4 byte characters: the server's 256 KiB reads cut
    // through code points.
    let text: String = "aé€😀".repeat(30_000);
    ws.send(Message::Text(text.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text(text));
    ws.close(None).unwrap();
}

#[test]
fn fragmented_messages_echo_as_one_message() {
    let server = TestServer::start(&[]);
    let mut conn = raw(&server);
    // Text in three fragments, a ping in the middle, a code point cut
    // across fragments.
    let euro = "€".as_bytes();
    let mut bytes = client_frame(0x01, b"frag");
    bytes.extend(client_frame(0x89, b"mid"));
    bytes.extend(client_frame(
        0x00,
        &[b"men".as_slice(), &euro[..1]].concat(),
    ));
    bytes.extend(client_frame(
        0x80,
        &[&euro[1..], b"ted".as_slice()].concat(),
    ));
    conn.write(&bytes);
    let pong = conn.frame(Duration::from_secs(2));
    assert_eq!(
        (pong.b0, pong.payload.as_slice()),
        (0x8A, b"mid".as_slice())
    );
    let text = conn.frame(Duration::from_secs(2));
    assert_eq!(text.b0, 0x81, "one unfragmented text frame");
    assert_eq!(String::from_utf8(text.payload).unwrap(), "fragmen€ted");

    // Binary fragments sent in separate writes, one of them empty.
    let chunks: [&[u8]; 4] = [b"\x00\x01", b"", b"\x02\x03\x04", b"\xff"];
    for (i, chunk) in chunks.iter().enumerate() {
        let b0 = match (i, i == chunks.len() - 1) {
            (0, _) => 0x02,
            (_, true) => 0x80,
            _ => 0x00,
        };
        conn.write(&client_frame(b0, chunk));
        sleep(Duration::from_millis(10));
    }
    let binary = conn.frame(Duration::from_secs(2));
    assert_eq!(binary.b0, 0x82);
    assert_eq!(binary.payload, chunks.concat());

    // A 200 KiB binary message in 50 KiB fragments.
    let big = pattern(200 << 10, 7);
    let pieces: Vec<&[u8]> = big.chunks(50 << 10).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let b0 = if i == 0 { 0x02 } else { 0x00 } | if i == pieces.len() - 1 { 0x80 } else { 0 };
        conn.write(&client_frame(b0, piece));
    }
    let echoed = conn.frame(Duration::from_secs(5));
    assert_eq!(echoed.b0, 0x82);
    assert!(echoed.payload == big, "200 KiB fragmented message differs");
}

#[test]
fn frames_split_at_every_byte_boundary_echo_identically() {
    let server = TestServer::start(&[]);
    let mut conn = raw(&server);
    // A 20-byte frame: 2 header + 4 mask + 14 payload.
    let payload = b"split me 12345";
    let frame = client_frame(0x81, payload);
    assert_eq!(frame.len(), 20);
    for split in 1..frame.len() {
        conn.write(&frame[..split]);
        sleep(Duration::from_millis(15));
        conn.write(&frame[split..]);
        let echo = conn.frame(Duration::from_secs(2));
        assert_eq!(
            (echo.b0, echo.payload.as_slice()),
            (0x81, payload.as_slice()),
            "split at {split}"
        );
    }
    // Every byte in its own write.
    for byte in &frame {
        conn.write(std::slice::from_ref(byte));
        sleep(Duration::from_millis(5));
    }
    let echo = conn.frame(Duration::from_secs(2));
    assert_eq!(
        (echo.b0, echo.payload.as_slice()),
        (0x81, payload.as_slice()),
        "byte by byte"
    );

    // A frame with a 16-bit length, cut at every point of its 8-byte
    // header and a few points in the payload; and one with a 64-bit
    // length cut inside its length field.
    let medium = pattern(300, 3);
    let frame = client_frame(0x82, &medium);
    for split in (1..=10).chain([50, 200, frame.len() - 1]) {
        conn.write(&frame[..split]);
        sleep(Duration::from_millis(10));
        conn.write(&frame[split..]);
        let echo = conn.frame(Duration::from_secs(2));
        assert_eq!(echo.b0, 0x82);
        assert!(echo.payload == medium, "300-byte frame split at {split}");
    }
    let large = pattern(70_000, 9);
    let frame = client_frame(0x82, &large);
    for split in [1, 2, 5, 9, 13, 14, 15] {
        conn.write(&frame[..split]);
        sleep(Duration::from_millis(10));
        conn.write(&frame[split..]);
        let echo = conn.frame(Duration::from_secs(2));
        assert!(
            echo.b0 == 0x82 && echo.payload == large,
            "70000-byte frame split at {split}"
        );
    }
    // Still healthy: nothing left over in the decoder.
    conn.write(&client_frame(0x81, b"after"));
    assert_eq!(conn.frame(Duration::from_secs(2)).payload, b"after");
}

#[test]
fn pipelined_frames_and_frames_behind_the_upgrade_request() {
    let server = TestServer::start(&[]);
    // Two frames in the same write as the HTTP upgrade request.
    let mut stream = connect_tcp(server.addr);
    let mut bytes = UPGRADE_HEAD.as_bytes().to_vec();
    bytes.extend(client_frame(0x81, b"early one"));
    bytes.extend(client_frame(0x82, b"early two"));
    stream.write_all(&bytes).unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut conn = FrameReader::new(stream);
    assert_eq!(conn.frame(Duration::from_secs(2)).payload, b"early one");
    assert_eq!(conn.frame(Duration::from_secs(2)).payload, b"early two");

    // 100 frames in one write, and a write that ends mid-frame.
    let mut burst = Vec::new();
    for i in 0..100u32 {
        burst.extend(client_frame(0x82, &i.to_be_bytes()));
    }
    let tail = client_frame(0x81, b"tail");
    burst.extend_from_slice(&tail[..3]);
    conn.write(&burst);
    for i in 0..100u32 {
        let echo = conn.frame(Duration::from_secs(2));
        assert_eq!(echo.payload, i.to_be_bytes(), "frame {i}");
    }
    sleep(Duration::from_millis(20));
    conn.write(&tail[3..]);
    assert_eq!(conn.frame(Duration::from_secs(2)).payload, b"tail");
}

// ------------------------------------------------------------ violations

#[test]
fn protocol_violations_close_with_the_right_code_and_then_close_tcp() {
    let server = TestServer::start(&[]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked text", unmasked_frame(0x81, b"hi"), 1002),
        ("unmasked empty ping", unmasked_frame(0x89, b""), 1002),
        ("RSV1", client_frame(0xC1, b"x"), 1002),
        ("RSV2", client_frame(0xA2, b"x"), 1002),
        ("RSV3", client_frame(0x91, b"x"), 1002),
        ("reserved opcode 0x3", client_frame(0x83, b""), 1002),
        ("reserved opcode 0x7", client_frame(0x87, b""), 1002),
        ("reserved opcode 0xB", client_frame(0x8B, b""), 1002),
        ("reserved opcode 0xF", client_frame(0x8F, b""), 1002),
        ("fragmented ping", client_frame(0x09, b"p"), 1002),
        ("fragmented close", client_frame(0x08, b"\x03\xe8"), 1002),
        ("ping of 126 bytes", client_frame(0x89, &[b'p'; 126]), 1002),
        ("pong of 200 bytes", client_frame(0x8A, &[b'p'; 200]), 1002),
        (
            "continuation without start",
            client_frame(0x80, b"orphan"),
            1002,
        ),
        (
            "non-final continuation without start",
            client_frame(0x00, b"orphan"),
            1002,
        ),
        (
            "new message inside a fragmented one",
            [client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(),
            1002,
        ),
        ("invalid UTF-8 text", client_frame(0x81, b"ok \xff"), 1007),
        (
            "UTF-16 surrogate in text",
            client_frame(0x81, b"\xed\xa0\x80"),
            1007,
        ),
        ("overlong UTF-8", client_frame(0x81, b"\xc0\xaf"), 1007),
        (
            "text ending mid code point",
            [client_frame(0x01, b"a\xe2"), client_frame(0x80, b"")].concat(),
            1007,
        ),
        (
            "close with invalid code 999",
            client_frame(0x88, b"\x03\xe7"),
            1002,
        ),
        (
            "close with reserved code 1005",
            client_frame(0x88, b"\x03\xed"),
            1002,
        ),
        (
            "close with reserved code 1006",
            client_frame(0x88, b"\x03\xee"),
            1002,
        ),
        (
            "close with unassigned code 1016",
            client_frame(0x88, b"\x03\xf8"),
            1002,
        ),
        (
            "close with code 5000",
            client_frame(0x88, b"\x13\x88"),
            1002,
        ),
        (
            "close with 1-byte payload",
            client_frame(0x88, b"\x03"),
            1002,
        ),
        (
            "close reason not UTF-8",
            client_frame(0x88, b"\x03\xe8\xff"),
            1007,
        ),
        (
            "64-bit length with the high bit set",
            header_only(0x82, 1 << 63),
            1002,
        ),
    ];
    for (name, bytes, code) in cases {
        expect_failure(&server, name, &bytes, code);
    }
    // The server is still fine afterwards.
    let mut ws = server.client("/echo");
    ws.send(Message::Text("still here".into())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Text("still here".into()));
}

#[test]
fn invalid_utf8_fails_before_the_message_ends() {
    let server = TestServer::start(&[]);
    // Only the first (non-final) fragment is sent: it already holds an
    // invalid sequence, so the server must fail without waiting for more.
    expect_failure(
        &server,
        "bad first fragment",
        &client_frame(0x01, b"\xce\xba\xed\xa0\x80"),
        1007,
    );
    // Second fragment bad, final fragment never sent.
    let bytes = [
        client_frame(0x01, b"good "),
        client_frame(0x00, b"then \xff"),
    ]
    .concat();
    expect_failure(&server, "bad middle fragment", &bytes, 1007);
    // A single frame whose announced payload is much longer than what is
    // sent: the invalid byte in the part that did arrive is enough.
    let whole = client_frame(0x81, &[b"ok\xf4\x90".as_slice(), &[b'x'; 1000]].concat());
    expect_failure(
        &server,
        "bad prefix of an incomplete frame",
        &whole[..4 + 4 + 4],
        1007,
    );
}

#[test]
fn oversized_frame_is_refused_from_its_header_alone() {
    let server = TestServer::start(&["--max-message-size", "1KiB", "--max-frame-size", "1KiB"]);
    // Exactly at the limit is fine.
    let mut conn = raw(&server);
    let fits = pattern(1024, 1);
    conn.write(&client_frame(0x82, &fits));
    let echo = conn.frame(Duration::from_secs(2));
    assert!(echo.b0 == 0x82 && echo.payload == fits);

    // Only the header of a 1 MiB frame: 1009 without the payload.
    expect_failure(
        &server,
        "header of a 1 MiB binary frame",
        &header_only(0x82, 1 << 20),
        1009,
    );
    expect_failure(
        &server,
        "header of a 1 MiB text frame",
        &header_only(0x81, 1 << 20),
        1009,
    );
    expect_failure(
        &server,
        "header of a 1025-byte frame",
        &client_frame(0x82, &[0; 1025])[..8],
        1009,
    );
    // Fragments each within the frame limit but adding up past the
    // message limit: the second fragment's header is enough.
    let bytes = [client_frame(0x02, &[1; 600]), header_only(0x00, 600)].concat();
    expect_failure(&server, "fragments adding up past the limit", &bytes, 1009);
    let bytes = [
        client_frame(0x01, &[b'a'; 1000]),
        client_frame(0x00, &[b'b'; 24]),
        header_only(0x80, 1),
    ]
    .concat();
    expect_failure(
        &server,
        "third fragment one byte past the limit",
        &bytes,
        1009,
    );
    // Control frames in between do not count towards the message size.
    let bytes = [
        client_frame(0x02, &[1; 1000]),
        client_frame(0x89, &[2; 125]),
        client_frame(0x80, &[3; 24]),
    ]
    .concat();
    conn.write(&bytes);
    assert_eq!(conn.frame(Duration::from_secs(2)).opcode(), 0xA);
    let echo = conn.frame(Duration::from_secs(2));
    assert_eq!(echo.payload.len(), 1024);
}

// ------------------------------------------------------ control frames

#[test]
fn ping_gets_a_pong_with_the_same_payload() {
    let server = TestServer::start(&[]);
    let mut conn = raw(&server);
    for payload in [&b""[..], b"x", b"hello ping", &[0xAB; 125]] {
        conn.write(&client_frame(0x89, payload));
        let pong = conn.frame(Duration::from_secs(2));
        assert_eq!(pong.b0, 0x8A, "pong with FIN");
        assert_eq!(pong.payload, payload);
    }
    // Unsolicited pongs are ignored; the connection keeps working.
    conn.write(&client_frame(0x8A, b"unsolicited"));
    conn.write(&client_frame(0x81, b"after pong"));
    let echo = conn.frame(Duration::from_secs(2));
    assert_eq!(
        (echo.b0, echo.payload.as_slice()),
        (0x81, &b"after pong"[..])
    );
}

#[test]
fn client_close_is_echoed_and_tcp_closed() {
    let server = TestServer::start(&[]);
    for (code, reason) in [
        (1000u16, "bye"),
        (1001, ""),
        (3000, "app"),
        (4999, "private"),
    ] {
        let mut conn = raw(&server);
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        conn.write(&client_frame(0x88, &payload));
        let close = conn.frame(Duration::from_secs(2));
        assert_eq!(close.opcode(), 8);
        assert_eq!(close.close_code(), Some(code), "server echoes the code");
        assert!(
            conn.eof_within(Duration::from_secs(2)),
            "server closes TCP after close {code}"
        );
    }
    // An empty close gets an empty (or codeless) close back.
    let mut conn = raw(&server);
    conn.write(&client_frame(0x88, b""));
    let close = conn.frame(Duration::from_secs(2));
    assert_eq!(close.opcode(), 8);
    assert!(
        close.payload.is_empty() || close.close_code() == Some(1000),
        "{close:?}"
    );
    assert!(conn.eof_within(Duration::from_secs(2)));
    // Data after the close frame is not echoed.
    let mut conn = raw(&server);
    let bytes = [
        client_frame(0x88, b"\x03\xe8"),
        client_frame(0x81, b"too late"),
    ]
    .concat();
    conn.write(&bytes);
    let close = conn.frame(Duration::from_secs(2));
    assert_eq!(close.close_code(), Some(1000));
    assert!(conn.eof_within(Duration::from_secs(2)));
    // tungstenite sees a clean close.
    let mut ws = server.client("/echo");
    ws.close(None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        assert!(
            Instant::now() < deadline,
            "tungstenite close did not complete"
        );
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unclean close: {e}"),
        }
    }
}

// ---------------------------------------------------------------- timers

const TIMER_FLAGS: [&str; 6] = [
    "--ping-interval",
    "200ms",
    "--idle-timeout",
    "600ms",
    "--close-timeout",
    "400ms",
];

#[test]
fn silent_client_is_pinged_then_closed_for_idleness() {
    let server = TestServer::start(&TIMER_FLAGS);
    let mut conn = raw(&server);
    let started = Instant::now();
    let mut pings = 0;
    let close = loop {
        let frame = conn.frame(Duration::from_secs(3));
        match frame.opcode() {
            9 => {
                assert_eq!(frame.b0, 0x89);
                pings += 1;
            }
            8 => break frame,
            other => panic!("unexpected opcode {other}: {frame:?}"),
        }
        assert!(pings < 20, "too many pings and no idle close");
    };
    let elapsed = started.elapsed();
    assert!(pings >= 1, "no ping before the idle close");
    assert_eq!(close.close_code(), Some(1008), "{close:?}");
    assert!(
        close.close_reason().contains("idle"),
        "reason: {:?}",
        close.close_reason()
    );
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3),
        "idle close after {elapsed:?}, expected about 600ms"
    );
}

#[test]
fn client_answering_pings_stays_connected_past_the_idle_timeout() {
    let server = TestServer::start(&TIMER_FLAGS);
    let mut conn = raw(&server);
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1800) {
        match conn.next(Duration::from_millis(100)) {
            Next::Frame(frame) if frame.opcode() == 9 => {
                pings += 1;
                conn.write(&client_frame(0x8A, &frame.payload));
            }
            Next::Frame(frame) => panic!(
                "unexpected frame while answering pings: {frame:?} (reason {:?})",
                frame.close_reason()
            ),
            Next::Eof => panic!("server closed a client that answers pings"),
            Next::Timeout => {}
        }
    }
    assert!(
        pings >= 3,
        "only {pings} pings in 1.8 s with a 200ms interval"
    );
    conn.write(&client_frame(0x81, b"still open"));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let frame = conn.frame(deadline.saturating_duration_since(Instant::now()));
        if frame.opcode() == 9 {
            continue;
        }
        assert_eq!(
            (frame.b0, frame.payload.as_slice()),
            (0x81, &b"still open"[..])
        );
        break;
    }
}

#[test]
fn client_that_keeps_sending_data_is_not_idle() {
    let server = TestServer::start(&TIMER_FLAGS);
    let mut conn = raw(&server);
    let started = Instant::now();
    let mut i = 0u32;
    while started.elapsed() < Duration::from_millis(1500) {
        conn.write(&client_frame(0x82, &i.to_be_bytes()));
        loop {
            let frame = conn.frame(Duration::from_secs(2));
            match frame.opcode() {
                9 => continue,
                2 => {
                    assert_eq!(frame.payload, i.to_be_bytes());
                    break;
                }
                _ => panic!(
                    "unexpected frame {frame:?} (reason {:?})",
                    frame.close_reason()
                ),
            }
        }
        i += 1;
        sleep(Duration::from_millis(100));
    }
}

#[test]
fn client_that_never_answers_the_close_is_dropped_after_the_close_timeout() {
    let server = TestServer::start(&TIMER_FLAGS);
    let mut conn = raw(&server);
    let close = loop {
        let frame = conn.frame(Duration::from_secs(3));
        if frame.opcode() == 8 {
            break frame;
        }
    };
    assert_eq!(close.close_code(), Some(1008));
    let closed_at = Instant::now();
    // No reply, no reads of anything else: the server must give up.
    assert!(
        conn.eof_within(Duration::from_secs(3)),
        "not dropped within 3 s of a 400ms close timeout"
    );
    let waited = closed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "dropped after {waited:?}, before the 400ms close timeout"
    );
}

#[test]
fn client_answering_the_idle_close_is_disconnected_promptly() {
    let server = TestServer::start(&[
        "--ping-interval",
        "200ms",
        "--idle-timeout",
        "600ms",
        "--close-timeout",
        "10s",
    ]);
    let mut conn = raw(&server);
    let close = loop {
        let frame = conn.frame(Duration::from_secs(3));
        if frame.opcode() == 8 {
            break frame;
        }
    };
    assert_eq!(close.close_code(), Some(1008));
    conn.write(&client_frame(0x88, &close.payload[..2]));
    let replied = Instant::now();
    assert!(
        conn.eof_within(Duration::from_secs(3)),
        "server kept TCP open after both close frames"
    );
    assert!(
        replied.elapsed() < Duration::from_secs(2),
        "took {:?}, not the 10s close timeout",
        replied.elapsed()
    );
}
