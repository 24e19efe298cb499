//! Reading Redis streams and the transactions around them: stream entry
//! IDs, the entries of `XRANGE`/`XREVRANGE`/`XREAD` replies, bus entries
//! (messages and definition announcements), channel history with its
//! accounting, and the `MULTI`/`EXEC` replies of the reader's position
//! and the epoch check. Pure like [`super::protocol`]: decoded values in,
//! link types or a [`ReplyError`] out, never a panic.

use redis::Value;

use super::errors::ReplyError;
use super::protocol::{bytes_of, kind, string_of};

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

/// A bus entry announcing a channel definition (written by [`DEFINE_LUA`](super::protocol::DEFINE_LUA)).
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
        let field = |k, v| match (bytes_of(k), bytes_of(v)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(ReplyError::new(format!(
                "stream entry {id}: a field is not a string"
            ))),
        };
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
                    fields.push(field(k, v)?);
                }
                fields
            }
            Value::Map(pairs) => {
                let mut fields = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    fields.push(field(k, v)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::protocol::tests::{bulk, bus, entry};
    use crate::cluster::protocol::BUS_KEY;
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
