//! A channel's settings once resolved (a `create`'s fields with the node's
//! defaults filled in), and their encoding in Redis: scale-out nodes share
//! definitions, so every node holds the same settings whatever its own
//! defaults are.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::app::protocol::PublishPolicy;

/// The largest `backlog` a `create` may ask for (also checked on
/// definitions read from Redis: another node's word is not trusted to be
/// sane).
pub const MAX_BACKLOG: usize = 1_000_000;

/// The oldest `backlog_age` a `create` may ask for: ten years, in seconds
/// (its millisecond form must fit the encoding with room to spare).
pub const MAX_BACKLOG_AGE_SECS: u64 = 10 * 365 * 86_400;

/// The settings a channel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelDefinition {
    /// Most messages kept for `since` resumption.
    pub backlog: usize,
    /// Oldest message kept.
    pub backlog_age: Duration,
    pub publish: PublishPolicy,
}

impl ChannelDefinition {
    /// The form stored in Redis: `{"backlog":N,"backlog_age_ms":MS,"publish":P}`
    /// (milliseconds: a default age given as `--channel-backlog-age 500ms`
    /// stays exact).
    pub fn encode(&self) -> String {
        json!({
            "backlog": self.backlog,
            "backlog_age_ms": u64::try_from(self.backlog_age.as_millis()).unwrap_or(u64::MAX),
            "publish": self.publish.as_str(),
        })
        .to_string()
    }

    /// Reads [`ChannelDefinition::encode`]'s form; the error names the
    /// field that is missing or wrong. Unknown fields are ignored, so a
    /// later version may add some.
    pub fn decode(text: &str) -> Result<ChannelDefinition, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
        let Value::Object(fields) = value else {
            return Err("not a JSON object".into());
        };
        let backlog = number(&fields, "backlog")?;
        let backlog = usize::try_from(backlog)
            .ok()
            .filter(|b| *b <= MAX_BACKLOG)
            .ok_or_else(|| format!("field `backlog` is {backlog}, more than {MAX_BACKLOG}"))?;
        let age_ms = number(&fields, "backlog_age_ms")?;
        if age_ms > MAX_BACKLOG_AGE_SECS * 1000 {
            return Err(format!(
                "field `backlog_age_ms` is {age_ms}, more than {}",
                MAX_BACKLOG_AGE_SECS * 1000
            ));
        }
        let backlog_age = Duration::from_millis(age_ms);
        let publish = match fields.get("publish") {
            Some(Value::String(p)) => PublishPolicy::parse(p).ok_or_else(|| {
                format!("field `publish` is {p:?}, expected \"trusted\" or \"anyone\"")
            })?,
            Some(_) => return Err("field `publish` must be a string".into()),
            None => return Err("field `publish` is missing".into()),
        };
        Ok(ChannelDefinition {
            backlog,
            backlog_age,
            publish,
        })
    }
}

fn number(fields: &Map<String, Value>, name: &str) -> Result<u64, String> {
    match fields.get(name) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("field `{name}` must be a whole number of at least 0, not {v}")),
        None => Err(format!("field `{name}` is missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_and_decodes() {
        for publish in [PublishPolicy::Trusted, PublishPolicy::Anyone] {
            let d = ChannelDefinition {
                backlog: 25,
                backlog_age: Duration::from_millis(3_600_500),
                publish,
            };
            assert_eq!(ChannelDefinition::decode(&d.encode()), Ok(d));
        }
        let later = r#"{"backlog":0,"backlog_age_ms":0,"publish":"anyone","ttl":5}"#;
        assert_eq!(
            ChannelDefinition::decode(later),
            Ok(ChannelDefinition {
                backlog: 0,
                backlog_age: Duration::ZERO,
                publish: PublishPolicy::Anyone
            })
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (text, names) in [
            ("", "JSON"),
            ("[1]", "object"),
            (
                r#"{"backlog_age_ms":1,"publish":"anyone"}"#,
                "`backlog` is missing",
            ),
            (
                r#"{"backlog":-1,"backlog_age_ms":1,"publish":"anyone"}"#,
                "`backlog`",
            ),
            (
                r#"{"backlog":1.5,"backlog_age_ms":1,"publish":"anyone"}"#,
                "`backlog`",
            ),
            (
                r#"{"backlog":1000001,"backlog_age_ms":1,"publish":"anyone"}"#,
                "more than",
            ),
            (
                r#"{"backlog":1,"backlog_age_ms":"1","publish":"anyone"}"#,
                "`backlog_age_ms`",
            ),
            (
                r#"{"backlog":1,"backlog_age_ms":315360000001,"publish":"anyone"}"#,
                "more than",
            ),
            (
                r#"{"backlog":1,"backlog_age_ms":1}"#,
                "`publish` is missing",
            ),
            (
                r#"{"backlog":1,"backlog_age_ms":1,"publish":"all"}"#,
                "\"all\"",
            ),
            (
                r#"{"backlog":1,"backlog_age_ms":1,"publish":true}"#,
                "must be a string",
            ),
        ] {
            let e = ChannelDefinition::decode(text).unwrap_err();
            assert!(e.contains(names), "{text}: {e}");
        }
    }
}
