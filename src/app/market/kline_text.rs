//! The plain-text commands of the K-line service fanout replaces: clients
//! send `sub-1s`, `sub-1m`, `sub-5m`, `sub-1h` or `unsub` and receive the
//! default symbol's candles as
//! `{"open":…,"high":…,"low":…,"close":…,"unix_timestamp":…,"time_window_seconds":…}`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextCommand<'a> {
    /// `sub-<interval>`: the interval text after the dash.
    Subscribe(&'a str),
    Unsubscribe,
}

/// Recognises a `/kline` text command; surrounding whitespace (a trailing newline
/// from `websocat`) is ignored.
pub fn parse(text: &str) -> Option<TextCommand<'_>> {
    let text = text.trim();
    if text == "unsub" {
        return Some(TextCommand::Unsubscribe);
    }
    text.strip_prefix("sub-")
        .filter(|i| !i.is_empty())
        .map(TextCommand::Subscribe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(parse("sub-1m"), Some(TextCommand::Subscribe("1m")));
        assert_eq!(parse("sub-5m\n"), Some(TextCommand::Subscribe("5m")));
        assert_eq!(parse("unsub"), Some(TextCommand::Unsubscribe));
        assert_eq!(parse("sub-"), None);
        assert_eq!(parse("{\"type\":\"list\"}"), None);
    }
}
