//! Which path is which endpoint.

/// A WebSocket endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/echo`: every message back to its sender.
    Echo,
    /// `/ws`: JSON channels, chat and the event-stream registration protocol.
    Ws,
    /// `/chat`: plain-text chat for `websocat` and friends.
    Chat,
    /// `/kline`: the old K-line service's plain-text commands.
    Kline,
}

/// What a request path leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    WebSocket(Endpoint),
    /// Plain HTTP liveness probe.
    Health,
    /// Plain HTTP readiness probe.
    Ready,
    /// Prometheus metrics.
    Metrics,
    /// The web page at `/`.
    Page,
    NotFound,
}

pub fn resolve(path: &str) -> Target {
    match path {
        "/echo" => Target::WebSocket(Endpoint::Echo),
        "/ws" => Target::WebSocket(Endpoint::Ws),
        "/chat" => Target::WebSocket(Endpoint::Chat),
        "/kline" => Target::WebSocket(Endpoint::Kline),
        "/" | "/index.html" => Target::Page,
        "/healthz" => Target::Health,
        "/readyz" => Target::Ready,
        "/metrics" => Target::Metrics,
        _ => Target::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_paths() {
        assert_eq!(resolve("/echo"), Target::WebSocket(Endpoint::Echo));
        assert_eq!(resolve("/healthz"), Target::Health);
        assert_eq!(resolve("/ws"), Target::WebSocket(Endpoint::Ws));
        assert_eq!(resolve("/chat"), Target::WebSocket(Endpoint::Chat));
        assert_eq!(resolve("/echo/"), Target::NotFound);
        assert_eq!(resolve("/nope"), Target::NotFound);
    }
}
