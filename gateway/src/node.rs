//! The node: ties the hub (local rooms) to the broker (the cluster), owns the publish path, the
//! delayed unsubscribe, the live-session count behind `--max-connections`, and the drain state.
//!
//! Every publish — a client's, the HTTP API's — stamps an id and `ts`, encodes the frame once and
//! hands it to the broker; members receive it only when it comes back from the broker (to this
//! node as to every other), never directly, so nobody gets a message twice.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::memory::MemoryBroker;
use crate::broker::redis::{RedisBroker, RedisTimeouts};
use crate::broker::redis_cluster::RedisClusterBroker;
use crate::broker::redis_endpoint::Endpoint;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::{DropReason, Metrics, Source, StateGauges};
use crate::protocol::{self, Message, Role, RoomName};
use crate::session::outbox::Outbox;

/// A message the broker accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Its cluster-unique id.
    pub id: String,
    /// Its publish time, unix microseconds.
    pub ts: u64,
}

/// One gateway node.
#[derive(Debug)]
pub struct Node {
    /// The validated configuration.
    pub config: Config,
    /// Local rooms.
    pub hub: Arc<Hub>,
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
    pub presence: crate::presence::PresenceCache,
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
    ) -> Result<Arc<Node>, BrokerError> {
        let hub = Arc::new(Hub::new(
            &config.node_id,
            metrics.clone(),
            config.max_message_size,
        ));
        let timeouts = RedisTimeouts {
            command: config.redis_timeout,
            probe_interval: config.redis_probe_interval,
        };
        let broker = match &config.redis_url {
            None => Broker::Memory(MemoryBroker::new(hub.clone())),
            Some(url) => match Endpoint::parse(url, &config.redis_tls())? {
                Endpoint::Cluster(seeds) => Broker::RedisCluster(RedisClusterBroker::start(
                    seeds,
                    &config.channel_prefix,
                    hub.clone(),
                    metrics.clone(),
                    timeouts,
                    &tracker,
                    stop.clone(),
                )?),
                endpoint => Broker::Redis(RedisBroker::start(
                    endpoint,
                    &config.channel_prefix,
                    hub.clone(),
                    metrics.clone(),
                    timeouts,
                    &tracker,
                    stop.clone(),
                )?),
            },
        };
        Ok(Arc::new(Node {
            config,
            hub,
            broker,
            metrics,
            tracker,
            draining: stop.child_token(),
            stop,
            sessions: AtomicUsize::new(0),
            session_ended: Notify::new(),
            next_session: std::sync::atomic::AtomicU64::new(1),
            presence: Default::default(),
        }))
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
                    node.hub.if_empty(&room, || node.broker.unsubscribe(&room));
                }
            }
        });
    }

    /// Publishes `data` in `room` for the whole cluster.
    ///
    /// When the broker fails and `local_fallback` is set (client publishes), the message is still
    /// delivered to this node's members of the room — local fan-out keeps working through a
    /// Redis outage — and the error tells the caller that the rest of the cluster missed it.
    pub async fn publish(
        &self,
        room: &RoomName,
        from: Option<&str>,
        role: Role,
        data: &RawValue,
        source: Source,
        local_fallback: bool,
    ) -> Result<Published, PublishFailure> {
        let id = self.hub.next_message_id();
        let ts = protocol::now_micros();
        let frame = Message::new(room.as_str(), from, role, data, &id, ts).encode();
        match self.broker.publish(room, frame.clone()).await {
            Ok(()) => {
                self.metrics.published(source).increment(1);
                Ok(Published { id, ts })
            }
            Err(error) => {
                self.metrics
                    .dropped(DropReason::BrokerUnavailable)
                    .increment(1);
                self.metrics.broker_publish_errors.increment(1);
                if local_fallback {
                    self.hub.deliver_local(room, frame, ts);
                }
                Err(PublishFailure {
                    error,
                    delivered_locally: local_fallback,
                })
            }
        }
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
