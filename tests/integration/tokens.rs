//! Tokens (JWTs): an identity provider's (HS256 with a secret file;
//! RS256, ES256 and EdDSA with a JWKS file) and publishers' (EdDSA with a
//! `--publisher-public-key`), presented in the handshake or in `auth`.
//! Every key is made here at test time: Ed25519 and P-256 with rcgen, RSA
//! with the `openssl` command (ring, which rcgen uses, cannot generate
//! RSA keys).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tungstenite::protocol::Role as WsRole;
use tungstenite::WebSocket;

use crate::support::common::{
    connect_tcp, http_exchange, read_http_head, ServerProcess, Servers, TestServer,
};
use crate::support::json_client::{Ended, JsonClient};

const SECRET: &str = "correct horse battery staple";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A signing key and its public half as a JWK.
struct SigningKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
    /// The public key in PEM (Ed25519 only: for --publisher-public-key).
    public_pem: String,
}

impl SigningKey {
    fn ed25519(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = B64URL.encode(pair.public_key_raw());
        SigningKey {
            alg: Algorithm::EdDSA,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty":"OKP","crv":"Ed25519","kid":kid,"alg":"EdDSA","use":"sig","x":x}),
            public_pem: pair.public_key_pem(),
        }
    }

    fn p256(kid: &str) -> SigningKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, then x and y.
        let raw = pair.public_key_raw();
        assert_eq!(raw.len(), 65);
        SigningKey {
            alg: Algorithm::ES256,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty":"EC","crv":"P-256","kid":kid,"alg":"ES256",
                        "x":B64URL.encode(&raw[1..33]),"y":B64URL.encode(&raw[33..])}),
            public_pem: pair.public_key_pem(),
        }
    }

    fn rsa(kid: &str, dir: &Path) -> SigningKey {
        let path = dir.join(format!("{kid}.pem"));
        let openssl = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .output()
                .expect("the RS256 tests need the `openssl` command");
            assert!(output.status.success(), "openssl {args:?}: {output:?}");
            output.stdout
        };
        let file = path.to_str().unwrap();
        openssl(&["genrsa", "-traditional", "-out", file, "2048"]);
        let modulus =
            String::from_utf8(openssl(&["rsa", "-in", file, "-noout", "-modulus"])).unwrap();
        let hex = modulus.trim().strip_prefix("Modulus=").unwrap();
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let pem = std::fs::read(&path).unwrap();
        SigningKey {
            alg: Algorithm::RS256,
            kid: kid.to_owned(),
            encoding: EncodingKey::from_rsa_pem(&pem).unwrap(),
            // openssl's default public exponent, 65537.
            jwk: json!({"kty":"RSA","kid":kid,"alg":"RS256","n":B64URL.encode(n),"e":"AQAB"}),
            public_pem: String::new(),
        }
    }

    /// A token with these claims, naming the key by `kid`.
    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding).unwrap()
    }

    /// A token with no `kid`: each key of its algorithm is tried.
    fn sign_without_kid(&self, claims: &Value) -> String {
        encode(&Header::new(self.alg), claims, &self.encoding).unwrap()
    }
}

fn hs256(secret: &str, claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn write_jwks(path: &Path, keys: &[&SigningKey]) {
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    std::fs::write(path, jwks.to_string()).unwrap();
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Where a handshake carries its token.
#[derive(Clone, Copy)]
enum Presented<'a> {
    Nothing,
    Header(&'a str),
    Query(&'a str),
}

/// An upgrade of `path` presenting a token: the connection on 101, else
/// the status and the one-line reason.
fn handshake(
    addr: SocketAddr,
    path: &str,
    token: Presented<'_>,
) -> Result<JsonClient, (u16, String)> {
    let (target, authorization) = match token {
        Presented::Nothing => (path.to_owned(), String::new()),
        Presented::Header(t) => (path.to_owned(), format!("Authorization: Bearer {t}\r\n")),
        Presented::Query(t) => (format!("{path}?token={t}"), String::new()),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: test\r\n{authorization}Upgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut stream = connect_tcp(addr);
    stream.write_all(request.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    let status: u16 = head[9..12].parse().unwrap();
    if status == 101 {
        let ws = WebSocket::from_raw_socket(stream, WsRole::Client, None);
        return Ok(JsonClient { ws });
    }
    if status == 401 {
        assert!(
            head.contains("WWW-Authenticate: Bearer"),
            "a 401 names its scheme: {head}"
        );
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    Err((status, body.trim().to_owned()))
}

/// A `/ws` connection presenting `token`, its welcome consumed.
fn ws_with(addr: SocketAddr, token: Presented<'_>) -> JsonClient {
    let mut client = handshake(addr, "/ws", token)
        .unwrap_or_else(|(status, reason)| panic!("refused with {status}: {reason}"));
    assert_eq!(client.recv()["type"], "welcome");
    client
}

/// The reason a handshake presenting `token` was refused with 401.
fn refused(addr: SocketAddr, token: Presented<'_>) -> String {
    match handshake(addr, "/ws", token) {
        Ok(_) => panic!("the handshake was accepted"),
        Err((status, reason)) => {
            assert_eq!(status, 401, "{reason}");
            reason
        }
    }
}

/// One sample of `/metrics`, 0 when absent.
fn metric(addr: SocketAddr, sample: &str) -> u64 {
    let response = http_exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    response
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

fn claims(sub: &str, lifetime_secs: u64) -> Value {
    json!({"sub": sub, "exp": now_secs() + lifetime_secs})
}

/// A server that takes HS256 tokens signed with [`SECRET`].
fn secret_server(dir: &Path, extra: &[&str]) -> TestServer {
    let secret = write_file(dir, "secret", &format!("{SECRET}\n"));
    let mut flags = vec!["--token-secret-file", arg(&secret)];
    flags.extend_from_slice(extra);
    TestServer::start(&flags)
}

#[test]
fn hs256_in_the_header_in_the_query_and_in_auth() {
    let dir = tempfile::tempdir().unwrap();
    let server = secret_server(dir.path(), &[]);
    let token = hs256(SECRET, &claims("ada", 600));

    let mut by_header = ws_with(server.addr, Presented::Header(&token));
    by_header.ok(json!({"type":"subscribe","channel":"news"}));
    let mut by_query = ws_with(server.addr, Presented::Query(&token));
    by_query.ok(json!({"type":"subscribe","channel":"news"}));
    let mut by_auth = ws_with(server.addr, Presented::Nothing);
    let ack = by_auth.ok(json!({"type":"auth","token":token}));
    assert_eq!(ack["sub"], "ada", "{ack}");
    assert_eq!(ack["trusted"], false, "an identity, not a publisher: {ack}");
    assert_eq!(ack["publisher"], false, "{ack}");
    assert!(
        ack["expires_at"].as_u64().unwrap() >= now_secs() + 590,
        "{ack}"
    );
    assert_eq!(metric(server.addr, "fanout_tokens_accepted_total"), 3);

    // Another secret's signature is refused, in the handshake and in auth.
    let forged = hs256("guess", &claims("ada", 600));
    let reason = refused(server.addr, Presented::Header(&forged));
    assert!(reason.contains("signature does not verify"), "{reason}");
    let message = by_auth.fails(json!({"type":"auth","token":forged}), "auth_failed");
    assert!(message.contains("signature does not verify"), "{message}");
    assert_eq!(
        metric(
            server.addr,
            "fanout_token_refusals_total{reason=\"signature\"}"
        ),
        2
    );
}

#[test]
fn rs256_es256_and_eddsa_verify_with_the_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = SigningKey::rsa("rsa-1", dir.path());
    let ec = SigningKey::p256("ec-1");
    let ed = SigningKey::ed25519("ed-1");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&rsa, &ec, &ed]);
    let server = TestServer::start(&["--token-jwks-file", arg(&jwks)]);

    for key in [&rsa, &ec, &ed] {
        let token = key.sign(&claims("ada", 600));
        let mut client = ws_with(server.addr, Presented::Header(&token));
        client.ok(json!({"type":"subscribe","channel":"news"}));
        let token = key.sign_without_kid(&claims("ada", 600));
        ws_with(server.addr, Presented::Query(&token));
    }
    // A key the JWKS does not hold, under a kid it does hold, and under
    // one it does not.
    let stranger = SigningKey::p256("ec-1");
    let reason = refused(
        server.addr,
        Presented::Header(&stranger.sign(&claims("ada", 600))),
    );
    assert!(reason.contains("signature does not verify"), "{reason}");
    let unknown = SigningKey::p256("ec-9");
    let reason = refused(
        server.addr,
        Presented::Header(&unknown.sign(&claims("ada", 600))),
    );
    assert!(reason.contains("kid `ec-9`"), "{reason}");
    // No secret file: HS256 is not taken at all.
    let reason = refused(
        server.addr,
        Presented::Header(&hs256(SECRET, &claims("ada", 600))),
    );
    assert!(reason.contains("HS256 tokens are not accepted"), "{reason}");
}

#[test]
fn each_refused_claim_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let server = secret_server(
        dir.path(),
        &[
            "--token-issuer",
            "https://sso.example",
            "--token-audience",
            "fanout",
            "--token-leeway",
            "0s",
        ],
    );
    let good = json!({"sub":"ada","iss":"https://sso.example","aud":["fanout","other"],
                      "exp":now_secs() + 600});
    ws_with(server.addr, Presented::Header(&hs256(SECRET, &good)));
    let with = |field: &str, value: Value| {
        let mut claims = good.clone();
        claims[field] = value;
        hs256(SECRET, &claims)
    };
    let cases = [
        (
            hs256("guess", &good),
            "signature does not verify",
            "signature",
        ),
        (
            with("iss", json!("https://evil.example")),
            "claim `iss`",
            "issuer",
        ),
        (
            with("aud", json!("someone-else")),
            "claim `aud`",
            "audience",
        ),
        (
            with("exp", json!(now_secs() - 5)),
            "token expired",
            "expired",
        ),
        (
            with("nbf", json!(now_secs() + 600)),
            "not yet valid",
            "not_yet_valid",
        ),
        (
            with("channels", json!("news")),
            "claim `channels`",
            "invalid_claim",
        ),
        ("not-a-jwt".to_owned(), "not a JWT", "malformed"),
    ];
    for (token, why, label) in &cases {
        let reason = refused(server.addr, Presented::Header(token));
        assert!(reason.starts_with("token refused: "), "{reason}");
        assert!(reason.contains(why), "{label}: {reason}");
        let sample = format!("fanout_token_refusals_total{{reason=\"{label}\"}}");
        assert_eq!(metric(server.addr, &sample), 1, "{sample}");
    }
    // The same refusals on /ws, as auth errors; the third one closes.
    let mut client = ws_with(server.addr, Presented::Nothing);
    let message = client.fails(json!({"type":"auth","token":cases[1].0}), "auth_failed");
    assert!(
        message.contains("claim `iss`") && message.contains("2 attempt(s) left"),
        "{message}"
    );
    let message = client.fails(json!({"type":"auth","token":cases[3].0}), "auth_failed");
    assert!(message.contains("token expired"), "{message}");
    let message = client.fails(json!({"type":"auth","token":cases[4].0}), "auth_failed");
    assert!(message.contains("too many failures"), "{message}");
    match client.next(Duration::from_secs(5)) {
        Err(Ended::Closed(Some(frame))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a 1008 close, got {other:?}"),
    }
}

#[test]
fn require_token_refuses_anonymous_handshakes_with_401() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write_file(dir.path(), "secret", SECRET);
    let servers = Servers::start(&["--require-token", "--token-secret-file", arg(&secret)]);
    for path in ["/ws", "/chat", "/echo", "/kline"] {
        let (status, reason) = handshake(servers.public, path, Presented::Nothing)
            .err()
            .unwrap_or_else(|| panic!("{path} opened without a token"));
        assert_eq!(status, 401, "{path}");
        assert!(reason.contains("a token is required"), "{reason}");
    }
    let (status, reason) = handshake(servers.public, "/ws", Presented::Header("a.b.c"))
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert!(reason.contains("token refused"), "{reason}");
    // A token opens it; the internal listener needs none.
    let token = hs256(SECRET, &claims("ada", 600));
    ws_with(servers.public, Presented::Query(&token));
    ws_with(servers.internal, Presented::Nothing);
    assert_eq!(
        metric(
            servers.public,
            "fanout_token_refusals_total{reason=\"missing\"}"
        ),
        4
    );
    assert!(
        metric(
            servers.public,
            "fanout_handshakes_rejected_total{status=\"401\"}"
        ) >= 5
    );
}

#[test]
fn claims_limit_what_a_connection_subscribes_and_publishes_to() {
    let dir = tempfile::tempdir().unwrap();
    let server = secret_server(dir.path(), &[]);
    let token = hs256(
        SECRET,
        &json!({"sub":"ada","exp":now_secs() + 600,
                "channels":["news.*","prices.>"],"publish":["chat.room1"]}),
    );
    let mut client = ws_with(server.addr, Presented::Header(&token));
    for allowed in ["news.sport", "news.*", "prices.btc.usd", "prices.>"] {
        client.ok(json!({"type":"subscribe","channel":allowed}));
    }
    for forbidden in ["secrets", "news.>", "news"] {
        let message = client.fails(json!({"type":"subscribe","channel":forbidden}), "forbidden");
        assert!(message.contains(&format!("`{forbidden}`")), "{message}");
        assert!(message.contains("`channels` claim"), "{message}");
    }
    // `publish` lets it publish where a public connection could not (the
    // channel does not exist, and would take trusted publishers only).
    let ack = client.ok(json!({"type":"publish","channel":"chat.room1","data":"hi"}));
    assert_eq!(ack["offset"], 1, "{ack}");
    let message = client.fails(
        json!({"type":"publish","channel":"chat.room2","data":"hi"}),
        "forbidden",
    );
    assert!(
        message.contains("`chat.room2`") && message.contains("`publish` claim"),
        "{message}"
    );
    // Without the claims, a token's connection may what an anonymous one may.
    let plain = hs256(SECRET, &claims("bob", 600));
    let mut other = ws_with(server.addr, Presented::Header(&plain));
    other.ok(json!({"type":"subscribe","channel":"secrets"}));
    other.fails(
        json!({"type":"publish","channel":"chat.room1","data":"hi"}),
        "forbidden",
    );
}

#[test]
fn sub_becomes_the_chat_nick_and_stays_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = secret_server(dir.path(), &[]);
    let mut json_client = ws_with(
        server.addr,
        Presented::Header(&hs256(SECRET, &claims("ada", 600))),
    );
    let ack = json_client.ok(json!({"type":"chat.join","room":"lobby"}));
    assert_eq!(ack["nick"], "ada", "{ack}");
    let joined = json_client.recv();
    assert_eq!(
        (&joined["kind"], &joined["nick"]),
        (&json!("join"), &json!("ada")),
        "{joined}"
    );
    let message = json_client.fails(json!({"type":"chat.nick","nick":"eve"}), "forbidden");
    assert!(message.contains("`sub` ada"), "{message}");

    let token = hs256(SECRET, &claims("grace", 600));
    let mut plain = handshake(server.addr, "/chat", Presented::Query(&token))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let welcome = plain.recv_text();
    assert!(welcome.contains("you are grace"), "{welcome}");
    // An `auth` token before joining names the member too.
    let mut later = ws_with(server.addr, Presented::Nothing);
    later.ok(json!({"type":"auth","token":hs256(SECRET, &claims("hopper", 600))}));
    let ack = later.ok(json!({"type":"chat.join","room":"lobby"}));
    assert_eq!(ack["nick"], "hopper", "{ack}");
}

#[test]
fn an_expired_token_closes_with_4001_unless_a_fresh_one_came() {
    let dir = tempfile::tempdir().unwrap();
    let server = secret_server(dir.path(), &["--token-leeway", "0s"]);
    let short = hs256(SECRET, &claims("ada", 2));
    let mut expiring = ws_with(server.addr, Presented::Header(&short));
    let mut refreshed = ws_with(server.addr, Presented::Header(&short));
    let fresh = hs256(SECRET, &claims("ada", 600));
    let ack = refreshed.ok(json!({"type":"auth","token":fresh}));
    assert_eq!(ack["sub"], "ada");
    // Another identity's token is not a refresh.
    let message = refreshed.fails(
        json!({"type":"auth","token":hs256(SECRET, &claims("eve", 600))}),
        "auth_failed",
    );
    assert!(message.contains("`sub` `eve`"), "{message}");

    let started = Instant::now();
    match expiring.next(Duration::from_secs(10)) {
        Err(Ended::Closed(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 4001);
            assert_eq!(frame.reason, "token expired");
        }
        other => panic!("expected the 4001 close, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // The refreshed one is still open and served.
    refreshed.ok(json!({"type":"subscribe","channel":"news"}));
    assert_eq!(metric(server.addr, "fanout_token_expiry_closes_total"), 1);
}

#[test]
fn sighup_rereads_the_jwks() {
    let dir = tempfile::tempdir().unwrap();
    let first = SigningKey::ed25519("k1");
    let second = SigningKey::p256("k2");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&first]);
    let mut server = ServerProcess::start(&["--no-sim", "--token-jwks-file", arg(&jwks)]);
    let later = second.sign(&claims("ada", 600));
    ws_with(
        server.addr,
        Presented::Header(&first.sign(&claims("ada", 600))),
    );
    let reason = refused(server.addr, Presented::Header(&later));
    assert!(reason.contains("no ES256 key"), "{reason}");

    // A broken file keeps the keys the server has.
    std::fs::write(&jwks, "{").unwrap();
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    wait_for(|| metric(server.addr, "fanout_token_key_reload_failures_total") == 1);
    ws_with(
        server.addr,
        Presented::Header(&first.sign(&claims("ada", 600))),
    );

    write_jwks(&jwks, &[&first, &second]);
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    wait_for(|| metric(server.addr, "fanout_token_key_reloads_total") == 1);
    ws_with(server.addr, Presented::Header(&later));
    ws_with(
        server.addr,
        Presented::Header(&first.sign(&claims("ada", 600))),
    );
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
}

/// Polls `done` every 50 ms for at most 5 s.
fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "not within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_ed25519_publisher_token_makes_a_trusted_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = SigningKey::ed25519("feed");
    let key = write_file(dir.path(), "feed.pem", &publisher.public_pem);
    let server = TestServer::start(&["--publisher-public-key", arg(&key)]);

    let mut anonymous = ws_with(server.addr, Presented::Nothing);
    anonymous.fails(json!({"type":"create","channel":"prices"}), "forbidden");
    anonymous.fails(
        json!({"type":"publish","channel":"prices","data":1}),
        "not_found",
    );

    // By `auth`, the way a publisher key is presented.
    let token = publisher.sign_without_kid(&claims("feed-1", 600));
    let ack = anonymous.ok(json!({"type":"auth","token":token}));
    assert_eq!(
        (ack["trusted"].clone(), ack["publisher"].clone()),
        (json!(true), json!(true)),
        "{ack}"
    );
    anonymous.ok(json!({"type":"create","channel":"prices"}));
    anonymous.ok(json!({"type":"publish","channel":"prices","data":1}));
    anonymous.ok(json!({"type":"publish","channel":"events","data":{"type":"payment"}}));

    // In the handshake, narrowed by a `publish` claim.
    let narrowed =
        publisher.sign(&json!({"sub":"feed-2","exp":now_secs() + 600,"publish":["prices.*"]}));
    let mut feed = ws_with(server.addr, Presented::Header(&narrowed));
    feed.ok(json!({"type":"publish","channel":"prices.btc","data":2}));
    let message = feed.fails(
        json!({"type":"publish","channel":"prices","data":3}),
        "forbidden",
    );
    assert!(message.contains("`prices`"), "{message}");

    // A key not on the whitelist makes no publisher.
    let stranger = SigningKey::ed25519("feed");
    let reason = refused(
        server.addr,
        Presented::Header(&stranger.sign(&claims("x", 600))),
    );
    assert!(reason.contains("signature does not verify"), "{reason}");
    let mut other = ws_with(server.addr, Presented::Nothing);
    let message = other.fails(
        json!({"type":"auth","token":stranger.sign(&claims("x", 600))}),
        "auth_failed",
    );
    assert!(message.contains("signature does not verify"), "{message}");
    other.fails(json!({"type":"create","channel":"mine"}), "forbidden");
}
