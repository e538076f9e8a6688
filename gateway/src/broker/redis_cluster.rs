//! The Redis Cluster broker: sharded pub/sub (`SSUBSCRIBE` / `SPUBLISH`, Redis 7).
//!
//! Classic `PUBLISH` in a cluster is copied to every shard, so it cannot scale out; a sharded
//! channel lives on the shard that owns its slot. A room's channel is `PREFIX{ROOM}` (e.g.
//! `gw:room:{demo}`) and every per-room key carries the same hash tag (`gw:room:{demo}:presence`,
//! and the history keys `…{demo}:meta`, `:hist`, `:idem:*`), so a script touches one slot.
//!
//! Connections: the *subscriber task* holds one RESP3 cluster connection of the redis crate
//! (`cluster-async`), which keeps one connection per shard master that holds a channel of ours —
//! never one per room — and routes each `SSUBSCRIBE` to its slot's master; the channels of one
//! slot go in one command. Received messages and the server's own `SUNSUBSCRIBE` pushes come
//! through a push sender ([`PushSink`]) that hands messages to the node's inbound handler at once
//! and records lost subscriptions in a set bounded by the desired set. The control channel
//! (`PREFIX{_control}`, one fixed slot) is subscribed beside the rooms, permanently. The
//! *publisher task* holds a second cluster connection for the publish and history scripts
//! (`publish.lua` publishes with `SPUBLISH` on the room's channel, in the room's slot), presence,
//! bans and control commands, each routed to its key's slot. Scripts go by `EVALSHA`, with an
//! `EVAL` (which loads the script on that master) when a master answers `NOSCRIPT`.
//!
//! Failures the task repairs itself, for the cases other clients are known to lose sharded
//! subscriptions in (node-redis #2902 and #3311, ioredis #1987):
//! - a slot moves (resharding): the old owner sends `SUNSUBSCRIBE` for the slot's channels; the
//!   rooms still wanted are subscribed again, and the crate follows `MOVED` to the new owner;
//! - a master fails over: every probe (`--redis-probe-interval`) reads the slot map
//!   (`CLUSTER SLOTS`) and PINGs each shard's master; when a shard's master changed or came
//!   back, the rooms of that shard are subscribed again on it.
//!
//! Shards are numbered by the first slot they own (shard 0 holds slot 0), which does not change
//! on a failover; the per-shard gauges use that index, never an address or a room.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::redis::{RedisTimeouts, PRESENCE_SCRIPT};
use super::redis_endpoint::ClusterSeeds;
use super::scripts;
use super::subscriptions::Subscriptions;
use super::{Backoff, BrokerError};
use crate::fanout::hub::RoomCounts;
use crate::fanout::inbound::Inbound;
use crate::metrics::Metrics;
use crate::moderation::control::{self, ControlSink};
use crate::wire::history::{Ack, HistoryLimits, HistoryQuery, HistoryRead};
use crate::wire::protocol::RoomName;

/// Rooms per convergence round (each slot's channels go in one `SSUBSCRIBE`; the commands of a
/// round are in flight together, multiplexed on the shard connections).
const SUBSCRIBE_BATCH: usize = 500;
/// Presence scripts in flight together.
const PRESENCE_BATCH: usize = 256;
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// One shard as the last probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardState {
    /// Slot ranges (inclusive) the shard's master owns.
    pub ranges: Vec<(u16, u16)>,
    /// The master's address (for logs only; never a metric label).
    pub master: (String, u16),
    /// Whether the master answered the last probe.
    pub up: bool,
}

impl ShardState {
    fn owns(&self, slot: u16) -> bool {
        self.ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

/// A node's Redis Cluster broker.
#[derive(Debug)]
pub struct RedisClusterBroker {
    shared: Arc<Shared>,
}

struct Shared {
    seeds: ClusterSeeds,
    prefix: String,
    metrics: Metrics,
    timeouts: RedisTimeouts,
    /// Desired and confirmed rooms; woken by a change of the desired set or a lost subscription.
    subs: Subscriptions,
    /// The reserved room whose channel is the control channel (`PREFIX{_control}`): in the
    /// desired set from the start, so that it is subscribed, followed across slot moves and
    /// failovers, and resubscribed, exactly like a room's channel.
    control_room: RoomName,
    /// History bounds passed to the scripts.
    limits: HistoryLimits,
    /// `publish.lua` (hash computed here: `EVALSHA` to any master, `EVAL` on `NOSCRIPT`).
    publish_script: redis::Script,
    /// `history.lua`.
    history_script: redis::Script,
    /// The push sender (received messages, lost subscriptions, control commands); shared with it.
    sink: Arc<PushSink>,
    /// The publisher connection and its generation, `None` while reconnecting.
    publisher: Mutex<Option<(u64, ClusterConnection)>>,
    publisher_lost: Notify,
    subscriber_up: AtomicBool,
    publisher_up: AtomicBool,
    /// The shards as the subscriber's last probe saw them, by shard index. Written only by the
    /// subscriber task; read at scrape time and by `/readyz`.
    shards: Mutex<Vec<ShardState>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClusterShared").finish_non_exhaustive()
    }
}

/// The push sender of the subscriber's cluster connection. Runs on the connections' read tasks,
/// so it never blocks: a message goes straight to the node's inbound handler (a control command
/// to the control queue); a server-sent `SUNSUBSCRIBE` records the room in `lost` (a set, so it
/// is bounded by the rooms that exist) and wakes the task.
struct PushSink {
    inbound: Arc<Inbound>,
    /// Moderation commands (the control channel).
    control: ControlSink,
    /// The control channel's name.
    control_channel: String,
    metrics: Metrics,
    /// `PREFIX{`: what every room channel starts with.
    head: String,
    lost: Mutex<HashSet<RoomName>>,
    wake: Arc<Notify>,
}

impl PushSink {
    fn room_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let c = std::str::from_utf8(channel).ok()?;
        c.strip_prefix(self.head.as_str())?.strip_suffix('}')
    }
}

impl redis::aio::AsyncPushSender for PushSink {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        match info.kind {
            PushKind::SMessage => {
                if let [Value::BulkString(channel), Value::BulkString(payload), ..] = &info.data[..]
                {
                    if channel.as_slice() == self.control_channel.as_bytes() {
                        self.control.deliver(payload, &self.metrics);
                    } else if let Some(room) = self.room_of(channel) {
                        self.inbound.receive(room, Bytes::copy_from_slice(payload));
                    }
                }
            }
            PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    if let Some(room) = self.room_of(channel).and_then(RoomName::parse) {
                        self.lost
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(room);
                        self.wake.notify_one();
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl RedisClusterBroker {
    /// Starts the subscriber and publisher tasks on `tracker`; they connect in the background and
    /// retry until `cancel`.
    #[allow(clippy::too_many_arguments)] // the same seam as the single-server broker's `start`
    pub fn start(
        seeds: ClusterSeeds,
        prefix: &str,
        inbound: Arc<Inbound>,
        metrics: Metrics,
        timeouts: RedisTimeouts,
        limits: HistoryLimits,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BrokerError> {
        if prefix.contains(['{', '}']) {
            return Err(BrokerError::Config(
                "--channel-prefix must not contain braces with a Redis Cluster (the room is the hash tag)".into(),
            ));
        }
        seeds.client(timeouts.command)?;
        let control_room =
            RoomName::parse(control::CONTROL_ROOM).expect("the control room name is a room name");
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            seeds,
            prefix: prefix.to_string(),
            control_room: control_room.clone(),
            limits,
            publish_script: redis::Script::new(scripts::PUBLISH_SCRIPT),
            history_script: redis::Script::new(scripts::HISTORY_SCRIPT),
            sink: Arc::new(PushSink {
                inbound,
                control: ControlSink::default(),
                control_channel: format!("{prefix}{{{}}}", control::CONTROL_ROOM),
                metrics: metrics.clone(),
                head: format!("{prefix}{{"),
                lost: Mutex::new(HashSet::new()),
                wake: wake.clone(),
            }),
            metrics,
            timeouts,
            subs: Subscriptions::new(HashSet::from([control_room]), wake),
            publisher: Mutex::new(None),
            publisher_lost: Notify::new(),
            subscriber_up: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            shards: Mutex::new(Vec::new()),
        });
        tracker.spawn(
            Subscriber {
                shared: shared.clone(),
                cancel: cancel.clone(),
            }
            .run(),
        );
        tracker.spawn(
            Publisher {
                shared: shared.clone(),
                cancel,
            }
            .run(),
        );
        Ok(Self { shared })
    }

    pub(super) fn subscribe(&self, room: &RoomName) {
        self.shared.subs.subscribe(room);
    }

    pub(super) fn unsubscribe(&self, room: &RoomName) {
        self.shared.subs.unsubscribe(room);
    }

    pub(super) async fn wait_subscribed(&self, room: &RoomName) -> bool {
        self.shared.subs.wait_subscribed(room).await
    }

    /// Runs `publish.lua` in the room's slot: numbers, records and `SPUBLISH`es one message (same
    /// contract as the single-server broker's publish).
    pub(super) async fn publish(
        &self,
        room: &RoomName,
        prefix: Bytes,
        id: &str,
        key: Option<&str>,
    ) -> Result<Ack, BrokerError> {
        let s = &self.shared;
        let keys = scripts::publish_keys(&s.prefix, room, key);
        let channel = s.channel(room);
        let answer = s
            .eval(&s.publish_script, scripts::PUBLISH_SCRIPT, &keys, |cmd| {
                scripts::publish_args(cmd, &prefix, &s.limits, "SPUBLISH", &channel, id)
            })
            .await?;
        scripts::parse_ack(answer)
    }

    /// Runs `history.lua` in the room's slot (same contract as the single-server broker's).
    pub(super) async fn history(
        &self,
        room: &RoomName,
        query: &HistoryQuery,
    ) -> Result<HistoryRead, BrokerError> {
        let s = &self.shared;
        let keys = scripts::history_keys(&s.prefix, room);
        let answer = s
            .eval(&s.history_script, scripts::HISTORY_SCRIPT, &keys, |cmd| {
                scripts::history_args(cmd, query, &s.limits)
            })
            .await?;
        scripts::parse_history_answer(answer)
    }

    pub(super) fn set_control(&self, tx: tokio::sync::mpsc::Sender<Bytes>) {
        self.shared.sink.control.set(tx);
    }

    /// `SPUBLISH` on the control channel (its slot's shard; every node subscribes there).
    pub(super) async fn publish_control(&self, payload: Bytes) -> Result<(), BrokerError> {
        let s = &self.shared;
        let channel = &s.sink.control_channel;
        let mut cmd = redis::cmd("SPUBLISH");
        cmd.arg(channel).arg(payload.as_ref());
        s.on_publisher(cmd, Shared::route(channel))
            .await
            .map(|_| ())
    }

    pub(super) async fn ban(
        &self,
        sub: &str,
        field: &str,
        until_ms: u64,
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        let key = s.ban_key(sub);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(control::BAN_SCRIPT)
            .arg(1)
            .arg(&key)
            .arg(field)
            .arg(until_ms);
        s.on_publisher(cmd, Shared::route(&key)).await.map(|_| ())
    }

    pub(super) async fn unban(&self, sub: &str, field: &str) -> Result<bool, BrokerError> {
        let s = &self.shared;
        let key = s.ban_key(sub);
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&key).arg(field);
        let n: i64 = redis::from_redis_value(s.on_publisher(cmd, Shared::route(&key)).await?)
            .map_err(|e| BrokerError::Failed(e.to_string()))?;
        Ok(n > 0)
    }

    pub(super) async fn bans(&self, sub: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        let s = &self.shared;
        let key = s.ban_key(sub);
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&key);
        let all: HashMap<String, u64> =
            redis::from_redis_value(s.on_publisher(cmd, Shared::route(&key)).await?)
                .map_err(|e| BrokerError::Failed(e.to_string()))?;
        Ok(all.into_iter().collect())
    }

    /// Same contract as the single-server broker's presence; one script per room, each routed to
    /// the room's slot (rooms of different slots cannot share a pipeline), in flight together.
    pub(super) async fn presence(
        &self,
        node_id: &str,
        rooms: &[(RoomName, RoomCounts)],
        gone: &[RoomName],
        ttl: Duration,
    ) -> Result<Vec<RoomCounts>, BrokerError> {
        let s = &self.shared;
        let ttl_ms = ttl.as_millis() as u64;
        let reports = rooms
            .iter()
            .map(|(r, c)| (r, c.hosts as i64, c.viewers as i64));
        let withdrawals = gone.iter().map(|r| (r, -1i64, -1i64));
        let all: Vec<(&RoomName, i64, i64)> = reports.chain(withdrawals).collect();
        let mut out = Vec::with_capacity(all.len());
        for chunk in all.chunks(PRESENCE_BATCH) {
            let calls = chunk.iter().map(|(room, hosts, viewers)| {
                let key = s.presence_key(room);
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(PRESENCE_SCRIPT)
                    .arg(1)
                    .arg(&key)
                    .arg(node_id)
                    .arg(*hosts)
                    .arg(*viewers)
                    .arg(ttl_ms);
                s.on_publisher(cmd, Shared::route(&key))
            });
            for v in join_all(calls).await {
                let (hosts, viewers): (u64, u64) =
                    redis::from_redis_value(v?).map_err(|e| BrokerError::Failed(e.to_string()))?;
                out.push(RoomCounts { hosts, viewers });
            }
        }
        out.truncate(rooms.len());
        Ok(out)
    }

    /// Rooms subscribed (the control channel, subscribed like a room, is not one).
    pub(super) fn subscription_count(&self) -> usize {
        let subs = self.shared.subs.lock();
        subs.confirmed.len() - usize::from(subs.confirmed.contains(&self.shared.control_room))
    }

    /// Both connections up and every shard's master answering.
    pub(super) fn is_connected(&self) -> bool {
        let s = &self.shared;
        s.subscriber_up.load(Ordering::Relaxed) && s.publisher_up.load(Ordering::Relaxed) && {
            let shards = s.shards.lock().unwrap_or_else(|e| e.into_inner());
            !shards.is_empty() && shards.iter().all(|sh| sh.up)
        }
    }

    /// Whether each shard's master answered the last probe, by shard index.
    pub(super) fn shard_states(&self) -> Vec<bool> {
        let shards = self.shared.shards.lock().unwrap_or_else(|e| e.into_inner());
        shards.iter().map(|s| s.up).collect()
    }
}

impl Shared {
    /// `PREFIX{room}`: the hash tag puts the channel in the room's slot.
    fn channel(&self, room: &RoomName) -> String {
        format!("{}{{{}}}", self.prefix, room)
    }

    /// `PREFIX{room}:presence`: same slot as the channel.
    fn presence_key(&self, room: &RoomName) -> String {
        format!("{}{{{}}}:presence", self.prefix, room)
    }

    /// The hash of a user's bans (its own slot).
    fn ban_key(&self, sub: &str) -> String {
        format!("{}ban:{}", self.prefix, sub)
    }

    /// Runs a script in its first key's slot: `EVALSHA` by the hash computed here, and `EVAL`
    /// (which loads it there) when that master answers `NOSCRIPT` (new, restarted or failed over).
    async fn eval(
        &self,
        script: &redis::Script,
        source: &str,
        keys: &[String],
        args: impl Fn(&mut redis::Cmd),
    ) -> Result<Value, BrokerError> {
        let route = Shared::route(&keys[0]);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
        args(&mut cmd);
        match self.on_publisher(cmd, route.clone()).await {
            Err(BrokerError::NoScript) => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(source).arg(keys.len()).arg(keys);
                args(&mut cmd);
                self.on_publisher(cmd, route).await
            }
            r => r,
        }
    }

    fn route(key: &str) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
            key,
            SlotAddr::Master,
        )))
    }

    async fn on_publisher(
        &self,
        cmd: redis::Cmd,
        route: RoutingInfo,
    ) -> Result<Value, BrokerError> {
        let current = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((_, mut conn)) = current else {
            return Err(BrokerError::Unavailable);
        };
        match tokio::time::timeout(self.timeouts.command, conn.route_command(cmd, route)).await {
            // A routed command's server error comes back as a value, not as an `Err`.
            Ok(Ok(Value::ServerError(e))) if e.code() == "NOSCRIPT" => Err(BrokerError::NoScript),
            Ok(Ok(Value::ServerError(e))) => Err(BrokerError::Failed(e.to_string())),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some("NOSCRIPT") => Err(BrokerError::NoScript),
            // Not replaced on a single failure (a shard being down must not take the healthy
            // shards' publishes with it): the subscriber's probe replaces it when a shard has a
            // new or returning master.
            Ok(Err(e)) => Err(BrokerError::Failed(e.to_string())),
            Err(_) => Err(BrokerError::Timeout),
        }
    }
}

/// Why a subscriber connection ended.
#[derive(Debug, thiserror::Error)]
enum SubscriberLost {
    #[error("a shard has a new or returning master")]
    NewMaster,
}

struct Subscriber {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Subscriber {
    async fn run(self) {
        let s = &self.shared;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut failures = 0u64;
        let mut ever_up = false;
        loop {
            let client = s
                .seeds
                .builder(s.timeouts.command)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(PushTo(s.sink.clone()))
                .build();
            let connect = async {
                match client {
                    Ok(c) => c.get_async_connection().await,
                    Err(e) => Err(e),
                }
            };
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = tokio::time::timeout(s.timeouts.command * 2, connect) => r,
            };
            match conn {
                Ok(Ok(conn)) => {
                    failures = 0;
                    backoff.reset();
                    if ever_up {
                        s.metrics.redis_reconnects_subscriber.increment(1);
                    }
                    ever_up = true;
                    let result = self.serve(conn).await;
                    s.subscriber_up.store(false, Ordering::Relaxed);
                    s.subs.lock().confirmed.clear();
                    match result {
                        Ok(()) => return,
                        Err(e) => warn!(cause = %e, "redis cluster subscriber lost; reconnecting"),
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(cause = %e, attempts = failures, "redis cluster subscriber cannot connect");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(
                            attempts = failures,
                            "redis cluster subscriber connect timed out"
                        );
                    }
                }
            }
            let wait = backoff.next_delay();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn serve(&self, conn: ClusterConnection) -> Result<(), SubscriberLost> {
        let s = &self.shared;
        let mut current: HashSet<RoomName> = HashSet::new();
        let mut probes = Probes::default();
        s.shards.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.probe(&mut probes, &mut current).await;
        s.subscriber_up.store(true, Ordering::Relaxed);
        self.converge(&conn, &mut current).await;
        info!(
            rooms = current.len(),
            shards = s.shards.lock().unwrap_or_else(|e| e.into_inner()).len(),
            "redis cluster subscriber connected"
        );
        let mut probe = tokio::time::interval(s.timeouts.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(()),
                _ = s.subs.changed() => {
                    self.take_lost(&mut current);
                    self.converge(&conn, &mut current).await;
                }
                _ = probe.tick() => {
                    if self.probe(&mut probes, &mut current).await {
                        // A failover: fresh connections read the new slot map at once, rather
                        // than waiting for the old ones to notice the dead master.
                        s.publisher_lost.notify_one();
                        return Err(SubscriberLost::NewMaster);
                    }
                    self.take_lost(&mut current);
                    self.converge(&conn, &mut current).await;
                }
            }
        }
    }

    /// Forgets the subscriptions the server dropped (slot moved away), so that converging
    /// subscribes them again — on the slot's new owner.
    fn take_lost(&self, current: &mut HashSet<RoomName>) {
        let s = &self.shared;
        let lost: Vec<RoomName> = s
            .sink
            .lost
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        if lost.is_empty() {
            return;
        }
        let mut subs = s.subs.lock();
        let mut n = 0;
        for room in lost {
            if current.remove(&room) {
                n += 1;
            }
            subs.confirmed.remove(&room);
        }
        if n > 0 {
            info!(
                rooms = n,
                "sharded subscriptions dropped by the server; resubscribing"
            );
        }
    }

    /// Reads the slot map and PINGs each shard's master, on plain connections of its own (kept
    /// in `probes`, one per node address) so that the probe does not depend on the cluster
    /// connection's own recovery. Rooms of a shard whose slots changed, or which was down and
    /// answers again, are forgotten so that converging subscribes them on the current master.
    /// Returns true when a master appeared that the last view did not have (a failover): then
    /// the caller rebuilds its connections, which read the new slot map at once.
    async fn probe(&self, probes: &mut Probes, current: &mut HashSet<RoomName>) -> bool {
        let s = &self.shared;
        let t = s.timeouts.command;
        let mut ask: Vec<(String, u16)> = s
            .shards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|sh| sh.up)
            .map(|sh| sh.master.clone())
            .collect();
        ask.extend(s.seeds.addrs.iter().cloned());
        let mut slots = None;
        for addr in ask {
            if let Some(v) = probes
                .query(&s.seeds, &addr, redis::cmd("CLUSTER").arg("SLOTS"), t)
                .await
            {
                slots = Some(v);
                break;
            }
        }
        let mut fresh = match slots {
            Some(v) => parse_slots(&v),
            None => {
                // No node answered: keep the last map, every shard down.
                let mut shards = s.shards.lock().unwrap_or_else(|e| e.into_inner());
                for sh in shards.iter_mut() {
                    sh.up = false;
                }
                return false;
            }
        };
        for sh in fresh.iter_mut() {
            sh.up = probes
                .query(&s.seeds, &sh.master, &redis::cmd("PING"), t)
                .await
                .is_some();
        }
        let old = std::mem::replace(
            &mut *s.shards.lock().unwrap_or_else(|e| e.into_inner()),
            fresh.clone(),
        );
        // Shards to subscribe again: a new master for the same slots, or back from down.
        let redo: Vec<&ShardState> = fresh
            .iter()
            .filter(|sh| {
                sh.up
                    && !old
                        .iter()
                        .any(|o| o.up && o.master == sh.master && o.ranges == sh.ranges)
            })
            .collect();
        if redo.is_empty() || old.is_empty() {
            return false;
        }
        // A master that was not up in the last view — a replica promoted, or a master back
        // after an outage: the cluster connections may still be repairing their link to the
        // old address, so fresh ones are made (they read the slot map at once). A slot that
        // only moved between live masters is repaired in place below (and by SUNSUBSCRIBE).
        if fresh
            .iter()
            .any(|sh| sh.up && !old.iter().any(|o| o.up && o.master == sh.master))
        {
            info!("redis cluster: a shard has a new or returning master; reconnecting");
            return true;
        }
        let mut subs = s.subs.lock();
        let before = current.len();
        current.retain(|room| {
            let slot = slot_of(room);
            let keep = !redo.iter().any(|sh| sh.owns(slot));
            if !keep {
                subs.confirmed.remove(room);
            }
            keep
        });
        let n = before - current.len();
        if n > 0 {
            info!(
                rooms = n,
                "redis cluster shard changed; resubscribing its rooms"
            );
        }
        false
    }

    /// Sends `SSUBSCRIBE` / `SUNSUBSCRIBE` until `current` equals the desired set, the channels
    /// of one slot in one command. A command that fails (its shard is down) leaves its rooms out
    /// of `current`; the next probe tries again.
    async fn converge(&self, conn: &ClusterConnection, current: &mut HashSet<RoomName>) {
        let s = &self.shared;
        let t = s.timeouts.command;
        loop {
            let (add, remove): (Vec<RoomName>, Vec<RoomName>) = {
                let subs = s.subs.lock();
                (
                    subs.desired
                        .difference(current)
                        .take(SUBSCRIBE_BATCH)
                        .cloned()
                        .collect(),
                    current
                        .difference(&subs.desired)
                        .take(SUBSCRIBE_BATCH)
                        .cloned()
                        .collect(),
                )
            };
            if add.is_empty() && remove.is_empty() {
                return;
            }
            let mut progress = false;
            for (subscribe, rooms) in [(true, add), (false, remove)] {
                let mut by_slot: HashMap<u16, Vec<RoomName>> = HashMap::new();
                for r in rooms {
                    by_slot.entry(slot_of(&r)).or_default().push(r);
                }
                let calls = by_slot.into_values().map(|rooms| {
                    let mut c = conn.clone();
                    let channels: Vec<String> = rooms.iter().map(|r| s.channel(r)).collect();
                    async move {
                        let r = if subscribe {
                            tokio::time::timeout(t, c.ssubscribe(&channels)).await
                        } else {
                            tokio::time::timeout(t, c.sunsubscribe(&channels)).await
                        };
                        (rooms, matches!(r, Ok(Ok(()))))
                    }
                });
                for (rooms, ok) in join_all(calls).await {
                    if !ok {
                        continue;
                    }
                    progress = true;
                    let mut subs = s.subs.lock();
                    for r in rooms {
                        if subscribe {
                            subs.confirmed.insert(r.clone());
                            current.insert(r);
                        } else {
                            subs.confirmed.remove(&r);
                            current.remove(&r);
                        }
                    }
                }
                if subscribe {
                    s.subs.confirmed_grew();
                }
            }
            if !progress {
                return;
            }
        }
    }
}

/// The cluster slot of `room`'s channel and keys: CRC16 of the hash tag, which is the room name
/// (the prefix holds no brace, checked at start).
fn slot_of(room: &RoomName) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(room.as_str().as_bytes()) % 16384
}

/// Hands the connection's pushes to [`Inbound`] (the crate takes the sender by value).
struct PushTo(Arc<PushSink>);

impl redis::aio::AsyncPushSender for PushTo {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        redis::aio::AsyncPushSender::send(&*self.0, info)
    }
}

/// The probe's plain connections, one per node address (a handful: the masters and seeds).
#[derive(Default)]
struct Probes {
    conns: HashMap<(String, u16), redis::aio::MultiplexedConnection>,
}

impl Probes {
    /// Runs `cmd` on `addr` within `t`; a failed connection is dropped and made again next time.
    async fn query(
        &mut self,
        seeds: &ClusterSeeds,
        addr: &(String, u16),
        cmd: &redis::Cmd,
        t: Duration,
    ) -> Option<Value> {
        if !self.conns.contains_key(addr) {
            let client = seeds.node_client(&addr.0, addr.1).ok()?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t));
            let conn = tokio::time::timeout(
                t,
                client.get_multiplexed_async_connection_with_config(&config),
            )
            .await
            .ok()?
            .ok()?;
            self.conns.insert(addr.clone(), conn);
        }
        let conn = self.conns.get_mut(addr)?;
        match tokio::time::timeout(t, cmd.query_async::<Value>(conn)).await {
            Ok(Ok(v)) => Some(v),
            _ => {
                self.conns.remove(addr);
                None
            }
        }
    }
}

/// Parses `CLUSTER SLOTS` into shards numbered by their first slot.
fn parse_slots(v: &Value) -> Vec<ShardState> {
    let mut by_master: HashMap<(String, u16), Vec<(u16, u16)>> = HashMap::new();
    if let Value::Array(entries) = v {
        for e in entries {
            let Value::Array(f) = e else { continue };
            let (Some(Value::Int(a)), Some(Value::Int(b)), Some(Value::Array(m))) =
                (f.first(), f.get(1), f.get(2))
            else {
                continue;
            };
            let host = match m.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => continue,
            };
            let Some(Value::Int(port)) = m.get(1) else {
                continue;
            };
            by_master
                .entry((host, *port as u16))
                .or_default()
                .push((*a as u16, *b as u16));
        }
    }
    let mut shards: Vec<ShardState> = by_master
        .into_iter()
        .map(|(master, mut ranges)| {
            ranges.sort();
            ShardState {
                ranges,
                master,
                up: false,
            }
        })
        .collect();
    shards.sort_by_key(|s| s.ranges.first().map(|r| r.0));
    shards
}

struct Publisher {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Publisher {
    async fn run(self) {
        let s = &self.shared;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut generation = 0u64;
        loop {
            let connect = async {
                let client = s.seeds.client(s.timeouts.command).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "cluster client",
                        e.to_string(),
                    ))
                })?;
                client.get_async_connection().await
            };
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = tokio::time::timeout(s.timeouts.command * 2, connect) => r,
            };
            if let Ok(Ok(conn)) = conn {
                generation += 1;
                if generation > 1 {
                    s.metrics.redis_reconnects_publisher.increment(1);
                }
                backoff.reset();
                *s.publisher.lock().unwrap_or_else(|e| e.into_inner()) = Some((generation, conn));
                s.publisher_up.store(true, Ordering::Relaxed);
                info!("redis cluster publisher connected");
                // The cluster connection reconnects its node connections and follows MOVED by
                // itself; it is replaced when the subscriber's probe sees a new or returning
                // master (`publisher_lost`), or the node stops.
                tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    _ = s.publisher_lost.notified() => {}
                }
                *s.publisher.lock().unwrap_or_else(|e| e.into_inner()) = None;
                s.publisher_up.store(false, Ordering::Relaxed);
            }
            let wait = backoff.next_delay();
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_parse_into_shards_by_first_slot() {
        let node = |h: &str, p: i64| {
            Value::Array(vec![
                Value::BulkString(h.as_bytes().to_vec()),
                Value::Int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let v = Value::Array(vec![
            Value::Array(vec![Value::Int(10923), Value::Int(16383), node("c", 3)]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), node("a", 1)]),
            Value::Array(vec![Value::Int(5461), Value::Int(10922), node("b", 2)]),
        ]);
        let shards = parse_slots(&v);
        let masters: Vec<_> = shards.iter().map(|s| s.master.0.as_str()).collect();
        assert_eq!(masters, ["a", "b", "c"]);
        assert!(shards[1].owns(6000) && !shards[1].owns(5460));
    }

    #[test]
    fn slot_is_the_hash_tag_slot() {
        // CLUSTER KEYSLOT demo = 903 (Redis computes the same for gw:room:{demo}).
        let room = RoomName::parse("demo").unwrap();
        assert_eq!(slot_of(&room), 903);
    }
}
