//! Micro-benchmarks for the sans-IO hot paths: frame header decode,
//! unmasking, UTF-8 validation, handshake parsing and whole-message decode.
//! Run: `cargo bench --bench protocol`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanout::ws::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};
use fanout::ws::handshake::{parse_request, validate_upgrade, UpgradePolicy};
use fanout::ws::mask::apply_mask;
use fanout::ws::utf8::Utf8Validator;
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

criterion_group!(
    benches,
    header_decode,
    unmask,
    utf8,
    handshake,
    decode_messages
);
criterion_main!(benches);
