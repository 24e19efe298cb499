//! The app's part of `GET /metrics`: request, publish and slow-consumer
//! counters, the market's, and (with `--redis`) the scale-out's, rendered
//! into the server's [`Metrics`] text. Apart from the domains so that a
//! metric's name and help text are found in one place.

use super::bus::RedisBus;
use super::tokens::RefusalKind;
use super::App;
use crate::cluster::LinkState;
use crate::metrics::{Labels, Metrics};

impl App {
    /// The app's counters for `GET /metrics`.
    pub fn write_metrics(&self, m: &mut Metrics) {
        let node = &self.node;
        let s = &node.stats;
        m.counter(
            "fanout_requests_total",
            "JSON requests received on /ws.",
            s.requests,
        );
        m.counter(
            "fanout_request_errors_total",
            "Requests answered with an error.",
            s.request_errors,
        );
        m.counter(
            "fanout_auth_failures_total",
            "Failed auth requests: publisher keys and tokens refused.",
            s.auth_failures,
        );
        m.counter(
            "fanout_tokens_accepted_total",
            "Tokens (JWTs) accepted, in handshakes and auth requests.",
            s.tokens_accepted,
        );
        let refusals: Vec<([(&str, &str); 1], f64)> = RefusalKind::ALL
            .iter()
            .zip(s.token_refusals)
            .map(|(kind, n)| ([("reason", kind.label())], n as f64))
            .collect();
        let refusals: Vec<(Labels<'_>, f64)> = refusals.iter().map(|(l, n)| (&l[..], *n)).collect();
        m.family(
            "fanout_token_refusals_total",
            "Tokens refused (handshakes answered 401, auth requests answered auth_failed), by reason; \
             `missing` is a handshake without one under --require-token.",
            "counter",
            &refusals,
        );
        m.counter(
            "fanout_token_expiry_closes_total",
            "Connections closed with 4001 because their token expired.",
            node.grants.expired_closes,
        );
        m.counter(
            "fanout_token_key_reloads_total",
            "SIGHUP re-reads of the token key files that worked.",
            s.token_key_reloads,
        );
        m.counter(
            "fanout_token_key_reload_failures_total",
            "SIGHUP re-reads of the token key files that failed (the previous keys stay).",
            s.token_key_reload_failures,
        );
        m.counter(
            "fanout_published_total",
            "Messages published by clients.",
            s.published,
        );
        m.family(
            "fanout_slow_consumer_drops_total",
            "Fan-out messages dropped because a subscriber's queue was full, by stream.",
            "counter",
            &[
                (&[("stream", "channel")], node.channels.dropped_total as f64),
                (&[("stream", "chat")], node.chat.dropped_total as f64),
                (
                    &[("stream", "market")],
                    node.market.stats.dropped_updates as f64,
                ),
            ],
        );
        m.counter(
            "fanout_slow_consumer_closes_total",
            "Registered event-stream clients closed with 1008 for reading too slowly.",
            node.streams.slow_closes,
        );
        m.counter(
            "fanout_registration_timeouts_total",
            "Clients closed for not registering in time.",
            node.streams.timeouts,
        );
        let market = &node.market.stats;
        m.counter(
            "fanout_market_trades_total",
            "Trades and ticks aggregated into candles.",
            market.trades,
        );
        m.counter(
            "fanout_market_late_trades_total",
            "Trades for already-closed candles, dropped.",
            market.late_trades,
        );
        m.counter(
            "fanout_market_rejected_events_total",
            "Market events with unusable fields, or past the symbol limit.",
            market.rejected_market_events,
        );
        m.counter(
            "fanout_alerts_fired_total",
            "Alerts fired.",
            market.alerts_fired,
        );
        if let Some((finished, events)) = node.market.replay_progress() {
            m.gauge(
                "fanout_replay_finished",
                "1 once the --replay file has been replayed to its end (a replay_end event was \
                 published on `events`), 0 while it runs.",
                if finished { 1.0 } else { 0.0 },
            );
            m.counter(
                "fanout_replay_events_total",
                "Events the --replay file has handed out so far.",
                events,
            );
        }
        node.sinks.write_metrics(m);
        if let Some(redis) = self.bus.redis() {
            write_redis_metrics(redis, m);
        }
    }
}

/// The scale-out part of `GET /metrics`.
fn write_redis_metrics(redis: &RedisBus, m: &mut Metrics) {
    let link = redis.link().stats();
    let c = &redis.stats;
    let up = link.state == LinkState::Up;
    m.gauge(
        "fanout_redis_up",
        "1 when the Redis link is up, 0 during an outage or while connecting.",
        if up { 1.0 } else { 0.0 },
    );
    for (name, help, value) in [
            (
                "fanout_redis_outages_total",
                "Redis outages (the link went down).",
                link.outages,
            ),
            (
                "fanout_redis_reconnects_total",
                "Redis connections re-established.",
                link.reconnects,
            ),
            (
                "fanout_redis_connect_failures_total",
                "Failed Redis connection attempts.",
                link.connect_failures,
            ),
            (
                "fanout_redis_published_total",
                "Publishes Redis applied.",
                link.published,
            ),
            (
                "fanout_redis_received_total",
                "Bus messages received.",
                link.received,
            ),
            (
                "fanout_redis_resets_total",
                "Times Redis lost its data (offsets restarted).",
                link.resets,
            ),
            (
                "fanout_redis_local_deliveries_total",
                "Messages delivered by this node alone (offset null) because the link was not up.",
                c.local_deliveries,
            ),
            (
                "fanout_redis_malformed_total",
                "Bus messages not understood, skipped.",
                c.malformed + link.malformed,
            ),
            (
                "fanout_redis_duplicates_total",
                "Second copies of a bus message (resent across a Redis data loss), skipped.",
                c.duplicates,
            ),
            (
                "fanout_redis_presence_lost_total",
                "Chat presence changes that did not reach Redis (queue full or refused).",
                // Chat's presence changes, nick claims and releases are the
                // only writes and durable script calls the app queues.
                link.writes_lost,
            ),
            (
                "fanout_redis_defined_total",
                "Channel definitions (create) this node sent that Redis applied.",
                link.defined,
            ),
            (
                "fanout_redis_definitions_not_applied_total",
                "Channel definitions from Redis this node could not apply (channel limit, invalid name).",
                c.definitions_not_applied,
            ),
            (
                "fanout_redis_local_definitions_overridden_total",
                "Channels created here during an outage whose settings the cluster's definition replaced.",
                c.local_definitions_overridden,
            ),
            (
                "fanout_redis_nick_conflicts_total",
                "Chat members renamed because a member of another node held their nick in Redis.",
                c.nick_conflicts,
            ),
        ] {
            m.counter(name, help, value);
        }
    for (name, help, value) in [
        (
            "fanout_redis_down_seconds",
            "Length of the current Redis outage (0 when up).",
            link.down_ms as f64 / 1000.0,
        ),
        (
            "fanout_redis_down_seconds_total",
            "Total time the Redis link spent down.",
            link.down_total_ms as f64 / 1000.0,
        ),
        (
            "fanout_redis_lag_seconds",
            "Age of the newest bus entry read (0 when caught up).",
            link.lag_ms as f64 / 1000.0,
        ),
        (
            "fanout_redis_outbound_queued",
            "Publishes and history requests waiting for Redis.",
            link.outbound_queued as f64,
        ),
        (
            "fanout_redis_inbound_queued",
            "Bus messages waiting for the event loop.",
            link.inbound_queued as f64,
        ),
    ] {
        m.gauge(name, help, value);
    }
    m.family(
        "fanout_redis_lost_total",
        "Messages that will never go through Redis, by reason.",
        "counter",
        &[
            (&[("reason", "queue_full")], link.lost_queue_full as f64),
            (&[("reason", "rejected")], link.lost_rejected as f64),
            (&[("reason", "bus_gap")], link.lost_bus_gap as f64),
            (&[("reason", "shutdown")], link.lost_at_shutdown as f64),
        ],
    );
}
