//! permessage-deflate on the client side, just what the benchmarks need:
//! the offer, a payload compressed once (no context: every copy of the
//! frame stands alone), and the first bytes of a compressed message
//! inflated so broadcast stamps and setup replies can still be read.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// What `--deflate` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// No context takeover either way: each message stands alone (fanout's
    /// `shared` mode answers with this whatever is offered).
    Fresh,
    /// Plain `permessage-deflate`: contexts carry over where the server
    /// agrees (fanout's `dedicated` mode).
    Takeover,
}

impl Offer {
    pub fn parse(v: &str) -> Result<Offer, String> {
        match v {
            "fresh" => Ok(Offer::Fresh),
            "takeover" => Ok(Offer::Takeover),
            _ => Err(format!("--deflate is fresh or takeover, not `{v}`")),
        }
    }

    pub fn header_value(self) -> &'static str {
        match self {
            Offer::Fresh => "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            Offer::Takeover => "permessage-deflate",
        }
    }
}

const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// `payload` as one compressed message from an empty window: raw
/// deflate, sync flush, the trailing `00 00 ff ff` removed (RFC 7692 §7.2.1).
pub fn compress(payload: &[u8]) -> Vec<u8> {
    let mut zlib = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 1024);
    loop {
        let done = zlib.total_in() as usize;
        zlib.compress_vec(&payload[done..], &mut out, FlushCompress::Sync).expect("deflate");
        if zlib.total_in() as usize == payload.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    assert!(out.ends_with(&TAIL));
    out.truncate(out.len() - TAIL.len());
    out
}

thread_local! {
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Replaces `buf[..*len]`, the first bytes of a message compressed
/// without context, with as much of its inflated text as fits in `buf`.
/// Leaves nothing on error.
pub fn inflate_prefix(buf: &mut [u8], len: &mut u16) {
    let compressed = buf[..*len as usize].to_vec();
    INFLATER.with(|zlib| {
        let mut zlib = zlib.borrow_mut();
        zlib.reset(false);
        let mut out = vec![0; buf.len()];
        *len = match zlib.decompress(&compressed, &mut out, FlushDecompress::Sync) {
            Ok(_) => {
                let n = zlib.total_out() as usize;
                buf[..n].copy_from_slice(&out[..n]);
                n as u16
            }
            Err(_) => 0,
        };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_of_a_compressed_message_inflates_to_its_start() {
        let text: Vec<u8> = br#"{"type":"message","channel":"bench","offset":12,"data":"S0000000001T"#
            .iter()
            .chain(b"x".repeat(5000).iter())
            .copied()
            .collect();
        let wire = compress(&text);
        assert!(wire.len() < 200);
        let mut buf = [0u8; 192];
        let n = wire.len().min(120);
        buf[..n].copy_from_slice(&wire[..n]);
        let mut len = n as u16;
        inflate_prefix(&mut buf, &mut len);
        assert!(len >= 60, "{len}");
        assert_eq!(&buf[..len as usize], &text[..len as usize]);
    }
}
