//! The frame decoder fed one stream cut into arbitrary reads must say
//! exactly what it says when the whole stream arrives in one read: the same
//! events, then the same violation (code and reason) or none.
//!
//! Why full equality holds even with UTF-8 fail-fast: a split read can make
//! the decoder notice a bad text byte earlier (incremental validation
//! instead of the one-shot `from_utf8` of the whole-frame fast path), but
//! only earlier *within the same frame's payload*. No event and no other
//! check lies between that byte and the end of its frame, so the outcome
//! is the same 1007. Every other rule is checked on a complete header or a
//! complete control payload, which are the same bytes however they arrive.
//!
//! The same holds for the server's two other ways of reading: with
//! `decode_streaming` (large single-frame binary messages handed out piece
//! by piece, joined back here) and with direct reads into the message
//! buffer (`direct_space` / `direct_filled`) whenever the decoder offers them.
#![no_main]

mod common;

use std::ops::Range;

use fanout::ws::close::MAX_REASON_LEN;
use fanout::ws::{Decoder, Event, Limits, Step, Violation};
use libfuzzer_sys::fuzz_target;

/// Small enough that inputs within libFuzzer's default -max_len (4096)
/// hit both limits: a message limit of 8192 could never be exceeded by
/// real fragments there, since it is checked against bytes received.
const LIMITS: Limits = Limits { max_frame_size: 1000, max_message_size: 1500 };

#[derive(Debug, PartialEq, Eq)]
enum Owned {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<Owned>,
    violation: Option<Violation>,
    /// `is_mid_message()` after the last byte; only meaningful without a violation.
    mid_message: bool,
}

fn own(event: Event<'_>) -> Owned {
    match event {
        Event::Text(t) => {
            assert!(t.len() as u64 <= LIMITS.max_message_size);
            Owned::Text(t.to_owned())
        }
        Event::Binary(b) => {
            assert!(b.len() as u64 <= LIMITS.max_message_size);
            Owned::Binary(b.to_vec())
        }
        Event::Ping(b) => {
            assert!(b.len() <= 125);
            Owned::Ping(b.to_vec())
        }
        Event::Pong(b) => {
            assert!(b.len() <= 125);
            Owned::Pong(b.to_vec())
        }
        Event::Close(c) => Owned::Close(c.map(|(code, reason)| {
            assert!(code.is_allowed_on_wire(), "delivered close code {}", code.0);
            assert!(reason.len() <= MAX_REASON_LEN);
            (code.0, reason.to_owned())
        })),
        Event::Compressed { .. } => panic!("a compressed message from a decoder without permessage-deflate"),
    }
}

/// Feeds `stream` cut into `chunks`, each read in its own buffer (decode
/// unmasks in place), until the first violation.
fn run(stream: &[u8], chunks: impl IntoIterator<Item = Range<usize>>) -> Outcome {
    let mut decoder = Decoder::new(LIMITS);
    let mut events = Vec::new();
    for chunk in chunks {
        let mut read = stream[chunk].to_vec();
        let mut pos = 0;
        loop {
            let rest = &mut read[pos..];
            let rest_len = rest.len();
            match decoder.decode(rest) {
                Err(violation) => return Outcome { events, violation: Some(violation), mid_message: true },
                Ok((used, None)) => {
                    assert_eq!(used, rest_len, "no event but {used} of {rest_len} bytes consumed");
                    break;
                }
                Ok((used, Some(event))) => {
                    assert!(used <= rest_len, "consumed {used} of {rest_len}");
                    assert!(used > 0, "an event out of no bytes: the caller would loop forever");
                    events.push(own(event));
                    pos += used;
                }
            }
        }
    }
    Outcome { events, violation: None, mid_message: decoder.is_mid_message() }
}

/// Streamed messages shorter than this are assembled as usual.
const STREAM_MIN: u64 = 16;

/// Like `run`, through `decode_streaming`; streamed pieces are joined
/// into the `Binary` event `decode` would have returned.
fn run_streaming(stream: &[u8], chunks: impl IntoIterator<Item = Range<usize>>) -> Outcome {
    let mut decoder = Decoder::new(LIMITS);
    let mut events = Vec::new();
    let mut open: Option<(u64, Vec<u8>)> = None;
    for chunk in chunks {
        let mut read = stream[chunk].to_vec();
        let mut pos = 0;
        loop {
            let rest = &mut read[pos..];
            let rest_len = rest.len();
            match decoder.decode_streaming(rest, STREAM_MIN) {
                Err(violation) => return Outcome { events, violation: Some(violation), mid_message: true },
                Ok((used, None)) => {
                    assert_eq!(used, rest_len, "no step but {used} of {rest_len} bytes consumed");
                    break;
                }
                Ok((used, Some(step))) => {
                    assert!(used <= rest_len && used > 0, "consumed {used} of {rest_len}");
                    pos += used;
                    match step {
                        Step::Event(event) => {
                            assert!(open.is_none(), "an event inside a streamed frame");
                            events.push(own(event));
                        }
                        Step::StreamStart { len } => {
                            assert!(open.is_none() && len >= STREAM_MIN && len <= LIMITS.max_frame_size);
                            open = Some((len, Vec::new()));
                        }
                        Step::Chunk { payload, last } => {
                            let (len, mut got) = open.take().expect("a piece without a start");
                            got.extend_from_slice(payload);
                            assert_eq!(last, got.len() as u64 == len);
                            if last {
                                events.push(Owned::Binary(got));
                            } else {
                                open = Some((len, got));
                            }
                        }
                    }
                }
            }
        }
    }
    Outcome { events, violation: None, mid_message: decoder.is_mid_message() }
}

/// Like `run`, but whenever the decoder offers room for a frame's payload
/// (`direct_space`), the next bytes of the read go straight there, as the
/// server's socket reads do.
fn run_direct(stream: &[u8], chunks: impl IntoIterator<Item = Range<usize>>) -> Outcome {
    let mut decoder = Decoder::new(LIMITS);
    let mut events = Vec::new();
    for chunk in chunks {
        let mut at = chunk.start;
        while at < chunk.end {
            if let Some(room) = decoder.direct_space(1) {
                let n = room.len().min(chunk.end - at);
                for (slot, byte) in room.iter_mut().zip(&stream[at..at + n]) {
                    slot.write(*byte);
                }
                at += n;
                // SAFETY: the first n bytes of the room were just written.
                match unsafe { decoder.direct_filled(n) } {
                    Err(violation) => return Outcome { events, violation: Some(violation), mid_message: true },
                    Ok(Some(event)) => events.push(own(event)),
                    Ok(None) => {}
                }
                continue;
            }
            let mut read = stream[at..chunk.end].to_vec();
            at = chunk.end;
            let mut pos = 0;
            while pos < read.len() {
                match decoder.decode(&mut read[pos..]) {
                    Err(violation) => return Outcome { events, violation: Some(violation), mid_message: true },
                    Ok((_, None)) => break,
                    Ok((used, Some(event))) => {
                        events.push(own(event));
                        pos += used;
                    }
                }
            }
        }
    }
    Outcome { events, violation: None, mid_message: decoder.is_mid_message() }
}

fuzz_target!(|data: &[u8]| {
    let Some((stream, chunks)) = common::seeded_chunks(data) else { return };
    let whole = run(stream, std::iter::once(0..stream.len()));
    let split = run(stream, chunks.iter().cloned());
    assert_eq!(whole, split, "split at {chunks:?}");
    let streamed = run_streaming(stream, chunks.iter().cloned());
    assert_eq!(whole, streamed, "streamed, split at {chunks:?}");
    let direct = run_direct(stream, chunks.iter().cloned());
    assert_eq!(whole, direct, "direct reads, split at {chunks:?}");
});
