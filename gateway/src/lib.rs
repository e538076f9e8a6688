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
//! - [`http`] — client port routes: `/ws/{room}`, `/`, `/api/rooms/{room}/messages`; admission.
//! - [`admin`] — admin port: `/metrics`, `/healthz`, `/readyz`.
//! - [`assets`] — the live-room page and the JavaScript client (`/`, `/page.js`, `/client.js`).
//! - [`session`] — one client's life: [`session::reader`] (frames → commands, limits),
//!   [`session::writer`] (outbox → socket, batching), [`session::outbox`] (the bounded queue
//!   between the hub and a writer), [`session::codec`] (client frames off the socket).
//! - [`hub`] — local rooms → members' outboxes; fan-out of one encoded message.
//! - [`node`] — ties hub and broker: publish path, delayed unsubscribe, session slots, drain.
//! - [`broker`] — the seam to the cluster: [`broker::memory`], [`broker::redis`] (one Redis or
//!   a Sentinel-managed master), [`broker::redis_cluster`] (sharded pub/sub) and
//!   [`broker::redis_endpoint`] (URL forms and TLS).
//! - [`presence`] — the presence timer: local counts to the broker, cluster counts to members.
//! - [`keepalive`] — the ping timer: pings every session, closes silent ones.
//! - [`pacing`] — spreads node-wide rounds (presence, pings) over a short window.
//! - [`shutdown`] — the drain: 1012 closes spread evenly over the drain window.
//! - [`protocol`] — wire types, parsing, encoding once to `Bytes`.
//! - [`disconnect`] — close codes, their reasons and reconnect meaning.
//! - [`metrics`] — every metric name, label and bucket.
//!
//! # A message's way
//! reader → [`node::Node::publish`] (stamp id and `ts`, encode once) → broker → every subscribed
//! node's [`hub::Hub::deliver`] → each member's outbox (the same `Bytes`) → writer, one write per
//! batch.

pub mod admin;
pub mod assets;
pub mod broker;
pub mod config;
pub mod disconnect;
pub mod http;
pub mod hub;
pub mod keepalive;
pub mod metrics;
pub mod node;
pub mod pacing;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shutdown;

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
    let node = node::Node::start(config, metrics.clone(), tracker.clone(), stop.clone())?;
    info!(
        node = %node.config.node_id,
        client = ?listeners.client.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        broker = node.broker.kind(),
        "gateway node started"
    );

    let admin_node = node.clone();
    tracker.spawn(server::serve(
        listeners.admin,
        move |req| admin::handle(admin_node.clone(), req),
        stop.clone(),
        tracker.clone(),
    ));
    let client_node = node.clone();
    tracker.spawn(server::serve(
        listeners.client,
        move |req| http::handle(client_node.clone(), req),
        node.draining().clone(),
        tracker.clone(),
    ));
    tracker.spawn(presence::run(node.clone()));
    tracker.spawn(keepalive::run(node.clone()));
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
    shutdown::drain(&node, window, SHUTDOWN_GRACE / 2).await;
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
