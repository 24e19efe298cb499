//! The client side of RFC 6455, just what a load generator needs: masked
//! frames built once, and an incremental parser of server frames that keeps
//! no buffers beyond a fixed prefix of each message.

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The mask key of every frame we send. Any non-zero key does: the server
/// unmasks every byte either way.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// How many leading bytes of each message the parser keeps (enough for
/// fanout's envelope up to the start of `data`, plus the timestamps).
pub const CAPTURE: usize = 192;

/// With compression the capture holds compressed bytes, whose block
/// header alone can take a hundred: room for more of them.
pub const CAPTURE_DEFLATED: usize = 512;

/// Appends a FIN frame header with the MASK bit and our key.
pub fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
}

/// Masks (or unmasks) `data` that starts at payload offset 0.
pub fn mask(data: &mut [u8]) {
    let key = u32::from_ne_bytes(MASK) as u64;
    let key = key | (key << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap()) ^ key;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let done = data.len() - data.len() % 8;
    for (i, b) in data[done..].iter_mut().enumerate() {
        *b ^= MASK[(done + i) & 3];
    }
}

/// Appends a complete masked frame.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_header(out, opcode, payload.len());
    let start = out.len();
    out.extend_from_slice(payload);
    mask(&mut out[start..]);
}

/// Appends a complete frame as a server would send it (no mask): a raw
/// TCP echo sends it back byte for byte, and it parses as a server frame.
pub fn push_unmasked_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xffff {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a complete masked frame carrying a compressed message (RSV1).
pub fn push_deflated_frame(out: &mut Vec<u8>, opcode: u8, compressed: &[u8]) {
    let start = out.len();
    push_frame(out, opcode, compressed);
    out[start] |= 0x40;
}

/// What the server sent, one complete unit at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A whole data message (all fragments); its first bytes are in
    /// `Rx::captured()` when capturing is on (inflated, if `compressed`).
    /// `len` counts payload bytes on the wire.
    Message { opcode: u8, len: u64, compressed: bool },
    /// A ping; its payload is in `Rx::control()`.
    Ping,
    Pong,
    /// The server's close frame, with its code (1005 when none).
    Close { code: u16 },
    /// The server broke the protocol; nothing more is parsed.
    Error(&'static str),
}

/// Incremental parser of unmasked server frames.
pub struct Rx {
    hdr: [u8; 14],
    hdr_len: u8,
    in_frame: bool,
    remaining: u64,
    opcode: u8,
    fin: bool,
    msg_opcode: u8,
    msg_len: u64,
    in_message: bool,
    /// permessage-deflate was negotiated: RSV1 marks compressed messages,
    /// each one standalone when `inflate_capture` (their captured start is
    /// inflated).
    pub deflate: bool,
    pub inflate_capture: bool,
    compressed: bool,
    pub capture_limit: u16,
    cap_len: u16,
    ctrl_len: u8,
    failed: bool,
    cap: [u8; CAPTURE_DEFLATED],
    ctrl: [u8; 125],
}

impl Default for Rx {
    fn default() -> Self {
        Rx {
            hdr: [0; 14],
            hdr_len: 0,
            in_frame: false,
            remaining: 0,
            opcode: 0,
            fin: false,
            msg_opcode: 0,
            msg_len: 0,
            in_message: false,
            deflate: false,
            inflate_capture: false,
            compressed: false,
            capture_limit: CAPTURE as u16,
            cap_len: 0,
            ctrl_len: 0,
            failed: false,
            cap: [0; CAPTURE_DEFLATED],
            ctrl: [0; 125],
        }
    }
}

/// Total header length given its first two bytes.
fn needed(b1: u8) -> usize {
    let len = match b1 & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    len + if b1 & 0x80 != 0 { 4 } else { 0 }
}

impl Rx {
    pub fn captured(&self) -> &[u8] {
        &self.cap[..self.cap_len as usize]
    }

    pub fn control(&self) -> &[u8] {
        &self.ctrl[..self.ctrl_len as usize]
    }

    fn start_frame(&mut self, h: &[u8]) -> Result<(), &'static str> {
        let (b0, b1) = (h[0], h[1]);
        if b1 & 0x80 != 0 {
            return Err("masked frame from the server");
        }
        let rsv1 = b0 & 0x40 != 0;
        if b0 & 0x30 != 0 || (rsv1 && !self.deflate) {
            return Err("RSV bits set by the server");
        }
        if rsv1 && b0 & 0x0f != OP_TEXT && b0 & 0x0f != OP_BINARY {
            return Err("RSV1 on a frame that does not start a message");
        }
        let len = match b1 & 0x7f {
            126 => u16::from_be_bytes([h[2], h[3]]) as u64,
            127 => u64::from_be_bytes(h[2..10].try_into().unwrap()),
            n => n as u64,
        };
        let opcode = b0 & 0x0f;
        self.fin = b0 & 0x80 != 0;
        self.opcode = opcode;
        self.remaining = len;
        self.in_frame = true;
        match opcode {
            OP_TEXT | OP_BINARY => {
                if self.in_message {
                    return Err("new message inside a fragmented one");
                }
                self.in_message = true;
                self.compressed = rsv1;
                self.msg_opcode = opcode;
                self.msg_len = 0;
                self.cap_len = 0;
            }
            OP_CONT => {
                if !self.in_message {
                    return Err("continuation without a message");
                }
            }
            OP_CLOSE | OP_PING | OP_PONG => {
                if len > 125 || !self.fin {
                    return Err("bad control frame");
                }
                self.ctrl_len = 0;
            }
            _ => return Err("reserved opcode"),
        }
        Ok(())
    }

    /// Parses from `data[*pos..]`, advancing `pos`; returns the next
    /// complete event, or None when `data` is used up.
    #[inline]
    pub fn next(&mut self, data: &[u8], pos: &mut usize) -> Option<Event> {
        if self.failed {
            *pos = data.len();
            return None;
        }
        loop {
            if !self.in_frame {
                let rest = &data[*pos..];
                if rest.is_empty() {
                    return None;
                }
                let result = if self.hdr_len == 0 && rest.len() >= 2 && rest.len() >= needed(rest[1]) {
                    // The whole header is here: parse it in place.
                    let n = needed(rest[1]);
                    *pos += n;
                    self.start_frame(&rest[..n])
                } else {
                    // Gather a header split across reads.
                    let have = self.hdr_len as usize;
                    let want = if have < 2 { 2 } else { needed(self.hdr[1]) };
                    let take = (want - have).min(rest.len());
                    self.hdr[have..have + take].copy_from_slice(&rest[..take]);
                    self.hdr_len += take as u8;
                    *pos += take;
                    let have = self.hdr_len as usize;
                    if have < 2 || have < needed(self.hdr[1]) {
                        continue;
                    }
                    self.hdr_len = 0;
                    let hdr = self.hdr;
                    self.start_frame(&hdr)
                };
                if let Err(e) = result {
                    self.failed = true;
                    *pos = data.len();
                    return Some(Event::Error(e));
                }
            }
            let avail = (data.len() - *pos) as u64;
            let take = self.remaining.min(avail) as usize;
            if take > 0 {
                let bytes = &data[*pos..*pos + take];
                if self.opcode >= OP_CLOSE {
                    let at = self.ctrl_len as usize;
                    self.ctrl[at..at + take].copy_from_slice(bytes);
                    self.ctrl_len += take as u8;
                } else {
                    let at = self.cap_len as usize;
                    let room = (self.capture_limit as usize).saturating_sub(at).min(take);
                    if room > 0 {
                        self.cap[at..at + room].copy_from_slice(&bytes[..room]);
                        self.cap_len += room as u16;
                    }
                    self.msg_len += take as u64;
                }
                *pos += take;
                self.remaining -= take as u64;
            }
            if self.remaining > 0 {
                return None;
            }
            self.in_frame = false;
            match self.opcode {
                OP_PING => return Some(Event::Ping),
                OP_PONG => return Some(Event::Pong),
                OP_CLOSE => {
                    let c = self.control();
                    let code = if c.len() >= 2 { u16::from_be_bytes([c[0], c[1]]) } else { 1005 };
                    self.failed = true;
                    return Some(Event::Close { code });
                }
                _ if self.fin => {
                    self.in_message = false;
                    if self.compressed && self.inflate_capture && self.cap_len > 0 {
                        crate::deflate::inflate_prefix(&mut self.cap[..self.capture_limit as usize], &mut self.cap_len);
                    }
                    return Some(Event::Message {
                        opcode: self.msg_opcode,
                        len: self.msg_len,
                        compressed: self.compressed,
                    });
                }
                _ => {}
            }
        }
    }
}

/// The upgrade request for `path` on `host`, offering `extensions` if any.
pub fn upgrade_request(host: &str, path: &str, extensions: Option<&str>) -> Vec<u8> {
    let offer = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n")).unwrap_or_default();
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    )
    .into_bytes()
}

/// The `Sec-WebSocket-Extensions` value of a response head, if any.
pub fn response_extensions(head: &[u8]) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("sec-websocket-extensions").then(|| value.trim().to_string())
    })
}

/// The accept value for the fixed key above (RFC 6455's own example).
pub const EXPECTED_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Checks a complete response head: 101 and the right accept value.
pub fn check_response(head: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(head);
    let status = text.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        return Err(format!("upgrade refused: {status}"));
    }
    let accept_ok = text.lines().any(|line| {
        let mut parts = line.splitn(2, ':');
        let name = parts.next().unwrap_or("").trim();
        let value = parts.next().unwrap_or("").trim();
        name.eq_ignore_ascii_case("sec-websocket-accept") && value == EXPECTED_ACCEPT
    });
    if !accept_ok {
        return Err("missing or wrong Sec-WebSocket-Accept".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push_unmasked_frame(&mut v, opcode, payload);
        if !fin {
            v[0] &= 0x7f;
        }
        v
    }

    fn events(stream: &[u8], split: usize) -> Vec<(Event, Vec<u8>)> {
        let mut rx = Rx::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(split.max(1)) {
            let mut pos = 0;
            while let Some(ev) = rx.next(chunk, &mut pos) {
                let extra = match ev {
                    Event::Message { .. } => rx.captured().to_vec(),
                    _ => rx.control().to_vec(),
                };
                out.push((ev, extra));
            }
            assert_eq!(pos, chunk.len());
        }
        out
    }

    #[test]
    fn parses_at_every_split() {
        let big = vec![b'x'; 70_000];
        let mut stream = server_frame(OP_TEXT, true, b"hello");
        stream.extend(server_frame(OP_PING, true, b"pp"));
        stream.extend(server_frame(OP_BINARY, false, &big[..300]));
        stream.extend(server_frame(OP_PONG, true, b""));
        stream.extend(server_frame(OP_CONT, true, &big));
        stream.extend(server_frame(OP_CLOSE, true, &[0x03, 0xe8]));
        let whole = events(&stream, stream.len());
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[0], (Event::Message { opcode: OP_TEXT, len: 5, compressed: false }, b"hello".to_vec()));
        assert_eq!(whole[1], (Event::Ping, b"pp".to_vec()));
        assert_eq!(whole[2].0, Event::Pong);
        assert_eq!(whole[3].0, Event::Message { opcode: OP_BINARY, len: 70_300, compressed: false });
        assert_eq!(whole[3].1.len(), CAPTURE);
        assert_eq!(whole[4].0, Event::Close { code: 1000 });
        for split in [1, 2, 3, 7, 13, 125, 4096] {
            assert_eq!(events(&stream, split), whole, "split {split}");
        }
    }

    #[test]
    fn compressed_messages_only_once_negotiated() {
        let text = b"hello hello hello hello".repeat(10);
        let wire = crate::deflate::compress(&text);
        let mut frame = server_frame(OP_TEXT, true, &wire);
        frame[0] |= 0x40;
        assert_eq!(events(&frame, frame.len())[0].0, Event::Error("RSV bits set by the server"));
        let mut rx = Rx { deflate: true, inflate_capture: true, ..Rx::default() };
        let mut pos = 0;
        let ev = rx.next(&frame, &mut pos).unwrap();
        assert_eq!(ev, Event::Message { opcode: OP_TEXT, len: wire.len() as u64, compressed: true });
        assert_eq!(rx.captured(), &text[..CAPTURE]);
        let mut ping = server_frame(OP_PING, true, b"");
        ping[0] |= 0x40;
        let mut pos = 0;
        assert!(matches!(rx.next(&ping, &mut pos), Some(Event::Error(_))));
    }

    #[test]
    fn mask_roundtrip() {
        let orig: Vec<u8> = (0..37u8).collect();
        let mut v = orig.clone();
        mask(&mut v);
        for (i, b) in v.iter().enumerate() {
            assert_eq!(*b, orig[i] ^ MASK[i & 3]);
        }
        mask(&mut v);
        assert_eq!(v, orig);
    }
}
