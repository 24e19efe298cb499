//! The link's error types: [`ReplyError`] (a reply of an unexpected
//! shape), [`RequestError`] (a read or script call that Redis did not
//! answer), [`Full`] (a queue at its bound) and the private
//! `ConnectError` (why a link thread could not connect). Kept apart from the
//! threads so the loop's side and both threads share one vocabulary, and
//! each message is written once.

use std::fmt;

use redis::RedisError;

use super::connection::is_connection_error;

/// A Redis reply of a shape fanout does not expect (a key written by
/// another program, a Redis that answers differently, a bug): the message
/// names the command or entry and what was wrong, never the data itself.
/// Unlike a [`redis::RedisError`] it says nothing about the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyError {
    message: String,
}

impl ReplyError {
    pub fn new(message: impl Into<String>) -> ReplyError {
        ReplyError {
            message: message.into(),
        }
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReplyError {}

/// Why a read ([`RedisLink::history`](super::RedisLink::history),
/// [`RedisLink::recent`](super::RedisLink::recent), a
/// [`RedisLink::script`](super::RedisLink::script) call) got no answer
/// from Redis: the `Err` of [`Inbound`](super::Inbound)'s answers. Its
/// text is what clients are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// Redis was unreachable: reads are answered at once during an outage.
    Down,
    /// The connection broke during the request (the `redis` crate's
    /// message).
    Connection(String),
    /// Redis answered with an error (out of memory, a key of the wrong
    /// type, ...).
    Redis(String),
    /// Redis answered something that is not the expected reply.
    Reply(ReplyError),
    /// The request was not even queued: the outbound queue was full
    /// ([`Full`]).
    Full,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Down => f.write_str("redis link is down"),
            RequestError::Connection(why) => write!(f, "redis link: {why}"),
            RequestError::Redis(why) => f.write_str(why),
            RequestError::Reply(e) => e.fmt(f),
            RequestError::Full => Full.fmt(f),
        }
    }
}

impl std::error::Error for RequestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RequestError::Reply(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ReplyError> for RequestError {
    fn from(e: ReplyError) -> Self {
        RequestError::Reply(e)
    }
}

impl From<Full> for RequestError {
    fn from(_: Full) -> Self {
        RequestError::Full
    }
}

impl RequestError {
    /// A failed command: a broken connection or Redis's refusal.
    pub(super) fn of(e: &RedisError) -> RequestError {
        if is_connection_error(e) {
            RequestError::Connection(e.to_string())
        } else {
            RequestError::Redis(e.to_string())
        }
    }
}

/// Why a link thread could not (re)connect; its text is the reason logged
/// and sent in [`Inbound::Down`](super::Inbound::Down).
#[derive(Debug)]
pub(super) enum ConnectError {
    /// Connecting or a command of the set-up failed.
    Redis(RedisError),
    /// Loading a script failed.
    ScriptLoad(RedisError),
    /// Setting this run's alive key failed.
    SetAlive(RedisError),
    /// A set-up reply was not what was expected.
    Reply(ReplyError),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Redis(e) => e.fmt(f),
            ConnectError::ScriptLoad(e) => write!(f, "SCRIPT LOAD: {e}"),
            ConnectError::SetAlive(e) => write!(f, "SET alive: {e}"),
            ConnectError::Reply(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnectError::Redis(e) | ConnectError::ScriptLoad(e) | ConnectError::SetAlive(e) => {
                Some(e)
            }
            ConnectError::Reply(e) => Some(e),
        }
    }
}

impl From<RedisError> for ConnectError {
    fn from(e: RedisError) -> Self {
        ConnectError::Redis(e)
    }
}

impl From<ReplyError> for ConnectError {
    fn from(e: ReplyError) -> Self {
        ConnectError::Reply(e)
    }
}

/// `publish` or `history` found the outbound queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis link outbound queue is full")
    }
}

impl std::error::Error for Full {}

#[cfg(test)]
mod tests {
    use redis::ErrorKind;

    use super::*;

    #[test]
    fn request_errors_read_as_before() {
        assert_eq!(RequestError::Down.to_string(), "redis link is down");
        let broken = RedisError::from((ErrorKind::Io, "broken pipe"));
        let e = RequestError::of(&broken);
        assert!(matches!(e, RequestError::Connection(_)), "{e:?}");
        assert_eq!(e.to_string(), format!("redis link: {broken}"));
        let oom = redis::make_extension_error("OOM".into(), Some("no memory".into()));
        let e = RequestError::of(&oom);
        assert!(matches!(e, RequestError::Redis(_)), "{e:?}");
        assert_eq!(e.to_string(), oom.to_string());
        let e = RequestError::from(ReplyError::new("history: an entry is not an array"));
        assert_eq!(e.to_string(), "history: an entry is not an array");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(RequestError::from(Full).to_string(), Full.to_string());
    }

    #[test]
    fn connect_errors_say_which_step_failed() {
        let e = || RedisError::from((ErrorKind::Io, "connection refused"));
        assert_eq!(ConnectError::Redis(e()).to_string(), e().to_string());
        assert_eq!(
            ConnectError::ScriptLoad(e()).to_string(),
            format!("SCRIPT LOAD: {}", e())
        );
        assert_eq!(
            ConnectError::SetAlive(e()).to_string(),
            format!("SET alive: {}", e())
        );
        assert_eq!(
            ConnectError::from(ReplyError::new("epoch: not a string")).to_string(),
            "epoch: not a string"
        );
    }

    #[test]
    fn full_reads_as_before() {
        assert_eq!(Full.to_string(), "redis link outbound queue is full");
    }
}
