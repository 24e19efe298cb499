//! A connection's queue of bytes waiting for the socket.
//!
//! Small frames are packed into owned chunks; frames shared between many
//! recipients are queued by reference. A flush gathers every chunk into
//! one vectored write.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use crate::ws::frame::{FrameHeader, OpCode, MAX_HEADER_LEN};

/// Frames are appended to the last owned chunk while it stays below this,
/// so a burst of small replies costs one allocation, not one per frame.
const PACK_LIMIT: usize = 64 << 10;

/// At most this many chunks go into one `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 64;

#[derive(Debug)]
enum Chunk {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(v) => v,
            Chunk::Shared(s) => s,
        }
    }
}

#[derive(Debug, Default)]
pub struct Outbound {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    queued: usize,
}

impl Outbound {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Appends raw bytes (an HTTP response).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        self.owned_tail(bytes.len()).extend_from_slice(bytes);
        self.queued += bytes.len();
    }

    /// Encodes and appends one unmasked frame.
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode,
            mask: None,
            payload_len: payload.len() as u64,
        };
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header.encode(&mut head);
        let tail = self.owned_tail(head_len + payload.len());
        tail.extend_from_slice(&head[..head_len]);
        tail.extend_from_slice(payload);
        self.queued += head_len + payload.len();
    }

    /// Queues an already-encoded frame shared with other recipients.
    pub fn push_shared(&mut self, frame: Arc<[u8]>) {
        self.queued += frame.len();
        self.chunks.push_back(Chunk::Shared(frame));
    }

    fn owned_tail(&mut self, extra: usize) -> &mut Vec<u8> {
        let reuse =
            matches!(self.chunks.back(), Some(Chunk::Owned(v)) if v.len() + extra <= PACK_LIMIT);
        if !reuse {
            self.chunks
                .push_back(Chunk::Owned(Vec::with_capacity(extra.max(256))));
        }
        match self.chunks.back_mut() {
            Some(Chunk::Owned(v)) => v,
            _ => unreachable!("an owned chunk was just ensured at the back"),
        }
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when the
    /// queue is empty, `Ok(false)` when the socket would block.
    pub fn flush_to(&mut self, sink: &mut impl Write) -> io::Result<bool> {
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (i, chunk) in self.chunks.iter().take(MAX_IOVECS).enumerate() {
                let bytes = chunk.bytes();
                slices[i] = IoSlice::new(if i == 0 {
                    &bytes[self.front_written..]
                } else {
                    bytes
                });
                count += 1;
            }
            let written = match sink.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.consume(written);
        }
        // Give the ring's memory back: an idle connection holds no buffers.
        self.chunks = VecDeque::new();
        Ok(true)
    }

    fn consume(&mut self, mut written: usize) {
        self.queued -= written;
        while written > 0 {
            let front_left = self.chunks[0].bytes().len() - self.front_written;
            if written < front_left {
                self.front_written += written;
                return;
            }
            written -= front_left;
            self.front_written = 0;
            self.chunks.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `budget` bytes per call and then blocks.
    struct Trickle {
        taken: Vec<u8>,
        per_call: usize,
        calls_left: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            let n = buf.len().min(self.per_call);
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut out = Outbound::default();
        out.push_bytes(b"HTTP");
        out.push_frame(OpCode::Text, b"hi");
        out.push_shared(Arc::from(&b"shared"[..]));
        out.push_frame(OpCode::Binary, &[9; 3]);
        let expected = [&b"HTTP\x81\x02hi"[..], b"shared", b"\x82\x03\x09\x09\x09"].concat();
        assert_eq!(out.len(), expected.len());
        let mut sink = Trickle {
            taken: Vec::new(),
            per_call: 3,
            calls_left: 2,
        };
        assert!(!out.flush_to(&mut sink).unwrap());
        assert_eq!(out.len(), expected.len() - 6);
        sink.calls_left = 100;
        assert!(out.flush_to(&mut sink).unwrap());
        assert_eq!(sink.taken, expected);
        assert!(out.is_empty());
    }

    #[test]
    fn small_frames_share_one_chunk() {
        let mut out = Outbound::default();
        for _ in 0..100 {
            out.push_frame(OpCode::Text, b"0123456789");
        }
        assert_eq!(out.chunks.len(), 1);
        out.push_frame(OpCode::Binary, &vec![0; PACK_LIMIT]);
        assert_eq!(out.chunks.len(), 2);
    }
}
