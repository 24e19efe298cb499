//! The Redis data layout and the pure parts of the link: key names, the
//! publish script, and the interpretation of decoded replies.
//!
//! Nothing here does I/O; the `redis` crate decodes RESP into
//! [`redis::Value`] and these functions turn values into link types,
//! answering `Err` (never panicking) on anything unexpected.

use redis::Value;

pub use super::errors::ReplyError;

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

/// A stream entry ID `ms-seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub fn parse(s: &str) -> Option<StreamId> {
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId {
            ms: parse_u64(ms.as_bytes())?,
            seq: parse_u64(seq.as_bytes())?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Digits only, no sign, no overflow.
fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 20 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

/// One entry of a stream as decoded: its ID and its field/value pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl RawEntry {
    fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    fn take_field(&mut self, name: &str) -> Option<Vec<u8>> {
        let i = self.fields.iter().position(|(k, _)| k == name.as_bytes())?;
        Some(std::mem::take(&mut self.fields[i].1))
    }
}

/// A bus entry, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEntry {
    pub id: StreamId,
    pub channel: String,
    pub offset: u64,
    pub origin: String,
    pub origin_seq: u64,
    pub bseq: u64,
    pub payload: String,
}

/// A bus entry announcing a channel definition (written by [`DEFINE_LUA`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinitionEntry {
    pub id: StreamId,
    pub channel: String,
    /// The definition in force (the first one Redis recorded).
    pub definition: String,
    /// Whether this announcement's own definition was the one recorded.
    pub created: bool,
    pub origin: String,
    pub origin_seq: u64,
    pub bseq: u64,
}

/// What a bus entry carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusItem {
    Message(BusEntry),
    Definition(DefinitionEntry),
}

impl BusItem {
    pub fn bseq(&self) -> u64 {
        match self {
            BusItem::Message(e) => e.bseq,
            BusItem::Definition(d) => d.bseq,
        }
    }
}

/// An entry of a channel stream, checked (the answer to a history request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub offset: u64,
    pub origin: String,
    pub origin_seq: u64,
    pub payload: String,
}

fn bytes_of(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

fn string_of(v: Value) -> Option<String> {
    String::from_utf8(bytes_of(v)?).ok()
}

fn u64_of_bytes(b: &[u8]) -> Option<u64> {
    parse_u64(b)
}

/// The reply to `XRANGE`/`XREVRANGE`, or one stream's entries inside an
/// `XREAD` reply: `[[id, [field, value, ...]], ...]`.
pub fn parse_entries(v: Value) -> Result<Vec<RawEntry>, ReplyError> {
    let items = match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => {
            return Err(ReplyError::new(format!(
                "stream entries: expected an array, got {}",
                kind(&other)
            )))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(ReplyError::new("stream entry: expected [id, fields]"));
        };
        let mut pair = pair.into_iter();
        let (Some(id), Some(fields), None) = (pair.next(), pair.next(), pair.next()) else {
            return Err(ReplyError::new(
                "stream entry: expected exactly [id, fields]",
            ));
        };
        let id =
            string_of(id).ok_or_else(|| ReplyError::new("stream entry: the ID is not a string"))?;
        let fields = match fields {
            Value::Array(flat) => {
                if flat.len() % 2 != 0 {
                    return Err(ReplyError::new(format!(
                        "stream entry {id}: odd number of field items"
                    )));
                }
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut it = flat.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    match (bytes_of(k), bytes_of(v)) {
                        (Some(k), Some(v)) => fields.push((k, v)),
                        _ => {
                            return Err(ReplyError::new(format!(
                                "stream entry {id}: a field is not a string"
                            )))
                        }
                    }
                }
                fields
            }
            Value::Map(pairs) => {
                let mut fields = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    match (bytes_of(k), bytes_of(v)) {
                        (Some(k), Some(v)) => fields.push((k, v)),
                        _ => {
                            return Err(ReplyError::new(format!(
                                "stream entry {id}: a field is not a string"
                            )))
                        }
                    }
                }
                fields
            }
            // A deleted entry still listed (XREADGROUP history) has no fields.
            Value::Nil => Vec::new(),
            other => {
                return Err(ReplyError::new(format!(
                    "stream entry {id}: expected a field array, got {}",
                    kind(&other)
                )))
            }
        };
        out.push(RawEntry { id, fields });
    }
    Ok(out)
}

/// The reply to `XREAD ... STREAMS key id`: `nil` on timeout, otherwise
/// `[[key, entries]]` (RESP2) or `{key: entries}` (RESP3). Answers the
/// entries of `key` only.
pub fn parse_xread(v: Value, key: &str) -> Result<Vec<RawEntry>, ReplyError> {
    let streams: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(pairs) => pairs,
        Value::Array(items) => {
            let mut pairs = Vec::with_capacity(items.len());
            for item in items {
                let Value::Array(kv) = item else {
                    return Err(ReplyError::new("XREAD: expected [key, entries]"));
                };
                let mut kv = kv.into_iter();
                let (Some(k), Some(e), None) = (kv.next(), kv.next(), kv.next()) else {
                    return Err(ReplyError::new("XREAD: expected exactly [key, entries]"));
                };
                pairs.push((k, e));
            }
            pairs
        }
        other => {
            return Err(ReplyError::new(format!(
                "XREAD: expected an array, got {}",
                kind(&other)
            )))
        }
    };
    let mut out = Vec::new();
    for (k, entries) in streams {
        if bytes_of(k).as_deref() == Some(key.as_bytes()) {
            out.extend(parse_entries(entries)?);
        }
    }
    Ok(out)
}

/// A decimal field of a stream entry; the error names the entry's kind,
/// its ID and the field.
fn number_field(raw: &RawEntry, kind: &str, name: &str) -> Result<u64, ReplyError> {
    raw.field(name).and_then(u64_of_bytes).ok_or_else(|| {
        ReplyError::new(format!(
            "{kind} entry {}: missing or bad field {name}",
            raw.id
        ))
    })
}

/// Checks a bus entry: every field present and well-formed.
pub fn bus_entry(mut raw: RawEntry) -> Result<BusEntry, ReplyError> {
    let id = StreamId::parse(&raw.id)
        .ok_or_else(|| ReplyError::new(format!("bus entry {}: bad ID", raw.id)))?;
    let num = |raw: &RawEntry, name: &str| number_field(raw, "bus", name);
    let offset = num(&raw, "off")?;
    let origin_seq = num(&raw, "seq")?;
    let bseq = num(&raw, "bseq")?;
    let channel = text_field(&mut raw, "ch")?;
    let origin = text_field(&mut raw, "origin")?;
    let payload = text_field(&mut raw, "payload")?;
    Ok(BusEntry {
        id,
        channel,
        offset,
        origin,
        origin_seq,
        bseq,
        payload,
    })
}

/// Checks any bus entry: a definition announcement has a `def` field,
/// anything else must be a message.
pub fn bus_item(raw: RawEntry) -> Result<BusItem, ReplyError> {
    if raw.field("def").is_none() {
        return bus_entry(raw).map(BusItem::Message);
    }
    definition_entry(raw).map(BusItem::Definition)
}

fn definition_entry(mut raw: RawEntry) -> Result<DefinitionEntry, ReplyError> {
    let id = StreamId::parse(&raw.id)
        .ok_or_else(|| ReplyError::new(format!("bus entry {}: bad ID", raw.id)))?;
    let num = |raw: &RawEntry, name: &str| number_field(raw, "definition", name);
    let origin_seq = num(&raw, "seq")?;
    let bseq = num(&raw, "bseq")?;
    let created = match num(&raw, "created")? {
        0 => false,
        1 => true,
        other => {
            return Err(ReplyError::new(format!(
                "definition entry {}: field created is {other}, expected 0 or 1",
                raw.id
            )))
        }
    };
    let channel = text_field(&mut raw, "ch")?;
    let origin = text_field(&mut raw, "origin")?;
    let definition = text_field(&mut raw, "def")?;
    Ok(DefinitionEntry {
        id,
        channel,
        definition,
        created,
        origin,
        origin_seq,
        bseq,
    })
}

/// The reply to `HGETALL` of the definitions hash: (channel, definition)
/// pairs. A pair that is not UTF-8 is left out and counted in the answer's
/// second part.
pub fn parse_definitions(v: Value) -> Result<(Vec<(String, String)>, u64), ReplyError> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Nil => return Ok((Vec::new(), 0)),
        Value::Map(pairs) => pairs,
        Value::Array(flat) => {
            if flat.len() % 2 != 0 {
                return Err(ReplyError::new("definitions: odd number of hash items"));
            }
            let mut pairs = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        other => {
            return Err(ReplyError::new(format!(
                "definitions: expected a hash, got {}",
                kind(&other)
            )))
        }
    };
    let mut out = Vec::with_capacity(pairs.len());
    let mut unreadable = 0;
    for (k, v) in pairs {
        match (string_of(k), string_of(v)) {
            (Some(channel), Some(definition)) => out.push((channel, definition)),
            _ => unreadable += 1,
        }
    }
    Ok((out, unreadable))
}

fn text_field(raw: &mut RawEntry, name: &str) -> Result<String, ReplyError> {
    raw.take_field(name)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            ReplyError::new(format!(
                "entry {}: missing or non-UTF-8 field {name}",
                raw.id
            ))
        })
}

/// Checks a channel-stream entry (ID `0-<offset>`).
pub fn history_entry(mut raw: RawEntry) -> Result<HistoryEntry, ReplyError> {
    let offset = match StreamId::parse(&raw.id) {
        Some(StreamId { ms: 0, seq }) if seq > 0 => seq,
        _ => {
            return Err(ReplyError::new(format!(
                "channel entry {}: not an offset ID",
                raw.id
            )))
        }
    };
    let origin_seq = number_field(&raw, "channel", "seq")?;
    let origin = text_field(&mut raw, "origin")?;
    let payload = text_field(&mut raw, "payload")?;
    Ok(HistoryEntry {
        offset,
        origin,
        origin_seq,
        payload,
    })
}

/// An integer reply (`GET` of a counter: nil means 0).
pub fn parse_count(v: Value) -> Result<u64, ReplyError> {
    match v {
        Value::Nil => Ok(0),
        Value::Int(i) if i >= 0 => Ok(i as u64),
        other => {
            let desc = kind(&other);
            bytes_of(other)
                .and_then(|b| u64_of_bytes(&b))
                .ok_or_else(|| ReplyError::new(format!("expected a counter, got {desc}")))
        }
    }
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

/// What a history request answers, computed from the entries after the
/// requested offset and the channel's offset counter (read in one
/// `MULTI`/`EXEC`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    /// The entries after `after_offset`, oldest first, at most `limit`.
    pub entries: Vec<HistoryEntry>,
    /// The channel's latest offset (0 when it never had a message, or when
    /// Redis lost its data).
    pub last_offset: u64,
    /// Messages after `after_offset` that the stream no longer holds
    /// (trimmed by `MAXLEN ~`): they precede `entries`.
    pub missed: u64,
    /// `entries` stopped at `limit` before `last_offset`: ask again after
    /// the last entry's offset.
    pub more: bool,
}

/// Builds a [`History`] from the decoded entries and the counter.
pub fn history(
    after_offset: u64,
    limit: usize,
    entries: Vec<HistoryEntry>,
    last_offset: u64,
) -> History {
    let expected_first = after_offset.saturating_add(1);
    let missed = match entries.first() {
        Some(first) => first.offset.saturating_sub(expected_first),
        None => last_offset.saturating_sub(after_offset),
    };
    let more =
        entries.len() >= limit && entries.last().is_some_and(|last| last.offset < last_offset);
    History {
        entries,
        last_offset,
        missed,
        more,
    }
}

/// Splits the reply of a `MULTI`/`EXEC` pipeline into its `n` results.
fn exec_results(v: Value, n: usize, what: &str) -> Result<Vec<Value>, ReplyError> {
    match v {
        Value::Array(items) if items.len() == n => Ok(items),
        other => Err(ReplyError::new(format!(
            "{what}: expected {n} results, got {}",
            kind(&other)
        ))),
    }
}

/// The reply to `MULTI; XRANGE ch 0-<after+1> + COUNT limit; GET offset; EXEC`.
/// The reply of a channel's latest messages (`XREVRANGE` and the offset
/// counter in one `MULTI`): the entries oldest first.
pub fn parse_recent_reply(v: Value) -> Result<History, ReplyError> {
    let mut items = exec_results(v, 2, "recent history")?.into_iter();
    let (Some(entries), Some(counter)) = (items.next(), items.next()) else {
        return Err(ReplyError::new("recent history: missing results"));
    };
    let mut entries = parse_entries(entries)?
        .into_iter()
        .map(history_entry)
        .collect::<Result<Vec<_>, _>>()?;
    entries.reverse();
    Ok(History {
        entries,
        last_offset: parse_count(counter)?,
        missed: 0,
        more: false,
    })
}

pub fn parse_history_reply(
    v: Value,
    after_offset: u64,
    limit: usize,
) -> Result<History, ReplyError> {
    let mut items = exec_results(v, 2, "history")?.into_iter();
    let (Some(entries), Some(counter)) = (items.next(), items.next()) else {
        return Err(ReplyError::new("history: missing results"));
    };
    let entries = parse_entries(entries)?
        .into_iter()
        .map(history_entry)
        .collect::<Result<Vec<_>, _>>()?;
    let last_offset = parse_count(counter)?;
    Ok(history(after_offset, limit, entries, last_offset))
}

/// Where a reader that wants only new messages starts, and the channel
/// definitions recorded up to there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusPosition {
    /// The bus's last ID, `0-0` when it is empty.
    pub top: StreamId,
    /// The bus sequence number there.
    pub bseq: u64,
    /// (channel, definition) pairs.
    pub definitions: Vec<(String, String)>,
    /// Definitions left out because they were not UTF-8.
    pub unreadable: u64,
}

/// The reply to `MULTI; XREVRANGE bus + - COUNT 1; GET bus-seq; HGETALL
/// definitions; EXEC`.
pub fn parse_bus_position(v: Value) -> Result<BusPosition, ReplyError> {
    let mut items = exec_results(v, 3, "bus position")?.into_iter();
    let (Some(top), Some(counter), Some(definitions)) = (items.next(), items.next(), items.next())
    else {
        return Err(ReplyError::new("bus position: missing results"));
    };
    let bseq = parse_count(counter)?;
    let id = match parse_entries(top)?.first() {
        Some(e) => StreamId::parse(&e.id)
            .ok_or_else(|| ReplyError::new(format!("bus position: bad ID {}", e.id)))?,
        None => StreamId { ms: 0, seq: 0 },
    };
    let (definitions, unreadable) = parse_definitions(definitions)?;
    Ok(BusPosition {
        top: id,
        bseq,
        definitions,
        unreadable,
    })
}

/// The reply to `MULTI; SET epoch candidate NX; GET epoch; EXEC` (the `SET`
/// result ignored): the epoch now in Redis.
pub fn parse_epoch(v: Value) -> Result<String, ReplyError> {
    let mut items = exec_results(v, 1, "epoch")?.into_iter();
    items
        .next()
        .and_then(string_of)
        .ok_or_else(|| ReplyError::new("epoch: not a string"))
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
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let mut flat = Vec::new();
        for (k, v) in fields {
            flat.push(bulk(k));
            flat.push(bulk(v));
        }
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    fn bus(id: &str, ch: &str, off: &str, bseq: &str, payload: &str) -> Value {
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
    fn stream_ids() {
        assert_eq!(
            StreamId::parse("1700000000000-3"),
            Some(StreamId {
                ms: 1_700_000_000_000,
                seq: 3
            })
        );
        assert_eq!(StreamId::parse("0-0").unwrap().to_string(), "0-0");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-+2",
            "1--2",
            "99999999999999999999-1",
        ] {
            assert_eq!(StreamId::parse(bad), None, "{bad}");
        }
        assert!(StreamId::parse("1-9").unwrap() < StreamId::parse("2-0").unwrap());
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
    fn xread_timeout_is_empty() {
        assert_eq!(parse_xread(Value::Nil, BUS_KEY).unwrap(), vec![]);
    }

    #[test]
    fn xread_resp2_and_resp3_shapes() {
        let entries = Value::Array(vec![
            bus("5-0", "news", "1", "10", "hello"),
            bus("5-1", "news", "2", "11", "world"),
        ]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk(BUS_KEY), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk(BUS_KEY), entries)]);
        for v in [resp2, resp3] {
            let raw = parse_xread(v, BUS_KEY).unwrap();
            assert_eq!(raw.len(), 2);
            let e = bus_entry(raw[1].clone()).unwrap();
            assert_eq!(e.id, StreamId { ms: 5, seq: 1 });
            assert_eq!(e.channel, "news");
            assert_eq!(e.offset, 2);
            assert_eq!(e.origin, "a");
            assert_eq!(e.origin_seq, 7);
            assert_eq!(e.bseq, 11);
            assert_eq!(e.payload, "world");
        }
    }

    #[test]
    fn xread_other_keys_are_ignored() {
        let v = Value::Array(vec![Value::Array(vec![
            bulk("other"),
            Value::Array(vec![bus("1-0", "c", "1", "1", "x")]),
        ])]);
        assert!(parse_xread(v, BUS_KEY).unwrap().is_empty());
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let bad = [
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![bulk(BUS_KEY)])]),
            Value::Array(vec![Value::Array(vec![bulk(BUS_KEY), Value::Int(1)])]),
            Value::Array(vec![Value::Array(vec![
                bulk(BUS_KEY),
                Value::Array(vec![Value::Array(vec![bulk("1-0")])]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk(BUS_KEY),
                Value::Array(vec![Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("odd")]),
                ])]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk(BUS_KEY),
                Value::Array(vec![Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("k"), Value::Array(vec![])]),
                ])]),
            ])]),
        ];
        for v in bad {
            assert!(parse_xread(v.clone(), BUS_KEY).is_err(), "{v:?}");
        }
    }

    #[test]
    fn bad_bus_entries_are_rejected() {
        let cases = [
            entry("x", &[]),
            entry(
                "1-0",
                &[
                    ("ch", "c"),
                    ("off", "1"),
                    ("origin", "a"),
                    ("seq", "1"),
                    ("payload", "p"),
                ],
            ),
            entry(
                "1-0",
                &[
                    ("ch", "c"),
                    ("off", "-1"),
                    ("origin", "a"),
                    ("seq", "1"),
                    ("bseq", "1"),
                    ("payload", "p"),
                ],
            ),
            entry(
                "1-0",
                &[
                    ("off", "1"),
                    ("origin", "a"),
                    ("seq", "1"),
                    ("bseq", "1"),
                    ("payload", "p"),
                ],
            ),
        ];
        for c in cases {
            let raw = parse_entries(Value::Array(vec![c])).unwrap();
            assert!(bus_entry(raw[0].clone()).is_err());
        }
        let non_utf8 = Value::Array(vec![Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![
                bulk("ch"),
                bulk("c"),
                bulk("off"),
                bulk("1"),
                bulk("origin"),
                bulk("a"),
                bulk("seq"),
                bulk("1"),
                bulk("bseq"),
                bulk("1"),
                bulk("payload"),
                Value::BulkString(vec![0xff, 0xfe]),
            ]),
        ])]);
        let raw = parse_entries(non_utf8).unwrap();
        assert!(bus_entry(raw[0].clone()).is_err());
    }

    #[test]
    fn history_entries() {
        let raw = parse_entries(Value::Array(vec![entry(
            "0-42",
            &[("origin", "b"), ("seq", "3"), ("payload", "{\"x\":1}")],
        )]))
        .unwrap();
        assert_eq!(
            history_entry(raw[0].clone()).unwrap(),
            HistoryEntry {
                offset: 42,
                origin: "b".into(),
                origin_seq: 3,
                payload: "{\"x\":1}".into()
            }
        );
        for id in ["1-42", "0-0", "zz"] {
            let raw = parse_entries(Value::Array(vec![entry(
                id,
                &[("origin", "b"), ("seq", "3"), ("payload", "p")],
            )]))
            .unwrap();
            assert!(history_entry(raw[0].clone()).is_err(), "{id}");
        }
    }

    #[test]
    fn recent_history_comes_oldest_first() {
        let newest_first = Value::Array(vec![
            entry("0-9", &[("origin", "b"), ("seq", "2"), ("payload", "p9")]),
            entry("0-7", &[("origin", "a"), ("seq", "1"), ("payload", "p7")]),
        ]);
        let h = parse_recent_reply(Value::Array(vec![newest_first, bulk("9")])).unwrap();
        let offsets: Vec<u64> = h.entries.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![7, 9]);
        assert_eq!((h.last_offset, h.missed, h.more), (9, 0, false));
        let empty = parse_recent_reply(Value::Array(vec![Value::Array(vec![]), Value::Nil]));
        assert_eq!(empty.unwrap().entries, vec![]);
        assert!(parse_recent_reply(Value::Array(vec![bulk("x")])).is_err());
        assert!(parse_recent_reply(Value::Nil).is_err());
    }

    #[test]
    fn counters() {
        assert_eq!(parse_count(Value::Nil), Ok(0));
        assert_eq!(parse_count(bulk("17")), Ok(17));
        assert_eq!(parse_count(Value::Int(4)), Ok(4));
        assert!(parse_count(Value::Int(-1)).is_err());
        assert!(parse_count(bulk("x")).is_err());
        assert!(parse_count(Value::Array(vec![])).is_err());
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

    fn h(offset: u64) -> HistoryEntry {
        HistoryEntry {
            offset,
            origin: "a".into(),
            origin_seq: offset,
            payload: String::new(),
        }
    }

    #[test]
    fn history_accounting() {
        // Everything after 2 is there.
        let r = history(2, 10, vec![h(3), h(4)], 4);
        assert_eq!((r.missed, r.more, r.last_offset), (0, false, 4));
        // Trimmed: 3..=5 are gone.
        let r = history(2, 10, vec![h(6), h(7)], 7);
        assert_eq!((r.missed, r.more), (3, false));
        // Limit reached before the head.
        let r = history(0, 2, vec![h(1), h(2)], 5);
        assert_eq!((r.missed, r.more), (0, true));
        // Limit reached exactly at the head.
        let r = history(0, 2, vec![h(1), h(2)], 2);
        assert!(!r.more);
        // Nothing left although the counter moved on.
        let r = history(2, 10, vec![], 9);
        assert_eq!((r.missed, r.more), (7, false));
        // Up to date, and a client ahead of a wiped Redis.
        assert_eq!(history(9, 10, vec![], 9).missed, 0);
        assert_eq!(history(9, 10, vec![], 0).missed, 0);
        // No overflow at the top.
        assert_eq!(history(u64::MAX, 10, vec![], 3).missed, 0);
    }

    #[test]
    fn jitter_moves() {
        let mut j = Jitter::new(0);
        let a = j.next_u64();
        let b = j.next_u64();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn exec_replies() {
        let v = Value::Array(vec![
            Value::Array(vec![entry(
                "0-3",
                &[("origin", "a"), ("seq", "1"), ("payload", "x")],
            )]),
            bulk("5"),
        ]);
        let r = parse_history_reply(v, 2, 10).unwrap();
        assert_eq!(r.entries.len(), 1);
        assert_eq!((r.last_offset, r.missed, r.more), (5, 0, false));
        assert!(parse_history_reply(Value::Nil, 0, 1).is_err());
        assert!(parse_history_reply(Value::Array(vec![Value::Nil]), 0, 1).is_err());

        let v = Value::Array(vec![
            Value::Array(vec![bus("9-2", "c", "1", "4", "p")]),
            bulk("4"),
            Value::Array(vec![bulk("news"), bulk("{}"), bulk("bad"), Value::Int(1)]),
        ]);
        let position = parse_bus_position(v).unwrap();
        assert_eq!(
            (position.top, position.bseq),
            (StreamId { ms: 9, seq: 2 }, 4)
        );
        assert_eq!(
            position.definitions,
            vec![("news".into(), "{}".into()), ("bad".into(), "1".into())]
        );
        let v = Value::Array(vec![Value::Array(vec![]), Value::Nil, Value::Array(vec![])]);
        assert_eq!(
            parse_bus_position(v).unwrap(),
            BusPosition {
                top: StreamId { ms: 0, seq: 0 },
                bseq: 0,
                definitions: vec![],
                unreadable: 0
            }
        );
        // The reply of a reader from before definitions (two results).
        let v = Value::Array(vec![Value::Array(vec![]), Value::Nil]);
        assert!(parse_bus_position(v).is_err());
        assert!(parse_bus_position(Value::Okay).is_err());

        assert_eq!(parse_epoch(Value::Array(vec![bulk("ab")])).unwrap(), "ab");
        assert!(parse_epoch(Value::Array(vec![Value::Nil])).is_err());
        assert!(parse_epoch(Value::Array(vec![])).is_err());
    }

    #[test]
    fn definition_entries_and_hashes() {
        let fields = [
            ("ch", "news"),
            ("origin", "b"),
            ("seq", "4"),
            ("bseq", "12"),
            ("def", "{\"publish\":\"anyone\"}"),
            ("created", "1"),
        ];
        let raw = parse_entries(Value::Array(vec![entry("3-1", &fields)])).unwrap();
        assert_eq!(
            bus_item(raw[0].clone()).unwrap(),
            BusItem::Definition(DefinitionEntry {
                id: StreamId { ms: 3, seq: 1 },
                channel: "news".into(),
                definition: "{\"publish\":\"anyone\"}".into(),
                created: true,
                origin: "b".into(),
                origin_seq: 4,
                bseq: 12,
            })
        );
        assert_eq!(bus_item(raw[0].clone()).unwrap().bseq(), 12);
        // A message is still a message.
        let raw = parse_entries(Value::Array(vec![bus("1-0", "c", "1", "1", "p")])).unwrap();
        assert!(matches!(
            bus_item(raw[0].clone()),
            Ok(BusItem::Message(BusEntry { offset: 1, .. }))
        ));
        for (name, bad) in [
            ("created", "2"),
            ("created", "x"),
            ("seq", "-1"),
            ("bseq", ""),
        ] {
            let broken: Vec<(&str, &str)> = fields
                .iter()
                .map(|&(k, v)| if k == name { (k, bad) } else { (k, v) })
                .collect();
            let raw = parse_entries(Value::Array(vec![entry("3-1", &broken)])).unwrap();
            let e = bus_item(raw[0].clone()).unwrap_err();
            assert!(e.to_string().contains(name), "{name}={bad}: {e}");
        }
        let without_channel: Vec<(&str, &str)> =
            fields.iter().copied().filter(|(k, _)| *k != "ch").collect();
        let raw = parse_entries(Value::Array(vec![entry("3-1", &without_channel)])).unwrap();
        assert_eq!(
            bus_item(raw[0].clone()).unwrap_err().to_string(),
            "entry 3-1: missing or non-UTF-8 field ch"
        );

        // RESP3 map, RESP2 flat array, nil, and the shapes that are errors.
        let map = Value::Map(vec![(bulk("a"), bulk("1")), (bulk("b"), bulk("2"))]);
        assert_eq!(
            parse_definitions(map).unwrap(),
            (vec![("a".into(), "1".into()), ("b".into(), "2".into())], 0)
        );
        let non_utf8 = Value::Array(vec![
            bulk("a"),
            Value::BulkString(vec![0xff]),
            bulk("b"),
            bulk("2"),
        ]);
        assert_eq!(
            parse_definitions(non_utf8).unwrap(),
            (vec![("b".into(), "2".into())], 1)
        );
        assert_eq!(parse_definitions(Value::Nil).unwrap(), (vec![], 0));
        assert!(parse_definitions(Value::Array(vec![bulk("odd")])).is_err());
        assert!(parse_definitions(Value::Int(3)).is_err());
    }
}
