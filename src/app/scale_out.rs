//! What the Redis bus hands back to this node ([`Inbound`]), dispatched:
//! channel messages and definitions to [`super::publishing`], chat lines
//! and chat answers to [`super::chat::redis`], and the link's state changes
//! (up, down, Redis lost its data, messages lost) to whatever they
//! concern. The bus itself and what the scale-out guarantees are described
//! in [`super::bus`].

use std::time::Instant;

use log::{debug, warn};

use super::bus::{payload_run, RedisBus, Ticket, Waiting};
use super::chat::redis::CHAT_PREFIX;
use super::publishing::unavailable;
use super::{Node, Outbox};
use crate::cluster::Inbound;

impl Node {
    pub(super) fn on_inbound(
        &mut self,
        redis: &mut RedisBus,
        item: Inbound,
        now: Instant,
        out: &mut impl Outbox,
    ) {
        match item {
            Inbound::Message {
                channel,
                offset,
                origin,
                origin_seq,
                payload,
            } => {
                log::trace!("bus: {channel} #{offset} from {origin}/{origin_seq}");
                if redis.is_duplicate(&origin, &payload_run(&payload), origin_seq) {
                    debug!("bus: skipped a second copy of {origin}'s message {origin_seq} on `{channel}`");
                    return;
                }
                let pending = if origin == redis.node_id {
                    match redis.take(Ticket::Seq(origin_seq)) {
                        Some(Waiting::Publish(pending)) => Some(pending),
                        _ => None,
                    }
                } else {
                    None
                };
                if let Some(room) = channel.strip_prefix(CHAT_PREFIX) {
                    let local = pending.as_ref().is_some_and(|p| p.local);
                    self.on_chat_line(redis, &channel, room, offset, &payload, local, out);
                    return;
                }
                self.on_bus_message(redis, &channel, offset, &payload, pending, now, out);
            }
            Inbound::History {
                request,
                channel,
                result,
            } => match redis.take(Ticket::Request(request)) {
                Some(Waiting::Resume(resume)) => self.answer_resume(resume, &channel, result, out),
                Some(Waiting::JoinPart(join)) => {
                    self.on_join_history(redis, join, &channel, result, out)
                }
                _ => {}
            },
            Inbound::Definition {
                channel,
                definition,
                created,
                origin,
                origin_seq,
            } => {
                let pending = if origin == redis.node_id {
                    match redis.take(Ticket::Seq(origin_seq)) {
                        Some(Waiting::Definition(pending)) => Some(pending),
                        _ => None,
                    }
                } else {
                    None
                };
                self.on_definition(redis, &channel, &definition, created, pending, out);
            }
            Inbound::Definitions { definitions } => {
                for (channel, definition) in definitions {
                    // Failures are counted and logged by apply_definition.
                    let _ = self.apply_definition(redis, &channel, &definition);
                }
            }
            Inbound::Script { request, result } => {
                if let Some(waiting) = redis.take(Ticket::Request(request)) {
                    self.on_chat_answer(redis, waiting, result, out);
                }
            }
            Inbound::Up => {
                redis.on_up();
                self.rewrite_presence(redis);
                self.reassert_nicks(redis);
            }
            Inbound::Down { .. } => {
                redis.on_down();
                self.settle_nicks_locally(redis, out);
            }
            Inbound::Reset => {
                redis.stats.resets += 1;
                warn!("redis lost its data: channel offsets start again from 1; backlogs emptied");
                self.channels.reset_offsets();
                self.redefine_after_reset(redis);
                self.rewrite_presence(redis);
                self.reassert_nicks(redis);
            }
            Inbound::Lost { count, kind } => {
                if let Some((reply, what)) = redis.on_lost(count, kind) {
                    if self.still_open(&reply) {
                        let e = unavailable(format!("the {what} was lost: redis refused it"));
                        self.send_error(reply.conn, &reply.id, &e, out);
                    }
                }
            }
        }
    }
}
