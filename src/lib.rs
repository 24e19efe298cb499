//! fanout: a single-threaded mio WebSocket server for chat rooms, pub/sub
//! channels and market data.
//!
//! What the server does for its clients (endpoints, protocol, flags) is the
//! README's subject; this page is the design: how the code is laid out, how
//! the loop runs, and what a connection costs. Scale-out over Redis is
//! described in [`cluster`]. The measured figures quoted here, with their
//! dates and commands, are in `benches/README.md`; the test suite is
//! described in `tests/README.md`.
//!
//! # Layout
//!
//! The modules: [`ws`], [`server`], [`app`], [`cluster`], [`config`],
//! [`metrics`].
//!
//! ```text
//! src/ws/       the protocol, sans-IO: bytes and time in, events and bytes out
//!   session.rs         one connection after the upgrade, either role: the
//!                      close handshake and its deadline, ping and idle,
//!                      failing on a violation, control-frame answers,
//!                      inflating, streamed receiving (tests beside it in
//!                      session_tests.rs, a client and a server in memory)
//!   handshake.rs       HTTP upgrade parsing (httparse), validation, responses
//!   client_handshake.rs the client's upgrade request and §4.1's checks of
//!                      the answer
//!   frame.rs           frame header decode/encode (byteorder), client masking
//!   mask.rs            unmasking, a machine word at a time
//!   utf8.rs            UTF-8 validation that resumes across chunks
//!   decoder.rs         frames to messages, every receive rule and limit
//!   extensions.rs      permessage-deflate negotiation (Sec-WebSocket-Extensions)
//!   deflate.rs         per-message deflate/inflate (flate2, zlib-rs backend)
//!   close.rs           close codes and payloads
//!   close_handshake.rs the closing handshake state
//!   tick.rs            millisecond ticks: the time sessions are given
//! src/server/   the mio shell
//!   event_loop.rs      poll, accept, read (plain and the TLS pump), timers,
//!                      flush, the slab, shutdown: plumbing only
//!   event_loop/http.rs the request head, the upgrade, plain HTTP answers
//!                      (page, healthz, readyz, metrics)
//!   event_loop/websocket.rs  an upgraded connection's bytes through its session
//!   event_loop/reflect.rs    /echo's reflection (streamed, fragmented, compressed)
//!   event_loop/delivery.rs   the app's Outbox over the connection table
//!   event_loop/signals.rs    SIGHUP reloads, graceful shutdown
//!   connection.rs      a connection's phases and their deadlines
//!   outbound.rs        the write queue; pending_states.rs the states
//!                      (candles) held for a slow recipient, latest per
//!                      key, until its queue has room; timers.rs the
//!                      deadline heap;
//!   compressors.rs     the loop's zlib state; tls_*.rs rustls sessions and
//!                      certificates; listener.rs; stats.rs the loop's counters
//! src/app/      what each endpoint does; knows connection ids, not sockets
//!   mod.rs             App: the server's calls in, dispatched per endpoint
//!   routes.rs          which path is which endpoint, and how it takes messages
//!   router.rs          /ws requests: parse, authorise (auth.rs), call a
//!                      domain, reply; protocol.rs the JSON shapes and errors
//!   publishing.rs      the one path every publish and event takes
//!   bus.rs             one path for one node and many: a local bus numbers
//!                      messages itself, the Redis one waits for Redis
//!                      (scale_out.rs applies what comes back)
//!   channels/          pub/sub: names and patterns, definitions, backlogs
//!   chat/              rooms, nicks, presence, /chat's text client, and
//!                      chat's own Redis coordination (chat/redis/: its
//!                      keys, Lua scripts and replies in scripts.rs)
//!   events/            the registration protocol's streams and filters
//!   tokens/            JWTs: key files (JWKS, HS256 secret, publisher
//!                      keys; re-read on SIGHUP), verification into a
//!                      grant, and each connection's grant and expiry
//!   market/            simulator and replay feeds, K-lines (and the /kline
//!                      text protocol), filter expressions, alerts
//!   sinks/             alert firings (and chosen channels) delivered
//!                      outside: webhook.rs (HMAC-signed POST),
//!                      telegram.rs (sendMessage), settings.rs ([[sink]]
//!                      tables), worker.rs (a thread per sink, ureq,
//!                      retries with backoff.rs), fed by a bounded queue
//!   metrics.rs         the app's part of /metrics
//! src/cluster/  a generic Redis transport for scale-out (two threads, a mio
//!               Waker); its file map is in its module docs
//! src/config.rs every flag, its default, and the config file;
//!               config/errors.rs what can be wrong with them,
//!               config/values.rs sizes and SHA-256 digests
//! src/metrics.rs the Prometheus text exposition
//! ```
//!
//! # The loop
//!
//! One thread, one edge-triggered `mio` poll, no async runtime. Each turn
//! ([`server::Server::run`]):
//!
//! 1. Wait for readiness or the next deadline (a connection's timer, the
//!    app's next deadline, the end of the shutdown grace);
//!    without waiting at all when the previous turn left work over.
//! 2. Handle the events: signals (SIGHUP reloads the TLS certificates and
//!    the token keys, SIGINT and SIGTERM begin the shutdown), the Redis
//!    link's waker (its inbox is drained into the app), listeners and
//!    connections.
//!    - A listener accepts until `WouldBlock`, but at most 1024 connections
//!      per turn; the rest are accepted next turn, after every other socket,
//!      timer and signal has been served.
//!    - A writable connection is flushed; a readable one is read into the
//!      one read buffer of the process (`--read-buffer-size`), at most 16
//!      reads and 1 MiB per connection per turn, so one bulk sender cannot
//!      starve the rest; a connection that used its budget is read again
//!      next turn. A read that does not fill the buffer has emptied the
//!      socket's receive queue, so the loop skips the read that would only
//!      say `WouldBlock` (later data raises a new edge); after the peer's
//!      FIN or an error, and for a connection resumed from an earlier turn,
//!      it reads until `WouldBlock`. The rest of a large frame is received
//!      straight into its message buffer, with no pass through the read
//!      buffer.
//! 3. Run due timers (pings, idle, handshake and close deadlines), at most
//!    4096 per turn; what is left is due at once, so the next poll does not
//!    sleep.
//! 4. Write every connection that has output, gathering its queued frames
//!    into one vectored write (at most 64 chunks per `writev`).
//!    Flushing can make more output (a close makes the app announce a
//!    departure; a drained queue gets its drop notice), so this goes round
//!    again, up to four times; what is left waits for the next turn, which
//!    then does not sleep.
//!
//! A connection whose output queue reaches `--max-outbound-buffer` because
//! of its own requests is not read until the queue drains (TCP
//! backpressure); fan-out never waits for a subscriber (the README's "Slow
//! consumers" says what each stream does instead). State updates (candles)
//! that do not fit are held beside the queue, the latest per key, and
//! moved into it whenever a flush leaves room: a flush that empties the
//! queue refills it from them and writes again, a few rounds at most.
//!
//! # TLS through the loop
//!
//! A TLS connection runs the same loop through its rustls session (sans-IO,
//! no thread): ciphertext is read into the session until `WouldBlock`, at
//! most 1 MiB and 256 steps (a ciphertext read or a plaintext hand-over) a
//! turn, since rustls reads a few KiB per call; the plaintext it yields goes
//! to the same protocol code, and the write queue is written into the
//! session, whose records go to the socket. A queue counts as written only
//! when no record is left. The first byte a client sends tells a TLS
//! client (a handshake record) from a plain HTTP one, which gets a plain
//! `400` answer. The session sits in a table beside the connection slab, so
//! a plain connection stays the same size (72 bytes) and pays one branch per
//! read and write; what an idle `wss://` connection costs (rustls' keys and
//! record buffers) is measured in `benches/README.md`.
//!
//! # Memory per connection
//!
//! Thousands of connections sit idle, so an upgraded connection keeps only
//! what it needs between messages:
//!
//! - its slab entry is at most 72 bytes (a unit test in `server` holds it
//!   there), plus a 16-byte entry in the timer heap; times are 8-byte ticks
//!   (milliseconds since the loop started), not `Instant`s;
//! - it owns no buffers: all sockets are read into the one shared buffer; an
//!   empty write queue is one null pointer; the decoder is boxed and exists
//!   only while a frame or message is partly received, keeping only that
//!   message's bytes (between messages the loop decodes with a fresh decoder
//!   on its stack); the handshake's state is boxed, and dropped once it is
//!   over;
//! - a drained write queue goes back, with its memory, to a small pool
//!   (at most 1024 queues, about 5 MiB in all), so a connection that queues
//!   something every turn does not allocate and free each time; small
//!   frames, shared ones included, are packed into one chunk, large shared
//!   frames are queued by reference, an echoed message without a copy;
//! - what only some connections need lives in side tables keyed by the
//!   connection's token, so the slab entry does not grow: TLS sessions, and
//!   the zlib state of `--compression dedicated`.
//!
//! `benches/README.md` has the measured server RSS per idle connection.
//!
//! # permessage-deflate: where the zlib state lives
//!
//! The modes and what clients see are the README's "Compression" section.
//!
//! - A direction without context takeover (both directions in `shared`
//!   mode) starts every message afresh and needs no history of its own: the
//!   loop owns one decompressor and one compressor per window size (9 to 15
//!   bits), reset after each message. A connection stores only what it
//!   agreed (3 bytes in its session), so an idle one holds no zlib state.
//! - A direction with context takeover (`dedicated`, where the client did
//!   not opt out) needs zlib state of its own (zlib's 32 KiB window, hash
//!   chains and buffers): created at the connection's first compressed
//!   message, kept until it closes, in a side table keyed by the
//!   connection's token, so connections that never compress cost nothing
//!   extra and the slab entry does not grow.
//! - A broadcast frame is compressed once per window size for every
//!   recipient without server context takeover, and shared; it is sent as
//!   is to those that did not negotiate compression or for which it is
//!   below the threshold, and a recipient with server context takeover
//!   gets its own compression.
//! - Incompressible data is detected on a prefix (the rule is in the
//!   README) because zlib spends milliseconds per MiB of random data for
//!   nothing while the loop serves no one else (measured in
//!   `benches/README.md`). With context takeover the compressor then starts
//!   afresh, which the client cannot tell: nothing later refers to data it
//!   did not see.
//! - A message streamed back by `/echo` spans loop turns, so it cannot use
//!   the shared compressor: until its last fragment a compressed one holds a
//!   zlib compressor of its own even in `shared` mode (256 KiB at 15 bits by
//!   zlib's formula in `zconf.h`; `fanout_deflate_streams` counts them).
//!   Each fragment carries what zlib has ready (no flush per fragment, so
//!   the ratio is that of the whole message), and its first 32 KiB are held
//!   until they have all arrived, to be probed.

// Every unsafe block says why it is sound, in a `// SAFETY:` comment.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod server;
pub mod ws;
