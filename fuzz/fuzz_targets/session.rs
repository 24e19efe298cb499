//! A `ws::Session` fed one stream cut into arbitrary reads must hand out
//! what it hands out when the whole stream arrives at once, in either role
//! and receive mode, with or without permessage-deflate: the same
//! messages (streamed ones joined back), the same close or violation, and
//! the same control frames sent. Between reads a timer fires at a time
//! the input picks; after it the session's next deadline is always later
//! than that time unless the session ended (a timer never re-arms in the
//! past, the hang that `tests/stalled_close.rs` reproduces).
//!
//! The first input byte chooses the configuration, the next two the cuts
//! (see `common::seeded_chunks`); timers fire after each read at
//! increasing times drawn from the stream's own bytes.
#![no_main]

mod common;

use std::time::{Duration, Instant};

use fanout::ws::decoder::MESSAGE_HEADROOM;
use fanout::ws::deflate::{InflateError, Inflater};
use fanout::ws::extensions::DeflateParams;
use fanout::ws::session::{Expiry, Host};
use fanout::ws::tick::{Clock, Tick};
use fanout::ws::{Limits, OpCode, ReceiveMode, Received, Role, Session, SessionConfig};
use libfuzzer_sys::fuzz_target;

const CONFIG: SessionConfig = SessionConfig {
    limits: Limits { max_frame_size: 1000, max_message_size: 1500 },
    ping_interval: Duration::from_millis(20),
    idle_timeout: Duration::from_millis(100),
    close_timeout: Duration::from_millis(10),
};

#[derive(Default)]
struct Wire {
    controls: Vec<(OpCode, Vec<u8>)>,
    inflater: Inflater,
    server_role: bool,
}

impl Host for Wire {
    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) {
        assert!(payload.len() <= 125, "a control payload of {} bytes", payload.len());
        self.controls.push((opcode, payload.to_vec()));
    }

    fn inflate(&mut self, params: DeflateParams, compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let fresh = if self.server_role {
            params.client_no_context_takeover
        } else {
            params.server_no_context_takeover
        };
        let out = self.inflater.inflate(compressed, MESSAGE_HEADROOM, limit, fresh)?;
        assert!(out.len() - MESSAGE_HEADROOM <= limit);
        Ok(out)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    PeerClosed,
    Violated(u16, &'static str),
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    got: Vec<Got>,
    controls: Vec<(OpCode, Vec<u8>)>,
}

struct Setup {
    role: Role,
    mode: ReceiveMode,
    deflate: Option<DeflateParams>,
}

fn setup(flags: u8) -> Setup {
    Setup {
        role: if flags & 1 == 0 { Role::Server } else { Role::Client },
        mode: if flags & 2 == 0 { ReceiveMode::Whole } else { ReceiveMode::Stream { min_len: 16 } },
        deflate: (flags & 4 != 0).then_some(DeflateParams {
            server_no_context_takeover: flags & 8 != 0,
            client_no_context_takeover: flags & 16 != 0,
            server_window_bits: 15,
        }),
    }
}

/// Feeds the reads in order; with `timers`, fires a timer after each read
/// (nothing is ever heard after `start`, so the idle limit comes too).
fn run(setup: &Setup, stream: &[u8], reads: &[std::ops::Range<usize>], start: Tick, timers: bool) -> Outcome {
    let mut session = Session::new(setup.role, setup.deflate, start, &CONFIG);
    let mut wire = Wire { server_role: setup.role == Role::Server, ..Wire::default() };
    let mut got = Vec::new();
    let mut streamed: Option<(u64, Vec<u8>)> = None;
    let mut now = start;
    for read in reads {
        let mut bytes = stream[read.clone()].to_vec();
        let mut pos = 0;
        for _ in 0..=bytes.len() {
            let (used, received) = session.receive(&mut bytes[pos..], setup.mode, now, &CONFIG, &mut wire);
            pos += used;
            let Some(received) = received else { break };
            assert!(used > 0 || matches!(received, Received::Violated(_)), "something out of no bytes");
            match received {
                Received::Message(m) => got.push(match m.text() {
                    Some(text) => Got::Text(text.to_owned()),
                    None => Got::Binary(m.bytes().to_vec()),
                }),
                Received::StreamStart { len } => {
                    assert!(streamed.is_none(), "a stream inside a stream");
                    streamed = Some((len, Vec::new()));
                }
                Received::StreamChunk { payload, last } => {
                    let (len, mut so_far) = streamed.take().expect("a part without a start");
                    so_far.extend_from_slice(payload);
                    if last {
                        assert_eq!(so_far.len() as u64, len);
                        got.push(Got::Binary(so_far));
                    } else {
                        assert!((so_far.len() as u64) < len);
                        streamed = Some((len, so_far));
                    }
                }
                Received::PeerClosed => got.push(Got::PeerClosed),
                Received::Violated(v) => got.push(Got::Violated(v.code.0, v.reason)),
            }
        }
        assert_eq!(pos, bytes.len(), "receive left input unread");
        if timers && !read.is_empty() {
            now = now.after(Duration::from_millis(u64::from(stream[read.start]) % 40));
            let expiry = session.handle_timeout(now, start, &CONFIG, &mut wire);
            if expiry != Expiry::Close {
                let next = session.next_deadline(start, CONFIG.idle_timeout);
                assert!(next > now, "{expiry:?} re-armed at {next:?}, now {now:?}");
            }
        }
    }
    Outcome { got, controls: wire.controls }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((stream, reads)) = common::seeded_chunks(rest) else { return };
    let setup = setup(flags);
    let start = Clock::new(Instant::now()).tick(Instant::now());
    let whole = run(&setup, stream, &[0..stream.len()], start, false);
    let cut = run(&setup, stream, &reads, start, false);
    assert_eq!(whole, cut, "cut into {reads:?}");
    // Timers interleaved: no panic, and every re-arm moves forward.
    run(&setup, stream, &reads, start, true);
});
