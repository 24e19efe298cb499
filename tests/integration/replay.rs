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

use crate::support::json_client;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use json_client::{Ended, JsonClient};
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args(["--listen", "127.0.0.1:0", "--no-sim", "--replay"])
            .arg(file)
            .args(["--replay-speed", SPEED, "--kline-history", "1000"])
            .arg("--kline-intervals")
            .arg(INTERVALS.join(","))
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

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

#[test]
fn replayed_candles_match_an_independent_computation() {
    let dir = tempfile::Builder::new()
        .prefix("fanout-replay")
        .tempdir()
        .unwrap();
    let file = dir.path().join("market.ndjson");
    let generated = generate();
    write_file(&file, &generated);

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
    let mut got_live: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let finished = format!(
        "replay {} finished: {} events, {} bad lines skipped",
        file.display(),
        generated.events,
        generated.bad.len()
    );
    let mut record = |message: Value| {
        assert_eq!(message["type"], "kline", "{message}");
        let key = (
            message["symbol"].as_str().unwrap().to_owned(),
            message["interval"].as_str().unwrap().to_owned(),
        );
        got_live.entry(key).or_default().push(message);
    };
    while !server.log_has(" finished: ") {
        assert!(
            Instant::now() < deadline,
            "no summary line within 60 s; log:\n{}",
            server.log().join("\n")
        );
        match live.next(Duration::from_millis(50)) {
            Ok(message) => record(message),
            Err(Ended::TimedOut) => {}
            Err(e) => panic!("the live subscriber's connection ended: {e:?}"),
        }
    }
    // The summary is logged as the last events are handed out; everything
    // they caused is queued before the reply to a later request.
    for message in live.until_fence() {
        record(message);
    }
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

    // The live subscriber saw every candle: each one's last state is the
    // reference's, in order; after a candle closed nothing more of it came.
    for (symbol, interval) in LIVE {
        let messages = got_live
            .remove(&(symbol.to_string(), interval.to_string()))
            .unwrap_or_default();
        let what = format!("live {symbol} {interval}");
        let mut finals: Vec<Value> = Vec::new();
        for message in &messages {
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
        let want = reference["candles"][symbol][interval].as_array().unwrap();
        compare_series(&what, &finals, want);
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
