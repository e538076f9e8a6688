//! The WebSocket client side of the wire contract (`docs/protocol.md`): opening a connection
//! (from a chosen source address, over TLS for `wss://`, with a token; the upgrade itself in
//! `ws/handshake.rs`), naming why an attempt failed, encoding a publish and reading the server's
//! events. The frames of an open connection are `ws/socket.rs`'s. No accounting here;
//! `session.rs` owns that.

use std::borrow::Cow;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;

use crate::lists::{key_hash, Diff, Page};
use crate::spec::Role;

mod handshake;
mod scan;
mod socket;

pub use socket::{Frame, Socket, MAX_MESSAGE};

/// A connection's byte stream: plain TCP, or TLS over it. The TLS state is boxed: inline (as
/// tokio-tungstenite's `MaybeTlsStream` holds it) every plain connection's task would carry a
/// rustls connection's size for the whole run.
pub type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// An open client connection.
pub type Ws = Socket;

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

/// Names an I/O failure of an attempt; rustls reports a refused certificate through
/// tokio-rustls as an I/O error.
fn io_error(e: io::Error) -> ConnectError {
    if e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
    {
        ConnectError::new("tls", e.to_string())
    } else {
        ConnectError::new(io_cause(&e), e.to_string())
    }
}

/// The upgrade URL for a member: role and name, then `since=EPOCH:OFFSET` when resuming and
/// `token=` when the token goes in the query (room names and epochs are URL-safe by the
/// protocol's rules; a JWT is base64url with dots).
pub fn join_url(
    base: &str,
    room: &str,
    role: Role,
    name: &str,
    since: Option<(&str, u64)>,
    token: Option<&str>,
) -> String {
    let mut url = format!("{base}/ws/{room}?role={}&name={name}", role.as_str());
    if let Some((epoch, offset)) = since {
        url.push_str(&format!("&since={epoch}:{offset}"));
    }
    if let Some(t) = token {
        url.push_str(&format!("&token={t}"));
    }
    url
}

/// How to open connections: TLS configuration for `wss://`.
#[derive(Clone)]
pub struct Dialer {
    /// The rustls client configuration (`tls.rs`).
    pub tls: Arc<rustls::ClientConfig>,
}

/// Opens TCP to `addr` (from `bind` when given), TLS for `wss://` URLs, and upgrades, within
/// `timeout`; `bearer` goes in an `Authorization` header. Returns the socket and how long it took.
pub async fn connect(
    dialer: &Dialer,
    url: &str,
    addr: SocketAddr,
    bind: Option<Ipv4Addr>,
    bearer: Option<&str>,
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
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| ConnectError::new("bad_url", format!("{url}: {e}")))?;
        let mut stream = if url.starts_with("wss://") {
            Either::Right(Box::new(tls_handshake(dialer, &uri, stream).await?))
        } else {
            Either::Left(stream)
        };
        let read = handshake::upgrade(&mut stream, &uri, bearer).await?;
        Ok(Socket::new(stream, read))
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

/// The TLS handshake for `wss://`, with the name in the request's URL.
async fn tls_handshake(
    dialer: &Dialer,
    uri: &hyper::Uri,
    stream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let host = uri.host().unwrap_or_default();
    // rustls takes IPv6 addresses without their brackets.
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let name = rustls_pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| ConnectError::new("tls", format!("invalid DNS name: {host}")))?;
    tokio_rustls::TlsConnector::from(dialer.tls.clone())
        .connect(name, stream)
        .await
        .map_err(io_error)
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

/// The `data` of a message carrying `stamp` and `filler` bytes of padding.
pub fn stamp_data(stamp: Stamp, filler: &str) -> String {
    format!(
        r#"{{"lt":{},"p":{},"s":{},"t":{},"f":"{}"}}"#,
        stamp.lt, stamp.p, stamp.s, stamp.t, filler
    )
}

/// The idempotency key of a message: unique in the run, the same when it is re-sent.
pub fn publish_key(stamp: Stamp) -> String {
    format!("{:08x}-{}-{}", stamp.lt, stamp.p, stamp.s)
}

/// Encodes a publish command carrying `stamp` and `filler` bytes of padding, with the
/// idempotency key when `keyed`.
pub fn publish_frame(stamp: Stamp, filler: &str, keyed: bool) -> String {
    let data = stamp_data(stamp, filler);
    if keyed {
        format!(
            r#"{{"type":"publish","data":{data},"key":"{}"}}"#,
            publish_key(stamp)
        )
    } else {
        format!(r#"{{"type":"publish","data":{data}}}"#)
    }
}

/// A room position: epoch and offset (docs/protocol.md, continuity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The room's epoch.
    pub epoch: String,
    /// The offset.
    pub offset: u64,
}

/// A server event, as much of it as the load tester reads.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// `welcome`, with the room's position when the gateway numbers messages, and whether a
    /// resume was complete when one was asked for.
    Welcome {
        /// `epoch` + `offset`.
        position: Option<Position>,
        /// `recovered`, present only after `since=`.
        recovered: Option<bool>,
        /// The connection's member-list key: `user` when not null, else `conn:<connection_id>`
        /// (docs/protocol.md 12.1).
        list_key: Option<String>,
    },
    /// A `members` page (boxed: rare, and inline it would enlarge every event).
    Members(Box<Page>),
    /// A `members_diff`.
    MembersDiff(Box<Diff>),
    /// A `message` with the gateway's publish stamp; `stamp` is `None` when its data is not ours.
    Message {
        /// The gateway's `ts`.
        ts: u64,
        /// Our fields, when the data has them.
        stamp: Option<Stamp>,
        /// The message's room position, when the gateway numbers messages.
        position: Option<Position>,
    },
    /// `ack` of a keyed publish.
    Ack {
        /// The publish's key.
        key: String,
        /// Whether the cluster already had it.
        duplicate: bool,
    },
    /// `error` with its code, and the key of the publish it answers.
    Error {
        /// The code.
        code: String,
        /// The key, for a keyed publish.
        key: Option<String>,
    },
    /// `presence`: the room's cluster-wide counts.
    Presence {
        /// Hosts in the room.
        hosts: u64,
        /// Viewers in the room.
        viewers: u64,
    },
    /// `pong`, or anything else.
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
    #[serde(borrow, default)]
    key: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    recovered: Option<bool>,
    #[serde(default)]
    duplicate: Option<bool>,
    #[serde(default)]
    hosts: Option<u64>,
    #[serde(default)]
    viewers: Option<u64>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    connection_id: Option<Cow<'a, str>>,
    #[serde(default)]
    v: Option<u64>,
    #[serde(borrow, default)]
    members: Option<Vec<Entry<'a>>>,
    #[serde(borrow, default)]
    joined: Option<Vec<Entry<'a>>>,
    #[serde(borrow, default)]
    left: Option<Vec<Entry<'a>>>,
    #[serde(borrow, default)]
    cursor: Option<&'a RawValue>,
    #[serde(default)]
    reset: Option<bool>,
    #[serde(default)]
    over_limit: Option<bool>,
}

/// A member-list entry: only its key is read.
#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    sub: Cow<'a, str>,
}

fn hashes(entries: Option<Vec<Entry<'_>>>) -> Vec<u64> {
    entries
        .unwrap_or_default()
        .iter()
        .map(|e| key_hash(&e.sub))
        .collect()
}

/// Reads one text frame from the server; `None` when it is not an event at all. A `message`
/// event in the gateway's own form is read by a scan for the fields the load tester needs
/// (`ws/scan.rs`); anything else, or anything the scan is not sure of, by the full parse.
pub fn parse_event(text: &str) -> Option<Event> {
    scan::message(text).or_else(|| parse_event_full(text))
}

/// [`parse_event`] by a full `serde` parse of the frame.
pub(crate) fn parse_event_full(text: &str) -> Option<Event> {
    let e: Incoming<'_> = serde_json::from_str(text).ok()?;
    let position = match (&e.epoch, e.offset) {
        (Some(epoch), Some(offset)) => Some(Position {
            epoch: epoch.to_string(),
            offset,
        }),
        _ => None,
    };
    Some(match e.kind.as_ref() {
        "welcome" => Event::Welcome {
            position,
            recovered: e.recovered,
            list_key: match (e.user, e.connection_id) {
                (Some(u), _) => Some(u.into_owned()),
                (None, Some(c)) => Some(format!("conn:{c}")),
                (None, None) => None,
            },
        },
        "members" => Event::Members(Box::new(Page {
            v: e.v.unwrap_or(0),
            keys: hashes(e.members),
            cursor: e
                .cursor
                .map(|c| c.get())
                .filter(|c| *c != "null")
                .map(str::to_string),
            over_limit: e.over_limit.unwrap_or(false),
        })),
        "members_diff" => Event::MembersDiff(Box::new(Diff {
            v: e.v.unwrap_or(0),
            joined: hashes(e.joined),
            left: hashes(e.left),
            reset: e.reset.unwrap_or(false),
            over_limit: e.over_limit.unwrap_or(false),
        })),
        "message" => Event::Message {
            ts: e.ts.unwrap_or(0),
            stamp: e.data.and_then(|d| serde_json::from_str(d.get()).ok()),
            position,
        },
        "ack" => Event::Ack {
            key: e.key.as_deref().unwrap_or_default().to_string(),
            duplicate: e.duplicate.unwrap_or(false),
        },
        "error" => Event::Error {
            code: e.code.as_deref().unwrap_or("unknown").to_string(),
            key: e.key.map(|k| k.to_string()),
        },
        "presence" => match (e.hosts, e.viewers) {
            (Some(hosts), Some(viewers)) => Event::Presence { hosts, viewers },
            _ => Event::Other,
        },
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
        let frame = publish_frame(stamp, "xxxx", true);
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["type"], "publish");
        assert_eq!(v["key"], "00000009-3-41");
        let plain: serde_json::Value =
            serde_json::from_str(&publish_frame(stamp, "xxxx", false)).unwrap();
        assert!(plain.get("key").is_none());
        // What the gateway sends back: our data verbatim inside a message event.
        let echoed = format!(
            r#"{{"type":"message","room":"r","from":"h3","role":"host","data":{},"id":"n1-a-1","ts":1795713452927000}}"#,
            v["data"]
        );
        assert_eq!(
            parse_event(&echoed),
            Some(Event::Message {
                ts: 1_795_713_452_927_000,
                stamp: Some(stamp),
                position: None,
            })
        );
        let numbered = format!(
            "{}{}",
            &echoed[..echoed.len() - 1],
            r#","offset":12,"epoch":"e7"}"#
        );
        match parse_event(&numbered) {
            Some(Event::Message { position, .. }) => assert_eq!(
                position,
                Some(Position {
                    epoch: "e7".into(),
                    offset: 12
                })
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn events() {
        assert_eq!(
            parse_event(
                r#"{"type":"welcome","node":"n1","room":"r","role":"viewer","connection_id":"n1-1","name":null}"#
            ),
            Some(Event::Welcome {
                position: None,
                recovered: None,
                list_key: Some("conn:n1-1".into()),
            })
        );
        assert_eq!(
            parse_event(
                r#"{"type":"welcome","node":"n1","room":"r","role":"viewer","connection_id":"n1-1","name":null,"epoch":"ab1","offset":40,"recovered":false}"#
            ),
            Some(Event::Welcome {
                position: Some(Position {
                    epoch: "ab1".into(),
                    offset: 40
                }),
                recovered: Some(false),
                list_key: Some("conn:n1-1".into()),
            })
        );
        match parse_event(
            r#"{"type":"welcome","node":"n1","room":"r","role":"viewer","connection_id":"n1-2","name":"Ann","user":"u7"}"#,
        ) {
            Some(Event::Welcome { list_key, .. }) => assert_eq!(list_key.as_deref(), Some("u7")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_event(
                r#"{"type":"members","room":"show","v":12,"members":[{"sub":"user-42","name":"Ann","role":"host"}],"cursor":"17"}"#
            ),
            Some(Event::Members(Box::new(Page {
                v: 12,
                keys: vec![key_hash("user-42")],
                cursor: Some("\"17\"".into()),
                over_limit: false,
            })))
        );
        assert_eq!(
            parse_event(
                r#"{"type":"members","room":"show","v":3,"members":[],"cursor":null,"over_limit":true}"#
            ),
            Some(Event::Members(Box::new(Page {
                v: 3,
                keys: vec![],
                cursor: None,
                over_limit: true,
            })))
        );
        assert_eq!(
            parse_event(
                r#"{"type":"members_diff","room":"show","v":13,"joined":[{"sub":"user-7","name":"Bo","role":"viewer"}],"left":[{"sub":"user-9","reason":"client_closed"}]}"#
            ),
            Some(Event::MembersDiff(Box::new(Diff {
                v: 13,
                joined: vec![key_hash("user-7")],
                left: vec![key_hash("user-9")],
                reset: false,
                over_limit: false,
            })))
        );
        assert_eq!(
            parse_event(r#"{"type":"members_diff","room":"show","v":14,"reset":true}"#),
            Some(Event::MembersDiff(Box::new(Diff {
                v: 14,
                reset: true,
                ..Diff::default()
            })))
        );
        assert_eq!(
            parse_event(r#"{"type":"error","code":"rate_limited","message":"slow down"}"#),
            Some(Event::Error {
                code: "rate_limited".into(),
                key: None
            })
        );
        assert_eq!(
            parse_event(
                r#"{"type":"ack","key":"k1","offset":3,"epoch":"e","id":"x","duplicate":true}"#
            ),
            Some(Event::Ack {
                key: "k1".into(),
                duplicate: true
            })
        );
        assert_eq!(
            parse_event(r#"{"type":"presence","room":"r","hosts":1,"viewers":2}"#),
            Some(Event::Presence {
                hosts: 1,
                viewers: 2
            })
        );
        assert_eq!(
            parse_event(r#"{"type":"presence","room":"r"}"#),
            Some(Event::Other)
        );
        assert_eq!(
            parse_event(
                r#"{"type":"message","room":"r","from":null,"role":"server","data":"hi","id":"x","ts":5}"#
            ),
            Some(Event::Message {
                ts: 5,
                stamp: None,
                position: None
            }),
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

    #[test]
    fn join_urls() {
        assert_eq!(
            join_url(
                "wss://gw",
                "r1",
                Role::Viewer,
                "v3",
                Some(("e1", 17)),
                Some("a.b.c")
            ),
            "wss://gw/ws/r1?role=viewer&name=v3&since=e1:17&token=a.b.c"
        );
        assert_eq!(
            join_url("ws://gw:80", "r1", Role::Host, "h0", None, None),
            "ws://gw:80/ws/r1?role=host&name=h0"
        );
    }
}
