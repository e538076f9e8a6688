//! A horizontally scaled WebSocket gateway for live rooms.
//!
//! Clients join a room as hosts or viewers over WebSocket; a message published in a room — by a
//! client on any node, by a backend through the HTTP API, or by any program with a plain Redis
//! `PUBLISH` — reaches every member of that room on every node, because each node subscribes in
//! Redis to the rooms that have local members. Without Redis, one node runs alone on an
//! in-process broker. The wire contract is `docs/protocol.md`.
//!
//! # Layout
//! Folders by layer; a layer imports only the layers below it (and [`config`], [`metrics`]):
//! - [`http`] — the top: the accept loop with its limits ([`http::server`]), the client port's
//!   routes ([`http::routes`]: `/ws/{room}`, the page, `/api/rooms/{room}/messages`; admission by
//!   token, room right and ban), the moderation routes ([`http::moderation`]), the rooms API
//!   ([`http::rooms`]: counts and member lists), strict requests and
//!   the API key ([`http::request`]), plain responses ([`http::response`]), the page and the
//!   JavaScript client ([`http::assets`]), the admin port ([`http::admin`]: `/metrics`,
//!   `/healthz`, `/readyz`).
//! - [`session`] — one client's life, one task per connection: join, catch-up, greet;
//!   [`session::reader`] (frames → commands, limits) and [`session::writer`] (drains what the
//!   socket did not take at once, batching).
//! - [`node`] — the node ([`node::Node`]: publish path, delayed unsubscribe, session slots) and
//!   its timers: [`node::presence`] (counts, member lists, the node registry and reaping, with
//!   [`node::presence_cache`] and [`node::roster`], this node's listed members), [`node::keepalive`],
//!   [`node::expiry`] (token deadlines), [`node::handover`] (4002 when this node alone lost a Redis shard),
//!   [`node::drain`] (1012 over the drain window), [`node::pacing`]; [`node::moderation`] applies
//!   the control channel's disconnects and checks bans.
//! - [`hooks`] — room lifecycle webhooks, the delivery side: below [`node`] (which owns the
//!   [`hooks::Dispatcher`] and wakes it, [`node::Node::lifecycle_appended`]), above
//!   [`broker`] (its storage: each room's event stream, lease and the recovery index,
//!   `broker/redis/hooks.rs`); imports only [`broker`], [`wire`], [`config`] and [`metrics`].
//!   The dispatcher and its recovery sweep ([`hooks`]), one room's delivery task
//!   ([`hooks::worker`]), the signed request ([`hooks::request`]), the storage seam with the
//!   in-process queue ([`hooks::store`]).
//! - [`moderation`] — the control channel's commands and the bans' storage
//!   ([`moderation::control`]), sessions by user and room with their token deadlines
//!   ([`moderation::registry`]).
//! - [`fanout`] — a room's message from the broker to the members' sockets:
//!   [`fanout::inbound`] (the one door from the broker: classify, count, stamp, in order),
//!   [`fanout::gapfill`] (each room's last offset: repeats dropped, a gap in the node's
//!   subscription filled from history before the messages after it),
//!   [`fanout::write_window`] (`--write-window`: batches hot rooms only), [`fanout::hub`] (local rooms → members'
//!   outboxes), [`fanout::outbox`] (bounded queue, hold and cut for gapless joins, direct writes, riders:
//!   presence and pings that go out with the next room message).
//! - [`broker`] — the seam to the cluster: `Broker` = [`broker::memory`] | [`broker::redis`],
//!   one Redis broker over a transport seam (`redis/conn.rs`: one server or a Sentinel-managed
//!   master vs a Redis Cluster with slot routing; `subscriber.rs` and `cluster.rs` (sharded
//!   pub/sub, shard probes, a fresh connection made before the old one goes when a shard gets
//!   a new master, with `overlap.rs` letting each message through once meanwhile);
//!   `publisher.rs`; `reconnect.rs`, the one backoff loop; `rooms.rs`, the rooms API's reads;
//!   `roster.rs`, the presence tick's script per room, member-list pages and the node registry;
//!   `hooks.rs`, the webhooks' storage (each room's event stream, lease, the recovery index);
//!   `witness.rs`, who else lost a master: the hand-over's question),
//!   [`broker::subscriptions`] (desired vs confirmed, the one diff), [`broker::roster`] (member
//!   lists' types, the per-tick fold into one diff, the in-process roster), [`broker::control`] (the
//!   control channel and bans in Redis) and [`broker::redis_endpoint`] (URL forms and TLS). The
//!   Redis broker numbers, records and publishes a room's messages in one atomic step
//!   ([`broker::scripts`]: `publish.lua`, `history.lua`, `presence.lua` (counts, member lists and
//!   lifecycle events), `members.lua`, `registry.lua`, `counts.lua`, `ban.lua` and the webhooks'
//!   `hook_claim.lua`, `hook_ack.lua`, `hook_release.lua`, run by `EVALSHA`).
//! - [`auth`] — token verification: keys (HMAC, PEM, [`auth::jwks`]), [`auth::claims`] and grants,
//!   [`auth::patterns`] (room patterns of grants and anonymous viewers).
//! - [`wire`] — the bottom: protocol types and encoding once to `Bytes` ([`wire::protocol`]), the
//!   WebSocket frame both ways ([`wire::frame`]), close codes ([`wire::close`]), room positions and
//!   history reads ([`wire::history`]), the one clock ([`wire::clock`]).
//! - [`config`] — every flag and environment variable, defaults, validation (the webhooks'
//!   `--webhook-*` in [`config::WebhookFlags`], `config/webhooks.rs`); [`metrics`] — every
//!   metric name, label and bucket.
//!
//! # A message's way
//! reader → [`node::Node::publish`] (stamp id and `ts`, encode once) → broker (number it with the
//! room's offset and epoch, append it to history, publish — one atomic step) → every subscribed
//! node's [`fanout::inbound::Inbound::receive`] (classify, count) → [`fanout::write_window`] (at
//! once in a room below two messages per window on average; a hot room's messages together,
//! at most once per window) → [`fanout::hub::Hub::fanout`] → each
//! member's outbox (the same `Bytes`, framed once per node): written to the socket by the push
//! itself when the member is idle (one `send`, or one `sendmsg` for a batch; no task wake-up),
//! else queued for the writer, which sends whatever queued in one write. Layers point one way:
//! the broker knows only the inbound handler, the hub only local rooms and members.

pub mod auth;
pub mod broker;
pub mod config;
pub mod fanout;
pub mod hooks;
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
    node::moderation::start(&node);
    info!(
        node = %node.config.node_id,
        client = ?listeners.client.local_addr().ok(),
        admin = ?listeners.admin.local_addr().ok(),
        broker = node.broker.kind(),
        "gateway node started"
    );

    let timeouts = http::server::Timeouts {
        header: node.config.http_header_timeout,
        keepalive: node.config.http_keepalive_timeout,
    };
    let admin_node = node.clone();
    tracker.spawn(http::server::serve(
        listeners.admin,
        move |req| http::admin::handle(admin_node.clone(), req),
        timeouts,
        metrics.clone(),
        stop.clone(),
        tracker.clone(),
    ));
    let client_node = node.clone();
    tracker.spawn(http::server::serve(
        listeners.client,
        move |req| http::routes::handle(client_node.clone(), req),
        timeouts,
        metrics.clone(),
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
