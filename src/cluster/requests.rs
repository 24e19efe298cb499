//! The link's generic requests, for whatever the app keeps in Redis beside
//! the bus: [`ScriptCall`] (a Lua script run by SHA, answered with Redis's
//! raw reply) and [`WriteCommand`]s (idempotent writes given as data,
//! pipelined in order). The link knows nothing of what they mean; the app
//! names the keys, writes the scripts and parses their replies.

use std::fmt;
use std::sync::Arc;

use redis::Script;

/// A Lua script the link runs with `EVALSHA`, loading it (`SCRIPT LOAD`)
/// whenever Redis's script cache lacks it (`NOSCRIPT`: a new connection to
/// a restarted Redis, a `SCRIPT FLUSH`). Cheap to clone; two are equal
/// when their code is (same SHA1).
#[derive(Clone)]
pub struct LuaScript(Arc<Script>);

impl LuaScript {
    pub fn new(code: &str) -> LuaScript {
        LuaScript(Arc::new(Script::new(code)))
    }

    /// The script's SHA1, as `EVALSHA` takes it.
    pub fn hash(&self) -> &str {
        self.0.get_hash()
    }

    pub(super) fn script(&self) -> &Script {
        &self.0
    }
}

impl PartialEq for LuaScript {
    fn eq(&self, other: &LuaScript) -> bool {
        self.hash() == other.hash()
    }
}

impl Eq for LuaScript {}

impl fmt::Debug for LuaScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LuaScript({})", self.hash())
    }
}

/// One call of a script: `KEYS` and `ARGV`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall {
    pub script: LuaScript,
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// How the link treats a [`ScriptCall`] while Redis is unreachable, and
/// when the outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScriptMode {
    /// A read: answered at once with [`RequestError::Down`](super::RequestError::Down)
    /// while Redis is unreachable (and a call the connection broke under
    /// gets the error, not a resend). A full queue refuses it, uncounted
    /// (the caller answers from what it has).
    Read,
    /// A decision only Redis can make: it waits through an outage and is
    /// sent (again, if the connection broke under it) after reconnection,
    /// so the script must be idempotent; it is answered with an error only
    /// when Redis refuses it. A full queue refuses it and counts it in
    /// [`LinkStats::writes_lost`](super::LinkStats::writes_lost).
    Durable,
}

/// One write command given as data: its name and arguments, e.g.
/// `["HSET", key, field, value]` or `["EVAL", code, "1", key, arg]`. Writes
/// are sent (again after a broken connection) as they are, so each must be
/// idempotent.
pub type WriteCommand = Vec<String>;
