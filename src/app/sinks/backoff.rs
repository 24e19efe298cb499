//! When a failed delivery is tried again: exponential backoff, `initial`
//! doubling up to `max`, with the server's `Retry-After` taken when it
//! asks for longer (capped at `max` too). No jitter: a sink has one
//! worker, so its retries cannot fall into step with anyone else's.

use std::time::Duration;

/// The delay before retry number `retry` (1 for the first retry).
pub fn retry_delay(initial: Duration, max: Duration, retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    initial.saturating_mul(1u32 << doublings).min(max)
}

/// The delay before a retry, given the server's `Retry-After` in seconds
/// (HTTP-date forms are ignored: the schedule applies).
pub fn delay_for(
    initial: Duration,
    max: Duration,
    retry: u32,
    retry_after: Option<&str>,
) -> Duration {
    let schedule = retry_delay(initial, max, retry);
    let asked = retry_after
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    match asked {
        Some(asked) if asked > schedule => asked.min(max),
        _ => schedule,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_initial_up_to_max() {
        let got: Vec<Duration> = (1..=8)
            .map(|r| retry_delay(500 * MS, 30_000 * MS, r))
            .collect();
        let want: Vec<Duration> = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
            .iter()
            .map(|&ms| ms * MS)
            .collect();
        assert_eq!(got, want);
        // No overflow far out.
        assert_eq!(retry_delay(MS, 10 * MS, u32::MAX), 10 * MS);
    }

    #[test]
    fn retry_after_lengthens_within_max() {
        let (i, m) = (100 * MS, 5_000 * MS);
        assert_eq!(delay_for(i, m, 1, Some("2")), 2_000 * MS);
        assert_eq!(delay_for(i, m, 1, Some("60")), m);
        assert_eq!(delay_for(i, m, 3, Some("0")), 400 * MS);
        assert_eq!(delay_for(i, m, 1, Some("Wed, 21 Oct 2015 07:28:00 GMT")), i);
        assert_eq!(delay_for(i, m, 2, None), 200 * MS);
    }
}
