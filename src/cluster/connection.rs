//! One Redis connection of a link thread: opening it with the link's
//! timeouts, the epoch check every (re)connection starts with, the alive
//! key, the classification of errors (broken connection, Redis not
//! available, a refusal) and the stop-aware sleep.

use std::time::{Duration, Instant};

use redis::{Client, Connection, ErrorKind, RedisError, Value};

use super::errors::ConnectError;
use super::protocol::{self, EPOCH_KEY};
use super::shared::Shared;
use super::streams;

/// The longest a link thread sleeps before looking at the stop flag.
pub(super) const TICK: Duration = Duration::from_millis(100);

/// A Redis server error leaves the connection usable; anything else (I/O,
/// timeout, a reply the client could not parse) does not.
pub(super) fn is_connection_error(e: &RedisError) -> bool {
    !matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension)
}

/// Redis is there but cannot take writes now (loading its data, a
/// replica, ...): the link waits, as for a broken connection.
pub(super) fn is_unavailable(e: &RedisError) -> bool {
    e.code().is_some_and(|code| {
        matches!(
            code,
            "LOADING" | "READONLY" | "MASTERDOWN" | "TRYAGAIN" | "BUSY" | "CLUSTERDOWN"
        )
    })
}

/// Opens one connection with the link's timeouts and a client name.
pub(super) fn open(
    sh: &Shared,
    client: &Client,
    role: &str,
    read_timeout: Duration,
) -> redis::RedisResult<Connection> {
    let mut con = client.get_connection_with_timeout(sh.cfg.io_timeout)?;
    con.set_read_timeout(Some(read_timeout))?;
    con.set_write_timeout(Some(sh.cfg.io_timeout))?;
    // Visible in CLIENT LIST; a server that refuses it is still usable.
    let name = format!("fanout-{}-{role}", sh.cfg.node_id);
    if let Err(e) = redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query::<Value>(&mut con)
    {
        if is_connection_error(&e) {
            return Err(e);
        }
    }
    Ok(con)
}

/// `SET epoch NX` + `GET epoch` in one transaction; answers the epoch
/// generation after recording what Redis holds.
pub(super) fn sync_epoch(sh: &Shared, con: &mut Connection) -> Result<u64, ConnectError> {
    let candidate = format!("{:016x}", protocol::random_u64());
    let reply = redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(EPOCH_KEY)
        .arg(candidate)
        .arg("NX")
        .ignore()
        .cmd("GET")
        .arg(EPOCH_KEY)
        .query::<Value>(con)?;
    Ok(sh.note_epoch(streams::parse_epoch(reply)?))
}

/// Sets a node run's alive key for `ttl` (whole seconds, at least 1).
pub(super) fn set_alive(
    con: &mut Connection,
    key: &str,
    ttl: Duration,
) -> redis::RedisResult<Value> {
    redis::cmd("SET")
        .arg(key)
        .arg(1)
        .arg("EX")
        .arg(ttl.as_secs().max(1))
        .query::<Value>(con)
}

/// Sleeps until `deadline` in short steps, returning early when the link
/// stops.
pub(super) fn nap_until(sh: &Shared, deadline: Instant) {
    while !sh.stopping() {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(TICK / 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let io = RedisError::from(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "gone"));
        assert!(is_connection_error(&io));
        assert!(!is_unavailable(&io));
        let parse = RedisError::from((ErrorKind::Parse, "bad reply"));
        assert!(is_connection_error(&parse));
        for code in [
            "LOADING",
            "READONLY",
            "MASTERDOWN",
            "TRYAGAIN",
            "BUSY",
            "CLUSTERDOWN",
        ] {
            let e = redis::make_extension_error(code.into(), None);
            assert!(!is_connection_error(&e), "{code}");
            assert!(is_unavailable(&e), "{code}");
        }
        for code in ["OOM", "WRONGTYPE", "NOSCRIPT"] {
            let e = redis::make_extension_error(code.into(), None);
            assert!(!is_connection_error(&e), "{code}");
            assert!(!is_unavailable(&e), "{code}");
        }
    }

    #[test]
    fn nap_ends_at_the_deadline_or_at_stop() {
        let (sh, _poll) = super::super::shared::tests::shared(super::super::LinkConfig::new(
            "redis://127.0.0.1:6379",
            "test-node",
        ));
        let start = Instant::now();
        nap_until(&sh, start + Duration::from_millis(30));
        assert!(start.elapsed() >= Duration::from_millis(30));
        sh.stop.store(true, std::sync::atomic::Ordering::Release);
        let start = Instant::now();
        nap_until(&sh, start + Duration::from_secs(30));
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
