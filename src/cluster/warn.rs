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
