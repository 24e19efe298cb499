//! K-lines: OHLCV candles per symbol and interval, aggregated from trades
//! and ticks. Pure and sans-IO: trades in, candles out; no clock is read
//! here, every time is a value the caller passes.
//!
//! The rules, which clients and the replay comparison rely on:
//! - A candle covers `[start, start + interval)` with `start` aligned to the
//!   interval in UTC, counted from the Unix epoch (so `1d` candles start at
//!   00:00 UTC; multi-day intervals align to 1970-01-01, a Thursday).
//! - An interval with no trades produces no candle: a gap in the data is a
//!   gap in the history, never a synthetic flat candle, because a made-up
//!   candle is indistinguishable from real trades at an unchanged price.
//! - A trade in a later bucket closes the open candle and opens a new one.
//! - A trade out of order but within the open candle is applied: it always
//!   counts for high, low, volume and trades; it becomes the open if it is
//!   earlier than the open's trade, and the close if it is not earlier than
//!   the close's trade (equal times: the later arrival wins).
//! - A trade for a bucket before the open candle is late: counted, dropped.
//! - Prices and volumes are exact decimals, never f64, up to the 28
//!   significant digits `Decimal` holds. Input that would need more is
//!   rejected rather than rounded; a volume sum that needs more digits than
//!   that is rounded by `Decimal` (it cannot hold it), and one that would
//!   overflow drops the trade and counts it.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

/// The intervals aggregated when the configuration names none.
pub const DEFAULT_INTERVALS: &[&str] = &["1s", "1m", "5m", "15m", "1h", "4h", "1d"];

/// A candle length, in whole seconds.
///
/// Build it with [`Interval::parse`]; a hand-built value outside
/// `1..=MAX_SECS` seconds is clamped into that range wherever it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interval {
    pub secs: u64,
}

impl Interval {
    /// Thirty days: longer candles have no use here, and the bound keeps
    /// every millisecond computation far from overflow.
    pub const MAX_SECS: u64 = 30 * 86_400;

    /// Reads `<count><unit>`, unit one of `s m h d`, e.g. `1s`, `30s`,
    /// `15m`, `4h`, `1d`. Lowercase only: `1M` means a month elsewhere.
    pub fn parse(text: &str) -> Result<Interval, String> {
        let invalid = || {
            format!(
                "invalid interval `{}`: expected a count and a unit s, m, h or d, like `1m` or `4h`, at most 30d",
                shorten(text)
            )
        };
        let unit_len = text.chars().last().map_or(0, char::len_utf8);
        let (count, unit) = text.split_at(text.len() - unit_len);
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            _ => return Err(invalid()),
        };
        // Digits only, no leading zero: one spelling per interval.
        if count.is_empty() || count.starts_with('0') || !count.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(invalid());
        }
        let secs = count
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .filter(|&secs| secs <= Self::MAX_SECS)
            .ok_or_else(invalid)?;
        Ok(Interval { secs })
    }

    /// The canonical name, in the largest unit that divides it: `60s` is
    /// named `1m`, `90s` stays `90s`.
    pub fn name(self) -> String {
        let secs = self.clamped_secs();
        match secs {
            s if s % 86_400 == 0 => format!("{}d", s / 86_400),
            s if s % 3_600 == 0 => format!("{}h", s / 3_600),
            s if s % 60 == 0 => format!("{}m", s / 60),
            s => format!("{s}s"),
        }
    }

    /// The length in milliseconds.
    pub fn ms(self) -> i64 {
        // At most 30 days, so it fits an i64 many times over.
        (self.clamped_secs() * 1_000) as i64
    }

    /// The start of the candle holding `ts_ms`: the largest multiple of the
    /// interval not after it, also for times before 1970. Saturates at the
    /// very bottom of the i64 range instead of overflowing.
    pub fn start_of(self, ts_ms: i64) -> i64 {
        ts_ms.saturating_sub(ts_ms.rem_euclid(self.ms()))
    }

    fn clamped_secs(self) -> u64 {
        self.secs.clamp(1, Self::MAX_SECS)
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for Interval {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Interval::parse(text)
    }
}

/// One trade, or a tick: a price observation with `qty` zero, which moves
/// the prices and counts in `trades` like any trade but adds no volume.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trade {
    pub price: Decimal,
    pub qty: Decimal,
    pub ts_ms: i64,
}

impl Trade {
    /// Reads market data out of an event. An event is market data when its
    /// `type` is `"trade"` or `"tick"`, it has a string `symbol` and it has
    /// a `price`; anything else (a `payment`, a `trade` event of another
    /// feed without symbol or price) is `Ok(None)`, not an error.
    ///
    /// - `price`: a decimal string or a JSON number, not negative.
    /// - `qty`, else `amount`, else zero; always zero for a tick.
    /// - `ts`: integer milliseconds since the Unix epoch; without one the
    ///   trade happened `now_ms` (arrival time).
    ///
    /// A field that is `null` counts as absent. Market data with a bad
    /// field is an error naming the field.
    pub fn from_event(
        fields: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<Option<(&str, Trade)>, String> {
        let present = |name: &str| fields.get(name).filter(|v| !v.is_null());
        let tick = match fields.get("type").and_then(Value::as_str) {
            Some("trade") => false,
            Some("tick") => true,
            _ => return Ok(None),
        };
        let (Some(Value::String(symbol)), Some(price)) = (fields.get("symbol"), present("price"))
        else {
            return Ok(None);
        };
        if symbol.is_empty() {
            return Err("field `symbol` must not be empty".to_owned());
        }
        let price = non_negative_decimal("price", price)?;
        let qty = match (tick, present("qty"), present("amount")) {
            (true, _, _) | (false, None, None) => Decimal::ZERO,
            (false, Some(qty), _) => non_negative_decimal("qty", qty)?,
            (false, None, Some(amount)) => non_negative_decimal("amount", amount)?,
        };
        let ts_ms = match present("ts") {
            None => now_ms,
            Some(ts) => ts.as_i64().ok_or_else(|| {
                format!(
                    "field `ts` must be an integer number of milliseconds since the Unix epoch, got `{}`",
                    shorten(&ts.to_string())
                )
            })?,
        };
        Ok(Some((symbol, Trade { price, qty, ts_ms })))
    }
}

fn non_negative_decimal(field: &str, value: &Value) -> Result<Decimal, String> {
    let text = match value {
        Value::String(s) => s.trim().to_owned(),
        // With `arbitrary_precision` a number displays exactly as it was
        // written, so `0.1` stays 0.1 and never passes through f64.
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    match parse_exact(&text) {
        Some(d) if d >= Decimal::ZERO => Ok(d),
        _ => Err(format!(
            "field `{field}` must be a non-negative decimal (a string like \"45000.1\" or a number) with at most 28 digits after the point, got `{}`",
            shorten(&value.to_string())
        )),
    }
}

/// Parses `[+-]digits[.digits][(e|E)[+-]digits]` exactly: `None` when the
/// text is malformed or its value cannot be held by a `Decimal` without
/// rounding. (`Decimal::from_str` would round excess digits silently and
/// accepts `_` separators; `from_scientific` also rounds.)
fn parse_exact(text: &str) -> Option<Decimal> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(at) => (&rest[..at], Some(&rest[at + 1..])),
        None => (rest, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || (mantissa.contains('.') && !all_digits(frac)) {
        return None;
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) => {
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            // A few digits are plenty: 10^±9999 is out of range anyway.
            if !all_digits(digits) || digits.len() > 4 {
                return None;
            }
            e.parse().ok()?
        }
    };
    // value = digits × 10^-scale, with the zeros that carry no value gone.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return Some(Decimal::ZERO);
    }
    let trailing_zeros = (digits.len() - significant.len()) as i64;
    let mut scale = frac.len() as i64 - exponent - trailing_zeros;
    // 29 digits always fit an i128; more never fit a Decimal.
    if significant.len() > 29 {
        return None;
    }
    let mut value: i128 = significant.parse().ok()?;
    while scale < 0 {
        value = value.checked_mul(10)?;
        scale += 1;
    }
    if scale > i64::from(Decimal::MAX_SCALE) {
        return None;
    }
    let value = Decimal::try_from_i128_with_scale(value, scale as u32).ok()?;
    Some(if negative { -value } else { value })
}

/// For error messages that quote client input: enough to recognize it.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// One OHLCV candle. `end_ms` is exclusive: the next candle may start
/// there. `trades` counts trades and ticks applied.
#[derive(Clone, Debug, PartialEq)]
pub struct Candle {
    pub start_ms: i64,
    pub end_ms: i64,
    pub open: Decimal,
    pub high: Decimal,
    pub low: Decimal,
    pub close: Decimal,
    pub volume: Decimal,
    pub trades: u64,
    pub closed: bool,
    /// Times of the trades that set `open` and `close`, so that an
    /// out-of-order trade can be placed relative to them.
    open_ts: i64,
    close_ts: i64,
}

impl Candle {
    fn first(trade: &Trade, start_ms: i64, interval: Interval) -> Self {
        Candle {
            start_ms,
            end_ms: start_ms.saturating_add(interval.ms()),
            open: trade.price,
            high: trade.price,
            low: trade.price,
            close: trade.price,
            volume: trade.qty,
            trades: 1,
            closed: false,
            open_ts: trade.ts_ms,
            close_ts: trade.ts_ms,
        }
    }

    /// Applies a trade of this candle's bucket, with the new volume already
    /// computed (it is the one step that can fail).
    fn merge(&mut self, trade: &Trade, volume: Decimal) {
        self.high = self.high.max(trade.price);
        self.low = self.low.min(trade.price);
        self.volume = volume;
        self.trades = self.trades.saturating_add(1);
        if trade.ts_ms < self.open_ts {
            self.open = trade.price;
            self.open_ts = trade.ts_ms;
        }
        if trade.ts_ms >= self.close_ts {
            self.close = trade.price;
            self.close_ts = trade.ts_ms;
        }
    }

    /// The `kline` message. Decimals are strings, exact, normalized: no
    /// trailing zeros (`45000.10` is sent as `"45000.1"`, `100.0` as
    /// `"100"`), never exponent notation. Times are integer milliseconds.
    pub fn to_json(&self, symbol: &str, interval: Interval) -> Value {
        let text = |d: Decimal| Value::String(d.normalize().to_string());
        json!({
            "type": "kline",
            "symbol": symbol,
            "interval": interval.name(),
            "start": self.start_ms,
            "end": self.end_ms,
            "open": text(self.open),
            "high": text(self.high),
            "low": text(self.low),
            "close": text(self.close),
            "volume": text(self.volume),
            "trades": self.trades,
            "closed": self.closed,
        })
    }

    /// The K-line service's message, field for field and in its order:
    /// prices as JSON floats (the nearest f64 to the exact decimal, so
    /// `45000` is written `45000.0`), the start in Unix seconds and the
    /// interval in seconds. It has no symbol, volume or closed flag.
    pub fn to_kline_text_json(&self, interval: Interval) -> String {
        // Decimal's Display is a plain decimal literal, and parsing it is
        // correctly rounded, unlike `Decimal::to_f64`.
        let float = |d: Decimal| d.to_string().parse::<f64>().unwrap_or_default();
        json!({
            "open": float(self.open),
            "high": float(self.high),
            "low": float(self.low),
            "close": float(self.close),
            "unix_timestamp": self.start_ms.div_euclid(1_000),
            "time_window_seconds": interval.clamped_secs(),
        })
        .to_string()
    }
}

/// What a trade did to a [`Series`].
///
/// Returned by value and consumed at once, never stored: boxing the large
/// variant would cost an allocation per trade to save stack bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// The open candle changed; when the trade opened a new one, the
    /// candle it replaced is `closed` (with `closed: true`).
    Updated {
        closed: Option<Candle>,
        current: Candle,
    },
    /// The trade belongs before the open candle: dropped.
    Late,
    /// The candle's volume would exceed what a `Decimal` holds: dropped.
    Overflow,
}

/// The candles of one symbol at one interval: a bounded history of closed
/// candles and the open one.
#[derive(Clone, Debug)]
pub struct Series {
    interval: Interval,
    capacity: usize,
    history: VecDeque<Candle>,
    current: Option<Candle>,
    /// Trades in buckets starting before this are late: the start of the
    /// open candle, or the end of the last closed one.
    floor_ms: i64,
    late_dropped: u64,
    overflow_dropped: u64,
}

impl Series {
    /// `history` closed candles are kept, the oldest forgotten first.
    pub fn new(interval: Interval, history: usize) -> Self {
        Series {
            interval,
            capacity: history,
            history: VecDeque::new(),
            current: None,
            floor_ms: i64::MIN,
            late_dropped: 0,
            overflow_dropped: 0,
        }
    }

    pub fn interval(&self) -> Interval {
        self.interval
    }

    pub fn apply(&mut self, trade: &Trade) -> Applied {
        let start = self.interval.start_of(trade.ts_ms);
        if start < self.floor_ms {
            self.late_dropped += 1;
            return Applied::Late;
        }
        if let Some(candle) = self.current.as_mut().filter(|c| c.start_ms == start) {
            let Some(volume) = candle.volume.checked_add(trade.qty) else {
                self.overflow_dropped += 1;
                return Applied::Overflow;
            };
            candle.merge(trade, volume);
            return Applied::Updated {
                closed: None,
                current: candle.clone(),
            };
        }
        // A later bucket (the floor rules out earlier ones).
        let closed = self.current.take().map(|candle| self.retire(candle));
        let candle = Candle::first(trade, start, self.interval);
        self.floor_ms = start;
        self.current = Some(candle.clone());
        Applied::Updated {
            closed,
            current: candle,
        }
    }

    /// Closes the open candle if it ended at or before `now_ms`, so that a
    /// quiet market still sees it closed without waiting for the next
    /// trade. Optional: without it a candle closes when a later trade
    /// arrives. `now_ms` must be on the trades' clock (for a replay, the
    /// replayed time, not the wall clock); trades for the closed bucket
    /// that arrive afterwards are late.
    pub fn close_due(&mut self, now_ms: i64) -> Option<Candle> {
        let candle = self.current.take_if(|c| c.end_ms <= now_ms)?;
        self.floor_ms = candle.end_ms;
        Some(self.retire(candle))
    }

    /// Marks a candle closed and keeps it in the history.
    fn retire(&mut self, mut candle: Candle) -> Candle {
        candle.closed = true;
        if self.capacity > 0 {
            if self.history.len() == self.capacity {
                self.history.pop_front();
            }
            self.history.push_back(candle.clone());
        }
        candle
    }

    /// Closed candles, oldest first.
    pub fn history(&self) -> impl DoubleEndedIterator<Item = &Candle> + ExactSizeIterator {
        self.history.iter()
    }

    /// The open candle, if any trade has arrived since the last one closed.
    pub fn current(&self) -> Option<&Candle> {
        self.current.as_ref()
    }

    /// Trades dropped for arriving after their candle had closed.
    pub fn late_dropped(&self) -> u64 {
        self.late_dropped
    }

    /// Trades dropped because the volume would have overflowed.
    pub fn overflow_dropped(&self) -> u64 {
        self.overflow_dropped
    }
}

/// Every symbol's series at every configured interval.
#[derive(Clone, Debug)]
pub struct Book {
    intervals: Vec<Interval>,
    history: usize,
    max_symbols: usize,
    /// Per symbol, one series per interval, in the order of `intervals`:
    /// one hash lookup per trade, by `&str`, with no key to allocate.
    series: HashMap<String, Vec<Series>>,
}

impl Book {
    /// Intervals are kept sorted, shortest first, without duplicates.
    /// A symbol's series are created by its first trade, up to
    /// `max_symbols` symbols.
    pub fn new(mut intervals: Vec<Interval>, history: usize, max_symbols: usize) -> Self {
        intervals.sort_unstable();
        intervals.dedup();
        Book {
            intervals,
            history,
            max_symbols,
            series: HashMap::new(),
        }
    }

    /// Applies a trade at every interval, in the order of [`Book::intervals`].
    /// A new symbol beyond `max_symbols` is an error and nothing changes.
    pub fn apply(
        &mut self,
        symbol: &str,
        trade: &Trade,
    ) -> Result<Vec<(Interval, Applied)>, String> {
        if !self.series.contains_key(symbol) {
            if self.series.len() >= self.max_symbols {
                return Err(format!(
                    "symbol limit reached: already aggregating {} symbols, `{}` is not one of them",
                    self.max_symbols,
                    shorten(symbol)
                ));
            }
            let fresh = self
                .intervals
                .iter()
                .map(|&interval| Series::new(interval, self.history))
                .collect();
            self.series.insert(symbol.to_owned(), fresh);
        }
        let series = self.series.get_mut(symbol).into_iter().flatten();
        Ok(series.map(|s| (s.interval(), s.apply(trade))).collect())
    }

    /// Closes every open candle that ended at or before `now_ms`; see
    /// [`Series::close_due`]. Sorted by symbol, then interval.
    pub fn close_due(&mut self, now_ms: i64) -> Vec<(String, Interval, Candle)> {
        let mut closed = Vec::new();
        for (symbol, all) in &mut self.series {
            for series in all {
                if let Some(candle) = series.close_due(now_ms) {
                    closed.push((symbol.clone(), series.interval(), candle));
                }
            }
        }
        closed.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        closed
    }

    pub fn series(&self, symbol: &str, interval: Interval) -> Option<&Series> {
        let at = self.intervals.iter().position(|&i| i == interval)?;
        self.series.get(symbol).map(|all| &all[at])
    }

    /// Symbols with at least one trade, sorted.
    pub fn symbols(&self) -> Vec<String> {
        let mut symbols: Vec<String> = self.series.keys().cloned().collect();
        symbols.sort_unstable();
        symbols
    }

    pub fn intervals(&self) -> &[Interval] {
        &self.intervals
    }

    /// Late trades dropped, over every series.
    pub fn late_dropped(&self) -> u64 {
        self.series
            .values()
            .flatten()
            .map(Series::late_dropped)
            .sum()
    }

    /// Trades dropped for volume overflow, over every series.
    pub fn overflow_dropped(&self) -> u64 {
        self.series
            .values()
            .flatten()
            .map(Series::overflow_dropped)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn d(text: &str) -> Decimal {
        parse_exact(text).unwrap_or_else(|| panic!("test decimal `{text}`"))
    }

    fn iv(text: &str) -> Interval {
        Interval::parse(text).unwrap()
    }

    fn trade(price: &str, qty: &str, ts_ms: i64) -> Trade {
        Trade {
            price: d(price),
            qty: d(qty),
            ts_ms,
        }
    }

    fn event(json: Value) -> Map<String, Value> {
        match json {
            Value::Object(fields) => fields,
            _ => panic!("not an object"),
        }
    }

    fn current(applied: Applied) -> Candle {
        match applied {
            Applied::Updated { current, .. } => current,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    fn closed(applied: Applied) -> Option<Candle> {
        match applied {
            Applied::Updated { closed, .. } => closed,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    // ---- intervals ----

    #[test]
    fn interval_parses_and_names_canonically() {
        for (text, secs, name) in [
            ("1s", 1, "1s"),
            ("30s", 30, "30s"),
            ("1m", 60, "1m"),
            ("5m", 300, "5m"),
            ("15m", 900, "15m"),
            ("1h", 3_600, "1h"),
            ("2h", 7_200, "2h"),
            ("4h", 14_400, "4h"),
            ("1d", 86_400, "1d"),
            ("60s", 60, "1m"),
            ("90s", 90, "90s"),
            ("120m", 7_200, "2h"),
            ("30d", 30 * 86_400, "30d"),
        ] {
            let interval = iv(text);
            assert_eq!(interval.secs, secs, "{text}");
            assert_eq!(interval.name(), name, "{text}");
            assert_eq!(interval.to_string(), name, "{text}");
            assert_eq!(interval.ms(), secs as i64 * 1_000, "{text}");
            assert_eq!(name.parse::<Interval>(), Ok(interval));
        }
    }

    #[test]
    fn interval_rejects_malformed_and_out_of_range() {
        for text in [
            "",
            "m",
            "1",
            "0s",
            "0m",
            "01m",
            "-1m",
            "+1m",
            " 1m",
            "1m ",
            "1.5m",
            "1M",
            "1w",
            "1H",
            "31d",
            "1mm",
            "1é",
            "99999999999999999999999s",
            "18446744073709551615d",
        ] {
            let err = Interval::parse(text).unwrap_err();
            assert!(err.contains("interval"), "{text}: {err}");
        }
    }

    #[test]
    fn default_intervals_all_parse() {
        let parsed: Vec<String> = DEFAULT_INTERVALS.iter().map(|t| iv(t).name()).collect();
        assert_eq!(parsed, DEFAULT_INTERVALS);
    }

    #[test]
    fn hand_built_intervals_are_clamped_not_panicking() {
        let zero = Interval { secs: 0 };
        assert_eq!(zero.ms(), 1_000);
        assert_eq!(zero.start_of(1_500), 1_000);
        let huge = Interval { secs: u64::MAX };
        assert_eq!(huge.ms(), Interval::MAX_SECS as i64 * 1_000);
    }

    #[test]
    fn candle_starts_align_to_the_interval_in_utc() {
        // 2025-05-28 21:03:17.250 UTC
        let ts = 1_748_466_197_250;
        assert_eq!(iv("1s").start_of(ts), 1_748_466_197_000);
        assert_eq!(iv("1m").start_of(ts), 1_748_466_180_000);
        assert_eq!(iv("5m").start_of(ts), 1_748_466_000_000); // 21:00
        assert_eq!(iv("15m").start_of(ts), 1_748_466_000_000);
        assert_eq!(iv("1h").start_of(ts), 1_748_466_000_000);
        assert_eq!(iv("4h").start_of(ts), 1_748_462_400_000); // 20:00
        assert_eq!(iv("1d").start_of(ts), 1_748_390_400_000); // 00:00
                                                              // A boundary belongs to the candle it starts.
        assert_eq!(iv("1m").start_of(1_748_466_180_000), 1_748_466_180_000);
        assert_eq!(iv("1m").start_of(1_748_466_179_999), 1_748_466_120_000);
    }

    #[test]
    fn candle_starts_before_1970_round_down_not_toward_zero() {
        let m = iv("1m");
        assert_eq!(m.start_of(-1), -MIN);
        assert_eq!(m.start_of(-MIN), -MIN);
        assert_eq!(m.start_of(-MIN - 1), -2 * MIN);
        assert_eq!(m.start_of(0), 0);
        assert_eq!(iv("1d").start_of(-1), -86_400_000);
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        for interval in DEFAULT_INTERVALS.iter().map(|t| iv(t)) {
            let mut series = Series::new(interval, 2);
            current(series.apply(&trade("1", "1", i64::MIN)));
            current(series.apply(&trade("2", "1", i64::MIN + 1)));
            let top = current(series.apply(&trade("3", "1", i64::MAX)));
            assert_eq!(top.end_ms, i64::MAX);
            current(series.apply(&trade("4", "1", i64::MAX)));
            assert_eq!(series.current().unwrap().trades, 2);
            assert_eq!(series.current().unwrap().close, d("4"));
        }
    }

    // ---- decimals ----

    #[test]
    fn decimals_parse_exactly_or_not_at_all() {
        for (text, expected) in [
            ("0", "0"),
            ("-0", "0"),
            ("+5", "5"),
            ("45000.10", "45000.1"),
            ("0.000000000000000001", "0.000000000000000001"),
            ("1e-18", "0.000000000000000001"),
            ("1E20", "100000000000000000000"),
            ("-1.5e+3", "-1500"),
            ("12.5e-1", "1.25"),
            ("0.0010010979158340965", "0.0010010979158340965"),
            ("0001.5000000000000000000000000000000000", "1.5"),
            ("1e-28", "0.0000000000000000000000000001"),
            (
                "79228162514264337593543950335",
                "79228162514264337593543950335",
            ),
            (
                "7.9228162514264337593543950335e28",
                "79228162514264337593543950335",
            ),
            ("0e9999", "0"),
        ] {
            let value = parse_exact(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(value.normalize().to_string(), expected, "{text}");
        }
        for text in [
            "",
            " ",
            ".",
            "1.",
            ".5",
            "-",
            "1e",
            "e5",
            "1e+",
            "1_000",
            "0x10",
            "1,5",
            "NaN",
            "inf",
            "1..2",
            "1e5.5",
            "1e99999",
            // Not representable without rounding:
            "0.12345678901234567890123456789012",
            "1e-29",
            "79228162514264337593543950336",
            "1e29",
        ] {
            assert_eq!(parse_exact(text), None, "{text}");
        }
    }

    // ---- events ----

    #[test]
    fn trade_events_are_market_data() {
        let fields = event(
            json!({"type": "trade", "symbol": "BTC-USD", "price": "45000.10", "qty": "0.5", "ts": 1_748_466_197_250_i64}),
        );
        let (symbol, t) = Trade::from_event(&fields, 7).unwrap().unwrap();
        assert_eq!(symbol, "BTC-USD");
        assert_eq!(t, trade("45000.1", "0.5", 1_748_466_197_250));
    }

    #[test]
    fn json_number_prices_are_read_exactly() {
        let fields: Map<String, Value> = serde_json::from_str(
            r#"{"type":"trade","symbol":"X","price":0.10000000000000000001,"qty":1e-18,"ts":5}"#,
        )
        .unwrap();
        let (_, t) = Trade::from_event(&fields, 0).unwrap().unwrap();
        assert_eq!(t.price.to_string(), "0.10000000000000000001");
        assert_eq!(t.qty.to_string(), "0.000000000000000001");
    }

    #[test]
    fn qty_falls_back_to_amount_then_zero() {
        let read = |json| Trade::from_event(&event(json), 0).unwrap().unwrap().1.qty;
        assert_eq!(
            read(json!({"type": "trade", "symbol": "X", "price": "1", "amount": "3"})),
            d("3")
        );
        assert_eq!(
            read(json!({"type": "trade", "symbol": "X", "price": "1", "qty": "2", "amount": "3"})),
            d("2")
        );
        assert_eq!(
            read(json!({"type": "trade", "symbol": "X", "price": "1", "qty": null, "amount": "3"})),
            d("3")
        );
        assert_eq!(
            read(json!({"type": "trade", "symbol": "X", "price": "1"})),
            Decimal::ZERO
        );
    }

    #[test]
    fn ticks_have_zero_qty_whatever_they_say() {
        let fields = event(json!({"type": "tick", "symbol": "X", "price": 2, "qty": "5", "ts": 9}));
        let (_, t) = Trade::from_event(&fields, 0).unwrap().unwrap();
        assert_eq!(t, trade("2", "0", 9));
    }

    #[test]
    fn missing_ts_means_arrival_time() {
        let fields = event(json!({"type": "tick", "symbol": "X", "price": "2"}));
        assert_eq!(
            Trade::from_event(&fields, 1_234).unwrap().unwrap().1.ts_ms,
            1_234
        );
        let fields = event(json!({"type": "tick", "symbol": "X", "price": "2", "ts": null}));
        assert_eq!(
            Trade::from_event(&fields, 1_234).unwrap().unwrap().1.ts_ms,
            1_234
        );
        let fields = event(json!({"type": "tick", "symbol": "X", "price": "2", "ts": -5}));
        assert_eq!(
            Trade::from_event(&fields, 1_234).unwrap().unwrap().1.ts_ms,
            -5
        );
    }

    #[test]
    fn other_events_are_not_market_data() {
        for json in [
            json!({"type": "payment", "symbol": "X", "price": "1"}),
            json!({"type": "contract_event", "ledger": 1}),
            json!({"type": "trade", "account_id": "GABC", "asset_code": "USDC", "amount": "100"}),
            json!({"type": "trade", "symbol": "X"}),
            json!({"type": "trade", "symbol": "X", "price": null}),
            json!({"type": "trade", "symbol": 5, "price": "1"}),
            json!({"type": "TRADE", "symbol": "X", "price": "1"}),
            json!({"symbol": "X", "price": "1"}),
        ] {
            assert_eq!(
                Trade::from_event(&event(json.clone()), 0),
                Ok(None),
                "{json}"
            );
        }
    }

    #[test]
    fn bad_market_fields_are_errors_naming_the_field() {
        for (json, field) in [
            (
                json!({"type": "trade", "symbol": "X", "price": "abc"}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "-1"}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": -0.5}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": true}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1_000"}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "0.12345678901234567890123456789"}),
                "`price`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "qty": "-1"}),
                "`qty`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "qty": [1]}),
                "`qty`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "amount": "lots"}),
                "`amount`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "ts": 1.5}),
                "`ts`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "ts": "1748466197250"}),
                "`ts`",
            ),
            (
                json!({"type": "trade", "symbol": "X", "price": "1", "ts": u64::MAX}),
                "`ts`",
            ),
            (
                json!({"type": "tick", "symbol": "", "price": "1"}),
                "`symbol`",
            ),
        ] {
            let err = Trade::from_event(&event(json.clone()), 0).unwrap_err();
            assert!(err.contains(field), "{json}: {err}");
        }
    }

    #[test]
    fn error_messages_quote_long_input_shortened() {
        let long = "9".repeat(10_000);
        let err = Trade::from_event(
            &event(json!({"type": "trade", "symbol": "X", "price": long})),
            0,
        )
        .unwrap_err();
        assert!(err.len() < 300, "{err}");
    }

    // ---- series ----

    #[test]
    fn first_trade_opens_a_candle() {
        let mut series = Series::new(iv("1m"), 10);
        assert!(series.current().is_none());
        let applied = series.apply(&trade("100", "2", 3 * MIN + 5));
        let candle = Candle::first(&trade("100", "2", 3 * MIN + 5), 3 * MIN, iv("1m"));
        assert_eq!(
            applied,
            Applied::Updated {
                closed: None,
                current: candle.clone()
            }
        );
        assert_eq!(candle.start_ms, 3 * MIN);
        assert_eq!(candle.end_ms, 4 * MIN);
        assert_eq!(
            (candle.open, candle.high, candle.low, candle.close),
            (d("100"), d("100"), d("100"), d("100"))
        );
        assert_eq!(
            (candle.volume, candle.trades, candle.closed),
            (d("2"), 1, false)
        );
        assert_eq!(series.current(), Some(&candle));
        assert_eq!(series.history().count(), 0);
    }

    #[test]
    fn trades_in_one_bucket_aggregate_ohlcv() {
        let mut series = Series::new(iv("1m"), 10);
        for (i, (price, qty)) in [("10", "1"), ("12", "0.5"), ("9", "2"), ("11", "0.25")]
            .iter()
            .enumerate()
        {
            series.apply(&trade(price, qty, i as i64 * 1_000));
        }
        let c = series.current().unwrap();
        assert_eq!(
            (c.open, c.high, c.low, c.close),
            (d("10"), d("12"), d("9"), d("11"))
        );
        assert_eq!((c.volume, c.trades, c.closed), (d("3.75"), 4, false));
    }

    #[test]
    fn a_later_bucket_closes_the_open_candle() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "1", 0));
        series.apply(&trade("11", "1", MIN - 1));
        let applied = series.apply(&trade("12", "1", MIN));
        let Applied::Updated {
            closed: Some(old),
            current: new,
        } = applied
        else {
            panic!("{applied:?}");
        };
        assert!(old.closed);
        assert_eq!(
            (old.start_ms, old.end_ms, old.close, old.trades),
            (0, MIN, d("11"), 2)
        );
        assert!(!new.closed);
        assert_eq!((new.start_ms, new.open, new.trades), (MIN, d("12"), 1));
        assert_eq!(series.history().collect::<Vec<_>>(), [&old]);
        assert_eq!(series.current(), Some(&new));
    }

    #[test]
    fn intervals_without_trades_produce_no_candle() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "1", 0));
        // Nothing for minutes 1 to 4.
        let applied = series.apply(&trade("20", "1", 5 * MIN + 1));
        assert_eq!(closed(applied).unwrap().start_ms, 0);
        let starts: Vec<i64> = series.history().map(|c| c.start_ms).collect();
        assert_eq!(starts, [0]);
        assert_eq!(series.current().unwrap().start_ms, 5 * MIN);
        assert_eq!(series.current().unwrap().open, d("20"));
    }

    #[test]
    fn out_of_order_trades_in_the_open_candle_are_applied() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "1", 30_000));
        // Earlier: new open, close unchanged.
        let c = current(series.apply(&trade("8", "1", 10_000)));
        assert_eq!(
            (c.open, c.close, c.low, c.high),
            (d("8"), d("10"), d("8"), d("10"))
        );
        // Later: new close, open unchanged.
        let c = current(series.apply(&trade("12", "1", 50_000)));
        assert_eq!((c.open, c.close, c.high), (d("8"), d("12"), d("12")));
        // In between: only high/low/volume/trades.
        let c = current(series.apply(&trade("20", "1", 40_000)));
        assert_eq!(
            (c.open, c.close, c.high, c.low),
            (d("8"), d("12"), d("20"), d("8"))
        );
        assert_eq!((c.volume, c.trades), (d("4"), 4));
        assert_eq!(series.late_dropped(), 0);
    }

    #[test]
    fn equal_times_later_arrival_is_the_close_first_stays_the_open() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "1", 5_000));
        let c = current(series.apply(&trade("11", "1", 5_000)));
        assert_eq!((c.open, c.close), (d("10"), d("11")));
        let c = current(series.apply(&trade("12", "1", 5_000)));
        assert_eq!((c.open, c.close), (d("10"), d("12")));
    }

    #[test]
    fn trades_for_closed_candles_are_counted_and_dropped() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "1", 0));
        series.apply(&trade("11", "1", 5 * MIN));
        let before = (
            series.history().cloned().collect::<Vec<_>>(),
            series.current().cloned(),
        );
        // For the closed candle, and for an empty bucket already passed.
        assert_eq!(series.apply(&trade("99", "1", 30_000)), Applied::Late);
        assert_eq!(series.apply(&trade("99", "1", 3 * MIN)), Applied::Late);
        assert_eq!(series.apply(&trade("99", "1", 5 * MIN - 1)), Applied::Late);
        assert_eq!(series.late_dropped(), 3);
        let after = (
            series.history().cloned().collect::<Vec<_>>(),
            series.current().cloned(),
        );
        assert_eq!(before, after);
        // The open candle's own start is not late.
        assert!(matches!(
            series.apply(&trade("9", "1", 5 * MIN)),
            Applied::Updated { .. }
        ));
    }

    #[test]
    fn negative_timestamps_aggregate_like_any_other() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("1", "1", -MIN - 1));
        let c = current(series.apply(&trade("2", "1", -2 * MIN)));
        assert_eq!(
            (c.start_ms, c.end_ms, c.trades, c.open),
            (-2 * MIN, -MIN, 2, d("2"))
        );
        let c = current(series.apply(&trade("2", "1", -MIN)));
        assert_eq!((c.start_ms, c.trades), (-MIN, 1));
        let c = current(series.apply(&trade("3", "1", -1)));
        assert_eq!(
            (c.start_ms, c.end_ms, c.trades, c.close),
            (-MIN, 0, 2, d("3"))
        );
        let c = current(series.apply(&trade("4", "1", 0)));
        assert_eq!((c.start_ms, c.trades), (0, 1));
        assert_eq!(series.history().count(), 2);
    }

    #[test]
    fn huge_and_tiny_prices_are_exact() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("0.000000000000000001", "100000000000000000000", 0));
        series.apply(&trade("100000000000000000000", "0.000000000000000001", 1));
        series.apply(&trade("0.000000000000000002", "1", 2));
        let c = series.current().unwrap();
        assert_eq!(c.open.to_string(), "0.000000000000000001");
        assert_eq!(c.low.to_string(), "0.000000000000000001");
        assert_eq!(c.high.to_string(), "100000000000000000000");
        assert_eq!(c.close.to_string(), "0.000000000000000002");
        let message = c.to_json("X", iv("1m"));
        assert_eq!(message["open"], "0.000000000000000001");
        assert_eq!(message["high"], "100000000000000000000");
        // 1e20 + 1e-18 + 1 needs 39 digits: Decimal keeps the 28 it can.
        assert_eq!(c.volume.to_string().len(), 30);
        assert!(c.volume.to_string().starts_with("100000000000000000001.0"));
    }

    #[test]
    fn volume_is_an_exact_decimal_sum() {
        let mut series = Series::new(iv("1h"), 10);
        for i in 0..1_000 {
            series.apply(&trade("1", "0.1", i));
            series.apply(&trade("1", "0.2", i));
        }
        let c = series.current().unwrap();
        assert_eq!(c.volume, d("300"));
        assert_eq!(c.trades, 2_000);
        // Where f64 would say 0.30000000000000004:
        let mut series = Series::new(iv("1h"), 10);
        series.apply(&trade("1", "0.1", 0));
        let c = current(series.apply(&trade("1", "0.2", 1)));
        assert_eq!(c.to_json("X", iv("1h"))["volume"], "0.3");
    }

    #[test]
    fn ticks_move_prices_but_not_volume() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("10", "2", 0));
        let c = current(series.apply(&trade("15", "0", 1)));
        assert_eq!(
            (c.high, c.close, c.volume, c.trades),
            (d("15"), d("15"), d("2"), 2)
        );
    }

    #[test]
    fn volume_overflow_drops_the_trade_instead_of_panicking() {
        let max = Decimal::MAX.to_string();
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("1", &max, 0));
        assert_eq!(series.apply(&trade("2", "1", 1)), Applied::Overflow);
        assert_eq!(series.overflow_dropped(), 1);
        let c = series.current().unwrap();
        assert_eq!((c.close, c.trades, c.volume), (d("1"), 1, Decimal::MAX));
        // A new candle starts from the trade's own qty, so it always fits.
        assert!(matches!(
            series.apply(&trade("3", &max, MIN)),
            Applied::Updated { .. }
        ));
    }

    #[test]
    fn history_is_bounded_and_oldest_first() {
        let mut series = Series::new(iv("1s"), 3);
        for i in 0..10 {
            series.apply(&trade(&i.to_string(), "1", i * 1_000));
        }
        let opens: Vec<Decimal> = series.history().map(|c| c.open).collect();
        assert_eq!(opens, [d("6"), d("7"), d("8")]);
        assert!(series.history().all(|c| c.closed));
        assert_eq!(series.current().unwrap().open, d("9"));
        assert_eq!(series.history().next_back().unwrap().open, d("8"));
        assert_eq!(series.history().len(), 3);
    }

    #[test]
    fn zero_history_keeps_only_the_open_candle() {
        let mut series = Series::new(iv("1s"), 0);
        series.apply(&trade("1", "1", 0));
        let applied = series.apply(&trade("2", "1", 1_000));
        assert!(closed(applied).unwrap().closed);
        assert_eq!(series.history().count(), 0);
        assert_eq!(series.current().unwrap().open, d("2"));
    }

    #[test]
    fn close_due_closes_an_ended_candle_and_later_trades_for_it_are_late() {
        let mut series = Series::new(iv("1m"), 10);
        assert_eq!(series.close_due(10 * MIN), None);
        series.apply(&trade("10", "1", 1_000));
        assert_eq!(series.close_due(MIN - 1), None);
        let closed = series.close_due(MIN).unwrap();
        assert!(closed.closed);
        assert_eq!(series.current(), None);
        assert_eq!(series.history().collect::<Vec<_>>(), [&closed]);
        assert_eq!(series.apply(&trade("11", "1", 2_000)), Applied::Late);
        assert_eq!(series.late_dropped(), 1);
        // The next bucket opens normally, with nothing more to close.
        let applied = series.apply(&trade("12", "1", MIN));
        assert_eq!(self::closed(applied), None);
        assert_eq!(series.history().count(), 1);
    }

    /// An independent model: group the accepted trades by bucket and
    /// compute each candle from scratch, then compare every field.
    #[test]
    fn matches_a_from_scratch_computation_on_shuffled_trades() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        for interval in ["1s", "1m", "5m"].map(iv) {
            let mut arrivals = Vec::new();
            let mut clock: i64 = 1_748_466_000_000;
            for _ in 0..3_000 {
                clock += next(3_000) as i64;
                // Up to 90 s late, sometimes.
                let jitter = if next(4) == 0 { next(90_000) as i64 } else { 0 };
                let price = Decimal::new(next(1_000_000) as i64 + 1, next(12) as u32);
                let qty = Decimal::new(next(10_000) as i64, next(8) as u32);
                arrivals.push(Trade {
                    price,
                    qty,
                    ts_ms: clock - jitter,
                });
            }
            let mut series = Series::new(interval, usize::MAX);
            for t in &arrivals {
                series.apply(t);
            }

            let mut floor = i64::MIN;
            let mut expected: Vec<(i64, Vec<(usize, &Trade)>)> = Vec::new();
            let mut late = 0;
            for (arrival, t) in arrivals.iter().enumerate() {
                let start = interval.start_of(t.ts_ms);
                if start < floor {
                    late += 1;
                    continue;
                }
                floor = start;
                match expected.last_mut() {
                    Some((s, trades)) if *s == start => trades.push((arrival, t)),
                    _ => expected.push((start, vec![(arrival, t)])),
                }
            }
            let mut got: Vec<&Candle> = series.history().collect();
            got.extend(series.current());
            assert_eq!(got.len(), expected.len());
            assert_eq!(series.late_dropped(), late);
            for (candle, (start, trades)) in got.iter().zip(&expected) {
                let open = trades
                    .iter()
                    .min_by_key(|(arrival, t)| (t.ts_ms, *arrival))
                    .unwrap()
                    .1;
                let close = trades
                    .iter()
                    .max_by_key(|(arrival, t)| (t.ts_ms, *arrival))
                    .unwrap()
                    .1;
                assert_eq!(candle.start_ms, *start);
                assert_eq!(candle.end_ms, start + interval.ms());
                assert_eq!(candle.open, open.price);
                assert_eq!(candle.close, close.price);
                assert_eq!(
                    candle.high,
                    trades.iter().map(|(_, t)| t.price).max().unwrap()
                );
                assert_eq!(
                    candle.low,
                    trades.iter().map(|(_, t)| t.price).min().unwrap()
                );
                assert_eq!(
                    candle.volume,
                    trades.iter().map(|(_, t)| t.qty).sum::<Decimal>()
                );
                assert_eq!(candle.trades, trades.len() as u64);
            }
            assert!(got[..got.len() - 1].iter().all(|c| c.closed));
            assert!(!got.last().unwrap().closed);
            assert!(late > 0, "the jitter should make some trades late");
        }
    }

    // ---- messages ----

    #[test]
    fn kline_message_has_every_field_as_exact_strings() {
        let mut series = Series::new(iv("1m"), 10);
        series.apply(&trade("45000.10", "0.50", 1_748_466_197_250));
        let c = current(series.apply(&trade("45010.00", "1.000", 1_748_466_198_000)));
        let message = c.to_json("BTC-USD", iv("1m"));
        assert_eq!(
            message.to_string(),
            r#"{"type":"kline","symbol":"BTC-USD","interval":"1m","start":1748466180000,"end":1748466240000,"open":"45000.1","high":"45010","low":"45000.1","close":"45010","volume":"1.5","trades":2,"closed":false}"#
        );
    }

    #[test]
    fn kline_text_message_has_the_kline_service_shape() {
        let mut series = Series::new(iv("5m"), 10);
        series.apply(&trade("0.001", "1", 1_748_465_400_000));
        series.apply(&trade("0.0010010979158340965", "1", 1_748_465_401_000));
        series.apply(&trade("0.001001096106439179", "1", 1_748_465_402_000));
        let c = series.current().unwrap();
        assert_eq!(
            c.to_kline_text_json(iv("5m")),
            r#"{"open":0.001,"high":0.0010010979158340965,"low":0.001,"close":0.001001096106439179,"unix_timestamp":1748465400,"time_window_seconds":300}"#
        );
    }

    #[test]
    fn kline_text_message_writes_whole_and_extreme_prices_as_floats() {
        let mut series = Series::new(iv("1s"), 10);
        series.apply(&trade("45000", "1", 1_000));
        series.apply(&trade("100000000000000000000", "1", 1_001));
        series.apply(&trade("0.000000000000000001", "1", 1_002));
        let text = series.current().unwrap().to_kline_text_json(iv("1s"));
        assert_eq!(
            text,
            r#"{"open":45000.0,"high":1e+20,"low":1e-18,"close":1e-18,"unix_timestamp":1,"time_window_seconds":1}"#
        );
        let parsed: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed["high"].as_f64(), Some(1e20));
    }

    // ---- book ----

    fn book(max_symbols: usize) -> Book {
        let intervals = ["1h", "1s", "1m", "1s"].map(iv).to_vec();
        Book::new(intervals, 5, max_symbols)
    }

    #[test]
    fn book_sorts_and_dedups_intervals() {
        assert_eq!(book(1).intervals(), ["1s", "1m", "1h"].map(iv));
    }

    #[test]
    fn book_applies_a_trade_at_every_interval() {
        let mut book = book(4);
        let applied = book.apply("BTC-USD", &trade("10", "1", 0)).unwrap();
        assert_eq!(
            applied.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            book.intervals()
        );
        let applied = book.apply("BTC-USD", &trade("11", "1", 1_500)).unwrap();
        let closed: Vec<bool> = applied
            .into_iter()
            .map(|(_, a)| closed(a).is_some())
            .collect();
        assert_eq!(closed, [true, false, false]);
        let s = book.series("BTC-USD", iv("1m")).unwrap();
        assert_eq!(s.interval(), iv("1m"));
        assert_eq!(s.current().unwrap().trades, 2);
        assert_eq!(
            book.series("BTC-USD", iv("1s")).unwrap().history().count(),
            1
        );
        assert!(book.series("BTC-USD", iv("5m")).is_none());
        assert!(book.series("ETH-USD", iv("1m")).is_none());
    }

    #[test]
    fn book_limits_symbols_and_lists_them_sorted() {
        let mut book = book(2);
        book.apply("b", &trade("1", "1", 0)).unwrap();
        book.apply("a", &trade("1", "1", 0)).unwrap();
        let err = book.apply("c", &trade("1", "1", 0)).unwrap_err();
        assert!(err.contains("symbol limit") && err.contains("`c`"), "{err}");
        assert!(book.series("c", iv("1s")).is_none());
        // Known symbols keep working.
        book.apply("a", &trade("1", "1", 1)).unwrap();
        assert_eq!(book.symbols(), ["a", "b"]);
        assert!(Book::new(vec![iv("1m")], 5, 0)
            .apply("a", &trade("1", "1", 0))
            .is_err());
    }

    #[test]
    fn book_counts_drops_and_closes_due_candles() {
        let mut book = book(2);
        book.apply("b", &trade("1", "1", 0)).unwrap();
        book.apply("a", &trade("1", "1", 0)).unwrap();
        book.apply("a", &trade("1", "1", 2_000)).unwrap();
        let late = book.apply("a", &trade("1", "1", 500)).unwrap();
        assert_eq!(late[0].1, Applied::Late);
        assert_eq!(book.late_dropped(), 1);
        assert_eq!(book.overflow_dropped(), 0);
        let due: Vec<(String, Interval)> = book
            .close_due(MIN)
            .into_iter()
            .map(|(s, i, _)| (s, i))
            .collect();
        assert_eq!(
            due,
            [
                ("a".to_owned(), iv("1s")),
                ("a".to_owned(), iv("1m")),
                ("b".to_owned(), iv("1s")),
                ("b".to_owned(), iv("1m")),
            ]
        );
        assert!(book.series("a", iv("1h")).unwrap().current().is_some());
    }
}
