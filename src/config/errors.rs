//! What can be wrong with a configuration: a flag or file that does not
//! parse, a file that cannot be read, a combination that cannot run. Each
//! message names the flag (which is also the config-file key).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::MAX_TOKEN_LEEWAY;

/// A configuration that parsed but cannot run: [`Config::validate`]. Each
/// message names the flag (which is also the config-file key).
#[derive(Debug, Clone, PartialEq)]
pub enum InvalidConfig {
    /// Neither `--listen` nor `--internal-listen`.
    NoListener,
    /// `--metrics-internal-only` without an internal listener.
    MetricsWithoutInternalListener,
    /// `--reuse-port` on a system without SO_REUSEPORT.
    ReusePortUnsupported,
    /// `--socket-send-buffer` outside 4 KiB..=1 GiB.
    SocketSendBuffer,
    /// A TLS certificate without its key or the other way round: `given`
    /// needs `missing` too.
    Unpaired {
        given: &'static str,
        missing: &'static str,
    },
    /// `--read-buffer-size` below 4 KiB.
    ReadBufferSize,
    /// `--max-pending-states` zero.
    MaxPendingStates,
    /// `--replay-speed` not a positive finite number.
    ReplaySpeed,
    /// A simulated rate outside 0..=100000.
    SimRates,
    /// `--kline-intervals` empty.
    NoKlineIntervals,
    /// An interval of `--kline-intervals` that does not parse (the
    /// parser's message).
    KlineInterval(String),
    /// `--redis` not a `redis://` URL.
    RedisUrl(String),
    /// `--presence-ttl` not whole seconds from 1 s to 1 h.
    PresenceTtl(Duration),
    /// `--node-id` with characters or a length that cannot be a key part.
    NodeId(String),
    /// This timeout flag is zero.
    ZeroTimeout(&'static str),
    /// `--token-leeway` not whole seconds, or over [`MAX_TOKEN_LEEWAY`].
    TokenLeeway(Duration),
    /// `--require-token` with no key to verify a token with.
    RequireTokenWithoutKeys,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidConfig::NoListener => {
                f.write_str("at least one --listen or --internal-listen address is needed")
            }
            InvalidConfig::MetricsWithoutInternalListener => f.write_str(
                "--metrics-internal-only needs an --internal-listen to serve metrics on",
            ),
            InvalidConfig::ReusePortUnsupported => f.write_str(
                "--reuse-port: this system has no SO_REUSEPORT, so only one process can \
                 listen on an address; run one fanout per address instead",
            ),
            InvalidConfig::SocketSendBuffer => {
                f.write_str("--socket-send-buffer must be between 4KiB and 1GiB")
            }
            InvalidConfig::Unpaired { given, missing } => write!(f, "{given} needs {missing} too"),
            InvalidConfig::ReadBufferSize => {
                f.write_str("--read-buffer-size must be at least 4KiB")
            }
            InvalidConfig::MaxPendingStates => f.write_str(
                "--max-pending-states must be at least 1 (the latest state of a candle)",
            ),
            InvalidConfig::ReplaySpeed => f.write_str("--replay-speed must be a positive number"),
            InvalidConfig::SimRates => f.write_str(
                "--sim-trades-per-sec and --sim-events-per-sec must be between 0 and 100000",
            ),
            InvalidConfig::NoKlineIntervals => {
                f.write_str("--kline-intervals needs at least one interval")
            }
            InvalidConfig::KlineInterval(why) => write!(f, "--kline-intervals: {why}"),
            InvalidConfig::RedisUrl(url) => {
                write!(f, "--redis {url:?}: expected redis://HOST:PORT[/DB]")
            }
            InvalidConfig::PresenceTtl(ttl) => write!(
                f,
                "--presence-ttl {}: expected whole seconds from 1s to 1h",
                humantime::format_duration(*ttl)
            ),
            InvalidConfig::NodeId(id) => {
                write!(f, "--node-id {id:?}: expected 1 to 64 of A-Z a-z 0-9 _ . -")
            }
            InvalidConfig::ZeroTimeout(name) => write!(f, "{name} must be greater than zero"),
            InvalidConfig::TokenLeeway(leeway) => write!(
                f,
                "--token-leeway must be whole seconds, at most {}, not {}",
                humantime::format_duration(MAX_TOKEN_LEEWAY),
                humantime::format_duration(*leeway)
            ),
            InvalidConfig::RequireTokenWithoutKeys => f.write_str(
                "--require-token needs a key to verify tokens with: --token-secret-file, \
                 --token-jwks-file or --publisher-public-key",
            ),
        }
    }
}

impl std::error::Error for InvalidConfig {}

/// Why the configuration could not be read.
#[derive(Debug)]
pub enum ConfigError {
    /// A command-line problem, or a request for --help/--version, which
    /// clap prints and exits on with the conventional status.
    Cli(clap::Error),
    /// A problem in the config file, naming the file and the key.
    File(ConfigFileError),
}

impl From<clap::Error> for ConfigError {
    fn from(error: clap::Error) -> Self {
        ConfigError::Cli(error)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Cli(e) => write!(f, "{}", e.render()),
            ConfigError::File(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Cli(e) => Some(e),
            ConfigError::File(e) => e.source(),
        }
    }
}

/// `--config FILE` could not be used: which file, and what was wrong.
#[derive(Debug)]
pub struct ConfigFileError {
    path: PathBuf,
    pub(super) problem: FileProblem,
}

impl ConfigFileError {
    pub(super) fn new(path: &Path, problem: FileProblem) -> ConfigFileError {
        ConfigFileError {
            path: path.to_owned(),
            problem,
        }
    }

    /// The config file in question.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What was wrong with it.
    pub fn problem(&self) -> &FileProblem {
        &self.problem
    }
}

/// What was wrong with a config file.
#[derive(Debug)]
pub enum FileProblem {
    /// It could not be read.
    Read(io::Error),
    /// It is not TOML (the parser's message).
    Toml(String),
    /// A key that is no long flag name.
    UnknownKey(String),
    /// A value of a type no flag takes (a table, a date, ...).
    UnsupportedValue { key: String, value: String },
    /// A value the flag's own parser refused (clap's rendered error names
    /// the flag).
    Value(clap::Error),
    /// A `[[sink]]` table that cannot be used (names the sink and the key).
    Sink(String),
}

impl fmt::Display for ConfigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.problem {
            FileProblem::Read(e) => write!(f, "cannot read config file {path}: {e}"),
            problem => write!(f, "config file {path}: {problem}"),
        }
    }
}

impl std::error::Error for ConfigFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.problem {
            FileProblem::Read(e) => Some(e),
            FileProblem::Value(e) => Some(e),
            _ => None,
        }
    }
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileProblem::Read(e) => e.fmt(f),
            FileProblem::Toml(message) => f.write_str(message),
            FileProblem::UnknownKey(key) => write!(f, "unknown key `{key}`"),
            FileProblem::UnsupportedValue { key, value } => {
                write!(f, "key `{key}` has an unsupported value {value}")
            }
            FileProblem::Value(e) => write!(f, "{}", e.render()),
            FileProblem::Sink(why) => f.write_str(why),
        }
    }
}
