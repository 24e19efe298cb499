//! The JSON protocol of `/ws`: requests parsed into typed values with an
//! error that names the offending field, and the reply shapes.
//!
//! Every request is an object with a string `type` and an optional `id`
//! (any JSON value) that the `ack` or `error` reply echoes.

use serde_json::{json, Map, Value};

use super::events::filter::EventFilters;

/// Stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON, not an object, or a binary frame.
    BadRequest,
    UnknownType,
    MissingField,
    InvalidField,
    NotFound,
    Forbidden,
    AuthFailed,
    NotRecoverable,
    LimitReached,
    Conflict,
    /// Scale-out: Redis could not serve the request (history while down).
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownType => "unknown_type",
            Self::MissingField => "missing_field",
            Self::InvalidField => "invalid_field",
            Self::NotFound => "not_found",
            Self::Forbidden => "forbidden",
            Self::AuthFailed => "auth_failed",
            Self::NotRecoverable => "not_recoverable",
            Self::LimitReached => "limit_reached",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Who may publish to a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishPolicy {
    /// Connections on an internal listener, or that presented a key.
    Trusted,
    /// Any connection.
    Anyone,
}

impl PublishPolicy {
    pub fn parse(text: &str) -> Option<PublishPolicy> {
        match text {
            "trusted" => Some(PublishPolicy::Trusted),
            "anyone" => Some(PublishPolicy::Anyone),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PublishPolicy::Trusted => "trusted",
            PublishPolicy::Anyone => "anyone",
        }
    }
}

/// Per-channel settings a `create` may set; `None` takes the server default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelSettings {
    pub backlog: Option<usize>,
    pub backlog_age_secs: Option<u64>,
    pub publish: Option<PublishPolicy>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Register {
        filters: EventFilters,
    },
    Auth(Credential),
    Create {
        channel: String,
        settings: ChannelSettings,
    },
    Publish {
        channel: String,
        data: Value,
    },
    Subscribe {
        channel: String,
        since: Option<u64>,
    },
    Unsubscribe {
        channel: String,
    },
    ListChannels,
    ChatJoin {
        room: String,
    },
    ChatLeave {
        room: String,
    },
    ChatSay {
        room: String,
        text: String,
    },
    ChatNick {
        nick: String,
    },
    ChatWho {
        room: String,
    },
    ChatRooms,
    KlineSubscribe(KlineRequest),
    KlineUnsubscribe {
        symbol: String,
        interval: String,
    },
    MarketSymbols,
    FilterSubscribe {
        name: String,
        filter: Value,
    },
    FilterUnsubscribe {
        name: String,
    },
    AlertCreate {
        request: Map<String, Value>,
    },
    AlertList,
    AlertDelete {
        alert: String,
    },
}

/// What an `auth` request presents: a publisher key (`key`), or a token
/// (`token`, a JWT: see [`crate::app::tokens`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Key(String),
    Token(String),
}

/// A `kline.subscribe` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KlineRequest {
    pub symbol: String,
    pub interval: String,
    /// At most one open-candle update per this many milliseconds (0: all).
    pub throttle_ms: u64,
    /// Closed candles wanted first (default: all kept, at most 1000).
    pub history: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Value>,
    pub command: Command,
}

/// Parses one text message. On failure the error still carries the `id`
/// when one could be read, so the client can match the error to its request.
pub fn parse_request(text: &str) -> Result<Request, (Option<Value>, ProtocolError)> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        (
            None,
            ProtocolError::new(ErrorCode::BadRequest, format!("invalid JSON: {e}")),
        )
    })?;
    let Value::Object(object) = value else {
        return Err((
            None,
            ProtocolError::new(ErrorCode::BadRequest, "a request must be a JSON object"),
        ));
    };
    let id = object.get("id").cloned();
    parse_command(&object)
        .map(|command| Request {
            id: id.clone(),
            command,
        })
        .map_err(|e| (id, e))
}

fn parse_command(object: &Map<String, Value>) -> Result<Command, ProtocolError> {
    let fields = Fields(object);
    let kind = fields.string("type")?;
    Ok(match kind {
        "register" => Command::Register { filters: EventFilters::from_json(object.get("filters"))? },
        "auth" => Command::Auth(fields.credential()?),
        "create" => Command::Create { channel: fields.string("channel")?.to_owned(), settings: fields.settings()? },
        "publish" | "notify" => Command::Publish {
            channel: fields.string("channel")?.to_owned(),
            data: object.get("data").cloned().ok_or_else(|| missing("data"))?,
        },
        "subscribe" => Command::Subscribe { channel: fields.string("channel")?.to_owned(), since: fields.opt_u64("since")? },
        "unsubscribe" => Command::Unsubscribe { channel: fields.string("channel")?.to_owned() },
        "list" | "channels" => Command::ListChannels,
        "chat.join" => Command::ChatJoin { room: fields.string("room")?.to_owned() },
        "chat.leave" => Command::ChatLeave { room: fields.string("room")?.to_owned() },
        "chat.say" => Command::ChatSay { room: fields.string("room")?.to_owned(), text: fields.string("text")?.to_owned() },
        "chat.nick" => Command::ChatNick { nick: fields.string("nick")?.to_owned() },
        "chat.who" => Command::ChatWho { room: fields.string("room")?.to_owned() },
        "chat.rooms" => Command::ChatRooms,
        "kline.subscribe" => Command::KlineSubscribe(KlineRequest {
            symbol: fields.string("symbol")?.to_owned(),
            interval: fields.string("interval")?.to_owned(),
            throttle_ms: fields.opt_u64("throttle_ms")?.unwrap_or(0),
            history: fields.opt_u64("history")?.map(|n| n as usize),
        }),
        "kline.unsubscribe" => Command::KlineUnsubscribe {
            symbol: fields.string("symbol")?.to_owned(),
            interval: fields.string("interval")?.to_owned(),
        },
        "market.symbols" => Command::MarketSymbols,
        "filter.subscribe" => Command::FilterSubscribe {
            name: fields.opt_string("name")?.unwrap_or("default").to_owned(),
            filter: object.get("filter").cloned().ok_or_else(|| missing("filter"))?,
        },
        "filter.unsubscribe" => Command::FilterUnsubscribe { name: fields.string("filter")?.to_owned() },
        "alert.create" => Command::AlertCreate { request: object.clone() },
        "alert.list" => Command::AlertList,
        "alert.delete" => Command::AlertDelete { alert: fields.string("alert")?.to_owned() },
        other => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!(
                    "unknown request type `{other}` (expected register, auth, create, publish, subscribe, unsubscribe, \
                     list, chat.join, chat.leave, chat.say, chat.nick, chat.who, chat.rooms, kline.subscribe, \
                     kline.unsubscribe, market.symbols, filter.subscribe, filter.unsubscribe, alert.create, alert.list \
                     or alert.delete)"
                ),
            ))
        }
    })
}

fn missing(field: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::MissingField,
        format!("field `{field}` is required"),
    )
}

fn invalid(field: &str, expected: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidField,
        format!("field `{field}` must be {expected}"),
    )
}

struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn string(&self, field: &str) -> Result<&'a str, ProtocolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Err(missing(field)),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(invalid(field, "a string")),
        }
    }

    fn opt_string(&self, field: &str) -> Result<Option<&'a str>, ProtocolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(field, "a string")),
        }
    }

    fn opt_u64(&self, field: &str) -> Result<Option<u64>, ProtocolError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| invalid(field, "a non-negative integer")),
        }
    }

    /// `key` or `token`: exactly one of them.
    fn credential(&self) -> Result<Credential, ProtocolError> {
        match (self.opt_string("key")?, self.opt_string("token")?) {
            (Some(key), None) => Ok(Credential::Key(key.to_owned())),
            (None, Some(token)) => Ok(Credential::Token(token.to_owned())),
            (None, None) => Err(ProtocolError::new(
                ErrorCode::MissingField,
                "field `key` (a publisher key) or `token` (a JWT) is required",
            )),
            (Some(_), Some(_)) => Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "fields `key` and `token` exclude each other: send one",
            )),
        }
    }

    fn settings(&self) -> Result<ChannelSettings, ProtocolError> {
        let backlog = self.opt_u64("backlog")?.map(|n| n as usize);
        let backlog_age_secs = self.opt_u64("backlog_age")?;
        let publish = match self.0.get("publish") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if PublishPolicy::parse(s).is_some() => PublishPolicy::parse(s),
            Some(_) => return Err(invalid("publish", "\"trusted\" or \"anyone\"")),
        };
        Ok(ChannelSettings {
            backlog,
            backlog_age_secs,
            publish,
        })
    }
}

/// `{"type":"ack","id":…,"request":…, …extra}`.
pub fn ack(id: &Option<Value>, request: &str, extra: Value) -> String {
    let mut reply = json!({ "type": "ack", "request": request });
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    if let (Value::Object(reply), Value::Object(extra)) = (&mut reply, extra) {
        reply.extend(extra);
    }
    reply.to_string()
}

/// `{"type":"error","id":…,"code":…,"message":…}`.
pub fn error(id: &Option<Value>, error: &ProtocolError) -> String {
    let mut reply =
        json!({ "type": "error", "code": error.code.as_str(), "message": error.message });
    if let Some(id) = id {
        reply["id"] = id.clone();
    }
    reply.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (Option<Value>, ErrorCode, String) {
        let (id, e) = parse_request(text).unwrap_err();
        (id, e.code, e.message)
    }

    #[test]
    fn parses_each_command() {
        let r =
            parse_request(r#"{"type":"subscribe","channel":"trades.*","since":4,"id":7}"#).unwrap();
        assert_eq!(r.id, Some(json!(7)));
        assert_eq!(
            r.command,
            Command::Subscribe {
                channel: "trades.*".into(),
                since: Some(4)
            }
        );
        let r = parse_request(r#"{"type":"notify","channel":"a","data":{"x":1}}"#).unwrap();
        assert_eq!(
            r.command,
            Command::Publish {
                channel: "a".into(),
                data: json!({"x":1})
            }
        );
        let r = parse_request(
            r#"{"type":"create","channel":"a","backlog":10,"backlog_age":60,"publish":"anyone"}"#,
        )
        .unwrap();
        assert_eq!(
            r.command,
            Command::Create {
                channel: "a".into(),
                settings: ChannelSettings {
                    backlog: Some(10),
                    backlog_age_secs: Some(60),
                    publish: Some(PublishPolicy::Anyone)
                }
            }
        );
        assert_eq!(
            parse_request(r#"{"type":"list"}"#).unwrap().command,
            Command::ListChannels
        );
    }

    #[test]
    fn errors_name_the_field_and_keep_the_id() {
        assert_eq!(err("nope").1, ErrorCode::BadRequest);
        assert_eq!(err("[1]").1, ErrorCode::BadRequest);
        let (id, code, message) = err(r#"{"id":"a1","type":"subscribe"}"#);
        assert_eq!((id, code), (Some(json!("a1")), ErrorCode::MissingField));
        assert!(message.contains("`channel`"), "{message}");
        let (_, code, message) = err(r#"{"type":"subscribe","channel":5}"#);
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(message.contains("`channel`"));
        let (_, code, message) = err(r#"{"type":"subscribe","channel":"a","since":-1}"#);
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(message.contains("`since`"));
        assert_eq!(err(r#"{"type":"dance"}"#).1, ErrorCode::UnknownType);
        assert_eq!(err(r#"{"channel":"a"}"#).1, ErrorCode::MissingField);
        assert!(err(r#"{"type":"create","channel":"a","publish":"me"}"#)
            .2
            .contains("`publish`"));
        let (_, code, message) = err(r#"{"type":"auth"}"#);
        assert_eq!(code, ErrorCode::MissingField);
        assert!(
            message.contains("`key`") && message.contains("`token`"),
            "{message}"
        );
        let (_, code, _) = err(r#"{"type":"auth","key":"k","token":"t"}"#);
        assert_eq!(code, ErrorCode::InvalidField);
        assert!(err(r#"{"type":"auth","token":5}"#).2.contains("`token`"));
        assert_eq!(
            parse_request(r#"{"type":"auth","token":"a.b.c"}"#)
                .unwrap()
                .command,
            Command::Auth(Credential::Token("a.b.c".into()))
        );
    }

    #[test]
    fn reply_shapes() {
        let a: Value =
            serde_json::from_str(&ack(&Some(json!(3)), "subscribe", json!({"channel":"x"})))
                .unwrap();
        assert_eq!(
            a,
            json!({"type":"ack","id":3,"request":"subscribe","channel":"x"})
        );
        let e: Value = serde_json::from_str(&error(
            &None,
            &ProtocolError::new(ErrorCode::NotFound, "no"),
        ))
        .unwrap();
        assert_eq!(e, json!({"type":"error","code":"not_found","message":"no"}));
    }
}
