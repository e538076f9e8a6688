//! The transport seam: everything that differs between one Redis server (or a Sentinel-managed
//! master) and a Redis Cluster on the command side — the names of channels and keys
//! ([`Naming`]), the command connection ([`Conn`]: multiplexed, or a Cluster connection that
//! routes each command to its key's slot), and the one place where commands run
//! ([`Commands`]): the deadline, what a failure means for the connection, and scripts by
//! `EVALSHA` with `EVAL` when a server answers `NOSCRIPT`.
//!
//! The subscriber side of the seam is [`super::subscriber`] (one server) and
//! [`super::cluster`] (Cluster shards).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, Value};
use tokio::sync::Notify;

use crate::broker::scripts::LuaScript;
use crate::broker::BrokerError;
use crate::wire::protocol::RoomName;

/// How rooms map to channels and keys. With a Cluster the room is the hash tag of its channel
/// (`PREFIX{room}`) and of every key of the room, so that one room lives on one slot.
#[derive(Debug, Clone)]
pub struct Naming {
    /// `--channel-prefix`.
    pub prefix: String,
    /// Whether the names are for a Redis Cluster (hash-tagged channel, `SPUBLISH`).
    pub cluster: bool,
}

impl Naming {
    /// The room's pub/sub channel: `PREFIXroom`, or `PREFIX{room}` in a Cluster.
    pub fn channel(&self, room: &RoomName) -> String {
        if self.cluster {
            format!("{}{{{}}}", self.prefix, room)
        } else {
            format!("{}{}", self.prefix, room)
        }
    }

    /// The room of a channel of ours (the inverse of [`Naming::channel`]).
    pub fn room_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let rest = std::str::from_utf8(channel)
            .ok()?
            .strip_prefix(self.prefix.as_str())?;
        if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }

    /// The hash of every node's counts of `room`: `PREFIXpresence:room` (keys and channels are
    /// separate namespaces in Redis; the fixed `presence:` part keeps the mapping one-to-one),
    /// or `PREFIX{room}:presence` in a Cluster (the channel's slot).
    pub fn presence_key(&self, room: &RoomName) -> String {
        if self.cluster {
            format!("{}{{{}}}:presence", self.prefix, room)
        } else {
            format!("{}presence:{}", self.prefix, room)
        }
    }

    /// The command `publish.lua` publishes with: `SPUBLISH` (sharded pub/sub) in a Cluster.
    pub fn publish_command(&self) -> &'static str {
        if self.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// A command connection. Cheap to clone: both kinds multiplex over shared sockets.
#[derive(Clone)]
pub enum Conn {
    /// One server (or the master Sentinel named at connect time).
    Server(MultiplexedConnection),
    /// A Cluster: one connection per master, each command routed to its key's slot.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Runs `cmd`; in a Cluster on the master of `key`'s slot.
    /// Runs `cmd` on the server (in a Cluster, on the master of `slot`).
    async fn run_at(&mut self, cmd: &Cmd, slot: u16) -> redis::RedisResult<Value> {
        match self {
            Self::Server(c) => cmd.query_async(c).await,
            Self::Cluster(c) => {
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                    Route::new(slot, SlotAddr::Master),
                ));
                c.route_command(cmd.clone(), route).await
            }
        }
    }
}

/// The command connection as the broker's callers see it: swapped by the publisher task,
/// shared by every publish, history read, presence report and ban.
pub struct Commands {
    /// The connection and its generation, `None` while reconnecting. A std lock, held only to
    /// clone or swap the handle, never across an await.
    current: Mutex<Option<(u64, Conn)>>,
    /// Wakes the publisher task: the connection failed, or (Cluster) a shard has a new master
    /// and a fresh connection must be put in place ([`Commands::needs_fresh`]).
    pub lost: Notify,
    /// Whether a connection is in place; read at scrape time and by `/readyz` (issue 15).
    up: AtomicBool,
    /// The deadline of one command.
    timeout: Duration,
    /// Cluster: slot ranges whose commands fail at once — shards whose master does not answer
    /// the subscriber's probe, and shards with a new master that the connection in place does
    /// not know yet (until a fresh one is installed). Such a command would send the crate's
    /// connection into its own slot-map refresh, which holds every shard's commands meanwhile.
    fenced: Mutex<Fence>,
}

/// See [`Commands::fenced`].
#[derive(Debug, Default)]
struct Fence {
    down: Vec<(u16, u16)>,
    /// Shards with a new master, fenced until both the command connection in place is a fresh
    /// one and this node's subscriber has their rooms subscribed on the new master: a publish
    /// acknowledged before that would reach this node's own members only by a gap fill.
    stale: Vec<(u16, u16)>,
    commands_fresh: bool,
    rooms_subscribed: bool,
}

impl Fence {
    fn holds(&self, slot: u16) -> bool {
        self.down
            .iter()
            .chain(&self.stale)
            .any(|(a, b)| (*a..=*b).contains(&slot))
    }

    fn lift_if_ready(&mut self) {
        if self.commands_fresh && self.rooms_subscribed {
            self.stale.clear();
        }
    }
}

impl Commands {
    /// No connection yet.
    pub fn new(timeout: Duration) -> Self {
        Self {
            current: Mutex::new(None),
            lost: Notify::new(),
            up: AtomicBool::new(false),
            timeout,
            fenced: Mutex::new(Fence::default()),
        }
    }

    fn fence(&self) -> std::sync::MutexGuard<'_, Fence> {
        self.fenced.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cluster: the slot ranges of the shards whose master is down (from each probe).
    pub fn set_down(&self, ranges: Vec<(u16, u16)>) {
        self.fence().down = ranges;
    }

    /// Cluster: slot ranges with a new master, fenced until a fresh connection is installed and
    /// the subscriber says their rooms are subscribed ([`Commands::rooms_subscribed`]).
    pub fn add_stale(&self, ranges: impl IntoIterator<Item = (u16, u16)>) {
        let mut f = self.fence();
        f.stale.extend(ranges);
        f.commands_fresh = false;
        f.rooms_subscribed = false;
    }

    /// Whether the command connection in place predates a shard's new master.
    pub fn needs_fresh(&self) -> bool {
        let f = self.fence();
        !f.stale.is_empty() && !f.commands_fresh
    }

    /// The subscriber has every room of the shards with a new master subscribed on them.
    pub fn rooms_subscribed(&self) {
        let mut f = self.fence();
        f.rooms_subscribed = true;
        f.lift_if_ready();
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(u64, Conn)>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts connection `generation` in place. A fresh connection knows the current slot map.
    pub fn install(&self, generation: u64, conn: Conn) {
        *self.slot() = Some((generation, conn));
        let mut f = self.fence();
        f.commands_fresh = true;
        f.lift_if_ready();
        drop(f);
        self.set_up(true);
    }

    /// The connection, for the publisher task's probe.
    pub fn get(&self) -> Option<(u64, Conn)> {
        self.slot().clone()
    }

    /// The generation in place, if any.
    pub fn generation(&self) -> Option<u64> {
        self.slot().as_ref().map(|(g, _)| *g)
    }

    /// Drops connection `generation` if it is still the current one; returns whether it was.
    pub fn take(&self, generation: u64) -> bool {
        let mut slot = self.slot();
        if matches!(&*slot, Some((g, _)) if *g == generation) {
            *slot = None;
            drop(slot);
            self.set_up(false);
            true
        } else {
            false
        }
    }

    /// Connection `generation` failed: drop it and wake the publisher task to replace it.
    pub fn lose(&self, generation: u64) {
        if self.take(generation) {
            self.lost.notify_one();
        }
    }

    /// Only the flag changes: `gateway_redis_connected` is read from it at scrape time.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// Whether a connection is in place.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs `cmd` (in a Cluster, on `key`'s slot) within the command deadline. A missing
    /// connection fails at once. On one server, a failure of the connection itself (I/O, drop,
    /// timeout, `READONLY`: a demoted master) hands it to the publisher task to be replaced; a
    /// Cluster connection is not replaced on one failure (a shard being down must not take the
    /// healthy shards' commands with it): when the subscriber's probe sees a shard with a new or
    /// returning master, the publisher task puts a fresh one in its place.
    pub async fn query(&self, cmd: &Cmd, key: &str) -> Result<Value, BrokerError> {
        self.query_at(cmd, key_slot(key)).await
    }

    /// [`Commands::query`] on the master of `slot` (a Cluster; the one server otherwise): for
    /// commands that name no key, such as `SCAN` of one shard.
    pub async fn query_at(&self, cmd: &Cmd, slot: u16) -> Result<Value, BrokerError> {
        let Some((generation, mut conn)) = self.get() else {
            return Err(BrokerError::Unavailable);
        };
        if matches!(conn, Conn::Cluster(_)) && self.fence().holds(slot) {
            return Err(BrokerError::Unavailable);
        }
        let answer = tokio::time::timeout(self.timeout, conn.run_at(cmd, slot)).await;
        let (error, broken) = match answer {
            // A routed command's server error comes back as a value, not as an `Err`.
            Ok(Ok(Value::ServerError(e))) => classify(&redis::RedisError::from(e)),
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => classify(&e),
            Err(_) => (BrokerError::Timeout, true),
        };
        if broken && matches!(conn, Conn::Server(_)) {
            self.lose(generation);
        }
        Err(error)
    }

    /// [`Commands::query`], the answer read as `T`.
    pub async fn query_as<T: redis::FromRedisValue>(
        &self,
        cmd: &Cmd,
        key: &str,
    ) -> Result<T, BrokerError> {
        redis::from_redis_value(self.query(cmd, key).await?)
            .map_err(|e| BrokerError::Failed(e.to_string()))
    }

    /// Runs `script` on `keys` (in a Cluster, on the first key's slot) with `args` appended after
    /// the keys: `EVALSHA` by the hash computed at start, and `EVAL` — which also caches the
    /// script on that server — when the server answers `NOSCRIPT` (new, restarted or failed
    /// over). The one place a script reaches Redis.
    pub async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &LuaScript,
        keys: &[String],
        args: impl Fn(&mut Cmd),
    ) -> Result<T, BrokerError> {
        let call = |command: &str, body: &str| {
            let mut cmd = redis::cmd(command);
            cmd.arg(body).arg(keys.len()).arg(keys);
            args(&mut cmd);
            cmd
        };
        let key = keys.first().map(String::as_str).unwrap_or_default();
        let answer = match self.query(&call("EVALSHA", &script.sha), key).await {
            Err(BrokerError::NoScript) => self.query(&call("EVAL", script.source), key).await,
            other => other,
        }?;
        redis::from_redis_value(answer).map_err(|e| BrokerError::Failed(e.to_string()))
    }
}

/// The Cluster slot of `key`: CRC16 of its hash tag (the text between the first `{` and the
/// next `}`, if not empty), else of the whole key.
pub fn key_slot(key: &str) -> u16 {
    let k = key.as_bytes();
    let tag = k
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let rest = &k[open + 1..];
            rest.iter()
                .position(|&c| c == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(k);
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

/// What a failed command means: the caller's error, and whether the connection itself failed.
fn classify(e: &redis::RedisError) -> (BrokerError, bool) {
    if e.code() == Some("NOSCRIPT") {
        return (BrokerError::NoScript, false);
    }
    let broken = e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || e.is_unrecoverable_error()
        || e.code() == Some("READONLY");
    (BrokerError::Failed(e.to_string()), broken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_follow_the_hash_tag() {
        // CLUSTER KEYSLOT: demo = 903; {demo}:x and gw:room:{demo} hash the tag only.
        assert_eq!(key_slot("demo"), 903);
        assert_eq!(key_slot("gw:room:{demo}"), 903);
        assert_eq!(key_slot("gw:room:{demo}:meta"), 903);
        // An empty tag, or an opening brace never closed, is no tag: the whole key counts.
        let whole = |k: &[u8]| crc16::State::<crc16::XMODEM>::calculate(k) % 16384;
        assert_eq!(key_slot("{}demo"), whole(b"{}demo"));
        assert_eq!(key_slot("a{b"), whole(b"a{b"));
        assert_ne!(whole(b"{}demo"), whole(b"demo"));
    }

    #[test]
    fn fenced_slots_fail_at_once() {
        let mut f = Fence {
            down: vec![(0, 5460)],
            stale: vec![(10923, 16383)],
            ..Fence::default()
        };
        assert!(f.holds(903) && f.holds(16000) && !f.holds(6000));
        // A re-mastered shard opens only when both connections are ready for it.
        f.commands_fresh = true;
        f.lift_if_ready();
        assert!(f.holds(16000));
        f.rooms_subscribed = true;
        f.lift_if_ready();
        assert!(!f.holds(16000) && f.holds(903));
    }

    #[test]
    fn names_round_trip_in_both_modes() {
        let room = RoomName::parse("demo").unwrap();
        for (cluster, channel, presence) in [
            (false, "gw:room:demo", "gw:room:presence:demo"),
            (true, "gw:room:{demo}", "gw:room:{demo}:presence"),
        ] {
            let n = Naming {
                prefix: "gw:room:".into(),
                cluster,
            };
            assert_eq!(n.channel(&room), channel);
            assert_eq!(n.presence_key(&room), presence);
            assert_eq!(n.room_of(channel.as_bytes()), Some("demo"));
            assert_eq!(n.room_of(b"other:demo"), None);
        }
    }
}
