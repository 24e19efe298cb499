//! Scale-out chat presence: what the chat hands to the Redis link so that
//! `who` lists a room's members on every node. Each node keeps its own
//! members of each room in Redis (written as they join, leave and change
//! nick) under its run's alive key, which expires when the node dies; `who`
//! asks Redis, which answers for live runs only (see
//! [`super::redis::scripts::WHO_LUA`]).

use super::nicks::NickChange;
use crate::app::ConnId;

/// A member's presence in a room changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceChange {
    pub room: String,
    pub conn: ConnId,
    /// Its nick now; None: it left the room.
    pub nick: Option<String>,
}

/// A plain-text client's `/who`, to be answered from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoRequest {
    pub conn: ConnId,
    pub room: String,
}

/// A join waiting for Redis (see [`super::Chat::begin_join`]): the
/// room's latest lines and members on every node.
#[derive(Debug, Clone, PartialEq)]
pub struct JoinRequest {
    pub conn: ConnId,
    pub room: String,
    /// A JSON `chat.join`'s `id` (None for a plain-text client, or none
    /// given).
    pub id: Option<serde_json::Value>,
}

/// What the chat collects for the link between two flushes.
#[derive(Debug, Default)]
pub struct PresenceRelay {
    pub changes: Vec<PresenceChange>,
    pub nicks: Vec<NickChange>,
    pub joins: Vec<JoinRequest>,
    pub who: Vec<WhoRequest>,
    /// Plain-text clients' `/rooms`.
    pub rooms: Vec<ConnId>,
}

/// The `/who` answer line of a plain-text client.
pub fn who_line(room: &str, nicks: &[String], this_node_only: bool) -> String {
    let mut line = format!("* in [{room}]: {}", nicks.join(", "));
    if this_node_only {
        line.push_str(" (this node only: redis is unreachable)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_lines() {
        let nicks = vec!["ann".to_string(), "bob".to_string()];
        assert_eq!(who_line("ops", &nicks, false), "* in [ops]: ann, bob");
        assert_eq!(
            who_line("ops", &nicks[..1], true),
            "* in [ops]: ann (this node only: redis is unreachable)"
        );
    }
}
