//! The value syntaxes of flags that clap does not know: sizes with units
//! and SHA-256 digests in hex.

use std::fmt;

/// Parses 64 hex digits (a SHA-256 digest).
pub fn parse_sha256_hex(text: &str) -> Result<[u8; 32], NotSha256Hex> {
    let text = text.trim();
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NotSha256Hex);
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        // Cannot fail: 64 ASCII hex digits were checked above.
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| NotSha256Hex)?;
    }
    Ok(digest)
}

/// `--publisher-key-sha256` is not 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotSha256Hex;

impl fmt::Display for NotSha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("expected 64 hex digits (the output of sha256sum)")
    }
}

impl std::error::Error for NotSha256Hex {}

/// Parses `65536`, `64KiB`, `16MiB`, `1GiB` (also `k`, `M`, `G` as binary
/// multiples, since these are buffer sizes).
pub fn parse_size(text: &str) -> Result<usize, SizeError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_owned()))?;
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(SizeError::UnknownUnit(text.to_owned())),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// A size flag's value that [`parse_size`] refused; each holds the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// No number in front.
    NotASize(String),
    /// A unit other than B, KiB, MiB, GiB (or k, M, G).
    UnknownUnit(String),
    /// More than `usize` holds.
    TooLarge(String),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NotASize(text) => {
                write!(f, "`{text}` is not a size like 65536, 64KiB or 16MiB")
            }
            SizeError::UnknownUnit(text) => {
                write!(f, "unknown size unit in `{text}` (use B, KiB, MiB or GiB)")
            }
            SizeError::TooLarge(text) => write!(f, "size `{text}` is too large"),
        }
    }
}

impl std::error::Error for SizeError {}
