//! `/echo`: every text and binary message comes straight back. This is the
//! endpoint conformance suites and benchmarks drive.

use super::{ConnId, Message, Outbox};

pub fn on_message(conn: ConnId, message: Message<'_>, out: &mut impl Outbox) {
    out.reply(conn, message);
}
