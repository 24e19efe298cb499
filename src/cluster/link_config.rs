//! [`LinkConfig`]: the settings of a [`RedisLink`](super::RedisLink), their
//! defaults and the checks `start` runs on them ([`LinkConfigError`]), on
//! their own so the limits are read in one place.

use std::fmt;
use std::time::Duration;

use redis::RedisError;

use super::protocol;

/// Settings of a [`RedisLink`](super::RedisLink). [`LinkConfig::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `redis://[:PASSWORD@]HOST:PORT[/DB]` (`rediss://` is refused: no TLS
    /// built in).
    pub url: String,
    /// This node's name: the `origin` of its messages. 1 to 64 ASCII
    /// letters, digits, `_`, `-`, `.`; unique per node.
    pub node_id: String,
    /// Per-channel stream bound (`MAXLEN ~`): how far back "resume since N"
    /// reaches.
    pub stream_maxlen: usize,
    /// Bus stream bound (`MAXLEN ~`): how far a reader may fall behind (or
    /// be disconnected) before it misses messages, which it then reports as
    /// [`LostKind::BusGap`](super::LostKind::BusGap).
    pub bus_maxlen: usize,
    /// First reconnect delay; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Publishes and history requests waiting for Redis, including the
    /// batch in flight. Beyond it `publish` answers [`Full`](super::Full).
    pub outbound_queue: usize,
    /// Bus messages waiting for the event loop to `drain`. When full, the
    /// reader pauses (Redis holds the backlog in the bus).
    pub inbound_queue: usize,
    /// Most publishes per pipelined round trip, and most bus entries per
    /// `XREAD` (`COUNT`).
    pub batch: usize,
    /// `XREAD BLOCK` time: also how long the reader takes to notice
    /// shutdown.
    pub read_block: Duration,
    /// Connect timeout and per-command timeout.
    pub io_timeout: Duration,
    /// How long `shutdown` waits for the threads (the writer spends up to
    /// half of it flushing queued publishes).
    pub shutdown_timeout: Duration,
    /// The TTL of this node run's alive key (`EX`, refreshed every
    /// second): how long after this node stopped refreshing it (it died)
    /// the key, and with it whatever the app keeps under it, lasts. Whole
    /// seconds, at least 1.
    pub alive_ttl: Duration,
}

impl LinkConfig {
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> LinkConfig {
        LinkConfig {
            url: url.into(),
            node_id: node_id.into(),
            stream_maxlen: 10_000,
            bus_maxlen: 100_000,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            outbound_queue: 10_000,
            inbound_queue: 10_000,
            batch: 256,
            read_block: Duration::from_millis(500),
            io_timeout: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(3),
            alive_ttl: Duration::from_secs(15),
        }
    }

    pub(super) fn check(&self) -> Result<(), LinkConfigError> {
        if !protocol::valid_node_id(&self.node_id) {
            return Err(LinkConfigError::NodeId(self.node_id.clone()));
        }
        for (name, v) in [
            ("stream_maxlen", self.stream_maxlen),
            ("bus_maxlen", self.bus_maxlen),
            ("outbound_queue", self.outbound_queue),
            ("inbound_queue", self.inbound_queue),
            ("batch", self.batch),
        ] {
            if v == 0 {
                return Err(LinkConfigError::Zero(name));
            }
        }
        let hour = Duration::from_secs(3600);
        for (name, v) in [
            ("read_block", self.read_block),
            ("io_timeout", self.io_timeout),
            ("reconnect_min", self.reconnect_min),
            ("reconnect_max", self.reconnect_max),
            ("shutdown_timeout", self.shutdown_timeout),
            ("alive_ttl", self.alive_ttl),
        ] {
            if v > hour {
                return Err(LinkConfigError::OverAnHour(name));
            }
        }
        if self.read_block < Duration::from_millis(1) || self.io_timeout < Duration::from_millis(1)
        {
            return Err(LinkConfigError::TimeoutBelowOneMs);
        }
        if self.alive_ttl < Duration::from_secs(1) {
            return Err(LinkConfigError::AliveTtlBelowOneSecond);
        }
        Ok(())
    }
}

/// A [`LinkConfig`] that [`RedisLink::start`](super::RedisLink::start) refuses (as an
/// [`InvalidInput`](std::io::ErrorKind::InvalidInput) error carrying this one).
#[derive(Debug)]
pub enum LinkConfigError {
    /// `node_id` is not 1 to 64 of the allowed characters.
    NodeId(String),
    /// This count setting is 0.
    Zero(&'static str),
    /// This duration setting is over an hour.
    OverAnHour(&'static str),
    /// `read_block` or `io_timeout` is under a millisecond.
    TimeoutBelowOneMs,
    /// `alive_ttl` is under a second.
    AliveTtlBelowOneSecond,
    /// The `redis` crate refused the URL.
    Url { url: String, source: RedisError },
}

impl fmt::Display for LinkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkConfigError::NodeId(id) => write!(
                f,
                "node id {id:?}: expected 1 to 64 ASCII letters, digits, '_', '-', '.'"
            ),
            LinkConfigError::Zero(name) => write!(f, "{name} must be at least 1"),
            LinkConfigError::OverAnHour(name) => write!(f, "{name} must be at most an hour"),
            LinkConfigError::TimeoutBelowOneMs => {
                f.write_str("read_block and io_timeout must be at least 1 ms")
            }
            LinkConfigError::AliveTtlBelowOneSecond => {
                f.write_str("alive_ttl must be at least 1 s")
            }
            LinkConfigError::Url { url, source } => write!(f, "redis url {url:?}: {source}"),
        }
    }
}

impl std::error::Error for LinkConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LinkConfigError::Url { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LinkConfig {
        LinkConfig::new("redis://127.0.0.1:6379", "edge-1")
    }

    #[test]
    fn defaults_pass() {
        config().check().unwrap();
    }

    #[test]
    fn each_setting_is_checked_and_named() {
        let refused = |change: fn(&mut LinkConfig)| {
            let mut c = config();
            change(&mut c);
            c.check().unwrap_err().to_string()
        };
        assert_eq!(
            refused(|c| c.node_id = "no spaces".into()),
            "node id \"no spaces\": expected 1 to 64 ASCII letters, digits, '_', '-', '.'"
        );
        assert_eq!(refused(|c| c.batch = 0), "batch must be at least 1");
        assert_eq!(
            refused(|c| c.outbound_queue = 0),
            "outbound_queue must be at least 1"
        );
        assert_eq!(
            refused(|c| c.reconnect_max = Duration::from_secs(3601)),
            "reconnect_max must be at most an hour"
        );
        assert_eq!(
            refused(|c| c.io_timeout = Duration::from_micros(999)),
            "read_block and io_timeout must be at least 1 ms"
        );
        assert_eq!(
            refused(|c| c.alive_ttl = Duration::from_millis(999)),
            "alive_ttl must be at least 1 s"
        );
        let mut c = config();
        c.inbound_queue = 0;
        assert!(matches!(
            c.check(),
            Err(LinkConfigError::Zero("inbound_queue"))
        ));
    }
}
