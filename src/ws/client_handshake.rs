//! The client side of the opening handshake (RFC 6455 §4.1), sans-IO: the
//! request to send, and the checks of the server's answer that §4.1 says
//! a client MUST make before it speaks WebSocket. fanout is a client when
//! it connects to upstream feeds; the in-memory session tests use it too.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use super::extensions::{parse_offer, DeflateParams, EXTENSION_NAME, MAX_WINDOW_BITS};
use super::handshake::{accept_key, MAX_HEADERS};

/// The longest response head a client reads before giving up.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// What the client asks for.
#[derive(Debug, Clone, Default)]
pub struct ClientRequest<'a> {
    /// The `Host` header: host, and `:port` unless it is the default.
    pub host: &'a str,
    /// The request target: path and query.
    pub path: &'a str,
    /// Extra headers (an API key, an `Origin`), sent as given.
    pub headers: &'a [(&'a str, &'a str)],
    /// Subprotocols offered, in order of preference.
    pub subprotocols: &'a [&'a str],
    /// Offer permessage-deflate (RFC 7692).
    pub deflate: bool,
}

/// A `Sec-WebSocket-Key` from 16 random bytes (§4.1: "randomly selected",
/// fresh for each connection).
pub fn new_key(nonce: [u8; 16]) -> String {
    BASE64.encode(nonce)
}

/// The request head for `request` with `key` (see [`new_key`]).
pub fn request_bytes(request: &ClientRequest<'_>, key: &str) -> Vec<u8> {
    let mut head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        request.path, request.host
    );
    if !request.subprotocols.is_empty() {
        head.push_str("Sec-WebSocket-Protocol: ");
        head.push_str(&request.subprotocols.join(", "));
        head.push_str("\r\n");
    }
    if request.deflate {
        // No client_max_window_bits: the server cannot then limit our
        // window, so our compressor always uses zlib's full one.
        head.push_str("Sec-WebSocket-Extensions: ");
        head.push_str(EXTENSION_NAME);
        head.push_str("\r\n");
    }
    for (name, value) in request.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// An upgrade the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAccepted {
    /// The subprotocol the server chose, one of those offered.
    pub subprotocol: Option<String>,
    /// permessage-deflate as the server agreed it.
    pub deflate: Option<DeflateParams>,
}

/// Why the server's answer does not open a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseError {
    /// Not HTTP, or malformed.
    Malformed(String),
    /// The head is longer than [`MAX_RESPONSE_HEAD`].
    TooLarge,
    /// Any status but 101, with its reason phrase.
    Status(u16, String),
    /// A header §4.1 requires is missing or wrong: its name and why.
    Header(&'static str, String),
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::Malformed(why) => write!(f, "malformed HTTP response: {why}"),
            ResponseError::TooLarge => {
                write!(f, "response head longer than {MAX_RESPONSE_HEAD} bytes")
            }
            ResponseError::Status(code, reason) => {
                write!(f, "server answered {code} {reason} instead of 101")
            }
            ResponseError::Header(name, why) => write!(f, "{name}: {why}"),
        }
    }
}

impl std::error::Error for ResponseError {}

/// Parses the server's answer from the start of `buf`. `Ok(None)` until
/// the whole head is there; then the agreement and how many bytes the head
/// took (frames may follow it in `buf`).
pub fn parse_response(
    buf: &[u8],
    request: &ClientRequest<'_>,
    key: &str,
) -> Result<Option<(ServerAccepted, usize)>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let consumed = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
            return Err(ResponseError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ResponseError::Malformed(e.to_string())),
    };
    if consumed > MAX_RESPONSE_HEAD {
        return Err(ResponseError::TooLarge);
    }
    let code = response.code.unwrap_or(0);
    if code != 101 {
        let reason = response.reason.unwrap_or("").to_owned();
        return Err(ResponseError::Status(code, reason));
    }
    let values = |name: &str| -> Vec<String> {
        response
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
            .collect()
    };
    let has_token = |name: &str, token: &str| {
        values(name)
            .iter()
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    // §4.1, the client's checks of the server's handshake, in its order.
    if !has_token("Upgrade", "websocket") {
        let why = "must be websocket".to_owned();
        return Err(ResponseError::Header("Upgrade", why));
    }
    if !has_token("Connection", "upgrade") {
        let why = "must contain the token upgrade".to_owned();
        return Err(ResponseError::Header("Connection", why));
    }
    let expected = accept_key(key);
    let accept = values("Sec-WebSocket-Accept");
    if accept.len() != 1 || accept[0].trim() != expected {
        let why = format!("expected {expected}, got {accept:?}");
        return Err(ResponseError::Header("Sec-WebSocket-Accept", why));
    }
    let deflate = accepted_deflate(values("Sec-WebSocket-Extensions"), request)?;
    let protocols = values("Sec-WebSocket-Protocol");
    let subprotocol = match protocols.as_slice() {
        [] => None,
        [one] if request.subprotocols.contains(&one.trim()) => Some(one.trim().to_owned()),
        other => {
            let why = format!("{other:?} was not offered");
            return Err(ResponseError::Header("Sec-WebSocket-Protocol", why));
        }
    };
    Ok(Some((
        ServerAccepted {
            subprotocol,
            deflate,
        },
        consumed,
    )))
}

/// The extension the server agreed to: none, or permessage-deflate if we
/// offered it, with parameters a client can honour (§9.1: "the client
/// MUST _Fail the WebSocket Connection_" on any other).
fn accepted_deflate(
    headers: Vec<String>,
    request: &ClientRequest<'_>,
) -> Result<Option<DeflateParams>, ResponseError> {
    let answers: Vec<&str> = headers
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    let fail = |why: String| Err(ResponseError::Header("Sec-WebSocket-Extensions", why));
    let answer = match answers.as_slice() {
        [] => return Ok(None),
        [one] if request.deflate => *one,
        other => return fail(format!("{other:?} was not offered")),
    };
    let params = match parse_offer(answer) {
        Some(Ok(params)) => params,
        Some(Err(why)) => return fail(why),
        None => return fail(format!("{answer} was not offered")),
    };
    // RFC 7692 §7.1.2.2: not offered, so the server must not send it.
    if params.client_max_window_bits.is_some() {
        return fail("client_max_window_bits was not offered".to_owned());
    }
    Ok(Some(DeflateParams {
        server_no_context_takeover: params.server_no_context_takeover,
        client_no_context_takeover: params.client_no_context_takeover,
        server_window_bits: params.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::extensions::DeflatePolicy;
    use crate::ws::handshake::{accept_response, parse_request, validate_upgrade, UpgradePolicy};

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(deflate: bool) -> ClientRequest<'static> {
        ClientRequest {
            host: "feed.example:9443",
            path: "/ws?stream=trades",
            headers: &[("X-Api-Key", "secret")],
            subprotocols: &["v2.feed", "v1.feed"],
            deflate,
        }
    }

    fn answer(extra: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_request_is_one_our_own_server_accepts() {
        let req = request(true);
        let bytes = request_bytes(&req, KEY);
        let (parsed, used) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        // The server routes on the path; the query is not part of it.
        assert_eq!(parsed.path, "/ws");
        let policy = UpgradePolicy {
            subprotocols: vec!["v1.feed".into()],
            deflate: DeflatePolicy::NoContextTakeover,
            ..UpgradePolicy::default()
        };
        let accepted = validate_upgrade(&parsed, &policy).unwrap();
        let response = accept_response(&accepted);
        let (ours, consumed) = parse_response(&response, &req, KEY).unwrap().unwrap();
        assert_eq!(consumed, response.len());
        assert_eq!(ours.subprotocol.as_deref(), Some("v1.feed"));
        assert_eq!(Some(ours.deflate.unwrap()), accepted.deflate.map(|d| d.0));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\r\nX-Api-Key: secret\r\n"), "{text}");
    }

    #[test]
    fn a_partial_head_waits_and_frames_after_it_are_left() {
        let mut bytes = answer("");
        let req = request(false);
        for cut in 0..bytes.len() {
            assert_eq!(parse_response(&bytes[..cut], &req, KEY), Ok(None));
        }
        let head = bytes.len();
        bytes.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        let (_, consumed) = parse_response(&bytes, &req, KEY).unwrap().unwrap();
        assert_eq!(consumed, head);
    }

    #[test]
    fn every_check_of_section_4_1_refuses() {
        let req = request(false);
        let cases: &[(&[u8], &str)] = &[
            (
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
                "server answered 403 Forbidden instead of 101",
            ),
            (
                b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                "Upgrade: must be websocket",
            ),
            (
                b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                "Connection: must contain the token upgrade",
            ),
            (
                b"HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n",
                "Sec-WebSocket-Accept: expected s3pPLMBiTxaQ9kYGzzhZRbK+xOo=, got [\"AAAA\"]",
            ),
            (b"NOT HTTP\r\n\r\n", "malformed HTTP response: invalid HTTP version"),
        ];
        for (bytes, message) in cases {
            let error = parse_response(bytes, &req, KEY).unwrap_err();
            assert_eq!(error.to_string(), *message);
        }
        let deflate_not_offered = answer("Sec-WebSocket-Extensions: permessage-deflate\r\n");
        assert!(matches!(
            parse_response(&deflate_not_offered, &req, KEY),
            Err(ResponseError::Header("Sec-WebSocket-Extensions", _))
        ));
        let window_not_offered =
            answer("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10\r\n");
        assert!(matches!(
            parse_response(&window_not_offered, &request(true), KEY),
            Err(ResponseError::Header("Sec-WebSocket-Extensions", _))
        ));
        let protocol_not_offered = answer("Sec-WebSocket-Protocol: v3.feed\r\n");
        assert!(matches!(
            parse_response(&protocol_not_offered, &req, KEY),
            Err(ResponseError::Header("Sec-WebSocket-Protocol", _))
        ));
        let endless = vec![b'a'; MAX_RESPONSE_HEAD + 1];
        let mut long = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        long.extend_from_slice(&endless);
        assert_eq!(
            parse_response(&long, &req, KEY),
            Err(ResponseError::TooLarge)
        );
    }

    #[test]
    fn keys_are_16_bytes_of_base64() {
        let key = new_key([7; 16]);
        assert_eq!(BASE64.decode(&key).unwrap(), [7; 16]);
    }
}
