//! Every limit and timeout in one place, from flags and an optional TOML
//! file. The file's keys are the long flag names; flags given on the
//! command line win over the file.

use std::ffi::OsString;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::app::sinks::settings::SinkConfig;

mod errors;
mod values;

pub use errors::{ConfigError, ConfigFileError, FileProblem, InvalidConfig};
pub use values::{parse_sha256_hex, parse_size, NotSha256Hex, SizeError};

/// The most clock skew `--token-leeway` may allow: a token is honoured
/// this long past its `exp` at most.
pub const MAX_TOKEN_LEEWAY: Duration = Duration::from_secs(300);

/// fanout: WebSocket fan-out server for chat, pub/sub channels and market data.
/// The internal listener a server started without listener flags gets.
pub const DEFAULT_INTERNAL_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9090);

#[derive(Debug, Clone, Parser)]
#[command(name = "fanout", version, about, max_term_width = 100)]
pub struct Config {
    /// TOML file with any of these options (keys are the long flag names,
    /// e.g. `max-connections = 5000`); flags on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept WebSocket and HTTP connections on; repeat for
    /// several binds. Port 0 picks a free port.
    #[arg(long = "listen", value_name = "ADDR", default_value = "0.0.0.0:8080")]
    pub listen: Vec<SocketAddr>,

    /// Internal listener address (repeatable): clients here may publish
    /// without a key. Bind it to a private interface only. When no
    /// --listen and no --internal-listen is given, 127.0.0.1:9090.
    #[arg(long = "internal-listen", value_name = "ADDR")]
    pub internal_listen: Vec<SocketAddr>,

    /// No internal listener, not even the default one on 127.0.0.1:9090.
    #[arg(long, conflicts_with = "internal_listen")]
    pub no_internal_listen: bool,

    /// SO_REUSEPORT on every listener (public and internal, TLS too): several
    /// fanout processes on one host listen on the same addresses and the
    /// kernel spreads new connections among them. Each process is a loop of
    /// its own; give them all the same --redis so their clients share
    /// channels, events and chat (one process per core, one Redis). Every
    /// process on an address needs it, and the same user. Refused where the
    /// system has no SO_REUSEPORT.
    #[arg(long)]
    pub reuse_port: bool,

    /// PEM certificate chain (leaf first) for the --listen addresses; with
    /// --tls-key they accept TLS only (wss://, https://). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key (PKCS#8, PKCS#1 or SEC1) matching --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate chain for the --internal-listen addresses; with
    /// --internal-tls-key they accept TLS only. Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub internal_tls_cert: Option<PathBuf>,

    /// PEM private key matching --internal-tls-cert.
    #[arg(long, value_name = "FILE")]
    pub internal_tls_key: Option<PathBuf>,

    /// Most open WebSocket connections; further handshakes get 503.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Connections the kernel queues on each listener until the loop
    /// accepts them (listen(2)'s backlog; Linux caps it at
    /// net.core.somaxconn). Past it, a burst of connects waits for SYN
    /// retries, a second or more each.
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub listen_backlog: u32,

    /// Most connections still in the HTTP handshake; beyond this, new TCP
    /// connections are closed on accept.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub max_pending_handshakes: usize,

    /// Largest HTTP request head (request line and headers); larger gets 431.
    #[arg(long, value_name = "SIZE", default_value = "8KiB", value_parser = parse_size)]
    pub max_header_bytes: usize,

    /// Time a client has to complete the HTTP upgrade; then 408 and close.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Largest message (all fragments together); larger closes with 1009.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_message_size: usize,

    /// Largest single frame payload; larger closes with 1009. A frame is
    /// also never allowed past --max-message-size.
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub max_frame_size: usize,

    /// Bytes queued for one client. When its own requests (echo, pongs,
    /// acks) fill it, the server stops reading from it until it drains;
    /// fan-out traffic that does not fit is dropped with a notice (channels,
    /// chat, filter matches), held as latest states (candles: see
    /// --max-pending-states) or closes the client with 1008 (registered
    /// event streams).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub max_outbound_buffer: usize,

    /// State updates (candles) held per subscription for a client whose
    /// queue is full: the latest state of each candle, every closed one
    /// included, sent once the queue has room. Past this many candles the
    /// oldest held one is given up, counted, and the client is told.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_pending_states: usize,

    /// SO_SNDBUF of every client socket. By default the kernel sizes it
    /// (autotuning, up to `net.ipv4.tcp_wmem`'s maximum: 4 MiB on most
    /// systems), and whatever it holds is on top of the queue above; set it
    /// to bound how far a slow client can fall behind, at some cost to
    /// large-message throughput. Linux doubles the value for bookkeeping.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub socket_send_buffer: Option<usize>,

    /// How often the server pings each WebSocket client.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// A client that sends nothing (not even a pong) for this long is
    /// closed with 1008.
    #[arg(long, value_name = "DURATION", default_value = "90s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// After the server sends a close frame, how long it waits for the
    /// client's close frame before dropping the TCP connection.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub close_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to wait for clients to answer the 1001
    /// close before exiting anyway.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Browser origin allowed to open WebSockets (repeatable). With none
    /// given, any origin is accepted; requests without Origin always are.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,

    /// Serve `GET /metrics` on internal listeners only; public ones answer
    /// 403. Needs an `--internal-listen`.
    #[arg(long)]
    pub metrics_internal_only: bool,

    /// Subprotocol the server accepts in Sec-WebSocket-Protocol (repeatable).
    #[arg(long = "subprotocol", value_name = "NAME")]
    pub subprotocols: Vec<String>,

    /// permessage-deflate (RFC 7692): `off` never negotiates it; `shared`
    /// agrees only to no context takeover in both directions, so all
    /// connections share one compressor and decompressor and an idle
    /// connection holds no zlib state; `dedicated` keeps each connection's
    /// context between messages (smaller output, about 330 KiB of zlib state per
    /// connection that uses it).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = CompressionMode::Off)]
    pub compression: CompressionMode,

    /// Messages shorter than this go out uncompressed even where
    /// permessage-deflate was negotiated.
    #[arg(long, value_name = "SIZE", default_value = "128", value_parser = parse_size)]
    pub compression_threshold: usize,

    /// zlib compression level, 1 (fastest) to 9 (smallest).
    #[arg(long, value_name = "LEVEL", default_value_t = 6,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compression_level: u32,

    /// Size of the one read buffer the event loop reads every socket into
    /// (one per process, not per connection).
    #[arg(long, value_name = "SIZE", default_value = "256KiB", value_parser = parse_size)]
    pub read_buffer_size: usize,

    /// SHA-256 (hex) of a key that lets a client on a public listener
    /// publish after `{"type":"auth","key":…}` (repeatable). Generate one
    /// with `printf %s "$KEY" | sha256sum`.
    #[arg(long = "publisher-key-sha256", value_name = "HEX", value_parser = parse_sha256_hex)]
    pub publisher_key_hashes: Vec<[u8; 32]>,

    /// Failed `auth` attempts after which a connection is closed with 1008.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_auth_failures: u32,

    /// File holding the HS256 secret an identity provider signs tokens
    /// with (a trailing newline is not part of it). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub token_secret_file: Option<PathBuf>,

    /// JWKS file (`{"keys":[...]}`) of an identity provider's public keys:
    /// RSA (RS256), P-256 (ES256) and Ed25519 (EdDSA). Re-read on SIGHUP.
    #[arg(long, value_name = "FILE")]
    pub token_jwks_file: Option<PathBuf>,

    /// The `iss` every token must carry (unset: not checked).
    #[arg(long, value_name = "ISSUER")]
    pub token_issuer: Option<String>,

    /// The audience every token's `aud` must name (unset: not checked).
    #[arg(long, value_name = "AUDIENCE")]
    pub token_audience: Option<String>,

    /// Clock skew allowed around a token's `exp` and `nbf` (at most 5m); a
    /// connection's token expires this long after its `exp`.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub token_leeway: Duration,

    /// Refuse WebSocket handshakes without a valid token on the public
    /// (--listen) listeners with 401; internal listeners stay open.
    #[arg(long)]
    pub require_token: bool,

    /// Ed25519 public key (PEM) whose EdDSA-signed tokens make a connection
    /// a trusted publisher (repeatable). Re-read on SIGHUP.
    #[arg(long = "publisher-public-key", value_name = "FILE")]
    pub publisher_public_keys: Vec<PathBuf>,

    /// A `/ws` client must send a valid request (e.g. `register`) within
    /// this time after connecting, or it is closed with 1008.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub registration_timeout: Duration,

    /// Events kept for a `/ws` client before it registers; the matching
    /// ones are delivered on registration.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_queue_size: usize,

    /// Default number of messages a channel keeps for `since` resumption.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub channel_backlog: usize,

    /// Default age after which channel backlog messages are discarded.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub channel_backlog_age: Duration,

    /// Most channels that may exist at once.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_channels: usize,

    /// Most channel subscriptions (names and patterns) per connection, and
    /// separately most K-line subscriptions per connection.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_subscriptions: usize,

    /// Chat messages a room replays to someone who joins.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub chat_history: usize,

    /// Longest chat line in bytes; longer lines are refused with an error.
    #[arg(long, value_name = "BYTES", default_value_t = 1000)]
    pub chat_max_line: usize,

    /// Turn off the built-in simulated market feed (on by default).
    #[arg(long)]
    pub no_sim: bool,

    /// Seed for the simulated feed, for a reproducible run (default: random).
    #[arg(long, value_name = "N")]
    pub sim_seed: Option<u64>,

    /// Simulated trades per second, across all symbols.
    #[arg(long, value_name = "RATE", default_value_t = 20.0)]
    pub sim_trades_per_sec: f64,

    /// Simulated payments and contract events per second.
    #[arg(long, value_name = "RATE", default_value_t = 4.0)]
    pub sim_events_per_sec: f64,

    /// Replay an NDJSON file of events (one object per line with an integer
    /// `ts` in Unix milliseconds), then stop replaying.
    #[arg(long, value_name = "FILE")]
    pub replay: Option<PathBuf>,

    /// Replay speed: 1 is real time, 10 is ten times faster.
    #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
    pub replay_speed: f64,

    /// K-line intervals kept for every symbol, comma-separated.
    #[arg(
        long,
        value_name = "LIST",
        default_value = "1s,1m,5m,15m,1h,4h,1d",
        value_delimiter = ','
    )]
    pub kline_intervals: Vec<String>,

    /// Closed candles kept per symbol and interval (sent on subscribe).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub kline_history: usize,

    /// Symbol the plain-text K-line commands (`sub-1m` …) use.
    #[arg(long, value_name = "SYMBOL", default_value = "PUMP-SOL")]
    pub kline_default_symbol: String,

    /// Most market symbols tracked; trades for more are counted and dropped.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_symbols: usize,

    /// Most dynamic filters per connection.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_filters: usize,

    /// Most alerts per connection.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_alerts: usize,

    /// Scale-out: share channels, events, chat and the market with every
    /// other fanout node on this Redis server (`redis://HOST:PORT[/DB]`).
    /// Without it the server runs alone.
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,

    /// This node's name on the Redis bus: 1-64 of `A-Z a-z 0-9 _ . -`,
    /// unique per running node (default: hostname and process id).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,

    /// Scale-out chat presence: how long a node that died without shutting
    /// down keeps being listed by `chat.who` on the other nodes (whole
    /// seconds, 1s to 1h).
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub presence_ttl: Duration,

    /// POST every alert firing to this URL as JSON, signed with HMAC-SHA256
    /// (header X-Fanout-Signature: sha256=HEX) under the secret in the
    /// environment variable FANOUT_WEBHOOK_SECRET. Other sinks, and their
    /// timeouts, retries and queues: `[[sink]]` tables in the config file.
    #[arg(long, value_name = "URL")]
    pub webhook: Option<String>,

    /// The sinks: the config file's `[[sink]]` tables, then `--webhook`'s.
    #[arg(skip)]
    pub sinks: Vec<SinkConfig>,
}

/// `--compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressionMode {
    Off,
    Shared,
    Dedicated,
}

impl CompressionMode {
    pub fn policy(self) -> crate::ws::extensions::DeflatePolicy {
        use crate::ws::extensions::DeflatePolicy;
        match self {
            CompressionMode::Off => DeflatePolicy::Off,
            CompressionMode::Shared => DeflatePolicy::NoContextTakeover,
            CompressionMode::Dedicated => DeflatePolicy::ContextTakeover,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::parse_from(["fanout"])
    }
}

impl Config {
    /// `--node-id`, or a unique default made of the hostname and the
    /// process id (characters outside the allowed set become `-`).
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let host: String = host
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let host = if host.is_empty() {
            "fanout".to_owned()
        } else {
            host
        };
        format!("{host}-{}", std::process::id())
    }

    /// The files token keys are read from (and re-read on SIGHUP).
    pub fn token_keys(&self) -> crate::app::tokens::KeyFiles {
        crate::app::tokens::KeyFiles {
            secret: self.token_secret_file.clone(),
            jwks: self.token_jwks_file.clone(),
            publishers: self.publisher_public_keys.clone(),
        }
    }

    /// The checks every token passes.
    pub fn token_rules(&self) -> crate::app::tokens::TokenRules {
        crate::app::tokens::TokenRules {
            issuer: self.token_issuer.clone(),
            audience: self.token_audience.clone(),
            leeway_secs: self.token_leeway.as_secs(),
        }
    }

    /// Parses the command line, merging in `--config FILE` if given.
    pub fn from_args<I, T>(args: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let command = Config::command();
        let matches = command.clone().try_get_matches_from(&args)?;
        let env = |name: &str| std::env::var(name).ok();
        let Some(path) = matches.get_one::<PathBuf>("config") else {
            let config = Config::from_arg_matches(&matches)?.with_default_internal(&matches);
            return config.with_webhook_flag(&env);
        };
        let file_error = |problem| ConfigError::File(ConfigFileError::new(path, problem));
        let text = std::fs::read_to_string(path).map_err(|e| file_error(FileProblem::Read(e)))?;
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_error(FileProblem::Toml(e.message().to_owned())))?;
        // `[[sink]]` tables are no flag: read apart from the rest.
        let sinks = match table.remove("sink") {
            Some(value) => SinkConfig::parse_all(value, &env)
                .map_err(|why| file_error(FileProblem::Sink(why)))?,
            None => Vec::new(),
        };
        let file_args = file_to_args(table, &command, |id| {
            matches.value_source(id) == Some(ValueSource::CommandLine)
        })
        .map_err(file_error)?;
        let mut merged = vec![args.first().cloned().unwrap_or_else(|| "fanout".into())];
        merged.extend(file_args.into_iter().map(OsString::from));
        merged.extend(args.into_iter().skip(1));
        let matches = command
            .try_get_matches_from(merged)
            .map_err(|e| file_error(FileProblem::Value(e)))?;
        let mut config = Config::from_arg_matches(&matches)?.with_default_internal(&matches);
        config.sinks = sinks;
        config.with_webhook_flag(&env)
    }

    /// Adds `--webhook`'s sink (its secret from the environment); a
    /// missing secret is a usage error, like a bad flag value.
    fn with_webhook_flag(
        mut self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let Some(url) = &self.webhook else {
            return Ok(self);
        };
        let usage = |why: String| {
            ConfigError::Cli(clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("{why}\n"),
            ))
        };
        let sink = SinkConfig::webhook_flag(url, env).map_err(usage)?;
        if self.sinks.iter().any(|s| s.name == sink.name) {
            return Err(usage(format!(
                "--webhook: its sink is named `{}`, and so is a [[sink]] of the config file; rename that one",
                sink.name
            )));
        }
        self.sinks.push(sink);
        Ok(self)
    }

    /// A server started with no listener flags at all serves the README's
    /// examples as they are: publishers need an internal listener, so it
    /// gets one on loopback. Whoever sets any listener decides them all.
    fn with_default_internal(mut self, matches: &clap::ArgMatches) -> Self {
        let listen_default = matches.value_source("listen") == Some(ValueSource::DefaultValue);
        if listen_default && self.internal_listen.is_empty() && !self.no_internal_listen {
            self.internal_listen.push(DEFAULT_INTERNAL_LISTEN);
        }
        self
    }

    /// Checks what clap cannot: combinations of flags and value ranges.
    ///
    /// (The default internal listener is [`DEFAULT_INTERNAL_LISTEN`].)
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.listen.is_empty() && self.internal_listen.is_empty() {
            return Err(InvalidConfig::NoListener);
        }
        if self.metrics_internal_only && self.internal_listen.is_empty() {
            return Err(InvalidConfig::MetricsWithoutInternalListener);
        }
        if self.reuse_port && !crate::server::REUSE_PORT_SUPPORTED {
            return Err(InvalidConfig::ReusePortUnsupported);
        }
        if self
            .socket_send_buffer
            .is_some_and(|n| !(4096..=1 << 30).contains(&n))
        {
            return Err(InvalidConfig::SocketSendBuffer);
        }
        for (cert_flag, cert, key_flag, key) in [
            ("--tls-cert", &self.tls_cert, "--tls-key", &self.tls_key),
            (
                "--internal-tls-cert",
                &self.internal_tls_cert,
                "--internal-tls-key",
                &self.internal_tls_key,
            ),
        ] {
            match (cert, key) {
                (Some(_), None) => {
                    return Err(InvalidConfig::Unpaired {
                        given: cert_flag,
                        missing: key_flag,
                    })
                }
                (None, Some(_)) => {
                    return Err(InvalidConfig::Unpaired {
                        given: key_flag,
                        missing: cert_flag,
                    })
                }
                _ => {}
            }
        }
        if self.max_pending_states == 0 {
            return Err(InvalidConfig::MaxPendingStates);
        }
        if self.read_buffer_size < 4096 {
            return Err(InvalidConfig::ReadBufferSize);
        }
        if !(self.replay_speed > 0.0 && self.replay_speed.is_finite()) {
            return Err(InvalidConfig::ReplaySpeed);
        }
        let rate_ok = |rate: f64| (0.0..=100_000.0).contains(&rate);
        if !rate_ok(self.sim_trades_per_sec) || !rate_ok(self.sim_events_per_sec) {
            return Err(InvalidConfig::SimRates);
        }
        if self.kline_intervals.is_empty() {
            return Err(InvalidConfig::NoKlineIntervals);
        }
        for interval in &self.kline_intervals {
            crate::app::market::kline::Interval::parse(interval.trim())
                .map_err(InvalidConfig::KlineInterval)?;
        }
        if let Some(url) = &self.redis {
            if !url.starts_with("redis://") {
                return Err(InvalidConfig::RedisUrl(url.clone()));
            }
        }
        if self.presence_ttl < Duration::from_secs(1)
            || self.presence_ttl > Duration::from_secs(3600)
            || self.presence_ttl.subsec_nanos() != 0
        {
            return Err(InvalidConfig::PresenceTtl(self.presence_ttl));
        }
        if let Some(id) = &self.node_id {
            if !crate::cluster::protocol::valid_node_id(id) {
                return Err(InvalidConfig::NodeId(id.clone()));
            }
        }
        if self.token_leeway > MAX_TOKEN_LEEWAY || self.token_leeway.subsec_nanos() != 0 {
            return Err(InvalidConfig::TokenLeeway(self.token_leeway));
        }
        if self.require_token && self.token_keys().is_empty() {
            return Err(InvalidConfig::RequireTokenWithoutKeys);
        }
        for (name, value) in [
            ("--handshake-timeout", self.handshake_timeout),
            ("--ping-interval", self.ping_interval),
            ("--idle-timeout", self.idle_timeout),
            ("--close-timeout", self.close_timeout),
            ("--registration-timeout", self.registration_timeout),
        ] {
            if value.is_zero() {
                return Err(InvalidConfig::ZeroTimeout(name));
            }
        }
        Ok(())
    }
}

/// Turns the file's `key = value` pairs into flags, skipping those the
/// command line sets itself. Unknown keys are an error naming the key.
fn file_to_args(
    table: toml::Table,
    command: &clap::Command,
    given_on_command_line: impl Fn(&str) -> bool,
) -> Result<Vec<String>, FileProblem> {
    let mut args = Vec::new();
    for (key, value) in table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| FileProblem::UnknownKey(key.clone()))?;
        if given_on_command_line(arg.get_id().as_str()) {
            continue;
        }
        let flag = format!("--{key}");
        let values = match value {
            toml::Value::Array(items) => items,
            single => vec![single],
        };
        for value in values {
            match (value, arg.get_action()) {
                (toml::Value::Boolean(on), ArgAction::SetTrue) => {
                    if on {
                        args.push(flag.clone());
                    }
                }
                (toml::Value::String(s), _) => args.push(format!("{flag}={s}")),
                (toml::Value::Integer(n), _) => args.push(format!("{flag}={n}")),
                (toml::Value::Float(x), _) => args.push(format!("{flag}={x}")),
                (other, _) => {
                    return Err(FileProblem::UnsupportedValue {
                        key,
                        value: other.to_string(),
                    })
                }
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn only_a_server_with_no_listener_flags_gets_the_default_internal_listener() {
        let internal = |args: &[&str]| {
            let mut all = vec!["fanout"];
            all.extend_from_slice(args);
            Config::from_args(all).map(|c| c.internal_listen)
        };
        assert_eq!(internal(&[]).unwrap(), [DEFAULT_INTERNAL_LISTEN]);
        assert_eq!(internal(&["--no-sim"]).unwrap(), [DEFAULT_INTERNAL_LISTEN]);
        assert!(internal(&["--listen", "127.0.0.1:0"]).unwrap().is_empty());
        assert!(internal(&["--no-internal-listen"]).unwrap().is_empty());
        let given = internal(&["--internal-listen", "127.0.0.1:7000"]).unwrap();
        assert_eq!(given, ["127.0.0.1:7000".parse::<SocketAddr>().unwrap()]);
        assert!(internal(&["--no-internal-listen", "--internal-listen", "127.0.0.1:1"]).is_err());
        // A listener set in a config file counts as set.
        let dir = std::env::temp_dir().join(format!("fanout-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("listen.toml");
        std::fs::write(&file, "listen = [\"127.0.0.1:0\"]\n").unwrap();
        let from_file = internal(&["--config", file.to_str().unwrap()]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(from_file.unwrap().is_empty());
    }

    #[test]
    fn defaults_match_the_documentation() {
        let c = Config::default();
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_header_bytes, 8 << 10);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.max_message_size, 16 << 20);
        assert_eq!(c.max_outbound_buffer, 1 << 20);
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(c.compression, CompressionMode::Off);
        assert_eq!(c.compression_threshold, 128);
        assert_eq!(c.compression_level, 6);
        assert!(!c.reuse_port);
        assert_eq!(c.listen_backlog, 1024);
        c.validate().unwrap();
    }

    #[test]
    fn token_flags_are_checked() {
        let c = Config::from_args(["fanout"]).unwrap();
        assert_eq!(c.token_leeway, Duration::from_secs(30));
        assert!(!c.require_token && c.token_keys().is_empty());
        let error = |args: &[&str]| {
            let c = Config::from_args(std::iter::once("fanout").chain(args.iter().copied()));
            c.unwrap().validate().unwrap_err().to_string()
        };
        let e = error(&["--require-token"]);
        assert!(e.contains("--require-token needs a key"), "{e}");
        let e = error(&["--token-leeway", "10m"]);
        assert!(e.contains("--token-leeway") && e.contains("5m"), "{e}");
        assert!(error(&["--token-leeway", "1500ms"]).contains("whole seconds"));
        let c = Config::from_args([
            "fanout",
            "--require-token",
            "--token-secret-file",
            "/s",
            "--publisher-public-key",
            "/a.pem",
            "--publisher-public-key",
            "/b.pem",
            "--token-leeway",
            "0s",
        ])
        .unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.token_keys().publishers.len(), 2);
        assert_eq!(c.token_rules().leeway_secs, 0);
    }

    #[test]
    fn listen_backlog_is_bounded() {
        let c = Config::from_args(["fanout", "--listen-backlog", "4096"]).unwrap();
        assert_eq!(c.listen_backlog, 4096);
        assert_eq!(
            with_file("listen-backlog = 64\n", &[])
                .unwrap()
                .listen_backlog,
            64
        );
        for bad in ["0", "65536", "many"] {
            let error = Config::from_args(["fanout", "--listen-backlog", bad]).unwrap_err();
            assert!(error.to_string().contains("--listen-backlog"), "{error}");
        }
    }

    #[test]
    fn reuse_port_comes_from_the_flag_or_the_file_and_needs_so_reuseport() {
        let c = Config::from_args(["fanout", "--reuse-port"]).unwrap();
        assert!(c.reuse_port);
        assert!(with_file("reuse-port = true\n", &[]).unwrap().reuse_port);
        assert!(!with_file("reuse-port = false\n", &[]).unwrap().reuse_port);
        // Where the system has no SO_REUSEPORT the flag is refused before
        // anything is bound (on Linux, the listener's tests use it).
        let expected = if crate::server::REUSE_PORT_SUPPORTED {
            Ok(())
        } else {
            Err(InvalidConfig::ReusePortUnsupported)
        };
        assert_eq!(c.validate(), expected);
    }

    #[test]
    fn key_hashes() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(parse_sha256_hex(hex).unwrap()[..2], [0x9f, 0x86]);
        assert!(parse_sha256_hex("abc").is_err());
        assert!(parse_sha256_hex(&"g".repeat(64)).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("2 k"), Ok(2048));
        assert_eq!(
            parse_size("12 parsecs"),
            Err(SizeError::UnknownUnit("12 parsecs".into()))
        );
        assert_eq!(parse_size("KiB"), Err(SizeError::NotASize("KiB".into())));
        assert_eq!(
            parse_size("99999999999999999999G"),
            Err(SizeError::NotASize("99999999999999999999G".into()))
        );
        assert_eq!(
            parse_size("17179869184G"),
            Err(SizeError::TooLarge("17179869184G".into()))
        );
    }

    /// The messages users see (clap prints them after the flag, `main`
    /// after `fanout: `) are the ones from before the errors were typed.
    #[test]
    fn error_messages_are_unchanged() {
        let cases: [(Box<dyn std::error::Error>, &str); 9] = [
            (
                Box::new(SizeError::NotASize("x".into())),
                "`x` is not a size like 65536, 64KiB or 16MiB",
            ),
            (
                Box::new(SizeError::UnknownUnit("2 q".into())),
                "unknown size unit in `2 q` (use B, KiB, MiB or GiB)",
            ),
            (
                Box::new(SizeError::TooLarge("9G".into())),
                "size `9G` is too large",
            ),
            (
                Box::new(NotSha256Hex),
                "expected 64 hex digits (the output of sha256sum)",
            ),
            (
                Box::new(InvalidConfig::PresenceTtl(Duration::from_millis(1500))),
                "--presence-ttl 1s 500ms: expected whole seconds from 1s to 1h",
            ),
            (
                Box::new(InvalidConfig::RedisUrl("h:1".into())),
                "--redis \"h:1\": expected redis://HOST:PORT[/DB]",
            ),
            (
                Box::new(InvalidConfig::ZeroTimeout("--idle-timeout")),
                "--idle-timeout must be greater than zero",
            ),
            (
                Box::new(InvalidConfig::KlineInterval("bad".into())),
                "--kline-intervals: bad",
            ),
            (
                Box::new(InvalidConfig::ReusePortUnsupported),
                "--reuse-port: this system has no SO_REUSEPORT, so only one process can \
                 listen on an address; run one fanout per address instead",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
        }
        let c = Config::from_args(["fanout", "--idle-timeout", "0s"]).unwrap();
        assert_eq!(
            c.validate(),
            Err(InvalidConfig::ZeroTimeout("--idle-timeout"))
        );
        let c = Config::from_args(["fanout", "--max-pending-states", "0"]).unwrap();
        assert_eq!(c.validate(), Err(InvalidConfig::MaxPendingStates));
        assert_eq!(
            InvalidConfig::MaxPendingStates.to_string(),
            "--max-pending-states must be at least 1 (the latest state of a candle)"
        );
        assert_eq!(Config::default().max_pending_states, 1000);
        let c = Config::from_args([
            "fanout",
            "--listen",
            "127.0.0.1:0",
            "--metrics-internal-only",
        ])
        .unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--metrics-internal-only needs an --internal-listen to serve metrics on"
        );
    }

    fn with_file(contents: &str, extra: &[&str]) -> Result<Config, String> {
        with_file_inner(contents, extra).map_err(|e| e.to_string())
    }

    fn with_file_inner(contents: &str, extra: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fanout.toml");
        std::fs::write(&path, contents).unwrap();
        let mut args = vec![
            "fanout".to_owned(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Config::from_args(args)
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file = "max-connections = 5\nhandshake-timeout = \"2s\"\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n";
        let c = with_file(file, &[]).unwrap();
        assert_eq!(c.max_connections, 5);
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.listen.len(), 2);
        let c = with_file(file, &["--max-connections", "7", "--listen", "127.0.0.1:3"]).unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.listen, vec!["127.0.0.1:3".parse().unwrap()]);
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
    }

    #[test]
    fn redis_and_node_id_come_from_flags_or_the_file() {
        let c = Config::default();
        assert_eq!(c.redis, None);
        let id = c.node_id();
        assert!(crate::cluster::protocol::valid_node_id(&id), "{id}");
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        let file = "redis = \"redis://127.0.0.1:6379/2\"\nnode-id = \"edge-1\"\n";
        let c = with_file(file, &[]).unwrap();
        assert_eq!(c.redis.as_deref(), Some("redis://127.0.0.1:6379/2"));
        assert_eq!(c.node_id(), "edge-1");
        assert!(c.validate().is_ok());
        let c = with_file(file, &["--node-id", "no spaces"]).unwrap();
        assert_eq!(
            c.validate().unwrap_err(),
            InvalidConfig::NodeId("no spaces".into())
        );
        assert!(c.validate().unwrap_err().to_string().contains("--node-id"));
        let c = with_file("redis = \"localhost:6379\"\n", &[]).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("--redis"));
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let c = with_file("tls-cert = \"/etc/fanout/cert.pem\"\n", &[]).unwrap();
        assert_eq!(c.tls_cert, Some(PathBuf::from("/etc/fanout/cert.pem")));
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--tls-cert needs --tls-key too"
        );
        let c = with_file(
            "tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\ninternal-tls-key = \"k.pem\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "--internal-tls-key needs --internal-tls-cert too"
        );
        let c = with_file("tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\n", &[]).unwrap();
        assert_eq!(c.tls_key, Some(PathBuf::from("k.pem")));
        c.validate().unwrap();
    }

    #[test]
    fn compression_from_flags_or_the_file() {
        let c = with_file(
            "compression = \"shared\"\ncompression-threshold = \"1KiB\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.compression, CompressionMode::Shared);
        assert_eq!(c.compression_threshold, 1024);
        let c = Config::from_args(["fanout", "--compression", "dedicated"]).unwrap();
        assert_eq!(c.compression, CompressionMode::Dedicated);
        let err = Config::from_args(["fanout", "--compression", "max"]).unwrap_err();
        assert!(err.to_string().contains("--compression"), "{err}");
        let err = Config::from_args(["fanout", "--compression-level", "0"]).unwrap_err();
        assert!(err.to_string().contains("--compression-level"), "{err}");
    }

    #[test]
    fn file_errors_name_the_problem() {
        let err = with_file("max-conections = 5\n", &[]).unwrap_err();
        assert!(err.contains("unknown key `max-conections`"), "{err}");
        let err = with_file("max-connections = \"lots\"\n", &[]).unwrap_err();
        assert!(err.contains("max-connections"), "{err}");
        let missing =
            Config::from_args(["fanout", "--config", "/nonexistent/fanout.toml"]).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/fanout.toml"));
        let ConfigError::File(missing) = missing else {
            panic!("{missing}");
        };
        assert_eq!(missing.path(), Path::new("/nonexistent/fanout.toml"));
        assert!(matches!(missing.problem(), FileProblem::Read(_)));
        assert!(std::error::Error::source(&missing).is_some());
        assert!(missing
            .to_string()
            .starts_with("cannot read config file /nonexistent/fanout.toml: "));
    }

    #[test]
    fn sinks_come_from_the_file_and_the_webhook_flag() {
        let file = "no-sim = true\n[[sink]]\nname = \"desk\"\nkind = \"telegram\"\nbot-token = \"1:a\"\nchat-id = 7\n";
        let c = with_file(file, &[]).unwrap();
        assert!(c.no_sim);
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.sinks[0].name, "desk");
        let err = with_file("[[sink]]\nname = \"desk\"\nkind = \"telegram\"\n", &[]).unwrap_err();
        assert!(
            err.starts_with("config file ")
                && err.contains(": [[sink]] #1 (`desk`): a telegram sink needs `bot-token`"),
            "{err}"
        );
        assert!(matches!(
            with_file_inner("[[sink]]\nname = \"x\"\n", &[]),
            Err(ConfigError::File(ConfigFileError {
                problem: FileProblem::Sink(_),
                ..
            }))
        ));
        // --webhook needs its secret in the environment.
        let c = Config::from_args(["fanout"]).unwrap();
        assert!(c.sinks.is_empty());
        let no_secret = |_: &str| None;
        let err = c.clone().with_webhook_flag(&no_secret);
        assert!(err.is_ok(), "no --webhook, nothing needed");
        let c = Config::from_args(["fanout", "--no-sim"]).map(|mut c| {
            c.webhook = Some("http://127.0.0.1:1/hook".into());
            c
        });
        let c = c.unwrap();
        let err = c.clone().with_webhook_flag(&no_secret).unwrap_err();
        assert!(err.to_string().contains("FANOUT_WEBHOOK_SECRET"), "{err}");
        let secret = |_: &str| Some("k".to_owned());
        let with = c.with_webhook_flag(&secret).unwrap();
        assert_eq!(with.sinks.len(), 1);
        assert_eq!(with.sinks[0].name, "webhook");
    }

    #[test]
    fn file_errors_are_typed() {
        let problem = |contents: &str| match with_file_inner(contents, &[]) {
            Err(ConfigError::File(e)) => {
                assert!(e.to_string().starts_with("config file "), "{e}");
                e.problem
            }
            other => panic!("{other:?}"),
        };
        assert!(
            matches!(problem("max-conections = 5\n"), FileProblem::UnknownKey(k) if k == "max-conections")
        );
        assert!(matches!(problem("listen = ["), FileProblem::Toml(_)));
        assert!(matches!(
            problem("listen = { a = 1 }\n"),
            FileProblem::UnsupportedValue { key, .. } if key == "listen"
        ));
        assert!(matches!(
            problem("max-connections = \"lots\"\n"),
            FileProblem::Value(_)
        ));
        // The command line is not the file's fault.
        assert!(matches!(
            with_file_inner("", &["--max-connections", "lots"]),
            Err(ConfigError::Cli(_))
        ));
    }
}
