//! The node: ties the hub (local rooms) to the broker (the cluster), owns the publish path, the
//! delayed unsubscribe, the live-session count behind `--max-connections`, and the drain state.
//!
//! Every publish — a client's, the HTTP API's — stamps an id and `ts`, encodes the frame once
//! (without its `offset`/`epoch` tail, which the broker appends when it numbers the message) and
//! hands it to the broker; members receive it only when it comes back from the broker (to this
//! node as to every other), never directly, so nobody gets a message twice.

pub mod drain;
pub mod expiry;
pub mod handover;
pub mod keepalive;
pub mod moderation;
pub mod pacing;
pub mod presence;
pub mod presence_cache;
pub mod roster;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use futures_util::future::BoxFuture;

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisSetup, RedisTimeouts};
use crate::broker::redis_endpoint::Endpoint;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::fanout::gapfill::{Missed, MissedSource};
use crate::fanout::hub::Hub;
use crate::fanout::inbound::Inbound;
use crate::fanout::outbox::Outbox;
use crate::fanout::write_window::WriteWindow;
use crate::hooks::Dispatcher;
use crate::metrics::{DropReason, Metrics, Source, StateGauges};
use crate::moderation::registry::Registry;
use crate::node::presence_cache::PresenceCache;
use crate::wire::history::{Ack, HistoryQuery, HistoryRead, KeyScope, Recovery, Since};
use crate::wire::protocol::{Message, Role, RoomName};

/// Pause between two attempts of a failed history read.
const HISTORY_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// A message the broker accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its cluster-unique id.
    pub id: String,
    /// Its publish time, unix microseconds.
    pub ts: u64,
    /// Its offset, epoch, and whether it was a repeat of an idempotency key.
    pub ack: Ack,
}

/// One gateway node.
#[derive(Debug)]
pub struct Node {
    /// The validated configuration.
    pub config: Config,
    /// Local rooms.
    pub hub: Arc<Hub>,
    /// The one way into the hub: what the broker received, and the local fallback.
    pub inbound: Arc<Inbound>,
    /// The cluster.
    pub broker: Broker,
    /// This node's metrics.
    pub metrics: Metrics,
    /// Tracks every task the node spawns (sessions, timers, broker tasks).
    pub tracker: TaskTracker,
    /// Cancelled when draining starts: the client listener stops, sessions close over the drain
    /// window, `/readyz` fails.
    draining: CancellationToken,
    /// Cancelled last: background tasks (broker, timers, admin port) stop.
    stop: CancellationToken,
    /// Live WebSocket sessions (reserved before the upgrade, released when the session ends).
    sessions: AtomicUsize,
    /// Notified whenever a session ends, for the drain to wait on.
    session_ended: Notify,
    /// Session ids, unique on this node.
    next_session: std::sync::atomic::AtomicU64,
    /// Cluster-wide room counts of the last presence tick.
    pub presence: PresenceCache,
    /// The token verifier; `None` with `--auth none`.
    pub auth: Option<Arc<Verifier>>,
    /// Sessions by id with their user, room and token deadline (moderation, expiry).
    pub registry: Registry,
    /// The webhook dispatcher; `None` without `--webhook-url`.
    pub hooks: Option<Arc<Dispatcher>>,
    /// This incarnation of the node: `--node-id`, a colon and a random boot nonce, so that a
    /// node restarted with the same id never inherits a dead incarnation's counts and members
    /// (the presence fields, roster entries and registry entry are the instance's).
    pub instance: String,
    /// This node's listed members ([`roster::LocalRoster`]).
    pub roster: roster::LocalRoster,
    /// `--list-rooms`, parsed once.
    list_rooms: crate::auth::RoomPatterns,
}

/// A publish the broker did not take.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct PublishFailure {
    /// What the broker said.
    pub error: BrokerError,
    /// Whether this node's own members of the room got the message anyway.
    pub delivered_locally: bool,
}

/// A reserved session slot; dropping it releases the slot.
#[derive(Debug)]
pub struct SessionSlot {
    node: Arc<Node>,
    /// The session's id on this node.
    pub id: u64,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.node.sessions.fetch_sub(1, Ordering::AcqRel);
        self.node.session_ended.notify_waiters();
    }
}

/// A gap in what this node's subscription brought is read from the room's history, as a resume
/// would read it (up to [`crate::fanout::gapfill::MAX_FILL`] messages within the read's byte
/// budget; more is reported as incomplete, with the room's position).
impl MissedSource for Node {
    fn missed(self: Arc<Self>, room: RoomName, since: Since) -> BoxFuture<'static, Option<Missed>> {
        Box::pin(async move {
            let query = HistoryQuery {
                since: Some(since),
                max_recovery: crate::fanout::gapfill::MAX_FILL as usize,
                backlog: 0,
                partial: false,
            };
            let read = self.history(&room, &query).await.ok()?;
            Some(Missed {
                position: read.offset,
                complete: read.recovery == Some(Recovery::Complete),
                frames: read.frames,
            })
        })
    }
}

/// Why a session slot could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// `--max-connections` reached.
    Capacity,
    /// The node is draining.
    Draining,
}

impl Node {
    /// Builds the node and starts its broker tasks on `tracker`; they run until `stop`.
    pub fn start(
        config: Config,
        metrics: Metrics,
        tracker: TaskTracker,
        stop: CancellationToken,
        auth: Option<Arc<Verifier>>,
    ) -> Result<Arc<Node>, BrokerError> {
        let hub = Arc::new(Hub::new());
        let inbound = Arc::new(
            Inbound::new(
                &config.node_id,
                hub.clone(),
                metrics.clone(),
                config.max_message_size,
            )
            .with_direct_write_max_rate(config.direct_write_max_rate)
            .with_write_window(WriteWindow::new(config.write_window)),
        );
        tracker.spawn(inbound.clone().run_window(stop.clone()));
        let limits = config.history_limits();
        let broker = match &config.redis_url {
            None => Broker::Memory(MemoryBroker::new(inbound.clone(), metrics.clone(), limits)),
            Some(url) => Broker::Redis(RedisBroker::start(
                RedisSetup {
                    endpoint: Endpoint::parse(url, &config.redis_tls())?,
                    prefix: config.channel_prefix.clone(),
                    inbound: inbound.clone(),
                    metrics: metrics.clone(),
                    timeouts: RedisTimeouts {
                        command: config.redis_timeout,
                        probe_interval: config.redis_probe_interval,
                        backoff_cap: config.redis_backoff_cap,
                    },
                    limits,
                },
                &tracker,
                stop.clone(),
            )?),
        };
        let registry = Registry::new(config.token_expiry_warning.as_millis() as u64);
        let instance = format!("{}:{:016x}", config.node_id, fastrand::u64(..));
        let hooks = Dispatcher::new(
            &config,
            &instance,
            &broker,
            metrics.clone(),
            tracker.clone(),
            stop.clone(),
        )
        .map_err(|e| BrokerError::Config(e.to_string()))?;
        if let Some(h) = &hooks {
            h.spawn();
        }
        let roster = roster::LocalRoster::new(config.list_max_members);
        let list_rooms = config.list_patterns();
        let node = Arc::new(Node {
            config,
            hub,
            inbound,
            broker,
            metrics,
            tracker,
            draining: stop.child_token(),
            stop,
            sessions: AtomicUsize::new(0),
            session_ended: Notify::new(),
            next_session: std::sync::atomic::AtomicU64::new(1),
            presence: Default::default(),
            auth,
            registry,
            hooks,
            instance,
            roster,
            list_rooms,
        });
        let source: Weak<dyn MissedSource> = Arc::downgrade(&node) as Weak<Node>;
        node.inbound.set_missed_source(source, node.tracker.clone());
        Ok(node)
    }

    /// Whether a member of `room` is listed and sees the list (docs/protocol.md, "Member
    /// lists"): the room matches `--list-rooms`, or the member's grant says `"list": true`.
    pub fn lists(&self, room: &RoomName, grant_lists: bool) -> bool {
        grant_lists || self.list_rooms.covers(room)
    }

    /// Reserves a session slot before the upgrade.
    pub fn reserve_session(self: &Arc<Self>) -> Result<SessionSlot, SlotError> {
        if self.is_draining() {
            return Err(SlotError::Draining);
        }
        let max = self.config.max_connections;
        let before = self.sessions.fetch_add(1, Ordering::AcqRel);
        let slot = SessionSlot {
            node: self.clone(),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
        };
        if max != 0 && before >= max {
            drop(slot);
            return Err(SlotError::Capacity);
        }
        Ok(slot)
    }

    /// Live sessions (including upgrades in progress).
    pub fn session_count(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Adds a member to `room`; subscribes the broker when it is the room's first local member.
    pub fn join(&self, room: &RoomName, session: u64, role: Role, outbox: Arc<Outbox>) {
        self.metrics.connections_opened.increment(1);
        self.hub
            .join(room, session, role, outbox, || self.broker.subscribe(room));
    }

    /// Removes a member; when the room has no local member left, unsubscribes after
    /// `--unsubscribe-delay` unless someone joined again meanwhile.
    pub fn leave(self: &Arc<Self>, room: &RoomName, session: u64, _role: Role) {
        if !self.hub.leave(room, session) {
            return;
        }
        let node = self.clone();
        let room = room.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = node.stop.cancelled() => {}
                _ = tokio::time::sleep(node.config.unsubscribe_delay) => {
                    node.hub.if_empty(&room, || {
                        node.broker.unsubscribe(&room);
                        node.inbound.forget(&room);
                    });
                }
            }
        });
    }

    /// Publishes `data` in `room` for the whole cluster, once per idempotency `key` of its
    /// publisher: the broker remembers the key in its [`KeyScope`], so that another publisher's
    /// equal key never suppresses this message.
    ///
    /// When the broker fails and `local_fallback` is set (client publishes), the message is still
    /// delivered to this node's members of the room — local fan-out keeps working through a
    /// Redis outage, without an offset — and the error tells the caller that the rest of the
    /// cluster missed it.
    #[allow(clippy::too_many_arguments)]
    pub async fn publish(
        &self,
        room: &RoomName,
        from: Option<&str>,
        role: Role,
        data: &RawValue,
        source: Source,
        local_fallback: bool,
        key: Option<(&KeyScope, &str)>,
    ) -> Result<Published, PublishFailure> {
        let id = self.inbound.next_message_id();
        let ts = crate::wire::clock::unix_micros();
        let prefix = Message::new(room.as_str(), from, role, data, &id, ts).encode_prefix();
        let key = key.map(|(scope, key)| scope.scoped(key));
        match self
            .broker
            .publish(room, prefix.clone(), &id, key.as_deref())
            .await
        {
            Ok(ack) => {
                if ack.duplicate {
                    self.metrics.publish_duplicates.increment(1);
                } else {
                    self.metrics.published(source).increment(1);
                }
                Ok(Published { id, ts, ack })
            }
            Err(error) => {
                self.metrics
                    .dropped(DropReason::BrokerUnavailable)
                    .increment(1);
                self.metrics.broker_publish_errors.increment(1);
                if local_fallback {
                    let mut frame = prefix.to_vec();
                    frame.push(b'}');
                    self.inbound.deliver(room, frame.into(), ts, None);
                }
                Err(PublishFailure {
                    error,
                    delivered_locally: local_fallback,
                })
            }
        }
    }

    /// The lifecycle scripts appended events to `room`'s event stream: wake its webhook
    /// delivery (the node reaper calls it too, for a dead node's rooms). Does nothing without
    /// `--webhook-url`; never blocks.
    pub fn lifecycle_appended(&self, room: &RoomName) {
        if let Some(h) = &self.hooks {
            h.wake(room);
        }
    }

    /// In process (no Redis, so no lifecycle script): records one lifecycle event of `room`
    /// (its JSON without `id`) for the webhooks and wakes their delivery. With Redis the
    /// scripts append to the stream and this only wakes. Nothing without `--webhook-url`.
    pub fn lifecycle_in_process(&self, room: &RoomName, event: String) {
        if let Some(h) = &self.hooks {
            h.append_in_process(room, event);
        }
    }

    /// Reads `room`'s position and history (timed in the history read latency). A failed read
    /// is retried until `--redis-timeout` has passed: the first command on a connection that
    /// died unnoticed (Redis restarted) fails and hands it to be replaced, and a joining client is
    /// better served by a short wait than by a welcome without a position.
    pub async fn history(
        &self,
        room: &RoomName,
        query: &HistoryQuery,
    ) -> Result<HistoryRead, BrokerError> {
        let start = std::time::Instant::now();
        let read = loop {
            let read = self.broker.history(room, query).await;
            if read.is_ok() || start.elapsed() + HISTORY_RETRY > self.config.redis_timeout {
                break read;
            }
            tokio::time::sleep(HISTORY_RETRY).await;
        };
        self.metrics
            .history_read_latency
            .record(start.elapsed().as_secs_f64());
        if read.as_ref().is_ok_and(|r| r.truncated) {
            self.metrics.history_reads_truncated.increment(1);
        }
        read
    }

    /// The Prometheus text of `GET /metrics`. The state gauges are read here, from the state's
    /// owners, at the moment of the scrape — the same reads `/readyz` makes — never pushed by the
    /// tasks that change the state (issue 15).
    pub fn render_metrics(&self) -> String {
        self.metrics.render(&self.state_gauges())
    }

    /// The current values of the state gauges.
    pub fn state_gauges(&self) -> StateGauges {
        let (members, rooms) = self.hub.totals();
        StateGauges {
            broker_connected: self.broker.is_connected(),
            broker_subscriptions: self.broker.subscription_count(),
            hosts: members.hosts,
            viewers: members.viewers,
            rooms,
            max_connections: self.config.max_connections,
            redis_shards: self.broker.shard_states(),
            webhook_leases: self.hooks.as_ref().map_or(0, |h| h.leases()),
            webhook_oldest_pending: self
                .hooks
                .as_ref()
                .map_or(0.0, |h| h.oldest_pending().as_secs_f64()),
            list_members: self.roster.size(),
        }
    }

    /// Ready for clients: not draining and the broker is connected.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_connected()
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Cancelled when draining starts.
    pub fn draining(&self) -> &CancellationToken {
        &self.draining
    }

    /// Cancelled when the node stops for good.
    pub fn stopping(&self) -> &CancellationToken {
        &self.stop
    }

    /// Starts draining (idempotent).
    pub fn begin_drain(&self) {
        self.draining.cancel();
    }

    /// Resolves when no session is left.
    pub async fn sessions_gone(&self) {
        loop {
            let ended = self.session_ended.notified();
            if self.session_count() == 0 {
                return;
            }
            ended.await;
        }
    }
}
