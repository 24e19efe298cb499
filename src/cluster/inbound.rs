//! [`Inbound`]: everything the link hands to the event loop (bus messages,
//! definitions, answers to requests, up/down/reset, losses), in one type
//! so the loop has one `match` for all of Redis.

use redis::Value;

use super::errors::RequestError;
use super::streams::History;

/// What the link hands to the event loop (see [`RedisLink::drain`](super::RedisLink::drain)).
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A message from the bus, from any node including this one (skip your
    /// own by `origin` if you delivered them locally already). Per channel,
    /// offsets increase by one and are the same on every node.
    Message {
        channel: String,
        offset: u64,
        /// The publishing node's `node_id`.
        origin: String,
        /// What `publish` returned on the origin node.
        origin_seq: u64,
        payload: String,
    },
    /// A channel definition announced on the bus (by [`RedisLink::define`](super::RedisLink::define)
    /// on any node, this one included): `definition` is the one in force,
    /// the first Redis recorded for the channel, the same in every
    /// announcement of the channel (until Redis loses its data).
    Definition {
        channel: String,
        definition: String,
        /// This announcement's own definition is the one recorded.
        created: bool,
        origin: String,
        /// What `define` returned on the origin node.
        origin_seq: u64,
    },
    /// Every channel definition in Redis when the reader took its place on
    /// the bus (each connection of the reader: start, reconnect, after a
    /// data reset); later ones come as [`Inbound::Definition`]. Sent before
    /// the [`Inbound::Up`] it precedes.
    Definitions { definitions: Vec<(String, String)> },
    /// The answer to [`RedisLink::history`](super::RedisLink::history)
    /// and [`RedisLink::recent`](super::RedisLink::recent).
    History {
        request: u64,
        channel: String,
        result: Result<History, RequestError>,
    },
    /// The answer to [`RedisLink::script`](super::RedisLink::script):
    /// Redis's reply, as it came (the caller parses it).
    Script {
        request: u64,
        result: Result<Value, RequestError>,
    },
    /// Both connections are up (first connect, or after a `Down`).
    Up,
    /// Redis is unreachable: sent once per outage (one warning is logged).
    Down { reason: String },
    /// Redis lost its data (restarted without persistence, flushed, or a
    /// different server): channel offsets start again from 1 and history
    /// from before is gone; messages not yet read from the old bus are lost
    /// (their number is unknown).
    Reset,
    /// Messages that will never be delivered, counted.
    Lost { count: u64, kind: LostKind },
}

/// Why messages were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostKind {
    /// `publish` found the outbound queue full (it also answered [`Full`](super::Full)).
    /// Reported in batches, as counted since the last report.
    QueueFull,
    /// Redis refused this node's publish or definition `origin_seq` (out of
    /// memory, a key of the wrong type, ...): count is 1.
    Rejected { origin_seq: u64 },
    /// The bus was trimmed past this node's reader (it was disconnected or
    /// slow for longer than `bus_maxlen` messages): messages from any node.
    BusGap,
}
