//! The market's side of slow subscribers: candles go out as states keyed
//! by subscription and open time (the server holds the latest of each
//! while the queue is full), what the server gives up is told to the
//! client, and the end of a replay is the last state of every K-line
//! subscription. The recording outbox holds states the way the server
//! does (`server::pending_states` has the server's own tests).

use std::time::Instant;

use serde_json::{json, Map, Value};

use super::*;
use crate::app::tests::{frame_text, RecordingOutbox};

const BTC: &str = "BTC-USD";

fn market() -> Market {
    let config = Config {
        no_sim: true,
        kline_default_symbol: BTC.to_owned(),
        ..Config::default()
    };
    Market::new(&config, Instant::now()).unwrap()
}

fn subscribe(market: &mut Market, conn: ConnId, interval: &str, out: &mut RecordingOutbox) {
    let request = KlineRequest {
        symbol: BTC.to_owned(),
        interval: interval.to_owned(),
        throttle_ms: 0,
        history: None,
    };
    market
        .kline_subscribe(conn, &request, out, |_| "ack".to_owned())
        .unwrap();
}

fn event(value: Value) -> Map<String, Value> {
    let Value::Object(map) = value else {
        panic!("not an object: {value}")
    };
    map
}

fn trade(market: &mut Market, price: &str, ts: i64, out: &mut RecordingOutbox) {
    let e = event(json!({"type":"trade","symbol":BTC,"price":price,"qty":"1","ts":ts}));
    let text = Value::Object(e.clone()).to_string();
    market.on_event(&e, &text, Instant::now(), out);
}

/// What `conn` was delivered, parsed.
fn delivered(out: &RecordingOutbox, conn: ConnId) -> Vec<Value> {
    out.delivered
        .iter()
        .filter(|(c, _)| *c == conn)
        .map(|(_, f)| serde_json::from_str(&frame_text(f)).unwrap())
        .collect()
}

/// `(start, closed, close)` of each candle message.
fn candles(messages: &[Value]) -> Vec<(i64, bool, String)> {
    messages
        .iter()
        .filter(|m| m["type"] == "kline")
        .map(|m| {
            let close = m["close"].as_str().unwrap().to_owned();
            (m["start"].as_i64().unwrap(), m["closed"] == true, close)
        })
        .collect()
}

#[test]
fn a_full_queue_gets_every_closed_candle_and_the_latest_open_state() {
    let mut market = market();
    let mut out = RecordingOutbox {
        max_held: 100,
        ..Default::default()
    };
    subscribe(&mut market, 1, "1m", &mut out);
    subscribe(&mut market, 2, "1m", &mut out);
    trade(&mut market, "10", 0, &mut out);
    out.full.insert(1);
    // Three updates of the first candle, its close, two candles more.
    for (price, ts) in [("11", 1_000), ("12", 2_000), ("13", 60_000), ("14", 61_000)] {
        trade(&mut market, price, ts, &mut out);
    }
    trade(&mut market, "15", 120_000, &mut out);
    trade(&mut market, "16", 121_000, &mut out);
    assert!(
        delivered(&out, 1).len() == 1,
        "nothing more went out while full"
    );
    out.release(1);
    // In order: candle 0's final state (its updates conflated), candle 1
    // closed with its last price, candle 2 open at its latest.
    assert_eq!(
        candles(&delivered(&out, 1)),
        [
            (0, false, "10".to_owned()),
            (0, true, "12".to_owned()),
            (60_000, true, "14".to_owned()),
            (120_000, false, "16".to_owned()),
        ]
    );
    // The subscriber that kept up saw every update; nothing was dropped.
    assert_eq!(candles(&delivered(&out, 2)).len(), 9);
    assert_eq!(market.stats.dropped_updates, 0);
    market.on_drained(1, &mut out);
    assert!(
        out.replies.iter().all(|(_, r)| r == "ack"),
        "{:?}",
        out.replies
    );
}

#[test]
fn candles_given_up_past_the_bound_are_told_with_their_open_times() {
    let mut market = market();
    let mut out = RecordingOutbox {
        max_held: 2,
        ..Default::default()
    };
    subscribe(&mut market, 1, "1s", &mut out);
    out.full.insert(1);
    for second in 0..6 {
        trade(&mut market, "5", second * 1_000, &mut out);
    }
    out.release(1);
    // Held at most two: candle 4 (closed) and 5 (open); 0 to 3 given up.
    assert_eq!(
        candles(&delivered(&out, 1)),
        [
            (4_000, true, "5".to_owned()),
            (5_000, false, "5".to_owned())
        ]
    );
    assert_eq!(market.stats.dropped_updates, 4);
    market.on_drained(1, &mut out);
    let notices: Vec<Value> = out
        .replies
        .iter()
        .filter(|(c, r)| *c == 1 && r != "ack")
        .map(|(_, r)| serde_json::from_str(r).unwrap())
        .collect();
    assert_eq!(notices.len(), 1, "{notices:?}");
    let notice = &notices[0];
    assert_eq!(notice["type"], "dropped");
    assert_eq!(notice["stream"], "kline");
    assert_eq!(notice["symbol"], BTC);
    assert_eq!(notice["interval"], "1s");
    assert_eq!(notice["count"], 4);
    assert_eq!(notice["first_start"], 0);
    assert_eq!(notice["last_start"], 3_000);
    // Told once.
    market.on_drained(1, &mut out);
    assert_eq!(out.replies.len(), 2);
}

#[test]
fn unsubscribing_forgets_what_is_held_and_owed() {
    let mut market = market();
    let mut out = RecordingOutbox {
        max_held: 1,
        ..Default::default()
    };
    subscribe(&mut market, 1, "1s", &mut out);
    subscribe(&mut market, 1, "1m", &mut out);
    out.full.insert(1);
    for second in 0..3 {
        trade(&mut market, "5", second * 1_000, &mut out);
    }
    market.kline_unsubscribe(1, BTC, "1s", &mut out).unwrap();
    out.release(1);
    // Only the 1m candle's latest state is left; no notice for 1s.
    assert_eq!(candles(&delivered(&out, 1)), [(0, false, "5".to_owned())]);
    assert!(delivered(&out, 1).iter().all(|m| m["interval"] == "1m"));
    market.on_drained(1, &mut out);
    assert!(
        out.replies.iter().all(|(_, r)| r == "ack"),
        "{:?}",
        out.replies
    );
}

#[test]
fn the_end_of_a_replay_follows_every_candle_of_each_subscription() {
    let mut market = market();
    let mut out = RecordingOutbox {
        max_held: 10,
        ..Default::default()
    };
    subscribe(&mut market, 1, "1s", &mut out);
    subscribe(&mut market, 1, "1m", &mut out);
    subscribe(&mut market, 2, "1m", &mut out);
    market.kline_text_subscribe(3, "1m", &mut out);
    out.full.insert(1);
    trade(&mut market, "5", 0, &mut out);
    trade(&mut market, "6", 1_500, &mut out);
    let end = event(json!({"type":"replay_end","events":2,"ts":1_500}));
    let text = Value::Object(end.clone()).to_string();
    market.on_event(&end, &text, Instant::now(), &mut out);
    out.release(1);
    let got = delivered(&out, 1);
    for interval in ["1s", "1m"] {
        let series: Vec<&Value> = got.iter().filter(|m| m["interval"] == interval).collect();
        let last = series.last().unwrap();
        assert_eq!(last["type"], "replay_end", "{interval}: {series:?}");
        assert_eq!(last["symbol"], BTC);
        assert_eq!(last["events"], 2);
        assert_eq!(last["ts"], 1_500);
        assert_eq!(
            series.iter().filter(|m| m["type"] == "replay_end").count(),
            1
        );
    }
    // The 1s series: candle 0 closed, candle 1 open, then the end.
    let one_second: Vec<&Value> = got.iter().filter(|m| m["interval"] == "1s").collect();
    assert_eq!(one_second.len(), 3, "{one_second:?}");
    assert_eq!(delivered(&out, 2).last().unwrap()["type"], "replay_end");
    // The plain-text protocol has no such message: its candles only.
    let text = delivered(&out, 3);
    assert_eq!(text.len(), 2, "{text:?}");
    assert!(text.iter().all(|m| m.get("type").is_none()), "{text:?}");
}

#[test]
fn a_finished_replay_publishes_its_end_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.ndjson");
    std::fs::write(
        &path,
        "{\"type\":\"trade\",\"symbol\":\"X\",\"price\":\"1\",\"ts\":10}\n\
         {\"type\":\"trade\",\"symbol\":\"X\",\"price\":\"2\",\"ts\":20}\n",
    )
    .unwrap();
    let start = Instant::now();
    let config = Config {
        no_sim: true,
        replay: Some(path),
        replay_speed: 1000.0,
        ..Config::default()
    };
    let mut market = Market::new(&config, start).unwrap();
    assert_eq!(market.replay_progress(), Some((false, 0)));
    let events = market.poll_feeds(start + std::time::Duration::from_secs(1));
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["trade", "trade", "replay_end"]);
    assert_eq!(events[2]["events"], 2);
    assert_eq!(events[2]["ts"], 20);
    assert_eq!(market.replay_progress(), Some((true, 2)));
    assert!(market
        .poll_feeds(start + std::time::Duration::from_secs(2))
        .is_empty());
    assert_eq!(market.next_deadline(), None);
    assert_eq!(self::market().replay_progress(), None);
}

#[test]
fn k_line_subscriptions_per_connection_are_bounded() {
    let config = Config {
        no_sim: true,
        max_subscriptions: 2,
        ..Config::default()
    };
    let mut market = Market::new(&config, Instant::now()).unwrap();
    let mut out = RecordingOutbox::default();
    let request = |symbol: &str| KlineRequest {
        symbol: symbol.to_owned(),
        interval: "1m".to_owned(),
        throttle_ms: 0,
        history: None,
    };
    for symbol in ["A", "B"] {
        market
            .kline_subscribe(1, &request(symbol), &mut out, |_| "ack".to_owned())
            .unwrap();
    }
    let refused = market
        .kline_subscribe(1, &request("C"), &mut out, |_| "ack".to_owned())
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::LimitReached);
    assert_eq!(
        refused.message,
        "at most 2 K-line subscriptions per connection"
    );
    // Another connection has its own; the text protocol's one is aside.
    market
        .kline_subscribe(2, &request("C"), &mut out, |_| "ack".to_owned())
        .unwrap();
    market.kline_text_subscribe(1, "1m", &mut out);
    assert!(
        out.replies.iter().all(|(_, r)| r == "ack"),
        "{:?}",
        out.replies
    );
    // Unsubscribing makes room.
    market.kline_unsubscribe(1, "A", "1m", &mut out).unwrap();
    market
        .kline_subscribe(1, &request("C"), &mut out, |_| "ack".to_owned())
        .unwrap();
}
