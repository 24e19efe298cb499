//! Counters the loop keeps about itself: every refusal, forced close and
//! pause is counted here, and summarised in the log at shutdown.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub upgrades: u64,
    /// HTTP refusals by status code.
    pub rejections: BTreeMap<u16, u64>,
    /// TCP connections closed on accept because too many handshakes were pending.
    pub refused_on_accept: u64,
    /// Times accepting paused because the process was out of descriptors.
    pub accept_pauses: u64,
    pub protocol_errors: u64,
    pub idle_closes: u64,
    pub closes_sent: u64,
    /// Times a peer's reads were paused because our replies to it piled up.
    pub read_pauses: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upgrades={} rejections={:?} refused_on_accept={} accept_pauses={} protocol_errors={} idle_closes={} \\
             closes_sent={} read_pauses={} messages_in={} bytes_in={} bytes_out={}",
            self.upgrades,
            self.rejections,
            self.refused_on_accept,
            self.accept_pauses,
            self.protocol_errors,
            self.idle_closes,
            self.closes_sent,
            self.read_pauses,
            self.messages_in,
            self.bytes_in,
            self.bytes_out
        )
    }
}
