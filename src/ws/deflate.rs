//! permessage-deflate's per-message transform (RFC 7692 §7.2) over flate2
//! (the zlib-rs backend, which supports every window from 9 to 15 bits).
//!
//! Sending: raw deflate, a sync flush, and the flush's trailing
//! `00 00 ff ff` removed. Receiving: the tail appended again, then inflated
//! into a buffer that is never allowed past the message size limit, so a
//! small frame that would inflate into gigabytes fails with 1009 after at
//! most the limit's worth of memory.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::close::CloseCode;
use super::decoder::Violation;
use super::extensions::MAX_WINDOW_BITS;
use super::utf8::validate;

/// What a sync flush ends with, and a compressed message omits (§7.2.1).
pub const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Output grows at least by this much at a time.
const MIN_GROWTH: usize = 256;

/// A message of at least twice this many bytes is tried on its first
/// `PROBE_LEN` bytes before the rest: random or already compressed data
/// (images, archives) costs zlib about 17 ms per MiB for nothing, and the
/// loop serves no one else meanwhile.
pub const PROBE_LEN: usize = 16 << 10;

/// The probe must shrink by at least 1/`MIN_GAIN` for the rest to be
/// compressed.
const MIN_GAIN: usize = 16;

/// What [`Deflater::compress`] and [`Deflater::compress_part`] made of
/// their input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflated {
    /// Compressed into `out`.
    Compressed,
    /// Its first `PROBE_LEN` bytes hardly shrank: `out` is as it was, the
    /// compressor reset (a later message refers to nothing before it), and
    /// the message is to go out uncompressed.
    Incompressible,
}

/// How far a call to zlib goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// Mid-message, no flush: zlib emits blocks as its buffers fill (no
    /// marker per part, back-references across parts).
    None,
    /// Mid-message, a sync flush: everything so far is in `out`, so its
    /// size can be judged; the stream goes on after it.
    Probe,
    /// The message ends: a sync flush, its `00 00 ff ff` removed.
    End,
}

/// Compresses messages for one peer, or (without context takeover) for
/// every peer that agreed on the same window.
pub struct Deflater {
    zlib: Compress,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("total_in", &self.zlib.total_in())
            .finish()
    }
}

impl Deflater {
    /// `window_bits`: 9 to 15, as negotiated; `level`: zlib's 1 to 9.
    pub fn new(window_bits: u8, level: u32) -> Self {
        Self {
            zlib: Compress::new_with_window_bits(
                Compression::new(level.clamp(1, 9)),
                false,
                window_bits.clamp(9, 15),
            ),
        }
    }

    /// Appends `payload`, compressed as one message, to `out`, unless a
    /// large one proves incompressible (see [`PROBE_LEN`]). With
    /// `no_context_takeover` the next message starts from an empty window.
    /// On error (zlib misused: not reachable from input) `out` is restored
    /// and the compressor reset, and the caller sends the message as is.
    pub fn compress(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
        no_context_takeover: bool,
    ) -> Result<Deflated, flate2::CompressError> {
        let result = self.probe_then_compress(payload, out, Flush::End);
        if no_context_takeover {
            self.zlib.reset();
        }
        result
    }

    /// Appends the compressed form of the next `part` of a message sent as
    /// it arrives, to `out`: only what zlib has ready, which may be nothing,
    /// until `last`, which flushes the rest and ends the message. The
    /// message keeps this compressor until then, so it cannot be one that
    /// other connections share. On error the compressor is reset and the
    /// message cannot be finished.
    ///
    /// The `first` part is probed like a whole message, and may be found
    /// [`Deflated::Incompressible`]: nothing of the message is sent
    /// compressed then.
    pub fn compress_part(
        &mut self,
        part: &[u8],
        out: &mut Vec<u8>,
        first: bool,
        last: bool,
    ) -> Result<Deflated, flate2::CompressError> {
        let flush = if last { Flush::End } else { Flush::None };
        if first {
            return self.probe_then_compress(part, out, flush);
        }
        let result = self.compress_into(part, out, flush);
        if result.is_err() {
            self.zlib.reset();
        }
        result.map(|()| Deflated::Compressed)
    }

    /// Compresses `payload` into `out` up to `flush`, trying its first
    /// `PROBE_LEN` bytes alone first when it is large. Restores `out` and
    /// resets the compressor when it gives up, on an error or on a probe
    /// that hardly shrank.
    fn probe_then_compress(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
        flush: Flush,
    ) -> Result<Deflated, flate2::CompressError> {
        let base = out.len();
        let mut verdict = Deflated::Compressed;
        let result = if payload.len() >= 2 * PROBE_LEN {
            self.compress_into(&payload[..PROBE_LEN], out, Flush::Probe)
                .and_then(|()| {
                    let probed = out.len() - base;
                    if probed * MIN_GAIN > PROBE_LEN * (MIN_GAIN - 1) {
                        verdict = Deflated::Incompressible;
                        return Ok(());
                    }
                    self.compress_into(&payload[PROBE_LEN..], out, flush)
                })
        } else {
            self.compress_into(payload, out, flush)
        };
        if result.is_err() || verdict == Deflated::Incompressible {
            out.truncate(base);
            self.zlib.reset();
        }
        result.map(|()| verdict)
    }

    fn compress_into(
        &mut self,
        payload: &[u8],
        out: &mut Vec<u8>,
        flush: Flush,
    ) -> Result<(), flate2::CompressError> {
        let end_of_message = flush == Flush::End;
        let flush = match flush {
            Flush::None => FlushCompress::None,
            Flush::Probe | Flush::End => FlushCompress::Sync,
        };
        let start = self.zlib.total_in();
        out.reserve(payload.len() / 2 + MIN_GROWTH);
        loop {
            let consumed = (self.zlib.total_in() - start) as usize;
            self.zlib.compress_vec(&payload[consumed..], out, flush)?;
            let consumed = (self.zlib.total_in() - start) as usize;
            // The call is complete once all input is in and zlib left
            // room unused in the output.
            if consumed == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(MIN_GROWTH));
        }
        if end_of_message && out.ends_with(&SYNC_TAIL) {
            out.truncate(out.len() - SYNC_TAIL.len());
        }
        Ok(())
    }
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the message size limit.
    TooBig,
    /// It is not a valid deflate stream.
    Corrupt,
}

impl InflateError {
    /// The close the connection fails with.
    pub fn violation(self) -> Violation {
        match self {
            InflateError::TooBig => Violation {
                code: CloseCode::MESSAGE_TOO_BIG,
                reason: "message exceeds the maximum message size once inflated",
            },
            InflateError::Corrupt => Violation {
                code: CloseCode::INVALID_PAYLOAD,
                reason: "compressed message is not valid deflate data",
            },
        }
    }
}

/// An inflated text message must be UTF-8 (RFC 6455 §8.1), checked once
/// it is whole since the decoder saw only compressed bytes.
pub fn check_inflated_text(payload: &[u8]) -> Result<(), Violation> {
    validate(payload).map(|_| ()).map_err(|_| Violation {
        code: CloseCode::INVALID_PAYLOAD,
        reason: "text message is not valid UTF-8",
    })
}

/// Inflates messages from one peer, or (when peers agreed on no context
/// takeover) from any peer.
pub struct Inflater {
    zlib: Decompress,
    /// The last message ended the deflate stream (BFINAL): whatever the
    /// agreement, the next one starts a new stream.
    stream_ended: bool,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("total_out", &self.zlib.total_out())
            .finish()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    /// A 32 KiB window inflates whatever window the peer compressed with.
    pub fn new() -> Self {
        Self {
            zlib: Decompress::new_with_window_bits(false, MAX_WINDOW_BITS),
            stream_ended: false,
        }
    }

    /// Inflates one message into a new buffer that starts with `headroom`
    /// unused bytes. The payload may be at most `limit` bytes: the buffer
    /// never grows past `headroom + limit + 1`. With `no_context_takeover`
    /// the message does not refer to earlier ones.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        headroom: usize,
        limit: usize,
        no_context_takeover: bool,
    ) -> Result<Vec<u8>, InflateError> {
        if no_context_takeover || self.stream_ended {
            self.zlib.reset(false);
            self.stream_ended = false;
        }
        let result = self.inflate_into(compressed, headroom, limit);
        if result.is_err() {
            // The connection is failed; the inflater may serve others.
            self.zlib.reset(false);
            self.stream_ended = false;
        }
        result
    }

    fn inflate_into(
        &mut self,
        compressed: &[u8],
        headroom: usize,
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        let most = headroom.saturating_add(limit).saturating_add(1);
        let first = compressed
            .len()
            .saturating_mul(4)
            .max(MIN_GROWTH)
            .saturating_add(headroom)
            .min(most);
        let mut out = Vec::with_capacity(first);
        out.resize(headroom, 0);
        for input in [compressed, &SYNC_TAIL[..]] {
            let start = self.zlib.total_in();
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= most {
                        return Err(InflateError::TooBig);
                    }
                    let grown = out.capacity().saturating_mul(2).min(most);
                    out.reserve_exact(grown - out.len());
                }
                let consumed = (self.zlib.total_in() - start) as usize;
                let status = self
                    .zlib
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() - headroom > limit {
                    return Err(InflateError::TooBig);
                }
                let consumed = (self.zlib.total_in() - start) as usize;
                match status {
                    Status::StreamEnd => {
                        self.stream_ended = true;
                        return Ok(out);
                    }
                    // All input is in and room is left: nothing more to come.
                    _ if consumed == input.len() && out.len() < out.capacity() => break,
                    Status::BufError if out.len() < out.capacity() => {
                        // No progress with room to spare: the input is cut short.
                        return Err(InflateError::Corrupt);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        let text = br#"{"type":"trade","symbol":"PUMP-SOL","price":"0.001234","size":"1500"}"#;
        text.iter().copied().cycle().take(len).collect()
    }

    fn compress(deflater: &mut Deflater, payload: &[u8], reset: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let verdict = deflater.compress(payload, &mut out, reset).unwrap();
        assert_eq!(verdict, Deflated::Compressed);
        out
    }

    #[test]
    fn a_message_compressed_in_parts_inflates_whole_and_keeps_the_context() {
        let message = sample(300_000);
        for bits in [9, 15] {
            let mut deflater = Deflater::new(bits, 6);
            let mut inflater = Inflater::new();
            let mut wire = Vec::new();
            let mut quiet_parts = 0;
            let parts: Vec<&[u8]> = message.chunks(7_000).collect();
            for (i, part) in parts.iter().enumerate() {
                let before = wire.len();
                let last = i + 1 == parts.len();
                let verdict = deflater.compress_part(part, &mut wire, i == 0, last);
                assert_eq!(verdict.unwrap(), Deflated::Compressed);
                quiet_parts += usize::from(wire.len() == before);
            }
            assert!(quiet_parts > 0, "zlib holds small parts back");
            let whole = compress(&mut Deflater::new(bits, 6), &message, true).len();
            assert!(
                wire.len() <= whole + whole / 8,
                "{bits}: {} vs {whole} bytes",
                wire.len()
            );
            assert_eq!(inflater.inflate(&wire, 0, 1 << 20, false).unwrap(), message);
            // The next message may refer to the streamed one.
            let next = compress(&mut deflater, &message[..2000], false);
            let fresh = compress(&mut Deflater::new(bits, 6), &message[..2000], true);
            assert!(next.len() < fresh.len(), "{bits}: {} bytes", next.len());
            assert_eq!(
                inflater.inflate(&next, 0, 1 << 20, false).unwrap(),
                &message[..2000]
            );
        }
    }

    /// Bytes no compressor can shrink.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_large_incompressible_message_is_given_up_after_its_probe() {
        for reset in [true, false] {
            let mut deflater = Deflater::new(15, 6);
            let mut inflater = Inflater::new();
            let first = compress(&mut deflater, &sample(3000), reset);
            assert_eq!(
                inflater.inflate(&first, 0, 1 << 20, reset).unwrap(),
                sample(3000)
            );
            let mut out = b"kept".to_vec();
            let verdict = deflater.compress(&noise(2 * PROBE_LEN), &mut out, reset);
            assert_eq!(verdict.unwrap(), Deflated::Incompressible);
            assert_eq!(out, b"kept", "nothing of it is left in the output");
            // Below the probe's size it is compressed whatever it is.
            let small = noise(2 * PROBE_LEN - 1);
            let wire = compress(&mut deflater, &small, reset);
            assert_eq!(inflater.inflate(&wire, 0, 1 << 20, reset).unwrap(), small);
            // A large compressible one goes through, probe and all, and the
            // peer's context (kept or not) still matches ours.
            let large = sample(5 * PROBE_LEN);
            let wire = compress(&mut deflater, &large, reset);
            assert!(wire.len() < large.len() / 10, "{} bytes", wire.len());
            assert_eq!(inflater.inflate(&wire, 0, 1 << 20, reset).unwrap(), large);
        }
    }

    #[test]
    fn a_stream_is_probed_on_its_first_part_only() {
        let mut deflater = Deflater::new(15, 6);
        let mut out = Vec::new();
        let verdict = deflater.compress_part(&noise(3 * PROBE_LEN), &mut out, true, false);
        assert_eq!((verdict.unwrap(), out.len()), (Deflated::Incompressible, 0));
        // Compressible at first, noise later: the message is compressed.
        let mut inflater = Inflater::new();
        let message = [sample(2 * PROBE_LEN), noise(2 * PROBE_LEN)].concat();
        let (head, tail) = message.split_at(2 * PROBE_LEN);
        for (part, first, last) in [(head, true, false), (tail, false, true)] {
            let verdict = deflater.compress_part(part, &mut out, first, last);
            assert_eq!(verdict.unwrap(), Deflated::Compressed);
        }
        assert_eq!(inflater.inflate(&out, 0, 1 << 20, true).unwrap(), message);
    }

    #[test]
    fn rfc_7692_example_hello() {
        // §7.2.3.1: "Hello" compressed with no context.
        let wire = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mut inflater = Inflater::new();
        let out = inflater.inflate(&wire, 0, 100, true).unwrap();
        assert_eq!(out, b"Hello");
        // §7.2.3.2: the same message again, referring to the first.
        let mut inflater = Inflater::new();
        inflater.inflate(&wire, 0, 100, false).unwrap();
        let again = [0xf2, 0x00, 0x11, 0x00, 0x00];
        assert_eq!(inflater.inflate(&again, 0, 100, false).unwrap(), b"Hello");
    }

    #[test]
    fn roundtrip_every_window_with_and_without_context() {
        for bits in 9..=15 {
            for reset in [true, false] {
                let mut deflater = Deflater::new(bits, 6);
                let mut inflater = Inflater::new();
                for len in [0, 1, 100, 5000, 200_000] {
                    let payload = sample(len);
                    let wire = compress(&mut deflater, &payload, reset);
                    assert!(!wire.ends_with(&SYNC_TAIL) || wire.is_empty());
                    let out = inflater.inflate(&wire, 14, 1 << 20, reset).unwrap();
                    assert_eq!(
                        &out[14..],
                        &payload[..],
                        "bits {bits} reset {reset} len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn context_takeover_makes_repeats_smaller() {
        let payload = sample(300);
        let mut deflater = Deflater::new(15, 6);
        let first = compress(&mut deflater, &payload, false);
        let second = compress(&mut deflater, &payload, false);
        assert!(
            second.len() * 4 < first.len(),
            "{} vs {}",
            second.len(),
            first.len()
        );
        let mut fresh = Deflater::new(15, 6);
        let a = compress(&mut fresh, &payload, true);
        let b = compress(&mut fresh, &payload, true);
        assert_eq!(a, b, "without context takeover every message stands alone");
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let wire = compress(&mut Deflater::new(15, 6), &zeros, true);
        assert!(wire.len() < 20_000, "{}", wire.len());
        let mut inflater = Inflater::new();
        assert_eq!(
            inflater.inflate(&wire, 14, 1 << 20, true),
            Err(InflateError::TooBig)
        );
        // Exactly at the limit is fine.
        let wire = compress(&mut Deflater::new(15, 6), &zeros[..1 << 20], true);
        assert_eq!(
            inflater.inflate(&wire, 0, 1 << 20, true).unwrap().len(),
            1 << 20
        );
        assert_eq!(
            inflater.inflate(&wire, 0, (1 << 20) - 1, true),
            Err(InflateError::TooBig)
        );
    }

    #[test]
    fn garbage_is_corrupt_and_the_inflater_recovers() {
        let mut inflater = Inflater::new();
        assert_eq!(
            inflater.inflate(&[0xff, 0xff, 0xff, 0xff], 0, 1000, true),
            Err(InflateError::Corrupt)
        );
        let wire = compress(&mut Deflater::new(15, 6), b"fine", true);
        assert_eq!(inflater.inflate(&wire, 0, 1000, true).unwrap(), b"fine");
        assert_eq!(
            InflateError::TooBig.violation().code,
            CloseCode::MESSAGE_TOO_BIG
        );
        assert_eq!(check_inflated_text("ü".as_bytes()), Ok(()));
        assert_eq!(
            check_inflated_text(b"\xc3").unwrap_err().code,
            CloseCode::INVALID_PAYLOAD
        );
    }

    #[test]
    fn a_final_block_ends_the_stream() {
        // BFINAL set: a complete raw deflate stream, then the next message.
        let mut zlib = Compress::new(Compression::default(), false);
        let mut wire = Vec::with_capacity(64);
        zlib.compress_vec(b"done", &mut wire, FlushCompress::Finish)
            .unwrap();
        let mut inflater = Inflater::new();
        assert_eq!(inflater.inflate(&wire, 0, 100, false).unwrap(), b"done");
        let next = compress(&mut Deflater::new(15, 6), b"next", true);
        assert_eq!(inflater.inflate(&next, 0, 100, false).unwrap(), b"next");
    }
}
