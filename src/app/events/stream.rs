//! The event-stream registration protocol of `/ws`, kept exactly as the
//! pipeline consumers written for it expect:
//!
//! 1. on connect the server sends `welcome` (with the `register` format);
//! 2. the client sends `register` with its filters within the registration
//!    timeout, or is closed with 1008;
//! 3. the server answers `registered`, then delivers the queued events that
//!    arrived before registration and match, then every matching event as
//!    it is published, as the flat JSON object the publisher sent.
//!
//! Re-sending `register` replaces the filters. A client that starts with
//! any other valid request (it came for channels or chat) leaves the
//! registration flow: nothing is queued for it and no timeout applies.
//!
//! Slow consumers are closed with 1008 "slow consumer": these clients
//! expect an unbroken stream and reconnect, and a silent gap would be worse.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};
use serde_json::{json, Map, Value};

use super::filter::EventFilters;
use crate::app::{ConnId, Message, Outbox};
use crate::ws::{CloseCode, SharedFrame};

/// The exact welcome text clients of the original service match on.
pub const WELCOME: &str = r#"{"type":"welcome","message":"Please send registration message to begin receiving events","format":{"type":"register","filters":{"types":[],"account_ids":[],"asset_codes":[],"min_amount":""}}}"#;

/// A published event: its fields for filtering and its frame, encoded once.
#[derive(Debug)]
pub struct StreamEvent {
    pub fields: Map<String, Value>,
    pub frame: SharedFrame,
}

impl StreamEvent {
    pub fn new(fields: Map<String, Value>) -> Arc<StreamEvent> {
        // A map of JSON values always serializes; no copy of it is needed.
        let json = serde_json::to_string(&fields).expect("JSON maps serialize");
        let frame = SharedFrame::text(&json);
        Arc::new(StreamEvent { fields, frame })
    }
}

#[derive(Debug)]
enum StreamClient {
    Waiting {
        serial: u64,
        queue: VecDeque<Arc<StreamEvent>>,
        dropped: u64,
    },
    Registered {
        filters: EventFilters,
    },
}

#[derive(Debug)]
pub struct EventStreams {
    max_queue: usize,
    timeout: Duration,
    clients: HashMap<ConnId, StreamClient>,
    deadlines: BinaryHeap<Reverse<(Instant, ConnId, u64)>>,
    pub slow_closes: u64,
    pub timeouts: u64,
}

impl EventStreams {
    pub fn new(max_queue: usize, timeout: Duration) -> Self {
        Self {
            max_queue,
            timeout,
            clients: HashMap::new(),
            deadlines: BinaryHeap::new(),
            slow_closes: 0,
            timeouts: 0,
        }
    }

    /// A `/ws` client connected: welcome it and start its registration clock.
    pub fn on_open(&mut self, conn: ConnId, serial: u64, now: Instant, out: &mut impl Outbox) {
        out.reply(conn, Message::Text(WELCOME));
        self.clients.insert(
            conn,
            StreamClient::Waiting {
                serial,
                queue: VecDeque::new(),
                dropped: 0,
            },
        );
        self.deadlines
            .push(Reverse((now + self.timeout, conn, serial)));
    }

    /// The client sent a valid request other than `register` before
    /// registering: it is not an event consumer.
    pub fn on_other_request(&mut self, conn: ConnId) {
        if matches!(self.clients.get(&conn), Some(StreamClient::Waiting { .. })) {
            self.clients.remove(&conn);
        }
    }

    pub fn register(&mut self, conn: ConnId, filters: EventFilters, out: &mut impl Outbox) {
        let registered = json!({
            "type": "registered",
            "message": "Registration successful, processing queued events",
            "filters": filters.to_json(),
        });
        out.reply(conn, Message::Text(&registered.to_string()));
        let previous = self
            .clients
            .insert(conn, StreamClient::Registered { filters });
        if let Some(StreamClient::Waiting { queue, dropped, .. }) = previous {
            let Some(StreamClient::Registered { filters }) = self.clients.get(&conn) else {
                unreachable!()
            };
            for event in queue.iter().filter(|e| filters.matches(&e.fields)) {
                out.reply_shared(conn, &event.frame);
            }
            if dropped > 0 {
                let notice = json!({
                    "type": "dropped",
                    "count": dropped,
                    "message": format!(
                        "{dropped} event(s) arrived before registration beyond the queue of {} and were dropped",
                        self.max_queue
                    ),
                });
                out.reply(conn, Message::Text(&notice.to_string()));
            }
        }
    }

    pub fn publish(&mut self, event: &Arc<StreamEvent>, out: &mut impl Outbox) {
        let mut slow = Vec::new();
        for (conn, client) in self.clients.iter_mut() {
            match client {
                StreamClient::Registered { filters } => {
                    if filters.matches(&event.fields) && !out.deliver(*conn, &event.frame) {
                        slow.push(*conn);
                    }
                }
                StreamClient::Waiting { queue, dropped, .. } => {
                    if self.max_queue == 0 {
                        *dropped += 1;
                        continue;
                    }
                    if queue.len() >= self.max_queue {
                        queue.pop_front();
                        *dropped += 1;
                    }
                    queue.push_back(event.clone());
                }
            }
        }
        for conn in slow {
            self.slow_closes += 1;
            info!(
                "conn {conn}: closing event stream consumer: outbound queue full (slow consumer)"
            );
            self.clients.remove(&conn);
            out.close(
                conn,
                CloseCode::POLICY_VIOLATION,
                "slow consumer: events are arriving faster than they are read",
            );
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Closes clients whose registration time ran out.
    pub fn on_timer(&mut self, now: Instant, out: &mut impl Outbox) {
        while let Some(Reverse((at, conn, serial))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if matches!(self.clients.get(&conn), Some(StreamClient::Waiting { serial: s, .. }) if *s == serial)
            {
                self.clients.remove(&conn);
                self.timeouts += 1;
                debug!("conn {conn}: registration timeout");
                let reason = format!(
                    "registration timeout: no register message within {:?}",
                    self.timeout
                );
                out.close(conn, CloseCode::POLICY_VIOLATION, &reason);
            }
        }
    }

    pub fn remove_conn(&mut self, conn: ConnId) {
        self.clients.remove(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::tests::RecordingOutbox;

    fn event(v: Value) -> Arc<StreamEvent> {
        StreamEvent::new(v.as_object().unwrap().clone())
    }

    fn filters(v: Value) -> EventFilters {
        EventFilters::from_json(Some(&v)).unwrap()
    }

    #[test]
    fn welcome_register_then_queued_matching_events() {
        let mut streams = EventStreams::new(2, Duration::from_secs(10));
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        streams.on_open(1, 1, now, &mut out);
        assert_eq!(out.replies[0].1, WELCOME);
        streams.publish(&event(json!({"type":"payment","amount":"5"})), &mut out);
        streams.publish(&event(json!({"type":"trade"})), &mut out);
        streams.publish(&event(json!({"type":"payment","amount":"500"})), &mut out);
        assert!(out.delivered.is_empty());
        streams.register(1, filters(json!({"types":["payment"]})), &mut out);
        let texts: Vec<String> = out.replies.iter().map(|(_, t)| t.clone()).collect();
        assert!(texts[1].contains(r#""type":"registered""#), "{}", texts[1]);
        // Queue of 2 kept the trade and the second payment; only the payment matches.
        assert_eq!(texts[2], r#"{"type":"payment","amount":"500"}"#);
        assert!(texts[3].contains(r#""type":"dropped""#) && texts[3].contains(r#""count":1"#));
        streams.publish(&event(json!({"type":"payment"})), &mut out);
        streams.publish(&event(json!({"type":"trade"})), &mut out);
        assert_eq!(out.delivered.len(), 1);
        // Re-registering replaces the filters.
        streams.register(1, filters(json!({"types":["trade"]})), &mut out);
        streams.publish(&event(json!({"type":"trade"})), &mut out);
        streams.publish(&event(json!({"type":"payment"})), &mut out);
        assert_eq!(out.delivered.len(), 2);
    }

    #[test]
    fn registration_timeout_closes_only_unregistered_clients() {
        let mut streams = EventStreams::new(10, Duration::from_secs(10));
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        streams.on_open(1, 1, now, &mut out);
        streams.on_open(2, 2, now, &mut out);
        streams.on_open(3, 3, now, &mut out);
        streams.register(2, EventFilters::default(), &mut out);
        streams.on_other_request(3);
        assert_eq!(streams.next_deadline(), Some(now + Duration::from_secs(10)));
        streams.on_timer(now + Duration::from_secs(9), &mut out);
        assert!(out.closed.is_empty());
        streams.on_timer(now + Duration::from_secs(10), &mut out);
        assert_eq!(out.closed, vec![(1, 1008)]);
        assert_eq!(streams.timeouts, 1);
    }

    #[test]
    fn slow_registered_consumers_are_closed() {
        let mut streams = EventStreams::new(10, Duration::from_secs(10));
        let mut out = RecordingOutbox {
            full: [4].into_iter().collect(),
            ..Default::default()
        };
        streams.on_open(4, 1, Instant::now(), &mut out);
        streams.register(4, EventFilters::default(), &mut out);
        streams.publish(&event(json!({"type":"x"})), &mut out);
        assert_eq!(out.closed, vec![(4, 1008)]);
        assert_eq!(streams.slow_closes, 1);
    }
}
