//! The opening handshake on arbitrary bytes: parsing, validation against a
//! policy with an origin allow-list and subprotocols, and both kinds of
//! response. Nothing may panic, and every response must be well-formed HTTP.
#![no_main]

use std::sync::OnceLock;

use fanout::ws::extensions::DeflatePolicy;
use fanout::ws::handshake::{accept_response, Accepted, parse_request, validate_upgrade, Rejection, Request, UpgradePolicy};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static UpgradePolicy {
    static POLICY: OnceLock<UpgradePolicy> = OnceLock::new();
    POLICY.get_or_init(|| UpgradePolicy {
        allowed_origins: vec!["https://good.example".into(), "http://localhost:8080".into()],
        subprotocols: vec!["chat".into(), "json".into(), "v1.fanout".into()],
        deflate: DeflatePolicy::ContextTakeover,
    })
}

/// Parses a response we built; returns (status, headers, body).
fn parse_response(bytes: &[u8]) -> (u16, Vec<(String, String)>, &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("our own response does not parse ({other:?}): {:?}", String::from_utf8_lossy(bytes)),
    };
    assert_eq!(response.version, Some(1));
    let headers = response
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8(h.value.to_vec()).expect("header value is UTF-8")))
        .collect();
    (response.code.expect("status code"), headers, &bytes[head_len..])
}

fn header<'h>(headers: &'h [(String, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn check_rejection(rejection: &Rejection) {
    assert!((400..=599).contains(&rejection.status), "rejection status {}", rejection.status);
    let bytes = rejection.to_response();
    let (status, headers, body) = parse_response(&bytes);
    assert_eq!(status, rejection.status);
    assert_eq!(header(&headers, "content-length"), Some(body.len().to_string().as_str()));
    assert_eq!(header(&headers, "connection"), Some("close"));
}

fn check_accepted(request: &Request, accepted: &Accepted) {
    let policy = policy();
    // What validation promised.
    assert_eq!(request.method, "GET");
    assert_eq!(request.keys.len(), 1);
    assert_eq!(request.version.as_deref(), Some("13"));
    if let Some(origin) = &request.origin {
        assert!(
            policy.allowed_origins.iter().any(|o| o.eq_ignore_ascii_case(origin)),
            "accepted a disallowed origin {origin:?}"
        );
    }
    let expected_protocol = request.protocols.iter().find(|p| policy.subprotocols.contains(p));
    assert_eq!(accepted.subprotocol.as_ref(), expected_protocol);
    assert_eq!(accepted.accept_key.len(), 28, "base64 of a 20-byte SHA-1");

    let bytes = accept_response(accepted);
    let (status, headers, body) = parse_response(&bytes);
    assert_eq!(status, 101);
    assert!(body.is_empty(), "101 response has trailing bytes {body:?}");
    assert_eq!(header(&headers, "sec-websocket-accept"), Some(accepted.accept_key.as_str()));
    assert_eq!(header(&headers, "sec-websocket-protocol"), accepted.subprotocol.as_deref());
    // permessage-deflate: answered only when offered, with parameters only
    // from the offer, and a window zlib can compress with.
    let extensions = header(&headers, "sec-websocket-extensions");
    assert_eq!(extensions, accepted.deflate.as_ref().map(|(_, value)| value.as_str()));
    if let Some((params, value)) = &accepted.deflate {
        assert!(request.extensions.iter().any(|offer| offer.to_ascii_lowercase().starts_with("permessage-deflate")));
        assert!(value.starts_with("permessage-deflate"), "{value}");
        assert!((9..=15).contains(&params.server_window_bits), "{params:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(None) => {}
        Err(rejection) => check_rejection(&rejection),
        Ok(Some((request, consumed))) => {
            assert!(consumed <= data.len(), "consumed {consumed} of {}", data.len());
            assert!(!request.path.contains(['?', '#']), "path keeps its query: {:?}", request.path);
            // The server may hold exactly the header block: same answer.
            assert_eq!(parse_request(&data[..consumed]), Ok(Some((request.clone(), consumed))));
            match validate_upgrade(&request, policy()) {
                Ok(accepted) => check_accepted(&request, &accepted),
                Err(rejection) => check_rejection(&rejection),
            }
        }
    }
});
