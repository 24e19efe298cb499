//! Client-to-server masking (RFC 6455 §5.3).

/// XORs `payload` in place with the 4-byte `key`, where `offset` is the
/// position of `payload[0]` within the frame's payload. The offset lets a
/// frame that arrives over several reads be unmasked piece by piece.
///
/// The bulk of the slice is processed a machine word at a time: the key is
/// rotated to the current offset once and widened to 8 bytes, so the inner
/// loop is one load, one XOR and one store per 8 bytes (which the compiler
/// widens further). Short payloads take unaligned words and pay for no
/// alignment prologue.
pub fn apply_mask(payload: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    if payload.len() < 64 {
        return apply_unaligned(payload, key);
    }
    // SAFETY: u64 has no invalid bit patterns, so viewing the aligned middle
    // of a byte slice as u64s is sound; prefix and suffix stay bytes.
    let (prefix, words, suffix) = unsafe { payload.align_to_mut::<u64>() };
    apply_unaligned(prefix, key);
    let key = rotate_key(key, prefix.len());
    let wide = widen(key);
    for word in words.iter_mut() {
        *word ^= wide;
    }
    // Each word is 8 bytes, a multiple of the key length, so the suffix
    // starts at the same key phase as the words did.
    apply_unaligned(suffix, key);
}

/// The key repeated to a word, in memory order.
fn widen(key: [u8; 4]) -> u64 {
    let narrow = u64::from(u32::from_ne_bytes(key));
    (narrow << 32) | narrow
}

/// Masks `bytes` starting at the key's phase 0, by unaligned words.
fn apply_unaligned(bytes: &mut [u8], key: [u8; 4]) {
    let wide = widen(key);
    let mut words = bytes.chunks_exact_mut(8);
    for word in &mut words {
        let word: &mut [u8; 8] = word.try_into().expect("chunks of 8");
        *word = (u64::from_ne_bytes(*word) ^ wide).to_ne_bytes();
    }
    // A word is a multiple of the key length: the tail starts at phase 0.
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

/// The key as seen from `by` bytes into the payload.
fn rotate_key(key: [u8; 4], by: usize) -> [u8; 4] {
    let shift = (by % 4) as u32 * 8;
    u32::from_le_bytes(key).rotate_right(shift).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(payload: &[u8], key: [u8; 4], offset: usize) -> Vec<u8> {
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[(offset + i) % 4])
            .collect()
    }

    #[test]
    fn matches_bytewise_reference_for_every_length_offset_and_alignment() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let source: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in 0..100 {
                for offset in 0..5 {
                    let mut data = source[start..start + len].to_vec();
                    let expected = reference(&data, key, offset);
                    apply_mask(&mut data, key, offset);
                    assert_eq!(data, expected, "start {start} len {len} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: a masked "Hello".
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn masking_in_pieces_equals_masking_whole() {
        let key = [1, 2, 3, 4];
        let original: Vec<u8> = (0..64u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = original.clone();
        let (a, rest) = pieces.split_at_mut(5);
        let (b, c) = rest.split_at_mut(17);
        apply_mask(a, key, 0);
        apply_mask(b, key, 5);
        apply_mask(c, key, 22);
        assert_eq!(whole, pieces);
    }
}
