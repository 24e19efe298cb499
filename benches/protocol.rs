//! Micro-benchmarks for the sans-IO hot paths: frame header decode,
//! unmasking, UTF-8 validation, handshake parsing, whole-message decode,
//! a publish fanned out to N subscribers (through the channels router,
//! and through the whole app from the JSON request), measured per delivery,
//! and permessage-deflate on a typical JSON message.
//! Run: `cargo bench --bench protocol`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanout::app::channels::{ChannelLimits, Channels};
use fanout::app::{
    App, ConnId, ConnInfo, Endpoint, Message, Outbox, Role, SharedFrame, StateDelivery, StateKey,
};
use fanout::config::Config;
use fanout::ws::deflate::{Deflater, Inflater};
use fanout::ws::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use fanout::ws::handshake::{parse_request, validate_upgrade, UpgradePolicy};
use fanout::ws::mask::apply_mask;
use fanout::ws::utf8::Utf8Validator;
use fanout::ws::CloseCode;
use fanout::ws::{Decoder, Limits};

const KEY: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

fn masked_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: Some(KEY),
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; MAX_HEADER_LEN];
    let len = header.encode(&mut head);
    let mut frame = head[..len].to_vec();
    let start = frame.len();
    frame.extend_from_slice(payload);
    apply_mask(&mut frame[start..], KEY, 0);
    frame
}

fn header_decode(c: &mut Criterion) {
    let frame = masked_frame(OpCode::Binary, &[0; 300]);
    c.bench_function("frame_header_decode", |b| {
        b.iter(|| FrameHeader::decode(black_box(&frame)))
    });
}

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for size in [16usize, 1 << 10, 64 << 10] {
        let mut data = vec![0xAB; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut data), KEY, 1))
        });
    }
    group.finish();
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8_validate");
    let text = "fanout ünïcödé ✓ 𝄞 ".repeat(4096);
    let bytes = text.as_bytes();
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("whole", |b| {
        b.iter(|| {
            let mut v = Utf8Validator::new();
            v.feed(black_box(bytes)).and_then(|_| v.finish())
        })
    });
    group.bench_function("chunks_of_1000", |b| {
        b.iter(|| {
            let mut v = Utf8Validator::new();
            for chunk in black_box(bytes).chunks(1000) {
                v.feed(chunk).unwrap();
            }
            v.finish()
        })
    });
    group.finish();
}

fn handshake(c: &mut Criterion) {
    let request = b"GET /echo HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://localhost\r\n\r\n";
    let policy = UpgradePolicy::default();
    c.bench_function("handshake_parse_and_validate", |b| {
        b.iter(|| {
            let (parsed, _) = parse_request(black_box(request)).unwrap().unwrap();
            validate_upgrade(&parsed, &policy).unwrap()
        })
    });
}

fn decode_messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_message");
    for size in [32usize, 16 << 10] {
        let frame = masked_frame(OpCode::Text, &vec![b'x'; size]);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, _| {
            let mut decoder = Decoder::new(Limits::default());
            let mut buf = frame.clone();
            b.iter(|| {
                buf.copy_from_slice(&frame);
                let (used, event) = decoder.decode(black_box(&mut buf)).unwrap();
                assert!(event.is_some());
                used
            })
        });
    }
    group.finish();
}

/// An outbox that only counts: what the benchmark sees is the router's own
/// work per recipient (the server's queueing is measured by benches/loadgen).
#[derive(Default)]
struct CountingOutbox {
    delivered: u64,
    bytes: usize,
    replies: u64,
}

impl Outbox for CountingOutbox {
    fn reply(&mut self, _to: ConnId, message: Message<'_>) {
        self.replies += 1;
        if let Message::Text(text) = message {
            self.bytes += text.len();
        }
    }

    fn reply_shared(&mut self, _to: ConnId, frame: &SharedFrame) {
        self.replies += 1;
        self.bytes += frame.bytes().len();
    }

    fn deliver(&mut self, _to: ConnId, frame: &SharedFrame) -> bool {
        self.delivered += 1;
        self.bytes += frame.bytes().len();
        true
    }

    fn deliver_state(&mut self, _to: ConnId, _key: StateKey, frame: &SharedFrame) -> StateDelivery {
        self.delivered += 1;
        self.bytes += frame.bytes().len();
        StateDelivery::Queued
    }

    fn discard_states(&mut self, _to: ConnId, _stream: u64) {}

    fn close(&mut self, _to: ConnId, _code: CloseCode, _reason: &str) {}
}

const FANOUT_SIZES: [usize; 3] = [100, 1_000, 10_000];

/// `Channels::publish` of a 64-byte payload to N exact subscribers (plus one
/// wildcard subscription that does not match): envelope serialized once,
/// backlog, and one `deliver` per subscriber.
fn publish_fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_fanout");
    let now = Instant::now();
    let data = serde_json::Value::String("x".repeat(64));
    for subscribers in FANOUT_SIZES {
        let mut channels = Channels::new(ChannelLimits {
            backlog: 1000,
            backlog_age: Duration::from_secs(600),
            max_channels: 10,
            max_subscriptions: 10,
        });
        for conn in 0..subscribers {
            channels.subscribe(conn, "bench", None, now).unwrap();
        }
        channels
            .subscribe(subscribers, "other.*", None, now)
            .unwrap();
        let mut out = CountingOutbox::default();
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("channels", subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    let published = channels
                        .publish("bench", black_box(&data), true, now, &mut out)
                        .unwrap();
                    assert_eq!(published.delivered, subscribers);
                })
            },
        );
    }
    group.finish();
}

/// The same fan-out entered the way a trusted publisher's message enters:
/// `App::on_message` with the JSON `publish` request (parse, route,
/// publish, ack).
fn publish_fanout_app(c: &mut Criterion) {
    let mut group = c.benchmark_group("publish_fanout");
    let now = Instant::now();
    let config = Config {
        no_sim: true,
        ..Config::default()
    };
    let info = |role| ConnInfo {
        role,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
    };
    let request = format!(
        r#"{{"type":"publish","channel":"bench","data":"{}"}}"#,
        "x".repeat(64)
    );
    for subscribers in FANOUT_SIZES {
        let mut app = App::new(&config, now).unwrap();
        let mut out = CountingOutbox::default();
        let subscribe = Message::Text(r#"{"type":"subscribe","channel":"bench"}"#);
        for conn in 0..subscribers {
            app.on_open(conn, Endpoint::Ws, info(Role::Public), None, now, &mut out);
            app.on_message(conn, Endpoint::Ws, subscribe, now, &mut out);
        }
        let publisher = subscribers;
        app.on_open(
            publisher,
            Endpoint::Ws,
            info(Role::Internal),
            None,
            now,
            &mut out,
        );
        out = CountingOutbox::default();
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("app", subscribers),
            &subscribers,
            |b, _| {
                b.iter(|| {
                    app.on_message(
                        publisher,
                        Endpoint::Ws,
                        Message::Text(black_box(&request)),
                        now,
                        &mut out,
                    )
                })
            },
        );
        assert!(out.delivered > 0 && out.delivered % subscribers as u64 == 0);
    }
    group.finish();
}

/// A market message like the ones fanned out, about 250 bytes of JSON.
fn json_message() -> String {
    r#"{"type":"message","channel":"market.trades.PUMP-SOL","offset":183734,"ts":1763807520123,"data":{"symbol":"PUMP-SOL","price":"0.00123456","qty":"15000.5","side":"buy","trade_id":"9f2c1d7e","venue":"sim"}}"#.to_owned()
}

/// Compressing and inflating it: the per-message CPU of a compressed
/// broadcast (compressed once per window) and of a compressed request.
/// `fresh` is the shared mode (no context takeover, reset after each
/// message), at the default level and at level 1; `takeover` the dedicated
/// mode's steady state.
fn permessage_deflate(c: &mut Criterion) {
    let text = json_message();
    let mut group = c.benchmark_group("permessage_deflate");
    group.throughput(Throughput::Bytes(text.len() as u64));
    for (name, fresh, level) in [
        ("fresh", true, 6),
        ("fresh_level1", true, 1),
        ("takeover", false, 6),
    ] {
        let mut deflater = Deflater::new(15, level);
        let mut out = Vec::with_capacity(1024);
        group.bench_function(format!("deflate_{name}"), |b| {
            b.iter(|| {
                out.clear();
                deflater
                    .compress(black_box(text.as_bytes()), &mut out, fresh)
                    .unwrap();
                out.len()
            })
        });
    }
    let mut wire = Vec::new();
    Deflater::new(15, 6)
        .compress(text.as_bytes(), &mut wire, true)
        .unwrap();
    let mut inflater = Inflater::new();
    group.bench_function("inflate_fresh", |b| {
        b.iter(|| {
            inflater
                .inflate(black_box(&wire), MAX_HEADER_LEN, 1 << 20, true)
                .unwrap()
        })
    });
    group.finish();
    eprintln!(
        "permessage_deflate: {} bytes of JSON -> {} compressed without context",
        text.len(),
        wire.len()
    );
}

criterion_group!(
    benches,
    permessage_deflate,
    header_decode,
    unmask,
    utf8,
    handshake,
    decode_messages,
    publish_fanout,
    publish_fanout_app
);
criterion_main!(benches);
