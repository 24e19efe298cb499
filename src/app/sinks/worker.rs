//! A sink's worker thread: takes items from the sink's bounded queue and
//! POSTs them with a blocking HTTP client (`ureq`), retrying what may
//! succeed later, so that a slow or dead endpoint costs the event loop
//! nothing but a `try_send`.
//!
//! - **Retried**: connection errors, timeouts, 429 and 5xx answers, after
//!   `backoff::delay_for` (the server's `Retry-After` honoured up to the
//!   backoff's maximum), until `max-attempts` attempts were made: then the
//!   item is counted `failed`.
//! - **Not retried**: any other answer outside 2xx (a 4xx says the request
//!   itself is wrong; a 3xx is not followed, since the body would have to
//!   go to an address nobody configured), TLS and URL errors: `failed`.
//! - **Stopping** ([`Stop::begin`]): items queued or being retried get
//!   until the flush deadline; each attempt's timeout is cut to what is
//!   left of it. What is not delivered by then is counted `dropped`
//!   (reason `shutdown`).

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::backoff::delay_for;
use super::counters::Counters;
use super::webhook::{signature, SIGNATURE_HEADER};

/// One item to deliver: the exact body to POST.
#[derive(Debug)]
pub struct Job {
    pub body: String,
}

/// Where a worker POSTs, and how it signs.
pub struct Target {
    pub url: String,
    /// The webhook's HMAC key; `None` for Telegram (its token is in the URL).
    pub secret: Option<Vec<u8>>,
}

/// How a worker retries.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
}

/// The flush deadline, set once when the server stops; sleeping workers
/// are woken to look at it.
#[derive(Debug, Default)]
pub struct Stop {
    deadline: Mutex<Option<Instant>>,
    wake: Condvar,
}

impl Stop {
    pub fn begin(&self, deadline: Instant) {
        *lock(&self.deadline) = Some(deadline);
        self.wake.notify_all();
    }

    fn deadline(&self) -> Option<Instant> {
        *lock(&self.deadline)
    }

    /// Sleeps `delay`, or until the flush deadline if that comes first:
    /// false when the deadline cut the sleep short.
    fn sleep(&self, delay: Duration) -> bool {
        let end = Instant::now() + delay;
        let mut deadline = lock(&self.deadline);
        loop {
            let limit = deadline.map_or(end, |d| d.min(end));
            let now = Instant::now();
            if now >= limit {
                return deadline.is_none_or(|d| d >= end);
            }
            deadline = match self.wake.wait_timeout(deadline, limit - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing holding these locks can panic midway; a poisoned one holds a
    // value as good as any.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What one attempt came to.
enum Attempt {
    Sent,
    /// Worth trying again; the reason, and the server's `Retry-After`.
    Again(String, Option<String>),
    /// Trying again would fail the same way.
    Refused(String),
}

pub struct Worker {
    pub name: String,
    pub target: Target,
    pub policy: Policy,
    pub counters: Arc<Counters>,
    pub stop: Arc<Stop>,
}

impl Worker {
    /// Runs until the queue's sender is gone and the queue is empty.
    pub fn run(self, queue: Receiver<Job>) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .user_agent(concat!("fanout/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        while let Ok(job) = queue.recv() {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            self.deliver(&agent, &job);
        }
    }

    fn deliver(&self, agent: &ureq::Agent, job: &Job) {
        let c = &self.counters;
        for attempt in 1..=self.policy.max_attempts {
            let mut timeout = self.policy.timeout;
            if let Some(deadline) = self.stop.deadline() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    c.dropped_shutdown.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                timeout = timeout.min(left);
            }
            if attempt > 1 {
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            let why = match self.attempt(agent, job, timeout) {
                Attempt::Sent => {
                    c.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::Refused(why) => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "sink `{}`: not delivered, and not retried: {why}",
                        self.name
                    );
                    return;
                }
                Attempt::Again(why, retry_after) => {
                    if attempt == self.policy.max_attempts {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            "sink `{}`: not delivered after {attempt} attempt(s), giving up: {why}",
                            self.name
                        );
                        return;
                    }
                    let p = &self.policy;
                    let delay = delay_for(
                        p.retry_backoff,
                        p.retry_backoff_max,
                        attempt,
                        retry_after.as_deref(),
                    );
                    debug!(
                        "sink `{}`: attempt {attempt} failed ({why}); again in {delay:?}",
                        self.name
                    );
                    delay
                }
            };
            if !self.stop.sleep(why) {
                c.dropped_shutdown.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }

    fn attempt(&self, agent: &ureq::Agent, job: &Job, timeout: Duration) -> Attempt {
        let mut request = agent
            .post(&self.target.url)
            .header("Content-Type", "application/json");
        if let Some(secret) = &self.target.secret {
            request = request.header(SIGNATURE_HEADER, signature(secret, job.body.as_bytes()));
        }
        let result = request
            .config()
            .timeout_global(Some(timeout))
            .build()
            .send(job.body.as_bytes());
        let mut response = match result {
            Ok(response) => response,
            Err(e) => return classify_error(e, timeout),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Read (a bounded amount of) the answer so the connection can be
        // kept for the next item; what it says is not used.
        let _ = response
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_vec();
        match status {
            200..=299 => Attempt::Sent,
            429 | 500..=599 => Attempt::Again(format!("HTTP {status}"), retry_after),
            300..=399 => Attempt::Refused(format!("HTTP {status} (redirects are not followed)")),
            _ => Attempt::Refused(format!("HTTP {status}")),
        }
    }
}

/// ureq's errors, sorted into those worth a retry. The text never holds
/// the URL (a Telegram URL holds the bot token).
fn classify_error(e: ureq::Error, timeout: Duration) -> Attempt {
    match e {
        ureq::Error::Timeout(_) => Attempt::Again(format!("no answer within {timeout:?}"), None),
        ureq::Error::Io(io) => Attempt::Again(format!("connection: {}", io.kind()), None),
        ureq::Error::ConnectionFailed => Attempt::Again("connection failed".into(), None),
        ureq::Error::HostNotFound => Attempt::Again("host not found".into(), None),
        ureq::Error::Protocol(p) => Attempt::Again(format!("bad HTTP answer: {p}"), None),
        ureq::Error::Tls(what) => Attempt::Refused(format!("TLS: {what}")),
        ureq::Error::Rustls(r) => Attempt::Refused(format!("TLS: {r}")),
        ureq::Error::BadUri(_) => Attempt::Refused("the URL is not usable".into()),
        other => Attempt::Refused(format!("request failed: {}", kind_of(&other))),
    }
}

/// A short name for ureq's other errors, without their text (which may
/// quote the request).
fn kind_of(e: &ureq::Error) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_ascii_alphanumeric())
        .next()
        .unwrap_or("unknown")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_cuts_a_sleep_short_and_a_plain_sleep_completes() {
        let stop = Arc::new(Stop::default());
        assert!(stop.sleep(Duration::from_millis(5)));
        let sleeper = {
            let stop = stop.clone();
            std::thread::spawn(move || stop.sleep(Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(20));
        stop.begin(Instant::now());
        assert!(!sleeper.join().unwrap());
        // A sleep that ends before the deadline completes.
        stop.begin(Instant::now() + Duration::from_secs(60));
        assert!(stop.sleep(Duration::from_millis(1)));
    }
}
