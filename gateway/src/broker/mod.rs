//! The broker seam: how a node hears about every room it has local members in, and how it
//! publishes into a room for the whole cluster.
//!
//! Two implementations sit behind [`Broker`]: [`memory`] (one node alone, no Redis) and
//! [`redis`] (one Redis server, a Sentinel-managed master or a Redis Cluster, over one transport
//! seam); [`redis_endpoint`] parses the URL that picks the transport, [`scripts`] holds the Lua
//! scripts, [`control`] the control channel and the bans in Redis. Both hand what they receive
//! to the node's [`Inbound`](crate::fanout::inbound::Inbound) handler, never blocking on it;
//! they know nothing else of the node. Subscriptions are a *desired set* that the broker
//! converges to ([`subscriptions`]): [`Broker::subscribe`] and [`Broker::unsubscribe`] only
//! change the set (and are called under the hub's lock, so the order of changes is the order of
//! joins and leaves); the Redis subscriber task sends the difference to Redis, and sends the
//! whole set again after a reconnect.
//!
//! An enum rather than a trait object: there are two implementations, both known here, and the
//! hot path (publish) stays a direct call.

pub mod control;
pub mod memory;
pub mod redis;
pub mod redis_endpoint;
pub mod roster;
pub mod scripts;
pub mod subscriptions;

use std::time::Duration;

use bytes::Bytes;

use crate::wire::history::{Ack, HistoryQuery, HistoryRead};
use crate::wire::protocol::{RoomCounts, RoomName};

/// Where a broker hands every message it receives, in order: the node's inbound handler
/// ([`crate::fanout::inbound::Inbound`]), as centrifuge's brokers hand theirs to a
/// `BrokerEventHandler`. The broker knows only this trait, so it imports nothing above it.
pub trait Receiver: Send + Sync + std::fmt::Debug {
    /// A message arrived on `room`'s channel (the channel name without its prefix; not
    /// necessarily a valid room: the receiver checks). Never blocks.
    fn receive(&self, room: &str, payload: Bytes);
}

/// Why a publish did not reach the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker is not connected (Redis down or reconnecting).
    #[error("broker unavailable")]
    Unavailable,
    /// The broker did not answer in time; the connection is being replaced.
    #[error("broker timed out")]
    Timeout,
    /// The broker answered with an error or the connection failed mid-command.
    #[error("broker error: {0}")]
    Failed(String),
    /// Redis had no cached copy of a script (it restarted); the caller loads it and retries.
    #[error("script not loaded")]
    NoScript,
    /// The configuration is unusable (a malformed Redis URL).
    #[error("invalid broker configuration: {0}")]
    Config(String),
}

/// How an outage of a broker's shard looks from outside this node (asked of a witness: the
/// sentinels, or another Redis Cluster node; see `redis/witness.rs`). The hand-over
/// (`node/handover.rs`) closes members only for `Alone`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// Every node lost it alike (a failover is coming, or the master is gone for all): a move
    /// to another node helps no client. Why, for the log.
    Shared(&'static str),
    /// This node is cut off while others are not (or no witness can tell): a move helps. Why,
    /// for the log.
    Alone(&'static str),
}

/// The node's broker.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per node, never moved on a hot path
pub enum Broker {
    /// In-process: one node alone.
    Memory(memory::MemoryBroker),
    /// Redis: one server, a Sentinel-managed master or a Redis Cluster (sharded pub/sub).
    Redis(redis::RedisBroker),
}

impl Broker {
    /// Adds `room` to the desired subscriptions. Cheap and synchronous.
    pub fn subscribe(&self, room: &RoomName) {
        match self {
            Self::Memory(b) => b.subscribe(room),
            Self::Redis(b) => b.subscribe(room),
        }
    }

    /// Removes `room` from the desired subscriptions. Cheap and synchronous.
    pub fn unsubscribe(&self, room: &RoomName) {
        match self {
            Self::Memory(b) => b.unsubscribe(room),
            Self::Redis(b) => b.unsubscribe(room),
        }
    }

    /// Waits until the broker has confirmed the subscription to `room`, at most `limit`. Returns
    /// whether it is confirmed.
    pub async fn wait_subscribed(&self, room: &RoomName, limit: Duration) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(b) => tokio::time::timeout(limit, b.wait_subscribed(room))
                .await
                .unwrap_or(false),
        }
    }

    /// Publishes a message to every node subscribed to `room` (this one included): numbers it
    /// with the room's next offset and epoch, appends it to the room's history and remembers
    /// `key` — all in one atomic step. `prefix` is the encoded frame without its closing `}`; the
    /// broker appends `,"offset":N,"epoch":"E"}`. A repeat of `key` within `--idempotency-ttl`
    /// publishes nothing and returns the first publish's ack, marked `duplicate`.
    pub async fn publish(
        &self,
        room: &RoomName,
        prefix: Bytes,
        id: &str,
        key: Option<&str>,
    ) -> Result<Ack, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.publish(room, &prefix, id, key)),
            Self::Redis(b) => b.publish(room, prefix, id, key).await,
        }
    }

    /// Reads `room`'s position and the history `query` asks for, in one atomic step.
    pub async fn history(
        &self,
        room: &RoomName,
        query: &HistoryQuery,
    ) -> Result<HistoryRead, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.history(room, query)),
            Self::Redis(b) => b.history(room, query).await,
        }
    }

    /// One presence tick of node instance `instance`: per room, its counts (or their
    /// withdrawal) and, for a room that lists, its roster changes; per room the cluster-wide
    /// counts and the roster's answer (the batches after the version seen last). The in-process
    /// broker is the whole cluster: the counts are the node's, the roster its [`roster::RosterBook`]
    /// (no lifecycle events: they are for webhooks, which need Redis).
    pub async fn tick(
        &self,
        instance: &str,
        rooms: &[roster::RoomTick<'_>],
        ttl: Duration,
        events: bool,
    ) -> Vec<redis::TickAnswer> {
        match self {
            Self::Memory(b) => rooms
                .iter()
                .map(|t| Ok(b.tick(t.room, t.counts, t.roster.as_ref(), events)))
                .collect(),
            Self::Redis(b) => b.tick(instance, rooms, ttl, events).await,
        }
    }

    /// A page of `room`'s member list after `cursor` (`None`: from the start), about `limit`
    /// members. A malformed cursor is [`BrokerError::Config`].
    pub async fn members(
        &self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<roster::MembersPage, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.roster.members(room, cursor, limit)),
            Self::Redis(b) => b.members(room, cursor, limit).await,
        }
    }

    /// Renews `instance` in the node registry, records `rooms` as rooms it is about to write in,
    /// and returns whether the registry did not hold the instance (its first beat, or it was
    /// reaped while it could not beat) and the instances that stopped renewing (the in-process
    /// broker has no others).
    pub async fn beat(
        &self,
        instance: &str,
        rooms: &[RoomName],
        ttl: Duration,
    ) -> Result<(bool, Vec<String>), BrokerError> {
        match self {
            Self::Memory(_) => Ok((false, Vec::new())),
            Self::Redis(b) => b.beat(instance, rooms, ttl).await,
        }
    }

    /// Removes `rooms` from `instance`'s room set, after its withdrawal from them.
    pub async fn forget_rooms(
        &self,
        instance: &str,
        rooms: &[RoomName],
    ) -> Result<(), BrokerError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(b) => b.forget_rooms(instance, rooms).await,
        }
    }

    /// Removes `instance` from the node registry (a clean stop).
    pub async fn forget_instance(&self, instance: &str) -> Result<(), BrokerError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(b) => b.forget_instance(instance).await,
        }
    }

    /// Reaps the dead `instance` if this node wins its lock; returns the rooms reaped and the
    /// lifecycle events appended in each.
    pub async fn reap(
        &self,
        instance: &str,
        ttl: Duration,
        max_members: usize,
        events: bool,
    ) -> Result<Vec<(RoomName, u64)>, BrokerError> {
        match self {
            Self::Memory(_) => Ok(Vec::new()),
            Self::Redis(b) => b.reap(instance, ttl, max_members, events).await,
        }
    }

    /// `room`'s cluster-wide counts as the nodes last reported them (the in-process broker: this
    /// node's, `local()`, this node being the whole cluster).
    pub async fn room_counts(
        &self,
        room: &RoomName,
        local: impl FnOnce() -> RoomCounts,
    ) -> Result<RoomCounts, BrokerError> {
        match self {
            Self::Memory(_) => Ok(local()),
            Self::Redis(b) => b.room_counts(room).await,
        }
    }

    /// A page of the rooms with members, about `limit`, after `cursor` (`None`: from the
    /// start), and the next page's cursor (`None`: done). The in-process broker pages this
    /// node's rooms (`local()`) by name; Redis scans the presence hashes (see
    /// [`redis::RoomsPage`]). A malformed cursor is [`BrokerError::Config`].
    pub async fn rooms(
        &self,
        cursor: Option<&str>,
        limit: usize,
        local: impl FnOnce() -> Vec<(RoomName, RoomCounts)>,
    ) -> Result<redis::RoomsPage, BrokerError> {
        match self {
            Self::Memory(_) => {
                let after = match cursor {
                    None | Some("") => None,
                    Some(c) => Some(
                        RoomName::parse(c)
                            .ok_or_else(|| BrokerError::Config("malformed cursor".into()))?,
                    ),
                };
                let mut rooms: Vec<(RoomName, RoomCounts)> = local()
                    .into_iter()
                    .filter(|(r, c)| {
                        c.hosts + c.viewers > 0 && after.as_ref().is_none_or(|a| r > a)
                    })
                    .collect();
                rooms.sort_by(|a, b| a.0.cmp(&b.0));
                let more = rooms.len() > limit;
                rooms.truncate(limit);
                let next = more
                    .then(|| rooms.last().map(|(r, _)| r.to_string()))
                    .flatten();
                Ok((rooms, next))
            }
            Self::Redis(b) => b.rooms(cursor, limit).await,
        }
    }

    /// Connects the broker's control channel to the node's moderation queue.
    pub fn set_control(&self, tx: tokio::sync::mpsc::Sender<Bytes>) {
        match self {
            Self::Memory(b) => b.control.set(tx),
            Self::Redis(b) => b.set_control(tx),
        }
    }

    /// Publishes a moderation command to every node (this one included).
    pub async fn publish_control(&self, payload: Bytes) -> Result<(), BrokerError> {
        match self {
            Self::Memory(b) => {
                b.control.deliver(&payload, &b.metrics);
                Ok(())
            }
            Self::Redis(b) => b.publish_control(payload).await,
        }
    }

    /// Bans `sub` from `field` (a room, or `*` for every room) until `until_ms` (unix ms).
    pub async fn ban(&self, sub: &str, field: &str, until_ms: u64) -> Result<(), BrokerError> {
        match self {
            Self::Memory(b) => {
                b.bans.ban(sub, field, until_ms);
                Ok(())
            }
            Self::Redis(b) => b.ban(sub, field, until_ms).await,
        }
    }

    /// Lifts a ban; returns whether one was there.
    pub async fn unban(&self, sub: &str, field: &str) -> Result<bool, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.bans.unban(sub, field)),
            Self::Redis(b) => b.unban(sub, field).await,
        }
    }

    /// The bans of `sub` as (field, expiry in unix ms); some may have expired.
    pub async fn bans(&self, sub: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        match self {
            Self::Memory(b) => Ok(b.bans.list(sub)),
            Self::Redis(b) => b.bans(sub).await,
        }
    }

    /// Whether the broker can currently publish and receive.
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(b) => b.is_connected(),
        }
    }

    /// Rooms subscribed and confirmed by the broker right now (the source of
    /// `gateway_broker_subscriptions`).
    pub fn subscription_count(&self) -> usize {
        match self {
            Self::Memory(b) => b.subscription_count(),
            Self::Redis(b) => b.subscription_count(),
        }
    }

    /// Per shard, whether this node can publish and receive on it now (the hand-over's input):
    /// the in-process broker has no shard to lose.
    pub fn usable_shards(&self) -> Vec<bool> {
        match self {
            Self::Memory(_) => Vec::new(),
            Self::Redis(b) => b.usable_shards(),
        }
    }

    /// The shard index of `room` in [`Broker::usable_shards`] (0 unless a Redis Cluster).
    pub fn shard_of(&self, room: &RoomName) -> usize {
        match self {
            Self::Memory(_) => 0,
            Self::Redis(b) => b.shard_of(room),
        }
    }

    /// Whether shard `shard`'s outage is this node's alone or every node's.
    pub async fn witness(&self, shard: usize) -> Outage {
        match self {
            Self::Memory(_) => Outage::Shared("the in-process broker is never lost"),
            Self::Redis(b) => b.witness(shard).await,
        }
    }

    /// Per-shard connection state by shard index, the source of `gateway_redis_shard_up`: one
    /// Redis (or a Sentinel-managed master) is the one shard 0; the in-process broker has none.
    pub fn shard_states(&self) -> Vec<bool> {
        match self {
            Self::Memory(_) => Vec::new(),
            Self::Redis(b) => b.shard_states(),
        }
    }

    /// The Redis broker, for the webhooks' storage ([`redis::RedisBroker::hook_claim`] and
    /// its siblings); `None` in process.
    pub fn redis(&self) -> Option<&redis::RedisBroker> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(b) => Some(b),
        }
    }

    /// A short name for logs and `/readyz`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(b) => b.kind(),
        }
    }
}
