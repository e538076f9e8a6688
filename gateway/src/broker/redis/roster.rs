//! The Redis side of presence ticks and member lists (issue 22): one `presence.lua` per room
//! per tick carries a node instance's counts *and* its roster changes (one call per room, not
//! per member; nothing more when nothing changed), `members.lua` pages a room's list, and the
//! node registry (`registry.lua`) with the reaping of instances that died.
//!
//! The registry and an instance's room set live in one fixed slot (`{registry}`), apart from the
//! rooms' slots, so they cannot be atomic with the rooms' scripts; the order makes up for it. An
//! instance adds a room to its set *before* its first write into the room, and removes it only
//! *after* its withdrawal from the room succeeded: whenever the room holds entries of the
//! instance, its set names the room. A reaper (one per dead instance, by a `SET NX PX` lock)
//! reads the set, reaps every room in it (a room with nothing of the instance costs one no-op
//! script), and only then deletes the set and the registry entry — a reaper that dies half way
//! leaves both for the next one when the lock expires.

use std::time::Duration;

use futures_util::future::join_all;
use redis::Value;

use super::RedisBroker;
use crate::broker::roster::{
    Batch, MembersPage, RoomTick, RosterRead, HYSTERESIS_PERCENT, LOG_CAP,
};
use crate::broker::scripts::{self, reply_int as int, reply_text as text};
use crate::broker::BrokerError;
use crate::wire::protocol::{RoomCounts, RoomName};

/// Scripts in flight together (a multiplexed connection pipelines them; a Cluster connection
/// sends each to its room's slot).
const BATCH: usize = 256;

/// One room's answer to a tick: the cluster-wide counts and, for a room that lists, the roster's.
pub type TickAnswer = Result<(RoomCounts, Option<RosterRead>), BrokerError>;

/// How long the roster keys outlive the last write: every tick of a listing room renews them, so
/// only a roster whose nodes all died unreaped waits this long.
fn keep(ttl: Duration) -> u64 {
    (ttl.as_millis() as u64 * 20).max(60_000)
}

impl RedisBroker {
    /// Runs one `presence.lua` per room (counts, roster changes, lifecycle events), [`BATCH`] in
    /// flight together; one answer per room, in order.
    pub(in crate::broker) async fn tick(
        &self,
        instance: &str,
        rooms: &[RoomTick<'_>],
        ttl: Duration,
        events: bool,
    ) -> Vec<TickAnswer> {
        let mut out = Vec::with_capacity(rooms.len());
        for chunk in rooms.chunks(BATCH) {
            let calls = chunk
                .iter()
                .map(|t| self.room_tick(instance, t, ttl, events, false));
            out.extend(join_all(calls).await);
        }
        out
    }

    async fn room_tick(
        &self,
        instance: &str,
        t: &RoomTick<'_>,
        ttl: Duration,
        events: bool,
        reap: bool,
    ) -> TickAnswer {
        let s = &self.shared;
        let mut keys = vec![s.naming.presence_key(t.room)];
        keys.extend(scripts::roster_keys(&s.naming.prefix, t.room, instance));
        let (hosts, viewers) = match t.counts {
            Some(c) => (c.hosts as i64, c.viewers as i64),
            None => (-1, -1),
        };
        let answer: Vec<Value> = s
            .commands
            .eval(&scripts::PRESENCE, &keys, |cmd| {
                cmd.arg(instance)
                    .arg(hosts)
                    .arg(viewers)
                    .arg(ttl.as_millis() as u64)
                    .arg(if events { "1" } else { "0" })
                    .arg(t.room.as_str());
                match &t.roster {
                    None => {
                        cmd.arg("0").arg("").arg(0).arg(0).arg(0).arg(0).arg("0");
                    }
                    Some(w) => {
                        cmd.arg("1")
                            .arg(
                                w.last_seen
                                    .map(|(e, v)| format!("{e}:{v}"))
                                    .unwrap_or_default(),
                            )
                            .arg(w.max_members)
                            .arg(HYSTERESIS_PERCENT)
                            .arg(LOG_CAP)
                            .arg(keep(ttl))
                            .arg(if reap { "1" } else { "0" });
                        for c in w.changes {
                            let json = serde_json::to_string(&c.member).unwrap_or_default();
                            cmd.arg(&c.member.sub).arg(c.count).arg(json).arg(c.reason);
                        }
                    }
                }
            })
            .await?;
        parse_tick(answer, t.roster.is_some())
            .ok_or_else(|| BrokerError::Failed("unexpected presence answer".into()))
    }

    /// A page of `room`'s list after `cursor` (`None`: from the start), about `limit` members.
    pub(in crate::broker) async fn members(
        &self,
        room: &RoomName,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<MembersPage, BrokerError> {
        let s = &self.shared;
        let cursor = match cursor {
            None | Some("") => "0",
            Some(c) if c.parse::<u64>().is_ok() => c,
            Some(_) => return Err(BrokerError::Config("malformed cursor".into())),
        };
        let [_, _, members, version, _, over, _] = scripts::roster_keys(&s.naming.prefix, room, "");
        let keys = [members, version, over];
        let answer: Vec<Value> = s
            .commands
            .eval(&scripts::MEMBERS, &keys, |cmd| {
                cmd.arg(cursor).arg(limit);
            })
            .await?;
        let bad = || BrokerError::Failed("unexpected members answer".into());
        let mut it = answer.into_iter();
        let version = int(&it.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let over = int(&it.next().ok_or_else(bad)?).ok_or_else(bad)? == 1;
        let next = text(&it.next().ok_or_else(bad)?).ok_or_else(bad)?;
        let members = it
            .filter_map(|v| text(&v))
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        Ok(MembersPage {
            version,
            over,
            members,
            cursor: (next != "0").then_some(next),
        })
    }

    /// Renews `instance` in the registry (for three presence intervals), adds `rooms` to its
    /// room set, and returns whether the registry did not hold the instance (first beat, or
    /// reaped meanwhile) and the instances whose entries expired.
    pub(in crate::broker) async fn beat(
        &self,
        instance: &str,
        rooms: &[RoomName],
        ttl: Duration,
    ) -> Result<(bool, Vec<String>), BrokerError> {
        let s = &self.shared;
        let keys = scripts::registry_keys(&s.naming.prefix, instance);
        let answer: Vec<Value> = s
            .commands
            .eval(&scripts::REGISTRY, &keys, |cmd| {
                cmd.arg(instance).arg(ttl.as_millis() as u64).arg(keep(ttl));
                for r in rooms {
                    cmd.arg(r.as_str());
                }
            })
            .await?;
        let mut it = answer.into_iter();
        let added = it.next().as_ref().and_then(int) == Some(1);
        Ok((added, it.filter_map(|v| text(&v)).collect()))
    }

    /// Removes `rooms` from `instance`'s room set (after its withdrawal from them).
    pub(in crate::broker) async fn forget_rooms(
        &self,
        instance: &str,
        rooms: &[RoomName],
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        let [_, set] = scripts::registry_keys(&s.naming.prefix, instance);
        let mut cmd = redis::cmd("SREM");
        cmd.arg(&set);
        for r in rooms {
            cmd.arg(r.as_str());
        }
        s.commands.query(&cmd, &set).await.map(drop)
    }

    /// Removes `instance` from the registry with its room set (a clean stop, or the end of a
    /// reap).
    pub(in crate::broker) async fn forget_instance(
        &self,
        instance: &str,
    ) -> Result<(), BrokerError> {
        let s = &self.shared;
        let [nodes, set] = scripts::registry_keys(&s.naming.prefix, instance);
        s.commands.query(redis::cmd("DEL").arg(&set), &set).await?;
        s.commands
            .query(redis::cmd("ZREM").arg(&nodes).arg(instance), &nodes)
            .await
            .map(drop)
    }

    /// Reaps the dead `instance` if this node wins its lock: every room in its set loses the
    /// instance's counts and roster entries (members whose total goes to 0 leave with
    /// `node_lost`), then the set and the registry entry go. Returns the rooms reaped with the
    /// lifecycle events appended in each (empty when another node holds the lock).
    pub(in crate::broker) async fn reap(
        &self,
        instance: &str,
        ttl: Duration,
        max_members: usize,
        events: bool,
    ) -> Result<Vec<(RoomName, u64)>, BrokerError> {
        let s = &self.shared;
        let lock = scripts::reap_lock_key(&s.naming.prefix, instance);
        let won = s
            .commands
            .query(
                redis::cmd("SET")
                    .arg(&lock)
                    .arg("1")
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis() as u64),
                &lock,
            )
            .await?;
        if matches!(won, Value::Nil) {
            return Ok(Vec::new());
        }
        let [_, set] = scripts::registry_keys(&s.naming.prefix, instance);
        let rooms: Vec<String> = s
            .commands
            .query_as(redis::cmd("SMEMBERS").arg(&set), &set)
            .await?;
        let rooms: Vec<RoomName> = rooms.iter().filter_map(|r| RoomName::parse(r)).collect();
        let mut reaped = Vec::with_capacity(rooms.len());
        for chunk in rooms.chunks(BATCH) {
            let calls = chunk.iter().map(|room| async move {
                let t = RoomTick {
                    room,
                    counts: None,
                    roster: Some(crate::broker::roster::RosterWrite {
                        instance,
                        last_seen: None,
                        changes: &[],
                        max_members,
                        events,
                    }),
                };
                self.room_tick(instance, &t, ttl, events, true).await
            });
            for (room, answer) in chunk.iter().zip(join_all(calls).await) {
                let (_, read) = answer?;
                reaped.push((room.clone(), read.map_or(0, |r| r.events)));
            }
        }
        self.forget_instance(instance).await?;
        Ok(reaped)
    }
}

/// Reads `presence.lua`'s answer.
fn parse_tick(values: Vec<Value>, lists: bool) -> Option<(RoomCounts, Option<RosterRead>)> {
    let mut it = values.into_iter();
    let mut head = [0u64; 7];
    for h in &mut head {
        *h = int(&it.next()?)?;
    }
    let [hosts, viewers, version, over, reset, events, epoch] = head;
    let counts = RoomCounts { hosts, viewers };
    let (over, reset) = (over == 1, reset == 1);
    let batches: Vec<Batch> = it
        .filter_map(|v| text(&v))
        .filter_map(|j| serde_json::from_str(&j).ok())
        .collect();
    let read = lists.then_some(RosterRead {
        epoch,
        version,
        over,
        batches,
        reset,
        events,
        in_process: Vec::new(),
    });
    // Counts-only rooms may still have appended events (occupied, vacated).
    let read = read.or((events > 0).then_some(RosterRead {
        events,
        ..RosterRead::default()
    }));
    Some((counts, read))
}
