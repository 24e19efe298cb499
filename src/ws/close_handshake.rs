//! The closing handshake (RFC 6455 §5.5.1, §7) as an explicit state enum.
//!
//! A server closes the TCP connection itself once both close frames have
//! crossed (§7.1.1: "the server [...] SHOULD close the underlying TCP
//! connection first"), so every path here ends in `Acknowledged`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CloseState {
    #[default]
    Open,
    /// We sent a close frame and wait for the peer's. Data that still
    /// arrives is read and discarded (§5.5.1: after sending Close we MUST
    /// NOT send data; the peer may still be sending).
    ClosedByUs,
    /// Both close frames are sent or received: flush, then close TCP.
    Acknowledged,
}

impl CloseState {
    /// We decided to close. Returns whether a close frame must be sent: a
    /// close frame already sent is never replaced by another.
    pub fn close_locally(&mut self) -> bool {
        let send = *self == Self::Open;
        if send {
            *self = Self::ClosedByUs;
        }
        send
    }

    /// The peer's close frame arrived. Returns whether we must answer it
    /// with our own (we have not sent one yet).
    pub fn peer_closed(&mut self) -> bool {
        let reply = *self == Self::Open;
        *self = Self::Acknowledged;
        reply
    }

    /// Whether data messages from the peer should still be delivered.
    pub fn is_open(self) -> bool {
        self == Self::Open
    }

    /// Whether the TCP connection should go once its output is flushed.
    pub fn is_finished(self) -> bool {
        self == Self::Acknowledged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_initiated_close_is_answered_once() {
        let mut state = CloseState::default();
        assert!(state.is_open());
        assert!(state.peer_closed());
        assert!(state.is_finished());
        assert!(
            !state.close_locally(),
            "no second close frame after replying"
        );
        assert!(state.is_finished());
    }

    #[test]
    fn server_initiated_close_waits_for_the_reply() {
        let mut state = CloseState::default();
        assert!(state.close_locally());
        assert!(!state.is_open() && !state.is_finished());
        assert!(!state.close_locally(), "a pending close is never replaced");
        assert!(!state.peer_closed(), "the peer's reply needs no answer");
        assert!(state.is_finished());
    }
}
