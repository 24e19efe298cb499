//! Scale-out over Redis: the link between one fanout node and a shared
//! Redis server, as a self-contained part the event loop can drive without
//! ever blocking on Redis.
//!
//! This page first says what nodes sharing one Redis server show their
//! clients (how to start them is the README's "Running several nodes"), then
//! how the link works. The app's side of the link is `src/app/bus.rs` and
//! `src/app/scale_out.rs`.
//!
//! # What goes through Redis
//!
//! Without `--redis` nothing leaves the process. With it:
//!
//! * **Channel publishes** (the `events` and `alerts` channels included) are
//!   one Lua script call on Redis, which assigns the offset: offsets are the
//!   same on every node and every node delivers every message to its own
//!   subscribers once, in offset order (the shared stream `fanout:bus`, read
//!   by every node). A publisher's ack is sent when its message has come back
//!   from Redis, with that offset.
//! * **`subscribe` with `since`** is served from the node's own backlog when
//!   it reaches back far enough, else from Redis's per-channel stream (10000
//!   messages per channel), so a client that reconnects to another node
//!   resumes from its offset; too far back or ahead of the channel:
//!   `not_recoverable`.
//! * **Registration streams and the market**: events published on any node
//!   reach every node's registered clients, filters and candles; an event
//!   without `ts` is dated by its publish time, the same on every node.
//!   Each node's own feed (the simulator, `--replay`) is published to all.
//! * **Channel settings** made with `create` (`backlog`, `backlog_age`, who
//!   may `publish`) apply on every node, with the creating node's defaults
//!   for what the `create` left out. They are stored in Redis (the hash
//!   `fanout:channels`) and announced on the bus in one script call; the
//!   first `create` of a channel that reaches Redis wins, on every node, also
//!   when two nodes create it at once: the `create` ack reports the settings
//!   in force, with `"created": true` only for the winner (the others get
//!   `"created": false` and the winner's settings). A node starting up or
//!   reconnecting loads every definition before `/readyz` says `200`; a
//!   channel that one node had already made with its defaults (a trusted
//!   publish to a channel nobody created) takes the definition. A channel
//!   never `create`d has each node's defaults (`--channel-backlog`,
//!   `--channel-backlog-age`). A definition a node cannot apply (its
//!   `--max-channels` reached) is logged and counted in
//!   `fanout_redis_definitions_not_applied_total`.
//! * **Chat**: lines of a room travel as the bus channel `#chat/ROOM`, so
//!   users on different nodes talk in one room. A join replays the room's
//!   last `--chat-history` lines from Redis (the channel's stream, so also
//!   lines said before this node started), and the `members` of its ack are
//!   the room's members on every node; the ack waits for both answers, and
//!   lines said meanwhile follow the replay. The stream also holds the join,
//!   leave and nick notices, which are not replayed: a join looks for its
//!   lines among the room's latest 4 × `--chat-history` + 16 entries, so a
//!   room busier with notices than with lines may replay fewer. Join, leave
//!   and nick notices reach the room's members on every node, like lines.
//!   `chat.who` (and `/who` on `/chat`) lists the room's members on every
//!   node: each node keeps its members of each room in Redis
//!   (`fanout:room:ROOM`) under a key that says it is alive, refreshed every
//!   second; a node that stops takes its members with it at once, one that
//!   dies without a word is dropped `--presence-ttl` (15s) after its last
//!   refresh. `chat.rooms` and `/rooms` count the members of every room on
//!   every live node the same way (the room names are kept in the set
//!   `fanout:rooms`).
//! * **Nicks** are unique across nodes (regardless of case): every member's
//!   nick, guest nicks included, is reserved in Redis (`fanout:nick:NICK`)
//!   under its node's alive key, so a node that stops frees its nicks at
//!   once and one that dies frees them `--presence-ttl` after its last
//!   refresh; leaving (disconnecting) or changing nick frees the old one.
//!   `chat.nick` and `/nick` are answered once Redis decided; a nick held on
//!   another node gets the same `conflict` "nick ann is taken" as on one
//!   node. Guest nicks carry a per-node tag (`guest-3f0a-1`).
//!
//! # Several processes on one host
//!
//! A process is one loop on one core. To use more cores, run one process
//! per core with `--reuse-port` and the same listener addresses, all on one
//! Redis: each listener gets SO_REUSEPORT, the kernel spreads new
//! connections over the processes bound to an address, and Redis makes
//! them one service exactly as nodes on separate hosts are (the default
//! `--node-id`, hostname and process id, is already unique). As for any
//! nodes, run the simulator on one process only (`--no-sim` on the others).
//! A request to a shared address reaches one process, picked by the kernel,
//! so `/metrics` and `/readyz` there describe that one: to watch each,
//! give each process an internal listener of its own as well. Every process
//! on an address must ask for `--reuse-port` and run as the same user;
//! otherwise the later one cannot bind and says so.
//!
//! # When Redis is unreachable
//!
//! Every node keeps serving its own clients and logs one warning; `/readyz`
//! answers `503` and `/metrics` shows the outage (`fanout_redis_up 0`,
//! `fanout_redis_outages_total`, `fanout_redis_down_seconds`,
//! `fanout_redis_reconnects_total`, `fanout_redis_lag_seconds`, queue
//! depths). The link reconnects with backoff. Meanwhile:
//!
//! * A publish is delivered at once to the node's own subscribers with
//!   `"offset": null, "local": true` (its ack says the same), and queued for
//!   Redis (up to 10000): after reconnection it reaches the other nodes, and
//!   its own node does not deliver it twice.
//! * A `create` makes the channel on its node at once (`"local": true`) and
//!   is sent to Redis after reconnection; if another node's `create` of the
//!   same channel got there first, that one's settings replace it
//!   (`fanout_redis_local_definitions_overridden_total`). When the queue is
//!   full a `create` is refused (`unavailable`) rather than made on one node
//!   only.
//! * `chat.who` answers with the node's own members and `"local": true`
//!   (`/who` adds "this node only"), and so does a `chat.join` ack, which
//!   then replays the lines this node has seen (`/join` adds "this node
//!   only"), and `chat.rooms` (`/rooms`); presence changes are queued, and
//!   after reconnection each node writes its members again.
//! * A nick change is decided by the node alone, answered with `"local":
//!   true` (`/nick` says "on this node only"), and its reservation is
//!   queued. After reconnection (and after Redis lost its data) every node
//!   reserves all its members' nicks again, and the first reservation of a
//!   nick Redis records wins: a member whose nick a member of another node
//!   holds by then is renamed to a fresh guest nick and told so, with
//!   `{"type":"chat.renamed","nick":"guest-3f0a-7","previous":"ann","message":…}`
//!   (`/chat`: `! nick ann is taken on another node: you are now
//!   guest-3f0a-7`), counted in `fanout_redis_nick_conflicts_total`. So a
//!   nick held in Redis through the outage by a node that stayed connected
//!   keeps it, and of two members who took one nick on two nodes during an
//!   outage the one whose node reaches Redis first keeps it.
//!
//! Messages that cannot go through (the queue overflowed, Redis refused
//! them, or the bus was trimmed before a node read them) are counted in
//! `fanout_redis_lost_total{reason=...}` (presence changes in
//! `fanout_redis_presence_lost_total`) and logged once; never dropped
//! silently. If Redis restarts without its data, offsets start again from
//! 1, the nodes empty their backlogs, and they store their channel
//! definitions and chat members in Redis again (all nodes hold the same
//! definitions, so the same ones win); a publish the link resends because it
//! could not tell whether it was applied is recognised by every node
//! (origin, process run, sequence number) and not delivered twice
//! (`fanout_redis_duplicates_total`).
//!
//! The rest of this page is the link itself.
//!
//! # Threads and hand-over
//!
//! [`RedisLink::start`] spawns two threads, each with its own Redis
//! connection, using the `redis` crate's synchronous API (no async runtime,
//! no hand-written RESP):
//!
//! * the **writer** takes publishes, channel definitions, the app's
//!   writes and script calls, and history reads from a bounded outbox and
//!   runs them in the order they were queued: publishes and definitions
//!   pipelined in batches of up to [`LinkConfig::batch`], writes pipelined
//!   likewise, script calls and reads one at a time; every second it also
//!   refreshes its node run's alive key (which doubles as its health
//!   check);
//! * the **reader** loops on `XREAD COUNT batch BLOCK read_block STREAMS
//!   fanout:bus <last-id>` and forwards every entry.
//!
//! The loop's side is sans-socket: [`RedisLink::publish`],
//! [`RedisLink::define`], [`RedisLink::script`], [`RedisLink::write`],
//! [`RedisLink::history`] and [`RedisLink::recent`] (a channel's latest
//! messages, `XREVRANGE`) only queue (never block; `Full` when the bound
//! is reached), and whatever the threads produce goes into a bounded inbox;
//! the threads wake the loop through a `mio::Waker` (registered by the loop
//! with its own token) when the inbox goes from empty to non-empty, and the
//! loop calls [`RedisLink::drain`] on that token. Both queues are a
//! `Mutex<VecDeque>` plus a `Condvar` rather than `std::sync::mpsc`, for
//! an exact bound that includes the batch in flight, batched hand-over, and
//! answering queued reads at once during an outage.
//!
//! # Data in Redis
//!
//! | key | type | content |
//! |---|---|---|
//! | `fanout:offset:{channel}` | string | the channel's last offset |
//! | `fanout:ch:{channel}` | stream | ID `0-<offset>`, fields `origin`, `seq`, `payload`; `MAXLEN ~ stream_maxlen` |
//! | `fanout:bus` | stream | auto ID; a message: fields `ch`, `off`, `origin`, `seq`, `bseq`, `payload`; a definition announcement: `ch`, `origin`, `seq`, `bseq`, `def`, `created` (`1`/`0`); `MAXLEN ~ bus_maxlen` |
//! | `fanout:bus:seq` | string | the bus's last `bseq` |
//! | `fanout:channels` | hash | field: channel name, value: its definition (the app's encoding of its `create` settings); first one wins (`HSETNX`), never changed |
//! | `fanout:alive:{node}:{instance}` | string | exists while that node run lives: set with `EX alive_ttl` every second, deleted at shutdown |
//! | `fanout:epoch` | string | random, set once (`SET NX`); a change means Redis lost its data |
//! | `fanout:node:{node}:{instance}` | string | a node run's last applied dedup sequence (expires after a day) |
//!
//! The app keeps more under `fanout:` through the generic requests (chat's
//! keys: [`crate::app::chat::redis`]).
//!
//! A publish is ONE script call ([`protocol::PUBLISH_LUA`], sent as
//! `EVALSHA` with the hash of the crate's `Script`; each pipeline starts
//! with `SCRIPT LOAD` so that a restarted Redis's empty script cache cannot
//! fail it): it `INCR`s the channel's offset, `XADD`s the message to the
//! channel stream with ID `0-<offset>`, and `XADD`s it to the bus. Redis
//! runs scripts one at a time, so offsets are 1, 2, 3, ... per channel, the
//! same on every node, and the bus order is the offset order.
//!
//! Every node's reader sees every bus entry exactly once, its own included
//! (the app skips by `origin` what it already delivered locally). On its
//! first connection the reader starts at the bus's current end (only new
//! messages); the writer holds publishes back until then, so a node's own
//! reader sees everything published through its link after `start`.
//! `publish` answers the message's `origin_seq` (1, 2, ... per link), which
//! comes back in the [`Inbound::Message`] with the assigned offset: that is
//! how the app learns the offset of its own publish.
//!
//! # Channel definitions
//!
//! A definition is ONE script call too ([`protocol::DEFINE_LUA`], pipelined
//! with publishes and sharing their `origin_seq` and dedup sequence): it
//! `HSETNX`es the definition into `fanout:channels` and announces the
//! definition now in force (the first one recorded, maybe another node's)
//! on the bus, with `created` telling whether it was this one. Every node
//! gets the announcement as [`Inbound::Definition`] in bus order, so all
//! nodes end with the same definition, and the defining node learns which
//! one won. Each time the reader takes its place on the bus (start,
//! reconnect, after a data reset) it reads the whole hash in the same
//! `MULTI` as its position and hands it over as [`Inbound::Definitions`]
//! before the [`Inbound::Up`]: every definition is in that snapshot or on
//! the bus after it. Applying a definition twice is harmless, so a
//! snapshot newer than the bus entries still to read does no harm.
//!
//! # Generic requests
//!
//! What the app keeps in Redis beside the bus (its key names, scripts and
//! replies are the app's; the link knows nothing of what they mean) goes
//! through two requests:
//!
//! * [`RedisLink::script`] queues a [`ScriptCall`]: a [`LuaScript`] with
//!   its `KEYS` and `ARGV`, run on its own, in order after this link's
//!   earlier commands, as `EVALSHA` (the script is loaded whenever Redis's
//!   cache lacks it, `NOSCRIPT`). Redis's raw reply comes back as
//!   [`Inbound::Script`] under the request id `script` answered. A
//!   [`ScriptMode::Read`] is answered at once with [`RequestError::Down`]
//!   while Redis is unreachable; a [`ScriptMode::Durable`] call (a decision
//!   only Redis can make) waits through the outage and is sent after
//!   reconnection (again, if the connection broke under it: its script
//!   must be idempotent).
//! * [`RedisLink::write`] queues [`WriteCommand`]s (`HSET`, `HDEL`, `EVAL`
//!   ... given as data), pipelined with neighbouring writes in batches of
//!   up to [`LinkConfig::batch`] requests; they are idempotent, so a run
//!   the connection broke under is sent again. Nothing is answered; a
//!   command Redis refuses is counted in [`LinkStats::writes_lost`] and
//!   logged (rate-limited).
//!
//! Both may use this node run's alive key ([`RedisLink::alive_id`]): the
//! writer sets it before anything else on each connection, refreshes it
//! every second with the TTL [`LinkConfig::alive_ttl`] and deletes it at
//! shutdown, so a script can tell the entries of a run that is gone.
//!
//! # Outages
//!
//! When a connection breaks the thread first reconnects once at once (a
//! stale connection is not an outage); if that fails the link reports
//! [`Inbound::Down`] once, logs one warning, and both threads retry with
//! exponential backoff (`reconnect_min`..`reconnect_max`, a little
//! jitter). When both connections are back: [`Inbound::Up`].
//!
//! * Publishes and definitions keep queuing during the outage, up to
//!   `outbound_queue`
//!   (the batch in flight included); beyond it `publish` answers
//!   [`Full`], counts `lost_queue_full`, and the writer reports
//!   [`Inbound::Lost`] `{ kind: QueueFull }` (summed counts) — never
//!   silent. Queued publishes are sent after reconnecting.
//! * A batch whose reply was lost (connection broke mid-pipeline) is resent
//!   with the same dedup sequence numbers; the script skips the ones Redis
//!   already applied, so a resend never duplicates.
//! * The reader resumes after the last bus ID it read, so a reader outage
//!   loses nothing while the bus still holds it; if the bus was trimmed
//!   past it, the `bseq` gap is reported as `Lost { kind: BusGap }` with
//!   the exact count.
//! * If Redis lost its data (restart without persistence), the epoch
//!   changes: [`Inbound::Reset`] (offsets start again from 1; the channel
//!   definitions are gone too, the app offers its own again) and the
//!   reader reads the new bus from its start.
//! * History reads and [`ScriptMode::Read`] script calls are answered with
//!   an error at once while down; writes and durable script calls stay
//!   queued like publishes (beyond the bound they are counted in
//!   `writes_lost`).
//!
//! [`LinkStats`] exposes the outage (state, outages, current and total
//! down time, reconnects), queue depths, reader lag and every loss counter.
//!
//! # Limits
//!
//! A single Redis server, 5.0 or later (tested with Debian's 7.0); not
//! Redis Cluster: the script touches keys of several slots. Payloads are
//! UTF-8 strings. A node id is part of key names and must be unique per
//! running node. Shutdown flushes queued publishes for up to half of
//! `shutdown_timeout` when connected and counts the rest
//! (`lost_at_shutdown`).
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `link.rs` | [`RedisLink`], the loop's non-blocking handle |
//! | `link_config.rs` | [`LinkConfig`], its defaults and checks |
//! | `inbound.rs` | [`Inbound`], what the link hands the loop |
//! | `errors.rs` | [`ReplyError`], [`RequestError`], [`Full`] and the link's private error types |
//! | `requests.rs` | [`LuaScript`], [`ScriptCall`], [`ScriptMode`], [`WriteCommand`]: the generic requests |
//! | `status.rs` | [`LinkState`] and [`LinkStats`], the state from both connections |
//! | `shared.rs` | what the handle and both threads share |
//! | `queues.rs` | the bounded outbox and inbox |
//! | `writer.rs`, `reader.rs` | the two threads |
//! | `reconnect.rs` | backoff, retry and up/down book-keeping, for both threads |
//! | `connection.rs` | opening a connection, epoch check, error classes |
//! | `backoff.rs`, `warn.rs` | reconnect delays; rate-limited warnings |
//! | [`protocol`] | key names, Lua scripts and their replies |
//! | `streams.rs` | stream entries, history and the transactions around them |

mod backoff;
mod connection;
mod errors;
mod inbound;
mod link;
mod link_config;
pub mod protocol;
mod queues;
mod reader;
mod reconnect;
mod requests;
mod shared;
mod status;
mod streams;
mod warn;
mod writer;

pub use errors::{Full, ReplyError, RequestError};
pub use inbound::{Inbound, LostKind};
pub use link::{RedisLink, MAX_HISTORY};
pub use link_config::{LinkConfig, LinkConfigError};
pub use requests::{LuaScript, ScriptCall, ScriptMode, WriteCommand};
pub use status::{LinkState, LinkStats};
pub use streams::{History, HistoryEntry};
