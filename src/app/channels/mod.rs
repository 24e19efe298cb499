//! Pub/sub channels: named streams of JSON messages with monotonically
//! increasing offsets, a backlog bounded by count and age for resumption,
//! and exact or wildcard subscriptions.
//!
//! Slow consumers: a message that does not fit a subscriber's queue is
//! dropped for that subscriber and counted; once its queue drains it gets a
//! `dropped` notice naming the channel and the offset range it missed, so it
//! can resubscribe with `since` and fill the gap from the backlog.

pub mod definition;
pub mod name;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use log::debug;
use serde::Serialize;
use serde_json::{json, Value};

use self::definition::{ChannelDefinition, MAX_BACKLOG, MAX_BACKLOG_AGE_SECS};
use self::name::{is_pattern, pattern_matches, validate_name, validate_pattern};
use super::protocol::{ChannelSettings, ErrorCode, ProtocolError, PublishPolicy};
use super::{unix_millis, ConnId, Outbox};
use crate::ws::SharedFrame;

/// Server-wide defaults and limits for channels.
#[derive(Debug, Clone)]
pub struct ChannelLimits {
    pub backlog: usize,
    pub backlog_age: Duration,
    pub max_channels: usize,
    pub max_subscriptions: usize,
}

#[derive(Debug)]
struct Stored {
    offset: u64,
    at: Instant,
    frame: SharedFrame,
}

/// Where a channel's settings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsSource {
    /// Created by a publish or a message, with this node's defaults.
    Defaults,
    /// A `create` on this node (scale-out: not confirmed by Redis yet).
    Local,
    /// Scale-out: the definition Redis holds for every node.
    Cluster,
}

#[derive(Debug)]
struct Channel {
    definition: ChannelDefinition,
    source: SettingsSource,
    /// Offset the next message gets; offsets start at 1.
    next_offset: u64,
    backlog: VecDeque<Stored>,
    subscribers: HashSet<ConnId>,
    /// Scale-out: subscribers resumed from Redis history up to this offset,
    /// who must not get those offsets again from the bus.
    floors: HashMap<ConnId, u64>,
}

impl Channel {
    fn last_offset(&self) -> u64 {
        self.next_offset - 1
    }

    fn expire(&mut self, now: Instant) {
        while self
            .backlog
            .front()
            .is_some_and(|m| now.duration_since(m.at) > self.definition.backlog_age)
        {
            self.backlog.pop_front();
        }
    }

    fn describe(&self, name: &str) -> Value {
        json!({
            "channel": name,
            "offset": self.last_offset(),
            "first_offset": self.backlog.front().map(|m| m.offset),
            "backlog": self.backlog.len(),
            "backlog_limit": self.definition.backlog,
            "backlog_age": self.definition.backlog_age.as_secs(),
            "subscribers": self.subscribers.len(),
            "publish": self.definition.publish.as_str(),
        })
    }

    /// Takes new settings; a smaller backlog limit drops the oldest.
    fn redefine(&mut self, definition: ChannelDefinition, source: SettingsSource) {
        self.definition = definition;
        self.source = source;
        while self.backlog.len() > definition.backlog {
            self.backlog.pop_front();
        }
    }
}

/// Messages a subscriber missed because its queue was full.
#[derive(Debug, Clone, Copy)]
struct Gap {
    count: u64,
    first_offset: u64,
    last_offset: u64,
}

#[derive(Serialize)]
struct MessageOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a str,
    /// None: delivered by this node alone while its Redis link was down.
    offset: Option<u64>,
    ts: u64,
    data: &'a Value,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    local: bool,
}

/// What [`Channels::apply`] does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// Store it in the backlog (when it has an offset) and fan it out.
    Deliver,
    /// Only store it: it was delivered already (locally, during an outage).
    RecordOnly,
}

/// The encoded `message` frame for a channel message.
pub fn message_frame(name: &str, offset: Option<u64>, ts: u64, data: &Value) -> SharedFrame {
    let message = MessageOut {
        kind: "message",
        channel: name,
        offset,
        ts,
        data,
        local: offset.is_none(),
    };
    SharedFrame::text(&serde_json::to_string(&message).expect("JSON values serialize"))
}

#[derive(Debug)]
pub struct Channels {
    limits: ChannelLimits,
    channels: HashMap<String, Channel>,
    /// Wildcard subscriptions: (pattern, subscriber).
    patterns: Vec<(String, ConnId)>,
    /// What each connection subscribed to, names and patterns.
    by_conn: HashMap<ConnId, Vec<String>>,
    gaps: HashMap<(ConnId, String), Gap>,
    pub dropped_total: u64,
}

/// What a successful publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub offset: u64,
    pub delivered: usize,
    pub dropped: usize,
}

impl Channels {
    pub fn new(limits: ChannelLimits) -> Self {
        Self {
            limits,
            channels: HashMap::new(),
            patterns: Vec::new(),
            by_conn: HashMap::new(),
            gaps: HashMap::new(),
            dropped_total: 0,
        }
    }

    /// Creates a channel; creating one that exists changes nothing and says so.
    pub fn create(
        &mut self,
        name: &str,
        settings: &ChannelSettings,
    ) -> Result<Value, ProtocolError> {
        validate_name("channel", name)?;
        if let Some(existing) = self.channels.get(name) {
            let mut description = existing.describe(name);
            description["created"] = json!(false);
            return Ok(description);
        }
        let definition = self.resolve(settings)?;
        let channel = self.insert(name, definition, SettingsSource::Local)?;
        let mut description = channel.describe(name);
        description["created"] = json!(true);
        Ok(description)
    }

    /// A `create`'s settings with this node's defaults filled in.
    pub fn resolve(&self, settings: &ChannelSettings) -> Result<ChannelDefinition, ProtocolError> {
        if settings.backlog.is_some_and(|n| n > MAX_BACKLOG) {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("field `backlog` must be at most {MAX_BACKLOG}"),
            ));
        }
        if settings
            .backlog_age_secs
            .is_some_and(|s| s > MAX_BACKLOG_AGE_SECS)
        {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                format!("field `backlog_age` must be at most {MAX_BACKLOG_AGE_SECS} seconds (ten years)"),
            ));
        }
        Ok(ChannelDefinition {
            backlog: settings.backlog.unwrap_or(self.limits.backlog),
            backlog_age: settings
                .backlog_age_secs
                .map_or(self.limits.backlog_age, Duration::from_secs),
            publish: settings.publish.unwrap_or(PublishPolicy::Trusted),
        })
    }

    /// Checks that a channel `name` exists or may be created here.
    pub fn check_room_for(&self, name: &str) -> Result<(), ProtocolError> {
        validate_name("channel", name)?;
        if self.channels.contains_key(name) || self.channels.len() < self.limits.max_channels {
            return Ok(());
        }
        Err(too_many_channels(self.limits.max_channels))
    }

    /// Where the settings of channel `name` come from (None: no channel).
    pub fn settings_source(&self, name: &str) -> Option<SettingsSource> {
        self.channels.get(name).map(|c| c.source)
    }

    /// `list`'s description of one channel.
    pub fn describe(&self, name: &str) -> Option<Value> {
        self.channels.get(name).map(|c| c.describe(name))
    }

    /// Scale-out: gives channel `name` these settings, creating it when
    /// missing. Answers whether its settings changed (a new channel counts
    /// as changed).
    pub fn define(
        &mut self,
        name: &str,
        definition: ChannelDefinition,
        source: SettingsSource,
    ) -> Result<bool, ProtocolError> {
        validate_name("channel", name)?;
        if let Some(channel) = self.channels.get_mut(name) {
            let changed = channel.definition != definition;
            channel.redefine(definition, source);
            return Ok(changed);
        }
        self.insert(name, definition, source)?;
        Ok(true)
    }

    /// Scale-out: the channels whose settings Redis confirmed.
    pub fn cluster_definitions(&self) -> Vec<(String, ChannelDefinition)> {
        self.channels
            .iter()
            .filter(|(_, c)| c.source == SettingsSource::Cluster)
            .map(|(name, c)| (name.clone(), c.definition))
            .collect()
    }

    /// Adds a channel that does not exist yet.
    fn insert(
        &mut self,
        name: &str,
        definition: ChannelDefinition,
        source: SettingsSource,
    ) -> Result<&mut Channel, ProtocolError> {
        if self.channels.len() >= self.limits.max_channels {
            return Err(too_many_channels(self.limits.max_channels));
        }
        let mut channel = Channel {
            definition,
            source,
            next_offset: 1,
            backlog: VecDeque::new(),
            subscribers: HashSet::new(),
            floors: HashMap::new(),
        };
        // Exact subscriptions made before the channel existed start now.
        channel.subscribers.extend(
            self.by_conn
                .iter()
                .filter(|(_, targets)| targets.iter().any(|t| t == name))
                .map(|(conn, _)| *conn),
        );
        Ok(self.channels.entry(name.to_owned()).or_insert(channel))
    }

    /// A channel a publish or message needs, with this node's defaults.
    fn create_with_defaults(&mut self, name: &str) -> Result<(), ProtocolError> {
        validate_name("channel", name)?;
        let definition = self.resolve(&ChannelSettings::default())?;
        self.insert(name, definition, SettingsSource::Defaults)?;
        Ok(())
    }

    /// Publishes `data`. A trusted publisher creates a missing channel with
    /// the defaults; anyone else needs the channel to exist and allow them.
    pub fn publish(
        &mut self,
        name: &str,
        data: &Value,
        trusted: bool,
        now: Instant,
        out: &mut impl Outbox,
    ) -> Result<Published, ProtocolError> {
        self.authorize(name, trusted)?;
        let offset = self.channels[name].next_offset;
        self.apply(
            name,
            Some(offset),
            unix_millis(),
            data,
            now,
            Apply::Deliver,
            out,
        )
    }

    /// The offset a single node gives the next message of `name` (it
    /// numbers its channels itself; with Redis, Redis does): 1 for a
    /// channel not made yet, which [`Channels::apply`] then makes.
    pub fn next_offset(&self, name: &str) -> u64 {
        self.channels.get(name).map_or(1, |c| c.next_offset)
    }

    /// Checks that this publisher may publish to `name`, creating the
    /// channel for a trusted one.
    pub fn authorize(&mut self, name: &str, trusted: bool) -> Result<(), ProtocolError> {
        validate_name("channel", name)?;
        if !self.channels.contains_key(name) {
            if !trusted {
                return Err(ProtocolError::new(
                    ErrorCode::NotFound,
                    format!("no channel named `{name}`"),
                ));
            }
            self.create_with_defaults(name)?;
        }
        let channel = self.channels.get_mut(name).expect("created above");
        if channel.definition.publish == PublishPolicy::Trusted && !trusted {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!(
                    "publishing to `{name}` needs a trusted connection: the internal listener, or `auth` with a \
                     publisher key or a publisher's token"
                ),
            ));
        }
        Ok(())
    }

    /// Stores and fans out a message whose offset was decided already (by
    /// this channel, or by Redis for every node), creating the channel if
    /// needed. `offset` None: delivered by this node alone (`"local": true`),
    /// not stored.
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        name: &str,
        offset: Option<u64>,
        ts: u64,
        data: &Value,
        now: Instant,
        mode: Apply,
        out: &mut impl Outbox,
    ) -> Result<Published, ProtocolError> {
        if !self.channels.contains_key(name) {
            self.create_with_defaults(name)?;
        }
        let channel = self.channels.get_mut(name).expect("created above");
        let frame = message_frame(name, offset, ts, data);
        if let Some(offset) = offset {
            channel.next_offset = channel.next_offset.max(offset + 1);
            channel.expire(now);
            if channel.definition.backlog > 0 {
                if channel.backlog.len() >= channel.definition.backlog {
                    channel.backlog.pop_front();
                }
                channel.backlog.push_back(Stored {
                    offset,
                    at: now,
                    frame: frame.clone(),
                });
            }
        }
        let mut published = Published {
            offset: offset.unwrap_or(0),
            delivered: 0,
            dropped: 0,
        };
        if mode == Apply::RecordOnly {
            return Ok(published);
        }
        // Subscribers resumed from Redis history past this offset already
        // have it (scale-out only; empty otherwise).
        let floors = std::mem::take(&mut channel.floors);
        let skip = |conn: &ConnId| match (floors.get(conn), offset) {
            (Some(floor), Some(offset)) => offset <= *floor,
            _ => false,
        };
        // Straight from the subscriber set to the outbox: no list of
        // recipients is built per publish.
        let mut fan_out = |conn: ConnId| {
            if out.deliver(conn, &frame) {
                published.delivered += 1;
            } else {
                published.dropped += 1;
                if let Some(offset) = offset {
                    record_drop(&mut self.gaps, conn, name, offset);
                }
            }
        };
        for &conn in &channel.subscribers {
            if floors.is_empty() || !skip(&conn) {
                fan_out(conn);
            }
        }
        if !self.patterns.is_empty() {
            // A connection whose patterns match more than once gets one copy.
            let mut by_pattern: Vec<ConnId> = self
                .patterns
                .iter()
                .filter(|(pattern, conn)| {
                    !channel.subscribers.contains(conn) && pattern_matches(pattern, name)
                })
                .map(|(_, conn)| *conn)
                .collect();
            by_pattern.sort_unstable();
            by_pattern.dedup();
            for conn in by_pattern {
                fan_out(conn);
            }
        }
        if !floors.is_empty() {
            let current = offset.unwrap_or(0);
            channel.floors = floors.into_iter().filter(|(_, f)| *f > current).collect();
        }
        self.dropped_total += published.dropped as u64;
        Ok(published)
    }

    /// Scale-out: Redis lost its data, so offsets start again from 1.
    /// Backlogs (whose offsets no longer mean anything) are emptied.
    pub fn reset_offsets(&mut self) {
        for channel in self.channels.values_mut() {
            channel.next_offset = 1;
            channel.backlog.clear();
            channel.floors.clear();
        }
    }

    /// Scale-out: whether `subscribe` can serve `since` from this node's
    /// backlog; when not, Redis's channel stream is asked.
    pub fn can_replay_locally(&mut self, target: &str, since: u64, now: Instant) -> bool {
        let Some(channel) = self.channels.get_mut(target) else {
            return false;
        };
        channel.expire(now);
        let first = channel.backlog.front().map(|m| m.offset);
        since <= channel.last_offset()
            && first.map_or(since == channel.last_offset(), |f| since + 1 >= f)
    }

    /// The checks `subscribe` makes before replaying: answers whether this
    /// is a resumption of an existing subscription.
    pub fn check_subscribe(
        &mut self,
        conn: ConnId,
        target: &str,
        since: Option<u64>,
    ) -> Result<bool, ProtocolError> {
        validate_pattern("channel", target)?;
        if is_pattern(target) && since.is_some() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidField,
                "field `since` needs an exact channel name, not a pattern",
            ));
        }
        let subscriptions = self.by_conn.entry(conn).or_default();
        let resuming = subscriptions.iter().any(|s| s == target);
        if resuming && since.is_none() {
            return Err(ProtocolError::new(
                ErrorCode::Conflict,
                format!(
                    "already subscribed to `{target}` (add \"since\" to replay from the backlog)"
                ),
            ));
        }
        if !resuming && subscriptions.len() >= self.limits.max_subscriptions {
            return Err(ProtocolError::new(
                ErrorCode::LimitReached,
                format!(
                    "at most {} subscriptions per connection",
                    self.limits.max_subscriptions
                ),
            ));
        }
        Ok(resuming)
    }

    /// Scale-out: completes a `since` subscription from Redis history.
    /// `replay` holds the history entries as frames, up to `last_offset`;
    /// whatever this node already applied after that is added, and later
    /// bus messages up to `last_offset` are not delivered again.
    pub fn subscribe_resumed(
        &mut self,
        conn: ConnId,
        target: &str,
        last_offset: u64,
        mut replay: Vec<SharedFrame>,
    ) -> Result<(Value, Vec<SharedFrame>), ProtocolError> {
        let resuming = self.check_subscribe(conn, target, Some(last_offset))?;
        if !self.channels.contains_key(target) {
            self.create_with_defaults(target)?;
        }
        let channel = self.channels.get_mut(target).expect("created above");
        replay.extend(
            channel
                .backlog
                .iter()
                .filter(|m| m.offset > last_offset)
                .map(|m| m.frame.clone()),
        );
        if channel.last_offset() < last_offset {
            channel.floors.insert(conn, last_offset);
        }
        let offset = channel.last_offset().max(last_offset);
        if !resuming {
            channel.subscribers.insert(conn);
            self.by_conn
                .entry(conn)
                .or_default()
                .push(target.to_owned());
        }
        let ack = json!({ "channel": target, "offset": offset, "replayed": replay.len(), "resumed": resuming });
        Ok((ack, replay))
    }

    /// Subscribes to a name or pattern. With `since`, first replays the
    /// backlog after that offset (through `replay`), or refuses with
    /// `not_recoverable` when the backlog no longer reaches back that far.
    pub fn subscribe(
        &mut self,
        conn: ConnId,
        target: &str,
        since: Option<u64>,
        now: Instant,
    ) -> Result<(Value, Vec<SharedFrame>), ProtocolError> {
        // Subscribing again with `since` is how a subscriber fills a gap
        // (after a `dropped` notice): it replays, the subscription stays.
        let resuming = self.check_subscribe(conn, target, since)?;
        let pattern = is_pattern(target);
        let replay = match (since, self.channels.get_mut(target)) {
            (None, _) | (Some(0), None) => Vec::new(),
            (Some(since), None) => return Err(not_recoverable(target, since, None, 0)),
            (Some(since), Some(channel)) => {
                channel.expire(now);
                let first = channel.backlog.front().map(|m| m.offset);
                let reachable = since <= channel.last_offset()
                    && first.map_or(since == channel.last_offset(), |f| since + 1 >= f);
                if !reachable {
                    return Err(not_recoverable(target, since, first, channel.last_offset()));
                }
                channel
                    .backlog
                    .iter()
                    .filter(|m| m.offset > since)
                    .map(|m| m.frame.clone())
                    .collect()
            }
        };
        let offset = self.channels.get(target).map(Channel::last_offset);
        let ack = json!({ "channel": target, "offset": offset, "replayed": replay.len(), "resumed": resuming });
        if resuming {
            return Ok((ack, replay));
        }
        let subscriptions = self.by_conn.entry(conn).or_default();
        subscriptions.push(target.to_owned());
        if pattern {
            self.patterns.push((target.to_owned(), conn));
        } else if let Some(channel) = self.channels.get_mut(target) {
            channel.subscribers.insert(conn);
        }
        Ok((ack, replay))
    }

    pub fn unsubscribe(&mut self, conn: ConnId, target: &str) -> Result<Value, ProtocolError> {
        let subscriptions = self.by_conn.entry(conn).or_default();
        let Some(index) = subscriptions.iter().position(|s| s == target) else {
            return Err(ProtocolError::new(
                ErrorCode::NotFound,
                format!("not subscribed to `{target}`"),
            ));
        };
        subscriptions.swap_remove(index);
        self.patterns.retain(|(p, c)| !(*c == conn && p == target));
        if let Some(channel) = self.channels.get_mut(target) {
            channel.subscribers.remove(&conn);
        }
        Ok(json!({ "channel": target }))
    }

    pub fn list(&self) -> Value {
        let mut names: Vec<&String> = self.channels.keys().collect();
        names.sort();
        let channels: Vec<Value> = names
            .into_iter()
            .map(|n| self.channels[n].describe(n))
            .collect();
        json!({ "channels": channels })
    }

    /// Sends the `dropped` notices owed to a connection whose queue drained.
    pub fn on_drained(&mut self, conn: ConnId, out: &mut impl Outbox) {
        let owed: Vec<(String, Gap)> = self
            .gaps
            .iter()
            .filter(|((c, _), _)| *c == conn)
            .map(|((_, channel), gap)| (channel.clone(), *gap))
            .collect();
        for (channel, gap) in owed {
            self.gaps.remove(&(conn, channel.clone()));
            let notice = json!({
                "type": "dropped",
                "channel": channel,
                "count": gap.count,
                "first_offset": gap.first_offset,
                "last_offset": gap.last_offset,
                "message": format!(
                    "{} message(s) were dropped because this connection read too slowly; resubscribe with \
                     \"since\": {} to recover them from the backlog",
                    gap.count,
                    gap.first_offset - 1
                ),
            });
            out.reply(conn, super::Message::Text(&notice.to_string()));
        }
    }

    pub fn remove_conn(&mut self, conn: ConnId) {
        if let Some(subscriptions) = self.by_conn.remove(&conn) {
            for target in subscriptions {
                if let Some(channel) = self.channels.get_mut(&target) {
                    channel.subscribers.remove(&conn);
                    channel.floors.remove(&conn);
                }
            }
        }
        self.patterns.retain(|(_, c)| *c != conn);
        self.gaps.retain(|(c, _), _| *c != conn);
    }
}

fn too_many_channels(max: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::LimitReached,
        format!("the server already has its maximum of {max} channels"),
    )
}

/// A slow subscriber missed message `offset` of channel `name`.
fn record_drop(gaps: &mut HashMap<(ConnId, String), Gap>, conn: ConnId, name: &str, offset: u64) {
    let gap = gaps.entry((conn, name.to_owned())).or_insert(Gap {
        count: 0,
        first_offset: offset,
        last_offset: offset,
    });
    if gap.count == 0 {
        debug!(
            "conn {conn}: dropping channel `{name}` messages from offset {offset}: slow consumer"
        );
    }
    gap.count += 1;
    gap.last_offset = offset;
}

pub fn not_recoverable(channel: &str, since: u64, first: Option<u64>, last: u64) -> ProtocolError {
    let reach = match first {
        Some(first) => format!("the backlog holds offsets {first} to {last}"),
        None if last == 0 => "the channel has no messages yet".to_owned(),
        None => format!("the backlog is empty (last offset {last})"),
    };
    let why = if since > last {
        "is ahead of the channel (was it restarted?)"
    } else {
        "is no longer in the backlog"
    };
    ProtocolError::new(
        ErrorCode::NotRecoverable,
        format!("cannot resume `{channel}` after offset {since}: that offset {why}; {reach}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::tests::RecordingOutbox;

    fn limits() -> ChannelLimits {
        ChannelLimits {
            backlog: 3,
            backlog_age: Duration::from_secs(60),
            max_channels: 2,
            max_subscriptions: 2,
        }
    }

    fn offsets(frames: &[SharedFrame]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(&f.bytes()[2..]).unwrap();
                serde_json::from_str::<Value>(text).unwrap()["offset"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn offsets_increase_and_backlog_resumes_or_refuses() {
        let mut channels = Channels::new(limits());
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        for i in 1..=5 {
            let published = channels
                .publish("a", &json!(i), true, now, &mut out)
                .unwrap();
            assert_eq!(published.offset, i);
        }
        // Backlog keeps offsets 3, 4, 5.
        let (_, replay) = channels.subscribe(1, "a", Some(2), now).unwrap();
        assert_eq!(offsets(&replay), vec![3, 4, 5]);
        let (_, replay) = channels.subscribe(2, "a", Some(5), now).unwrap();
        assert!(replay.is_empty());
        // Subscribed already: `since` replays without a second subscription.
        let (ack, replay) = channels.subscribe(2, "a", Some(3), now).unwrap();
        assert_eq!(
            (ack["resumed"].as_bool(), offsets(&replay)),
            (Some(true), vec![4, 5])
        );
        assert_eq!(
            channels.subscribe(2, "a", None, now).unwrap_err().code,
            ErrorCode::Conflict
        );
        let e = channels.subscribe(3, "a", Some(1), now).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotRecoverable);
        assert!(e.message.contains("offsets 3 to 5"), "{}", e.message);
        let e = channels.subscribe(3, "a", Some(9), now).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotRecoverable);
        // Expired by age: nothing recoverable.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            channels.subscribe(4, "a", Some(4), later).unwrap_err().code,
            ErrorCode::NotRecoverable
        );
    }

    #[test]
    fn exact_and_pattern_subscribers_get_each_message_once() {
        let mut channels = Channels::new(ChannelLimits {
            max_channels: 10,
            max_subscriptions: 10,
            ..limits()
        });
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        channels.subscribe(1, "trades.btc", None, now).unwrap();
        channels.subscribe(1, "trades.*", None, now).unwrap();
        channels.subscribe(2, "trades.*", None, now).unwrap();
        let published = channels
            .publish("trades.btc", &json!({"p":1}), true, now, &mut out)
            .unwrap();
        assert_eq!(published.delivered, 2);
        assert_eq!(out.delivered.iter().filter(|(c, _)| *c == 1).count(), 1);
        channels
            .publish("trades.btc.usd", &json!(1), true, now, &mut out)
            .unwrap();
        assert_eq!(out.delivered.len(), 2, "`*` matches one segment only");
        channels.subscribe(3, "later", None, now).unwrap();
        assert_eq!(
            channels
                .publish("later", &json!(1), true, now, &mut out)
                .unwrap()
                .delivered,
            1
        );
        channels.unsubscribe(2, "trades.*").unwrap();
        assert_eq!(
            channels.unsubscribe(2, "trades.*").unwrap_err().code,
            ErrorCode::NotFound
        );
        channels.remove_conn(1);
        let published = channels
            .publish("trades.btc", &json!(1), true, now, &mut out)
            .unwrap();
        assert_eq!(published.delivered, 0);
    }

    #[test]
    fn publish_rules_and_limits() {
        let mut channels = Channels::new(limits());
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        assert_eq!(
            channels
                .publish("x", &json!(1), false, now, &mut out)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        channels.create("x", &ChannelSettings::default()).unwrap();
        assert_eq!(
            channels
                .publish("x", &json!(1), false, now, &mut out)
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        let open = ChannelSettings {
            publish: Some(PublishPolicy::Anyone),
            ..Default::default()
        };
        channels.create("open", &open).unwrap();
        assert!(channels
            .publish("open", &json!(1), false, now, &mut out)
            .is_ok());
        assert_eq!(
            channels.create("third", &open).unwrap_err().code,
            ErrorCode::LimitReached
        );
        assert_eq!(
            channels.create("x", &open).unwrap()["created"],
            json!(false)
        );
        channels.subscribe(9, "a", None, now).unwrap();
        channels.subscribe(9, "b", None, now).unwrap();
        assert_eq!(
            channels.subscribe(9, "c", None, now).unwrap_err().code,
            ErrorCode::LimitReached
        );
        assert_eq!(
            channels.subscribe(8, "a.*", Some(1), now).unwrap_err().code,
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn slow_subscribers_get_a_gap_notice_when_drained() {
        let mut channels = Channels::new(limits());
        let mut out = RecordingOutbox {
            full: [5].into_iter().collect(),
            ..Default::default()
        };
        let now = Instant::now();
        channels.subscribe(5, "a", None, now).unwrap();
        for _ in 0..3 {
            channels
                .publish("a", &json!(1), true, now, &mut out)
                .unwrap();
        }
        assert_eq!(channels.dropped_total, 3);
        channels.on_drained(5, &mut out);
        let notice: Value = serde_json::from_str(&out.replies[0].1).unwrap();
        assert_eq!(
            (notice["type"].as_str(), notice["count"].as_u64()),
            (Some("dropped"), Some(3))
        );
        assert_eq!(
            (
                notice["first_offset"].as_u64(),
                notice["last_offset"].as_u64()
            ),
            (Some(1), Some(3))
        );
        channels.on_drained(5, &mut out);
        assert_eq!(out.replies.len(), 1, "a gap is reported once");
    }

    #[test]
    fn definitions_create_or_replace_settings() {
        let mut channels = Channels::new(limits());
        let mut out = RecordingOutbox::default();
        let now = Instant::now();
        for i in 1..=3 {
            channels
                .publish("a", &json!(i), true, now, &mut out)
                .unwrap();
        }
        assert_eq!(
            channels.settings_source("a"),
            Some(SettingsSource::Defaults)
        );
        let defaults = channels.resolve(&ChannelSettings::default()).unwrap();
        assert_eq!(
            defaults,
            ChannelDefinition {
                backlog: 3,
                backlog_age: Duration::from_secs(60),
                publish: PublishPolicy::Trusted
            }
        );
        let open = ChannelDefinition {
            backlog: 1,
            backlog_age: Duration::from_secs(5),
            publish: PublishPolicy::Anyone,
        };
        assert_eq!(
            channels.define("a", open, SettingsSource::Cluster),
            Ok(true)
        );
        assert_eq!(
            channels.define("a", open, SettingsSource::Cluster),
            Ok(false)
        );
        let a = channels.describe("a").unwrap();
        assert_eq!(
            (
                &a["publish"],
                &a["backlog_limit"],
                &a["backlog"],
                &a["offset"]
            ),
            (&json!("anyone"), &json!(1), &json!(1), &json!(3)),
            "a smaller limit keeps the newest: {a}"
        );
        assert!(channels
            .publish("a", &json!(4), false, now, &mut out)
            .is_ok());
        assert_eq!(channels.cluster_definitions(), vec![("a".to_owned(), open)]);
        // A new channel, then the limit (2).
        assert_eq!(channels.define("b", open, SettingsSource::Local), Ok(true));
        assert_eq!(channels.settings_source("b"), Some(SettingsSource::Local));
        assert_eq!(
            channels
                .define("c", open, SettingsSource::Cluster)
                .unwrap_err()
                .code,
            ErrorCode::LimitReached
        );
        assert_eq!(
            channels.check_room_for("c").unwrap_err().code,
            ErrorCode::LimitReached
        );
        assert!(channels.check_room_for("b").is_ok());
        assert_eq!(
            channels
                .define("bad name", open, SettingsSource::Cluster)
                .unwrap_err()
                .code,
            ErrorCode::InvalidField
        );
        for (settings, field) in [
            (
                ChannelSettings {
                    backlog: Some(1_000_001),
                    ..Default::default()
                },
                "`backlog`",
            ),
            (
                ChannelSettings {
                    backlog_age_secs: Some(u64::MAX),
                    ..Default::default()
                },
                "`backlog_age`",
            ),
        ] {
            let e = channels.resolve(&settings).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidField);
            assert!(e.message.contains(field), "{}", e.message);
        }
    }
}
