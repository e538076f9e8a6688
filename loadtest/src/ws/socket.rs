//! An established client WebSocket connection (RFC 6455) over the load tester's [`Stream`]:
//! reads the server's frames and writes masked client frames. Owns the connection's buffers;
//! what the frames mean is `session.rs`'s.
//!
//! Why not tungstenite: after a client handshake it keeps the handshake's 4 KiB buffer as every
//! connection's read buffer for the whole run, zeroes part of it on every read, and splits each
//! frame out of shared `Bytes` (docs/benchmarks.md, "The generator's own cost"). Here reads go
//! into a buffer on the stack of the poll, and a connection keeps bytes only while a frame is
//! partial, a fragmented message is incomplete or a text is being read: an idle connection holds
//! no buffer at all. A frame larger than its first read grows the buffer up to [`MAX_MESSAGE`],
//! which is freed as soon as the frame has been read.
//!
//! Server frames must be unmasked, without reserved bits, with a known opcode; control frames
//! final and at most 125 bytes; a message (reassembled from fragments) at most [`MAX_MESSAGE`]
//! and, for text, UTF-8. Anything else fails the connection: a close frame with 1002, 1007 or
//! 1009 is sent (best effort) and [`Socket::next`] returns the error. Pings are answered with a
//! pong; a close is answered with the same code (1002 for a code a peer may not send), as
//! tungstenite did.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::Stream;

/// Largest message (and frame) accepted from the server, as tungstenite's `max_message_size`
/// was set here: far above the gateway's own limits.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Bytes one read takes from the socket, into a buffer on the stack: several of the load
/// tester's messages.
const READ_CHUNK: usize = 4096;
/// How long a failing connection's close frame may take to go out.
const FAIL_GRACE: Duration = Duration::from_millis(500);

/// What [`Socket::next`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text message, in [`Socket::text`] until the next call.
    Text,
    /// A close frame: its code and reason (none when it had no payload). The reply is sent.
    Close(Option<(u16, String)>),
    /// A binary message, a ping (answered) or a pong.
    Other,
}

/// Why a connection failed.
#[derive(Debug)]
pub enum Error {
    /// The server broke the protocol (1002).
    Protocol(&'static str),
    /// A text message that is not UTF-8 (1007).
    Utf8,
    /// A frame or message over [`MAX_MESSAGE`] (1009).
    TooBig(u64),
    /// The socket failed.
    Io(io::Error),
    /// The socket ended without a close frame.
    Reset,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Protocol(what) => write!(f, "WebSocket protocol error: {what}"),
            Error::Utf8 => f.write_str("WebSocket protocol error: text is not UTF-8"),
            Error::TooBig(n) => write!(f, "message of {n} bytes, over {MAX_MESSAGE}"),
            Error::Io(e) => write!(f, "IO error: {e}"),
            Error::Reset => {
                f.write_str("WebSocket protocol error: Connection reset without closing handshake")
            }
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// The close code that fails the connection for it, if one is to be sent.
    fn close_code(&self) -> Option<u16> {
        match self {
            Error::Protocol(_) => Some(1002),
            Error::Utf8 => Some(1007),
            Error::TooBig(_) => Some(1009),
            Error::Io(_) | Error::Reset => None,
        }
    }
}

/// Where the text handed out by the last [`Socket::next`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Last {
    None,
    /// `buf[start..end]`.
    Buf(usize, usize),
    /// The reassembled `message`.
    Message,
}

/// An established client connection over `S` (the load tester's [`Stream`]; an in-memory pipe in
/// the tests).
pub struct Socket<S = Stream> {
    stream: S,
    /// Received bytes; those before `pos` are consumed. Freed whenever all are consumed.
    buf: Vec<u8>,
    pos: usize,
    /// A fragmented message being reassembled (at most [`MAX_MESSAGE`]), and its opcode.
    message: Vec<u8>,
    fragmented: Option<u8>,
    /// The text handed out last.
    last: Last,
    /// The text of the frame in `ready`.
    pending: Last,
    /// A frame read but not yet handed out (a write it called for is still going out).
    ready: Option<Frame>,
    /// Masked frames to write, from `written` on. Freed when all are written.
    out: Vec<u8>,
    written: usize,
    /// A close frame was sent (no pong after it, no second close).
    close_sent: bool,
    /// A close frame was received: the socket's end is expected.
    close_received: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Socket<S> {
    /// A connection over `stream`, with `read` the bytes the handshake read past its response.
    pub fn new(stream: S, read: Vec<u8>) -> Self {
        Self {
            stream,
            buf: read,
            pos: 0,
            message: Vec::new(),
            fragmented: None,
            last: Last::None,
            pending: Last::None,
            ready: None,
            out: Vec::new(),
            written: 0,
            close_sent: false,
            close_received: false,
        }
    }

    /// The text message the last [`Socket::next`] returned as [`Frame::Text`].
    pub fn text(&self) -> &str {
        let bytes = match self.last {
            Last::None => &[][..],
            Last::Buf(start, end) => &self.buf[start..end],
            Last::Message => &self.message,
        };
        // Checked when the frame was read; never fails.
        std::str::from_utf8(bytes).unwrap_or_default()
    }

    /// Bytes this connection holds in its buffers (for tests of the bounds).
    pub fn held(&self) -> usize {
        self.buf.capacity() + self.message.capacity() + self.out.capacity()
    }

    /// The next message or close from the server; `None` when the socket ended after a close
    /// handshake. Cancel-safe: what was read and not handed out stays for the next call.
    pub async fn next(&mut self) -> Option<Result<Frame, Error>> {
        self.release();
        loop {
            if self.ready.is_none() {
                match self.parse() {
                    Ok(r) => self.ready = r,
                    Err(e) => return Some(Err(self.fail(e).await)),
                }
            }
            if let Err(e) = self.flush().await {
                return Some(Err(Error::Io(e)));
            }
            if let Some(r) = self.ready.take() {
                if r == Frame::Text {
                    self.last = std::mem::replace(&mut self.pending, Last::None);
                }
                return Some(Ok(r));
            }
            match self.fill().await {
                Ok(0) if self.close_received || self.close_sent => return None,
                Ok(0) => return Some(Err(Error::Reset)),
                Ok(_) => {}
                Err(e) => return Some(Err(Error::Io(e))),
            }
        }
    }

    /// Queues a text message as one masked frame.
    pub fn feed(&mut self, text: &str) {
        self.queue(0x1, text.as_bytes());
    }

    /// Sends a text message.
    pub async fn send(&mut self, text: &str) -> io::Result<()> {
        self.feed(text);
        self.flush().await
    }

    /// Sends a close frame with `code` (once), then waits for the server's close and the end of
    /// the socket; the caller bounds the wait.
    pub async fn close(&mut self, code: u16) -> io::Result<()> {
        if !self.close_sent {
            self.close_sent = true;
            self.queue(0x8, &code.to_be_bytes());
        }
        self.flush().await?;
        while let Some(Ok(_)) = self.next().await {}
        Ok(())
    }

    /// Writes what is queued. Cancel-safe: what was written is remembered.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        while self.written < self.out.len() {
            let n = self.stream.write(&self.out[self.written..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        self.stream.flush().await?;
        self.out = Vec::new();
        self.written = 0;
        Ok(())
    }

    /// Fails the connection for `e`: a close frame with its code, sent within [`FAIL_GRACE`].
    async fn fail(&mut self, e: Error) -> Error {
        if let Some(code) = e.close_code().filter(|_| !self.close_sent) {
            self.close_sent = true;
            self.queue(0x8, &code.to_be_bytes());
            let _ = tokio::time::timeout(FAIL_GRACE, self.flush()).await;
        }
        e
    }

    /// Frees what the last text held.
    fn release(&mut self) {
        if std::mem::replace(&mut self.last, Last::None) == Last::Message {
            self.message = Vec::new();
        }
        if self.pos == self.buf.len() && self.ready.is_none() {
            self.buf = Vec::new();
            self.pos = 0;
        }
    }

    /// Reads the next complete frame out of `buf`, if there is one that calls for the caller:
    /// answers pings, reassembles fragments, checks every rule of the module's header.
    fn parse(&mut self) -> Result<Option<Frame>, Error> {
        loop {
            let b = &self.buf[self.pos..];
            if b.len() < 2 {
                return Ok(None);
            }
            let (fin, opcode) = (b[0] & 0x80 != 0, b[0] & 0x0f);
            if b[0] & 0x70 != 0 {
                return Err(Error::Protocol("reserved bits set"));
            }
            if b[1] & 0x80 != 0 {
                return Err(Error::Protocol("masked frame from the server"));
            }
            let (len, head) = match b[1] & 0x7f {
                126 if b.len() < 4 => return Ok(None),
                126 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() < 10 => return Ok(None),
                127 => {
                    let n = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                    if n >> 63 != 0 {
                        return Err(Error::Protocol("frame length with its top bit set"));
                    }
                    (n, 10)
                }
                n => (u64::from(n), 2),
            };
            if opcode & 0x8 != 0 && (!fin || len > 125) {
                return Err(Error::Protocol("fragmented or oversized control frame"));
            }
            if len > MAX_MESSAGE as u64 {
                return Err(Error::TooBig(len));
            }
            let len = len as usize;
            if b.len() < head + len {
                // Room for the whole frame at once, rather than doubling towards it.
                self.buf.reserve(head + len - b.len());
                return Ok(None);
            }
            let (start, end) = (self.pos + head, self.pos + head + len);
            self.pos = end;
            match (opcode, self.fragmented) {
                (0x1 | 0x2, Some(_)) => {
                    return Err(Error::Protocol("a new message inside a fragmented one"))
                }
                (0x1, None) if fin => {
                    std::str::from_utf8(&self.buf[start..end]).map_err(|_| Error::Utf8)?;
                    self.pending = Last::Buf(start, end);
                    return Ok(Some(Frame::Text));
                }
                (0x2, None) if fin => return Ok(Some(Frame::Other)),
                (0x1 | 0x2, None) => {
                    self.fragmented = Some(opcode);
                    self.message = self.buf[start..end].to_vec();
                }
                (0x0, None) => return Err(Error::Protocol("continuation without a message")),
                (0x0, Some(first)) => {
                    let total = self.message.len() + len;
                    if total > MAX_MESSAGE {
                        return Err(Error::TooBig(total as u64));
                    }
                    self.message.extend_from_slice(&self.buf[start..end]);
                    if fin {
                        self.fragmented = None;
                        if first == 0x2 {
                            self.message = Vec::new();
                            return Ok(Some(Frame::Other));
                        }
                        std::str::from_utf8(&self.message).map_err(|_| Error::Utf8)?;
                        self.pending = Last::Message;
                        return Ok(Some(Frame::Text));
                    }
                }
                (0x8, _) => return self.on_close(start, end).map(Some),
                (0x9, _) => {
                    // No pong after our close.
                    if !self.close_sent {
                        let payload = self.buf[start..end].to_vec();
                        self.queue(0xa, &payload);
                    }
                }
                (0xa, _) => {}
                _ => return Err(Error::Protocol("unknown opcode")),
            }
        }
    }

    /// A close frame in `buf[start..end]`: its code and reason, and the reply (the same code, or
    /// 1002 for one a peer may not send; none when we closed first).
    fn on_close(&mut self, start: usize, end: usize) -> Result<Frame, Error> {
        let payload = &self.buf[start..end];
        let close = match payload.len() {
            0 => None,
            1 => return Err(Error::Protocol("close frame of one byte")),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let reason = std::str::from_utf8(&payload[2..]).map_err(|_| Error::Utf8)?;
                Some(if allowed_close_code(code) {
                    (code, reason.to_string())
                } else {
                    (1002, "Protocol violation".to_string())
                })
            }
        };
        self.close_received = true;
        if !self.close_sent {
            self.close_sent = true;
            let reply = close.as_ref().map(|(c, _)| c.to_be_bytes());
            self.queue(0x8, reply.as_ref().map_or(&[][..], |r| &r[..]));
        }
        Ok(Frame::Close(close))
    }

    /// Reads once from the socket into a buffer on the stack, appended to `buf`.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb))?;
        self.buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Appends a masked client frame (RFC 6455 5.3) with `payload` to the queue.
    fn queue(&mut self, opcode: u8, payload: &[u8]) {
        let len = payload.len();
        self.out.reserve(14 + len);
        self.out.push(0x80 | opcode);
        match len {
            0..=125 => self.out.push(0x80 | len as u8),
            126..=0xffff => {
                self.out.push(0x80 | 126);
                self.out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                self.out.push(0x80 | 127);
                self.out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        let mask = fastrand::u32(..).to_ne_bytes();
        self.out.extend_from_slice(&mask);
        self.out
            .extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    }
}

/// A close code a server may send (RFC 6455 7.4; what tungstenite accepted).
fn allowed_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{duplex, AsyncReadExt, DuplexStream};

    /// A server frame (unmasked).
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![first];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Decodes the client's masked frames: (first byte, unmasked payload).
    fn client_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(b[1] & 0x80, 0x80, "client frames are masked");
            let (len, head) = match b[1] & 0x7f {
                126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                n => (n as usize, 2),
            };
            let mask = &b[head..head + 4];
            let payload = b[head + 4..head + 4 + len]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(x, m)| x ^ m)
                .collect();
            out.push((b[0], payload));
            b = &b[head + 4 + len..];
        }
        out
    }

    fn pair() -> (Socket<DuplexStream>, DuplexStream) {
        let (a, b) = duplex(4 << 20);
        (Socket::new(a, Vec::new()), b)
    }

    /// What the socket reads without waiting, as texts, `close:CODE:REASON` and `other`.
    fn drain(s: &mut Socket<DuplexStream>, seen: &mut Vec<String>) -> Option<Error> {
        loop {
            // Unconstrained: a large message takes more reads than one poll's budget.
            match tokio::task::unconstrained(s.next()).now_or_never() {
                None => return None,
                Some(None) => {
                    seen.push("end".into());
                    return None;
                }
                Some(Some(Ok(Frame::Text))) => seen.push(s.text().to_string()),
                Some(Some(Ok(Frame::Close(c)))) => seen.push(format!("close:{c:?}")),
                Some(Some(Ok(Frame::Other))) => seen.push("other".into()),
                Some(Some(Err(e))) => return Some(e),
            }
        }
    }

    async fn written(peer: &mut DuplexStream) -> Vec<u8> {
        let mut out = vec![0; 1 << 16];
        match tokio::task::unconstrained(peer.read(&mut out)).now_or_never() {
            Some(Ok(n)) => out.truncate(n),
            _ => out.clear(),
        }
        out
    }

    #[tokio::test]
    async fn every_split_point_of_a_multi_frame_buffer() {
        let long = "y".repeat(300);
        let mut bytes = frame(0x81, b"hello");
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x01, b"fr"));
        bytes.extend(frame(0x8a, b"pong, between fragments"));
        bytes.extend(frame(0x00, b"ag"));
        bytes.extend(frame(0x80, "ment é".as_bytes()));
        bytes.extend(frame(0x82, b"\x00\x01"));
        bytes.extend(frame(0x81, long.as_bytes()));
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        bytes.extend(frame(0x88, &close));
        // Pings are answered and pongs dropped inside the socket; a binary message is `other`.
        let want = [
            "hello".to_string(),
            "fragment é".into(),
            "other".into(),
            long.clone(),
            "close:Some((1000, \"bye\"))".into(),
        ];
        for cut in 0..=bytes.len() {
            let (mut s, mut peer) = pair();
            let mut seen = Vec::new();
            peer.write_all(&bytes[..cut]).await.unwrap();
            assert!(drain(&mut s, &mut seen).is_none());
            peer.write_all(&bytes[cut..]).await.unwrap();
            assert!(drain(&mut s, &mut seen).is_none());
            assert_eq!(seen, want, "cut at {cut}");
            let replies = client_frames(&written(&mut peer).await);
            assert_eq!(
                replies,
                vec![
                    (0x8a, b"p".to_vec()),
                    (0x88, 1000u16.to_be_bytes().to_vec())
                ],
                "a pong for the ping, the close echoed: cut at {cut}"
            );
            drop(peer);
            let mut end = Vec::new();
            assert!(drain(&mut s, &mut end).is_none());
            assert_eq!(end, ["end"], "the socket's end after the close handshake");
            assert_eq!(s.held(), 0, "no buffer kept at rest: cut at {cut}");
        }
    }

    #[tokio::test]
    async fn a_large_frame_grows_the_buffer_and_frees_it() {
        let (mut s, mut peer) = pair();
        let big = "z".repeat(200_000);
        peer.write_all(&frame(0x81, big.as_bytes())).await.unwrap();
        peer.write_all(&frame(0x81, b"small")).await.unwrap();
        assert!(matches!(s.next().await, Some(Ok(Frame::Text))));
        assert_eq!(s.text().len(), big.len());
        assert!(s.held() >= big.len());
        assert!(matches!(s.next().await, Some(Ok(Frame::Text))));
        assert_eq!(s.text(), "small");
        assert!(s.next().now_or_never().is_none(), "nothing more yet");
        assert_eq!(s.held(), 0, "freed once read");
    }

    #[tokio::test]
    async fn writes_are_masked_text_frames() {
        let (mut s, mut peer) = pair();
        s.send("hi").await.unwrap();
        let long = "q".repeat(70_000);
        s.feed("a");
        s.feed(&long);
        s.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 + 4 + 2 + 2 + 4 + 1 + 10 + 4 + long.len() {
            let mut chunk = vec![0; 1 << 17];
            let n = peer.read(&mut chunk).await.unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(
            client_frames(&got),
            vec![
                (0x81, b"hi".to_vec()),
                (0x81, b"a".to_vec()),
                (0x81, long.into_bytes())
            ]
        );
        assert_eq!(s.held(), 0);
    }

    /// Each broken frame fails the connection with its close code.
    #[tokio::test]
    async fn protocol_errors_close_with_their_code() {
        let mut too_long = vec![0x81, 127];
        too_long.extend_from_slice(&((MAX_MESSAGE as u64) + 1).to_be_bytes());
        let mut fragments = frame(0x01, &vec![b'a'; MAX_MESSAGE - 10]);
        fragments.extend(frame(0x80, &[b'b'; 11]));
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unknown opcode", frame(0x83, b"x"), 1002),
            ("unknown control opcode", frame(0x8b, b""), 1002),
            ("reserved bits", frame(0xc1, b"x"), 1002),
            ("masked", vec![0x81, 0x81, 1, 2, 3, 4, b'x'], 1002),
            ("fragmented ping", frame(0x09, b""), 1002),
            ("long ping", frame(0x89, &[0; 126]), 1002),
            ("lone continuation", frame(0x80, b"x"), 1002),
            (
                "text inside fragments",
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                1002,
            ),
            ("one-byte close", frame(0x88, b"\x03"), 1002),
            ("not UTF-8", frame(0x81, b"\xff\xfe"), 1007),
            (
                "not UTF-8 across fragments",
                [frame(0x01, b"\xc3"), frame(0x80, b"(")].concat(),
                1007,
            ),
            ("oversize frame", too_long, 1009),
            ("oversize message", fragments, 1009),
        ];
        for (what, bytes, code) in cases {
            let (mut s, mut peer) = pair();
            peer.write_all(&bytes).await.unwrap();
            let mut seen = Vec::new();
            let e = drain(&mut s, &mut seen).unwrap_or_else(|| panic!("{what}: no error"));
            assert_eq!(e.close_code(), Some(code), "{what}: {e}");
            assert!(seen.is_empty(), "{what}: {seen:?}");
            let frames = client_frames(&written(&mut peer).await);
            assert_eq!(frames, vec![(0x88, code.to_be_bytes().to_vec())], "{what}");
        }
    }

    #[tokio::test]
    async fn closes_and_ends() {
        // A code a peer may not send reads as 1002 and is answered with 1002.
        let (mut s, mut peer) = pair();
        peer.write_all(&frame(0x88, &1005u16.to_be_bytes()))
            .await
            .unwrap();
        let mut seen = Vec::new();
        drain(&mut s, &mut seen);
        assert_eq!(seen, ["close:Some((1002, \"Protocol violation\"))"]);
        assert_eq!(
            client_frames(&written(&mut peer).await),
            vec![(0x88, 1002u16.to_be_bytes().to_vec())]
        );
        // An empty close is answered with an empty one.
        let (mut s, mut peer) = pair();
        peer.write_all(&frame(0x88, b"")).await.unwrap();
        let mut seen = Vec::new();
        drain(&mut s, &mut seen);
        assert_eq!(seen, ["close:None"]);
        assert_eq!(
            client_frames(&written(&mut peer).await),
            vec![(0x88, vec![])]
        );
        // The socket ending without a close is an error; half a frame too.
        for bytes in [vec![], vec![0x81, 5, b'h']] {
            let (mut s, mut peer) = pair();
            peer.write_all(&bytes).await.unwrap();
            drop(peer);
            assert!(matches!(s.next().await, Some(Err(Error::Reset))));
        }
        // Our close: sent once, then the server's reply and the end.
        let (mut s, mut peer) = pair();
        let server = tokio::spawn(async move {
            let mut got = vec![0; 64];
            let n = peer.read(&mut got).await.unwrap();
            got.truncate(n);
            peer.write_all(&frame(0x88, &1000u16.to_be_bytes()))
                .await
                .unwrap();
            got
        });
        s.close(1000).await.unwrap();
        let got = server.await.unwrap();
        assert_eq!(
            client_frames(&got),
            vec![(0x88, 1000u16.to_be_bytes().to_vec())]
        );
    }
}
