//! Shared by the fuzz targets: turns the first two input bytes into a
//! reproducible way of cutting the rest of the input into reads.

use std::ops::Range;

/// Splits `data` into a seed (its first two bytes) and the stream, and
/// returns the stream with the chunk boundaries the seed picks. The top two
/// bits of the seed choose the largest chunk (1, 8, 64 or 1024 bytes) so
/// byte-by-byte feeding and big reads are both common; empty chunks occur
/// too. `None` when `data` is too short to hold a seed.
pub fn seeded_chunks(data: &[u8]) -> Option<(&[u8], Vec<Range<usize>>)> {
    let (seed, stream) = data.split_first_chunk::<2>()?;
    let seed = u16::from_le_bytes(*seed);
    let max = [1u32, 8, 64, 1024][usize::from(seed >> 14)];
    // xorshift32 over a non-zero state derived from the seed.
    let mut state = (u32::from(seed) | 0x1_0000).wrapping_mul(0x9E37_79B9) | 1;
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < stream.len() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = (state % (max + 1)) as usize;
        let end = (start + len).min(stream.len());
        chunks.push(start..end);
        start = end;
    }
    Some((stream, chunks))
}
