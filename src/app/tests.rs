//! Test helpers shared by the app's unit tests (a recording [`Outbox`],
//! a fake Redis [`Transport`]), and the tests of the app as a whole: the
//! clustered paths, driven through the same [`App`] entry points as the
//! event loop uses, with Redis's answers scripted.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::chat::redis::scripts;
use super::chat::{ChatLine, LineKind};
use super::*;
use crate::cluster::{
    Full, Inbound, LinkState, LinkStats, RequestError, ScriptCall, ScriptMode, WriteCommand,
};

/// An outbox that records everything; connections in `full` refuse fan-out
/// and hold states the way the server does (latest per key, at most
/// `max_held` per stream, the oldest given up first).
#[derive(Debug, Default)]
pub struct RecordingOutbox {
    pub replies: Vec<(ConnId, String)>,
    pub delivered: Vec<(ConnId, SharedFrame)>,
    pub closed: Vec<(ConnId, u16)>,
    pub full: HashSet<ConnId>,
    pub held: BTreeMap<(ConnId, StateKey), SharedFrame>,
    pub max_held: usize,
}

impl RecordingOutbox {
    /// `conn`'s queue has room again: its held states are delivered, in
    /// key order, as the server's flush does.
    pub fn release(&mut self, conn: ConnId) {
        self.full.remove(&conn);
        let keys: Vec<(ConnId, StateKey)> = self
            .held
            .keys()
            .filter(|(c, _)| *c == conn)
            .copied()
            .collect();
        for key in keys {
            let frame = self.held.remove(&key).unwrap();
            self.delivered.push((conn, frame));
        }
    }
}

/// The text a shared text frame carries.
pub fn frame_text(frame: &SharedFrame) -> String {
    let bytes = frame.bytes();
    let header = match bytes[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    String::from_utf8(bytes[header..].to_vec()).unwrap()
}

impl Outbox for RecordingOutbox {
    fn reply(&mut self, to: ConnId, message: Message<'_>) {
        let text = match message {
            Message::Text(t) => t.to_owned(),
            Message::Binary(b) => format!("{b:?}"),
        };
        self.replies.push((to, text));
    }

    fn reply_shared(&mut self, to: ConnId, frame: &SharedFrame) {
        self.replies.push((to, frame_text(frame)));
    }

    fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool {
        if self.full.contains(&to) {
            return false;
        }
        self.delivered.push((to, frame.clone()));
        true
    }

    fn deliver_state(&mut self, to: ConnId, key: StateKey, frame: &SharedFrame) -> StateDelivery {
        let holding = self.held.keys().any(|(c, _)| *c == to);
        if !holding && self.deliver(to, frame) {
            return StateDelivery::Queued;
        }
        if self.held.insert((to, key), frame.clone()).is_some() {
            return StateDelivery::Replaced;
        }
        let in_stream: Vec<(ConnId, StateKey)> = self
            .held
            .keys()
            .filter(|(c, k)| *c == to && k.stream == key.stream)
            .copied()
            .collect();
        if in_stream.len() > self.max_held.max(1) {
            self.held.remove(&in_stream[0]);
            return StateDelivery::Evicted {
                item: in_stream[0].1.item,
            };
        }
        StateDelivery::Held
    }

    fn discard_states(&mut self, to: ConnId, stream: u64) {
        self.held
            .retain(|(c, k), _| !(*c == to && k.stream == stream));
    }

    fn close(&mut self, to: ConnId, code: CloseCode, _reason: &str) {
        self.closed.push((to, code.0));
    }
}

/// What the fake link was asked, and what it will answer.
#[derive(Debug)]
pub struct Script {
    pub state: LinkState,
    /// Every call answers `Full`, as a full outbound queue does.
    pub full: bool,
    next_seq: u64,
    next_request: u64,
    /// Publishes: (channel, payload, origin_seq).
    pub published: Vec<(String, String, u64)>,
    /// Reads: (what, channel or room, request id); `what` is `recent`,
    /// `history`, `who` or `rooms`.
    pub reads: Vec<(&'static str, String, u64)>,
    /// Nick claims: (member, nick, request id).
    pub claims: Vec<(u64, String, u64)>,
    /// What `drain` hands over next.
    pub inbound: Vec<Inbound>,
}

/// A stand-in for the Redis link: it numbers requests as
/// [`crate::cluster::RedisLink`] does (publishes and definitions in one
/// sequence, reads and claims in another) and hands over whatever the
/// test scripted, so the app's clustered paths run without a Redis.
#[derive(Debug, Clone)]
pub struct FakeLink(pub Arc<Mutex<Script>>);

impl FakeLink {
    pub fn new(state: LinkState) -> FakeLink {
        FakeLink(Arc::new(Mutex::new(Script {
            state,
            full: false,
            next_seq: 0,
            next_request: 0,
            published: Vec::new(),
            reads: Vec::new(),
            claims: Vec::new(),
            inbound: Vec::new(),
        })))
    }

    pub fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }

    fn seq(&self) -> Result<u64, Full> {
        let mut s = self.script();
        if s.full {
            return Err(Full);
        }
        s.next_seq += 1;
        Ok(s.next_seq)
    }

    fn read(&self, what: &'static str, name: &str) -> Result<u64, Full> {
        let mut s = self.script();
        if s.full {
            return Err(Full);
        }
        s.next_request += 1;
        let request = s.next_request;
        s.reads.push((what, name.to_owned(), request));
        Ok(request)
    }
}

impl Transport for FakeLink {
    fn node_id(&self) -> &str {
        "node-a"
    }
    fn state(&self) -> LinkState {
        self.script().state
    }
    fn stats(&self) -> LinkStats {
        LinkStats {
            state: self.state(),
            published: 0,
            defined: 0,
            received: 0,
            lost_queue_full: 0,
            lost_rejected: 0,
            lost_bus_gap: 0,
            lost_at_shutdown: 0,
            malformed: 0,
            duplicates: 0,
            history_answered: 0,
            writes_lost: 0,
            outbound_queued: 0,
            inbound_queued: 0,
            lag_ms: 0,
            reconnects: 0,
            connect_failures: 0,
            outages: 0,
            resets: 0,
            down_ms: 0,
            down_total_ms: 0,
        }
    }
    fn publish(&self, channel: &str, payload: String) -> Result<u64, Full> {
        let seq = self.seq()?;
        self.script()
            .published
            .push((channel.to_owned(), payload, seq));
        Ok(seq)
    }
    fn define(&self, _channel: &str, _definition: String) -> Result<u64, Full> {
        self.seq()
    }
    fn alive_id(&self) -> String {
        "node-a:0123456789abcdef".into()
    }
    /// Tells chat's scripts by their hash, and reads their keys back.
    fn script(&self, call: ScriptCall, mode: ScriptMode) -> Result<u64, Full> {
        if call.script == *scripts::NICK_CLAIM {
            assert_eq!(mode, ScriptMode::Durable);
            let member = call.args[0].rsplit('/').next().unwrap().parse().unwrap();
            let nick = call.keys[0].strip_prefix("fanout:nick:").unwrap();
            let mut s = self.script();
            s.next_request += 1;
            let request = s.next_request;
            s.claims.push((member, nick.to_owned(), request));
            return Ok(request);
        }
        assert_eq!(mode, ScriptMode::Read);
        if call.script == *scripts::WHO {
            let room = call.keys[0].strip_prefix("fanout:room:").unwrap();
            return self.read("who", room);
        }
        assert!(call.script == *scripts::ROOMS, "{call:?}");
        self.read("rooms", "")
    }
    fn write(&self, _what: &'static str, _commands: Vec<WriteCommand>) -> Result<(), Full> {
        Ok(())
    }
    fn history(&self, channel: &str, _after_offset: u64, _limit: usize) -> Result<u64, Full> {
        self.read("history", channel)
    }
    fn recent(&self, channel: &str, _limit: usize) -> Result<u64, Full> {
        self.read("recent", channel)
    }
    fn drain(&self) -> Vec<Inbound> {
        std::mem::take(&mut self.script().inbound)
    }
}

const PUBLISHER: ConnId = 1;
const SUBSCRIBER: ConnId = 2;

fn open(app: &mut App, conn: ConnId, role: Role, out: &mut RecordingOutbox) {
    let info = ConnInfo {
        role,
        peer: "127.0.0.1:9".parse().unwrap(),
    };
    app.on_open(conn, Endpoint::Ws, info, None, Instant::now(), out);
}

fn send(app: &mut App, conn: ConnId, request: &str, out: &mut RecordingOutbox) {
    app.on_message(
        conn,
        Endpoint::Ws,
        Message::Text(request),
        Instant::now(),
        out,
    );
}

/// The JSON replies `conn` got, oldest first (the welcome left out).
fn replies_to(out: &RecordingOutbox, conn: ConnId) -> Vec<Value> {
    out.replies
        .iter()
        .filter(|(to, _)| *to == conn)
        .map(|(_, text)| serde_json::from_str::<Value>(text).unwrap())
        .filter(|v| v["type"] != "welcome")
        .collect()
}

fn delivered_to(out: &RecordingOutbox, conn: ConnId) -> Vec<Value> {
    out.delivered
        .iter()
        .filter(|(to, _)| *to == conn)
        .map(|(_, frame)| serde_json::from_str(&frame_text(frame)).unwrap())
        .collect()
}

/// An app attached to a fake link in `state`, with a trusted publisher
/// and a subscriber of `prices`.
fn clustered(state: LinkState) -> (App, FakeLink, RecordingOutbox) {
    let mut app = App::new(&Config::default(), Instant::now()).unwrap();
    let link = FakeLink::new(state);
    app.attach_transport(Box::new(link.clone()));
    let mut out = RecordingOutbox::default();
    open(&mut app, PUBLISHER, Role::Internal, &mut out);
    open(&mut app, SUBSCRIBER, Role::Public, &mut out);
    send(
        &mut app,
        SUBSCRIBER,
        r#"{"type":"subscribe","channel":"prices"}"#,
        &mut out,
    );
    (app, link, out)
}

#[test]
fn a_publish_waits_for_the_bus_and_is_acked_with_the_offset_redis_gave() {
    let (mut app, link, mut out) = clustered(LinkState::Up);
    send(
        &mut app,
        PUBLISHER,
        r#"{"type":"publish","channel":"prices","data":{"p":1},"id":7}"#,
        &mut out,
    );
    // Pending on Redis: nothing delivered, nothing acked yet.
    assert!(replies_to(&out, PUBLISHER).is_empty());
    assert!(delivered_to(&out, SUBSCRIBER).is_empty());
    let (channel, payload, seq) = link.script().published[0].clone();
    assert_eq!(channel, "prices");
    assert_eq!(
        bus::parse_message_payload(&payload).unwrap().1,
        json!({"p": 1})
    );

    link.script().inbound.push(Inbound::Message {
        channel: "prices".into(),
        offset: 41,
        origin: "node-a".into(),
        origin_seq: seq,
        payload,
    });
    app.on_cluster(Instant::now(), &mut out);
    let delivered = delivered_to(&out, SUBSCRIBER);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["offset"], 41);
    assert_eq!(delivered[0]["data"], json!({"p": 1}));
    let acks = replies_to(&out, PUBLISHER);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (
            &acks[0]["request"],
            &acks[0]["id"],
            &acks[0]["offset"],
            &acks[0]["delivered"]
        ),
        (&json!("publish"), &json!(7), &json!(41), &json!(1))
    );
    assert!(acks[0].get("local").is_none());
}

#[test]
fn while_the_link_is_down_a_publish_is_delivered_here_and_not_again_from_the_bus() {
    let (mut app, link, mut out) = clustered(LinkState::Down);
    send(
        &mut app,
        PUBLISHER,
        r#"{"type":"publish","channel":"prices","data":{"p":2},"id":"x"}"#,
        &mut out,
    );
    let acks = replies_to(&out, PUBLISHER);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["offset"], Value::Null);
    assert_eq!(acks[0]["local"], true);
    assert_eq!(acks[0]["delivered"], 1);
    let delivered = delivered_to(&out, SUBSCRIBER);
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["offset"], Value::Null);
    assert_eq!(delivered[0]["local"], true);

    // Queued for Redis all the same; when it comes back after the outage
    // it is only recorded here (under its offset), and not acked again.
    let (_, payload, seq) = link.script().published[0].clone();
    link.script().state = LinkState::Up;
    link.script().inbound.push(Inbound::Message {
        channel: "prices".into(),
        offset: 5,
        origin: "node-a".into(),
        origin_seq: seq,
        payload,
    });
    app.on_cluster(Instant::now(), &mut out);
    assert_eq!(delivered_to(&out, SUBSCRIBER).len(), 1);
    assert_eq!(replies_to(&out, PUBLISHER).len(), 1);
    // ... but replayed to a subscriber resuming from before it.
    send(
        &mut app,
        3,
        r#"{"type":"subscribe","channel":"prices","since":4}"#,
        &mut out,
    );
    let replayed: Vec<Value> = out
        .replies
        .iter()
        .filter(|(to, _)| *to == 3)
        .map(|(_, t)| serde_json::from_str(t).unwrap())
        .filter(|v: &Value| v["type"] == "message")
        .collect();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0]["offset"], 5);
}

#[test]
fn a_full_link_queue_falls_back_to_local_delivery() {
    let (mut app, link, mut out) = clustered(LinkState::Up);
    link.script().full = true;
    send(
        &mut app,
        PUBLISHER,
        r#"{"type":"publish","channel":"prices","data":3}"#,
        &mut out,
    );
    assert_eq!(replies_to(&out, PUBLISHER)[0]["local"], true);
    assert_eq!(delivered_to(&out, SUBSCRIBER).len(), 1);
    assert!(link.script().published.is_empty());
}

#[test]
fn a_chat_join_waits_for_the_rooms_lines_and_members_from_redis() {
    let mut app = App::new(&Config::default(), Instant::now()).unwrap();
    let link = FakeLink::new(LinkState::Up);
    app.attach_transport(Box::new(link.clone()));
    let mut out = RecordingOutbox::default();
    open(&mut app, 1, Role::Public, &mut out);
    send(
        &mut app,
        1,
        r#"{"type":"chat.join","room":"ops","id":3}"#,
        &mut out,
    );
    assert!(replies_to(&out, 1).is_empty(), "the ack waits for redis");
    // The join notice went to the bus, not straight to the room.
    assert!(link.script().published.iter().any(
        |(channel, payload, _)| channel == "#chat/ops" && payload.contains(r#""kind":"join""#)
    ));
    let reads = link.script().reads.clone();
    let request = |what: &str| reads.iter().find(|r| r.0 == what).unwrap().2;
    let said = ChatLine {
        room: "ops".into(),
        nick: "bob".into(),
        text: "deploying".into(),
        kind: LineKind::Say,
        ts: 1,
        offset: None,
    };
    let entry = crate::cluster::HistoryEntry {
        offset: 12,
        origin: "node-b".into(),
        origin_seq: 9,
        payload: chat::redis::chat_payload("run-b", &said),
    };
    link.script().inbound.extend([
        Inbound::History {
            request: request("recent"),
            channel: "#chat/ops".into(),
            result: Ok(crate::cluster::History {
                entries: vec![entry],
                last_offset: 12,
                missed: 0,
                more: false,
            }),
        },
        Inbound::Script {
            request: request("who"),
            result: Ok(redis::Value::Array(vec![
                redis::Value::BulkString(b"bob".to_vec()),
                redis::Value::BulkString(b"guest-x-1".to_vec()),
            ])),
        },
    ]);
    app.on_cluster(Instant::now(), &mut out);
    let replies = replies_to(&out, 1);
    assert_eq!(replies[0]["request"], "chat.join");
    assert_eq!(replies[0]["id"], 3);
    assert_eq!(replies[0]["members"], json!(["bob", "guest-x-1"]));
    assert_eq!(replies[0]["replayed"], 1);
    assert!(replies[0].get("local").is_none());
    assert_eq!(replies[1]["text"], "deploying");
}

#[test]
fn a_chat_join_redis_cannot_answer_is_answered_from_this_node() {
    let mut app = App::new(&Config::default(), Instant::now()).unwrap();
    let link = FakeLink::new(LinkState::Up);
    app.attach_transport(Box::new(link.clone()));
    let mut out = RecordingOutbox::default();
    open(&mut app, 1, Role::Public, &mut out);
    send(
        &mut app,
        1,
        r#"{"type":"chat.join","room":"ops"}"#,
        &mut out,
    );
    let reads = link.script().reads.clone();
    let request = |what: &str| reads.iter().find(|r| r.0 == what).unwrap().2;
    link.script().inbound.extend([
        Inbound::History {
            request: request("recent"),
            channel: "#chat/ops".into(),
            result: Err(RequestError::Down),
        },
        Inbound::Script {
            request: request("who"),
            result: Err(RequestError::Down),
        },
    ]);
    app.on_cluster(Instant::now(), &mut out);
    let replies = replies_to(&out, 1);
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0]["request"], "chat.join");
    assert_eq!(replies[0]["local"], true);
    assert_eq!(replies[0]["replayed"], 0);
    assert_eq!(replies[0]["members"].as_array().unwrap().len(), 1);
}

#[test]
fn a_single_node_numbers_its_own_messages() {
    let mut app = App::new(&Config::default(), Instant::now()).unwrap();
    let mut out = RecordingOutbox::default();
    open(&mut app, PUBLISHER, Role::Internal, &mut out);
    open(&mut app, SUBSCRIBER, Role::Public, &mut out);
    send(
        &mut app,
        SUBSCRIBER,
        r#"{"type":"subscribe","channel":"prices"}"#,
        &mut out,
    );
    for _ in 0..2 {
        send(
            &mut app,
            PUBLISHER,
            r#"{"type":"publish","channel":"prices","data":1}"#,
            &mut out,
        );
    }
    let offsets: Vec<Value> = replies_to(&out, PUBLISHER)
        .iter()
        .map(|a| a["offset"].clone())
        .collect();
    assert_eq!(offsets, vec![json!(1), json!(2)]);
    assert_eq!(delivered_to(&out, SUBSCRIBER)[1]["offset"], 2);
    assert_eq!(app.cluster_ready(), None);
}

#[test]
fn a_nick_change_waits_for_redis_and_is_decided_here_when_the_link_goes_down() {
    let mut app = App::new(&Config::default(), Instant::now()).unwrap();
    let link = FakeLink::new(LinkState::Up);
    app.attach_transport(Box::new(link.clone()));
    let mut out = RecordingOutbox::default();
    open(&mut app, 1, Role::Public, &mut out);
    open(&mut app, 2, Role::Public, &mut out);
    send(
        &mut app,
        1,
        r#"{"type":"chat.nick","nick":"ann","id":1}"#,
        &mut out,
    );
    send(
        &mut app,
        2,
        r#"{"type":"chat.nick","nick":"bob","id":2}"#,
        &mut out,
    );
    assert!(replies_to(&out, 1).is_empty() && replies_to(&out, 2).is_empty());
    let claims = link.script().claims.clone();
    let claim = |nick: &str| claims.iter().find(|c| c.1 == nick).unwrap().2;

    link.script().inbound.push(Inbound::Script {
        request: claim("ann"),
        result: Ok(redis::Value::Int(1)),
    });
    app.on_cluster(Instant::now(), &mut out);
    let acks = replies_to(&out, 1);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (&acks[0]["request"], &acks[0]["nick"]),
        (&json!("chat.nick"), &json!("ann"))
    );
    assert!(acks[0].get("local").is_none());

    // The link goes down before bob's claim is answered: this node decides.
    link.script().inbound.push(Inbound::Down {
        reason: "connection refused".into(),
    });
    app.on_cluster(Instant::now(), &mut out);
    let acks = replies_to(&out, 2);
    assert_eq!(acks.len(), 1);
    assert_eq!(
        (&acks[0]["nick"], &acks[0]["local"]),
        (&json!("bob"), &json!(true))
    );

    // Back up, Redis says another node's member holds bob: renamed, told.
    link.script().inbound.push(Inbound::Script {
        request: claim("bob"),
        result: Ok(redis::Value::Int(0)),
    });
    app.on_cluster(Instant::now(), &mut out);
    let replies = replies_to(&out, 2);
    assert_eq!(replies.len(), 2);
    assert_eq!(replies[1]["type"], "chat.renamed");
    assert_eq!(replies[1]["previous"], "bob");
}

/// A token's grant through the app: admitted, its expiry a deadline of
/// the app's timer, the 4001 close at it, and nothing left after the
/// close, on `/echo` (which keeps no other state) as on `/ws`.
#[test]
fn a_token_grant_runs_out_on_the_apps_timer() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "sesame").unwrap();
    let config = Config::from_args([
        "fanout",
        "--no-sim",
        "--require-token",
        "--token-leeway",
        "0s",
        "--token-secret-file",
        secret.to_str().unwrap(),
    ])
    .unwrap();
    let now = Instant::now();
    let mut app = App::new(&config, now).unwrap();
    let claims = json!({"sub":"ada","exp": unix_millis() / 1000 + 2});
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"sesame"),
    )
    .unwrap();
    let info = ConnInfo {
        role: Role::Public,
        peer: "127.0.0.1:9".parse().unwrap(),
    };
    let mut out = RecordingOutbox::default();
    for (conn, endpoint) in [(1, Endpoint::Echo), (2, Endpoint::Ws)] {
        let grant = app.admit(Role::Public, Some(&token)).unwrap();
        assert_eq!(grant.as_ref().unwrap().sub.as_deref(), Some("ada"));
        app.on_open(conn, endpoint, info, grant, now, &mut out);
    }
    let due = app.next_deadline().expect("the expiry is a deadline");
    assert!(
        due > now && due <= now + std::time::Duration::from_secs(2),
        "{due:?}"
    );
    app.on_timer(due, &mut out);
    assert_eq!(out.closed, [(1, 4001), (2, 4001)]);
    app.on_close(1, Endpoint::Echo, &mut out);
    app.on_close(2, Endpoint::Ws, &mut out);
    assert!(app.node.grants.get(1).is_none() && app.node.grants.get(2).is_none());
    // Anonymous handshakes on the public listener are refused, on the
    // internal one they are not.
    let refusal = app.admit(Role::Public, None).unwrap_err();
    assert!(refusal.contains("a token is required"), "{refusal}");
    assert_eq!(app.admit(Role::Internal, None), Ok(None));
    let refusal = app.admit(Role::Public, Some("x.y.z")).unwrap_err();
    assert!(refusal.starts_with("token refused: "), "{refusal}");
}
