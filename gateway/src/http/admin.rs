//! Routes of the admin port (keep it off the public network): `GET /metrics` (Prometheus text),
//! `GET /healthz` (the process is alive; never depends on Redis, so a Redis outage does not get
//! every pod restarted) and `GET /readyz` (accepting clients and the broker is connected).

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::http::response::{json, text, Body};
use crate::node::Node;

/// Dispatches one request of the admin port.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n",
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            node.render_metrics(),
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let draining = node.is_draining();
            let broker = node.broker.is_connected();
            let status = if node.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                &serde_json::json!({
                    "ready": status == StatusCode::OK,
                    "node": node.config.node_id,
                    "draining": draining,
                    "broker": node.broker.kind(),
                    "broker_connected": broker,
                    "connections": node.session_count(),
                    "rooms": node.hub.room_count(),
                }),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}
