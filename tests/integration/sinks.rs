//! Alert firings delivered outside (`src/app/sinks/`): a webhook and the
//! Telegram Bot API, both played by a recording HTTP server on loopback
//! (`support::http_recorder`). Alerts fire deterministically: a client
//! creates one, and a trusted publisher on the internal listener sends
//! trades with explicit event times (as in `market.rs`). The sinks are
//! configured the way operators do it, as `[[sink]]` tables in a config
//! file.

use crate::support::{common, http_recorder, json_client};

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use hmac::{Hmac, Mac};
use http_recorder::{Answer, HttpRecorder, Recorded};
use json_client::*;
use serde_json::{json, Value};
use sha2::Sha256;

/// A time aligned to the hour, like `market.rs`'s.
const T0: i64 = 1_700_002_800_000;
const SEC: i64 = 1_000;
/// How long a test waits for something the worker does.
const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "test-secret: not a real one";

/// A server whose config file holds `sinks` (TOML `[[sink]]` tables),
/// with 1-minute candles only and the simulator off.
struct SinkServer {
    servers: Servers,
    /// Holds the config file until the server is gone.
    _dir: tempfile::TempDir,
}

impl SinkServer {
    fn start(sinks: &str) -> SinkServer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fanout.toml");
        std::fs::write(&path, sinks).unwrap();
        let path = path.display().to_string();
        let servers = Servers::start(&["--kline-intervals", "1m", "--config", &path]);
        SinkServer { servers, _dir: dir }
    }

    fn publisher(&self) -> JsonClient {
        JsonClient::ws(self.servers.internal)
    }

    fn client(&self) -> JsonClient {
        JsonClient::ws(self.servers.public)
    }

    /// `GET /metrics` as `name{labels}` → value.
    fn metrics(&self) -> HashMap<String, f64> {
        let response = http_exchange(
            self.servers.public,
            b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n",
        );
        let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').unwrap();
                (key.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    /// One sink's counter, e.g. `sink("hook", "sent")`.
    fn sink(&self, name: &str, counter: &str) -> f64 {
        let metrics = self.metrics();
        let key = match counter {
            "queue_full" | "shutdown" => {
                format!("fanout_sink_dropped_total{{sink=\"{name}\",reason=\"{counter}\"}}")
            }
            "queued" => format!("fanout_sink_queued{{sink=\"{name}\"}}"),
            "retries" => format!("fanout_sink_retries_total{{sink=\"{name}\"}}"),
            other => format!("fanout_sink_{other}_total{{sink=\"{name}\"}}"),
        };
        *metrics
            .get(&key)
            .unwrap_or_else(|| panic!("no {key} in /metrics"))
    }

    /// Waits (bounded) until the sink's counters are `want`
    /// (`[(counter, value)]`); fails with what they were.
    fn wait_counters(&self, name: &str, want: &[(&str, f64)]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got: Vec<(&str, f64)> =
                want.iter().map(|(c, _)| (*c, self.sink(name, c))).collect();
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sink `{name}`: counters {got:?} after {WAIT:?}, expected {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn webhook_sink(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[sink]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n{extra}\n"
    )
}

fn trade(price: &str, ts: i64) -> Value {
    json!({"type":"trade","symbol":"BTC-USD","price":price,"qty":"1","ts":ts})
}

fn publish(publisher: &mut JsonClient, data: Value) {
    let reply = publisher.request(json!({"type":"publish","channel":"events","data":data}));
    assert_ack(&reply, "publish");
}

/// Creates the README's alert (crosses above 45000 on BTC-USD 1m close)
/// and makes it fire once; returns the firing as its owner received it,
/// text and all.
fn fire_btc45k(s: &SinkServer) -> (JsonClient, String) {
    let mut owner = s.client();
    owner.ok(json!({
        "type":"alert.create","alert":"btc45k","symbol":"BTC-USD","interval":"1m",
        "field":"close","condition":"crosses_above","value":"45000","cooldown":0
    }));
    let mut publisher = s.publisher();
    publish(&mut publisher, trade("44995", T0));
    publish(&mut publisher, trade("45003.2", T0 + SEC));
    let text = owner.recv_text();
    let firing: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(firing["type"], "alert", "{text}");
    assert_eq!(firing["value"], "45003.2", "{text}");
    (owner, text)
}

/// An alert that fires on every trade above 10 (cooldown 0).
fn always_firing(s: &SinkServer) -> JsonClient {
    let mut owner = s.client();
    owner.ok(json!({
        "type":"alert.create","alert":"hi","symbol":"BTC-USD","interval":"1m",
        "condition":"above","value":"10","cooldown":0
    }));
    owner
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn assert_signed_firing(request: &Recorded, firing: &str) {
    assert_eq!(request.method, "POST");
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.body_text(),
        firing,
        "the body is the firing, byte for byte"
    );
    let want = format!("sha256={}", hmac_hex(SECRET, &request.body));
    assert_eq!(request.header("x-fanout-signature"), Some(want.as_str()));
}

#[test]
fn an_alert_firing_is_posted_signed_to_the_webhook() {
    let hook = HttpRecorder::start(&[Answer::Status(200)]);
    let s = SinkServer::start(&webhook_sink("hook", &hook.url("/hooks/fanout"), ""));
    let (_owner, firing) = fire_btc45k(&s);
    let requests = hook.wait_for(1, WAIT);
    assert_eq!(requests[0].path, "/hooks/fanout");
    assert_signed_firing(&requests[0], &firing);
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(body["alert"], "btc45k");
    assert_eq!(body["threshold"], "45000");
    s.wait_counters(
        "hook",
        &[
            ("sent", 1.0),
            ("retries", 0.0),
            ("failed", 0.0),
            ("queue_full", 0.0),
            ("queued", 0.0),
        ],
    );
    // A wrong secret gives another signature: the check above can fail.
    assert_ne!(
        requests[0].header("x-fanout-signature").unwrap(),
        format!("sha256={}", hmac_hex("another secret", &requests[0].body))
    );
}

#[test]
fn server_errors_are_retried_until_delivered() {
    let hook = HttpRecorder::start(&[
        Answer::Status(500),
        Answer::Status(503),
        Answer::Status(200),
    ]);
    let s = SinkServer::start(&webhook_sink(
        "flaky",
        &hook.url("/in"),
        "retry-backoff = \"20ms\"\nmax-attempts = 5",
    ));
    let (_owner, firing) = fire_btc45k(&s);
    let requests = hook.wait_for(3, WAIT);
    for request in &requests {
        assert_signed_firing(request, &firing);
    }
    s.wait_counters("flaky", &[("sent", 1.0), ("retries", 2.0), ("failed", 0.0)]);
    assert_eq!(
        hook.requests().len(),
        3,
        "delivered once, then nothing more"
    );
}

#[test]
fn a_client_error_is_not_retried() {
    let hook = HttpRecorder::start(&[Answer::Status(400), Answer::Status(200)]);
    let s = SinkServer::start(&webhook_sink(
        "strict",
        &hook.url("/in"),
        "retry-backoff = \"20ms\"",
    ));
    let (_owner, _) = fire_btc45k(&s);
    hook.wait_for(1, WAIT);
    s.wait_counters(
        "strict",
        &[("sent", 0.0), ("retries", 0.0), ("failed", 1.0)],
    );
    assert_eq!(hook.requests().len(), 1);
}

#[test]
fn a_receiver_that_never_answers_times_out_and_the_loop_keeps_serving() {
    let hook = HttpRecorder::start(&[Answer::Never]);
    let s = SinkServer::start(&webhook_sink(
        "dead",
        &hook.url("/in"),
        "timeout = \"2s\"\nmax-attempts = 3\nretry-backoff = \"20ms\"\nflush-timeout = \"200ms\"",
    ));
    let (mut owner, _) = fire_btc45k(&s);
    // The first attempt is held unanswered: meanwhile the loop serves
    // HTTP, WebSocket requests and alerts as usual.
    hook.wait_for(1, WAIT);
    let health = http_exchange(
        s.servers.public,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let mut publisher = s.publisher();
    publish(&mut publisher, trade("44000", T0 + 2 * SEC));
    publish(&mut publisher, trade("45500", T0 + 3 * SEC));
    let again: Value = owner.recv();
    assert_eq!(again["type"], "alert", "{again}");
    assert_eq!(again["fired"], 2, "{again}");
    // The delivery was still under way during all that.
    assert_eq!(s.sink("dead", "failed"), 0.0);
    assert_eq!(s.sink("dead", "sent"), 0.0);
    // Three attempts, each timed out, for the first firing; then the
    // second firing's attempts begin.
    hook.wait_for(4, WAIT + WAIT);
    s.wait_counters("dead", &[("sent", 0.0), ("retries", 2.0), ("failed", 1.0)]);
}

#[test]
fn telegram_gets_one_readable_line_per_firing() {
    let api = HttpRecorder::start(&[Answer::Status(200)]);
    let token = "123456:TEST-token_x";
    let s = SinkServer::start(&format!(
        "[[sink]]\nname = \"desk\"\nkind = \"telegram\"\napi-url = \"{}\"\nbot-token = \"{token}\"\nchat-id = -100777\n",
        api.url("")
    ));
    let (_owner, _) = fire_btc45k(&s);
    let requests = api.wait_for(1, WAIT);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, format!("/bot{token}/sendMessage"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-fanout-signature"), None);
    let body: Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(
        body,
        json!({"chat_id":"-100777","text":"btc45k: BTC-USD 1m close crosses above 45000 (45003.2)"})
    );
    s.wait_counters("desk", &[("sent", 1.0), ("failed", 0.0)]);
}

#[test]
fn a_full_queue_drops_and_counts() {
    let hook = HttpRecorder::start(&[Answer::Never]);
    let s = SinkServer::start(&webhook_sink(
        "tight",
        &hook.url("/in"),
        "queue = 1\ntimeout = \"30s\"\nmax-attempts = 1\nflush-timeout = \"200ms\"",
    ));
    let mut owner = always_firing(&s);
    let mut publisher = s.publisher();
    publish(&mut publisher, trade("11", T0));
    // The worker holds the first firing (its request is unanswered), so
    // the queue is empty: one more fits, the two after it do not.
    hook.wait_for(1, WAIT);
    for i in 1..=3 {
        publish(&mut publisher, trade("12", T0 + i * SEC));
    }
    for fired in 1..=4 {
        let firing = owner.recv();
        assert_eq!(
            firing["fired"], fired,
            "the owner gets every firing: {firing}"
        );
    }
    s.wait_counters(
        "tight",
        &[("queue_full", 2.0), ("queued", 1.0), ("sent", 0.0)],
    );
    assert_eq!(hook.requests().len(), 1);
}

#[test]
fn a_channel_sink_gets_the_messages_published_here() {
    let hook = HttpRecorder::start(&[Answer::Status(204)]);
    let s = SinkServer::start(&webhook_sink(
        "news",
        &hook.url("/news"),
        "source = \"news.>\"",
    ));
    let mut publisher = s.publisher();
    let mut subscriber = s.client();
    subscriber.ok(json!({"type":"subscribe","channel":"news.>"}));
    for channel in ["news.eu", "sport"] {
        let reply = publisher.request(json!({"type":"publish","channel":channel,"data":{"h":1}}));
        assert_ack(&reply, "publish");
    }
    let seen = subscriber.recv_text();
    let requests = hook.wait_for(1, WAIT);
    assert_eq!(
        requests[0].body_text(),
        seen,
        "as its subscribers receive it"
    );
    s.wait_counters("news", &[("sent", 1.0)]);
    assert_eq!(hook.requests().len(), 1, "`sport` is not the sink's");
}

#[test]
fn shutdown_gives_the_worker_its_flush_time_and_no_more() {
    let hook = HttpRecorder::start(&[Answer::Never]);
    // An attempt could take a minute; the flush time is 300 ms.
    let s = SinkServer::start(&webhook_sink(
        "slow",
        &hook.url("/in"),
        "timeout = \"60s\"\nmax-attempts = 1\nflush-timeout = \"300ms\"",
    ));
    let mut owner = always_firing(&s);
    let mut publisher = s.publisher();
    publish(&mut publisher, trade("11", T0));
    hook.wait_for(1, WAIT);
    publish(&mut publisher, trade("12", T0 + SEC));
    owner.recv();
    owner.recv();
    s.wait_counters("slow", &[("queued", 1.0), ("sent", 0.0)]);
    drop((owner, publisher));
    // The loop returns, then the sinks stop: the server's thread is
    // joined long before the held attempt's minute is up.
    let started = Instant::now();
    s.servers.server.stop().expect("the loop ends cleanly");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "stopping took {took:?}: the flush time was not enforced"
    );
    assert_eq!(
        hook.requests().len(),
        1,
        "the queued firing was not sent after the deadline"
    );
}
