//! Chat over real loopback sockets: `websocat`-style plain-text sessions on
//! `/chat` (one text message per line, with or without a trailing newline),
//! every command and error, nicks freed on disconnect, JSON clients on `/ws`
//! sharing rooms with plain ones, and a slow consumer that loses lines
//! without slowing anyone else and is told how many it lost.
//!
//! Every read has a timeout and every loop a bound, so nothing can hang.

use crate::support::common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

type Ws = tungstenite::WebSocket<TcpStream>;

/// The longest wait for one expected message.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client must stay silent to count as having received nothing.
const QUIET: Duration = Duration::from_millis(200);

const HELP_COMMANDS: [&str; 7] = [
    "/nick NAME",
    "/join ROOM",
    "/leave",
    "/rooms",
    "/who",
    "/me ACTION",
    "/help",
];

// ---------------------------------------------------------------- helpers

fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::Text(text.to_owned())).expect("send");
}

/// The next text message within `within`, skipping pings and pongs
/// (tungstenite answers pings itself); `None` on timeout.
fn try_next_text(ws: &mut Ws, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    for _ in 0..100 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        ws.get_mut().set_read_timeout(Some(left)).unwrap();
        match ws.read() {
            Ok(Message::Text(text)) => return Some(text),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(other) => panic!("expected a text message, got {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
    panic!("100 control frames in a row");
}

fn next_text(ws: &mut Ws) -> String {
    try_next_text(ws, READ_TIMEOUT)
        .unwrap_or_else(|| panic!("no text message within {READ_TIMEOUT:?}"))
}

fn expect_text(ws: &mut Ws, expected: &str) {
    let got = next_text(ws);
    assert_eq!(got, expected);
}

/// Asserts that nothing arrives for a moment.
fn expect_quiet(ws: &mut Ws) {
    if let Some(text) = try_next_text(ws, QUIET) {
        panic!("expected nothing, got {text:?}");
    }
}

/// Reads until a message matches `pred`, at most `max` messages and 10 s.
/// Returns the messages before the match, and the match.
fn read_until(ws: &mut Ws, max: usize, pred: impl Fn(&str) -> bool) -> (Vec<String>, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut before = Vec::new();
    for _ in 0..max {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(text) = try_next_text(ws, left.min(READ_TIMEOUT)) else {
            panic!("no matching message arrived; before it: {before:#?}");
        };
        if pred(&text) {
            return (before, text);
        }
        before.push(text);
    }
    panic!("no matching message within {max} messages: {before:#?}");
}

fn send_json(ws: &mut Ws, request: Value) {
    send(ws, &request.to_string());
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Reads JSON messages until one matches `pred` (at most `max`).
fn read_json_until(ws: &mut Ws, max: usize, pred: impl Fn(&Value) -> bool) -> (Vec<Value>, Value) {
    let (before, found) = read_until(ws, max, |text| pred(&parse_json(text)));
    (
        before.iter().map(|t| parse_json(t)).collect(),
        parse_json(&found),
    )
}

/// The reply (`ack` or `error`) carrying request id `id`, and what came before it.
fn reply_to(ws: &mut Ws, id: &Value) -> (Vec<Value>, Value) {
    read_json_until(ws, 50, |v| {
        matches!(v["type"].as_str(), Some("ack" | "error")) && v["id"] == *id
    })
}

/// Sends a request with `id` and asserts it fails with `code`, echoing the id.
fn expect_json_error(ws: &mut Ws, mut request: Value, id: Value, code: &str) -> Value {
    request["id"] = id.clone();
    send_json(ws, request.clone());
    let (_, reply) = reply_to(ws, &id);
    assert_eq!(reply["type"], "error", "{request} -> {reply}");
    assert_eq!(reply["code"], code, "{request} -> {reply}");
    assert_eq!(reply["id"], id);
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    reply
}

/// Sends a request with `id` and returns its ack (panics on an error reply)
/// with the messages that arrived before it.
fn expect_ack(ws: &mut Ws, mut request: Value, id: Value) -> (Vec<Value>, Value) {
    request["id"] = id.clone();
    send_json(ws, request.clone());
    let (before, reply) = reply_to(ws, &id);
    assert_eq!(reply["type"], "ack", "{request} -> {reply}");
    assert_eq!(reply["request"], request["type"], "{reply}");
    (before, reply)
}

/// Connects a plain client, checks its greeting and lobby join, and returns
/// it with its guest nick. `history` is how many lines the lobby replays.
fn plain_client(server: &TestServer, history: usize) -> (Ws, String) {
    let mut ws = server.client("/chat");
    let greeting = next_text(&mut ws);
    let nick = greeting
        .strip_prefix("* welcome to fanout chat: you are ")
        .and_then(|rest| rest.split_once(" in [lobby]"))
        .map(|(nick, _)| nick.to_owned())
        .unwrap_or_else(|| panic!("unexpected greeting: {greeting}"));
    assert!(nick.starts_with("guest-"), "{greeting}");
    for command in HELP_COMMANDS {
        assert!(
            greeting.contains(command),
            "greeting lacks {command}: {greeting}"
        );
    }
    expect_text(
        &mut ws,
        &format!("* joined [lobby] as {nick}; last {history} message(s):"),
    );
    for _ in 0..history {
        let line = next_text(&mut ws);
        assert!(line.starts_with("[lobby] "), "replayed: {line}");
    }
    expect_text(&mut ws, &format!("[lobby] * {nick} joined"));
    (ws, nick)
}

/// Renames a plain client that is in `room`; everyone in `others` (in the
/// same room) sees it.
fn rename(ws: &mut Ws, others: &mut [&mut Ws], room: &str, old: &str, new: &str) {
    send(ws, &format!("/nick {new}"));
    let line = format!("[{room}] * {old} is now known as {new}");
    expect_text(ws, &line);
    for other in others.iter_mut() {
        expect_text(other, &line);
    }
}

/// Every client in `all` receives exactly `lines`, in order.
fn all_receive(all: &mut [&mut Ws], lines: &[&str]) {
    for ws in all.iter_mut() {
        for line in lines {
            expect_text(ws, line);
        }
    }
}

/// Closes cleanly and waits (bounded) for the server's answer.
fn close(mut ws: Ws) {
    ws.close(None).expect("close");
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    for _ in 0..100 {
        match ws.read() {
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Hangs up every client, then stops the server, which must exit cleanly.
/// (Clients left open would have to answer the shutdown close frame within
/// the shutdown grace, and these do not read any more.)
fn finish(server: TestServer, clients: impl IntoIterator<Item = Ws>) {
    drop(clients.into_iter().collect::<Vec<_>>());
    server.stop().expect("server loop failed");
}

/// A JSON client on `/ws`, past the welcome message.
fn json_client(server: &TestServer) -> Ws {
    let mut ws = server.client("/ws");
    let welcome = parse_json(&next_text(&mut ws));
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    ws
}

// ---------------------------------------------------------------- plain text

#[test]
fn three_websocat_clients_talk_in_order() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    let (mut c, guest_c) = plain_client(&server, 0);
    for ws in [&mut a, &mut b] {
        expect_text(ws, &format!("[lobby] * {guest_c} joined"));
    }
    assert_eq!(
        [&guest_a, &guest_b, &guest_c].map(String::as_str),
        ["guest-1", "guest-2", "guest-3"]
    );

    rename(&mut a, &mut [&mut b, &mut c], "lobby", &guest_a, "ada");
    rename(&mut b, &mut [&mut a, &mut c], "lobby", &guest_b, "bob");
    rename(&mut c, &mut [&mut a, &mut b], "lobby", &guest_c, "cy");

    // websocat sends each typed line as one message ending in "\n" (unless
    // run with --linemode-strip-newlines); other clients send none.
    send(&mut a, "hello everyone\n");
    all_receive(
        &mut [&mut a, &mut b, &mut c],
        &["[lobby] ada: hello everyone"],
    );
    send(&mut b, "hi ada");
    all_receive(&mut [&mut a, &mut b, &mut c], &["[lobby] bob: hi ada"]);
    // Several lines in one message (a paste), LF and CRLF: line by line.
    send(&mut c, "line one\nline two\r\nline three\n");
    all_receive(
        &mut [&mut a, &mut b, &mut c],
        &[
            "[lobby] cy: line one",
            "[lobby] cy: line two",
            "[lobby] cy: line three",
        ],
    );
    send(&mut a, "bye\r\n");
    all_receive(&mut [&mut a, &mut b, &mut c], &["[lobby] ada: bye"]);

    // Back-to-back messages from one client keep their order.
    for i in 0..20 {
        send(&mut b, &format!("burst {i}\n"));
    }
    for ws in [&mut a, &mut b, &mut c] {
        for i in 0..20 {
            expect_text(ws, &format!("[lobby] bob: burst {i}"));
        }
    }

    // A trailing newline is not an extra empty line: nobody got an error.
    for ws in [&mut a, &mut b, &mut c] {
        expect_quiet(ws);
    }
    finish(server, [a, b, c]);
}

#[test]
fn nick_command() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));

    rename(&mut a, &mut [&mut b], "lobby", &guest_a, "ada");

    // Taken, whatever the case: an error to the asker only.
    for taken in ["ada", "ADA", "aDa"] {
        send(&mut b, &format!("/nick {taken}"));
        expect_text(&mut b, &format!("! nick {taken} is taken"));
    }
    // A guest nick in use is taken too.
    send(&mut a, &format!("/nick {}", guest_b.to_uppercase()));
    expect_text(
        &mut a,
        &format!("! nick {} is taken", guest_b.to_uppercase()),
    );

    // Invalid nicks.
    for bad in ["bad.nick", "bad!", "ünïcode", &"n".repeat(25)] {
        send(&mut b, &format!("/nick {bad}"));
        let reply = next_text(&mut b);
        assert!(
            reply.starts_with(&format!("! invalid nick `{bad}`")),
            "{bad}: {reply}"
        );
    }
    send(&mut b, "/nick two words");
    assert!(next_text(&mut b).starts_with("! invalid nick `two words`"));
    send(&mut b, "/nick");
    expect_text(&mut b, "! usage: /nick NAME");
    send(&mut b, "/nick   ");
    expect_text(&mut b, "! usage: /nick NAME");
    // Renaming to yourself.
    send(&mut a, "/nick ada");
    expect_text(&mut a, "! you are already ada");
    expect_quiet(&mut a);

    // Still connected and still guest-2 after all those errors.
    send(&mut b, "still here");
    let line = format!("[lobby] {guest_b}: still here");
    all_receive(&mut [&mut a, &mut b], &[&line]);

    // Longest valid nick; changing only the case of your own nick works.
    let longest = "N".repeat(24);
    rename(&mut b, &mut [&mut a], "lobby", &guest_b, &longest);
    rename(&mut a, &mut [&mut b], "lobby", "ada", "Ada");
    // The old spelling is free again only once renamed away.
    rename(&mut a, &mut [&mut b], "lobby", "Ada", "ada_2");
    rename(&mut b, &mut [&mut a], "lobby", &longest, "ADA");
    send(&mut a, "/NICK ada");
    expect_text(&mut a, "! nick ada is taken");
    finish(server, [a, b]);
}

#[test]
fn join_moves_rooms_replays_history_and_announces() {
    let server = TestServer::start(&["--chat-history", "3"]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    rename(&mut a, &mut [&mut b], "lobby", &guest_a, "ada");
    rename(&mut b, &mut [&mut a], "lobby", &guest_b, "bob");

    // Five lines (one of them /me); only the last 3 are kept. Join, leave and
    // nick announcements are not history.
    for i in 1..=4 {
        send(&mut a, &format!("m{i}"));
        all_receive(&mut [&mut a, &mut b], &[&format!("[lobby] ada: m{i}")]);
    }
    send(&mut b, "/me waves");
    all_receive(&mut [&mut a, &mut b], &["[lobby] * bob waves"]);

    // A newcomer gets the lobby's last 3 lines, in order.
    let mut c = server.client("/chat");
    let greeting = next_text(&mut c);
    assert!(
        greeting.contains("you are guest-3 in [lobby]"),
        "{greeting}"
    );
    for line in [
        "* joined [lobby] as guest-3; last 3 message(s):",
        "[lobby] ada: m3",
        "[lobby] ada: m4",
        "[lobby] * bob waves",
        "[lobby] * guest-3 joined",
    ] {
        expect_text(&mut c, line);
    }
    all_receive(&mut [&mut a, &mut b], &["[lobby] * guest-3 joined"]);

    // ada moves to a new room: joins it (empty history), the lobby sees her leave.
    send(&mut a, "/join dev");
    expect_text(&mut a, "* joined [dev] as ada; last 0 message(s):");
    expect_text(&mut a, "[dev] * ada joined");
    all_receive(&mut [&mut b, &mut c], &["[lobby] * ada left"]);
    expect_quiet(&mut a);

    // Lines stay in their room.
    send(&mut a, "only dev hears this");
    expect_text(&mut a, "[dev] ada: only dev hears this");
    send(&mut b, "only the lobby hears this");
    all_receive(
        &mut [&mut b, &mut c],
        &["[lobby] bob: only the lobby hears this"],
    );
    expect_quiet(&mut a);

    // bob follows (with "#room", IRC style): dev's history is replayed,
    // both rooms are told.
    send(&mut b, "/join #dev");
    for line in [
        "* joined [dev] as bob; last 1 message(s):",
        "[dev] ada: only dev hears this",
        "[dev] * bob joined",
    ] {
        expect_text(&mut b, line);
    }
    expect_text(&mut a, "[dev] * bob joined");
    expect_text(&mut c, "[lobby] * bob left");

    // More than 3 lines in dev: a later joiner gets the last 3.
    for i in 1..=4 {
        send(&mut b, &format!("d{i}"));
        all_receive(&mut [&mut a, &mut b], &[&format!("[dev] bob: d{i}")]);
    }
    send(&mut c, "/JOIN dev");
    for line in [
        "* joined [dev] as guest-3; last 3 message(s):",
        "[dev] bob: d2",
        "[dev] bob: d3",
        "[dev] bob: d4",
        "[dev] * guest-3 joined",
    ] {
        expect_text(&mut c, line);
    }
    all_receive(&mut [&mut a, &mut b], &["[dev] * guest-3 joined"]);

    // Errors: already there, invalid names, no argument. Nobody moves.
    send(&mut a, "/join dev");
    expect_text(&mut a, "! you are already in [dev]");
    for bad in ["Dev", "a.b", "sp ace", "émoji", &"r".repeat(33)] {
        send(&mut a, &format!("/join {bad}"));
        let reply = next_text(&mut a);
        assert!(
            reply.starts_with(&format!("! invalid room name `{bad}`")),
            "{bad}: {reply}"
        );
    }
    send(&mut a, "/join");
    expect_text(&mut a, "! usage: /join ROOM");
    send(&mut a, "/who");
    expect_text(&mut a, "* in [dev]: ada, bob, guest-3");
    for ws in [&mut b, &mut c] {
        expect_quiet(ws);
    }

    // Back to the lobby: its history is still there.
    send(&mut a, "/join lobby");
    for line in [
        "* joined [lobby] as ada; last 3 message(s):",
        "[lobby] ada: m4",
        "[lobby] * bob waves",
        "[lobby] bob: only the lobby hears this",
        "[lobby] * ada joined",
    ] {
        expect_text(&mut a, line);
    }
    all_receive(&mut [&mut b, &mut c], &["[dev] * ada left"]);
    finish(server, [a, b, c]);
}

#[test]
fn leave_then_talking_is_an_error() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));

    send(&mut a, "/leave");
    expect_text(&mut a, "* you left [lobby]; /join ROOM to talk again");
    expect_text(&mut b, &format!("[lobby] * {guest_a} left"));

    let not_in_a_room = "! you are not in a room: /join ROOM";
    for line in ["anyone there?", "/me waits", "/who", "/leave", "/part"] {
        send(&mut a, line);
        expect_text(&mut a, not_in_a_room);
    }
    expect_quiet(&mut b);

    // Still a member: /rooms works, the nick is still held, renaming is told.
    send(&mut a, "/rooms");
    expect_text(&mut a, "* rooms: [lobby] (1)");
    send(&mut b, &format!("/nick {}", guest_a.to_uppercase()));
    expect_text(
        &mut b,
        &format!("! nick {} is taken", guest_a.to_uppercase()),
    );
    send(&mut a, "/nick ada");
    expect_text(&mut a, "* you are now ada");
    expect_quiet(&mut b);

    send(&mut a, "/join lobby");
    for line in [
        "* joined [lobby] as ada; last 0 message(s):",
        "[lobby] * ada joined",
    ] {
        expect_text(&mut a, line);
    }
    expect_text(&mut b, "[lobby] * ada joined");
    send(&mut a, "back");
    all_receive(&mut [&mut a, &mut b], &["[lobby] ada: back"]);

    // /part is /leave.
    send(&mut b, "/part");
    expect_text(&mut b, "* you left [lobby]; /join ROOM to talk again");
    expect_text(&mut a, &format!("[lobby] * {guest_b} left"));
    finish(server, [a, b]);
}

#[test]
fn rooms_who_me_help_slash_and_unknown_commands() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    let (mut c, guest_c) = plain_client(&server, 0);
    all_receive(
        &mut [&mut a, &mut b],
        &[&format!("[lobby] * {guest_c} joined")],
    );
    rename(&mut a, &mut [&mut b, &mut c], "lobby", &guest_a, "zed");
    rename(&mut b, &mut [&mut a, &mut c], "lobby", &guest_b, "Amy");
    send(&mut c, "/join dev");
    expect_text(&mut c, "* joined [dev] as guest-3; last 0 message(s):");
    expect_text(&mut c, "[dev] * guest-3 joined");
    all_receive(&mut [&mut a, &mut b], &["[lobby] * guest-3 left"]);

    // /rooms (and its alias /list): every room with its head count, sorted.
    for command in ["/rooms", "/LIST", "/rooms with ignored words"] {
        send(&mut a, command);
        expect_text(&mut a, "* rooms: [dev] (1), [lobby] (2)");
    }
    // /who (and /names): the room's nicks, sorted.
    send(&mut a, "/who");
    expect_text(&mut a, "* in [lobby]: Amy, zed");
    send(&mut c, "/names");
    expect_text(&mut c, "* in [dev]: guest-3");

    // /me reaches the room.
    send(&mut a, "/me waves at  everyone ");
    all_receive(&mut [&mut a, &mut b], &["[lobby] * zed waves at  everyone"]);
    send(&mut a, "/me");
    expect_text(&mut a, "! usage: /me ACTION");
    send(&mut a, "/me    ");
    expect_text(&mut a, "! usage: /me ACTION");

    // /help (and /?): the command list.
    for command in ["/help", "/?"] {
        send(&mut b, command);
        let help = next_text(&mut b);
        assert!(help.starts_with("* "), "{help}");
        for listed in HELP_COMMANDS {
            assert!(help.contains(listed), "help lacks {listed}: {help}");
        }
    }

    // "//text" says "/text"; "///" says "//".
    send(&mut b, "//etc/passwd is a path");
    all_receive(
        &mut [&mut a, &mut b],
        &["[lobby] Amy: /etc/passwd is a path"],
    );
    send(&mut b, "///");
    all_receive(&mut [&mut a, &mut b], &["[lobby] Amy: //"]);

    // Unknown commands: an error, not a line said to the room.
    for (line, name) in [("/dance now", "dance"), ("/quit", "quit"), ("/", "")] {
        send(&mut a, line);
        let reply = next_text(&mut a);
        assert!(
            reply.starts_with(&format!("! unknown command /{name}")),
            "{line}: {reply}"
        );
    }
    // Commands are case-insensitive.
    send(&mut a, "/WHO");
    expect_text(&mut a, "* in [lobby]: Amy, zed");
    send(&mut a, "/Me shouts");
    all_receive(&mut [&mut a, &mut b], &["[lobby] * zed shouts"]);
    for ws in [&mut a, &mut b, &mut c] {
        expect_quiet(ws);
    }
    finish(server, [a, b, c]);
}

#[test]
fn empty_and_overlong_lines_are_one_line_errors() {
    let server = TestServer::start(&["--chat-max-line", "50"]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    rename(&mut a, &mut [&mut b], "lobby", &guest_a, "ada");

    let empty = "! empty line: type something to say, or /help";
    for line in ["", "\n", "\r\n", "   ", " \t \n"] {
        send(&mut a, line);
        expect_text(&mut a, empty);
    }
    let exactly = "x".repeat(50);
    send(&mut a, &format!("{exactly}\n"));
    all_receive(&mut [&mut a, &mut b], &[&format!("[lobby] ada: {exactly}")]);

    send(&mut a, &format!("{}\n", "y".repeat(51)));
    expect_text(&mut a, "! line too long: 51 bytes, at most 50");
    // The limit is in bytes: 26 two-byte characters are too long.
    send(&mut a, &"é".repeat(26));
    expect_text(&mut a, "! line too long: 52 bytes, at most 50");
    // Commands count too.
    send(&mut a, &format!("/me {}", "z".repeat(47)));
    expect_text(&mut a, "! line too long: 51 bytes, at most 50");
    // One huge message is still one error line.
    send(&mut a, &"w".repeat(100_000));
    let reply = next_text(&mut a);
    assert_eq!(reply, "! line too long: 100000 bytes, at most 50");
    expect_quiet(&mut b);

    // In a multi-line message each bad line is its own error, the rest is said.
    send(&mut a, &format!("first\n\n{}\nlast\n", "v".repeat(60)));
    expect_text(&mut a, "[lobby] ada: first");
    expect_text(&mut a, empty);
    expect_text(&mut a, "! line too long: 60 bytes, at most 50");
    expect_text(&mut a, "[lobby] ada: last");
    expect_text(&mut b, "[lobby] ada: first");
    expect_text(&mut b, "[lobby] ada: last");

    // Binary is not chat, but is not fatal either.
    a.send(Message::Binary(b"hello".to_vec())).unwrap();
    let reply = next_text(&mut a);
    assert!(reply.starts_with("! binary messages"), "{reply}");

    // Still usable.
    send(&mut a, "still here");
    all_receive(&mut [&mut a, &mut b], &["[lobby] ada: still here"]);
    for ws in [&mut a, &mut b] {
        expect_quiet(ws);
    }
    finish(server, [a, b]);
}

#[test]
fn nicks_are_freed_when_clients_disconnect() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    rename(&mut a, &mut [&mut b], "lobby", &guest_a, "ada");

    // The TCP connection ends without a close frame (websocat killed).
    a.get_mut()
        .shutdown(std::net::Shutdown::Both)
        .expect("shutdown");
    drop(a);
    expect_text(&mut b, "[lobby] * ada left");
    send(&mut b, "/who");
    expect_text(&mut b, &format!("* in [lobby]: {guest_b}"));
    // Someone else can take the nick, in any spelling.
    rename(&mut b, &mut [], "lobby", &guest_b, "ADA");

    // A newcomer cannot take it while b holds it, and gets a fresh guest nick.
    let (mut c, guest_c) = plain_client(&server, 0);
    assert_ne!(guest_c, guest_a);
    expect_text(&mut b, &format!("[lobby] * {guest_c} joined"));
    send(&mut c, "/nick ada");
    expect_text(&mut c, "! nick ada is taken");

    // A JSON client's nick is freed too, and its rooms told.
    let mut j = json_client(&server);
    expect_ack(&mut j, json!({"type": "chat.nick", "nick": "jo"}), json!(1));
    expect_ack(
        &mut j,
        json!({"type": "chat.join", "room": "lobby"}),
        json!(2),
    );
    all_receive(&mut [&mut b, &mut c], &["[lobby] * jo joined"]);
    send(&mut c, "/nick JO");
    expect_text(&mut c, "! nick JO is taken");
    drop(j);
    all_receive(&mut [&mut b, &mut c], &["[lobby] * jo left"]);
    rename(&mut c, &mut [&mut b], "lobby", &guest_c, "JO");
    finish(server, [b, c]);
}

/// Same as above with a proper close handshake (websocat on Ctrl-D): the
/// room must be told at once, not at the next unrelated event.
#[test]
fn clean_close_is_announced_promptly() {
    let server = TestServer::start(&[]);
    let (mut a, guest_a) = plain_client(&server, 0);
    let (mut b, guest_b) = plain_client(&server, 0);
    expect_text(&mut a, &format!("[lobby] * {guest_b} joined"));
    rename(&mut a, &mut [&mut b], "lobby", &guest_a, "ada");

    close(a);
    let left = try_next_text(&mut b, READ_TIMEOUT);
    // Announced or not, the nick is free: b takes it (which also flushes a
    // late announcement, shown in the failure message).
    send(&mut b, "/nick Ada");
    let (before, _) = read_until(&mut b, 5, |t| t.contains("is now known as Ada"));
    assert_eq!(
        left.as_deref(),
        Some("[lobby] * ada left"),
        "nothing announced within {READ_TIMEOUT:?} of a clean close; \
         after the next message the room got: {before:?}"
    );
    finish(server, [b]);
}

// ---------------------------------------------------------------- JSON

#[test]
fn json_and_plain_clients_share_a_room() {
    let server = TestServer::start(&[]);
    let (mut p, guest_p) = plain_client(&server, 0);
    rename(&mut p, &mut [], "lobby", &guest_p, "pat");
    send(&mut p, "said before jo came");
    expect_text(&mut p, "[lobby] pat: said before jo came");

    let mut j = json_client(&server);
    // A nick before joining any room: acked, nobody is told.
    let (before, ack) = expect_ack(&mut j, json!({"type": "chat.nick", "nick": "jo"}), json!(1));
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(ack["nick"], "jo");
    assert_eq!(ack["previous"], "guest-2");
    expect_quiet(&mut p);

    // Join: the ack (listing members) comes first, then the replayed
    // history, then the room's announcement of jo, which jo sees too.
    let (before, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.join", "room": "lobby"}),
        json!("join-1"),
    );
    assert!(before.is_empty(), "nothing precedes the ack: {before:?}");
    assert_eq!(ack["room"], "lobby");
    assert_eq!(ack["nick"], "jo");
    assert_eq!(ack["members"], json!(["jo", "pat"]));
    assert_eq!(ack["replayed"], 1);
    let (history, joined) = read_json_until(&mut j, 10, |v| v["kind"] == "join");
    assert_eq!(history.len(), 1, "{history:?}");
    let replayed = &history[0];
    assert_eq!(replayed["type"], "chat");
    assert_eq!(replayed["kind"], "say");
    assert_eq!(replayed["room"], "lobby");
    assert_eq!(replayed["nick"], "pat");
    assert_eq!(replayed["text"], "said before jo came");
    assert!(replayed["ts"].is_u64(), "{replayed}");
    assert_eq!(
        (joined["nick"].as_str(), joined["room"].as_str()),
        (Some("jo"), Some("lobby"))
    );
    expect_text(&mut p, "[lobby] * jo joined");

    // JSON to plain.
    let (before, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "hi from json"}),
        json!(2),
    );
    assert_eq!(ack["room"], "lobby");
    assert!(
        before
            .iter()
            .any(|v| v["kind"] == "say" && v["nick"] == "jo" && v["text"] == "hi from json"),
        "{before:?}"
    );
    expect_text(&mut p, "[lobby] jo: hi from json");

    // Plain to JSON: say, /me, several lines in one message.
    send(&mut p, "hi from plain\n");
    expect_text(&mut p, "[lobby] pat: hi from plain");
    let line = parse_json(&next_text(&mut j));
    assert_eq!(line["type"], "chat");
    assert_eq!(line["kind"], "say");
    assert_eq!(line["room"], "lobby");
    assert_eq!(line["nick"], "pat");
    assert_eq!(line["text"], "hi from plain");
    let ts = line["ts"].as_u64().expect("ts");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        ts <= now_ms && now_ms - ts < 60_000,
        "ts {ts} vs now {now_ms}"
    );
    send(&mut p, "/me waves\nsecond line");
    expect_text(&mut p, "[lobby] * pat waves");
    expect_text(&mut p, "[lobby] pat: second line");
    let me = parse_json(&next_text(&mut j));
    assert_eq!(
        (&me["kind"], &me["nick"], &me["text"]),
        (&json!("me"), &json!("pat"), &json!("waves"))
    );
    let second = parse_json(&next_text(&mut j));
    assert_eq!(second["text"], "second line");

    // Renames both ways.
    let (before, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.nick", "nick": "joan"}),
        json!(3),
    );
    assert_eq!(
        (&ack["nick"], &ack["previous"]),
        (&json!("joan"), &json!("jo"))
    );
    assert!(
        before
            .iter()
            .any(|v| v["kind"] == "nick" && v["nick"] == "jo" && v["text"] == "joan"),
        "{before:?}"
    );
    expect_text(&mut p, "[lobby] * jo is now known as joan");
    send(&mut p, "/nick ada");
    expect_text(&mut p, "[lobby] * pat is now known as ada");
    let renamed = parse_json(&next_text(&mut j));
    assert_eq!(
        (&renamed["kind"], &renamed["nick"], &renamed["text"]),
        (&json!("nick"), &json!("pat"), &json!("ada"))
    );

    // who and rooms.
    let (_, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.who", "room": "lobby"}),
        json!(4),
    );
    assert_eq!(ack["room"], "lobby");
    assert_eq!(ack["members"], json!(["ada", "joan"]));
    let (_, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.join", "room": "dev"}),
        json!(5),
    );
    assert_eq!(ack["members"], json!(["joan"]));
    assert_eq!(ack["replayed"], 0);
    let (_, ack) = expect_ack(&mut j, json!({"type": "chat.rooms"}), json!(6));
    assert_eq!(
        ack["rooms"],
        json!([{"room": "dev", "members": 1}, {"room": "lobby", "members": 2}])
    );
    send(&mut p, "/rooms");
    expect_text(&mut p, "* rooms: [dev] (1), [lobby] (2)");
    // A JSON client may be in several rooms; plain lines in the lobby still reach it.
    send(&mut p, "still see me?");
    expect_text(&mut p, "[lobby] ada: still see me?");
    let (_, line) = read_json_until(&mut j, 10, |v| v["type"] == "chat" && v["kind"] == "say");
    assert_eq!(
        (&line["room"], &line["text"]),
        (&json!("lobby"), &json!("still see me?"))
    );

    // Leave: acked, the plain room is told; saying there is now refused.
    let (_, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.leave", "room": "lobby"}),
        json!(7),
    );
    assert_eq!(ack["room"], "lobby");
    expect_text(&mut p, "[lobby] * joan left");
    expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "hello?"}),
        json!(8),
        "not_found",
    );
    send(&mut p, "/who");
    expect_text(&mut p, "* in [lobby]: ada");

    // Closing the JSON client frees its nick for a plain user.
    close(j);
    rename(&mut p, &mut [], "lobby", "ada", "JOAN");
    finish(server, [p]);
}

#[test]
fn json_chat_errors_echo_the_id_and_carry_a_code() {
    let server = TestServer::start(&["--chat-max-line", "50"]);
    let (mut p, guest_p) = plain_client(&server, 0);
    rename(&mut p, &mut [], "lobby", &guest_p, "pat");
    let mut j = json_client(&server);

    // Not a member of the room.
    let e = expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "hi"}),
        json!("say-1"),
        "not_found",
    );
    assert!(e["message"].as_str().unwrap().contains("lobby"), "{e}");
    expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "nowhere", "text": "hi"}),
        json!({"nested": [1, 2]}),
        "not_found",
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.leave", "room": "lobby"}),
        json!(2),
        "not_found",
    );
    // Bad room names.
    for (i, bad) in ["Lobby", "a b", "", "dots.not.allowed", &"r".repeat(33)]
        .into_iter()
        .enumerate()
    {
        expect_json_error(
            &mut j,
            json!({"type": "chat.join", "room": bad}),
            json!(format!("room-{i}")),
            "invalid_field",
        );
    }
    // Nicks: taken (case-insensitively), invalid.
    for (i, taken) in ["pat", "PAT"].into_iter().enumerate() {
        expect_json_error(
            &mut j,
            json!({"type": "chat.nick", "nick": taken}),
            json!(100 + i),
            "conflict",
        );
    }
    for (i, bad) in ["two words", "", "new\nline", &"n".repeat(25)]
        .into_iter()
        .enumerate()
    {
        expect_json_error(
            &mut j,
            json!({"type": "chat.nick", "nick": bad}),
            json!(200 + i),
            "invalid_field",
        );
    }
    // Missing and mistyped fields.
    expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "lobby"}),
        json!(300),
        "missing_field",
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.join"}),
        json!(301),
        "missing_field",
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.join", "room": 7}),
        json!(302),
        "invalid_field",
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.shout"}),
        json!(303),
        "unknown_type",
    );

    // Joined: already joined, empty and over-long text.
    let (_, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.join", "room": "lobby"}),
        json!(400),
    );
    assert_eq!(ack["members"].as_array().map(Vec::len), Some(2), "{ack}");
    expect_text(
        &mut p,
        &format!("[lobby] * {} joined", ack["nick"].as_str().unwrap()),
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.join", "room": "lobby"}),
        json!(401),
        "conflict",
    );
    expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "  "}),
        json!(402),
        "invalid_field",
    );
    let e = expect_json_error(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "x".repeat(51)}),
        json!(403),
        "invalid_field",
    );
    assert!(e["message"].as_str().unwrap().contains("text"), "{e}");
    // None of that reached the plain client, and both still work.
    expect_quiet(&mut p);
    expect_ack(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "fine"}),
        json!(404),
    );
    expect_text(
        &mut p,
        &format!("[lobby] {}: fine", ack["nick"].as_str().unwrap()),
    );
    finish(server, [p, j]);
}

/// A plain client reads one message as one line; a JSON `chat.say` with a
/// newline in its text must not let one user print a second, forged line
/// (e.g. `[lobby] pat: ...`) on every `websocat` screen. Either refusing
/// the text or splitting it like plain input would do.
#[test]
fn json_text_cannot_forge_plain_lines() {
    let server = TestServer::start(&[]);
    let (mut p, guest_p) = plain_client(&server, 0);
    rename(&mut p, &mut [], "lobby", &guest_p, "pat");
    let mut j = json_client(&server);
    let (_, ack) = expect_ack(
        &mut j,
        json!({"type": "chat.join", "room": "lobby"}),
        json!(1),
    );
    let jo = ack["nick"].as_str().unwrap().to_owned();
    expect_text(&mut p, &format!("[lobby] * {jo} joined"));

    send_json(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "id": 2,
               "text": "innocent\n[lobby] pat: my password is hunter2"}),
    );
    let (_, reply) = reply_to(&mut j, &json!(2));
    expect_ack(
        &mut j,
        json!({"type": "chat.say", "room": "lobby", "text": "sentinel"}),
        json!(3),
    );
    let (before, _) = read_until(&mut p, 10, |t| t == format!("[lobby] {jo}: sentinel"));
    for text in &before {
        assert!(
            !text.contains('\n'),
            "a plain client got a multi-line message (reply to the JSON client: {reply}): {text:?}"
        );
    }
    finish(server, [p, j]);
}

// ---------------------------------------------------------------- slow consumer

/// A raw WebSocket client of `/chat` whose kernel receive buffer is small
/// (set before connecting, so the TCP window stays small), so that not
/// reading quickly fills the server's queue for it.
fn raw_chat_client(addr: SocketAddr, rcvbuf: libc::c_int) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 loopback expected: {addr}")
    };
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is
    // fully initialised and its size given.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const libc::c_int).cast(),
            size,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = v4.port().to_be();
        sin.sin_addr = libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        stream
    };
    stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut stream = stream;
    let head = UPGRADE_HEAD.replacen("GET /echo ", "GET /chat ", 1);
    stream.write_all(head.as_bytes()).unwrap();
    let head = read_http_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// The next text frame's payload from a raw client (pings skipped).
fn raw_next_text(stream: &mut TcpStream) -> String {
    for _ in 0..100 {
        let frame = read_frame(stream).expect("no frame within the read timeout");
        match frame.opcode() {
            1 => return String::from_utf8(frame.payload).expect("UTF-8"),
            9 | 10 => {}
            op => panic!("unexpected opcode {op}: {frame:?}"),
        }
    }
    panic!("100 control frames in a row");
}

/// How many lines of `line_len` bytes surely overflow what sits between the
/// server and a client that does not read: the server's queue (64 KiB here)
/// plus its kernel send buffer, which on loopback autotunes up to
/// `tcp_wmem`'s maximum (4 MiB by default; about 2.9 MB were seen filled).
/// Twice that maximum, so 2000 x 900 bytes is not enough on Linux; at most
/// 20,000 lines (18 MB) to keep the test bounded.
fn flood_lines(line_len: usize, batch: usize) -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let lines = (2 * wmem_max / line_len).clamp(2000, 20_000);
    lines.div_ceil(batch) * batch
}

#[test]
fn slow_plain_consumer_loses_lines_without_slowing_anyone_and_is_told() {
    let lines = flood_lines(LINE_LEN, BATCH);
    const LINE_LEN: usize = 900;
    const BATCH: usize = 50;
    const PROMPT: Duration = Duration::from_secs(5);
    let server = TestServer::start(&["--max-outbound-buffer", "64KiB"]);

    let (mut sender, guest_s) = plain_client(&server, 0);
    let (mut reader, guest_r) = plain_client(&server, 0);
    expect_text(&mut sender, &format!("[lobby] * {guest_r} joined"));
    rename(&mut sender, &mut [&mut reader], "lobby", &guest_s, "sender");
    rename(&mut reader, &mut [&mut sender], "lobby", &guest_r, "reader");

    let mut slow = raw_chat_client(server.addr, 4096);
    let greeting = raw_next_text(&mut slow);
    assert!(greeting.starts_with("* welcome"), "{greeting}");
    let slow_nick = greeting
        .split("you are ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .to_owned();
    for line in [
        format!("* joined [lobby] as {slow_nick}; last 0 message(s):"),
        format!("[lobby] * {slow_nick} joined"),
    ] {
        assert_eq!(raw_next_text(&mut slow), line);
    }
    for ws in [&mut sender, &mut reader] {
        expect_text(ws, &format!("[lobby] * {slow_nick} joined"));
    }
    // From here on the slow client reads nothing until the flood is over.

    let line_of = |i: usize| {
        let head = format!("{i:05} ");
        format!("{head}{}", "x".repeat(LINE_LEN - head.len()))
    };
    let started = Instant::now();
    let mut slowest_batch = Duration::ZERO;
    for first in (0..lines).step_by(BATCH) {
        let batch_started = Instant::now();
        for i in first..first + BATCH {
            send(&mut sender, &format!("{}\n", line_of(i)));
        }
        // Both the sender and the reader get the whole batch, in order, promptly.
        for ws in [&mut sender, &mut reader] {
            for i in first..first + BATCH {
                let got = next_text(ws);
                assert!(
                    got == format!("[lobby] sender: {}", line_of(i)),
                    "line {i}: expected it in order, got {:?}",
                    &got[..got.len().min(80)]
                );
            }
        }
        let took = batch_started.elapsed();
        slowest_batch = slowest_batch.max(took);
        assert!(
            took < PROMPT,
            "lines {first}..{}: took {took:?} to reach a reading client while another did not read",
            first + BATCH
        );
    }
    eprintln!(
        "{lines} lines of {LINE_LEN} bytes in {:?}, slowest batch of {BATCH}: {slowest_batch:?}",
        started.elapsed()
    );
    // Nobody that reads was told of drops.
    for ws in [&mut sender, &mut reader] {
        expect_quiet(ws);
    }

    // The slow client now reads: every line either arrives (in order) or is
    // counted in a dropped notice, and at least one was dropped.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut received = 0usize;
    let mut dropped = 0usize;
    let mut notices = Vec::new();
    let mut last_index: Option<usize> = None;
    let mut frames = 0;
    let reading_from = Instant::now();
    let mut last_line_at = None;
    let mut notice_at = None;
    while received + dropped < lines {
        assert!(
            Instant::now() < deadline && frames < 10 * lines,
            "slow client: {received} lines and {dropped} dropped of {lines} after {frames} messages; notices: {notices:?}"
        );
        frames += 1;
        let text = raw_next_text(&mut slow);
        if let Some(line) = text.strip_prefix("[lobby] sender: ") {
            let index: usize = line[..5].parse().unwrap();
            assert_eq!(line, line_of(index));
            assert!(
                last_index.is_none_or(|last| index > last),
                "out of order: {index} after {last_index:?}"
            );
            last_index = Some(index);
            received += 1;
            last_line_at = Some(reading_from.elapsed());
        } else if let Some(rest) = text.strip_prefix("! ") {
            let (count, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            assert!(
                tail.starts_with("chat line(s) were dropped"),
                "unexpected error line: {text}"
            );
            let count: usize = count.parse().unwrap_or_else(|_| panic!("{text}"));
            assert!(count > 0, "{text}");
            dropped += count;
            notices.push(text);
            notice_at = Some(reading_from.elapsed());
        } else {
            panic!("unexpected line for the slow client: {text}");
        }
    }
    eprintln!(
        "slow client: {received} received (last after {last_line_at:?}), {dropped} dropped, \
         notices: {notices:?} (last after {notice_at:?})"
    );
    assert!(
        dropped > 0,
        "nothing was dropped for a client that never read"
    );
    assert!(!notices.is_empty());
    assert_eq!(received + dropped, lines);

    // The slow client is still a working member, and the server still accepts.
    slow.write_all(&client_frame(0x81, b"I am back")).unwrap();
    let back = format!("[lobby] {slow_nick}: I am back");
    assert_eq!(raw_next_text(&mut slow), back);
    all_receive(&mut [&mut sender, &mut reader], &[&back]);
    let (late, late_nick) = plain_client(&server, 20);
    for ws in [&mut sender, &mut reader] {
        expect_text(ws, &format!("[lobby] * {late_nick} joined"));
    }
    assert_eq!(
        raw_next_text(&mut slow),
        format!("[lobby] * {late_nick} joined")
    );
    drop(slow);
    finish(server, [sender, reader, late]);
}
