//! Room lifecycle webhooks, the delivery side (issue 22, point 4): the [`Dispatcher`] POSTs the
//! events that the lifecycle scripts append, once per cluster, to each room's event stream —
//! **at least once, each event by one node, in order per room**, signed, retried with capped,
//! jittered backoff while a receiver fails. The wire contract is docs/protocol.md, "Webhooks";
//! the flags are `--webhook-*` (docs/configuration.md).
//!
//! - one task per room being delivered ([`worker`]), at most `--webhook-concurrency` at once;
//!   a room's later events wait behind a failing one, other rooms keep flowing;
//! - a room is woken by [`Dispatcher::wake`] (the node calls it after its script appended
//!   events: [`crate::node::Node::lifecycle_appended`]) through a bounded queue
//!   ([`WAKE_QUEUE`] rooms, each queued at most once; a full queue drops the wake-up, counted,
//!   and the next sweep scans for the room);
//! - only the holder of the room's lease in Redis delivers it; releasing refuses while events are
//!   left, so an event appended meanwhile is never stranded ([`store`], `hook_release.lua`);
//! - recovery (the dispatcher's sweep): every `--webhook-sweep-interval` the node renews its
//!   heartbeat, adopts the rooms of instances whose heartbeat expired, and wakes its own indexed
//!   rooms that have no task; every `--webhook-scan-interval` (and after a wake-up was dropped)
//!   a `SCAN` of the event streams catches what no index points to;
//! - in process (no Redis) the events wait in [`store::MemoryEvents`], bounded and lost with
//!   the process;
//! - at shutdown the workers release their leases (undelivered events stay in Redis) and the
//!   node marks its heartbeat expired, so that another node's next sweep adopts its rooms.
//!
//! A layer between [`crate::node`] (which owns the dispatcher) and [`crate::broker`] (the
//! storage): it imports the broker, [`crate::config`], [`crate::metrics`] and [`crate::wire`].

pub mod request;
pub mod store;
pub mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::broker::redis::RedisBroker;
use crate::broker::{Broker, BrokerError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::wire::protocol::RoomName;

use self::request::Sender;
use self::store::{MemoryEvents, Store};

/// Rooms waiting to be woken (default of the hidden `--webhook-wake-queue`); beyond it a
/// wake-up is dropped (counted in `gateway_webhook_wakeups_dropped_total`) and the room is left
/// to the scan.
pub const WAKE_QUEUE: usize = crate::config::WEBHOOK_WAKE_QUEUE;
/// Events read per claim (one Redis round trip), delivered one after the other.
pub const BATCH: usize = 32;
/// Rooms adopted from dead instances, and own rooms checked, per sweep.
pub const SWEEP_ROOMS: usize = 1024;
/// Keys asked for per `SCAN` page of the safety scan.
pub const SCAN_COUNT: usize = 1000;

/// The dispatcher's timing and bounds, from the `--webhook-*` flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--webhook-lease`.
    pub lease: Duration,
    /// `--webhook-retry-min`.
    pub retry_min: Duration,
    /// `--webhook-retry-max`.
    pub retry_max: Duration,
    /// `--webhook-dead-letter-after`.
    pub dead_letter_after: u32,
    /// `--webhook-concurrency`.
    pub concurrency: usize,
    /// `--webhook-sweep-interval`.
    pub sweep: Duration,
    /// `--webhook-scan-interval`.
    pub scan: Duration,
}

impl Settings {
    fn from_config(c: &Config) -> Self {
        let w = &c.webhooks;
        Self {
            lease: w.lease,
            retry_min: w.retry_min,
            retry_max: w.retry_max,
            dead_letter_after: w.dead_letter_after,
            concurrency: w.concurrency,
            sweep: w.sweep_interval,
            scan: w.scan_interval,
        }
    }
}

/// A room queued for, or with, a task on this node (one entry per room: a room is queued at
/// most once however often it is woken).
#[derive(Debug, Default)]
struct Active {
    /// Its task runs (false: queued).
    running: bool,
    /// Woken again while its task ran: the task looks once more before it ends (a wake-up that
    /// raced the release would otherwise be lost).
    again: bool,
    /// `ts_ms` of the event the task is delivering now (the oldest-pending gauge).
    head_ts_ms: Option<u64>,
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The HTTP client could not be built.
    #[error("webhook client: {0}")]
    Client(#[from] reqwest::Error),
}

/// One node's webhook dispatcher (see the module docs).
#[derive(Debug)]
pub struct Dispatcher {
    /// This node instance's id in leases and the index ([`crate::node::Node::instance`]:
    /// `--node-id` plus a random suffix, so that a restarted node never mistakes its
    /// predecessor's leases for its own).
    pub instance: String,
    store: Store,
    sender: Sender,
    settings: Settings,
    metrics: Metrics,
    wake_tx: mpsc::Sender<RoomName>,
    /// Taken by [`Dispatcher::run`].
    wake_rx: Mutex<Option<mpsc::Receiver<RoomName>>>,
    /// Rooms queued or with a task on this node: at most [`WAKE_QUEUE`] queued plus
    /// `--webhook-concurrency` running. A std lock: held to look up or flip an entry, never
    /// across an `.await`.
    active: Mutex<HashMap<RoomName, Active>>,
    /// Bounds the room tasks (`--webhook-concurrency`).
    permits: Arc<Semaphore>,
    /// A wake-up was dropped: the next sweep scans the streams.
    overflowed: AtomicBool,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Dispatcher {
    /// A dispatcher for `config`'s webhooks over `broker`'s storage, not running yet; `None`
    /// without a `--webhook-url` (nothing recorded, nothing sent).
    pub fn new(
        config: &Config,
        instance: &str,
        broker: &Broker,
        metrics: Metrics,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Result<Option<Arc<Self>>, HookError> {
        if !config.lifecycle_events() {
            return Ok(None);
        }
        let w = &config.webhooks;
        let secret = w.secrets().next().unwrap_or_default();
        let sender = Sender::new(w.urls().map(str::to_string).collect(), secret, w.timeout)?;
        let store = match broker.redis() {
            Some(r) => Store::Redis(r.clone()),
            None => Store::Memory(Arc::default()),
        };
        let settings = Settings::from_config(config);
        let (wake_tx, wake_rx) = mpsc::channel(w.wake_queue);
        Ok(Some(Arc::new(Self {
            instance: instance.to_string(),
            store,
            sender,
            permits: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            metrics,
            wake_tx,
            wake_rx: Mutex::new(Some(wake_rx)),
            active: Mutex::new(HashMap::new()),
            overflowed: AtomicBool::new(false),
            stop,
            tracker,
        })))
    }

    /// Starts the dispatcher's loop and its sweep on the node's tracker.
    pub fn spawn(self: &Arc<Self>) {
        self.tracker.spawn(self.clone().run());
        self.tracker.spawn(self.clone().run_sweep());
        self.tracker.spawn(self.clone().run_scan());
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for `room`'s events to be delivered. Never blocks: a full queue drops the wake-up
    /// (counted) and the next sweep scans for the room.
    pub fn wake(&self, room: &RoomName) {
        let mut active = self.active();
        if let Some(a) = active.get_mut(room) {
            a.again = true;
            return;
        }
        if self.wake_tx.try_send(room.clone()).is_ok() {
            active.insert(room.clone(), Active::default());
        } else {
            self.metrics.webhooks.wakeups_dropped.increment(1);
            self.overflowed.store(true, Ordering::Relaxed);
        }
    }

    /// In process (no Redis): records `event` (the event JSON without `id`) for `room` and
    /// wakes its delivery. With Redis the lifecycle scripts append to the stream themselves,
    /// and this does nothing but wake.
    pub fn append_in_process(&self, room: &RoomName, event: String) {
        if let Store::Memory(m) = &self.store {
            m.append(room, event);
        }
        self.wake(room);
    }

    /// Rooms this node is delivering (their leases are held).
    pub fn leases(&self) -> usize {
        self.active().values().filter(|a| a.running).count()
    }

    /// Age of the oldest event a task is delivering now.
    pub fn oldest_pending(&self) -> Duration {
        let now = crate::wire::clock::unix_millis();
        self.active()
            .values()
            .filter_map(|a| a.head_ts_ms)
            .map(|ts| Duration::from_millis(now.saturating_sub(ts)))
            .max()
            .unwrap_or_default()
    }

    /// The in-process event store, if that is the storage.
    pub fn memory(&self) -> Option<&MemoryEvents> {
        match &self.store {
            Store::Memory(m) => Some(m),
            Store::Redis(_) => None,
        }
    }

    /// Receives wake-ups and starts one task per room, at most `--webhook-concurrency` at once.
    async fn run(self: Arc<Self>) {
        let Some(mut rx) = self
            .wake_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        loop {
            let room = tokio::select! {
                _ = self.stop.cancelled() => break,
                room = rx.recv() => match room { Some(r) => r, None => break },
            };
            let permit = tokio::select! {
                _ = self.stop.cancelled() => break,
                p = self.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            // The task about to start reads the stream: earlier wake-ups are covered.
            *self.active().entry(room.clone()).or_default() = Active {
                running: true,
                ..Active::default()
            };
            let me = self.clone();
            self.tracker.spawn(async move {
                worker::run(me, room).await;
                drop(permit);
            });
        }
        self.shut_down().await;
    }

    /// After the stop: waits (briefly) for the room tasks to release their leases, then marks
    /// this instance dead so that another node's next sweep adopts its rooms at once.
    async fn shut_down(&self) {
        let deadline = tokio::time::Instant::now() + crate::SHUTDOWN_GRACE / 3;
        while self.leases() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Store::Redis(r) = &self.store {
            if let Err(e) = r.hook_heartbeat(&self.instance, 0).await {
                warn!(cause = %e, "webhooks: could not hand this node's rooms over");
            }
        }
        info!(instance = %self.instance, "webhook dispatcher stopped");
    }

    /// A room task ends: true if it may go (not woken meanwhile); else it looks once more.
    fn finish(&self, room: &RoomName) -> bool {
        let mut active = self.active();
        match active.get_mut(room) {
            Some(a) if a.again => {
                a.again = false;
                false
            }
            _ => {
                active.remove(room);
                true
            }
        }
    }

    /// Notes the `ts_ms` of the event a room's task is on (`None`: none).
    fn set_head(&self, room: &RoomName, ts_ms: Option<u64>) {
        if let Some(a) = self.active().get_mut(room) {
            a.head_ts_ms = ts_ms;
        }
    }

    fn wake_all(&self, rooms: impl IntoIterator<Item = RoomName>) {
        for room in rooms {
            self.wake(&room);
        }
    }

    /// Queues `room` like [`Dispatcher::wake`], but waits for room in the queue instead of
    /// dropping the wake-up: the scan's pace is the dispatcher's.
    async fn wake_paced(&self, room: RoomName) {
        {
            let mut active = self.active();
            if let Some(a) = active.get_mut(&room) {
                a.again = true;
                return;
            }
            active.insert(room.clone(), Active::default());
        }
        if self.wake_tx.send(room.clone()).await.is_err() {
            self.active().remove(&room);
        }
    }

    /// The recovery sweep (see the module docs): heartbeat, adoption, own rooms every
    /// `--webhook-sweep-interval`; in process, the rooms with waiting events.
    async fn run_sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match &self.store {
                Store::Memory(m) => self.wake_all(m.waiting()),
                Store::Redis(r) => {
                    if let Err(e) = self.sweep_redis(r).await {
                        warn!(cause = %e, "webhooks: sweep failed; retrying next interval");
                    }
                }
            }
        }
    }

    async fn sweep_redis(&self, r: &RedisBroker) -> Result<(), BrokerError> {
        let s = &self.settings;
        let now = crate::wire::clock::unix_millis();
        // Expires only after every lease this instance could have renewed has expired, so that
        // an adopter's claim succeeds.
        let alive = s.lease + s.sweep * 2;
        r.hook_heartbeat(&self.instance, now + alive.as_millis() as u64)
            .await?;
        let adopted = r.hook_adopt(&self.instance, now, SWEEP_ROOMS).await?;
        if !adopted.is_empty() {
            info!(
                rooms = adopted.len(),
                "webhooks: adopted the rooms of a lost node"
            );
        }
        self.wake_all(adopted);
        self.wake_all(r.hook_owned(&self.instance, SWEEP_ROOMS).await?);
        Ok(())
    }

    /// The safety scan, in its own task so that a long scan never delays the heartbeat: at
    /// start, every `--webhook-scan-interval`, and at the next sweep tick after a wake-up was
    /// dropped. It queues what it finds at the dispatcher's pace.
    async fn run_scan(self: Arc<Self>) {
        let Store::Redis(r) = &self.store else {
            return;
        };
        let mut tick = tokio::time::interval(self.settings.sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_scan = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let due = tokio::time::Instant::now() >= next_scan;
            if !(due || self.overflowed.swap(false, Ordering::Relaxed)) {
                continue;
            }
            next_scan = tokio::time::Instant::now() + self.settings.scan;
            let mut cursor = None;
            loop {
                let page = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    page = r.hook_scan(cursor, SCAN_COUNT) => page,
                };
                match page {
                    Ok((rooms, next)) => {
                        for room in rooms {
                            tokio::select! {
                                _ = self.stop.cancelled() => return,
                                _ = self.wake_paced(room) => {}
                            }
                        }
                        match next {
                            Some(c) => cursor = Some(c),
                            None => break,
                        }
                    }
                    Err(e) => {
                        warn!(cause = %e, "webhooks: scan failed; retrying next interval");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn dispatcher() -> Arc<Dispatcher> {
        let config = Config::parse_from([
            "gateway",
            "--webhook-url",
            "http://127.0.0.1:9/hooks",
            "--webhook-secret",
            "0123456789abcdef",
        ]);
        let metrics = Metrics::new("t");
        let stop = CancellationToken::new();
        let inbound = Arc::new(crate::fanout::inbound::Inbound::new(
            "t",
            Arc::new(crate::fanout::hub::Hub::new()),
            metrics.clone(),
            1024,
        ));
        let broker = Broker::Memory(crate::broker::memory::MemoryBroker::new(
            inbound,
            metrics.clone(),
            config.history_limits(),
        ));
        Dispatcher::new(
            &config,
            "n1:test",
            &broker,
            metrics,
            TaskTracker::new(),
            stop,
        )
        .unwrap()
        .expect("a URL turns webhooks on")
    }

    /// The wake queue is bounded: with nothing draining it, the wake-up after [`WAKE_QUEUE`]
    /// rooms is dropped, counted, and the next sweep is told to scan; a room already queued is
    /// not queued twice.
    #[tokio::test]
    async fn a_full_wake_queue_drops_and_counts_and_asks_for_a_scan() {
        let d = dispatcher();
        for _ in 0..3 {
            for i in 0..WAKE_QUEUE {
                d.wake(&RoomName::parse(&format!("r{i}")).unwrap());
            }
        }
        assert!(!d.overflowed.load(Ordering::Relaxed));
        d.wake(&RoomName::parse("one-too-many").unwrap());
        assert!(d.overflowed.load(Ordering::Relaxed));
        let text = d.metrics.render(&Default::default());
        let dropped = text
            .lines()
            .find(|l| l.starts_with("gateway_webhook_wakeups_dropped_total"))
            .unwrap();
        assert!(dropped.ends_with(" 1"), "{dropped}");
    }

    /// A room already being delivered is not queued again, only marked to look once more.
    #[tokio::test]
    async fn a_wake_of_an_active_room_marks_it_instead_of_queueing() {
        let d = dispatcher();
        let room = RoomName::parse("busy").unwrap();
        d.active().insert(
            room.clone(),
            Active {
                running: true,
                ..Active::default()
            },
        );
        for _ in 0..2 * WAKE_QUEUE {
            d.wake(&room);
        }
        assert!(!d.overflowed.load(Ordering::Relaxed));
        assert_eq!(d.leases(), 1);
        assert!(!d.finish(&room), "woken meanwhile: look again");
        assert!(d.finish(&room));
        assert_eq!(d.leases(), 0);
    }
}
