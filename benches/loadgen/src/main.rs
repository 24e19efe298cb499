//! loadgen: a WebSocket load generator for fanout's benchmarks, loopback
//! only. One mio poll per thread, non-blocking sockets, frames masked once,
//! no allocation per message once running. See README.md beside Cargo.toml.

mod broadcast;
mod connections;
mod deflate;
mod echo;
mod net;
mod stats;
mod tcp_echo;
mod tcp_fanout;
mod tls;
mod ws;

use std::process::ExitCode;
use std::time::Duration;

use net::Url;
use stats::{CpuSnap, Hist};

const USAGE: &str = "\
usage:
  loadgen echo --url ws://127.0.0.1:PORT/echo [--conns N] [--size BYTES] [--inflight K]
               [--duration SECS] [--binary] [--threads T]
               (wss://... with --tls-ca CERT.pem, the certificate the server uses)
  loadgen broadcast --url ws://127.0.0.1:PORT/ws --publish-url ws://127.0.0.1:IPORT/ws
               [--subs N] [--size BYTES] [--inflight K] [--duration SECS]
               [--peer-protocol fanout|raw|relay]
               (tcp:// URLs for both: the floor, against tcp-fanout-server)
  loadgen connections --url ws[s]://127.0.0.1:PORT/echo --conns N [--hold SECS]
  loadgen tcp-echo-server --listen 127.0.0.1:PORT
               (the floor: a TCP echo without WebSocket; runs until killed;
                drive it with `loadgen echo --url tcp://127.0.0.1:PORT`)
  loadgen tcp-fanout-server --listen 127.0.0.1:PORT --publish-listen 127.0.0.1:IPORT
               (the broadcast floor: every publisher's bytes copied to every
                subscriber, no WebSocket; runs until killed; drive it with
                `loadgen broadcast --url tcp://127.0.0.1:PORT --publish-url tcp://127.0.0.1:IPORT`)
common: [--pid SERVER_PID] [--warmup SECS] [--drain SECS] [--connect-timeout SECS]
        [--concurrency N (connections being opened at once)]
        [--deflate fresh|takeover (offer permessage-deflate; connections: each
         connection first echoes one compressed message of --size bytes)]
Sizes accept a KiB/MiB suffix. Prints one summary line (key=value) on stdout.";

pub struct Args {
    pub mode: String,
    url: Option<String>,
    listen: Option<String>,
    publish_listen: Option<String>,
    publish_url: Option<String>,
    tls_ca: Option<String>,
    pub conns: usize,
    pub subs: usize,
    pub size: usize,
    pub inflight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    pub hold: Duration,
    pub connect_timeout: Duration,
    pub concurrency: usize,
    pub threads: usize,
    pub binary: bool,
    pub peer_protocol: PeerProtocol,
    pub pid: Option<u32>,
    pub deflate: Option<deflate::Offer>,
}

/// How a broadcast server is spoken to (`--peer-protocol`; the module docs
/// of `broadcast.rs` give each one's messages).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PeerProtocol {
    /// fanout's channels: `create`, `subscribe`, `publish` and acks.
    Fanout,
    /// benches/peer-tokio: `/sub` and `/pub`, the peer wraps the data.
    Raw,
    /// Every message relayed unchanged to every connection, the sender's
    /// own included (uWebSockets' publish to one topic every connection
    /// joins: the uws-broadcast peer).
    Relay,
}

impl Args {
    /// `--url`, with its TLS configuration when it is `wss://`.
    pub fn url(&self) -> Result<Url, String> {
        let mut url = Url::parse(self.url.as_deref().ok_or("--url is required")?)?;
        if url.wss {
            let ca = self.tls_ca.as_deref().ok_or("wss:// needs --tls-ca CERT.pem")?;
            url.tls = Some(tls::client_config(ca)?);
        }
        Ok(url)
    }

    pub fn publish_url(&self) -> Result<Url, String> {
        Url::parse(self.publish_url.as_deref().ok_or("--publish-url is required")?)
    }

    fn parse(argv: Vec<String>) -> Result<Args, String> {
        let mut it = argv.into_iter();
        let mode = it.next().ok_or("no mode given")?;
        if !["echo", "broadcast", "connections", "tcp-echo-server", "tcp-fanout-server"].contains(&mode.as_str()) {
            return Err(format!("unknown mode `{mode}`"));
        }
        let mut a = Args {
            mode,
            url: None,
            listen: None,
            publish_listen: None,
            publish_url: None,
            tls_ca: None,
            conns: 100,
            subs: 1000,
            size: 32,
            inflight: 16,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            drain: Duration::from_secs(3),
            hold: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(60),
            concurrency: 256,
            threads: 1,
            binary: false,
            peer_protocol: PeerProtocol::Fanout,
            pid: None,
            deflate: None,
        };
        fn secs(v: &str) -> Result<Duration, String> {
            let f: f64 = v.parse().map_err(|_| format!("bad seconds `{v}`"))?;
            if !(0.0..=3600.0).contains(&f) {
                return Err(format!("seconds out of range: {v}"));
            }
            Ok(Duration::from_secs_f64(f))
        }
        fn size(v: &str) -> Result<usize, String> {
            let (num, mult) = if let Some(n) = v.strip_suffix("KiB") {
                (n, 1024)
            } else if let Some(n) = v.strip_suffix("MiB") {
                (n, 1024 * 1024)
            } else {
                (v, 1)
            };
            num.trim().parse::<usize>().map(|n| n * mult).map_err(|_| format!("bad size `{v}`"))
        }
        fn count(v: &str) -> Result<usize, String> {
            v.parse().map_err(|_| format!("bad number `{v}`"))
        }
        while let Some(flag) = it.next() {
            match flag.as_str() {
                "--binary" => {
                    a.binary = true;
                    continue;
                }
                "-h" | "--help" => return Err(String::new()),
                _ => {}
            }
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--url" => a.url = Some(v),
                "--listen" => a.listen = Some(v),
                "--publish-listen" => a.publish_listen = Some(v),
                "--publish-url" => a.publish_url = Some(v),
                "--tls-ca" => a.tls_ca = Some(v),
                "--conns" => a.conns = count(&v)?,
                "--subs" => a.subs = count(&v)?,
                "--size" => a.size = size(&v)?,
                "--inflight" => a.inflight = count(&v)?,
                "--duration" => a.duration = secs(&v)?,
                "--warmup" => a.warmup = secs(&v)?,
                "--drain" => a.drain = secs(&v)?,
                "--hold" => a.hold = secs(&v)?,
                "--connect-timeout" => a.connect_timeout = secs(&v)?,
                "--concurrency" => a.concurrency = count(&v)?.max(1),
                "--threads" => a.threads = count(&v)?.max(1),
                "--deflate" => a.deflate = Some(deflate::Offer::parse(&v)?),
                "--pid" => a.pid = Some(v.parse().map_err(|_| format!("bad pid `{v}`"))?),
                "--peer-protocol" => {
                    a.peer_protocol = match v.as_str() {
                        "fanout" => PeerProtocol::Fanout,
                        "raw" => PeerProtocol::Raw,
                        "relay" => PeerProtocol::Relay,
                        _ => return Err(format!("--peer-protocol is fanout, raw or relay, not `{v}`")),
                    }
                }
                _ => return Err(format!("unknown option `{flag}`")),
            }
        }
        // Refuse anything but loopback before any socket is opened.
        for url in [&a.url, &a.publish_url].into_iter().flatten() {
            let parsed = Url::parse(url)?;
            if parsed.raw_tcp && !["echo", "broadcast"].contains(&a.mode.as_str()) {
                return Err(format!("{url}: tcp:// URLs are for the echo and broadcast modes"));
            }
            if parsed.wss && !["echo", "connections"].contains(&a.mode.as_str()) {
                return Err(format!("{url}: wss:// URLs are for the echo and connections modes"));
            }
            if parsed.wss && a.tls_ca.is_none() {
                return Err(format!("{url}: wss:// needs --tls-ca CERT.pem"));
            }
            if parsed.raw_tcp && a.deflate.is_some() {
                return Err(format!("{url}: --deflate needs a WebSocket (ws://) URL"));
            }
        }
        if a.mode == "broadcast" {
            let tcp = |u: &Option<String>| u.as_deref().is_some_and(|u| u.starts_with("tcp://"));
            if tcp(&a.url) != tcp(&a.publish_url) {
                return Err("broadcast: --url and --publish-url are both tcp:// (the floor) or neither".into());
            }
        }
        if a.mode == "tcp-fanout-server" && (a.listen.is_none() || a.publish_listen.is_none()) {
            return Err("tcp-fanout-server needs --listen 127.0.0.1:PORT --publish-listen 127.0.0.1:IPORT".into());
        }
        if a.mode == "tcp-echo-server" && a.listen.is_none() {
            return Err("tcp-echo-server needs --listen 127.0.0.1:PORT".into());
        }
        if let Some(pid) = a.pid {
            if stats::proc_cpu_ns(pid).is_none() {
                return Err(format!("--pid {pid}: no such process readable in /proc"));
            }
        }
        Ok(a)
    }
}

/// Trouble seen during a run, summed up in the summary line.
#[derive(Default)]
pub struct Notes {
    pub errors: u64,
    pub closed: u64,
    pub failed: u64,
    /// Echoes of the wrong size or type.
    pub mismatch: u64,
    /// Messages that matched nothing sent (or arrived out of order).
    pub unexpected: u64,
    /// Broadcast messages a subscriber never got (sequence gaps).
    pub lost: u64,
    /// Messages other than the expected kind (e.g. fanout's `dropped`).
    pub others: u64,
    pub first_error: Option<String>,
    pub first_other: Option<String>,
}

impl Notes {
    pub fn error(&mut self, why: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(why);
        }
    }

    pub fn other(&mut self, text: &[u8]) {
        self.others += 1;
        if self.first_other.is_none() {
            self.first_other = Some(String::from_utf8_lossy(text).into_owned());
        }
    }

    pub fn merge(&mut self, o: Notes) {
        self.errors += o.errors;
        self.closed += o.closed;
        self.failed += o.failed;
        self.mismatch += o.mismatch;
        self.unexpected += o.unexpected;
        self.lost += o.lost;
        self.others += o.others;
        self.first_error = self.first_error.take().or(o.first_error);
        self.first_other = self.first_other.take().or(o.first_other);
    }
}

/// The one summary line (key=value pairs; text after `#` is commentary).
#[allow(clippy::too_many_arguments)]
pub fn summary(
    head: &str,
    msgs: u64,
    bytes: u64,
    measured_ns: u64,
    hist: &Hist,
    c0: CpuSnap,
    c1: CpuSnap,
    extra: &str,
    notes: &Notes,
) -> String {
    let secs = (measured_ns as f64 / 1e9).max(1e-9);
    let client_ns = c1.client_ns.saturating_sub(c0.client_ns);
    let server_ns = match (c0.server_ns, c1.server_ns) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let wait = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1}", b.saturating_sub(a) as f64 / 1e6),
        _ => "n/a".to_string(),
    };
    let per_msg = |ns: u64| if msgs == 0 { "n/a".to_string() } else { format!("{:.0}", ns as f64 / msgs as f64) };
    let mut line = format!(
        "loadgen {head} secs={secs:.2} msgs={msgs} msgs_per_s={:.0} mb_per_s={:.2} p50_us={:.1} p99_us={:.1} \
         client_cpu_s={:.3} server_cpu_s={} server_ns_per_msg={} client_ns_per_msg={} \
         server_runq_ms={} client_runq_ms={} {extra} \
         errors={} closed={} failed={} mismatch={} unexpected={} lost={} others={}",
        msgs as f64 / secs,
        bytes as f64 / secs / 1e6,
        hist.quantile(0.5) as f64 / 1e3,
        hist.quantile(0.99) as f64 / 1e3,
        client_ns as f64 / 1e9,
        server_ns.map_or("n/a".to_string(), |n| format!("{:.3}", n as f64 / 1e9)),
        server_ns.map_or("n/a".to_string(), per_msg),
        per_msg(client_ns),
        wait(c0.server_wait_ns, c1.server_wait_ns),
        wait(c0.client_wait_ns, c1.client_wait_ns),
        notes.errors,
        notes.closed,
        notes.failed,
        notes.mismatch,
        notes.unexpected,
        notes.lost,
        notes.others,
    );
    if let Some(e) = &notes.first_error {
        line.push_str(&format!(" # first error: {e}"));
    }
    if let Some(o) = &notes.first_other {
        let o: String = o.chars().take(120).collect();
        line.push_str(&format!(" # first other message: {o}"));
    }
    line
}

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1).collect()) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    net::raise_fd_limit();
    let result = match args.mode.as_str() {
        "echo" => echo::run(&args),
        "broadcast" => broadcast::run(&args),
        "tcp-echo-server" => tcp_echo::run(args.listen.as_deref().unwrap_or_default()),
        "tcp-fanout-server" => tcp_fanout::run(
            args.listen.as_deref().unwrap_or_default(),
            args.publish_listen.as_deref().unwrap_or_default(),
        ),
        _ => connections::run(&args),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
