//! Moderation across the cluster: disconnecting a user or a room everywhere, and bans.
//!
//! - The admin routes on the client port (API key required): `POST /api/users/{sub}/disconnect`,
//!   `POST /api/rooms/{room}/disconnect`, `PUT|DELETE|GET /api/bans`.
//! - A disconnect travels as a JSON [`Command`] on the broker's control channel
//!   (`{prefix}_control` in Redis, which every node subscribes to permanently; a direct hand-over
//!   with the in-process broker) and each node closes the matching sessions of its
//!   [`Registry`](crate::registry::Registry) with 4501 (kicked) or 4502 (banned).
//! - A ban is stored by the broker with its time-to-live (a Redis hash `{prefix}ban:{sub}`: field
//!   room or `*`, value expiry in unix ms; [`MemoryBans`] with the in-process broker) and checked
//!   at every join and refresh that carries a token.
//!
//! The control queue between the broker's receiving task and [`run`] is bounded
//! ([`CONTROL_QUEUE`]); a command that finds it full is dropped and counted, never waited for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::auth::claims::MAX_SUB_LEN;
use crate::config::parse_duration;
use crate::disconnect::CloseReason;
use crate::http::{json, Body, Refusal};
use crate::metrics::{ControlResult, Metrics};
use crate::node::Node;
use crate::protocol::{self, RoomName};
use crate::registry::Selector;

/// The room name reserved for the control channel: its channel would be `{prefix}_control`.
pub const CONTROL_ROOM: &str = "_control";
/// Control commands queued between the broker and [`run`].
pub const CONTROL_QUEUE: usize = 1024;
/// The field of a ban on every room.
pub const ALL_ROOMS: &str = "*";
/// Longest ban.
const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest request body of the moderation API.
const MAX_BODY: usize = 4096;

/// Stores a ban field and sets the key's expiry to the latest live field's, so that the key
/// vanishes with its last ban. KEYS[1] the user's ban hash; ARGV[1] field, ARGV[2] expiry (ms).
pub const BAN_SCRIPT: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local latest = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local e = tonumber(all[i + 1])
  if e and e > latest then latest = e end
end
redis.call('PEXPIREAT', KEYS[1], latest)
return latest
"#;

/// A command on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Command {
    /// Close every session of `sub` (any user when `None`) in `room` (any room when `None`).
    Disconnect {
        /// The user, if only one.
        #[serde(default)]
        sub: Option<String>,
        /// The room, if only one.
        #[serde(default)]
        room: Option<String>,
        /// `kicked` (4501) or `banned` (4502).
        reason: Reason,
    },
}

/// Why a moderator disconnects: the close code clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// 4501.
    Kicked,
    /// 4502.
    Banned,
}

impl Command {
    /// The bytes published on the control channel.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("commands always serialize"))
    }
}

/// Where a broker hands the control commands it receives: the sending side of the bounded
/// queue to [`run`], set once when the node starts.
#[derive(Debug, Default)]
pub struct ControlSink(OnceLock<mpsc::Sender<Bytes>>);

impl ControlSink {
    /// Connects the sink to the queue (the first call wins).
    pub fn set(&self, tx: mpsc::Sender<Bytes>) {
        let _ = self.0.set(tx);
    }

    /// Queues one command without waiting; a full queue drops it (counted).
    pub fn deliver(&self, payload: &[u8], metrics: &Metrics) {
        let Some(tx) = self.0.get() else { return };
        if tx.try_send(Bytes::copy_from_slice(payload)).is_err() {
            metrics.control(ControlResult::Dropped);
            warn!("control queue full; a moderation command was dropped");
        }
    }
}

/// Bans kept in memory, for the in-process broker: user → field (room or `*`) → expiry (unix ms).
#[derive(Debug, Default)]
pub struct MemoryBans(Mutex<HashMap<String, HashMap<String, u64>>>);

impl MemoryBans {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bans `sub` from `field` until `until_ms`.
    pub fn ban(&self, sub: &str, field: &str, until_ms: u64) {
        self.lock()
            .entry(sub.to_string())
            .or_default()
            .insert(field.to_string(), until_ms);
    }

    /// Lifts a ban; returns whether there was one.
    pub fn unban(&self, sub: &str, field: &str) -> bool {
        let mut all = self.lock();
        let removed = all
            .get_mut(sub)
            .and_then(|m| m.remove(field))
            .is_some_and(|until| until > now_ms());
        if all.get(sub).is_some_and(|m| m.is_empty()) {
            all.remove(sub);
        }
        removed
    }

    /// The live bans of `sub` as (field, expiry ms); expired ones are forgotten.
    pub fn list(&self, sub: &str) -> Vec<(String, u64)> {
        let now = now_ms();
        let mut all = self.lock();
        let Some(m) = all.get_mut(sub) else {
            return Vec::new();
        };
        m.retain(|_, until| *until > now);
        let out = m.iter().map(|(f, u)| (f.clone(), *u)).collect();
        if m.is_empty() {
            all.remove(sub);
        }
        out
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    protocol::now_micros() / 1000
}

/// Whether live bans `(field, expiry)` cover `room`.
pub fn covers(bans: &[(String, u64)], room: &str) -> bool {
    let now = now_ms();
    bans.iter()
        .any(|(f, until)| *until > now && (f == room || f == ALL_ROOMS))
}

/// Applies control commands to this node's sessions until the node stops.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Bytes>) {
    loop {
        let payload = tokio::select! {
            _ = node.stopping().cancelled() => return,
            p = rx.recv() => match p { Some(p) => p, None => return },
        };
        match serde_json::from_slice::<Command>(&payload) {
            Ok(Command::Disconnect { sub, room, reason }) => {
                let close = match reason {
                    Reason::Kicked => CloseReason::Kicked,
                    Reason::Banned => CloseReason::Banned,
                };
                let n = node.registry.close_matching(
                    Selector {
                        user: sub.as_deref(),
                        room: room.as_deref(),
                    },
                    close,
                );
                node.metrics.control(ControlResult::Applied);
                debug!(
                    sessions = n,
                    reason = close.label(),
                    "moderation disconnect"
                );
            }
            Err(e) => {
                node.metrics.control(ControlResult::Invalid);
                debug!(cause = %e, "invalid control command");
            }
        }
    }
}

/// Whether `sub` is banned from `room`. A broker that cannot answer lets the user in (and logs):
/// during a Redis outage the node cannot fan out either, and refusing every login would turn an
/// outage of the ban store into an outage of the service.
pub async fn is_banned(node: &Node, sub: &str, room: &RoomName) -> bool {
    match node.broker.bans(sub).await {
        Ok(bans) => covers(&bans, room.as_str()),
        Err(e) => {
            warn!(cause = %e, "ban check failed; admitting");
            false
        }
    }
}

fn valid_sub(sub: &str) -> bool {
    !sub.is_empty() && sub.len() <= MAX_SUB_LEN && !sub.chars().any(char::is_control)
}

/// The moderation routes; `None` when `path` is not one of them.
pub async fn route(
    node: &Arc<Node>,
    req: Request<Incoming>,
    path: &str,
) -> Option<Result<Response<Body>, Refusal>> {
    let target = if let Some(sub) = path
        .strip_prefix("/api/users/")
        .and_then(|p| p.strip_suffix("/disconnect"))
    {
        Target::User(sub.to_string())
    } else if let Some(room) = path
        .strip_prefix("/api/rooms/")
        .and_then(|p| p.strip_suffix("/disconnect"))
    {
        Target::Room(room.to_string())
    } else if path == "/api/bans" {
        Target::Bans
    } else {
        return None;
    };
    Some(serve(node, req, target).await)
}

enum Target {
    User(String),
    Room(String),
    Bans,
}

async fn serve(
    node: &Arc<Node>,
    req: Request<Incoming>,
    target: Target,
) -> Result<Response<Body>, Refusal> {
    if !node.config.api_key_required() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the moderation API needs --api-key on the node",
        ));
    }
    crate::http::check_api_key(node, &req)?;
    let unavailable = |e: crate::broker::BrokerError| {
        warn!(cause = %e, "moderation command failed");
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the cluster's broker is unavailable; retry later",
        )
    };
    match (target, req.method().clone()) {
        (Target::User(sub), Method::POST) => {
            // A path segment: `+` is a plus sign there, not a space.
            let sub = crate::http::percent_decode(&sub.replace('+', "%2B"))
                .filter(|s| valid_sub(s))
                .ok_or_else(|| Refusal::bad_request("sub must be 1-128 bytes"))?;
            let cmd = Command::Disconnect {
                sub: Some(sub.clone()),
                room: None,
                reason: Reason::Kicked,
            };
            node.broker
                .publish_control(cmd.encode())
                .await
                .map_err(unavailable)?;
            info!("moderation: user disconnected");
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "sub": sub, "disconnected": true }),
            ))
        }
        (Target::Room(room), Method::POST) => {
            let room =
                RoomName::parse(&room).ok_or_else(|| Refusal::bad_request("invalid room name"))?;
            let cmd = Command::Disconnect {
                sub: None,
                room: Some(room.to_string()),
                reason: Reason::Kicked,
            };
            node.broker
                .publish_control(cmd.encode())
                .await
                .map_err(unavailable)?;
            info!(room = %room, "moderation: room disconnected");
            Ok(json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "room": room.as_str(), "disconnected": true }),
            ))
        }
        (Target::Bans, Method::GET) => {
            let sub = crate::http::query_param(&req, "sub")?
                .filter(|s| valid_sub(s))
                .ok_or_else(|| Refusal::bad_request("give ?sub=USER"))?;
            let bans = node.broker.bans(&sub).await.map_err(unavailable)?;
            let now = now_ms();
            let list: Vec<_> = bans
                .iter()
                .filter(|(_, until)| *until > now)
                .map(|(f, until)| {
                    serde_json::json!({
                        "room": if f == ALL_ROOMS { None } else { Some(f) },
                        "until": until,
                    })
                })
                .collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "sub": sub, "bans": list }),
            ))
        }
        (Target::Bans, m) if m == Method::PUT || m == Method::DELETE => {
            let body = read_body(req).await?;
            let room_field = match &body.room {
                None => ALL_ROOMS.to_string(),
                Some(r) => RoomName::parse(r)
                    .ok_or_else(|| Refusal::bad_request("invalid room name"))?
                    .to_string(),
            };
            if !valid_sub(&body.sub) {
                return Err(Refusal::bad_request("sub must be 1-128 bytes"));
            }
            if m == Method::DELETE {
                let removed = node
                    .broker
                    .unban(&body.sub, &room_field)
                    .await
                    .map_err(unavailable)?;
                info!("moderation: ban lifted");
                return Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "sub": body.sub, "room": body.room, "removed": removed }),
                ));
            }
            let duration = match &body.duration {
                Some(serde_json::Value::Number(n)) => n
                    .as_f64()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_BAN.as_secs_f64())
                    .map(Duration::from_secs_f64),
                Some(serde_json::Value::String(s)) => parse_duration(s).ok(),
                _ => None,
            }
            .filter(|d| !d.is_zero() && *d <= MAX_BAN)
            .ok_or_else(|| {
                Refusal::bad_request("duration must be \"10m\"-style or seconds, up to 366 days")
            })?;
            let until = now_ms() + duration.as_millis() as u64;
            node.broker
                .ban(&body.sub, &room_field, until)
                .await
                .map_err(unavailable)?;
            let cmd = Command::Disconnect {
                sub: Some(body.sub.clone()),
                room: body.room.clone(),
                reason: Reason::Banned,
            };
            node.broker
                .publish_control(cmd.encode())
                .await
                .map_err(unavailable)?;
            info!(seconds = duration.as_secs(), "moderation: user banned");
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "sub": body.sub, "room": body.room, "until": until }),
            ))
        }
        _ => Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST …/disconnect; PUT, DELETE or GET /api/bans",
        )),
    }
}

/// The body of `PUT` / `DELETE /api/bans`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    sub: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    duration: Option<serde_json::Value>,
}

async fn read_body(req: Request<Incoming>) -> Result<BanBody, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| Refusal::bad_request(format!("the body must be at most {MAX_BODY} bytes")))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|_| {
        Refusal::bad_request(
            "the body must be {\"sub\":USER,\"room\":ROOM|null,\"duration\":\"10m\"|SECONDS}",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let c = Command::Disconnect {
            sub: Some("u1".into()),
            room: None,
            reason: Reason::Banned,
        };
        let bytes = c.encode();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            serde_json::json!({"type":"disconnect","sub":"u1","room":null,"reason":"banned"})
        );
        assert_eq!(serde_json::from_slice::<Command>(&bytes).unwrap(), c);
    }

    #[test]
    fn memory_bans_expire_and_cover_rooms() {
        let b = MemoryBans::default();
        let now = now_ms();
        b.ban("u1", "r1", now + 60_000);
        b.ban("u2", ALL_ROOMS, now + 60_000);
        b.ban("u3", "r1", now - 1);
        assert!(covers(&b.list("u1"), "r1"));
        assert!(!covers(&b.list("u1"), "r2"));
        assert!(covers(&b.list("u2"), "anything"));
        assert!(b.list("u3").is_empty(), "expired bans are forgotten");
        assert!(b.unban("u1", "r1"));
        assert!(!b.unban("u1", "r1"));
        assert!(b.list("u1").is_empty());
    }

    #[tokio::test]
    async fn a_full_control_queue_drops_and_counts() {
        let metrics = Metrics::new("n1");
        let sink = ControlSink::default();
        sink.deliver(b"x", &metrics); // not connected yet: ignored
        let (tx, mut rx) = mpsc::channel(1);
        sink.set(tx);
        sink.deliver(b"a", &metrics);
        sink.deliver(b"b", &metrics);
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"a"));
        assert!(rx.try_recv().is_err(), "the second was dropped");
        assert!(metrics
            .render()
            .contains("gateway_control_commands_total{node=\"n1\",result=\"dropped\"} 1"));
    }
}
