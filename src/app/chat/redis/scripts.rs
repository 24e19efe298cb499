//! Chat's Redis knowledge: the key names of presence and nicks, their Lua
//! scripts, the requests chat hands the link (as generic
//! [`ScriptCall`]s and [`WriteCommand`]s) and the parsers of the scripts'
//! replies. The link runs them without knowing what they mean.
//!
//! Presence and nick reservations are kept under the node run's alive key
//! ([`ALIVE_PREFIX`] + [`RedisLink::alive_id`](crate::cluster::RedisLink::alive_id)):
//! a member's field is that id, `/`, and its member number, so a script
//! can tell a dead run's entries by the missing key.

use std::sync::LazyLock;

use redis::Value;

use crate::cluster::protocol::{kind, string_of, ALIVE_PREFIX};
use crate::cluster::{LuaScript, ReplyError, ScriptCall, WriteCommand};

/// Every room that has (or had) a member on some node, so that
/// [`ROOMS_LUA`] can count them without scanning keys.
pub const ROOMS_KEY: &str = "fanout:rooms";

/// The members of `room` on every node, field [`presence_field`], value
/// the member's nick.
pub fn room_key(room: &str) -> String {
    format!("fanout:room:{room}")
}

/// A room member's field: its node run's alive id (`{node}:{instance}`),
/// `/`, and the node's member id. Node ids and instances have no `/`, so
/// [`WHO_LUA`] can split it.
pub fn presence_field(alive_id: &str, member: u64) -> String {
    format!("{alive_id}/{member}")
}

/// A nick reservation: value the owner's [`presence_field`]. Nicks are
/// unique regardless of case, so the key holds the lowercased nick.
pub fn nick_key(nick: &str) -> String {
    format!("fanout:nick:{}", nick.to_ascii_lowercase())
}

/// How the link names refused presence writes in its warning.
pub const PRESENCE_WRITES: &str = "chat presence change(s)";

/// [`WHO_LUA`], as the link runs it.
pub static WHO: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(WHO_LUA));
/// [`ROOMS_LUA`], as the link runs it.
pub static ROOMS: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(ROOMS_LUA));
/// [`NICK_CLAIM_LUA`], as the link runs it.
pub static NICK_CLAIM: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(NICK_CLAIM_LUA));

/// The nicks of `room`'s members on every live node ([`WHO_LUA`]; its
/// reply: [`parse_who`]).
pub fn who(room: &str) -> ScriptCall {
    ScriptCall {
        script: WHO.clone(),
        keys: vec![room_key(room)],
        args: vec![ALIVE_PREFIX.to_owned()],
    }
}

/// Every room's count of members on live nodes ([`ROOMS_LUA`]; its reply:
/// [`parse_rooms`]).
pub fn rooms() -> ScriptCall {
    ScriptCall {
        script: ROOMS.clone(),
        keys: vec![ROOMS_KEY.to_owned()],
        args: vec![ALIVE_PREFIX.to_owned(), room_key("")],
    }
}

/// Reserves `nick` for `member` of the run `alive_id`, releasing its
/// `previous` nick ([`NICK_CLAIM_LUA`]; its reply: [`parse_nick_claim`]).
pub fn nick_claim(alive_id: &str, member: u64, nick: &str, previous: Option<&str>) -> ScriptCall {
    let previous = previous.unwrap_or(nick);
    ScriptCall {
        script: NICK_CLAIM.clone(),
        keys: vec![nick_key(nick), nick_key(previous)],
        args: vec![presence_field(alive_id, member), ALIVE_PREFIX.to_owned()],
    }
}

/// The writes of a presence change: `member` of the run `alive_id` has
/// `nick` in `room` now, or (None) left it.
pub fn presence(alive_id: &str, room: &str, member: u64, nick: Option<&str>) -> Vec<WriteCommand> {
    let field = presence_field(alive_id, member);
    let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<WriteCommand>();
    match nick {
        Some(nick) => vec![
            words(&["HSET", &room_key(room), &field, nick]),
            words(&["SADD", ROOMS_KEY, room]),
        ],
        None => vec![words(&["HDEL", &room_key(room), &field])],
    }
}

/// The write that releases `member`'s `nick` if it still holds it
/// ([`NICK_RELEASE_LUA`], sent as `EVAL`, pipelined with presence
/// changes).
pub fn nick_release(alive_id: &str, member: u64, nick: &str) -> Vec<WriteCommand> {
    let field = presence_field(alive_id, member);
    vec![vec![
        "EVAL".to_owned(),
        NICK_RELEASE_LUA.to_owned(),
        "1".to_owned(),
        nick_key(nick),
        field,
    ]]
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
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
        assert_eq!(presence_field("a:ff", 7), "a:ff/7");
    }

    #[test]
    fn requests_name_the_keys_and_the_run() {
        let call = who("ops");
        assert_eq!(call.keys, ["fanout:room:ops"]);
        assert_eq!(call.args, [ALIVE_PREFIX]);
        assert_eq!(call.script.hash(), LuaScript::new(WHO_LUA).hash());
        let call = rooms();
        assert_eq!(call.keys, [ROOMS_KEY]);
        assert_eq!(call.args, [ALIVE_PREFIX, "fanout:room:"]);
        let call = nick_claim("a:ff", 7, "Ann", Some("bob"));
        assert_eq!(call.keys, ["fanout:nick:ann", "fanout:nick:bob"]);
        assert_eq!(call.args, ["a:ff/7", ALIVE_PREFIX]);
        assert_eq!(
            nick_claim("a:ff", 7, "ann", None).keys,
            ["fanout:nick:ann", "fanout:nick:ann"]
        );
        assert_eq!(
            presence("a:ff", "ops", 7, Some("ann")),
            [
                vec!["HSET", "fanout:room:ops", "a:ff/7", "ann"],
                vec!["SADD", ROOMS_KEY, "ops"]
            ]
        );
        assert_eq!(
            presence("a:ff", "ops", 7, None),
            [vec!["HDEL", "fanout:room:ops", "a:ff/7"]]
        );
        assert_eq!(
            nick_release("a:ff", 7, "Ann"),
            [vec![
                "EVAL",
                NICK_RELEASE_LUA,
                "1",
                "fanout:nick:ann",
                "a:ff/7"
            ]]
        );
    }
}
