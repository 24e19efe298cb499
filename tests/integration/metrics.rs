//! `GET /metrics` (Prometheus text) and `GET /readyz` on a real server.

use crate::support::common;

use std::collections::HashMap;

use common::*;
use tungstenite::Message;

/// Parses the exposition into `name{labels}` → value, checking that every
/// sample line belongs to a family announced with HELP and TYPE.
fn scrape(server: &TestServer) -> HashMap<String, f64> {
    let response = http_exchange(server.addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let mut typed = std::collections::HashSet::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "counter" || kind == "gauge", "{line}");
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let family = key.split('{').next().unwrap();
        assert!(typed.contains(family), "sample before its TYPE: {line}");
        samples.insert(
            key.to_owned(),
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        );
    }
    samples
}

#[test]
fn metrics_count_traffic_refusals_and_connections() {
    let server = TestServer::start(&["--internal-listen", "127.0.0.1:0"]);
    let before = scrape(&server);
    assert_eq!(before["fanout_handshakes_accepted_total"], 0.0);

    let mut echo = server.client("/echo");
    for i in 0..5 {
        echo.send(Message::Text(format!("m{i}"))).unwrap();
        echo.read().unwrap();
    }
    let mut ws = server.client("/ws");
    ws.read().unwrap(); // welcome
    let mut internal = tungstenite::client(
        format!("ws://{}/ws", server.addrs[1]),
        connect_tcp(server.addrs[1]),
    )
    .unwrap()
    .0;
    internal.read().unwrap();
    assert!(
        http_exchange(server.addr, b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
            .starts_with("HTTP/1.1 404")
    );

    let after = scrape(&server);
    assert_eq!(after["fanout_handshakes_accepted_total"], 3.0);
    assert_eq!(
        after["fanout_handshakes_rejected_total{status=\"404\"}"],
        1.0
    );
    assert_eq!(
        after["fanout_connections{listener=\"public\",endpoint=\"echo\"}"],
        1.0
    );
    assert_eq!(
        after["fanout_connections{listener=\"public\",endpoint=\"ws\"}"],
        1.0
    );
    assert_eq!(
        after["fanout_connections{listener=\"internal\",endpoint=\"ws\"}"],
        1.0
    );
    assert!(after["fanout_messages_in_total"] >= 5.0);
    assert!(after["fanout_bytes_out_total"] > before["fanout_bytes_out_total"]);
    assert!(after["fanout_loop_iterations_total"] > before["fanout_loop_iterations_total"]);
    for family in [
        "fanout_slow_consumer_drops_total{stream=\"channel\"}",
        "fanout_slow_consumer_closes_total",
        "fanout_delivery_drops_total",
        "fanout_state_updates_total{outcome=\"conflated\"}",
        "fanout_held_states",
        "fanout_outbound_queued_bytes",
        "fanout_loop_busy_seconds_total",
        "fanout_market_trades_total",
    ] {
        assert!(after.contains_key(family), "missing {family}");
    }
    drop((echo, ws, internal));
    server.stop().unwrap();
}

#[test]
fn readyz_answers_ready() {
    let server = TestServer::start(&[]);
    let response = http_exchange(server.addr, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("ready\n"), "{response}");
    server.stop().unwrap();
}

#[test]
fn metrics_internal_only_refuses_public_listeners_with_403() {
    let server = TestServer::start(&[
        "--internal-listen",
        "127.0.0.1:0",
        "--metrics-internal-only",
    ]);
    let (public, internal) = (server.addrs[0], server.addrs[1]);
    let request = b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n";
    let refused = http_exchange(public, request);
    assert!(refused.starts_with("HTTP/1.1 403 Forbidden"), "{refused}");
    assert!(
        refused.contains("metrics are served on internal listeners only"),
        "{refused}"
    );
    let served = http_exchange(internal, request);
    assert!(served.starts_with("HTTP/1.1 200 OK"), "{served}");
    assert!(served.contains("fanout_connections"), "{served}");
    // The other plain-HTTP endpoints stay public.
    let health = http_exchange(public, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(health.starts_with("HTTP/1.1 200 OK"), "{health}");
}
