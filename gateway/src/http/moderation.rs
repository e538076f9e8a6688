//! The moderation routes of the client port (API key required):
//! `POST /api/users/{sub}/disconnect`, `POST /api/rooms/{room}/disconnect`,
//! `PUT|DELETE|GET /api/bans`. They store bans through the broker and publish disconnects on the
//! control channel; every node applies them ([`crate::node::moderation`]).

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use tracing::{info, warn};

use crate::auth::claims::MAX_SUB_LEN;
use crate::config::parse_duration;
use crate::http::request::{decode_escapes, query_param, read_body, require_api_key, BodyError};
use crate::http::response::{json, Body, Refusal};
use crate::metrics::HttpTimeout;
use crate::moderation::control::{Command, Reason, ALL_ROOMS};
use crate::node::Node;
use crate::wire::protocol::RoomName;

/// Longest ban.
const MAX_BAN: Duration = Duration::from_secs(366 * 24 * 3600);
/// Largest request body of the moderation API.
const MAX_BODY: usize = 4096;

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
    require_api_key(&node.config, &req, "moderation")?;
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
            let sub = decode_escapes(&sub)
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
            let sub = query_param(&req, "sub")?
                .filter(|s| valid_sub(s))
                .ok_or_else(|| Refusal::bad_request("give ?sub=USER"))?;
            let bans = node.broker.bans(&sub).await.map_err(unavailable)?;
            let now = crate::wire::clock::unix_millis();
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
            let body = read_ban(node, req).await?;
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
            let until = crate::wire::clock::unix_millis() + duration.as_millis() as u64;
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

async fn read_ban(node: &Node, req: Request<Incoming>) -> Result<BanBody, Refusal> {
    let body = read_body(req.into_body(), MAX_BODY, node.config.http_body_timeout)
        .await
        .map_err(|e| {
            if matches!(e, BodyError::Timeout(_)) {
                node.metrics.http_timeout(HttpTimeout::Body);
            }
            e.refusal()
        })?;
    serde_json::from_slice(&body).map_err(|_| {
        Refusal::bad_request(
            "the body must be {\"sub\":USER,\"room\":ROOM|null,\"duration\":\"10m\"|SECONDS}",
        )
    })
}
