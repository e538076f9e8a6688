//! The rooms API (issue 22): `GET /api/rooms` (the rooms with members cluster-wide and their
//! counts, paged) and `GET /api/rooms/{room}/presence` (one room's counts and, for a room that
//! lists its members, a page of them), for backends with the API key. What it reads is the
//! broker's ([`crate::broker::Broker::rooms`], [`crate::broker::Broker::room_counts`],
//! [`crate::broker::Broker::members`]); the routing is [`crate::http::routes`]'.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::warn;

use crate::broker::BrokerError;
use crate::http::request::{param, query_params, require_api_key};
use crate::http::response::{json, Body, Refusal};
use crate::http::routes::parse_room;
use crate::node::Node;

/// Most rooms one page of `GET /api/rooms` asks for.
const MAX_ROOMS_PAGE: usize = 1000;

/// `GET /api/rooms?limit=N&cursor=C` — the rooms with members anywhere in the cluster and their
/// counts, a page of about `limit` (default 100, at most 1000) and the next page's cursor (`null`
/// when done) — and `GET /api/rooms/{room}/presence` — one room's counts. Both as the nodes last
/// reported them (at most one `--presence-interval` old), with the API key; refused (403) on a
/// node without `--api-key`. A listing room's presence adds a page of its members
/// (`?cursor=&limit=`, as the `members` command pages), `"listing":true`; others say
/// `"listing":false` (and `"over_limit":true` above `--list-max-members`).
pub async fn serve(
    node: &Arc<Node>,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, Refusal> {
    if req.method() != Method::GET {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ));
    }
    require_api_key(&node.config, &req, "rooms")?;
    let failed = |e: BrokerError| match e {
        BrokerError::Config(m) => Refusal::bad_request(m),
        e => {
            warn!(cause = %e, "rooms API read failed");
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the cluster's broker is unavailable; retry later",
            )
        }
    };
    if let Some(room) = path
        .strip_prefix("/api/rooms/")
        .and_then(|r| r.strip_suffix("/presence"))
    {
        let room = parse_room(room)?;
        let params = query_params(&req)?;
        let limit = page_limit(&params, crate::broker::roster::PAGE)?;
        let c = node
            .broker
            .room_counts(&room, || node.hub.counts(&room))
            .await
            .map_err(failed)?;
        let mut body =
            serde_json::json!({"room": room.as_str(), "hosts": c.hosts, "viewers": c.viewers});
        // A room lists when it matches --list-rooms, or when grants put members on its list.
        let page = node
            .broker
            .members(&room, param(&params, "cursor"), limit)
            .await
            .map_err(failed)?;
        let listing = !page.over && (node.lists(&room, false) || page.version > 0);
        body["listing"] = listing.into();
        if listing {
            body["v"] = page.version.into();
            body["members"] = serde_json::json!(page.members);
            body["cursor"] = serde_json::json!(page.cursor);
        } else if page.over {
            body["over_limit"] = true.into();
        }
        return Ok(json(StatusCode::OK, &body));
    }
    let params = query_params(&req)?;
    let limit = page_limit(&params, 100)?;
    let (rooms, next) = node
        .broker
        .rooms(param(&params, "cursor"), limit, || node.hub.snapshot())
        .await
        .map_err(failed)?;
    let rooms: Vec<serde_json::Value> = rooms
        .iter()
        .map(|(r, c)| serde_json::json!({"room": r.as_str(), "hosts": c.hosts, "viewers": c.viewers}))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"rooms": rooms, "cursor": next}),
    ))
}

/// The `limit` of a rooms API page: `default` when absent, else 1 to [`MAX_ROOMS_PAGE`].
fn page_limit(params: &[(String, String)], default: usize) -> Result<usize, Refusal> {
    match param(params, "limit") {
        None | Some("") => Ok(default),
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_ROOMS_PAGE).contains(n))
            .ok_or_else(|| Refusal::bad_request(format!("limit must be 1 to {MAX_ROOMS_PAGE}"))),
    }
}
