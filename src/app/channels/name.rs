//! Channel names and wildcard subscription patterns.
//!
//! A name is 1-128 characters of `A-Z a-z 0-9 _ - : .`; dots separate
//! segments. In a pattern, a `*` segment matches exactly one segment and a
//! final `>` segment matches one or more (NATS conventions): `trades.*`
//! matches `trades.btc` but not `trades.btc.usd`; `trades.>` matches both.

use crate::app::protocol::{ErrorCode, ProtocolError};

pub const MAX_NAME_LEN: usize = 128;

fn valid_chars(text: &str) -> bool {
    text.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

/// Checks a concrete channel name (what `create` and `publish` take).
pub fn validate_name(field: &str, name: &str) -> Result<(), ProtocolError> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !valid_chars(name)
        || name.split('.').any(str::is_empty)
    {
        return Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!(
                "field `{field}` must be 1-{MAX_NAME_LEN} characters of letters, digits, `_ - :` and non-empty \
                 dot-separated segments"
            ),
        ));
    }
    Ok(())
}

pub fn is_pattern(name: &str) -> bool {
    name.split('.')
        .any(|segment| segment == "*" || segment == ">")
}

/// Checks a subscription target: a name, or a pattern with `*` segments and
/// at most a final `>`.
pub fn validate_pattern(field: &str, pattern: &str) -> Result<(), ProtocolError> {
    let segments: Vec<&str> = pattern.split('.').collect();
    let last = segments.len() - 1;
    let ok = !pattern.is_empty()
        && pattern.len() <= MAX_NAME_LEN
        && segments.iter().enumerate().all(|(i, s)| match *s {
            "*" => true,
            ">" => i == last,
            s => !s.is_empty() && valid_chars(s) && !s.contains(['*', '>']),
        });
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::new(
            ErrorCode::InvalidField,
            format!(
                "field `{field}` must be a channel name or a pattern like `trades.*` or `trades.>`"
            ),
        ))
    }
}

pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let mut names = name.split('.');
    let mut patterns = pattern.split('.').peekable();
    while let Some(p) = patterns.next() {
        if p == ">" && patterns.peek().is_none() {
            return names.next().is_some();
        }
        match names.next() {
            Some(n) if p == "*" || p == n => {}
            _ => return false,
        }
    }
    names.next().is_none()
}

/// Whether every channel `target` (a name or a pattern) matches is also
/// matched by `pattern`: what a token's `channels` and `publish` claims
/// are checked with, so that a claim of `news.*` allows subscribing to
/// `news.sport` and to `news.*`, but not to `news.>`.
pub fn pattern_covers(pattern: &str, target: &str) -> bool {
    let mut targets = target.split('.');
    let mut patterns = pattern.split('.').peekable();
    while let Some(p) = patterns.next() {
        if p == ">" && patterns.peek().is_none() {
            // One or more segments of anything, which is all `>` leaves.
            return targets.next().is_some();
        }
        match targets.next() {
            // A `>` in the target stands for any number of segments,
            // which nothing but a final `>` (above) covers.
            Some(">") | None => return false,
            Some(t) if p == "*" || p == t => {}
            Some(_) => return false,
        }
    }
    targets.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "trades.btc-usd", "user:42.inbox", &"x".repeat(128)] {
            assert!(validate_name("channel", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "sp ace",
            "trades.*",
            "é",
            &"x".repeat(129),
        ] {
            let e = validate_name("channel", bad).unwrap_err();
            assert!(e.message.contains("`channel`"), "{bad}");
        }
    }

    #[test]
    fn patterns() {
        for good in ["a", "trades.*", "*.btc", "trades.>", "*", ">", "a.*.c"] {
            assert!(validate_pattern("channel", good).is_ok(), "{good}");
        }
        for bad in ["", "a.>.b", "tr*des", "a..b", "a.b>"] {
            assert!(validate_pattern("channel", bad).is_err(), "{bad}");
        }
        assert!(is_pattern("trades.*") && is_pattern("x.>") && !is_pattern("trades.btc"));
    }

    #[test]
    fn matching() {
        assert!(pattern_matches("trades.*", "trades.btc"));
        assert!(!pattern_matches("trades.*", "trades.btc.usd"));
        assert!(!pattern_matches("trades.*", "trades"));
        assert!(pattern_matches("trades.>", "trades.btc.usd"));
        assert!(pattern_matches("trades.>", "trades.btc"));
        assert!(!pattern_matches("trades.>", "trades"));
        assert!(pattern_matches("*.btc", "trades.btc"));
        assert!(pattern_matches("exact", "exact"));
        assert!(!pattern_matches("exact", "exactly"));
        assert!(pattern_matches(">", "anything.at.all"));
    }

    #[test]
    fn covering() {
        for (pattern, target) in [
            ("news.*", "news.sport"),
            ("news.*", "news.*"),
            ("news.>", "news.*"),
            ("news.>", "news.a.>"),
            ("news.>", "news.>"),
            (">", "*"),
            ("*.btc", "*.btc"),
            ("exact", "exact"),
        ] {
            assert!(pattern_covers(pattern, target), "{pattern} covers {target}");
        }
        for (pattern, target) in [
            ("news.*", "news.>"),
            ("news.*", "news"),
            ("news.*", "news.a.b"),
            ("news.sport", "news.*"),
            ("news.>", "news"),
            ("news.>", ">"),
            ("*.btc", "*.*"),
            ("exact", "exactly"),
        ] {
            assert!(
                !pattern_covers(pattern, target),
                "{pattern} does not cover {target}"
            );
        }
    }
}
