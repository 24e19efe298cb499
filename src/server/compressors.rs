//! The loop's zlib state for permessage-deflate, and which of it a
//! connection uses.
//!
//! A direction without context takeover starts every message afresh, so
//! its messages need no per-connection history: they all go through one
//! compressor per window size and one decompressor, owned here and reset
//! after each message. Only a direction with context takeover (the
//! `dedicated` mode, where the client did not opt out) needs zlib state of
//! its own; that lives in a side table keyed by the connection's token,
//! created on the connection's first compressed message and kept until it
//! closes, so the connection in the slab does not grow.
//!
//! A message sent compressed as it arrives (/echo streams large ones back)
//! spans loop turns, so it cannot use a shared compressor: without context
//! takeover it gets one of its own until its last part.
//!
//! A broadcast frame is compressed once per window size for every
//! recipient without server context takeover (see [`BroadcastCache`]);
//! a recipient with context takeover gets its own compression.

use std::collections::HashMap;

use crate::metrics::Metrics;
use crate::ws::decoder::MESSAGE_HEADROOM;
use crate::ws::deflate::{Deflated, Deflater, InflateError, Inflater, PROBE_LEN};
use crate::ws::extensions::DeflateParams;
use crate::ws::SharedFrame;

/// Windows zlib compresses with: 9 to 15 bits.
const WINDOWS: usize = 7;

fn window_slot(bits: u8) -> usize {
    usize::from(bits.clamp(9, 15) - 9)
}

/// One connection's own zlib state, for the directions with context
/// takeover only.
#[derive(Debug, Default)]
struct Contexts {
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
}

#[derive(Debug)]
pub struct Compressors {
    /// Messages shorter than this go out uncompressed.
    threshold: usize,
    /// zlib's compression level.
    level: u32,
    shared_deflaters: [Option<Box<Deflater>>; WINDOWS],
    shared_inflater: Option<Box<Inflater>>,
    contexts: HashMap<usize, Contexts>,
    /// Compressors of messages being sent in parts, for connections
    /// without server context takeover.
    streams: HashMap<usize, Deflater>,
    /// The first bytes of messages sent in parts, kept until there are
    /// enough to judge whether they compress (the first part may be small).
    probing: HashMap<usize, Vec<u8>>,
    /// Messages compressed, and their sizes before and after.
    pub stats: DeflateStats,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct DeflateStats {
    pub messages_deflated: u64,
    pub bytes_before_deflate: u64,
    pub bytes_after_deflate: u64,
    pub messages_inflated: u64,
    /// Large messages sent uncompressed because their first bytes did
    /// not shrink (see `ws::deflate::PROBE_LEN`).
    pub messages_incompressible: u64,
}

impl DeflateStats {
    /// `input_len` bytes went into zlib and `out` (after its headroom) came
    /// out; `message_done`: that ended a message.
    fn count_deflated(&mut self, input_len: usize, out: &[u8], message_done: bool) {
        self.messages_deflated += u64::from(message_done);
        self.bytes_before_deflate += input_len as u64;
        self.bytes_after_deflate += (out.len() - MESSAGE_HEADROOM) as u64;
    }
}

fn new_deflater(params: DeflateParams, level: u32) -> Deflater {
    Deflater::new(params.server_window_bits, level)
}

impl Compressors {
    pub fn new(threshold: usize, level: u32) -> Self {
        Self {
            threshold,
            level,
            shared_deflaters: Default::default(),
            shared_inflater: None,
            contexts: HashMap::new(),
            streams: HashMap::new(),
            probing: HashMap::new(),
            stats: DeflateStats::default(),
        }
    }

    /// The `fanout_deflate_*` families for `GET /metrics`.
    pub fn write_metrics(&self, m: &mut Metrics) {
        m.gauge(
            "fanout_deflate_dedicated_contexts",
            "Connections holding zlib state of their own (--compression dedicated).",
            self.contexts.len() as f64,
        );
        m.gauge(
            "fanout_deflate_streams",
            "Messages being compressed in parts as they arrive (a streamed /echo), each with its own zlib state.",
            self.streams.len() as f64,
        );
        m.counter(
            "fanout_deflate_messages_total",
            "Messages sent compressed (a shared broadcast counts once).",
            self.stats.messages_deflated,
        );
        m.counter(
            "fanout_deflate_input_bytes_total",
            "Payload bytes before compression.",
            self.stats.bytes_before_deflate,
        );
        m.counter(
            "fanout_deflate_output_bytes_total",
            "Payload bytes after compression.",
            self.stats.bytes_after_deflate,
        );
        m.counter(
            "fanout_deflate_incompressible_total",
            "Large messages sent uncompressed because their first 16 KiB did not shrink.",
            self.stats.messages_incompressible,
        );
        m.counter(
            "fanout_inflate_messages_total",
            "Compressed messages received.",
            self.stats.messages_inflated,
        );
    }

    /// Whether a message of `len` bytes is worth compressing.
    pub fn worth_compressing(&self, len: usize) -> bool {
        len >= self.threshold
    }

    /// Inflates a compressed message from connection `token` into a buffer
    /// with `MESSAGE_HEADROOM` bytes in front, at most `limit` bytes of
    /// payload.
    pub fn inflate(
        &mut self,
        token: usize,
        params: DeflateParams,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, InflateError> {
        self.stats.messages_inflated += 1;
        let fresh = params.client_no_context_takeover;
        let inflater = if fresh {
            self.shared_inflater.get_or_insert_with(Default::default)
        } else {
            let contexts = self.contexts.entry(token).or_default();
            contexts.inflater.get_or_insert_with(Inflater::new)
        };
        inflater.inflate(compressed, MESSAGE_HEADROOM, limit, fresh)
    }

    /// `payload` compressed for connection `token` into a buffer with
    /// `MESSAGE_HEADROOM` bytes in front; `None` when it goes out as is
    /// (shorter than the threshold, or zlib failed).
    pub fn deflate(
        &mut self,
        token: usize,
        params: DeflateParams,
        payload: &[u8],
    ) -> Option<Vec<u8>> {
        if !self.worth_compressing(payload.len()) {
            return None;
        }
        let mut out = vec![0; MESSAGE_HEADROOM];
        let fresh = params.server_no_context_takeover;
        let level = self.level;
        let deflater = if fresh {
            self.shared_deflaters[window_slot(params.server_window_bits)]
                .get_or_insert_with(|| Box::new(new_deflater(params, level)))
        } else {
            self.own_deflater(token, params)
        };
        match deflater.compress(payload, &mut out, fresh) {
            Ok(Deflated::Compressed) => {}
            Ok(Deflated::Incompressible) => {
                self.stats.messages_incompressible += 1;
                return None;
            }
            Err(e) => {
                log::warn!("conn {token}: deflate failed ({e}); sending uncompressed");
                return None;
            }
        }
        self.stats.count_deflated(payload.len(), &out, true);
        Some(out)
    }

    /// The next part of a message connection `token` sends as it arrives
    /// (`first`: nothing of it has been [`Part::Compressed`] yet). An error
    /// means the message cannot be finished (zlib misused: not reachable
    /// from input).
    pub fn deflate_part(
        &mut self,
        token: usize,
        params: DeflateParams,
        part: &[u8],
        first: bool,
        last: bool,
    ) -> Result<Part, flate2::CompressError> {
        if !first {
            return self.compress_part(token, params, part, false, last);
        }
        // The probe needs 2 * PROBE_LEN bytes (or the whole message): small
        // first parts are kept until then.
        let held = self.probing.get(&token).map_or(0, Vec::len);
        if held + part.len() < 2 * PROBE_LEN && !last {
            self.probing
                .entry(token)
                .or_default()
                .extend_from_slice(part);
            return Ok(Part::Held);
        }
        let mut first_bytes = self.probing.remove(&token).unwrap_or_default();
        let start: &[u8] = if first_bytes.is_empty() {
            part
        } else {
            first_bytes.extend_from_slice(part);
            &first_bytes
        };
        self.compress_part(token, params, start, true, last)
    }

    fn compress_part(
        &mut self,
        token: usize,
        params: DeflateParams,
        part: &[u8],
        first: bool,
        last: bool,
    ) -> Result<Part, flate2::CompressError> {
        let mut out = vec![0; MESSAGE_HEADROOM];
        let level = self.level;
        let result = if params.server_no_context_takeover {
            let deflater = self
                .streams
                .entry(token)
                .or_insert_with(|| new_deflater(params, level));
            let result = deflater.compress_part(part, &mut out, first, last);
            if last || !matches!(result, Ok(Deflated::Compressed)) {
                self.streams.remove(&token);
            }
            result
        } else {
            self.own_deflater(token, params)
                .compress_part(part, &mut out, first, last)
        };
        if result? == Deflated::Incompressible {
            self.stats.messages_incompressible += 1;
            out.truncate(MESSAGE_HEADROOM);
            out.extend_from_slice(part);
            return Ok(Part::Incompressible(out));
        }
        self.stats.count_deflated(part.len(), &out, last);
        Ok(Part::Compressed(out))
    }

    /// Connection `token`'s own compressor (server context takeover).
    fn own_deflater(&mut self, token: usize, params: DeflateParams) -> &mut Deflater {
        let level = self.level;
        let contexts = self.contexts.entry(token).or_default();
        contexts
            .deflater
            .get_or_insert_with(|| new_deflater(params, level))
    }

    /// The connection closed: its own zlib state goes.
    pub fn forget(&mut self, token: usize) {
        self.contexts.remove(&token);
        self.streams.remove(&token);
        self.probing.remove(&token);
    }
}

/// What became of a part given to [`Compressors::deflate_part`]; each
/// buffer has `MESSAGE_HEADROOM` bytes in front of its payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Part {
    /// Kept until enough of the message is there to probe.
    Held,
    /// Compressed: what zlib has ready, possibly nothing yet.
    Compressed(Vec<u8>),
    /// The message does not compress: its bytes so far (those held, then
    /// this part), to go out as they are, and so is the rest.
    Incompressible(Vec<u8>),
}

/// The compressed forms of the last shared frame delivered, one per
/// window size, so a fan-out compresses once per parameter set rather than
/// once per recipient. Holding the frame keeps its identity unique.
#[derive(Debug, Default)]
pub struct BroadcastCache {
    frame: Option<SharedFrame>,
    /// `None` inside: not compressed for that window yet; `Some(None)`:
    /// it goes out uncompressed (zlib failed).
    compressed: [Option<Option<SharedFrame>>; WINDOWS],
}

impl BroadcastCache {
    /// What to queue for connection `token` in place of `frame`: a
    /// compressed frame, or `None` to queue `frame` itself.
    pub fn frame_for(
        &mut self,
        compressors: &mut Compressors,
        token: usize,
        params: DeflateParams,
        frame: &SharedFrame,
    ) -> Option<SharedFrame> {
        let opcode = frame.opcode()?;
        if opcode.is_control() || !compressors.worth_compressing(frame.payload().len()) {
            return None;
        }
        if !params.server_no_context_takeover {
            // A context of its own: nothing to share with anyone.
            let buffer = compressors.deflate(token, params, frame.payload())?;
            return Some(SharedFrame::deflated(opcode, &buffer[MESSAGE_HEADROOM..]));
        }
        if !self.frame.as_ref().is_some_and(|f| f.same_as(frame)) {
            *self = BroadcastCache {
                frame: Some(frame.clone()),
                ..Default::default()
            };
        }
        self.compressed[window_slot(params.server_window_bits)]
            .get_or_insert_with(|| {
                let buffer = compressors.deflate(token, params, frame.payload())?;
                Some(SharedFrame::deflated(opcode, &buffer[MESSAGE_HEADROOM..]))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::Inflater;

    const SHARED: DeflateParams = DeflateParams {
        server_no_context_takeover: true,
        client_no_context_takeover: true,
        server_window_bits: 15,
    };
    const DEDICATED: DeflateParams = DeflateParams {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_window_bits: 15,
    };

    fn message() -> String {
        r#"{"type":"trade","symbol":"PUMP-SOL","price":"0.00123"}"#.repeat(4)
    }

    #[test]
    fn short_messages_stay_uncompressed() {
        let mut compressors = Compressors::new(100, 6);
        assert_eq!(compressors.deflate(1, SHARED, &[b'x'; 99]), None);
        assert!(compressors.deflate(1, SHARED, &[b'x'; 100]).is_some());
    }

    #[test]
    fn shared_mode_keeps_no_state_per_connection() {
        let mut compressors = Compressors::new(0, 6);
        let text = message();
        let out = compressors.deflate(1, SHARED, text.as_bytes()).unwrap();
        let back = compressors
            .inflate(2, SHARED, &out[MESSAGE_HEADROOM..], 1 << 20)
            .unwrap();
        assert_eq!(&back[MESSAGE_HEADROOM..], text.as_bytes());
        assert_eq!(compressors.contexts.len(), 0);
    }

    #[test]
    fn dedicated_contexts_live_until_forgotten() {
        let mut compressors = Compressors::new(0, 6);
        let text = message();
        let mut peer = Inflater::new();
        let mut sizes = Vec::new();
        for _ in 0..2 {
            let out = compressors.deflate(7, DEDICATED, text.as_bytes()).unwrap();
            let wire = &out[MESSAGE_HEADROOM..];
            sizes.push(wire.len());
            let back = peer.inflate(wire, 0, 1 << 20, false).unwrap();
            assert_eq!(back, text.as_bytes());
        }
        assert!(
            sizes[1] < sizes[0],
            "the second message refers to the first"
        );
        assert_eq!(compressors.contexts.len(), 1);
        compressors.forget(7);
        assert_eq!(compressors.contexts.len(), 0);
    }

    #[test]
    fn a_message_in_parts_has_its_own_compressor_until_its_end() {
        let mut compressors = Compressors::new(0, 6);
        let text = message().repeat(200);
        let mut wire = Vec::new();
        let mut started = false;
        for (i, part) in text.as_bytes().chunks(1000).enumerate() {
            let last = (i + 1) * 1000 >= text.len();
            match compressors.deflate_part(3, SHARED, part, !started, last) {
                Ok(Part::Held) => assert!(!started && (i + 1) * 1000 < 2 * PROBE_LEN),
                Ok(Part::Compressed(out)) => {
                    started = true;
                    wire.extend_from_slice(&out[MESSAGE_HEADROOM..]);
                }
                other => panic!("compressible: {other:?}"),
            }
            assert_eq!(compressors.streams.len(), usize::from(started && !last));
            // Other connections' messages go through the shared compressor
            // meanwhile, untouched by the open stream.
            let other = compressors.deflate(4, SHARED, b"x".repeat(500).as_slice());
            let back = Inflater::new()
                .inflate(&other.unwrap()[MESSAGE_HEADROOM..], 0, 1 << 20, true)
                .unwrap();
            assert_eq!(back, b"x".repeat(500));
        }
        let back = Inflater::new().inflate(&wire, 0, 1 << 20, true).unwrap();
        assert_eq!(back, text.as_bytes());
        assert_eq!(compressors.contexts.len(), 0);
        compressors
            .deflate_part(5, SHARED, &[b'a'; 2 * PROBE_LEN], true, false)
            .unwrap();
        compressors.forget(5);
        assert_eq!(
            compressors.streams.len(),
            0,
            "a closed connection's stream goes"
        );
    }

    #[test]
    fn small_first_parts_are_held_until_the_probe_can_judge_them() {
        let mut compressors = Compressors::new(0, 6);
        let mut x = 7u32;
        let noise: Vec<u8> = (0..3 * PROBE_LEN)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let mut sent = Vec::new();
        for part in noise.chunks(1000) {
            match compressors.deflate_part(9, DEDICATED, part, sent.is_empty(), false) {
                Ok(Part::Held) => assert!(sent.is_empty()),
                Ok(Part::Incompressible(raw)) => {
                    assert!(sent.is_empty(), "judged once");
                    sent = raw[MESSAGE_HEADROOM..].to_vec();
                    // Judged at the first part that brings the total to the probe's size.
                    let judged_at = (2 * PROBE_LEN).div_ceil(1000) * 1000;
                    assert_eq!(sent.len(), judged_at);
                    assert!(compressors.probing.is_empty());
                }
                other => panic!("{other:?}"),
            }
            if !sent.is_empty() {
                break;
            }
        }
        assert_eq!(sent, &noise[..sent.len()]);
        assert_eq!(compressors.stats.messages_incompressible, 1);
        // A message shorter than the probe is judged by its last part.
        let short = message();
        let held = compressors.deflate_part(9, SHARED, &short.as_bytes()[..10], true, false);
        assert_eq!(held.unwrap(), Part::Held);
        let rest = compressors.deflate_part(9, SHARED, &short.as_bytes()[10..], true, true);
        let Ok(Part::Compressed(wire)) = rest else {
            panic!("{rest:?}")
        };
        let back = Inflater::new()
            .inflate(&wire[MESSAGE_HEADROOM..], 0, 1 << 20, true)
            .unwrap();
        assert_eq!(back, short.as_bytes());
        compressors
            .deflate_part(9, SHARED, b"abc", true, false)
            .unwrap();
        compressors.forget(9);
        assert!(compressors.probing.is_empty());
    }

    #[test]
    fn a_broadcast_is_compressed_once_per_window() {
        let mut compressors = Compressors::new(0, 6);
        let mut cache = BroadcastCache::default();
        let frame = SharedFrame::text(&message());
        let a = cache
            .frame_for(&mut compressors, 1, SHARED, &frame)
            .unwrap();
        let b = cache
            .frame_for(&mut compressors, 2, SHARED, &frame)
            .unwrap();
        assert!(a.same_as(&b));
        let narrow = DeflateParams {
            server_window_bits: 9,
            ..SHARED
        };
        let c = cache
            .frame_for(&mut compressors, 3, narrow, &frame)
            .unwrap();
        assert!(!c.same_as(&a));
        assert_eq!(compressors.stats.messages_deflated, 2);
        // A recipient with its own context is compressed on its own.
        cache
            .frame_for(&mut compressors, 4, DEDICATED, &frame)
            .unwrap();
        cache
            .frame_for(&mut compressors, 5, DEDICATED, &frame)
            .unwrap();
        assert_eq!(compressors.stats.messages_deflated, 4);
        assert_eq!(compressors.contexts.len(), 2);
        // A new frame replaces the cached one.
        let other = SharedFrame::binary(message().as_bytes());
        let d = cache
            .frame_for(&mut compressors, 1, SHARED, &other)
            .unwrap();
        assert_eq!(d.bytes()[0], 0xC2, "FIN, RSV1, binary");
        assert_eq!(a.bytes()[0], 0xC1, "FIN, RSV1, text");
    }
}
