//! The opening handshake (RFC 6455 §4.2): parse an HTTP/1.1 request, decide
//! whether it is an acceptable upgrade, and build the response bytes. No
//! I/O: the caller accumulates request bytes and writes what comes back.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

use super::extensions::{negotiate, DeflateParams, DeflatePolicy};

/// §1.3: the GUID appended to the client's key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How many header lines a request may carry; more is answered with 431.
pub const MAX_HEADERS: usize = 64;

/// The parts of a complete request that routing and validation look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// HTTP minor version: 1 for HTTP/1.1.
    pub minor_version: u8,
    pub host: Option<String>,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub version: Option<String>,
    /// Every `Sec-WebSocket-Key` value seen (more than one is an error).
    pub keys: Vec<String>,
    pub origin: Option<String>,
    /// Subprotocols the client offers, in its order of preference.
    pub protocols: Vec<String>,
    /// Extension offers, raw (negotiated by a later layer).
    pub extensions: Vec<String>,
    /// Every `Authorization` value seen, raw.
    pub authorization: Vec<String>,
    /// Every `token` parameter of the query string, raw.
    pub query_tokens: Vec<String>,
}

impl Request {
    /// True when the client asked for a WebSocket at all, as opposed to a
    /// plain GET that happens to hit a WebSocket path.
    pub fn wants_websocket(&self) -> bool {
        self.upgrade_websocket || !self.keys.is_empty()
    }

    /// The token the client presents: `Authorization: Bearer TOKEN`, or
    /// `?token=TOKEN` for browsers, which cannot set headers on a
    /// WebSocket. A JWT is base64url and dots, so the query value needs no
    /// decoding. Two tokens, or another scheme, is a 401 that says so.
    pub fn bearer_token(&self) -> Result<Option<&str>, Rejection> {
        let mut found: Vec<&str> = self.query_tokens.iter().map(String::as_str).collect();
        for value in &self.authorization {
            let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(unauthorized(
                    "the Authorization header must be `Bearer <token>`",
                ));
            }
            found.push(token.trim());
        }
        match found[..] {
            [] => Ok(None),
            [""] => Err(unauthorized("the token is empty")),
            [token] => Ok(Some(token)),
            _ => Err(unauthorized(
                "more than one token: send one, in Authorization or in ?token=",
            )),
        }
    }
}

/// A 401 with the challenge RFC 6750 §3 asks for.
pub fn unauthorized(reason: impl Into<String>) -> Rejection {
    Rejection::new(401, reason).with_header("WWW-Authenticate", "Bearer")
}

/// A refusal, sent as a complete HTTP response before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub reason: String,
    pub extra_headers: Vec<(&'static str, &'static str)>,
}

impl Rejection {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            extra_headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: &'static str) -> Self {
        self.extra_headers.push((name, value));
        self
    }

    /// The full response: status line, headers and a one-line text body.
    pub fn to_response(&self) -> Vec<u8> {
        let body = format!("{}\n", self.reason);
        http_response(
            self.status,
            &self.extra_headers,
            "text/plain; charset=utf-8",
            body.as_bytes(),
        )
    }
}

/// Parses a request from the bytes received so far. `Ok(None)` means the
/// header block is not complete yet; the caller owns the size and time
/// limits on waiting for more (httparse cannot know them).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, Rejection> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut raw = httparse::Request::new(&mut headers);
    let consumed = match raw.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::new(
                431,
                format!("too many request headers (at most {MAX_HEADERS})"),
            ))
        }
        Err(e) => return Err(Rejection::new(400, format!("malformed HTTP request: {e}"))),
    };
    let target = raw.path.unwrap_or("/");
    let path = target.split(['?', '#']).next().unwrap_or("/").to_owned();
    let query_tokens = target
        .split('#')
        .next()
        .and_then(|t| t.split_once('?'))
        .map(|(_, query)| {
            query
                .split('&')
                .filter_map(|pair| pair.strip_prefix("token="))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let mut request = Request {
        method: raw.method.unwrap_or_default().to_owned(),
        path,
        minor_version: raw.version.unwrap_or(0),
        host: None,
        upgrade_websocket: false,
        connection_upgrade: false,
        version: None,
        keys: Vec::new(),
        origin: None,
        protocols: Vec::new(),
        extensions: Vec::new(),
        authorization: Vec::new(),
        query_tokens,
    };
    for header in raw.headers.iter() {
        let Ok(value) = std::str::from_utf8(header.value) else {
            return Err(Rejection::new(
                400,
                format!("header {} is not valid UTF-8", header.name),
            ));
        };
        let value = value.trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            request.host = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("upgrade") {
            request.upgrade_websocket |= has_token(value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            request.connection_upgrade |= has_token(value, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            request.version = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            request.keys.push(value.to_owned());
        } else if name.eq_ignore_ascii_case("authorization") {
            request.authorization.push(value.to_owned());
        } else if name.eq_ignore_ascii_case("origin") {
            request.origin = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            request.protocols.extend(tokens(value).map(str::to_owned));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            request.extensions.extend(
                value
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty()),
            );
        }
    }
    Ok(Some((request, consumed)))
}

/// Server policy for upgrades.
#[derive(Debug, Clone, Default)]
pub struct UpgradePolicy {
    /// When non-empty, a browser's `Origin` must be one of these (exact,
    /// case-insensitive). Requests without `Origin` come from non-browser
    /// clients, which can forge it anyway, and are let through.
    pub allowed_origins: Vec<String>,
    /// Subprotocols the server speaks.
    pub subprotocols: Vec<String>,
    /// Whether and how permessage-deflate is negotiated.
    pub deflate: DeflatePolicy,
}

/// An upgrade the server agreed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub accept_key: String,
    pub subprotocol: Option<String>,
    /// permessage-deflate as agreed, and the `Sec-WebSocket-Extensions`
    /// value that says so.
    pub deflate: Option<(DeflateParams, String)>,
}

/// Applies §4.2.1's requirements to a request aimed at a WebSocket path.
pub fn validate_upgrade(request: &Request, policy: &UpgradePolicy) -> Result<Accepted, Rejection> {
    if request.method != "GET" {
        return Err(
            Rejection::new(405, "a WebSocket handshake must use GET").with_header("Allow", "GET")
        );
    }
    if !request.wants_websocket() {
        return Err(Rejection::new(
            426,
            "this path speaks WebSocket: send an Upgrade: websocket request",
        )
        .with_header("Upgrade", "websocket")
        .with_header("Sec-WebSocket-Version", "13"));
    }
    if request.minor_version < 1 {
        return Err(Rejection::new(
            400,
            "a WebSocket handshake requires HTTP/1.1",
        ));
    }
    if request.host.as_deref().is_none_or(str::is_empty) {
        return Err(Rejection::new(400, "missing Host header"));
    }
    if !request.upgrade_websocket {
        return Err(Rejection::new(
            400,
            "Upgrade header must contain the token websocket",
        ));
    }
    if !request.connection_upgrade {
        return Err(Rejection::new(
            400,
            "Connection header must contain the token upgrade",
        ));
    }
    if request.version.as_deref() != Some("13") {
        return Err(Rejection::new(
            426,
            "unsupported Sec-WebSocket-Version: this server speaks version 13",
        )
        .with_header("Sec-WebSocket-Version", "13"));
    }
    let key = match request.keys.as_slice() {
        [key] => key,
        [] => return Err(Rejection::new(400, "missing Sec-WebSocket-Key header")),
        _ => {
            return Err(Rejection::new(
                400,
                "more than one Sec-WebSocket-Key header",
            ))
        }
    };
    if BASE64.decode(key).map(|k| k.len()) != Ok(16) {
        return Err(Rejection::new(
            400,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    if let (Some(origin), false) = (&request.origin, policy.allowed_origins.is_empty()) {
        if !policy
            .allowed_origins
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(origin))
        {
            return Err(Rejection::new(
                403,
                format!("origin {origin} is not allowed"),
            ));
        }
    }
    // The client lists its preference order; pick its first one we speak.
    let subprotocol = request
        .protocols
        .iter()
        .find(|offered| policy.subprotocols.iter().any(|ours| ours == *offered))
        .cloned();
    Ok(Accepted {
        accept_key: accept_key(key),
        subprotocol,
        deflate: negotiate(&request.extensions, policy.deflate),
    })
}

/// `Sec-WebSocket-Accept`: base64(SHA-1(key + GUID)) (§4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// The 101 response that completes an accepted upgrade.
pub fn accept_response(accepted: &Accepted) -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accepted.accept_key
    );
    if let Some(protocol) = &accepted.subprotocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(protocol);
        response.push_str("\r\n");
    }
    if let Some((_, extensions)) = &accepted.deflate {
        response.push_str("Sec-WebSocket-Extensions: ");
        response.push_str(extensions);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.into_bytes()
}

/// A complete `Connection: close` HTTP/1.1 response.
pub fn http_response(
    status: u16,
    headers: &[(&str, &str)],
    content_type: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        status_text(status),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut response = head.into_bytes();
    response.extend_from_slice(body);
    response
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Comma-separated HTTP tokens (§4.2.1: Connection, Sec-WebSocket-Protocol).
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn has_token(value: &str, wanted: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /echo?x=1 HTTP/1.1\r\nHost: example\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(text: &str) -> Request {
        parse_request(text.as_bytes()).unwrap().unwrap().0
    }

    fn replace(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_query() {
        let token = |text: &str| parse(text).bearer_token().map(|t| t.map(str::to_owned));
        assert_eq!(token(GOOD), Ok(None));
        let header = replace("Host:", "Authorization: Bearer a.b.c\r\nHost:");
        assert_eq!(token(&header), Ok(Some("a.b.c".to_owned())));
        let lower = replace("Host:", "authorization: bearer  a.b.c \r\nHost:");
        assert_eq!(token(&lower), Ok(Some("a.b.c".to_owned())));
        let query = replace("/echo?x=1", "/echo?x=1&token=q.r.s#frag");
        assert_eq!(token(&query), Ok(Some("q.r.s".to_owned())));
        for (bad, why) in [
            (
                replace("Host:", "Authorization: Basic YTpi\r\nHost:"),
                "Bearer",
            ),
            (replace("Host:", "Authorization: Bearer\r\nHost:"), "empty"),
            (replace("/echo?x=1", "/echo?token="), "empty"),
            (
                replace("/echo?x=1", "/echo?token=a&token=b"),
                "more than one",
            ),
            (
                replace("/echo?x=1", "/echo?token=a.b.c").replacen(
                    "Host:",
                    "Authorization: Bearer a.b.c\r\nHost:",
                    1,
                ),
                "more than one",
            ),
        ] {
            let rejection = parse(&bad).bearer_token().unwrap_err();
            assert_eq!(rejection.status, 401, "{bad}");
            assert!(rejection.reason.contains(why), "{}", rejection.reason);
            assert_eq!(rejection.extra_headers, [("WWW-Authenticate", "Bearer")]);
        }
    }

    fn status_of(text: &str, policy: &UpgradePolicy) -> u16 {
        match parse_request(text.as_bytes()) {
            Err(rejection) => rejection.status,
            Ok(None) => panic!("partial"),
            Ok(Some((request, _))) => {
                validate_upgrade(&request, policy).map_or_else(|r| r.status, |_| 101)
            }
        }
    }

    #[test]
    fn rfc_sample_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn accepts_the_rfc_request_with_case_and_list_variations() {
        let request = parse(GOOD);
        assert_eq!(request.path, "/echo");
        let accepted = validate_upgrade(&request, &UpgradePolicy::default()).unwrap();
        let response = String::from_utf8(accept_response(&accepted)).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(response.ends_with("\r\n\r\n"));
        assert_eq!(
            status_of(
                &replace("Connection: keep-alive, Upgrade", "connection: UPGRADE"),
                &Default::default()
            ),
            101
        );
    }

    #[test]
    fn partial_until_the_blank_line() {
        for cut in 0..GOOD.len() {
            assert_eq!(
                parse_request(&GOOD.as_bytes()[..cut]),
                Ok(None),
                "cut at {cut}"
            );
        }
        let with_frame = format!("{GOOD}\u{81}");
        assert_eq!(
            parse_request(with_frame.as_bytes()).unwrap().unwrap().1,
            GOOD.len()
        );
    }

    #[test]
    fn every_rejection_path() {
        let p = UpgradePolicy::default();
        let cases: Vec<(String, u16)> = vec![
            (replace("GET", "POST"), 405),
            (
                replace("Upgrade: WebSocket\r\n", "")
                    .replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                426,
            ),
            (replace("HTTP/1.1", "HTTP/1.0"), 400),
            (replace("Host: example\r\n", ""), 400),
            (replace("Upgrade: WebSocket", "Upgrade: h2c"), 400),
            (
                replace("Connection: keep-alive, Upgrade", "Connection: keep-alive"),
                400,
            ),
            (
                replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            (replace("Sec-WebSocket-Version: 13\r\n", ""), 426),
            (
                replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
            ),
            (replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZQ=="), 400),
            (replace("dGhlIHNhbXBsZSBub25jZQ==", "not base64!"), 400),
            (
                replace(
                    "Host: example\r\n",
                    "Host: example\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
                ),
                400,
            ),
            ("GET / HTTP/1.1\r\nHost\r\n\r\n".to_owned(), 400),
            (
                format!(
                    "GET / HTTP/1.1\r\n{}\r\n",
                    "X: y\r\n".repeat(MAX_HEADERS + 1)
                ),
                431,
            ),
        ];
        for (text, status) in cases {
            assert_eq!(status_of(&text, &p), status, "{text:?}");
        }
    }

    #[test]
    fn version_rejection_advertises_13() {
        let request = parse(&replace(
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Version: 8",
        ));
        let rejection = validate_upgrade(&request, &UpgradePolicy::default()).unwrap_err();
        let text = String::from_utf8(rejection.to_response()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(text.contains("Content-Length: "));
    }

    #[test]
    fn origin_allow_list() {
        let policy = UpgradePolicy {
            allowed_origins: vec!["https://good.example".into()],
            ..Default::default()
        };
        let with = |origin: &str| {
            replace(
                "Host: example\r\n",
                &format!("Host: example\r\nOrigin: {origin}\r\n"),
            )
        };
        assert_eq!(status_of(&with("https://good.example"), &policy), 101);
        assert_eq!(status_of(&with("https://evil.example"), &policy), 403);
        assert_eq!(status_of(GOOD, &policy), 101, "no Origin: not a browser");
        assert_eq!(
            status_of(&with("https://evil.example"), &UpgradePolicy::default()),
            101,
            "no list: any origin"
        );
    }

    #[test]
    fn subprotocol_selection_follows_client_preference() {
        let policy = UpgradePolicy {
            subprotocols: vec!["chat".into(), "json".into()],
            ..Default::default()
        };
        let offer = |list: &str| {
            let request = parse(&replace(
                "Host: example\r\n",
                &format!("Host: example\r\nSec-WebSocket-Protocol: {list}\r\n"),
            ));
            validate_upgrade(&request, &policy).unwrap().subprotocol
        };
        assert_eq!(offer("json, chat"), Some("json".into()));
        assert_eq!(offer("mqtt, chat"), Some("chat".into()));
        assert_eq!(offer("mqtt"), None);
        let accepted = Accepted {
            accept_key: "k".into(),
            subprotocol: Some("chat".into()),
            deflate: None,
        };
        assert!(String::from_utf8(accept_response(&accepted))
            .unwrap()
            .contains("Sec-WebSocket-Protocol: chat\r\n"));
    }

    #[test]
    fn permessage_deflate_is_answered_only_when_configured() {
        let request = parse(&replace(
            "Host: example\r\n",
            "Host: example\r\nSec-WebSocket-Extensions: x-foo, permessage-deflate; client_max_window_bits\r\n",
        ));
        let off = validate_upgrade(&request, &UpgradePolicy::default()).unwrap();
        assert_eq!(off.deflate, None);
        assert!(!String::from_utf8(accept_response(&off))
            .unwrap()
            .contains("Extensions"));
        let policy = UpgradePolicy {
            deflate: DeflatePolicy::NoContextTakeover,
            ..Default::default()
        };
        let on = validate_upgrade(&request, &policy).unwrap();
        assert!(on.deflate.is_some());
        assert!(String::from_utf8(accept_response(&on)).unwrap().contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ));
    }
}
