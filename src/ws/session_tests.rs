//! The session driven with a fake clock and no sockets: every close path,
//! ping and idle, streamed messages, violations in both roles, and a
//! client-role session talking to a server-role session in memory, from
//! the opening handshake to the closing one, fragmented and compressed,
//! with the bytes cut at every position.

use std::time::{Duration, Instant};

use super::*;
use crate::ws::client_handshake::{self, ClientRequest};
use crate::ws::close::parse_close_payload;
use crate::ws::decoder::MESSAGE_HEADROOM;
use crate::ws::deflate::{Deflated, Deflater, Inflater};
use crate::ws::extensions::DeflatePolicy;
use crate::ws::frame::{write_client_frame, FrameHeader, MAX_HEADER_LEN, RSV1};
use crate::ws::handshake::{accept_response, parse_request, validate_upgrade, UpgradePolicy};
use crate::ws::tick::Clock;

const CONFIG: SessionConfig = SessionConfig {
    limits: Limits {
        max_frame_size: 1 << 20,
        max_message_size: 1 << 20,
    },
    ping_interval: Duration::from_secs(2),
    idle_timeout: Duration::from_secs(10),
    close_timeout: Duration::from_secs(1),
};

fn t0() -> Tick {
    Clock::new(Instant::now()).tick(Instant::now())
}

fn ms(at: Tick, ms: u64) -> Tick {
    at.after(Duration::from_millis(ms))
}

/// One end's surroundings: the bytes its control frames became (masked in
/// the client role) and an inflater of its own.
struct Wire {
    role: Role,
    bytes: Vec<u8>,
    controls: Vec<(OpCode, Vec<u8>)>,
    inflater: Inflater,
    next_key: u32,
}

impl Wire {
    fn new(role: Role) -> Self {
        Self {
            role,
            bytes: Vec::new(),
            controls: Vec::new(),
            inflater: Inflater::new(),
            next_key: 0x1234_5678,
        }
    }

    fn key(&mut self) -> [u8; 4] {
        self.next_key = self
            .next_key
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        self.next_key.to_be_bytes()
    }

    /// A frame as this end sends it.
    fn frame(&mut self, opcode: OpCode, fin: bool, rsv: u8, payload: &[u8]) {
        match self.role {
            Role::Client => {
                let key = self.key();
                write_client_frame(&mut self.bytes, opcode, fin, rsv, payload, key);
            }
            Role::Server => {
                let head = FrameHeader {
                    fin,
                    rsv,
                    opcode,
                    mask: None,
                    payload_len: payload.len() as u64,
                };
                let mut buf = [0; MAX_HEADER_LEN];
                let len = head.encode(&mut buf);
                self.bytes.extend_from_slice(&buf[..len]);
                self.bytes.extend_from_slice(payload);
            }
        }
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.bytes)
    }
}

impl Host for Wire {
    fn send_control(&mut self, opcode: OpCode, payload: &[u8]) {
        self.controls.push((opcode, payload.to_vec()));
        self.frame(opcode, true, 0, payload);
    }

    fn inflate(
        &mut self,
        params: DeflateParams,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        // Each side inflates what the other compressed.
        let fresh = match self.role {
            Role::Server => params.client_no_context_takeover,
            Role::Client => params.server_no_context_takeover,
        };
        self.inflater
            .inflate(compressed, MESSAGE_HEADROOM, limit, fresh)
    }
}

/// What came out, owned.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(String),
    Binary(Vec<u8>),
    StreamStart(u64),
    Chunk(Vec<u8>, bool),
    PeerClosed,
    Violated(u16, &'static str),
}

/// Feeds `bytes` to `session` in pieces of `step` bytes, at `now`.
fn feed(
    session: &mut Session,
    wire: &mut Wire,
    bytes: &[u8],
    step: usize,
    mode: ReceiveMode,
    now: Tick,
) -> Vec<Got> {
    let mut got = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        let mut piece = piece.to_vec();
        let mut pos = 0;
        for _ in 0..piece.len() + 1 {
            let (used, received) = session.receive(&mut piece[pos..], mode, now, &CONFIG, wire);
            pos += used;
            match received {
                None => break,
                Some(Received::Message(message)) => got.push(match message.text() {
                    Some(text) => Got::Text(text.to_owned()),
                    None => Got::Binary(message.bytes().to_vec()),
                }),
                Some(Received::StreamStart { len }) => got.push(Got::StreamStart(len)),
                Some(Received::StreamChunk { payload, last }) => {
                    got.push(Got::Chunk(payload.to_vec(), last))
                }
                Some(Received::PeerClosed) => got.push(Got::PeerClosed),
                Some(Received::Violated(v)) => got.push(Got::Violated(v.code.0, v.reason)),
            }
        }
        assert_eq!(pos, piece.len(), "receive must use all of its input");
    }
    got
}

/// Joins adjacent stream chunks so that different cuts compare equal.
fn joined(got: Vec<Got>) -> Vec<Got> {
    let mut out: Vec<Got> = Vec::new();
    for item in got {
        match (out.last_mut(), item) {
            (Some(Got::Chunk(bytes, false)), Got::Chunk(more, last)) => {
                bytes.extend_from_slice(&more);
                if last {
                    let done = std::mem::take(bytes);
                    *out.last_mut().unwrap() = Got::Chunk(done, true);
                }
            }
            (_, item) => out.push(item),
        }
    }
    out
}

fn server(now: Tick) -> (Session, Wire) {
    (
        Session::new(Role::Server, None, now, &CONFIG),
        Wire::new(Role::Server),
    )
}

fn close_code(payload: &[u8]) -> Option<u16> {
    parse_close_payload(payload)
        .unwrap()
        .map(|(code, _)| code.0)
}

#[test]
fn an_idle_session_is_small() {
    assert!(std::mem::size_of::<Session>() <= 24);
}

#[test]
fn pings_while_open_then_closes_an_idle_peer() {
    let start = t0();
    let (mut session, mut wire) = server(start);
    assert_eq!(
        session.next_deadline(start, CONFIG.idle_timeout),
        start.after(CONFIG.ping_interval)
    );
    let early = ms(start, 100);
    assert_eq!(
        session.handle_timeout(early, start, &CONFIG, &mut wire),
        Expiry::Nothing
    );
    let ping_at = session.next_deadline(start, CONFIG.idle_timeout);
    assert_eq!(
        session.handle_timeout(ping_at, start, &CONFIG, &mut wire),
        Expiry::Ping
    );
    assert_eq!(wire.controls, [(OpCode::Ping, vec![])]);
    assert!(session.next_deadline(start, CONFIG.idle_timeout) > ping_at);
    // Hearing from the peer pushes the idle limit back.
    let heard = ms(start, 9_000);
    let idle_at = heard.after(CONFIG.idle_timeout);
    let mut now = ping_at;
    for _ in 0..20 {
        now = session.next_deadline(heard, CONFIG.idle_timeout);
        if session.handle_timeout(now, heard, &CONFIG, &mut wire) == Expiry::Idle {
            break;
        }
    }
    assert_eq!(now, idle_at);
    let (opcode, payload) = wire.controls.last().unwrap();
    assert_eq!((*opcode, close_code(payload)), (OpCode::Close, Some(1008)));
    assert!(!session.can_send());
    // Closing: only the close deadline counts, pings stop.
    let close_at = session.next_deadline(heard, CONFIG.idle_timeout);
    assert_eq!(close_at, idle_at.after(CONFIG.close_timeout));
    assert_eq!(
        session.handle_timeout(ms(idle_at, 500), heard, &CONFIG, &mut wire),
        Expiry::Nothing
    );
    assert_eq!(
        session.handle_timeout(close_at, heard, &CONFIG, &mut wire),
        Expiry::Close
    );
}

/// Every way a session can be closing, built at `start`.
fn closing_sessions(start: Tick) -> Vec<(&'static str, Session, Wire)> {
    let mut all = Vec::new();
    let (mut ours, mut wire) = server(start);
    assert!(ours.close(CloseCode::GOING_AWAY, "bye", start, &CONFIG, &mut wire));
    all.push(("closed by us", ours, wire));

    let (mut theirs, mut wire) = server(start);
    let mut peer = Wire::new(Role::Client);
    peer.frame(OpCode::Close, true, 0, &1000u16.to_be_bytes());
    let got = feed(
        &mut theirs,
        &mut wire,
        &peer.take(),
        64,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::PeerClosed]);
    assert_eq!(
        wire.controls,
        [(OpCode::Close, 1000u16.to_be_bytes().to_vec())]
    );
    all.push(("closed by the peer", theirs, wire));

    let (mut failed, mut wire) = server(start);
    let unmasked = [0x81, 0x01, b'x'];
    let got = feed(
        &mut failed,
        &mut wire,
        &unmasked,
        64,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::Violated(1002, "client frames must be masked")]);
    assert!(failed.is_failed());
    all.push(("failed", failed, wire));

    let (mut both, mut wire) = server(start);
    both.close(CloseCode::NORMAL, "", start, &CONFIG, &mut wire);
    let mut peer = Wire::new(Role::Client);
    peer.frame(OpCode::Close, true, 0, &1000u16.to_be_bytes());
    let later = ms(start, 300);
    let got = feed(
        &mut both,
        &mut wire,
        &peer.take(),
        64,
        ReceiveMode::Whole,
        later,
    );
    assert_eq!(got, [Got::PeerClosed]);
    assert_eq!(wire.controls.len(), 1, "a close answer is not answered");
    assert!(both.is_finished());
    all.push(("closed by us, then the peer", both, wire));
    all
}

#[test]
fn every_close_path_has_the_close_deadline_and_nothing_else() {
    let start = t0();
    for (name, mut session, mut wire) in closing_sessions(start) {
        let close_at = start.after(CONFIG.close_timeout);
        assert_eq!(
            session.next_deadline(start, CONFIG.idle_timeout),
            close_at,
            "{name}"
        );
        assert!(!session.can_send(), "{name}");
        let sent = wire.controls.len();
        // Well past the ping time and the idle limit: it is the close that
        // fires, and no ping is sent.
        for now in [ms(start, 500), close_at, ms(start, 60_000)] {
            let expiry = session.handle_timeout(now, start, &CONFIG, &mut wire);
            let expected = if now >= close_at {
                Expiry::Close
            } else {
                Expiry::Nothing
            };
            assert_eq!(expiry, expected, "{name} at {now:?}");
        }
        assert_eq!(wire.controls.len(), sent, "{name}: nothing more sent");
        // A second close never replaces the first.
        assert!(!session.close(CloseCode::NORMAL, "", start, &CONFIG, &mut wire));
    }
}

/// The hang once reported: the peer's close arrives, and the ping time
/// passes before our answer can be written. The next deadline must be
/// the close deadline, never the ping time already past.
#[test]
fn a_timer_always_moves_forward_or_ends_the_session() {
    let start = t0();
    let moments = [
        0, 999, 1_000, 1_002, 2_001, 2_500, 10_001, 11_002, 3_600_000,
    ];
    for at in moments {
        let now = ms(start, at);
        let mut sessions = closing_sessions(start);
        let (open, wire) = server(start);
        sessions.push(("open", open, wire));
        for (name, mut session, mut wire) in sessions {
            let expiry = session.handle_timeout(now, start, &CONFIG, &mut wire);
            if expiry != Expiry::Close {
                let next = session.next_deadline(start, CONFIG.idle_timeout);
                assert!(
                    next > now,
                    "{name} at +{at} ms: {expiry:?}, re-armed at {next:?}"
                );
            }
        }
    }
}

#[test]
fn data_after_our_close_is_dropped_and_pings_are_not_answered() {
    let start = t0();
    let (mut session, mut wire) = server(start);
    session.close(CloseCode::NORMAL, "done", start, &CONFIG, &mut wire);
    let mut peer = Wire::new(Role::Client);
    peer.frame(OpCode::Text, true, 0, b"late");
    peer.frame(OpCode::Ping, true, 0, b"p");
    peer.frame(OpCode::Binary, true, 0, &[1; 300]);
    let got = feed(
        &mut session,
        &mut wire,
        &peer.take(),
        7,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, []);
    assert_eq!(
        wire.controls.len(),
        1,
        "only our close: {:?}",
        wire.controls
    );
}

#[test]
fn after_a_violation_or_the_peers_close_nothing_is_read() {
    let start = t0();
    for (name, mut session, mut wire) in closing_sessions(start).into_iter().skip(1) {
        let mut peer = Wire::new(Role::Client);
        peer.frame(OpCode::Ping, true, 0, b"p");
        peer.frame(OpCode::Text, true, 0, b"more");
        let sent = wire.controls.len();
        let got = feed(
            &mut session,
            &mut wire,
            &peer.take(),
            3,
            ReceiveMode::Whole,
            start,
        );
        assert_eq!(got, [], "{name}");
        assert_eq!(wire.controls.len(), sent, "{name}");
    }
}

#[test]
fn streamed_messages_come_out_as_they_arrive_and_finish_after_our_close() {
    let start = t0();
    let mode = ReceiveMode::Stream { min_len: 1_000 };
    let payload: Vec<u8> = (0..5_000u32).map(|i| (i % 251) as u8).collect();
    let mut peer = Wire::new(Role::Client);
    peer.frame(OpCode::Binary, true, 0, &payload);
    peer.frame(OpCode::Binary, true, 0, b"small");
    let bytes = peer.take();
    for step in [1, 13, 1_000, bytes.len()] {
        let (mut session, mut wire) = server(start);
        let got = joined(feed(&mut session, &mut wire, &bytes, step, mode, start));
        assert_eq!(
            got,
            [
                Got::StreamStart(5_000),
                Got::Chunk(payload.clone(), true),
                Got::Binary(b"small".to_vec())
            ],
            "pieces of {step}"
        );
    }
    // Our close comes in the middle: the stream's parts keep coming, so
    // the caller can finish what it forwards; a new stream after the
    // close does not start.
    let (mut session, mut wire) = server(start);
    let (first, rest) = bytes.split_at(2_000);
    let mut got = feed(&mut session, &mut wire, first, 2_000, mode, start);
    session.close(CloseCode::GOING_AWAY, "", start, &CONFIG, &mut wire);
    let mut after = Wire::new(Role::Client);
    after.frame(OpCode::Binary, true, 0, &payload);
    let mut rest = rest.to_vec();
    rest.extend_from_slice(&after.take());
    got.extend(feed(&mut session, &mut wire, &rest, 700, mode, start));
    assert_eq!(
        joined(got),
        [Got::StreamStart(5_000), Got::Chunk(payload.clone(), true)]
    );
}

#[test]
fn a_client_reads_unmasked_frames_only() {
    let start = t0();
    let mut client = Session::new(Role::Client, None, start, &CONFIG);
    let mut wire = Wire::new(Role::Client);
    let mut server = Wire::new(Role::Server);
    server.frame(OpCode::Text, true, 0, b"hello");
    let got = feed(
        &mut client,
        &mut wire,
        &server.take(),
        2,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::Text("hello".into())]);
    let mut masked = Wire::new(Role::Client);
    masked.frame(OpCode::Text, true, 0, b"hello");
    let got = feed(
        &mut client,
        &mut wire,
        &masked.take(),
        64,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(
        got,
        [Got::Violated(1002, "server frames must not be masked")]
    );
    let (opcode, payload) = wire.controls.last().unwrap();
    assert_eq!((*opcode, close_code(payload)), (OpCode::Close, Some(1002)));
}

/// Compresses `payload` as one message for `role`'s side of `params`.
fn deflated(deflater: &mut Deflater, payload: &[u8], fresh: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let result = deflater.compress(payload, &mut out, fresh).unwrap();
    assert_eq!(result, Deflated::Compressed);
    out
}

/// Both ends in memory: the opening handshake through the client's and
/// the server's own code, then messages each way (fragmented, compressed,
/// large), a ping, and the closing handshake, with every byte stream cut
/// into pieces of several sizes.
#[test]
fn a_client_and_a_server_session_talk_in_memory() {
    for step in [1, 2, 5, 64, 1 << 20] {
        conversation(step);
    }
}

fn conversation(step: usize) {
    let start = t0();
    let request = ClientRequest {
        host: "127.0.0.1:9",
        path: "/ws",
        deflate: true,
        ..ClientRequest::default()
    };
    let key = client_handshake::new_key([3; 16]);
    let request_bytes = client_handshake::request_bytes(&request, &key);
    let (parsed, _) = parse_request(&request_bytes).unwrap().unwrap();
    let policy = UpgradePolicy {
        deflate: DeflatePolicy::ContextTakeover,
        ..UpgradePolicy::default()
    };
    let accepted = validate_upgrade(&parsed, &policy).unwrap();
    let server_params = accepted.deflate.clone().map(|(params, _)| params);
    let mut response = accept_response(&accepted);
    let head_len = response.len();
    // A server may send its first frame right behind the 101.
    let mut server_wire = Wire::new(Role::Server);
    server_wire.frame(OpCode::Text, true, 0, b"welcome");
    response.extend_from_slice(&server_wire.take());
    let (ours, consumed) = client_handshake::parse_response(&response, &request, &key)
        .unwrap()
        .unwrap();
    assert_eq!(consumed, head_len);
    let params = ours.deflate.expect("deflate agreed");
    assert_eq!(Some(params), server_params);

    let mut server = Session::new(Role::Server, Some(params), start, &CONFIG);
    let mut client = Session::new(Role::Client, Some(params), start, &CONFIG);
    let mut client_wire = Wire::new(Role::Client);
    let got = feed(
        &mut client,
        &mut client_wire,
        &response[consumed..],
        step,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::Text("welcome".into())]);

    // Client → server: a text message in three fragments with a ping
    // between them, then a compressed one, then a large binary one.
    let mut client_deflater = Deflater::new(15, 6);
    client_wire.frame(OpCode::Text, false, 0, "grüß ".as_bytes());
    client_wire.frame(OpCode::Ping, true, 0, b"are you there");
    client_wire.frame(OpCode::Continuation, false, 0, "di".as_bytes());
    client_wire.frame(OpCode::Continuation, true, 0, "ch".as_bytes());
    let text = "a compressible line, ".repeat(40);
    let fresh = params.client_no_context_takeover;
    let compressed = deflated(&mut client_deflater, text.as_bytes(), fresh);
    client_wire.frame(OpCode::Text, true, RSV1, &compressed);
    let again = deflated(&mut client_deflater, text.as_bytes(), fresh);
    assert!(
        again.len() < compressed.len(),
        "context takeover shrinks the repeat"
    );
    client_wire.frame(OpCode::Text, true, RSV1, &again);
    let large: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 256) as u8).collect();
    client_wire.frame(OpCode::Binary, true, 0, &large);
    let got = feed(
        &mut server,
        &mut server_wire,
        &client_wire.take(),
        step,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(
        got,
        [
            Got::Text("grüß dich".into()),
            Got::Text(text.clone()),
            Got::Text(text.clone()),
            Got::Binary(large.clone()),
        ],
        "pieces of {step}"
    );
    assert_eq!(
        server_wire.controls,
        [(OpCode::Pong, b"are you there".to_vec())]
    );

    // Server → client: the pong, a compressed binary message, a
    // fragmented one.
    let mut server_deflater = Deflater::new(params.server_window_bits, 6);
    let binary = vec![42u8; 10_000];
    let fresh = params.server_no_context_takeover;
    let compressed = deflated(&mut server_deflater, &binary, fresh);
    server_wire.frame(OpCode::Binary, true, RSV1, &compressed);
    server_wire.frame(OpCode::Binary, false, 0, b"frag");
    server_wire.frame(OpCode::Continuation, true, 0, b"ments");
    let got = feed(
        &mut client,
        &mut client_wire,
        &server_wire.take(),
        step,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(
        got,
        [Got::Binary(binary), Got::Binary(b"fragments".to_vec())]
    );

    // The server closes; the client answers; both are done.
    assert!(server.close(
        CloseCode::GOING_AWAY,
        "restart",
        start,
        &CONFIG,
        &mut server_wire
    ));
    let got = feed(
        &mut client,
        &mut client_wire,
        &server_wire.take(),
        step,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::PeerClosed]);
    assert!(client.is_finished());
    let (opcode, payload) = client_wire.controls.last().unwrap();
    assert_eq!((*opcode, close_code(payload)), (OpCode::Close, Some(1001)));
    let got = feed(
        &mut server,
        &mut server_wire,
        &client_wire.take(),
        step,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(got, [Got::PeerClosed]);
    assert!(server.is_finished());
    assert!(
        server_wire.take().is_empty(),
        "the answer to a close is not answered"
    );
}

#[test]
fn a_compressed_message_that_is_not_deflate_fails_with_1007() {
    let start = t0();
    let params = DeflateParams {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_window_bits: 15,
    };
    let mut session = Session::new(Role::Server, Some(params), start, &CONFIG);
    let mut wire = Wire::new(Role::Server);
    let mut peer = Wire::new(Role::Client);
    peer.frame(OpCode::Text, true, RSV1, &[0xFF; 20]);
    let got = feed(
        &mut session,
        &mut wire,
        &peer.take(),
        64,
        ReceiveMode::Whole,
        start,
    );
    assert_eq!(
        got,
        [Got::Violated(
            1007,
            "compressed message is not valid deflate data"
        )]
    );
}
