//! Clock, latency histogram, and CPU / memory readings of this process and
//! of the server (from /proc).

use std::time::Instant;

/// Nanoseconds since the run began, as a plain integer (cheap to store).
#[derive(Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock { base: Instant::now() }
    }

    #[inline]
    pub fn ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUB;

/// Log-linear histogram of nanosecond values: exact below 128 ns, then
/// 64 buckets per power of two (under 1.6 % error). Fixed size: recording
/// never allocates.
#[derive(Clone)]
pub struct Hist {
    counts: Box<[u64; BUCKETS]>,
    pub n: u64,
}

impl Default for Hist {
    fn default() -> Self {
        Hist { counts: Box::new([0; BUCKETS]), n: 0 }
    }
}

#[inline]
fn index(v: u64) -> usize {
    if v < (2 * SUB) as u64 {
        v as usize
    } else {
        let msb = 63 - v.leading_zeros();
        let e = msb - SUB_BITS;
        e as usize * SUB + (v >> e) as usize
    }
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    if i < 2 * SUB {
        i as u64
    } else {
        let e = (i / SUB - 1) as u32;
        let m = (i % SUB + SUB) as u64;
        (m << e) + (1u64 << e) / 2
    }
}

impl Hist {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.counts[index(ns)] += 1;
        self.n += 1;
    }

    pub fn clear(&mut self) {
        self.counts.fill(0);
        self.n = 0;
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.n += other.n;
    }

    /// The value at quantile `q` (0..=1), in ns; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let target = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return value(i);
            }
        }
        value(BUCKETS - 1)
    }
}

/// CPU time (user + system) of this whole process, in ns.
pub fn self_cpu_ns() -> u64 {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time (utime + stime from /proc/PID/stat) of process `pid`, in ns.
/// Its resolution is one clock tick (10 ms at the usual 100 Hz).
pub fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some((utime + stime) * 1_000_000_000 / tick)
}

/// Resident set size of `pid` (VmRSS), in KiB.
pub fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Time the main thread of `pid` (or "self") spent runnable but waiting
/// for a CPU (second field of /proc/PID/schedstat), in ns: how much other
/// processes took from it.
pub fn runq_wait_ns(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// CPU readings at one instant.
#[derive(Clone, Copy, Default)]
pub struct CpuSnap {
    pub client_ns: u64,
    pub server_ns: Option<u64>,
    pub client_wait_ns: Option<u64>,
    pub server_wait_ns: Option<u64>,
}

impl CpuSnap {
    pub fn take(pid: Option<u32>) -> Self {
        CpuSnap {
            client_ns: self_cpu_ns(),
            server_ns: pid.and_then(proc_cpu_ns),
            client_wait_ns: runq_wait_ns("thread-self"),
            server_wait_ns: pid.and_then(|p| runq_wait_ns(&p.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_close() {
        let mut last = 0;
        for v in 0..1_000_000u64 {
            let i = index(v);
            assert!(i == last || i == last + 1, "v={v}");
            last = i;
        }
        for v in [1u64, 127, 128, 1000, 123_456, 9_999_999_999] {
            let m = value(index(v));
            assert!((m as f64 - v as f64).abs() <= v as f64 * 0.016 + 1.0, "{v} -> {m}");
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles() {
        let mut h = Hist::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() < 500_000.0 * 0.02, "{p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() < 990_000.0 * 0.02, "{p99}");
    }
}
