//! The reader thread: `XREAD BLOCK` on the bus from the last ID it read,
//! on its own connection; it takes its place on the bus at each
//! (re)connection (with the definitions snapshot), detects gaps and data
//! resets, and hands the entries to the loop.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use redis::{Client, Connection, Value};

use super::connection::{nap_until, open, sync_epoch};
use super::errors::ConnectError;
use super::inbound::{Inbound, LostKind};
use super::protocol::{BUS_KEY, BUS_SEQ_KEY, DEFINITIONS_KEY};
use super::reconnect::{Reconnect, ReconnectState};
use super::shared::Shared;
use super::status::{add, millis, Side};
use super::streams::{self, BusItem, StreamId};
use super::warn::RateLimited;

/// The reader thread: `XREAD BLOCK` on the bus from the last seen ID, on
/// its own connection.
pub(super) struct Reader {
    sh: Arc<Shared>,
    client: Client,
    conn: Option<Connection>,
    reconnect: ReconnectState,
    /// The last bus entry read; `None` before the first connection.
    last_id: Option<StreamId>,
    /// Its bus sequence number (gap detection).
    last_bseq: u64,
    epoch_gen: u64,
    staged: VecDeque<Inbound>,
    malformed_warn: RateLimited,
}

impl Reader {
    pub(super) fn new(sh: Arc<Shared>, client: Client, seed: u64) -> Reader {
        Reader {
            client,
            conn: None,
            reconnect: ReconnectState::new(Side::Reader, &sh.cfg, seed),
            last_id: None,
            last_bseq: 0,
            epoch_gen: 0,
            staged: VecDeque::new(),
            malformed_warn: RateLimited::new(),
            sh,
        }
    }

    pub(super) fn run(mut self) {
        while !self.sh.stopping() {
            if self.conn.is_none() && !self.connect() {
                continue;
            }
            self.read_once();
        }
    }

    fn read_once(&mut self) {
        let Some(con) = self.conn.as_mut() else {
            return;
        };
        let from = self
            .last_id
            .unwrap_or(StreamId { ms: 0, seq: 0 })
            .to_string();
        let block_ms = u64::try_from(self.sh.cfg.read_block.as_millis()).unwrap_or(u64::MAX);
        let reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(self.sh.cfg.batch)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(BUS_KEY)
            .arg(from)
            .query::<Value>(con);
        match reply {
            Ok(v) => self.deliver(v),
            Err(e) => self.connection_failed(&e),
        }
    }

    fn deliver(&mut self, v: Value) {
        let entries = match streams::parse_xread(v, BUS_KEY) {
            Ok(entries) => entries,
            Err(why) => {
                self.malformed_warn.warn(format_args!(
                    "redis reader: unreadable XREAD reply ({why}); reconnecting"
                ));
                self.conn = None;
                return;
            }
        };
        let Some(last) = entries.last() else {
            self.sh.c.lag_ms.store(0, Ordering::Relaxed);
            return;
        };
        if let Some(id) = StreamId::parse(&last.id) {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(millis)
                .unwrap_or(0);
            self.sh
                .c
                .lag_ms
                .store(now_ms.saturating_sub(id.ms), Ordering::Relaxed);
        }
        let mut restarted = false;
        for raw in entries {
            let Some(raw_id) = StreamId::parse(&raw.id) else {
                // Redis never sends this; re-reading would spin on it.
                add(&self.sh.c.malformed, 1);
                self.conn = None;
                break;
            };
            match streams::bus_item(raw) {
                Ok(item) => {
                    let bseq = item.bseq();
                    if bseq > self.last_bseq.saturating_add(1) {
                        let gap = bseq - self.last_bseq - 1;
                        add(&self.sh.c.lost_bus_gap, gap);
                        self.staged.push_back(Inbound::Lost {
                            count: gap,
                            kind: LostKind::BusGap,
                        });
                    } else if bseq <= self.last_bseq {
                        restarted = true;
                    }
                    self.last_bseq = bseq;
                    self.staged.push_back(match item {
                        BusItem::Message(e) => Inbound::Message {
                            channel: e.channel,
                            offset: e.offset,
                            origin: e.origin,
                            origin_seq: e.origin_seq,
                            payload: e.payload,
                        },
                        BusItem::Definition(d) => Inbound::Definition {
                            channel: d.channel,
                            definition: d.definition,
                            created: d.created,
                            origin: d.origin,
                            origin_seq: d.origin_seq,
                        },
                    });
                }
                Err(why) => {
                    add(&self.sh.c.malformed, 1);
                    self.malformed_warn
                        .warn(format_args!("redis reader: skipped a bus entry: {why}"));
                }
            }
            self.last_id = Some(raw_id);
        }
        if restarted {
            // The bus sequence went back: Redis was flushed under a live
            // connection. Let the epoch tell (and report) it.
            log::warn!("redis reader: the bus sequence went back; redis lost its data");
            if let Some(con) = self.conn.as_mut() {
                match sync_epoch(&self.sh, con) {
                    Ok(generation) => self.epoch_gen = generation,
                    Err(e) => log::debug!("redis reader: epoch check failed: {e}"),
                }
            }
        }
        self.sh.inbox.push_messages(&mut self.staged, &self.sh.stop);
        self.staged.clear();
    }
}

impl Reconnect for Reader {
    fn shared(&self) -> &Shared {
        &self.sh
    }

    fn reconnect_state(&mut self) -> &mut ReconnectState {
        &mut self.reconnect
    }

    /// Checks the epoch and takes the reader's place on the bus: where it
    /// starts or resumes, and the definitions snapshot of that moment.
    fn establish(&mut self) -> Result<(), ConnectError> {
        let cfg = &self.sh.cfg;
        let mut con = open(
            &self.sh,
            &self.client,
            "reader",
            cfg.read_block + cfg.io_timeout,
        )?;
        let generation = sync_epoch(&self.sh, &mut con)?;
        let position = redis::pipe()
            .atomic()
            .cmd("XREVRANGE")
            .arg(BUS_KEY)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("GET")
            .arg(BUS_SEQ_KEY)
            .cmd("HGETALL")
            .arg(DEFINITIONS_KEY)
            .query::<Value>(&mut con)?;
        let streams::BusPosition {
            top,
            bseq: counter,
            definitions,
            unreadable,
        } = streams::parse_bus_position(position)?;
        if unreadable > 0 {
            add(&self.sh.c.malformed, unreadable);
            self.malformed_warn.warn(format_args!(
                "redis reader: {unreadable} channel definition(s) in {DEFINITIONS_KEY} are not UTF-8; skipped"
            ));
        }
        match self.last_id {
            // First connection: only messages from now on.
            None => {
                self.last_id = Some(top);
                self.last_bseq = counter;
            }
            // The bus started over (Redis lost its data): everything
            // on it is new to this reader.
            Some(_) if generation != self.epoch_gen || counter < self.last_bseq => {
                self.last_id = Some(StreamId { ms: 0, seq: 0 });
                self.last_bseq = 0;
            }
            // Otherwise resume after the last entry read.
            Some(_) => {}
        }
        self.epoch_gen = generation;
        // Read in the same transaction as the position: every
        // definition is either in here or on the bus after it.
        self.sh
            .inbox
            .push_control(Inbound::Definitions { definitions });
        self.conn = Some(con);
        self.sh.reader_ready.store(true, Ordering::Release);
        Ok(())
    }

    fn drop_connection(&mut self) {
        self.conn = None;
    }

    fn wait_until(&mut self, deadline: Instant) {
        nap_until(&self.sh, deadline);
    }
}
