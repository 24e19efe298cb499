//! A connection's queue of bytes waiting for the socket.
//!
//! An empty queue is one null pointer: an idle connection owns no buffer.
//! Small frames, shared ones included, are packed into owned chunks, so a
//! burst of replies or broadcasts goes out in one plain `write`; large
//! shared frames are queued by reference, and a received message handed
//! over whole (an echo) is queued without a copy. A flush gathers every
//! chunk into one vectored write when there are several.
//!
//! A drained queue goes back to a small per-thread pool with its memory
//! (the chunk list and one buffer), so a connection that queues something
//! every turn (an echo client, a broadcast subscriber) does not allocate
//! and free each time.
//!
//! A frame can also be streamed: its header first, then its payload as it
//! becomes available, written through to the socket when nothing is queued
//! before it. Frames pushed meanwhile (a ping, a close) are held back and
//! follow the streamed frame.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::ws::frame::{FrameHeader, OpCode, SharedFrame, MAX_HEADER_LEN, RSV1};

/// Frames are appended to the last owned chunk while it stays below this,
/// so a burst of small replies costs one allocation, not one per frame.
const PACK_LIMIT: usize = 64 << 10;

/// Shared frames up to this size are copied into the owned chunk: a copy
/// of a few dozen bytes costs less than a reference count taken and
/// dropped, and the kernel then gets one buffer instead of many.
const COPY_SHARED_LIMIT: usize = 512;

/// The first owned chunk's capacity: room for a burst of small replies
/// (16 broadcast frames of 100 bytes) without growing.
const FIRST_CHUNK: usize = 2048;

/// Drained queues kept for reuse, per thread (one event loop)...
const SPARES_MAX: usize = 1024;
/// ...each with one buffer of at most this capacity, and a chunk list of at
/// most `SPARE_CHUNKS` slots: at most ~5 MiB in all.
const SPARE_BUFFER_MAX: usize = 4096;
const SPARE_CHUNKS: usize = 16;

thread_local! {
    // Boxed: a queue moves between a connection and the pool as a pointer.
    #[allow(clippy::vec_box)]
    static SPARES: RefCell<Vec<Box<Queue>>> = const { RefCell::new(Vec::new()) };
}

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

/// Chunks and how many bytes they hold.
#[derive(Debug, Default)]
struct Lane {
    chunks: VecDeque<Chunk>,
    bytes: usize,
}

impl Lane {
    /// The last chunk, if it is an owned one with room for `extra` more
    /// bytes, else a new one (`spare`, if it is large enough).
    fn owned_tail(&mut self, spare: &mut Vec<u8>, extra: usize) -> &mut Vec<u8> {
        self.bytes += extra;
        let reuse = matches!(
            self.chunks.back(),
            Some(Chunk::Owned { buf, start: 0 }) if buf.len() + extra <= PACK_LIMIT
        );
        if !reuse {
            let buf = if spare.capacity() >= extra {
                std::mem::take(spare)
            } else {
                Vec::with_capacity(extra.max(FIRST_CHUNK))
            };
            self.chunks.push_back(Chunk::Owned { buf, start: 0 });
        }
        match self.chunks.back_mut() {
            Some(Chunk::Owned { buf, .. }) => buf,
            _ => unreachable!("an owned chunk was just ensured at the back"),
        }
    }

    fn push(&mut self, chunk: Chunk) {
        self.bytes += chunk.bytes().len();
        self.chunks.push_back(chunk);
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// What goes to the socket next; `bytes` excludes what of the front
    /// chunk is already written.
    out: Lane,
    /// Bytes of the front chunk already written.
    front_written: usize,
    /// `Some` while a streamed frame is open: frames pushed meanwhile.
    held: Option<Lane>,
    /// An emptied packing buffer, kept for the next one.
    spare: Vec<u8>,
}

impl Queue {
    /// Where a new frame goes (behind an open stream, if there is one), and
    /// the spare buffer.
    fn lane(&mut self) -> (&mut Lane, &mut Vec<u8>) {
        let lane = match &mut self.held {
            Some(held) => held,
            None => &mut self.out,
        };
        (lane, &mut self.spare)
    }

    /// An empty queue, from the pool if it has one.
    fn take() -> Box<Queue> {
        SPARES
            .with(|spares| spares.borrow_mut().pop())
            .unwrap_or_default()
    }

    /// Gives a drained queue back to the pool, keeping its memory if that
    /// is small.
    fn recycle(mut self: Box<Queue>) {
        debug_assert!(self.out.chunks.is_empty() && self.held.is_none());
        self.out.bytes = 0;
        self.front_written = 0;
        if self.out.chunks.capacity() > SPARE_CHUNKS {
            self.out.chunks = VecDeque::new();
        }
        if self.spare.capacity() > SPARE_BUFFER_MAX {
            self.spare = Vec::new();
        }
        SPARES.with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < SPARES_MAX {
                spares.push(self);
            }
        });
    }

    /// The open stream is complete: the frames held back follow it.
    fn release_held(&mut self) {
        let held = self.held.take().expect("a stream is open");
        self.out.bytes += held.bytes;
        self.out.chunks.extend(held.chunks);
    }

    /// Drops what was written; returns whether `out` is now empty.
    fn consume(&mut self, mut written: usize) -> bool {
        self.out.bytes -= written;
        while written > 0 {
            let front_left = self.out.chunks[0].bytes().len() - self.front_written;
            if written < front_left {
                self.front_written += written;
                return false;
            }
            written -= front_left;
            self.front_written = 0;
            if let Some(Chunk::Owned { mut buf, start: 0 }) = self.out.chunks.pop_front() {
                if self.spare.capacity() == 0 && buf.capacity() <= SPARE_BUFFER_MAX {
                    buf.clear();
                    self.spare = buf;
                }
            }
        }
        self.out.chunks.is_empty()
    }

    /// Writes `out`, then `extra`, in as few calls as the socket allows;
    /// returns how much of `extra` was written, and the error that stopped
    /// writing, if any (not `WouldBlock`).
    fn write_out(&mut self, sink: &mut impl Write, extra: &[u8]) -> (usize, Option<io::Error>) {
        let mut extra_done = 0;
        loop {
            let pending = &extra[extra_done..];
            if self.out.chunks.is_empty() && pending.is_empty() {
                return (extra_done, None);
            }
            let result = match (self.out.chunks.len(), pending.is_empty()) {
                (0, _) => sink.write(pending),
                (1, true) => sink.write(&self.out.chunks[0].bytes()[self.front_written..]),
                _ => {
                    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                    let mut count = 0;
                    for chunk in self.out.chunks.iter().take(MAX_IOVECS - 1) {
                        let bytes = chunk.bytes();
                        slices[count] = IoSlice::new(if count == 0 {
                            &bytes[self.front_written..]
                        } else {
                            bytes
                        });
                        count += 1;
                    }
                    if !pending.is_empty() && count == self.out.chunks.len() {
                        slices[count] = IoSlice::new(pending);
                        count += 1;
                    }
                    sink.write_vectored(&slices[..count])
                }
            };
            match result {
                Ok(0) => return (extra_done, Some(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    let from_out = n.min(self.out.bytes);
                    self.consume(from_out);
                    extra_done += n - from_out;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (extra_done, None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (extra_done, Some(e)),
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Outbound {
    /// `None` whenever nothing is queued and no stream is open.
    queue: Option<Box<Queue>>,
}

impl Outbound {
    /// Bytes waiting to be written (held ones included).
    pub fn len(&self) -> usize {
        self.queue
            .as_ref()
            .map_or(0, |q| q.out.bytes + q.held.as_ref().map_or(0, |h| h.bytes))
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
    }

    /// A streamed frame is open.
    pub fn is_streaming(&self) -> bool {
        self.queue.as_ref().is_some_and(|q| q.held.is_some())
    }

    fn queue(&mut self) -> &mut Queue {
        self.queue.get_or_insert_with(Queue::take)
    }

    /// Gives the queue back once nothing is left in it.
    fn release_if_idle(&mut self) {
        if self
            .queue
            .as_ref()
            .is_some_and(|q| q.out.chunks.is_empty() && q.held.is_none())
        {
            if let Some(queue) = self.queue.take() {
                queue.recycle();
            }
        }
    }

    /// Appends raw bytes (an HTTP response).
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let (lane, spare) = self.queue().lane();
        lane.owned_tail(spare, bytes.len()).extend_from_slice(bytes);
    }

    /// Encodes and appends one unmasked frame.
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header(opcode, payload.len() as u64).encode(&mut head);
        let (lane, spare) = self.queue().lane();
        let tail = lane.owned_tail(spare, head_len + payload.len());
        tail.extend_from_slice(&head[..head_len]);
        tail.extend_from_slice(payload);
    }

    /// Queues an already-encoded frame shared with other recipients.
    pub fn push_shared(&mut self, frame: &SharedFrame) {
        let bytes = frame.bytes();
        let (lane, spare) = self.queue().lane();
        if bytes.len() <= COPY_SHARED_LIMIT {
            lane.owned_tail(spare, bytes.len()).extend_from_slice(bytes);
        } else {
            lane.push(Chunk::Shared(frame.clone()));
        }
    }

    /// Queues `buf[payload_start..]` as one frame without copying it: the
    /// header is written into the `MAX_HEADER_LEN` bytes reserved in front
    /// of the payload.
    pub fn push_message(&mut self, opcode: OpCode, buf: Vec<u8>, payload_start: usize) {
        self.push_buffer(opcode, 0, buf, payload_start);
    }

    /// Like [`Outbound::push_message`], for a payload compressed under
    /// permessage-deflate: the header has RSV1 set.
    pub fn push_deflated(&mut self, opcode: OpCode, buf: Vec<u8>, payload_start: usize) {
        self.push_buffer(opcode, RSV1, buf, payload_start);
    }

    fn push_buffer(&mut self, opcode: OpCode, rsv: u8, buf: Vec<u8>, payload_start: usize) {
        let head = FrameHeader {
            rsv,
            ..header(opcode, 0)
        };
        let chunk = framed(head, buf, payload_start);
        self.queue().lane().0.push(chunk);
    }

    /// Opens a streamed frame of `len` payload bytes: queues its header;
    /// the payload follows through [`Outbound::stream`]. Frames pushed until
    /// the payload is complete are held back and follow it.
    pub fn begin_stream(&mut self, opcode: OpCode, len: u64) {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header(opcode, len).encode(&mut head);
        let queue = self.queue();
        assert!(queue.held.is_none(), "one stream at a time");
        queue
            .out
            .owned_tail(&mut queue.spare, head_len)
            .extend_from_slice(&head[..head_len]);
        queue.held = Some(Lane::default());
    }

    /// The next `bytes` of the open stream's payload (`last` completes it):
    /// written to `sink` right away behind what is queued, and only what the
    /// socket does not take is copied into the queue. Returns how many bytes
    /// went to the socket (queued ones included).
    pub fn stream(&mut self, sink: &mut impl Write, bytes: &[u8], last: bool) -> io::Result<usize> {
        let queue = self.queue();
        assert!(queue.held.is_some(), "stream() needs begin_stream()");
        let before = queue.out.bytes;
        let (done, error) = queue.write_out(sink, bytes);
        let written = before - queue.out.bytes + done;
        if done < bytes.len() {
            queue
                .out
                .owned_tail(&mut queue.spare, bytes.len() - done)
                .extend_from_slice(&bytes[done..]);
        }
        if last {
            queue.release_held();
        }
        self.release_if_idle();
        match error {
            Some(e) => Err(e),
            None => Ok(written),
        }
    }

    /// Opens a message sent as fragments while its data arrives (see
    /// [`Outbound::push_fragment`]). As for a streamed frame, frames pushed
    /// until its last fragment are held back and follow it.
    pub fn begin_fragments(&mut self) {
        let queue = self.queue();
        assert!(queue.held.is_none(), "one stream at a time");
        queue.held = Some(Lane::default());
    }

    /// Queues the next fragment of the message opened by
    /// [`Outbound::begin_fragments`] (`buf[payload_start..]`, as in
    /// [`Outbound::push_message`]), ahead of the frames held back; `fin`
    /// ends the message and releases them.
    pub fn push_fragment(&mut self, head: FrameHeader, buf: Vec<u8>, payload_start: usize) {
        let queue = self.queue();
        assert!(
            queue.held.is_some(),
            "push_fragment() needs begin_fragments()"
        );
        queue.out.push(framed(head, buf, payload_start));
        if head.fin {
            queue.release_held();
        }
    }

    /// Gives up the message opened by [`Outbound::begin_fragments`]: the
    /// frames held back follow the fragments sent so far (control frames
    /// may come between fragments, RFC 6455 §5.4; a close ends it all).
    pub fn abandon_fragments(&mut self) {
        if let Some(queue) = self.queue.as_mut().filter(|q| q.held.is_some()) {
            queue.release_held();
        }
    }

    /// Writes as much as the socket takes. Returns `Ok(true)` when nothing
    /// is left to write (the queue's memory is released too, unless a
    /// stream is open), `Ok(false)` when the socket would block.
    pub fn flush_to(&mut self, sink: &mut impl Write) -> io::Result<bool> {
        let Some(queue) = self.queue.as_mut() else {
            return Ok(true);
        };
        let (_, error) = queue.write_out(sink, &[]);
        let done = queue.out.chunks.is_empty();
        self.release_if_idle();
        match error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }
}

/// `buf[payload_start..]` as one frame with `head` (its length set from
/// the payload): the header is written into the `MAX_HEADER_LEN` bytes
/// reserved in front of the payload.
fn framed(head: FrameHeader, mut buf: Vec<u8>, payload_start: usize) -> Chunk {
    assert!(payload_start >= MAX_HEADER_LEN && payload_start <= buf.len());
    let mut encoded = [0u8; MAX_HEADER_LEN];
    let head_len = FrameHeader {
        payload_len: (buf.len() - payload_start) as u64,
        ..head
    }
    .encode(&mut encoded);
    let start = payload_start - head_len;
    // SAFETY: `start..payload_start` lies inside the buffer (asserted
    // above). A raw write, not `&mut buf[..]`: a received message being
    // echoed may still be borrowed by the app, and the header bytes are
    // the only ones touched.
    unsafe {
        std::ptr::copy_nonoverlapping(encoded.as_ptr(), buf.as_mut_ptr().add(start), head_len);
    }
    Chunk::Owned { buf, start }
}

fn header(opcode: OpCode, len: u64) -> FrameHeader {
    FrameHeader {
        fin: true,
        rsv: 0,
        opcode,
        mask: None,
        payload_len: len,
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
        /// Like a socket: one call takes from every slice, up to `per_call`.
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.per_call - n);
                self.taken.extend_from_slice(&buf[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn chunk_count(out: &Outbound) -> usize {
        out.queue.as_ref().map_or(0, |q| q.out.chunks.len())
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
        let mut deflated = vec![0; MAX_HEADER_LEN];
        deflated.extend_from_slice(b"zz");
        out.push_deflated(OpCode::Binary, deflated, MAX_HEADER_LEN);
        let expected = [
            &b"HTTP\x81\x02hi"[..],
            SharedFrame::binary(&[5; 600]).bytes(),
            b"\x82\x03\x09\x09\x09",
            b"\x81\x04echo",
            b"\x81\x06shared",
            b"\xC2\x02zz",
        ]
        .concat();
        assert_eq!(out.len(), expected.len());
        assert_eq!(chunk_count(&out), 6);
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
    fn a_streamed_frame_goes_out_whole_with_held_frames_after_it() {
        let mut out = Outbound::default();
        out.push_frame(OpCode::Text, b"before");
        out.begin_stream(OpCode::Binary, 300);
        assert!(out.is_streaming());
        out.push_frame(OpCode::Ping, b"");
        out.push_shared(&SharedFrame::text("later"));
        let mut sink = Trickle {
            taken: Vec::new(),
            per_call: 7,
            calls_left: 3,
        };
        // Blocks part-way: the rest is copied into the queue, in order.
        assert_eq!(out.stream(&mut sink, &[1; 100], false).unwrap(), 21);
        sink.calls_left = 1000;
        sink.per_call = 1000;
        out.stream(&mut sink, &[2; 150], false).unwrap();
        assert!(out.flush_to(&mut sink).unwrap(), "nothing left to write");
        assert!(
            out.is_streaming() && !out.is_empty(),
            "the stream is still open"
        );
        out.stream(&mut sink, &[3; 50], true).unwrap();
        assert!(!out.is_streaming());
        assert!(out.flush_to(&mut sink).unwrap());
        assert!(out.queue.is_none());
        let mut payload = vec![1; 100];
        payload.extend([2; 150]);
        payload.extend([3; 50]);
        let expected = [
            &b"\x81\x06before"[..],
            &[0x82, 126, 1, 44],
            &payload,
            b"\x89\x00",
            b"\x81\x05later",
        ]
        .concat();
        assert_eq!(sink.taken, expected);
    }

    #[test]
    fn a_stream_writes_through_without_queueing() {
        let mut out = Outbound::default();
        out.begin_stream(OpCode::Binary, 6);
        let mut sink = Trickle {
            taken: Vec::new(),
            per_call: 1000,
            calls_left: 1000,
        };
        // The header and the first piece leave in one call.
        assert_eq!(out.stream(&mut sink, b"abc", false).unwrap(), 5);
        assert_eq!(sink.calls_left, 999);
        assert_eq!(out.len(), 0);
        assert_eq!(out.stream(&mut sink, b"def", true).unwrap(), 3);
        assert!(out.queue.is_none());
        assert_eq!(sink.taken, b"\x82\x06abcdef");
    }

    #[test]
    fn fragments_go_out_in_order_with_held_frames_after_the_last() {
        let mut out = Outbound::default();
        out.begin_fragments();
        out.push_frame(OpCode::Ping, b"");
        let fragment = |payload: &[u8]| {
            let mut buf = vec![0; MAX_HEADER_LEN];
            buf.extend_from_slice(payload);
            buf
        };
        let first = FrameHeader {
            fin: false,
            rsv: RSV1,
            ..header(OpCode::Binary, 0)
        };
        out.push_fragment(first, fragment(b"ab"), MAX_HEADER_LEN);
        assert!(out.is_streaming());
        let middle = FrameHeader {
            fin: false,
            ..header(OpCode::Continuation, 0)
        };
        out.push_fragment(middle, fragment(b"cd"), MAX_HEADER_LEN);
        out.push_fragment(
            header(OpCode::Continuation, 0),
            fragment(b""),
            MAX_HEADER_LEN,
        );
        assert!(!out.is_streaming());
        let mut sink = Trickle {
            taken: Vec::new(),
            per_call: 1000,
            calls_left: 1000,
        };
        assert!(out.flush_to(&mut sink).unwrap());
        assert!(out.queue.is_none());
        assert_eq!(sink.taken, b"\x42\x02ab\x00\x02cd\x80\x00\x89\x00");
    }

    #[test]
    fn an_idle_queue_is_one_pointer() {
        assert_eq!(std::mem::size_of::<Outbound>(), 8);
    }
}
