//! The webhook receiver (`--webhook-listen`, `--webhook-secret`): an HTTP server in the
//! generator that takes the gateway's lifecycle events (docs/protocol.md 13), verifies each
//! request's signature (bad ones: 401, counted), deduplicates by `id` (repeats: 204, counted),
//! and records the run's rooms' events in arrival order, with what this generator expects (the
//! list keys it saw welcomed). Its `hooks/judge.rs` judges them at the end of the run.

pub mod judge;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use judge::{judge, Judged};

/// Largest request body taken; a larger one is answered 413 (the gateway's events are at most
/// 16 KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// Events recorded at most (ids remembered for deduplication, too); beyond, events are counted
/// in `overflow` and not judged.
pub const MAX_EVENTS: usize = 2_000_000;
/// A signature's timestamp may be this far from our clock.
pub const TOLERANCE_S: u64 = 300;

/// A lifecycle event's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `room.occupied`
    Occupied,
    /// `room.vacated`
    Vacated,
    /// `member.joined`
    Joined,
    /// `member.left`
    Left,
}

/// One recorded event of a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The stream entry id `<ms>-<seq>`, as numbers (`(0, 0)` when unreadable).
    pub seq: (u64, u64),
    /// Its type.
    pub kind: Kind,
    /// The member's key (`sub`), for member events.
    pub key: Option<String>,
}

/// What the receiver recorded: per room, the events in arrival order, and what the generator
/// expects.
#[derive(Debug, Default)]
pub struct Record {
    /// Event ids seen (deduplication).
    pub ids: HashSet<String>,
    /// Each room's events, in arrival order.
    pub rooms: HashMap<String, Vec<Hook>>,
    /// Rooms where this generator had a member welcomed.
    pub expected_rooms: HashSet<String>,
    /// Per room, the list keys this generator saw welcomed (judged only with `--lists`).
    pub expected_keys: HashMap<String, HashSet<String>>,
    /// Events recorded (bounded by [`MAX_EVENTS`]).
    pub events: usize,
}

/// Counters of the receiver.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests with a valid signature (first deliveries and repeats).
    pub received: AtomicU64,
    /// Requests refused for their signature or timestamp (401).
    pub bad_signature: AtomicU64,
    /// Repeats of an `id` already received.
    pub duplicates: AtomicU64,
    /// Signed requests that were not an event we could read (400), or for another run's rooms.
    pub foreign: AtomicU64,
    /// Events not recorded because [`MAX_EVENTS`] were.
    pub overflow: AtomicU64,
}

/// The receiver's state, shared by its connections and the run.
pub struct Receiver {
    secrets: Vec<hmac::Key>,
    room_prefix: String,
    /// Whether member events are judged (`--lists`).
    pub members: bool,
    /// The counters.
    pub counters: Counters,
    record: Mutex<Record>,
    last_event: Mutex<Instant>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    room: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    sub: Option<std::borrow::Cow<'a, str>>,
}

/// Whether `signature` (`v1=<hex>`) is one of `secrets`' HMAC-SHA256 of `"<timestamp>.<body>"`,
/// with `timestamp` (unix seconds) within [`TOLERANCE_S`] of `now`.
pub fn verify(
    secrets: &[hmac::Key],
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: u64,
) -> bool {
    let Ok(ts) = timestamp.parse::<u64>() else {
        return false;
    };
    if ts.abs_diff(now) > TOLERANCE_S {
        return false;
    }
    let Some(tag) = signature
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
    else {
        return false;
    };
    let mut signed = Vec::with_capacity(timestamp.len() + 1 + body.len());
    signed.extend_from_slice(timestamp.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    secrets
        .iter()
        .any(|k| hmac::verify(k, &signed, &tag).is_ok())
}

/// `<ms>-<seq>`, the part of an event id after its last `/`.
fn stream_seq(id: &str) -> (u64, u64) {
    let tail = id.rsplit('/').next().unwrap_or_default();
    let (ms, seq) = tail.split_once('-').unwrap_or((tail, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Receiver {
    /// A receiver for the rooms named `<room_prefix>-…`, accepting `secrets` (comma-separated).
    pub fn new(secrets: &str, room_prefix: &str, members: bool) -> Self {
        Self {
            secrets: secrets
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes()))
                .collect(),
            room_prefix: format!("{room_prefix}-"),
            members,
            counters: Counters::default(),
            record: Mutex::default(),
            last_event: Mutex::new(Instant::now()),
        }
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A member of `room` was welcomed with list key `key` (`None`: the gateway sent none).
    pub fn expect(&self, room: &str, key: Option<&str>) {
        let mut r = self.record();
        if !r.expected_rooms.contains(room) {
            r.expected_rooms.insert(room.to_string());
        }
        if let Some(k) = key.filter(|_| self.members) {
            r.expected_keys
                .entry(room.to_string())
                .or_default()
                .insert(k.to_string());
        }
    }

    /// Takes one request's parts; the answer's status.
    pub fn take(&self, timestamp: &str, signature: &str, body: &[u8], now: u64) -> StatusCode {
        let c = &self.counters;
        if !verify(&self.secrets, timestamp, signature, body, now) {
            c.bad_signature.fetch_add(1, Ordering::Relaxed);
            return StatusCode::UNAUTHORIZED;
        }
        c.received.fetch_add(1, Ordering::Relaxed);
        let Ok(e) = serde_json::from_slice::<Body<'_>>(body) else {
            c.foreign.fetch_add(1, Ordering::Relaxed);
            return StatusCode::BAD_REQUEST;
        };
        let kind = match e.kind.as_ref() {
            "room.occupied" => Kind::Occupied,
            "room.vacated" => Kind::Vacated,
            "member.joined" => Kind::Joined,
            "member.left" => Kind::Left,
            _ => {
                c.foreign.fetch_add(1, Ordering::Relaxed);
                return StatusCode::NO_CONTENT;
            }
        };
        if !e.room.starts_with(&self.room_prefix) {
            c.foreign.fetch_add(1, Ordering::Relaxed);
            return StatusCode::NO_CONTENT;
        }
        let mut r = self.record();
        if r.ids.contains(e.id.as_ref()) {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            return StatusCode::NO_CONTENT;
        }
        if r.events >= MAX_EVENTS {
            c.overflow.fetch_add(1, Ordering::Relaxed);
            return StatusCode::NO_CONTENT;
        }
        r.events += 1;
        r.ids.insert(e.id.to_string());
        let hook = Hook {
            seq: stream_seq(&e.id),
            kind,
            key: e.sub.map(|s| s.into_owned()),
        };
        r.rooms.entry(e.room.into_owned()).or_default().push(hook);
        drop(r);
        *self.last_event.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        StatusCode::NO_CONTENT
    }

    /// Judges what was recorded.
    pub fn judge(&self) -> Judged {
        judge(&self.record())
    }

    /// Waits up to `grace` for the last events: returns early once nothing is missing and
    /// nothing new came for 2 s.
    pub async fn settle(&self, grace: Duration) {
        let until = Instant::now() + grace;
        while Instant::now() < until {
            let quiet = self
                .last_event
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= Duration::from_secs(2);
            if quiet && self.judge().missing == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Binds `addr` and serves until `stop` is cancelled.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
        stop: CancellationToken,
    ) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => match a {
                        Ok((s, _)) => s,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let me = self.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, std::convert::Infallible>(me.handle(req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(local)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let answer = |status: StatusCode| {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = status;
            r
        };
        if req.method() != hyper::Method::POST {
            return answer(StatusCode::METHOD_NOT_ALLOWED);
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let (timestamp, signature) = (header("x-gateway-timestamp"), header("x-gateway-signature"));
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return answer(StatusCode::PAYLOAD_TOO_LARGE),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        answer(self.take(&timestamp, &signature, &body, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector: `python3 -c 'import hmac,hashlib; print(hmac.new(b"s3cret",
    /// b"1765100000.{\"id\":\"lt-r0/1765100000000-0\",\"type\":\"room.occupied\",\"room\":\"lt-r0\",\"ts_ms\":1765100000000}",
    /// hashlib.sha256).hexdigest())'`.
    const BODY: &str = r#"{"id":"lt-r0/1765100000000-0","type":"room.occupied","room":"lt-r0","ts_ms":1765100000000}"#;

    fn python_signature(secret: &str, ts: &str, body: &str) -> String {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg("import hmac,hashlib,sys; print(hmac.new(sys.argv[1].encode(), (sys.argv[2] + '.' + sys.argv[3]).encode(), hashlib.sha256).hexdigest())")
            .args([secret, ts, body])
            .output()
            .expect("python3 runs");
        assert!(out.status.success());
        format!("v1={}", String::from_utf8(out.stdout).unwrap().trim())
    }

    #[test]
    fn signatures_verify_against_python() {
        let sig = python_signature("s3cret", "1765100000", BODY);
        let keys = [hmac::Key::new(hmac::HMAC_SHA256, b"s3cret")];
        assert!(verify(
            &keys,
            "1765100000",
            &sig,
            BODY.as_bytes(),
            1_765_100_010
        ));
        // Rotated: either secret.
        let both = [
            hmac::Key::new(hmac::HMAC_SHA256, b"new"),
            hmac::Key::new(hmac::HMAC_SHA256, b"s3cret"),
        ];
        assert!(verify(
            &both,
            "1765100000",
            &sig,
            BODY.as_bytes(),
            1_765_100_000
        ));
        // Another body, secret, timestamp, an old timestamp, a bad header: refused.
        assert!(!verify(&keys, "1765100000", &sig, b"{}", 1_765_100_000));
        let other = [hmac::Key::new(hmac::HMAC_SHA256, b"other")];
        assert!(!verify(
            &other,
            "1765100000",
            &sig,
            BODY.as_bytes(),
            1_765_100_000
        ));
        assert!(!verify(
            &keys,
            "1765100001",
            &sig,
            BODY.as_bytes(),
            1_765_100_000
        ));
        assert!(!verify(
            &keys,
            "1765100000",
            &sig,
            BODY.as_bytes(),
            1_765_100_301
        ));
        assert!(!verify(
            &keys,
            "1765100000",
            &sig[3..],
            BODY.as_bytes(),
            1_765_100_000
        ));
        assert!(!verify(&keys, "x", &sig, BODY.as_bytes(), 1_765_100_000));
    }

    #[test]
    fn the_receiver_refuses_bad_signatures_and_counts_repeats() {
        let rx = Receiver::new("s3cret", "lt", true);
        let sig = python_signature("s3cret", "1765100000", BODY);
        let now = 1_765_100_000;
        assert_eq!(
            rx.take("1765100000", "v1=00", BODY.as_bytes(), now),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            rx.take("1765100000", &sig, BODY.as_bytes(), now),
            StatusCode::NO_CONTENT
        );
        assert_eq!(
            rx.take("1765100000", &sig, BODY.as_bytes(), now),
            StatusCode::NO_CONTENT
        );
        let c = &rx.counters;
        assert_eq!(c.bad_signature.load(Ordering::Relaxed), 1);
        assert_eq!(c.received.load(Ordering::Relaxed), 2);
        assert_eq!(c.duplicates.load(Ordering::Relaxed), 1);
        let r = rx.record();
        assert_eq!(
            r.rooms["lt-r0"],
            vec![Hook {
                seq: (1_765_100_000_000, 0),
                kind: Kind::Occupied,
                key: None
            }]
        );
    }

    #[test]
    fn recorded_events_are_bounded() {
        let rx = Receiver::new("k", "lt", true);
        rx.record().events = MAX_EVENTS;
        let body = r#"{"id":"lt-r1/5-0","type":"room.occupied","room":"lt-r1","ts_ms":5}"#;
        let sig = python_signature("k", "100", body);
        assert_eq!(
            rx.take("100", &sig, body.as_bytes(), 100),
            StatusCode::NO_CONTENT
        );
        assert_eq!(rx.counters.overflow.load(Ordering::Relaxed), 1);
        assert!(rx.record().rooms.is_empty());
    }

    #[test]
    fn stream_ids_read_after_the_last_slash() {
        assert_eq!(stream_seq("a/b/17-3"), (17, 3));
        assert_eq!(stream_seq("r/9"), (9, 0));
        assert_eq!(stream_seq("junk"), (0, 0));
    }
}
