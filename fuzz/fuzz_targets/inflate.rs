//! Inflating what a peer sent as a compressed message never panics and
//! never yields more than the message limit, whatever the bytes; and what
//! the server compresses inflates back to the same bytes, with and without
//! context takeover.
#![no_main]

use fanout::ws::deflate::{Deflated, Deflater, InflateError, Inflater};
use libfuzzer_sys::fuzz_target;

const HEADROOM: usize = 14;
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut inflater = Inflater::new();
    for no_context_takeover in [true, false, false] {
        match inflater.inflate(data, HEADROOM, LIMIT, no_context_takeover) {
            Ok(out) => assert!(out.len() <= HEADROOM + LIMIT, "{} bytes", out.len()),
            Err(InflateError::TooBig | InflateError::Corrupt) => {}
        }
    }
    let window = 9 + data.first().map_or(0, |b| b % 7);
    for no_context_takeover in [true, false] {
        let mut deflater = Deflater::new(window, 1 + u32::from(data.last().map_or(5, |b| b % 9)));
        let mut inflater = Inflater::new();
        for _ in 0..2 {
            let mut wire = Vec::new();
            let verdict = deflater.compress(data, &mut wire, no_context_takeover).expect("compress");
            if verdict == Deflated::Incompressible {
                // Sent as is: the peer inflates nothing, and our context
                // starts afresh (the peer's old one is never referred to).
                assert!(wire.is_empty());
                continue;
            }
            let out = inflater
                .inflate(&wire, 0, data.len(), no_context_takeover)
                .expect("what we compress inflates");
            assert_eq!(out, data);
        }
    }
});
