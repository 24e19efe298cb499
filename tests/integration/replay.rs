//! The replay comparison: a deterministic NDJSON file (thousands of trades
//! over several symbols with irregular times, ties, out-of-order trades
//! within a candle, late trades for closed candles, ticks, events that are
//! not market data, market data the server must reject, bad lines) is
//! replayed by the real binary, and every candle it serves, for every
//! symbol and interval, is compared field by field with the candles that
//! `tests/python/candles.py` computes independently with Python's
//! `decimal`. Candles are read twice: live, by a subscriber connected
//! before the first trade is due, and from the history after the replay.
//! The server's log must name every bad line and end with the summary.

use crate::support::common::http_exchange;
use crate::support::json_client;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use json_client::JsonClient;
use serde_json::{json, Value};

/// The first line's time; the first trade is [`LEAD_MS`] later.
const T_START: i64 = 1_748_465_400_000 - 1_234;
/// At `--replay-speed 1000` this is 3 s of wall time before the first
/// trade is due: the live subscriber connects within it.
const LEAD_MS: i64 = 3_000_000;
const SPEED: &str = "1000";
const INTERVALS: &[&str] = &["1s", "1m", "5m", "15m", "1h"];
const SYMBOLS: &[&str] = &["BTC-USD", "ETH-USD", "PUMP-SOL", "TINY"];
/// (symbol, interval) pairs watched live during the replay.
const LIVE: &[(&str, &str)] = &[
    ("BTC-USD", "1s"),
    ("ETH-USD", "1m"),
    ("PUMP-SOL", "5m"),
    ("TINY", "1m"),
    ("BTC-USD", "15m"),
];

// ---------------------------------------------------------------------------
// The replay file
// ---------------------------------------------------------------------------

/// splitmix64: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A price as an integer number of units of 10^-dp, written as a decimal.
fn fixed(units: u64, dp: u32) -> String {
    let scale = 10u64.pow(dp);
    if dp == 0 {
        return units.to_string();
    }
    format!(
        "{}.{:0width$}",
        units / scale,
        units % scale,
        width = dp as usize
    )
}

/// What the generator wrote, for checks that do not need Python.
struct Generated {
    lines: Vec<String>,
    /// 1-based numbers of the lines the server must skip as bad.
    bad: Vec<usize>,
    events: usize,
}

struct Instrument {
    symbol: &'static str,
    /// Price in units of 10^-dp.
    units: u64,
    dp: u32,
    weight: u64,
    last_ts: i64,
}

fn generate() -> Generated {
    let mut rng = Rng(0x5EED_F00D);
    let mut instruments = [
        Instrument {
            symbol: "BTC-USD",
            units: 4_500_000,
            dp: 2,
            weight: 40,
            last_ts: 0,
        },
        Instrument {
            symbol: "ETH-USD",
            units: 250_000,
            dp: 2,
            weight: 30,
            last_ts: 0,
        },
        Instrument {
            symbol: "PUMP-SOL",
            units: 27_958_993_476,
            dp: 18,
            weight: 25,
            last_ts: 0,
        },
        Instrument {
            symbol: "TINY",
            units: 1_000,
            dp: 4,
            weight: 5,
            last_ts: 0,
        },
    ];
    let mut out = Generated {
        lines: Vec::new(),
        bad: Vec::new(),
        events: 0,
    };
    let push_event = |out: &mut Generated, event: Value| {
        out.lines.push(event.to_string());
        out.events += 1;
    };
    push_event(
        &mut out,
        json!({"type":"replay_start","note":"nothing is due until the first trade","ts":T_START}),
    );
    let bad_lines = [
        "this is not json".to_owned(),
        "[1,2,3]".to_owned(),
        r#"{"ts":1748465400000}"#.to_owned(),
        r#"{"type":"trade","symbol":"BTC-USD","price":"1","qty":"1"}"#.to_owned(),
        r#"{"type":"trade","symbol":"BTC-USD","price":"1","ts":-5}"#.to_owned(),
        r#"{"type":"","ts":1748465400000}"#.to_owned(),
        r#"{"type":"trade","symbol":"BTC-USD","price":"1","ts":"1748468400000"}"#.to_owned(),
        r#"{"type":"trade","symbol":"BTC-USD","price":"1","ts":1748468400000.5}"#.to_owned(),
        r#"{"type":"trade","symbol":"BTC-USD","price":"1","#.to_owned(),
        r#"{"type":7,"ts":1748468400000}"#.to_owned(),
        r#""a string""#.to_owned(),
        r#"{"type":"tick","symbol":"BTC-USD","price":NaN,"ts":1748468400000}"#.to_owned(),
    ];
    let mut clock = T_START + LEAD_MS;
    let total_weight: u64 = instruments.iter().map(|i| i.weight).sum();
    let steps = 3_400;
    for step in 0..steps {
        // Bad lines and a blank line, spread through the file.
        if step % 300 == 150 {
            let line = &bad_lines[(step / 300) % bad_lines.len()];
            out.lines.push(line.clone());
            out.bad.push(out.lines.len());
            continue;
        }
        if step == 1_000 {
            out.lines.push(String::new());
            continue;
        }
        if step == 2_000 {
            out.lines.push("   \t ".to_owned());
            continue;
        }
        // Irregular times: bursts and pauses, sometimes the same ms.
        clock += match rng.below(10) {
            0..=1 => 0,
            2..=6 => rng.below(60) as i64,
            7..=8 => rng.below(1_500) as i64,
            _ => rng.below(4_000) as i64,
        };
        // Events that are not market data (or that the market rejects).
        if rng.chance(4) {
            let event = match rng.below(7) {
                0 => {
                    json!({"type":"payment","from":"GA1","to":"GB2","asset_code":"USDC","amount":"125.5","ts":clock})
                }
                1 => {
                    json!({"type":"contract_event","contract_id":"CA1","topics":["transfer"],"data":{"amount":"3"},"ts":clock})
                }
                2 => {
                    json!({"type":"trade","account_id":"GA1","asset_code":"XLM","amount":"10","ts":clock})
                }
                3 => json!({"type":"trade","symbol":"BTC-USD","qty":"1","ts":clock}),
                4 => json!({"type":"trade","symbol":"BTC-USD","price":"-1","qty":"1","ts":clock}),
                5 => json!({"type":"trade","symbol":"ETH-USD","price":"abc","qty":"1","ts":clock}),
                _ => {
                    json!({"type":"trade","symbol":"ETH-USD","price":"2500","qty":"-0.5","ts":clock})
                }
            };
            push_event(&mut out, event);
            continue;
        }
        let mut pick = rng.below(total_weight);
        let index = instruments
            .iter()
            .position(|i| {
                if pick < i.weight {
                    true
                } else {
                    pick -= i.weight;
                    false
                }
            })
            .unwrap();
        let instrument = &mut instruments[index];
        // A random walk of about 0.1% per step, never below one unit.
        let step_units = (instrument.units / 1_000).max(1);
        let moved = rng.below(2 * step_units + 1) as i64 - step_units as i64;
        instrument.units = (instrument.units as i64 + moved).max(1) as u64;
        let ts = match rng.below(100) {
            // Out of order, mostly within the same candle for 1m and up.
            0..=5 => clock - rng.below(3_000) as i64,
            // Late for closed candles at 1s and 1m, sometimes 5m or 15m.
            6..=7 => clock - 60_000 - rng.below(900_000) as i64,
            // A tie with the symbol's previous trade.
            8..=10 if instrument.last_ts > 0 => instrument.last_ts,
            _ => clock,
        };
        instrument.last_ts = instrument.last_ts.max(ts);
        let price_text = fixed(instrument.units, instrument.dp);
        // Prices as strings, trailing zeros, JSON numbers, exponents.
        let price = match rng.below(10) {
            0 => Value::Number(price_text.parse().unwrap()),
            1 => json!(format!("{price_text}000")),
            2 => {
                let digits = instrument.units.to_string();
                json!(format!("{digits}e-{}", instrument.dp))
            }
            _ => json!(price_text),
        };
        let qty_units = 1 + rng.below(5_000_000);
        let qty = fixed(qty_units, 6);
        let event = match rng.below(20) {
            // A tick: its qty, if any, must not count as volume.
            0..=1 => {
                json!({"type":"tick","symbol":instrument.symbol,"price":price,"qty":qty,"ts":ts})
            }
            2 => {
                json!({"type":"trade","symbol":instrument.symbol,"price":price,"amount":qty,"ts":ts})
            }
            3 => json!({"type":"trade","symbol":instrument.symbol,"price":price,"ts":ts}),
            4 => {
                json!({"type":"trade","symbol":instrument.symbol,"price":price,"qty":Value::Number(qty.parse().unwrap()),"ts":ts})
            }
            5 => {
                json!({"type":"trade","symbol":instrument.symbol,"price":price,"qty":"0","side":"sell","ts":ts})
            }
            _ => {
                json!({"type":"trade","symbol":instrument.symbol,"price":price,"qty":qty,"side":"buy","ts":ts,"trade_id":step})
            }
        };
        push_event(&mut out, event);
    }
    // The file ends without a newline after a last bad line.
    out.lines
        .push(r#"{"type":"trade","symbol":"TINY""#.to_owned());
    out.bad.push(out.lines.len());
    out
}

fn write_file(path: &Path, generated: &Generated) {
    let mut file = std::fs::File::create(path).unwrap();
    let text = generated.lines.join("\n");
    file.write_all(text.as_bytes()).unwrap();
}

// ---------------------------------------------------------------------------
// The reference: tests/python/candles.py
// ---------------------------------------------------------------------------

/// A generated market file in a fresh directory (kept while the returned
/// directory lives), and what was generated.
fn market_file(prefix: &str) -> (tempfile::TempDir, std::path::PathBuf, Generated) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let file = dir.path().join("market.ndjson");
    let generated = generate();
    write_file(&file, &generated);
    (dir, file, generated)
}

fn python_candles(file: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/candles.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(file)
        .arg("--intervals")
        .arg(INTERVALS.join(","))
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "candles.py failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("candles.py prints JSON")
}

// ---------------------------------------------------------------------------
// The server, as a process whose log is kept
// ---------------------------------------------------------------------------

struct Replayer {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replayer {
    fn start(file: &Path) -> Replayer {
        Replayer::start_with(file, &[])
    }

    /// With more flags after the replay's own.
    fn start_with(file: &Path, flags: &[&str]) -> Replayer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["--listen", "127.0.0.1:0", "--no-sim", "--replay"])
            .arg(file)
            .args(["--replay-speed", SPEED, "--kline-history", "1000"])
            .arg("--kline-intervals")
            .arg(INTERVALS.join(","))
            .args(flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fanout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines
            .next()
            .expect("fanout printed nothing")
            .expect("read stdout");
        let addr = first
            .strip_prefix("fanout listening on ws://")
            .unwrap_or_else(|| panic!("unexpected first line: {first}"))
            .parse()
            .unwrap();
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Replayer { child, addr, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    /// `GET /metrics`: each sample line's name (with labels) and value.
    fn metrics(&self) -> BTreeMap<String, f64> {
        let response = http_exchange(self.addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        let body = &response[response.find("\r\n\r\n").expect("a head") + 4..];
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_owned(), value.parse().expect("a number"))
            })
            .collect()
    }

    /// One sample of `GET /metrics`; absent fails the test.
    fn metric(&self, name: &str) -> f64 {
        let metrics = self.metrics();
        *metrics
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in /metrics: {metrics:?}"))
    }
}

impl Drop for Replayer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's candle without the fields Python does not produce, after
/// checking they are right.
fn strip(message: &Value, symbol: &str, interval: &str) -> Value {
    assert_eq!(message["type"], "kline", "{message}");
    assert_eq!(message["symbol"], symbol, "{message}");
    assert_eq!(message["interval"], interval, "{message}");
    let mut object = message.as_object().unwrap().clone();
    object.remove("type");
    object.remove("symbol");
    object.remove("interval");
    Value::Object(object)
}

fn compare_series(what: &str, got: &[Value], want: &[Value]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let gk: BTreeSet<&String> = g.as_object().unwrap().keys().collect();
        let wk: BTreeSet<&String> = w.as_object().unwrap().keys().collect();
        assert_eq!(gk, wk, "{what}: candle {i} fields");
        assert_eq!(g, w, "{what}: candle {i} of {}", want.len());
    }
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} candles served, {} expected",
        got.len(),
        want.len()
    );
}

/// Reads `client`'s K-line messages until each of `series` has had its
/// `replay_end`; returns each series' messages, `replay_end` last. A
/// message of a series after its `replay_end`, or anything that is not a
/// candle or a `replay_end`, fails the test; but for `dropped` notices
/// when `notices` is given, which are collected there.
fn read_until_replay_end(
    client: &mut JsonClient,
    series: &[(&str, &str)],
    within: Duration,
    mut notices: Option<&mut Vec<Value>>,
) -> BTreeMap<(String, String), Vec<Value>> {
    let deadline = Instant::now() + within;
    let mut got: BTreeMap<(String, String), Vec<Value>> = series
        .iter()
        .map(|(s, i)| ((s.to_string(), i.to_string()), Vec::new()))
        .collect();
    let mut ended = 0;
    while ended < series.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match client.next(left) {
            Ok(message) => message,
            Err(e) => panic!(
                "{ended} of {} replay_end messages within {within:?}: {e:?}",
                series.len()
            ),
        };
        let kind = message["type"].as_str().unwrap_or_default();
        if let (Some(notices), "dropped") = (notices.as_deref_mut(), kind) {
            notices.push(message);
            continue;
        }
        assert!(
            kind == "kline" || kind == "replay_end",
            "after {ended} replay_end messages and {} others: {message}",
            got.values().map(Vec::len).sum::<usize>()
        );
        let key = (
            message["symbol"].as_str().unwrap().to_owned(),
            message["interval"].as_str().unwrap().to_owned(),
        );
        let messages = got
            .get_mut(&key)
            .unwrap_or_else(|| panic!("not subscribed: {message}"));
        assert!(
            messages.last().is_none_or(|m| m["type"] != "replay_end"),
            "after the replay's end: {message}"
        );
        if kind == "replay_end" {
            ended += 1;
        }
        messages.push(message);
    }
    got
}

/// The last state of each candle in one series' messages (a `replay_end`
/// last, checked and left out), checking the order they came in: candles
/// go forward, a candle closes before the next one starts, and nothing of
/// a candle comes after its closed state, so every closed candle came
/// exactly once.
fn final_states(what: &str, symbol: &str, interval: &str, messages: &[Value]) -> Vec<Value> {
    let (end, candles) = messages.split_last().expect("a replay_end at least");
    assert_eq!(end["type"], "replay_end", "{what}: {end}");
    let mut finals: Vec<Value> = Vec::new();
    for message in candles {
        let candle = strip(message, symbol, interval);
        match finals.last_mut() {
            Some(last) if last["start"] == candle["start"] => {
                assert_eq!(
                    last["closed"], false,
                    "{what}: an update after the candle closed: {message}"
                );
                *last = candle;
            }
            Some(last) => {
                assert!(
                    last["start"].as_i64() < candle["start"].as_i64(),
                    "{what}: candles go forward: {message}"
                );
                assert_eq!(
                    last["closed"], true,
                    "{what}: a new candle before the last one closed: {message}"
                );
                finals.push(candle);
            }
            None => finals.push(candle),
        }
    }
    finals
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn replayed_candles_match_an_independent_computation() {
    let (_dir, file, generated) = market_file("fanout-replay");

    // The reference, and what it says about the file itself.
    let reference = python_candles(&file);
    assert_eq!(
        reference["bad_lines"],
        json!(generated.bad),
        "Python and the generator disagree about the bad lines"
    );
    assert_eq!(reference["events"], generated.events);
    assert_eq!(reference["blank_lines"], 2);
    let symbols: Vec<&str> = reference["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(symbols, SYMBOLS);
    // The file exercises every rule.
    let stats = &reference["stats"];
    assert!(stats["ticks"].as_u64().unwrap() > 50, "{stats}");
    assert!(stats["rejected"].as_u64().unwrap() > 5, "{stats}");
    for interval in ["1s", "1m", "5m"] {
        assert!(
            stats["late"][interval].as_u64().unwrap() > 5,
            "late trades at {interval}: {stats}"
        );
    }
    for interval in ["1m", "5m"] {
        assert!(
            stats["out_of_order_applied"][interval].as_u64().unwrap() > 50,
            "out-of-order trades applied at {interval}: {stats}"
        );
    }
    for symbol in SYMBOLS {
        let series = reference["candles"][symbol]["1s"].as_array().unwrap();
        assert!(
            series.len() <= 1_000,
            "{symbol} has {} 1s candles: more than the history served",
            series.len()
        );
        assert!(
            reference["candles"][symbol]["5m"].as_array().unwrap().len() >= 3,
            "{symbol}: several 5m candles"
        );
    }

    let server = Replayer::start(&file);
    let started = Instant::now();

    // Live: subscribe before the first trade is due (LEAD_MS of replay time).
    let mut live = JsonClient::ws(server.addr);
    for (symbol, interval) in LIVE {
        live.send(&json!({"type":"kline.subscribe","symbol":symbol,"interval":interval}));
        let ack = live.recv();
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(
            ack["history"],
            0,
            "subscribed after the replay's first trade ({:?} after start): {ack}",
            started.elapsed()
        );
    }
    let finished = format!(
        "replay {} finished: {} events, {} bad lines skipped",
        file.display(),
        generated.events,
        generated.bad.len()
    );
    // Every subscription ends with `replay_end`, after its last candle.
    let got_live = read_until_replay_end(&mut live, LIVE, Duration::from_secs(60), None);
    let replay_took = started.elapsed();

    // The log: every bad line by number, and the summary.
    let log = server.log();
    let prefix = format!("replay {} line ", file.display());
    let reported: Vec<usize> = log
        .iter()
        .filter_map(|l| {
            let at = l.find(&prefix)?;
            let rest = &l[at + prefix.len()..];
            assert!(rest.ends_with("; skipped"), "{l}");
            rest.split(':').next()?.parse().ok()
        })
        .collect();
    assert_eq!(
        reported,
        generated.bad,
        "bad lines in the log:\n{}",
        log.join("\n")
    );
    assert!(
        log.iter().any(|l| l.contains(&finished)),
        "expected `{finished}` in the log:\n{}",
        log.join("\n")
    );
    // And in /metrics.
    assert_eq!(server.metric("fanout_replay_finished"), 1.0);
    assert_eq!(
        server.metric("fanout_replay_events_total"),
        generated.events as f64
    );

    // The live subscriber saw every candle: each one's last state is the
    // reference's, in order; after a candle closed nothing more of it came.
    for (symbol, interval) in LIVE {
        let series = &got_live[&(symbol.to_string(), interval.to_string())];
        let what = format!("live {symbol} {interval}");
        let finals = final_states(&what, symbol, interval, series);
        let want = reference["candles"][symbol][interval].as_array().unwrap();
        compare_series(&what, &finals, want);
        let end = series.last().unwrap();
        assert_eq!(end["events"], generated.events, "{what}: {end}");
        assert_eq!(end["bad_lines"], generated.bad.len(), "{what}: {end}");
    }

    // After the replay: history (every closed candle) and the open one, for
    // every symbol and interval.
    let mut after = JsonClient::ws(server.addr);
    let mut compared = 0;
    for symbol in SYMBOLS {
        for interval in INTERVALS {
            after.send(&json!({"type":"kline.subscribe","symbol":symbol,"interval":interval,"history":1000}));
            let ack = after.recv();
            assert_eq!(ack["type"], "ack", "{ack}");
            let got: Vec<Value> = after
                .until_fence()
                .iter()
                .map(|m| strip(m, symbol, interval))
                .collect();
            let want = reference["candles"][symbol][*interval].as_array().unwrap();
            assert_eq!(ack["history"], want.len() - 1, "{symbol} {interval}: {ack}");
            compare_series(&format!("history {symbol} {interval}"), &got, want);
            compared += got.len();
        }
    }
    after.send(&json!({"type":"market.symbols"}));
    let reply = after.recv();
    assert_eq!(reply["symbols"], json!(SYMBOLS), "{reply}");
    assert!(compared > 1_500, "{compared} candles compared");
    eprintln!(
        "replay comparison: {} lines, {} events, {} bad, {compared} candles compared, replay took {replay_took:?}",
        generated.lines.len(),
        generated.events,
        generated.bad.len()
    );
}

/// Starts the replay with small queues (`--max-outbound-buffer 16KiB`,
/// `--socket-send-buffer 4KiB`), subscribes `client` to every symbol and
/// interval before the first trade is due, and returns the pairs.
fn subscribe_to_everything(
    server: &Replayer,
    client: &mut JsonClient,
    started: Instant,
) -> Vec<(&'static str, &'static str)> {
    let mut all = Vec::new();
    for symbol in SYMBOLS {
        for interval in INTERVALS {
            client.send(&json!({"type":"kline.subscribe","symbol":symbol,"interval":interval}));
            let ack = client.recv();
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(
                ack["history"],
                0,
                "subscribed after the replay's first trade ({:?} after start): {ack}",
                started.elapsed()
            );
            all.push((*symbol, *interval));
        }
    }
    assert!(
        !server.log_has(" finished: "),
        "the replay ended before it was watched"
    );
    all
}

/// Polls `/metrics` until the replay has finished (bounded).
fn wait_for_replay_end(server: &Replayer, within: Duration) {
    let deadline = Instant::now() + within;
    while server.metric("fanout_replay_finished") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "fanout_replay_finished not 1 within {within:?}; log:\n{}",
            server.log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

const SMALL_QUEUES: [&str; 4] = [
    "--max-outbound-buffer",
    "16KiB",
    "--socket-send-buffer",
    "4KiB",
];

/// A K-line subscriber that stops reading while the replay runs fast, and
/// resumes after it ended: the server held the latest state of each of its
/// candles, so it still gets every closed candle exactly once, in order,
/// with the final states of the independent computation, then
/// `replay_end`; nothing was given up. The end of the replay also reached
/// a filter on `events`, after the last replayed event.
#[test]
fn a_subscriber_that_stops_reading_still_gets_every_closed_candle() {
    let (_dir, file, generated) = market_file("fanout-replay-slow");
    let reference = python_candles(&file);

    let server = Replayer::start_with(&file, &SMALL_QUEUES);
    let started = Instant::now();
    let mut slow = JsonClient::ws(server.addr);
    let all = subscribe_to_everything(&server, &mut slow, started);
    let mut watcher = JsonClient::ws(server.addr);
    watcher.ok(json!({"type":"filter.subscribe","name":"end",
                      "filter":{"field":"type","op":"eq","value":"replay_end"}}));

    // `slow` reads nothing until the replay is over.
    wait_for_replay_end(&server, Duration::from_secs(60));
    let conflated = server.metric(r#"fanout_state_updates_total{outcome="conflated"}"#);
    assert!(
        conflated > 0.0,
        "the subscriber never fell behind: nothing was conflated"
    );
    assert!(server.metric("fanout_held_states") > 0.0);

    let got = read_until_replay_end(&mut slow, &all, Duration::from_secs(60), None);
    let mut closed = 0;
    for (symbol, interval) in &all {
        let series = &got[&(symbol.to_string(), interval.to_string())];
        let what = format!("slow {symbol} {interval}");
        let finals = final_states(&what, symbol, interval, series);
        let want = reference["candles"][symbol][*interval].as_array().unwrap();
        compare_series(&what, &finals, want);
        closed += finals.iter().filter(|c| c["closed"] == true).count();
    }
    assert_eq!(
        server.metric(r#"fanout_state_updates_total{outcome="evicted"}"#),
        0.0
    );
    assert_eq!(server.metric("fanout_held_states"), 0.0);
    slow.expect_nothing(Duration::from_millis(200));

    let matched = watcher.recv();
    assert_eq!(matched["type"], "match", "{matched}");
    let end = &matched["event"];
    assert_eq!(end["type"], "replay_end", "{matched}");
    assert_eq!(end["events"], generated.events, "{end}");
    assert_eq!(end["bad_lines"], generated.bad.len(), "{end}");
    assert_eq!(end["lines"], generated.lines.len(), "{end}");
    eprintln!(
        "slow subscriber: {closed} closed candles over {} series, {conflated} updates conflated",
        all.len()
    );
}

/// The same stalled subscriber on a server that holds at most 5 candles
/// per subscription: what it gives up is told (a `dropped` notice per
/// series naming the first and last open times lost) and counted; every
/// other closed candle still comes, and `replay_end` ends each series.
#[test]
fn candles_held_past_the_bound_are_given_up_with_a_notice() {
    let (_dir, file, _) = market_file("fanout-replay-bound");
    let reference = python_candles(&file);

    let mut flags = SMALL_QUEUES.to_vec();
    flags.extend(["--max-pending-states", "5"]);
    let server = Replayer::start_with(&file, &flags);
    let started = Instant::now();
    let mut slow = JsonClient::ws(server.addr);
    let all = subscribe_to_everything(&server, &mut slow, started);
    wait_for_replay_end(&server, Duration::from_secs(60));
    let evicted = server.metric(r#"fanout_state_updates_total{outcome="evicted"}"#);
    assert!(evicted > 0.0, "nothing given up past 5 held candles");

    // Notices come whenever the held states have all been queued: while
    // the replay runs (the kernel's buffers let a little through now and
    // then) and at the end, after the last `replay_end`.
    let mut told = Vec::new();
    let got = read_until_replay_end(&mut slow, &all, Duration::from_secs(60), Some(&mut told));
    while let Ok(notice) = slow.next(Duration::from_millis(500)) {
        told.push(notice);
        assert!(told.len() < 10_000, "notices without end");
    }
    // Per series: every notice, and the count they tell in all.
    let mut notices: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for notice in told {
        assert_eq!(notice["type"], "dropped", "{notice}");
        assert_eq!(notice["stream"], "kline", "{notice}");
        assert!(
            notice["first_start"].as_i64() <= notice["last_start"].as_i64(),
            "{notice}"
        );
        let key = (
            notice["symbol"].as_str().unwrap().to_owned(),
            notice["interval"].as_str().unwrap().to_owned(),
        );
        notices.entry(key).or_default().push(notice);
    }
    assert!(!notices.is_empty());
    let mut lost_total = 0;
    for (symbol, interval) in &all {
        let key = (symbol.to_string(), interval.to_string());
        let what = format!("bounded {symbol} {interval}");
        let want = reference["candles"][symbol][*interval].as_array().unwrap();
        let messages = &got[&key];
        let (end, candles) = messages.split_last().unwrap();
        assert_eq!(end["type"], "replay_end", "{what}: {end}");
        // In order, and nothing of a candle after its closed state; the
        // last state that came of each candle, by open time.
        let mut last: BTreeMap<i64, Value> = BTreeMap::new();
        let mut previous: Option<Value> = None;
        for message in candles {
            let candle = strip(message, symbol, interval);
            if let Some(p) = &previous {
                assert!(
                    p["start"].as_i64() <= candle["start"].as_i64(),
                    "{what}: {message}"
                );
                if p["start"] == candle["start"] {
                    assert_eq!(p["closed"], false, "{what}: after the close: {message}");
                }
            }
            last.insert(candle["start"].as_i64().unwrap(), candle.clone());
            previous = Some(candle);
        }
        // Each candle of the reference came in its final state (closed,
        // or the open one's latest) or was told lost, not both.
        let told = notices.get(&key).map(Vec::as_slice).unwrap_or_default();
        let lost: u64 = told.iter().map(|n| n["count"].as_u64().unwrap()).sum();
        lost_total += lost;
        let mut complete = 0;
        for candle in want {
            let start = candle["start"].as_i64().unwrap();
            if last.get(&start) == Some(candle) {
                complete += 1;
                continue;
            }
            assert!(
                told.iter().any(|n| {
                    (n["first_start"].as_i64().unwrap()..=n["last_start"].as_i64().unwrap())
                        .contains(&start)
                }),
                "{what}: candle {start} neither came whole nor was told lost: {told:?}"
            );
        }
        assert_eq!(
            complete + lost,
            want.len() as u64,
            "{what}: candles that came whole and candles told lost make the series"
        );
    }
    assert_eq!(lost_total as f64, evicted);
}
