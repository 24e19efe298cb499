//! Market data over real loopback sockets: K-line subscriptions (history,
//! the open candle, updates, closing, out-of-order and late trades,
//! throttling, errors), the old K-line service's plain-text commands on
//! `/kline` and `/ws`, dynamic filters, alerts (and the `alerts` channel),
//! and the simulated feed. Trades are published by a trusted client on the
//! internal listener with explicit event times, so every candle is known
//! in advance; the simulator is off except in the test that is about it.

use crate::support::{common, json_client};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use common::*;
use json_client::*;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tungstenite::Message;

/// How long "nothing arrives" is watched for, where a fence is impossible.
const QUIET: Duration = Duration::from_millis(300);

/// A time aligned to the hour (so to every interval up to 1h) in UTC.
const T0: i64 = 1_700_002_800_000;
const SEC: i64 = 1_000;
const MIN: i64 = 60_000;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

impl JsonClient {
    /// A `/kline` client (no welcome there).
    fn kline(addr: SocketAddr) -> JsonClient {
        JsonClient::connect_path(addr, "/kline")
    }

    /// Publishes one event to `events` and waits for the ack. Everything
    /// the event caused for other clients was queued before that ack.
    fn publish(&mut self, data: Value) {
        let reply = self.request(json!({"type":"publish","channel":"events","data":data}));
        assert_ack(&reply, "publish");
    }
}

impl Servers {
    fn publisher(&self) -> JsonClient {
        JsonClient::ws(self.internal)
    }

    fn client(&self) -> JsonClient {
        JsonClient::ws(self.public)
    }
}

fn trade(symbol: &str, price: &str, qty: &str, ts: i64) -> Value {
    json!({"type":"trade","symbol":symbol,"price":price,"qty":qty,"ts":ts})
}

fn interval_ms(interval: &str) -> i64 {
    let (count, unit) = interval.split_at(interval.len() - 1);
    let unit = match unit {
        "s" => SEC,
        "m" => MIN,
        "h" => 60 * MIN,
        "d" => 24 * 60 * MIN,
        _ => panic!("interval {interval}"),
    };
    count.parse::<i64>().unwrap() * unit
}

/// The exact `kline` message for a candle: `ohlc` is open, high, low, close.
fn candle(
    symbol: &str,
    interval: &str,
    start: i64,
    ohlc: [&str; 4],
    volume: &str,
    trades: u64,
    closed: bool,
) -> Value {
    json!({
        "type": "kline",
        "symbol": symbol,
        "interval": interval,
        "start": start,
        "end": start + interval_ms(interval),
        "open": ohlc[0],
        "high": ohlc[1],
        "low": ohlc[2],
        "close": ohlc[3],
        "volume": volume,
        "trades": trades,
        "closed": closed,
    })
}

/// Checks a message field by field, with no other field in it.
fn assert_exact(got: &Value, want: &Value) {
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"))
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(keys(got), keys(want), "fields of {got}");
    assert_eq!(got, want);
}

fn dec(value: &Value) -> Decimal {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a decimal string: {value}"));
    Decimal::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

// ---------------------------------------------------------------------------
// K-lines
// ---------------------------------------------------------------------------

#[test]
fn subscribe_sends_ack_history_open_candle_then_updates() {
    let s = Servers::start(&["--kline-intervals", "1m,5m"]);
    let mut publisher = s.publisher();
    // Five closed 1m candles (with a gap: 03:00 has no trades) and an open one.
    let trades = [
        ("100", "1", 0),
        ("101", "2", 10 * SEC),
        ("99", "1", MIN + 5 * SEC),
        ("102", "0.5", 2 * MIN),
        ("98.5", "0.25", 2 * MIN + 59_999),
        ("97", "1", 4 * MIN + 1),
        ("96", "1", 5 * MIN),
        ("96.5", "3", 6 * MIN + 30 * SEC),
    ];
    for (price, qty, at) in trades {
        publisher.publish(trade("BTC-USD", price, qty, T0 + at));
    }
    let closed_1m = [
        candle(
            "BTC-USD",
            "1m",
            T0,
            ["100", "101", "100", "101"],
            "3",
            2,
            true,
        ),
        candle(
            "BTC-USD",
            "1m",
            T0 + MIN,
            ["99", "99", "99", "99"],
            "1",
            1,
            true,
        ),
        candle(
            "BTC-USD",
            "1m",
            T0 + 2 * MIN,
            ["102", "102", "98.5", "98.5"],
            "0.75",
            2,
            true,
        ),
        candle(
            "BTC-USD",
            "1m",
            T0 + 4 * MIN,
            ["97", "97", "97", "97"],
            "1",
            1,
            true,
        ),
        candle(
            "BTC-USD",
            "1m",
            T0 + 5 * MIN,
            ["96", "96", "96", "96"],
            "1",
            1,
            true,
        ),
    ];
    let open_1m = candle(
        "BTC-USD",
        "1m",
        T0 + 6 * MIN,
        ["96.5", "96.5", "96.5", "96.5"],
        "3",
        1,
        false,
    );

    // Everything kept.
    let mut all = s.client();
    let ack = all.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1m","id":7}));
    assert_eq!(ack["id"], 7, "{ack}");
    assert_eq!(ack["symbol"], "BTC-USD", "{ack}");
    assert_eq!(ack["interval"], "1m", "{ack}");
    assert_eq!(ack["history"], 5, "{ack}");
    assert_eq!(ack["throttle_ms"], 0, "{ack}");
    for want in &closed_1m {
        assert_exact(&all.recv(), want);
    }
    assert_exact(&all.recv(), &open_1m);

    // `history` honoured: the most recent two, oldest first.
    let mut two = s.client();
    let ack =
        two.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1m","history":2}));
    assert_eq!(ack["history"], 2, "{ack}");
    assert_exact(&two.recv(), &closed_1m[3]);
    assert_exact(&two.recv(), &closed_1m[4]);
    assert_exact(&two.recv(), &open_1m);

    // history 0: just the open candle.
    let mut none = s.client();
    let ack =
        none.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"5m","history":0}));
    assert_eq!(ack["history"], 0, "{ack}");
    assert_exact(
        &none.recv(),
        &candle(
            "BTC-USD",
            "5m",
            T0 + 5 * MIN,
            ["96", "96.5", "96", "96.5"],
            "4",
            2,
            false,
        ),
    );

    // An unknown symbol can be subscribed to before its first trade: no
    // history, no candle, then its first candle as it opens.
    let mut early = s.client();
    let ack = early.ok(json!({"type":"kline.subscribe","symbol":"NEW-COIN","interval":"1m"}));
    assert_eq!(ack["history"], 0, "{ack}");
    assert!(early.until_fence().is_empty());

    // Updates: every trade in the open candle, to every subscriber.
    publisher.publish(trade("BTC-USD", "97.25", "0.1", T0 + 6 * MIN + 40 * SEC));
    let updated = candle(
        "BTC-USD",
        "1m",
        T0 + 6 * MIN,
        ["96.5", "97.25", "96.5", "97.25"],
        "3.1",
        2,
        false,
    );
    assert_exact(&all.recv(), &updated);
    assert_exact(&two.recv(), &updated);
    assert_exact(
        &none.recv(),
        &candle(
            "BTC-USD",
            "5m",
            T0 + 5 * MIN,
            ["96", "97.25", "96", "97.25"],
            "4.1",
            3,
            false,
        ),
    );
    publisher.publish(trade("NEW-COIN", "0.5", "10", T0 + 3 * SEC));
    assert_exact(
        &early.recv(),
        &candle(
            "NEW-COIN",
            "1m",
            T0,
            ["0.5", "0.5", "0.5", "0.5"],
            "10",
            1,
            false,
        ),
    );
    for client in [&mut all, &mut two, &mut none, &mut early] {
        assert!(client.until_fence().is_empty());
    }
}

#[test]
fn later_bucket_closes_out_of_order_applies_late_changes_nothing() {
    let s = Servers::start(&["--kline-intervals", "1m"]);
    let mut publisher = s.publisher();
    let mut sub = s.client();
    sub.ok(json!({"type":"kline.subscribe","symbol":"ETH-USD","interval":"1m"}));
    let c = |start, ohlc, volume, trades, closed| {
        candle("ETH-USD", "1m", start, ohlc, volume, trades, closed)
    };

    publisher.publish(trade("ETH-USD", "2500", "1", T0 + 30 * SEC));
    assert_exact(
        &sub.recv(),
        &c(T0, ["2500", "2500", "2500", "2500"], "1", 1, false),
    );
    // Earlier than the open's trade: becomes the open; not the close.
    publisher.publish(trade("ETH-USD", "2490", "2", T0 + 10 * SEC));
    assert_exact(
        &sub.recv(),
        &c(T0, ["2490", "2500", "2490", "2500"], "3", 2, false),
    );
    // Same time as the close's trade: the later arrival is the close.
    publisher.publish(trade("ETH-USD", "2510", "0.5", T0 + 30 * SEC));
    assert_exact(
        &sub.recv(),
        &c(T0, ["2490", "2510", "2490", "2510"], "3.5", 3, false),
    );
    // Same time as the open's trade: the first arrival stays the open.
    publisher.publish(trade("ETH-USD", "2480", "0.5", T0 + 10 * SEC));
    assert_exact(
        &sub.recv(),
        &c(T0, ["2490", "2510", "2480", "2510"], "4", 4, false),
    );
    // Between open and close in time: only high/low/volume/trades move.
    publisher.publish(trade("ETH-USD", "2520", "1", T0 + 20 * SEC));
    let last_state = c(T0, ["2490", "2520", "2480", "2510"], "5", 5, false);
    assert_exact(&sub.recv(), &last_state);

    // A later bucket (with an empty minute between): the closed candle with
    // its final state, then the new open one.
    publisher.publish(trade("ETH-USD", "2530", "1", T0 + 2 * MIN + 1));
    let mut closed = last_state.clone();
    closed["closed"] = json!(true);
    assert_exact(&sub.recv(), &closed);
    assert_exact(
        &sub.recv(),
        &c(
            T0 + 2 * MIN,
            ["2530", "2530", "2530", "2530"],
            "1",
            1,
            false,
        ),
    );

    // Late: for the closed candle, and for the empty minute before the open
    // one. Nothing is sent, nothing changes.
    publisher.publish(trade("ETH-USD", "1", "100", T0 + 59_999));
    publisher.publish(trade("ETH-USD", "9999", "100", T0 + MIN + 30 * SEC));
    publisher.publish(trade("ETH-USD", "9999", "100", T0 + 2 * MIN - 1));
    // The next update shows none of them.
    publisher.publish(trade("ETH-USD", "2529", "2", T0 + 2 * MIN + 5));
    assert_exact(
        &sub.recv(),
        &c(
            T0 + 2 * MIN,
            ["2530", "2530", "2529", "2529"],
            "3",
            2,
            false,
        ),
    );
    // And a new subscriber's history has the closed candle unchanged, and
    // no candle for the empty minute.
    let mut later = s.client();
    let ack = later.ok(json!({"type":"kline.subscribe","symbol":"ETH-USD","interval":"1m"}));
    assert_eq!(ack["history"], 1, "{ack}");
    assert_exact(&later.recv(), &closed);
    assert_exact(
        &later.recv(),
        &c(
            T0 + 2 * MIN,
            ["2530", "2530", "2529", "2529"],
            "3",
            2,
            false,
        ),
    );
    assert!(sub.until_fence().is_empty());
    assert!(later.until_fence().is_empty());
}

#[test]
fn decimals_are_exact_in_every_field() {
    let s = Servers::start(&["--kline-intervals", "1h"]);
    let mut publisher = s.publisher();
    let mut sub = s.client();
    sub.ok(json!({"type":"kline.subscribe","symbol":"X","interval":"1h"}));
    // Binary floats would turn 0.1 + 0.2 into 0.30000000000000004.
    publisher.publish(trade("X", "0.1", "0.1", T0));
    publisher.publish(trade("X", "0.2", "0.2", T0 + 1));
    let got = sub.until_fence();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_exact(
        &got[1],
        &candle("X", "1h", T0, ["0.1", "0.2", "0.1", "0.2"], "0.3", 2, false),
    );
    // Trailing zeros are dropped, exponents written out, numbers taken
    // exactly as written (arbitrary precision, not through f64).
    publisher
        .publish(json!({"type":"trade","symbol":"X","price":"45000.10","qty":"1.000","ts":T0 + 2}));
    publisher.publish(json!({"type":"trade","symbol":"X","price":1e-7,"qty":"1e3","ts":T0 + 3}));
    publisher.publish(json!({"type":"trade","symbol":"X","price":"123456789012345678.123456789","qty":0.000000001,"ts":T0 + 4}));
    publisher.publish(
        json!({"type":"tick","symbol":"X","price":"0.000000000000000001","qty":"500","ts":T0 + 5}),
    );
    // A trade without qty takes its amount.
    publisher
        .publish(json!({"type":"trade","symbol":"X","price":"100.0","amount":"2.5","ts":T0 + 6}));
    let got = sub.until_fence();
    assert_eq!(got.len(), 5, "{got:?}");
    assert_exact(
        &got[0],
        &candle(
            "X",
            "1h",
            T0,
            ["0.1", "45000.1", "0.1", "45000.1"],
            "1.3",
            3,
            false,
        ),
    );
    assert_exact(
        &got[1],
        &candle(
            "X",
            "1h",
            T0,
            ["0.1", "45000.1", "0.0000001", "0.0000001"],
            "1001.3",
            4,
            false,
        ),
    );
    assert_exact(
        &got[2],
        &candle(
            "X",
            "1h",
            T0,
            [
                "0.1",
                "123456789012345678.123456789",
                "0.0000001",
                "123456789012345678.123456789",
            ],
            "1001.300000001",
            5,
            false,
        ),
    );
    // A tick moves prices and counts, never the volume.
    assert_exact(
        &got[3],
        &candle(
            "X",
            "1h",
            T0,
            [
                "0.1",
                "123456789012345678.123456789",
                "0.000000000000000001",
                "0.000000000000000001",
            ],
            "1001.300000001",
            6,
            false,
        ),
    );
    assert_exact(
        &got[4],
        &candle(
            "X",
            "1h",
            T0,
            [
                "0.1",
                "123456789012345678.123456789",
                "0.000000000000000001",
                "100",
            ],
            "1003.800000001",
            7,
            false,
        ),
    );
}

#[test]
fn throttle_limits_open_candle_updates_but_not_closes() {
    let s = Servers::start(&["--kline-intervals", "1m"]);
    let mut publisher = s.publisher();
    let mut throttled = s.client();
    let ack = throttled
        .ok(json!({"type":"kline.subscribe","symbol":"SOL-USD","interval":"1m","throttle_ms":300}));
    assert_eq!(ack["throttle_ms"], 300, "{ack}");
    let mut every = s.client();
    every.ok(json!({"type":"kline.subscribe","symbol":"SOL-USD","interval":"1m"}));

    // 30 trades over about 0.9 s, all in one candle.
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match throttled.next(Duration::from_millis(100)) {
                Ok(message) => {
                    let done = message["trades"] == 30;
                    got.push((Instant::now(), message));
                    if done {
                        break;
                    }
                }
                Err(Ended::TimedOut) => {}
                Err(e) => panic!("throttled subscriber: {e:?}"),
            }
        }
        (throttled, got)
    });
    let started = Instant::now();
    for i in 0..30 {
        let price = format!("150.{i:02}");
        publisher.publish(trade("SOL-USD", &price, "1", T0 + i));
        std::thread::sleep(Duration::from_millis(30));
    }
    let published = Instant::now();
    let (mut throttled, got) = reader.join().unwrap();
    // The unthrottled one got all 30.
    let all = every.until_fence();
    assert_eq!(all.len(), 30, "{all:?}");
    assert_eq!(all[29]["trades"], 30);

    let updates: Vec<&(Instant, Value)> = got.iter().collect();
    assert!(!updates.is_empty());
    let times: Vec<u128> = updates
        .iter()
        .map(|(at, m)| {
            assert_eq!(m["closed"], false, "{m}");
            at.duration_since(started).as_millis()
        })
        .collect();
    let elapsed = published.duration_since(started).as_millis();
    // At most one per 300 ms window (with some slack for delivery jitter),
    // and far fewer than 30.
    for pair in updates.windows(2) {
        let gap = pair[1].0.duration_since(pair[0].0);
        assert!(
            gap >= Duration::from_millis(200),
            "updates {gap:?} apart: times {times:?} ms"
        );
    }
    let max = elapsed / 300 + 2;
    assert!(
        updates.len() as u128 <= max,
        "{} updates in {elapsed} ms (at most {max}): {times:?}",
        updates.len()
    );
    // The latest state arrived after the window: all 30 trades.
    let last = &updates.last().unwrap().1;
    assert_eq!(last, &all[29], "the throttled subscriber's last state");

    // A closing candle is never held back, even within a window; the new
    // open candle then waits for the window.
    let mut slow = s.client();
    slow.ok(json!({"type":"kline.subscribe","symbol":"SLOW","interval":"1m","throttle_ms":1500}));
    let t = Instant::now();
    publisher.publish(trade("SLOW", "1", "1", T0));
    assert_eq!(slow.recv()["trades"], 1);
    publisher.publish(trade("SLOW", "2", "1", T0 + 1)); // held
    publisher.publish(trade("SLOW", "3", "1", T0 + MIN)); // closes
    let closed = slow.recv();
    let closed_after = t.elapsed();
    assert_exact(
        &closed,
        &candle("SLOW", "1m", T0, ["1", "2", "1", "2"], "2", 2, true),
    );
    assert!(
        closed_after < Duration::from_millis(1000),
        "the closed candle waited {closed_after:?}"
    );
    let open = slow.recv();
    let open_after = t.elapsed();
    assert_exact(
        &open,
        &candle("SLOW", "1m", T0 + MIN, ["3", "3", "3", "3"], "1", 1, false),
    );
    assert!(
        open_after >= Duration::from_millis(1300),
        "the held open candle came {open_after:?} after the first update"
    );
    throttled.expect_nothing(QUIET);
    assert!(slow.until_fence().is_empty());
}

#[test]
fn unsubscribe_stops_updates() {
    let s = Servers::start(&["--kline-intervals", "1m,5m"]);
    let mut publisher = s.publisher();
    let mut sub = s.client();
    sub.ok(json!({"type":"kline.subscribe","symbol":"A","interval":"1m"}));
    sub.ok(json!({"type":"kline.subscribe","symbol":"A","interval":"5m"}));
    publisher.publish(trade("A", "1", "1", T0));
    let got = sub.until_fence();
    assert_eq!(got.len(), 2, "{got:?}");
    let ack = sub.ok(json!({"type":"kline.unsubscribe","symbol":"A","interval":"1m","id":"u"}));
    assert_eq!(ack["id"], "u");
    assert_eq!(ack["symbol"], "A");
    assert_eq!(ack["interval"], "1m");
    publisher.publish(trade("A", "2", "1", T0 + 1));
    publisher.publish(trade("A", "3", "1", T0 + MIN));
    let got = sub.until_fence();
    let intervals: Vec<&Value> = got.iter().map(|m| &m["interval"]).collect();
    assert_eq!(intervals, [&json!("5m"), &json!("5m")], "{got:?}");
    // Unsubscribing again: nothing to stop.
    sub.fails(
        json!({"type":"kline.unsubscribe","symbol":"A","interval":"1m"}),
        "not_found",
    );
    // And subscribing again works, with the history.
    let ack = sub.ok(json!({"type":"kline.subscribe","symbol":"A","interval":"1m"}));
    assert_eq!(ack["history"], 1);
    assert_eq!(sub.until_fence().len(), 2);
}

#[test]
fn kline_errors() {
    let s = Servers::start(&["--kline-intervals", "1s,1m,5m"]);
    let mut c = s.client();
    let message = c.fails(
        json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"7m","id":1}),
        "invalid_field",
    );
    assert!(message.contains("7m"), "{message}");
    assert!(
        message.contains("1s") && message.contains("1m") && message.contains("5m"),
        "names the configured intervals: {message}"
    );
    let message = c.fails(
        json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1h"}),
        "invalid_field",
    );
    assert!(message.contains("1h"), "{message}");
    let long = "X".repeat(65);
    for symbol in ["", "BTC USD", "BTC\"USD", long.as_str()] {
        let message = c.fails(
            json!({"type":"kline.subscribe","symbol":symbol,"interval":"1m"}),
            "invalid_field",
        );
        assert!(message.contains("symbol"), "{message}");
    }
    c.fails(
        json!({"type":"kline.subscribe","interval":"1m"}),
        "missing_field",
    );
    c.fails(
        json!({"type":"kline.subscribe","symbol":"A","interval":"1m","throttle_ms":-1}),
        "invalid_field",
    );
    c.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1m"}));
    let message = c.fails(
        json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1m"}),
        "conflict",
    );
    assert!(message.contains("BTC-USD"), "{message}");
    // Another interval of the same symbol is another subscription.
    c.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"5m"}));
    let message = c.fails(
        json!({"type":"kline.unsubscribe","symbol":"ETH-USD","interval":"1m"}),
        "not_found",
    );
    assert!(message.contains("ETH-USD"), "{message}");
    c.fails(
        json!({"type":"kline.unsubscribe","symbol":"BTC-USD","interval":"1s"}),
        "not_found",
    );
    c.fails(
        json!({"type":"kline.unsubscribe","symbol":"BTC-USD","interval":"2m"}),
        "invalid_field",
    );
}

#[test]
fn market_symbols_lists_symbols_intervals_and_default() {
    let s = Servers::start(&[
        "--kline-intervals",
        "1m,1s,1h",
        "--kline-default-symbol",
        "DEF-SOL",
    ]);
    let mut c = s.client();
    let ack = c.ok(json!({"type":"market.symbols","id":3}));
    assert_eq!(ack["id"], 3);
    // The default symbol is listed before any trade (and the simulator's
    // symbols would be, it is off here).
    assert_eq!(ack["symbols"], json!(["DEF-SOL"]), "{ack}");
    assert_eq!(ack["default_symbol"], "DEF-SOL", "{ack}");
    let intervals: BTreeSet<&str> = ack["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(intervals, BTreeSet::from(["1s", "1m", "1h"]), "{ack}");
    let mut publisher = s.publisher();
    publisher.publish(trade("ZED", "1", "1", T0));
    publisher.publish(trade("ALPHA", "1", "1", T0));
    publisher.publish(json!({"type":"tick","symbol":"MID","price":"2","ts":T0}));
    // Not market data: no symbol, a payment, a trade without a price.
    publisher.publish(json!({"type":"payment","symbol":"PAY","amount":"5","ts":T0}));
    publisher.publish(json!({"type":"trade","symbol":"NOPRICE","qty":"1","ts":T0}));
    // Bad market data: not counted as a symbol.
    publisher.publish(json!({"type":"trade","symbol":"NEG","price":"-1","ts":T0}));
    let ack = c.ok(json!({"type":"market.symbols"}));
    assert_eq!(
        ack["symbols"],
        json!(["ALPHA", "DEF-SOL", "MID", "ZED"]),
        "{ack}"
    );
}

// ---------------------------------------------------------------------------
// The K-line service's plain-text commands
// ---------------------------------------------------------------------------

/// The legacy message, text for text.
fn legacy(open: &str, high: &str, low: &str, close: &str, start_ms: i64, window: u64) -> String {
    format!(
        r#"{{"open":{open},"high":{high},"low":{low},"close":{close},"unix_timestamp":{},"time_window_seconds":{window}}}"#,
        start_ms / 1000
    )
}

#[test]
fn legacy_commands_on_the_kline_endpoint() {
    let s = Servers::start(&[
        "--kline-intervals",
        "1s,1m,5m,1h",
        "--kline-default-symbol",
        "PUMP-TEST",
    ]);
    let mut publisher = s.publisher();
    // An open candle exists before the subscription: sent right away.
    publisher.publish(trade("PUMP-TEST", "0.001", "10", T0 + 5 * SEC));
    let mut k = JsonClient::kline(s.public);
    k.send_text("sub-1m");
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "0.001", "0.001", "0.001", T0, 60)
    );
    // Updates of the default symbol only, in the exact old shape.
    publisher.publish(trade("OTHER", "5", "1", T0 + 6 * SEC));
    publisher.publish(trade(
        "PUMP-TEST",
        "0.0010010979158340965",
        "3",
        T0 + 7 * SEC,
    ));
    assert_eq!(
        k.recv_text(),
        legacy(
            "0.001",
            "0.0010010979158340965",
            "0.001",
            "0.0010010979158340965",
            T0,
            60
        )
    );
    publisher.publish(trade("PUMP-TEST", "45000", "1", T0 + 8 * SEC));
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "45000.0", "0.001", "45000.0", T0, 60)
    );
    // The next minute: the closed candle, then the new one.
    publisher.publish(trade("PUMP-TEST", "45000.5", "1", T0 + MIN + 1));
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "45000.0", "0.001", "45000.0", T0, 60)
    );
    assert_eq!(
        k.recv_text(),
        legacy("45000.5", "45000.5", "45000.5", "45000.5", T0 + MIN, 60)
    );

    // sub-5m replaces the subscription (and sends the open 5m candle).
    k.send_text("sub-5m\n");
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "45000.5", "0.001", "45000.5", T0, 300)
    );
    publisher.publish(trade("PUMP-TEST", "44999.75", "1", T0 + MIN + 2));
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "45000.5", "0.001", "44999.75", T0, 300)
    );
    // (nothing for 1m any more: the error below is the very next message)
    k.send_text("sub-7m");
    let error: Value = serde_json::from_str(&k.recv_text()).unwrap();
    let message = error_message(&error, "invalid_field", "for sub-7m");
    assert!(message.contains("7m"), "{message}");
    // The failed command left the 5m subscription in place.
    publisher.publish(trade("PUMP-TEST", "44999", "1", T0 + MIN + 3));
    assert_eq!(
        k.recv_text(),
        legacy("0.001", "45000.5", "0.001", "44999.0", T0, 300)
    );

    // unsub stops everything.
    k.send_text("unsub");
    publisher.publish(trade("PUMP-TEST", "44998", "1", T0 + MIN + 4));
    k.send_text("hello there");
    let error: Value = serde_json::from_str(&k.recv_text()).unwrap();
    let message = error_message(&error, "unknown_type", "for garbage");
    assert!(message.contains("sub-1m"), "{message}");
    k.send_text(r#"{"type":"kline.subscribe","symbol":"PUMP-TEST","interval":"1m"}"#);
    let error: Value = serde_json::from_str(&k.recv_text()).unwrap();
    error_message(&error, "unknown_type", "for JSON on /kline");
    k.ws.send(Message::Binary(b"sub-1m".to_vec())).unwrap();
    let error: Value = serde_json::from_str(&k.recv_text()).unwrap();
    error_message(&error, "bad_request", "for a binary message");

    // Another client, other intervals.
    let mut k2 = JsonClient::kline(s.public);
    k2.send_text("sub-1h");
    assert_eq!(
        k2.recv_text(),
        legacy("0.001", "45000.5", "0.001", "44998.0", T0, 3600)
    );
    k2.send_text("sub-1s");
    let second = legacy("45000.5", "45000.5", "44998.0", "44998.0", T0 + MIN, 1);
    assert_eq!(k2.recv_text(), second);
    publisher.publish(trade("PUMP-TEST", "2", "1", T0 + 2 * MIN));
    assert_eq!(k2.recv_text(), second, "closed");
    assert_eq!(
        k2.recv_text(),
        legacy("2.0", "2.0", "2.0", "2.0", T0 + 2 * MIN, 1)
    );
    k.expect_nothing(QUIET);
}

#[test]
fn legacy_commands_on_ws() {
    let s = Servers::start(&["--kline-intervals", "1m,5m"]);
    let mut publisher = s.publisher();
    let mut c = s.client();
    c.send_text("sub-1m");
    // The default symbol is PUMP-SOL; no trade yet, so nothing.
    assert!(c.until_fence().is_empty());
    publisher.publish(trade("PUMP-SOL", "0.000000028", "1000", T0 + 1));
    assert_eq!(
        c.recv_text(),
        legacy("2.8e-8", "2.8e-8", "2.8e-8", "2.8e-8", T0, 60)
    );
    c.send_text("sub-5m");
    assert_eq!(
        c.recv_text(),
        legacy("2.8e-8", "2.8e-8", "2.8e-8", "2.8e-8", T0, 300)
    );
    publisher.publish(trade("PUMP-SOL", "0.00000003", "1000", T0 + 2));
    assert_eq!(
        c.recv_text(),
        legacy("2.8e-8", "3e-8", "2.8e-8", "3e-8", T0, 300)
    );
    assert!(c.until_fence().is_empty());
    // A legacy subscription and a JSON one side by side.
    c.ok(json!({"type":"kline.subscribe","symbol":"PUMP-SOL","interval":"5m","history":0}));
    assert_eq!(c.recv()["type"], "kline");
    publisher.publish(trade("PUMP-SOL", "0.00000003", "1000", T0 + 3));
    let got = c.until_fence();
    assert_eq!(got.len(), 2, "{got:?}");
    c.send_text("unsub");
    publisher.publish(trade("PUMP-SOL", "0.00000003", "1000", T0 + 4));
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "only the JSON subscription is left: {got:?}");
    assert_eq!(got[0]["type"], "kline");
    c.send_text("sub-7m");
    let message = error_message(&c.recv(), "invalid_field", "for sub-7m");
    assert!(message.contains("7m"), "{message}");
}

// ---------------------------------------------------------------------------
// Dynamic filters
// ---------------------------------------------------------------------------

#[test]
fn filter_delivers_exactly_the_matching_events() {
    let s = Servers::start(&[]);
    let mut publisher = s.publisher();
    let mut c = s.client();
    let filter = json!({"all":[
        {"field":"type","op":"in","value":["payment","trade"]},
        {"any":[
            {"field":"amount","op":"gte","value":"1000"},
            {"field":"asset.code","op":"eq","value":"VIP"}
        ]},
        {"not":{"field":"from","op":"prefix","value":"GBAD"}},
        {"field":"memo","op":"exists","value":false},
        {"any":[
            {"field":"amount","op":"lt","value":1000000},
            {"field":"amount","op":"exists","value":false}
        ]}
    ]});
    let ack = c.ok(json!({"type":"filter.subscribe","name":"big","filter":filter,"id":"f"}));
    assert_eq!(ack["filter"], "big");
    assert_eq!(ack["id"], "f");
    let events = [
        // (event, matches)
        (
            json!({"type":"payment","from":"GA1","amount":"1000","ts":1}),
            true,
        ),
        (
            json!({"type":"payment","from":"GA1","amount":"999.9999999","ts":2}),
            false,
        ),
        // Decimal, not string, comparison: 1000.0000001 > 1000.
        (
            json!({"type":"payment","from":"GA1","amount":"1000.0000001","ts":3}),
            true,
        ),
        // A number works as well as a decimal string.
        (
            json!({"type":"trade","from":"GA1","amount":5000,"ts":4}),
            true,
        ),
        (
            json!({"type":"contract_event","from":"GA1","amount":"5000","ts":5}),
            false,
        ),
        (
            json!({"type":"payment","from":"GBAD7","amount":"5000","ts":6}),
            false,
        ),
        (
            json!({"type":"payment","from":"GA1","amount":"5000","memo":"x","ts":7}),
            false,
        ),
        // A null memo is a missing memo.
        (
            json!({"type":"payment","from":"GA1","amount":"5000","memo":null,"ts":8}),
            true,
        ),
        (
            json!({"type":"payment","from":"GA1","amount":"1000000","ts":9}),
            false,
        ),
        // Nested field; no amount at all.
        (
            json!({"type":"payment","from":"GA1","asset":{"code":"VIP"},"ts":10}),
            true,
        ),
        (
            json!({"type":"payment","from":"GA1","asset":{"code":"VIPX"},"ts":11}),
            false,
        ),
        // A non-decimal amount never compares.
        (
            json!({"type":"payment","from":"GA1","amount":"lots","ts":12}),
            false,
        ),
        (
            json!({"type":"payment","from":"GA1","amount":"1e4","ts":13}),
            true,
        ),
    ];
    for (event, _) in &events {
        publisher.publish(event.clone());
    }
    let got = c.until_fence();
    let want: Vec<Value> = events
        .iter()
        .filter(|(_, m)| *m)
        .map(|(e, _)| json!({"type":"match","filter":"big","event":e}))
        .collect();
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (got, want) in got.iter().zip(&want) {
        assert_exact(got, want);
    }

    // Two filters: one match each per event; unsubscribe one.
    c.ok(json!({"type":"filter.subscribe","name":"usd","filter":{"field":"symbol","op":"contains","value":"USD"}}));
    publisher.publish(trade("BTC-USD", "45000", "1", T0));
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["filter"], "usd");
    publisher.publish(json!({"type":"trade","symbol":"ETH-USD","amount":"2000","ts":T0}));
    let got = c.until_fence();
    let names: BTreeSet<&str> = got.iter().map(|m| m["filter"].as_str().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["big", "usd"]), "{got:?}");
    c.ok(json!({"type":"filter.unsubscribe","filter":"big"}));
    publisher.publish(json!({"type":"trade","symbol":"ETH-USD","amount":"2000","ts":T0}));
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["filter"], "usd");
    c.fails(
        json!({"type":"filter.unsubscribe","filter":"big"}),
        "not_found",
    );
    // Other clients get nothing of it.
    let mut other = s.client();
    publisher.publish(trade("BTC-USD", "45000", "1", T0));
    assert!(other.until_fence().is_empty());
}

#[test]
fn filter_ops_on_numbers_and_strings() {
    let s = Servers::start(&[]);
    let mut publisher = s.publisher();
    let mut c = s.client();
    let filters = [
        ("eq-num", json!({"field":"n","op":"eq","value":100})),
        ("eq-str", json!({"field":"n","op":"eq","value":"100"})),
        ("ne", json!({"field":"n","op":"ne","value":100})),
        ("gt", json!({"field":"n","op":"gt","value":"99.5"})),
        ("lte", json!({"field":"n","op":"lte","value":"-1"})),
        ("in", json!({"field":"n","op":"in","value":[7, "x", true]})),
        ("prefix", json!({"field":"s","op":"prefix","value":"ab"})),
        ("exists", json!({"field":"s","op":"exists"})),
    ];
    for (name, filter) in &filters {
        c.ok(json!({"type":"filter.subscribe","name":name,"filter":filter}));
    }
    let cases: [(Value, &[&str]); 9] = [
        (json!({"type":"e","n":100}), &["eq-num", "gt"]),
        (json!({"type":"e","n":"100.0"}), &["eq-num", "gt"]),
        (json!({"type":"e","n":"100"}), &["eq-num", "eq-str", "gt"]),
        (json!({"type":"e","n":"-1.00"}), &["ne", "lte"]),
        (json!({"type":"e","n":"7.0"}), &["ne", "in"]),
        (json!({"type":"e","n":"x"}), &["ne", "in"]),
        (json!({"type":"e","n":true}), &["ne", "in"]),
        (json!({"type":"e","s":"abc"}), &["prefix", "exists"]),
        (json!({"type":"e","s":null}), &[]),
    ];
    for (event, want) in cases {
        publisher.publish(event.clone());
        let got = c.until_fence();
        let names: BTreeSet<&str> = got
            .iter()
            .map(|m| {
                assert_eq!(m["type"], "match");
                assert_eq!(m["event"], event);
                m["filter"].as_str().unwrap()
            })
            .collect();
        let want: BTreeSet<&str> = want.iter().copied().collect();
        assert_eq!(names, want, "for {event}");
    }
}

#[test]
fn invalid_filters_are_refused_with_the_path_and_limits_hold() {
    let s = Servers::start(&["--max-filters", "2"]);
    let mut c = s.client();
    let cases = [
        (
            json!({"all":[{"field":"amount","op":"gtx","value":"1"}]}),
            "filter.all[0].op",
        ),
        (
            json!({"all":[{"field":"a","op":"eq","value":1},{"any":[{"field":"b","op":"gt","value":"abc"}]}]}),
            "filter.all[1].any[0].value",
        ),
        (
            json!({"not":{"field":"a..b","op":"exists"}}),
            "filter.not.field",
        ),
        (json!({"all":[]}), "filter.all"),
        (json!({"field":"a","op":"eq"}), "filter.value"),
        (json!({"field":"a","op":"in","value":[]}), "filter.value"),
        (
            json!({"field":"a","op":"eq","value":1,"extra":2}),
            "filter.extra",
        ),
        (json!("type == payment"), "filter"),
    ];
    for (filter, path) in cases {
        let reply = c.request(json!({"type":"filter.subscribe","name":"x","filter":filter}));
        assert_eq!(reply["type"], "error", "{filter}: {reply}");
        let code = reply["code"].as_str().unwrap();
        assert!(
            code == "invalid_field" || code == "missing_field",
            "{filter}: {reply}"
        );
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{path}`")),
            "{filter}: the error should name `{path}`: {message}"
        );
    }
    // Too deep.
    let mut deep = json!({"field":"a","op":"exists"});
    for _ in 0..10 {
        deep = json!({ "not": deep });
    }
    let message = c.fails(
        json!({"type":"filter.subscribe","name":"x","filter":deep}),
        "invalid_field",
    );
    assert!(message.contains("deep"), "{message}");
    c.fails(
        json!({"type":"filter.subscribe","name":"x"}),
        "missing_field",
    );

    // The limit, and names.
    let f = json!({"field":"type","op":"exists"});
    c.ok(json!({"type":"filter.subscribe","name":"one","filter":f}));
    c.fails(
        json!({"type":"filter.subscribe","name":"one","filter":f}),
        "conflict",
    );
    c.ok(json!({"type":"filter.subscribe","name":"two","filter":f}));
    let message = c.fails(
        json!({"type":"filter.subscribe","name":"three","filter":f}),
        "limit_reached",
    );
    assert!(message.contains('2'), "{message}");
    // Freed by an unsubscribe; per connection.
    c.ok(json!({"type":"filter.unsubscribe","filter":"one"}));
    c.ok(json!({"type":"filter.subscribe","name":"three","filter":f}));
    let mut d = s.client();
    d.ok(json!({"type":"filter.subscribe","name":"one","filter":f}));
    d.ok(json!({"type":"filter.subscribe","name":"two","filter":f}));
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

#[test]
fn crosses_above_fires_once_per_crossing_with_cooldown_and_on_the_alerts_channel() {
    let s = Servers::start(&["--kline-intervals", "1m"]);
    let mut publisher = s.publisher();
    let mut watcher = s.client();
    let ack = watcher.ok(json!({"type":"subscribe","channel":"alerts"}));
    assert_eq!(ack["channel"], "alerts");
    let mut c = s.client();
    let ack = c.ok(json!({
        "type":"alert.create","alert":"btc45k","symbol":"BTC-USD","interval":"1m",
        "field":"close","condition":"crosses_above","value":"45000","cooldown":10,"id":1
    }));
    assert_eq!(ack["alert"], "btc45k", "{ack}");
    assert_eq!(ack["condition"], "crosses_above", "{ack}");
    assert_eq!(ack["value"], "45000", "{ack}");
    assert_eq!(ack["cooldown"], 10, "{ack}");
    assert_eq!(ack["once"], false, "{ack}");
    assert_eq!(ack["fired"], 0, "{ack}");
    // Also subscribed to the candles, so that each trade's update is a
    // fence between possible firings.
    c.ok(json!({"type":"kline.subscribe","symbol":"BTC-USD","interval":"1m"}));

    let steps = [
        // (price, ts offset, fires)
        ("45100", 0, false), // the first observation has no previous
        ("44990", SEC, false),
        ("44995", 2 * SEC, false),
        ("45003.2", 3 * SEC, true), // crosses: previous 44995
        ("45010", 4 * SEC, false),  // stays above
        ("44999", 5 * SEC, false),
        ("45000", 6 * SEC, false), // crosses (>=) within the cooldown: not reported
        ("44000", 7 * SEC, false),
        ("45001", 13 * SEC, true), // exactly 10 s later in event time
        ("44000", 14 * SEC, false),
        ("45002", 15 * SEC, false), // cooldown again
        ("44000", 16 * SEC, false),
        // Next candle: the open is compared with the last close (44000).
        ("46000", MIN + 24 * SEC, true),
    ];
    for (price, at, _) in steps {
        publisher.publish(trade("BTC-USD", price, "1", T0 + at));
    }
    // A late trade and one in another symbol do nothing.
    publisher.publish(trade("BTC-USD", "50000", "1", T0 + 5 * SEC));
    publisher.publish(trade("ETH-USD", "50000", "1", T0 + 2 * MIN));
    let got = c.until_fence();
    let mut alerts = Vec::new();
    let mut step = 0;
    for message in &got {
        match message["type"].as_str() {
            Some("kline") => {
                if message["closed"] == false {
                    let (price, _, _) = steps[step];
                    assert_eq!(message["close"], price, "{message}");
                    step += 1;
                }
            }
            Some("alert") => {
                let (price, at, fires) = steps[step - 1];
                assert!(fires, "fired after the trade at {price}: {message}");
                assert_eq!(message["value"], price, "{message}");
                assert_eq!(message["ts"], T0 + at, "{message}");
                assert_eq!(message["alert"], "btc45k", "{message}");
                assert_eq!(message["symbol"], "BTC-USD", "{message}");
                assert_eq!(message["interval"], "1m", "{message}");
                assert_eq!(message["field"], "close", "{message}");
                assert_eq!(message["condition"], "crosses_above", "{message}");
                assert_eq!(message["threshold"], "45000", "{message}");
                assert_eq!(message["candle"]["type"], "kline", "{message}");
                assert_eq!(message["candle"]["close"], price, "{message}");
                alerts.push(message.clone());
            }
            _ => panic!("unexpected {message}"),
        }
    }
    assert_eq!(step, steps.len(), "{got:#?}");
    let previous: Vec<&Value> = alerts.iter().map(|a| &a["previous"]).collect();
    assert_eq!(
        previous,
        [&json!("44995"), &json!("44000"), &json!("44000")],
        "{alerts:#?}"
    );
    let fired: Vec<&Value> = alerts.iter().map(|a| &a["fired"]).collect();
    assert_eq!(fired, [&json!(1), &json!(2), &json!(3)]);
    let want_fires = steps.iter().filter(|s| s.2).count();
    assert_eq!(alerts.len(), want_fires, "{alerts:#?}");

    // The same firings, in order, on the `alerts` channel.
    for alert in &alerts {
        let message = watcher.recv();
        assert_eq!(message["type"], "message", "{message}");
        assert_eq!(message["channel"], "alerts", "{message}");
        assert_eq!(&message["data"], alert, "{message}");
    }
    assert!(watcher.until_fence().is_empty());

    let list = c.ok(json!({"type":"alert.list"}));
    assert_eq!(list["alerts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["alerts"][0]["fired"], 3, "{list}");
    assert_eq!(list["alerts"][0]["value"], "45000", "{list}");
}

#[test]
fn once_alerts_delete_themselves_and_alerts_can_be_listed_and_deleted() {
    let s = Servers::start(&["--kline-intervals", "1m", "--max-alerts", "3"]);
    let mut publisher = s.publisher();
    let mut c = s.client();
    let ack = c.ok(json!({"type":"alert.create","symbol":"X","interval":"1m","condition":"above","value":10,"once":true,"cooldown":0}));
    let once_id = ack["alert"].as_str().unwrap().to_owned();
    assert!(!once_id.is_empty());
    c.ok(json!({"type":"alert.create","alert":"below","symbol":"X","interval":"1m","condition":"below","value":"5","cooldown":0}));
    c.ok(json!({"type":"alert.create","alert":"move","symbol":"X","interval":"1m","field":"high","condition":"moves_pct","value":"50","cooldown":0}));
    c.fails(
        json!({"type":"alert.create","alert":"four","symbol":"X","interval":"1m","condition":"above","value":1}),
        "limit_reached",
    );
    let list = c.ok(json!({"type":"alert.list"}));
    let ids: Vec<&str> = list["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [once_id.as_str(), "below", "move"], "{list}");

    publisher.publish(trade("X", "8", "1", T0));
    assert!(c.until_fence().is_empty(), "nothing holds at 8");
    publisher.publish(trade("X", "11", "1", T0 + 1));
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["alert"], once_id.as_str());
    assert_eq!(got[0]["condition"], "above");
    assert_eq!(got[0]["value"], "11");
    assert_eq!(got[0]["previous"], "8");
    assert_eq!(got[0]["once"], true);
    // Gone after firing.
    let list = c.ok(json!({"type":"alert.list"}));
    let ids: Vec<&str> = list["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["below", "move"], "{list}");
    publisher.publish(trade("X", "13", "1", T0 + 2));
    // high 13 vs open 8: +62.5% >= 50%: `move` fires once in this candle.
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["alert"], "move");
    assert_eq!(got[0]["value"], "13");
    publisher.publish(trade("X", "14", "1", T0 + 3));
    assert!(c.until_fence().is_empty(), "once per candle");
    // below, with cooldown 0: every observation under 5.
    publisher.publish(trade("X", "4", "1", T0 + 4));
    publisher.publish(trade("X", "3", "1", T0 + 5));
    let got = c.until_fence();
    let values: Vec<&Value> = got.iter().map(|m| &m["value"]).collect();
    assert_eq!(values, [&json!("4"), &json!("3")], "{got:?}");

    // Delete.
    let ack = c.ok(json!({"type":"alert.delete","alert":"below"}));
    assert_eq!(ack["alert"], "below");
    c.fails(json!({"type":"alert.delete","alert":"below"}), "not_found");
    c.fails(json!({"type":"alert.delete","alert":once_id}), "not_found");
    publisher.publish(trade("X", "2", "1", T0 + 6));
    assert!(c.until_fence().is_empty());
    // Room again for new alerts; ids are the client's.
    c.ok(json!({"type":"alert.create","alert":"a","symbol":"X","interval":"1m","condition":"above","value":1}));
    c.fails(
        json!({"type":"alert.create","alert":"a","symbol":"X","interval":"1m","condition":"above","value":1}),
        "conflict",
    );
    // Per connection: another client sees none of them.
    let mut d = s.client();
    let list = d.ok(json!({"type":"alert.list"}));
    assert_eq!(list["alerts"], json!([]));
    d.fails(json!({"type":"alert.delete","alert":"a"}), "not_found");
}

#[test]
fn alert_requests_are_validated() {
    let s = Servers::start(&["--kline-intervals", "1m"]);
    let mut c = s.client();
    let cases = [
        (
            json!({"type":"alert.create","symbol":"X","interval":"7m","condition":"above","value":1}),
            "interval",
        ),
        (
            json!({"type":"alert.create","symbol":"X Y","interval":"1m","condition":"above","value":1}),
            "symbol",
        ),
        (
            json!({"type":"alert.create","symbol":"X","interval":"1m","condition":"sideways","value":1}),
            "condition",
        ),
        (
            json!({"type":"alert.create","symbol":"X","interval":"1m","condition":"above","value":"abc"}),
            "value",
        ),
        (
            json!({"type":"alert.create","symbol":"X","interval":"1m","condition":"above","value":1,"cooldown":-1}),
            "cooldown",
        ),
        (
            json!({"type":"alert.create","symbol":"X","interval":"1m","condition":"above","value":1,"field":"vwap"}),
            "field",
        ),
        (
            json!({"type":"alert.create","filter":{"all":[{"field":"a","op":"nope","value":1}]}}),
            "filter.all[0].op",
        ),
        (
            json!({"type":"alert.create","filter":{"field":"a","op":"exists"},"symbol":"X"}),
            "symbol",
        ),
    ];
    for (request, field) in cases {
        let reply = c.request(request.clone());
        assert_eq!(reply["type"], "error", "{request}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}`")),
            "{request}: should name `{field}`: {message}"
        );
    }
    let message = c.fails(
        json!({"type":"alert.create","interval":"1m","condition":"above","value":1}),
        "missing_field",
    );
    assert!(message.contains("symbol"), "{message}");
}

#[test]
fn event_filter_alerts_fire_on_matching_events() {
    let s = Servers::start(&[]);
    let mut publisher = s.publisher();
    let mut watcher = s.client();
    watcher.ok(json!({"type":"subscribe","channel":"alerts"}));
    let mut c = s.client();
    let ack = c.ok(json!({
        "type":"alert.create","alert":"whale",
        "filter":{"all":[{"field":"type","op":"eq","value":"payment"},{"field":"amount","op":"gte","value":"10000"}]},
        "cooldown":0
    }));
    assert_eq!(ack["alert"], "whale", "{ack}");
    let small = json!({"type":"payment","from":"GA","amount":"9999.99","ts":T0});
    let big = json!({"type":"payment","from":"GA","amount":"25000.50","ts":T0 + 1});
    let bigger = json!({"type":"payment","from":"GB","amount":100000,"ts":T0 + 2});
    for event in [&small, &big, &bigger] {
        publisher.publish(event.clone());
    }
    let got = c.until_fence();
    assert_eq!(got.len(), 2, "{got:#?}");
    for (message, (event, value)) in got.iter().zip([(&big, "25000.5"), (&bigger, "100000")]) {
        assert_eq!(message["type"], "alert", "{message}");
        assert_eq!(message["alert"], "whale", "{message}");
        assert_eq!(&message["event"], event, "{message}");
        assert_eq!(message["value"], value, "{message}");
        assert_eq!(message["previous"], Value::Null, "{message}");
        assert!(message["ts"].is_i64(), "{message}");
        assert_eq!(&watcher.recv()["data"], message);
    }
    assert_eq!(got[1]["fired"], 2);

    // once: fires for the first match only.
    c.ok(json!({"type":"alert.create","alert":"first-usdc","filter":{"field":"asset_code","op":"eq","value":"USDC"},"once":true}));
    publisher.publish(json!({"type":"payment","asset_code":"USDC","amount":"1","ts":T0 + 3}));
    publisher.publish(json!({"type":"payment","asset_code":"USDC","amount":"2","ts":T0 + 4}));
    let got = c.until_fence();
    assert_eq!(got.len(), 1, "{got:#?}");
    assert_eq!(got[0]["alert"], "first-usdc");
    assert_eq!(got[0]["value"], "1");
    let list = c.ok(json!({"type":"alert.list"}));
    assert_eq!(list["alerts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        list["alerts"][0]["filter"],
        json!({"all":[{"field":"type","op":"eq","value":"payment"},{"field":"amount","op":"gte","value":"10000"}]})
    );
}

/// The README: "`cooldown` is in seconds of event time". Two matching
/// events two minutes apart in event time, published back to back, are
/// both outside a 60 s cooldown.
#[test]
fn event_alert_cooldown_runs_in_event_time() {
    let s = Servers::start(&[]);
    let mut publisher = s.publisher();
    let mut c = s.client();
    c.ok(json!({"type":"alert.create","alert":"p","filter":{"field":"type","op":"eq","value":"payment"},"cooldown":60}));
    publisher.publish(json!({"type":"payment","amount":"1","ts":T0}));
    publisher.publish(json!({"type":"payment","amount":"2","ts":T0 + 30 * SEC}));
    publisher.publish(json!({"type":"payment","amount":"3","ts":T0 + 2 * MIN}));
    let got = c.until_fence();
    let values: Vec<&Value> = got.iter().map(|m| &m["value"]).collect();
    assert_eq!(values, [&json!("1"), &json!("3")], "{got:#?}");
    let times: Vec<&Value> = got.iter().map(|m| &m["ts"]).collect();
    assert_eq!(times, [&json!(T0), &json!(T0 + 2 * MIN)], "{got:#?}");
}

// ---------------------------------------------------------------------------
// The simulated feed
// ---------------------------------------------------------------------------

fn any_field_is(event: &Value, fields: &[&str], wanted: &str) -> bool {
    fields.iter().any(|f| event[*f] == wanted)
}

#[test]
fn simulator_feeds_candles_and_registration_streams() {
    let server = TestServer::start(&[
        "--sim-seed",
        "1",
        "--sim-trades-per-sec",
        "200",
        "--sim-events-per-sec",
        "50",
    ]);
    let addr = server.addr;

    let mut k = JsonClient::ws(addr);
    let ack =
        k.ok(json!({"type":"kline.subscribe","symbol":"PUMP-SOL","interval":"1s","history":0}));
    assert_eq!(ack["symbol"], "PUMP-SOL");

    let register = |filters: Value| {
        let mut r = JsonClient::ws(addr);
        let reply = r.request(json!({"type":"register","filters":filters}));
        assert_eq!(reply["type"], "registered", "{reply}");
        r
    };
    let mut usdc = register(
        json!({"types":["payment"],"account_ids":[],"asset_codes":["USDC"],"min_amount":"100"}),
    );
    let mut btc =
        register(json!({"types":["trade"],"account_ids":[],"asset_codes":["BTC"],"min_amount":""}));
    let mut legacy_client = JsonClient::kline(addr);
    legacy_client.send_text("sub-1s");

    let deadline = Instant::now() + Duration::from_secs(20);
    // Live candles: at least one closed 1s candle and open ones.
    let (mut closed, mut open) = (0, 0);
    let mut last_start = 0;
    while (closed < 2 || open < 5) && Instant::now() < deadline {
        let Ok(m) = k.next(Duration::from_millis(200)) else {
            continue;
        };
        assert_eq!(m["type"], "kline", "{m}");
        assert_eq!(m["symbol"], "PUMP-SOL", "{m}");
        assert_eq!(m["interval"], "1s", "{m}");
        let start = m["start"].as_i64().unwrap();
        assert_eq!(start % 1000, 0, "{m}");
        assert_eq!(m["end"].as_i64().unwrap(), start + 1000, "{m}");
        assert!(start >= last_start, "candles go forward: {m}");
        last_start = start;
        let (o, h, l, c) = (
            dec(&m["open"]),
            dec(&m["high"]),
            dec(&m["low"]),
            dec(&m["close"]),
        );
        assert!(
            l <= o && l <= c && o <= h && c <= h && l > Decimal::ZERO,
            "{m}"
        );
        assert!(dec(&m["volume"]) > Decimal::ZERO, "{m}");
        assert!(m["trades"].as_u64().unwrap() >= 1, "{m}");
        if m["closed"] == true {
            closed += 1;
        } else {
            open += 1;
        }
    }
    assert!(
        closed >= 2 && open >= 5,
        "live PUMP-SOL candles within 20 s: {closed} closed, {open} open updates"
    );

    // The old service's clients see the same symbol in the old shape.
    let text = legacy_client.recv_text();
    let m: Value = serde_json::from_str(&text).unwrap();
    let keys: Vec<&String> = m.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "open",
            "high",
            "low",
            "close",
            "unix_timestamp",
            "time_window_seconds"
        ],
        "{text}"
    );
    assert_eq!(m["time_window_seconds"], 1, "{text}");
    assert!(m["open"].is_f64(), "{text}");

    // Registration streams: every event matches the client's filters.
    let mut account = String::new();
    let mut btc_seen = 0;
    while btc_seen < 5 && Instant::now() < deadline {
        let Ok(e) = btc.next(Duration::from_millis(200)) else {
            continue;
        };
        assert_eq!(e["type"], "trade", "{e}");
        assert_eq!(e["asset_code"], "BTC", "{e}");
        assert_eq!(e["symbol"], "BTC-USD", "{e}");
        account = e["account_id"].as_str().unwrap().to_owned();
        btc_seen += 1;
    }
    assert_eq!(btc_seen, 5, "BTC trades within 20 s");
    let mut usdc_seen = 0;
    while usdc_seen < 3 && Instant::now() < deadline {
        let Ok(e) = usdc.next(Duration::from_millis(200)) else {
            continue;
        };
        assert_eq!(e["type"], "payment", "{e}");
        assert_eq!(e["asset_code"], "USDC", "{e}");
        assert!(dec(&e["amount"]) >= Decimal::from(100), "{e}");
        usdc_seen += 1;
    }
    assert_eq!(usdc_seen, 3, "USDC payments of 100 or more within 20 s");

    // One account, any type: trades and payments naming it.
    let mut mine =
        register(json!({"types":[],"account_ids":[account],"asset_codes":[],"min_amount":""}));
    let mut kinds = BTreeSet::new();
    let mut seen = 0;
    while (seen < 10 || kinds.len() < 2) && Instant::now() < deadline {
        let Ok(e) = mine.next(Duration::from_millis(200)) else {
            continue;
        };
        // A token event names its accounts in `topics`.
        let in_topics = e["type"] == "contract_event"
            && e["topics"]
                .as_array()
                .is_some_and(|t| t.iter().any(|v| *v == account));
        assert!(
            in_topics || any_field_is(&e, &["account_id", "from", "to"], &account),
            "{account}: {e}"
        );
        kinds.insert(e["type"].as_str().unwrap().to_owned());
        seen += 1;
    }
    assert!(
        seen >= 10 && kinds.contains("trade") && kinds.contains("payment"),
        "events of account {account} within 20 s: {seen}, {kinds:?}"
    );

    // The symbols the simulator trades.
    let reply = JsonClient::ws(addr).ok(json!({"type":"market.symbols"}));
    for symbol in ["PUMP-SOL", "BTC-USD", "ETH-USD", "SOL-USD"] {
        assert!(
            reply["symbols"]
                .as_array()
                .unwrap()
                .contains(&json!(symbol)),
            "{symbol}: {reply}"
        );
    }
    assert_eq!(reply["default_symbol"], "PUMP-SOL");
}
