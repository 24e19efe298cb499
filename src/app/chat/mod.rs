//! Chat rooms, shared by plain-text clients on `/chat` (made for
//! `websocat`: every line is a message or a `/command`) and JSON clients on
//! `/ws` (`chat.*` requests). A line said once is encoded once per format
//! and the frame is shared by every member's queue.
//!
//! Slow consumers: lines that do not fit a member's queue are dropped for
//! that member and counted; when its queue drains it is told how many.
//!
//! Scale-out (`--redis`): lines, presence and nicks go through Redis; what
//! chat keeps there (the room, rooms and nick keys, their Lua scripts) and
//! how presence and nick reservations work across nodes is in [`redis`]
//! and its [`redis::scripts`].

pub mod command;
pub mod nicks;
mod plain;
pub mod presence;
pub mod redis;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use log::debug;
use serde_json::{json, Value};

use self::command::{valid_nick, valid_room};
use self::nicks::{guest_nick, NickChange};
use self::presence::{JoinRequest, PresenceChange, PresenceRelay};
use super::protocol::{ErrorCode, ProtocolError};
use super::{unix_millis, ConnId, Message, Outbox};
use crate::ws::SharedFrame;

pub const DEFAULT_ROOM: &str = "lobby";

/// Scale-out: the most lines held for a member whose join waits for
/// Redis; more are dropped for it and counted like a slow consumer's.
const MAX_HELD_WHILE_JOINING: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `/chat`: one line of text per message.
    Plain,
    /// `/ws`: JSON objects.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    Say,
    Me,
    Joined,
    Left,
    Renamed,
}

impl LineKind {
    pub fn parse(s: &str) -> Option<LineKind> {
        Some(match s {
            "say" => Self::Say,
            "me" => Self::Me,
            "join" => Self::Joined,
            "leave" => Self::Left,
            "nick" => Self::Renamed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Say => "say",
            Self::Me => "me",
            Self::Joined => "join",
            Self::Left => "leave",
            Self::Renamed => "nick",
        }
    }
}

/// One line in a room, with its two encodings made on first use.
#[derive(Debug)]
struct Line {
    room: String,
    nick: String,
    text: String,
    kind: LineKind,
    ts: u64,
    /// Scale-out: its offset on the room's bus channel (None: said while
    /// Redis was unreachable, or no scale-out).
    offset: Option<u64>,
    plain: OnceLock<SharedFrame>,
    json: OnceLock<SharedFrame>,
}

impl Line {
    fn new(line: ChatLine) -> Line {
        Line {
            room: line.room,
            nick: line.nick,
            text: line.text,
            kind: line.kind,
            ts: line.ts,
            offset: line.offset,
            plain: OnceLock::new(),
            json: OnceLock::new(),
        }
    }

    /// Kept in a room's history (notices are not).
    fn is_said(&self) -> bool {
        matches!(self.kind, LineKind::Say | LineKind::Me)
    }

    fn frame(&self, format: ChatFormat) -> &SharedFrame {
        match format {
            ChatFormat::Plain => self.plain.get_or_init(|| {
                let text = match self.kind {
                    LineKind::Say => format!("[{}] {}: {}", self.room, self.nick, self.text),
                    LineKind::Me => format!("[{}] * {} {}", self.room, self.nick, self.text),
                    LineKind::Joined => format!("[{}] * {} joined", self.room, self.nick),
                    LineKind::Left => format!("[{}] * {} left", self.room, self.nick),
                    LineKind::Renamed => format!(
                        "[{}] * {} is now known as {}",
                        self.room, self.nick, self.text
                    ),
                };
                SharedFrame::text(&text)
            }),
            ChatFormat::Json => self.json.get_or_init(|| {
                let value = json!({
                    "type": "chat",
                    "kind": self.kind.as_str(),
                    "room": self.room,
                    "nick": self.nick,
                    "text": self.text,
                    "ts": self.ts,
                });
                SharedFrame::text(&value.to_string())
            }),
        }
    }
}

/// A line said in a room, as it travels between nodes (scale-out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatLine {
    pub room: String,
    pub nick: String,
    pub text: String,
    pub kind: LineKind,
    pub ts: u64,
    /// Its offset on the bus (scale-out, once it went through Redis).
    pub offset: Option<u64>,
}

/// Scale-out: a join whose replay waits for Redis.
#[derive(Debug)]
struct Joining {
    room: String,
    /// The room's history here when the member joined, replayed if Redis
    /// cannot answer.
    local_history: Vec<Arc<Line>>,
    /// Lines of the room that arrived since, sent after the replay.
    held: Vec<Arc<Line>>,
}

#[derive(Debug, Default)]
struct Room {
    members: Vec<ConnId>,
    history: VecDeque<Arc<Line>>,
}

#[derive(Debug)]
struct Member {
    nick: String,
    format: ChatFormat,
    rooms: Vec<String>,
    dropped: u64,
    joining: Vec<Joining>,
}

#[derive(Debug)]
pub struct Chat {
    history_len: usize,
    max_line: usize,
    max_rooms: usize,
    rooms: HashMap<String, Room>,
    members: HashMap<ConnId, Member>,
    /// Lowercased nick → owner, so nicks are unique regardless of case.
    nicks: HashMap<String, ConnId>,
    next_guest: u64,
    pub dropped_total: u64,
    /// Scale-out: lines are collected here for the Redis bus instead of
    /// being delivered; the bus hands them back through [`Chat::deliver`].
    relay: Option<Vec<ChatLine>>,
    /// Scale-out: the history of rooms said in on other nodes that have no
    /// member here (at most `max_rooms` of them), so that whoever joins
    /// one here replays it.
    unjoined: HashMap<String, VecDeque<Arc<Line>>>,
    /// Scale-out: presence changes, nick reservations and plain `/who`
    /// requests for Redis.
    presence: Option<PresenceRelay>,
    /// Scale-out: part of every guest nick, drawn per process run, so that
    /// guests of different nodes never share a nick.
    guest_tag: Option<String>,
    /// A token's `sub` for the connections that presented one: the nick
    /// they get on becoming members, and keep.
    identities: HashMap<ConnId, String>,
}

impl Chat {
    pub fn new(history_len: usize, max_line: usize, max_rooms: usize) -> Self {
        Self {
            history_len,
            max_line,
            max_rooms,
            rooms: HashMap::new(),
            members: HashMap::new(),
            nicks: HashMap::new(),
            next_guest: 0,
            dropped_total: 0,
            relay: None,
            unjoined: HashMap::new(),
            presence: None,
            guest_tag: None,
            identities: HashMap::new(),
        }
    }

    /// `conn` presented a token with this `sub`: it is its nick once it
    /// becomes a member (joins a room, or opens `/chat`), if that is a
    /// valid nick no one else here holds; otherwise it gets a guest nick.
    /// Either way it cannot change its nick. A member already has its
    /// nick: a `sub` arriving later changes nothing.
    pub fn set_identity(&mut self, conn: ConnId, sub: &str) {
        if !self.members.contains_key(&conn) {
            self.identities.insert(conn, sub.to_owned());
        }
    }

    fn ensure_member(&mut self, conn: ConnId, format: ChatFormat) -> &mut Member {
        if !self.members.contains_key(&conn) {
            let nick = match self.identities.get(&conn) {
                Some(sub)
                    if valid_nick(sub) && !self.nicks.contains_key(&sub.to_ascii_lowercase()) =>
                {
                    sub.clone()
                }
                _ => self.fresh_guest(),
            };
            self.nicks.insert(nick.to_ascii_lowercase(), conn);
            if let Some(presence) = self.presence.as_mut() {
                presence.nicks.push(NickChange::Claim {
                    conn,
                    nick: nick.clone(),
                    asked: false,
                });
            }
            self.members.insert(
                conn,
                Member {
                    nick,
                    format,
                    rooms: Vec::new(),
                    dropped: 0,
                    joining: Vec::new(),
                },
            );
        }
        self.members.get_mut(&conn).expect("inserted above")
    }

    /// Scale-out (`--redis`): from now on lines, presence changes, nick
    /// reservations and the requests Redis answers are collected for the
    /// bus ([`redis`]) instead of being settled here; guest nicks carry
    /// `guest_tag`, drawn per process run.
    pub fn enable_scale_out(&mut self, guest_tag: String) {
        self.guest_tag = Some(guest_tag);
        self.relay = Some(Vec::new());
        self.presence = Some(PresenceRelay::default());
    }

    /// How many lines a join replays at most.
    pub fn history_len(&self) -> usize {
        self.history_len
    }

    /// A guest nick nobody here has.
    pub fn fresh_guest(&mut self) -> String {
        loop {
            self.next_guest += 1;
            let candidate = guest_nick(self.guest_tag.as_deref(), self.next_guest);
            if !self.nicks.contains_key(&candidate) {
                return candidate;
            }
        }
    }

    /// Joins `room` (creating it), tells the joiner (`json_intro` builds
    /// the JSON client's acknowledgement from the join details), replays
    /// the room's history and announces the join to the room. Scale-out:
    /// the telling and replaying wait for Redis ([`Chat::begin_join`]; `id`
    /// is then the JSON client's request id, for its acknowledgement).
    pub fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        id: &Option<Value>,
        out: &mut impl Outbox,
        json_intro: impl FnOnce(&Value) -> String,
    ) -> Result<(), ProtocolError> {
        if self.presence.is_some() {
            return self.begin_join(conn, room, id.clone(), out);
        }
        let (nick, format, history) = self.enter(conn, room)?;
        let info = json!({ "room": room, "nick": nick, "members": self.who(room), "replayed": history.len() });
        self.introduce(conn, format, &info, &history, json_intro, out);
        self.broadcast(room, &nick, "", LineKind::Joined, out);
        Ok(())
    }

    /// Scale-out join: the member is in the room at once (its presence
    /// noted, the join announced), but its acknowledgement and replay wait
    /// for Redis (the room's latest lines and members on every node),
    /// collected in [`PresenceRelay::joins`] with `id` for a JSON ack;
    /// lines arriving meanwhile are held and follow the replay
    /// ([`Chat::finish_join`]).
    pub fn begin_join(
        &mut self,
        conn: ConnId,
        room: &str,
        id: Option<Value>,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        let (nick, _, local_history) = self.enter(conn, room)?;
        if let Some(member) = self.members.get_mut(&conn) {
            member.joining.push(Joining {
                room: room.to_owned(),
                local_history,
                held: Vec::new(),
            });
        }
        if let Some(presence) = self.presence.as_mut() {
            presence.joins.push(JoinRequest {
                conn,
                room: room.to_owned(),
                id,
            });
        }
        self.broadcast(room, &nick, "", LineKind::Joined, out);
        Ok(())
    }

    /// Scale-out: Redis answered (or could not) for a join. `recent`: the
    /// room's latest lines with the channel's last offset (None: replay
    /// this node's history); `members`: every node's (None: this node's).
    /// Either missing marks the answer `"local": true`.
    pub fn finish_join(
        &mut self,
        conn: ConnId,
        room: &str,
        recent: Option<(Vec<ChatLine>, u64)>,
        members: Option<Vec<String>>,
        out: &mut impl Outbox,
        json_intro: impl FnOnce(&Value) -> String,
    ) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        // Left the room (or was never joining it): nothing to answer.
        let Some(index) = member.joining.iter().position(|j| j.room == room) else {
            return;
        };
        let joining = member.joining.remove(index);
        let (nick, format) = (member.nick.clone(), member.format);
        let local = recent.is_none() || members.is_none();
        let history: Vec<Arc<Line>> = match recent {
            Some((lines, _)) => {
                let said: Vec<Arc<Line>> = lines
                    .into_iter()
                    .map(|l| Arc::new(Line::new(l)))
                    .filter(|l| l.is_said())
                    .collect();
                let skip = said.len().saturating_sub(self.history_len);
                said.into_iter().skip(skip).collect()
            }
            None => joining.local_history,
        };
        let members = members.unwrap_or_else(|| self.who(room));
        let mut info =
            json!({ "room": room, "nick": nick, "members": members, "replayed": history.len() });
        if local {
            info["local"] = json!(true);
        }
        self.introduce(conn, format, &info, &history, json_intro, out);
        // What was held: after the replay, without the lines it replayed.
        let replayed: Vec<u64> = history.iter().filter_map(|l| l.offset).collect();
        for line in joining.held {
            if line.offset.is_some_and(|o| replayed.contains(&o)) {
                continue;
            }
            if !out.deliver(conn, line.frame(format)) {
                self.count_dropped(conn);
            }
        }
    }

    /// Tells a joiner it joined (`info`, the JSON acknowledgement's
    /// content) and replays `history`.
    fn introduce(
        &self,
        conn: ConnId,
        format: ChatFormat,
        info: &Value,
        history: &[Arc<Line>],
        json_intro: impl FnOnce(&Value) -> String,
        out: &mut impl Outbox,
    ) {
        let intro = match format {
            ChatFormat::Plain => {
                let mut intro = format!(
                    "* joined [{}] as {}; last {} message(s):",
                    info["room"].as_str().unwrap_or_default(),
                    info["nick"].as_str().unwrap_or_default(),
                    history.len()
                );
                if info.get("local").is_some() {
                    intro.push_str(" (this node only: redis is unreachable)");
                }
                intro
            }
            ChatFormat::Json => json_intro(info),
        };
        out.reply(conn, Message::Text(&intro));
        for line in history {
            out.reply_shared(conn, line.frame(format));
        }
    }

    fn count_dropped(&mut self, conn: ConnId) {
        if let Some(member) = self.members.get_mut(&conn) {
            if member.dropped == 0 {
                debug!("conn {conn}: dropping chat lines: slow consumer");
            }
            member.dropped += 1;
            self.dropped_total += 1;
        }
    }

    /// Makes `conn` a member of `room` (creating it) and notes its
    /// presence. Answers its nick, format and the room's history here.
    fn enter(
        &mut self,
        conn: ConnId,
        room: &str,
    ) -> Result<(String, ChatFormat, Vec<Arc<Line>>), ProtocolError> {
        if !valid_room(room) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("invalid room name `{room}`: 1-32 characters of lowercase letters, digits, `_` and `-`"),
            ));
        }
        let format = self
            .members
            .get(&conn)
            .map_or(ChatFormat::Json, |m| m.format);
        let room_is_new = !self.rooms.contains_key(room);
        if room_is_new && self.rooms.len() >= self.max_rooms {
            return Err(ProtocolError::new(
                ErrorCode::LimitReached,
                format!(
                    "the server already has its maximum of {} rooms",
                    self.max_rooms
                ),
            ));
        }
        let member = self.ensure_member(conn, format);
        if member.rooms.iter().any(|r| r == room) {
            return Err(conflict(format!("already in [{room}]")));
        }
        member.rooms.push(room.to_owned());
        let nick = member.nick.clone();
        let unjoined = self.unjoined.remove(room);
        let entry = self.rooms.entry(room.to_owned()).or_default();
        if let Some(history) = unjoined {
            entry.history = history;
        }
        entry.members.push(conn);
        let history: Vec<Arc<Line>> = entry.history.iter().cloned().collect();
        self.note_presence(room, conn, Some(&nick));
        Ok((nick, format, history))
    }

    /// Leaves `room`; an empty room other than the lobby is removed.
    pub fn leave(&mut self, conn: ConnId, room: &str, out: &mut impl Outbox) -> bool {
        let Some(member) = self.members.get_mut(&conn) else {
            return false;
        };
        let Some(index) = member.rooms.iter().position(|r| r == room) else {
            return false;
        };
        member.rooms.remove(index);
        member.joining.retain(|j| j.room != room);
        let nick = member.nick.clone();
        if let Some(entry) = self.rooms.get_mut(room) {
            entry.members.retain(|c| *c != conn);
        }
        self.note_presence(room, conn, None);
        self.broadcast(room, &nick, "", LineKind::Left, out);
        if room != DEFAULT_ROOM && self.rooms.get(room).is_some_and(|r| r.members.is_empty()) {
            let removed = self.rooms.remove(room);
            if let (Some(removed), Some(_)) = (removed, &self.relay) {
                if !removed.history.is_empty() {
                    self.unjoined.insert(room.to_owned(), removed.history);
                }
            }
        }
        true
    }

    pub fn say(
        &mut self,
        conn: ConnId,
        room: &str,
        text: &str,
        kind: LineKind,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        let member = self
            .members
            .get(&conn)
            .filter(|m| m.rooms.iter().any(|r| r == room));
        let Some(member) = member else {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("not in [{room}]: join it first"),
            ));
        };
        if text.trim().is_empty() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "field `text` is empty",
            ));
        }
        if text.len() > self.max_line {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!(
                    "field `text` is too long: {} bytes, at most {}",
                    text.len(),
                    self.max_line
                ),
            ));
        }
        // A newline or escape sequence would let one user forge lines, or
        // rewrite the screen, of everyone reading the room in a terminal.
        if has_control_characters(text) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "field `text` must be one line without control characters",
            ));
        }
        let nick = member.nick.clone();
        self.broadcast(room, &nick, text, kind, out);
        Ok(())
    }

    pub fn rename(
        &mut self,
        conn: ConnId,
        nick: &str,
        out: &mut impl Outbox,
    ) -> Result<Value, ProtocolError> {
        self.check_rename(conn, nick)?;
        Ok(self.apply_rename(conn, nick, out))
    }

    /// Whether `conn` may take `nick` as far as this node knows (making it
    /// a member with a guest nick if it is not one yet).
    pub fn check_rename(&mut self, conn: ConnId, nick: &str) -> Result<(), ProtocolError> {
        if let Some(sub) = self.identities.get(&conn) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!("your nick comes from your token (`sub` {sub}) and cannot be changed"),
            ));
        }
        if !valid_nick(nick) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("invalid nick `{nick}`: 1-24 characters of letters, digits, `_` and `-`"),
            ));
        }
        let format = self
            .members
            .get(&conn)
            .map_or(ChatFormat::Json, |m| m.format);
        let old = self.ensure_member(conn, format).nick.clone();
        let key = nick.to_ascii_lowercase();
        match self.nicks.get(&key) {
            Some(owner) if *owner == conn && old == nick => {
                return Err(conflict(format!("you are already {nick}")))
            }
            Some(owner) if *owner != conn => return Err(nick_taken(nick)),
            _ => {}
        }
        Ok(())
    }

    /// Gives `conn` (a member) `nick`, checked by [`Chat::check_rename`]
    /// (and, scale-out, reserved in Redis), and tells its rooms.
    pub fn apply_rename(&mut self, conn: ConnId, nick: &str, out: &mut impl Outbox) -> Value {
        let Some(member) = self.members.get(&conn) else {
            return json!({ "nick": nick });
        };
        let (old, format) = (member.nick.clone(), member.format);
        let key = nick.to_ascii_lowercase();
        self.nicks.remove(&old.to_ascii_lowercase());
        self.nicks.insert(key, conn);
        let member = self.members.get_mut(&conn).expect("ensured above");
        member.nick = nick.to_owned();
        let rooms = member.rooms.clone();
        for room in &rooms {
            self.note_presence(room, conn, Some(nick));
            self.broadcast(room, &old, nick, LineKind::Renamed, out);
        }
        if rooms.is_empty() && format == ChatFormat::Plain {
            tell(out, conn, &format!("* you are now {nick}"));
        }
        json!({ "nick": nick, "previous": old })
    }

    /// A member's nick.
    pub fn nick_of(&self, conn: ConnId) -> Option<&str> {
        self.members.get(&conn).map(|m| m.nick.as_str())
    }

    /// Whether a member is a `/chat` (plain-text) client.
    pub fn is_plain(&self, conn: ConnId) -> bool {
        self.members
            .get(&conn)
            .is_some_and(|m| m.format == ChatFormat::Plain)
    }

    /// Scale-out: every member's nick (reserved again when Redis may have
    /// lost or expired the reservations).
    pub fn nicks_snapshot(&self) -> Vec<(ConnId, String)> {
        self.members
            .iter()
            .map(|(conn, member)| (*conn, member.nick.clone()))
            .collect()
    }

    pub fn room_exists(&self, room: &str) -> bool {
        self.rooms.contains_key(room)
    }

    pub fn who(&self, room: &str) -> Vec<String> {
        let mut nicks: Vec<String> = self
            .rooms
            .get(room)
            .map(|r| {
                r.members
                    .iter()
                    .filter_map(|c| self.members.get(c))
                    .map(|m| m.nick.clone())
                    .collect()
            })
            .unwrap_or_default();
        nicks.sort();
        nicks
    }

    /// Scale-out: every member's presence in every room here (written
    /// again when Redis may have lost or expired it).
    pub fn presence_snapshot(&self) -> Vec<PresenceChange> {
        let mut all = Vec::new();
        for (conn, member) in &self.members {
            for room in &member.rooms {
                all.push(PresenceChange {
                    room: room.clone(),
                    conn: *conn,
                    nick: Some(member.nick.clone()),
                });
            }
        }
        all
    }

    fn note_presence(&mut self, room: &str, conn: ConnId, nick: Option<&str>) {
        if let Some(presence) = self.presence.as_mut() {
            presence.changes.push(PresenceChange {
                room: room.to_owned(),
                conn,
                nick: nick.map(str::to_owned),
            });
        }
    }

    pub fn rooms(&self) -> Value {
        rooms_answer(&self.room_counts(), false)
    }

    /// The rooms here and their members here, sorted by room.
    pub fn room_counts(&self) -> Vec<(String, u64)> {
        let mut rooms: Vec<(String, u64)> = self
            .rooms
            .iter()
            .map(|(name, room)| (name.clone(), room.members.len() as u64))
            .collect();
        rooms.sort();
        rooms
    }

    /// Scale-out: every node's rooms and counts from Redis, with the rooms
    /// here that have no member anywhere (the lobby), sorted by room.
    pub fn merge_room_counts(&self, mut cluster: Vec<(String, u64)>) -> Vec<(String, u64)> {
        for (room, count) in self.room_counts() {
            if !cluster.iter().any(|(r, _)| *r == room) {
                cluster.push((room, count));
            }
        }
        cluster.sort();
        cluster
    }

    fn broadcast(
        &mut self,
        room: &str,
        nick: &str,
        text: &str,
        kind: LineKind,
        out: &mut impl Outbox,
    ) {
        let line = ChatLine {
            room: room.to_owned(),
            nick: nick.to_owned(),
            text: text.to_owned(),
            kind,
            ts: unix_millis(),
            offset: None,
        };
        match self.relay.as_mut() {
            Some(relay) => relay.push(line),
            None => self.deliver(line, out),
        }
    }

    /// Adds a line to its room's history and sends it to the room's
    /// members on this node (nothing when the room has none here).
    pub fn deliver(&mut self, line: ChatLine, out: &mut impl Outbox) {
        let line = Arc::new(Line::new(line));
        let keep = line.is_said() && self.history_len > 0;
        let Some(entry) = self.rooms.get_mut(&line.room) else {
            // Said on another node, in a room with no member here.
            let known = self.unjoined.contains_key(&line.room);
            if keep && self.relay.is_some() && (known || self.unjoined.len() < self.max_rooms) {
                let history = self.unjoined.entry(line.room.clone()).or_default();
                if history.len() >= self.history_len {
                    history.pop_front();
                }
                history.push_back(line);
            }
            return;
        };
        if keep {
            if entry.history.len() >= self.history_len {
                entry.history.pop_front();
            }
            entry.history.push_back(line.clone());
        }
        for conn in &entry.members {
            let Some(member) = self.members.get_mut(conn) else {
                continue;
            };
            let joining = member.joining.iter_mut().find(|j| j.room == line.room);
            let delivered = match joining {
                Some(joining) if joining.held.len() < MAX_HELD_WHILE_JOINING => {
                    joining.held.push(line.clone());
                    true
                }
                Some(_) => false,
                None => out.deliver(*conn, line.frame(member.format)),
            };
            if !delivered {
                if member.dropped == 0 {
                    debug!("conn {conn}: dropping chat lines: slow consumer");
                }
                member.dropped += 1;
                self.dropped_total += 1;
            }
        }
    }

    /// Tells a member whose queue drained how many lines it missed.
    pub fn on_drained(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let Some(member) = self.members.get_mut(&conn) else {
            return;
        };
        let dropped = std::mem::take(&mut member.dropped);
        if dropped == 0 {
            return;
        }
        match member.format {
            ChatFormat::Plain => tell(
                out,
                conn,
                &format!(
                    "! {dropped} chat line(s) were dropped because this connection read too slowly"
                ),
            ),
            ChatFormat::Json => {
                let notice = json!({
                    "type": "dropped",
                    "count": dropped,
                    "message": format!("{dropped} chat line(s) were dropped because this connection read too slowly"),
                });
                out.reply(conn, Message::Text(&notice.to_string()));
            }
        }
    }

    /// The connection is gone: leave every room and free the nick.
    pub fn remove_conn(&mut self, conn: ConnId, out: &mut impl Outbox) {
        self.identities.remove(&conn);
        let Some(member) = self.members.get(&conn) else {
            return;
        };
        for room in member.rooms.clone() {
            self.leave(conn, &room, out);
        }
        if let Some(member) = self.members.remove(&conn) {
            self.nicks.remove(&member.nick.to_ascii_lowercase());
            if let Some(presence) = self.presence.as_mut() {
                presence.nicks.push(NickChange::Release {
                    conn,
                    nick: member.nick,
                });
            }
        }
    }
}

/// A `chat.rooms` answer (`local`: counted on this node only).
pub fn rooms_answer(counts: &[(String, u64)], local: bool) -> Value {
    let rooms: Vec<Value> = counts
        .iter()
        .map(|(room, members)| json!({ "room": room, "members": members }))
        .collect();
    let mut answer = json!({ "rooms": rooms });
    if local {
        answer["local"] = json!(true);
    }
    answer
}

/// A `/rooms` answer line (`local`: counted on this node only).
pub fn rooms_line(counts: &[(String, u64)], local: bool) -> String {
    let listing: Vec<String> = counts
        .iter()
        .map(|(name, n)| format!("[{name}] ({n})"))
        .collect();
    let mut line = format!("* rooms: {}", listing.join(", "));
    if local {
        line.push_str(" (this node only: redis is unreachable)");
    }
    line
}

/// Control characters other than tab.
fn has_control_characters(text: &str) -> bool {
    text.chars().any(|c| c.is_control() && c != '\t')
}

fn conflict(message: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::Conflict, message)
}

/// The same answer whether this node or Redis found the nick taken.
pub fn nick_taken(nick: &str) -> ProtocolError {
    conflict(format!("nick {nick} is taken"))
}

fn not_in_a_room() -> ProtocolError {
    ProtocolError::new(ErrorCode::NotFound, "you are not in a room: /join ROOM")
}

fn tell(out: &mut impl Outbox, conn: ConnId, text: &str) {
    out.reply(conn, Message::Text(text));
}
