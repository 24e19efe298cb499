//! Close codes and close-frame payloads (RFC 6455 §5.5.1, §7.4).

use super::utf8::Utf8Validator;

/// A close status code as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL_ERROR: Self = Self(1002);
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    pub const INVALID_PAYLOAD: Self = Self(1007);
    pub const POLICY_VIOLATION: Self = Self(1008);
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    pub const INTERNAL_ERROR: Self = Self(1011);

    /// Whether a peer may send this code in a close frame. 1005 and 1006
    /// are reserved for local use only (§7.4.1), 1004 and 1012-2999 are
    /// unassigned or reserved for future protocol use, 3000-4999 belong to
    /// libraries and applications.
    pub fn is_allowed_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1011 | 3000..=4999)
    }
}

/// The longest close reason that fits a control frame after the 2-byte code.
pub const MAX_REASON_LEN: usize = 123;

/// Why a close frame received from the peer was not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadClose {
    /// A one-byte payload cannot hold a status code.
    Truncated,
    /// A code that must not appear on the wire.
    Code(u16),
    /// "the remainder of the Close frame [...] MUST be valid UTF-8" is not.
    ReasonNotUtf8,
}

/// A received close frame: `None` when the peer sent no status code.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(CloseCode, &str)>, BadClose> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(BadClose::Truncated),
        _ => {
            let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
            if !code.is_allowed_on_wire() {
                return Err(BadClose::Code(code.0));
            }
            let mut validator = Utf8Validator::new();
            validator
                .feed(&payload[2..])
                .and_then(|_| validator.finish())
                .map_err(|_| BadClose::ReasonNotUtf8)?;
            // Validated just above; from_utf8 cannot fail here.
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| BadClose::ReasonNotUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Builds a close payload, truncating the reason at a character boundary so
/// the frame stays within the 125-byte control limit.
pub fn close_payload(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.0.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_code_table_matches_section_7_4() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(ok).is_allowed_on_wire(), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(bad).is_allowed_on_wire(), "{bad}");
        }
    }

    #[test]
    fn parses_payloads() {
        assert_eq!(parse_close_payload(b""), Ok(None));
        assert_eq!(parse_close_payload(b"\x03"), Err(BadClose::Truncated));
        assert_eq!(
            parse_close_payload(b"\x03\xe8"),
            Ok(Some((CloseCode::NORMAL, "")))
        );
        assert_eq!(
            parse_close_payload(b"\x03\xe8bye"),
            Ok(Some((CloseCode::NORMAL, "bye")))
        );
        assert_eq!(parse_close_payload(b"\x03\xed"), Err(BadClose::Code(1005)));
        assert_eq!(
            parse_close_payload(b"\x03\xe8\xff"),
            Err(BadClose::ReasonNotUtf8)
        );
    }

    #[test]
    fn close_payload_truncates_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let payload = close_payload(CloseCode::POLICY_VIOLATION, &reason);
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
        assert_eq!(
            parse_close_payload(&payload).unwrap().unwrap().0,
            CloseCode::POLICY_VIOLATION
        );
    }
}
