//! Chat over the bus: the chat requests whose answer depends on the bus
//! (`chat.nick`, `chat.who`, `chat.rooms`: decided here on a single node,
//! by Redis with `--redis`), and everything chat does with Redis: chat
//! lines as bus payloads on `#chat/<room>`, presence, nick reservations
//! (see [`super::nicks`]), and joins whose ack waits for the room's latest
//! lines and members on every node.
//!
//! What a plain-text `/chat` client asks that needs Redis (`/nick`,
//! `/who`, `/rooms`, `/join`) the [`Chat`](super::Chat) collects in its
//! [`PresenceRelay`](super::presence::PresenceRelay); `Node::flush_chat`
//! sends it after every event, with the chat lines said meanwhile.
//!
//! These are `Node` methods that take the [`RedisBus`] as an argument:
//! only a node with Redis can call them. What chat keeps in Redis (key
//! names, Lua scripts, their replies) is in [`scripts`]; the link carries
//! it as generic requests ([`RedisLink::script`], [`RedisLink::write`]).
//!
//! # Data in Redis
//!
//! Beside the link's own keys (see [`crate::cluster`]):
//!
//! | key | type | content |
//! |---|---|---|
//! | `fanout:room:{room}` | hash | chat presence: field `{node}:{instance}/{member}`, value the member's nick |
//! | `fanout:rooms` | set | chat rooms that have had a member since they were last found empty (added with each presence `HSET`; [`scripts::ROOMS_LUA`] removes a room once no live run has a member in it) |
//! | `fanout:nick:{nick}` | string | chat nick reservation (the nick lowercased): the holder's `{node}:{instance}/{member}`; void once that run's alive key is gone |
//!
//! `{node}:{instance}` is the node run's [`RedisLink::alive_id`]: its
//! alive key `fanout:alive:{node}:{instance}` exists while the run lives.
//!
//! # Chat presence
//!
//! Each node writes its members of each room (`HSET`/`HDEL` on
//! `fanout:room:{room}`, as they join, leave and change nick; link writes
//! [`scripts::presence`]) under its run's alive key. `who` runs
//! [`scripts::WHO_LUA`] (a [`ScriptMode::Read`] call): the room's nicks
//! whose run's alive key exists; fields of runs whose key is gone (the
//! node died; `--presence-ttl`, the link's `alive_ttl`, after its last
//! refresh) are removed on the way. A node's `who` runs after its own
//! earlier presence changes. Rooms run [`scripts::ROOMS_LUA`] over
//! `fanout:rooms` the same way and answer every room's count of live
//! members. Presence changes that do not fit the link's queue, or that
//! Redis refuses, are counted in `fanout_redis_presence_lost_total`.
//!
//! # Chat nicks
//!
//! A claim runs [`scripts::NICK_CLAIM_LUA`] (a [`ScriptMode::Durable`]
//! call): the nick's key is set to the member's field unless a member of a
//! live run (alive key present) holds it, and on success the member's
//! previous nick is deleted if it still holds it. A claim is run on its
//! own, in order after earlier presence changes, and unlike a read it is
//! not failed during an outage: it waits and is sent after reconnection
//! (the node has decided locally meanwhile and reconciles with the answer,
//! see [`super::nicks`]). A release ([`scripts::NICK_RELEASE_LUA`], only
//! if the member still holds it) is a link write, pipelined with presence
//! changes. A dead or stopped run's reservations need no clean-up: its
//! alive key goes, and the next claim takes the key over.

pub mod scripts;

use log::{debug, info};
use serde_json::{json, Value};

use self::scripts::PRESENCE_WRITES;
use super::command::valid_room;
use super::nicks::{self, ClaimOutcome, ClaimState, NickChange, PendingClaim};
use super::presence::{who_line, JoinRequest};
use super::{rooms_answer, rooms_line, ChatLine, LineKind};
use crate::app::bus::{Bus, RedisBus, Reply, Route, Ticket, Waiting};
use crate::app::protocol::{ack, ErrorCode, ProtocolError};
use crate::app::publishing::{unavailable, Answer};
use crate::app::{ConnId, Message, Node, Outbox};
#[cfg(doc)]
use crate::cluster::RedisLink;
use crate::cluster::{Full, History, HistoryEntry, RequestError, ScriptMode};

/// Prefix of the bus channels that carry chat rooms.
pub const CHAT_PREFIX: &str = "#chat/";

/// A `who` waiting for Redis's answer.
#[derive(Debug)]
pub struct WhoWaiting {
    pub reply: Reply,
    pub room: String,
    /// A plain-text `/who` (else a JSON `chat.who`).
    pub plain: bool,
}

/// A join waiting for Redis: the room's latest lines and its members on
/// every node (each None until answered; an error: this node's instead).
#[derive(Debug)]
pub struct JoinWaiting {
    pub reply: Reply,
    pub room: String,
    pub recent: Option<Result<(Vec<ChatLine>, u64), String>>,
    pub members: Option<Result<Vec<String>, String>>,
}

fn no_such_room(room: &str) -> ProtocolError {
    ProtocolError::new(ErrorCode::NotFound, format!("no room named `{room}`"))
}

impl Node {
    /// `chat.nick`: this node decides alone, or Redis does (see
    /// [`Node::claim_nick`]).
    pub(in crate::app) fn chat_nick(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        nick: &str,
        id: &Option<Value>,
        out: &mut impl Outbox,
    ) -> Result<Answer, ProtocolError> {
        let Bus::Redis(redis) = bus else {
            return self.chat.rename(conn, nick, out).map(Answer::Now);
        };
        let Some(reply) = self.reply_to(conn, id.clone()) else {
            return Ok(Answer::Later);
        };
        Ok(
            match self.claim_nick(redis, conn, nick, reply, false, out)? {
                Some(extra) => Answer::Now(extra),
                None => Answer::Later,
            },
        )
    }

    /// `chat.who`: this node's members, or (scale-out) every node's, from
    /// Redis.
    pub(in crate::app) fn chat_who(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        room: String,
        id: &Option<Value>,
    ) -> Result<Answer, ProtocolError> {
        let Bus::Redis(redis) = bus else {
            if !self.chat.room_exists(&room) {
                return Err(no_such_room(&room));
            }
            let members = self.chat.who(&room);
            return Ok(Answer::Now(json!({ "room": room, "members": members })));
        };
        // No room can have such a name: not worth asking Redis.
        if !valid_room(&room) {
            return Err(no_such_room(&room));
        }
        let reply = self.reply_to(conn, id.clone());
        match (ask_who(redis, &room), reply) {
            (Ok(request), Some(reply)) => {
                let plain = false;
                let waiting = WhoWaiting { reply, room, plain };
                redis.wait(Ticket::Request(request), Waiting::Who(waiting));
                Ok(Answer::Later)
            }
            (Ok(_), None) => Ok(Answer::Later),
            (Err(_), _) => {
                let members = self.chat.who(&room);
                self.who_answer(&room, members, true).map(Answer::Now)
            }
        }
    }

    /// `chat.rooms`: this node's rooms, or (scale-out) every node's.
    pub(in crate::app) fn chat_rooms(
        &mut self,
        bus: &mut Bus,
        conn: ConnId,
        id: &Option<Value>,
        out: &mut impl Outbox,
    ) -> Answer {
        let Bus::Redis(redis) = bus else {
            return Answer::Now(self.chat.rooms());
        };
        if let Some(reply) = self.reply_to(conn, id.clone()) {
            self.ask_rooms(redis, reply, false, out);
        }
        Answer::Later
    }

    /// A chat line from the bus: delivered to this node's members of the
    /// room, unless this node delivered it already during an outage.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::app) fn on_chat_line(
        &mut self,
        redis: &mut RedisBus,
        channel: &str,
        room: &str,
        offset: u64,
        payload: &str,
        delivered_here: bool,
        out: &mut impl Outbox,
    ) {
        match parse_chat_payload(room, payload) {
            Some(mut line) if !delivered_here => {
                line.offset = Some(offset);
                self.chat.deliver(line, out)
            }
            Some(_) => {}
            None => redis.malformed(channel, "not a chat line"),
        }
    }

    /// Scale-out `chat.who`: the members on every node (`local`: this
    /// node's only, Redis could not answer).
    fn who_answer(
        &self,
        room: &str,
        members: Vec<String>,
        local: bool,
    ) -> Result<Value, ProtocolError> {
        if members.is_empty() && !self.chat.room_exists(room) {
            return Err(no_such_room(room));
        }
        let mut extra = json!({ "room": room, "members": members });
        if local {
            extra["local"] = json!(true);
        }
        Ok(extra)
    }

    /// Answers a `who` that waited for Redis.
    pub(in crate::app) fn answer_who(
        &mut self,
        waiting: WhoWaiting,
        result: Result<Vec<String>, RequestError>,
        out: &mut impl Outbox,
    ) {
        if !self.still_open(&waiting.reply) {
            return;
        }
        let (members, local) = match result {
            Ok(nicks) => (nicks, false),
            Err(e) => {
                debug!("who [{}] answered from this node only: {e}", waiting.room);
                (self.chat.who(&waiting.room), true)
            }
        };
        let Reply { conn, id, .. } = waiting.reply;
        if waiting.plain {
            out.reply(
                conn,
                Message::Text(&who_line(&waiting.room, &members, local)),
            );
            return;
        }
        match self.who_answer(&waiting.room, members, local) {
            Ok(extra) => out.reply(conn, Message::Text(&ack(&id, "chat.who", extra))),
            Err(e) => self.send_error(conn, &id, &e, out),
        }
    }

    /// Scale-out nick change: reserved in Redis, and answered when Redis
    /// decided (answers None). While the link is not up this node decides
    /// alone and answers at once (`"local": true`); the claim waits for
    /// Redis, which may later rename the member (see [`super::nicks`]).
    fn claim_nick(
        &mut self,
        redis: &mut RedisBus,
        conn: ConnId,
        nick: &str,
        reply: Reply,
        plain: bool,
        out: &mut impl Outbox,
    ) -> Result<Option<Value>, ProtocolError> {
        self.chat.check_rename(conn, nick)?;
        let asking = |c: &PendingClaim| {
            c.reply.conn == conn
                && c.reply.serial == reply.serial
                && matches!(c.state, ClaimState::Asked { .. })
        };
        if redis.nick_claims().any(|(_, claim)| asking(claim)) {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                "a nick change of yours is already waiting for redis: try again when it is answered",
            ));
        }
        // A new member's guest nick is claimed before the nick it asks for.
        self.flush_presence(redis, out);
        let previous = self.chat.nick_of(conn).map(str::to_owned);
        let up = redis.is_up();
        // A claim the link cannot queue is counted there; the nick is then
        // this node's word alone until the next reconnect claims it again.
        if let Ok(request) = ask_claim(redis, conn, nick, previous.as_deref()) {
            let state = if up {
                ClaimState::Asked { plain }
            } else {
                ClaimState::Held
            };
            let claim = PendingClaim {
                reply,
                nick: nick.to_owned(),
                state,
            };
            redis.wait(Ticket::Request(request), Waiting::NickClaim(claim));
            if up {
                return Ok(None);
            }
        }
        let extra = self.chat.apply_rename(conn, nick, out);
        Ok(Some(nicks::mark_local(extra)))
    }

    /// Tells a member who asked for a nick that it is not theirs.
    fn refuse_nick(
        &mut self,
        reply: &Reply,
        plain: bool,
        e: &ProtocolError,
        out: &mut impl Outbox,
    ) {
        if plain {
            out.reply(reply.conn, Message::Text(&format!("! {}", e.message)));
        } else {
            self.send_error(reply.conn, &reply.id, e, out);
        }
    }

    /// Gives a member the nick it asked for and answers it (`local`: this
    /// node decided alone).
    fn grant_nick(
        &mut self,
        reply: &Reply,
        nick: &str,
        plain: bool,
        local: bool,
        out: &mut impl Outbox,
    ) -> Result<(), ProtocolError> {
        self.chat.check_rename(reply.conn, nick)?;
        let extra = self.chat.apply_rename(reply.conn, nick, out);
        match (plain, local) {
            (true, true) => out.reply(reply.conn, Message::Text(&nicks::local_nick_line(nick))),
            (true, false) => {}
            (false, local) => {
                let extra = if local {
                    nicks::mark_local(extra)
                } else {
                    extra
                };
                out.reply(
                    reply.conn,
                    Message::Text(&ack(&reply.id, "chat.nick", extra)),
                );
            }
        }
        Ok(())
    }

    /// Redis's answer to a chat script call (`who`, rooms, a nick claim),
    /// for what waited for it.
    pub(in crate::app) fn on_chat_answer(
        &mut self,
        redis: &mut RedisBus,
        waiting: Waiting,
        result: Result<redis::Value, RequestError>,
        out: &mut impl Outbox,
    ) {
        match waiting {
            Waiting::Who(waiting) => {
                let result = result.and_then(|v| Ok(scripts::parse_who(v)?));
                self.answer_who(waiting, result, out)
            }
            Waiting::JoinPart(join) => {
                let result = result.and_then(|v| Ok(scripts::parse_who(v)?));
                self.on_join_members(redis, join, result, out)
            }
            Waiting::Rooms { reply, plain } => {
                let result = result.and_then(|v| Ok(scripts::parse_rooms(v)?));
                self.answer_rooms(reply, plain, result, out)
            }
            Waiting::NickClaim(claim) => {
                let result = result.and_then(|v| Ok(scripts::parse_nick_claim(v)?));
                self.on_nick_answer(redis, claim, result, out)
            }
            Waiting::Publish(_)
            | Waiting::Definition(_)
            | Waiting::Resume(_)
            | Waiting::Join(_) => {}
        }
    }

    /// Redis's answer to a nick claim.
    fn on_nick_answer(
        &mut self,
        redis: &mut RedisBus,
        claim: PendingClaim,
        result: Result<bool, RequestError>,
        out: &mut impl Outbox,
    ) {
        let nick = claim.nick.clone();
        let conn = claim.reply.conn;
        let open = self.still_open(&claim.reply);
        let plain = matches!(claim.state, ClaimState::Asked { plain: true });
        let granted = match result {
            Ok(granted) => granted,
            Err(why) => {
                redis.nick_claim_failed(&nick, &why.to_string());
                if open && matches!(claim.state, ClaimState::Asked { .. }) {
                    let e = unavailable(format!("cannot reserve nick {nick} now: {why}"));
                    self.refuse_nick(&claim.reply, plain, &e, out);
                }
                return;
            }
        };
        let holds = open && self.chat.nick_of(conn) == Some(nick.as_str());
        match nicks::outcome(&claim.state, granted, open, holds) {
            ClaimOutcome::Settled => {}
            ClaimOutcome::Grant => {
                if let Err(e) = self.grant_nick(&claim.reply, &nick, plain, false, out) {
                    self.refuse_nick(&claim.reply, plain, &e, out);
                    release_nick(redis, conn, &nick);
                }
            }
            ClaimOutcome::Refuse => {
                self.refuse_nick(&claim.reply, plain, &super::nick_taken(&nick), out)
            }
            ClaimOutcome::Release => release_nick(redis, conn, &nick),
            ClaimOutcome::Lost => self.rename_lost(redis, claim.reply, &nick, out),
        }
    }

    /// Another node's member holds the nick this member has: it becomes a
    /// fresh guest, and is told.
    fn rename_lost(
        &mut self,
        redis: &mut RedisBus,
        reply: Reply,
        lost: &str,
        out: &mut impl Outbox,
    ) {
        let conn = reply.conn;
        let guest = self.chat.fresh_guest();
        self.chat.apply_rename(conn, &guest, out);
        let notice = nicks::lost_nick_notice(lost, &guest, self.chat.is_plain(conn));
        out.reply(conn, Message::Text(&notice));
        redis.stats.nick_conflicts += 1;
        info!("nick {lost} of conn {conn} is another node's: renamed {guest}");
        if let Ok(request) = ask_claim(redis, conn, &guest, None) {
            let claim = PendingClaim {
                reply,
                nick: guest,
                state: ClaimState::Held,
            };
            redis.wait(Ticket::Request(request), Waiting::NickClaim(claim));
        }
    }

    /// The link went down: nick changes waiting for Redis are decided here
    /// alone (`"local": true`); their claims stay queued for Redis.
    pub(in crate::app) fn settle_nicks_locally(
        &mut self,
        redis: &mut RedisBus,
        out: &mut impl Outbox,
    ) {
        let asked: Vec<u64> = redis
            .nick_claims()
            .filter(|(_, c)| matches!(c.state, ClaimState::Asked { .. }))
            .map(|(request, _)| request)
            .collect();
        for request in asked {
            let Some(claim) = redis.nick_claim_mut(request) else {
                continue;
            };
            let plain = matches!(claim.state, ClaimState::Asked { plain: true });
            claim.state = ClaimState::Abandoned;
            let (reply, nick) = (claim.reply.clone(), claim.nick.clone());
            if !self.still_open(&reply) {
                continue;
            }
            match self.grant_nick(&reply, &nick, plain, true, out) {
                Ok(()) => {
                    if let Some(claim) = redis.nick_claim_mut(request) {
                        claim.state = ClaimState::Held;
                    }
                }
                Err(e) => self.refuse_nick(&reply, plain, &e, out),
            }
        }
    }

    /// Claims every member's nick here again: after a reconnect (this
    /// node's alive key may have expired, and others may have taken its
    /// nicks) or a data reset. A refusal renames the member.
    pub(in crate::app) fn reassert_nicks(&mut self, redis: &mut RedisBus) {
        let nicks = self.chat.nicks_snapshot();
        for (conn, nick) in nicks {
            self.claim_held_nick(redis, conn, nick);
        }
    }

    /// Claims in Redis a nick the member already holds here (nobody waits
    /// for the answer; a refusal renames the member).
    fn claim_held_nick(&mut self, redis: &mut RedisBus, conn: ConnId, nick: String) {
        let Some(reply) = self.reply_to(conn, None) else {
            return;
        };
        if let Ok(request) = ask_claim(redis, conn, &nick, None) {
            let claim = PendingClaim {
                reply,
                nick,
                state: ClaimState::Held,
            };
            redis.wait(Ticket::Request(request), Waiting::NickClaim(claim));
        }
    }

    /// Asks Redis for every node's rooms (answered by
    /// [`Node::answer_rooms`]); if it cannot be asked, this node's.
    fn ask_rooms(
        &mut self,
        redis: &mut RedisBus,
        reply: Reply,
        plain: bool,
        out: &mut impl Outbox,
    ) {
        match redis.link().script(scripts::rooms(), ScriptMode::Read) {
            Ok(request) => redis.wait(Ticket::Request(request), Waiting::Rooms { reply, plain }),
            Err(e) => self.answer_rooms(reply, plain, Err(e.into()), out),
        }
    }

    pub(in crate::app) fn answer_rooms(
        &mut self,
        reply: Reply,
        plain: bool,
        result: Result<Vec<(String, u64)>, RequestError>,
        out: &mut impl Outbox,
    ) {
        if !self.still_open(&reply) {
            return;
        }
        let (counts, local) = match result {
            Ok(cluster) => (self.chat.merge_room_counts(cluster), false),
            Err(e) => {
                debug!("rooms answered from this node only: {e}");
                (self.chat.room_counts(), true)
            }
        };
        let text = if plain {
            rooms_line(&counts, local)
        } else {
            ack(&reply.id, "chat.rooms", rooms_answer(&counts, local))
        };
        out.reply(reply.conn, Message::Text(&text));
    }

    /// Asks Redis for what a join replays and lists (the room's latest
    /// lines, its members on every node); what cannot be asked is this
    /// node's instead.
    fn ask_for_join(&mut self, redis: &mut RedisBus, join: JoinRequest, out: &mut impl Outbox) {
        let Some(reply) = self.reply_to(join.conn, join.id) else {
            return;
        };
        // Join, leave and nick notices share the room's stream with the
        // lines a join replays: read enough to find them among those.
        let limit = self.chat.history_len().saturating_mul(4) + 16;
        let key = redis.next_join();
        let full = "the redis link's queue is full";
        let channel = format!("{CHAT_PREFIX}{}", join.room);
        let recent = match redis.link().recent(&channel, limit) {
            Ok(request) => {
                redis.wait(Ticket::Request(request), Waiting::JoinPart(key));
                None
            }
            Err(_) => Some(Err(full.to_string())),
        };
        let members = match ask_who(redis, &join.room) {
            Ok(request) => {
                redis.wait(Ticket::Request(request), Waiting::JoinPart(key));
                None
            }
            Err(_) => Some(Err(full.to_string())),
        };
        let waiting = JoinWaiting {
            reply,
            room: join.room,
            recent,
            members,
        };
        redis.wait(Ticket::Join(key), Waiting::Join(waiting));
        self.try_finish_join(redis, key, out);
    }

    /// Redis answered the history read of join `join`.
    pub(in crate::app) fn on_join_history(
        &mut self,
        redis: &mut RedisBus,
        join: u64,
        channel: &str,
        result: Result<History, RequestError>,
        out: &mut impl Outbox,
    ) {
        let recent = result.map_err(|e| e.to_string()).map(|h| {
            let room = channel.strip_prefix(CHAT_PREFIX).unwrap_or_default();
            let (lines, malformed) = chat_history(room, &h.entries);
            if malformed > 0 {
                redis.malformed(channel, "not a chat line");
            }
            (lines, h.last_offset)
        });
        if let Some(Waiting::Join(waiting)) = redis.get_mut(Ticket::Join(join)) {
            waiting.recent = Some(recent);
        }
        self.try_finish_join(redis, join, out);
    }

    /// Redis answered the `who` read of join `join`.
    pub(in crate::app) fn on_join_members(
        &mut self,
        redis: &mut RedisBus,
        join: u64,
        result: Result<Vec<String>, RequestError>,
        out: &mut impl Outbox,
    ) {
        if let Some(Waiting::Join(waiting)) = redis.get_mut(Ticket::Join(join)) {
            waiting.members = Some(result.map_err(|e| e.to_string()));
        }
        self.try_finish_join(redis, join, out);
    }

    /// Answers a join once Redis answered both its questions.
    fn try_finish_join(&mut self, redis: &mut RedisBus, key: u64, out: &mut impl Outbox) {
        let answered = matches!(
            redis.get_mut(Ticket::Join(key)),
            Some(Waiting::Join(j)) if j.recent.is_some() && j.members.is_some()
        );
        if !answered {
            return;
        }
        let Some(Waiting::Join(JoinWaiting {
            reply,
            room,
            recent: Some(recent),
            members: Some(members),
        })) = redis.take(Ticket::Join(key))
        else {
            return;
        };
        if !self.still_open(&reply) {
            return;
        }
        if let Err(e) = recent.as_ref().and(members.as_ref()) {
            debug!("join [{room}] answered from this node only: {e}");
        }
        let Reply { conn, id, .. } = reply;
        self.chat
            .finish_join(conn, &room, recent.ok(), members.ok(), out, |info| {
                ack(&id, "chat.join", info.clone())
            });
    }

    /// Writes every member's presence here to Redis again: after a
    /// reconnect (another node may have cleared it while this node's alive
    /// key had expired) or a data reset.
    pub(in crate::app) fn rewrite_presence(&mut self, redis: &mut RedisBus) {
        for change in self.chat.presence_snapshot() {
            redis.presence(&change);
        }
    }

    /// Sends the chat lines said since the last call through Redis (each
    /// delivered here at once if the link cannot take it now), then the
    /// presence changes and requests collected meanwhile.
    pub(in crate::app) fn flush_chat(&mut self, redis: &mut RedisBus, out: &mut impl Outbox) {
        let Some(lines) = self.chat.relay.as_mut().map(std::mem::take) else {
            return;
        };
        for line in lines {
            let channel = format!("{CHAT_PREFIX}{}", line.room);
            let payload = chat_payload(&redis.run, &line);
            if redis.publish(&channel, payload, None) == Route::Fallback {
                self.chat.deliver(line, out);
            }
        }
        self.flush_presence(redis, out);
    }

    /// Sends the presence changes since the last call to Redis, then the
    /// plain `/who` requests (answered after those changes).
    fn flush_presence(&mut self, redis: &mut RedisBus, out: &mut impl Outbox) {
        let Some(presence) = self.chat.presence.as_mut().map(std::mem::take) else {
            return;
        };
        for change in &presence.changes {
            redis.presence(change);
        }
        for change in presence.nicks {
            match change {
                NickChange::Claim {
                    conn,
                    nick,
                    asked: true,
                } => {
                    let Some(reply) = self.reply_to(conn, None) else {
                        continue;
                    };
                    match self.claim_nick(redis, conn, &nick, reply, true, out) {
                        Ok(Some(_)) => {
                            out.reply(conn, Message::Text(&nicks::local_nick_line(&nick)))
                        }
                        Ok(None) => {}
                        Err(e) => out.reply(conn, Message::Text(&format!("! {}", e.message))),
                    }
                }
                NickChange::Claim {
                    conn,
                    nick,
                    asked: false,
                } => self.claim_held_nick(redis, conn, nick),
                NickChange::Release { conn, nick } => release_nick(redis, conn, &nick),
            }
        }
        for join in presence.joins {
            self.ask_for_join(redis, join, out);
        }
        for conn in presence.rooms {
            if let Some(reply) = self.reply_to(conn, None) {
                self.ask_rooms(redis, reply, true, out);
            }
        }
        for request in presence.who {
            let Some(reply) = self.reply_to(request.conn, None) else {
                continue;
            };
            let waiting = WhoWaiting {
                reply,
                room: request.room,
                plain: true,
            };
            match ask_who(redis, &waiting.room) {
                Ok(id) => redis.wait(Ticket::Request(id), Waiting::Who(waiting)),
                Err(e) => self.answer_who(waiting, Err(e.into()), out),
            }
        }
    }
}

/// Gives a nick back in Redis. Not queued: counted by the link; freed when
/// this node's alive key goes.
fn release_nick(redis: &mut RedisBus, conn: ConnId, nick: &str) {
    let writes = scripts::nick_release(&redis.alive_id, conn as u64, nick);
    let _ = redis.link().write(PRESENCE_WRITES, writes);
}

/// Asks Redis for the members of `room` on every live node (a read: an
/// error at once while Redis is unreachable).
fn ask_who(redis: &RedisBus, room: &str) -> Result<u64, Full> {
    redis.link().script(scripts::who(room), ScriptMode::Read)
}

/// Asks Redis to reserve `nick` for `conn` (releasing its `previous`
/// one): kept through outages until Redis decided; a claim that does not
/// fit the queue is counted by the link.
fn ask_claim(
    redis: &RedisBus,
    conn: ConnId,
    nick: &str,
    previous: Option<&str>,
) -> Result<u64, Full> {
    let call = scripts::nick_claim(&redis.alive_id, conn as u64, nick, previous);
    redis.link().script(call, ScriptMode::Durable)
}

/// The chat lines of a room's history from Redis (with their offsets);
/// entries that are not chat lines are skipped and counted by the caller.
pub fn chat_history(room: &str, entries: &[HistoryEntry]) -> (Vec<ChatLine>, usize) {
    let mut malformed = 0;
    let lines = entries
        .iter()
        .filter_map(|e| {
            let line = parse_chat_payload(room, &e.payload).map(|mut line| {
                line.offset = Some(e.offset);
                line
            });
            malformed += usize::from(line.is_none());
            line
        })
        .collect();
    (lines, malformed)
}

pub fn chat_payload(run: &str, line: &ChatLine) -> String {
    json!({ "i": run, "kind": line.kind.as_str(), "nick": line.nick, "text": line.text, "ts": line.ts })
        .to_string()
}

pub fn parse_chat_payload(room: &str, payload: &str) -> Option<ChatLine> {
    let v: Value = serde_json::from_str(payload).ok()?;
    Some(ChatLine {
        room: room.to_owned(),
        nick: v.get("nick")?.as_str()?.to_owned(),
        text: v.get("text")?.as_str()?.to_owned(),
        kind: LineKind::parse(v.get("kind")?.as_str()?)?,
        ts: v.get("ts")?.as_u64()?,
        offset: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_payloads_round_trip() {
        let line = ChatLine {
            room: "lobby".into(),
            nick: "ann".into(),
            text: "hi".into(),
            kind: LineKind::Me,
            ts: 7,
            offset: None,
        };
        assert_eq!(
            parse_chat_payload("lobby", &chat_payload("r2", &line)),
            Some(line)
        );
        assert_eq!(
            crate::app::bus::payload_run(&chat_payload(
                "r2",
                &ChatLine {
                    room: "lobby".into(),
                    nick: "ann".into(),
                    text: "hi".into(),
                    kind: LineKind::Say,
                    ts: 7,
                    offset: None,
                }
            )),
            "r2"
        );
    }

    #[test]
    fn chat_history_keeps_offsets_and_counts_what_is_not_a_line() {
        let line = ChatLine {
            room: "ops".into(),
            nick: "ann".into(),
            text: "hi".into(),
            kind: LineKind::Say,
            ts: 7,
            offset: None,
        };
        let entry = |offset, payload: String| HistoryEntry {
            offset,
            origin: "node-a".into(),
            origin_seq: 1,
            payload,
        };
        let entries = [
            entry(4, chat_payload("r", &line)),
            entry(5, "{\"kind\":\"shout\"}".into()),
        ];
        let (lines, malformed) = chat_history("ops", &entries);
        assert_eq!(malformed, 1);
        assert_eq!(
            lines,
            vec![ChatLine {
                offset: Some(4),
                ..line
            }]
        );
    }
}
