//! Routes of the client port: WebSocket upgrades into rooms and the HTTP publish API.
//!
//! - `GET /ws/{room}?role=host|viewer&name=NAME` — upgrade into `room`.
//! - `GET /` with an upgrade — join `lobby`; without one, the live-room page ([`crate::http::assets`]),
//!   which loads `/page.js` and `/client.js`.
//! - `POST /api/rooms/{room}/messages` — publish as `server` (202 with the message id, offset
//!   and epoch; `Idempotency-Key` publishes a repeat once).
//! - `POST /api/users/{sub}/disconnect`, `POST /api/rooms/{room}/disconnect`, `/api/bans` —
//!   moderation ([`crate::http::moderation`]).
//! - `GET /api/rooms/{room}/messages?since=E:N&limit=L` — the room's history.
//! - `GET /api/rooms?limit=N&cursor=C` and `GET /api/rooms/{room}/presence` — the rooms with
//!   members cluster-wide and their counts, with the API key ([`crate::http::rooms`]).
//!
//! Who may call the API is decided here too: a publish needs the API key (or an API opened on
//! purpose) and is never accepted from a browser page of another site ([`browser_may_publish`]);
//! a history read needs the right to join the room ([`may_read_history`]).
//!
//! Every refusal happens before the upgrade, as an HTTP status with a JSON body
//! `{"error":CODE,"message":TEXT}`, and is counted. [`admit`] is where a connection's identity and
//! role are decided: with `--auth jwt` from the token (header or `token` query parameter), never
//! from the query string; a refusal there is 401 or 403 and counted by reason.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::value::RawValue;
use tracing::{debug, warn};

use crate::auth::AuthError;
use crate::config::Config;
use crate::http::assets;
use crate::http::moderation as moderation_api;
use crate::http::request::{
    check_api_key, matching_api_key, param, query_params, read_body, BodyError,
};
use crate::http::response::{json, Body, Refusal};
use crate::http::rooms as rooms_api;
use crate::metrics::{DropReason, HttpTimeout, RefuseReason, Source};
use crate::node::{Node, SlotError};
use crate::session::{self, Admission, Resume};
use crate::wire::history::{self, HistoryQuery, KeyScope, Since};
use crate::wire::protocol::{self, Role, RoomName};

/// Dispatches one request of the client port.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let response = if path == "/" {
        if fastwebsockets::upgrade::is_upgrade_request(&req) {
            upgrade(&node, req, protocol::LOBBY).await
        } else if req.method() == Method::GET || req.method() == Method::HEAD {
            Ok(assets::serve(&assets::PAGE, &req))
        } else {
            Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            ))
        }
    } else if let Some(asset) = assets::find(&path) {
        if req.method() == Method::GET || req.method() == Method::HEAD {
            Ok(assets::serve(asset, &req))
        } else {
            Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            ))
        }
    } else if let Some(room) = path.strip_prefix("/ws/") {
        if !fastwebsockets::upgrade::is_upgrade_request(&req) {
            Err(Refusal::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this endpoint is a WebSocket: connect with Upgrade: websocket",
            ))
        } else {
            let room = room.to_string();
            upgrade(&node, req, &room).await
        }
    } else if path.starts_with("/api/users/")
        || path == "/api/bans"
        || (path.starts_with("/api/rooms/") && path.ends_with("/disconnect"))
    {
        let result = moderation_api::route(&node, req, &path)
            .await
            .unwrap_or_else(|| {
                Err(Refusal::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such endpoint",
                ))
            });
        let status = match &result {
            Ok(r) => r.status(),
            Err(r) => r.status(),
        };
        node.metrics.http_request(status.as_u16());
        result
    } else if path == "/api/rooms"
        || (path.starts_with("/api/rooms/") && path.ends_with("/presence"))
    {
        let result = rooms_api::serve(&node, req, &path).await;
        let status = match &result {
            Ok(r) => r.status(),
            Err(r) => r.status(),
        };
        node.metrics.http_request(status.as_u16());
        result
    } else if let Some(room) = path
        .strip_prefix("/api/rooms/")
        .and_then(|r| r.strip_suffix("/messages"))
    {
        let room = room.to_string();
        let result = if req.method() == Method::POST {
            publish(&node, req, &room).await
        } else if req.method() == Method::GET {
            history(&node, req, &room).await
        } else {
            Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET or POST",
            ))
        };
        let status = match &result {
            Ok(r) => r.status(),
            Err(r) => r.status(),
        };
        node.metrics.http_request(status.as_u16());
        result
    } else {
        Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint",
        ))
    };
    Ok(response.unwrap_or_else(Refusal::into_response))
}

pub(crate) fn parse_room(raw: &str) -> Result<RoomName, Refusal> {
    if raw == crate::broker::control::CONTROL_ROOM {
        return Err(Refusal::bad_request(
            "the room name _control is reserved for the control channel",
        ));
    }
    RoomName::parse(raw).ok_or_else(|| {
        Refusal::bad_request(format!(
            "invalid room name: use 1-{} characters of A-Z a-z 0-9 _ . : -",
            protocol::MAX_ROOM_LEN
        ))
    })
}

/// Why an upgrade was refused by [`admit`]: a bad request, or a token check.
enum AdmitError {
    BadRequest(Refusal),
    Auth(AuthError),
}

impl From<Refusal> for AdmitError {
    fn from(r: Refusal) -> Self {
        Self::BadRequest(r)
    }
}

/// The token of an upgrade: `Authorization: Bearer` wins over the `token` query parameter.
fn bearer_token<'a>(req: &'a Request<Incoming>, params: &'a [(String, String)]) -> Option<&'a str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .or_else(|| param(params, "token"))
        .filter(|t| !t.is_empty())
}

/// Decides who a connecting client is. With `--auth none` the role and name come from the query
/// string; with `--auth jwt` from the token (the query's `role`, if given, must be the granted
/// one), and a banned user is refused.
async fn admit(node: &Node, req: &Request<Incoming>, room: &str) -> Result<Admission, AdmitError> {
    let room = parse_room(room)?;
    let params = query_params(req)?;
    let role = match param(&params, "role") {
        None | Some("") => None,
        Some(r) => Some(
            Role::parse_member(r)
                .ok_or_else(|| Refusal::bad_request("role must be host or viewer"))?,
        ),
    };
    let name = match param(&params, "name") {
        None | Some("") => None,
        Some(n) if protocol::valid_name(n) => Some(Arc::from(n)),
        Some(_) => {
            return Err(Refusal::bad_request(format!(
                "invalid name: 1-{} characters, no control characters",
                protocol::MAX_NAME_LEN
            ))
            .into())
        }
    };
    let resume = parse_resume(&params)?;
    let Some(verifier) = &node.auth else {
        return Ok(Admission {
            room,
            role: role.unwrap_or(Role::Viewer),
            name,
            user: None,
            exp: None,
            publish: true,
            list: false,
            resume,
        });
    };
    let Some(token) = bearer_token(req, &params) else {
        if verifier.anonymous_may_view(&room) && role != Some(Role::Host) {
            return Ok(Admission {
                room,
                role: Role::Viewer,
                name,
                user: None,
                exp: None,
                publish: false,
                list: false,
                resume,
            });
        }
        return Err(AdmitError::Auth(AuthError::Missing));
    };
    let identity = verifier.verify(token).await.map_err(AdmitError::Auth)?;
    let right = identity
        .right(&room)
        .ok_or(AdmitError::Auth(AuthError::RoomNotGranted))?;
    if role.is_some_and(|r| r != right.role) {
        return Err(AdmitError::Auth(AuthError::RoleNotGranted));
    }
    if crate::node::moderation::is_banned(node, &identity.sub, &room).await {
        return Err(AdmitError::Auth(AuthError::Banned));
    }
    Ok(Admission {
        room,
        role: right.role,
        name: Some(
            identity
                .name
                .clone()
                .unwrap_or_else(|| identity.sub.clone()),
        ),
        user: Some(identity.sub),
        exp: Some(identity.exp),
        publish: right.publish,
        list: right.list,
        resume,
    })
}

/// `since=E:N` and `backlog=N` of an upgrade (a backlog above `--max-backlog` is clamped by the
/// session).
fn parse_resume(params: &[(String, String)]) -> Result<Resume, Refusal> {
    let since = match param(params, "since") {
        None | Some("") => None,
        Some(s) => Some(Since::parse(s).ok_or_else(|| {
            Refusal::bad_request("since must be EPOCH:OFFSET as the welcome and messages give them")
        })?),
    };
    let backlog = match param(params, "backlog") {
        None | Some("") => 0,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| Refusal::bad_request("backlog must be a number of messages"))?,
    };
    Ok(Resume { since, backlog })
}

/// Admits a client, reserves its slot and switches protocols; the session runs in a tracked task.
async fn upgrade(
    node: &Arc<Node>,
    mut req: Request<Incoming>,
    room: &str,
) -> Result<Response<Body>, Refusal> {
    let refused = |reason: RefuseReason, r: Refusal| {
        node.metrics.refused(reason).increment(1);
        r
    };
    if req.method() != Method::GET {
        return Err(refused(
            RefuseReason::BadRequest,
            Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "upgrade with GET",
            ),
        ));
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if !node.config.origin_allowed(origin) {
        return Err(refused(
            RefuseReason::Origin,
            Refusal::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                "this origin may not connect",
            ),
        ));
    }
    let admission = match admit(node, &req, room).await {
        Ok(a) => a,
        Err(AdmitError::BadRequest(r)) => return Err(refused(RefuseReason::BadRequest, r)),
        Err(AdmitError::Auth(e)) => {
            node.metrics.auth_failure(e);
            debug!(reason = e.label(), "upgrade refused by authentication");
            return Err(refused(RefuseReason::Auth, Refusal::auth(e)));
        }
    };
    let slot = node.reserve_session().map_err(|e| match e {
        SlotError::Capacity => refused(
            RefuseReason::Capacity,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "capacity",
                "this node is full; try another",
            ),
        ),
        SlotError::Draining => refused(
            RefuseReason::Draining,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this node is shutting down; try another",
            ),
        ),
    })?;
    // fastwebsockets checks the handshake headers and builds the 101 answer; the upgraded
    // connection itself is taken from hyper directly (before fastwebsockets would take it), so no
    // `WebSocket` with its 8 KiB read buffer is built only to be torn apart again.
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (response, _unused) = fastwebsockets::upgrade::upgrade(&mut req).map_err(|e| {
        refused(
            RefuseReason::BadRequest,
            Refusal::bad_request(format!("bad WebSocket handshake: {e}")),
        )
    })?;
    let node2 = node.clone();
    node.tracker.spawn(async move {
        let upgraded = tokio::select! {
            r = on_upgrade => r,
            _ = node2.stopping().cancelled() => return,
        };
        match upgraded {
            Ok(upgraded) => session::run(node2, slot, admission, upgraded).await,
            Err(e) => debug!(cause = %e, "upgrade did not complete"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}

/// `GET /api/rooms/{room}/messages?since=E:N&limit=L`: the messages after `since` (all of them,
/// up to `--max-recovery`, or `recovered: false`), or without `since` the last `limit` (default
/// and at most `--max-backlog`). Never more than half of `--outbox-bytes` of frames, cut in
/// Redis: a page cut short says `"truncated": true` (after `since`, the oldest that fit; the
/// caller asks again from the last one; without, the newest that fit).
async fn history(
    node: &Arc<Node>,
    req: Request<Incoming>,
    room: &str,
) -> Result<Response<Body>, Refusal> {
    let room = parse_room(room)?;
    let params = query_params(&req)?;
    may_read_history(node, &req, &params, &room).await?;
    let cfg = &node.config;
    let since = parse_resume(&params)?.since;
    let limit = match param(&params, "limit") {
        None | Some("") => None,
        Some(n) => Some(
            n.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Refusal::bad_request("limit must be a positive number"))?,
        ),
    };
    let query = match &since {
        Some(_) => HistoryQuery {
            since,
            max_recovery: limit.unwrap_or(cfg.max_recovery).min(cfg.max_recovery),
            backlog: 0,
            partial: true,
        },
        None => HistoryQuery {
            since: None,
            max_recovery: cfg.max_recovery,
            backlog: limit.unwrap_or(cfg.max_backlog).min(cfg.max_backlog),
            partial: true,
        },
    };
    match node.history(&room, &query).await {
        Ok(read) => {
            let messages: Vec<&RawValue> = read
                .frames
                .iter()
                .filter_map(|(_, f)| serde_json::from_slice::<&RawValue>(f).ok())
                .collect();
            let epoch = (!read.epoch.is_empty()).then_some(read.epoch.as_str());
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "room": room.as_str(),
                    "epoch": epoch,
                    "offset": read.offset,
                    "recovered": read.recovered().unwrap_or(true),
                    "truncated": read.truncated,
                    "messages": messages,
                }),
            ))
        }
        Err(e) => {
            warn!(room = %room, cause = %e, "history read failed");
            Ok(unavailable())
        }
    }
}

/// Whether `req` may read `room`'s history: the same right as joining it. An API key always may;
/// with `--auth jwt` a token (`Authorization: Bearer` or `?token=`) with a grant for the room that
/// is not banned from it, or no token for a room open to anonymous viewers; with `--auth none`
/// anyone unless an API key is configured.
async fn may_read_history(
    node: &Node,
    req: &Request<Incoming>,
    params: &[(String, String)],
    room: &RoomName,
) -> Result<(), Refusal> {
    if node.config.api_key_required() && check_api_key(&node.config, req).is_ok() {
        return Ok(());
    }
    let Some(verifier) = &node.auth else {
        return check_api_key(&node.config, req);
    };
    let refuse = |e: AuthError| {
        node.metrics.auth_failure(e);
        Refusal::auth(e)
    };
    let Some(token) = bearer_token(req, params) else {
        return if verifier.anonymous_may_view(room) {
            Ok(())
        } else {
            Err(refuse(AuthError::Missing))
        };
    };
    let identity = verifier.verify(token).await.map_err(refuse)?;
    if identity.right(room).is_none() {
        return Err(refuse(AuthError::RoomNotGranted));
    }
    if crate::node::moderation::is_banned(node, &identity.sub, room).await {
        return Err(refuse(AuthError::Banned));
    }
    Ok(())
}

/// Whether `req` may publish through the API: the API key when one is configured (else the API
/// is open: `--auth none`, or `--auth jwt` with `--open-api`), and never from a browser page of
/// another site ([`browser_may_publish`]).
fn may_publish(config: &Config, req: &Request<Incoming>) -> Result<(), Refusal> {
    browser_may_publish(config, req)?;
    check_api_key(config, req)
}

/// The idempotency scope of an API caller that [`may_publish`] let through: a short hash of its
/// key ([`history::api_key_id`]; never the key, which would then sit in Redis), or the open API's
/// one scope ([`matching_api_key`] compares every key in constant time).
fn api_key_scope(config: &Config, req: &Request<Incoming>) -> KeyScope {
    if !config.api_key_required() {
        return KeyScope::Api(None);
    }
    KeyScope::Api(matching_api_key(config, req).map(history::api_key_id))
}

/// Refuses what a web page of another site could make a browser send. Browsers send `Origin`
/// with every cross-site POST (and `Sec-Fetch-Site`); non-browser clients (backends, curl) send
/// neither. A request from a browser must come from an origin listed in `--allowed-origins`
/// (explicitly: the empty list, which admits every origin to WebSockets, admits none here) and
/// carry `Content-Type: application/json`, which a page of another origin can only send after a
/// CORS preflight that this server never approves.
fn browser_may_publish(config: &Config, req: &Request<Incoming>) -> Result<(), Refusal> {
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN);
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    if origin.is_none() && !cross_site {
        return Ok(());
    }
    let listed = origin
        .and_then(|o| o.to_str().ok())
        .is_some_and(|o| config.origin_listed(o));
    if !listed {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "a browser may publish only from an origin listed in --allowed-origins",
        ));
    }
    if media_type(req) != "application/json" {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "a browser must publish with Content-Type: application/json",
        ));
    }
    Ok(())
}

/// The media type of a request's `Content-Type` (lowercase, without parameters), or "".
fn media_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// 503 with `Retry-After: 1`: the broker is unavailable.
fn unavailable() -> Response<Body> {
    let mut r = Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the cluster's broker is unavailable; retry later",
    )
    .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// `POST /api/rooms/{room}/messages`.
async fn publish(
    node: &Arc<Node>,
    req: Request<Incoming>,
    room: &str,
) -> Result<Response<Body>, Refusal> {
    may_publish(&node.config, &req)?;
    let scope = api_key_scope(&node.config, &req);
    let room = parse_room(room)?;
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .filter(|k| history::valid_key(k))
                .ok_or_else(|| {
                    Refusal::bad_request("Idempotency-Key must be 1-128 visible characters")
                })?
                .to_string(),
        ),
    };
    let params = query_params(&req)?;
    let from = match param(&params, "from") {
        None | Some("") => None,
        Some(n) if protocol::valid_name(n) => Some(n.to_string()),
        Some(_) => return Err(Refusal::bad_request("invalid from name")),
    };
    let content_type = media_type(&req);
    let body = read_body(
        req.into_body(),
        node.config.max_message_size,
        node.config.http_body_timeout,
    )
    .await
    .map_err(|e| {
        if matches!(e, BodyError::Timeout(_)) {
            node.metrics.http_timeout(HttpTimeout::Body);
        }
        e.refusal()
    })?;
    let Ok(text) = std::str::from_utf8(&body) else {
        return Err(Refusal::bad_request(
            "the body must be UTF-8 (JSON or text)",
        ));
    };
    let is_json = content_type == "application/json" || content_type.ends_with("+json");
    let data: Box<RawValue> = if content_type.starts_with("text/") {
        protocol::chat_data(text)
    } else {
        match RawValue::from_string(text.trim().to_string()) {
            Ok(v) => v,
            Err(_) if is_json => return Err(Refusal::bad_request("the body is not valid JSON")),
            Err(_) => protocol::chat_data(text),
        }
    };
    if !protocol::encoded_within(&data, node.config.max_message_size) {
        node.metrics.dropped(DropReason::TooLarge).increment(1);
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the message is larger than {} bytes once encoded as JSON (text is escaped)",
                node.config.max_message_size
            ),
        ));
    }
    match node
        .publish(
            &room,
            from.as_deref(),
            Role::Server,
            &data,
            Source::Http,
            false,
            key.as_deref().map(|k| (&scope, k)),
        )
        .await
    {
        Ok(p) => Ok(json(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "id": p.ack.id,
                "ts": p.ts,
                "room": room.as_str(),
                "offset": p.ack.offset,
                "epoch": p.ack.epoch,
                "duplicate": p.ack.duplicate,
            }),
        )),
        Err(e) => {
            warn!(room = %room, cause = %e, "http publish failed");
            Ok(unavailable())
        }
    }
}
