//! UTF-8 validation that resumes across fragment and read boundaries.
//!
//! RFC 6455 §8.1 lets an endpoint fail a text message as soon as it sees an
//! invalid byte; Autobahn 6.4.* checks that we do, so text payloads are
//! validated chunk by chunk as they arrive instead of once at the end.

/// The bytes seen so far are not a prefix of any valid UTF-8 string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Incremental validator. Holds at most the three leading bytes of one
/// code point that was cut by a chunk boundary.
#[derive(Debug, Default, Clone, Copy)]
pub struct Utf8Validator {
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Validator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates the next chunk. Fails as soon as the input can no longer
    /// become valid, even if the offending sequence is still incomplete.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), InvalidUtf8> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let need = sequence_len(self.pending[0]) - have;
            let take = need.min(chunk.len());
            self.pending[have..have + take].copy_from_slice(&chunk[..take]);
            let len = have + take;
            chunk = &chunk[take..];
            match std::str::from_utf8(&self.pending[..len]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {
                    // Still a valid prefix and the chunk is used up.
                    self.pending_len = len as u8;
                    return Ok(());
                }
            }
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                let tail = &chunk[e.valid_up_to()..];
                self.pending[..tail.len()].copy_from_slice(tail);
                self.pending_len = tail.len() as u8;
                Ok(())
            }
        }
    }

    /// Checks that the message did not end in the middle of a code point.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let complete = self.pending_len == 0;
        self.pending_len = 0;
        if complete {
            Ok(())
        } else {
            Err(InvalidUtf8)
        }
    }
}

/// Validates a whole text, with a fast path for ASCII (most protocol
/// text): one word-at-a-time scan instead of the general decoder.
pub fn validate(bytes: &[u8]) -> Result<&str, InvalidUtf8> {
    if bytes.is_ascii() {
        // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| InvalidUtf8)
}

/// Length of the sequence a lead byte starts. Only called on bytes that
/// `from_utf8` accepted as the start of an incomplete sequence, so it is
/// always a 2-, 3- or 4-byte lead.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate_split(bytes: &[u8], splits: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&bytes.len())) {
            v.feed(&bytes[start..end])?;
            start = end;
        }
        v.finish()
    }

    #[test]
    fn accepts_valid_text_split_at_every_byte_pair() {
        let text = "κόσμε € 𝄞 hello".as_bytes();
        for a in 0..=text.len() {
            for b in a..=text.len() {
                assert_eq!(validate_split(text, &[a, b]), Ok(()), "splits {a} {b}");
            }
        }
    }

    #[test]
    fn rejects_invalid_sequences_wherever_split() {
        let cases: &[&[u8]] = &[
            b"\xff",
            b"ab\xc0\xaf",       // overlong '/'
            b"\xed\xa0\x80",     // UTF-16 surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
            b"\xe2\x82", // truncated at the end
        ];
        for bytes in cases {
            for split in 0..=bytes.len() {
                assert_eq!(
                    validate_split(bytes, &[split]),
                    Err(InvalidUtf8),
                    "{bytes:?} at {split}"
                );
            }
        }
    }

    #[test]
    fn fails_fast_on_a_bad_byte_before_the_sequence_completes() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"\xf4"), Ok(()));
        // 0x90 after 0xF4 would encode above U+10FFFF: no completion can fix it.
        assert_eq!(v.feed(b"\x90"), Err(InvalidUtf8));
    }

    #[test]
    fn whole_text_validation_agrees_with_std() {
        let cases: &[&[u8]] = &[
            b"",
            b"plain ascii",
            "κόσμε".as_bytes(),
            b"\xff",
            b"ab\xe2\x82",
        ];
        for bytes in cases {
            assert_eq!(
                validate(bytes).ok(),
                std::str::from_utf8(bytes).ok(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn incomplete_prefix_is_pending_not_an_error() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed("€".as_bytes().split_at(2).0), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
    }
}
