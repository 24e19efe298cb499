//! A sink's settings: the config file's `[[sink]]` tables (and the
//! `--webhook URL` short form), checked once at start-up so that a typo
//! stops the server with a message naming the sink and the key, never a
//! delivery that fails at the first alert.
//!
//! ```toml
//! [[sink]]
//! name = "ops-hook"             # 1-64 of A-Z a-z 0-9 _ . - (the metrics label)
//! kind = "webhook"
//! url = "https://hooks.example.com/fanout"
//! secret = "${FANOUT_HOOK_SECRET}"
//! source = "alerts"             # or a channel name or pattern: "trades.>"
//! timeout = "5s"                # one attempt, connect to last byte
//! max-attempts = 5              # first try included
//! retry-backoff = "500ms"       # doubles after each retry ...
//! retry-backoff-max = "30s"     # ... up to this
//! queue = 1024                  # items waiting for the worker; more are dropped
//! flush-timeout = "5s"          # at shutdown, for what is queued
//!
//! [[sink]]
//! name = "desk"
//! kind = "telegram"
//! bot-token = "${TELEGRAM_BOT_TOKEN}"
//! chat-id = "-1001234567890"    # or "@channel"
//! api-url = "https://api.telegram.org"
//! ```
//!
//! `${VAR}` in `url`, `secret`, `bot-token` and `chat-id` is replaced by
//! that environment variable (unset is an error naming the variable). The
//! [`fmt::Debug`] output hides the secret, the token and the URLs (which
//! may carry a token too), so no log line can print them.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::app::channels::name::validate_pattern;

/// The environment variable `--webhook URL` takes its signing secret from.
pub const WEBHOOK_SECRET_ENV: &str = "FANOUT_WEBHOOK_SECRET";

/// The Telegram Bot API's address unless a sink names another.
pub const TELEGRAM_API: &str = "https://api.telegram.org";

/// What a sink delivers: alert firings, or a channel's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSource {
    /// Every alert firing this node makes, as its owner receives it.
    Alerts,
    /// Messages published on this node to a channel whose name matches
    /// (a name or a `*`/`>` pattern), as subscribers receive them.
    Channel(String),
}

/// Where a sink sends, with its credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// POST the JSON, signed with HMAC-SHA256 of the body under `secret`.
    Webhook { url: String, secret: String },
    /// The Bot API's `sendMessage` on `api_url`.
    Telegram {
        api_url: String,
        bot_token: String,
        chat_id: String,
    },
}

/// Names the kind only: the URL, secret and token stay out of logs.
impl fmt::Debug for SinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkKind::Webhook { .. } => f.write_str("Webhook { .. }"),
            SinkKind::Telegram { chat_id, .. } => {
                write!(f, "Telegram {{ chat_id: {chat_id:?}, .. }}")
            }
        }
    }
}

/// One sink, validated.
#[derive(Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    pub source: SinkSource,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub queue: usize,
    pub flush_timeout: Duration,
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = &self.kind;
        f.debug_struct("SinkConfig")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("source", &self.source)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("retry_backoff", &self.retry_backoff)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .field("queue", &self.queue)
            .field("flush_timeout", &self.flush_timeout)
            .finish_non_exhaustive()
    }
}

/// Longest time any one of a sink's durations may be: none of them is
/// meant to be long, and a bound keeps shutdown bounded.
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Most attempts per item (the first included).
pub const MAX_ATTEMPTS: u32 = 20;
/// Largest queue a sink may have.
pub const MAX_QUEUE: usize = 1_000_000;

/// A `[[sink]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSink {
    name: String,
    kind: String,
    url: Option<String>,
    secret: Option<String>,
    bot_token: Option<String>,
    chat_id: Option<toml::Value>,
    api_url: Option<String>,
    source: Option<String>,
    timeout: Option<String>,
    max_attempts: Option<i64>,
    retry_backoff: Option<String>,
    retry_backoff_max: Option<String>,
    queue: Option<i64>,
    flush_timeout: Option<String>,
}

impl SinkConfig {
    /// The config file's `sink` value (an array of tables). `env` reads a
    /// variable (the process environment, or a test's map).
    pub fn parse_all(
        value: toml::Value,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<SinkConfig>, String> {
        let toml::Value::Array(tables) = value else {
            return Err("`sink` must be an array of tables ([[sink]])".into());
        };
        let mut sinks: Vec<SinkConfig> = Vec::new();
        for (index, table) in tables.into_iter().enumerate() {
            let raw: RawSink = table.try_into().map_err(|e: toml::de::Error| {
                format!("[[sink]] #{}: {}", index + 1, e.message())
            })?;
            let name = raw.name.clone();
            let sink = SinkConfig::from_raw(raw, env)
                .map_err(|why| format!("[[sink]] #{} (`{name}`): {why}", index + 1))?;
            if sinks.iter().any(|s| s.name == sink.name) {
                return Err(format!(
                    "[[sink]] #{}: another sink is named `{name}` already",
                    index + 1
                ));
            }
            sinks.push(sink);
        }
        Ok(sinks)
    }

    /// `--webhook URL`: alert firings to `url`, signed with the secret in
    /// [`WEBHOOK_SECRET_ENV`], every other setting at its default.
    pub fn webhook_flag(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<SinkConfig, String> {
        let secret = env(WEBHOOK_SECRET_ENV).filter(|s| !s.is_empty()).ok_or_else(|| {
            format!("--webhook needs the signing secret in the environment variable {WEBHOOK_SECRET_ENV}")
        })?;
        let raw = RawSink {
            name: "webhook".into(),
            kind: "webhook".into(),
            url: Some(url.to_owned()),
            secret: Some(secret),
            bot_token: None,
            chat_id: None,
            api_url: None,
            source: None,
            timeout: None,
            max_attempts: None,
            retry_backoff: None,
            retry_backoff_max: None,
            queue: None,
            flush_timeout: None,
        };
        // The secret came from the environment already: not expanded again.
        SinkConfig::from_raw(raw, &|_| None).map_err(|why| format!("--webhook: {why}"))
    }

    fn from_raw(raw: RawSink, env: &dyn Fn(&str) -> Option<String>) -> Result<SinkConfig, String> {
        let name_ok = (1..=64).contains(&raw.name.len())
            && raw
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !name_ok {
            return Err("`name` must be 1-64 of A-Z a-z 0-9 _ . -".into());
        }
        let expand = |key: &str, value: Option<String>| -> Result<Option<String>, String> {
            value.map(|v| expand_env(key, &v, env)).transpose()
        };
        let url = expand("url", raw.url)?;
        let secret = expand("secret", raw.secret)?;
        let bot_token = expand("bot-token", raw.bot_token)?;
        let chat_id = match raw.chat_id {
            None => None,
            Some(toml::Value::String(s)) => Some(s),
            Some(toml::Value::Integer(n)) => Some(n.to_string()),
            Some(_) => return Err("`chat-id` must be a string or an integer".into()),
        };
        let chat_id = expand("chat-id", chat_id)?;
        let only = |kind: &str, keys: &[(&str, bool)]| -> Result<(), String> {
            match keys.iter().find(|(_, given)| *given) {
                Some((key, _)) => Err(format!("`{key}` is not a setting of a {kind} sink")),
                None => Ok(()),
            }
        };
        let kind = match raw.kind.as_str() {
            "webhook" => {
                only(
                    "webhook",
                    &[
                        ("bot-token", bot_token.is_some()),
                        ("chat-id", chat_id.is_some()),
                        ("api-url", raw.api_url.is_some()),
                    ],
                )?;
                let url = url.ok_or("a webhook sink needs `url`")?;
                check_http_url("url", &url)?;
                let secret = secret
                    .filter(|s| !s.is_empty())
                    .ok_or("a webhook sink needs a non-empty `secret` to sign with")?;
                SinkKind::Webhook { url, secret }
            }
            "telegram" => {
                only(
                    "telegram",
                    &[("url", url.is_some()), ("secret", secret.is_some())],
                )?;
                let bot_token = bot_token.ok_or("a telegram sink needs `bot-token`")?;
                // It goes into the request path: no `/`, `?`, `#` or spaces.
                let token_ok = !bot_token.is_empty()
                    && bot_token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
                if !token_ok {
                    return Err("`bot-token` must be the token BotFather gave (letters, digits, `:`, `_`, `-`)".into());
                }
                let chat_id = chat_id
                    .filter(|c| !c.is_empty())
                    .ok_or("a telegram sink needs `chat-id`")?;
                let api_url = raw.api_url.unwrap_or_else(|| TELEGRAM_API.to_owned());
                check_http_url("api-url", &api_url)?;
                SinkKind::Telegram {
                    api_url: api_url.trim_end_matches('/').to_owned(),
                    bot_token,
                    chat_id,
                }
            }
            other => {
                return Err(format!(
                    "`kind` must be \"webhook\" or \"telegram\", not {other:?}"
                ))
            }
        };
        let source = match raw.source.as_deref() {
            None | Some(crate::app::ALERTS_CHANNEL) => SinkSource::Alerts,
            Some(pattern) => {
                validate_pattern("source", pattern).map_err(|e| e.message)?;
                SinkSource::Channel(pattern.to_owned())
            }
        };
        let duration = |key: &str, text: Option<String>, default: &str| {
            let text = text.unwrap_or_else(|| default.to_owned());
            let d =
                humantime::parse_duration(&text).map_err(|e| format!("`{key}` = {text:?}: {e}"))?;
            if d.is_zero() || d > MAX_DURATION {
                return Err(format!("`{key}` must be more than 0 and at most 10m"));
            }
            Ok(d)
        };
        let timeout = duration("timeout", raw.timeout, "5s")?;
        let retry_backoff = duration("retry-backoff", raw.retry_backoff, "500ms")?;
        let retry_backoff_max = duration("retry-backoff-max", raw.retry_backoff_max, "30s")?;
        if retry_backoff_max < retry_backoff {
            return Err("`retry-backoff-max` must be at least `retry-backoff`".into());
        }
        let flush_timeout = duration("flush-timeout", raw.flush_timeout, "5s")?;
        let max_attempts = raw.max_attempts.unwrap_or(5);
        if !(1..=i64::from(MAX_ATTEMPTS)).contains(&max_attempts) {
            return Err(format!("`max-attempts` must be 1 to {MAX_ATTEMPTS}"));
        }
        let queue = raw.queue.unwrap_or(1024);
        if !(1..=MAX_QUEUE as i64).contains(&queue) {
            return Err(format!("`queue` must be 1 to {MAX_QUEUE}"));
        }
        Ok(SinkConfig {
            name: raw.name,
            kind,
            source,
            timeout,
            max_attempts: max_attempts as u32,
            retry_backoff,
            retry_backoff_max,
            queue: queue as usize,
            flush_timeout,
        })
    }
}

fn check_http_url(key: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    let host_ok = rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && !host.contains(char::is_whitespace)
    });
    if host_ok && !url.contains(char::is_whitespace) {
        Ok(())
    } else {
        // The value is not repeated: it may hold a secret from `${VAR}`.
        Err(format!(
            "`{key}` must be an http:// or https:// URL with a host"
        ))
    }
}

/// Replaces every `${NAME}` in `value` by that environment variable.
fn expand_env(
    key: &str,
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("`{key}`: `${{` without its closing `}}`"))?;
        let name = &after[..end];
        let name_ok =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(format!(
                "`{key}`: `${{{name}}}` is not an environment variable name"
            ));
        }
        let found = env(name)
            .ok_or_else(|| format!("`{key}`: the environment variable {name} is not set"))?;
        out.push_str(&found);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOOK_SECRET" => Some("s3cret".into()),
            "TG" => Some("123:abc".into()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<Vec<SinkConfig>, String> {
        let mut table: toml::Table = text.parse().unwrap();
        SinkConfig::parse_all(table.remove("sink").unwrap(), &env)
    }

    #[test]
    fn both_kinds_with_defaults_and_variables() {
        let sinks = parse(
            r#"
            [[sink]]
            name = "hook"
            kind = "webhook"
            url = "http://127.0.0.1:9/in"
            secret = "${HOOK_SECRET}"

            [[sink]]
            name = "desk"
            kind = "telegram"
            bot-token = "${TG}"
            chat-id = -100123
            source = "trades.>"
            timeout = "2s"
            max-attempts = 3
            queue = 8
            "#,
        )
        .unwrap();
        assert_eq!(
            sinks[0].kind,
            SinkKind::Webhook {
                url: "http://127.0.0.1:9/in".into(),
                secret: "s3cret".into()
            }
        );
        assert_eq!(sinks[0].source, SinkSource::Alerts);
        assert_eq!(sinks[0].timeout, Duration::from_secs(5));
        assert_eq!(sinks[0].max_attempts, 5);
        assert_eq!(sinks[0].queue, 1024);
        assert_eq!(
            sinks[1].kind,
            SinkKind::Telegram {
                api_url: TELEGRAM_API.into(),
                bot_token: "123:abc".into(),
                chat_id: "-100123".into()
            }
        );
        assert_eq!(sinks[1].source, SinkSource::Channel("trades.>".into()));
        assert_eq!(sinks[1].max_attempts, 3);
        // Nothing secret in what a log line could print.
        let debug = format!("{sinks:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("123:abc"),
            "{debug}"
        );
    }

    #[test]
    fn every_mistake_names_the_sink_and_the_key() {
        let base =
            "[[sink]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://x/\"\nsecret = \"k\"\n";
        let cases = [
            ("colour = \"red\"\n", "unknown field `colour`"),
            ("timeout = \"0s\"\n", "`timeout` must be more than 0"),
            ("timeout = \"soon\"\n", "`timeout` = \"soon\""),
            ("max-attempts = 0\n", "`max-attempts` must be 1 to 20"),
            ("queue = 0\n", "`queue` must be 1 to 1000000"),
            ("source = \"a..b\"\n", "field `source`"),
            (
                "chat-id = \"1\"\n",
                "`chat-id` is not a setting of a webhook sink",
            ),
            (
                "retry-backoff = \"2s\"\nretry-backoff-max = \"1s\"\n",
                "`retry-backoff-max`",
            ),
        ];
        for (extra, want) in cases {
            let err = parse(&format!("{base}{extra}")).unwrap_err();
            assert!(err.contains(want), "{extra}: {err}");
            assert!(err.starts_with("[[sink]] #1"), "{err}");
        }
        let err = parse(
            "[[sink]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"ftp://x\"\nsecret = \"k\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("`url` must be an http:// or https:// URL"),
            "{err}"
        );
        let err =
            parse("[[sink]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://x\"\n").unwrap_err();
        assert!(err.contains("needs a non-empty `secret`"), "{err}");
        let err = parse("[[sink]]\nname = \"h\"\nkind = \"webhook\"\nurl = \"http://x\"\nsecret = \"${NOPE}\"\n")
            .unwrap_err();
        assert!(
            err.contains("the environment variable NOPE is not set"),
            "{err}"
        );
        let err = parse("[[sink]]\nname = \"h\"\nkind = \"mail\"\n").unwrap_err();
        assert!(
            err.contains("`kind` must be \"webhook\" or \"telegram\""),
            "{err}"
        );
        let err = parse(
            "[[sink]]\nname = \"d\"\nkind = \"telegram\"\nbot-token = \"a/b\"\nchat-id = \"1\"\n",
        )
        .unwrap_err();
        assert!(err.contains("`bot-token`"), "{err}");
        let err = parse(&format!("{base}{base}")).unwrap_err();
        assert!(err.contains("another sink is named `h`"), "{err}");
        let err = parse("sink = 3\n").unwrap_err();
        assert!(err.contains("array of tables"), "{err}");
    }

    #[test]
    fn the_webhook_flag_takes_its_secret_from_the_environment() {
        let with = |name: &str| (name == WEBHOOK_SECRET_ENV).then(|| "k".to_owned());
        let sink = SinkConfig::webhook_flag("https://h.example/x", &with).unwrap();
        assert_eq!(sink.name, "webhook");
        assert_eq!(sink.source, SinkSource::Alerts);
        let err = SinkConfig::webhook_flag("https://h.example/x", &|_| None).unwrap_err();
        assert!(err.contains(WEBHOOK_SECRET_ENV), "{err}");
        let err = SinkConfig::webhook_flag("h.example", &with).unwrap_err();
        assert!(err.starts_with("--webhook: `url`"), "{err}");
    }
}
