//! A connection's queue of bytes waiting for the socket.
//!
//! An empty queue is one null pointer: an idle connection owns no buffer.
//! Small frames, shared ones included, are packed into owned chunks, so a
//! burst of replies or broadcasts goes out in one plain `write`; large
//! shared frames are queued by reference, and a received message handed
//! over whole (an echo) is queued without a copy. A flush gathers every
//! chunk into one vectored write when there are several.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::ws::frame::{FrameHeader, OpCode, SharedFrame, MAX_HEADER_LEN};

/// Frames are appended to the last owned chunk while it stays below this,
/// so a burst of small replies costs one allocation, not one per frame.
const PACK_LIMIT: usize = 64 << 10;

/// Shared frames up to this size are copied into the owned chunk: a copy
/// of a few dozen bytes costs less than a reference count taken and
/// dropped, and the kernel then gets one buffer instead of many.
const COPY_SHARED_LIMIT: usize = 512;

/// The first owned chunk's capacity: room for a burst of small replies.
const FIRST_CHUNK: usize = 1024;

/// At most this many chunks go into one `writev` (Linux allows 1024).
const MAX_IOVECS: usize = 64;

#[derive(Debug)]
enum Chunk {
    /// `buf[start..]`: packed frames (`start` 0), or a handed-over message
    /// buffer whose header was written just in front of its payload.
    Owned {
        buf: Vec<u8>,
        start: usize,
    },
    Shared(SharedFrame),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned { buf, start } => &buf[*start..],
            Chunk::Shared(frame) => frame.bytes(),
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    chunks: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    front_written: usize,
    queued: usize,
}

#[derive(Debug, Default)]
pub struct Outbound {
    /// `None` whenever nothing is queued.
    queue: Option<Box<Queue>>,
}

impl Outbound {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.queued)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
    }

    fn queue(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(Box::default)
    }

    /// Appends raw bytes (an HTTP response).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let queue = self.queue();
        queue.owned_tail(bytes.len()).extend_from_slice(bytes);
        queue.queued += bytes.len();
    }

    /// Encodes and appends one unmasked frame.
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header(opcode, payload.len()).encode(&mut head);
        let queue = self.queue();
        let tail = queue.owned_tail(head_len + payload.len());
        tail.extend_from_slice(&head[..head_len]);
        tail.extend_from_slice(payload);
        queue.queued += head_len + payload.len();
    }

    /// Queues an already-encoded frame shared with other recipients.
    pub fn push_shared(&mut self, frame: &SharedFrame) {
        let bytes = frame.bytes();
        let queue = self.queue();
        if bytes.len() <= COPY_SHARED_LIMIT {
            queue.owned_tail(bytes.len()).extend_from_slice(bytes);
        } else {
            queue.chunks.push_back(Chunk::Shared(frame.clone()));
        }
        queue.queued += bytes.len();
    }

    /// Queues `buf[payload_start..]` as one frame without copying it: the
    /// header is written into the `MAX_HEADER_LEN` bytes reserved in front
    /// of the payload.
    pub fn push_message(&mut self, opcode: OpCode, mut buf: Vec<u8>, payload_start: usize) {
        assert!(payload_start >= MAX_HEADER_LEN && payload_start <= buf.len());
        let payload_len = buf.len() - payload_start;
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header(opcode, payload_len).encode(&mut head);
        let start = payload_start - head_len;
        // SAFETY: `start..payload_start` lies inside the buffer (asserted
        // above). A raw write, not `&mut buf[..]`: a received message being
        // echoed may still be borrowed by the app, and the header bytes are
        // the only ones touched.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), buf.as_mut_ptr().add(start), head_len);
        }
        let queue = self.queue();
        queue.chunks.push_back(Chunk::Owned { buf, start });
        queue.queued += head_len + payload_len;
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when the
    /// queue is empty (and its memory released), `Ok(false)` when the
    /// socket would block.
    pub fn flush_to(&mut self, sink: &mut impl Write) -> io::Result<bool> {
        let Some(queue) = self.queue.as_mut() else {
            return Ok(true);
        };
        loop {
            let result = if queue.chunks.len() == 1 {
                sink.write(&queue.chunks[0].bytes()[queue.front_written..])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let mut count = 0;
                for (slot, chunk) in slices.iter_mut().zip(&queue.chunks) {
                    let bytes = chunk.bytes();
                    *slot = IoSlice::new(if count == 0 {
                        &bytes[queue.front_written..]
                    } else {
                        bytes
                    });
                    count += 1;
                }
                sink.write_vectored(&slices[..count])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if queue.consume(n) {
                        // Give the memory back: an idle connection holds no buffers.
                        self.queue = None;
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

fn header(opcode: OpCode, len: usize) -> FrameHeader {
    FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: len as u64,
    }
}

impl Queue {
    fn owned_tail(&mut self, extra: usize) -> &mut Vec<u8> {
        let reuse = matches!(
            self.chunks.back(),
            Some(Chunk::Owned { buf, start: 0 }) if buf.len() + extra <= PACK_LIMIT
        );
        if !reuse {
            let buf = Vec::with_capacity(extra.max(FIRST_CHUNK));
            self.chunks.push_back(Chunk::Owned { buf, start: 0 });
        }
        match self.chunks.back_mut() {
            Some(Chunk::Owned { buf, .. }) => buf,
            _ => unreachable!("an owned chunk was just ensured at the back"),
        }
    }

    /// Drops what was written; returns whether the queue is now empty.
    fn consume(&mut self, mut written: usize) -> bool {
        self.queued -= written;
        while written > 0 {
            let front_left = self.chunks[0].bytes().len() - self.front_written;
            if written < front_left {
                self.front_written += written;
                return false;
            }
            written -= front_left;
            self.front_written = 0;
            self.chunks.pop_front();
        }
        self.chunks.is_empty()
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

    fn chunk_count(out: &Outbound) -> usize {
        out.queue.as_ref().map_or(0, |q| q.chunks.len())
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut out = Outbound::default();
        out.push_bytes(b"HTTP");
        out.push_frame(OpCode::Text, b"hi");
        out.push_shared(&SharedFrame::binary(&[5; 600]));
        out.push_frame(OpCode::Binary, &[9; 3]);
        let mut message = vec![0; MAX_HEADER_LEN];
        message.extend_from_slice(b"echo");
        out.push_message(OpCode::Text, message, MAX_HEADER_LEN);
        out.push_shared(&SharedFrame::text("shared"));
        let expected = [
            &b"HTTP\x81\x02hi"[..],
            SharedFrame::binary(&[5; 600]).bytes(),
            b"\x82\x03\x09\x09\x09",
            b"\x81\x04echo",
            b"\x81\x06shared",
        ]
        .concat();
        assert_eq!(out.len(), expected.len());
        assert_eq!(chunk_count(&out), 5);
        let mut sink = Trickle {
            taken: Vec::new(),
            per_call: 3,
            calls_left: 2,
        };
        assert!(!out.flush_to(&mut sink).unwrap());
        assert_eq!(out.len(), expected.len() - 6);
        sink.calls_left = 1000;
        assert!(out.flush_to(&mut sink).unwrap());
        assert_eq!(sink.taken, expected);
        assert!(out.is_empty());
        assert!(out.queue.is_none(), "a drained queue keeps no memory");
    }

    #[test]
    fn small_frames_share_one_chunk() {
        let mut out = Outbound::default();
        for _ in 0..100 {
            out.push_frame(OpCode::Text, b"0123456789");
            out.push_shared(&SharedFrame::text("broadcast"));
        }
        assert_eq!(chunk_count(&out), 1);
        out.push_frame(OpCode::Binary, &vec![0; PACK_LIMIT]);
        assert_eq!(chunk_count(&out), 2);
    }

    #[test]
    fn an_idle_queue_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Outbound>(), 8);
    }
}
