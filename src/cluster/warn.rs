//! [`RateLimited`]: a warning that repeats (malformed bus entries, refused
//! publishes) is logged at most once per interval with a count of the
//! ones suppressed, so a bad producer cannot flood the log.

use std::fmt;
use std::time::{Duration, Instant};

/// Repeated warnings (malformed entries, rejected publishes) are logged at
/// most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Logs a repeated warning at most once per [`WARN_INTERVAL`].
pub(super) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(super) fn new() -> RateLimited {
        RateLimited {
            last: None,
            suppressed: 0,
        }
    }

    pub(super) fn warn(&mut self, msg: fmt::Arguments<'_>) {
        if self.last.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!("{msg} ({} similar warnings suppressed)", self.suppressed);
        } else {
            log::warn!("{msg}");
        }
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_interval_are_counted_not_logged() {
        let mut w = RateLimited::new();
        w.warn(format_args!("first"));
        let logged_at = w.last.expect("the first one is logged");
        assert_eq!(w.suppressed, 0);
        w.warn(format_args!("second"));
        w.warn(format_args!("third"));
        assert_eq!((w.last, w.suppressed), (Some(logged_at), 2));
        // Once the interval has passed the next one is logged (with the
        // count) and the count starts over.
        w.last = Some(Instant::now() - WARN_INTERVAL);
        w.warn(format_args!("fourth"));
        assert_eq!(w.suppressed, 0);
        assert!(w.last.unwrap() > logged_at);
    }
}
