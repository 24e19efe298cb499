//! `/echo`: every text and binary message comes straight back. This is the
//! endpoint conformance suites and benchmarks drive.
//!
//! A single-frame binary message too large for one read of the server's
//! read buffer (`--read-buffer-size`) never comes here: the server streams
//! it back as it arrives (the same frame on the wire, with nothing buffered
//! but what the socket does not take at once). Text is always whole: it
//! must be valid UTF-8 before any of it is echoed. When a message does come
//! here whole and was assembled from several reads, replying with it hands
//! its buffer to the write queue instead of copying it.

use super::{ConnId, Message, Outbox};

pub fn on_message(conn: ConnId, message: Message<'_>, out: &mut impl Outbox) {
    out.reply(conn, message);
}
