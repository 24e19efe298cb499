//! `connections`: N upgraded connections that send nothing, held open for
//! `--hold` seconds; the server's VmRSS is read before the first connect
//! and at the end of the hold. Pings are answered.

use std::time::{Duration, Instant};

use crate::net::{Net, Setup, State};
use crate::stats::{proc_rss_kib, Clock, CpuSnap};
use crate::ws::{self, Event};
use crate::{Args, Notes};

pub fn run(args: &Args) -> Result<String, String> {
    let url = args.url()?;
    let clock = Clock::new();
    let mut net = Net::new(clock, 64 * 1024).map_err(|e| format!("poll: {e}"))?;
    let rss_before = args.pid.and_then(proc_rss_kib);
    let cpu0 = CpuSnap::take(args.pid);
    let t0 = clock.ns();
    let deadline = Instant::now() + args.connect_timeout;
    // With --deflate each connection first echoes one compressed message,
    // so whatever zlib state the server keeps per connection exists.
    net.deflate = args.deflate;
    let mut first = Vec::new();
    if args.deflate.is_some() {
        let text = crate::net::text_payload(args.size);
        ws::push_deflated_frame(&mut first, ws::OP_TEXT, &crate::deflate::compress(&text));
    }
    let opened = net.open(&url, args.conns, args.concurrency, deadline, || {
        if first.is_empty() {
            Setup::Ready
        } else {
            Setup::EchoOnce(first.clone())
        }
    });
    let mut notes = Notes::default();
    if opened.failed > 0 {
        notes.failed = opened.failed as u64;
        notes.error(opened.first_error.clone().unwrap_or_default());
    }
    let hold_end = Instant::now() + args.hold;
    let mut open = opened.ready;
    while open > 0 {
        let now = Instant::now();
        if now >= hold_end {
            break;
        }
        let timeout = hold_end.saturating_duration_since(now).min(Duration::from_millis(200));
        if let Err(e) = net.poll.poll(&mut net.events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        for event in net.events.iter() {
            let c = &mut net.conns[event.token().0];
            if c.state == State::Closed {
                continue;
            }
            if event.is_writable() {
                c.writable = true;
            }
            let mut failure = None;
            let result = c.read_events(&mut net.buf, |c, ev| match ev {
                Event::Ping => c.queue_pong(),
                Event::Message { .. } | Event::Pong => {}
                Event::Close { code } => failure = Some(format!("server sent close {code}")),
                Event::Error(e) => failure = Some(format!("protocol error: {e}")),
            });
            match result {
                Ok(true) => {}
                Ok(false) => failure = failure.or(Some("server closed the connection".into())),
                Err(e) => failure = failure.or(Some(format!("read: {e}"))),
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
                open -= 1;
            }
        }
    }
    let rss_after = args.pid.and_then(proc_rss_kib);
    let cpu1 = CpuSnap::take(args.pid);
    let window_ns = clock.ns() - t0;
    let established = opened.ready;
    let agreed = net.agreed.clone();
    for c in &mut net.conns {
        c.reset();
    }
    drop(net);
    let kib = |v: Option<u64>| v.map_or("n/a".to_string(), |v| v.to_string());
    let per_conn = match (rss_before, rss_after) {
        (Some(a), Some(b)) if established > 0 => format!("{:.3}", (b as f64 - a as f64) / established as f64),
        _ => "n/a".into(),
    };
    let open_ns = opened.last_ready.saturating_sub(opened.first_start).max(1);
    Ok(crate::summary(
        &format!("mode=connections conns={} established={established}", args.conns),
        established as u64,
        0,
        open_ns,
        &opened.handshake,
        cpu0,
        cpu1,
        &format!(
            "hold_s={:.1} window_s={:.2} rss_before_kib={} rss_after_kib={} kib_per_conn={per_conn}{}",
            args.hold.as_secs_f64(),
            window_ns as f64 / 1e9,
            kib(rss_before),
            kib(rss_after),
            match &agreed {
                Some(a) => format!(" deflate={} first_message_bytes={}", a.replace(' ', ""), args.size),
                None if args.deflate.is_some() => " deflate=none".into(),
                None => String::new(),
            }
        ),
        &notes,
    ))
}
