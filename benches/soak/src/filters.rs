//! The registration filters, checked independently of the server's code:
//! what the README promises a registered client receives.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

/// One client's filters (the subset the harness uses).
#[derive(Debug, Clone)]
pub struct Filters {
    pub types: Vec<&'static str>,
    pub asset_codes: Vec<&'static str>,
    pub min_amount: Option<Decimal>,
}

impl Filters {
    /// The presets clients are given in turn.
    pub fn preset(i: usize) -> Filters {
        match i % 3 {
            0 => Filters {
                types: vec!["payment", "contract_event"],
                asset_codes: vec!["USDC"],
                min_amount: Some(Decimal::from(100)),
            },
            1 => Filters {
                types: vec!["trade"],
                asset_codes: vec!["BTC", "ETH"],
                min_amount: None,
            },
            _ => Filters {
                types: vec![],
                asset_codes: vec!["XLM"],
                min_amount: Some(Decimal::from(10)),
            },
        }
    }

    pub fn register_request(&self) -> String {
        serde_json::json!({"type": "register", "filters": {
            "types": self.types,
            "account_ids": [],
            "asset_codes": self.asset_codes,
            "min_amount": self.min_amount.map(|d| d.to_string()).unwrap_or_default(),
        }})
        .to_string()
    }

    /// Does `event` pass, by the README's rules?
    pub fn matches(&self, event: &Value) -> bool {
        let kind = event["type"].as_str().unwrap_or_default();
        if !self.types.is_empty() && !self.types.contains(&kind) {
            return false;
        }
        let contract = kind == "contract_event";
        if !self.asset_codes.is_empty() {
            let mut codes: Vec<&str> = [
                "asset_code",
                "selling_asset_code",
                "buying_asset_code",
                "base_asset_code",
                "counter_asset_code",
            ]
            .iter()
            .filter_map(|f| event[*f].as_str())
            .collect();
            match &event["asset"] {
                Value::String(s) => codes.push(s),
                Value::Object(o) => codes.extend(o.get("code").and_then(Value::as_str)),
                _ => {}
            }
            if contract {
                for topic in event["topics"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    codes.push(match topic {
                        "native" => "XLM",
                        t => t.split(':').next().unwrap_or(t),
                    });
                }
            }
            if !codes.iter().any(|c| self.asset_codes.contains(c)) {
                return false;
            }
        }
        if let Some(min) = self.min_amount {
            let amount = match &event["amount"] {
                Value::Null if contract => &event["data"]["amount"],
                a => a,
            };
            let amount = match amount {
                Value::Null => return true,
                Value::String(s) => Decimal::from_str(s).ok(),
                Value::Number(n) => Decimal::from_str(&n.to_string()).ok(),
                _ => None,
            };
            return amount.is_some_and(|a| a >= min);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn presets_match_what_the_readme_says() {
        let usdc = Filters::preset(0);
        assert!(usdc.matches(&json!({"type":"payment","asset_code":"USDC","amount":"100.0000000"})));
        assert!(!usdc.matches(&json!({"type":"payment","asset_code":"USDC","amount":"99.9999999"})));
        assert!(!usdc.matches(&json!({"type":"payment","asset_code":"EURC","amount":"500"})));
        assert!(usdc.matches(&json!({"type":"contract_event","topics":["transfer","GA","GB","USDC"],"data":{"amount":"150"}})));
        assert!(!usdc.matches(
            &json!({"type":"contract_event","topics":["burn","GA","USDC"],"data":{"amount":"5"}})
        ));
        let trades = Filters::preset(1);
        assert!(trades.matches(&json!({"type":"trade","asset_code":"BTC","amount":"0.01"})));
        assert!(!trades.matches(&json!({"type":"trade","asset_code":"SOL"})));
        let xlm = Filters::preset(2);
        assert!(xlm.matches(&json!({"type":"contract_event","topics":["mint","GA","GB","native"],"data":{"amount":"10"}})));
        assert!(xlm.matches(&json!({"type":"payment","asset_code":"XLM","amount":"12"})));
        assert!(!xlm.matches(&json!({"type":"payment","asset_code":"XLM","amount":"9"})));
    }
}
