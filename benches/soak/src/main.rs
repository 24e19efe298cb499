//! The soak: fanout under hours of mixed traffic, every delivery checked.
//!
//! It starts the fanout binary on loopback (simulator on), then opens
//! thousands of clients on one mio poll: channel subscribers across many
//! channels, registration-stream consumers with filters, JSON chat
//! clients, and publishers on the internal listener at a set rate. Every
//! second some clients leave (half with a close frame, half by dropping
//! the socket) and come back (a subscriber with `since` its last offset);
//! some subscribers stop reading for seconds at a time. Checked per
//! client: channel offsets without an unexplained hole or duplicate
//! (`offsets.rs`), registration events matching their filters
//! (`filters.rs`), no error answer and no close the client did not cause.
//! Sampled: server RSS and `/metrics`. At the end: publishers stop,
//! every subscriber must catch up, then SIGTERM: every client must get
//! `1001` and the server must exit 0. One summary line, PASS or FAIL.
//!
//! Usage: see `--help` (benches/README.md has the figures).

mod client;
mod filters;
mod offsets;
mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use client::{Client, ReadOutcome, Role};
use filters::Filters;
use offsets::{OffsetStats, OffsetTracker};
use server::Server;

const USAGE: &str = "usage: soak [--fanout BIN] [--duration SECS] [--conns N] [--channels N]
            [--publish-rate PER_SEC] [--reconnects PER_SEC] [--slow-every N]
            [--seed N] [--smoke] [-- FANOUT FLAGS...]
  --fanout BIN       the server (default: target/release/fanout of this repository)
  --duration SECS    how long the load runs (default 1800)
  --conns N          clients (default 10000): 70 % channel subscribers,
                     20 % registration consumers, 10 % chat, plus 4 publishers
  --channels N       channels the subscribers spread over (default 100)
  --publish-rate R   publishes per second over all channels (default 1000)
  --reconnects R     clients that leave and come back per second (default 50)
  --slow-every N     one subscriber in N may stop reading (default 50)
  --smoke            60 s, 2000 clients, 200 publishes/s, 10 reconnects/s
Flags after `--` go to fanout (the defaults: --sim-seed 1
--sim-trades-per-sec 40 --sim-events-per-sec 40 --max-outbound-buffer 64KiB
--socket-send-buffer 16KiB, so that slow consumers fill their queue within
seconds).";

/// The channel slow subscribers read: a tenth of the publishes, each
/// padded with [`HOT_PAD`].
const HOT: &str = "soak.hot";
const HOT_PAD: &str = concat!(
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
);

struct Args {
    fanout: String,
    duration: Duration,
    conns: usize,
    channels: usize,
    publish_rate: f64,
    reconnects: f64,
    slow_every: usize,
    seed: u64,
    server_flags: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        fanout: concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/release/fanout").to_owned(),
        duration: Duration::from_secs(1800),
        conns: 10_000,
        channels: 100,
        publish_rate: 1000.0,
        reconnects: 50.0,
        slow_every: 50,
        seed: 1,
        server_flags: vec![],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--fanout" => args.fanout = value("--fanout")?,
            "--duration" => {
                let secs: f64 = value("--duration")?
                    .parse()
                    .map_err(|e| format!("--duration: {e}"))?;
                args.duration = Duration::from_secs_f64(secs);
            }
            "--conns" => {
                args.conns = value("--conns")?
                    .parse()
                    .map_err(|e| format!("--conns: {e}"))?
            }
            "--channels" => {
                args.channels = value("--channels")?
                    .parse()
                    .map_err(|e| format!("--channels: {e}"))?
            }
            "--publish-rate" => {
                args.publish_rate = value("--publish-rate")?
                    .parse()
                    .map_err(|e| format!("--publish-rate: {e}"))?
            }
            "--reconnects" => {
                args.reconnects = value("--reconnects")?
                    .parse()
                    .map_err(|e| format!("--reconnects: {e}"))?
            }
            "--slow-every" => {
                args.slow_every = value("--slow-every")?
                    .parse()
                    .map_err(|e| format!("--slow-every: {e}"))?
            }
            "--seed" => {
                args.seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--smoke" => {
                args.duration = Duration::from_secs(60);
                args.conns = 2000;
                args.publish_rate = 200.0;
                args.reconnects = 10.0;
            }
            "--" => {
                args.server_flags = it.by_ref().collect();
            }
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if args.conns < 10 || args.channels == 0 || args.slow_every == 0 {
        return Err("--conns must be at least 10, --channels and --slow-every at least 1".into());
    }
    Ok(args)
}

/// Latencies in 100 µs buckets up to 10 s.
struct Latency {
    buckets: Vec<u64>,
    count: u64,
}

impl Latency {
    fn new() -> Self {
        Latency {
            buckets: vec![0; 100_001],
            count: 0,
        }
    }
    fn record(&mut self, ns: u64) {
        let i = ((ns / 100_000) as usize).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
        self.count += 1;
    }
    /// The upper bound of the bucket holding quantile `q`, in ms.
    fn quantile_ms(&self, q: f64) -> f64 {
        let want = ((self.count as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                return (i + 1) as f64 * 0.1;
            }
        }
        f64::NAN
    }
}

#[derive(Default)]
struct Counts {
    errors: u64,
    error_samples: Vec<String>,
    unexpected_closes: u64,
    close_samples: Vec<String>,
    filter_mismatches: u64,
    registration_events: u64,
    registration_dropped: u64,
    chat_lines: u64,
    dropped_notices: u64,
    /// Offsets the channel `dropped` notices announced.
    dropped_offsets: u64,
    not_recoverable: u64,
    publishes: u64,
    publish_acks: u64,
    reconnects: u64,
    reconnect_failures: u64,
    pauses: u64,
    got_1001: u64,
}

impl Counts {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.error_samples.len() < 5 {
            self.error_samples.push(what);
        }
    }
    fn unexpected_close(&mut self, what: String) {
        self.unexpected_closes += 1;
        if self.close_samples.len() < 5 {
            self.close_samples.push(what);
        }
    }
}

struct Harness {
    poll: Poll,
    clients: slab::Slab<Client>,
    public: SocketAddr,
    internal: SocketAddr,
    start: Instant,
    rng: StdRng,
    counts: Counts,
    latency: Latency,
    /// Subscribers' stats from connections already replaced are kept in
    /// their trackers (a tracker moves to the new connection).
    channel_max: HashMap<String, u64>,
    publishers: Vec<usize>,
    shutting_down: bool,
}

fn now_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

impl Harness {
    fn open(&mut self, role: Role) -> Result<usize, String> {
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        let (addr, path) = match role {
            Role::Publisher => (self.internal, "/ws"),
            _ => (self.public, "/ws"),
        };
        let mut client = Client::open(addr, path, role, self.poll.registry(), Token(key))?;
        let first = first_request(&mut client);
        if let Some(text) = first {
            client.send(text)?;
        }
        entry.insert(client);
        Ok(key)
    }

    /// Reads everything a client has, handling each message.
    fn drain(&mut self, key: usize) {
        loop {
            let Some(client) = self.clients.get_mut(key) else {
                return;
            };
            if client.ended || client.paused_until.is_some() {
                return;
            }
            match client.read() {
                ReadOutcome::Idle => {
                    // Pongs tungstenite queued while reading.
                    client.flush();
                    return;
                }
                ReadOutcome::Message(text) => self.handle(key, &text),
                ReadOutcome::Closed(code, reason) => {
                    let client = &mut self.clients[key];
                    client.ended = true;
                    if self.shutting_down {
                        if code == Some(1001) {
                            self.counts.got_1001 += 1;
                        } else {
                            self.counts
                                .unexpected_close(format!("at shutdown: {code:?} {reason}"));
                        }
                    } else if !client.leaving {
                        let what = match &client.role {
                            Role::Subscriber { channel, .. } => format!("subscriber of {channel}"),
                            Role::Registered { .. } => "registered consumer".into(),
                            Role::Chat { room, .. } => format!("chat in {room}"),
                            Role::Publisher => "publisher".into(),
                        };
                        self.counts
                            .unexpected_close(format!("{what}: {code:?} {reason}"));
                    }
                    return;
                }
            }
        }
    }

    fn handle(&mut self, key: usize, text: &str) {
        let now = now_ns(self.start);
        // Most of the traffic: a channel message to a subscriber, read
        // without building a JSON tree (the harness must outrun the server).
        if let (Some(offset), Role::Subscriber { tracker, slow, .. }) =
            (message_offset(text), &mut self.clients[key].role)
        {
            tracker.on_message(offset);
            // A paused reader's latency is its pause: not counted.
            if let (false, Some(t)) = (*slow, number_after(text, r#""data":{"t":"#)) {
                self.latency.record(now.saturating_sub(t));
            }
            return;
        }
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            self.counts.error(format!("not JSON: {text:.200}"));
            return;
        };
        let kind = msg["type"].as_str().unwrap_or_default();
        if kind == "welcome" {
            return;
        }
        if kind == "error" {
            let code = msg["code"].as_str().unwrap_or_default();
            let client = &mut self.clients[key];
            if let (
                Role::Subscriber {
                    tracker,
                    subscribed,
                    with_since,
                    ..
                },
                "not_recoverable",
            ) = (&mut client.role, code)
            {
                self.counts.not_recoverable += 1;
                // "…the backlog holds offsets F to L": resume from F, the
                // offsets before it answered as gone.
                let message = msg["message"].as_str().unwrap_or_default();
                let first = number_after(message, "holds offsets ");
                tracker.on_not_recoverable(first);
                let since = first.map(|f| f - 1);
                if since.is_some() || !*subscribed {
                    *with_since = since.is_some();
                    let channel = match &client.role {
                        Role::Subscriber { channel, .. } => channel.clone(),
                        _ => unreachable!(),
                    };
                    let _ = client.send(subscribe(&channel, since));
                }
                return;
            }
            self.counts.error(text.chars().take(200).collect());
            return;
        }
        let client = &mut self.clients[key];
        match &mut client.role {
            Role::Subscriber {
                channel,
                tracker,
                with_since,
                subscribed,
                ..
            } => match kind {
                "ack" => {
                    *subscribed = true;
                    tracker.on_ack(msg["replayed"].as_u64().unwrap_or(0), *with_since);
                }
                // Messages with an offset took the path at the top.
                "message" => self
                    .counts
                    .error(format!("message without offset: {text:.200}")),
                "dropped" => {
                    self.counts.dropped_notices += 1;
                    let (Some(a), Some(b)) =
                        (msg["first_offset"].as_u64(), msg["last_offset"].as_u64())
                    else {
                        self.counts
                            .error(format!("dropped without offsets: {text:.200}"));
                        return;
                    };
                    self.counts.dropped_offsets += b.saturating_sub(a) + 1;
                    tracker.on_dropped(a, b);
                    // Ask for the backlog again, as the README says.
                    let since = tracker.resume_after();
                    *with_since = since.is_some();
                    let request = subscribe(channel, since);
                    let _ = client.send(request);
                }
                _ => self.counts.error(format!("subscriber got {text:.200}")),
            },
            Role::Registered { filters } => match kind {
                "registered" => {}
                "dropped" => self.counts.registration_dropped += 1,
                _ => {
                    self.counts.registration_events += 1;
                    if !filters.matches(&msg) {
                        self.counts.filter_mismatches += 1;
                        if self.counts.error_samples.len() < 5 {
                            self.counts
                                .error_samples
                                .push(format!("filter mismatch: {text:.200}"));
                        }
                    }
                }
            },
            Role::Chat { .. } => match kind {
                "ack" => {}
                "chat" => self.counts.chat_lines += 1,
                "dropped" => self.counts.dropped_notices += 1,
                _ => self.counts.error(format!("chat client got {text:.200}")),
            },
            Role::Publisher => match kind {
                "ack" => {
                    self.counts.publish_acks += 1;
                    if let (Some(channel), Some(offset)) =
                        (msg["channel"].as_str(), msg["offset"].as_u64())
                    {
                        let max = self.channel_max.entry(channel.to_owned()).or_default();
                        *max = (*max).max(offset);
                    }
                }
                _ => self.counts.error(format!("publisher got {text:.200}")),
            },
        }
    }

    /// Replaces client `key` by a new connection with the same role.
    fn reconnect(&mut self, key: usize, clean: bool) {
        let mut old = self.clients.remove(key);
        if clean {
            old.leave();
        }
        old.deregister(self.poll.registry());
        let role = match old.role {
            Role::Subscriber {
                channel,
                tracker,
                slow,
                ..
            } => Role::Subscriber {
                channel,
                tracker,
                with_since: false,
                subscribed: false,
                slow,
            },
            Role::Chat { room, said, .. } => Role::Chat {
                room,
                said,
                next_say: Instant::now(),
            },
            other => other,
        };
        drop(old.ws);
        self.counts.reconnects += 1;
        if let Err(e) = self.open(role) {
            self.counts.reconnect_failures += 1;
            self.counts.error(format!("reconnect: {e}"));
        }
    }

    fn subscriber_stats(&self) -> OffsetStats {
        let mut total = OffsetStats::default();
        for (_, c) in &self.clients {
            if let Role::Subscriber { tracker, .. } = &c.role {
                total.add(&tracker.stats());
            }
        }
        total
    }

    fn poll_once(&mut self, events: &mut Events, timeout: Duration) {
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                self.counts.error(format!("poll: {e}"));
            }
            return;
        }
        let ready: Vec<(usize, bool, bool)> = events
            .iter()
            .map(|e| {
                (
                    e.token().0,
                    e.is_readable() || e.is_read_closed(),
                    e.is_writable(),
                )
            })
            .collect();
        for (key, readable, writable) in ready {
            if let Some(c) = self.clients.get_mut(key) {
                if writable {
                    c.flush();
                }
                if readable {
                    self.drain(key);
                }
            }
        }
    }
}

/// The offset of a `{"type":"message",…,"offset":N,…}`.
fn message_offset(text: &str) -> Option<u64> {
    if !text.starts_with(r#"{"type":"message","#) {
        return None;
    }
    number_after(text, r#""offset":"#)
}

/// The unsigned integer right after the first `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits = &text[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// What a client sends once upgraded.
fn first_request(client: &mut Client) -> Option<String> {
    match &mut client.role {
        Role::Subscriber {
            channel,
            tracker,
            with_since,
            ..
        } => {
            let since = tracker.resume_after();
            *with_since = since.is_some();
            Some(subscribe(channel, since))
        }
        Role::Registered { filters } => Some(filters.register_request()),
        Role::Chat { room, .. } => Some(format!(r#"{{"type":"chat.join","room":"{room}"}}"#)),
        Role::Publisher => None,
    }
}

fn subscribe(channel: &str, since: Option<u64>) -> String {
    match since {
        Some(since) => format!(r#"{{"type":"subscribe","channel":"{channel}","since":{since}}}"#),
        None => format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#),
    }
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(pass) if pass => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            println!("soak FAIL error={e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    raise_fd_limit();
    let mut flags: Vec<String> = [
        "--sim-seed",
        "1",
        "--sim-trades-per-sec",
        "40",
        "--sim-events-per-sec",
        "40",
        "--max-outbound-buffer",
        "64KiB",
        "--socket-send-buffer",
        "16KiB",
        "--max-connections",
        "100000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    flags.extend(args.server_flags.iter().cloned());
    let mut server = Server::start(&args.fanout, &flags)?;
    eprintln!(
        "soak: fanout pid {} on {} (internal {}), {} clients for {:?}",
        server.pid(),
        server.public,
        server.internal,
        args.conns,
        args.duration
    );
    let mut h = Harness {
        poll: Poll::new().map_err(|e| format!("poll: {e}"))?,
        clients: slab::Slab::with_capacity(args.conns + 16),
        public: server.public,
        internal: server.internal,
        start: Instant::now(),
        rng: StdRng::seed_from_u64(args.seed),
        counts: Counts::default(),
        latency: Latency::new(),
        channel_max: HashMap::new(),
        publishers: vec![],
        shutting_down: false,
    };
    let mut events = Events::with_capacity(4096);

    // Clients: 4 publishers, then 70 % subscribers, 20 % registered, 10 % chat.
    for _ in 0..4 {
        let key = h.open(Role::Publisher)?;
        h.publishers.push(key);
    }
    let subs = args.conns * 7 / 10;
    let registered = args.conns * 2 / 10;
    let chat = args.conns - subs - registered;
    let rooms = (chat / 20).max(1);
    for i in 0..args.conns {
        let role = if i < subs {
            // The slow ones read the hot channel, which carries enough
            // bytes to fill their queue when they pause.
            let slow = i % args.slow_every == 0;
            Role::Subscriber {
                channel: if slow {
                    HOT.to_owned()
                } else {
                    format!("soak.{}", i % args.channels)
                },
                tracker: OffsetTracker::new(),
                with_since: false,
                subscribed: false,
                slow,
            }
        } else if i < subs + registered {
            Role::Registered {
                filters: Filters::preset(i),
            }
        } else {
            let spread = Duration::from_millis(h.rng.random_range(0..10_000));
            Role::Chat {
                room: format!("soak-{}", i % rooms),
                next_say: Instant::now() + spread,
                said: 0,
            }
        };
        h.open(role)?;
        if i % 256 == 255 {
            h.poll_once(&mut events, Duration::ZERO);
        }
    }
    eprintln!(
        "soak: {} clients open after {:?}",
        h.clients.len(),
        h.start.elapsed()
    );

    // The load.
    let load_start = Instant::now();
    let mut published: u64 = 0;
    let mut churned: u64 = 0;
    let mut next_pause = Instant::now();
    let mut next_sample = Instant::now();
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let mut rss: Vec<(f64, u64)> = vec![];
    let mut publisher_turn = 0;
    let chat_period = Duration::from_secs(10);
    while load_start.elapsed() < args.duration {
        h.poll_once(&mut events, Duration::from_millis(1));
        let now = Instant::now();
        let elapsed = load_start.elapsed().as_secs_f64();

        // Publishes due, spread over channels and publishers.
        let due = ((elapsed * args.publish_rate) as u64)
            .saturating_sub(published)
            .min(2000);
        for _ in 0..due {
            // One publish in ten goes to the hot channel, padded.
            let hot = published % 10 == 9;
            let channel = if hot {
                HOT.to_owned()
            } else {
                format!("soak.{}", published % args.channels as u64)
            };
            let pad = if hot { HOT_PAD } else { "" };
            let key = h.publishers[publisher_turn % h.publishers.len()];
            publisher_turn += 1;
            if h.clients[key].ended {
                continue;
            }
            let t = now_ns(h.start);
            let text = format!(
                r#"{{"type":"publish","channel":"{channel}","data":{{"t":{t},"pad":"{pad}"}}}}"#
            );
            if let Err(e) = h.clients[key].send(text) {
                h.counts.error(format!("publish: {e}"));
            }
            published += 1;
            h.counts.publishes += 1;
        }

        // Churn: clients leave and come back.
        let due = ((elapsed * args.reconnects) as u64)
            .saturating_sub(churned)
            .min(100);
        for _ in 0..due {
            churned += 1;
            let key = h.rng.random_range(0..h.clients.capacity());
            let Some(c) = h.clients.get(key) else {
                continue;
            };
            if matches!(c.role, Role::Publisher) || c.paused_until.is_some() {
                continue;
            }
            let clean = h.rng.random_bool(0.5);
            h.reconnect(key, clean);
        }

        // Slow consumers: one pauses every second, for 3-15 s.
        if now >= next_pause {
            next_pause = now + Duration::from_secs(1);
            let candidates: Vec<usize> = h
                .clients
                .iter()
                .filter(|(_, c)| {
                    matches!(c.role, Role::Subscriber { slow: true, .. })
                        && c.paused_until.is_none()
                })
                .map(|(k, _)| k)
                .collect();
            if !candidates.is_empty() {
                let key = candidates[h.rng.random_range(0..candidates.len())];
                let pause = Duration::from_millis(h.rng.random_range(3_000..15_000));
                h.clients[key].paused_until = Some(now + pause);
                h.counts.pauses += 1;
            }
        }
        // Resume the ones whose pause ended, and let chat clients talk.
        let mut resume = vec![];
        let mut says = vec![];
        for (key, c) in h.clients.iter_mut() {
            if c.paused_until.is_some_and(|t| t <= now) {
                c.paused_until = None;
                resume.push(key);
            }
            if let Role::Chat {
                room,
                next_say,
                said,
            } = &mut c.role
            {
                if *next_say <= now {
                    *next_say = now + chat_period;
                    *said += 1;
                    says.push((
                        key,
                        format!(r#"{{"type":"chat.say","room":"{room}","text":"line {said}"}}"#),
                    ));
                }
            }
        }
        for key in resume {
            h.drain(key);
        }
        for (key, text) in says {
            let _ = h.clients[key].send(text);
        }
        // Ended connections (a close we did not cause) are replaced.
        // (A publisher that ended stays ended: its close is counted.)
        let ended: Vec<usize> = h
            .clients
            .iter()
            .filter(|(_, c)| c.ended && !matches!(c.role, Role::Publisher))
            .map(|(k, _)| k)
            .collect();
        for key in ended {
            h.reconnect(key, false);
        }

        if now >= next_sample {
            next_sample = now + Duration::from_secs(5);
            if let Some(kib) = server.rss_kib() {
                rss.push((elapsed, kib));
            }
            if !server.alive() {
                return Err("fanout exited during the load".into());
            }
        }
        if now >= next_report {
            next_report = now + Duration::from_secs(10);
            let s = h.subscriber_stats();
            eprintln!(
                "soak: {:>5.0}s deliveries={} events={} publishes={} acks={} reconnects={} dropped_notices={} gaps={} dups={} mismatches={} closes={} errors={} rss={}KiB",
                elapsed,
                s.delivered,
                h.counts.registration_events,
                h.counts.publishes,
                h.counts.publish_acks,
                h.counts.reconnects,
                h.counts.dropped_notices,
                s.unexplained_gaps,
                s.unexplained_duplicates,
                h.counts.filter_mismatches,
                h.counts.unexpected_closes,
                h.counts.errors,
                rss.last().map_or(0, |r| r.1),
            );
        }
    }
    let load_secs = load_start.elapsed().as_secs_f64();
    let rss_end = server.rss_kib().unwrap_or(0);

    // Drain: every paused client reads again; wait for every subscriber to
    // reach its channel's last acknowledged offset, holes recovered.
    for (_, c) in h.clients.iter_mut() {
        c.paused_until = None;
    }
    let keys: Vec<usize> = h.clients.iter().map(|(k, _)| k).collect();
    for key in keys {
        h.drain(key);
    }
    let drain_deadline = Instant::now() + Duration::from_secs(30);
    let mut behind;
    let mut next_retry = Instant::now() + Duration::from_secs(5);
    let mut end_resubscribes = 0u64;
    let mut nudges = 0u64;
    loop {
        h.poll_once(&mut events, Duration::from_millis(10));
        // A subscriber still missing announced offsets asks again (a
        // client would): counted, so a lost request shows.
        if Instant::now() >= next_retry {
            next_retry = Instant::now() + Duration::from_secs(5);
            for (_, c) in h.clients.iter_mut() {
                if let Role::Subscriber {
                    channel,
                    tracker,
                    with_since,
                    ..
                } = &mut c.role
                {
                    let max = h.channel_max.get(channel.as_str()).copied().unwrap_or(0);
                    if tracker.missing() == 0 && tracker.last() < max && !c.ended {
                        // Behind with nothing announced: a ping makes the
                        // server read and write this connection again.
                        eprintln!(
                            "soak: nudging a subscriber of {channel} at {} of {max}",
                            tracker.last()
                        );
                        let _ = c.ws.send(tungstenite::Message::Ping(Vec::new()));
                        nudges += 1;
                    }
                    if tracker.missing() > 0 && !c.ended {
                        let since = tracker.resume_after();
                        *with_since = since.is_some();
                        let request = subscribe(channel, since);
                        let _ = c.send(request);
                        end_resubscribes += 1;
                    }
                }
            }
        }
        behind = 0;
        for (_, c) in &h.clients {
            if let Role::Subscriber {
                channel, tracker, ..
            } = &c.role
            {
                let max = h.channel_max.get(channel).copied().unwrap_or(0);
                if tracker.last() < max || tracker.missing() > 0 {
                    behind += 1;
                }
            }
        }
        if behind == 0 && h.counts.publish_acks == h.counts.publishes
            || Instant::now() > drain_deadline
        {
            break;
        }
    }
    for (_, c) in &h.clients {
        if let Role::Subscriber {
            channel,
            tracker,
            subscribed,
            ..
        } = &c.role
        {
            let max = h.channel_max.get(channel).copied().unwrap_or(0);
            if tracker.last() < max || tracker.missing() > 0 {
                eprintln!(
                    "soak: behind: {channel} last={} of {max}, {} announced holes unreplayed, subscribed={subscribed} ended={} {:?}",
                    tracker.last(),
                    tracker.missing(),
                    c.ended,
                    tracker.stats()
                );
            }
        }
    }
    let stats = h.subscriber_stats();
    let queued_bytes = server
        .metric("fanout_outbound_queued_bytes")
        .unwrap_or(f64::NAN);
    let queue_max = server
        .metric("fanout_outbound_queue_max_bytes")
        .unwrap_or(f64::NAN);
    eprintln!("soak: at the end, before SIGTERM: fanout_outbound_queued_bytes={queued_bytes} fanout_outbound_queue_max_bytes={queue_max}");
    let server_drops = server
        .metric("fanout_slow_consumer_drops_total")
        .unwrap_or(f64::NAN);
    let server_slow_closes = server
        .metric("fanout_slow_consumer_closes_total")
        .unwrap_or(f64::NAN);

    // SIGTERM: every client gets 1001, the server exits 0.
    h.shutting_down = true;
    let open_clients = h.clients.iter().filter(|(_, c)| !c.ended).count() as u64;
    server.sigterm();
    let term_start = Instant::now();
    while term_start.elapsed() < Duration::from_secs(10) {
        h.poll_once(&mut events, Duration::from_millis(10));
        if h.clients.iter().all(|(_, c)| c.ended) {
            break;
        }
    }
    let exit = server.wait(Duration::from_secs(10));
    let (exit_ok, shutdown_ms) = match exit {
        Some((status, _)) => (status.success(), term_start.elapsed().as_millis()),
        None => (false, term_start.elapsed().as_millis()),
    };

    let quarter = rss
        .iter()
        .min_by_key(|(t, _)| ((t - load_secs / 4.0).abs() * 1000.0) as u64)
        .map_or(0, |r| r.1);
    let growth = if quarter > 0 {
        (rss_end as f64 - quarter as f64) / quarter as f64 * 100.0
    } else {
        0.0
    };
    // The RSS target is for long runs; a short one still fills backlogs.
    let rss_ok = load_secs < 600.0 || growth <= 5.0;
    let deliveries = stats.delivered + h.counts.registration_events + h.counts.chat_lines;
    let pass = stats.unexplained_gaps == 0
        && stats.unexplained_duplicates == 0
        && h.counts.filter_mismatches == 0
        && h.counts.unexpected_closes == 0
        && h.counts.errors == 0
        && behind == 0
        && h.counts.got_1001 == open_clients
        && exit_ok
        && rss_ok;
    let curve: Vec<String> = rss
        .iter()
        .step_by((rss.len() / 12).max(1))
        .map(|(t, kib)| format!("{t:.0}s:{}MiB", kib / 1024))
        .collect();
    eprintln!("soak: RSS curve {}", curve.join(" "));
    for sample in h.counts.error_samples.iter().chain(&h.counts.close_samples) {
        eprintln!("soak: sample: {sample}");
    }
    println!(
        "soak {} secs={load_secs:.0} clients={} deliveries={deliveries} deliveries_per_s={:.0} p50_ms={:.1} p99_ms={:.1} publishes={} acks={} reconnects={} reconnect_failures={} pauses={} dropped_notices={} dropped_offsets={} recovered={} lost_explained={} replay_repeats={} not_recoverable={} unexplained_gaps={} duplicates={} filter_mismatches={} unexpected_closes={} errors={} behind_at_end={behind} got_1001={}/{open_clients} exit_ok={exit_ok} shutdown_ms={shutdown_ms} rss_quarter_kib={quarter} rss_end_kib={rss_end} rss_growth_pct={growth:.1} server_drops={server_drops} server_slow_closes={server_slow_closes} end_resubscribes={end_resubscribes} nudges={nudges}",
        if pass { "PASS" } else { "FAIL" },
        args.conns,
        deliveries as f64 / load_secs,
        h.latency.quantile_ms(0.5),
        h.latency.quantile_ms(0.99),
        h.counts.publishes,
        h.counts.publish_acks,
        h.counts.reconnects,
        h.counts.reconnect_failures,
        h.counts.pauses,
        h.counts.dropped_notices,
        h.counts.dropped_offsets,
        stats.recovered,
        stats.lost_explained,
        stats.replay_repeats,
        h.counts.not_recoverable,
        stats.unexplained_gaps,
        stats.unexplained_duplicates,
        h.counts.filter_mismatches,
        h.counts.unexpected_closes,
        h.counts.errors,
        h.counts.got_1001,
    );
    Ok(pass)
}
