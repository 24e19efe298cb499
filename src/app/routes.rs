//! Which path is which endpoint. Application routes (`/ws`, `/chat`, the
//! web page at `/`) are added here as the app grows.

/// A WebSocket endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Echo,
}

/// What a request path leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    WebSocket(Endpoint),
    /// Plain HTTP liveness probe.
    Health,
    NotFound,
}

pub fn resolve(path: &str) -> Target {
    match path {
        "/echo" => Target::WebSocket(Endpoint::Echo),
        "/healthz" => Target::Health,
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
        assert_eq!(resolve("/echo/"), Target::NotFound);
        assert_eq!(resolve("/nope"), Target::NotFound);
    }
}
