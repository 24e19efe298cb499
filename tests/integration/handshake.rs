//! The opening handshake over real loopback sockets: every rejection path
//! with its status, reason and headers, the size and time limits on the
//! request head, origins, subprotocols, the connection limit, and that one
//! misbehaving client does not hold up the others.

use crate::support::common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// A parsed HTTP response, and how the connection ended after it.
#[derive(Debug)]
struct Response {
    status_line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The server closed the connection (EOF or reset) rather than our
    /// read timing out.
    closed: bool,
}

impl Response {
    fn status(&self) -> u16 {
        self.status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads everything until the server closes (or the 5 s socket timeout),
/// and parses it as one HTTP response.
fn read_response(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    for _ in 0..10_000 {
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => break,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    parse_response(&raw, closed)
}

fn parse_response(raw: &[u8], closed: bool) -> Response {
    let text = String::from_utf8_lossy(raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete HTTP head in {text:?}"));
    let head = std::str::from_utf8(&raw[..split]).expect("head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("bad header line {line:?}"));
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    Response {
        status_line,
        headers,
        body: raw[split + 4..].to_vec(),
        closed,
    }
}

/// Sends `request` on a fresh connection and reads the response.
fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = connect_tcp(addr);
    stream.write_all(request).unwrap();
    read_response(&mut stream)
}

/// Checks a rejection: status, reason in a plain-text body whose length
/// matches Content-Length, `Connection: close`, and the server hung up.
fn assert_rejection(response: &Response, status: u16, reason: &str) {
    assert_eq!(response.status(), status, "{response:?}");
    assert!(
        response
            .status_line
            .starts_with(&format!("HTTP/1.1 {status} ")),
        "{response:?}"
    );
    let body = response.body_text();
    assert!(
        body.contains(reason),
        "expected reason {reason:?} in body {body:?}"
    );
    assert!(body.ends_with('\n'), "one-line body: {body:?}");
    let length: usize = response
        .header("Content-Length")
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(
        length,
        response.body.len(),
        "Content-Length must match the body: {response:?}"
    );
    assert!(
        response
            .header("Content-Type")
            .unwrap_or_default()
            .starts_with("text/plain"),
        "{response:?}"
    );
    assert_eq!(
        response
            .header("Connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close")
    );
    assert!(
        response.closed,
        "server must close the connection after a rejection: {response:?}"
    );
}

const GOOD: &str = UPGRADE_HEAD;

/// The good upgrade request with one substitution.
fn replace(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from:?} not in the request");
    GOOD.replacen(from, to, 1)
}

/// The good upgrade request with extra header lines before the blank line.
fn with_headers(extra: &str) -> String {
    replace(
        "Sec-WebSocket-Version: 13\r\n",
        &format!("Sec-WebSocket-Version: 13\r\n{extra}"),
    )
}

/// Sends an upgrade request on a fresh connection and returns the socket
/// with the response head read, if it was a 101; otherwise the response.
fn try_upgrade(addr: SocketAddr, request: &str) -> Result<(TcpStream, String), Response> {
    let mut stream = connect_tcp(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    if head.starts_with("HTTP/1.1 101") {
        return Ok((stream, head));
    }
    let mut rest = Vec::new();
    let mut closed = false;
    match stream.read_to_end(&mut rest) {
        Ok(_) => closed = true,
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
        Err(_) => closed = true,
    }
    let mut raw = head.into_bytes();
    raw.extend_from_slice(&rest);
    Err(parse_response(&raw, closed))
}

fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// One echo round trip on an upgraded raw socket.
fn assert_echo(stream: &mut TcpStream, text: &str) {
    stream
        .write_all(&client_frame(0x81, text.as_bytes()))
        .unwrap();
    let frame = read_frame(stream).expect("echo reply");
    assert_eq!(frame.opcode(), 1, "{frame:?}");
    assert_eq!(frame.payload, text.as_bytes());
}

/// An echo round trip, then a clean close.
fn echo_and_close(stream: &mut TcpStream, text: &str) {
    assert_echo(stream, text);
    close_cleanly(stream);
}

/// Completes the closing handshake from the client side.
fn close_cleanly(stream: &mut TcpStream) {
    stream
        .write_all(&client_frame(0x88, &1000u16.to_be_bytes()))
        .unwrap();
    let reply = read_until_close(stream);
    assert_eq!(reply.close_code(), Some(1000));
    assert!(
        wait_for_eof(stream, Duration::from_secs(3)),
        "server did not close TCP after the close handshake"
    );
}

#[test]
fn every_rejection_path_over_a_raw_socket() {
    let server = TestServer::start(&[]);
    let cases: Vec<(String, u16, &str)> = vec![
        (
            "GET /nope HTTP/1.1\r\nHost: test\r\n\r\n".into(),
            404,
            "no endpoint at /nope",
        ),
        (
            GOOD.replacen("/echo", "/echo/", 1),
            404,
            "no endpoint at /echo/",
        ),
        (
            replace("GET", "POST"),
            405,
            "a WebSocket handshake must use GET",
        ),
        (
            replace("HTTP/1.1", "HTTP/1.0"),
            400,
            "a WebSocket handshake requires HTTP/1.1",
        ),
        (replace("Host: test\r\n", ""), 400, "missing Host header"),
        (
            replace("Host: test\r\n", "Host: \r\n"),
            400,
            "missing Host header",
        ),
        (
            replace("Upgrade: websocket", "Upgrade: h2c"),
            400,
            "Upgrade header must contain the token websocket",
        ),
        (
            replace("Connection: Upgrade", "Connection: keep-alive"),
            400,
            "Connection header must contain the token upgrade",
        ),
        (
            replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            400,
            "missing Sec-WebSocket-Key header",
        ),
        (
            replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="),
            400,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ),
        (
            replace("dGhlIHNhbXBsZSBub25jZQ==", "not base64!"),
            400,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ),
        (
            with_headers("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
            400,
            "more than one Sec-WebSocket-Key header",
        ),
        (
            "GET / HTTP/1.1\r\nHost\r\n\r\n".into(),
            400,
            "malformed HTTP request",
        ),
        (
            "\x01\x02 garbage\r\n\r\n".into(),
            400,
            "malformed HTTP request",
        ),
        (
            format!("GET /echo HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(65)),
            431,
            "too many request headers (at most 64)",
        ),
    ];
    for (request, status, reason) in cases {
        let response = exchange(server.addr, request.as_bytes());
        assert_rejection(&response, status, reason);
    }

    // A header value that is not UTF-8 (httparse lets obs-text through).
    let mut request = with_headers("X-Name: caf\r\n").into_bytes();
    let at = request.windows(3).position(|w| w == b"caf").unwrap() + 3;
    request.insert(at, 0xE9);
    assert_rejection(
        &exchange(server.addr, &request),
        400,
        "header X-Name is not valid UTF-8",
    );
    server.stop().unwrap();
}

#[test]
fn status_426_advertises_the_version_and_upgrade() {
    let server = TestServer::start(&[]);

    let plain = exchange(server.addr, b"GET /echo HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_rejection(
        &plain,
        426,
        "this path speaks WebSocket: send an Upgrade: websocket request",
    );
    assert_eq!(plain.status_line, "HTTP/1.1 426 Upgrade Required");
    assert_eq!(plain.header("Sec-WebSocket-Version"), Some("13"));
    assert_eq!(plain.header("Upgrade"), Some("websocket"));

    for request in [
        replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
        replace("Sec-WebSocket-Version: 13\r\n", ""),
    ] {
        let response = exchange(server.addr, request.as_bytes());
        assert_rejection(
            &response,
            426,
            "unsupported Sec-WebSocket-Version: this server speaks version 13",
        );
        assert_eq!(
            response.header("Sec-WebSocket-Version"),
            Some("13"),
            "{response:?}"
        );
    }
    server.stop().unwrap();
}

#[test]
fn status_405_carries_allow_get() {
    let server = TestServer::start(&[]);
    for method in ["POST", "PUT", "DELETE"] {
        let response = exchange(server.addr, replace("GET", method).as_bytes());
        assert_rejection(&response, 405, "a WebSocket handshake must use GET");
        assert_eq!(response.status_line, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(response.header("Allow"), Some("GET"));
    }
    server.stop().unwrap();
}

/// The plain paths answer `GET` and `HEAD` (the head alone, with the
/// body's length), in HTTP/1.1 and 1.0 alike, and refuse every other
/// method with `405` and `Allow: GET, HEAD`.
#[test]
fn plain_paths_answer_get_and_head_and_refuse_other_methods() {
    let server = TestServer::start(&[]);
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        for version in ["1.1", "1.0"] {
            let get = format!("GET {path} HTTP/{version}\r\nHost: test\r\n\r\n");
            let response = exchange(server.addr, get.as_bytes());
            assert_eq!(
                response.status_line, "HTTP/1.1 200 OK",
                "GET {path} {version}"
            );
            let length: usize = response.header("Content-Length").unwrap().parse().unwrap();
            assert!(length > 0 && response.body.len() == length, "{response:?}");

            let head = get.replacen("GET", "HEAD", 1);
            let response = exchange(server.addr, head.as_bytes());
            assert_eq!(
                response.status_line, "HTTP/1.1 200 OK",
                "HEAD {path} {version}"
            );
            assert!(response.body.is_empty(), "HEAD {path}: {response:?}");
            assert!(response.header("Content-Length").is_some_and(|l| l != "0"));
            assert!(response.closed);
        }
        for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
            let request =
                format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
            let response = exchange(server.addr, request.as_bytes());
            assert_rejection(&response, 405, &format!("{path} answers GET and HEAD only"));
            assert_eq!(response.header("Allow"), Some("GET, HEAD"));
        }
    }
    // An upgrade needs HTTP/1.1 (RFC 6455 §4.1).
    let response = exchange(server.addr, replace("HTTP/1.1", "HTTP/1.0").as_bytes());
    assert_rejection(&response, 400, "a WebSocket handshake requires HTTP/1.1");
    server.stop().unwrap();
}

#[test]
fn status_431_for_a_complete_oversized_head() {
    let server = TestServer::start(&["--max-header-bytes", "1KiB"]);
    let request = with_headers(&format!("X-Filler: {}\r\n", "a".repeat(1500)));
    let response = exchange(server.addr, request.as_bytes());
    assert_rejection(&response, 431, "request head larger than 1024 bytes");
    assert_eq!(
        response.status_line,
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    // Just under the limit still upgrades.
    let filler = 1000 - GOOD.len();
    let request = with_headers(&format!("X-Filler: {}\r\n", "a".repeat(filler)));
    assert!(request.len() <= 1024);
    let (mut ws, _) = try_upgrade(server.addr, &request).expect("a head under the limit upgrades");
    echo_and_close(&mut ws, "fits");
    server.stop().unwrap();
}

#[test]
fn status_431_for_a_never_ending_head() {
    let server = TestServer::start(&["--max-header-bytes", "1KiB"]);
    let mut stream = connect_tcp(server.addr);
    let started = Instant::now();
    // Header lines but never the blank line: the server must not wait for it.
    let mut sent = b"GET /echo HTTP/1.1\r\nHost: test\r\n".to_vec();
    while sent.len() <= 1500 {
        sent.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    stream.write_all(&sent).unwrap();
    let response = read_response(&mut stream);
    assert_rejection(&response, 431, "request head larger than 1024 bytes");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "431 took {:?}",
        started.elapsed()
    );

    // One endless line, no line breaks at all.
    let mut stream = connect_tcp(server.addr);
    stream.write_all(&[b'A'; 1100]).unwrap();
    assert_rejection(
        &read_response(&mut stream),
        431,
        "request head larger than 1024 bytes",
    );
    server.stop().unwrap();
}

#[test]
fn status_408_for_a_slowloris_half_request() {
    let server = TestServer::start(&["--handshake-timeout", "300ms"]);
    let mut stream = connect_tcp(server.addr);
    let started = Instant::now();
    stream
        .write_all(&GOOD.as_bytes()[..GOOD.len() / 2])
        .unwrap();
    let response = read_response(&mut stream);
    let elapsed = started.elapsed();
    assert_rejection(&response, 408, "handshake not completed within 300ms");
    assert_eq!(response.status_line, "HTTP/1.1 408 Request Timeout");
    assert!(
        elapsed >= Duration::from_millis(250),
        "408 came too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "408 came too late: {elapsed:?}"
    );
    server.stop().unwrap();
}

#[test]
fn status_408_for_a_client_that_sends_nothing() {
    let server = TestServer::start(&["--handshake-timeout", "300ms"]);
    let mut stream = connect_tcp(server.addr);
    let started = Instant::now();
    let response = read_response(&mut stream);
    let elapsed = started.elapsed();
    assert_rejection(&response, 408, "handshake not completed within 300ms");
    assert!(
        elapsed >= Duration::from_millis(250),
        "408 came too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "408 came too late: {elapsed:?}"
    );
    server.stop().unwrap();
}

#[test]
fn dribbled_request_completing_in_time_is_accepted() {
    let server = TestServer::start(&["--handshake-timeout", "2s"]);
    let mut stream = connect_tcp(server.addr);
    for chunk in GOOD.as_bytes().chunks(17) {
        stream.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    echo_and_close(&mut stream, "slow but fine");
    server.stop().unwrap();
}

#[test]
fn origin_allow_list() {
    let server = TestServer::start(&["--allowed-origin", "https://good.example"]);
    let response = exchange(
        server.addr,
        with_headers("Origin: https://evil.example\r\n").as_bytes(),
    );
    assert_rejection(&response, 403, "origin https://evil.example is not allowed");
    assert_eq!(response.status_line, "HTTP/1.1 403 Forbidden");

    let (mut ws, _) = try_upgrade(
        server.addr,
        &with_headers("Origin: https://good.example\r\n"),
    )
    .expect("allowed origin");
    echo_and_close(&mut ws, "good origin");
    let (mut ws, _) = try_upgrade(
        server.addr,
        &with_headers("Origin: HTTPS://GOOD.EXAMPLE\r\n"),
    )
    .expect("origin case");
    echo_and_close(&mut ws, "case-insensitive origin");
    let (mut ws, _) = try_upgrade(server.addr, GOOD).expect("no Origin: not a browser");
    echo_and_close(&mut ws, "no origin");
    server.stop().unwrap();
}

#[test]
fn subprotocol_negotiation() {
    let server = TestServer::start(&["--subprotocol", "chat", "--subprotocol", "json"]);
    let (mut ws, head) = try_upgrade(
        server.addr,
        &with_headers("Sec-WebSocket-Protocol: mqtt, json\r\n"),
    )
    .expect("upgrade");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Protocol"),
        Some("json"),
        "{head}"
    );
    echo_and_close(&mut ws, "json");

    // The client's preference order decides.
    let (_, head) = try_upgrade(
        server.addr,
        &with_headers("Sec-WebSocket-Protocol: json, chat\r\n"),
    )
    .expect("upgrade");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Protocol"),
        Some("json"),
        "{head}"
    );
    // Offers split over several header lines are one list.
    let (_, head) = try_upgrade(
        server.addr,
        &with_headers("Sec-WebSocket-Protocol: mqtt\r\nSec-WebSocket-Protocol: chat\r\n"),
    )
    .expect("upgrade");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Protocol"),
        Some("chat"),
        "{head}"
    );

    let (mut ws, head) = try_upgrade(
        server.addr,
        &with_headers("Sec-WebSocket-Protocol: mqtt, stomp\r\n"),
    )
    .expect("upgrade");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Protocol"),
        None,
        "no match, no header: {head}"
    );
    echo_and_close(&mut ws, "no subprotocol");
    let (_, head) = try_upgrade(server.addr, GOOD).expect("upgrade");
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Protocol"),
        None,
        "no offer, no header: {head}"
    );
    server.stop().unwrap();
}

#[test]
fn status_503_at_the_connection_limit_and_recovery() {
    let server = TestServer::start(&["--max-connections", "2"]);
    let mut first = raw_upgrade(server.addr);
    let mut second = raw_upgrade(server.addr);
    assert_echo(&mut first, "one");
    assert_echo(&mut second, "two");

    let response = try_upgrade(server.addr, GOOD).expect_err("third WebSocket must be refused");
    assert_rejection(&response, 503, "connection limit of 2 reached");
    assert_eq!(response.status_line, "HTTP/1.1 503 Service Unavailable");

    // Plain HTTP does not count against the WebSocket limit.
    let health = exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(health.status(), 200, "{health:?}");

    close_cleanly(&mut first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut third = loop {
        match try_upgrade(server.addr, GOOD) {
            Ok((stream, _)) => break stream,
            Err(response) => {
                assert_eq!(response.status(), 503, "{response:?}");
                assert!(
                    Instant::now() < deadline,
                    "a slot never freed up after closing a WebSocket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_echo(&mut third, "three");
    assert_echo(&mut second, "still two");
    let response = try_upgrade(server.addr, GOOD).expect_err("limit is reached again");
    assert_rejection(&response, 503, "connection limit of 2 reached");

    // A client dropping TCP without a close frame also frees its slot.
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut fourth = loop {
        match try_upgrade(server.addr, GOOD) {
            Ok((stream, _)) => break stream,
            Err(response) => {
                assert_eq!(response.status(), 503, "{response:?}");
                assert!(
                    Instant::now() < deadline,
                    "a dropped client's slot never freed up"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    echo_and_close(&mut fourth, "four");
    close_cleanly(&mut third);
    server.stop().unwrap();
}

#[test]
fn frames_in_the_same_packet_as_the_upgrade_are_processed() {
    let server = TestServer::start(&[]);
    let mut stream = connect_tcp(server.addr);
    let mut packet = GOOD.as_bytes().to_vec();
    packet.extend_from_slice(&client_frame(0x81, b"early bird"));
    packet.extend_from_slice(&client_frame(0x82, &[1, 2, 3]));
    stream.write_all(&packet).unwrap();
    let head = read_http_head(&mut stream);
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    assert_eq!(
        head_header(&head, "Sec-WebSocket-Accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let frame = read_frame(&mut stream).expect("echo of the early text frame");
    assert_eq!(
        (frame.b0, frame.payload.as_slice()),
        (0x81, &b"early bird"[..])
    );
    let frame = read_frame(&mut stream).expect("echo of the early binary frame");
    assert_eq!(
        (frame.b0, frame.payload.as_slice()),
        (0x82, &[1u8, 2, 3][..])
    );
    close_cleanly(&mut stream);

    // A close frame riding along with the request is honoured too.
    let mut stream = connect_tcp(server.addr);
    let mut packet = GOOD.as_bytes().to_vec();
    packet.extend_from_slice(&client_frame(0x81, b"bye"));
    packet.extend_from_slice(&client_frame(0x88, &1000u16.to_be_bytes()));
    stream.write_all(&packet).unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let frame = read_frame(&mut stream).expect("echo");
    assert_eq!(frame.payload, b"bye");
    assert_eq!(read_until_close(&mut stream).close_code(), Some(1000));
    assert!(wait_for_eof(&mut stream, Duration::from_secs(3)));
    server.stop().unwrap();
}

#[test]
fn healthz_and_query_strings() {
    let server = TestServer::start(&[]);
    for path in ["/healthz", "/healthz?probe=1"] {
        let response = exchange(
            server.addr,
            format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
        );
        assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{response:?}");
        assert_eq!(response.body_text(), "ok\n");
        assert_eq!(response.header("Content-Length"), Some("3"));
        assert!(response.closed, "server closes after /healthz");
    }

    let (mut ws, _) =
        try_upgrade(server.addr, &replace("GET /echo ", "GET /echo?x=1 ")).expect("query ignored");
    echo_and_close(&mut ws, "query");
    let (mut ws, _) = try_upgrade(
        server.addr,
        &replace("GET /echo ", "GET /echo?x=1&y=/nope#frag "),
    )
    .expect("query");
    echo_and_close(&mut ws, "query and fragment");

    let response = exchange(
        server.addr,
        b"GET /nope?echo HTTP/1.1\r\nHost: test\r\n\r\n",
    );
    assert_rejection(&response, 404, "no endpoint at /nope");
    assert!(
        !response.body_text().contains('?'),
        "the reason names the path without the query"
    );
    server.stop().unwrap();
}

#[test]
fn server_keeps_serving_while_others_misbehave() {
    let server = TestServer::start(&["--max-header-bytes", "4KiB"]);

    // A client halfway through its request, one that sent nothing, and one
    // that has been told 431 but keeps its socket open without reading.
    let mut half = connect_tcp(server.addr);
    half.write_all(&GOOD.as_bytes()[..40]).unwrap();
    let silent = connect_tcp(server.addr);
    let mut oversized = connect_tcp(server.addr);
    oversized.write_all(&[b'x'; 5000]).unwrap();
    // A WebSocket that sends half a frame and stops.
    let mut stalled = raw_upgrade(server.addr);
    let frame = client_frame(0x81, b"never finished");
    stalled.write_all(&frame[..5]).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    for round in 0..3 {
        let started = Instant::now();
        let mut ws = raw_upgrade(server.addr);
        assert_echo(&mut ws, &format!("round {round}"));
        let health = exchange(server.addr, b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n");
        assert_eq!(health.status(), 200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "served slowly: {:?}",
            started.elapsed()
        );
        close_cleanly(&mut ws);
    }
    let mut client = server.client("/echo");
    client
        .send(tungstenite::Message::Text("tungstenite too".into()))
        .unwrap();
    assert_eq!(
        client.read().unwrap(),
        tungstenite::Message::Text("tungstenite too".into())
    );

    // The slow ones were only waiting: each still gets its proper outcome.
    half.write_all(&GOOD.as_bytes()[40..]).unwrap();
    let head = read_http_head(&mut half);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_echo(&mut half, "finished late");
    assert_rejection(
        &read_response(&mut oversized),
        431,
        "request head larger than 4096 bytes",
    );
    stalled.write_all(&frame[5..]).unwrap();
    let echoed = read_frame(&mut stalled).expect("echo of the completed frame");
    assert_eq!(echoed.payload, b"never finished");
    close_cleanly(&mut stalled);
    close_cleanly(&mut half);
    client.close(None).unwrap();
    for _ in 0..10 {
        if client.read().is_err() {
            break;
        }
    }
    drop(silent);
    server.stop().unwrap();
}

/// The README's table of HTTP statuses, row by row: every status it lists
/// is produced by a request for each case its row names, and no status is
/// probed that the table does not list.
#[test]
fn every_row_of_the_readme_status_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let table = readme
        .split("### HTTP statuses")
        .nth(1)
        .expect("a section `### HTTP statuses` in README.md");
    let listed: Vec<u16> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.trim_start_matches("| `").get(..3)?.parse().ok())
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let cert = crate::support::tls::TestCert::generate(dir.path(), "status");
    let plain = TestServer::start(&["--internal-listen", "127.0.0.1:0"]);
    let strict = TestServer::start(&[
        "--allowed-origin",
        "https://allowed.example",
        "--metrics-internal-only",
        "--internal-listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1s",
        "--max-connections",
        "1",
    ]);
    let tls = TestServer::start(&["--tls-cert", cert.cert(), "--tls-key", cert.key()]);
    let secret = dir.path().join("token-secret");
    std::fs::write(&secret, "sesame").unwrap();
    let token_only = TestServer::start(&[
        "--require-token",
        "--token-secret-file",
        secret.to_str().unwrap(),
    ]);
    // A Redis link that can never come up: not ready.
    let unready = TestServer::start(&[
        "--redis",
        &format!(
            "redis://127.0.0.1:{}",
            crate::support::redis_server::free_port()
        ),
    ]);

    let get = |path: &str, version: &str| format!("GET {path} HTTP/{version}\r\nHost: t\r\n\r\n");
    // 101
    let mut open = raw_upgrade(plain.addr);
    close_cleanly(&mut open);
    let mut probed = vec![101];
    let mut probe = |status: u16, addr: SocketAddr, request: String, what: &str| {
        let response = exchange(addr, request.as_bytes());
        assert_eq!(response.status(), status, "{what}: {response:?}");
        probed.push(status);
        response
    };

    // 200
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        for version in ["1.1", "1.0"] {
            probe(200, plain.addr, get(path, version), "GET of a plain path");
            let head = get(path, version).replacen("GET", "HEAD", 1);
            probe(200, plain.addr, head, "HEAD of a plain path");
        }
    }
    // 400
    for request in [
        "\x01\x02 garbage\r\n\r\n".to_owned(),
        replace("HTTP/1.1", "HTTP/1.0"),
        replace("Host: test\r\n", ""),
        replace("Upgrade: websocket", "Upgrade: h2c"),
        replace("Connection: Upgrade", "Connection: keep-alive"),
        replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
        with_headers("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n"),
        replace("dGhlIHNhbXBsZSBub25jZQ==", "not base64!"),
    ] {
        probe(400, plain.addr, request, "a bad request");
    }
    probe(
        400,
        tls.addr,
        get("/healthz", "1.1"),
        "plain HTTP on a TLS port",
    );
    // 401
    let response = probe(
        401,
        token_only.addr,
        GOOD.to_owned(),
        "no token with --require-token",
    );
    assert_eq!(response.header("WWW-Authenticate"), Some("Bearer"));
    for request in [
        with_headers("Authorization: Bearer not.a.jwt\r\n"),
        with_headers("Authorization: Basic YTpi\r\n"),
        replace("GET /echo", "GET /echo?token=a.b.c"),
    ] {
        probe(401, token_only.addr, request, "a token refused");
    }
    // 403
    let foreign = with_headers("Origin: https://elsewhere.example\r\n");
    probe(403, strict.addr, foreign, "an Origin not allowed");
    probe(
        403,
        strict.addr,
        get("/metrics", "1.1"),
        "/metrics on a public listener",
    );
    probe(
        200,
        strict.addrs[1],
        get("/metrics", "1.1"),
        "/metrics internally",
    );
    // 404
    probe(404, plain.addr, get("/nope", "1.1"), "no endpoint");
    // 405
    let response = probe(405, plain.addr, replace("GET", "POST"), "POST to /echo");
    assert_eq!(response.header("Allow"), Some("GET"));
    for path in ["/", "/healthz", "/readyz", "/metrics"] {
        let request = format!("DELETE {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let response = probe(405, plain.addr, request, "DELETE of a plain path");
        assert_eq!(response.header("Allow"), Some("GET, HEAD"));
    }
    // 408
    probe(
        408,
        strict.addr,
        "GET /ws HTTP/1.1\r\nHo".to_owned(),
        "a head cut short",
    );
    // 426
    probe(426, plain.addr, get("/ws", "1.1"), "a plain GET of /ws");
    let old = replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    probe(426, plain.addr, old, "another WebSocket version");
    // 431
    let huge = with_headers(&format!("X-Big: {}\r\n", "a".repeat(9000)));
    probe(431, plain.addr, huge, "a head over --max-header-bytes");
    let many = format!("GET /echo HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(65));
    probe(431, plain.addr, many, "65 header lines");
    // 503
    let mut only = raw_upgrade(strict.addr);
    probe(503, strict.addr, GOOD.to_owned(), "past --max-connections");
    close_cleanly(&mut only);
    probe(
        503,
        unready.addr,
        get("/readyz", "1.1"),
        "/readyz with Redis down",
    );

    probed.sort_unstable();
    probed.dedup();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort_unstable();
    assert_eq!(
        listed_sorted, probed,
        "the README's status table and the statuses probed here differ"
    );
    for server in [plain, strict, tls, token_only, unready] {
        server.stop().unwrap();
    }
}
