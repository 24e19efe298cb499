//! `broadcast`: one publisher, N subscribers of one channel. The publisher
//! keeps K messages in flight (published, not yet received by every live
//! subscriber); each carries its sequence number and send time in `data`,
//! so every delivery gives an end-to-end latency.
//!
//! `data` is a JSON string of exactly `--size` characters:
//! `S<seq, 10 digits>T<send time in ns, 16 digits>xxxx…`.
//! - fanout (`--peer-protocol fanout`): the publisher, on the internal
//!   listener, sends `create` then `{"type":"publish","channel":"bench","data":"S…"}`
//!   (acks are read and counted); subscribers skip `welcome`, send
//!   `subscribe` and wait for its ack.
//! - raw (`--peer-protocol raw`, the tokio peer): any connection to `/sub`
//!   is a subscriber; the publisher sends the bare JSON string `"S…"` as a
//!   text message to `/pub`, which the peer wraps in fanout's envelope.
//! - relay (`--peer-protocol relay`, the uWebSockets peer `uws-broadcast`):
//!   every connection is subscribed on open, and each message is relayed
//!   unchanged to all of them, the sender's own included; so the publisher
//!   sends the very message subscribers are to get,
//!   `{"type":"message","channel":"bench","data":"S…"}` (masked), and the
//!   copies it gets back are counted (`own_copies=`), not checked.
//!
//! - the floor (`tcp://` URLs, against `loadgen tcp-fanout-server`): no
//!   upgrade and no subscribe; the publisher sends, unmasked, the very frame
//!   subscribers are to get, `{"type":"message","channel":"bench","data":"S…"}`,
//!   and the server copies its bytes to every subscriber.
//!
//! Subscribers get `{"type":"message",…,"data":"S…"}` from every server.

use std::time::{Duration, Instant};

use crate::net::{Net, Setup, State};
use crate::stats::{Clock, CpuSnap, Hist};
use crate::ws::{self, Event, MASK};
use crate::{Args, Notes, PeerProtocol};

const CHANNEL: &str = "bench";
const SEQ_DIGITS: usize = 10;
const TS_DIGITS: usize = 16;
/// `S` + seq + `T` + ts.
pub const MIN_SIZE: usize = 2 + SEQ_DIGITS + TS_DIGITS;

fn parse_digits(d: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for &b in d {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    Some(v)
}

/// Finds `"data":"S` in a captured message prefix and reads (seq, ts).
#[inline]
fn parse_stamp(cap: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = br#""data":"S"#;
    let at = cap.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let seq = parse_digits(cap.get(at..at + SEQ_DIGITS)?)?;
    if *cap.get(at + SEQ_DIGITS)? != b'T' {
        return None;
    }
    let ts = parse_digits(cap.get(at + SEQ_DIGITS + 1..at + SEQ_DIGITS + 1 + TS_DIGITS)?)?;
    Some((seq, ts))
}

/// Writes `v` as `digits.len()` decimal digits, masked with `mask` for
/// payload offset `at`.
#[inline]
fn put_digits(digits: &mut [u8], mut v: u64, at: usize, mask: [u8; 4]) {
    for i in (0..digits.len()).rev() {
        digits[i] = (b'0' + (v % 10) as u8) ^ mask[(at + i) & 3];
        v /= 10;
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Warm,
    Measure,
    Drain,
}

pub fn run(args: &Args) -> Result<String, String> {
    let url = args.url()?;
    let pub_url = args.publish_url()?;
    // The floor has no WebSocket server: raw setup, unmasked frames.
    let floor = url.raw_tcp;
    let protocol = args.peer_protocol;
    // No subscribe and no create: the server needs no request but the upgrade.
    let raw = floor || protocol != PeerProtocol::Fanout;
    // The publisher sends the message subscribers are to get.
    let verbatim = floor || protocol == PeerProtocol::Relay;
    if args.size < MIN_SIZE {
        return Err(format!("--size must be at least {MIN_SIZE} for broadcast (seq and timestamp)"));
    }
    if args.subs == 0 || args.inflight == 0 {
        return Err("--subs and --inflight must be at least 1".into());
    }
    if args.deflate == Some(crate::deflate::Offer::Takeover) {
        return Err("broadcast reads each message's stamp from its first bytes: use --deflate fresh".into());
    }
    let clock = Clock::new();
    let mut net = Net::new(clock, 256 * 1024).map_err(|e| format!("poll: {e}"))?;
    let deadline = Instant::now() + args.connect_timeout;

    let mut create = Vec::new();
    ws::push_frame(
        &mut create,
        ws::OP_TEXT,
        format!(r#"{{"type":"create","channel":"{CHANNEL}"}}"#).as_bytes(),
    );
    let opened = net.open(&pub_url, 1, 1, deadline, || {
        if raw {
            Setup::Ready
        } else {
            Setup::AfterWelcome(create.clone())
        }
    });
    if opened.failed > 0 {
        return Err(format!("publisher: {}", opened.first_error.unwrap_or_default()));
    }
    let mut subscribe = Vec::new();
    ws::push_frame(
        &mut subscribe,
        ws::OP_TEXT,
        format!(r#"{{"type":"subscribe","channel":"{CHANNEL}"}}"#).as_bytes(),
    );
    // Subscribers only: publishes stay plain so each can carry its stamp.
    net.deflate = args.deflate;
    let opened = net.open(&url, args.subs, args.concurrency, deadline, || {
        if raw {
            Setup::Ready
        } else {
            Setup::AfterWelcome(subscribe.clone())
        }
    });
    if opened.failed > 0 {
        for c in &mut net.conns {
            c.reset();
        }
        return Err(format!(
            "{} of {} subscriber(s) failed to open: {}",
            opened.failed,
            args.subs,
            opened.first_error.unwrap_or_default()
        ));
    }

    // The publish frame, masked once; per message only the digits change.
    let content: String = {
        let mut s = format!("S{}T{}", "0".repeat(SEQ_DIGITS), "0".repeat(TS_DIGITS));
        while s.len() < args.size {
            s.push('x');
        }
        s
    };
    let payload = if verbatim {
        format!(r#"{{"type":"message","channel":"{CHANNEL}","data":"{content}"}}"#)
    } else if raw {
        format!("\"{content}\"")
    } else {
        format!(r#"{{"type":"publish","channel":"{CHANNEL}","data":"{content}"}}"#)
    };
    let seq_at = payload.find('S').expect("stamp") + 1;
    let ts_at = seq_at + SEQ_DIGITS + 1;
    let mut frame = Vec::new();
    let mask = if floor {
        ws::push_unmasked_frame(&mut frame, ws::OP_TEXT, payload.as_bytes());
        [0; 4]
    } else {
        ws::push_frame(&mut frame, ws::OP_TEXT, payload.as_bytes());
        MASK
    };
    // The payload's offset in the frame: unmasked frames have no key.
    let hl = frame.len() - payload.len();
    let k = args.inflight;
    net.conns[0].out.reserve(frame.len() * k + 256);
    for c in &mut net.conns[1..] {
        c.next_seq = 1;
        c.out.reserve(256);
    }

    // Deliveries per sequence number, for the oldest K.
    let ring = (2 * k).next_power_of_two();
    let ring_mask = ring as u64 - 1;
    let mut counts = vec![0u32; ring];
    let mut oldest = 1u64; // first not yet received by every live subscriber
    let mut next_pub = 1u64;
    let subs = args.subs as u32;
    // Dead subscribers count as having received everything published later.
    let mut dead = 0u32;

    let t0 = Instant::now();
    let warm_end = t0 + args.warmup;
    let end = warm_end + args.duration;
    let drain_end = end + args.drain;
    let mut phase = Phase::Warm;
    let mut sending = true;
    let mut notes = Notes::default();
    let mut hist = Hist::default();
    let (mut msgs, mut bytes, mut published, mut acks) = (0u64, 0u64, 0u64, 0u64);
    let mut compressed_msgs = 0u64;
    let mut measure_start = 0u64;
    let mut measured_ns = 0u64;
    let mut last_msg = 0u64;
    let mut max_gap = 0u64;
    let mut cpu0 = CpuSnap::default();
    let mut cpu = None;
    let mut result: Option<(u64, u64, u64, Hist)> = None;
    let mut publisher_lost = false;
    let mut own_copies = 0u64;

    loop {
        let now = Instant::now();
        if phase == Phase::Warm && now >= warm_end {
            phase = Phase::Measure;
            hist.clear();
            msgs = 0;
            bytes = 0;
            published = 0;
            cpu0 = CpuSnap::take(args.pid);
            measure_start = clock.ns();
            last_msg = measure_start;
        }
        if phase == Phase::Measure && now >= end {
            phase = Phase::Drain;
            sending = false;
            cpu = Some((cpu0, CpuSnap::take(args.pid)));
            let t = clock.ns();
            measured_ns = t - measure_start;
            max_gap = max_gap.max(t - last_msg);
            result = Some((msgs, bytes, published, hist.clone()));
        }
        if phase == Phase::Drain && (oldest == next_pub || now >= drain_end) {
            break;
        }
        if dead == subs || publisher_lost {
            notes.error("no subscriber or no publisher left".into());
            break;
        }

        // Publish while the window allows.
        if sending && next_pub - oldest < k as u64 {
            let p = &mut net.conns[0];
            let ts = clock.ns();
            while next_pub - oldest < k as u64 {
                let at = p.out.len();
                p.out.extend_from_slice(&frame);
                let body = at + hl;
                counts[(next_pub & ring_mask) as usize] = dead;
                put_digits(&mut p.out[body + seq_at..body + seq_at + SEQ_DIGITS], next_pub, seq_at, mask);
                put_digits(&mut p.out[body + ts_at..body + ts_at + TS_DIGITS], ts, ts_at, mask);
                next_pub += 1;
                if phase == Phase::Measure {
                    published += 1;
                }
            }
            if p.writable {
                if let Err(e) = p.flush_out() {
                    notes.error(format!("publisher write: {e}"));
                    publisher_lost = true;
                    continue;
                }
            }
        }

        let next = match phase {
            Phase::Warm => warm_end,
            Phase::Measure => end,
            Phase::Drain => drain_end,
        };
        let timeout = next.saturating_duration_since(now).min(Duration::from_millis(100));
        if let Err(e) = net.poll.poll(&mut net.events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        let measuring = phase == Phase::Measure;
        for event in net.events.iter() {
            let idx = event.token().0;
            let c = &mut net.conns[idx];
            if c.state == State::Closed {
                continue;
            }
            if event.is_writable() {
                c.writable = true;
            }
            let mut failure = None;
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                let now_ns = clock.ns();
                let outcome = if idx == 0 {
                    // The publisher: acks (fanout), nothing (raw), its own
                    // messages back (relay).
                    c.read_events(&mut net.buf, |c, ev| match ev {
                        Event::Message { .. } => {
                            let text = c.rx.captured();
                            if text.starts_with(br#"{"type":"ack""#) {
                                acks += 1;
                            } else if protocol == PeerProtocol::Relay && parse_stamp(text).is_some() {
                                own_copies += 1;
                            } else {
                                notes.other(text);
                            }
                        }
                        Event::Ping => c.queue_pong(),
                        Event::Pong => {}
                        Event::Close { code } => failure = Some(format!("server sent close {code} to the publisher")),
                        Event::Error(e) => failure = Some(format!("protocol error: {e}")),
                    })
                } else {
                    c.read_events(&mut net.buf, |c, ev| match ev {
                        Event::Message { len, compressed, .. } => {
                            if measuring && compressed {
                                compressed_msgs += 1;
                            }
                            let Some((seq, ts)) = parse_stamp(c.rx.captured()) else {
                                notes.other(c.rx.captured());
                                return;
                            };
                            if measuring {
                                hist.record(now_ns.saturating_sub(ts));
                                msgs += 1;
                                bytes += len;
                                max_gap = max_gap.max(now_ns.saturating_sub(last_msg));
                                last_msg = now_ns;
                            }
                            if seq < c.next_seq || seq >= next_pub {
                                notes.unexpected += 1;
                                return;
                            }
                            // Missed messages count as received for the window.
                            notes.lost += seq - c.next_seq;
                            for q in c.next_seq.max(oldest)..=seq {
                                counts[(q & ring_mask) as usize] += 1;
                            }
                            c.next_seq = seq + 1;
                        }
                        Event::Ping => c.queue_pong(),
                        Event::Pong => {}
                        Event::Close { code } => failure = Some(format!("server sent close {code}")),
                        Event::Error(e) => failure = Some(format!("protocol error: {e}")),
                    })
                };
                match outcome {
                    Ok(true) => {}
                    Ok(false) => failure = failure.or(Some("server closed the connection".into())),
                    Err(e) => failure = failure.or(Some(format!("read: {e}"))),
                }
            }
            if failure.is_none() && c.writable && c.out_off < c.out.len() {
                if let Err(e) = c.flush_out() {
                    failure = Some(format!("write: {e}"));
                }
            }
            if let Some(why) = failure {
                notes.closed += 1;
                notes.error(why);
                c.reset();
                let _ = net.poll.registry().deregister(&mut c.stream);
                if idx == 0 {
                    publisher_lost = true;
                } else {
                    dead += 1;
                    // Its share of the window will never come.
                    for q in c.next_seq.max(oldest)..next_pub {
                        counts[(q & ring_mask) as usize] += 1;
                    }
                    c.next_seq = next_pub;
                }
            }
        }
        // Retire every message all live subscribers have.
        while oldest < next_pub && counts[(oldest & ring_mask) as usize] >= subs {
            counts[(oldest & ring_mask) as usize] = 0;
            oldest += 1;
        }
    }
    let (msgs, bytes, published, hist) = match result {
        Some(r) => r,
        None => {
            cpu = Some((cpu0, CpuSnap::take(args.pid)));
            measured_ns = clock.ns().saturating_sub(measure_start);
            (msgs, bytes, published, hist)
        }
    };
    let undrained = next_pub - oldest;
    for c in &mut net.conns {
        c.reset();
    }
    let (c0, c1) = cpu.unwrap_or_default();
    let secs = measured_ns as f64 / 1e9;
    Ok(crate::summary(
        &format!(
            "mode=broadcast proto={} subs={} size={} inflight={}",
            match (floor, protocol) {
                (true, _) => "raw",
                (false, PeerProtocol::Fanout) => "fanout",
                (false, PeerProtocol::Raw) => "raw",
                (false, PeerProtocol::Relay) => "relay",
            },
            args.subs,
            args.size,
            args.inflight
        ),
        msgs,
        bytes,
        measured_ns,
        &hist,
        c0,
        c1,
        &format!(
            "publishes_per_s={:.0} acks={acks} own_copies={own_copies} max_gap_ms={:.1} undrained={undrained}{}",
            published as f64 / secs.max(1e-9),
            max_gap as f64 / 1e6,
            crate::echo::deflate_summary(args, msgs, bytes, compressed_msgs, None, net.agreed.as_deref())
        ),
        &notes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip() {
        let mut d = *b"S0000000000T0000000000000000xx";
        put_digits(&mut d[1..11], 42, 0, MASK);
        put_digits(&mut d[12..28], 1_234_567, 0, MASK);
        // Unmask as the server would (offset 0 relative to `at` above).
        for (i, b) in d[1..11].iter_mut().enumerate() {
            *b ^= MASK[i & 3];
        }
        for (i, b) in d[12..28].iter_mut().enumerate() {
            *b ^= MASK[i & 3];
        }
        let msg = [br#"{"type":"message","channel":"bench","offset":7,"ts":1,"data":""#.as_slice(), &d[..]].concat();
        assert_eq!(parse_stamp(&msg), Some((42, 1_234_567)));
        assert_eq!(parse_stamp(b"{\"type\":\"dropped\"}"), None);
    }
}
