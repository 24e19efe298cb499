//! `Utf8Validator` fed in arbitrary chunks must agree with
//! `std::str::from_utf8` on the whole input, and must fail exactly at the
//! first chunk after which the bytes seen so far stop being a prefix of
//! some valid UTF-8 string (RFC 6455 §8.1 fail-fast, Autobahn 6.4.*).
#![no_main]

mod common;

use fanout::ws::utf8::Utf8Validator;
use libfuzzer_sys::fuzz_target;

/// `from_utf8` said whether `prefix` can still be completed into valid UTF-8.
fn is_valid_prefix(prefix: &[u8]) -> bool {
    match std::str::from_utf8(prefix) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((stream, chunks)) = common::seeded_chunks(data) else { return };
    let whole_ok = std::str::from_utf8(stream).is_ok();

    let mut validator = Utf8Validator::new();
    for chunk in chunks {
        let end = chunk.end;
        match validator.feed(&stream[chunk]) {
            Ok(()) => assert!(
                is_valid_prefix(&stream[..end]),
                "feed accepted {:?}, which no continuation can make valid",
                &stream[..end]
            ),
            Err(_) => {
                assert!(is_valid_prefix(&stream[..end]) == false, "feed rejected {:?}, a valid prefix", &stream[..end]);
                assert!(!whole_ok);
                return;
            }
        }
    }
    assert_eq!(validator.finish().is_ok(), whole_ok, "finish disagrees with from_utf8 on {stream:?}");
});
