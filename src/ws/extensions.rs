//! `Sec-WebSocket-Extensions` negotiation for permessage-deflate (RFC 7692
//! §5, §7.1): read the client's offers, accept the first one this server
//! can honour, and answer with exactly the parameters it agreed to.
//!
//! The server inflates with a 32 KiB window whatever the client uses, so
//! any `client_max_window_bits` is acceptable and never echoed. It
//! compresses with zlib, whose raw deflate cannot use a 256-byte window, so
//! an offer that demands `server_max_window_bits=8` is declined.
//!
//! Offers are read in order; one is declined (and the next tried; with none
//! left the answer has no extension) when it has an unknown or repeated
//! parameter, a value outside 8-15 or with a leading zero, a value on a
//! `*_no_context_takeover`, or no value on `server_max_window_bits`. What an
//! accepted offer is answered with, by `--compression` mode:
//!
//! | offered | `shared` answers | `dedicated` answers |
//! |---|---|---|
//! | `permessage-deflate` | `server_no_context_takeover; client_no_context_takeover` | nothing more |
//! | `server_no_context_takeover` | both `*_no_context_takeover` | `server_no_context_takeover` |
//! | `client_no_context_takeover` | both `*_no_context_takeover` | `client_no_context_takeover` |
//! | `server_max_window_bits=N` (9-15) | both, and `server_max_window_bits=N` | `server_max_window_bits=N` |
//! | `client_max_window_bits[=N]` | accepted, not echoed | accepted, not echoed |
//!
//! `shared` therefore never keeps compression context between messages, so
//! an idle connection holds no zlib state and a broadcast is compressed
//! once for all; `dedicated` keeps it where the client allows.

/// What the server offers to agree to, from `--compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeflatePolicy {
    /// permessage-deflate is never negotiated.
    #[default]
    Off,
    /// Every message starts afresh in both directions (the server answers
    /// with both `*_no_context_takeover`), so one compressor and one
    /// decompressor serve all of the loop's connections.
    NoContextTakeover,
    /// Contexts carry over between messages unless the client asks
    /// otherwise: better ratios, per-connection zlib state.
    ContextTakeover,
}

/// One `permessage-deflate` offer, validated (§7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeflateOffer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value (the client merely
    /// supports it).
    pub client_max_window_bits: Option<Option<u8>>,
}

/// What both sides agreed for one connection: three bytes, kept in the
/// session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server starts every message it compresses with an empty window.
    pub server_no_context_takeover: bool,
    /// The client does the same, so its messages need no history to inflate.
    pub client_no_context_takeover: bool,
    /// The server's LZ77 window, log2 (9 to 15).
    pub server_window_bits: u8,
}

/// The window zlib uses when nothing limits it (32 KiB).
pub const MAX_WINDOW_BITS: u8 = 15;

pub const EXTENSION_NAME: &str = "permessage-deflate";

/// Parses one element of the `Sec-WebSocket-Extensions` list. `None` when
/// it names another extension; `Err` with the reason when it is a
/// permessage-deflate offer the server must decline (§7.1: unknown or
/// repeated parameter, invalid value, or a window zlib cannot provide).
pub fn parse_offer(offer: &str) -> Option<Result<DeflateOffer, String>> {
    let mut parts = offer.split(';').map(str::trim);
    let name = parts.next().unwrap_or_default();
    if !name.eq_ignore_ascii_case(EXTENSION_NAME) {
        return None;
    }
    Some(parse_params(parts))
}

fn parse_params<'a>(params: impl Iterator<Item = &'a str>) -> Result<DeflateOffer, String> {
    let mut offer = DeflateOffer::default();
    let mut seen: Vec<String> = Vec::new();
    for param in params {
        let (key, value) = match param.split_once('=') {
            Some((key, value)) => (key.trim(), Some(unquote(value.trim()))),
            None => (param, None),
        };
        let key = key.to_ascii_lowercase();
        if seen.contains(&key) {
            return Err(format!("parameter {key} given twice"));
        }
        match (key.as_str(), value) {
            ("server_no_context_takeover", None) => offer.server_no_context_takeover = true,
            ("client_no_context_takeover", None) => offer.client_no_context_takeover = true,
            ("server_max_window_bits", Some(value)) => {
                let bits = window_bits(value)
                    .ok_or_else(|| format!("server_max_window_bits={value} is not 8 to 15"))?;
                if bits < 9 {
                    return Err(
                        "server_max_window_bits=8: zlib cannot compress with a 256-byte window"
                            .into(),
                    );
                }
                offer.server_max_window_bits = Some(bits);
            }
            ("client_max_window_bits", None) => offer.client_max_window_bits = Some(None),
            ("client_max_window_bits", Some(value)) => {
                let bits = window_bits(value)
                    .ok_or_else(|| format!("client_max_window_bits={value} is not 8 to 15"))?;
                offer.client_max_window_bits = Some(Some(bits));
            }
            ("server_no_context_takeover" | "client_no_context_takeover", Some(_)) => {
                return Err(format!("{key} takes no value"));
            }
            ("server_max_window_bits", None) => {
                return Err("server_max_window_bits needs a value".into());
            }
            ("", _) => return Err("empty parameter".into()),
            _ => return Err(format!("unknown parameter {key}")),
        }
        seen.push(key);
    }
    Ok(offer)
}

/// §7.1.2: a decimal 8-15 without leading zeros.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// A quoted-string value means the same as the bare token (§7.1).
fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// The client's offers, in its order of preference (one list element
/// each); the first acceptable permessage-deflate offer wins. Returns the
/// agreed parameters and the `Sec-WebSocket-Extensions` value to answer
/// with, or `None` when compression stays off for this connection.
pub fn negotiate(offers: &[String], policy: DeflatePolicy) -> Option<(DeflateParams, String)> {
    if policy == DeflatePolicy::Off {
        return None;
    }
    let offer = offers
        .iter()
        .filter_map(|offer| parse_offer(offer))
        .find_map(Result::ok)?;
    let shared = policy == DeflatePolicy::NoContextTakeover;
    let params = DeflateParams {
        // §7.1.1: the server may impose either on its own; the shared mode
        // needs both so no connection keeps a window between messages.
        server_no_context_takeover: shared || offer.server_no_context_takeover,
        client_no_context_takeover: shared || offer.client_no_context_takeover,
        server_window_bits: offer.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
    };
    let mut response = String::from(EXTENSION_NAME);
    if params.server_no_context_takeover {
        response.push_str("; server_no_context_takeover");
    }
    if params.client_no_context_takeover {
        response.push_str("; client_no_context_takeover");
    }
    // §7.1.2.1: accepting a limit means answering with it.
    if let Some(bits) = offer.server_max_window_bits {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some((params, response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn answer(list: &[&str], policy: DeflatePolicy) -> Option<String> {
        negotiate(&offers(list), policy).map(|(_, response)| response)
    }

    #[test]
    fn parses_every_parameter() {
        let offer = parse_offer(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            offer,
            DeflateOffer {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: Some(10),
                client_max_window_bits: Some(None),
            }
        );
        let quoted = parse_offer("permessage-deflate; client_max_window_bits=\"12\"")
            .unwrap()
            .unwrap();
        assert_eq!(quoted.client_max_window_bits, Some(Some(12)));
        assert_eq!(parse_offer("x-webkit-deflate-frame"), None);
        assert_eq!(
            parse_offer("Permessage-Deflate").unwrap(),
            Ok(DeflateOffer::default())
        );
    }

    #[test]
    fn declines_what_it_cannot_honour_with_a_reason() {
        for (offer, reason) in [
            ("permessage-deflate; mystery", "unknown parameter mystery"),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                "given twice",
            ),
            (
                "permessage-deflate; server_max_window_bits",
                "needs a value",
            ),
            (
                "permessage-deflate; server_max_window_bits=16",
                "not 8 to 15",
            ),
            (
                "permessage-deflate; server_max_window_bits=09",
                "not 8 to 15",
            ),
            (
                "permessage-deflate; server_max_window_bits=8",
                "256-byte window",
            ),
            (
                "permessage-deflate; client_max_window_bits=7",
                "not 8 to 15",
            ),
            (
                "permessage-deflate; client_max_window_bits=x",
                "not 8 to 15",
            ),
            (
                "permessage-deflate; client_no_context_takeover=1",
                "takes no value",
            ),
            ("permessage-deflate;", "empty parameter"),
        ] {
            let error = parse_offer(offer).unwrap().unwrap_err();
            assert!(error.contains(reason), "{offer}: {error}");
        }
    }

    #[test]
    fn off_never_negotiates() {
        assert_eq!(answer(&["permessage-deflate"], DeflatePolicy::Off), None);
    }

    #[test]
    fn shared_mode_imposes_no_context_takeover_both_ways() {
        let (params, response) = negotiate(
            &offers(&["permessage-deflate"]),
            DeflatePolicy::NoContextTakeover,
        )
        .unwrap();
        assert_eq!(
            response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(
            params,
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_window_bits: 15,
            }
        );
    }

    #[test]
    fn dedicated_mode_answers_with_exactly_what_was_offered() {
        let policy = DeflatePolicy::ContextTakeover;
        assert_eq!(
            answer(&["permessage-deflate"], policy).as_deref(),
            Some("permessage-deflate")
        );
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"], policy).as_deref(),
            Some("permessage-deflate"),
            "the client's window is never limited: we inflate with 32 KiB"
        );
        assert_eq!(
            answer(&["permessage-deflate; server_no_context_takeover"], policy).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
        assert_eq!(
            answer(&["permessage-deflate; client_no_context_takeover"], policy).as_deref(),
            Some("permessage-deflate; client_no_context_takeover")
        );
        let (params, response) = negotiate(
            &offers(&["permessage-deflate; server_max_window_bits=9"]),
            policy,
        )
        .unwrap();
        assert_eq!(response, "permessage-deflate; server_max_window_bits=9");
        assert_eq!(params.server_window_bits, 9);
        assert!(!params.server_no_context_takeover && !params.client_no_context_takeover);
    }

    #[test]
    fn first_acceptable_offer_wins() {
        let policy = DeflatePolicy::ContextTakeover;
        assert_eq!(
            answer(
                &[
                    "x-other",
                    "permessage-deflate; server_max_window_bits=8",
                    "permessage-deflate; server_no_context_takeover",
                    "permessage-deflate",
                ],
                policy
            )
            .as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=8"], policy),
            None,
            "nothing acceptable: no extension"
        );
        assert_eq!(answer(&["x-other"], policy), None);
        assert_eq!(answer(&[], policy), None);
    }
}
