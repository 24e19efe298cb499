//! `echo`: N connections, each keeping K identical pre-masked messages in
//! flight; every echo received sends the next. Latency is send to echo.

use std::io::{self, ErrorKind};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use crate::net::{binary_payload, send, text_payload, Conn, Net, Setup, State, Url};
use crate::stats::{Clock, CpuSnap, Hist};
use crate::ws::{self, Event};
use crate::{Args, Notes};

#[derive(Default)]
struct WorkerOut {
    msgs: u64,
    bytes: u64,
    hist: Hist,
    notes: Notes,
    undrained: u64,
    max_gap_ns: u64,
    measured_ns: u64,
    cpu: Option<(CpuSnap, CpuSnap)>,
    /// Echoes that came compressed (measured time), the size of each frame
    /// sent, and the extension the server agreed to.
    compressed: u64,
    sent_frame_len: usize,
    agreed: Option<String>,
}

/// Writes `c.out` (pongs) at frame boundaries, then the frames owed from
/// `block` (K copies of the frame), until done or `WouldBlock`.
#[inline]
fn echo_write(c: &mut Conn, block: &[u8], framelen: usize) -> io::Result<()> {
    c.push_records()?;
    while c.writable {
        if c.tx_off == 0 && c.out_off < c.out.len() && !c.flush_out()? {
            return Ok(());
        }
        if c.tx_pending == 0 {
            return Ok(());
        }
        let end = c.tx_pending as usize * framelen;
        match send(&mut c.stream, &mut c.tls, &block[c.tx_off..end]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                let t = c.tx_off + n;
                c.tx_pending -= (t / framelen) as u32;
                c.tx_off = t % framelen;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => c.writable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Phase {
    Warm,
    Measure,
    Drain,
}

fn worker(args: &Args, url: &Url, conns: usize, first: bool, barrier: &Barrier, clock: Clock) -> Result<WorkerOut, String> {
    let mut net = match Net::new(clock, 256 * 1024) {
        Ok(net) => net,
        Err(e) => {
            barrier.wait();
            return Err(format!("poll: {e}"));
        }
    };
    net.deflate = args.deflate;
    let deadline = Instant::now() + args.connect_timeout;
    let opened = net.open(url, conns, args.concurrency, deadline, || Setup::Ready);
    if opened.failed > 0 {
        barrier.wait();
        return Err(format!(
            "{} of {conns} connection(s) failed to open: {}",
            opened.failed,
            opened.first_error.unwrap_or_default()
        ));
    }
    let (opcode, payload) = if args.binary {
        (ws::OP_BINARY, binary_payload(args.size))
    } else {
        (ws::OP_TEXT, text_payload(args.size))
    };
    let mut frame = Vec::new();
    if url.raw_tcp {
        ws::push_unmasked_frame(&mut frame, opcode, &payload);
    } else if args.deflate.is_some() {
        // Compressed once, like the payload: every copy stands alone.
        ws::push_deflated_frame(&mut frame, opcode, &crate::deflate::compress(&payload));
    } else {
        ws::push_frame(&mut frame, opcode, &payload);
    }
    let framelen = frame.len();
    let k = args.inflight;
    let block = frame.repeat(k);
    drop(frame);
    for c in &mut net.conns {
        c.ring = vec![0; k];
        c.rx.capture_limit = 0;
        c.out.reserve(256);
    }
    let size = args.size as u64;
    // A server that compresses each echo afresh sends the same bytes every
    // time: the first compressed echo's length is checked against the rest.
    let fresh = net.agreed.as_deref().is_some_and(|a| a.contains("server_no_context_takeover"));
    let mut compressed_len: Option<u64> = None;
    let mut compressed_echoes = 0u64;

    barrier.wait();
    let t0 = Instant::now();
    let warm_end = t0 + args.warmup;
    let end = warm_end + args.duration;
    let drain_end = end + args.drain;

    let mut out = WorkerOut::default();
    let mut notes = Notes::default();
    let mut hist = Hist::default();
    let (mut msgs, mut bytes) = (0u64, 0u64);
    let mut inflight = 0u64;
    let mut open = net.conns.len();
    let mut phase = Phase::Warm;
    let mut sending = true;
    let mut last_msg = 0u64;
    let mut max_gap = 0u64;
    let mut measure_start = 0u64;
    let mut cpu0 = CpuSnap::default();

    let now_ns = clock.ns();
    for c in &mut net.conns {
        for _ in 0..k {
            c.ring_push(now_ns);
        }
        c.tx_pending = k as u32;
        inflight += k as u64;
        if let Err(e) = echo_write(c, &block, framelen) {
            notes.error(format!("write: {e}"));
        }
    }

    loop {
        let now = Instant::now();
        if phase == Phase::Warm && now >= warm_end {
            phase = Phase::Measure;
            hist.clear();
            msgs = 0;
            bytes = 0;
            if first {
                cpu0 = CpuSnap::take(args.pid);
            }
            measure_start = clock.ns();
            last_msg = measure_start;
        }
        if phase == Phase::Measure && now >= end {
            phase = Phase::Drain;
            sending = false;
            if first {
                out.cpu = Some((cpu0, CpuSnap::take(args.pid)));
            }
            let t = clock.ns();
            out.measured_ns = t - measure_start;
            max_gap = max_gap.max(t - last_msg);
            out.msgs = msgs;
            out.bytes = bytes;
            out.hist = hist.clone();
            out.max_gap_ns = max_gap;
        }
        if phase == Phase::Drain && (inflight == 0 || now >= drain_end) {
            break;
        }
        if open == 0 {
            notes.error("every connection closed".into());
            break;
        }
        let next = match phase {
            Phase::Warm => warm_end,
            Phase::Measure => end,
            Phase::Drain => drain_end,
        };
        let timeout = next.saturating_duration_since(now).min(Duration::from_millis(100));
        if let Err(e) = net.poll.poll(&mut net.events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
        }
        let measuring = phase == Phase::Measure;
        for event in net.events.iter() {
            let c = &mut net.conns[event.token().0];
            if c.state == State::Closed {
                continue;
            }
            if event.is_writable() {
                c.writable = true;
            }
            let mut failure = None;
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                let now_ns = clock.ns();
                let result = c.read_events(&mut net.buf, |c, ev| match ev {
                    Event::Message { opcode: op, len, compressed } => {
                        let len_ok = match (compressed, fresh) {
                            (false, _) => len == size,
                            (true, true) => *compressed_len.get_or_insert(len) == len,
                            (true, false) => true,
                        };
                        if !len_ok || op != opcode {
                            notes.mismatch += 1;
                        }
                        if measuring && compressed {
                            compressed_echoes += 1;
                        }
                        let sent = match c.ring_pop() {
                            Some(t) => t,
                            None => {
                                notes.unexpected += 1;
                                return;
                            }
                        };
                        inflight -= 1;
                        if measuring {
                            hist.record(now_ns.saturating_sub(sent));
                            msgs += 1;
                            bytes += len;
                            max_gap = max_gap.max(now_ns.saturating_sub(last_msg));
                            last_msg = now_ns;
                        }
                        if sending {
                            c.ring_push(now_ns);
                            c.tx_pending += 1;
                            inflight += 1;
                        }
                    }
                    Event::Ping => c.queue_pong(),
                    Event::Pong => {}
                    Event::Close { code } => failure = Some(format!("server sent close {code}")),
                    Event::Error(e) => failure = Some(format!("protocol error: {e}")),
                });
                match result {
                    Ok(true) => {}
                    Ok(false) => failure = failure.or(Some("server closed the connection".into())),
                    Err(e) => failure = failure.or(Some(format!("read: {e}"))),
                }
            }
            if failure.is_none() && c.writable {
                if let Err(e) = echo_write(c, &block, framelen) {
                    failure = Some(format!("write: {e}"));
                }
            }
            if let Some(why) = failure {
                notes.closed += 1;
                notes.error(why);
                inflight -= c.ring_len as u64;
                c.ring_len = 0;
                c.reset();
                let _ = net.poll.registry().deregister(&mut c.stream);
                open -= 1;
            }
        }
    }
    if phase != Phase::Drain {
        // Stopped early: report what was measured so far.
        let t = clock.ns();
        out.measured_ns = t.saturating_sub(measure_start);
        out.msgs = msgs;
        out.bytes = bytes;
        out.hist = hist;
        if first {
            out.cpu = Some((cpu0, CpuSnap::take(args.pid)));
        }
    }
    out.undrained = inflight;
    out.notes = notes;
    out.compressed = compressed_echoes;
    out.sent_frame_len = framelen;
    out.agreed = net.agreed.clone();
    for c in &mut net.conns {
        c.reset();
    }
    Ok(out)
}

pub fn run(args: &Args) -> Result<String, String> {
    if args.inflight == 0 || args.conns == 0 {
        return Err("--conns and --inflight must be at least 1".into());
    }
    let url = args.url()?;
    let url = &url;
    let clock = Clock::new();
    let threads = args.threads.clamp(1, args.conns);
    let barrier = Barrier::new(threads);
    let results: Vec<Result<WorkerOut, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let n = args.conns / threads + usize::from(i < args.conns % threads);
                let barrier = &barrier;
                s.spawn(move || worker(args, url, n, i == 0, barrier, clock))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker panicked")).collect()
    });
    let mut total = WorkerOut::default();
    for r in results {
        let w = r?;
        total.msgs += w.msgs;
        total.bytes += w.bytes;
        total.hist.merge(&w.hist);
        total.notes.merge(w.notes);
        total.undrained += w.undrained;
        total.max_gap_ns = total.max_gap_ns.max(w.max_gap_ns);
        total.measured_ns = total.measured_ns.max(w.measured_ns);
        total.compressed += w.compressed;
        total.sent_frame_len = w.sent_frame_len;
        total.agreed = total.agreed.or(w.agreed);
        if w.cpu.is_some() {
            total.cpu = w.cpu;
        }
    }
    let (c0, c1) = total.cpu.unwrap_or_default();
    Ok(crate::summary(
        &format!(
            "mode=echo conns={} size={} inflight={} {} threads={threads}",
            args.conns,
            args.size,
            args.inflight,
            if args.binary { "binary" } else { "text" }
        ),
        total.msgs,
        total.bytes,
        total.measured_ns,
        &total.hist,
        c0,
        c1,
        &format!(
            "max_gap_ms={:.1} undrained={}{}",
            total.max_gap_ns as f64 / 1e6,
            total.undrained,
            deflate_summary(args, total.msgs, total.bytes, total.compressed, Some(total.sent_frame_len), total.agreed.as_deref())
        ),
        &total.notes,
    ))
}

/// With `--deflate`: what went over the wire per message (frame sent,
/// payload received) and how many echoes came compressed.
pub fn deflate_summary(
    args: &Args,
    msgs: u64,
    wire_bytes: u64,
    compressed: u64,
    sent_frame_len: Option<usize>,
    agreed: Option<&str>,
) -> String {
    if args.deflate.is_none() {
        return String::new();
    }
    let per_msg = if msgs == 0 { 0.0 } else { wire_bytes as f64 / msgs as f64 };
    let sent = sent_frame_len.map(|n| format!(" sent_frame_bytes={n}")).unwrap_or_default();
    // Spaces would split the key=value list.
    let agreed = agreed.unwrap_or("none").replace(' ', "");
    format!(" deflate={agreed}{sent} wire_bytes_per_msg={per_msg:.1} compressed_msgs={compressed}")
}
