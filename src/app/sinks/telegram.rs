//! The Telegram Bot API's `sendMessage`: one readable line per alert
//! firing (or channel message), POSTed as JSON to
//! `<api-url>/bot<token>/sendMessage` with the sink's `chat_id`.
//!
//! The token is part of the path, so the URL is never logged; the API
//! answers 429 with `Retry-After` when a bot sends too fast, which the
//! worker honours (see `backoff`).

use serde_json::{json, Value};

/// Telegram refuses a text longer than 4096 characters; a longer one is
/// cut to this many and ends with `…`.
pub const MAX_TEXT_CHARS: usize = 4096;

/// The `sendMessage` URL of a bot on an API server.
pub fn send_message_url(api_url: &str, bot_token: &str) -> String {
    format!("{api_url}/bot{bot_token}/sendMessage")
}

/// The request body: `{"chat_id":…,"text":…}`.
pub fn send_message_body(chat_id: &str, text: &str) -> String {
    json!({ "chat_id": chat_id, "text": text }).to_string()
}

/// One line for an alert firing, e.g.
/// `btc45k: BTC-USD 1m close crosses above 45000 (45003.2)`, or for an
/// event alert `big: payment event matched (1200)`.
pub fn alert_text(firing: &Value) -> String {
    let text = |key: &str| firing.get(key).and_then(Value::as_str).unwrap_or("?");
    let id = text("alert");
    let value = text("value");
    let line = if firing.get("symbol").is_some() {
        let threshold = text("threshold");
        let condition = match text("condition") {
            "moves_pct" => format!("moves {threshold}% within its candle"),
            other => format!("{} {threshold}", other.replace('_', " ")),
        };
        format!(
            "{id}: {} {} {} {condition} ({value})",
            text("symbol"),
            text("interval"),
            text("field"),
        )
    } else {
        let kind = firing
            .pointer("/event/type")
            .and_then(Value::as_str)
            .unwrap_or("an");
        format!("{id}: {kind} event matched ({value})")
    };
    limit(line)
}

/// One line for a channel message: `channel: <data as JSON>` (a string
/// datum as it is).
pub fn channel_text(channel: &str, data: &Value) -> String {
    let data = match data {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    limit(format!("{channel}: {data}"))
}

fn limit(text: String) -> String {
    if text.chars().count() <= MAX_TEXT_CHARS {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_TEXT_CHARS - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kline_firing_reads_as_one_line() {
        // The firing as `market::alert_message` builds it.
        let firing = json!({"type":"alert","alert":"btc45k","symbol":"BTC-USD","interval":"1m",
            "field":"close","condition":"crosses_above","threshold":"45000","cooldown":10,
            "once":false,"fired":1,"value":"45003.2","previous":"44995","ts":1700002803000_i64});
        assert_eq!(
            alert_text(&firing),
            "btc45k: BTC-USD 1m close crosses above 45000 (45003.2)"
        );
        let moved = json!({"alert":"m","symbol":"X","interval":"5m","field":"high",
            "condition":"moves_pct","threshold":"2.5","value":"103"});
        assert_eq!(
            alert_text(&moved),
            "m: X 5m high moves 2.5% within its candle (103)"
        );
        let below = json!({"alert":"b","symbol":"X","interval":"1m","field":"close",
            "condition":"below","threshold":"5","value":"4.99"});
        assert_eq!(alert_text(&below), "b: X 1m close below 5 (4.99)");
    }

    #[test]
    fn an_event_firing_names_the_event_type() {
        let firing = json!({"type":"alert","alert":"big","filter":{"field":"amount","op":"gte","value":"1000"},
            "value":"1200","event":{"type":"payment","amount":"1200"}});
        assert_eq!(alert_text(&firing), "big: payment event matched (1200)");
        let untyped = json!({"alert":"e","filter":{},"value":"0","event":{}});
        assert_eq!(alert_text(&untyped), "e: an event matched (0)");
    }

    #[test]
    fn channel_messages_and_the_length_limit() {
        assert_eq!(channel_text("news", &json!("hello")), "news: hello");
        assert_eq!(channel_text("t.x", &json!({"p":1})), "t.x: {\"p\":1}");
        let long = channel_text("c", &json!("é".repeat(5000)));
        assert_eq!(long.chars().count(), MAX_TEXT_CHARS);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn the_request() {
        assert_eq!(
            send_message_url("http://127.0.0.1:9", "123:AbC"),
            "http://127.0.0.1:9/bot123:AbC/sendMessage"
        );
        let body: Value = serde_json::from_str(&send_message_body("-100", "hi \"x\"")).unwrap();
        assert_eq!(body, json!({"chat_id":"-100","text":"hi \"x\""}));
    }
}
