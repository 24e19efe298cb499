//! Each connection's grant, and the timer that ends it: a connection with
//! a token is closed with [`super::TOKEN_EXPIRED`] when the token's `exp`
//! (plus the leeway) passes, unless an `auth` request brought a fresh
//! token first. The deadlines are the app's, like the registration
//! timeout's: the loop wakes for [`Grants::next_deadline`] and calls the
//! app's timer, which calls [`Grants::on_timer`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::verify::Grant;
use super::TOKEN_EXPIRED;
use crate::app::channels::name::pattern_covers;
use crate::app::protocol::{ErrorCode, ProtocolError};
use crate::app::{unix_millis, ConnId, Outbox};

/// Stale deadlines kept beyond twice the live ones before the heap is
/// compacted: the cost of a compaction is spread over at least this many
/// inserts and removals.
const STALE_DEADLINES: usize = 1024;

#[derive(Debug)]
struct Held {
    grant: Grant,
    /// Which deadline in the heap is this grant's: a fresh token leaves
    /// the old one behind, stale.
    generation: u64,
    /// The token expired and the connection is closing: it may do nothing
    /// more, rather than fall back to what an anonymous one may.
    expired: bool,
}

/// What a token says about publishing to one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishRight {
    /// No token, or one without a `publish` claim: the connection's own
    /// trust decides.
    Unchanged,
    /// The `publish` claim names the channel: the connection may publish
    /// there as a trusted one may.
    Granted,
    Refused(ProtocolError),
}

#[derive(Debug, Default)]
pub struct Grants {
    held: HashMap<ConnId, Held>,
    deadlines: BinaryHeap<Reverse<(Instant, ConnId, u64)>>,
    next_generation: u64,
    /// Connections closed because their token expired.
    pub expired_closes: u64,
}

impl Grants {
    /// Gives `conn` a grant, replacing any it had (and its deadline).
    pub fn insert(&mut self, conn: ConnId, grant: Grant, now: Instant) {
        self.next_generation += 1;
        let left_ms = (grant.expires_at.saturating_mul(1000)).saturating_sub(unix_millis());
        self.deadlines.push(Reverse((
            now + Duration::from_millis(left_ms),
            conn,
            self.next_generation,
        )));
        self.held.insert(
            conn,
            Held {
                grant,
                generation: self.next_generation,
                expired: false,
            },
        );
        self.compact();
    }

    pub fn remove(&mut self, conn: ConnId) {
        // Its deadline stays in the heap and is passed over when due...
        self.held.remove(&conn);
        self.compact();
    }

    /// ...unless stale deadlines (of closed connections, and of tokens
    /// since refreshed) outnumber the live ones by this much: then they
    /// go, so that churn under long-lived tokens cannot grow the heap
    /// without bound.
    fn compact(&mut self) {
        if self.deadlines.len() <= 2 * self.held.len() + STALE_DEADLINES {
            return;
        }
        let held = &self.held;
        self.deadlines.retain(|Reverse((_, conn, generation))| {
            held.get(conn).is_some_and(|h| h.generation == *generation)
        });
    }

    pub fn get(&self, conn: ConnId) -> Option<&Grant> {
        self.held.get(&conn).map(|h| &h.grant)
    }

    pub fn is_publisher(&self, conn: ConnId) -> bool {
        self.held
            .get(&conn)
            .is_some_and(|h| h.grant.publisher && !h.expired)
    }

    /// Whether `conn` may subscribe to `target` (a name or a pattern): a
    /// `channels` claim must cover every channel the target matches.
    pub fn check_subscribe(&self, conn: ConnId, target: &str) -> Result<(), ProtocolError> {
        let Some(held) = self.held.get(&conn) else {
            return Ok(());
        };
        if held.expired {
            return Err(expired());
        }
        match &held.grant.subscribe {
            Some(patterns) if !patterns.iter().any(|p| pattern_covers(p, target)) => {
                Err(ProtocolError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "your token does not let you subscribe to `{target}` (its `channels` claim: {})",
                        patterns.join(", ")
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// What `conn`'s token says about publishing to `channel`.
    pub fn publish_right(&self, conn: ConnId, channel: &str) -> PublishRight {
        let Some(held) = self.held.get(&conn) else {
            return PublishRight::Unchanged;
        };
        if held.expired {
            return PublishRight::Refused(expired());
        }
        match &held.grant.publish {
            None => PublishRight::Unchanged,
            Some(patterns) if patterns.iter().any(|p| pattern_covers(p, channel)) => {
                PublishRight::Granted
            }
            Some(patterns) => PublishRight::Refused(ProtocolError::new(
                ErrorCode::Forbidden,
                format!(
                    "your token does not let you publish to `{channel}` (its `publish` claim: {})",
                    patterns.join(", ")
                ),
            )),
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Closes every connection whose token expired by `now`.
    pub fn on_timer(&mut self, now: Instant, out: &mut impl Outbox) {
        while let Some(Reverse((at, conn, generation))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(held) = self.held.get_mut(&conn) else {
                continue;
            };
            if held.generation != generation || held.expired {
                continue;
            }
            held.expired = true;
            self.expired_closes += 1;
            out.close(conn, TOKEN_EXPIRED, "token expired");
        }
    }
}

fn expired() -> ProtocolError {
    ProtocolError::new(ErrorCode::Forbidden, "your token expired")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::tests::RecordingOutbox;

    fn grant(expires_in_secs: i64, subscribe: Option<&[&str]>, publish: Option<&[&str]>) -> Grant {
        let list = |p: Option<&[&str]>| p.map(|p| p.iter().map(|s| s.to_string()).collect());
        Grant {
            sub: Some("ada".into()),
            subscribe: list(subscribe),
            publish: list(publish),
            publisher: false,
            expires_at: (unix_millis() / 1000).saturating_add_signed(expires_in_secs),
        }
    }

    #[test]
    fn claims_limit_subscribe_and_publish() {
        let mut grants = Grants::default();
        let now = Instant::now();
        grants.insert(
            1,
            grant(60, Some(&["news.*", "prices.>"]), Some(&["chat.room1"])),
            now,
        );
        assert!(grants.check_subscribe(1, "news.sport").is_ok());
        assert!(grants.check_subscribe(1, "news.*").is_ok());
        assert!(grants.check_subscribe(1, "prices.btc.usd").is_ok());
        let e = grants.check_subscribe(1, "secrets").unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("`secrets`"), "{}", e.message);
        assert!(
            grants.check_subscribe(1, "news.>").is_err(),
            "wider than the claim"
        );
        assert_eq!(grants.publish_right(1, "chat.room1"), PublishRight::Granted);
        let PublishRight::Refused(e) = grants.publish_right(1, "chat.room2") else {
            panic!("publishing outside the claim");
        };
        assert!(e.message.contains("`chat.room2`"), "{}", e.message);
        // Without a token, or without the claims, nothing changes.
        assert!(grants.check_subscribe(2, "secrets").is_ok());
        assert_eq!(grants.publish_right(2, "x"), PublishRight::Unchanged);
        grants.insert(3, grant(60, None, None), now);
        assert!(grants.check_subscribe(3, "secrets").is_ok());
        assert_eq!(grants.publish_right(3, "x"), PublishRight::Unchanged);
    }

    #[test]
    fn an_expired_token_closes_its_connection_unless_refreshed() {
        let mut grants = Grants::default();
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        grants.insert(1, grant(2, None, None), now);
        grants.insert(2, grant(2, None, None), now);
        grants.insert(3, grant(2, None, None), now);
        // 2 gets a fresh token; 3 goes before its token expires.
        grants.insert(2, grant(3600, None, None), now);
        grants.remove(3);
        let due = grants.next_deadline().unwrap();
        assert!(due > now && due <= now + Duration::from_secs(2));
        grants.on_timer(now, &mut out);
        assert!(out.closed.is_empty());
        grants.on_timer(now + Duration::from_secs(3), &mut out);
        assert_eq!(out.closed, vec![(1, 4001)]);
        assert_eq!(grants.expired_closes, 1);
        // Closing, the connection may do nothing more.
        assert!(grants.check_subscribe(1, "x").is_err());
        assert!(matches!(
            grants.publish_right(1, "x"),
            PublishRight::Refused(_)
        ));
        assert!(grants.next_deadline().unwrap() > now + Duration::from_secs(3000));
    }

    #[test]
    fn stale_deadlines_do_not_pile_up() {
        let mut grants = Grants::default();
        let now = Instant::now();
        for round in 0..10 * STALE_DEADLINES {
            grants.insert(round % 3, grant(3600, None, None), now);
            if round % 2 == 0 {
                grants.remove(round % 3);
            }
        }
        assert!(grants.deadlines.len() <= 2 * grants.held.len() + STALE_DEADLINES + 1);
    }
}
