//! Pub/sub channels on `/ws` over real loopback sockets: publishers on the
//! internal listener, subscribers on the public one; offsets, resumption
//! from the backlog, wildcards, who may publish, every error path, and a
//! subscriber that never reads (against the real binary, with its memory
//! measured) while another one receives every message.

use crate::support::{common, json_client};

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use json_client::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Checks a channel message field by field, with nothing else in it.
fn assert_message(message: &Value, channel: &str, offset: u64, data: &Value) {
    let object = message
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {message}"));
    let keys: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        BTreeSet::from(["type", "channel", "offset", "ts", "data"]),
        "{message}"
    );
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["channel"], channel, "{message}");
    assert_eq!(message["offset"], offset, "{message}");
    assert_eq!(&message["data"], data, "{message}");
    let ts = message["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("ts: {message}"));
    let now = now_millis();
    assert!(
        ts <= now + 1000 && ts + 60_000 >= now,
        "ts {ts} is not a current Unix time in milliseconds (now {now})"
    );
}

fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// Basics: create, publish, subscribe, unsubscribe, list, ids
// ---------------------------------------------------------------------------

#[test]
fn create_publish_subscribe_unsubscribe_and_list() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    let mut subscriber = JsonClient::ws(s.public);

    let created = publisher.ok(json!({"type":"create","channel":"news","backlog":50,"id":1}));
    assert_eq!(created["id"], 1);
    assert_eq!(created["channel"], "news");
    assert_eq!(created["created"], true);
    assert_eq!(created["offset"], 0);
    assert_eq!(created["backlog_limit"], 50);
    assert_eq!(created["publish"], "trusted");
    let again = publisher.ok(json!({"type":"create","channel":"news","backlog":7}));
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(
        again["backlog_limit"], 50,
        "creating again changes nothing: {again}"
    );
    assert!(
        again.get("id").is_none(),
        "no id asked, none echoed: {again}"
    );

    let sub = subscriber.ok(json!({"type":"subscribe","channel":"news","id":"s1"}));
    assert_eq!(sub["id"], "s1");
    assert_eq!(sub["channel"], "news");
    assert_eq!(sub["offset"], 0);
    assert_eq!(sub["replayed"], 0);

    for n in 1..=3u64 {
        let data = json!({"n": n, "text": format!("item {n}")});
        let ack =
            publisher.ok(json!({"type":"publish","channel":"news","data":data,"id":{"seq":n}}));
        assert_eq!(ack["id"], json!({"seq": n}));
        assert_eq!(ack["channel"], "news");
        assert_eq!(ack["offset"], n);
        assert_eq!(ack["delivered"], 1);
        assert_message(&subscriber.recv(), "news", n, &data);
    }
    // `notify` is an alias of `publish`; data may be any JSON value.
    let ack = publisher.request(json!({"type":"notify","channel":"news","data":[1,"two",null]}));
    assert_ack(&ack, "publish");
    assert_eq!(ack["offset"], 4);
    assert_message(&subscriber.recv(), "news", 4, &json!([1, "two", null]));

    let list = subscriber.ok(json!({"type":"list","id":[1,2]}));
    assert_eq!(list["id"], json!([1, 2]));
    let channels = list["channels"].as_array().unwrap();
    assert_eq!(channels.len(), 1, "{list}");
    let news = &channels[0];
    assert_eq!(news["channel"], "news");
    assert_eq!(news["offset"], 4);
    assert_eq!(news["first_offset"], 1);
    assert_eq!(news["backlog"], 4);
    assert_eq!(news["backlog_limit"], 50);
    assert_eq!(news["subscribers"], 1);
    assert_eq!(news["publish"], "trusted");

    let unsub = subscriber.ok(json!({"type":"unsubscribe","channel":"news","id":9.5}));
    assert_eq!(unsub["id"], 9.5);
    assert_eq!(unsub["channel"], "news");
    let ack = publisher.ok(json!({"type":"publish","channel":"news","data":"after"}));
    assert_eq!(ack["offset"], 5);
    assert_eq!(ack["delivered"], 0);
    subscriber.expect_nothing(Duration::from_millis(300));
    let list = publisher.ok(json!({"type":"list"}));
    assert_eq!(list["channels"][0]["subscribers"], 0, "{list}");
}

#[test]
fn every_reply_echoes_the_id_verbatim() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    for id in [
        json!(0),
        json!(-17),
        json!(12345678901u64),
        json!(1.25),
        json!("req-1"),
        json!(""),
        json!({"a":{"b":[1,2,3]}}),
        json!([null, true]),
        json!(true),
        Value::Null,
    ] {
        let ack = publisher.ok(json!({"type":"publish","channel":"ids","data":1,"id":id}));
        assert_eq!(ack.get("id"), Some(&id), "{ack}");
        let ack = publisher.ok(json!({"type":"list","id":id}));
        assert_eq!(ack.get("id"), Some(&id), "{ack}");
        let error = publisher.request(json!({"type":"subscribe","id":id}));
        assert_eq!(error["type"], "error");
        assert_eq!(
            error.get("id"),
            Some(&id),
            "errors echo the id too: {error}"
        );
    }
}

#[test]
fn publishing_creates_the_channel_and_offsets_count_from_one() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    let mut a = JsonClient::ws(s.public);
    let mut b = JsonClient::ws(s.public);
    a.ok(json!({"type":"subscribe","channel":"t.one"}));
    b.ok(json!({"type":"subscribe","channel":"t.one"}));
    for n in 1..=20u64 {
        let ack = publisher.ok(json!({"type":"publish","channel":"t.one","data":{"n":n}}));
        assert_eq!(ack["offset"], n);
        assert_eq!(ack["delivered"], 2);
    }
    for client in [&mut a, &mut b] {
        for n in 1..=20u64 {
            assert_message(&client.recv(), "t.one", n, &json!({"n": n}));
        }
        client.expect_nothing(Duration::from_millis(200));
    }
    // Another channel has its own offsets.
    let ack = publisher.ok(json!({"type":"publish","channel":"t.two","data":0}));
    assert_eq!(ack["offset"], 1);
    assert_eq!(ack["delivered"], 0);
}

// ---------------------------------------------------------------------------
// Resumption
// ---------------------------------------------------------------------------

fn publish_n(publisher: &mut JsonClient, channel: &str, range: std::ops::RangeInclusive<u64>) {
    for n in range {
        let ack = publisher.ok(json!({"type":"publish","channel":channel,"data":{"n":n}}));
        assert_eq!(ack["offset"], n, "{ack}");
    }
}

#[test]
fn since_replays_exactly_the_later_offsets_then_continues_live() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    publish_n(&mut publisher, "r", 1..=10);

    let mut sub = JsonClient::ws(s.public);
    let ack = sub.ok(json!({"type":"subscribe","channel":"r","since":4,"id":"x"}));
    assert_eq!(ack["id"], "x");
    assert_eq!(ack["offset"], 10);
    assert_eq!(ack["replayed"], 6);
    for n in 5..=10u64 {
        assert_message(&sub.recv(), "r", n, &json!({"n": n}));
    }
    publish_n(&mut publisher, "r", 11..=13);
    for n in 11..=13u64 {
        assert_message(&sub.recv(), "r", n, &json!({"n": n}));
    }
    sub.expect_nothing(Duration::from_millis(300));

    // since = the last offset: nothing replayed, live from the next one.
    let mut caught_up = JsonClient::ws(s.public);
    let ack = caught_up.ok(json!({"type":"subscribe","channel":"r","since":13}));
    assert_eq!(ack["replayed"], 0);
    publish_n(&mut publisher, "r", 14..=14);
    assert_message(&caught_up.recv(), "r", 14, &json!({"n": 14}));
    caught_up.expect_nothing(Duration::from_millis(200));

    // since 0 replays everything.
    let mut everything = JsonClient::ws(s.public);
    let ack = everything.ok(json!({"type":"subscribe","channel":"r","since":0}));
    assert_eq!(ack["replayed"], 14);
    for n in 1..=14u64 {
        assert_message(&everything.recv(), "r", n, &json!({"n": n}));
    }
    everything.expect_nothing(Duration::from_millis(200));
}

#[test]
fn since_beyond_the_backlog_is_not_recoverable_and_says_what_remains() {
    let s = Servers::start(&["--channel-backlog", "5"]);
    let mut publisher = JsonClient::ws(s.internal);
    publish_n(&mut publisher, "b", 1..=12);
    let mut sub = JsonClient::ws(s.public);
    let message = sub.fails(
        json!({"type":"subscribe","channel":"b","since":3,"id":3}),
        "not_recoverable",
    );
    assert!(
        message.contains("8 to 12"),
        "should name the offsets still held: {message}"
    );
    assert!(message.contains('3'), "{message}");
    // Refused: not subscribed.
    publish_n(&mut publisher, "b", 13..=13);
    sub.expect_nothing(Duration::from_millis(200));
    // The oldest still-held offset minus one works: 9..=13 (backlog of 5).
    let ack = sub.ok(json!({"type":"subscribe","channel":"b","since":8}));
    assert_eq!(ack["replayed"], 5);
    for n in 9..=13u64 {
        assert_message(&sub.recv(), "b", n, &json!({"n": n}));
    }
    let message = JsonClient::ws(s.public).fails(
        json!({"type":"subscribe","channel":"b","since":7}),
        "not_recoverable",
    );
    assert!(message.contains("9 to 13"), "{message}");
}

#[test]
fn since_after_the_backlog_expired_by_age_is_not_recoverable() {
    let s = Servers::start(&["--channel-backlog-age", "300ms"]);
    let mut publisher = JsonClient::ws(s.internal);
    publish_n(&mut publisher, "aged", 1..=3);
    let mut fresh = JsonClient::ws(s.public);
    let ack = fresh.ok(json!({"type":"subscribe","channel":"aged","since":1}));
    assert_eq!(ack["replayed"], 2);
    sleep(Duration::from_millis(600));
    let mut late = JsonClient::ws(s.public);
    let message = late.fails(
        json!({"type":"subscribe","channel":"aged","since":1}),
        "not_recoverable",
    );
    assert!(
        message.contains("empty") && message.contains('3'),
        "{message}"
    );
    let message = late.fails(
        json!({"type":"subscribe","channel":"aged","since":0}),
        "not_recoverable",
    );
    assert!(message.contains("aged"), "{message}");
    // Caught-up resumption still works with an empty backlog.
    let ack = late.ok(json!({"type":"subscribe","channel":"aged","since":3}));
    assert_eq!(ack["replayed"], 0);
    publish_n(&mut publisher, "aged", 4..=4);
    assert_message(&late.recv(), "aged", 4, &json!({"n": 4}));
}

#[test]
fn since_ahead_of_the_channel_is_not_recoverable() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    publish_n(&mut publisher, "ahead", 1..=3);
    let mut sub = JsonClient::ws(s.public);
    let message = sub.fails(
        json!({"type":"subscribe","channel":"ahead","since":4}),
        "not_recoverable",
    );
    assert!(message.contains("ahead"), "{message}");
    assert!(message.contains("1 to 3"), "{message}");
    // A channel that does not exist yet has nothing to resume from...
    let message = sub.fails(
        json!({"type":"subscribe","channel":"nothing.yet","since":2}),
        "not_recoverable",
    );
    assert!(message.contains("no messages"), "{message}");
    // ...except from offset 0.
    let ack = sub.ok(json!({"type":"subscribe","channel":"nothing.yet","since":0}));
    assert_eq!(ack["replayed"], 0);
    assert_eq!(ack["offset"], Value::Null);
}

#[test]
fn create_sets_a_per_channel_backlog() {
    let s = Servers::start(&["--channel-backlog", "100"]);
    let mut publisher = JsonClient::ws(s.internal);
    let created =
        publisher.ok(json!({"type":"create","channel":"small","backlog":2,"backlog_age":60}));
    assert_eq!(created["backlog_limit"], 2);
    assert_eq!(created["backlog_age"], 60);
    publish_n(&mut publisher, "small", 1..=5);
    publish_n(&mut publisher, "default", 1..=5);
    let mut sub = JsonClient::ws(s.public);
    let message = sub.fails(
        json!({"type":"subscribe","channel":"small","since":2}),
        "not_recoverable",
    );
    assert!(message.contains("4 to 5"), "{message}");
    let ack = sub.ok(json!({"type":"subscribe","channel":"small","since":3}));
    assert_eq!(ack["replayed"], 2);
    for n in 4..=5u64 {
        assert_message(&sub.recv(), "small", n, &json!({"n": n}));
    }
    let ack = sub.ok(json!({"type":"subscribe","channel":"default","since":0}));
    assert_eq!(ack["replayed"], 5, "the server default applies elsewhere");
    for n in 1..=5u64 {
        assert_message(&sub.recv(), "default", n, &json!({"n": n}));
    }
    let list = publisher.ok(json!({"type":"list"}));
    let channels = list["channels"].as_array().unwrap();
    let limits: Vec<(&str, u64, u64)> = channels
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap(),
                c["backlog_limit"].as_u64().unwrap(),
                c["backlog"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(limits, vec![("default", 100, 5), ("small", 2, 2)]);
    // A backlog of zero keeps nothing: only caught-up resumption works.
    publisher.ok(json!({"type":"create","channel":"none","backlog":0}));
    publish_n(&mut publisher, "none", 1..=2);
    sub.fails(
        json!({"type":"subscribe","channel":"none","since":1}),
        "not_recoverable",
    );
    let ack = sub.ok(json!({"type":"subscribe","channel":"none","since":2}));
    assert_eq!(ack["replayed"], 0);
    let message = publisher.fails(
        json!({"type":"create","channel":"huge","backlog":2_000_000}),
        "invalid_field",
    );
    assert!(message.contains("`backlog`"), "{message}");
}

// ---------------------------------------------------------------------------
// Wildcards
// ---------------------------------------------------------------------------

/// Messages received before the `end` sentinel, as (channel, offset).
fn until_end(client: &mut JsonClient) -> Vec<(String, u64)> {
    let mut got = Vec::new();
    for _ in 0..100 {
        let message = client.recv();
        assert_eq!(message["type"], "message", "{message}");
        let channel = message["channel"].as_str().unwrap().to_owned();
        if channel == "end" {
            client.expect_nothing(Duration::from_millis(200));
            return got;
        }
        got.push((channel, message["offset"].as_u64().unwrap()));
    }
    panic!("no `end` sentinel within 100 messages");
}

#[test]
fn wildcards_match_segments_and_deliver_each_message_once() {
    let s = Servers::start(&[]);
    let mut publisher = JsonClient::ws(s.internal);
    let mut star = JsonClient::ws(s.public);
    let mut tail = JsonClient::ws(s.public);
    let mut both = JsonClient::ws(s.public);
    let mut prefix = JsonClient::ws(s.public);
    star.ok(json!({"type":"subscribe","channel":"trades.*"}));
    tail.ok(json!({"type":"subscribe","channel":"trades.>"}));
    for target in ["trades.btc", "trades.*", "trades.>"] {
        both.ok(json!({"type":"subscribe","channel":target}));
    }
    prefix.ok(json!({"type":"subscribe","channel":"*.btc"}));
    for client in [&mut star, &mut tail, &mut both, &mut prefix] {
        client.ok(json!({"type":"subscribe","channel":"end"}));
    }

    let expected_delivered = [
        ("trades.btc", 4),
        ("trades.btc.usd", 2),
        ("trades", 0),
        ("tradesx.btc", 1),
        ("other.eth", 0),
        ("trades.eth", 3),
    ];
    for (channel, delivered) in expected_delivered {
        let ack = publisher.ok(json!({"type":"publish","channel":channel,"data":channel}));
        assert_eq!(ack["delivered"], delivered, "{channel}: {ack}");
    }
    publisher.ok(json!({"type":"publish","channel":"end","data":null}));

    let pairs =
        |list: &[&str]| -> Vec<(String, u64)> { list.iter().map(|c| (c.to_string(), 1)).collect() };
    assert_eq!(until_end(&mut star), pairs(&["trades.btc", "trades.eth"]));
    assert_eq!(
        until_end(&mut tail),
        pairs(&["trades.btc", "trades.btc.usd", "trades.eth"])
    );
    assert_eq!(
        until_end(&mut both),
        pairs(&["trades.btc", "trades.btc.usd", "trades.eth"]),
        "one delivery per message, however many subscriptions match"
    );
    assert_eq!(
        until_end(&mut prefix),
        pairs(&["trades.btc", "tradesx.btc"])
    );

    // Dropping the exact subscription keeps pattern delivery, still once.
    both.ok(json!({"type":"unsubscribe","channel":"trades.btc"}));
    both.ok(json!({"type":"unsubscribe","channel":"trades.*"}));
    let ack = publisher.ok(json!({"type":"publish","channel":"trades.btc","data":2}));
    assert_eq!(ack["offset"], 2);
    publisher.ok(json!({"type":"publish","channel":"end","data":null}));
    assert_eq!(until_end(&mut both), vec![("trades.btc".to_owned(), 2)]);
}

#[test]
fn subscribing_before_the_channel_exists() {
    let s = Servers::start(&[]);
    let mut exact = JsonClient::ws(s.public);
    let mut pattern = JsonClient::ws(s.public);
    let ack = exact.ok(json!({"type":"subscribe","channel":"later.x"}));
    assert_eq!(ack["offset"], Value::Null, "no such channel yet: {ack}");
    pattern.ok(json!({"type":"subscribe","channel":"later.>"}));
    let list = exact.ok(json!({"type":"list"}));
    assert_eq!(list["channels"], json!([]));

    let mut publisher = JsonClient::ws(s.internal);
    let ack = publisher.ok(json!({"type":"publish","channel":"later.x","data":{"hello":1}}));
    assert_eq!(ack["offset"], 1);
    assert_eq!(ack["delivered"], 2);
    assert_message(&exact.recv(), "later.x", 1, &json!({"hello": 1}));
    assert_message(&pattern.recv(), "later.x", 1, &json!({"hello": 1}));

    // An explicit create also picks up earlier exact subscriptions.
    exact.ok(json!({"type":"subscribe","channel":"made"}));
    publisher.ok(json!({"type":"create","channel":"made"}));
    let list = publisher.ok(json!({"type":"list"}));
    let made = list["channels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["channel"] == "made")
        .cloned()
        .unwrap();
    assert_eq!(made["subscribers"], 1, "{made}");
    publisher.ok(json!({"type":"publish","channel":"made","data":true}));
    assert_message(&exact.recv(), "made", 1, &json!(true));
}

// ---------------------------------------------------------------------------
// Who may publish
// ---------------------------------------------------------------------------

#[test]
fn public_clients_cannot_publish_or_create_without_a_key() {
    let s = Servers::start(&[]);
    let mut public = JsonClient::ws(s.public);
    let message = public.fails(
        json!({"type":"publish","channel":"p","data":1,"id":1}),
        "not_found",
    );
    assert!(message.contains("`p`"), "{message}");
    let mut internal = JsonClient::ws(s.internal);
    internal.ok(json!({"type":"create","channel":"p"}));
    let message = public.fails(
        json!({"type":"publish","channel":"p","data":1}),
        "forbidden",
    );
    assert!(
        message.contains("trusted") && message.contains("auth"),
        "{message}"
    );
    let message = public.fails(json!({"type":"create","channel":"q"}), "forbidden");
    assert!(message.contains("create"), "{message}");
    let list = internal.ok(json!({"type":"list"}));
    assert_eq!(list["channels"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(
        list["channels"][0]["offset"], 0,
        "nothing was published: {list}"
    );
    // Without configured keys, auth cannot succeed, and says why; the
    // failures count as anywhere else: the third closes with 1008.
    let message = public.fails(json!({"type":"auth","key":"anything"}), "auth_failed");
    assert!(message.contains("no publisher keys"), "{message}");
    assert!(message.contains("2 attempt(s) left"), "{message}");
    public.fails(json!({"type":"auth","key":"again"}), "auth_failed");
    let message = public.fails(json!({"type":"auth","key":"third"}), "auth_failed");
    assert!(message.contains("too many failures, closing"), "{message}");
    match public.next_text(Duration::from_secs(5)) {
        Err(json_client::Ended::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a 1008 close, got {other:?}"),
    }
}

#[test]
fn a_publisher_key_makes_a_public_client_trusted() {
    let key = "correct horse battery staple";
    let hash = sha256_hex(key);
    let s = Servers::start(&["--publisher-key-sha256", &hash]);
    let mut subscriber = JsonClient::ws(s.public);
    subscriber.ok(json!({"type":"subscribe","channel":"keyed"}));

    let mut public = JsonClient::ws(s.public);
    public.fails(
        json!({"type":"publish","channel":"keyed","data":0}),
        "not_found",
    );
    let message = public.fails(
        json!({"type":"auth","key":"wrong","id":"a1"}),
        "auth_failed",
    );
    assert!(message.contains("2 attempt(s) left"), "{message}");
    let ack = public.ok(json!({"type":"auth","key":key,"id":"a2"}));
    assert_eq!(ack["id"], "a2");
    assert_eq!(ack["trusted"], true);
    let ack = public.ok(json!({"type":"publish","channel":"keyed","data":{"ok":true}}));
    assert_eq!(ack["offset"], 1);
    assert_eq!(ack["delivered"], 1);
    assert_message(&subscriber.recv(), "keyed", 1, &json!({"ok": true}));
    let created = public.ok(json!({"type":"create","channel":"made.by.key"}));
    assert_eq!(created["created"], true);

    // Trust is per connection.
    let mut other = JsonClient::ws(s.public);
    other.fails(
        json!({"type":"publish","channel":"keyed","data":0}),
        "forbidden",
    );
    // A key of the wrong case or with whitespace is another key.
    other.fails(
        json!({"type":"auth","key":key.to_uppercase()}),
        "auth_failed",
    );
    other.fails(
        json!({"type":"auth","key":format!("{key} ")}),
        "auth_failed",
    );
}

#[test]
fn too_many_auth_failures_close_the_connection_with_1008() {
    let hash = sha256_hex("the-key");
    let s = Servers::start(&["--publisher-key-sha256", &hash, "--max-auth-failures", "2"]);
    let mut public = JsonClient::ws(s.public);
    let message = public.fails(json!({"type":"auth","key":"nope","id":1}), "auth_failed");
    assert!(message.contains("1 attempt(s) left"), "{message}");
    let reply = public.request(json!({"type":"auth","key":"nope again","id":2}));
    let message = error_message(&reply, "auth_failed", "second failure");
    assert_eq!(reply["id"], 2);
    assert!(message.contains("closing"), "{message}");
    match public.next(READ_TIMEOUT) {
        Err(Ended::Closed(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
            assert!(!frame.reason.is_empty(), "{frame:?}");
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
    // Other clients are unaffected and the key still works.
    let mut fresh = JsonClient::ws(s.public);
    fresh.ok(json!({"type":"auth","key":"the-key"}));
}

#[test]
fn channels_created_with_publish_anyone_accept_public_publishes() {
    let s = Servers::start(&[]);
    let mut internal = JsonClient::ws(s.internal);
    let created = internal.ok(json!({"type":"create","channel":"open.chat","publish":"anyone"}));
    assert_eq!(created["publish"], "anyone");
    let mut subscriber = JsonClient::ws(s.public);
    subscriber.ok(json!({"type":"subscribe","channel":"open.*"}));
    let mut public = JsonClient::ws(s.public);
    let ack = public.ok(json!({"type":"publish","channel":"open.chat","data":"hi","id":5}));
    assert_eq!(ack["id"], 5);
    assert_eq!(ack["offset"], 1);
    assert_eq!(ack["delivered"], 1);
    assert_message(&subscriber.recv(), "open.chat", 1, &json!("hi"));
    // Only that channel: a public client still cannot create or auto-create.
    public.fails(
        json!({"type":"publish","channel":"open.other","data":1}),
        "not_found",
    );
    public.fails(
        json!({"type":"create","channel":"open.other","publish":"anyone"}),
        "forbidden",
    );
}

// ---------------------------------------------------------------------------
// Error paths
// ---------------------------------------------------------------------------

#[test]
fn every_malformed_request_gets_a_code_and_a_message_naming_the_field() {
    let s = Servers::start(&[]);
    let mut c = JsonClient::ws(s.internal);
    let raw = |c: &mut JsonClient, text: &str, code: &str, needle: &str| {
        c.send_text(text);
        let reply = c.recv();
        let message = error_message(&reply, code, text);
        assert!(
            message.contains(needle),
            "the error for {text} should mention {needle:?}: {message}"
        );
        reply
    };
    let reply = raw(&mut c, "not json", "bad_request", "invalid JSON");
    assert!(reply.get("id").is_none(), "{reply}");
    raw(&mut c, "{\"type\":\"publish\",", "bad_request", "JSON");
    raw(&mut c, "[1,2]", "bad_request", "object");
    raw(&mut c, "\"subscribe\"", "bad_request", "object");
    raw(&mut c, "42", "bad_request", "object");
    let reply = raw(
        &mut c,
        r#"{"channel":"a","id":"m"}"#,
        "missing_field",
        "`type`",
    );
    assert_eq!(reply["id"], "m");
    raw(&mut c, r#"{"type":5}"#, "invalid_field", "`type`");
    raw(&mut c, r#"{"type":null}"#, "missing_field", "`type`");
    let reply = raw(
        &mut c,
        r#"{"type":"dance","id":7}"#,
        "unknown_type",
        "dance",
    );
    assert_eq!(reply["id"], 7);
    raw(
        &mut c,
        r#"{"type":"Subscribe","channel":"a"}"#,
        "unknown_type",
        "Subscribe",
    );
    for kind in ["subscribe", "unsubscribe", "create", "publish"] {
        raw(
            &mut c,
            &format!(r#"{{"type":"{kind}"}}"#),
            "missing_field",
            "`channel`",
        );
        raw(
            &mut c,
            &format!(r#"{{"type":"{kind}","channel":5,"data":1}}"#),
            "invalid_field",
            "`channel`",
        );
        raw(
            &mut c,
            &format!(r#"{{"type":"{kind}","channel":["a"],"data":1}}"#),
            "invalid_field",
            "`channel`",
        );
    }
    raw(
        &mut c,
        r#"{"type":"publish","channel":"a"}"#,
        "missing_field",
        "`data`",
    );
    raw(&mut c, r#"{"type":"auth"}"#, "missing_field", "`key`");
    raw(
        &mut c,
        r#"{"type":"auth","key":1}"#,
        "invalid_field",
        "`key`",
    );
    let long = "x".repeat(129);
    for bad in ["", "a..b", ".a", "a.", "sp ace", "é", "a/b", long.as_str()] {
        for kind in ["publish", "create"] {
            let request = json!({"type":kind,"channel":bad,"data":1});
            raw(&mut c, &request.to_string(), "invalid_field", "`channel`");
        }
        let request = json!({"type":"subscribe","channel":bad});
        raw(&mut c, &request.to_string(), "invalid_field", "`channel`");
    }
    // Patterns are for subscribing only.
    for pattern in ["trades.*", "trades.>"] {
        let request = json!({"type":"publish","channel":pattern,"data":1});
        raw(&mut c, &request.to_string(), "invalid_field", "`channel`");
        let request = json!({"type":"create","channel":pattern});
        raw(&mut c, &request.to_string(), "invalid_field", "`channel`");
    }
    for pattern in ["a.>.b", "tr*des", "a.b>", "a.**", ">.a"] {
        let request = json!({"type":"subscribe","channel":pattern});
        raw(&mut c, &request.to_string(), "invalid_field", "`channel`");
    }
    raw(
        &mut c,
        r#"{"type":"subscribe","channel":"trades.*","since":1}"#,
        "invalid_field",
        "`since`",
    );
    raw(
        &mut c,
        r#"{"type":"subscribe","channel":"trades.>","since":0}"#,
        "invalid_field",
        "`since`",
    );
    for since in ["-1", "1.5", "\"3\"", "true", "18446744073709551616"] {
        raw(
            &mut c,
            &format!(r#"{{"type":"subscribe","channel":"a","since":{since}}}"#),
            "invalid_field",
            "`since`",
        );
    }
    raw(
        &mut c,
        r#"{"type":"create","channel":"a","backlog":-1}"#,
        "invalid_field",
        "`backlog`",
    );
    raw(
        &mut c,
        r#"{"type":"create","channel":"a","backlog_age":"10s"}"#,
        "invalid_field",
        "`backlog_age`",
    );
    raw(
        &mut c,
        r#"{"type":"create","channel":"a","publish":"me"}"#,
        "invalid_field",
        "`publish`",
    );
    // Nothing above created or subscribed anything.
    let list = c.ok(json!({"type":"list"}));
    assert_eq!(list["channels"], json!([]), "{list}");

    c.ok(json!({"type":"subscribe","channel":"dup"}));
    let message = c.fails(
        json!({"type":"subscribe","channel":"dup","id":1}),
        "conflict",
    );
    assert!(message.contains("`dup`"), "{message}");
    c.ok(json!({"type":"subscribe","channel":"dup.*"}));
    c.fails(json!({"type":"subscribe","channel":"dup.*"}), "conflict");
    let message = c.fails(json!({"type":"unsubscribe","channel":"never"}), "not_found");
    assert!(message.contains("`never`"), "{message}");
    c.ok(json!({"type":"unsubscribe","channel":"dup"}));
    c.fails(json!({"type":"unsubscribe","channel":"dup"}), "not_found");

    // After all of that the connection still works.
    let ack = c.ok(json!({"type":"publish","channel":"still.ok","data":1}));
    assert_eq!(ack["offset"], 1);
}

#[test]
fn binary_messages_on_ws_are_bad_requests() {
    let s = Servers::start(&[]);
    let mut c = JsonClient::ws(s.public);
    c.ws.send(Message::Binary(br#"{"type":"list"}"#.to_vec()))
        .unwrap();
    let reply = c.recv();
    let message = error_message(&reply, "bad_request", "binary message");
    assert!(message.contains("binary"), "{message}");
    c.ok(json!({"type":"list"}));
}

#[test]
fn channel_and_subscription_limits() {
    let s = Servers::start(&["--max-channels", "2", "--max-subscriptions", "2"]);
    let mut publisher = JsonClient::ws(s.internal);
    publisher.ok(json!({"type":"create","channel":"one"}));
    publisher.ok(json!({"type":"publish","channel":"two","data":1}));
    let message = publisher.fails(
        json!({"type":"create","channel":"three","id":3}),
        "limit_reached",
    );
    assert!(message.contains('2'), "{message}");
    let message = publisher.fails(
        json!({"type":"publish","channel":"three","data":1}),
        "limit_reached",
    );
    assert!(message.contains("channels"), "{message}");
    // Existing channels still work.
    let again = publisher.ok(json!({"type":"create","channel":"one"}));
    assert_eq!(again["created"], false);
    publisher.ok(json!({"type":"publish","channel":"one","data":1}));

    let mut sub = JsonClient::ws(s.public);
    sub.ok(json!({"type":"subscribe","channel":"one"}));
    sub.ok(json!({"type":"subscribe","channel":"x.*"}));
    let message = sub.fails(json!({"type":"subscribe","channel":"two"}), "limit_reached");
    assert!(message.contains("2 subscriptions"), "{message}");
    // The limit is per connection, and unsubscribing frees a place.
    JsonClient::ws(s.public).ok(json!({"type":"subscribe","channel":"two"}));
    sub.ok(json!({"type":"unsubscribe","channel":"x.*"}));
    sub.ok(json!({"type":"subscribe","channel":"two"}));
}

// ---------------------------------------------------------------------------
// Slow consumers (real binary)
// ---------------------------------------------------------------------------

/// The built binary with a public and an internal listener; killed on drop.
struct Binary {
    child: Child,
    public: SocketAddr,
    internal: SocketAddr,
}

impl Binary {
    fn start(flags: &[&str]) -> Binary {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
            ])
            .args(flags)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fanout");
        let stdout = child.stdout.take().unwrap();
        let rx = crate::support::child_lines::lines_of(stdout);
        let mut addrs = Vec::new();
        while addrs.len() < 2 {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("fanout printed its listening lines within 10 s");
            if let Some(addr) = line.strip_prefix("fanout listening on ws://") {
                addrs.push(addr.parse::<SocketAddr>().unwrap());
            }
        }
        Binary {
            child,
            public: addrs[0],
            internal: addrs[1],
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"))
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection whose receive buffer is set small before connecting,
/// so a client that stops reading fills up quickly.
fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: libc::c_int) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 loopback expected: {addr}")
    };
    // SAFETY: plain socket calls on a descriptor we own; every pointer
    // refers to a live local of the size passed alongside it.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let r = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from(owned)
    };
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads the next text frame as JSON, skipping pings; panics on anything else.
fn raw_next_json(stream: &mut TcpStream) -> Value {
    for _ in 0..100 {
        let frame = read_frame(stream).expect("a frame within the read timeout");
        match frame.opcode() {
            1 => return serde_json::from_slice(&frame.payload).expect("JSON text"),
            9 | 10 => continue,
            8 => panic!("closed: {:?} {}", frame.close_code(), frame.close_reason()),
            op => panic!("unexpected opcode {op}"),
        }
    }
    panic!("100 control frames in a row");
}

fn raw_send_json(stream: &mut TcpStream, value: &Value) {
    stream
        .write_all(&client_frame(0x81, value.to_string().as_bytes()))
        .unwrap();
}

const TOTAL: u64 = 100_000;
/// Publish requests per write.
const BATCH: u64 = 100;
/// Publishes not yet acknowledged.
///
/// The server flushes a connection's queue once per loop turn, so the
/// fan-out of one turn must fit the 64 KiB queue even of a subscriber whose
/// socket is empty: about 750 messages of this size. With 1000 publishes in
/// flight the reading subscriber was seen to lose messages from offset 765.
const ACK_WINDOW: u64 = 500;
/// Publishes the reading subscriber has not received yet, so that a test
/// machine too slow to run the reader at full speed does not overflow its
/// queue either (its queue plus socket buffers hold these easily).
const READER_WINDOW: u64 = 500;
const TIME_LIMIT: Duration = Duration::from_secs(90);
const RSS_GROWTH_LIMIT_KIB: u64 = 64 << 10;

fn bulk_data(n: u64) -> Value {
    json!({ "i": n })
}

#[test]
fn a_subscriber_that_never_reads_loses_messages_not_others_and_recovers_them() {
    let started = Instant::now();
    let server = Binary::start(&[
        "--max-outbound-buffer",
        "64KiB",
        "--channel-backlog",
        "100000",
    ]);
    let mut publisher = JsonClient::ws(server.internal);
    publisher.ok(json!({"type":"create","channel":"bulk"}));

    // The slow subscriber: its own upgrade and subscribe, then no reads.
    let mut slow = connect_small_rcvbuf(server.public, 4096);
    slow.write_all(
        b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let head = read_http_head(&mut slow);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(raw_next_json(&mut slow)["type"], "welcome");
    raw_send_json(
        &mut slow,
        &json!({"type":"subscribe","channel":"bulk","id":"slow"}),
    );
    let ack = raw_next_json(&mut slow);
    assert_ack(&ack, "subscribe");

    // The reading subscriber, on its own thread.
    let mut reader = JsonClient::ws(server.public);
    reader.ok(json!({"type":"subscribe","channel":"bulk"}));
    let received = Arc::new(AtomicU64::new(0));
    let reader_thread = {
        let received = Arc::clone(&received);
        std::thread::spawn(move || {
            let deadline = Instant::now() + TIME_LIMIT;
            for expected in 1..=TOTAL {
                let left = deadline.saturating_duration_since(Instant::now());
                let message = reader
                    .next(left.min(Duration::from_secs(10)))
                    .unwrap_or_else(|e| {
                        panic!(
                            "reading subscriber: no message after offset {}: {e:?}",
                            expected - 1
                        )
                    });
                assert_eq!(
                    message["type"], "message",
                    "the reading subscriber must lose nothing: {message}"
                );
                assert_eq!(
                    message["offset"], expected,
                    "reading subscriber order: {message}"
                );
                received.store(expected, Ordering::Release);
            }
            reader.expect_nothing(Duration::from_millis(300));
        })
    };

    let rss_before = server.rss_kib();
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut delivered_total = 0u64;
    while acked < TOTAL {
        assert!(
            started.elapsed() < TIME_LIMIT,
            "publishing took over {TIME_LIMIT:?}: {acked} acknowledged, reader at {}",
            received.load(Ordering::Acquire)
        );
        if reader_thread.is_finished() && received.load(Ordering::Acquire) < TOTAL {
            // Surface the reader's panic.
            reader_thread.join().unwrap();
            panic!("the reading subscriber stopped early");
        }
        let reader_at = received.load(Ordering::Acquire);
        let room = (TOTAL - sent)
            .min(ACK_WINDOW - (sent - acked))
            .min((reader_at + READER_WINDOW).saturating_sub(sent));
        if room >= BATCH || (room > 0 && sent + room == TOTAL) {
            let count = room.min(BATCH);
            for n in sent + 1..=sent + count {
                let request = json!({"type":"publish","channel":"bulk","data":bulk_data(n)});
                publisher
                    .ws
                    .write(Message::Text(request.to_string()))
                    .unwrap();
            }
            publisher.ws.flush().unwrap();
            sent += count;
        } else if sent > acked {
            let ack = publisher.recv();
            assert_ack(&ack, "publish");
            acked += 1;
            assert_eq!(ack["offset"], acked, "{ack}");
            let delivered = ack["delivered"].as_u64().unwrap();
            assert!(
                (1..=2).contains(&delivered),
                "the reading subscriber always gets it: {ack}"
            );
            delivered_total += delivered;
        } else {
            sleep(Duration::from_millis(1));
        }
    }
    let publish_time = started.elapsed();
    reader_thread
        .join()
        .expect("the reading subscriber got every message in order");
    let rss_after = server.rss_kib();
    let slow_delivered = delivered_total - TOTAL;
    eprintln!(
        "published {TOTAL} in {publish_time:?}; VmRSS {rss_before} kB -> {rss_after} kB; \
         the slow subscriber was delivered {slow_delivered}"
    );
    assert!(
        rss_after < rss_before + RSS_GROWTH_LIMIT_KIB,
        "memory grew from {rss_before} kB to {rss_after} kB with a subscriber that never reads"
    );
    assert!(
        slow_delivered < TOTAL,
        "the subscriber that never read was never dropped from: the test did not fill its queue"
    );

    // The slow subscriber reads now: every message it was delivered, in
    // order, and notices for the rest.
    let mut got: Vec<u64> = Vec::new();
    let mut notices: Vec<Value> = Vec::new();
    let read_deadline = Instant::now() + Duration::from_secs(30);
    let mut accounted = 0u64;
    for _ in 0..TOTAL + 100 {
        if accounted == TOTAL {
            break;
        }
        assert!(
            Instant::now() < read_deadline,
            "slow subscriber: {accounted} of {TOTAL} accounted for"
        );
        let value = raw_next_json(&mut slow);
        match value["type"].as_str() {
            Some("message") => {
                let offset = value["offset"].as_u64().unwrap();
                assert!(
                    got.last().is_none_or(|last| offset > *last),
                    "out of order: {value}"
                );
                assert_eq!(value["data"], bulk_data(offset));
                got.push(offset);
                accounted += 1;
            }
            Some("dropped") => {
                accounted += value["count"].as_u64().unwrap();
                notices.push(value);
            }
            _ => panic!("unexpected: {value}"),
        }
    }
    assert_eq!(
        accounted, TOTAL,
        "every offset received or reported dropped"
    );
    assert_eq!(
        got.len() as u64,
        slow_delivered,
        "received what the acks counted as delivered"
    );
    assert!(!notices.is_empty(), "no dropped notice");
    let received_set: BTreeSet<u64> = got.iter().copied().collect();
    let mut previous_last = 0;
    for notice in &notices {
        let keys: BTreeSet<&str> = notice
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(
            ["type", "channel", "count", "first_offset", "last_offset"]
                .iter()
                .all(|k| keys.contains(k)),
            "{notice}"
        );
        assert_eq!(notice["channel"], "bulk", "{notice}");
        let first = notice["first_offset"].as_u64().unwrap();
        let last = notice["last_offset"].as_u64().unwrap();
        let count = notice["count"].as_u64().unwrap();
        assert!(
            previous_last < first && first <= last && last <= TOTAL,
            "{notice}"
        );
        let missing = (first..=last).filter(|o| !received_set.contains(o)).count() as u64;
        assert_eq!(
            count, missing,
            "count = offsets in the range not delivered: {notice}"
        );
        previous_last = last;
    }
    // The messages before the first gap are exactly a prefix, and the
    // notice says where to resume from.
    let first = notices[0]["first_offset"].as_u64().unwrap();
    assert_eq!(
        got.iter().take_while(|o| **o < first).count() as u64,
        first - 1,
        "messages before the first gap form a prefix: {:?}",
        notices[0]
    );
    assert_eq!(notices.last().unwrap()["last_offset"], TOTAL, "{notices:?}");
    if let Some(text) = notices[0]["message"].as_str() {
        assert!(
            text.contains(&format!("\"since\": {}", first - 1)),
            "{text}"
        );
    }
    eprintln!(
        "slow subscriber: {} delivered, gaps {:?}",
        got.len(),
        notices
            .iter()
            .map(|n| (&n["first_offset"], &n["last_offset"], &n["count"]))
            .collect::<Vec<_>>()
    );

    // Resubscribe from just before the gap: the backlog fills it, in order.
    raw_send_json(
        &mut slow,
        &json!({"type":"unsubscribe","channel":"bulk","id":1}),
    );
    raw_send_json(
        &mut slow,
        &json!({"type":"subscribe","channel":"bulk","since":first - 1,"id":2}),
    );
    let ack = raw_next_json(&mut slow);
    assert_ack(&ack, "unsubscribe");
    let ack = raw_next_json(&mut slow);
    assert_ack(&ack, "subscribe");
    assert_eq!(ack["replayed"], TOTAL - first + 1, "{ack}");
    for offset in first..=TOTAL {
        assert!(
            Instant::now() < read_deadline,
            "slow subscriber: replay stalled at {offset}"
        );
        let value = raw_next_json(&mut slow);
        assert_eq!(value["type"], "message", "{value}");
        assert_eq!(value["offset"], offset, "{value}");
        assert_eq!(value["data"], bulk_data(offset));
    }
    slow.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    if let Some(frame) = read_frame(&mut slow) {
        assert!(frame.opcode() == 9, "nothing more expected, got {frame:?}");
    }
}

/// Publishes 1 KiB messages (one at a time, each acknowledged) to a channel
/// whose only subscriber never reads, until the first one that could not be
/// delivered to it; answers how many were. Bounded by `limit` messages.
fn absorbed_before_the_first_drop(flags: &[&str], limit: u64) -> u64 {
    let server = Servers::start(flags);
    let mut publisher = JsonClient::ws(server.internal);
    publisher.ok(json!({"type":"create","channel":"slow"}));
    let mut slow = connect_small_rcvbuf(server.public, 4096);
    slow.write_all(UPGRADE_HEAD.replace("/echo", "/ws").as_bytes())
        .unwrap();
    let head = read_http_head(&mut slow);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(raw_next_json(&mut slow)["type"], "welcome");
    raw_send_json(&mut slow, &json!({"type":"subscribe","channel":"slow"}));
    assert_ack(&raw_next_json(&mut slow), "subscribe");
    let data = "x".repeat(1024);
    for n in 1..=limit {
        let ack = publisher.ok(json!({"type":"publish","channel":"slow","data":data}));
        match ack["delivered"].as_u64() {
            Some(1) => {}
            Some(0) => return n - 1,
            _ => panic!("unexpected ack {ack}"),
        }
    }
    panic!("{limit} messages of 1 KiB went to a subscriber that never reads, none dropped");
}

/// The kernel's send buffer holds data on top of the server's queue (on
/// loopback this test saw ~2 600 messages of 1 KiB absorbed without the
/// flag); `--socket-send-buffer` bounds it, so a slow client falls at most
/// about queue + 2 × that send buffer + its own receive buffer behind.
#[test]
fn socket_send_buffer_bounds_what_a_slow_subscriber_absorbs() {
    let absorbed = absorbed_before_the_first_drop(
        &[
            "--max-outbound-buffer",
            "64KiB",
            "--socket-send-buffer",
            "8KiB",
        ],
        5_000,
    );
    eprintln!("with an 8 KiB send buffer: {absorbed} messages of 1 KiB before the first drop");
    // Queue 64 KiB + SO_SNDBUF 2 × 8 KiB + the client's small receive
    // buffer (and TCP's per-segment overhead): well under 150 messages.
    assert!(
        (40..150).contains(&absorbed),
        "{absorbed} messages of 1 KiB absorbed before the first drop"
    );
}
