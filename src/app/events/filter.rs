//! Filters of the event-stream registration protocol: `types`,
//! `account_ids`, `asset_codes` (an empty list means "any") and
//! `min_amount` (an empty string means "any"), all of which must match.
//!
//! Amounts are compared as exact decimals, never through f64, so
//! `"100.0000001"` is above `"100"` however many digits it has (up to 28).

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

use crate::app::protocol::{ErrorCode, ProtocolError};

/// Event fields that name an account; an event matches `account_ids` when
/// any of them holds one of the ids.
pub const ACCOUNT_FIELDS: &[&str] = &[
    "account_id",
    "account",
    "source_account",
    "from",
    "to",
    "source",
    "destination",
    "seller",
    "buyer",
];

/// Event fields that name an asset (a code string, or an object with a
/// `code`); an event matches `asset_codes` when any of them holds one.
pub const ASSET_FIELDS: &[&str] = &[
    "asset_code",
    "asset",
    "selling_asset_code",
    "buying_asset_code",
    "base_asset_code",
    "counter_asset_code",
];

/// The field `min_amount` compares against. Events without it pass the
/// amount filter: they carry no amount to be too small.
pub const AMOUNT_FIELD: &str = "amount";

/// Soroban token events (SEP-41) carry their accounts and asset only in
/// `topics` (`["transfer", from, to, asset]`, the asset as a code or in
/// SEP-11 form `CODE:ISSUER`, `native` for XLM) and their amount in
/// `data.amount`; the filters look there for events of this type, so a
/// filter on accounts, assets or amounts means the same for them as for
/// payments.
pub const CONTRACT_EVENT: &str = "contract_event";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventFilters {
    pub types: Vec<String>,
    pub account_ids: Vec<String>,
    pub asset_codes: Vec<String>,
    /// As the client wrote it, echoed back in `registered`.
    pub min_amount_text: String,
    pub min_amount: Option<Decimal>,
}

impl EventFilters {
    /// Reads the `filters` object of a `register` request; a missing object
    /// means no filtering at all.
    pub fn from_json(filters: Option<&Value>) -> Result<Self, ProtocolError> {
        let object = match filters {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(object)) => object,
            Some(_) => return Err(invalid("filters", "an object")),
        };
        for key in object.keys() {
            if !matches!(
                key.as_str(),
                "types" | "account_ids" | "asset_codes" | "min_amount"
            ) {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidField,
                    format!("unknown filter `filters.{key}` (expected types, account_ids, asset_codes, min_amount)"),
                ));
            }
        }
        let (min_amount_text, min_amount) = match object.get("min_amount") {
            None | Some(Value::Null) => (String::new(), None),
            Some(Value::String(s)) if s.trim().is_empty() => (String::new(), None),
            Some(Value::String(s)) => (
                s.clone(),
                Some(parse_decimal(s).ok_or_else(|| {
                    invalid("filters.min_amount", "a decimal string like \"100.5\"")
                })?),
            ),
            Some(Value::Number(n)) => {
                let text = n.to_string();
                let value = parse_decimal(&text).ok_or_else(|| {
                    invalid("filters.min_amount", "a decimal string like \"100.5\"")
                })?;
                (text, Some(value))
            }
            Some(_) => {
                return Err(invalid(
                    "filters.min_amount",
                    "a decimal string like \"100.5\"",
                ))
            }
        };
        Ok(Self {
            types: string_list(object, "types")?,
            account_ids: string_list(object, "account_ids")?,
            asset_codes: string_list(object, "asset_codes")?,
            min_amount_text,
            min_amount,
        })
    }

    /// The filters as the protocol shows them in `registered`.
    pub fn to_json(&self) -> Value {
        json!({
            "types": self.types,
            "account_ids": self.account_ids,
            "asset_codes": self.asset_codes,
            "min_amount": self.min_amount_text,
        })
    }

    pub fn matches(&self, event: &Map<String, Value>) -> bool {
        if !self.types.is_empty() {
            let Some(Value::String(kind)) = event.get("type") else {
                return false;
            };
            if !self.types.iter().any(|t| t == kind) {
                return false;
            }
        }
        if !self.account_ids.is_empty() {
            let mut named = ACCOUNT_FIELDS
                .iter()
                .filter_map(|f| event.get(*f))
                .filter_map(Value::as_str)
                .chain(contract_topics(event));
            if !named.any(|account| self.account_ids.iter().any(|id| id == account)) {
                return false;
            }
        }
        if !self.asset_codes.is_empty() {
            let mut codes = ASSET_FIELDS
                .iter()
                .filter_map(|f| event.get(*f))
                .filter_map(asset_code)
                .chain(contract_topics(event).map(topic_asset_code));
            if !codes.any(|code| self.asset_codes.iter().any(|c| c == code)) {
                return false;
            }
        }
        if let Some(min) = self.min_amount {
            let amount = match event.get(AMOUNT_FIELD) {
                None if is_contract_event(event) => {
                    event.get("data").and_then(|d| d.get(AMOUNT_FIELD))
                }
                amount => amount,
            };
            match amount {
                None | Some(Value::Null) => {}
                Some(amount) => match amount_of(amount) {
                    Some(amount) if amount >= min => {}
                    _ => return false,
                },
            }
        }
        true
    }
}

fn is_contract_event(event: &Map<String, Value>) -> bool {
    event.get("type").and_then(Value::as_str) == Some(CONTRACT_EVENT)
}

/// The string topics of a contract event (none for other events).
fn contract_topics(event: &Map<String, Value>) -> impl Iterator<Item = &str> {
    let topics = match event.get("topics") {
        Some(Value::Array(topics)) if is_contract_event(event) => topics.as_slice(),
        _ => &[],
    };
    topics.iter().filter_map(Value::as_str)
}

/// The asset code a topic names: `USDC` in `USDC` or `USDC:GA…` (SEP-11),
/// `XLM` for `native`; other topics (the event's name, accounts) come
/// back whole and match no asset code in practice.
fn topic_asset_code(topic: &str) -> &str {
    if topic == "native" {
        return "XLM";
    }
    topic.split_once(':').map_or(topic, |(code, _)| code)
}

fn asset_code(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("code").and_then(Value::as_str),
        _ => None,
    }
}

fn amount_of(value: &Value) -> Option<Decimal> {
    match value {
        Value::String(s) => parse_decimal(s),
        Value::Number(n) => parse_decimal(&n.to_string()),
        _ => None,
    }
}

/// A plain decimal (`-12`, `100.5`, `0.0000001`) or scientific notation.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let text = text.trim();
    Decimal::from_str(text)
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
}

fn string_list(object: &Map<String, Value>, field: &str) -> Result<Vec<String>, ProtocolError> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| invalid(&format!("filters.{field}"), "an array of strings"))
            })
            .collect(),
        Some(_) => Err(invalid(&format!("filters.{field}"), "an array of strings")),
    }
}

fn invalid(field: &str, expected: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidField,
        format!("field `{field}` must be {expected}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(v: Value) -> EventFilters {
        EventFilters::from_json(Some(&v)).unwrap()
    }

    fn event(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn empty_filters_match_everything() {
        let f = filters(json!({"types":[],"account_ids":[],"asset_codes":[],"min_amount":""}));
        assert!(f.matches(&event(json!({"type":"anything"}))));
        assert!(EventFilters::from_json(None)
            .unwrap()
            .matches(&event(json!({}))));
    }

    #[test]
    fn every_filter_must_match() {
        let f = filters(
            json!({"types":["payment","trade"],"account_ids":["GABC"],"asset_codes":["USDC"],"min_amount":"100"}),
        );
        let good = json!({"type":"payment","from":"GABC","asset_code":"USDC","amount":"100"});
        assert!(f.matches(&event(good.clone())));
        let mut wrong_type = good.clone();
        wrong_type["type"] = json!("contract_event");
        assert!(!f.matches(&event(wrong_type)));
        let mut wrong_account = good.clone();
        wrong_account["from"] = json!("GXYZ");
        assert!(!f.matches(&event(wrong_account)));
        let mut asset_object = good.clone();
        asset_object.as_object_mut().unwrap().remove("asset_code");
        asset_object["asset"] = json!({"code":"USDC","issuer":"GISSUER"});
        assert!(f.matches(&event(asset_object)));
        let mut small = good;
        small["amount"] = json!("99.9999999");
        assert!(!f.matches(&event(small)));
    }

    #[test]
    fn contract_events_match_by_their_topics_and_data_amount() {
        let f = filters(json!({"types":["contract_event"],"asset_codes":["USDC"]}));
        let transfer = |asset: &str, amount: &str| {
            event(json!({"type":"contract_event","contract_id":"CABC",
                "topics":["transfer","GFROM","GTO",asset],"data":{"amount":amount}}))
        };
        assert!(f.matches(&transfer("USDC", "10")));
        assert!(f.matches(&transfer("USDC:GISSUER", "10")));
        assert!(!f.matches(&transfer("EURC", "10")));
        assert!(!f.matches(&transfer("USDCX", "10")));

        let xlm = filters(json!({"asset_codes":["XLM"]}));
        assert!(xlm.matches(&transfer("native", "1")));

        let accounts = filters(json!({"account_ids":["GTO"]}));
        assert!(accounts.matches(&transfer("USDC", "1")));
        assert!(!filters(json!({"account_ids":["GELSE"]})).matches(&transfer("USDC", "1")));

        let big = filters(json!({"min_amount":"100"}));
        assert!(big.matches(&transfer("USDC", "100.5")));
        assert!(!big.matches(&transfer("USDC", "99.9")));

        // Other events' topics and data are not theirs to search.
        let other = event(json!({"type":"log","topics":["USDC","GTO"],"data":{"amount":"1"}}));
        assert!(!f.matches(&other));
        assert!(!accounts.matches(&other));
        assert!(big.matches(&other), "no top-level amount: passes");
    }

    #[test]
    fn amounts_compare_exactly() {
        let f = filters(json!({"min_amount":"0.3"}));
        // 0.1 + 0.2 in f64 is 0.30000000000000004; as decimals it is 0.3.
        assert!(f.matches(&event(json!({"amount":"0.3"}))));
        assert!(!f.matches(&event(json!({"amount":"0.2999999999999999999999"}))));
        assert!(f.matches(&event(json!({"amount":"100000000000000000000.0000001"}))));
        assert!(f.matches(&event(json!({"amount":1}))));
        assert!(
            !f.matches(&event(json!({"amount":"lots"}))),
            "an unreadable amount does not pass"
        );
        assert!(
            f.matches(&event(json!({"type":"contract_event"}))),
            "no amount field: passes"
        );
        let big = filters(json!({"min_amount":"100000000000000000000"}));
        assert!(!big.matches(&event(json!({"amount":"99999999999999999999.9999999"}))));
    }

    #[test]
    fn invalid_filters_name_the_field() {
        let e = EventFilters::from_json(Some(&json!({"types":"payment"}))).unwrap_err();
        assert!(e.message.contains("filters.types"), "{}", e.message);
        let e = EventFilters::from_json(Some(&json!({"min_amount":"ten"}))).unwrap_err();
        assert!(e.message.contains("filters.min_amount"));
        let e = EventFilters::from_json(Some(&json!({"typo":[]}))).unwrap_err();
        assert!(e.message.contains("filters.typo"));
        let e = EventFilters::from_json(Some(&json!([1]))).unwrap_err();
        assert!(e.message.contains("`filters`"));
    }

    #[test]
    fn echoes_filters_as_given() {
        let given =
            json!({"types":["payment"],"account_ids":[],"asset_codes":["USDC"],"min_amount":"100"});
        assert_eq!(filters(given.clone()).to_json(), given);
    }
}
