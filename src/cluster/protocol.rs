//! The Redis data layout and the pure parts of the link: key names, the
//! Lua scripts (publish, define, and chat presence and nicks), and the
//! interpretation of the scripts' replies. Stream entries and the
//! transactions around them are read in `streams.rs`.
//!
//! Nothing here does I/O; the `redis` crate decodes RESP into
//! [`redis::Value`] and these functions turn values into link types,
//! answering `Err` (never panicking) on anything unexpected.

use redis::Value;

use super::errors::ReplyError;

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

/// Chat presence: every room that has (or had) a member on some node, so
/// that [`ROOMS_LUA`] can count them without scanning keys.
pub const ROOMS_KEY: &str = "fanout:rooms";

/// Chat presence: the members of `room` on every node, field
/// [`presence_field`], value the member's nick.
pub fn room_key(room: &str) -> String {
    format!("fanout:room:{room}")
}

/// Exists while the node run `{node}:{instance}` is alive: its writer sets
/// it with a TTL and refreshes it every second; deleted at shutdown.
pub fn alive_key(node_id: &str, instance: &str) -> String {
    format!("{ALIVE_PREFIX}{node_id}:{instance}")
}

/// A room member's field: its node run, `/`, and the node's member id.
/// Node ids and instances have no `/`, so [`WHO_LUA`] can split it.
pub fn presence_field(node_id: &str, instance: &str, member: u64) -> String {
    format!("{node_id}:{instance}/{member}")
}

/// Chat nick reservation: value the owner's [`presence_field`]. Nicks are
/// unique regardless of case, so the key holds the lowercased nick.
pub fn nick_key(nick: &str) -> String {
    format!("fanout:nick:{}", nick.to_ascii_lowercase())
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

/// The `who` script: the nicks of a room's members whose node run is
/// alive; the fields of runs that are not (a node that died without
/// cleaning up) are removed on the way.
///
/// KEYS: the room's presence hash. ARGV: [`ALIVE_PREFIX`].
pub const WHO_LUA: &str = r#"
local flat = redis.call('HGETALL', KEYS[1])
local alive = {}
local nicks = {}
for i = 1, #flat, 2 do
  local run = string.match(flat[i], '^(.*)/[^/]*$')
  if run then
    if alive[run] == nil then
      alive[run] = redis.call('EXISTS', ARGV[1] .. run) == 1
    end
    if alive[run] then
      nicks[#nicks + 1] = flat[i + 1]
    else
      redis.call('HDEL', KEYS[1], flat[i])
    end
  end
end
return nicks
"#;

/// Reserves a chat nick for one member of one node run, unless a member
/// of a live run (its alive key exists) holds it; a holder whose run is
/// gone lost it with its node. On success the member's previous nick is
/// released if it still holds it.
///
/// KEYS: the nick's key, the previous nick's key (the same key when there
/// is none). ARGV: the claimant's [`presence_field`], [`ALIVE_PREFIX`].
/// Returns 1 (reserved, or held already) or 0 (another live member's).
pub const NICK_CLAIM_LUA: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  local run = string.match(holder, '^(.*)/[^/]*$')
  if run and redis.call('EXISTS', ARGV[2] .. run) == 1 then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1])
if KEYS[2] ~= KEYS[1] and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
"#;

/// Releases a nick if this member still holds it (another may have taken
/// it over since, when this node's alive key had expired).
///
/// KEYS: the nick's key. ARGV: the member's [`presence_field`].
pub const NICK_RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The reply of [`NICK_CLAIM_LUA`]: whether the nick is the claimant's.
pub fn parse_nick_claim(v: Value) -> Result<bool, ReplyError> {
    match v {
        Value::Int(1) => Ok(true),
        Value::Int(0) => Ok(false),
        other => Err(ReplyError::new(format!(
            "nick claim: expected 0 or 1, got {}",
            kind(&other)
        ))),
    }
}

/// Every room's member count on every live node, dropping on the way
/// (like [`WHO_LUA`]) the members of runs whose alive key is gone and the
/// rooms left empty.
///
/// KEYS: [`ROOMS_KEY`]. ARGV: [`ALIVE_PREFIX`], the room key prefix.
/// Returns a flat array: room, count, room, count, ...
pub const ROOMS_LUA: &str = r#"
local alive = {}
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. room
  local flat = redis.call('HGETALL', key)
  local count = 0
  for i = 1, #flat, 2 do
    local run = string.match(flat[i], '^(.*)/[^/]*$')
    if run then
      if alive[run] == nil then
        alive[run] = redis.call('EXISTS', ARGV[1] .. run) == 1
      end
      if alive[run] then
        count = count + 1
      else
        redis.call('HDEL', key, flat[i])
      end
    end
  end
  if count == 0 then
    redis.call('SREM', KEYS[1], room)
  else
    out[#out + 1] = room
    out[#out + 1] = count
  end
end
return out
"#;

/// The reply of [`ROOMS_LUA`]: (room, members) sorted by room.
pub fn parse_rooms(v: Value) -> Result<Vec<(String, u64)>, ReplyError> {
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => {
            return Err(ReplyError::new(format!(
                "rooms: expected an array, got {}",
                kind(&other)
            )))
        }
    };
    if items.len() % 2 != 0 {
        return Err(ReplyError::new("rooms: an odd number of items"));
    }
    let mut rooms = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let (Some(room), Some(count)) = (items.next(), items.next()) {
        let room =
            string_of(room).ok_or_else(|| ReplyError::new("rooms: a room name is not a string"))?;
        let count = match count {
            Value::Int(n) if n >= 0 => n as u64,
            other => {
                return Err(ReplyError::new(format!(
                    "rooms: a count is {}",
                    kind(&other)
                )))
            }
        };
        rooms.push((room, count));
    }
    rooms.sort();
    Ok(rooms)
}

/// The reply of [`WHO_LUA`]: the nicks, sorted.
pub fn parse_who(v: Value) -> Result<Vec<String>, ReplyError> {
    let items = match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => {
            return Err(ReplyError::new(format!(
                "who: expected an array, got {}",
                kind(&other)
            )))
        }
    };
    let mut nicks = items
        .into_iter()
        .map(|item| string_of(item).ok_or_else(|| ReplyError::new("who: a nick is not a string")))
        .collect::<Result<Vec<_>, _>>()?;
    nicks.sort();
    Ok(nicks)
}

/// A node id is part of key names and `CLIENT SETNAME`: 1 to 64 ASCII
/// letters, digits, `_`, `-`, `.`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

pub(super) fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

pub(super) fn string_of(v: Value) -> Option<String> {
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
    fn nick_claim_replies() {
        assert_eq!(parse_nick_claim(Value::Int(1)), Ok(true));
        assert_eq!(parse_nick_claim(Value::Int(0)), Ok(false));
        assert!(parse_nick_claim(Value::Int(2)).is_err());
        assert!(parse_nick_claim(Value::Nil).is_err());
        assert!(parse_nick_claim(bulk("1")).is_err());
    }

    #[test]
    fn nick_keys_ignore_case() {
        assert_eq!(nick_key("Ann"), "fanout:nick:ann");
        assert_eq!(nick_key("ann"), nick_key("ANN"));
    }

    #[test]
    fn rooms_replies() {
        let reply = Value::Array(vec![
            bulk("ops"),
            Value::Int(2),
            bulk("lobby"),
            Value::Int(1),
        ]);
        assert_eq!(
            parse_rooms(reply).unwrap(),
            vec![("lobby".to_string(), 1), ("ops".to_string(), 2)]
        );
        assert_eq!(parse_rooms(Value::Nil).unwrap(), vec![]);
        assert!(parse_rooms(Value::Array(vec![bulk("ops")])).is_err());
        assert!(parse_rooms(Value::Array(vec![bulk("ops"), Value::Int(-1)])).is_err());
        assert!(parse_rooms(Value::Array(vec![bulk("ops"), bulk("2")])).is_err());
        assert!(parse_rooms(Value::Int(3)).is_err());
    }

    #[test]
    fn who_replies() {
        assert_eq!(
            parse_who(Value::Array(vec![bulk("bob"), bulk("ann")])).unwrap(),
            vec!["ann".to_string(), "bob".to_string()]
        );
        assert_eq!(parse_who(Value::Nil).unwrap(), Vec::<String>::new());
        assert!(parse_who(Value::Int(1)).is_err());
        assert!(parse_who(Value::Array(vec![Value::Array(vec![])])).is_err());
        assert_eq!(room_key("ops"), "fanout:room:ops");
        assert_eq!(presence_field("a", "ff", 7), "a:ff/7");
        assert_eq!(alive_key("a", "ff"), "fanout:alive:a:ff");
    }

    #[test]
    fn keys() {
        assert_eq!(offset_key("news"), "fanout:offset:news");
        assert_eq!(channel_key("news"), "fanout:ch:news");
        assert_eq!(dedup_key("a", "ff"), "fanout:node:a:ff");
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
