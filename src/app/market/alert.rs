//! Alerts: a condition on a stream with a trigger, delivered to the client
//! that created it.
//!
//! Two kinds:
//! - **K-line alerts** watch one field (`open`, `high`, `low`, `close`,
//!   `volume`; default `close`) of one symbol's candles at one interval, with
//!   a [`Condition`] against a decimal threshold. The caller feeds every
//!   change of that series to [`Alert::on_candle`]: each update of the open
//!   candle, and its close.
//! - **Event alerts** carry a [`Filter`] instead; every event that
//!   matches it triggers ([`Alert::on_event`]).
//!
//! # Request
//!
//! ```json
//! {"symbol": "BTC-USD", "interval": "1m", "field": "close",
//!  "condition": "crosses_above", "value": "45000",
//!  "cooldown": 60, "once": false, "alert": "my-id"}
//! {"filter": {"field": "amount", "op": "gte", "value": "1000"}, "cooldown": 0}
//! ```
//!
//! `value` is a number or a decimal string; `cooldown` is a number of
//! seconds (fractions allowed, truncated to whole milliseconds; default
//! 60, at most [`MAX_COOLDOWN_SECS`]); `once` a boolean (default false);
//! `alert` an optional client-chosen id (a non-empty string of at most
//! [`MAX_NAME_LEN`] bytes). `symbol` and `interval` are non-empty strings
//! (at most [`MAX_NAME_LEN`] bytes); whether the server serves that interval
//! is for the caller to check. With `filter`, none of `symbol`, `interval`,
//! `field`, `condition`, `value` may be given. Other keys (`type`, `id`) are
//! ignored. Errors name the field (``field `cooldown` must be …``; filter
//! errors name the path inside it, ``field `filter.all[0].op`: …``).
//!
//! # Triggers
//!
//! For each observation `value` (the series' field after a change):
//! - `above` / `below`: fires while `value > threshold` / `value < threshold`
//!   (strict): on every observation where it holds, subject to the cooldown.
//! - `crosses_above`: fires when `previous < threshold <= value`, where
//!   `previous` is the previous observation of the series (across candle
//!   boundaries). The first observation never fires: there is no previous.
//!   `crosses_below`: `previous > threshold >= value`.
//! - `moves_pct`: fires when `|value − open| × 100 >= pct × |open|`, `open`
//!   being the open of the candle the observation belongs to (i.e. the move
//!   within that candle, in percent), at most once per candle (identified by
//!   its start time), and subject to the cooldown. A candle that opened at 0
//!   never fires. `pct` must be positive, and `field` must be `close`,
//!   `high` or `low` (the open against itself, or a volume against a
//!   price, means nothing).
//!
//! Every observation becomes the next `previous`, whether or not it fired,
//! so a crossing that happens during the cooldown is not remembered for
//! later: it is simply not reported.
//!
//! **Cooldown** runs in event time (`ts_ms`, as passed by the caller), so it
//! is deterministic: after a firing at `t`, nothing fires before
//! `t + cooldown`. With a cooldown of 0 there is none. An observation whose
//! time is before the last firing (out of order) does not fire while a
//! cooldown is set. **Once**: after its first firing the alert is done
//! ([`Alert::is_done`]) and never fires again; the caller removes it.
//!
//! Arithmetic is exact [`Decimal`] arithmetic with checked operations (no
//! division, no floats; an overflowing product is resolved by comparing
//! the quotient instead).
//!
//! # Firing
//!
//! [`Firing`] carries the observation that triggered (`value`), the
//! observation before it (`previous`, `None` for the first one), and the
//! event time. For event alerts, `value` is the event's `amount` (a number
//! or decimal string) or zero when it has none, and `previous` is `None`:
//! the caller sends the event itself.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use super::filter_expr::Filter;
use crate::app::events::filter::{parse_decimal, AMOUNT_FIELD};
use crate::app::protocol::{ErrorCode, ProtocolError};

/// Cooldown when the request gives none.
pub const DEFAULT_COOLDOWN_SECS: i64 = 60;
/// Longest cooldown a request may ask for (a week).
pub const MAX_COOLDOWN_SECS: i64 = 7 * 24 * 3600;
/// Longest alert id, symbol or interval, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// What a K-line alert waits for, with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Above(Decimal),
    Below(Decimal),
    CrossesAbove(Decimal),
    CrossesBelow(Decimal),
    /// A move of at least this many percent within the open candle.
    MovesPct(Decimal),
}

impl Condition {
    /// The name used in requests and listings.
    pub fn name(&self) -> &'static str {
        match self {
            Condition::Above(_) => "above",
            Condition::Below(_) => "below",
            Condition::CrossesAbove(_) => "crosses_above",
            Condition::CrossesBelow(_) => "crosses_below",
            Condition::MovesPct(_) => "moves_pct",
        }
    }

    /// The threshold (a percentage for `moves_pct`).
    pub fn threshold(&self) -> Decimal {
        match *self {
            Condition::Above(t)
            | Condition::Below(t)
            | Condition::CrossesAbove(t)
            | Condition::CrossesBelow(t)
            | Condition::MovesPct(t) => t,
        }
    }
}

/// Which field of a candle a K-line alert watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CandleField {
    Open,
    High,
    Low,
    Close,
    Volume,
}

impl CandleField {
    pub fn name(self) -> &'static str {
        match self {
            CandleField::Open => "open",
            CandleField::High => "high",
            CandleField::Low => "low",
            CandleField::Close => "close",
            CandleField::Volume => "volume",
        }
    }

    pub fn parse(name: &str) -> Option<CandleField> {
        Some(match name {
            "open" => CandleField::Open,
            "high" => CandleField::High,
            "low" => CandleField::Low,
            "close" => CandleField::Close,
            "volume" => CandleField::Volume,
            _ => return None,
        })
    }
}

/// What an alert watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Kline {
        symbol: String,
        /// As the client wrote it, e.g. `"1m"`.
        interval: String,
        field: CandleField,
    },
    Events {
        filter: Filter,
    },
}

/// A validated alert request.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpec {
    pub source: Source,
    /// `Some` for K-line alerts; `None` for event alerts (every match triggers).
    pub condition: Option<Condition>,
    pub cooldown_ms: i64,
    pub once: bool,
    /// The client-chosen id (`alert` in the request), if any.
    pub id: Option<String>,
}

impl AlertSpec {
    /// Validates an alert request (see the module documentation).
    pub fn parse(request: &Map<String, Value>) -> Result<AlertSpec, ProtocolError> {
        let id = match present(request, "alert") {
            None => None,
            Some(value) => Some(name(value, "alert")?),
        };
        let cooldown_ms = match present(request, "cooldown") {
            None => DEFAULT_COOLDOWN_SECS * 1000,
            Some(value) => cooldown(value)?,
        };
        let once = match present(request, "once") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid("once", "a boolean")),
        };
        let (source, condition) = match present(request, "filter") {
            Some(filter) => {
                if let Some(key) = ["symbol", "interval", "field", "condition", "value"]
                    .into_iter()
                    .find(|k| request.contains_key(*k))
                {
                    return Err(ProtocolError::new(
                        ErrorCode::InvalidField,
                        format!("field `{key}` is not allowed with `filter`: an event alert fires on every event that matches its filter"),
                    ));
                }
                let filter = Filter::compile(filter, "filter")?;
                (Source::Events { filter }, None)
            }
            None => kline(request)?,
        };
        Ok(AlertSpec {
            source,
            condition,
            cooldown_ms,
            once,
            id,
        })
    }
}

/// A field that is there and not `null`.
fn present<'a>(request: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    request.get(key).filter(|v| !v.is_null())
}

fn kline(request: &Map<String, Value>) -> Result<(Source, Option<Condition>), ProtocolError> {
    let required = |key: &str| present(request, key).ok_or_else(|| missing(key));
    let symbol = name(required("symbol")?, "symbol")?;
    let interval = name(required("interval")?, "interval")?;
    let field = match present(request, "field") {
        None => CandleField::Close,
        Some(value) => value
            .as_str()
            .and_then(CandleField::parse)
            .ok_or_else(|| invalid("field", "one of open, high, low, close, volume"))?,
    };
    let expected_conditions = "one of above, below, crosses_above, crosses_below, moves_pct";
    let condition = required("condition")?
        .as_str()
        .ok_or_else(|| invalid("condition", expected_conditions))?;
    let value = match required("value")? {
        Value::Number(n) => parse_decimal(n.as_str()),
        Value::String(s) => parse_decimal(s),
        _ => None,
    }
    .ok_or_else(|| invalid("value", "a number or a decimal string like \"45000.5\""))?;
    let condition = match condition {
        "above" => Condition::Above(value),
        "below" => Condition::Below(value),
        "crosses_above" => Condition::CrossesAbove(value),
        "crosses_below" => Condition::CrossesBelow(value),
        "moves_pct" => {
            if value <= Decimal::ZERO {
                return Err(invalid(
                    "value",
                    "a positive percentage for condition `moves_pct`",
                ));
            }
            if !matches!(
                field,
                CandleField::Close | CandleField::High | CandleField::Low
            ) {
                return Err(invalid(
                    "field",
                    "close, high or low for condition `moves_pct` (it compares the field with the candle's open)",
                ));
            }
            Condition::MovesPct(value)
        }
        _ => return Err(invalid("condition", expected_conditions)),
    };
    let source = Source::Kline {
        symbol,
        interval,
        field,
    };
    Ok((source, Some(condition)))
}

fn name(value: &Value, key: &str) -> Result<String, ProtocolError> {
    match value {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_NAME_LEN => Ok(s.clone()),
        _ => Err(invalid(
            key,
            &format!("a non-empty string of at most {MAX_NAME_LEN} bytes"),
        )),
    }
}

fn cooldown(value: &Value) -> Result<i64, ProtocolError> {
    let seconds = match value {
        Value::Number(n) => parse_decimal(n.as_str()),
        _ => None,
    };
    seconds
        .filter(|s| *s >= Decimal::ZERO && *s <= Decimal::from(MAX_COOLDOWN_SECS))
        .and_then(|s| (s * Decimal::ONE_THOUSAND).trunc().to_i64())
        .ok_or_else(|| {
            invalid(
                "cooldown",
                &format!("a number of seconds from 0 to {MAX_COOLDOWN_SECS}"),
            )
        })
}

fn invalid(field: &str, expected: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidField,
        format!("field `{field}` must be {expected}"),
    )
}

fn missing(field: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::MissingField,
        format!("field `{field}` is required"),
    )
}

/// What triggered an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Firing {
    /// The observation that triggered (an event alert: the event's amount, or 0).
    pub value: Decimal,
    /// The observation before it (`None` for the first, and for event alerts).
    pub previous: Option<Decimal>,
    /// Event time of the triggering observation, as the caller passed it.
    pub ts_ms: i64,
}

/// An alert with its trigger state.
#[derive(Debug, Clone)]
pub struct Alert {
    id: String,
    spec: AlertSpec,
    /// The last observation of a K-line series.
    previous: Option<Decimal>,
    last_fired_ms: Option<i64>,
    fired: u64,
    /// For `moves_pct`: the start of the candle it last fired on.
    fired_candle_ms: Option<i64>,
}

impl Alert {
    pub fn new(id: String, spec: AlertSpec) -> Alert {
        Alert {
            id,
            spec,
            previous: None,
            last_fired_ms: None,
            fired: 0,
            fired_candle_ms: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn spec(&self) -> &AlertSpec {
        &self.spec
    }

    /// How many times it has fired.
    pub fn fired(&self) -> u64 {
        self.fired
    }

    /// Event time of the last firing.
    pub fn last_fired_ms(&self) -> Option<i64> {
        self.last_fired_ms
    }

    /// A one-shot alert that has fired: it never fires again.
    pub fn is_done(&self) -> bool {
        self.spec.once && self.fired > 0
    }

    /// The alert as `alert.list` shows it.
    pub fn describe(&self) -> Value {
        let cooldown = cooldown_json(self.spec.cooldown_ms);
        match &self.spec.source {
            Source::Kline {
                symbol,
                interval,
                field,
            } => json!({
                "alert": self.id,
                "symbol": symbol,
                "interval": interval,
                "field": field.name(),
                "condition": self.spec.condition.map(|c| c.name()),
                "value": self.spec.condition.map(|c| c.threshold().to_string()),
                "cooldown": cooldown,
                "once": self.spec.once,
                "fired": self.fired,
            }),
            Source::Events { filter } => json!({
                "alert": self.id,
                "filter": filter.source(),
                "cooldown": cooldown,
                "once": self.spec.once,
                "fired": self.fired,
            }),
        }
    }

    /// A candle of the alert's series changed (the open candle updated, or
    /// closed): `value` is the watched field, `candle_open` the candle's open
    /// and `candle_start_ms` its start (for `moves_pct`), `ts_ms` the event
    /// time. Returns the firing, if the alert triggers. Event alerts ignore it.
    pub fn on_candle(
        &mut self,
        value: Decimal,
        candle_open: Decimal,
        candle_start_ms: i64,
        ts_ms: i64,
    ) -> Option<Firing> {
        let Source::Kline { .. } = self.spec.source else {
            return None;
        };
        let condition = self.spec.condition?;
        let previous = self.previous.replace(value);
        if self.is_done() {
            return None;
        }
        let hit = match condition {
            Condition::Above(t) => value > t,
            Condition::Below(t) => value < t,
            Condition::CrossesAbove(t) => previous.is_some_and(|p| p < t) && value >= t,
            Condition::CrossesBelow(t) => previous.is_some_and(|p| p > t) && value <= t,
            Condition::MovesPct(pct) => {
                self.fired_candle_ms != Some(candle_start_ms) && moved_pct(value, candle_open, pct)
            }
        };
        if !hit || !self.cooled(ts_ms) {
            return None;
        }
        if let Condition::MovesPct(_) = condition {
            self.fired_candle_ms = Some(candle_start_ms);
        }
        Some(self.fire(value, previous, ts_ms))
    }

    /// An event arrived. Returns the firing if it is an event alert whose
    /// filter matches, outside the cooldown. K-line alerts ignore it.
    pub fn on_event(&mut self, event: &Map<String, Value>, ts_ms: i64) -> Option<Firing> {
        let Source::Events { filter } = &self.spec.source else {
            return None;
        };
        if self.is_done() || !filter.matches(event) || !self.cooled(ts_ms) {
            return None;
        }
        let value = match event.get(AMOUNT_FIELD) {
            Some(Value::Number(n)) => parse_decimal(n.as_str()),
            Some(Value::String(s)) => parse_decimal(s),
            _ => None,
        }
        .unwrap_or(Decimal::ZERO);
        Some(self.fire(value, None, ts_ms))
    }

    fn cooled(&self, ts_ms: i64) -> bool {
        match self.last_fired_ms {
            None => true,
            Some(_) if self.spec.cooldown_ms == 0 => true,
            Some(last) => ts_ms >= last.saturating_add(self.spec.cooldown_ms),
        }
    }

    fn fire(&mut self, value: Decimal, previous: Option<Decimal>, ts_ms: i64) -> Firing {
        self.last_fired_ms = Some(ts_ms);
        self.fired += 1;
        Firing {
            value,
            previous,
            ts_ms,
        }
    }
}

/// `|value − open| / |open| × 100 >= pct`, computed as
/// `|value − open| × 100 >= pct × |open|`; `open == 0` never moves.
fn moved_pct(value: Decimal, open: Decimal, pct: Decimal) -> bool {
    if open.is_zero() {
        return false;
    }
    // Overflow: value and open of opposite signs near Decimal::MAX.
    let Some(diff) = value.checked_sub(open) else {
        return true;
    };
    let (diff, open) = (diff.abs(), open.abs());
    match (
        diff.checked_mul(Decimal::ONE_HUNDRED),
        pct.checked_mul(open),
    ) {
        (Some(moved), Some(limit)) => moved >= limit,
        // |diff| × 100 is beyond Decimal::MAX, pct × |open| is not.
        (None, Some(_)) => true,
        (Some(_), None) => false,
        (None, None) => diff
            .checked_div(open)
            .and_then(|ratio| ratio.checked_mul(Decimal::ONE_HUNDRED))
            .is_none_or(|moved| moved >= pct),
    }
}

/// Milliseconds as a JSON number of seconds (`60`, `0.5`).
fn cooldown_json(ms: i64) -> Value {
    let seconds = Decimal::new(ms, 3).normalize().to_string();
    seconds
        .parse::<serde_json::Number>()
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::from_str(text).unwrap()
    }

    fn request(text: &str) -> Map<String, Value> {
        match serde_json::from_str(text).unwrap() {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    fn parse(text: &str) -> Result<AlertSpec, ProtocolError> {
        AlertSpec::parse(&request(text))
    }

    fn alert(text: &str) -> Alert {
        let spec = parse(text).unwrap_or_else(|e| panic!("{text}: {}", e.message));
        Alert::new("a1".into(), spec)
    }

    /// Feeds `close` values of one candle (open 100, start 0) at the given times.
    fn feed(alert: &mut Alert, points: &[(&str, i64)]) -> Vec<Option<Firing>> {
        points
            .iter()
            .map(|(v, ts)| alert.on_candle(d(v), d("100"), 0, *ts))
            .collect()
    }

    /// The times at which the alert fired.
    fn fired_at(alert: &mut Alert, points: &[(&str, i64)]) -> Vec<i64> {
        feed(alert, points)
            .into_iter()
            .flatten()
            .map(|f| f.ts_ms)
            .collect()
    }

    #[test]
    fn parses_a_kline_alert_with_defaults() {
        let spec = parse(
            r#"{"type":"alert.create","id":7,"symbol":"BTC-USD","interval":"1m","condition":"crosses_above","value":"45000"}"#,
        )
        .unwrap();
        assert_eq!(
            spec,
            AlertSpec {
                source: Source::Kline {
                    symbol: "BTC-USD".into(),
                    interval: "1m".into(),
                    field: CandleField::Close,
                },
                condition: Some(Condition::CrossesAbove(d("45000"))),
                cooldown_ms: 60_000,
                once: false,
                id: None,
            }
        );
        let spec = parse(
            r#"{"symbol":"ETH-USD","interval":"5m","field":"high","condition":"moves_pct","value":2.5,"cooldown":0.25,"once":true,"alert":"mine"}"#,
        )
        .unwrap();
        assert_eq!(spec.condition, Some(Condition::MovesPct(d("2.5"))));
        assert_eq!(spec.cooldown_ms, 250);
        assert!(spec.once);
        assert_eq!(spec.id.as_deref(), Some("mine"));
        assert!(matches!(
            spec.source,
            Source::Kline {
                field: CandleField::High,
                ..
            }
        ));
        for (name, condition) in [
            ("above", Condition::Above(d("1.5"))),
            ("below", Condition::Below(d("1.5"))),
            ("crosses_below", Condition::CrossesBelow(d("1.5"))),
        ] {
            let text = format!(
                r#"{{"symbol":"S","interval":"1s","condition":"{name}","value":"1.50","cooldown":0}}"#
            );
            let spec = parse(&text).unwrap();
            assert_eq!(spec.condition, Some(condition));
            assert_eq!(spec.condition.unwrap().name(), name);
            assert_eq!(spec.cooldown_ms, 0);
        }
        for field in ["open", "high", "low", "close", "volume"] {
            let text = format!(
                r#"{{"symbol":"S","interval":"1h","field":"{field}","condition":"above","value":1}}"#
            );
            match parse(&text).unwrap().source {
                Source::Kline { field: f, .. } => assert_eq!(f.name(), field),
                other => panic!("{other:?}"),
            }
        }
        // null is the same as absent.
        let spec = parse(r#"{"symbol":"S","interval":"1m","condition":"above","value":1,"field":null,"cooldown":null,"once":null,"alert":null,"filter":null}"#).unwrap();
        assert_eq!(
            (spec.cooldown_ms, spec.once, spec.id),
            (60_000, false, None)
        );
    }

    #[test]
    fn parses_an_event_alert() {
        let spec = parse(
            r#"{"filter":{"field":"amount","op":"gte","value":"1000"},"cooldown":5,"alert":"big"}"#,
        )
        .unwrap();
        assert_eq!(spec.condition, None);
        assert_eq!(spec.cooldown_ms, 5000);
        let Source::Events { filter } = &spec.source else {
            panic!("{:?}", spec.source)
        };
        assert!(filter.matches(&request(r#"{"amount":"1000.5"}"#)));
    }

    fn assert_error(text: &str, code: ErrorCode, message: &str) {
        let e = parse(text).expect_err(text);
        assert_eq!(e.code, code, "{text}: {}", e.message);
        assert!(
            e.message.contains(message),
            "{text}: `{}` lacks `{message}`",
            e.message
        );
    }

    #[test]
    fn errors_name_the_field() {
        use ErrorCode::{InvalidField, MissingField};
        const BASE: &str = r#""symbol":"S","interval":"1m","condition":"above","value":"1""#;
        let with = |extra: &str| format!("{{{BASE},{extra}}}");
        assert_error(
            r#"{"interval":"1m","condition":"above","value":1}"#,
            MissingField,
            "field `symbol` is required",
        );
        assert_error(
            r#"{"symbol":"S","condition":"above","value":1}"#,
            MissingField,
            "field `interval` is required",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","value":1}"#,
            MissingField,
            "field `condition` is required",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"above"}"#,
            MissingField,
            "field `value` is required",
        );
        assert_error(r#"{}"#, MissingField, "field `symbol` is required");
        assert_error(
            r#"{"symbol":"","interval":"1m","condition":"above","value":1}"#,
            InvalidField,
            "field `symbol` must be a non-empty string",
        );
        assert_error(
            r#"{"symbol":5,"interval":"1m","condition":"above","value":1}"#,
            InvalidField,
            "field `symbol` must be",
        );
        let long = "X".repeat(MAX_NAME_LEN + 1);
        assert_error(
            &format!(r#"{{"symbol":"{long}","interval":"1m","condition":"above","value":1}}"#),
            InvalidField,
            "field `symbol` must be a non-empty string of at most 64 bytes",
        );
        assert_error(
            r#"{"symbol":"S","interval":60,"condition":"above","value":1}"#,
            InvalidField,
            "field `interval` must be",
        );
        assert_error(
            &with(r#""field":"price""#),
            InvalidField,
            "field `field` must be one of open, high, low, close, volume",
        );
        assert_error(r#"{"symbol":"S","interval":"1m","condition":"over","value":1}"#, InvalidField, "field `condition` must be one of above, below, crosses_above, crosses_below, moves_pct");
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":["above"],"value":1}"#,
            InvalidField,
            "field `condition` must be one of",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"above","value":"45k"}"#,
            InvalidField,
            "field `value` must be a number or a decimal string",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"above","value":true}"#,
            InvalidField,
            "field `value` must be",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"above","value":1e300}"#,
            InvalidField,
            "field `value` must be",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"moves_pct","value":0}"#,
            InvalidField,
            "field `value` must be a positive percentage",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","condition":"moves_pct","value":"-2"}"#,
            InvalidField,
            "field `value` must be a positive percentage",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","field":"volume","condition":"moves_pct","value":2}"#,
            InvalidField,
            "field `field` must be close, high or low for condition `moves_pct`",
        );
        assert_error(
            r#"{"symbol":"S","interval":"1m","field":"open","condition":"moves_pct","value":2}"#,
            InvalidField,
            "field `field` must be close, high or low",
        );
        assert_error(
            &with(r#""cooldown":-1"#),
            InvalidField,
            "field `cooldown` must be a number of seconds from 0 to 604800",
        );
        assert_error(
            &with(r#""cooldown":"60""#),
            InvalidField,
            "field `cooldown` must be",
        );
        assert_error(
            &with(r#""cooldown":604801"#),
            InvalidField,
            "field `cooldown` must be",
        );
        assert_error(
            &with(r#""once":"yes""#),
            InvalidField,
            "field `once` must be a boolean",
        );
        assert_error(
            &with(r#""alert":"""#),
            InvalidField,
            "field `alert` must be a non-empty string",
        );
        assert_error(
            &with(r#""alert":12"#),
            InvalidField,
            "field `alert` must be",
        );
        assert_error(
            r#"{"filter":{"field":"a","op":"exists"},"symbol":"S"}"#,
            InvalidField,
            "field `symbol` is not allowed with `filter`",
        );
        assert_error(
            r#"{"filter":{"field":"a","op":"exists"},"condition":"above"}"#,
            InvalidField,
            "field `condition` is not allowed with `filter`",
        );
        assert_error(
            r#"{"filter":{"all":[{"field":"a","op":"gtx","value":1}]}}"#,
            InvalidField,
            "field `filter.all[0].op`: unknown operator `gtx`",
        );
        assert_error(
            r#"{"filter":[]}"#,
            InvalidField,
            "field `filter`: must be a filter node",
        );
        assert_error(
            r#"{"filter":{"field":"a","op":"exists"},"cooldown":-5}"#,
            InvalidField,
            "field `cooldown`",
        );
        assert_eq!(
            parse(&with(r#""cooldown":604800"#)).unwrap().cooldown_ms,
            604_800_000
        );
        assert_eq!(parse(&with(r#""cooldown":0.0015"#)).unwrap().cooldown_ms, 1);
    }

    #[test]
    fn describe_shows_the_request_and_the_count() {
        let mut a = alert(
            r#"{"symbol":"BTC-USD","interval":"1m","condition":"crosses_above","value":"45000.50","once":true}"#,
        );
        assert_eq!(
            a.describe(),
            json!({"alert":"a1","symbol":"BTC-USD","interval":"1m","field":"close","condition":"crosses_above","value":"45000.50","cooldown":60,"once":true,"fired":0})
        );
        a.on_candle(d("45000"), d("45000"), 0, 0);
        a.on_candle(d("45001"), d("45000"), 0, 1);
        assert_eq!(a.describe()["fired"], 1);
        let mut e =
            alert(r#"{"filter":{"field":"type","op":"eq","value":"payment"},"cooldown":1.5}"#);
        e.on_event(&request(r#"{"type":"payment"}"#), 0);
        assert_eq!(
            e.describe(),
            json!({"alert":"a1","filter":{"field":"type","op":"eq","value":"payment"},"cooldown":1.5,"once":false,"fired":1})
        );
        assert_eq!(
            e.describe().to_string(),
            r#"{"alert":"a1","filter":{"field":"type","op":"eq","value":"payment"},"cooldown":1.5,"once":false,"fired":1}"#
        );
        assert_eq!(cooldown_json(0).to_string(), "0");
        assert_eq!(cooldown_json(60_000).to_string(), "60");
        assert_eq!(cooldown_json(1).to_string(), "0.001");
    }

    #[test]
    fn above_fires_while_above_respecting_the_cooldown() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"above","value":"100","cooldown":10}"#,
        );
        // Strictly above; re-fires only once the cooldown (10 s) has passed.
        let points = [
            ("100", 0),
            ("100.01", 1_000),
            ("101", 2_000),
            ("102", 10_999),
            ("102", 11_000),
            ("99", 25_000),
            ("100.5", 26_000),
        ];
        assert_eq!(fired_at(&mut a, &points), vec![1_000, 11_000, 26_000]);
        assert_eq!(a.fired(), 3);
        assert_eq!(a.last_fired_ms(), Some(26_000));
    }

    #[test]
    fn below_is_symmetric_and_a_zero_cooldown_fires_every_time() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"below","value":"0.5","cooldown":0}"#,
        );
        let points = [
            ("0.5", 0),
            ("0.49999999", 1),
            ("0.4", 1),
            ("0.6", 2),
            ("-1", 0),
        ];
        assert_eq!(fired_at(&mut a, &points), vec![1, 1, 0]);
    }

    #[test]
    fn crosses_above_needs_a_previous_value_below() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"crosses_above","value":"45000","cooldown":0}"#,
        );
        let firings = feed(
            &mut a,
            &[
                ("46000", 0),
                ("44000", 1),
                ("45000", 2),
                ("45500", 3),
                ("45000.0", 4),
                ("44999.99", 5),
                ("45000.01", 6),
            ],
        );
        // First observation (already above) never fires; 44000 → 45000 fires
        // (threshold reached counts), staying at or above does not, touching
        // 45000 from above is no crossing; 44999.99 → 45000.01 fires.
        let fired: Vec<_> = firings.iter().flatten().collect();
        assert_eq!(
            fired,
            vec![
                &Firing {
                    value: d("45000"),
                    previous: Some(d("44000")),
                    ts_ms: 2
                },
                &Firing {
                    value: d("45000.01"),
                    previous: Some(d("44999.99")),
                    ts_ms: 6
                },
            ]
        );
        // Sitting exactly on the threshold and moving up is not a crossing.
        let mut b = alert(
            r#"{"symbol":"S","interval":"1m","condition":"crosses_above","value":"10","cooldown":0}"#,
        );
        assert!(fired_at(&mut b, &[("9", 0), ("10", 1), ("11", 2)]) == vec![1]);
        let mut c = alert(
            r#"{"symbol":"S","interval":"1m","condition":"crosses_above","value":"10","cooldown":0}"#,
        );
        assert!(fired_at(&mut c, &[("10", 0), ("11", 1)]).is_empty());
    }

    #[test]
    fn crosses_below_is_symmetric() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"crosses_below","value":"-0.5","cooldown":0}"#,
        );
        let points = [
            ("-1", 0),
            ("0", 1),
            ("-0.5", 2),
            ("-0.6", 3),
            ("-0.5", 4),
            ("-0.4", 5),
            ("-0.50000001", 6),
        ];
        assert_eq!(fired_at(&mut a, &points), vec![2, 6]);
    }

    #[test]
    fn a_crossing_during_the_cooldown_is_not_reported_later() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"crosses_above","value":"10","cooldown":60}"#,
        );
        let points = [
            ("9", 0),
            ("11", 1_000),
            ("9", 2_000),
            ("11", 3_000),
            ("12", 61_000),
            ("9", 70_000),
            ("10", 71_000),
        ];
        assert_eq!(fired_at(&mut a, &points), vec![1_000, 71_000]);
        // Out-of-order time before the last firing does not fire while a cooldown is set.
        assert!(fired_at(&mut a, &[("9", 72_000), ("11", 500)]).is_empty());
    }

    #[test]
    fn moves_pct_fires_once_per_candle() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"moves_pct","value":"2","cooldown":0}"#,
        );
        let open = d("100");
        // 1.99% no; 2% exactly yes; more within the same candle: no.
        assert_eq!(a.on_candle(d("101.99"), open, 0, 1), None);
        let f = a.on_candle(d("102"), open, 0, 2).unwrap();
        assert_eq!(
            (f.value, f.previous, f.ts_ms),
            (d("102"), Some(d("101.99")), 2)
        );
        assert_eq!(a.on_candle(d("110"), open, 0, 3), None);
        // The next candle, moving down by 2.5%: fires again, once.
        assert!(a.on_candle(d("97.5"), open, 60_000, 60_001).is_some());
        assert_eq!(a.on_candle(d("90"), open, 60_000, 60_002), None);
        // A candle that does not move enough, then one that does.
        assert_eq!(a.on_candle(d("100.5"), open, 120_000, 120_001), None);
        assert!(a.on_candle(d("98"), open, 180_000, 180_001).is_some());
        assert_eq!(a.fired(), 3);
    }

    #[test]
    fn moves_pct_respects_the_cooldown_across_candles() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1s","condition":"moves_pct","value":"1","cooldown":5}"#,
        );
        let open = d("50");
        assert!(a.on_candle(d("51"), open, 0, 100).is_some());
        assert_eq!(a.on_candle(d("52"), open, 1_000, 1_100), None);
        assert_eq!(a.on_candle(d("52"), open, 4_000, 5_099), None);
        assert!(a.on_candle(d("52"), open, 5_000, 5_100).is_some());
    }

    #[test]
    fn moves_pct_is_exact_and_open_zero_never_fires() {
        assert!(moved_pct(d("0.0000000102"), d("0.00000001"), d("2")));
        assert!(!moved_pct(d("0.0000000101999999"), d("0.00000001"), d("2")));
        assert!(moved_pct(
            d("1.0000000000000000000000000001"),
            d("1"),
            d("0.0000000000000000000000000001")
        ));
        assert!(!moved_pct(d("1000"), d("0"), d("1")));
        assert!(moved_pct(d("-1.02"), d("-1"), d("2")));
        assert!(!moved_pct(d("-1.01"), d("-1"), d("2")));
        // Near Decimal's range: no overflow panics, and a sensible answer.
        let max = Decimal::MAX;
        assert!(moved_pct(max, d("1"), d("5")));
        assert!(!moved_pct(max, max, d("5")));
        assert!(moved_pct(-max, max, d("5")));
        assert!(!moved_pct(d("1"), d("1"), max));
        assert!(moved_pct(max, d("-1"), max));
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"moves_pct","value":"1","cooldown":0}"#,
        );
        assert_eq!(a.on_candle(d("5"), Decimal::ZERO, 0, 0), None);
    }

    #[test]
    fn once_fires_a_single_time() {
        let mut a = alert(
            r#"{"symbol":"S","interval":"1m","condition":"above","value":"1","cooldown":0,"once":true}"#,
        );
        assert!(!a.is_done());
        assert_eq!(
            fired_at(
                &mut a,
                &[("0", 0), ("2", 1), ("3", 2), ("0", 3), ("4", 1_000_000)]
            ),
            vec![1]
        );
        assert!(a.is_done());
        assert_eq!(a.fired(), 1);
        let mut e = alert(r#"{"filter":{"field":"type","op":"exists"},"once":true,"cooldown":0}"#);
        assert!(e.on_event(&request(r#"{"type":"trade"}"#), 0).is_some());
        assert!(e.is_done());
        assert_eq!(e.on_event(&request(r#"{"type":"trade"}"#), 1), None);
        // Not once: never done.
        let mut b =
            alert(r#"{"symbol":"S","interval":"1m","condition":"above","value":"1","cooldown":0}"#);
        b.on_candle(d("2"), d("1"), 0, 0);
        assert!(!b.is_done());
    }

    #[test]
    fn event_alerts_fire_on_matches_with_the_amount() {
        let mut a = alert(
            r#"{"filter":{"all":[{"field":"type","op":"eq","value":"payment"},{"field":"amount","op":"gte","value":"1000"}]},"cooldown":10}"#,
        );
        assert_eq!(
            a.on_event(&request(r#"{"type":"payment","amount":"999.99"}"#), 0),
            None
        );
        assert_eq!(
            a.on_event(&request(r#"{"type":"payment","amount":"1000.50"}"#), 1_000),
            Some(Firing {
                value: d("1000.50"),
                previous: None,
                ts_ms: 1_000
            })
        );
        assert_eq!(
            a.on_event(&request(r#"{"type":"payment","amount":5000}"#), 10_999),
            None
        );
        let f = a
            .on_event(&request(r#"{"type":"payment","amount":5000}"#), 11_000)
            .unwrap();
        assert_eq!(f.value, d("5000"));
        // Without an amount the value is zero.
        let mut b = alert(r#"{"filter":{"field":"type","op":"eq","value":"trade"},"cooldown":0}"#);
        assert_eq!(
            b.on_event(&request(r#"{"type":"trade"}"#), 5)
                .unwrap()
                .value,
            Decimal::ZERO
        );
        // Each kind ignores the other's input.
        assert_eq!(b.on_candle(d("1"), d("1"), 0, 0), None);
        let mut k =
            alert(r#"{"symbol":"S","interval":"1m","condition":"above","value":"0","cooldown":0}"#);
        assert_eq!(
            k.on_event(&request(r#"{"type":"trade","amount":"5"}"#), 0),
            None
        );
        assert_eq!(k.fired(), 0);
        assert_eq!(k.id(), "a1");
        assert!(k.spec().condition.is_some());
    }
}
