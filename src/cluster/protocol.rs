//! The Redis data layout and the pure parts of the link: key names, the
//! Lua scripts (publish, define), and the interpretation of the scripts'
//! replies. Stream entries and the
//! transactions around them are read in `streams.rs`.
//!
//! Nothing here does I/O; the `redis` crate decodes RESP into
//! [`redis::Value`] and these functions turn values into link types,
//! answering `Err` (never panicking) on anything unexpected.

use redis::Value;

/// The shared bus stream every node reads (`XREAD BLOCK`).
pub const BUS_KEY: &str = "fanout:bus";
/// The bus sequence counter: entry `n` on the bus carries `bseq = n`, so a
/// reader sees exactly how many entries it missed when the bus was trimmed
/// past it.
pub const BUS_SEQ_KEY: &str = "fanout:bus:seq";
/// A random value written once into an empty Redis (`SET NX`); when it
/// changes between two connections, Redis lost its data (restart without
/// persistence, FLUSHALL, another server behind the same address).
pub const EPOCH_KEY: &str = "fanout:epoch";

/// Channel definitions (`create` settings), one field per channel; the
/// first definition of a channel stays (`HSETNX`).
pub const DEFINITIONS_KEY: &str = "fanout:channels";

/// The prefix of the keys that say a node run is alive (see [`alive_key`]).
pub const ALIVE_PREFIX: &str = "fanout:alive:";

/// Seconds a node instance's publish-dedup key lives after its last publish.
pub const DEDUP_TTL_SECS: u64 = 86_400;

/// The per-channel offset counter.
pub fn offset_key(channel: &str) -> String {
    format!("fanout:offset:{channel}")
}

/// The per-channel stream: entry ID `0-<offset>`, bounded by `MAXLEN ~`.
pub fn channel_key(channel: &str) -> String {
    format!("fanout:ch:{channel}")
}

/// Exists while the node run `{node}:{instance}` is alive: its writer sets
/// it with a TTL and refreshes it every second; deleted at shutdown.
pub fn alive_key(node_id: &str, instance: &str) -> String {
    format!("{ALIVE_PREFIX}{node_id}:{instance}")
}

/// The last publish sequence number of one node instance that Redis
/// applied; makes resending a batch after an ambiguous failure idempotent.
pub fn dedup_key(node_id: &str, instance: &str) -> String {
    format!("fanout:node:{node_id}:{instance}")
}

/// The publish script: one atomic step that assigns the channel offset,
/// appends to the channel stream and to the bus, and records the node's
/// sequence number.
///
/// KEYS: offset counter, channel stream, bus stream, bus counter, dedup key.
/// ARGV: channel, origin, origin seq, payload, channel MAXLEN, bus MAXLEN,
/// dedup TTL.
/// Returns the offset, or 0 when this origin seq was already applied.
///
/// Numbers are formatted with `%d` (Lua 5.1's `tostring` would switch to
/// exponent notation past 14 digits).
pub const PUBLISH_LUA: &str = r#"
local seq = tonumber(ARGV[3])
local seen = tonumber(redis.call('GET', KEYS[5]) or '0') or 0
if seq <= seen then
  return 0
end
local off = redis.call('INCR', KEYS[1])
local ok = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], string.format('0-%d', off),
  'origin', ARGV[2], 'seq', ARGV[3], 'payload', ARGV[4])
if type(ok) == 'table' and ok.err then
  -- The counter is behind the stream (its key was lost or reset): continue
  -- after the highest ID the stream ever generated.
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  local top = 0
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      top = tonumber(string.match(info[i + 1], '^0%-(%d+)$')) or 0
    end
  end
  if top < off then
    return redis.error_reply(ok.err)
  end
  off = top + 1
  redis.call('SET', KEYS[1], string.format('%d', off))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], string.format('0-%d', off),
    'origin', ARGV[2], 'seq', ARGV[3], 'payload', ARGV[4])
end
local bseq = redis.call('INCR', KEYS[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*',
  'ch', ARGV[1], 'off', string.format('%d', off), 'origin', ARGV[2], 'seq', ARGV[3],
  'bseq', string.format('%d', bseq), 'payload', ARGV[4])
redis.call('SET', KEYS[5], ARGV[3], 'EX', ARGV[7])
return off
"#;

/// The define script: records a channel's definition unless the channel
/// has one (first definition wins) and announces the definition now in
/// force on the bus, in one atomic step, so every node applies definitions
/// in bus order and all of them the same one. It shares the publish
/// script's dedup sequence: a resend after an ambiguous failure is skipped.
///
/// KEYS: definitions hash, bus stream, bus counter, dedup key.
/// ARGV: channel, definition, origin, origin seq, bus MAXLEN, dedup TTL.
/// Returns the bus sequence number of the announcement, or 0 when this
/// origin seq was already applied.
pub const DEFINE_LUA: &str = r#"
local seq = tonumber(ARGV[4])
local seen = tonumber(redis.call('GET', KEYS[4]) or '0') or 0
if seq <= seen then
  return 0
end
local created = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
local winner = redis.call('HGET', KEYS[1], ARGV[1])
local bseq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
  'ch', ARGV[1], 'origin', ARGV[3], 'seq', ARGV[4], 'bseq', string.format('%d', bseq),
  'def', winner, 'created', string.format('%d', created))
redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[6])
return bseq
"#;

/// A node id is part of key names and `CLIENT SETNAME`: 1 to 64 ASCII
/// letters, digits, `_`, `-`, `.`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A string-like reply's bytes (an integer's decimal digits).
pub fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

/// A string-like reply as UTF-8 text.
pub fn string_of(v: Value) -> Option<String> {
    String::from_utf8(bytes_of(v)?).ok()
}

/// The outcome of one publish-script call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishReply {
    /// Applied at this offset.
    Offset(u64),
    /// This origin seq was applied before (a resend after an ambiguous
    /// failure).
    Duplicate,
    /// `NOSCRIPT`: the script cache is empty (Redis restarted, `SCRIPT
    /// FLUSH`); load it and resend.
    NoScript,
    /// Redis cannot take writes right now (`LOADING`, `READONLY`,
    /// `MASTERDOWN`, `TRYAGAIN`, `BUSY`): resend after a reconnect.
    Transient(String),
    /// Redis refused this publish for good (out of memory, a key of the
    /// wrong type, a script error): the message is lost.
    Failed(String),
}

/// Classifies one reply of the publish pipeline.
pub fn publish_reply(v: Value) -> PublishReply {
    match v {
        Value::Int(0) => PublishReply::Duplicate,
        Value::Int(n) if n > 0 => PublishReply::Offset(n as u64),
        Value::ServerError(e) => {
            let code = e.code().to_string();
            let text = format!("{code} {}", e.details().unwrap_or(""));
            match code.as_str() {
                "NOSCRIPT" => PublishReply::NoScript,
                "LOADING" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN" => {
                    PublishReply::Transient(text)
                }
                _ => PublishReply::Failed(text),
            }
        }
        other => PublishReply::Failed(format!("unexpected reply {}", kind(&other))),
    }
}

/// A short name for a value's type, for error messages (never the data).
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Int(_) => "integer",
        Value::BulkString(_) => "bulk string",
        Value::Array(_) => "array",
        Value::SimpleString(_) => "simple string",
        Value::Okay => "OK",
        Value::Map(_) => "map",
        Value::Set(_) => "set",
        Value::Double(_) => "double",
        Value::Boolean(_) => "boolean",
        Value::VerbatimString { .. } => "verbatim string",
        Value::Push { .. } => "push",
        Value::ServerError(_) => "error",
        _ => "other value",
    }
}

/// A tiny xorshift generator for backoff jitter (no crypto needed).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A random-enough 64-bit value from std's per-process hash keys, the time
/// and the pid (the instance nonce and the jitter seed).
pub fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(now);
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::cluster) fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    pub(in crate::cluster) fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let mut flat = Vec::new();
        for (k, v) in fields {
            flat.push(bulk(k));
            flat.push(bulk(v));
        }
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    pub(in crate::cluster) fn bus(
        id: &str,
        ch: &str,
        off: &str,
        bseq: &str,
        payload: &str,
    ) -> Value {
        entry(
            id,
            &[
                ("ch", ch),
                ("off", off),
                ("origin", "a"),
                ("seq", "7"),
                ("bseq", bseq),
                ("payload", payload),
            ],
        )
    }

    #[test]
    fn node_ids() {
        assert!(valid_node_id("node-a.1_x"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id("a:b"));
        assert!(!valid_node_id(&"x".repeat(65)));
    }

    #[test]
    fn keys() {
        assert_eq!(offset_key("news"), "fanout:offset:news");
        assert_eq!(channel_key("news"), "fanout:ch:news");
        assert_eq!(dedup_key("a", "ff"), "fanout:node:a:ff");
        assert_eq!(alive_key("a", "ff"), "fanout:alive:a:ff");
    }

    #[test]
    fn publish_replies() {
        assert_eq!(publish_reply(Value::Int(5)), PublishReply::Offset(5));
        assert_eq!(publish_reply(Value::Int(0)), PublishReply::Duplicate);
        assert!(matches!(
            publish_reply(Value::Int(-2)),
            PublishReply::Failed(_)
        ));
        assert!(matches!(publish_reply(Value::Nil), PublishReply::Failed(_)));
        assert!(matches!(publish_reply(bulk("5")), PublishReply::Failed(_)));
    }

    #[test]
    fn jitter_moves() {
        let mut j = Jitter::new(0);
        let a = j.next_u64();
        let b = j.next_u64();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
