//! The writer thread: publishes and definitions (pipelined, through their
//! scripts), the app's idempotent writes (pipelined) and script calls, and
//! history reads, on its own connection, in the order they were queued;
//! it also refreshes this node run's alive key every second.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::{Client, Connection, ErrorKind, RedisError, Script, Value};

use super::connection::{is_connection_error, is_unavailable, open, set_alive, sync_epoch, TICK};
use super::errors::{ConnectError, RequestError};
use super::inbound::LostKind;
use super::protocol::{
    self, alive_key, channel_key, dedup_key, offset_key, PublishReply, BUS_KEY, BUS_SEQ_KEY,
    DEDUP_TTL_SECS, DEFINE_LUA, DEFINITIONS_KEY, PUBLISH_LUA,
};
use super::queues::Command;
use super::reconnect::{Reconnect, ReconnectState};
use super::requests::ScriptMode;
use super::shared::Shared;
use super::status::{add, Side};
use super::streams;
use super::warn::RateLimited;

/// How often the writer refreshes its node run's alive key (which also
/// checks its connection when idle).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The writer thread: publishes and definitions (pipelined, through their
/// scripts), idempotent writes, script calls and history requests, on its
/// own connection.
pub(super) struct Writer {
    sh: Arc<Shared>,
    client: Client,
    conn: Option<Connection>,
    script: Script,
    define_script: Script,
    /// This node run's alive key.
    alive_key: String,
    reconnect: ReconnectState,
    /// Commands taken from the outbox, not finished yet.
    batch: Vec<Command>,
    /// Per publish in `batch`: the dedup sequence it was last sent with, 0
    /// when it was never sent or Redis certainly did not apply it.
    dseqs: Vec<u64>,
    next_dseq: u64,
    noscript_rounds: u32,
    dedup_key: String,
    /// When the alive key was last refreshed.
    last_heartbeat: Instant,
    rejected_warn: RateLimited,
}

impl Writer {
    pub(super) fn new(sh: Arc<Shared>, client: Client, seed: u64) -> Writer {
        Writer {
            client,
            conn: None,
            script: Script::new(PUBLISH_LUA),
            define_script: Script::new(DEFINE_LUA),
            alive_key: alive_key(&sh.cfg.node_id, &sh.instance),
            reconnect: ReconnectState::new(Side::Writer, &sh.cfg, seed),
            batch: Vec::new(),
            dseqs: Vec::new(),
            next_dseq: 0,
            noscript_rounds: 0,
            dedup_key: dedup_key(&sh.cfg.node_id, &sh.instance),
            last_heartbeat: Instant::now(),
            rejected_warn: RateLimited::new(),
            sh,
        }
    }

    pub(super) fn run(mut self) {
        while !self.sh.stopping() {
            self.sh.report_overflow();
            if self.conn.is_none() && !self.connect() {
                continue;
            }
            self.heartbeat();
            if self.conn.is_none() {
                continue;
            }
            if !self.sh.reader_ready.load(Ordering::Acquire) {
                self.sh
                    .outbox
                    .sleep_until(Instant::now() + TICK / 4, &self.sh.stop);
                continue;
            }
            if self.batch.is_empty() {
                self.sh
                    .outbox
                    .take_batch(self.sh.cfg.batch, TICK, &self.sh.stop, &mut self.batch);
                self.dseqs.clear();
                self.dseqs.resize(self.batch.len(), 0);
                if self.batch.is_empty() {
                    continue;
                }
            }
            self.process();
        }
        self.finish();
    }

    fn process(&mut self) {
        match self.batch.first() {
            Some(Command::History { .. }) => self.run_history(),
            Some(Command::Script { .. }) => self.run_script(),
            Some(Command::Writes { .. }) => self.run_writes(),
            _ => self.run_publishes(),
        }
    }

    /// Answers queued reads with an error (Redis unreachable).
    fn fail_reads(&mut self, why: RequestError) {
        if self.batch.first().is_some_and(Command::is_read) {
            let cmd = self.batch.remove(0);
            self.dseqs.clear();
            self.sh.outbox.done(1);
            self.sh.fail_read(cmd, why.clone());
        }
        for cmd in self.sh.outbox.take_reads() {
            self.sh.fail_read(cmd, why.clone());
        }
    }

    /// Refreshes the alive key every [`HEALTH_INTERVAL`], busy or idle;
    /// when idle this is also what notices a dead connection.
    fn heartbeat(&mut self) {
        if self.last_heartbeat.elapsed() < HEALTH_INTERVAL {
            return;
        }
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        self.last_heartbeat = Instant::now();
        match set_alive(con, &self.alive_key, self.sh.cfg.alive_ttl) {
            Ok(_) => {}
            Err(e) if is_connection_error(&e) => self.connection_failed(&e),
            // LOADING and the like: Redis is there but cannot serve yet.
            Err(e) if is_unavailable(&e) => self.went_down(&e.to_string()),
            // Out of memory and the like refuse this write, not the link:
            // publishes are judged one by one.
            Err(e) => self.rejected_warn.warn(format_args!(
                "redis link: node {} could not refresh its liveness key ({e}); other nodes \
                 take it for gone (and drop what it holds there) after {:?}",
                self.sh.cfg.node_id, self.sh.cfg.alive_ttl
            )),
        }
    }

    fn run_history(&mut self) {
        let Some(Command::History {
            channel,
            after_offset,
            limit,
            newest,
            ..
        }) = self.batch.first()
        else {
            return;
        };
        let (after_offset, limit, newest) = (*after_offset, *limit, *newest);
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let mut pipe = redis::pipe();
        pipe.atomic();
        if newest {
            pipe.cmd("XREVRANGE")
                .arg(channel_key(channel))
                .arg("+")
                .arg("-");
        } else {
            pipe.cmd("XRANGE")
                .arg(channel_key(channel))
                .arg(format!("0-{}", after_offset.saturating_add(1)))
                .arg("+");
        }
        let reply = pipe
            .arg("COUNT")
            .arg(limit)
            .cmd("GET")
            .arg(offset_key(channel))
            .query::<Value>(con);
        let result = match reply {
            Ok(v) if newest => streams::parse_recent_reply(v).map_err(RequestError::from),
            Ok(v) => {
                streams::parse_history_reply(v, after_offset, limit).map_err(RequestError::from)
            }
            Err(e) => {
                let why = RequestError::of(&e);
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                }
                Err(why)
            }
        };
        let cmd = self.batch.remove(0);
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh.answer_history(cmd, result);
    }

    /// A script call. A read is answered with the error when the
    /// connection breaks under it; a durable call is left first in the
    /// batch instead, and sent again after reconnecting (such scripts are
    /// idempotent).
    fn run_script(&mut self) {
        let Some(Command::Script { call, mode, .. }) = self.batch.first() else {
            return;
        };
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let mut invocation = call.script.script().prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in &call.args {
            invocation.arg(arg);
        }
        // `invoke` loads the script when Redis's cache lacks it.
        let reply = invocation.invoke::<Value>(con);
        let result = match (reply, *mode) {
            (Ok(v), _) => Ok(v),
            (Err(e), ScriptMode::Read) => {
                let why = RequestError::of(&e);
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                }
                Err(why)
            }
            (Err(e), ScriptMode::Durable) if is_connection_error(&e) => {
                return self.connection_failed(&e)
            }
            (Err(e), ScriptMode::Durable) if is_unavailable(&e) => {
                return self.went_down(&e.to_string())
            }
            (Err(e), ScriptMode::Durable) => Err(RequestError::Redis(e.to_string())),
        };
        let Command::Script { request, .. } = self.batch.remove(0) else {
            return;
        };
        self.dseqs.clear();
        self.sh.outbox.done(1);
        self.sh.answer_script(request, result);
    }

    /// The replies of a pipeline run with `ignore_errors`, if there are
    /// `expected` of them (any number when `None`). Otherwise the connection
    /// is dropped: a broken one is reported, and a reply of another shape
    /// (not expected with `ignore_errors`) is treated like a broken
    /// connection, after which the callers resend safely.
    fn pipeline_replies(
        &mut self,
        reply: redis::RedisResult<Value>,
        expected: Option<usize>,
    ) -> Option<Vec<Value>> {
        match reply {
            Ok(Value::Array(replies)) if expected.is_none_or(|n| replies.len() == n) => {
                Some(replies)
            }
            Ok(other) => {
                let e = RedisError::from((
                    ErrorKind::Client,
                    "unexpected pipeline reply",
                    protocol::kind(&other).to_string(),
                ));
                self.connection_failed(&e);
                None
            }
            Err(e) => {
                if is_connection_error(&e) {
                    self.connection_failed(&e);
                } else {
                    self.conn = None;
                }
                None
            }
        }
    }

    /// A run of idempotent writes, pipelined. Each is idempotent, so
    /// after a broken connection the whole run is sent again.
    fn run_writes(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // What each command of the pipeline belongs to, for the warning.
        let mut whats = Vec::new();
        for cmd in &self.batch {
            let Command::Writes { what, commands } = cmd else {
                continue;
            };
            for words in commands {
                let Some((name, args)) = words.split_first() else {
                    continue;
                };
                pipe.cmd(name);
                for arg in args {
                    pipe.arg(arg);
                }
                whats.push(*what);
            }
        }
        let reply = pipe.query::<Value>(con);
        let Some(replies) = self.pipeline_replies(reply, None) else {
            return;
        };
        let refused: Vec<(&str, String)> = replies
            .into_iter()
            .zip(whats)
            .filter_map(|(r, what)| match r {
                Value::ServerError(e) => {
                    Some((what, format!("{} {}", e.code(), e.details().unwrap_or(""))))
                }
                _ => None,
            })
            .collect();
        if let Some((what, why)) = refused.first() {
            add(&self.sh.c.writes_lost, refused.len() as u64);
            self.rejected_warn.warn(format_args!(
                "redis link: {} {what} of node {} refused by redis ({why})",
                refused.len(),
                self.sh.cfg.node_id
            ));
        }
        self.sh.outbox.done(self.batch.len());
        self.batch.clear();
        self.dseqs.clear();
    }

    fn run_publishes(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let cfg = &self.sh.cfg;
        let hash = self.script.get_hash();
        let define_hash = self.define_script.get_hash();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // Loading the script first in the same pipeline means no EVALSHA of
        // this batch can meet an empty script cache (Redis restarted, or
        // another client's SCRIPT FLUSH) -- except by a flush racing the
        // pipeline, which is handled below.
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA);
        pipe.cmd("SCRIPT").arg("LOAD").arg(DEFINE_LUA);
        for (cmd, dseq) in self.batch.iter().zip(self.dseqs.iter_mut()) {
            if *dseq == 0 {
                self.next_dseq += 1;
                *dseq = self.next_dseq;
            }
            let (id, channel, payload) = match cmd {
                Command::Publish {
                    id,
                    channel,
                    payload,
                } => (id, channel, payload),
                Command::Define {
                    id,
                    channel,
                    definition,
                } => {
                    pipe.cmd("EVALSHA")
                        .arg(define_hash)
                        .arg(4)
                        .arg(DEFINITIONS_KEY)
                        .arg(BUS_KEY)
                        .arg(BUS_SEQ_KEY)
                        .arg(&self.dedup_key)
                        .arg(channel)
                        .arg(definition.as_str())
                        .arg(&cfg.node_id)
                        .arg(*id)
                        .arg(cfg.bus_maxlen)
                        .arg(DEDUP_TTL_SECS)
                        .arg(*dseq);
                    continue;
                }
                // Never in a write batch (`take_batch` keeps them apart).
                Command::History { .. } | Command::Script { .. } | Command::Writes { .. } => {
                    continue
                }
            };
            pipe.cmd("EVALSHA")
                .arg(hash)
                .arg(5)
                .arg(offset_key(channel))
                .arg(channel_key(channel))
                .arg(BUS_KEY)
                .arg(BUS_SEQ_KEY)
                .arg(&self.dedup_key)
                .arg(channel)
                .arg(&cfg.node_id)
                .arg(*id)
                .arg(payload.as_str())
                .arg(cfg.stream_maxlen)
                .arg(cfg.bus_maxlen)
                .arg(DEDUP_TTL_SECS)
                .arg(*dseq);
        }
        let reply = pipe.query::<Value>(con);
        // Two `SCRIPT LOAD`s, then one reply per command. Any other reply
        // cannot tell what was applied: the batch is resent after a
        // reconnect (the dedup sequence keeps that exactly-once).
        let Some(replies) = self.pipeline_replies(reply, Some(self.batch.len() + 2)) else {
            return;
        };
        let outcomes: Vec<PublishReply> = replies
            .into_iter()
            .skip(2)
            .map(protocol::publish_reply)
            .collect();
        // A publish that certainly did not apply is resent only if no later
        // one of the batch applied: resending it then would reorder this
        // node's messages, so it is reported lost instead.
        let last_applied = outcomes
            .iter()
            .rposition(|o| matches!(o, PublishReply::Offset(_) | PublishReply::Duplicate));
        let mut retry = vec![false; outcomes.len()];
        let mut transient: Option<String> = None;
        let mut noscript = false;
        for (i, outcome) in outcomes.into_iter().enumerate() {
            let resendable = last_applied.is_none_or(|j| j < i);
            let (id, applied) = match &self.batch[i] {
                Command::Publish { id, .. } => (*id, &self.sh.c.published),
                Command::Define { id, .. } => (*id, &self.sh.c.defined),
                Command::History { .. } | Command::Script { .. } | Command::Writes { .. } => {
                    (0, &self.sh.c.published)
                }
            };
            match outcome {
                PublishReply::Offset(_) => add(applied, 1),
                PublishReply::Duplicate => {
                    add(applied, 1);
                    add(&self.sh.c.duplicates, 1);
                }
                PublishReply::NoScript if resendable => {
                    noscript = true;
                    retry[i] = true;
                }
                PublishReply::Transient(why) if resendable => {
                    transient.get_or_insert(why);
                    retry[i] = true;
                }
                PublishReply::NoScript => self.reject(id, "NOSCRIPT while later publishes applied"),
                PublishReply::Transient(why) | PublishReply::Failed(why) => self.reject(id, &why),
            }
        }
        if noscript {
            self.noscript_rounds += 1;
            if self.noscript_rounds > 3 {
                // The script keeps vanishing: give these up rather than spin.
                for (i, r) in retry.iter_mut().enumerate() {
                    if std::mem::take(r) {
                        let id = match &self.batch[i] {
                            Command::Publish { id, .. } | Command::Define { id, .. } => *id,
                            _ => 0,
                        };
                        self.reject(id, "NOSCRIPT after reloading the script");
                    }
                }
                self.noscript_rounds = 0;
            }
        } else {
            self.noscript_rounds = 0;
        }
        // Keep the ones to resend, with a fresh dedup sequence (they were
        // certainly not applied).
        let mut finished = 0;
        let mut keep = Vec::new();
        for (cmd, r) in std::mem::take(&mut self.batch).into_iter().zip(retry) {
            if r {
                keep.push(cmd);
            } else {
                finished += 1;
            }
        }
        self.batch = keep;
        self.dseqs.clear();
        self.dseqs.resize(self.batch.len(), 0);
        self.sh.outbox.done(finished);
        if let Some(why) = transient {
            // LOADING, READONLY, ...: this server cannot take writes now.
            self.went_down(&why);
        }
    }

    fn reject(&mut self, origin_seq: u64, why: &str) {
        add(&self.sh.c.lost_rejected, 1);
        self.rejected_warn.warn(format_args!(
            "redis link: publish or definition {origin_seq} of node {} was refused by redis ({why}); it is lost",
            self.sh.cfg.node_id
        ));
        self.sh.lost(1, LostKind::Rejected { origin_seq });
    }

    /// Shutdown: flush what is queued while connected, for up to half the
    /// shutdown timeout; count the rest as lost.
    fn finish(&mut self) {
        let deadline = Instant::now() + self.sh.cfg.shutdown_timeout / 2;
        while self.conn.is_some() && Instant::now() < deadline {
            if self.batch.is_empty() {
                self.sh.outbox.take_batch(
                    self.sh.cfg.batch,
                    Duration::ZERO,
                    &self.sh.stop,
                    &mut self.batch,
                );
                self.dseqs.clear();
                self.dseqs.resize(self.batch.len(), 0);
                if self.batch.is_empty() {
                    break;
                }
            }
            self.process();
        }
        let left = self
            .batch
            .drain(..)
            .chain(self.sh.outbox.take_all())
            .filter(|c| matches!(c, Command::Publish { .. } | Command::Define { .. }))
            .count() as u64;
        // What the app keeps under this run's alive key is void at once
        // (not after alive_ttl).
        if let Some(con) = self.conn.as_mut() {
            if let Err(e) = redis::cmd("DEL").arg(&self.alive_key).query::<Value>(con) {
                log::debug!("redis writer: could not clear the alive key at shutdown: {e}");
            }
        }
        if left > 0 {
            add(&self.sh.c.lost_at_shutdown, left);
            log::warn!(
                "redis link: {left} queued publish(es) and definition(s) were not sent before shutdown"
            );
        }
    }
}

impl Reconnect for Writer {
    fn shared(&self) -> &Shared {
        &self.sh
    }

    fn reconnect_state(&mut self) -> &mut ReconnectState {
        &mut self.reconnect
    }

    /// Loads the scripts, checks the epoch and sets the alive key.
    fn establish(&mut self) -> Result<(), ConnectError> {
        let mut con = open(&self.sh, &self.client, "writer", self.sh.cfg.io_timeout)?;
        for script in [&self.script, &self.define_script] {
            script
                .prepare_invoke()
                .load(&mut con)
                .map_err(ConnectError::ScriptLoad)?;
        }
        sync_epoch(&self.sh, &mut con)?;
        // Alive before any write of this run that depends on the key; a
        // refusal (out of memory) is the heartbeat's to report.
        match set_alive(&mut con, &self.alive_key, self.sh.cfg.alive_ttl) {
            Err(e) if is_connection_error(&e) || is_unavailable(&e) => {
                return Err(ConnectError::SetAlive(e))
            }
            _ => {}
        }
        self.conn = Some(con);
        self.last_heartbeat = Instant::now();
        Ok(())
    }

    fn drop_connection(&mut self) {
        self.conn = None;
    }

    /// Reads queued meanwhile are answered at once with
    /// [`RequestError::Down`]; queue-full losses keep being reported.
    fn wait_until(&mut self, deadline: Instant) {
        while !self.sh.stopping() && Instant::now() < deadline {
            self.fail_reads(RequestError::Down);
            self.sh.report_overflow();
            self.sh.outbox.sleep_until(deadline, &self.sh.stop);
        }
    }
}
