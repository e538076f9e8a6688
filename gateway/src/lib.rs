//! A horizontally scaled WebSocket gateway for live rooms.
//!
//! Clients join a room as hosts or viewers over WebSocket; a message published in a room — by a
//! client on any node, by a backend through the HTTP API, or by any program with a plain Redis
//! `PUBLISH` — reaches every member of that room on every node, because each node subscribes in
//! Redis to the rooms that have local members. Without Redis, one node runs alone on an
//! in-process broker. The wire contract is `docs/protocol.md`.
//!
//! # Layout
//! - [`config`] — every flag and environment variable, defaults, validation.
//! - [`server`] — accept loops, hyper HTTP/1 with upgrades, task tracking.
//! - [`http`] — client port routes: `/ws/{room}`, `/`, `/api/rooms/{room}/messages`, the
//!   moderation routes; admission (token, room right, ban).
//! - [`admin`] — admin port: `/metrics`, `/healthz`, `/readyz`.
//! - [`assets`] — the live-room page and the JavaScript client (`/`, `/page.js`, `/client.js`).
//! - [`session`] — one client's life, one task per connection: [`session::reader`] (frames →
//!   commands, limits), [`session::outbox`] (the way out: a push writes straight to an idle
//!   socket, else queues, bounded), [`session::writer`] (drains what the socket did not take,
//!   batching), [`session::codec`] (client frames off the socket).
//! - [`response`] — the body type, plain JSON/text responses and the refusal every route uses.
//! - [`request`] — strict query decoding and the API key check, below the routes.
//! - [`hub`] — local rooms → members' outboxes; fan-out of a room's messages (framed once).
//! - [`history`] — room positions (epoch + offset), resume requests, history reads, publish
//!   acks: the plain data of continuity; the brokers number and record, sessions catch up.
//! - [`inbound`] — the one door into the hub: classifies, counts and stamps what the broker
//!   received (and the local fallback), then hands one frame to the hub.
//! - [`write_window`] — batches a busy room's messages, one fan-out per window (`--write-window`).
//! - [`node`] — ties hub and broker: publish path, delayed unsubscribe, session slots, drain.
//! - [`broker`] — the seam to the cluster: `Broker` = [`broker::memory`] | [`broker::redis`],
//!   one Redis broker over a transport seam (`redis/conn.rs`: one server or a Sentinel-managed
//!   master vs a Redis Cluster with slot routing; `subscriber.rs` and `cluster.rs` (sharded
//!   pub/sub, shard probes); `publisher.rs`; `reconnect.rs`, the one backoff loop),
//!   [`broker::subscriptions`] (desired vs confirmed, the one diff), [`broker::control`] (the
//!   control channel and bans in Redis) and [`broker::redis_endpoint`] (URL forms and TLS). The
//!   Redis broker numbers, records and publishes a room's messages in one atomic step
//!   ([`broker::scripts`]: `publish.lua`, `history.lua`, `presence.lua`, `ban.lua`, run by
//!   `EVALSHA`).
//! - [`auth`] — token verification: keys (HMAC, PEM, [`auth::jwks`]), [`auth::claims`] and grants.
//! - [`control`] — what the brokers carry for moderation: control commands, the bans' storage.
//! - [`moderation`] — applies the control channel's disconnects on this node; ban checks.
//! - [`moderation_api`] — the moderation routes (kick a user or a room, bans).
//! - [`registry`] — sessions by user and room, with their token deadlines.
//! - [`expiry`] — the token timer: `expiring` events, 4010 closes.
//! - [`presence`] — the presence timer: local counts to the broker, cluster counts to members.
//! - [`presence_cache`] — the last tick's cluster-wide counts, for a joining client's estimate.
//! - [`keepalive`] — the ping timer: pings every session, closes silent ones.
//! - [`handover`] — closes a node's clients (4002) when it lost Redis, so they resume elsewhere.
//! - [`pacing`] — spreads node-wide rounds (presence, pings) over a short window.
//! - [`shutdown`] — the drain: 1012 closes spread evenly over the drain window.
//! - [`protocol`] — wire types, parsing, encoding once to `Bytes`.
//! - [`disconnect`] — close codes, their reasons and reconnect meaning.
//! - [`metrics`] — every metric name, label and bucket.
//!
//! # A message's way
//! reader → [`node::Node::publish`] (stamp id and `ts`, encode once) → broker (number it with the
//! room's offset and epoch, append it to history, publish — one atomic step) → every subscribed
//! node's [`inbound::Inbound::receive`] (classify, count) → [`write_window`] (at once for a quiet
//! room; a busy room's messages together, once per window) → [`hub::Hub::fanout`] → each member's
//! outbox (the same `Bytes`, framed once per node): written to the socket by the push itself
//! when the member is idle (one `send`, or one `sendmsg` for a batch; no task wake-up), else
//! queued for the writer, which sends whatever queued in one write. Layers point one way: the broker knows only the inbound handler, the hub
//! only local rooms and members.

pub mod auth;
pub mod broker;
pub mod config;
pub mod fanout;
pub mod http;
pub mod metrics;
pub mod moderation;
pub mod node;
pub mod session;
pub mod wire;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;

/// Extra time after the drain window for the last sessions and tasks to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The node's bound listeners.
#[derive(Debug)]
pub struct Listeners {
    /// WebSocket clients and the HTTP API.
    pub client: TcpListener,
    /// Metrics and health.
    pub admin: TcpListener,
}

/// Why a node could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] broker::BrokerError),
    /// The authentication keys are unusable.
    #[error(transparent)]
    Keys(#[from] auth::KeyError),
}

/// Runs a node until `shutdown` is cancelled, then drains: `/readyz` fails, the client listener
/// stops, clients are closed with 1012 spread over `--drain-seconds`, and everything stops within
/// the drain window plus [`SHUTDOWN_GRACE`].
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    config.validate()?;
    let metrics = metrics::Metrics::new(&config.node_id);
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let auth = auth::Verifier::from_config(&config)?.map(std::sync::Arc::new);
    if let Some(jwks) = auth.as_ref().and_then(|a| a.jwks()) {
        tracker.spawn(jwks.clone().run(stop.clone()));
    }
    let node = node::Node::start(config, metrics.clone(), tracker.clone(), stop.clone(), auth)?;
    moderation::start(&node);
    info!(
        node = %node.config.node_id,
        client = ?listeners.client.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        broker = node.broker.kind(),
        "gateway node started"
    );

    let admin_node = node.clone();
    tracker.spawn(http::server::serve(
        listeners.admin,
        move |req| http::admin::handle(admin_node.clone(), req),
        stop.clone(),
        tracker.clone(),
    ));
    let client_node = node.clone();
    tracker.spawn(http::server::serve(
        listeners.client,
        move |req| http::routes::handle(client_node.clone(), req),
        node.draining().clone(),
        tracker.clone(),
    ));
    tracker.spawn(node::presence::run(node.clone()));
    tracker.spawn(node::keepalive::run(node.clone()));
    tracker.spawn(node::handover::run(node.clone()));
    tracker.spawn(node::expiry::run(node.clone()));
    let upkeep = metrics.clone();
    let upkeep_stop = stop.clone();
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(metrics::Metrics::UPKEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });

    shutdown.cancelled().await;
    let window = node.config.drain_window();
    info!(sessions = node.session_count(), window = ?window, "draining");
    node::drain::drain(&node, window, SHUTDOWN_GRACE / 2).await;
    if node.session_count() > 0 {
        warn!(
            sessions = node.session_count(),
            "drain over with sessions left; stopping anyway"
        );
    }
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE / 2, tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop in time");
    }
    info!("gateway node stopped");
    Ok(())
}
