//! Scale-out end to end: two or three in-process fanout nodes with
//! `--redis` (or two fanout processes sharing one port with `--reuse-port`)
//! against one real `redis-server` on loopback (started by
//! `tests/redis/start-redis.sh`, installed with apt when missing, killed and
//! reaped at the end). Every wait is bounded. `FANOUT_SKIP_REDIS=1` skips
//! the tests that need redis-server.

use crate::support::{common, json_client, redis_server};

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use json_client::{Ended, JsonClient};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

const READ_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(20);

use redis_server::*;

/// A fanout node on loopback with a public and an internal listener,
/// joined to `redis`; waits until its link is up (`/readyz` 200).
struct Node {
    server: TestServer,
}

impl Node {
    fn start(redis: &RedisServer, id: &str, extra: &[&str]) -> Node {
        let _ = env_logger::builder().is_test(true).try_init();
        let url = redis.url();
        let mut flags = vec![
            "--internal-listen",
            "127.0.0.1:0",
            "--redis",
            url.as_str(),
            "--node-id",
            id,
        ];
        flags.extend_from_slice(extra);
        let server = TestServer::start(&flags);
        let node = Node { server };
        node.wait_ready(true);
        node
    }

    fn public(&self) -> SocketAddr {
        self.server.addrs[0]
    }

    fn internal(&self) -> SocketAddr {
        self.server.addrs[1]
    }

    fn get(&self, path: &str) -> String {
        http_exchange(
            self.public(),
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        )
    }

    fn ready(&self) -> bool {
        self.get("/readyz").starts_with("HTTP/1.1 200")
    }

    fn wait_ready(&self, want: bool) {
        let deadline = Instant::now() + WAIT;
        while self.ready() != want {
            assert!(
                Instant::now() < deadline,
                "/readyz did not become {} within {WAIT:?}",
                if want { "200" } else { "503" }
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A sample from `/metrics`, by its full name with labels.
    fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    }
}

/// A `/ws` client whose reads fail the test on a close or an error, and
/// only time out quietly.
struct Client {
    inner: JsonClient,
}

impl Client {
    /// A `/ws` client that has consumed its welcome.
    fn connect(addr: SocketAddr) -> Client {
        Client {
            inner: JsonClient::ws(addr),
        }
    }

    fn send(&mut self, request: &Value) {
        self.inner.send(request);
    }

    fn next(&mut self, within: Duration) -> Option<Value> {
        match self.inner.next(within) {
            Ok(message) => Some(message),
            Err(Ended::TimedOut) => None,
            Err(e) => panic!("the connection ended: {e:?}"),
        }
    }

    fn recv(&mut self) -> Value {
        self.next(READ_TIMEOUT)
            .unwrap_or_else(|| panic!("nothing within {READ_TIMEOUT:?}"))
    }

    fn ok(&mut self, request: Value) -> Value {
        self.send(&request);
        let reply = self.recv();
        assert_eq!(reply["type"], "ack", "for {request}: {reply}");
        assert_eq!(reply["request"], request["type"], "{reply}");
        reply
    }

    fn publish(&mut self, channel: &str, data: Value) -> Value {
        self.ok(json!({"type": "publish", "channel": channel, "data": data}))
    }

    fn expect_nothing(&mut self, within: Duration) {
        if let Some(v) = self.next(within) {
            panic!("expected nothing, got {v}");
        }
    }

    /// Reads channel messages until `n` arrived; anything else fails.
    fn messages(&mut self, channel: &str, n: usize) -> Vec<(Value, Value)> {
        (0..n)
            .map(|_| {
                let m = self.recv();
                assert_eq!(m["type"], "message", "{m}");
                assert_eq!(m["channel"], channel, "{m}");
                (m["offset"].clone(), m["data"].clone())
            })
            .collect()
    }
}

fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<(Value, Value)> {
    range.map(|i| (json!(i), json!({ "n": i }))).collect()
}

#[test]
fn a_publish_on_one_node_reaches_every_node_in_order_exactly_once_with_the_same_offsets() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let c = Node::start(&redis, "node-c", &[]);
    let mut on_a = Client::connect(a.public());
    let mut on_c = Client::connect(c.public());
    on_a.ok(json!({"type": "subscribe", "channel": "news"}));
    on_c.ok(json!({"type": "subscribe", "channel": "news.>"}));
    on_c.ok(json!({"type": "subscribe", "channel": "news"}));
    let mut publisher = Client::connect(b.internal());
    for n in 1..=40u64 {
        let ack = publisher.publish("news", json!({ "n": n }));
        assert_eq!(
            ack["offset"], n,
            "the ack carries the cluster offset: {ack}"
        );
        assert!(ack.get("local").is_none(), "{ack}");
    }
    // A second publisher on another node continues the same sequence.
    let mut other = Client::connect(a.internal());
    assert_eq!(other.publish("news", json!({ "n": 41 }))["offset"], 41);
    let want = numbered(1..=41);
    assert_eq!(on_a.messages("news", 41), want);
    assert_eq!(on_c.messages("news", 41), want);
    on_a.expect_nothing(Duration::from_millis(300));
    on_c.expect_nothing(Duration::from_millis(300));
    // Every node agrees on the channel's offset (once it has read the bus).
    for node in [&a, &b, &c] {
        let mut lister = Client::connect(node.public());
        let deadline = Instant::now() + WAIT;
        loop {
            let list = lister.ok(json!({"type": "list"}));
            let news = list["channels"]
                .as_array()
                .unwrap()
                .iter()
                .find(|ch| ch["channel"] == "news")
                .cloned();
            if news.as_ref().is_some_and(|n| n["offset"] == 41) {
                break;
            }
            assert!(Instant::now() < deadline, "{list}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(a.metric("fanout_redis_up") == 1.0);
    assert!(b.metric("fanout_redis_published_total") >= 40.0);
}

#[test]
fn a_client_that_reconnects_to_another_node_resumes_from_its_offset() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    // No local backlog on B: `since` is served from Redis.
    let b = Node::start(&redis, "node-b", &["--channel-backlog", "0"]);
    let mut publisher = Client::connect(a.internal());
    let mut first = Client::connect(a.public());
    first.ok(json!({"type": "subscribe", "channel": "feed"}));
    for n in 1..=5 {
        publisher.publish("feed", json!({ "n": n }));
    }
    assert_eq!(first.messages("feed", 5), numbered(1..=5));
    drop(first);
    for n in 6..=10 {
        publisher.publish("feed", json!({ "n": n }));
    }
    let mut again = Client::connect(b.public());
    let ack = again.ok(json!({"type": "subscribe", "channel": "feed", "since": 5, "id": "r"}));
    assert_eq!(ack["id"], "r", "{ack}");
    assert_eq!(ack["replayed"], 5, "{ack}");
    assert_eq!(ack["offset"], 10, "{ack}");
    assert_eq!(again.messages("feed", 5), numbered(6..=10));
    publisher.publish("feed", json!({ "n": 11 }));
    assert_eq!(again.messages("feed", 1), numbered(11..=11));
    again.expect_nothing(Duration::from_millis(300));
    // A node with a local backlog serves it from there, identically.
    let mut on_a = Client::connect(a.public());
    let ack = on_a.ok(json!({"type": "subscribe", "channel": "feed", "since": 8}));
    assert_eq!(ack["replayed"], 3, "{ack}");
    assert_eq!(on_a.messages("feed", 3), numbered(9..=11));
    // Ahead of the channel: not recoverable, on either path.
    let mut ahead = Client::connect(b.public());
    ahead.send(&json!({"type": "subscribe", "channel": "feed", "since": 99}));
    let reply = ahead.recv();
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "not_recoverable", "{reply}");
}

#[test]
fn registration_streams_and_chat_span_nodes() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut consumer = Client::connect(a.public());
    let filters =
        json!({"types": ["payment"], "account_ids": [], "asset_codes": [], "min_amount": ""});
    consumer.send(&json!({"type": "register", "filters": filters}));
    assert_eq!(consumer.recv()["type"], "registered");
    let mut publisher = Client::connect(b.internal());
    publisher.publish("events", json!({"type": "trade", "n": 1}));
    let ack = publisher.publish("events", json!({"type": "payment", "n": 2}));
    assert_eq!(ack["offset"], 2, "{ack}");
    assert_eq!(consumer.recv(), json!({"type": "payment", "n": 2}));
    consumer.expect_nothing(Duration::from_millis(300));

    let mut ann = Client::connect(a.public());
    let mut bob = Client::connect(b.public());
    ann.ok(json!({"type": "chat.nick", "nick": "ann"}));
    bob.ok(json!({"type": "chat.nick", "nick": "bob"}));
    ann.ok(json!({"type": "chat.join", "room": "ops"}));
    bob.ok(json!({"type": "chat.join", "room": "ops"}));
    ann.send(&json!({"type": "chat.say", "room": "ops", "text": "hello from a"}));
    bob.send(&json!({"type": "chat.say", "room": "ops", "text": "hello from b"}));
    let said = |client: &mut Client| {
        let mut lines = Vec::new();
        let deadline = Instant::now() + WAIT;
        while lines.len() < 2 && Instant::now() < deadline {
            let m = client.recv();
            if m["type"] == "chat" && m["kind"] == "say" {
                lines.push(format!(
                    "{}: {}",
                    m["nick"].as_str().unwrap(),
                    m["text"].as_str().unwrap()
                ));
            }
        }
        lines
    };
    let seen_by_ann = said(&mut ann);
    let seen_by_bob = said(&mut bob);
    assert_eq!(seen_by_ann.len(), 2, "{seen_by_ann:?}");
    assert_eq!(seen_by_ann, seen_by_bob, "one room, one order");
    // Someone joining later on A replays lines said on both nodes.
    let mut cat = Client::connect(a.public());
    let ack = cat.ok(json!({"type": "chat.join", "room": "ops"}));
    assert_eq!(ack["replayed"], 2, "{ack}");
    // A room talked in on B only: joining it on A replays its lines too.
    let mut eve = Client::connect(b.public());
    eve.ok(json!({"type": "chat.nick", "nick": "eve"}));
    eve.ok(json!({"type": "chat.join", "room": "backroom"}));
    eve.send(&json!({"type": "chat.say", "room": "backroom", "text": "psst"}));
    loop {
        let m = eve.recv();
        if m["kind"] == "say" {
            break;
        }
    }
    // (A reads the bus on its own schedule: retry until it has the line.)
    let deadline = Instant::now() + WAIT;
    let mut dan = loop {
        let mut dan = Client::connect(a.public());
        let ack = dan.ok(json!({"type": "chat.join", "room": "backroom"}));
        if ack["replayed"] == 1 {
            break dan;
        }
        assert_eq!(ack["replayed"], 0, "{ack}");
        assert!(Instant::now() < deadline, "A never got the backroom line");
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = dan.recv();
    assert_eq!(
        (line["nick"].as_str(), line["text"].as_str()),
        (Some("eve"), Some("psst")),
        "{line}"
    );
}

#[test]
fn candles_match_across_nodes_for_the_same_trades() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut watchers: Vec<Client> = [&a, &b]
        .iter()
        .map(|n| {
            let mut w = Client::connect(n.public());
            w.ok(json!({"type": "subscribe", "channel": "events"}));
            w
        })
        .collect();
    let mut publisher = Client::connect(a.internal());
    let t0: i64 = 1_700_000_040_000;
    let prices = [
        "100", "101.5", "99", "102", "98.25", "100.75", "103", "97", "101", "100.5",
    ];
    let n = 30;
    for i in 0..n {
        let price = prices[i % prices.len()];
        publisher.publish(
            "events",
            json!({"type": "trade", "symbol": "ABC-USD", "price": price, "qty": "1.5", "ts": t0 + i as i64 * 17_000}),
        );
    }
    // One trade without `ts`: dated by its publish time, the same everywhere.
    publisher.publish(
        "events",
        json!({"type": "trade", "symbol": "ABC-USD", "price": "100", "qty": "1"}),
    );
    for w in &mut watchers {
        assert_eq!(w.messages("events", n + 1).len(), n + 1);
    }
    let candles = |node: &Node| {
        let mut c = Client::connect(node.public());
        let ack = c.ok(json!({"type": "kline.subscribe", "symbol": "ABC-USD", "interval": "1m", "history": 100}));
        let count = ack["history"].as_u64().unwrap() as usize + 1;
        let frames: Vec<Value> = (0..count).map(|_| c.recv()).collect();
        (ack, frames)
    };
    let (ack_a, on_a) = candles(&a);
    let (ack_b, on_b) = candles(&b);
    assert!(ack_a["history"].as_u64().unwrap() >= 8, "{ack_a}");
    assert_eq!(ack_a, ack_b);
    assert_eq!(on_a, on_b);
}

#[test]
fn nodes_keep_serving_through_a_redis_outage_and_recover() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut sub_a = Client::connect(a.public());
    let mut sub_b = Client::connect(b.public());
    sub_a.ok(json!({"type": "subscribe", "channel": "ch"}));
    sub_b.ok(json!({"type": "subscribe", "channel": "ch"}));
    let mut publisher = Client::connect(a.internal());
    assert_eq!(publisher.publish("ch", json!("before"))["offset"], 1);
    assert_eq!(sub_a.messages("ch", 1), vec![(json!(1), json!("before"))]);
    assert_eq!(sub_b.messages("ch", 1), vec![(json!(1), json!("before"))]);

    redis.kill();
    a.wait_ready(false);
    b.wait_ready(false);
    // Local service goes on: delivered at once on A, without an offset.
    let ack = publisher.publish("ch", json!("during"));
    assert_eq!(ack["offset"], Value::Null, "{ack}");
    assert_eq!(ack["local"], true, "{ack}");
    let m = sub_a.recv();
    assert_eq!(
        (m["offset"].clone(), m["local"].clone(), m["data"].clone()),
        (Value::Null, json!(true), json!("during")),
        "{m}"
    );
    assert_eq!(a.metric("fanout_redis_up"), 0.0);
    assert!(a.metric("fanout_redis_outages_total") >= 1.0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        a.metric("fanout_redis_down_seconds") > 0.0,
        "{}",
        a.get("/metrics")
    );
    assert_eq!(a.metric("fanout_redis_local_deliveries_total"), 1.0);
    // Chat too keeps working locally.
    let mut ann = Client::connect(a.public());
    let joined = ann.ok(json!({"type": "chat.join", "room": "lobby"}));
    // `who` cannot ask Redis: this node's members, and it says so.
    let members = chat_ok(&mut ann, json!({"type": "chat.who", "room": "lobby"}));
    assert_eq!(members["local"], true, "{members}");
    assert_eq!(members["members"], json!([joined["nick"]]), "{members}");

    redis.restart();
    a.wait_ready(true);
    b.wait_ready(true);
    // The message published during the outage reaches B after reconnection
    // (Redis restarted empty: offsets start again from 1) ...
    let m = sub_b.recv();
    assert_eq!(m["data"], "during", "{m}");
    assert!(m["offset"].is_u64(), "{m}");
    // ... and is not delivered on A a second time.
    let ack = publisher.publish("ch", json!("after"));
    let offset = ack["offset"].clone();
    assert!(offset.is_u64(), "{ack}");
    assert_eq!(
        sub_a.messages("ch", 1),
        vec![(offset.clone(), json!("after"))]
    );
    assert_eq!(sub_b.messages("ch", 1), vec![(offset, json!("after"))]);
    sub_a.expect_nothing(Duration::from_millis(300));
    sub_b.expect_nothing(Duration::from_millis(300));
    assert_eq!(a.metric("fanout_redis_up"), 1.0);
    assert!(a.metric("fanout_redis_reconnects_total") >= 1.0);
    let lost: f64 = ["queue_full", "rejected", "bus_gap", "shutdown"]
        .iter()
        .map(|r| a.metric(&format!("fanout_redis_lost_total{{reason=\"{r}\"}}")))
        .sum();
    assert_eq!(lost, 0.0, "nothing was lost");
}

#[test]
fn without_redis_nothing_changes_and_bad_flags_are_refused() {
    let server = TestServer::start(&[]);
    assert!(
        http_exchange(server.addr, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
            .starts_with("HTTP/1.1 200")
    );
    let metrics = http_exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(!metrics.contains("fanout_redis_"), "{metrics}");
    for bad in [
        &["--redis", "http://x"][..],
        &["--redis", "redis://127.0.0.1:1", "--node-id", "bad id"][..],
        &["--redis", "redis://127.0.0.1:1", "--node-id", ""][..],
        &["--presence-ttl", "0s"][..],
        &["--presence-ttl", "1500ms"][..],
        &["--presence-ttl", "2h"][..],
        &["--presence-ttl", "soon"][..],
    ] {
        let mut args = vec!["fanout"];
        args.extend_from_slice(bad);
        let refused = match fanout::config::Config::from_args(args) {
            Ok(config) => config.validate().is_err(),
            Err(_) => true,
        };
        assert!(refused, "{bad:?}");
    }
}

/// `list`'s entry for `channel` on `node`, if it has the channel.
fn listed(node: &Node, channel: &str) -> Option<Value> {
    let mut lister = Client::connect(node.public());
    let list = lister.ok(json!({"type": "list"}));
    list["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|ch| ch["channel"] == channel)
        .cloned()
}

/// The settings part of a `list` entry or `create` ack.
fn settings(entry: &Value) -> Value {
    json!({
        "publish": entry["publish"],
        "backlog_limit": entry["backlog_limit"],
        "backlog_age": entry["backlog_age"],
    })
}

/// Waits until `node` lists `channel` with `want` settings.
fn wait_settings(node: &Node, channel: &str, want: &Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let entry = listed(node, channel);
        if entry.as_ref().map(settings).as_ref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{channel}` never got {want}; last seen {entry:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a public (untrusted) connection to `node` gets for a publish.
fn public_publish(node: &Node, channel: &str) -> Value {
    let mut client = Client::connect(node.public());
    client.send(&json!({"type": "publish", "channel": channel, "data": "hi"}));
    client.recv()
}

#[test]
fn channel_settings_made_on_one_node_apply_on_every_node_and_on_nodes_started_later() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    // B has `late` already, with its defaults, from a trusted publish.
    let mut trusted_b = Client::connect(b.internal());
    trusted_b.publish("late", json!(1));
    wait_settings(
        &a,
        "late",
        &json!({"publish": "trusted", "backlog_limit": 1000, "backlog_age": 600}),
    );

    let mut admin = Client::connect(a.internal());
    let open = admin.ok(json!({"type": "create", "channel": "open", "publish": "anyone", "backlog": 5, "backlog_age": 120}));
    assert_eq!(open["created"], true, "{open}");
    assert!(open.get("local").is_none(), "{open}");
    let open_settings = json!({"publish": "anyone", "backlog_limit": 5, "backlog_age": 120});
    assert_eq!(settings(&open), open_settings);
    let closed = admin.ok(json!({"type": "create", "channel": "closed", "backlog": 2}));
    assert_eq!(closed["created"], true, "{closed}");
    let late = admin.ok(json!({"type": "create", "channel": "late", "publish": "anyone"}));
    assert_eq!(
        late["created"], true,
        "a channel with defaults takes a create: {late}"
    );
    assert_eq!(late["offset"], 1, "{late}");

    wait_settings(&b, "open", &open_settings);
    wait_settings(
        &b,
        "closed",
        &json!({"publish": "trusted", "backlog_limit": 2, "backlog_age": 600}),
    );
    wait_settings(
        &b,
        "late",
        &json!({"publish": "anyone", "backlog_limit": 1000, "backlog_age": 600}),
    );
    // B enforces them: anyone may publish to `open` and `late`, not to `closed`.
    let mut watcher = Client::connect(a.public());
    watcher.ok(json!({"type": "subscribe", "channel": "open"}));
    let ack = public_publish(&b, "open");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["offset"], 1, "{ack}");
    assert_eq!(watcher.messages("open", 1), vec![(json!(1), json!("hi"))]);
    assert_eq!(public_publish(&b, "late")["type"], "ack");
    let refused = public_publish(&b, "closed");
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // Creating it again elsewhere changes nothing and says what is in force.
    let mut admin_b = Client::connect(b.internal());
    let again = admin_b
        .ok(json!({"type": "create", "channel": "open", "publish": "trusted", "backlog": 50}));
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(settings(&again), open_settings);

    // A node started later has them as soon as it is ready.
    let c = Node::start(&redis, "node-c", &["--channel-backlog", "7"]);
    assert_eq!(
        listed(&c, "open").map(|e| settings(&e)),
        Some(open_settings)
    );
    assert_eq!(
        listed(&c, "closed").map(|e| settings(&e)),
        Some(json!({"publish": "trusted", "backlog_limit": 2, "backlog_age": 600}))
    );
    assert_eq!(public_publish(&c, "open")["type"], "ack");
    assert_eq!(public_publish(&c, "closed")["code"], "forbidden");
    // Its own default backlog (7) is not applied to a defined channel.
    assert_eq!(listed(&c, "late").unwrap()["backlog_limit"], 1000);
}

#[test]
fn concurrent_creates_with_different_settings_converge_on_one_winner() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut on_a = Client::connect(a.internal());
    let mut on_b = Client::connect(b.internal());
    for round in 0..5 {
        let channel = format!("race-{round}");
        on_a.send(&json!({"type": "create", "channel": channel, "publish": "anyone", "backlog": 7, "id": "a"}));
        on_b.send(&json!({"type": "create", "channel": channel, "backlog": 9, "backlog_age": 30, "id": "b"}));
        let ack_a = on_a.recv();
        let ack_b = on_b.recv();
        for ack in [&ack_a, &ack_b] {
            assert_eq!(ack["type"], "ack", "{ack}");
            assert!(ack.get("local").is_none(), "{ack}");
        }
        let created = [&ack_a, &ack_b]
            .iter()
            .filter(|ack| ack["created"] == true)
            .count();
        assert_eq!(created, 1, "one winner: {ack_a} {ack_b}");
        let winner = settings(&ack_a);
        assert_eq!(
            winner,
            settings(&ack_b),
            "both report the settings in force"
        );
        let expected = if ack_a["created"] == true {
            json!({"publish": "anyone", "backlog_limit": 7, "backlog_age": 600})
        } else {
            json!({"publish": "trusted", "backlog_limit": 9, "backlog_age": 30})
        };
        assert_eq!(winner, expected);
        wait_settings(&a, &channel, &winner);
        wait_settings(&b, &channel, &winner);
    }
}

#[test]
fn creates_during_a_redis_outage_are_local_then_reconciled_on_every_node() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut on_a = Client::connect(a.internal());
    let mut on_b = Client::connect(b.internal());
    // Defined before the outage; Redis will come back without it.
    on_a.ok(json!({"type": "create", "channel": "before", "publish": "anyone", "backlog": 3}));
    let before = json!({"publish": "anyone", "backlog_limit": 3, "backlog_age": 600});
    wait_settings(&b, "before", &before);

    redis.kill();
    a.wait_ready(false);
    b.wait_ready(false);
    let ack =
        on_a.ok(json!({"type": "create", "channel": "both", "publish": "anyone", "backlog": 4}));
    assert_eq!(
        (ack["created"].clone(), ack["local"].clone()),
        (json!(true), json!(true)),
        "{ack}"
    );
    let ack = on_b.ok(json!({"type": "create", "channel": "both", "backlog": 6}));
    assert_eq!(
        (ack["created"].clone(), ack["local"].clone()),
        (json!(true), json!(true)),
        "{ack}"
    );
    let again = on_b.ok(json!({"type": "create", "channel": "both", "publish": "anyone"}));
    assert_eq!(
        (again["created"].clone(), again["local"].clone()),
        (json!(false), json!(true)),
        "{again}"
    );
    assert_eq!(again["backlog_limit"], 6, "{again}");
    let ack =
        on_a.ok(json!({"type": "create", "channel": "only-a", "publish": "anyone", "backlog": 2}));
    assert_eq!(ack["local"], true, "{ack}");
    // In force locally at once.
    assert_eq!(public_publish(&a, "only-a")["type"], "ack");

    redis.restart();
    a.wait_ready(true);
    b.wait_ready(true);
    // One definition of `both` wins on both nodes, whichever reached Redis first.
    let deadline = Instant::now() + WAIT;
    let winner = loop {
        let (on_a, on_b) = (listed(&a, "both").unwrap(), listed(&b, "both").unwrap());
        if settings(&on_a) == settings(&on_b) {
            break settings(&on_a);
        }
        assert!(Instant::now() < deadline, "never converged: {on_a} {on_b}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let from_a = json!({"publish": "anyone", "backlog_limit": 4, "backlog_age": 600});
    let from_b = json!({"publish": "trusted", "backlog_limit": 6, "backlog_age": 600});
    assert!(winner == from_a || winner == from_b, "{winner}");
    let overridden = |node: &Node| node.metric("fanout_redis_local_definitions_overridden_total");
    let deadline = Instant::now() + WAIT;
    while overridden(&a) + overridden(&b) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the losing node never counted it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(overridden(&a) + overridden(&b), 1.0);
    let only_a = json!({"publish": "anyone", "backlog_limit": 2, "backlog_age": 600});
    wait_settings(&b, "only-a", &only_a);
    assert_eq!(public_publish(&b, "only-a")["type"], "ack");
    // Redis came back empty: the nodes offered `before` again, so a node
    // started now gets it too.
    let c = Node::start(&redis, "node-c", &[]);
    wait_settings(&c, "before", &before);
    wait_settings(&c, "both", &winner);
    wait_settings(&c, "only-a", &only_a);
    assert_eq!(a.metric("fanout_redis_resets_total"), 1.0);
}

/// Like `ok`, for a chat member: the room's notices and lines that
/// arrive before the ack are skipped.
fn chat_ok(client: &mut Client, request: Value) -> Value {
    client.send(&request);
    for _ in 0..100 {
        let reply = client.recv();
        if reply["type"] == "chat" {
            continue;
        }
        assert_eq!(reply["type"], "ack", "for {request}: {reply}");
        assert_eq!(reply["request"], request["type"], "{reply}");
        return reply;
    }
    panic!("no ack for {request} within 100 messages");
}

/// `chat.who` of `room` asked on `node`: the members, or the error code.
fn who(node: &Node, room: &str) -> Result<Vec<String>, String> {
    let mut client = Client::connect(node.public());
    client.send(&json!({"type": "chat.who", "room": room}));
    let reply = client.recv();
    if reply["type"] == "error" {
        return Err(reply["code"].as_str().unwrap().to_owned());
    }
    assert_eq!(reply["request"], "chat.who", "{reply}");
    assert!(reply.get("local").is_none(), "{reply}");
    Ok(reply["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect())
}

/// Waits until `chat.who` of `room` on `node` answers `want`.
fn wait_who(node: &Node, room: &str, want: &[&str]) {
    let want: Result<Vec<String>, String> = Ok(want.iter().map(|s| s.to_string()).collect());
    let deadline = Instant::now() + WAIT;
    loop {
        let got = who(node, room);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "who [{room}] never became {want:?}; last {got:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain-text `/chat` client (greeted, in the lobby).
fn plain_chat(addr: SocketAddr) -> WebSocket<TcpStream> {
    let stream = connect_tcp(addr);
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/chat"), stream).expect("handshake");
    ws.get_mut().set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    match ws.read().expect("greeting") {
        Message::Text(t) => assert!(t.starts_with("* welcome"), "{t}"),
        other => panic!("{other:?}"),
    }
    ws
}

/// Sends `/who` and reads lines until its answer.
fn plain_who(ws: &mut WebSocket<TcpStream>) -> String {
    ws.send(Message::Text("/who".into())).unwrap();
    for _ in 0..100 {
        if let Message::Text(t) = ws.read().expect("read") {
            if t.starts_with("* in [") {
                return t.to_string();
            }
        }
    }
    panic!("no /who answer within 100 lines");
}

#[test]
fn chat_who_lists_the_members_on_every_node() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &["--presence-ttl", "1s"]);
    let mut ann = Client::connect(a.public());
    let mut bob = Client::connect(b.public());
    chat_ok(&mut ann, json!({"type": "chat.nick", "nick": "ann"}));
    chat_ok(&mut bob, json!({"type": "chat.nick", "nick": "bob"}));
    chat_ok(&mut ann, json!({"type": "chat.join", "room": "ops"}));
    chat_ok(&mut bob, json!({"type": "chat.join", "room": "ops"}));
    wait_who(&a, "ops", &["ann", "bob"]);
    wait_who(&b, "ops", &["ann", "bob"]);
    chat_ok(&mut bob, json!({"type": "chat.nick", "nick": "rob"}));
    wait_who(&a, "ops", &["ann", "rob"]);
    // A node without members of the room knows them too, also one started
    // later; a room nobody is in is not found.
    let c = Node::start(&redis, "node-c", &[]);
    wait_who(&c, "ops", &["ann", "rob"]);
    assert_eq!(who(&c, "nowhere"), Err("not_found".to_owned()));
    assert_eq!(who(&c, "Not A Room!"), Err("not_found".to_owned()));
    // Plain-text clients: `/who` of the lobby lists both nodes' members.
    let mut plain_a = plain_chat(a.public());
    let mut plain_b = plain_chat(b.public());
    let deadline = Instant::now() + WAIT;
    loop {
        let line = plain_who(&mut plain_a);
        if line.matches("guest-").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{line}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(plain_who(&mut plain_b).matches("guest-").count(), 2);
    // Leaving, and closing the connection, remove the member everywhere.
    chat_ok(&mut bob, json!({"type": "chat.leave", "room": "ops"}));
    wait_who(&c, "ops", &["ann"]);
    chat_ok(&mut bob, json!({"type": "chat.join", "room": "ops"}));
    wait_who(&a, "ops", &["ann", "rob"]);
    drop(bob);
    wait_who(&a, "ops", &["ann"]);
    // A node that stops takes its members with it at once ...
    let mut dan = Client::connect(b.public());
    chat_ok(&mut dan, json!({"type": "chat.nick", "nick": "dan"}));
    chat_ok(&mut dan, json!({"type": "chat.join", "room": "ops"}));
    wait_who(&a, "ops", &["ann", "dan"]);
    drop(dan);
    drop(plain_b);
    b.server.stop().unwrap();
    wait_who(&a, "ops", &["ann"]);
    // ... and the members of a node that died without a word (its alive key
    // gone, as after its presence TTL) are dropped by the next `who`.
    let mut admin = redis.admin();
    let _: () = redis::cmd("HSET")
        .arg("fanout:room:ops")
        .arg("node-x:0123456789abcdef/7")
        .arg("ghost")
        .query(&mut admin)
        .unwrap();
    wait_who(&a, "ops", &["ann"]);
    let left: i64 = redis::cmd("HEXISTS")
        .arg("fanout:room:ops")
        .arg("node-x:0123456789abcdef/7")
        .query(&mut admin)
        .unwrap();
    assert_eq!(left, 0, "the dead run's member was removed");
    // Every live node keeps its alive key with a TTL.
    let alive: Vec<String> = redis::cmd("KEYS")
        .arg("fanout:alive:*")
        .query(&mut admin)
        .unwrap();
    assert_eq!(alive.len(), 2, "{alive:?}");
    for key in alive {
        let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut admin).unwrap();
        assert!((1..=15).contains(&ttl), "{key}: {ttl}");
    }
}

/// `chat.nick` on `client`: the ack, or the error (code, message).
fn nick(client: &mut Client, nick: &str) -> Result<Value, (String, String)> {
    let request = json!({"type": "chat.nick", "nick": nick});
    client.send(&request);
    for _ in 0..100 {
        let reply = client.recv();
        match reply["type"].as_str() {
            Some("chat") => continue,
            Some("error") => {
                let text = |f: &str| reply[f].as_str().unwrap_or_default().to_owned();
                return Err((text("code"), text("message")));
            }
            _ => {
                assert_eq!(reply["request"], "chat.nick", "{reply}");
                return Ok(reply);
            }
        }
    }
    panic!("no answer to {request} within 100 messages");
}

/// Asks `nick` on `client` until it is granted (a nick is freed by a
/// release that travels to Redis on its own).
fn wait_nick(client: &mut Client, wanted: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        match nick(client, wanted) {
            Ok(ack) => return ack,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{wanted} never became free: {e:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_nick_is_held_by_one_member_across_nodes_until_it_is_released() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut ann = Client::connect(a.public());
    let mut other = Client::connect(b.public());
    let ack = nick(&mut ann, "ann").unwrap();
    assert_eq!(ack["nick"], "ann", "{ack}");
    assert!(ack.get("local").is_none(), "{ack}");
    // The same answer as on one node, whatever the case.
    let taken = ("conflict".to_owned(), "nick ann is taken".to_owned());
    assert_eq!(nick(&mut other, "ann"), Err(taken));
    assert_eq!(nick(&mut other, "ANN").unwrap_err().0, "conflict");
    // A plain-text client on B is refused too.
    let mut plain = plain_chat(b.public());
    plain.send(Message::Text("/nick ann".into())).unwrap();
    let refused = (0..100)
        .find_map(|_| match plain.read().expect("read") {
            Message::Text(t) if t.starts_with("! ") => Some(t.to_string()),
            _ => None,
        })
        .expect("an answer to /nick");
    assert_eq!(refused, "! nick ann is taken");
    // Guests' nicks are reserved too, and differ between nodes.
    let guest_a = chat_ok(&mut ann, json!({"type": "chat.join", "room": "lobby"}));
    let guest_b = chat_ok(&mut other, json!({"type": "chat.join", "room": "lobby"}));
    let guest_b = guest_b["nick"].as_str().unwrap().to_owned();
    assert!(guest_b.starts_with("guest-"), "{guest_b}");
    assert_ne!(guest_a["nick"], "guest-1");
    let mut third = Client::connect(a.public());
    assert_eq!(nick(&mut third, &guest_b).unwrap_err().0, "conflict");
    // A nick changed away from is free on every node ...
    nick(&mut ann, "amy").unwrap();
    let ack = wait_nick(&mut other, "ann");
    assert_eq!(ack["nick"], "ann", "{ack}");
    assert_eq!(nick(&mut third, "amy").unwrap_err().0, "conflict");
    // ... and so is the nick of a client that disconnected.
    drop(ann);
    wait_nick(&mut third, "amy");
    // Two members of one node cannot share a nick either.
    let mut fourth = Client::connect(a.public());
    assert_eq!(nick(&mut fourth, "amy").unwrap_err().0, "conflict");
    // A node that stops frees its members' nicks at once.
    drop(other);
    drop(plain);
    let c = Node::start(&redis, "node-c", &[]);
    let mut bea = Client::connect(c.public());
    nick(&mut bea, "bea").unwrap();
    drop(bea);
    let mut cid = Client::connect(c.public());
    nick(&mut cid, "cid").unwrap();
    c.server.stop().unwrap();
    wait_nick(&mut fourth, "cid");
    assert_eq!(a.metric("fanout_redis_nick_conflicts_total"), 0.0);
}

#[test]
fn a_dead_nodes_nicks_expire_with_its_presence() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let url = redis.url();
    let mut doomed = ServerProcess::start(&[
        "--no-sim",
        "--redis",
        &url,
        "--node-id",
        "node-doomed",
        "--presence-ttl",
        "1s",
    ]);
    let (mut zed, _) =
        tungstenite::client(format!("ws://{}/ws", doomed.addr), connect_tcp(doomed.addr))
            .expect("handshake");
    zed.get_mut().set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    let _welcome = zed.read().expect("welcome");
    // Connected to Redis, so that its answer is Redis's.
    let deadline = Instant::now() + WAIT;
    while !http_exchange(doomed.addr, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n")
        .starts_with("HTTP/1.1 200")
    {
        assert!(Instant::now() < deadline, "node-doomed never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    zed.send(Message::Text(
        json!({"type": "chat.nick", "nick": "zed"}).to_string(),
    ))
    .unwrap();
    let reply: Value = match zed.read().expect("nick answer") {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(reply["type"], "ack", "{reply}");
    assert!(reply.get("local").is_none(), "{reply}");
    let mut other = Client::connect(a.public());
    assert_eq!(nick(&mut other, "zed").unwrap_err().0, "conflict");
    // Killed without a word: its alive key expires after 1 s, and with it
    // the reservation.
    doomed.signal_and_wait(libc::SIGKILL);
    let started = Instant::now();
    let ack = wait_nick(&mut other, "zed");
    assert_eq!(ack["nick"], "zed", "{ack}");
    assert!(started.elapsed() < WAIT);
}

#[test]
fn nicks_taken_during_a_redis_outage_are_local_then_reconciled() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut on_a = Client::connect(a.public());
    let mut on_b = Client::connect(b.public());
    nick(&mut on_a, "ann").unwrap();
    redis.kill();
    a.wait_ready(false);
    b.wait_ready(false);
    // Each node decides alone, and says so.
    let ack = nick(&mut on_b, "ann").unwrap();
    assert_eq!(
        (ack["nick"].clone(), ack["local"].clone()),
        (json!("ann"), json!(true)),
        "{ack}"
    );
    let ack = nick(&mut on_b, "ann");
    assert_eq!(ack.unwrap_err().1, "you are already ann");
    let mut carl = Client::connect(b.public());
    assert_eq!(nick(&mut carl, "carl").unwrap()["local"], true);
    let mut plain = plain_chat(b.public());
    plain.send(Message::Text("/nick dora".into())).unwrap();
    let line = (0..100).find_map(|_| match plain.read().expect("read") {
        Message::Text(t) if t.starts_with("* you are dora on this node only") => {
            Some(t.to_string())
        }
        _ => None,
    });
    assert!(line.is_some(), "no local-only notice for /nick");
    // Redis comes back empty: every node claims its nicks again; the first
    // claim of `ann` Redis hears keeps it, the other member is renamed.
    redis.restart();
    a.wait_ready(true);
    b.wait_ready(true);
    let deadline = Instant::now() + WAIT;
    let (notice, winner) = loop {
        if let Some(notice) = on_a.next(Duration::from_millis(100)) {
            break (notice, &mut on_b);
        }
        if let Some(notice) = on_b.next(Duration::from_millis(100)) {
            break (notice, &mut on_a);
        }
        assert!(Instant::now() < deadline, "nobody was renamed");
    };
    assert_eq!(notice["type"], "chat.renamed", "{notice}");
    assert_eq!(notice["previous"], "ann", "{notice}");
    assert!(
        notice["nick"].as_str().unwrap().starts_with("guest-"),
        "{notice}"
    );
    winner.expect_nothing(Duration::from_millis(500));
    let conflicts = a.metric("fanout_redis_nick_conflicts_total")
        + b.metric("fanout_redis_nick_conflicts_total");
    assert_eq!(conflicts, 1.0);
    // Nicks taken during the outage are held across nodes afterwards.
    let mut late = Client::connect(a.public());
    assert_eq!(nick(&mut late, "carl").unwrap_err().0, "conflict");
    assert_eq!(nick(&mut late, "dora").unwrap_err().0, "conflict");
    assert_eq!(nick(&mut late, "ann").unwrap_err().0, "conflict");
}

#[test]
fn a_join_replays_the_rooms_lines_from_redis_and_lists_every_nodes_members() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &["--chat-history", "3"]);
    let mut ann = Client::connect(a.public());
    nick(&mut ann, "ann").unwrap();
    chat_ok(&mut ann, json!({"type": "chat.join", "room": "ops"}));
    for i in 1..=5 {
        let text = format!("line {i}");
        chat_ok(
            &mut ann,
            json!({"type": "chat.say", "room": "ops", "text": text}),
        );
    }
    // B starts after the lines were said: its join replays the room's last
    // 3 lines from Redis, and lists A's member with its own.
    let b = Node::start(&redis, "node-b", &["--chat-history", "3"]);
    let mut bob = Client::connect(b.public());
    nick(&mut bob, "bob").unwrap();
    bob.send(&json!({"type": "chat.join", "room": "ops", "id": 7}));
    let ack = bob.recv();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], 7, "{ack}");
    assert_eq!(ack["members"], json!(["ann", "bob"]), "{ack}");
    assert_eq!(ack["replayed"], 3, "{ack}");
    assert!(ack.get("local").is_none(), "{ack}");
    for i in 3..=5 {
        let line = bob.recv();
        assert_eq!(
            (line["kind"].clone(), line["text"].clone()),
            (json!("say"), json!(format!("line {i}"))),
            "{line}"
        );
    }
    // Then the room's announcement of the join, then live lines.
    let joined = bob.recv();
    assert_eq!(
        (joined["kind"].clone(), joined["nick"].clone()),
        (json!("join"), json!("bob")),
        "{joined}"
    );
    chat_ok(
        &mut ann,
        json!({"type": "chat.say", "room": "ops", "text": "live"}),
    );
    assert_eq!(bob.recv()["text"], "live");
    // A plain-text client on B is told the same.
    let mut plain = plain_chat(b.public());
    plain.send(Message::Text("/join ops".into())).unwrap();
    let intro = (0..100)
        .find_map(|_| match plain.read().expect("read") {
            Message::Text(t) if t.starts_with("* joined [ops]") => Some(t.to_string()),
            _ => None,
        })
        .expect("a join answer");
    assert!(intro.ends_with("; last 3 message(s):"), "{intro}");
    match plain.read().expect("replay") {
        Message::Text(t) => assert!(t.ends_with("line 4"), "{t}"),
        other => panic!("{other:?}"),
    }
    // While Redis is down a join replays this node's lines and lists its
    // members, and says so.
    redis.kill();
    a.wait_ready(false);
    b.wait_ready(false);
    let mut cid = Client::connect(b.public());
    let ack = chat_ok(&mut cid, json!({"type": "chat.join", "room": "ops"}));
    assert_eq!(ack["local"], true, "{ack}");
    let members = ack["members"].as_array().unwrap();
    assert!(!members.contains(&json!("ann")), "{ack}");
    assert!(members.contains(&json!("bob")), "{ack}");
}

/// The `chat.rooms` answer of `client`: (room, members) pairs, and whether
/// it was marked local.
fn rooms(client: &mut Client) -> (Vec<(String, u64)>, bool) {
    let reply = chat_ok(client, json!({"type": "chat.rooms"}));
    let rooms = reply["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = r["room"].as_str().unwrap().to_owned();
            (name, r["members"].as_u64().unwrap())
        })
        .collect();
    (rooms, reply.get("local") == Some(&json!(true)))
}

#[test]
fn room_counts_include_every_nodes_members() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let a = Node::start(&redis, "node-a", &[]);
    let b = Node::start(&redis, "node-b", &[]);
    let mut ann = Client::connect(a.public());
    let mut bob = Client::connect(b.public());
    let mut cid = Client::connect(b.public());
    chat_ok(&mut ann, json!({"type": "chat.join", "room": "ops"}));
    chat_ok(&mut bob, json!({"type": "chat.join", "room": "ops"}));
    chat_ok(&mut cid, json!({"type": "chat.join", "room": "dev"}));
    let want = vec![("dev".to_owned(), 1), ("ops".to_owned(), 2)];
    assert_eq!(rooms(&mut ann), (want.clone(), false));
    assert_eq!(rooms(&mut cid), (want, false));
    // Plain-text `/rooms` counts the same way (the plain client is in the
    // lobby of A).
    let mut plain = plain_chat(a.public());
    plain.send(Message::Text("/rooms".into())).unwrap();
    let line = (0..100)
        .find_map(|_| match plain.read().expect("read") {
            Message::Text(t) if t.starts_with("* rooms:") => Some(t.to_string()),
            _ => None,
        })
        .expect("a /rooms answer");
    assert_eq!(line, "* rooms: [dev] (1), [lobby] (1), [ops] (2)");
    // Leaving is counted everywhere (once B's link has told Redis).
    chat_ok(&mut bob, json!({"type": "chat.leave", "room": "ops"}));
    let deadline = Instant::now() + WAIT;
    loop {
        let (counts, _) = rooms(&mut ann);
        if counts.contains(&("ops".to_owned(), 1)) {
            break;
        }
        assert!(Instant::now() < deadline, "{counts:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Redis down: this node's counts, marked local.
    redis.kill();
    a.wait_ready(false);
    let (counts, local) = rooms(&mut ann);
    assert!(local);
    assert!(!counts.iter().any(|(r, _)| r == "dev"), "{counts:?}");
    assert!(counts.contains(&("ops".to_owned(), 1)), "{counts:?}");
}

/// `GET path` on `addr`, the whole response.
fn get(addr: SocketAddr, path: &str) -> String {
    http_exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )
}

/// Open `/ws` connections on a process's public listeners, from its
/// `/metrics` (a combination with no connection is not listed: 0).
fn public_ws_connections(internal: SocketAddr) -> usize {
    let text = get(internal, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("fanout_connections{listener=\"public\",endpoint=\"ws\"} ")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// `--reuse-port`: two fanout processes (the binary, not in-process nodes)
/// listen on the same public address with one Redis between them. The
/// kernel spreads the connections over both; a publish on either process
/// reaches every subscriber exactly once, whichever process it landed on.
#[test]
fn two_processes_sharing_a_port_with_reuse_port_reach_every_subscriber_once() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let flags = |public: &str, id: &'static str| {
        [
            "--listen",
            public,
            "--internal-listen",
            "127.0.0.1:0",
            "--reuse-port",
            "--redis",
            url.as_str(),
            "--node-id",
            id,
            "--no-sim",
        ]
        .map(str::to_owned)
    };
    let start = |flags: [String; 10]| {
        ServerProcess::start_exactly(&flags.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let first = start(flags("127.0.0.1:0", "shared-port-a"));
    let shared = first.addrs[0];
    let second = start(flags(&shared.to_string(), "shared-port-b"));
    assert_eq!(second.addrs[0], shared, "both processes on one address");
    // Each process answers on an internal listener of its own, so its
    // /metrics and /readyz are its own.
    let internals = [first.addrs[1], second.addrs[1]];
    for internal in internals {
        let deadline = Instant::now() + WAIT;
        while !get(internal, "/readyz").starts_with("HTTP/1.1 200") {
            assert!(
                Instant::now() < deadline,
                "{internal} not ready in {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Connect to the shared address until each process holds some. The
    // kernel hashes each connection's addresses and ports to pick a
    // socket, so the odds that 200 connections all land on one process
    // are 2 in 2^200.
    const MOST: usize = 200;
    let mut subscribers = Vec::new();
    let counts = loop {
        for _ in 0..4 {
            let mut client = Client::connect(shared);
            client.ok(json!({"type": "subscribe", "channel": "shared"}));
            subscribers.push(client);
        }
        let counts = internals.map(public_ws_connections);
        assert_eq!(
            counts.iter().sum::<usize>(),
            subscribers.len(),
            "every connection is on one of the two processes: {counts:?}"
        );
        if counts.iter().all(|&n| n > 0) {
            break counts;
        }
        assert!(
            subscribers.len() < MOST,
            "{MOST} connections and one process has them all: {counts:?}"
        );
    };
    eprintln!(
        "{} subscribers spread {counts:?} over the two processes",
        subscribers.len()
    );

    // Publishers on both processes, taking turns; each publish is acked
    // (so numbered by Redis) before the next, so the offsets are 1..=6.
    let mut publishers = internals.map(Client::connect);
    for n in 1..=6u64 {
        let ack = publishers[(n % 2) as usize].publish("shared", json!({ "n": n }));
        assert_eq!(ack["offset"], n, "{ack}");
        assert!(ack.get("local").is_none(), "{ack}");
    }
    let want = numbered(1..=6);
    for subscriber in &mut subscribers {
        assert_eq!(subscriber.messages("shared", 6), want);
    }
    // No copies: whatever a second delivery would take, 300 ms from here
    // covers it, across all subscribers.
    let quiet_until = Instant::now() + Duration::from_millis(300);
    for subscriber in &mut subscribers {
        let left = quiet_until.saturating_duration_since(Instant::now());
        subscriber.expect_nothing(left.max(Duration::from_millis(10)));
    }
}
