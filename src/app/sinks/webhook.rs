//! The generic webhook: the JSON body as it is, POSTed with its HMAC-SHA256
//! signature so that the receiver can tell the sender had the secret and
//! that the body was not changed on the way.
//!
//! `X-Fanout-Signature: sha256=<hex>` is HMAC-SHA256 over the exact bytes
//! of the body, keyed with the sink's `secret`, in lowercase hex. A
//! receiver recomputes it over the raw body (before any JSON parsing) and
//! compares in constant time. There is no timestamp header: an unsigned
//! one would not stop a replay, and a signed one would make the signature
//! cover more than the body. The body itself tells one firing from another
//! (alert id, `fired`, `ts`; a channel message's `channel`, `offset`,
//! `ts`) and retries resend the same bytes, so a receiver that must not
//! act twice remembers the signatures it has seen.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signature header's name.
pub const SIGNATURE_HEADER: &str = "X-Fanout-Signature";

/// `sha256=<hex>`: HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length (longer ones are hashed first).
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut text = String::with_capacity(7 + 64);
    text.push_str("sha256=");
    for byte in digest {
        text.push(char::from_digit(u32::from(byte >> 4), 16).expect("a nibble"));
        text.push(char::from_digit(u32::from(byte & 0xf), 16).expect("a nibble"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_test_cases() {
        // RFC 4231 §4.2 (test case 1) and §4.3 (test case 2).
        assert_eq!(
            signature(&[0x0b; 20], b"Hi There"),
            "sha256=b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // §4.7 (test case 6): a key longer than the block size.
        assert_eq!(
            signature(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn any_change_to_the_body_or_the_key_changes_it() {
        let body = br#"{"type":"alert","alert":"a1"}"#;
        let base = signature(b"k", body);
        assert_ne!(base, signature(b"k2", body));
        assert_ne!(base, signature(b"k", br#"{"type":"alert","alert":"a2"}"#));
        assert_eq!(base, signature(b"k", body));
    }
}
