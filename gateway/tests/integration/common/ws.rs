//! WebSocket clients for tests: [`WsClient`] (tokio-tungstenite, an independent implementation
//! of the protocol) and [`RawWs`], a hand-rolled one that can send frames no well-behaved library
//! would. Neither knows about nodes or Redis.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

/// A WebSocket client (tokio-tungstenite, an independent implementation).
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a client's connection ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// A Close frame with this code.
    Closed(u16),
    /// The connection ended without a Close frame.
    Dropped,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Self { ws }
    }

    /// Tries to connect; returns the HTTP status of a refusal.
    pub async fn connect_status(url: &str) -> Result<Self, u16> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error {e}"),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    pub async fn publish(&mut self, data: Value) {
        self.send_text(&serde_json::json!({"type":"publish","data":data}).to_string())
            .await;
    }

    /// The next JSON text frame within [`WAIT`].
    pub async fn next_json(&mut self) -> Value {
        self.next_json_within(WAIT).await.expect("a frame in time")
    }

    /// The next JSON text frame within `limit`, or `None`.
    pub async fn next_json_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("server sends JSON"))
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next event of `kind`, skipping others (presence, etc.).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        self.next_of_any(&[kind]).await
    }

    /// The next event of any of `kinds` (a command's answer or its `error`), skipping others.
    pub async fn next_of_any(&mut self, kinds: &[&str]) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self
                .next_json_within(left)
                .await
                .unwrap_or_else(|| panic!("no {} event in time", kinds.join(" or ")));
            if kinds.iter().any(|k| v["type"] == *k) {
                return v;
            }
        }
    }

    /// The next `message` event.
    pub async fn next_message(&mut self) -> Value {
        self.next_of("message").await
    }

    /// Asserts no `message` event arrives within `limit`.
    pub async fn expect_no_message(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json_within(left).await {
                None => return,
                Some(v) if v["type"] == "message" => panic!("unexpected message {v}"),
                Some(_) => continue,
            }
        }
    }

    /// Reads until the connection ends; returns how.
    pub async fn ended(&mut self, limit: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {limit:?}"),
                Ok(Some(Ok(WsMessage::Close(frame)))) => {
                    return Ended::Closed(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return Ended::Dropped,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// A hand-rolled WebSocket client that can send frames no well-behaved library would.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Connects and completes the upgrade handshake on `path`.
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        Self::connect_with(addr, path, &[])
            .await
            .unwrap_or_else(|s| panic!("upgrade refused with {s}"))
    }

    /// Connects with extra request headers; `Err(status)` when the upgrade is refused.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, u16> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0));
        }
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        Ok(Self {
            stream,
            buf: buf[end..].to_vec(),
        })
    }

    /// A client frame (masked unless `masked` is false).
    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![(fin as u8) << 7 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n < 65536 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads one server frame: (opcode, payload); `None` when the connection ended.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        self.read_frame_within(WAIT).await
    }

    /// Like [`RawWs::read_frame`], waiting up to `limit` for each read (for timers longer than
    /// [`WAIT`], on paused time).
    pub async fn read_frame_within(&mut self, limit: Duration) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = self.take_frame() {
                return Some(f);
            }
            if !self.read_more(limit).await {
                return None;
            }
        }
    }

    /// The frames that arrived together: waits for the next bytes from the socket (unless whole
    /// frames are already buffered), then returns every whole frame buffered, in order. A frame
    /// cut by the read's end stays buffered for the next call. Empty when the connection ended.
    pub async fn read_together(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while frames.is_empty() {
            while let Some(f) = self.take_frame() {
                frames.push(f);
            }
            if frames.is_empty() && !self.read_more(WAIT).await {
                break;
            }
        }
        frames
    }

    /// One whole frame off the front of the buffer, if there is one.
    fn take_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        if self.buf.len() < 2 {
            return None;
        }
        let op = self.buf[0] & 0x0f;
        let (len, hdr) = match self.buf[1] & 0x7f {
            126 if self.buf.len() >= 4 => {
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 if self.buf.len() >= 10 => (
                u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if self.buf.len() < hdr + len {
            return None;
        }
        let payload = self.buf[hdr..hdr + len].to_vec();
        self.buf.drain(..hdr + len);
        Some((op, payload))
    }

    /// One read from the socket into the buffer, within `limit`; false when the connection ended.
    async fn read_more(&mut self, limit: Duration) -> bool {
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout(limit, self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no frame in time"),
        }
    }

    /// Reads frames until a Close; returns its code (`None` if the connection ended without one).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((op, payload)) = self.read_frame().await {
            if op == 0x8 {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }

    /// The next text frame as JSON.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let (op, payload) = self.read_frame().await.expect("connection open");
            if op == 0x1 {
                return serde_json::from_slice(&payload).unwrap();
            }
        }
    }
}

/// Connects to `room` with `query`; the client after its welcome, or the refusal's status.
pub async fn connect(addr: SocketAddr, room: &str, query: &str) -> Result<(WsClient, Value), u16> {
    let mut c = WsClient::connect_status(&format!("ws://{addr}/ws/{room}?{query}")).await?;
    let w = c.next_of("welcome").await;
    Ok((c, w))
}

pub async fn connect_token(
    addr: SocketAddr,
    room: &str,
    token: &str,
) -> Result<(WsClient, Value), u16> {
    connect(addr, room, &format!("token={token}")).await
}

/// An upgrade request by hand: status, head and body of the answer.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then as many body bytes as Content-Length says (the connection may stay
    // open: a refused upgrade is an ordinary keep-alive answer).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_string(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}
