//! The app's view of the connection table: the `Outbox` the domains
//! answer and fan out through. It knows connection ids and queues, never
//! sockets (except to give a full queue the socket's room before a
//! delivery is called dropped).
//!
//! State updates a full queue cannot take are held per connection in
//! `PendingStates` (latest per key, bounded per stream) and moved into the
//! queue by [`Core::queue_held_states`] whenever a flush leaves room.

use std::collections::HashMap;

use slab::Slab;

use super::{wake_at, Core};
use crate::app::{App, ConnId, Message, Outbox, SharedFrame, StateDelivery, StateKey};
use crate::config::Config;
use crate::server::compressors::{BroadcastCache, Compressors};
use crate::server::connection::{Connection, Phase};
use crate::server::pending_states::PendingStates;
use crate::server::stats::Stats;
use crate::server::timers::{Tick, Timers};
use crate::server::tls_session::TlsSessions;
use crate::ws::decoder::MESSAGE_HEADROOM;
use crate::ws::extensions::DeflateParams;
use crate::ws::{CloseCode, OpCode, SessionConfig};

impl Core {
    /// Splits the core into the app and the outbox it answers through.
    pub(super) fn app_and_outbox(&mut self) -> (&mut App, Delivery<'_>) {
        let Core {
            app,
            conns,
            tls,
            compressors,
            dirty,
            timers,
            config,
            stats,
            tick,
            session_config,
            held_states,
            ..
        } = self;
        (
            app,
            Delivery {
                session_config: *session_config,
                conns,
                tls,
                held_states,
                dirty,
                timers,
                config,
                stats,
                tick: *tick,
                compressors,
                broadcast: BroadcastCache::default(),
            },
        )
    }
}

/// What an open connection agreed for permessage-deflate.
fn deflate_params(conn: &Connection) -> Option<DeflateParams> {
    match &conn.phase {
        Phase::Open(open) => open.session.deflate(),
        _ => None,
    }
}

/// The app's view of the connection table.
pub(super) struct Delivery<'a> {
    session_config: SessionConfig,
    conns: &'a mut Slab<Connection>,
    tls: &'a mut TlsSessions,
    held_states: &'a mut HashMap<usize, PendingStates>,
    dirty: &'a mut Vec<usize>,
    timers: &'a mut Timers,
    config: &'a Config,
    stats: &'a mut Stats,
    tick: Tick,
    compressors: &'a mut Compressors,
    /// A fan-out's compressed frames, so it compresses once per window.
    broadcast: BroadcastCache,
}

impl Delivery<'_> {
    /// Queues a fan-out frame for `to` unless its queue is full even after
    /// giving the socket what it takes; true when queued, or when `to` is
    /// gone or closing (nothing to report).
    fn queue_fanout(&mut self, to: ConnId, frame: &SharedFrame) -> bool {
        let limit = self.config.max_outbound_buffer;
        let Some(conn) = open_conn(self.conns, self.dirty, to) else {
            return true;
        };
        let params = deflate_params(conn);
        // A compressor with context takeover must see only what is sent
        // (the client's inflater sees only that): such a recipient is
        // judged on the plain size and compressed once the frame is in.
        let own_context = params.is_some_and(|p| !p.server_no_context_takeover);
        let mut deflated = if own_context {
            None
        } else {
            self.deflated_frame(to, params, frame)
        };
        let size = deflated.as_ref().unwrap_or(frame).bytes().len();
        let conn = &mut self.conns[to];
        if conn.out.len() + size > limit {
            // The queue may be full only because this turn has not written
            // yet: give the socket what it takes before calling it slow.
            let before = conn.out.len();
            let _ = conn.flush_out(self.tls);
            self.stats.bytes_out += (before - conn.out.len()) as u64;
        }
        if conn.out.len() + size > limit {
            return false;
        }
        if own_context {
            deflated = self.deflated_frame(to, params, frame);
        }
        self.conns[to]
            .out
            .push_shared(deflated.as_ref().unwrap_or(frame));
        self.stats.deliveries += 1;
        true
    }

    /// The frame to queue for `to` in place of `frame` when `to` agreed to
    /// permessage-deflate and the frame is worth compressing.
    fn deflated_frame(
        &mut self,
        to: ConnId,
        params: Option<DeflateParams>,
        frame: &SharedFrame,
    ) -> Option<SharedFrame> {
        self.broadcast
            .frame_for(self.compressors, to, params?, frame)
    }

    fn open_conn(&mut self, to: ConnId) -> Option<&mut Connection> {
        open_conn(self.conns, self.dirty, to)
    }
}

impl Outbox for Delivery<'_> {
    fn reply_shared(&mut self, to: ConnId, frame: &SharedFrame) {
        let Some(conn) = self.open_conn(to) else {
            return;
        };
        let params = deflate_params(conn);
        let deflated = self.deflated_frame(to, params, frame);
        self.conns[to]
            .out
            .push_shared(deflated.as_ref().unwrap_or(frame));
    }

    fn deliver(&mut self, to: ConnId, frame: &SharedFrame) -> bool {
        let queued = self.queue_fanout(to, frame);
        if !queued {
            if let Some(conn) = self.conns.get_mut(to) {
                conn.drain_wanted = true;
            }
            self.stats.delivery_drops += 1;
        }
        queued
    }

    fn deliver_state(&mut self, to: ConnId, key: StateKey, frame: &SharedFrame) -> StateDelivery {
        // A connection that is gone or closing is not slow: nothing to hold.
        if open_conn(self.conns, self.dirty, to).is_none() {
            return StateDelivery::Queued;
        }
        // Held states go first: a new one joins them, so that a stream's
        // states reach the client in order.
        if !holds_states(self.held_states, to) && self.queue_fanout(to, frame) {
            return StateDelivery::Queued;
        }
        self.conns[to].drain_wanted = true;
        let held = self.held_states.entry(to).or_default().put(
            key,
            frame.clone(),
            self.config.max_pending_states,
        );
        match held {
            StateDelivery::Queued => {}
            StateDelivery::Held => self.stats.states_held += 1,
            StateDelivery::Replaced => self.stats.states_conflated += 1,
            StateDelivery::Evicted { .. } => {
                self.stats.states_held += 1;
                self.stats.states_evicted += 1;
            }
        }
        held
    }

    fn discard_states(&mut self, to: ConnId, stream: u64) {
        if let Some(held) = self.held_states.get_mut(&to) {
            held.discard_stream(stream);
            if held.is_empty() {
                self.held_states.remove(&to);
            }
        }
    }

    fn reply(&mut self, to: ConnId, message: Message<'_>) {
        let (opcode, payload) = match message {
            Message::Text(text) => (OpCode::Text, text.as_bytes()),
            Message::Binary(bytes) => (OpCode::Binary, bytes),
        };
        let Some(conn) = self.open_conn(to) else {
            return;
        };
        if let Some(params) = deflate_params(conn) {
            if let Some(buffer) = self.compressors.deflate(to, params, payload) {
                self.conns[to]
                    .out
                    .push_deflated(opcode, buffer, MESSAGE_HEADROOM);
                return;
            }
        }
        self.conns[to].out.push_frame(opcode, payload);
    }

    fn close(&mut self, to: ConnId, code: CloseCode, reason: &str) {
        let Some(conn) = open_conn(self.conns, self.dirty, to) else {
            return;
        };
        let Some((open, mut host)) = conn.session_and_host(self.compressors, to) else {
            return;
        };
        let config = &self.session_config;
        if !open
            .session
            .close(code, reason, self.tick, config, &mut host)
        {
            return;
        }
        self.stats.closes_sent += 1;
        let at = conn.next_deadline(config.idle_timeout);
        wake_at(self.timers, to, conn, at);
    }
}

/// Whether `to` has states held: while no connection holds any (the usual
/// case), answered without a lookup.
pub(super) fn holds_states(held_states: &HashMap<usize, PendingStates>, to: ConnId) -> bool {
    !held_states.is_empty() && held_states.contains_key(&to)
}

/// The connection `to` if it is open for messages, marked for this
/// turn's flush.
pub(super) fn open_conn<'c>(
    conns: &'c mut Slab<Connection>,
    dirty: &mut Vec<usize>,
    to: ConnId,
) -> Option<&'c mut Connection> {
    let conn = conns.get_mut(to)?;
    let open = matches!(&conn.phase, Phase::Open(o) if o.session.can_send());
    if !conn.dirty && open {
        conn.dirty = true;
        dirty.push(to);
    }
    open.then_some(conn)
}

impl Core {
    /// Moves `token`'s held states into its queue, oldest first, while they
    /// fit under `--max-outbound-buffer` (an empty queue takes one even if
    /// it is larger, so that no state waits forever). Returns whether any
    /// moved (the queue then needs writing). A connection that can no
    /// longer send (it is closing) gives its held states up: nothing may
    /// follow a close frame.
    pub(super) fn queue_held_states(&mut self, token: usize) -> bool {
        let limit = self.config.max_outbound_buffer;
        if self.held_states.is_empty() {
            return false;
        }
        let (Some(conn), Some(held)) =
            (self.conns.get_mut(token), self.held_states.get_mut(&token))
        else {
            return false;
        };
        let open = matches!(&conn.phase, Phase::Open(o) if o.session.can_send());
        let params = deflate_params(conn);
        let mut cache = BroadcastCache::default();
        let mut moved = false;
        while let Some(front) = held.front().filter(|_| open) {
            if !conn.out.is_empty() && conn.out.len() + front.bytes().len() > limit {
                break;
            }
            let (_, frame) = held.pop_front().expect("a front state");
            let deflated =
                params.and_then(|p| cache.frame_for(&mut self.compressors, token, p, &frame));
            conn.out.push_shared(deflated.as_ref().unwrap_or(&frame));
            self.stats.deliveries += 1;
            moved = true;
        }
        if !open || held.is_empty() {
            self.held_states.remove(&token);
        }
        moved
    }
}
