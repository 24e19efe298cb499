//! Market data: feeds in (the simulator, a replay file, publishers),
//! K-line candles, user-defined event filters and alerts out.
//!
//! Every event reaches [`Market::on_event`] once, whatever fed it. Trades
//! and ticks update the candles; each changed candle is encoded once per
//! format and shared by its subscribers. Dynamic filters and alerts are
//! compiled when created and evaluated per event.
//!
//! Slow consumers: a candle is a state, so its updates go out through
//! [`Outbox::deliver_state`], keyed by the subscription and the candle's
//! open time: while a subscriber's queue is full the server keeps the
//! latest state of each candle (the closed one, final, included) and sends
//! them once there is room, so the subscriber never misses a closed candle
//! and ends on the latest state. Past `--max-pending-states` candles per
//! subscription the oldest is given up; the subscriber is told which ones
//! with a `dropped` notice naming the series and the open times, to fetch
//! them from history. Filter matches are events, not states: one that does
//! not fit is dropped and counted, and a `dropped` notice says how many.
//!
//! The end of a replay (`replay_end`, published on `events` after its last
//! event) is also the last state of every K-line subscription: each gets
//! a `replay_end` message after every candle the replay made.

pub mod alert;
pub mod filter_expr;
pub mod kline;
pub mod kline_text;
pub mod replay;
pub mod sim;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use log::{debug, info};
use serde_json::{json, Map, Value};

use self::alert::{Alert, AlertSpec, CandleField, Firing, Source};
use self::filter_expr::Filter;
use self::kline::{Applied, Book, Candle, Interval, Trade};
use self::replay::ReplayFeed;
use self::sim::{SimConfig, SimFeed};
use super::protocol::{ErrorCode, KlineRequest, ProtocolError};
use super::{unix_millis, ConnId, Message, Outbox, StateDelivery, StateKey};
use crate::config::Config;
use crate::ws::SharedFrame;

/// Candles sent on subscribe at most, whatever the client asks.
const MAX_HISTORY_REQUEST: usize = 1000;

type SeriesKey = (String, u64);

/// The event type that ends a replay (see [`replay`]), and the message
/// every K-line subscription then gets.
pub const REPLAY_END: &str = "replay_end";

/// The item of a subscription's `replay_end` in its [`StateKey`]: after
/// every candle's open time, so it goes out after every candle held.
const REPLAY_END_ITEM: i64 = i64::MAX;

#[derive(Debug)]
struct KlineSub {
    conn: ConnId,
    /// This subscription's [`StateKey::stream`]: unique per subscription,
    /// never reused.
    stream: u64,
    /// The old plain-text service's shape instead of `{"type":"kline",…}`.
    kline_text: bool,
    throttle: Duration,
    last_sent: Option<Instant>,
    /// An update was held back by the throttle; the latest state is owed.
    pending: bool,
}

#[derive(Debug, Default)]
struct ConnMarket {
    /// The `/kline` text-protocol subscription, if any (one at a time, like the original).
    kline_text: Option<SeriesKey>,
    filters: Vec<(String, Filter)>,
    alerts: Vec<Alert>,
    /// `kline.subscribe` subscriptions (the text protocol's aside).
    klines: usize,
    /// Filter matches dropped since the last notice.
    dropped: u64,
    /// Candles given up by the server past `--max-pending-states`, per
    /// subscription, since the last notice.
    lost: Vec<LostCandles>,
}

/// Candles of one subscription the server gave up for a slow subscriber.
#[derive(Debug)]
struct LostCandles {
    stream: u64,
    series: SeriesKey,
    count: u64,
    /// Open times of the first and the last candle lost.
    first_start: i64,
    last_start: i64,
}

/// Counters for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct MarketStats {
    pub trades: u64,
    pub late_trades: u64,
    pub rejected_market_events: u64,
    /// Filter matches dropped, and candles given up past
    /// `--max-pending-states`, for slow subscribers.
    pub dropped_updates: u64,
    pub alerts_fired: u64,
}

/// An alert that fired: who gets it, and the message (also published on
/// the `alerts` channel by the app).
#[derive(Debug)]
pub struct AlertMessage {
    pub conn: ConnId,
    pub message: Value,
}

#[derive(Debug)]
pub struct Market {
    book: Book,
    intervals: Vec<Interval>,
    default_symbol: String,
    subs: HashMap<SeriesKey, Vec<KlineSub>>,
    conns: HashMap<ConnId, ConnMarket>,
    throttled: BinaryHeap<Reverse<(Instant, ConnId, SeriesKey)>>,
    sim: Option<SimFeed>,
    replay: Option<ReplayFeed>,
    /// Once the replay has finished: the events it handed out.
    replay_finished: Option<u64>,
    /// The next subscription's [`KlineSub::stream`].
    next_stream: u64,
    max_filters: usize,
    /// K-line subscriptions per connection (`--max-subscriptions`).
    max_subscriptions: usize,
    max_alerts: usize,
    next_alert: u64,
    pub stats: MarketStats,
}

impl Market {
    pub fn new(config: &Config, now: Instant) -> Result<Market, String> {
        let intervals = config
            .kline_intervals
            .iter()
            .map(|text| Interval::parse(text.trim()).map_err(|e| format!("--kline-intervals: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let sim = (!config.no_sim).then(|| {
            let seed = config
                .sim_seed
                .unwrap_or_else(|| unix_millis() ^ u64::from(std::process::id()));
            info!("simulated market feed on (seed {seed}); --no-sim turns it off");
            SimFeed::new(
                SimConfig {
                    seed,
                    trades_per_sec: config.sim_trades_per_sec,
                    events_per_sec: config.sim_events_per_sec,
                },
                now,
                unix_millis() as i64,
            )
        });
        let replay = match &config.replay {
            Some(path) => {
                Some(ReplayFeed::open(path, config.replay_speed, now).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        Ok(Market {
            book: Book::new(intervals.clone(), config.kline_history, config.max_symbols),
            intervals,
            default_symbol: config.kline_default_symbol.clone(),
            subs: HashMap::new(),
            conns: HashMap::new(),
            throttled: BinaryHeap::new(),
            sim,
            replay,
            replay_finished: None,
            next_stream: 0,
            max_filters: config.max_filters,
            max_subscriptions: config.max_subscriptions,
            max_alerts: config.max_alerts,
            next_alert: 0,
            stats: MarketStats::default(),
        })
    }

    fn interval(&self, field: &str, text: &str) -> Result<Interval, ProtocolError> {
        let names: Vec<String> = self.intervals.iter().map(|i| i.name()).collect();
        Interval::parse(text)
            .ok()
            .filter(|i| self.intervals.contains(i))
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::InvalidField,
                    format!(
                        "field `{field}`: unknown interval `{text}` (this server keeps {})",
                        names.join(", ")
                    ),
                )
            })
    }

    /// `market.symbols`: what can be subscribed to.
    pub fn symbols(&self) -> Value {
        // Symbols the feeds will trade count before their first trade, so a
        // client that connects at start-up sees them all.
        let mut symbols = self.book.symbols();
        symbols.extend(self.sim.as_ref().map(SimFeed::symbols).unwrap_or_default());
        symbols.push(self.default_symbol.clone());
        symbols.sort();
        symbols.dedup();
        let intervals: Vec<String> = self.intervals.iter().map(|i| i.name()).collect();
        json!({ "symbols": symbols, "intervals": intervals, "default_symbol": self.default_symbol })
    }

    /// `kline.subscribe`: sends `ack` (built by the caller from the details),
    /// the recent closed candles, the open one, then live updates.
    pub fn kline_subscribe(
        &mut self,
        conn: ConnId,
        request: &KlineRequest,
        out: &mut impl Outbox,
        ack: impl FnOnce(Value) -> String,
    ) -> Result<(), ProtocolError> {
        let KlineRequest {
            symbol,
            interval,
            throttle_ms,
            history,
        } = request;
        let (symbol, throttle_ms) = (symbol.as_str(), *throttle_ms);
        validate_symbol(symbol)?;
        let interval = self.interval("interval", interval)?;
        let key = (symbol.to_owned(), interval.secs);
        let subscribed = self
            .subs
            .get(&key)
            .is_some_and(|subs| subs.iter().any(|s| s.conn == conn && !s.kline_text));
        if subscribed {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                format!("already subscribed to {symbol} {}", interval.name()),
            ));
        }
        // Each subscription may hold `--max-pending-states` candles for a
        // slow reader: their number bounds what one connection holds.
        let state = self.conns.entry(conn).or_default();
        if state.klines >= self.max_subscriptions {
            return Err(ProtocolError::new(
                ErrorCode::LimitReached,
                format!(
                    "at most {} K-line subscriptions per connection",
                    self.max_subscriptions
                ),
            ));
        }
        state.klines += 1;
        let subs = self.subs.entry(key.clone()).or_default();
        self.next_stream += 1;
        subs.push(KlineSub {
            conn,
            stream: self.next_stream,
            kline_text: false,
            throttle: Duration::from_millis(throttle_ms),
            last_sent: None,
            pending: false,
        });
        let wanted = history.unwrap_or(usize::MAX).min(MAX_HISTORY_REQUEST);
        let series = self.book.series(symbol, interval);
        let closed: Vec<&Candle> = series.map(|s| s.history().collect()).unwrap_or_default();
        let skip = closed.len().saturating_sub(wanted);
        let details = json!({
            "symbol": symbol,
            "interval": interval.name(),
            "history": closed.len() - skip,
            "throttle_ms": throttle_ms,
        });
        out.reply(conn, Message::Text(&ack(details)));
        for candle in closed
            .into_iter()
            .skip(skip)
            .chain(series.and_then(|s| s.current()))
        {
            out.reply(
                conn,
                Message::Text(&candle.to_json(symbol, interval).to_string()),
            );
        }
        Ok(())
    }

    pub fn kline_unsubscribe(
        &mut self,
        conn: ConnId,
        symbol: &str,
        interval: &str,
        out: &mut impl Outbox,
    ) -> Result<Value, ProtocolError> {
        let interval = self.interval("interval", interval)?;
        let key = (symbol.to_owned(), interval.secs);
        let removed = self.remove_sub(conn, &key, false, out);
        if !removed {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("not subscribed to {symbol} {}", interval.name()),
            ));
        }
        Ok(json!({ "symbol": symbol, "interval": interval.name() }))
    }

    /// Ends a subscription; what the server still holds of it is
    /// forgotten (the client asked for no more).
    fn remove_sub(
        &mut self,
        conn: ConnId,
        key: &SeriesKey,
        kline_text: bool,
        out: &mut impl Outbox,
    ) -> bool {
        let Some(subs) = self.subs.get_mut(key) else {
            return false;
        };
        let Some(at) = subs
            .iter()
            .position(|s| s.conn == conn && s.kline_text == kline_text)
        else {
            return false;
        };
        let stream = subs.remove(at).stream;
        out.discard_states(conn, stream);
        if let Some(state) = self.conns.get_mut(&conn) {
            state.lost.retain(|l| l.stream != stream);
            if !kline_text {
                state.klines -= 1;
            }
        }
        if subs.is_empty() {
            self.subs.remove(key);
        }
        true
    }

    /// `sub-1m` and friends: replaces the connection's `/kline` text-protocol subscription
    /// and sends the open candle right away.
    pub fn kline_text_subscribe(&mut self, conn: ConnId, interval: &str, out: &mut impl Outbox) {
        let interval = match self.interval("interval", interval) {
            Ok(interval) => interval,
            Err(e) => {
                let reply =
                    json!({ "type": "error", "code": e.code.as_str(), "message": e.message });
                return out.reply(conn, Message::Text(&reply.to_string()));
            }
        };
        self.kline_text_unsubscribe(conn, out);
        let key = (self.default_symbol.clone(), interval.secs);
        self.next_stream += 1;
        self.subs.entry(key.clone()).or_default().push(KlineSub {
            conn,
            stream: self.next_stream,
            kline_text: true,
            throttle: Duration::ZERO,
            last_sent: None,
            pending: false,
        });
        self.conns.entry(conn).or_default().kline_text = Some(key);
        let current = self
            .book
            .series(&self.default_symbol, interval)
            .and_then(|s| s.current());
        if let Some(candle) = current {
            out.reply(conn, Message::Text(&candle.to_kline_text_json(interval)));
        }
    }

    pub fn kline_text_unsubscribe(&mut self, conn: ConnId, out: &mut impl Outbox) {
        if let Some(key) = self.conns.get_mut(&conn).and_then(|c| c.kline_text.take()) {
            self.remove_sub(conn, &key, true, out);
        }
    }

    pub fn filter_subscribe(
        &mut self,
        conn: ConnId,
        name: &str,
        spec: &Value,
    ) -> Result<Value, ProtocolError> {
        if name.is_empty() || name.len() > 64 {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "field `name` must be 1-64 characters",
            ));
        }
        let filter = Filter::compile(spec, "filter")?;
        let state = self.conns.entry(conn).or_default();
        if state.filters.iter().any(|(n, _)| n == name) {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                format!("a filter named `{name}` exists already"),
            ));
        }
        if state.filters.len() >= self.max_filters {
            return Err(ProtocolError::new(
                ErrorCode::LimitReached,
                format!("at most {} filters per connection", self.max_filters),
            ));
        }
        state.filters.push((name.to_owned(), filter));
        Ok(json!({ "filter": name }))
    }

    pub fn filter_unsubscribe(&mut self, conn: ConnId, name: &str) -> Result<Value, ProtocolError> {
        let state = self.conns.entry(conn).or_default();
        let before = state.filters.len();
        state.filters.retain(|(n, _)| n != name);
        if state.filters.len() == before {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("no filter named `{name}`"),
            ));
        }
        Ok(json!({ "filter": name }))
    }

    pub fn alert_create(
        &mut self,
        conn: ConnId,
        request: &Map<String, Value>,
    ) -> Result<Value, ProtocolError> {
        let spec = AlertSpec::parse(request)?;
        if let Source::Kline {
            symbol, interval, ..
        } = &spec.source
        {
            validate_symbol(symbol)?;
            self.interval("interval", interval)?;
        }
        let state = self.conns.entry(conn).or_default();
        if state.alerts.len() >= self.max_alerts {
            return Err(ProtocolError::new(
                ErrorCode::LimitReached,
                format!("at most {} alerts per connection", self.max_alerts),
            ));
        }
        let id = match &spec.id {
            Some(id) if state.alerts.iter().any(|a| a.id() == id) => {
                return Err(ProtocolError::new(
                    ErrorCode::Conflict,
                    format!("an alert named `{id}` exists already"),
                ))
            }
            Some(id) => id.clone(),
            None => {
                self.next_alert += 1;
                format!("a{}", self.next_alert)
            }
        };
        let alert = Alert::new(id, spec);
        let description = alert.describe();
        state.alerts.push(alert);
        Ok(description)
    }

    pub fn alert_list(&self, conn: ConnId) -> Value {
        let alerts: Vec<Value> = self
            .conns
            .get(&conn)
            .map(|c| c.alerts.iter().map(Alert::describe).collect())
            .unwrap_or_default();
        json!({ "alerts": alerts })
    }

    pub fn alert_delete(&mut self, conn: ConnId, id: &str) -> Result<Value, ProtocolError> {
        let state = self.conns.entry(conn).or_default();
        let before = state.alerts.len();
        state.alerts.retain(|a| a.id() != id);
        if state.alerts.len() == before {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("no alert named `{id}`"),
            ));
        }
        Ok(json!({ "alert": id }))
    }

    /// One published event. `event_json` is its encoding, made once by the
    /// caller. Returns the alerts it fired.
    pub fn on_event(
        &mut self,
        event: &Map<String, Value>,
        event_json: &str,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Vec<AlertMessage> {
        self.on_event_at(event, event_json, now, unix_millis() as i64, out)
    }

    /// Like `on_event`, with the time an event without `ts` is taken to
    /// have happened (scale-out: the publish time, the same on every node,
    /// so that candles match).
    pub fn on_event_at(
        &mut self,
        event: &Map<String, Value>,
        event_json: &str,
        now: Instant,
        now_ms: i64,
        out: &mut impl Outbox,
    ) -> Vec<AlertMessage> {
        // Alerts run in event time, like candles: cooldowns then mean the
        // same thing for a live feed and for a replay at any speed.
        let event_ms = event.get("ts").and_then(Value::as_i64).unwrap_or(now_ms);
        let mut fired = Vec::new();
        for (conn, state) in self.conns.iter_mut() {
            for (name, filter) in &state.filters {
                if filter.matches(event) {
                    let text = format!(
                        r#"{{"type":"match","filter":{},"event":{event_json}}}"#,
                        Value::String(name.clone())
                    );
                    if !out.deliver(*conn, &SharedFrame::text(&text)) {
                        state.dropped += 1;
                        self.stats.dropped_updates += 1;
                    }
                }
            }
            for alert in state.alerts.iter_mut() {
                if let Some(firing) = alert.on_event(event, event_ms) {
                    fired.push(alert_message(
                        *conn,
                        alert,
                        &firing,
                        Some(json!({ "event": event })),
                    ));
                }
            }
            state.alerts.retain(|a| !a.is_done());
        }
        if event.get("type").and_then(Value::as_str) == Some(REPLAY_END) {
            self.send_replay_end(event, out);
        }
        match Trade::from_event(event, now_ms) {
            Ok(Some((symbol, trade))) => self.on_trade(symbol, &trade, now, out, &mut fired),
            Ok(None) => {}
            Err(reason) => {
                self.stats.rejected_market_events += 1;
                debug!("market event not used for candles: {reason}");
            }
        }
        self.stats.alerts_fired += fired.len() as u64;
        fired
    }

    fn on_trade(
        &mut self,
        symbol: &str,
        trade: &Trade,
        now: Instant,
        out: &mut impl Outbox,
        fired: &mut Vec<AlertMessage>,
    ) {
        let applied = match self.book.apply(symbol, trade) {
            Ok(applied) => applied,
            Err(reason) => {
                self.stats.rejected_market_events += 1;
                debug!("trade for {symbol} dropped: {reason}");
                return;
            }
        };
        self.stats.trades += 1;
        for (interval, outcome) in applied {
            let (closed, current) = match outcome {
                Applied::Updated { closed, current } => (closed, current),
                Applied::Late => {
                    self.stats.late_trades += 1;
                    continue;
                }
                Applied::Overflow => {
                    self.stats.rejected_market_events += 1;
                    continue;
                }
            };
            let key = (symbol.to_owned(), interval.secs);
            if let Some(closed) = &closed {
                self.send_candle(&key, interval, closed, true, now, out);
            }
            self.send_candle(&key, interval, &current, false, now, out);
            self.check_alerts(symbol, interval, &current, trade.ts_ms, fired);
        }
    }

    /// Fans one candle state out to its subscribers, encoded once per format.
    /// A final (closed) candle ignores throttles; an open-candle update to a
    /// throttled subscriber is held and the latest state sent when due.
    fn send_candle(
        &mut self,
        key: &SeriesKey,
        interval: Interval,
        candle: &Candle,
        final_state: bool,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        let key_series = key;
        let Some(subs) = self.subs.get_mut(key) else {
            return;
        };
        let mut modern: Option<SharedFrame> = None;
        let mut kline_text: Option<SharedFrame> = None;
        for sub in subs.iter_mut() {
            if !final_state && !sub.throttle.is_zero() {
                if let Some(last) = sub.last_sent {
                    if now < last + sub.throttle {
                        if !sub.pending {
                            sub.pending = true;
                            self.throttled.push(Reverse((
                                last + sub.throttle,
                                sub.conn,
                                key.clone(),
                            )));
                        }
                        continue;
                    }
                }
            }
            let frame = if sub.kline_text {
                kline_text
                    .get_or_insert_with(|| SharedFrame::text(&candle.to_kline_text_json(interval)))
            } else {
                modern.get_or_insert_with(|| {
                    SharedFrame::text(&candle.to_json(&key.0, interval).to_string())
                })
            };
            sub.last_sent = Some(now);
            sub.pending = false;
            let key = StateKey {
                stream: sub.stream,
                item: candle.start_ms,
            };
            let delivered = out.deliver_state(sub.conn, key, frame);
            note_lost(&mut self.conns, &mut self.stats, sub, key_series, delivered);
        }
    }

    /// A `replay_end` event: the last state of every K-line subscription
    /// (the plain-text protocol has no such message). It follows every
    /// candle the subscription was sent or has held.
    fn send_replay_end(&mut self, event: &Map<String, Value>, out: &mut impl Outbox) {
        for ((symbol, secs), subs) in &self.subs {
            let Some(interval) = self.intervals.iter().find(|i| i.secs == *secs) else {
                continue;
            };
            let mut message = event.clone();
            message.insert("symbol".into(), json!(symbol));
            message.insert("interval".into(), json!(interval.name()));
            let frame = SharedFrame::text(&Value::Object(message).to_string());
            for sub in subs.iter().filter(|s| !s.kline_text) {
                let key = StateKey {
                    stream: sub.stream,
                    item: REPLAY_END_ITEM,
                };
                let delivered = out.deliver_state(sub.conn, key, &frame);
                let series = (symbol.clone(), *secs);
                note_lost(&mut self.conns, &mut self.stats, sub, &series, delivered);
            }
        }
    }

    fn check_alerts(
        &mut self,
        symbol: &str,
        interval: Interval,
        candle: &Candle,
        ts_ms: i64,
        fired: &mut Vec<AlertMessage>,
    ) {
        for (conn, state) in self.conns.iter_mut() {
            for alert in state.alerts.iter_mut() {
                let Source::Kline {
                    symbol: s,
                    interval: i,
                    field,
                } = &alert.spec().source
                else {
                    continue;
                };
                if s != symbol || Interval::parse(i).ok() != Some(interval) {
                    continue;
                }
                let value = match field {
                    CandleField::Open => candle.open,
                    CandleField::High => candle.high,
                    CandleField::Low => candle.low,
                    CandleField::Close => candle.close,
                    CandleField::Volume => candle.volume,
                };
                if let Some(firing) = alert.on_candle(value, candle.open, candle.start_ms, ts_ms) {
                    let extra = json!({ "candle": candle.to_json(symbol, interval) });
                    fired.push(alert_message(*conn, alert, &firing, Some(extra)));
                }
            }
            state.alerts.retain(|a| !a.is_done());
        }
    }

    /// The next moment a feed or a throttled subscription needs the loop.
    pub fn next_deadline(&self) -> Option<Instant> {
        let feeds = [
            self.sim.as_ref().map(SimFeed::next_due),
            self.replay.as_ref().and_then(ReplayFeed::next_due),
        ];
        let throttle = self.throttled.peek().map(|Reverse((at, _, _))| *at);
        feeds.into_iter().chain([throttle]).flatten().min()
    }

    /// Events the feeds have due, for the app to publish like any other.
    pub fn poll_feeds(&mut self, now: Instant) -> Vec<Map<String, Value>> {
        let mut events = Vec::new();
        if let Some(sim) = self.sim.as_mut() {
            events.extend(sim.poll(now));
        }
        if let Some(replay) = self.replay.as_mut() {
            events.extend(replay.poll(now));
            if replay.is_finished() {
                self.replay_finished = Some(replay.stats().events);
                events.push(replay.end_event());
                self.replay = None;
            }
        }
        events
    }

    /// `None` without `--replay`; else whether it has finished, and the
    /// events handed out so far (`GET /metrics`).
    pub fn replay_progress(&self) -> Option<(bool, u64)> {
        match (&self.replay, &self.replay_finished) {
            (_, Some(events)) => Some((true, *events)),
            (Some(replay), None) => Some((false, replay.stats().events)),
            (None, None) => None,
        }
    }

    /// Sends the latest state owed to throttled subscriptions that are due.
    pub fn on_timer(&mut self, now: Instant, out: &mut impl Outbox) {
        while let Some(Reverse((at, conn, key))) = self.throttled.peek().cloned() {
            if at > now {
                break;
            }
            self.throttled.pop();
            let Some(interval) = self.intervals.iter().copied().find(|i| i.secs == key.1) else {
                continue;
            };
            let Some(candle) = self
                .book
                .series(&key.0, interval)
                .and_then(|s| s.current())
                .cloned()
            else {
                continue;
            };
            let Some(sub) = self
                .subs
                .get_mut(&key)
                .and_then(|subs| subs.iter_mut().find(|s| s.conn == conn && !s.kline_text))
            else {
                continue;
            };
            if !sub.pending {
                continue;
            }
            sub.pending = false;
            sub.last_sent = Some(now);
            let frame = SharedFrame::text(&candle.to_json(&key.0, interval).to_string());
            let state = StateKey {
                stream: sub.stream,
                item: candle.start_ms,
            };
            let delivered = out.deliver_state(conn, state, &frame);
            note_lost(&mut self.conns, &mut self.stats, sub, &key, delivered);
        }
    }

    /// Tells a connection whose queue drained how many updates it missed.
    pub fn on_drained(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        let dropped = std::mem::take(&mut state.dropped);
        if dropped > 0 {
            let notice = json!({
                "type": "dropped",
                "stream": "market",
                "count": dropped,
                "message": format!("{dropped} filter match(es) were dropped because this connection read too slowly"),
            });
            out.reply(conn, Message::Text(&notice.to_string()));
        }
        for lost in std::mem::take(&mut state.lost) {
            let (symbol, secs) = &lost.series;
            let interval = self
                .intervals
                .iter()
                .find(|i| i.secs == *secs)
                .map_or_else(|| format!("{secs}s"), |i| i.name());
            let notice = json!({
                "type": "dropped",
                "stream": "kline",
                "symbol": symbol,
                "interval": interval,
                "count": lost.count,
                "first_start": lost.first_start,
                "last_start": lost.last_start,
                "message": format!(
                    "{} {symbol} {interval} candle(s) were not sent because this connection read too slowly \
                     (more than --max-pending-states held); kline.unsubscribe and kline.subscribe with \
                     `history` fetch the closed ones",
                    lost.count
                ),
            });
            out.reply(conn, Message::Text(&notice.to_string()));
        }
    }

    pub fn remove_conn(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
        self.subs.retain(|_, subs| {
            subs.retain(|s| s.conn != conn);
            !subs.is_empty()
        });
    }
}

/// Records what the server did with a candle state for `sub`: a candle it
/// gave up (past `--max-pending-states`) is counted and owed a notice.
fn note_lost(
    conns: &mut HashMap<ConnId, ConnMarket>,
    stats: &mut MarketStats,
    sub: &KlineSub,
    series: &SeriesKey,
    delivered: StateDelivery,
) {
    let StateDelivery::Evicted { item } = delivered else {
        return;
    };
    stats.dropped_updates += 1;
    let Some(state) = conns.get_mut(&sub.conn) else {
        return;
    };
    match state.lost.iter_mut().find(|l| l.stream == sub.stream) {
        Some(lost) => {
            lost.count += 1;
            lost.first_start = lost.first_start.min(item);
            lost.last_start = lost.last_start.max(item);
        }
        None => state.lost.push(LostCandles {
            stream: sub.stream,
            series: series.clone(),
            count: 1,
            first_start: item,
            last_start: item,
        }),
    }
}

fn validate_symbol(symbol: &str) -> Result<(), ProtocolError> {
    let ok = (1..=64).contains(&symbol.len())
        && symbol
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::InvalidField,
            "field `symbol` must be 1-64 characters of letters, digits and `- _ / . :`",
        ))
    }
}

fn alert_message(
    conn: ConnId,
    alert: &Alert,
    firing: &Firing,
    extra: Option<Value>,
) -> AlertMessage {
    // The alert's own description, with its threshold renamed so that
    // `value` can carry what triggered it.
    let mut message = Map::new();
    message.insert("type".into(), json!("alert"));
    if let Value::Object(description) = alert.describe() {
        for (key, value) in description {
            let key = if key == "value" {
                "threshold".to_owned()
            } else {
                key
            };
            message.insert(key, value);
        }
    }
    message.insert("value".into(), json!(firing.value.normalize().to_string()));
    let previous = firing
        .previous
        .map_or(Value::Null, |p| json!(p.normalize().to_string()));
    message.insert("previous".into(), previous);
    message.insert("ts".into(), json!(firing.ts_ms));
    if let Some(Value::Object(extra)) = extra {
        message.extend(extra);
    }
    AlertMessage {
        conn,
        message: Value::Object(message),
    }
}

#[cfg(test)]
mod slow_subscriber_tests;
