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

/// How an endpoint takes the messages its clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    /// Each whole message goes to the app.
    App,
    /// Every message goes straight back to its sender, handled by the
    /// server without the app: a single-frame binary message too large for
    /// one read of the read buffer (`--read-buffer-size`) is streamed back
    /// as it arrives (the same frame on the wire, nothing buffered but what
    /// the socket does not take at once; in fragments when compressed),
    /// and a message received whole goes back in its own buffer, uncopied.
    /// Text is always whole: it must be valid UTF-8 before any is echoed.
    Reflect,
}

impl Endpoint {
    pub fn intake(self) -> Intake {
        match self {
            Endpoint::Echo => Intake::Reflect,
            Endpoint::Ws | Endpoint::Chat | Endpoint::Kline => Intake::App,
        }
    }
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
