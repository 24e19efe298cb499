//! `cluster::RedisLink` against a real `redis-server` on loopback: each
//! test starts its own server on a free port (installed with apt by
//! `tests/redis/start-redis.sh` when missing) and kills it at the end.
//! Every wait is bounded. `FANOUT_SKIP_REDIS=1` skips the tests that need
//! redis-server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout::cluster::{Inbound, LinkConfig, LinkState, LostKind, RedisLink};
use mio::{Events, Poll, Token, Waker};

const WAKE: Token = Token(1);
const WAIT: Duration = Duration::from_secs(15);

use crate::support::redis_server;

use redis_server::*;

/// A link with its own mio poll, collecting everything it hands over.
struct Node {
    poll: Poll,
    events: Events,
    link: RedisLink,
    seen: Vec<Inbound>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    channel: String,
    offset: u64,
    origin: String,
    origin_seq: u64,
    payload: String,
}

impl Node {
    fn start(config: LinkConfig) -> Node {
        let _ = env_logger::builder().is_test(true).try_init();
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
        let link = RedisLink::start(config, waker).expect("start link");
        Node {
            poll,
            events: Events::with_capacity(8),
            link,
            seen: Vec::new(),
        }
    }

    fn with(url: &str, node: &str) -> Node {
        Node::start(fast(LinkConfig::new(url, node)))
    }

    /// Polls the waker and drains until `done(seen)` holds or `limit`
    /// passes; answers whether it holds.
    fn wait_until(&mut self, limit: Duration, done: impl Fn(&[Inbound]) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.seen.extend(self.link.drain());
            if done(&self.seen) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = self.poll.poll(
                &mut self.events,
                Some((deadline - now).min(Duration::from_millis(200))),
            );
        }
    }

    fn expect(&mut self, what: &str, done: impl Fn(&[Inbound]) -> bool) {
        if !self.wait_until(WAIT, done) {
            let messages = self.messages();
            let others: Vec<&Inbound> = self
                .seen
                .iter()
                .filter(|i| !matches!(i, Inbound::Message { .. }))
                .collect();
            panic!(
                "node {}: {what} not seen within {WAIT:?}; stats {:?}; {} messages (first {:?}, last {:?}); other items {:?}",
                self.link.node_id(),
                self.link.stats(),
                messages.len(),
                messages.first(),
                messages.last(),
                others
            );
        }
    }

    fn settle(&mut self, d: Duration) {
        self.wait_until(d, |_| false);
    }

    fn messages(&self) -> Vec<Msg> {
        self.seen
            .iter()
            .filter_map(|i| match i {
                Inbound::Message {
                    channel,
                    offset,
                    origin,
                    origin_seq,
                    payload,
                } => Some(Msg {
                    channel: channel.clone(),
                    offset: *offset,
                    origin: origin.clone(),
                    origin_seq: *origin_seq,
                    payload: payload.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    fn channel(&self, channel: &str) -> Vec<Msg> {
        self.messages()
            .into_iter()
            .filter(|m| m.channel == channel)
            .collect()
    }

    fn count(&self, pred: impl Fn(&Inbound) -> bool) -> usize {
        self.seen.iter().filter(|i| pred(i)).count()
    }
}

fn fast(mut c: LinkConfig) -> LinkConfig {
    c.reconnect_min = Duration::from_millis(50);
    c.reconnect_max = Duration::from_millis(400);
    c.read_block = Duration::from_millis(200);
    c.io_timeout = Duration::from_secs(2);
    c
}

fn n_messages(n: usize) -> impl Fn(&[Inbound]) -> bool {
    move |seen| {
        seen.iter()
            .filter(|i| matches!(i, Inbound::Message { .. }))
            .count()
            >= n
    }
}

fn is_up(i: &Inbound) -> bool {
    matches!(i, Inbound::Up)
}

fn is_down(i: &Inbound) -> bool {
    matches!(i, Inbound::Down { .. })
}

fn has_up(seen: &[Inbound]) -> bool {
    seen.iter().any(is_up)
}

fn lost(seen: &[Inbound], which: fn(&LostKind) -> bool) -> u64 {
    seen.iter()
        .map(|i| match i {
            Inbound::Lost { count, kind } if which(kind) => *count,
            _ => 0,
        })
        .sum()
}

fn both_up(a: &mut Node, b: &mut Node) {
    a.expect("Up", has_up);
    b.expect("Up", has_up);
    assert_eq!(a.link.state(), LinkState::Up);
    assert_eq!(b.link.state(), LinkState::Up);
}

#[test]
fn a_message_from_one_node_reaches_both_once_in_order_with_the_same_offsets() {
    if redis_server::skipped() {
        return;
    }
    let t0 = Instant::now();
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);

    for p in ["m1", "m2", "m3"] {
        assert!(a.link.publish("news", p.to_string()).is_ok());
    }
    for p in ["x1", "x2"] {
        assert!(b.link.publish("sport", p.to_string()).is_ok());
    }
    a.expect("5 messages", n_messages(5));
    b.expect("5 messages", n_messages(5));
    // Nothing more arrives (no duplicates).
    a.settle(Duration::from_millis(400));
    b.settle(Duration::from_millis(400));

    let news = |origin_node: &Node| origin_node.channel("news");
    let expect_news: Vec<Msg> = (1..=3)
        .map(|i| Msg {
            channel: "news".into(),
            offset: i,
            origin: "a".into(),
            origin_seq: i,
            payload: format!("m{i}"),
        })
        .collect();
    assert_eq!(news(&a), expect_news);
    assert_eq!(news(&b), expect_news);
    let sport: Vec<(u64, String, String)> = b
        .channel("sport")
        .into_iter()
        .map(|m| (m.offset, m.origin, m.payload))
        .collect();
    assert_eq!(
        sport,
        vec![(1, "b".into(), "x1".into()), (2, "b".into(), "x2".into())]
    );
    // One bus, one order: both nodes saw the same sequence.
    assert_eq!(a.messages(), b.messages());
    assert_eq!(a.messages().len(), 5);

    let (sa, sb) = (a.link.stats(), b.link.stats());
    assert_eq!((sa.published, sa.received), (3, 5));
    assert_eq!((sb.published, sb.received), (2, 5));
    assert_eq!(sa.lost_queue_full + sa.lost_rejected + sa.lost_bus_gap, 0);
    assert_eq!(sa.outages, 0);

    let t = Instant::now();
    let final_a = a.link.shutdown();
    b.link.shutdown();
    assert_eq!(final_a.state, LinkState::Stopped);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "shutdown took {:?}",
        t.elapsed()
    );
    eprintln!("two-node delivery: {:?}", t0.elapsed());
}

#[test]
fn concurrent_publishers_get_distinct_increasing_offsets_and_one_order() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);

    const EACH: u64 = 2000;
    let t = Instant::now();
    std::thread::scope(|s| {
        for link in [&a.link, &b.link] {
            s.spawn(move || {
                for i in 1..=EACH {
                    let mut backoff = Duration::from_micros(50);
                    // The queue is large; a Full here would be a test bug.
                    while link
                        .publish("c", format!("{}-{i}", link.node_id()))
                        .is_err()
                    {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(10));
                    }
                }
            });
        }
    });
    a.expect("all messages", n_messages(2 * EACH as usize));
    b.expect("all messages", n_messages(2 * EACH as usize));
    eprintln!(
        "{} publishes from two nodes, seen by both, in {:?}",
        2 * EACH,
        t.elapsed()
    );
    a.settle(Duration::from_millis(300));
    b.settle(Duration::from_millis(300));

    let ma = a.messages();
    assert_eq!(ma, b.messages(), "both readers see the same order");
    let offsets: Vec<u64> = ma.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (1..=2 * EACH).collect::<Vec<_>>());
    for origin in ["a", "b"] {
        let seqs: Vec<u64> = ma
            .iter()
            .filter(|m| m.origin == origin)
            .map(|m| m.origin_seq)
            .collect();
        assert_eq!(seqs, (1..=EACH).collect::<Vec<_>>(), "origin {origin}");
        assert!(ma
            .iter()
            .filter(|m| m.origin == origin)
            .all(|m| m.payload == format!("{origin}-{}", m.origin_seq)));
    }
    // They really were concurrent: the origins interleave.
    let switches = ma.windows(2).filter(|w| w[0].origin != w[1].origin).count();
    eprintln!("origin switches in the merged order: {switches}");
    assert!(switches >= 1);
}

#[test]
fn history_after_an_offset_returns_exactly_the_later_messages() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut cfg = fast(LinkConfig::new(redis.url(), "a"));
    cfg.stream_maxlen = 10;
    let mut a = Node::start(cfg);
    a.expect("Up", has_up);
    for i in 1..=10 {
        a.link.publish("h", format!("p{i}")).unwrap();
    }
    a.expect("10 messages", n_messages(10));

    let ask = |a: &mut Node, channel: &str, after: u64, limit: usize| {
        let req = a.link.history(channel, after, limit).unwrap();
        a.expect("history answer", move |seen| {
            seen.iter()
                .any(|i| matches!(i, Inbound::History { request, .. } if *request == req))
        });
        let pos = a
            .seen
            .iter()
            .position(|i| matches!(i, Inbound::History { request, .. } if *request == req))
            .unwrap();
        match a.seen.remove(pos) {
            Inbound::History {
                channel: c, result, ..
            } => {
                assert_eq!(c, channel);
                result.expect("history ok")
            }
            _ => unreachable!(),
        }
    };

    let h = ask(&mut a, "h", 4, 100);
    let offsets: Vec<u64> = h.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, (5..=10).collect::<Vec<_>>());
    assert!(h
        .entries
        .iter()
        .all(|e| e.payload == format!("p{}", e.offset)
            && e.origin == "a"
            && e.origin_seq == e.offset));
    assert_eq!((h.last_offset, h.missed, h.more), (10, 0, false));

    let h = ask(&mut a, "h", 4, 3);
    assert_eq!(
        h.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![5, 6, 7]
    );
    assert!(h.more);

    let h = ask(&mut a, "h", 10, 100);
    assert!(h.entries.is_empty());
    assert_eq!((h.last_offset, h.missed, h.more), (10, 0, false));

    let h = ask(&mut a, "nothing-here", 0, 10);
    assert!(h.entries.is_empty());
    assert_eq!(h.last_offset, 0);

    // MAXLEN ~ 10 trims whole stream nodes (100 entries by default): after
    // 350 messages the oldest are gone and reported as missed.
    for i in 11..=350 {
        a.link.publish("h", format!("p{i}")).unwrap();
    }
    a.expect("350 messages", n_messages(350));
    let h = ask(&mut a, "h", 0, 10_000);
    let first = h.entries.first().map(|e| e.offset).unwrap();
    assert!(h.missed > 0, "nothing trimmed: {} entries", h.entries.len());
    assert_eq!(first, h.missed + 1);
    assert_eq!(
        h.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (first..=350).collect::<Vec<_>>()
    );
    assert_eq!(h.last_offset, 350);
    eprintln!(
        "stream kept {} of 350 entries with MAXLEN ~ 10",
        h.entries.len()
    );
    assert_eq!(a.link.stats().history_answered, 5);
}

/// Kill Redis, publish into the outage, restart it with its data.
#[test]
fn redis_killed_and_restarted_with_its_data() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let mut cfg_a = fast(LinkConfig::new(redis.url(), "a"));
    cfg_a.outbound_queue = 5;
    let mut a = Node::start(cfg_a);
    // B reconnects slowly, so A's queued publishes reach the bus before B's
    // reader is back: B sees them only by resuming after its last ID.
    let mut cfg_b = fast(LinkConfig::new(redis.url(), "b"));
    cfg_b.reconnect_min = Duration::from_millis(1500);
    cfg_b.reconnect_max = Duration::from_millis(2000);
    let mut b = Node::start(cfg_b);
    both_up(&mut a, &mut b);

    for i in 1..=3 {
        a.link.publish("o", format!("before-{i}")).unwrap();
    }
    a.expect("3 messages", n_messages(3));
    b.expect("3 messages", n_messages(3));
    let _: String = redis::cmd("SAVE").query(&mut redis.admin()).unwrap();

    let t = Instant::now();
    redis.kill();
    a.expect("Down", |s| s.iter().any(is_down));
    b.expect("Down", |s| s.iter().any(is_down));
    eprintln!("outage noticed by both nodes in {:?}", t.elapsed());
    assert_eq!(a.link.state(), LinkState::Down);

    // Publishes during the outage: 5 queue, 3 overflow.
    let results: Vec<bool> = (1..=8)
        .map(|i| a.link.publish("o", format!("during-{i}")).is_ok())
        .collect();
    assert_eq!(results, [true, true, true, true, true, false, false, false]);
    a.expect("Lost 3 (queue full)", |s| {
        lost(s, |k| *k == LostKind::QueueFull) == 3
    });
    let hreq = a.link.history("o", 0, 10);
    assert!(hreq.is_err(), "the outbox is full: history is refused too");
    a.settle(Duration::from_millis(600));
    let s = a.link.stats();
    assert_eq!(s.state, LinkState::Down);
    assert_eq!((s.outages, s.lost_queue_full, s.outbound_queued), (1, 3, 5));
    assert!(s.down_ms >= 500, "{s:?}");

    let t = Instant::now();
    redis.restart();
    a.expect("Up again", |s| {
        s.iter().skip_while(|i| !is_down(i)).any(is_up)
    });
    b.expect("Up again", |s| {
        s.iter().skip_while(|i| !is_down(i)).any(is_up)
    });
    eprintln!("both links up {:?} after the restart", t.elapsed());
    a.expect("8 messages", n_messages(8));
    b.expect("8 messages", n_messages(8));
    a.settle(Duration::from_millis(400));
    b.settle(Duration::from_millis(400));

    for n in [&a, &b] {
        assert_eq!(n.count(is_down), 1, "{}: one Down", n.link.node_id());
        assert_eq!(
            n.count(is_up),
            2,
            "{}: first Up and one more",
            n.link.node_id()
        );
        assert_eq!(n.count(|i| matches!(i, Inbound::Reset)), 0);
        let got: Vec<(u64, String)> = n
            .channel("o")
            .into_iter()
            .map(|m| (m.offset, m.payload))
            .collect();
        let mut want: Vec<(u64, String)> = (1..=3).map(|i| (i, format!("before-{i}"))).collect();
        want.extend((1..=5).map(|i| (3 + i, format!("during-{i}"))));
        assert_eq!(got, want, "node {}", n.link.node_id());
    }
    let (sa, sb) = (a.link.stats(), b.link.stats());
    assert_eq!(sa.state, LinkState::Up);
    assert_eq!(
        (sa.published, sa.lost_queue_full, sa.outbound_queued),
        (8, 3, 0)
    );
    assert!(sa.reconnects >= 2 && sb.reconnects >= 2, "{sa:?} {sb:?}");
    assert!(sa.down_total_ms > 0 && sa.down_ms == 0);
    assert_eq!(sb.lost_bus_gap, 0);

    // Reading goes on after the outage.
    b.link.publish("o", "after".into()).unwrap();
    a.expect("9 messages", n_messages(9));
    assert_eq!(a.channel("o").last().unwrap().offset, 9);
    let h = {
        let req = a.link.history("o", 7, 10).unwrap();
        a.expect("history", move |s| {
            s.iter()
                .any(|i| matches!(i, Inbound::History { request, .. } if *request == req))
        });
        a.seen
            .iter()
            .find_map(|i| match i {
                Inbound::History { result, .. } => Some(result.clone().unwrap()),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        h.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![8, 9]
    );
}

/// Kill Redis and start it empty: the nodes see a reset and go on.
#[test]
fn redis_restarted_without_its_data_is_a_reset() {
    if redis_server::skipped() {
        return;
    }
    let mut redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);
    for i in 1..=2 {
        a.link.publish("w", format!("old-{i}")).unwrap();
    }
    a.expect("2 messages", n_messages(2));
    b.expect("2 messages", n_messages(2));

    redis.kill();
    a.expect("Down", |s| s.iter().any(is_down));
    b.expect("Down", |s| s.iter().any(is_down));
    for i in 1..=3 {
        b.link.publish("w", format!("new-{i}")).unwrap();
    }
    // A history request while down is answered at once, with an error.
    let req = a.link.history("w", 0, 10).unwrap();
    a.expect("history error", move |s| {
        s.iter().any(
            |i| matches!(i, Inbound::History { request, result: Err(_), .. } if *request == req),
        )
    });

    redis.restart();
    for n in [&mut a, &mut b] {
        n.expect("Reset then Up", |s| {
            let after_down: Vec<&Inbound> = s.iter().skip_while(|i| !is_down(i)).collect();
            after_down.iter().any(|i| matches!(i, Inbound::Reset))
                && after_down.iter().any(|i| is_up(i))
        });
        n.expect("5 messages", n_messages(5));
    }
    a.settle(Duration::from_millis(400));
    b.settle(Duration::from_millis(400));
    for n in [&a, &b] {
        // A publish whose reply died with Redis is sent again after the
        // reconnection, and an empty Redis has no record of it any more:
        // it comes back once under its first (origin, origin_seq), which
        // is what the app drops such repeats by.
        let mut first_seen = std::collections::HashSet::new();
        let got: Vec<(u64, String)> = n
            .channel("w")
            .into_iter()
            .filter(|m| {
                let first = first_seen.insert((m.origin.clone(), m.origin_seq));
                assert!(
                    first || m.payload.starts_with("old-"),
                    "node {}: only a publish from before the reset can repeat: {m:?}",
                    n.link.node_id()
                );
                first
            })
            .map(|m| (m.offset, m.payload))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, "old-1".into()),
                (2, "old-2".into()),
                (1, "new-1".into()),
                (2, "new-2".into()),
                (3, "new-3".into())
            ],
            "node {}: offsets start again after a reset",
            n.link.node_id()
        );
        assert_eq!(n.count(|i| matches!(i, Inbound::Reset)), 1);
        assert_eq!(n.count(is_down), 1);
        assert_eq!(n.link.stats().resets, 1);
    }
}

/// Connections killed again and again under load: no loss, no duplicate.
#[test]
fn connections_killed_under_load_lose_and_duplicate_nothing() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);

    const N: u64 = 5000;
    let t = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kills = std::thread::scope(|s| {
        let killer = s.spawn(|| {
            // Every 20 ms, every fanout connection: writers and readers of
            // both nodes, often in the middle of a pipeline.
            let mut admin = redis.admin();
            let (mut rounds, mut killed) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
                let n: i64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query(&mut admin)
                    .unwrap();
                rounds += 1;
                killed += n;
            }
            (rounds, killed)
        });
        for i in 1..=N {
            while a.link.publish("k", format!("{i}")).is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if i % 5 == 0 {
                std::thread::sleep(Duration::from_millis(1));
                b.seen.extend(b.link.drain());
            }
        }
        a.expect("all messages", n_messages(N as usize));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        killer.join().unwrap()
    });
    b.expect("all messages", n_messages(N as usize));
    a.settle(Duration::from_millis(400));
    b.settle(Duration::from_millis(400));
    eprintln!(
        "{N} publishes, {} connections killed in {} rounds, in {:?}; stats a {:?}",
        kills.1,
        kills.0,
        t.elapsed(),
        a.link.stats()
    );
    assert!(kills.1 > 0);
    for n in [&a, &b] {
        let m = n.channel("k");
        assert_eq!(
            m.iter().map(|m| m.offset).collect::<Vec<_>>(),
            (1..=N).collect::<Vec<_>>(),
            "node {}",
            n.link.node_id()
        );
        assert!(m.iter().all(|m| m.payload == m.origin_seq.to_string()));
        assert_eq!(
            m.iter().map(|m| m.origin_seq).collect::<Vec<_>>(),
            (1..=N).collect::<Vec<_>>()
        );
        let s = n.link.stats();
        assert_eq!(s.lost_queue_full + s.lost_rejected + s.lost_bus_gap, 0);
    }
    // Applied exactly once each, however many resends.
    assert_eq!(a.link.stats().published, N);
}

/// A reader that falls behind past the bus bound reports the exact gap.
#[test]
fn a_reader_behind_the_trimmed_bus_counts_what_it_missed() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut cfg = fast(LinkConfig::new(redis.url(), "a"));
    cfg.bus_maxlen = 10;
    let mut a = Node::start(cfg);
    let mut cfg = fast(LinkConfig::new(redis.url(), "b"));
    cfg.inbound_queue = 5;
    cfg.batch = 5;
    let mut b = Node::start(cfg);
    both_up(&mut a, &mut b);

    // B does not drain while A publishes 1000: its reader stops at a full
    // inbox, and the bus (MAXLEN ~ 10) is trimmed past it.
    const N: u64 = 1000;
    for i in 1..=N {
        a.link.publish("g", format!("{i}")).unwrap();
    }
    let all_counted = |s: &[Inbound]| {
        let got = s
            .iter()
            .filter(|i| matches!(i, Inbound::Message { .. }))
            .count() as u64;
        got + lost(s, |k| *k == LostKind::BusGap) == N
    };
    // Even A's own reader may fall behind a bus that short.
    a.expect("all delivered or counted", all_counted);
    b.expect("all delivered or counted", all_counted);
    for n in [&a, &b] {
        let m = n.channel("g");
        let gap = lost(&n.seen, |k| *k == LostKind::BusGap);
        eprintln!(
            "node {}: {} delivered, {gap} lost to trimming",
            n.link.node_id(),
            m.len()
        );
        assert!(m.windows(2).all(|w| w[0].offset < w[1].offset));
        assert_eq!(m.last().map(|m| m.offset), Some(N));
        assert_eq!(n.link.stats().lost_bus_gap, gap);
        assert_eq!(n.link.stats().received, m.len() as u64);
    }
    assert!(lost(&b.seen, |k| *k == LostKind::BusGap) > 0);
}

#[test]
fn a_link_started_before_redis_reports_down_then_up() {
    if redis_server::skipped() {
        return;
    }
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut a = Node::with(&url, "a");
    a.expect("Down", |s| s.iter().any(is_down));
    assert_eq!(a.link.state(), LinkState::Down);
    let seq = a.link.publish("early", "queued".into()).unwrap();

    ensure_installed();
    let mut redis = RedisServer {
        port,
        dir: tempfile::tempdir().unwrap(),
        child: None,
    };
    redis.spawn();
    a.expect("Up", has_up);
    a.expect("the queued message", n_messages(1));
    let m = &a.messages()[0];
    assert_eq!(
        (m.offset, m.origin_seq, m.payload.as_str()),
        (1, seq, "queued")
    );
    assert_eq!(a.count(is_down), 1, "one Down however many retries");
    assert!(a.link.stats().connect_failures >= 2);
}

#[test]
fn bad_configs_are_refused() {
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), WAKE).unwrap());
    for (url, node) in [
        ("redis://127.0.0.1:1/", ""),
        ("redis://127.0.0.1:1/", "a b"),
        ("redis://127.0.0.1:1/", "a:b"),
        ("http://127.0.0.1:1/", "a"),
        ("not a url", "a"),
        ("rediss://127.0.0.1:1/", "a"),
    ] {
        let err = RedisLink::start(LinkConfig::new(url, node), waker.clone()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{url} {node}");
    }
    let mut cfg = LinkConfig::new("redis://127.0.0.1:1/", "a");
    cfg.outbound_queue = 0;
    assert!(RedisLink::start(cfg, waker.clone()).is_err());
    let mut cfg = LinkConfig::new("redis://127.0.0.1:1/", "a");
    cfg.reconnect_max = Duration::MAX;
    assert!(RedisLink::start(cfg, waker).is_err());
}

/// Redis refusing a publish, foreign bus entries, a lost offset counter:
/// reported, skipped, repaired; nothing else stops.
#[test]
fn refusals_and_foreign_entries_are_counted_and_the_rest_goes_on() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);
    let mut admin = redis.admin();

    // A key of the wrong type where a channel stream belongs.
    let _: () = redis::cmd("SET")
        .arg("fanout:ch:bad")
        .arg("x")
        .query(&mut admin)
        .unwrap();
    a.link.publish("ok", "1".into()).unwrap();
    let refused = a.link.publish("bad", "never".into()).unwrap();
    // Something that is not a fanout message on the bus.
    let _: String = redis::cmd("XADD")
        .arg("fanout:bus")
        .arg("*")
        .arg("hello")
        .arg("world")
        .query(&mut admin)
        .unwrap();
    a.link.publish("ok", "2".into()).unwrap();
    a.expect("refusal", move |s| {
        s.iter().any(|i| {
            *i == Inbound::Lost {
                count: 1,
                kind: LostKind::Rejected {
                    origin_seq: refused,
                },
            }
        })
    });
    for n in [&mut a, &mut b] {
        n.expect("2 messages", n_messages(2));
        n.settle(Duration::from_millis(300));
        let got: Vec<(u64, String)> = n
            .messages()
            .into_iter()
            .map(|m| (m.offset, m.payload))
            .collect();
        assert_eq!(got, vec![(1, "1".into()), (2, "2".into())]);
        let s = n.link.stats();
        assert_eq!((s.malformed, s.lost_bus_gap), (1, 0), "{s:?}");
    }
    assert_eq!(a.link.stats().lost_rejected, 1);

    // The offset counter vanishes (eviction, a stray DEL): the next publish
    // continues after the stream's last ID instead of failing.
    let _: i64 = redis::cmd("DEL")
        .arg("fanout:offset:ok")
        .query(&mut admin)
        .unwrap();
    a.link.publish("ok", "3".into()).unwrap();
    b.expect("3 messages", n_messages(3));
    assert_eq!(b.channel("ok").last().map(|m| m.offset), Some(3));
}

/// The `Inbound::Definition`s a node saw: (channel, definition, created,
/// origin, origin_seq).
fn definitions(node: &Node) -> Vec<(String, String, bool, String, u64)> {
    node.seen
        .iter()
        .filter_map(|i| match i {
            Inbound::Definition {
                channel,
                definition,
                created,
                origin,
                origin_seq,
            } => Some((
                channel.clone(),
                definition.clone(),
                *created,
                origin.clone(),
                *origin_seq,
            )),
            _ => None,
        })
        .collect()
}

fn n_definitions(n: usize) -> impl Fn(&[Inbound]) -> bool {
    move |seen| {
        seen.iter()
            .filter(|i| matches!(i, Inbound::Definition { .. }))
            .count()
            >= n
    }
}

/// The snapshots (`Inbound::Definitions`) a node saw, sorted.
fn snapshots(node: &Node) -> Vec<Vec<(String, String)>> {
    node.seen
        .iter()
        .filter_map(|i| match i {
            Inbound::Definitions { definitions } => {
                let mut d = definitions.clone();
                d.sort();
                Some(d)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_definition_of_a_channel_wins_on_every_node_and_later_links_load_it() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    let mut b = Node::with(&redis.url(), "b");
    both_up(&mut a, &mut b);
    // An empty Redis: each link loaded an empty set before its Up.
    assert_eq!(snapshots(&a), vec![vec![]]);
    let up_at = a.seen.iter().position(is_up).unwrap();
    let snapshot_at = a
        .seen
        .iter()
        .position(|i| matches!(i, Inbound::Definitions { .. }))
        .unwrap();
    assert!(snapshot_at < up_at, "{:?}", a.seen);

    // Both define `news` at once; in between A publishes: one sequence.
    let seq_a = a.link.define("news", "first-a".into()).unwrap();
    let published = a.link.publish("news", "m".into()).unwrap();
    let seq_b = b.link.define("news", "first-b".into()).unwrap();
    let other = b.link.define("sport", "s".into()).unwrap();
    assert_eq!((seq_a, published), (1, 2));
    assert_eq!((seq_b, other), (1, 2));
    a.expect("3 definitions", n_definitions(3));
    b.expect("3 definitions", n_definitions(3));
    a.expect("the message", n_messages(1));
    a.settle(Duration::from_millis(300));
    b.settle(Duration::from_millis(300));
    let seen_a = definitions(&a);
    assert_eq!(seen_a, definitions(&b), "one bus, one order");
    assert_eq!(seen_a.len(), 3, "{seen_a:?}");
    let news: Vec<_> = seen_a.iter().filter(|d| d.0 == "news").collect();
    let winner = &news[0].1;
    assert!(winner == "first-a" || winner == "first-b", "{news:?}");
    // Every announcement of `news` carries the winner; only the winner's
    // own announcement says created.
    for d in &news {
        assert_eq!(&d.1, winner, "{news:?}");
        assert_eq!(d.2, d.1 == format!("first-{}", d.3), "{news:?}");
    }
    assert_eq!(news.iter().filter(|d| d.2).count(), 1, "{news:?}");
    assert!(seen_a.contains(&("sport".into(), "s".into(), true, "b".into(), 2)));

    // Defining again changes nothing: created false, the winner again.
    let again = a.link.define("news", "later".into()).unwrap();
    a.expect("4 definitions", n_definitions(4));
    assert_eq!(
        definitions(&a)[3],
        ("news".into(), winner.clone(), false, "a".into(), again)
    );
    // (The writer counts after its reply, which may come after the reader
    // handed the announcement over.)
    let deadline = Instant::now() + WAIT;
    while a.link.stats().defined < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(a.link.stats().defined, 2);

    // A link started later loads them all before its Up.
    let mut c = Node::with(&redis.url(), "c");
    c.expect("Up", has_up);
    assert_eq!(
        snapshots(&c),
        vec![vec![
            ("news".into(), winner.clone()),
            ("sport".into(), "s".into())
        ]]
    );
    assert!(definitions(&c).is_empty());

    // A reconnect loads them again (Redis restarted with its data).
    let mut con = redis.admin();
    let _: () = redis::cmd("SAVE").query(&mut con).unwrap();
    drop(con);
    let mut redis = redis;
    redis.kill();
    c.expect("Down", |seen| seen.iter().any(is_down));
    redis.restart();
    c.expect("Up again", |seen| {
        seen.iter().filter(|i| is_up(i)).count() == 2
    });
    assert_eq!(snapshots(&c).len(), 2);
    assert_eq!(snapshots(&c)[0], snapshots(&c)[1]);
}

#[test]
fn a_redis_out_of_memory_refuses_writes_but_the_link_stays_up() {
    if redis_server::skipped() {
        return;
    }
    let redis = RedisServer::start();
    let mut a = Node::with(&redis.url(), "a");
    a.expect("Up", has_up);
    let mut admin = redis.admin();
    let set = |con: &mut redis::Connection, name: &str, value: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(con)
            .unwrap();
    };
    set(&mut admin, "maxmemory-policy", "noeviction");
    set(&mut admin, "maxmemory", "1");
    let refused = a.link.publish("c", "never".into()).unwrap();
    a.expect("refusal", move |s| {
        s.iter().any(|i| {
            matches!(i, Inbound::Lost { kind: LostKind::Rejected { origin_seq }, .. } if *origin_seq == refused)
        })
    });
    // Heartbeats are refused too meanwhile: that is not an outage.
    a.settle(Duration::from_millis(2500));
    assert!(!a.seen.iter().any(is_down), "{:?}", a.seen);
    assert_eq!(a.link.state(), LinkState::Up);
    set(&mut admin, "maxmemory", "0");
    a.link.publish("c", "fine".into()).unwrap();
    a.expect("the message", n_messages(1));
    assert_eq!(a.channel("c")[0].payload, "fine");
}
