//! The event-stream registration protocol of `/ws`, end to end over real
//! sockets: welcome, register, filters, the pre-registration queue, the
//! registration timeout, invalid registrations, who may publish events,
//! slow consumers and heartbeats.
//!
//! Events are published by a trusted client on the internal listener as
//! `{"type":"publish","channel":"events","data":{event}}`. Every publish is
//! acknowledged before the next step, and a test ends its expected stream
//! with a sentinel event that matches every filter in play, so "exactly these
//! events" is checked without sleeping.

use crate::support::common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

/// Byte for byte what consumers of the original service match on.
const WELCOME: &str = r#"{"type":"welcome","message":"Please send registration message to begin receiving events","format":{"type":"register","filters":{"types":[],"account_ids":[],"asset_codes":[],"min_amount":""}}}"#;

const REGISTERED_MESSAGE: &str = "Registration successful, processing queued events";

/// A server with one public and one internal (trusted) listener.
fn start(extra: &[&str]) -> TestServer {
    let mut flags = vec!["--internal-listen", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    let server = TestServer::start(&flags);
    assert_eq!(server.addrs.len(), 2, "{:?}", server.addrs);
    server
}

fn internal(server: &TestServer) -> SocketAddr {
    server.addrs[1]
}

/// A tungstenite client on `ws://addr/ws` (5 s socket timeouts).
fn connect(addr: SocketAddr) -> Ws {
    let stream = connect_tcp(addr);
    let (ws, _) = tungstenite::client(format!("ws://{addr}/ws"), stream).expect("handshake");
    ws
}

/// The next text message, skipping pings and pongs.
fn read_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read a message") {
            Message::Text(text) => return text,
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

fn read_json(ws: &mut Ws) -> Value {
    let text = read_text(ws);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn send_json(ws: &mut Ws, value: &Value) {
    ws.send(Message::Text(value.to_string())).expect("send");
}

/// A public `/ws` client that has read its welcome (and checked it).
fn consumer(server: &TestServer) -> Ws {
    let mut ws = connect(server.addr);
    assert_eq!(read_text(&mut ws), WELCOME);
    ws
}

fn register_message(filters: &Value) -> Value {
    json!({"type": "register", "filters": filters})
}

/// Sends `register` and checks the exact `registered` answer.
fn register(ws: &mut Ws, filters: &Value) {
    send_json(ws, &register_message(filters));
    let reply = read_json(ws);
    assert_eq!(
        reply,
        json!({"type": "registered", "message": REGISTERED_MESSAGE, "filters": filters}),
    );
}

fn registered_consumer(server: &TestServer, filters: &Value) -> Ws {
    let mut ws = consumer(server);
    register(&mut ws, filters);
    ws
}

fn no_filters() -> Value {
    json!({"types": [], "account_ids": [], "asset_codes": [], "min_amount": ""})
}

/// Reads events until one of `sentinels` arrives; returns the ones before it.
fn collect_until(ws: &mut Ws, sentinels: &[Value]) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = read_json(ws);
        if sentinels.contains(&event) {
            return events;
        }
        assert!(events.len() < 10_000, "no sentinel: {events:?}");
        events.push(event);
    }
}

/// A trusted publisher on the internal listener.
struct Publisher {
    ws: Ws,
    next_id: u64,
}

impl Publisher {
    fn connect(server: &TestServer) -> Publisher {
        let mut ws = connect(internal(server));
        // Every /ws client is welcomed, publishers included.
        assert_eq!(read_text(&mut ws), WELCOME);
        Publisher { ws, next_id: 0 }
    }

    /// Sends a publish request to `events` and returns the server's answer.
    fn request(&mut self, data: &Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        send_json(
            &mut self.ws,
            &json!({"type": "publish", "channel": "events", "data": data, "id": id}),
        );
        let reply = read_json(&mut self.ws);
        assert_eq!(reply["id"], json!(id), "{reply}");
        reply
    }

    /// Publishes an event and waits for its ack.
    fn publish(&mut self, event: &Value) {
        let reply = self.request(event);
        assert_eq!(reply["type"], "ack", "{reply}");
        assert_eq!(reply["request"], "publish", "{reply}");
    }

    fn publish_all(&mut self, events: &[Value]) {
        for event in events {
            self.publish(event);
        }
    }
}

/// Asserts a `{"type":"error","code":CODE,...}` whose message mentions `needle`.
fn assert_error(reply: &Value, code: &str, needle: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} not in {reply}");
}

fn close_code(message: &Message) -> Option<(u16, String)> {
    match message {
        Message::Close(Some(frame)) => Some((u16::from(frame.code), frame.reason.to_string())),
        _ => None,
    }
}

#[test]
fn welcome_is_byte_exact() {
    let server = start(&[]);
    let mut ws = connect(server.addr);
    match ws.read().unwrap() {
        Message::Text(text) => assert_eq!(text, WELCOME),
        other => panic!("expected the welcome text, got {other:?}"),
    }
    // The internal listener welcomes too: one protocol on both.
    let mut internal_ws = connect(internal(&server));
    assert_eq!(read_text(&mut internal_ws), WELCOME);
}

#[test]
fn register_answers_registered_then_delivers_new_events_as_published() {
    let server = start(&[]);
    let filters = json!({
        "types": ["payment", "trade"],
        "account_ids": ["GABC..."],
        "asset_codes": ["USDC"],
        "min_amount": "100"
    });
    let mut ws = consumer(&server);
    // The documented example, sent as a client would type it.
    ws.send(Message::Text(
        r#"{"type":"register","filters":{"types":["payment","trade"],"account_ids":["GABC..."],"asset_codes":["USDC"],"min_amount":"100"}}"#
            .into(),
    ))
    .unwrap();
    let registered = read_text(&mut ws);
    let registered: Value = serde_json::from_str(&registered).unwrap();
    assert_eq!(
        registered,
        json!({"type": "registered", "message": REGISTERED_MESSAGE, "filters": filters})
    );

    let mut publisher = Publisher::connect(&server);
    let event = json!({
        "type": "payment",
        "ledger": 1454282,
        "transaction_hash": "abc123...",
        "from": "GABC...",
        "to": "GXYZ...",
        "asset_code": "USDC",
        "amount": "250.5",
        "memo": null,
        "flags": [true, false, 1.5, {"nested": {"deep": ["x"]}}],
        "unicode": "é 漢字 🚀"
    });
    publisher.publish(&event);
    assert_eq!(
        read_json(&mut ws),
        event,
        "flat object, exactly as published"
    );

    // An empty-filter consumer gets everything, including a contract event.
    let mut all = registered_consumer(&server, &no_filters());
    let contract_event = json!({
        "type": "contract_event",
        "ledger": 1454282,
        "transaction_hash": "abc123...",
        "contract_id": "CABC...",
        "topics": ["transfer", {"address": "GABC..."}],
        "data": {"amount": "5", "list": [1, 2, 3]}
    });
    publisher.publish(&contract_event);
    assert_eq!(read_json(&mut all), contract_event);
    // Not a payment or trade: the first consumer sees the next match only.
    publisher.publish(&event);
    assert_eq!(read_json(&mut ws), event);
    assert_eq!(read_json(&mut all), event);
}

/// The `registered` answer as the original service wrote it, field order
/// included (`type` first, filters in the welcome's `format` order), like
/// the welcome: consumers that match on text see the same bytes.
#[test]
fn registered_text_keeps_the_documented_field_order() {
    let server = start(&[]);
    let mut ws = consumer(&server);
    ws.send(Message::Text(
        r#"{"type":"register","filters":{"types":["payment","trade"],"account_ids":["GABC..."],"asset_codes":["USDC"],"min_amount":"100"}}"#
            .into(),
    ))
    .unwrap();
    assert_eq!(
        read_text(&mut ws),
        r#"{"type":"registered","message":"Registration successful, processing queued events","filters":{"types":["payment","trade"],"account_ids":["GABC..."],"asset_codes":["USDC"],"min_amount":"100"}}"#
    );
}

fn filter_events() -> Vec<Value> {
    vec![
        json!({"type":"payment","seq":1,"from":"GABC","to":"GXYZ","asset_code":"USDC","amount":"100"}),
        json!({"type":"payment","seq":2,"from":"GXYZ","to":"GABC","asset_code":"USDC","amount":"99.9999999"}),
        json!({"type":"payment","seq":3,"account_id":"GABC","asset_code":"USDC","amount":"100.0000001"}),
        json!({"type":"trade","seq":4,"seller":"GDEF","buyer":"GABC","selling_asset_code":"EURC","buying_asset_code":"USDC","amount":250}),
        json!({"type":"trade","seq":5,"seller":"GDEF","buyer":"GHIJ","asset":{"code":"USDC","issuer":"GISSUER"},"amount":99.5}),
        json!({"type":"contract_event","seq":6,"ledger":1454282,"transaction_hash":"abc123","contract_id":"CABC","topics":["transfer",{"sym":"x"}],"data":{"amount":"5","to":"GABC","asset_code":"USDC"}}),
        json!({"type":"payment","seq":7,"source_account":"GABC","asset":{"code":"EURC","issuer":"GISSUER"},"amount":"1000"}),
        json!({"type":"payment","seq":8,"destination":"GABC","asset_code":"USDC","amount":"100.00"}),
        json!({"type":"account_created","seq":9,"account":"GNEW","amount":"-5"}),
        json!({"type":"payment","seq":10,"from":"GKLM","to":"GXYZ","asset_code":"USDC","amount":100}),
        json!({"type":"payment","seq":11,"from":"GABC","asset_code":"USDC","amount":99.9999999}),
        json!({"type":"trade","seq":12,"source":"GABC","base_asset_code":"USDC","counter_asset_code":"XLM","amount":"100.0000001"}),
    ]
}

#[test]
fn filters_select_by_type_account_asset_and_exact_min_amount() {
    let server = start(&[]);
    let f = |types: Value, accounts: Value, assets: Value, min: &str| json!({"types": types, "account_ids": accounts, "asset_codes": assets, "min_amount": min});
    // (filters, the `seq` of the events that must arrive, in order)
    let cases: Vec<(Value, Vec<u64>)> = vec![
        (
            f(
                json!(["payment", "trade"]),
                json!(["GABC"]),
                json!(["USDC"]),
                "100",
            ),
            vec![1, 3, 4, 8, 12],
        ),
        (no_filters(), (1..=12).collect()),
        (
            f(
                json!(["contract_event", "payment"]),
                json!([]),
                json!([]),
                "",
            ),
            vec![1, 2, 3, 6, 7, 8, 10, 11],
        ),
        (
            f(json!([]), json!(["GABC"]), json!([]), ""),
            vec![1, 2, 3, 4, 7, 8, 11, 12],
        ),
        (
            f(json!([]), json!(["GHIJ", "GKLM"]), json!([]), ""),
            vec![5, 10],
        ),
        (
            f(json!([]), json!([]), json!(["USDC"]), ""),
            vec![1, 2, 3, 4, 5, 8, 10, 11, 12],
        ),
        (
            // A contract event's amount is its `data.amount` (seq 6: 5).
            f(json!([]), json!([]), json!([]), "100"),
            vec![1, 3, 4, 7, 8, 10, 12],
        ),
        (
            f(json!([]), json!([]), json!([]), "100.0000001"),
            vec![3, 4, 7, 12],
        ),
        (
            f(json!(["trade"]), json!([]), json!(["USDC"]), "99.5"),
            vec![4, 5, 12],
        ),
    ];
    let mut consumers: Vec<Ws> = cases
        .iter()
        .map(|(filters, _)| registered_consumer(&server, filters))
        .collect();

    let events = filter_events();
    // Every case above matches one of these; the first it matches ends its stream.
    let sentinels = [
        json!({"type":"payment","seq":99,"from":"GABC","to":"GHIJ","asset_code":"USDC","amount":"1000"}),
        json!({"type":"trade","seq":100,"seller":"GHIJ","buyer":"GABC","base_asset_code":"USDC","amount":"1000"}),
    ];
    let mut publisher = Publisher::connect(&server);
    publisher.publish_all(&events);
    publisher.publish_all(&sentinels);

    for (ws, (filters, want)) in consumers.iter_mut().zip(&cases) {
        let got = collect_until(ws, &sentinels);
        let want: Vec<Value> = want
            .iter()
            .map(|seq| events[*seq as usize - 1].clone())
            .collect();
        assert_eq!(got, want, "filters {filters}");
    }
}

#[test]
fn events_before_registration_are_queued_and_matching_ones_delivered_in_order() {
    let server = start(&[]);
    let mut early = consumer(&server);
    let mut publisher = Publisher::connect(&server);
    let queued = vec![
        json!({"type":"payment","n":1,"amount":"500"}),
        json!({"type":"trade","n":2}),
        json!({"type":"payment","n":3,"amount":"5"}),
        json!({"type":"payment","n":4,"amount":"150"}),
        json!({"type":"contract_event","n":5}),
        json!({"type":"payment","n":6,"amount":150.25}),
    ];
    publisher.publish_all(&queued);
    // A client connecting after those events gets none of them.
    let mut late = consumer(&server);

    let filters = json!({"types":["payment"],"account_ids":[],"asset_codes":[],"min_amount":"100"});
    register(&mut early, &filters);
    register(&mut late, &filters);
    for n in [0, 3, 5] {
        assert_eq!(read_json(&mut early), queued[n]);
    }
    let live = json!({"type":"payment","n":7,"amount":"100"});
    publisher.publish(&json!({"type":"trade","n":8}));
    publisher.publish(&live);
    assert_eq!(
        read_json(&mut early),
        live,
        "then live events, still filtered"
    );
    assert_eq!(
        read_json(&mut late),
        live,
        "nothing queued before it connected"
    );
}

#[test]
fn a_full_pre_registration_queue_keeps_the_newest_and_reports_the_drop() {
    let server = start(&["--max-queue-size", "3"]);
    let mut ws = consumer(&server);
    let mut publisher = Publisher::connect(&server);
    let events: Vec<Value> = (1..=5).map(|n| json!({"type":"tick","n":n})).collect();
    publisher.publish_all(&events);
    register(&mut ws, &no_filters());
    for event in &events[2..] {
        assert_eq!(&read_json(&mut ws), event);
    }
    let dropped = read_json(&mut ws);
    assert_eq!(dropped["type"], "dropped", "{dropped}");
    assert_eq!(dropped["count"], 2, "{dropped}");
    let live = json!({"type":"tick","n":6});
    publisher.publish(&live);
    assert_eq!(read_json(&mut ws), live);
}

#[test]
fn registering_again_replaces_the_filters() {
    let server = start(&[]);
    let payments = json!({"types":["payment"],"account_ids":[],"asset_codes":[],"min_amount":""});
    let trades = json!({"types":["trade"],"account_ids":["GABC"],"asset_codes":[],"min_amount":""});
    let mut ws = registered_consumer(&server, &payments);
    let mut publisher = Publisher::connect(&server);
    publisher.publish(&json!({"type":"trade","n":1,"buyer":"GABC"}));
    publisher.publish(&json!({"type":"payment","n":2}));
    assert_eq!(read_json(&mut ws), json!({"type":"payment","n":2}));

    register(&mut ws, &trades);
    publisher.publish(&json!({"type":"payment","n":3}));
    publisher.publish(&json!({"type":"trade","n":4,"buyer":"GXYZ"}));
    publisher.publish(&json!({"type":"trade","n":5,"seller":"GABC"}));
    assert_eq!(
        read_json(&mut ws),
        json!({"type":"trade","n":5,"seller":"GABC"})
    );

    // And back to no filtering at all.
    register(&mut ws, &no_filters());
    publisher.publish(&json!({"type":"payment","n":6}));
    assert_eq!(read_json(&mut ws), json!({"type":"payment","n":6}));
}

#[test]
fn unregistered_clients_are_closed_after_the_registration_timeout() {
    let server = start(&["--registration-timeout", "300ms"]);
    let started = Instant::now();
    let mut silent = consumer(&server);
    let mut registered = registered_consumer(&server, &no_filters());
    let mut other = consumer(&server);
    send_json(&mut other, &json!({"type":"list","id":"l1"}));
    let ack = read_json(&mut other);
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["request"], "list", "{ack}");

    // The silent client: closed with 1008 and a reason about registration.
    let close = loop {
        let message = silent.read().expect("the close frame");
        match message {
            Message::Ping(_) | Message::Pong(_) => {}
            Message::Close(_) => break message,
            other => panic!("expected a close, got {other:?}"),
        }
    };
    let elapsed = started.elapsed();
    let (code, reason) = close_code(&close).expect("a close code");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("registration"), "{reason}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}"
    );

    // Well past the timeout, the other two are still served.
    std::thread::sleep(Duration::from_millis(500));
    let mut publisher = Publisher::connect(&server);
    let event = json!({"type":"payment","amount":"1"});
    publisher.publish(&event);
    assert_eq!(read_json(&mut registered), event);
    send_json(&mut other, &json!({"type":"list","id":"l2"}));
    let ack = read_json(&mut other);
    assert_eq!(ack["id"], "l2", "{ack}");
    // The channels client is not an event consumer: the event never reached it.
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[test]
fn invalid_registrations_name_the_field_and_keep_the_connection() {
    let server = start(&[]);
    let mut ws = consumer(&server);
    let bad = [
        (
            json!({"types":"payment","account_ids":[],"asset_codes":[],"min_amount":""}),
            "filters.types",
        ),
        (
            json!({"types":["payment", 7],"account_ids":[],"asset_codes":[],"min_amount":""}),
            "filters.types",
        ),
        (
            json!({"types":[],"account_ids":"GABC","asset_codes":[],"min_amount":""}),
            "filters.account_ids",
        ),
        (
            json!({"types":[],"account_ids":[],"asset_codes":{"code":"USDC"},"min_amount":""}),
            "filters.asset_codes",
        ),
        (
            json!({"types":[],"account_ids":[],"asset_codes":[],"min_amount":"ten"}),
            "filters.min_amount",
        ),
        (
            json!({"types":[],"account_ids":[],"asset_codes":[],"min_amount":true}),
            "filters.min_amount",
        ),
        (
            json!({"types":[],"account_ids":[],"asset_codes":[],"min_amount":"","typo":[]}),
            "filters.typo",
        ),
        (json!(["payment"]), "filters"),
    ];
    for (i, (filters, field)) in bad.iter().enumerate() {
        send_json(
            &mut ws,
            &json!({"type":"register","id":i,"filters":filters}),
        );
        let reply = read_json(&mut ws);
        assert_error(&reply, "invalid_field", field);
        assert_eq!(reply["id"], json!(i), "{reply}");
    }
    // Nothing was registered: no events yet.
    let mut publisher = Publisher::connect(&server);
    publisher.publish(&json!({"type":"payment","n":1}));

    let filters = json!({"types":["payment"],"account_ids":[],"asset_codes":[],"min_amount":"10"});
    register(&mut ws, &filters);
    // The event published while unregistered was queued and matches.
    assert_eq!(read_json(&mut ws), json!({"type":"payment","n":1}));
    publisher.publish(&json!({"type":"payment","n":2,"amount":"9.99"}));
    publisher.publish(&json!({"type":"payment","n":3,"amount":"10"}));
    assert_eq!(
        read_json(&mut ws),
        json!({"type":"payment","n":3,"amount":"10"})
    );
}

#[test]
fn only_trusted_publishers_publish_events_and_events_need_a_string_type() {
    let server = start(&[]);
    let mut ws = registered_consumer(&server, &no_filters());
    let mut public = consumer(&server);
    let attempt = json!({"type":"publish","channel":"events","id":"p","data":{"type":"payment","amount":"1000000"}});

    // Before any trusted publish the channel does not exist for the public.
    send_json(&mut public, &attempt);
    let reply = read_json(&mut public);
    assert_eq!(reply["type"], "error", "{reply}");
    let code = reply["code"].as_str().unwrap_or_default();
    assert!(code == "forbidden" || code == "not_found", "{reply}");

    let mut publisher = Publisher::connect(&server);
    let first = json!({"type":"payment","n":1});
    publisher.publish(&first);
    assert_eq!(read_json(&mut ws), first);

    // Now it exists, and is still not theirs to publish to.
    send_json(&mut public, &attempt);
    assert_error(&read_json(&mut public), "forbidden", "trusted");
    send_json(
        &mut public,
        &json!({"type":"notify","channel":"events","data":{"type":"payment"}}),
    );
    let reply = read_json(&mut public);
    assert_eq!(reply["code"], "forbidden", "{reply}");

    // A trusted publisher must send an object with a string `type`.
    for data in [
        json!({"amount":"5"}),
        json!({"type":5}),
        json!({"type":null}),
        json!({"type":["payment"]}),
        json!("payment"),
        json!([{"type":"payment"}]),
        json!(null),
    ] {
        let reply = publisher.request(&data);
        assert_error(&reply, "invalid_field", "data");
    }
    let last = json!({"type":"payment","n":2});
    publisher.publish(&last);
    assert_eq!(
        read_json(&mut ws),
        last,
        "nothing rejected reached the consumer"
    );
}

/// A JSON number is compared "exactly as decimals": digits beyond f64's
/// precision must count, and the event must reach consumers unchanged.
#[test]
fn json_number_amounts_compare_exactly_and_are_forwarded_unchanged() {
    let server = start(&[]);
    let filters = json!({"types":[],"account_ids":[],"asset_codes":[],"min_amount":"100"});
    let mut ws = registered_consumer(&server, &filters);
    let mut all = registered_consumer(&server, &no_filters());
    let mut publisher = Publisher::connect(&server);
    // 99.99999999999999999 rounds to 100.0 as an f64.
    let below = r#"{"type":"publish","channel":"events","id":1,"data":{"type":"payment","n":1,"amount":99.99999999999999999}}"#;
    publisher.ws.send(Message::Text(below.into())).unwrap();
    let ack = read_json(&mut publisher.ws);
    assert_eq!(ack["type"], "ack", "{ack}");
    let text = read_text(&mut all);
    let sentinel = json!({"type":"payment","n":2,"amount":"100"});
    publisher.publish(&sentinel);
    assert_eq!(read_json(&mut all), sentinel);
    let mut problems = Vec::new();
    if !text.contains("99.99999999999999999") {
        problems.push(format!(
            "the amount's digits were changed on the way: {text}"
        ));
    }
    let first = read_json(&mut ws);
    if first != sentinel {
        problems.push(format!(
            "amount 99.99999999999999999 passed min_amount \"100\": got {first}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("; "));
}

/// A raw-socket `/ws` client (so it can stop reading), registered with no filters.
fn raw_registered_consumer(addr: SocketAddr) -> TcpStream {
    let mut stream = connect_tcp(addr);
    let head = "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    let response = read_http_head(&mut stream);
    assert!(response.starts_with("HTTP/1.1 101"), "{response}");
    let welcome = read_frame(&mut stream).expect("welcome");
    assert_eq!(welcome.payload, WELCOME.as_bytes());
    let register = register_message(&no_filters()).to_string();
    stream
        .write_all(&client_frame(0x81, register.as_bytes()))
        .unwrap();
    let registered = read_frame(&mut stream).expect("registered");
    let registered: Value = serde_json::from_slice(&registered.payload).unwrap();
    assert_eq!(registered["type"], "registered", "{registered}");
    stream
}

/// How a raw reader's stream ended.
#[derive(Debug)]
enum Ending {
    Close(u16, String),
    Eof,
    Silence,
}

/// Reads event frames (checking `seq` counts up from 0) until the stream ends.
fn read_events_to_end(stream: &mut TcpStream) -> (u64, Ending) {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut next = 0u64;
    loop {
        let frame = match read_frame_or_why(stream) {
            Ok(frame) => frame,
            Err(ending) => return (next, ending),
        };
        match frame.opcode() {
            1 => {
                let event: Value = serde_json::from_slice(&frame.payload).unwrap();
                assert_eq!(event["seq"], next, "events out of order or missing");
                next += 1;
            }
            8 => {
                return (
                    next,
                    Ending::Close(frame.close_code().unwrap_or(0), frame.close_reason()),
                )
            }
            9 | 10 => {}
            other => panic!("unexpected opcode {other}"),
        }
    }
}

/// Like `read_frame`, but tells a timeout from the end of the connection.
fn read_frame_or_why(stream: &mut TcpStream) -> Result<ServerFrame, Ending> {
    let mut head = [0u8; 2];
    read_exact_or_why(stream, &mut head)?;
    let len = match head[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            read_exact_or_why(stream, &mut b)?;
            usize::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            read_exact_or_why(stream, &mut b)?;
            u64::from_be_bytes(b) as usize
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    read_exact_or_why(stream, &mut payload)?;
    Ok(ServerFrame {
        b0: head[0],
        payload,
    })
}

fn read_exact_or_why(stream: &mut TcpStream, buf: &mut [u8]) -> Result<(), Ending> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(Ending::Eof),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                return Err(Ending::Silence)
            }
            // A reset after the server gave up on the connection.
            Err(_) => return Err(Ending::Eof),
        }
    }
    Ok(())
}

#[test]
fn a_registered_consumer_that_stops_reading_is_closed_and_others_get_everything() {
    const EVENTS: u64 = 12_000;
    const BATCH: u64 = 40;
    let server = start(&["--max-outbound-buffer", "64KiB"]);
    let mut slow = raw_registered_consumer(server.addr);
    let mut good = registered_consumer(&server, &no_filters());
    let reader = std::thread::spawn(move || {
        for seq in 0..EVENTS {
            let event = read_json(&mut good);
            assert_eq!(event["seq"], seq, "the reading consumer missed an event");
        }
        good
    });

    let mut publisher = Publisher::connect(&server);
    let pad = "x".repeat(1000);
    let started = Instant::now();
    for batch in 0..EVENTS / BATCH {
        for i in 0..BATCH {
            let seq = batch * BATCH + i;
            let request = json!({"type":"publish","channel":"events","data":{"type":"tick","seq":seq,"pad":pad}});
            publisher
                .ws
                .write(Message::Text(request.to_string()))
                .unwrap();
        }
        publisher.ws.flush().unwrap();
        for _ in 0..BATCH {
            let ack = read_json(&mut publisher.ws);
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "publishing is too slow"
        );
    }
    let _good = reader.join().expect("the reading consumer got every event");

    let (received, ending) = read_events_to_end(&mut slow);
    eprintln!("slow consumer: {received} of {EVENTS} events, then {ending:?}");
    assert!(
        received < EVENTS,
        "the slow consumer got everything ({ending:?})"
    );
    match ending {
        Ending::Close(code, reason) => {
            assert_eq!(code, 1008, "{reason}");
            assert!(reason.contains("slow consumer"), "{reason}");
        }
        Ending::Eof => {}
        Ending::Silence => panic!("the slow consumer was left open after {received} events"),
    }
}

#[test]
fn a_registered_client_that_answers_pings_stays_connected() {
    let server = start(&["--ping-interval", "200ms", "--idle-timeout", "1s"]);
    let mut ws = registered_consumer(&server, &no_filters());
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_secs(2) {
        // `read` queues and flushes the pong for every ping.
        match ws.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(tungstenite::Error::Io(e))
                if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
            Err(e) => panic!("connection lost after {:?}: {e}", started.elapsed()),
        }
    }
    assert!(pings >= 3, "only {pings} pings in 2 s at a 200 ms interval");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut publisher = Publisher::connect(&server);
    let event = json!({"type":"payment","n":1});
    publisher.publish(&event);
    assert_eq!(read_json(&mut ws), event);

    // A registered client that never answers is closed for idleness.
    let mut mute = raw_registered_consumer(server.addr);
    let started = Instant::now();
    let close = read_until_close(&mut mute);
    assert_eq!(close.close_code(), Some(1008), "{}", close.close_reason());
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}"
    );
}

/// The registration protocol's own first example (`contract_event`s in
/// USDC) receives the simulator's token events, whose asset is only in
/// `topics`, within seconds; `min_amount` reads their `data.amount`.
#[test]
fn contract_events_match_asset_codes_through_their_topics() {
    let server = start(&["--sim-seed", "7", "--sim-events-per-sec", "50"]);
    let filters = json!({"types": ["contract_event"], "account_ids": [], "asset_codes": ["USDC"], "min_amount": "100"});
    let mut ws = registered_consumer(&server, &filters);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = 0;
    while seen < 5 {
        assert!(
            Instant::now() < deadline,
            "only {seen} USDC contract events of 100 or more within 20 s"
        );
        let event = read_json(&mut ws);
        assert_eq!(event["type"], "contract_event", "{event}");
        let topics = event["topics"].as_array().expect("topics");
        assert_eq!(topics.last().unwrap(), "USDC", "{event}");
        let amount: f64 = event["data"]["amount"].as_str().unwrap().parse().unwrap();
        assert!(amount >= 100.0, "{event}");
        seen += 1;
    }
    server.stop().unwrap();
}
