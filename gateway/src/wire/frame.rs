//! The WebSocket frame (RFC 6455 §5) in both directions: client frames decoded straight off the
//! TCP socket, with the limits applied before any payload is buffered, and the unmasked server
//! frames every write path builds ([`frame_head`], [`frame_text`], [`append_frame`]).
//!
//! An idle connection owns no read buffer: the decoder waits for readiness first and allocates
//! only when bytes are there, and gives the buffer back once every byte in it was consumed. With
//! tens of thousands of quiet viewers per node this is the difference between a few hundred
//! bytes and 8 KiB+ per connection. Frames are returned whole (header checked, payload
//! unmasked); reassembly, UTF-8 and commands are the reader's business.
//!
//! `read_frame` is cancel-safe (all state lives in `self`), although the reader never races it.

use bytes::{Buf, Bytes, BytesMut};
use fastwebsockets::{OpCode, Payload};
use tokio::net::TcpStream;

/// How much to read at once when bytes are waiting.
const READ_CHUNK: usize = 4096;

/// Frame opcodes.
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// Text message (UTF-8).
    pub const TEXT: u8 = 0x1;
    /// Binary message.
    pub const BINARY: u8 = 0x2;
    /// Close.
    pub const CLOSE: u8 = 0x8;
    /// Ping.
    pub const PING: u8 = 0x9;
    /// Pong.
    pub const PONG: u8 = 0xA;
}

/// One decoded client frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Last frame of its message.
    pub fin: bool,
    /// See [`opcode`].
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Bytes,
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The peer closed the connection (between frames or mid-frame).
    #[error("connection closed")]
    Eof,
    /// Reading failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// The frame breaks the protocol (reserved bits, unknown opcode, unmasked, bad control frame).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The frame's payload is larger than the limit.
    #[error("frame too large")]
    TooLarge,
}

/// Decodes frames from one connection's socket (anything that lends the `TcpStream`: a read
/// half, or the session's outbox, which owns the socket).
#[derive(Debug)]
pub struct Decoder<S> {
    io: S,
    buf: BytesMut,
    max_payload: usize,
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    /// Payload length.
    len: usize,
    mask: [u8; 4],
    /// Header length, mask included.
    size: usize,
}

/// Parses a header, or `None` if more bytes are needed; limits are checked before the payload.
fn parse_header(b: &[u8], max_payload: usize) -> Result<Option<Header>, DecodeError> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(DecodeError::Protocol("reserved bits set"));
    }
    let op = b[0] & 0x0f;
    if !matches!(op, 0x0..=0x2 | 0x8..=0xA) {
        return Err(DecodeError::Protocol("unknown opcode"));
    }
    if b[1] & 0x80 == 0 {
        return Err(DecodeError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let n = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if n >> 63 != 0 {
                return Err(DecodeError::Protocol("length's top bit set"));
            }
            (n, 10)
        }
        n => (n as u64, 2),
    };
    if op >= 0x8 && (!fin || len > 125) {
        return Err(DecodeError::Protocol(
            "control frames must be whole and at most 125 bytes",
        ));
    }
    if len > max_payload as u64 {
        return Err(DecodeError::TooLarge);
    }
    if b.len() < at + 4 {
        return Ok(None);
    }
    let mask = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    at += 4;
    Ok(Some(Header {
        fin,
        opcode: op,
        len: len as usize,
        mask,
        size: at,
    }))
}

impl<S: AsRef<TcpStream>> Decoder<S> {
    /// A decoder over `io`, starting with bytes already read past the handshake.
    pub fn new(io: S, already_read: &[u8], max_payload: usize) -> Self {
        Self {
            io,
            buf: BytesMut::from(already_read),
            max_payload,
        }
    }

    /// The next frame.
    pub async fn read_frame(&mut self) -> Result<Frame, DecodeError> {
        loop {
            if let Some(h) = parse_header(&self.buf, self.max_payload)? {
                if self.buf.len() >= h.size + h.len {
                    self.buf.advance(h.size);
                    let mut payload = self.buf.split_to(h.len);
                    for (i, b) in payload.iter_mut().enumerate() {
                        *b ^= h.mask[i & 3];
                    }
                    if self.buf.is_empty() {
                        // Give the buffer back: `payload` keeps only its own bytes alive.
                        self.buf = BytesMut::new();
                    }
                    return Ok(Frame {
                        fin: h.fin,
                        opcode: h.opcode,
                        payload: payload.freeze(),
                    });
                }
                self.buf.reserve(h.size + h.len - self.buf.len());
            }
            self.fill().await?;
        }
    }

    /// Waits for bytes and appends what is there, allocating only now.
    async fn fill(&mut self) -> Result<(), DecodeError> {
        loop {
            // Poll-style readiness (not `readable()`): it replaces the waker hyper's finished
            // connection task left in the socket's read slot, which would otherwise keep that
            // task's memory alive for the life of the connection.
            std::future::poll_fn(|cx| self.io.as_ref().poll_read_ready(cx)).await?;
            if self.buf.capacity() - self.buf.len() == 0 {
                self.buf.reserve(READ_CHUNK);
            }
            match self.io.as_ref().try_read_buf(&mut self.buf) {
                Ok(0) => return Err(DecodeError::Eof),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(DecodeError::Eof)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A whole server Ping without payload (FIN, opcode 9, unmasked), for a Ping that rides in a
/// vectored write with a room message (`fanout/outbox/rider.rs`).
pub const PING_FRAME: [u8; 2] = [0x80 | opcode::PING, 0];

/// Formats the header of an unmasked server frame into `head`; returns its length (2–10 bytes).
pub fn frame_head(head: &mut [u8; 16], opcode: OpCode, payload: &[u8]) -> usize {
    fastwebsockets::Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(head)
}

/// A whole unmasked text frame, header and payload in one buffer: a room message is framed once
/// per node and the same bytes go to every member, each in one plain `send`.
pub fn frame_text(payload: &[u8]) -> Bytes {
    let mut head = [0u8; 16];
    let n = frame_head(&mut head, OpCode::Text, payload);
    let mut framed = Vec::with_capacity(n + payload.len());
    framed.extend_from_slice(&head[..n]);
    framed.extend_from_slice(payload);
    Bytes::from(framed)
}

/// Appends one unmasked server frame to `buf` (the writer's batches).
pub fn append_frame(buf: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let mut head = [0u8; 16];
    let n = frame_head(&mut head, opcode, payload);
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_frame_is_what_the_framer_makes() {
        let mut framed = Vec::new();
        append_frame(&mut framed, OpCode::Ping, b"");
        assert_eq!(framed, PING_FRAME);
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = [9, 8, 7, 6];
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    #[test]
    fn headers() {
        let f = masked(0x81, b"hello");
        assert!(parse_header(&f[..1], 100).unwrap().is_none());
        assert!(
            parse_header(&f[..5], 100).unwrap().is_none(),
            "mask incomplete"
        );
        let h = parse_header(&f, 100).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, h.size), (true, 1, 5, 6));
        let big = masked(0x02, &vec![0; 70000]);
        let h = parse_header(&big, 100_000).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.len, h.size), (false, 2, 70000, 14));
        assert!(matches!(
            parse_header(&big, 69_999),
            Err(DecodeError::TooLarge)
        ));
        assert!(
            matches!(
                parse_header(&masked(0xC1, b"x"), 100),
                Err(DecodeError::Protocol(_))
            ),
            "rsv1"
        );
        assert!(
            matches!(
                parse_header(&masked(0x83, b"x"), 100),
                Err(DecodeError::Protocol(_))
            ),
            "opcode 3"
        );
        assert!(
            matches!(
                parse_header(&masked(0x09, b"x"), 100),
                Err(DecodeError::Protocol(_))
            ),
            "fragmented ping"
        );
        assert!(
            matches!(
                parse_header(&masked(0x89, &[0; 126]), 1000),
                Err(DecodeError::Protocol(_))
            ),
            "long ping"
        );
        assert!(
            matches!(
                parse_header(&[0x81, 0x02, b'h', b'i'], 100),
                Err(DecodeError::Protocol(_))
            ),
            "unmasked"
        );
        let huge = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            parse_header(&huge, usize::MAX),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn decodes_frames_split_across_reads_and_frees_its_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (r, _w) = server.into_split();
        let first = masked(0x01, b"frag");
        let mut d = Decoder::new(r, &first[..3], 1 << 20);
        use tokio::io::AsyncWriteExt;
        client.write_all(&first[3..]).await.unwrap();
        let f = d.read_frame().await.unwrap();
        assert_eq!((f.fin, f.opcode, &f.payload[..]), (false, 1, &b"frag"[..]));
        assert_eq!(d.buf.capacity(), 0, "idle decoder holds no buffer");
        let big = masked(0x80, &vec![7u8; 100_000]);
        let writer = tokio::spawn(async move {
            for chunk in big.chunks(1000) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let f = d.read_frame().await.unwrap();
        assert_eq!((f.fin, f.opcode, f.payload.len()), (true, 0, 100_000));
        assert!(f.payload.iter().all(|b| *b == 7));
        drop(writer.await.unwrap());
        assert!(matches!(d.read_frame().await, Err(DecodeError::Eof)));
    }
}
