//! The app's view of the connection table: the `Outbox` the domains
//! answer and fan out through. It knows connection ids and queues, never
//! sockets (except to give a full queue the socket's room before a
//! delivery is called dropped).

use slab::Slab;

use super::{wake_at, Core};
use crate::app::{App, ConnId, Message, Outbox, SharedFrame};
use crate::config::Config;
use crate::server::compressors::{BroadcastCache, Compressors};
use crate::server::connection::{Connection, Phase};
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
            ..
        } = self;
        (
            app,
            Delivery {
                session_config: *session_config,
                conns,
                tls,
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
        let limit = self.config.max_outbound_buffer;
        // A connection that is gone or closing is not slow: nothing to report.
        let Some(conn) = open_conn(self.conns, self.dirty, to) else {
            return true;
        };
        let params = deflate_params(conn);
        let deflated = self.deflated_frame(to, params, frame);
        let frame = deflated.as_ref().unwrap_or(frame);
        let conn = &mut self.conns[to];
        let mut written = 0;
        if conn.out.len() + frame.bytes().len() > limit {
            // The queue may be full only because this turn has not written
            // yet: give the socket what it takes before calling it slow.
            let before = conn.out.len();
            let _ = conn.flush_out(self.tls);
            written = before - conn.out.len();
        }
        let fits = conn.out.len() + frame.bytes().len() <= limit;
        if fits {
            conn.out.push_shared(frame);
            self.stats.deliveries += 1;
        } else {
            conn.drain_wanted = true;
            self.stats.delivery_drops += 1;
        }
        self.stats.bytes_out += written as u64;
        fits
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
