//! The subscriber of a Redis Cluster: sharded pub/sub (`SSUBSCRIBE` / `SPUBLISH`, Redis 7).
//!
//! Classic `PUBLISH` in a cluster is copied to every shard, so it cannot scale out; a sharded
//! channel lives on the shard that owns its slot. A room's channel is `PREFIX{ROOM}` (e.g.
//! `gw:room:{demo}`) and every per-room key carries the same hash tag (`gw:room:{demo}:presence`,
//! and the history keys `…{demo}:meta`, `:hist`, `:idem:*`), so a script touches one slot
//! ([`super::conn::Naming`]).
//!
//! The subscriber holds one RESP3 cluster connection of the redis crate (`cluster-async`),
//! which keeps one connection per shard master that holds a channel of ours — never one per room
//! — and routes each `SSUBSCRIBE` to its slot's master; the channels of one slot go in one
//! command ([`ClusterSink`]). Received messages and the server's own `SUNSUBSCRIBE` pushes come
//! through a push sender ([`PushTo`]) that hands messages to the node at once and records lost
//! subscriptions in a set bounded by the desired set.
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
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::conn::Naming;
use super::subscriber::{SubscriberLost, SUBSCRIBE_BATCH};
use super::Shared;
use crate::broker::redis_endpoint::{ClusterSeeds, Endpoint};
use crate::broker::subscriptions::ChannelSink;
use crate::wire::protocol::RoomName;

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

/// What only a Cluster has: its shards and the subscriptions its servers dropped.
#[derive(Debug, Default)]
pub struct ClusterState {
    /// The shards as the subscriber's last probe saw them, by shard index. Written only by the
    /// subscriber task; read at scrape time and by `/readyz`.
    shards: Mutex<Vec<ShardState>>,
    /// Rooms whose subscription a server dropped (`SUNSUBSCRIBE` push: the slot moved away); a
    /// set, so it is bounded by the rooms that exist.
    lost: Mutex<HashSet<RoomName>>,
}

impl ClusterState {
    fn shards(&self) -> std::sync::MutexGuard<'_, Vec<ShardState>> {
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every shard known and its master answering.
    pub fn all_up(&self) -> bool {
        let shards = self.shards();
        !shards.is_empty() && shards.iter().all(|sh| sh.up)
    }

    /// Whether each shard's master answered the last probe, by shard index.
    pub fn states(&self) -> Vec<bool> {
        self.shards().iter().map(|s| s.up).collect()
    }

    /// The index of the shard that owns `slot` in the last view (the hand-over's unit).
    pub fn shard_of_slot(&self, slot: u16) -> Option<usize> {
        self.shards().iter().position(|sh| sh.owns(slot))
    }

    /// The first slot of shard `shard` (how a witness names the shard: the slot outlives any
    /// failover) and every master address of the last view (where to find a witness).
    pub fn witness_plan(&self, shard: usize) -> Option<(u16, Vec<(String, u16)>)> {
        let shards = self.shards();
        let first = shards.get(shard)?.ranges.first()?.0;
        Some((first, shards.iter().map(|sh| sh.master.clone()).collect()))
    }
}

pub(super) fn seeds(s: &Shared) -> &ClusterSeeds {
    match &s.endpoint {
        Endpoint::Cluster(seeds) => seeds,
        _ => unreachable!("the cluster subscriber runs only with a cluster endpoint"),
    }
}

/// A RESP3 cluster connection whose pushes go to [`PushTo`].
pub async fn connect(s: &Arc<Shared>) -> redis::RedisResult<ClusterConnection> {
    seeds(s)
        .builder(s.timeouts.command)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(PushTo(s.clone()))
        .build()?
        .get_async_connection()
        .await
}

/// Serves one cluster connection until a failover asks for a fresh one (`Err`) or the node
/// shuts down (`Ok`).
pub async fn serve(
    s: &Shared,
    cancel: &CancellationToken,
    conn: ClusterConnection,
) -> Result<(), SubscriberLost> {
    let mut current: HashSet<RoomName> = HashSet::new();
    let mut probes = Probes::default();
    let mut sink = ClusterSink {
        conn: &conn,
        naming: &s.naming,
        timeout: s.timeouts.command,
    };
    s.cluster.shards().clear();
    probe(s, &mut probes, &mut current).await;
    s.set_subscriber_up(true);
    converge(s, &mut sink, &mut current).await;
    info!(
        rooms = current.len(),
        shards = s.cluster.shards().len(),
        "redis cluster subscriber connected"
    );
    let mut tick = tokio::time::interval(s.timeouts.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            _ = s.subs.changed() => {
                take_lost(s, &mut current);
                converge(s, &mut sink, &mut current).await;
            }
            _ = tick.tick() => {
                if probe(s, &mut probes, &mut current).await {
                    // A failover: fresh connections read the new slot map at once, rather than
                    // waiting for the old ones to notice the dead master.
                    s.commands.lost.notify_one();
                    return Err(SubscriberLost::NewMaster);
                }
                take_lost(s, &mut current);
                converge(s, &mut sink, &mut current).await;
            }
        }
    }
}

/// Converges; a command that failed (its shard is down) leaves its rooms for the next probe.
async fn converge(s: &Shared, sink: &mut ClusterSink<'_>, current: &mut HashSet<RoomName>) {
    let Ok(()) = s.subs.converge(sink, current, SUBSCRIBE_BATCH).await;
}

/// Forgets the subscriptions the server dropped (slot moved away), so that converging
/// subscribes them again — on the slot's new owner.
fn take_lost(s: &Shared, current: &mut HashSet<RoomName>) {
    let lost: Vec<RoomName> = s
        .cluster
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

/// Reads the slot map and PINGs each shard's master, on plain connections of its own (kept in
/// `probes`, one per node address) so that the probe does not depend on the cluster
/// connection's own recovery. Rooms of a shard whose slots changed, or which was down and
/// answers again, are forgotten so that converging subscribes them on the current master.
/// Returns true when a master appeared that the last view did not have (a failover): then the
/// caller rebuilds its connections, which read the new slot map at once.
async fn probe(s: &Shared, probes: &mut Probes, current: &mut HashSet<RoomName>) -> bool {
    let seeds = seeds(s);
    let t = s.timeouts.command;
    let mut ask: Vec<(String, u16)> = s
        .cluster
        .shards()
        .iter()
        .filter(|sh| sh.up)
        .map(|sh| sh.master.clone())
        .collect();
    ask.extend(seeds.addrs.iter().cloned());
    let mut slots = None;
    for addr in ask {
        if let Some(v) = probes
            .query(seeds, &addr, redis::cmd("CLUSTER").arg("SLOTS"), t)
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
            for sh in s.cluster.shards().iter_mut() {
                sh.up = false;
            }
            return false;
        }
    };
    for sh in fresh.iter_mut() {
        sh.up = probes
            .query(seeds, &sh.master, &redis::cmd("PING"), t)
            .await
            .is_some();
    }
    let old = std::mem::replace(&mut *s.cluster.shards(), fresh.clone());
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
    // A master that was not up in the last view — a replica promoted, or a master back after
    // an outage: the cluster connections may still be repairing their link to the old address,
    // so fresh ones are made (they read the slot map at once). A slot that only moved between
    // live masters is repaired in place below (and by SUNSUBSCRIBE).
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

/// The cluster connection as a [`ChannelSink`]: the rooms of one slot in one command, the
/// commands of a round in flight together (multiplexed on the shard connections); a command
/// that fails confirms nothing and ends nothing.
struct ClusterSink<'a> {
    conn: &'a ClusterConnection,
    naming: &'a Naming,
    timeout: Duration,
}

impl ChannelSink for ClusterSink<'_> {
    type Error = Infallible;

    async fn send(
        &mut self,
        subscribe: bool,
        rooms: Vec<RoomName>,
    ) -> Result<Vec<Vec<RoomName>>, Infallible> {
        let mut by_slot: HashMap<u16, Vec<RoomName>> = HashMap::new();
        for r in rooms {
            by_slot.entry(slot_of(&r)).or_default().push(r);
        }
        let t = self.timeout;
        let calls = by_slot.into_values().map(|rooms| {
            let mut c = self.conn.clone();
            let channels: Vec<String> = rooms.iter().map(|r| self.naming.channel(r)).collect();
            async move {
                let r = if subscribe {
                    tokio::time::timeout(t, c.ssubscribe(&channels)).await
                } else {
                    tokio::time::timeout(t, c.sunsubscribe(&channels)).await
                };
                matches!(r, Ok(Ok(()))).then_some(rooms)
            }
        });
        Ok(join_all(calls).await.into_iter().flatten().collect())
    }
}

/// The cluster slot of `room`'s channel and keys: CRC16 of the hash tag, which is the room name
/// (the prefix holds no brace, checked at start).
pub(super) fn slot_of(room: &RoomName) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(room.as_str().as_bytes()) % 16384
}

/// The push sender of the subscriber's cluster connection. Runs on the connections' read tasks,
/// so it never blocks: a message goes straight to the node ([`Shared::deliver`]); a server-sent
/// `SUNSUBSCRIBE` records the room as lost and wakes the task.
struct PushTo(Arc<Shared>);

impl redis::aio::AsyncPushSender for PushTo {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        let s = &self.0;
        match info.kind {
            PushKind::SMessage => {
                if let [Value::BulkString(channel), Value::BulkString(payload), ..] = &info.data[..]
                {
                    s.deliver(channel, payload);
                }
            }
            PushKind::SUnsubscribe => {
                if let Some(Value::BulkString(channel)) = info.data.first() {
                    if let Some(room) = s.naming.room_of(channel).and_then(RoomName::parse) {
                        s.cluster
                            .lost
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(room);
                        s.subs.wake();
                    }
                }
            }
            _ => {}
        }
        Ok(())
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
