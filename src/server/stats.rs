//! Counters the loop keeps about itself: every refusal, forced close and
//! pause is counted here, and summarised in the log at shutdown.

use std::collections::BTreeMap;
use std::fmt;

use crate::metrics::{Labels, Metrics};

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
    /// Connections dropped because their closing handshake was not over
    /// within the close timeout (no close frame from the peer, or the
    /// peer did not read ours).
    pub close_timeouts: u64,
    /// Connections dropped because the client did not read its final
    /// HTTP response within the close timeout.
    pub response_timeouts: u64,
    /// Connections dropped because a timer would have re-armed in the
    /// past (a bug guard: always 0 unless a rule is broken).
    pub timer_stalls: u64,
    pub closes_sent: u64,
    /// Times a peer's reads were paused because our replies to it piled up.
    pub read_pauses: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Fan-out frames queued for a recipient, and those refused because
    /// the recipient's queue was full.
    pub deliveries: u64,
    pub delivery_drops: u64,
    /// State updates (see `Outbox::deliver_state`) held because the
    /// recipient's queue was full, those that replaced a held state of the
    /// same key (conflated), and those that pushed the oldest held state
    /// of their stream out (past `--max-pending-states`).
    pub states_held: u64,
    pub states_conflated: u64,
    pub states_evicted: u64,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS connections that failed, by reason (`timeout`, `plain_http`,
    /// `eof` during the handshake, or the kind of TLS error).
    pub tls_failures: BTreeMap<&'static str, u64>,
    /// SIGHUP reloads of a listener's certificate, and those refused
    /// because a file was bad (the previous certificate stays in use).
    pub tls_reloads: u64,
    pub tls_reload_failures: u64,
    /// Loop turns, and the time they spent working (not waiting in poll).
    pub loop_iterations: u64,
    pub loop_busy: std::time::Duration,
}

impl Stats {
    /// The loop's own families for `GET /metrics`.
    pub fn write_metrics(&self, m: &mut Metrics) {
        m.counter(
            "fanout_handshakes_accepted_total",
            "WebSocket upgrades completed.",
            self.upgrades,
        );
        let statuses: Vec<String> = self.rejections.keys().map(u16::to_string).collect();
        let labels: Vec<[(&str, &str); 1]> =
            statuses.iter().map(|s| [("status", s.as_str())]).collect();
        let samples: Vec<(Labels<'_>, f64)> = labels
            .iter()
            .zip(self.rejections.values())
            .map(|(l, n)| (&l[..], *n as f64))
            .collect();
        m.family(
            "fanout_handshakes_rejected_total",
            "HTTP requests refused with an error status, by status.",
            "counter",
            &samples,
        );
        m.counter(
            "fanout_refused_on_accept_total",
            "TCP connections closed on accept: too many handshakes pending.",
            self.refused_on_accept,
        );
        m.counter(
            "fanout_accept_pauses_total",
            "Accept pauses after running out of descriptors.",
            self.accept_pauses,
        );
        m.counter(
            "fanout_protocol_errors_total",
            "Connections failed for breaking RFC 6455.",
            self.protocol_errors,
        );
        m.counter(
            "fanout_idle_closes_total",
            "Connections closed by the idle timeout.",
            self.idle_closes,
        );
        m.counter(
            "fanout_close_timeouts_total",
            "Connections dropped: the closing handshake was not over within --close-timeout.",
            self.close_timeouts,
        );
        m.counter(
            "fanout_response_timeouts_total",
            "Connections dropped: an HTTP response was not read within --close-timeout.",
            self.response_timeouts,
        );
        m.counter(
            "fanout_timer_stalls_total",
            "Connections dropped because a timer made no progress (a bug guard; should stay 0).",
            self.timer_stalls,
        );
        m.counter(
            "fanout_closes_sent_total",
            "Close frames the server initiated.",
            self.closes_sent,
        );
        m.counter(
            "fanout_read_pauses_total",
            "Reads paused because a peer's replies piled up.",
            self.read_pauses,
        );
        m.counter(
            "fanout_messages_in_total",
            "WebSocket messages received.",
            self.messages_in,
        );
        m.counter(
            "fanout_bytes_in_total",
            "Bytes read from sockets (after TLS decryption on TLS listeners).",
            self.bytes_in,
        );
        m.counter(
            "fanout_bytes_out_total",
            "Bytes written to sockets (before TLS encryption on TLS listeners).",
            self.bytes_out,
        );
        m.counter(
            "fanout_deliveries_total",
            "Fan-out frames queued for a recipient.",
            self.deliveries,
        );
        m.counter(
            "fanout_delivery_drops_total",
            "Fan-out frames not queued because the recipient's queue was full.",
            self.delivery_drops,
        );
        m.family(
            "fanout_state_updates_total",
            "State updates (candles, the end of a replay) to slow recipients, by outcome: held \
             until the queue had room, conflated (replaced a held update of the same candle), \
             evicted (the oldest held one given up past --max-pending-states, with a notice).",
            "counter",
            &[
                (&[("outcome", "held")], self.states_held as f64),
                (&[("outcome", "conflated")], self.states_conflated as f64),
                (&[("outcome", "evicted")], self.states_evicted as f64),
            ],
        );
        m.counter(
            "fanout_tls_handshakes_total",
            "TLS handshakes completed.",
            self.tls_handshakes,
        );
        let labels: Vec<[(&str, &str); 1]> = self
            .tls_failures
            .keys()
            .map(|reason| [("reason", *reason)])
            .collect();
        let samples: Vec<(Labels<'_>, f64)> = labels
            .iter()
            .zip(self.tls_failures.values())
            .map(|(l, n)| (&l[..], *n as f64))
            .collect();
        m.family(
            "fanout_tls_failures_total",
            "TLS connections failed, by reason: timeout (handshake not done in time), plain_http, \
             eof (closed during the handshake), or the TLS error's kind.",
            "counter",
            &samples,
        );
        m.counter(
            "fanout_tls_reloads_total",
            "Certificate reloads on SIGHUP that took effect.",
            self.tls_reloads,
        );
        m.counter(
            "fanout_tls_reload_failures_total",
            "Certificate reloads on SIGHUP refused for a bad file (the old one stays).",
            self.tls_reload_failures,
        );
        m.counter(
            "fanout_loop_iterations_total",
            "Event-loop turns.",
            self.loop_iterations,
        );
        m.family(
            "fanout_loop_busy_seconds_total",
            "Time the event loop spent working rather than waiting in poll.",
            "counter",
            &[(&[], self.loop_busy.as_secs_f64())],
        );
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upgrades={} rejections={:?} refused_on_accept={} accept_pauses={} protocol_errors={} \
             idle_closes={} close_timeouts={} response_timeouts={} timer_stalls={} \
             closes_sent={} read_pauses={} messages_in={} bytes_in={} bytes_out={} \
             tls_handshakes={} tls_failures={:?}",
            self.upgrades,
            self.rejections,
            self.refused_on_accept,
            self.accept_pauses,
            self.protocol_errors,
            self.idle_closes,
            self.close_timeouts,
            self.response_timeouts,
            self.timer_stalls,
            self.closes_sent,
            self.read_pauses,
            self.messages_in,
            self.bytes_in,
            self.bytes_out,
            self.tls_handshakes,
            self.tls_failures
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shutdown log line is one line.
    #[test]
    fn the_summary_is_one_line() {
        let mut stats = Stats::default();
        stats.tls_failures.insert("timeout", 2);
        let summary = stats.to_string();
        assert!(
            !summary.contains('\n') && !summary.contains('\\'),
            "{summary}"
        );
        assert!(summary.contains(" idle_closes=0 "), "{summary}");
        assert!(
            summary.ends_with("tls_failures={\"timeout\": 2}"),
            "{summary}"
        );
    }
}
