//! The Redis broker: one [`RedisBroker`] for one Redis server, a Sentinel-managed master or a
//! Redis Cluster (sharded pub/sub, Redis 7), over a transport seam — centrifuge's one Redis
//! shard type with a cluster flag.
//!
//! - [`conn`]: the seam on the command side — channel and key names, the command connection
//!   (multiplexed, or routed by slot in a Cluster), commands with their deadline, and scripts by
//!   `EVALSHA` (`EVAL` on `NOSCRIPT`), in one place;
//! - [`subscriber`]: the subscriber task: one pub/sub connection to one server, or
//!   [`cluster`]'s RESP3 Cluster connection with its shard probes; both converge to the desired
//!   set through the one diff of [`crate::broker::subscriptions`];
//! - [`overlap`]: in a Cluster, the gate that lets each message through once while a fresh
//!   subscriber connection replaces the old one (a shard's failover, make before break);
//! - [`publisher`]: the task that keeps the command connection (and, under Sentinel, follows
//!   the master the sentinels name);
//! - [`reconnect`]: the one reconnect loop with capped, jittered backoff, shared by both tasks;
//! - [`rooms`]: the rooms API's reads — rooms with members (a `SCAN` of the presence hashes,
//!   shard after shard) and one room's counts (`counts.lua`);
//! - [`hooks`]: the webhooks' storage — each room's event stream, lease and delivery state
//!   (`hook_claim.lua`, `hook_ack.lua`, `hook_release.lua`) and the fixed-slot index of which
//!   node instance looks after which rooms; the dispatcher is [`crate::hooks`];
//! - [`roster`]: the presence tick (counts, member lists and lifecycle events in one script per
//!   room), a page of a room's list, and the node registry with the reaping of dead instances;
//! - [`witness`]: in an outage, asks the sentinels or the other Cluster nodes whether they lost
//!   the master too (the hand-over's question: is this node cut off, or is every node?);
//! - [`crate::broker::control`]: the control channel and the bans, on the same connections.
//!
//! Publishing runs `publish.lua`: the room's next offset, its epoch, the history append (a stream
//! per room), the idempotency key and the `PUBLISH` (`SPUBLISH` on the room's hash-tagged
//! channel in a Cluster) happen in one atomic step. `history.lua` reads a room's position and
//! history for joining clients; `presence.lua` merges the nodes' counts and
//! member lists.
//!
//! Messages published while a node's subscriber is disconnected do not reach it (Redis pub/sub
//! keeps nothing); the first one after the gap makes the node read the missed ones from history
//! and hand them out first ([`crate::fanout::gapfill`]); only if that fails do members see a jump
//! in offsets and resume with `since` (`/client.js` does so on a gap). Clients learn of the
//! outage through `/readyz`, the `gateway_redis_connected` gauge and errors on their own
//! publishes.

mod cluster;
mod conn;
mod hooks;
mod overlap;
mod publisher;
mod reconnect;
mod rooms;
mod roster;
mod subscriber;
mod witness;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use self::cluster::ClusterState;
use self::conn::{Commands, Naming};
use super::redis_endpoint::Endpoint;
use super::scripts;
use super::subscriptions::Subscriptions;
use super::BrokerError;
use crate::broker::control::{ControlSink, CONTROL_ROOM};
use crate::metrics::Metrics;
use crate::wire::history::{Ack, HistoryLimits, HistoryQuery, HistoryRead};
use crate::wire::protocol::RoomName;

/// The timing of the Redis connections (flags `--redis-timeout`, `--redis-probe-interval` and
/// the hidden `--redis-backoff-cap`, which tests shorten to wait out an outage quickly).
#[derive(Debug, Clone, Copy)]
pub struct RedisTimeouts {
    /// Connect and command deadline.
    pub command: Duration,
    /// Interval of the connections' probes.
    pub probe_interval: Duration,
    /// Longest wait between two reconnect attempts.
    pub backoff_cap: Duration,
}

/// What a Redis broker is started with.
#[derive(Debug)]
pub struct RedisSetup {
    /// Where to connect (parsed from `--redis-url`).
    pub endpoint: Endpoint,
    /// `--channel-prefix`.
    pub prefix: String,
    /// The node's handler of received messages.
    pub inbound: Arc<dyn crate::broker::Receiver>,
    /// The node's metrics (reconnects, control commands).
    pub metrics: Metrics,
    /// Deadlines, probe interval and backoff cap.
    pub timeouts: RedisTimeouts,
    /// History bounds passed to the scripts.
    pub limits: HistoryLimits,
}

pub use self::hooks::{Claim, Release, DEAD_LETTER_MAXLEN};
pub use self::reconnect::Backoff;
pub use self::rooms::RoomsPage;
pub use self::roster::TickAnswer;

/// A node's Redis broker. Cheap to share: state lives in an `Arc` (a clone is the same broker,
/// e.g. the webhook dispatcher's handle on the storage).
#[derive(Debug, Clone)]
pub struct RedisBroker {
    pub(in crate::broker) shared: Arc<Shared>,
}

/// The state the broker's callers and its two tasks share.
pub(in crate::broker) struct Shared {
    /// Where to connect; asked for a client at every (re)connect (Sentinel: the current master).
    pub endpoint: Endpoint,
    pub naming: Naming,
    pub inbound: Arc<dyn crate::broker::Receiver>,
    pub metrics: Metrics,
    pub timeouts: RedisTimeouts,
    pub limits: HistoryLimits,
    /// Desired and confirmed rooms. The control room (`_control`) is desired from the start, so
    /// that its channel is subscribed, followed across reconnects, slot moves and failovers, and
    /// resubscribed, exactly like a room's.
    pub subs: Subscriptions,
    /// The command connection (publish, history, presence, bans, control commands).
    pub commands: Commands,
    /// Where commands from the control channel go (see [`crate::moderation`]).
    pub control: ControlSink,
    /// The subscriber's state, read at scrape time and by `/readyz` (issue 15: derived, never
    /// pushed).
    pub subscriber_up: AtomicBool,
    /// Under Sentinel: the publisher's probe found the subscriber's server is no longer the
    /// master the sentinels name; the subscriber must reconnect too.
    pub subscriber_stale: Notify,
    /// Addresses the subscriber / publisher connected to (Sentinel: compared with the master the
    /// sentinels name at every publisher probe).
    pub subscriber_addr: Mutex<Option<String>>,
    pub publisher_addr: Mutex<Option<String>>,
    /// Cluster only: the shards as the last probe saw them and the subscriptions the servers
    /// dropped.
    pub cluster: ClusterState,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisShared")
            .field("naming", &self.naming)
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Checks the configuration and starts the subscriber and publisher tasks on `tracker`; they
    /// connect in the background and retry until `cancel`.
    pub fn start(
        setup: RedisSetup,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Result<Self, BrokerError> {
        let cluster = matches!(setup.endpoint, Endpoint::Cluster(_));
        if let Endpoint::Cluster(seeds) = &setup.endpoint {
            if setup.prefix.contains(['{', '}']) {
                return Err(BrokerError::Config(
                    "--channel-prefix must not contain braces with a Redis Cluster (the room is the hash tag)".into(),
                ));
            }
            seeds.client(setup.timeouts.command)?;
        }
        let control_room =
            RoomName::parse(CONTROL_ROOM).expect("the control room name is a room name");
        let shared = Arc::new(Shared {
            endpoint: setup.endpoint,
            naming: Naming {
                prefix: setup.prefix,
                cluster,
            },
            inbound: setup.inbound,
            metrics: setup.metrics,
            timeouts: setup.timeouts,
            limits: setup.limits,
            subs: Subscriptions::new(HashSet::from([control_room]), Arc::new(Notify::new())),
            commands: Commands::new(setup.timeouts.command),
            control: ControlSink::default(),
            subscriber_up: AtomicBool::new(false),
            subscriber_stale: Notify::new(),
            subscriber_addr: Mutex::new(None),
            publisher_addr: Mutex::new(None),
            cluster: ClusterState::default(),
        });
        tracker.spawn(subscriber::run(shared.clone(), cancel.clone()));
        tracker.spawn(publisher::run(shared.clone(), cancel));
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

    /// Runs `publish.lua` (in the room's slot): numbers, records and publishes one message (see
    /// [`super::Broker::publish`]).
    pub(super) async fn publish(
        &self,
        room: &RoomName,
        prefix: Bytes,
        id: &str,
        key: Option<&str>,
    ) -> Result<Ack, BrokerError> {
        let s = &self.shared;
        let keys = scripts::publish_keys(&s.naming.prefix, room, key);
        let channel = s.naming.channel(room);
        let command = s.naming.publish_command();
        let answer = s
            .commands
            .eval(&scripts::PUBLISH, &keys, |cmd| {
                scripts::publish_args(cmd, &prefix, &s.limits, command, &channel, id)
            })
            .await?;
        scripts::parse_ack(answer)
    }

    /// Runs `history.lua` (in the room's slot): the room's position and the history `query`
    /// asks for.
    pub(super) async fn history(
        &self,
        room: &RoomName,
        query: &HistoryQuery,
    ) -> Result<HistoryRead, BrokerError> {
        let s = &self.shared;
        let keys = scripts::history_keys(&s.naming.prefix, room);
        let answer = s
            .commands
            .eval(&scripts::HISTORY, &keys, |cmd| {
                scripts::history_args(cmd, query, &s.limits)
            })
            .await?;
        scripts::parse_history_answer(answer)
    }

    /// Rooms subscribed and confirmed (the control channel, subscribed like a room, is not one).
    pub(super) fn subscription_count(&self) -> usize {
        let control = RoomName::parse(CONTROL_ROOM).expect("the control room name is a room name");
        let subs = self.shared.subs.lock();
        subs.confirmed.len() - usize::from(subs.confirmed.contains(&control))
    }

    /// Both connections up and, in a Cluster, every shard's master answering.
    pub(super) fn is_connected(&self) -> bool {
        let s = &self.shared;
        s.subscriber_up.load(Ordering::Relaxed)
            && s.commands.is_up()
            && (!s.naming.cluster || s.cluster.all_up())
    }

    /// Per shard, whether this node can use it now: its master answers and both connections
    /// are up (while either connection is being made again, no shard is usable). One server (or
    /// a Sentinel-managed master) is shard 0; a Cluster not probed yet is one unusable shard 0.
    pub(super) fn usable_shards(&self) -> Vec<bool> {
        let s = &self.shared;
        if !s.naming.cluster {
            return vec![self.is_connected()];
        }
        let states = s.cluster.states();
        if states.is_empty() {
            return vec![false];
        }
        let connected = s.subscriber_up.load(Ordering::Relaxed) && s.commands.is_up();
        states.into_iter().map(|up| up && connected).collect()
    }

    /// The shard of `room` (its slot's owner in the last view; 0 when not known, and for one
    /// server or a Sentinel-managed master).
    pub(super) fn shard_of(&self, room: &RoomName) -> usize {
        let s = &self.shared;
        if !s.naming.cluster {
            return 0;
        }
        s.cluster.shard_of_slot(cluster::slot_of(room)).unwrap_or(0)
    }

    /// Asks the witnesses whether the master of `shard` is lost to every node or to this one.
    pub(super) async fn witness(&self, shard: usize) -> super::Outage {
        witness::ask(&self.shared, shard).await
    }

    /// Per-shard state by shard index: one server (or a Sentinel-managed master) is shard 0.
    pub(super) fn shard_states(&self) -> Vec<bool> {
        if self.shared.naming.cluster {
            self.shared.cluster.states()
        } else {
            vec![self.is_connected()]
        }
    }

    /// `redis`, or `redis-cluster`, for logs and `/readyz`.
    pub(super) fn kind(&self) -> &'static str {
        if self.shared.naming.cluster {
            "redis-cluster"
        } else {
            "redis"
        }
    }
}

impl Shared {
    /// Hands a message received on `channel` to the node: a room's to [`Inbound`], the control
    /// channel's to the control queue. Never blocks (it runs on the connections' read tasks).
    pub fn deliver(&self, channel: &[u8], payload: &[u8]) {
        match self.naming.room_of(channel) {
            Some(CONTROL_ROOM) => self.control.deliver(payload, &self.metrics),
            Some(room) => self.inbound.receive(room, Bytes::copy_from_slice(payload)),
            None => debug!(
                channel = %String::from_utf8_lossy(channel),
                "message on a foreign channel"
            ),
        }
    }

    /// The subscriber task's transition. Only the flag changes: `gateway_redis_connected` is
    /// read from the flags at scrape time (issue 15), like `/readyz`.
    pub fn set_subscriber_up(&self, up: bool) {
        self.subscriber_up.store(up, Ordering::Relaxed);
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
                    shared.commands.set_up(publisher);
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
        s.commands.set_up(true);
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
