//! The WebSocket client side of the wire contract (`docs/protocol.md`): opening a connection from
//! a chosen source address, naming why an attempt failed, encoding a publish and reading the
//! server's events. No accounting here; `session.rs` owns that.

use std::borrow::Cow;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::WebSocketStream;

use crate::plan::Role;

/// An open client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Why a connection attempt failed: a short label for counting, and the detail for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError {
    /// Label such as `refused`, `timeout`, `http_503_capacity`, `too_many_open_files`.
    pub cause: String,
    /// The HTTP status when the gateway refused the upgrade.
    pub status: Option<u16>,
    /// Human-readable detail.
    pub detail: String,
}

impl ConnectError {
    fn new(cause: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            cause: cause.into(),
            status: None,
            detail: detail.into(),
        }
    }
}

/// Names an I/O failure the way an operator reads it.
pub fn io_cause(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(24) => return "too_many_open_files", // EMFILE: the generator's own limit
        Some(99) => return "addr_not_available",  // EADDRNOTAVAIL: ephemeral ports exhausted
        _ => {}
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused",
        io::ErrorKind::ConnectionReset => "reset",
        io::ErrorKind::ConnectionAborted => "aborted",
        io::ErrorKind::AddrInUse => "addr_in_use",
        io::ErrorKind::AddrNotAvailable => "addr_not_available",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::UnexpectedEof => "eof",
        _ => "io",
    }
}

/// The `error` code in a refusal body (`{"error":"capacity",…}`), if there is one.
fn refusal_code(body: Option<&[u8]>) -> Option<String> {
    #[derive(Deserialize)]
    struct Refusal {
        error: String,
    }
    let r: Refusal = serde_json::from_slice(body?).ok()?;
    r.error
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
        .then_some(r.error)
}

fn handshake_error(e: WsError) -> ConnectError {
    match e {
        WsError::Http(resp) => {
            let status = resp.status().as_u16();
            let cause = match refusal_code(resp.body().as_deref()) {
                Some(code) => format!("http_{status}_{code}"),
                None => format!("http_{status}"),
            };
            ConnectError {
                cause,
                status: Some(status),
                detail: format!("upgrade refused with HTTP {status}"),
            }
        }
        WsError::Io(e) => ConnectError::new(io_cause(&e), e.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            ConnectError::new("eof", "closed during the handshake")
        }
        other => ConnectError::new("handshake", other.to_string()),
    }
}

/// Buffers sized for small frames: tungstenite's 128 KiB default read buffer would cost 2.4 GiB
/// at 19 000 connections.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
}

/// The upgrade path for a member.
pub fn join_url(base: &str, room: &str, role: Role, name: &str) -> String {
    format!("{base}/ws/{room}?role={}&name={name}", role.as_str())
}

/// Opens TCP (from `bind` when given) and upgrades, within `timeout`. Returns the socket and
/// how long it took.
pub async fn connect(
    url: &str,
    addr: SocketAddr,
    bind: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<(Ws, Duration), ConnectError> {
    let started = Instant::now();
    let attempt = async {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| ConnectError::new(io_cause(&e), format!("socket: {e}")))?;
        if let (Some(ip), SocketAddr::V4(_)) = (bind, addr) {
            socket
                .bind(SocketAddr::new(ip.into(), 0))
                .map_err(|e| ConnectError::new(io_cause(&e), format!("bind {ip}: {e}")))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| ConnectError::new(io_cause(&e), format!("connect {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
                .await
                .map_err(handshake_error)?;
        Ok(ws)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(ws)) => Ok((ws, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ConnectError::new(
            "timeout",
            format!("no upgrade within {timeout:?}"),
        )),
    }
}

/// The fields the load tester puts in every message's `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stamp {
    /// Run id: tells this process's messages from anyone else's.
    pub lt: u32,
    /// Publisher id.
    pub p: u32,
    /// Sequence number of the publisher, from 0.
    pub s: u64,
    /// Intended send time, unix microseconds.
    pub t: u64,
}

/// Encodes a publish command carrying `stamp` and `filler` bytes of padding.
pub fn publish_frame(stamp: Stamp, filler: &str) -> String {
    format!(
        r#"{{"type":"publish","data":{{"lt":{},"p":{},"s":{},"t":{},"f":"{}"}}}}"#,
        stamp.lt, stamp.p, stamp.s, stamp.t, filler
    )
}

/// A server event, as much of it as the load tester reads.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// `welcome`.
    Welcome,
    /// A `message` with the gateway's publish stamp; `stamp` is `None` when its data is not ours.
    Message {
        /// The gateway's `ts`.
        ts: u64,
        /// Our fields, when the data has them.
        stamp: Option<Stamp>,
    },
    /// `error` with its code.
    Error(String),
    /// `presence`, `pong`, or anything else.
    Other,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    ts: Option<u64>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// Reads one text frame from the server; `None` when it is not an event at all.
pub fn parse_event(text: &str) -> Option<Event> {
    let e: Incoming<'_> = serde_json::from_str(text).ok()?;
    Some(match e.kind.as_ref() {
        "welcome" => Event::Welcome,
        "message" => Event::Message {
            ts: e.ts.unwrap_or(0),
            stamp: e.data.and_then(|d| serde_json::from_str(d.get()).ok()),
        },
        "error" => Event::Error(e.code.as_deref().unwrap_or("unknown").to_string()),
        _ => Event::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frames_round_trip() {
        let stamp = Stamp {
            lt: 9,
            p: 3,
            s: 41,
            t: 1_795_713_452_926_009,
        };
        let frame = publish_frame(stamp, "xxxx");
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "publish");
        // What the gateway sends back: our data verbatim inside a message event.
        let echoed = format!(
            r#"{{"type":"message","room":"r","from":"h3","role":"host","data":{},"id":"n1-a-1","ts":1795713452927000}}"#,
            v["data"]
        );
        assert_eq!(
            parse_event(&echoed),
            Some(Event::Message {
                ts: 1_795_713_452_927_000,
                stamp: Some(stamp)
            })
        );
    }

    #[test]
    fn events() {
        assert_eq!(
            parse_event(
                r#"{"type":"welcome","node":"n1","room":"r","role":"viewer","connection_id":"n1-1","name":null}"#
            ),
            Some(Event::Welcome)
        );
        assert_eq!(
            parse_event(r#"{"type":"error","code":"rate_limited","message":"slow down"}"#),
            Some(Event::Error("rate_limited".into()))
        );
        assert_eq!(
            parse_event(r#"{"type":"presence","room":"r","hosts":1,"viewers":2}"#),
            Some(Event::Other)
        );
        assert_eq!(
            parse_event(
                r#"{"type":"message","room":"r","from":null,"role":"server","data":"hi","id":"x","ts":5}"#
            ),
            Some(Event::Message { ts: 5, stamp: None }),
            "someone else's message"
        );
        assert_eq!(parse_event("not json"), None);
    }

    #[test]
    fn causes() {
        assert_eq!(
            io_cause(&io::Error::from_raw_os_error(24)),
            "too_many_open_files"
        );
        assert_eq!(
            io_cause(&io::Error::from_raw_os_error(99)),
            "addr_not_available"
        );
        assert_eq!(
            io_cause(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            "refused"
        );
        assert_eq!(
            refusal_code(Some(br#"{"error":"capacity","message":"full"}"#)).as_deref(),
            Some("capacity")
        );
        assert_eq!(refusal_code(Some(b"<html>")), None);
    }
}
