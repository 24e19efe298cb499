//! Chat rooms, shared by plain-text clients on `/chat` (made for
//! `websocat`: every line is a message or a `/command`) and JSON clients on
//! `/ws` (`chat.*` requests). A line said once is encoded once per format
//! and the frame is shared by every member's queue.
//!
//! Slow consumers: lines that do not fit a member's queue are dropped for
//! that member and counted; when its queue drains it is told how many.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use log::debug;
use serde_json::{json, Value};

use super::chat_command::{parse_line, valid_nick, valid_room, ChatInput, HELP};
use super::chat_nicks::{guest_nick, NickChange};
use super::chat_presence::{who_line, PresenceChange, PresenceRelay, WhoRequest};
use super::protocol::{ErrorCode, ProtocolError};
use super::{unix_millis, ConnId, Message, Outbox};
use crate::ws::SharedFrame;

pub const DEFAULT_ROOM: &str = "lobby";

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
    plain: OnceLock<SharedFrame>,
    json: OnceLock<SharedFrame>,
}

impl Line {
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
    pub relay: Option<Vec<ChatLine>>,
    /// Scale-out: the history of rooms said in on other nodes that have no
    /// member here (at most `max_rooms` of them), so that whoever joins
    /// one here replays it.
    unjoined: HashMap<String, VecDeque<Arc<Line>>>,
    /// Scale-out: presence changes, nick reservations and plain `/who`
    /// requests for Redis.
    pub presence: Option<PresenceRelay>,
    /// Scale-out: part of every guest nick, drawn per process run, so that
    /// guests of different nodes never share a nick.
    pub guest_tag: Option<String>,
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
        }
    }

    fn ensure_member(&mut self, conn: ConnId, format: ChatFormat) -> &mut Member {
        if !self.members.contains_key(&conn) {
            let nick = self.fresh_guest();
            self.nicks.insert(nick.clone(), conn);
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
                },
            );
        }
        self.members.get_mut(&conn).expect("inserted above")
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

    /// A `/chat` client connected: greet it and put it in the lobby.
    pub fn on_plain_open(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let nick = self.ensure_member(conn, ChatFormat::Plain).nick.clone();
        let greeting = format!(
            "* welcome to fanout chat: you are {nick} in [{DEFAULT_ROOM}]. Type to talk; {HELP}"
        );
        out.reply(conn, Message::Text(&greeting));
        // The lobby always exists, so joining it cannot fail.
        let _ = self.join(conn, DEFAULT_ROOM, out, |_| String::new());
    }

    /// One `/chat` message: each line is said or run as a command. Problems
    /// are answered with a `! ` line; nothing here disconnects.
    pub fn on_plain_message(&mut self, conn: ConnId, message: Message<'_>, out: &mut impl Outbox) {
        let Message::Text(text) = message else {
            return tell(out, conn, "! binary messages are not chat: send text lines");
        };
        let lines: Vec<&str> = text
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .collect();
        // A trailing newline (websocat sends one per line) is not an empty line.
        let lines = match lines.split_last() {
            Some((last, rest)) if last.is_empty() && !rest.is_empty() => rest,
            _ => &lines[..],
        };
        for line in lines {
            self.plain_line(conn, line, out);
        }
    }

    fn plain_line(&mut self, conn: ConnId, line: &str, out: &mut impl Outbox) {
        if line.trim().is_empty() {
            return tell(out, conn, "! empty line: type something to say, or /help");
        }
        if line.len() > self.max_line {
            return tell(
                out,
                conn,
                &format!(
                    "! line too long: {} bytes, at most {}",
                    line.len(),
                    self.max_line
                ),
            );
        }
        if has_control_characters(line) {
            return tell(
                out,
                conn,
                "! control characters (escape sequences, carriage returns) are not allowed",
            );
        }
        let current_room = self
            .members
            .get(&conn)
            .and_then(|m| m.rooms.first().cloned());
        let result = match parse_line(line) {
            ChatInput::Say(text) => {
                self.say_here(conn, current_room.as_deref(), text, LineKind::Say, out)
            }
            ChatInput::Me(text) => {
                self.say_here(conn, current_room.as_deref(), text, LineKind::Me, out)
            }
            ChatInput::Nick(nick) => match self.presence.is_some() {
                // Scale-out: Redis decides; the answer comes later.
                true => self.check_rename(conn, nick).map(|()| {
                    if let Some(presence) = self.presence.as_mut() {
                        presence.nicks.push(NickChange::Claim {
                            conn,
                            nick: nick.to_owned(),
                            asked: true,
                        });
                    }
                }),
                false => self.rename(conn, nick, out).map(|_| ()),
            },
            ChatInput::Join(room) => {
                if current_room.as_deref() == Some(room) {
                    Err(conflict(format!("you are already in [{room}]")))
                } else {
                    let joined = self.join(conn, room, out, |_| String::new());
                    if joined.is_ok() {
                        if let Some(old) = current_room {
                            self.leave(conn, &old, out);
                        }
                    }
                    joined.map(|_| ())
                }
            }
            ChatInput::Leave => match current_room {
                Some(room) => {
                    self.leave(conn, &room, out);
                    tell(
                        out,
                        conn,
                        &format!("* you left [{room}]; /join ROOM to talk again"),
                    );
                    Ok(())
                }
                None => Err(not_in_a_room()),
            },
            ChatInput::Rooms => {
                let mut rooms: Vec<(String, usize)> = self
                    .rooms
                    .iter()
                    .map(|(name, room)| (name.clone(), room.members.len()))
                    .collect();
                rooms.sort();
                let listing: Vec<String> = rooms
                    .iter()
                    .map(|(name, n)| format!("[{name}] ({n})"))
                    .collect();
                tell(out, conn, &format!("* rooms: {}", listing.join(", ")));
                Ok(())
            }
            ChatInput::Who => match current_room {
                Some(room) => {
                    match self.presence.as_mut() {
                        Some(presence) => presence.who.push(WhoRequest { conn, room }),
                        None => tell(out, conn, &who_line(&room, &self.who(&room), false)),
                    }
                    Ok(())
                }
                None => Err(not_in_a_room()),
            },
            ChatInput::Help => {
                tell(out, conn, &format!("* {HELP}"));
                Ok(())
            }
            ChatInput::Invalid(usage) => Err(ProtocolError::new(ErrorCode::BadRequest, usage)),
            ChatInput::Unknown(command) => Err(ProtocolError::new(
                ErrorCode::UnknownType,
                format!("unknown command /{command}; /help lists them"),
            )),
        };
        if let Err(error) = result {
            tell(out, conn, &format!("! {}", error.message));
        }
    }

    fn say_here(
        &mut self,
        conn: ConnId,
        room: Option<&str>,
        text: &str,
        kind: LineKind,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        match room {
            Some(room) => self.say(conn, room, text, kind, out),
            None => Err(ProtocolError::new(
                ErrorCode::NotFound,
                "you are not in a room: /join ROOM",
            )),
        }
    }

    /// Joins `room` (creating it), tells the joiner (`json_intro` builds
    /// the JSON client's acknowledgement from the join details), replays
    /// the room's history and announces the join to the room.
    pub fn join(
        &mut self,
        conn: ConnId,
        room: &str,
        out: &mut impl Outbox,
        json_intro: impl FnOnce(&Value) -> String,
    ) -> Result<(), ProtocolError> {
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
        let info = json!({ "room": room, "nick": nick, "members": self.who(room), "replayed": history.len() });
        // What the joiner is told first: before the history it replays.
        let intro = match format {
            ChatFormat::Plain => format!(
                "* joined [{room}] as {nick}; last {} message(s):",
                history.len()
            ),
            ChatFormat::Json => json_intro(&info),
        };
        out.reply(conn, Message::Text(&intro));
        for line in &history {
            out.reply_shared(conn, line.frame(format));
        }
        self.broadcast(room, &nick, "", LineKind::Joined, out);
        Ok(())
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
        let mut rooms: Vec<Value> = self
            .rooms
            .iter()
            .map(|(name, room)| json!({ "room": name, "members": room.members.len() }))
            .collect();
        rooms.sort_by(|a, b| a["room"].as_str().cmp(&b["room"].as_str()));
        json!({ "rooms": rooms })
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
        };
        match self.relay.as_mut() {
            Some(relay) => relay.push(line),
            None => self.deliver(line, out),
        }
    }

    /// Adds a line to its room's history and sends it to the room's
    /// members on this node (nothing when the room has none here).
    pub fn deliver(&mut self, line: ChatLine, out: &mut impl Outbox) {
        let ChatLine {
            room,
            nick,
            text,
            kind,
            ts,
        } = line;
        let keep = matches!(kind, LineKind::Say | LineKind::Me) && self.history_len > 0;
        if !self.rooms.contains_key(&room) {
            // Said on another node, in a room with no member here.
            let known = self.unjoined.contains_key(&room);
            if keep && self.relay.is_some() && (known || self.unjoined.len() < self.max_rooms) {
                let history = self.unjoined.entry(room.clone()).or_default();
                if history.len() >= self.history_len {
                    history.pop_front();
                }
                history.push_back(Arc::new(Line {
                    room,
                    nick,
                    text,
                    kind,
                    ts,
                    plain: OnceLock::new(),
                    json: OnceLock::new(),
                }));
            }
            return;
        }
        let entry = self.rooms.get_mut(&room).expect("checked above");
        let line = Arc::new(Line {
            room,
            nick,
            text,
            kind,
            ts,
            plain: OnceLock::new(),
            json: OnceLock::new(),
        });
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
            if !out.deliver(*conn, line.frame(member.format)) {
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
