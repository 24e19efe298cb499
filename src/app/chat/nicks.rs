//! Scale-out nick uniqueness: what the chat hands to the Redis link so
//! that a nick is held by one member across every node, and the rule that
//! settles conflicts after an outage.
//!
//! Every nick a member holds (a chosen one or the guest nick it got on
//! connecting) is reserved in Redis under its node run's alive key (see
//! [`super::redis::scripts::NICK_CLAIM_LUA`]), so a node that dies
//! loses its nicks when its alive key expires, and one that stops loses
//! them at once. A nick change asked while the link is up is answered
//! when Redis decided; while it is not up the node decides alone (the
//! answer says `"local": true`) and the claim waits for Redis.
//!
//! The rule after an outage: whoever's claim Redis records first keeps the
//! nick. Each node claims all its members' nicks again when its link comes
//! back (and after Redis lost its data); a member whose nick another live
//! node's member holds in Redis by then is renamed to a fresh guest nick
//! and told why. So a nick held through the outage by a node that kept
//! its Redis reservation wins over one taken locally meanwhile, and of two
//! taken locally on two nodes the first node back keeps it.

use serde_json::{json, Value};

use crate::app::bus::Reply;
use crate::app::ConnId;

/// A nick reservation the chat asks the link for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NickChange {
    /// Reserve `nick` for `conn`: a `/nick` of a plain-text client
    /// (`asked`, to be answered) or a nick given by the server (a guest
    /// nick), which is held already.
    Claim {
        conn: ConnId,
        nick: String,
        asked: bool,
    },
    /// `conn` no longer holds `nick` (it left).
    Release { conn: ConnId, nick: String },
}

/// Where a claim sent to Redis stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    /// The member waits for Redis's answer (a JSON `chat.nick`, or a plain
    /// `/nick` when `plain`).
    Asked { plain: bool },
    /// The member has the nick already (given by the server, or decided
    /// locally during an outage): Redis refusing it renames the member.
    Held,
    /// The member is gone or took another nick: if Redis grants the nick,
    /// it is released again.
    Abandoned,
}

/// A nick claim on its way through Redis.
#[derive(Debug)]
pub struct PendingClaim {
    pub reply: Reply,
    pub nick: String,
    pub state: ClaimState,
}

/// What Redis's answer to a claim means for the member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// Nothing to do.
    Settled,
    /// Rename the waiting member and answer it.
    Grant,
    /// Answer the waiting member that the nick is taken.
    Refuse,
    /// Redis granted a nick nobody here holds: release it.
    Release,
    /// Another node's member holds the nick this member has: rename it.
    Lost,
}

/// Decides what a claim's answer means. `holds` says whether the member
/// (still connected) has the claimed nick now.
pub fn outcome(state: &ClaimState, granted: bool, open: bool, holds: bool) -> ClaimOutcome {
    match (state, granted) {
        (ClaimState::Asked { .. }, true) if open => ClaimOutcome::Grant,
        (ClaimState::Asked { .. }, false) if open => ClaimOutcome::Refuse,
        (_, true) if !open || !holds => ClaimOutcome::Release,
        (ClaimState::Held, false) if open && holds => ClaimOutcome::Lost,
        _ => ClaimOutcome::Settled,
    }
}

/// A guest nick that no other node's guest can have: `tag` is drawn per
/// process run.
pub fn guest_nick(tag: Option<&str>, n: u64) -> String {
    match tag {
        Some(tag) => format!("guest-{tag}-{n}"),
        None => format!("guest-{n}"),
    }
}

/// What a plain-text client is told when its nick was decided on this
/// node alone.
pub fn local_nick_line(nick: &str) -> String {
    format!(
        "* you are {nick} on this node only: redis is unreachable; if another node's user took \
         {nick} meanwhile, the first one redis hears of keeps it"
    )
}

/// What a member renamed because another node's member holds its nick is
/// told: a plain line, or a JSON notice.
pub fn lost_nick_notice(lost: &str, now: &str, plain: bool) -> String {
    let message = format!("nick {lost} is taken on another node: you are now {now}");
    if plain {
        format!("! {message}")
    } else {
        json!({ "type": "chat.renamed", "nick": now, "previous": lost, "message": message })
            .to_string()
    }
}

/// A JSON `chat.nick` answer decided on this node alone.
pub fn mark_local(mut extra: Value) -> Value {
    extra["local"] = json!(true);
    extra
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        let asked = ClaimState::Asked { plain: false };
        assert_eq!(outcome(&asked, true, true, false), ClaimOutcome::Grant);
        assert_eq!(outcome(&asked, false, true, false), ClaimOutcome::Refuse);
        assert_eq!(outcome(&asked, true, false, false), ClaimOutcome::Release);
        assert_eq!(outcome(&asked, false, false, false), ClaimOutcome::Settled);
        let held = ClaimState::Held;
        assert_eq!(outcome(&held, true, true, true), ClaimOutcome::Settled);
        assert_eq!(outcome(&held, false, true, true), ClaimOutcome::Lost);
        // Renamed since: the refused nick is not the member's any more.
        assert_eq!(outcome(&held, false, true, false), ClaimOutcome::Settled);
        assert_eq!(outcome(&held, true, true, false), ClaimOutcome::Release);
        assert_eq!(outcome(&held, true, false, true), ClaimOutcome::Release);
        let gone = ClaimState::Abandoned;
        assert_eq!(outcome(&gone, true, true, false), ClaimOutcome::Release);
        assert_eq!(outcome(&gone, false, true, false), ClaimOutcome::Settled);
    }

    #[test]
    fn guest_nicks_fit_the_nick_rules() {
        assert_eq!(guest_nick(None, 3), "guest-3");
        let tagged = guest_nick(Some("a3f9"), u64::MAX);
        assert_eq!(tagged, format!("guest-a3f9-{}", u64::MAX));
        assert!(crate::app::chat::command::valid_nick(&guest_nick(
            Some("a3f9"),
            999_999_999
        )));
    }

    #[test]
    fn notices() {
        assert_eq!(
            lost_nick_notice("ann", "guest-x-2", true),
            "! nick ann is taken on another node: you are now guest-x-2"
        );
        let v: Value = serde_json::from_str(&lost_nick_notice("ann", "guest-x-2", false)).unwrap();
        assert_eq!(v["type"], "chat.renamed");
        assert_eq!(v["nick"], "guest-x-2");
        assert_eq!(v["previous"], "ann");
        assert_eq!(mark_local(json!({"nick": "ann"}))["local"], true);
    }
}
