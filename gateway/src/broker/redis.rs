//! The Redis broker for one Redis server or a Sentinel-managed master: one dedicated subscriber
//! connection and one publisher connection per node ([`super::redis_cluster`] is the Redis
//! Cluster counterpart).
//!
//! The *subscriber task* owns the subscriber connection and the set of channels actually
//! subscribed on it. It converges that set to the desired set (changed by
//! [`RedisBroker::subscribe`] / [`RedisBroker::unsubscribe`]) in batches, hands every message to
//! the node's [`Inbound`] handler without blocking, and probes the connection with `PING` every
//! `--redis-probe-interval`: a Redis that drops the connection *or* stops answering (a stopped
//! process) is detected within probe interval + `--redis-timeout`. After a loss it reconnects
//! forever with capped, jittered backoff and subscribes the whole desired set again.
//!
//! The *publisher task* keeps one multiplexed connection for `PUBLISH`. A publish on a missing
//! or failed connection fails at once with [`BrokerError`] (the caller tells the client), and a
//! failure hands the connection back to the task to replace it.
//!
//! Publishing runs `publish.lua` (loaded once, run with `EVALSHA`): the room's next offset, its
//! epoch, the history append (a stream per room), the idempotency key and the `PUBLISH` happen in
//! one atomic step. `history.lua` reads a room's position and history for joining clients.
//!
//! Messages published while a node's subscriber is disconnected are not delivered live by that
//! node (Redis pub/sub keeps nothing); its members see a jump in offsets, and a client that
//! resumes with `since` gets them from history (`/client.js` does so on a gap). Clients learn of
//! the outage through `/readyz`, the `gateway_redis_connected` gauge and errors on their own
//! publishes.
//!
//! Under Sentinel, every (re)connect asks the sentinels for the current master
//! ([`Endpoint::client`]), so a node follows a failover by itself: the demoted master's clients
//! are killed by Sentinel (or the master is gone), both tasks reconnect to the new master, and
//! the subscriber subscribes the whole desired set again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use redis::AsyncConnectionConfig;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::redis_endpoint::Endpoint;
use super::scripts;
use super::subscriptions::Subscriptions;
use super::{Backoff, BrokerError};
use crate::fanout::hub::RoomCounts;
use crate::fanout::inbound::Inbound;
use crate::metrics::Metrics;
use crate::moderation::control::{self, ControlSink};
use crate::wire::history::{Ack, HistoryLimits, HistoryQuery, HistoryRead};
use crate::wire::protocol::RoomName;

/// Channels per SUBSCRIBE / UNSUBSCRIBE command when converging, so that a reconnect with
/// thousands of rooms sends a few large commands rather than one huge one or thousands of small.
const SUBSCRIBE_BATCH: usize = 500;
/// First reconnect wait; doubles up to [`BACKOFF_CAP`], with full jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest reconnect wait: short enough that service resumes within seconds of Redis returning.
const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// Rooms per pipelined presence round trip.
const PRESENCE_BATCH: usize = 256;

/// Reports one node's counts of one room and returns the room's cluster-wide counts.
///
/// The room's hash maps node id → "hosts viewers expires_at_ms". Expiry uses Redis' own clock
/// (`TIME`), so nodes' clocks do not matter; fields of nodes that stopped reporting are ignored
/// and deleted once expired, and the whole key expires when no node reports any more. Negative
/// counts withdraw the node's field (its last member left).
pub(super) const PRESENCE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
if tonumber(ARGV[2]) >= 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. (now + ttl))
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local hosts, viewers = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local h, v, exp = string.match(all[i + 1], '^(%d+) (%d+) (%d+)$')
  if exp and tonumber(exp) > now then
    hosts = hosts + tonumber(h)
    viewers = viewers + tonumber(v)
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return {hosts, viewers}
"#;

/// A Lua script run with `EVALSHA`: loaded with `SCRIPT LOAD` on first use, and again when Redis
/// answers `NOSCRIPT` (it restarted and lost its script cache).
#[derive(Debug)]
struct Script {
    source: &'static str,
    /// The SHA1 Redis gave for it; a std lock held only to copy it.
    sha: Mutex<Option<String>>,
}

impl Script {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: Mutex::new(None),
        }
    }

    fn sha(&self) -> Option<String> {
        self.sha.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_sha(&self, sha: Option<String>) {
        *self.sha.lock().unwrap_or_else(|e| e.into_inner()) = sha;
    }
}

/// Timeouts of the Redis connections.
#[derive(Debug, Clone, Copy)]
pub struct RedisTimeouts {
    /// Connect and command deadline.
    pub command: Duration,
    /// Interval of the subscriber's PING probe.
    pub probe_interval: Duration,
}

/// A node's Redis broker. Cheap to share: state lives in an `Arc`.
#[derive(Debug)]
pub struct RedisBroker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Where to connect; asked for a client at every (re)connect (Sentinel: the current master).
    endpoint: Endpoint,
    prefix: String,
    inbound: Arc<Inbound>,
    metrics: Metrics,
    timeouts: RedisTimeouts,
    /// Desired and confirmed subscriptions.
    subs: Subscriptions,
    /// The publisher connection and its generation, `None` while reconnecting.
    publisher: Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Wakes the publisher task when the connection failed.
    publisher_lost: Notify,
    /// History bounds passed to the scripts.
    limits: HistoryLimits,
    /// `publish.lua`.
    publish_script: Script,
    /// `history.lua`.
    history_script: Script,
    /// The command `publish.lua` publishes with: `PUBLISH` (a sharded cluster would use
    /// `SPUBLISH` on the room's hash-tagged channel).
    publish_command: &'static str,
    /// Under Sentinel: the publisher's probe found its server demoted to a replica; the
    /// subscriber must reconnect too (to the master the sentinels name now).
    subscriber_stale: Notify,
    /// Address of the server the subscriber / publisher connected to (Sentinel: compared with
    /// the master the sentinels name at every publisher probe).
    subscriber_addr: Mutex<Option<String>>,
    publisher_addr: Mutex<Option<String>>,
    subscriber_up: AtomicBool,
    publisher_up: AtomicBool,
    /// Where commands from the control channel go (see [`crate::moderation`]).
    control: ControlSink,
}

impl RedisBroker {
    /// Checks the URL and starts the subscriber and publisher tasks on `tracker`; they connect in
    /// the background and retry until `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        endpoint: Endpoint,
        prefix: &str,
        inbound: Arc<Inbound>,
        metrics: Metrics,
        timeouts: RedisTimeouts,
        limits: HistoryLimits,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BrokerError> {
        if matches!(endpoint, Endpoint::Cluster(_)) {
            return Err(BrokerError::Config(
                "a cluster endpoint needs the cluster broker".into(),
            ));
        }
        let shared = Arc::new(Shared {
            endpoint,
            prefix: prefix.to_string(),
            inbound,
            metrics,
            timeouts,
            subs: Subscriptions::new(HashSet::new(), Arc::new(Notify::new())),
            publisher: Mutex::new(None),
            publisher_lost: Notify::new(),
            limits,
            publish_script: Script::new(scripts::PUBLISH_SCRIPT),
            history_script: Script::new(scripts::HISTORY_SCRIPT),
            publish_command: "PUBLISH",
            subscriber_stale: Notify::new(),
            subscriber_addr: Mutex::new(None),
            publisher_addr: Mutex::new(None),
            subscriber_up: AtomicBool::new(false),
            publisher_up: AtomicBool::new(false),
            control: ControlSink::default(),
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

    /// Runs `publish.lua`: numbers, records and publishes one message (see [`super::Broker::publish`]).
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
        let answer: redis::Value = s
            .eval(&s.publish_script, &keys, |cmd| {
                scripts::publish_args(cmd, &prefix, &s.limits, s.publish_command, &channel, id)
            })
            .await?;
        scripts::parse_ack(answer)
    }

    /// Runs `history.lua`: the room's position and the history `query` asks for.
    pub(super) async fn history(
        &self,
        room: &RoomName,
        query: &HistoryQuery,
    ) -> Result<HistoryRead, BrokerError> {
        let s = &self.shared;
        let keys = scripts::history_keys(&s.prefix, room);
        let answer: redis::Value = s
            .eval(&s.history_script, &keys, |cmd| {
                scripts::history_args(cmd, query, &s.limits)
            })
            .await?;
        scripts::parse_history_answer(answer)
    }

    /// Reports this node's local counts of `rooms` (and withdraws its counts of `gone` rooms) and
    /// returns the cluster-wide counts of `rooms`, in order. One pipelined round trip per
    /// [`PRESENCE_BATCH`] rooms.
    pub(super) async fn presence(
        &self,
        node_id: &str,
        rooms: &[(RoomName, RoomCounts)],
        gone: &[RoomName],
        ttl: Duration,
    ) -> Result<Vec<RoomCounts>, BrokerError> {
        let s = &self.shared;
        let ttl_ms = ttl.as_millis() as u64;
        let mut out = Vec::with_capacity(rooms.len());
        let reports = rooms
            .iter()
            .map(|(r, c)| (r, c.hosts as i64, c.viewers as i64));
        let withdrawals = gone.iter().map(|r| (r, -1i64, -1i64));
        let all: Vec<(&RoomName, i64, i64)> = reports.chain(withdrawals).collect();
        for chunk in all.chunks(PRESENCE_BATCH) {
            let mut pipe = redis::pipe();
            for (room, hosts, viewers) in chunk {
                pipe.cmd("EVAL")
                    .arg(PRESENCE_SCRIPT)
                    .arg(1)
                    .arg(s.presence_key(room))
                    .arg(node_id)
                    .arg(*hosts)
                    .arg(*viewers)
                    .arg(ttl_ms);
            }
            let counts: Vec<(u64, u64)> = s.on_publisher(&pipe).await?;
            out.extend(
                counts
                    .into_iter()
                    .map(|(hosts, viewers)| RoomCounts { hosts, viewers }),
            );
        }
        out.truncate(rooms.len());
        Ok(out)
    }

    pub(super) fn set_control(&self, tx: tokio::sync::mpsc::Sender<Bytes>) {
        self.shared.control.set(tx);
    }

    pub(super) async fn publish_control(&self, payload: Bytes) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH")
            .arg(self.shared.control_channel())
            .arg(payload.as_ref());
        self.shared.on_publisher::<(i64,)>(&pipe).await.map(|_| ())
    }

    pub(super) async fn ban(
        &self,
        sub: &str,
        field: &str,
        until_ms: u64,
    ) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(control::BAN_SCRIPT)
            .arg(1)
            .arg(self.shared.ban_key(sub))
            .arg(field)
            .arg(until_ms);
        self.shared.on_publisher::<(i64,)>(&pipe).await.map(|_| ())
    }

    pub(super) async fn unban(&self, sub: &str, field: &str) -> Result<bool, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.shared.ban_key(sub)).arg(field);
        let (n,): (i64,) = self.shared.on_publisher(&pipe).await?;
        Ok(n > 0)
    }

    pub(super) async fn bans(&self, sub: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.shared.ban_key(sub));
        let (all,): (std::collections::HashMap<String, u64>,) =
            self.shared.on_publisher(&pipe).await?;
        Ok(all.into_iter().collect())
    }

    pub(super) fn subscription_count(&self) -> usize {
        self.shared.subs.lock().confirmed.len()
    }

    pub(super) fn is_connected(&self) -> bool {
        self.shared.subscriber_up.load(Ordering::Relaxed)
            && self.shared.publisher_up.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn channel(&self, room: &RoomName) -> String {
        format!("{}{}", self.prefix, room)
    }

    /// The channel of moderation commands, which every node subscribes to permanently (the
    /// room name `_control` is reserved so that no room's channel is this one).
    fn control_channel(&self) -> String {
        format!("{}{}", self.prefix, control::CONTROL_ROOM)
    }

    /// The hash of a user's bans.
    fn ban_key(&self, sub: &str) -> String {
        format!("{}ban:{}", self.prefix, sub)
    }

    /// Runs `script` with `EVALSHA` on the publisher connection (loading it first if needed, and
    /// once more if Redis lost it); `args` appends the script's arguments after its keys.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: impl Fn(&mut redis::Cmd),
    ) -> Result<T, BrokerError> {
        for _ in 0..2 {
            let sha = match script.sha() {
                Some(sha) => sha,
                None => {
                    let mut load = redis::pipe();
                    load.cmd("SCRIPT").arg("LOAD").arg(script.source);
                    let (sha,): (String,) = self.on_publisher(&load).await?;
                    script.set_sha(Some(sha.clone()));
                    sha
                }
            };
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&sha).arg(keys.len()).arg(keys);
            args(&mut cmd);
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            match self.on_publisher::<(T,)>(&pipe).await {
                Ok((v,)) => return Ok(v),
                Err(BrokerError::NoScript) => script.set_sha(None),
                Err(e) => return Err(e),
            }
        }
        Err(BrokerError::NoScript)
    }

    /// The hash holding every node's counts of `room` (keys and channels are separate namespaces
    /// in Redis; the fixed `presence:` part keeps the mapping one-to-one).
    fn presence_key(&self, room: &RoomName) -> String {
        format!("{}presence:{}", self.prefix, room)
    }

    /// The subscriber task's transition. Only the flag changes: `gateway_redis_connected` is
    /// read from the flags at scrape time (issue 15), like `/readyz`.
    fn set_subscriber_up(&self, up: bool) {
        self.subscriber_up.store(up, Ordering::Relaxed);
    }

    /// The publisher task's transition (see [`Shared::set_subscriber_up`]).
    fn set_publisher_up(&self, up: bool) {
        self.publisher_up.store(up, Ordering::Relaxed);
    }

    /// Runs a pipeline on the publisher connection within the command deadline. A missing
    /// connection fails at once; a failure of the connection itself (I/O, drop, timeout) hands it
    /// to the publisher task to be replaced.
    async fn on_publisher<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, BrokerError> {
        let current = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some((generation, mut conn)) = current else {
            return Err(BrokerError::Unavailable);
        };
        match tokio::time::timeout(self.timeouts.command, pipe.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.code() == Some("NOSCRIPT") => Err(BrokerError::NoScript),
            Ok(Err(e)) => {
                // READONLY: this server was demoted to a replica (a Sentinel failover that did
                // not close our connection); reconnecting asks the sentinels for the new master.
                if e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                    || e.code() == Some("READONLY")
                {
                    self.lose_publisher(generation);
                }
                Err(BrokerError::Failed(e.to_string()))
            }
            Err(_) => {
                self.lose_publisher(generation);
                Err(BrokerError::Timeout)
            }
        }
    }

    /// Drops publisher connection `generation` if it is still the current one.
    fn take_publisher(&self, generation: u64) -> bool {
        let mut p = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(&*p, Some((g, _)) if *g == generation) {
            *p = None;
            drop(p);
            self.set_publisher_up(false);
            true
        } else {
            false
        }
    }

    /// A publish saw connection `generation` fail: drop it and wake the publisher task.
    fn lose_publisher(&self, generation: u64) {
        if self.take_publisher(generation) {
            self.publisher_lost.notify_one();
        }
    }

    fn publisher_generation(&self) -> Option<u64> {
        self.publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(g, _)| *g)
    }
}

/// Whether a `ROLE` answer says master.
fn is_master(v: &redis::Value) -> bool {
    match v {
        redis::Value::Array(a) => matches!(
            a.first(),
            Some(redis::Value::BulkString(r)) if r.as_slice() == b"master"
        ),
        _ => false,
    }
}

/// Why a subscriber connection ended.
#[derive(Debug, thiserror::Error)]
enum SubscriberLost {
    #[error("connection closed by Redis")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the server is no longer the master")]
    Demoted,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

/// The task that owns the subscriber connection.
struct Subscriber {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Subscriber {
    async fn run(self) {
        let s = &self.shared;
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut ever_up = false;
        let mut failures = 0u64;
        loop {
            let connect = tokio::time::timeout(s.timeouts.command, async {
                let client = s.endpoint.client().await?;
                let pubsub = client.get_async_pubsub().await?;
                Ok::<_, redis::RedisError>((
                    client.get_connection_info().addr().to_string(),
                    pubsub,
                ))
            });
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = connect => r,
            };
            match conn {
                Ok(Ok((addr, pubsub))) => {
                    *s.subscriber_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    let (mut sink, mut stream) = pubsub.split();
                    let result = self
                        .serve(&mut sink, &mut stream, &mut backoff, ever_up)
                        .await;
                    ever_up = true;
                    failures = 0;
                    s.set_subscriber_up(false);
                    s.subs.lock().confirmed.clear();
                    match result {
                        Ok(()) => return,
                        Err(e) => {
                            warn!(cause = %e, "redis subscriber connection lost; reconnecting")
                        }
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(cause = %e, attempts = failures, "redis subscriber cannot connect");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(attempts = failures, "redis subscriber connect timed out");
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

    /// Serves one connection until it fails (`Err`) or the node shuts down (`Ok`).
    async fn serve(
        &self,
        sink: &mut PubSubSink,
        stream: &mut PubSubStream,
        backoff: &mut Backoff,
        reconnect: bool,
    ) -> Result<(), SubscriberLost> {
        let s = &self.shared;
        let mut current: HashSet<RoomName> = HashSet::new();
        let control = s.control_channel();
        match tokio::time::timeout(s.timeouts.command, sink.subscribe(&control)).await {
            Ok(r) => r?,
            Err(_) => return Err(SubscriberLost::Timeout(s.timeouts.command)),
        }
        self.converge(sink, &mut current).await?;
        s.set_subscriber_up(true);
        backoff.reset();
        if reconnect {
            s.metrics.redis_reconnects_subscriber.increment(1);
        }
        info!(rooms = current.len(), "redis subscriber connected");
        let mut probe = tokio::time::interval(s.timeouts.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Ok(()),
                msg = stream.next() => {
                    let Some(msg) = msg else { return Err(SubscriberLost::Closed) };
                    if msg.get_channel_name() == control {
                        s.control.deliver(msg.get_payload_bytes(), &s.metrics);
                        continue;
                    }
                    match msg.get_channel_name().strip_prefix(s.prefix.as_str()) {
                        Some(room) => s.inbound.receive(room, Bytes::copy_from_slice(msg.get_payload_bytes())),
                        None => debug!(channel = msg.get_channel_name(), "message on a foreign channel"),
                    }
                }
                _ = s.subs.changed() => self.converge(sink, &mut current).await?,
                _ = s.subscriber_stale.notified() => return Err(SubscriberLost::Demoted),
                _ = probe.tick() => {
                    let t = s.timeouts.command;
                    match tokio::time::timeout(t, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(SubscriberLost::Timeout(t)),
                    }
                }
            }
        }
    }

    /// Sends SUBSCRIBE / UNSUBSCRIBE until `current` equals the desired set.
    async fn converge(
        &self,
        sink: &mut PubSubSink,
        current: &mut HashSet<RoomName>,
    ) -> Result<(), SubscriberLost> {
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
                return Ok(());
            }
            if !add.is_empty() {
                let channels: Vec<String> = add.iter().map(|r| s.channel(r)).collect();
                match tokio::time::timeout(t, sink.subscribe(&channels)).await {
                    Ok(r) => r?,
                    Err(_) => return Err(SubscriberLost::Timeout(t)),
                }
                current.extend(add.iter().cloned());
                s.subs.lock().confirmed.extend(add);
                s.subs.confirmed_grew();
            }
            if !remove.is_empty() {
                let channels: Vec<String> = remove.iter().map(|r| s.channel(r)).collect();
                match tokio::time::timeout(t, sink.unsubscribe(&channels)).await {
                    Ok(r) => r?,
                    Err(_) => return Err(SubscriberLost::Timeout(t)),
                }
                let mut subs = s.subs.lock();
                for r in &remove {
                    current.remove(r);
                    subs.confirmed.remove(r);
                }
            }
        }
    }
}

/// The task that keeps the publisher connection.
struct Publisher {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl Publisher {
    async fn run(self) {
        let s = &self.shared;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(s.timeouts.command))
            .set_response_timeout(Some(s.timeouts.command));
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut generation = 0u64;
        let mut failures = 0u64;
        loop {
            let connect = tokio::time::timeout(s.timeouts.command, async {
                let client = s.endpoint.client().await?;
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok::<_, redis::RedisError>((client.get_connection_info().addr().to_string(), conn))
            });
            let conn = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = connect => r,
            };
            match conn {
                Ok(Ok((addr, conn))) => {
                    *s.publisher_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    generation += 1;
                    if generation > 1 {
                        s.metrics.redis_reconnects_publisher.increment(1);
                    }
                    failures = 0;
                    backoff.reset();
                    *s.publisher.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((generation, conn));
                    s.set_publisher_up(true);
                    info!("redis publisher connected");
                    if !self.watch(generation).await {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(cause = %e, attempts = failures, "redis publisher cannot connect");
                    }
                }
                Err(_) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(attempts = failures, "redis publisher connect timed out");
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

    /// Probes the publisher connection until it is lost (`true`) or the node shuts down (`false`),
    /// so that an outage is noticed, and a fresh connection is ready, before the next publish.
    async fn watch(&self, generation: u64) -> bool {
        let s = &self.shared;
        let mut probe = tokio::time::interval(s.timeouts.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = s.publisher_lost.notified() => {
                    if s.publisher_generation() == Some(generation) {
                        continue; // a stale wake-up about an older connection
                    }
                    warn!("redis publisher connection lost; reconnecting");
                    return true;
                }
                _ = probe.tick() => {
                    let conn = s.publisher.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let Some((_, mut conn)) = conn else { return true };
                    // Under Sentinel the probe asks ROLE: a failover may leave this connection
                    // open on the demoted master, where PUBLISH still "works" for that server's
                    // own subscribers only — a silent split from the real master.
                    let sentinel = matches!(s.endpoint, Endpoint::Sentinel(_));
                    let probe = redis::cmd(if sentinel { "ROLE" } else { "PING" }).to_owned();
                    let answer = tokio::time::timeout(
                        s.timeouts.command,
                        probe.query_async::<redis::Value>(&mut conn),
                    )
                    .await;
                    let mut demoted = sentinel && matches!(&answer, Ok(Ok(v)) if !is_master(v));
                    if sentinel && !demoted {
                        // A forced failover leaves the old master a master until Sentinel
                        // converts it (seconds): follow the sentinels' word, not the server's.
                        let named = tokio::time::timeout(s.timeouts.command, s.endpoint.client())
                            .await;
                        if let Ok(Ok(c)) = named {
                            let named = c.get_connection_info().addr().to_string();
                            let on = |a: &Mutex<Option<String>>| {
                                a.lock().unwrap_or_else(|e| e.into_inner()).as_deref()
                                    == Some(named.as_str())
                            };
                            demoted = !on(&s.publisher_addr);
                            if !on(&s.subscriber_addr) {
                                s.subscriber_stale.notify_waiters();
                            }
                        }
                    }
                    if demoted {
                        s.take_publisher(generation);
                        s.subscriber_stale.notify_waiters();
                        warn!("redis server is no longer the master; asking the sentinels again");
                        return true;
                    }
                    if !matches!(answer, Ok(Ok(_))) {
                        s.take_publisher(generation);
                        warn!("redis publisher probe failed; reconnecting");
                        return true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::config::Config;
    use crate::node::Node;

    /// Issue 15: the subscriber and publisher tasks change their state on two worker threads at
    /// the same moment, many times over; after every round, what `/metrics` shows and what
    /// `/readyz` reports must agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connected_gauge_agrees_with_readiness_under_concurrent_flips() {
        let mut config = Config::defaults();
        config.redis_url = Some("redis://127.0.0.1:1/".into());
        config.redis_timeout = Duration::from_millis(100);
        let stop = CancellationToken::new();
        stop.cancel(); // the connection tasks exit at once: only this test changes the state
        let node = Node::start(
            config.clone(),
            Metrics::new("t"),
            TaskTracker::new(),
            stop,
            None,
        )
        .unwrap();
        let Broker::Redis(broker) = &node.broker else {
            unreachable!()
        };
        let shared = broker.shared.clone();
        let rounds = 5_000;
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let plan: Arc<Vec<(bool, bool)>> = Arc::new(
            (0..rounds)
                .map(|_| (fastrand::bool(), fastrand::bool()))
                .collect(),
        );
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(0);
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel::<()>(0);
        let flipper = {
            let (shared, barrier, plan) = (shared.clone(), barrier.clone(), plan.clone());
            std::thread::spawn(move || {
                for &(_, publisher) in plan.iter() {
                    rx.recv().unwrap();
                    barrier.wait();
                    shared.set_publisher_up(publisher);
                    done_tx.send(()).unwrap();
                }
            })
        };
        let mut disagreements = 0;
        for &(subscriber, _) in plan.iter() {
            tx.send(()).unwrap();
            barrier.wait();
            shared.set_subscriber_up(subscriber);
            done_rx.recv().unwrap();
            // The observation point: both transitions are done.
            let ready = node.broker.is_connected();
            let gauge = metric(&node.render_metrics(), "gateway_redis_connected");
            if (gauge == 1.0) != ready {
                disagreements += 1;
            }
        }
        flipper.join().unwrap();
        assert_eq!(
            disagreements, 0,
            "gauge disagreed with /readyz in {disagreements} of {rounds} rounds"
        );
    }

    /// The race's outcome made deterministic: a connection's state changes and no gauge update
    /// follows it (in the race, the update that would have reflected it was overwritten by a
    /// concurrent one computed from a stale flag). A pushed gauge stays wrong; a derived one
    /// cannot.
    #[tokio::test]
    async fn connected_gauge_is_read_from_the_state_at_scrape_time() {
        let mut config = Config::defaults();
        config.redis_url = Some("redis://127.0.0.1:1/".into());
        config.redis_timeout = Duration::from_millis(100);
        let stop = CancellationToken::new();
        stop.cancel();
        let node = Node::start(config, Metrics::new("t"), TaskTracker::new(), stop, None).unwrap();
        let Broker::Redis(broker) = &node.broker else {
            unreachable!()
        };
        let s = &broker.shared;
        let gauge = || metric(&node.render_metrics(), "gateway_redis_connected");
        assert_eq!(gauge(), 0.0);
        s.set_subscriber_up(true);
        s.set_publisher_up(true);
        assert!(node.broker.is_connected());
        assert_eq!(gauge(), 1.0);
        s.subscriber_up.store(false, Ordering::Relaxed); // the lost update
        assert!(!node.broker.is_connected());
        assert_eq!(
            gauge(),
            0.0,
            "the gauge must follow the state, as /readyz does"
        );
        let text = node.render_metrics();
        assert_eq!(
            metric(&text, "gateway_redis_shard_up"),
            0.0,
            "one Redis is shard 0"
        );
        assert_eq!(metric(&text, "gateway_redis_shards"), 1.0);
        s.subs
            .lock()
            .confirmed
            .insert(RoomName::parse("a").unwrap());
        assert_eq!(
            metric(&node.render_metrics(), "gateway_broker_subscriptions"),
            1.0
        );
    }

    fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }
}
