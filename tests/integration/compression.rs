//! permessage-deflate (RFC 7692) against a real server over loopback
//! sockets: the negotiation matrix in both modes, compressed echo with and
//! without context takeover, fragmented compressed messages, the frames
//! that must fail, a decompression bomb, a compressed fan-out to
//! subscribers of which only some negotiated compression, and a slow
//! subscriber whose held candles are compressed in the order they go out.
//!
//! The client side is written here from flate2 directly (raw deflate, sync
//! flush, tail removed and restored), not with the server's own wrappers.

use crate::support::common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{json, Value};

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

fn deflate(zlib: &mut Compress, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 1024);
    let start = zlib.total_in();
    loop {
        let done = (zlib.total_in() - start) as usize;
        zlib.compress_vec(&payload[done..], &mut out, FlushCompress::Sync)
            .unwrap();
        let done = (zlib.total_in() - start) as usize;
        if done == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&TAIL), "a sync flush ends with 00 00 ff ff");
    out.truncate(out.len() - 4);
    out
}

fn inflate(zlib: &mut Decompress, compressed: &[u8]) -> Vec<u8> {
    let mut input = compressed.to_vec();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(input.len() * 8 + 1024);
    let start = zlib.total_in();
    for _ in 0..10_000 {
        let done = (zlib.total_in() - start) as usize;
        zlib.decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
            .expect("the server's deflate data inflates");
        let done = (zlib.total_in() - start) as usize;
        if done == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
    panic!("inflate did not finish");
}

/// The `Sec-WebSocket-Extensions` value of a 101 response, if any.
fn extensions_header(head: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    })
}

/// Upgrades to `path`, offering `offer` (if any); the 101 head.
fn upgrade(addr: SocketAddr, path: &str, offer: Option<&str>) -> (TcpStream, String) {
    upgrade_on(connect_tcp(addr), path, offer)
}

/// [`upgrade`] on a connection made already.
fn upgrade_on(mut stream: TcpStream, path: &str, offer: Option<&str>) -> (TcpStream, String) {
    let offer = offer
        .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (stream, head)
}

/// A raw client that negotiated permessage-deflate.
struct DeflateClient {
    stream: TcpStream,
    agreed: String,
    compress: Compress,
    inflate: Decompress,
}

impl DeflateClient {
    fn connect(addr: SocketAddr, path: &str, offer: &str) -> DeflateClient {
        DeflateClient::on(connect_tcp(addr), path, offer)
    }

    fn on(stream: TcpStream, path: &str, offer: &str) -> DeflateClient {
        let (stream, head) = upgrade_on(stream, path, Some(offer));
        let agreed = extensions_header(&head).expect("permessage-deflate accepted");
        let server_bits = param_value(&agreed, "server_max_window_bits").unwrap_or(15);
        DeflateClient {
            stream,
            compress: Compress::new(Compression::default(), false),
            inflate: Decompress::new_with_window_bits(false, server_bits),
            agreed,
        }
    }

    fn agreed(&self, param: &str) -> bool {
        self.agreed.split(';').any(|p| p.trim() == param)
    }

    /// Sends `payload` compressed, in `frames` frames (RSV1 on the first).
    fn send_compressed(&mut self, opcode: u8, payload: &[u8], frames: usize) {
        let wire = deflate(&mut self.compress, payload);
        if self.agreed("client_no_context_takeover") {
            self.compress.reset();
        }
        let piece = wire.len().div_ceil(frames).max(1);
        let pieces: Vec<&[u8]> = wire.chunks(piece).collect();
        let mut bytes = Vec::new();
        for (i, chunk) in pieces.iter().enumerate() {
            let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
            let first = if i == 0 { 0x40 | opcode } else { 0 };
            bytes.extend(client_frame(fin | first, chunk));
        }
        self.stream.write_all(&bytes).unwrap();
    }

    fn send_text(&mut self, text: &str) {
        self.send_compressed(0x1, text.as_bytes(), 1);
    }

    /// The next data message (pings skipped): whether it came compressed,
    /// its opcode, and its payload inflated.
    fn recv(&mut self) -> (bool, u8, Vec<u8>) {
        for _ in 0..100 {
            let frame = read_frame(&mut self.stream).expect("a frame from the server");
            match frame.opcode() {
                0x9 | 0xA => continue,
                0x8 => panic!("closed: {:?} {}", frame.close_code(), frame.close_reason()),
                opcode => {
                    assert_eq!(frame.b0 & 0x80, 0x80, "the server sends whole messages");
                    assert_eq!(frame.b0 & 0x30, 0, "RSV2 and RSV3 stay clear");
                    if frame.b0 & 0x40 == 0 {
                        return (false, opcode, frame.payload);
                    }
                    if self.agreed("server_no_context_takeover") {
                        self.inflate.reset(false);
                    }
                    return (true, opcode, inflate(&mut self.inflate, &frame.payload));
                }
            }
        }
        panic!("no data message within 100 frames");
    }

    fn recv_json(&mut self) -> (bool, Value) {
        let (compressed, opcode, payload) = self.recv();
        assert_eq!(opcode, 1, "JSON comes as text");
        (compressed, serde_json::from_slice(&payload).unwrap())
    }
}

fn param_value(agreed: &str, name: &str) -> Option<u8> {
    agreed.split(';').find_map(|p| {
        let (key, value) = p.trim().split_once('=')?;
        (key == name).then(|| value.parse().unwrap())
    })
}

fn sample_text(len: usize) -> String {
    let line = r#"{"type":"trade","symbol":"PUMP-SOL","price":"0.001234","qty":1500},"#;
    line.chars().cycle().take(len).collect()
}

#[test]
fn negotiation_matrix_in_each_mode() {
    let pmd = "permessage-deflate";
    let both = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
    // (offer, answer in shared mode, answer in dedicated mode)
    let cases: Vec<(&str, Option<String>, Option<String>)> = vec![
        (pmd, Some(both.into()), Some(pmd.into())),
        (
            "permessage-deflate; server_no_context_takeover",
            Some(both.into()),
            Some("permessage-deflate; server_no_context_takeover".into()),
        ),
        (
            "permessage-deflate; client_no_context_takeover",
            Some(both.into()),
            Some("permessage-deflate; client_no_context_takeover".into()),
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            Some(format!("{both}; server_max_window_bits=10")),
            Some("permessage-deflate; server_max_window_bits=10".into()),
        ),
        (
            "permessage-deflate; client_max_window_bits",
            Some(both.into()),
            Some(pmd.into()),
        ),
        (
            "permessage-deflate; client_max_window_bits=9",
            Some(both.into()),
            Some(pmd.into()),
        ),
        // Declined: zlib has no 256-byte window; unknown, repeated, bad values.
        ("permessage-deflate; server_max_window_bits=8", None, None),
        ("permessage-deflate; server_max_window_bits", None, None),
        ("permessage-deflate; client_max_window_bits=16", None, None),
        ("permessage-deflate; level=9", None, None),
        (
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            None,
            None,
        ),
        ("x-webkit-deflate-frame", None, None),
        // The first acceptable offer wins.
        (
            "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=12",
            Some(format!("{both}; server_max_window_bits=12")),
            Some("permessage-deflate; server_max_window_bits=12".into()),
        ),
    ];
    let off = TestServer::start(&[]);
    let shared = TestServer::start(&["--compression", "shared"]);
    let dedicated = TestServer::start(&["--compression", "dedicated"]);
    for (offer, in_shared, in_dedicated) in &cases {
        let (_, head) = upgrade(off.addr, "/echo", Some(offer));
        assert_eq!(extensions_header(&head), None, "off: {offer}");
        let (_, head) = upgrade(shared.addr, "/echo", Some(offer));
        assert_eq!(&extensions_header(&head), in_shared, "shared: {offer}");
        let (_, head) = upgrade(dedicated.addr, "/echo", Some(offer));
        assert_eq!(
            &extensions_header(&head),
            in_dedicated,
            "dedicated: {offer}"
        );
    }
    // Every accepted answer works: messages both ways, twice (a second
    // message tests whatever context was or was not kept).
    for server in [&shared, &dedicated] {
        for (offer, ..) in cases.iter().filter(|(_, s, d)| s.is_some() && d.is_some()) {
            let mut client = DeflateClient::connect(server.addr, "/echo", offer);
            for n in 0..2 {
                let text = format!("{n} {}", sample_text(2000));
                client.send_text(&text);
                let (compressed, opcode, echoed) = client.recv();
                assert!(compressed, "{offer}: echo compressed");
                assert_eq!(opcode, 1);
                assert_eq!(echoed, text.as_bytes(), "{offer} / {}", client.agreed);
            }
        }
    }
}

#[test]
fn a_narrow_window_is_honoured() {
    let server = TestServer::start(&["--compression", "dedicated"]);
    let mut client = DeflateClient::connect(
        server.addr,
        "/echo",
        "permessage-deflate; server_max_window_bits=9",
    );
    // A block of noise repeated 1000 bytes later: a 32 KiB window matches
    // the repeats, a 512-byte one cannot, so the size on the wire shows
    // which window the server used.
    let mut seed = 0x2545_f491_u32;
    let noise: Vec<u8> = (0..1000)
        .map(|_| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 24) as u8
        })
        .collect();
    let payload = noise.repeat(4);
    let wire_len = |client: &mut DeflateClient| {
        client.send_compressed(0x2, &payload, 1);
        let frame = read_frame(&mut client.stream).unwrap();
        assert_eq!(frame.b0, 0xC2);
        assert_eq!(inflate(&mut client.inflate, &frame.payload), payload);
        frame.payload.len()
    };
    let narrow = wire_len(&mut client);
    assert!(
        narrow > 3900,
        "window 9: no match 1000 bytes back ({narrow} bytes)"
    );
    let mut wide = DeflateClient::connect(server.addr, "/echo", "permessage-deflate");
    let wide = wire_len(&mut wide);
    assert!(wide < 1500, "window 15 matches the repeats ({wide} bytes)");
}

#[test]
fn context_takeover_only_where_agreed() {
    let text = sample_text(600);
    let wire_sizes = |flags: &[&str], offer: &str| {
        let server = TestServer::start(flags);
        let mut client = DeflateClient::connect(server.addr, "/echo", offer);
        let mut sizes = Vec::new();
        for _ in 0..2 {
            client.send_text(&text);
            // Read the raw frame to see its size on the wire.
            let frame = read_frame(&mut client.stream).unwrap();
            assert_eq!(frame.b0, 0xC1, "FIN, RSV1, text");
            if !client.agreed("server_no_context_takeover") {
                let echoed = inflate(&mut client.inflate, &frame.payload);
                assert_eq!(echoed, text.as_bytes());
            } else {
                let mut fresh = Decompress::new(false);
                assert_eq!(inflate(&mut fresh, &frame.payload), text.as_bytes());
            }
            sizes.push(frame.payload.len());
        }
        sizes
    };
    let kept = wire_sizes(&["--compression", "dedicated"], "permessage-deflate");
    assert!(
        kept[1] * 3 < kept[0],
        "the second refers to the first: {kept:?}"
    );
    let fresh = wire_sizes(&["--compression", "shared"], "permessage-deflate");
    assert_eq!(fresh[0], fresh[1], "each message stands alone: {fresh:?}");
    let asked = wire_sizes(
        &["--compression", "dedicated"],
        "permessage-deflate; server_no_context_takeover",
    );
    assert_eq!(
        asked[0], asked[1],
        "the client asked for no context: {asked:?}"
    );
}

#[test]
fn fragmented_compressed_messages_and_the_threshold() {
    let server = TestServer::start(&["--compression", "shared", "--compression-threshold", "100"]);
    let mut client = DeflateClient::connect(server.addr, "/echo", "permessage-deflate");
    // Fragmented into 5 frames, text and binary, with a ping in between.
    let text = sample_text(5000);
    client.send_compressed(0x1, text.as_bytes(), 5);
    assert_eq!(client.recv(), (true, 1, text.into_bytes()));
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let wire = deflate(&mut client.compress, &binary);
    client.compress.reset();
    let half = wire.len() / 2;
    let mut bytes = client_frame(0x42, &wire[..half]);
    bytes.extend(client_frame(0x89, b"ping"));
    bytes.extend(client_frame(0x80, &wire[half..]));
    client.stream.write_all(&bytes).unwrap();
    let pong = read_frame(&mut client.stream).unwrap();
    assert_eq!((pong.b0, pong.payload.as_slice()), (0x8A, &b"ping"[..]));
    assert_eq!(client.recv(), (true, 2, binary));
    // Below the threshold the echo goes out uncompressed, whichever way it came.
    client.send_text("short");
    assert_eq!(client.recv(), (false, 1, b"short".to_vec()));
    client
        .stream
        .write_all(&client_frame(0x81, &[b'u'; 150]))
        .unwrap();
    let (compressed, _, echoed) = client.recv();
    assert!(compressed, "an uncompressed message is echoed compressed");
    assert_eq!(echoed, vec![b'u'; 150]);
}

/// Hex digits from a fixed pseudo-random sequence: they compress to about
/// half, and not so well that zlib holds the whole message in one block.
fn hex_noise(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b"0123456789abcdef"[(state >> 60) as usize]
        })
        .collect()
}

/// Bytes no compressor can shrink.
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

impl DeflateClient {
    /// The next data message, a binary one in several fragments (RSV1 on
    /// the first at most): how many, whether it came compressed, and the
    /// payload (inflated).
    fn recv_fragments(&mut self) -> (usize, bool, Vec<u8>) {
        let mut wire = Vec::new();
        let mut compressed = false;
        for count in 1..=100_000 {
            let frame = read_frame(&mut self.stream).expect("a fragment");
            if count == 1 {
                assert_eq!(frame.b0 & 0x3f, 0x02, "a binary first fragment");
                compressed = frame.b0 & 0x40 != 0;
            } else {
                assert_eq!(frame.b0 & 0x7f, 0x00, "continuation {count}, RSV1 clear");
            }
            wire.extend_from_slice(&frame.payload);
            if frame.b0 & 0x80 == 0 {
                continue;
            }
            if !compressed {
                return (count, false, wire);
            }
            if self.agreed("server_no_context_takeover") {
                self.inflate.reset(false);
            }
            return (count, true, inflate(&mut self.inflate, &wire));
        }
        panic!("no final fragment");
    }
}

/// A binary message too large for one read is streamed back by /echo as
/// it arrives; with compression negotiated it comes back compressed, in
/// fragments (RSV1 on the first only), and the connection goes on working,
/// with its context where one was agreed.
fn large_echo_streams_back_compressed(mode: &str, offer: &str) {
    let server = TestServer::start(&["--compression", mode, "--read-buffer-size", "64KiB"]);
    let mut client = DeflateClient::connect(server.addr, "/echo", offer);
    let payload = hex_noise(3 << 20);
    let frame = client_frame(0x82, &payload);
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&frame).unwrap());
    let (fragments, compressed, echoed) = client.recv_fragments();
    sender.join().unwrap();
    assert!(compressed, "{mode}: the echo came uncompressed");
    assert!(
        echoed == payload,
        "{mode}: the echo differs ({} bytes)",
        echoed.len()
    );
    assert!(fragments > 2, "{mode}: {fragments} fragments");
    let metric_wire = metric(server.addr, "fanout_deflate_output_bytes_total");
    assert!(
        metric_wire < payload.len() as f64 * 0.7,
        "{mode}: {metric_wire} bytes compressed"
    );
    assert_eq!(metric(server.addr, "fanout_deflate_streams"), 0.0);
    for n in 0..2 {
        let text = format!("{n} {}", sample_text(3000));
        client.send_text(&text);
        assert_eq!(client.recv(), (true, 1, text.into_bytes()), "{mode}");
    }
}

/// A large message that does not compress goes back uncompressed after a
/// 16 KiB probe, whole or streamed, and the connection's context (where
/// one was agreed) stays right for the messages after it.
fn incompressible_messages_go_back_as_they_are(mode: &str) {
    let server = TestServer::start(&["--compression", mode, "--read-buffer-size", "64KiB"]);
    let mut client = DeflateClient::connect(server.addr, "/echo", "permessage-deflate");
    let text = sample_text(3000);
    client.send_text(&text);
    assert_eq!(client.recv(), (true, 1, text.clone().into_bytes()));
    // Whole (compressed by the client, so not streamed): 40 KiB of noise.
    let whole = noise(40 << 10);
    client.send_compressed(0x2, &whole, 1);
    assert_eq!(client.recv(), (false, 2, whole), "{mode}");
    // Streamed: 1 MiB of noise, uncompressed on the way in. Its first
    // kilobyte arrives alone, so the first part is too small to judge.
    let big = noise(1 << 20);
    let frame = client_frame(0x82, &big);
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&frame[..1024]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        writer.write_all(&frame[1024..]).unwrap();
    });
    let (fragments, compressed, echoed) = client.recv_fragments();
    sender.join().unwrap();
    assert!(!compressed, "{mode}: noise came back compressed");
    assert!(
        echoed == big,
        "{mode}: the echo differs ({} bytes)",
        echoed.len()
    );
    assert!(fragments > 1, "{mode}: {fragments} fragment(s)");
    assert_eq!(
        metric(server.addr, "fanout_deflate_incompressible_total"),
        2.0
    );
    // The text compressed before and after: the context still matches.
    client.send_text(&text);
    assert_eq!(client.recv(), (true, 1, text.into_bytes()), "{mode}");
}

#[test]
fn incompressible_messages_go_back_as_they_are_in_shared_mode() {
    incompressible_messages_go_back_as_they_are("shared");
}

#[test]
fn incompressible_messages_go_back_as_they_are_with_context_takeover() {
    incompressible_messages_go_back_as_they_are("dedicated");
}

#[test]
fn large_echo_streams_back_compressed_in_shared_mode() {
    large_echo_streams_back_compressed("shared", "permessage-deflate");
}

#[test]
fn large_echo_streams_back_compressed_with_context_takeover() {
    large_echo_streams_back_compressed("dedicated", "permessage-deflate");
    large_echo_streams_back_compressed(
        "dedicated",
        "permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
    );
}

#[test]
fn frames_that_break_the_extension_fail_the_connection() {
    let server = TestServer::start(&["--compression", "shared"]);
    let expect_close = |bytes: Vec<u8>, offer: Option<&str>, code: u16, reason: &str| {
        let (mut stream, _) = upgrade(server.addr, "/echo", offer);
        stream.write_all(&bytes).unwrap();
        let close = read_until_close(&mut stream);
        assert_eq!(close.close_code(), Some(code), "{}", close.close_reason());
        assert!(
            close.close_reason().contains(reason),
            "{}",
            close.close_reason()
        );
    };
    let pmd = Some("permessage-deflate");
    let mut zlib = Compress::new(Compression::default(), false);
    let hello = deflate(&mut zlib, b"hello");
    expect_close(client_frame(0xC1, &hello), None, 1002, "reserved bits");
    expect_close(client_frame(0xC9, b""), pmd, 1002, "control frames");
    let mut continuation = client_frame(0x01, b"a");
    continuation.extend(client_frame(0xC0, b"b"));
    expect_close(continuation, pmd, 1002, "continuation");
    expect_close(client_frame(0xE1, &hello), pmd, 1002, "reserved bits");
    expect_close(
        client_frame(0xC1, &[0xff; 8]),
        pmd,
        1007,
        "not valid deflate",
    );
    let bad_text = deflate(
        &mut Compress::new(Compression::default(), false),
        b"\xc3\x28",
    );
    expect_close(client_frame(0xC1, &bad_text), pmd, 1007, "UTF-8");
}

#[test]
fn a_decompression_bomb_closes_with_1009() {
    let server = TestServer::start(&["--compression", "dedicated", "--max-message-size", "64KiB"]);
    let mut zlib = Compress::new(Compression::best(), false);
    let zeros = vec![0u8; 8 << 20];
    let bomb = deflate(&mut zlib, &zeros);
    assert!(
        bomb.len() < 16 << 10,
        "{} bytes inflate to 8 MiB",
        bomb.len()
    );
    let (mut stream, _) = upgrade(server.addr, "/echo", Some("permessage-deflate"));
    stream.write_all(&client_frame(0xC2, &bomb)).unwrap();
    let close = read_until_close(&mut stream);
    assert_eq!(close.close_code(), Some(1009), "{}", close.close_reason());
    assert!(
        close.close_reason().contains("inflated"),
        "{}",
        close.close_reason()
    );
    // Just under the limit still works, on a fresh connection.
    let mut client = DeflateClient::connect(server.addr, "/echo", "permessage-deflate");
    let fits = vec![0u8; 64 << 10];
    client.send_compressed(0x2, &fits, 1);
    assert_eq!(client.recv(), (true, 2, fits));
}

/// `GET /metrics`: the value of one sample.
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let response = http_exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    response
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .parse()
        .unwrap()
}

fn fan_out_to_mixed_subscribers(mode: &str, compressions_per_publish: f64) {
    let server = TestServer::start(&[
        "--internal-listen",
        "127.0.0.1:0",
        "--compression",
        mode,
        "--compression-threshold",
        "200",
    ]);
    let (public, internal) = (server.addrs[0], server.addrs[1]);
    let mut plain = server_client(public);
    let mut deflating: Vec<DeflateClient> = (0..2)
        .map(|_| DeflateClient::connect(public, "/ws", "permessage-deflate"))
        .collect();
    let mut publisher = server_client(internal);
    for client in &mut deflating {
        let (_, welcome) = client.recv_json();
        assert_eq!(welcome["type"], "welcome");
        client.send_text(&json!({"type":"subscribe","channel":"mix","id":1}).to_string());
        let (_, ack) = client.recv_json();
        assert_eq!(ack["request"], "subscribe", "{ack}");
    }
    send_json(&mut plain, &json!({"type":"subscribe","channel":"mix"}));
    assert_eq!(recv_json(&mut plain)["request"], "subscribe");
    let before = metric(public, "fanout_deflate_messages_total");
    for n in 0..3 {
        let data = json!({"n": n, "text": sample_text(1000)});
        send_json(
            &mut publisher,
            &json!({"type":"publish","channel":"mix","data":data}),
        );
        let ack = recv_json(&mut publisher);
        assert_eq!(ack["delivered"], 3, "{ack}");
        let message = recv_json(&mut plain);
        assert_eq!(message["data"], data, "the plain subscriber gets it as is");
        for client in &mut deflating {
            let (compressed, got) = client.recv_json();
            assert!(compressed, "above the threshold: compressed");
            assert_eq!(got, message, "the same message, inflated");
        }
    }
    let after = metric(public, "fanout_deflate_messages_total");
    assert_eq!(after - before, 3.0 * compressions_per_publish, "{mode}");
    // Short messages go out uncompressed to everyone.
    send_json(
        &mut publisher,
        &json!({"type":"publish","channel":"mix","data":1}),
    );
    recv_json(&mut publisher);
    assert_eq!(recv_json(&mut plain)["data"], 1);
    for client in &mut deflating {
        let (compressed, got) = client.recv_json();
        assert!(!compressed);
        assert_eq!(got["data"], 1);
    }
}

#[test]
fn shared_mode_compresses_a_broadcast_once_for_all() {
    fan_out_to_mixed_subscribers("shared", 1.0);
}

#[test]
fn dedicated_mode_compresses_a_broadcast_per_recipient() {
    fan_out_to_mixed_subscribers("dedicated", 2.0);
}

fn server_client(addr: SocketAddr) -> tungstenite::WebSocket<TcpStream> {
    let stream = connect_tcp(addr);
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).expect("handshake");
    assert_eq!(recv_json(&mut ws)["type"], "welcome");
    ws
}

fn send_json(ws: &mut tungstenite::WebSocket<TcpStream>, value: &Value) {
    ws.send(tungstenite::Message::Text(value.to_string()))
        .unwrap();
}

fn recv_json(ws: &mut tungstenite::WebSocket<TcpStream>) -> Value {
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..100 {
        match ws.read().expect("a message") {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no text message within 100 frames");
}

/// A loopback connection whose receive buffer is as small as the kernel
/// allows, so that a client that stops reading stops the server's writes
/// soon (set before connecting: the window is agreed then).
fn connect_small_receive_buffer(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A subscriber with its own compression context (`dedicated`) stops
/// reading while a publisher sends trades for 400 one-second candles and
/// channel messages: candles are held while its queue is full, channel
/// messages go straight in or are dropped. Held candles are compressed
/// when they are queued, so every frame still inflates with the one
/// context, and every closed candle comes once with its final state.
#[test]
fn held_candles_are_compressed_in_the_order_they_go_out() {
    let server = TestServer::start(&[
        "--internal-listen",
        "127.0.0.1:0",
        "--compression",
        "dedicated",
        "--max-outbound-buffer",
        "8KiB",
        "--socket-send-buffer",
        "4KiB",
        "--kline-intervals",
        "1s",
    ]);
    let (public, internal) = (server.addrs[0], server.addrs[1]);
    let mut slow = DeflateClient::on(
        connect_small_receive_buffer(public),
        "/ws",
        "permessage-deflate",
    );
    assert!(
        !slow.agreed("server_no_context_takeover"),
        "{}",
        slow.agreed
    );
    assert_eq!(slow.recv_json().1["type"], "welcome");
    for request in [
        json!({"type":"kline.subscribe","symbol":"ZIP","interval":"1s"}),
        json!({"type":"subscribe","channel":"mix"}),
    ] {
        slow.send_text(&request.to_string());
        assert_eq!(slow.recv_json().1["type"], "ack");
    }
    let mut publisher = server_client(internal);
    const CANDLES: i64 = 400;
    const T0: i64 = 1_700_000_000_000;
    for n in 0..CANDLES {
        let trade = json!({"type":"trade","symbol":"ZIP","price":format!("{}.5", 100 + n),
                           "qty":"1","ts":T0 + n * 1_000});
        send_json(
            &mut publisher,
            &json!({"type":"publish","channel":"events","data":trade}),
        );
        assert_eq!(recv_json(&mut publisher)["type"], "ack");
        let data = json!({"n": n, "text": sample_text(300)});
        send_json(
            &mut publisher,
            &json!({"type":"publish","channel":"mix","data":data}),
        );
        assert_eq!(recv_json(&mut publisher)["type"], "ack");
    }
    let conflated = metric(public, r#"fanout_state_updates_total{outcome="conflated"}"#);
    assert!(conflated > 0.0, "the subscriber never fell behind");

    // Everything it gets inflates; candles in order, each closed once.
    let mut finals: Vec<Value> = Vec::new();
    let mut mix = 0;
    let complete = |finals: &[Value]| {
        finals.len() == CANDLES as usize && finals.last().is_some_and(|c| c["closed"] == false)
    };
    for _ in 0..10 * CANDLES {
        if complete(&finals) {
            break;
        }
        let (compressed, message) = slow.recv_json();
        match message["type"].as_str().unwrap() {
            "kline" if !compressed => panic!("above the threshold, not compressed: {message}"),
            "kline" => match finals.last_mut() {
                Some(last) if last["start"] == message["start"] => {
                    assert_eq!(last["closed"], false, "after its close: {message}");
                    *last = message;
                }
                Some(last) => {
                    assert_eq!(last["closed"], true, "{last} before {message}");
                    finals.push(message);
                }
                None => finals.push(message),
            },
            "message" => mix += 1,
            "dropped" => assert_eq!(message["channel"], "mix", "{message}"),
            other => panic!("unexpected {other}: {message}"),
        }
    }
    assert!(
        complete(&finals),
        "{} candles: {:?}",
        finals.len(),
        finals.last()
    );
    for (n, candle) in finals.iter().enumerate() {
        let n = n as i64;
        assert_eq!(candle["start"], T0 + n * 1_000, "{candle}");
        assert_eq!(candle["close"], format!("{}.5", 100 + n), "{candle}");
        assert_eq!(candle["closed"], n + 1 < CANDLES, "{candle}");
    }
    assert!(mix > 0, "some channel messages came between the candles");
}
