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
//!   (`CLUSTER SLOTS`) and PINGs each shard's master; when a shard has a new or returning
//!   master, a fresh connection subscribes every room beside the old one, which is released
//!   only then ([`swap`], make before break; [`Overlap`] lets each message through once and in
//!   order), so the other shards' rooms miss nothing.
//!
//! Shards are numbered by the first slot they own (shard 0 holds slot 0), which does not change
//! on a failover; the per-shard gauges use that index, never an address or a room.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::conn::Naming;
use super::overlap::Overlap;
use super::subscriber::SUBSCRIBE_BATCH;
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
    /// Which subscriber connection's messages reach the node (two during a swap).
    overlap: Overlap,
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

    /// The first slot of each shard in the last view, by shard index (where to `SCAN` a shard).
    pub fn first_slots(&self) -> Vec<u16> {
        self.shards()
            .iter()
            .filter_map(|sh| sh.ranges.first().map(|r| r.0))
            .collect()
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

/// A RESP3 cluster connection whose pushes go to [`PushTo`], with its generation (see
/// [`Overlap`]).
pub async fn connect(s: &Arc<Shared>) -> redis::RedisResult<(u64, ClusterConnection)> {
    let generation = s.cluster.overlap.next_generation();
    let conn = seeds(s)
        .builder(s.timeouts.command)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(PushTo(s.clone(), generation))
        .build()?
        .get_async_connection()
        .await?;
    Ok((generation, conn))
}

/// Serves the cluster connection until the node shuts down. A shard with a new or returning
/// master gets a fresh connection made beside this one ([`swap`]); the connection itself
/// repairs its node links, so the subscriber never drops every room at once.
pub async fn serve(s: &Arc<Shared>, cancel: &CancellationToken, first: (u64, ClusterConnection)) {
    let (generation, mut conn) = first;
    s.cluster.overlap.only(generation);
    let mut current: HashSet<RoomName> = HashSet::new();
    let mut probes = Probes::default();
    s.cluster.shards().clear();
    probe(s, &mut probes, &mut current).await;
    s.set_subscriber_up(true);
    converge(s, &conn, &mut current).await;
    info!(
        rooms = current.len(),
        shards = s.cluster.shards().len(),
        "redis cluster subscriber connected"
    );
    let mut tick = tokio::time::interval(s.timeouts.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // Shards whose new master still waits for a fresh connection (a swap that failed is tried
    // again at the next probe), and whether the last swap's overlap is still open.
    let mut moved: Vec<ShardState> = Vec::new();
    let mut overlapping = false;
    // Shards with a new master whose rooms are not all subscribed yet: the publisher's commands
    // for them stay fenced until they are (see `Commands::rooms_subscribed`).
    let mut awaiting: Vec<ShardState> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = s.subs.changed() => {
                take_lost(s, &mut current);
                converge(s, &conn, &mut current).await;
            }
            _ = tick.tick() => {
                if overlapping {
                    // A probe interval after the swap: the new connection has long brought
                    // every copy the old one delivered first.
                    s.cluster.overlap.finish();
                    overlapping = false;
                }
                if let Some(changed) = probe(s, &mut probes, &mut current).await {
                    s.commands
                        .add_stale(changed.iter().flat_map(|sh| sh.ranges.iter().copied()));
                    merge_moved(&mut awaiting, changed.clone());
                    merge_moved(&mut moved, changed);
                }
                if s.commands.needs_fresh() {
                    // The command connection is replaced too, by the publisher task.
                    s.commands.lost.notify_one();
                }
                if !moved.is_empty() {
                    if let Some(fresh) = swap(s, &conn, &mut current, &moved).await {
                        conn = fresh;
                        moved.clear();
                        overlapping = true;
                    }
                }
                take_lost(s, &mut current);
                converge(s, &conn, &mut current).await;
                if !awaiting.is_empty() && moved.is_empty() && subscribed_all(s, &current, &awaiting) {
                    s.commands.rooms_subscribed();
                    awaiting.clear();
                }
            }
        }
    }
}

/// Whether every room of `shards` this node wants is subscribed on the current connection.
fn subscribed_all(s: &Shared, current: &HashSet<RoomName>, shards: &[ShardState]) -> bool {
    s.subs.lock().desired.iter().all(|room| {
        let slot = slot_of(room);
        !shards.iter().any(|sh| sh.owns(slot)) || current.contains(room)
    })
}

/// Adds the shards of `changed` to `moved` (the later view of a shard wins).
fn merge_moved(moved: &mut Vec<ShardState>, changed: Vec<ShardState>) {
    for sh in changed {
        moved.retain(|m| m.ranges != sh.ranges);
        moved.push(sh);
    }
}

/// Make before break: a fresh connection (it reads the new slot map at once) subscribes every
/// room beside `old`; [`Overlap`] lets each message through once while both are subscribed.
/// `old` is let go only when every room of a shard that did not change is subscribed on the
/// fresh one and `old` has handed over what it had in flight (a `PING` through it to each such
/// shard's master: the server sent those messages before the answer). Returns the fresh
/// connection, or `None` (the old one stays; tried again at the next probe).
async fn swap(
    s: &Arc<Shared>,
    old: &ClusterConnection,
    current: &mut HashSet<RoomName>,
    moved: &[ShardState],
) -> Option<ClusterConnection> {
    let t = s.timeouts.command;
    let (generation, fresh) = match tokio::time::timeout(t * 2, connect(s)).await {
        Ok(Ok(made)) => made,
        Ok(Err(e)) => {
            info!(error = %e, "redis cluster: a fresh subscriber connection failed; keeping the old one");
            return None;
        }
        Err(_) => {
            info!("redis cluster: a fresh subscriber connection timed out; keeping the old one");
            return None;
        }
    };
    s.cluster.overlap.begin(generation);
    let mut on_fresh = HashSet::new();
    converge(s, &fresh, &mut on_fresh).await;
    let on_moved = |room: &RoomName| {
        let slot = slot_of(room);
        moved.iter().any(|sh| sh.owns(slot))
    };
    let missing = current
        .iter()
        .filter(|r| !on_fresh.contains(*r) && !on_moved(r))
        .count();
    if missing > 0 {
        info!(
            rooms = missing,
            "redis cluster: a fresh subscriber connection could not subscribe every room; keeping the old one"
        );
        s.cluster.overlap.abandon();
        return None;
    }
    let healthy: Vec<u16> = s
        .cluster
        .shards()
        .iter()
        .filter(|sh| sh.up && !moved.iter().any(|m| m.ranges == sh.ranges))
        .filter_map(|sh| sh.ranges.first().map(|r| r.0))
        .collect();
    join_all(healthy.into_iter().map(|slot| {
        let mut c = old.clone();
        async move {
            let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                slot,
                SlotAddr::Master,
            )));
            let _ = tokio::time::timeout(t, c.route_command(redis::cmd("PING"), route)).await;
        }
    }))
    .await;
    s.cluster.overlap.retire_old(|c, p| s.deliver(c, p));
    {
        // What the old connection confirmed and the fresh one did not (the changed shards'
        // rooms it could not subscribe yet) is not confirmed any more.
        let mut subs = s.subs.lock();
        for room in current.difference(&on_fresh) {
            subs.confirmed.remove(room);
        }
    }
    s.metrics.redis_reconnects_subscriber.increment(1);
    info!(
        rooms = on_fresh.len(),
        "redis cluster: a shard has a new or returning master; the subscriber moved to a fresh connection without a gap"
    );
    *current = on_fresh;
    Some(fresh)
}

/// Converges on `conn`; a command that failed (its shard is down) leaves its rooms for the next
/// probe.
async fn converge(s: &Shared, conn: &ClusterConnection, current: &mut HashSet<RoomName>) {
    let mut sink = ClusterSink {
        conn,
        naming: &s.naming,
        timeout: s.timeouts.command,
    };
    let Ok(()) = s.subs.converge(&mut sink, current, SUBSCRIBE_BATCH).await;
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
/// connection's own recovery. Rooms of a shard whose slots moved between live masters are
/// forgotten so that converging subscribes them on the current owner. Returns the shards with a
/// master the last view did not have up (a replica promoted, or a master back): those are
/// served by a fresh connection ([`swap`]).
async fn probe(
    s: &Shared,
    probes: &mut Probes,
    current: &mut HashSet<RoomName>,
) -> Option<Vec<ShardState>> {
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
            let mut shards = s.cluster.shards();
            for sh in shards.iter_mut() {
                sh.up = false;
            }
            s.commands
                .set_down(shards.iter().flat_map(|sh| sh.ranges.clone()).collect());
            return None;
        }
    };
    for sh in fresh.iter_mut() {
        sh.up = probes
            .query(seeds, &sh.master, &redis::cmd("PING"), t)
            .await
            .is_some();
    }
    let old = std::mem::replace(&mut *s.cluster.shards(), fresh.clone());
    s.commands.set_down(
        fresh
            .iter()
            .filter(|sh| !sh.up)
            .flat_map(|sh| sh.ranges.clone())
            .collect(),
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
        return None;
    }
    // A master that was not up in the last view — a replica promoted, or a master back after
    // an outage: the cluster connection may still be repairing its link to the old address (and
    // its own slot refresh would hold every shard's commands while it tries the dead one), so a
    // fresh connection serves those shards. A slot that only moved between live masters is
    // repaired in place below (and by SUNSUBSCRIBE).
    let new_master: Vec<ShardState> = redo
        .iter()
        .filter(|sh| !old.iter().any(|o| o.up && o.master == sh.master))
        .map(|sh| (*sh).clone())
        .collect();
    if !new_master.is_empty() {
        info!(
            shards = new_master.len(),
            "redis cluster: a shard has a new or returning master"
        );
        return Some(new_master);
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
    None
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
    super::conn::key_slot(room.as_str())
}

/// The push sender of one subscriber cluster connection (its generation beside it). Runs on the
/// connection's read tasks, so it never blocks: a message that [`Overlap`] admits goes straight
/// to the node ([`Shared::deliver`]); a server-sent `SUNSUBSCRIBE` records the room as lost and
/// wakes the task.
struct PushTo(Arc<Shared>, u64);

impl redis::aio::AsyncPushSender for PushTo {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        let s = &self.0;
        match info.kind {
            PushKind::SMessage => {
                if let [Value::BulkString(channel), Value::BulkString(payload), ..] = &info.data[..]
                {
                    if s.cluster
                        .overlap
                        .admit(self.1, channel, payload, |c, p| s.deliver(c, p))
                    {
                        s.deliver(channel, payload);
                    }
                }
            }
            PushKind::SUnsubscribe if s.cluster.overlap.listens_to(self.1) => {
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
