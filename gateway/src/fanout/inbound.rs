//! What the node does with a payload the broker received for a room: count it, check it, classify
//! it (our envelope, with its offset and epoch if it has them, or another program's plain
//! `PUBLISH`), stamp the latter, and hand one WebSocket frame (framed once, shared by every
//! member) to the hub for its local members,
//! with the message's [`Stamp`] so that members catching up on history merge by it.
//!
//! This is the one door into the hub: the brokers call [`Inbound::receive`], and the node's local
//! fallback during a broker outage calls [`Inbound::deliver`]; neither goes to the hub directly.
//! Each room's messages pass the node's [`WriteWindow`] on their way: a room sending fewer than
//! two messages per window on average is fanned out at once, a hotter one in batches, one per
//! window, by [`Inbound::run_window`].
//! The way is one-directional, as in centrifuge (broker → node's handler → hub): the brokers know
//! only this handler, and the hub knows only local rooms and members. Message ids are stamped
//! here too, for the node's publishes and for wrapped plain payloads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fanout::gapfill::{Held, Missed, MissedSource, Sequences, Step};
use crate::fanout::hub::Hub;
use crate::fanout::write_window::{Batch, Offer, WriteWindow};
use crate::metrics::{DropReason, GapFill, Metrics, Source};
use crate::wire::frame::frame_text;
use crate::wire::history::{Since, Stamp};
use crate::wire::protocol::{self, BrokerPayload, RoomName};

/// How far in the future a message's `ts` may be (clock skew between nodes) and still be sampled.
const MAX_CLOCK_SKEW_US: u64 = 1_000_000;
/// Latency samples above this are not latency but a foreign clock, and are not recorded.
const MAX_LATENCY_SAMPLE_US: u64 = 3_600_000_000;

/// The node's handler of broker payloads. Shared by the broker (its only caller from the
/// cluster side) and the node.
#[derive(Debug)]
pub struct Inbound {
    hub: Arc<Hub>,
    metrics: Metrics,
    /// Largest raw payload from the broker that is wrapped and delivered (`--max-message-size`).
    max_raw_payload: usize,
    /// Largest envelope from the broker that is delivered: a message whose `data` was at most
    /// `--max-message-size` bytes, plus room for JSON string escaping and the envelope fields.
    max_envelope: usize,
    ids: MessageIds,
    /// Chooses between writing from the fan-out and waking the members' writers.
    pace: DeliveryPace,
    /// Batches the messages of hot rooms (`--write-window`).
    window: WriteWindow,
    /// Each room's last offset handed out, and its gap being filled ([`crate::fanout::gapfill`]).
    seq: Sequences,
    /// Where gaps are read from, set once the node exists (without it a gap is handed out as is).
    filler: OnceLock<Filler>,
}

/// What a gap fill needs: the history to read, the node's task tracker, and this handler.
struct Filler {
    source: Weak<dyn MissedSource>,
    tracker: TaskTracker,
    inbound: Weak<Inbound>,
}

impl std::fmt::Debug for Filler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filler")
    }
}

/// The node's recent rate of pushes (one push: one fan-out's messages to one member, one write
/// when direct), which decides how a fan-out sends: below `--direct-write-max-rate` pushes per
/// second the fan-out writes to each idle member's socket itself (no task wake-up: the cheapest
/// way per delivery, but every write on the thread that runs the fan-out); above it, it queues
/// and wakes the members' writers, which run on every worker thread and each send whatever
/// queued meanwhile in one write — more wake-ups, but the load spreads over the cores. Measured
/// over windows of [`PACE_WINDOW_MS`]; a race between two fan-outs' updates only blurs one
/// window's figure, so relaxed atomics suffice.
#[derive(Debug)]
struct DeliveryPace {
    /// Deliveries per second above which fan-outs queue; 0 = never write directly.
    max_rate: u64,
    window_start_ms: AtomicU64,
    count: AtomicU64,
    /// Deliveries per second in the last complete window.
    rate: AtomicU64,
}

/// Length of one delivery-rate window.
const PACE_WINDOW_MS: u64 = 100;

impl DeliveryPace {
    fn new(max_rate: u64) -> Self {
        Self {
            max_rate,
            window_start_ms: AtomicU64::new(crate::wire::clock::monotonic_millis()),
            count: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    /// Whether the next fan-out writes directly.
    fn direct(&self) -> bool {
        self.max_rate > 0 && self.rate.load(Ordering::Relaxed) < self.max_rate
    }

    /// Counts `n` deliveries; closes the window when it is over.
    fn record(&self, n: u64) {
        let count = self.count.fetch_add(n, Ordering::Relaxed) + n;
        let now = crate::wire::clock::monotonic_millis();
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(start);
        if elapsed >= PACE_WINDOW_MS {
            self.rate.store(count * 1000 / elapsed, Ordering::Relaxed);
            self.count.store(0, Ordering::Relaxed);
            self.window_start_ms.store(now, Ordering::Relaxed);
        }
    }
}

/// Cluster-unique message ids: node id, a random per-process boot tag (so a restarted node never
/// reuses ids) and a sequence number.
#[derive(Debug)]
struct MessageIds {
    prefix: String,
    seq: AtomicU64,
}

impl Inbound {
    /// The handler of node `node_id`, delivering into `hub`.
    pub fn new(node_id: &str, hub: Arc<Hub>, metrics: Metrics, max_message_size: usize) -> Self {
        Self {
            hub,
            metrics,
            max_raw_payload: max_message_size,
            max_envelope: max_message_size * 6 + 1024,
            ids: MessageIds {
                prefix: format!("{node_id}-{:08x}-", fastrand::u32(..)),
                seq: AtomicU64::new(0),
            },
            pace: DeliveryPace::new(crate::config::DIRECT_WRITE_MAX_RATE),
            window: WriteWindow::new(crate::config::WRITE_WINDOW),
            seq: Sequences::default(),
            filler: OnceLock::new(),
        }
    }

    /// Lets this handler fill gaps from `source`'s history, on `tracker`'s tasks.
    pub fn set_missed_source(
        self: &Arc<Self>,
        source: Weak<dyn MissedSource>,
        tracker: TaskTracker,
    ) {
        let _ = self.filler.set(Filler {
            source,
            tracker,
            inbound: Arc::downgrade(self),
        });
    }

    /// The node unsubscribed `room`: its next message starts a new sequence (no gap from the old).
    pub fn forget(&self, room: &RoomName) {
        self.seq.forget(room);
    }

    /// Sets the write window (`--write-window`, see [`WriteWindow`]).
    pub fn with_write_window(mut self, window: WriteWindow) -> Self {
        self.window = window;
        self
    }

    /// Sets `--direct-write-max-rate` (see [`DeliveryPace`]).
    pub fn with_direct_write_max_rate(mut self, max_rate: u64) -> Self {
        self.pace = DeliveryPace::new(max_rate);
        self
    }

    /// A fresh cluster-unique message id.
    pub fn next_message_id(&self) -> String {
        let n = self.ids.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:x}", self.ids.prefix)
    }

    /// Handles a payload the broker received on `room`'s channel.
    ///
    /// Our own envelopes are forwarded byte for byte; anything else is another program's plain
    /// `PUBLISH` and is wrapped once as a `server` message. Never blocks.
    pub fn receive(&self, room: &str, payload: Bytes) {
        let m = &self.metrics;
        m.broker_received.increment(1);
        let Some(room) = RoomName::parse(room) else {
            m.dropped(DropReason::InvalidRoom).increment(1);
            return;
        };
        if payload.len() > self.max_envelope {
            m.dropped(DropReason::TooLarge).increment(1);
            return;
        }
        let (frame, ts, stamp) = match protocol::classify_broker_payload(&room, &payload) {
            BrokerPayload::Envelope {
                ts,
                stamp: Some(stamp),
            } => {
                return self.receive_numbered(room, payload, ts, stamp);
            }
            BrokerPayload::Envelope { ts, stamp } => (payload, ts, stamp),
            BrokerPayload::Raw => {
                if payload.len() > self.max_raw_payload {
                    m.dropped(DropReason::TooLarge).increment(1);
                    return;
                }
                m.published(Source::Redis).increment(1);
                let ts = crate::wire::clock::unix_micros();
                let id = self.next_message_id();
                (
                    protocol::wrap_raw_payload(&room, &payload, &id, ts),
                    ts,
                    None,
                )
            }
        };
        self.deliver(&room, frame, ts, stamp);
    }

    /// A numbered message: in order, a repeat (dropped), or past a gap this node fills first.
    fn receive_numbered(&self, room: RoomName, payload: Bytes, ts: u64, stamp: Stamp) {
        let mut released = Vec::new();
        let held = Held {
            frame: payload,
            ts,
            stamp,
        };
        let (step, this) = self.seq.observe(&room, held, &mut released);
        if self.seq.prune_due() {
            // Records of rooms this node no longer has (a message that raced an unsubscribe).
            self.seq
                .retain(|r| self.hub.counts(r) != crate::wire::protocol::RoomCounts::default());
        }
        for h in released {
            self.deliver(&room, h.frame, h.ts, Some(h.stamp));
        }
        match step {
            Step::Deliver | Step::Jump => {
                if step == Step::Jump {
                    self.metrics.gap_fill(GapFill::Overflow);
                }
                if let Some(h) = this {
                    self.deliver(&room, h.frame, h.ts, Some(h.stamp));
                }
            }
            Step::Duplicate => self.metrics.dropped(DropReason::Duplicate).increment(1),
            Step::Held => {}
            Step::Fill { fill, after } => self.start_fill(room, fill, after),
        }
    }

    /// Reads `room`'s messages after offset `after` on a task, then hands out the missed and the
    /// held ones ([`Sequences::filled`]).
    fn start_fill(&self, room: RoomName, fill: u64, after: u64) {
        let epoch = self.seq.epoch_text(&room);
        let Some(f) = self.filler.get().filter(|_| epoch.is_some()) else {
            self.finish_fill(&room, fill, None);
            return;
        };
        let since = Since {
            epoch: epoch.unwrap_or_default(),
            offset: after,
        };
        let (source, inbound) = (f.source.clone(), f.inbound.clone());
        f.tracker.spawn(async move {
            let missed = match source.upgrade() {
                Some(source) => source.missed(room.clone(), since.clone()).await,
                None => None,
            };
            if let Some(inbound) = inbound.upgrade() {
                inbound.finish_fill(&room, fill, missed);
            }
        });
    }

    fn finish_fill(&self, room: &RoomName, fill: u64, missed: Option<Missed>) {
        let result = match &missed {
            None => GapFill::Unreadable,
            Some(m) if !m.complete => GapFill::TooLarge,
            Some(_) => GapFill::Filled,
        };
        let epoch = self.seq.epoch_text(room).unwrap_or_default();
        let mut stale = true;
        self.seq.filled(
            room,
            fill,
            missed,
            |offset| Stamp::new(offset, &epoch),
            |frame| match protocol::classify_broker_payload(room, frame) {
                BrokerPayload::Envelope { ts, .. } => ts,
                BrokerPayload::Raw => crate::wire::clock::unix_micros(),
            },
            |h| {
                stale = false;
                self.deliver(room, h.frame, h.ts, Some(h.stamp));
            },
        );
        if !stale {
            self.metrics.gap_fill(result);
        }
    }

    /// Hands an encoded message frame published at `ts` (with its `stamp`, if it has one)
    /// to the hub for the room's local members — at once, or with the room's next batch (see
    /// [`WriteWindow`]) — and records the fan-out metrics (the end of [`Inbound::receive`], and
    /// the node's local fallback of a publish during a broker outage).
    pub fn deliver(&self, room: &RoomName, frame: Bytes, ts: u64, stamp: Option<Stamp>) {
        // Framed once here; every member gets these same bytes.
        match self.window.offer(room, frame_text(&frame), stamp, ts) {
            Offer::Now(batch) => {
                self.fan_out(room, &batch);
                self.window.done(room);
            }
            Offer::Pending => {}
            Offer::Full => self.metrics.dropped(DropReason::Overloaded).increment(1),
        }
    }

    /// Fans out the batches of hot rooms as their windows end, until `stop`; then what is left.
    /// The node runs it on its tracker.
    pub async fn run_window(self: Arc<Self>, stop: CancellationToken) {
        if !self.window.is_on() {
            return;
        }
        loop {
            let (room, batch) = tokio::select! {
                () = stop.cancelled() => break,
                due = self.window.next_due() => due,
            };
            self.fan_out(&room, &batch);
            self.window.done(&room);
        }
        for (room, batch) in self.window.take_all() {
            self.fan_out(&room, &batch);
        }
    }

    /// One fan-out of a room's messages, in order, and its metrics.
    fn fan_out(&self, room: &RoomName, batch: &Batch) {
        let m = &self.metrics;
        let out = self.hub.fanout(room, &batch.msgs, self.pace.direct());
        self.pace.record(out.members as u64);
        if out.members == 0 {
            m.dropped(DropReason::NoMembers)
                .increment(batch.msgs.len() as u64);
            return;
        }
        if out.dropped > 0 {
            m.dropped(DropReason::SlowConsumer)
                .increment(out.dropped as u64);
        }
        // A `ts` from another program's envelope is not ours to trust: a sample from a clock an
        // hour off (or from the future) would only poison the histogram.
        let now = crate::wire::clock::unix_micros();
        for &ts in &batch.ts {
            if ts <= now + MAX_CLOCK_SKEW_US && now.saturating_sub(ts) <= MAX_LATENCY_SAMPLE_US {
                m.fanout_latency.record(now.saturating_sub(ts) as f64 / 1e6);
            }
            m.fanout_recipients.record(out.members as f64);
        }
        m.delivered
            .increment((out.written + out.presence_written) as u64);
        if out.riders > 0 {
            m.riders.increment(out.riders as u64);
        }
    }
}

impl crate::broker::Receiver for Inbound {
    fn receive(&self, room: &str, payload: Bytes) {
        Inbound::receive(self, room, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::{Outbox, Outgoing};
    use crate::wire::protocol::Role;

    /// The payload of one unmasked server frame.
    fn payload(frame: &[u8]) -> &[u8] {
        assert_eq!(frame[0], 0x81, "a whole text frame");
        match frame[1] {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    fn inbound() -> (Arc<Hub>, Inbound) {
        let metrics = Metrics::new("n1");
        let hub = Arc::new(Hub::new());
        let inbound = Inbound::new("n1", hub.clone(), metrics, 1024)
            .with_write_window(WriteWindow::new(std::time::Duration::ZERO));
        (hub, inbound)
    }

    #[tokio::test]
    async fn a_hot_rooms_messages_go_out_together_once_per_window() {
        let metrics = Metrics::new("n1");
        let hub = Arc::new(Hub::new());
        let bucket = std::time::Duration::from_millis(400);
        let inbound = Arc::new(
            Inbound::new("n1", hub.clone(), metrics, 1024).with_write_window(
                WriteWindow::new(std::time::Duration::from_millis(40)).with_rate_bucket(bucket),
            ),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(inbound.clone().run_window(stop.clone()));
        let room = RoomName::parse("r").unwrap();
        let (outbox, mut rx) = Outbox::new(64, 1 << 16);
        let outbox = Arc::new(outbox);
        hub.join(&room, 1, Role::Viewer, outbox.clone(), || {});
        // Two messages per window over a bucket make the room hot; each goes out at once.
        let mut batch = Vec::new();
        for n in 0..20 {
            inbound.receive("r", Bytes::from(format!("warm{n}")));
            rx.recv_batch(&outbox, &mut batch, 64).await;
            assert_eq!(
                batch.len(),
                1,
                "a cold room's message goes out alone, at once"
            );
            batch.clear();
        }
        tokio::time::sleep(bucket + std::time::Duration::from_millis(10)).await;
        let started = std::time::Instant::now();
        for n in 0..4 {
            inbound.receive("r", Bytes::from(format!("m{n}")));
        }
        rx.recv_batch(&outbox, &mut batch, 64).await;
        assert_eq!(batch.len(), 1, "the first message goes out at once");
        batch.clear();
        rx.recv_batch(&outbox, &mut batch, 64).await;
        let waited = started.elapsed();
        assert_eq!(batch.len(), 3, "the rest together, in one turn");
        assert!(waited >= std::time::Duration::from_millis(30), "{waited:?}");
        let texts: Vec<String> = batch
            .iter()
            .map(|i| match i {
                Outgoing::Framed(b, true) => {
                    serde_json::from_slice::<serde_json::Value>(payload(b)).unwrap()["data"]
                        .as_str()
                        .unwrap()
                        .to_string()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, ["m1", "m2", "m3"]);
        // Stopping flushes what is still pending.
        inbound.receive("r", Bytes::from_static(b"last"));
        stop.cancel();
        task.await.unwrap();
        batch.clear();
        rx.recv_batch(&outbox, &mut batch, 64).await;
        assert_eq!(batch.len(), 1);
    }

    #[test]
    fn message_ids_are_unique() {
        let (_, inbound) = inbound();
        let a = inbound.next_message_id();
        let b = inbound.next_message_id();
        assert_ne!(a, b);
        assert!(a.starts_with("n1-"));
    }

    #[tokio::test]
    async fn envelopes_pass_byte_for_byte_and_plain_payloads_are_wrapped() {
        let (hub, inbound) = inbound();
        let room = RoomName::parse("r").unwrap();
        let (outbox, mut rx) = Outbox::new(8, 1 << 16);
        let outbox = Arc::new(outbox);
        hub.join(&room, 1, Role::Viewer, outbox.clone(), || {});
        let (second, mut rx2) = Outbox::new(8, 1 << 16);
        let second = Arc::new(second);
        hub.join(&room, 2, Role::Viewer, second.clone(), || {});
        let envelope = Bytes::from_static(
            br#"{"type":"message","room":"r","from":null,"role":"server","data":1,"id":"x","ts":5}"#,
        );
        inbound.receive("r", envelope.clone());
        inbound.receive("r", Bytes::from_static(b"plain"));
        inbound.receive("not a room!", Bytes::from_static(b"dropped"));
        inbound.receive("r", Bytes::from(vec![b'x'; 2000]));
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 8).await;
        assert_eq!(batch.len(), 2, "{batch:?}");
        let mut other = Vec::new();
        rx2.recv_batch(&second, &mut other, 8).await;
        match (&batch[0], &batch[1], &other[0]) {
            (Outgoing::Framed(a, true), Outgoing::Framed(b, true), Outgoing::Framed(a2, true)) => {
                assert_eq!(payload(a), &envelope[..], "forwarded byte for byte");
                assert_eq!(
                    a.as_ptr(),
                    a2.as_ptr(),
                    "framed once, shared by every member"
                );
                let wrapped: serde_json::Value = serde_json::from_slice(payload(b)).unwrap();
                assert_eq!(wrapped["data"], "plain");
                assert_eq!(wrapped["role"], "server");
                assert!(wrapped["id"].as_str().unwrap().starts_with("n1-"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fanouts_queue_above_the_direct_write_rate_and_write_again_below_it() {
        let pace = DeliveryPace::new(1_000);
        assert!(pace.direct(), "no traffic yet");
        // 500 deliveries within one window of ~110 ms: ~4 500/s once the window closes.
        let window = std::time::Duration::from_millis(PACE_WINDOW_MS + 10);
        pace.record(500);
        std::thread::sleep(window);
        pace.record(0);
        let rate = pace.rate.load(Ordering::Relaxed);
        assert!(!pace.direct(), "{rate} deliveries/s");
        // A quiet window brings direct writes back.
        std::thread::sleep(window);
        pace.record(1);
        assert!(pace.direct());
        assert!(!DeliveryPace::new(0).direct(), "0 = always queue");
    }
}
