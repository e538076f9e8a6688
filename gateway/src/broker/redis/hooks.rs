//! The webhooks' storage in Redis; what is delivered when, and how, is [`crate::hooks`]'s.
//!
//! Per room, in the room's slot (every key hash-tagged by the room,
//! [`scripts::room_key`]): the event stream `…{room}:events` (appended once per cluster by the
//! lifecycle scripts, `XADD … MAXLEN ~ 10000`, one field `e`); the lease `…{room}:hooklease`
//! (the id of the one node instance that delivers the room, `SET NX PX`, renewed while it
//! delivers); the delivery state `…{room}:hookstate` (events delivered, events counted as
//! trimmed unsent); the dead letters `…{room}:deadletter`. The stream holds only undelivered
//! events: a delivered one is `XDEL`eted by `hook_ack.lua`, so "undelivered" is "in the stream".
//!
//! In one fixed slot (`…{_hooks}:…`), the index that recovery reads instead of the keyspace:
//! `instances` (a sorted set: instance → heartbeat expiry, unix ms) and `rooms:<instance>` (the
//! rooms an instance took responsibility for). A dead instance's rooms are moved, one `SMOVE`
//! each, to the set of the instance that adopts them, so that exactly one live instance owns the
//! duty of looking at each.

use super::rooms::glob_escape;
use super::RedisBroker;
use crate::broker::scripts::{self, room_key};
use crate::broker::BrokerError;
use crate::wire::protocol::RoomName;
use std::time::Duration;

/// Dead letters kept per room (`XADD … MAXLEN ~`).
pub const DEAD_LETTER_MAXLEN: u64 = 1000;

/// What [`RedisBroker::hook_claim`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Claim {
    /// Whether this instance holds the lease now (false: another instance delivers the room).
    pub held: bool,
    /// Events the stream's MAXLEN trimmed before they were delivered, newly counted.
    pub dropped: u64,
    /// The oldest undelivered events, oldest first: (stream entry id, event JSON).
    pub events: Vec<(String, String)>,
}

/// What [`RedisBroker::hook_release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The lease is gone (and, with nothing left, the stream and its state).
    Released,
    /// Events are left: the holder keeps the lease and delivers them.
    Pending,
    /// The lease was not this instance's.
    NotOurs,
}

fn failed(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Failed(e.to_string())
}

impl RedisBroker {
    /// The keys of the hook scripts for `room`: events, lease, state, dead letters.
    fn hook_keys(&self, room: &RoomName) -> [String; 4] {
        let p = &self.shared.naming.prefix;
        ["events", "hooklease", "hookstate", "deadletter"].map(|k| room_key(p, room, k))
    }

    /// A key of the fixed-slot index.
    fn index_key(&self, suffix: &str) -> String {
        format!("{}{{_hooks}}:{suffix}", self.shared.naming.prefix)
    }

    /// Takes or renews `instance`'s lease on `room` for `lease` and reads up to `count` of its
    /// oldest undelivered events (0: renew only). See `hook_claim.lua`.
    pub async fn hook_claim(
        &self,
        instance: &str,
        room: &RoomName,
        lease: Duration,
        count: usize,
    ) -> Result<Claim, BrokerError> {
        let keys = &self.hook_keys(room)[..3];
        let answer: Vec<redis::Value> = self
            .shared
            .commands
            .eval(&scripts::HOOK_CLAIM, keys, |cmd| {
                cmd.arg(instance).arg(lease.as_millis() as u64).arg(count);
            })
            .await?;
        let mut it = answer.into_iter();
        let int = |v: Option<redis::Value>| -> Result<i64, BrokerError> {
            redis::from_redis_value(v.ok_or_else(|| failed("short claim answer"))?).map_err(failed)
        };
        if int(it.next())? == 0 {
            return Ok(Claim::default());
        }
        let dropped = int(it.next())?.max(0) as u64;
        let mut events = Vec::new();
        while let (Some(id), Some(event)) = (it.next(), it.next()) {
            events.push((
                redis::from_redis_value(id).map_err(failed)?,
                redis::from_redis_value(event).map_err(failed)?,
            ));
        }
        Ok(Claim {
            held: true,
            dropped,
            events,
        })
    }

    /// Removes the delivered event `id` of `room` (into the dead letters with `dead_letter`'s
    /// reason) and renews the lease; false when the lease is no longer `instance`'s.
    pub async fn hook_ack(
        &self,
        instance: &str,
        room: &RoomName,
        id: &str,
        lease: Duration,
        dead_letter: Option<&str>,
    ) -> Result<bool, BrokerError> {
        let keys = self.hook_keys(room);
        let done: i64 = self
            .shared
            .commands
            .eval(&scripts::HOOK_ACK, &keys, |cmd| {
                cmd.arg(instance)
                    .arg(id)
                    .arg(lease.as_millis() as u64)
                    .arg(dead_letter.unwrap_or(""))
                    .arg(DEAD_LETTER_MAXLEN);
            })
            .await?;
        Ok(done == 1)
    }

    /// Releases `instance`'s lease on `room` unless events are left (`force`: even then, at
    /// shutdown). See `hook_release.lua`.
    pub async fn hook_release(
        &self,
        instance: &str,
        room: &RoomName,
        force: bool,
    ) -> Result<Release, BrokerError> {
        let keys = &self.hook_keys(room)[..3];
        let answer: i64 = self
            .shared
            .commands
            .eval(&scripts::HOOK_RELEASE, keys, |cmd| {
                cmd.arg(instance).arg(if force { "1" } else { "0" });
            })
            .await?;
        Ok(match answer {
            1 => Release::Released,
            0 => Release::Pending,
            _ => Release::NotOurs,
        })
    }

    /// Records that `instance` lives until `until_ms` (unix ms); 0 marks it dead at once (a
    /// node that stops hands its rooms to the next sweep of another node).
    pub async fn hook_heartbeat(&self, instance: &str, until_ms: u64) -> Result<(), BrokerError> {
        let key = self.index_key("instances");
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(&key).arg(until_ms).arg(instance);
        self.shared.commands.query(&cmd, &key).await.map(drop)
    }

    /// Adds `room` to (or removes it from) the rooms `instance` is responsible for.
    pub async fn hook_own(
        &self,
        instance: &str,
        room: &RoomName,
        own: bool,
    ) -> Result<(), BrokerError> {
        let key = self.index_key(&format!("rooms:{instance}"));
        let mut cmd = redis::cmd(if own { "SADD" } else { "SREM" });
        cmd.arg(&key).arg(room.as_str());
        self.shared.commands.query(&cmd, &key).await.map(drop)
    }

    /// Up to `max` of the rooms `instance` is responsible for.
    pub async fn hook_owned(
        &self,
        instance: &str,
        max: usize,
    ) -> Result<Vec<RoomName>, BrokerError> {
        let key = self.index_key(&format!("rooms:{instance}"));
        let mut cmd = redis::cmd("SRANDMEMBER");
        cmd.arg(&key).arg(max);
        let rooms: Vec<String> = self.shared.commands.query_as(&cmd, &key).await?;
        Ok(rooms.iter().filter_map(|r| RoomName::parse(r)).collect())
    }

    /// Moves up to `max` rooms of instances whose heartbeat expired before `now_ms` into
    /// `instance`'s set (one `SMOVE` each: one adopter per room), forgets the dead instances
    /// left with no room, and returns the adopted rooms.
    pub async fn hook_adopt(
        &self,
        instance: &str,
        now_ms: u64,
        max: usize,
    ) -> Result<Vec<RoomName>, BrokerError> {
        let c = &self.shared.commands;
        let instances = self.index_key("instances");
        let mine = self.index_key(&format!("rooms:{instance}"));
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(&instances)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(16);
        let dead: Vec<String> = c.query_as(&cmd, &instances).await?;
        let mut adopted = Vec::new();
        for other in dead.iter().filter(|d| *d != instance) {
            let theirs = self.index_key(&format!("rooms:{other}"));
            let mut cmd = redis::cmd("SRANDMEMBER");
            cmd.arg(&theirs)
                .arg(max.saturating_sub(adopted.len()).max(1));
            let rooms: Vec<String> = c.query_as(&cmd, &theirs).await?;
            for room in rooms {
                let mut cmd = redis::cmd("SMOVE");
                cmd.arg(&theirs).arg(&mine).arg(&room);
                let moved: i64 = c.query_as(&cmd, &theirs).await?;
                if moved == 1 {
                    if let Some(r) = RoomName::parse(&room) {
                        adopted.push(r);
                    }
                }
            }
            let mut cmd = redis::cmd("SCARD");
            cmd.arg(&theirs);
            let left: i64 = c.query_as(&cmd, &theirs).await?;
            if left == 0 {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&instances).arg(other);
                c.query(&cmd, &instances).await?;
            }
            if adopted.len() >= max {
                break;
            }
        }
        Ok(adopted)
    }

    /// One `SCAN` page of the rooms with an event stream, from `cursor` (shard index, server
    /// cursor; `None` = from the start), shard after shard in a Cluster, and the next cursor
    /// (`None`: done). The safety net behind the index.
    pub async fn hook_scan(
        &self,
        cursor: Option<(usize, u64)>,
        count: usize,
    ) -> Result<(Vec<RoomName>, Option<(usize, u64)>), BrokerError> {
        let s = &self.shared;
        let shards: Vec<u16> = if s.naming.cluster {
            s.cluster.first_slots()
        } else {
            vec![0]
        };
        let (mut shard, at) = cursor.unwrap_or((0, 0));
        let Some(&slot) = shards.get(shard) else {
            return Ok((Vec::new(), None));
        };
        let prefix = glob_escape(&s.naming.prefix);
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at)
            .arg("MATCH")
            .arg(format!("{prefix}{{*}}:events"))
            .arg("COUNT")
            .arg(count);
        let (next, keys): (u64, Vec<String>) =
            redis::from_redis_value(s.commands.query_at(&cmd, slot).await?).map_err(failed)?;
        let rooms = keys
            .iter()
            .filter_map(|k| {
                let rest = k.strip_prefix(s.naming.prefix.as_str())?;
                RoomName::parse(rest.strip_prefix('{')?.strip_suffix("}:events")?)
            })
            .collect();
        if next == 0 {
            shard += 1;
        }
        let cursor = (shard < shards.len()).then_some((shard, next));
        Ok((rooms, cursor))
    }
}
