//! Local rooms and their members: who is in which room on this node, and the fan-out of one
//! encoded message to every local member of a room.
//!
//! The hub reports the first-member and last-member transitions of a room to its caller, which
//! subscribes or (after a delay) unsubscribes the broker *while the hub's lock is held*, so that
//! subscription changes reach the broker in the same order as the joins and leaves that caused
//! them. It knows nothing about sockets: a member is its [`Outbox`].
//!
//! One `RwLock` guards the map: fan-out holds it for reading (many rooms fan out at once), joins
//! and leaves take it for writing. It is a std lock because nothing awaits while holding it; every
//! operation under it is a map lookup or a non-blocking queue push.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

use crate::metrics::{DropReason, Metrics, Source};
use crate::protocol::{self, BrokerPayload, Role, RoomName};
use crate::session::outbox::{Outbox, PushError};

/// How far in the future a message's `ts` may be (clock skew between nodes) and still be sampled.
const MAX_CLOCK_SKEW_US: u64 = 1_000_000;
/// Latency samples above this are not latency but a foreign clock, and are not recorded.
const MAX_LATENCY_SAMPLE_US: u64 = 3_600_000_000;

/// A member's entry in a room.
#[derive(Debug)]
struct Member {
    role: Role,
    outbox: Arc<Outbox>,
}

#[derive(Debug, Default)]
struct Room {
    members: HashMap<u64, Member>,
    hosts: u64,
    viewers: u64,
}

/// Local counts of one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoomCounts {
    /// Members that joined as hosts.
    pub hosts: u64,
    /// Members that joined as viewers.
    pub viewers: u64,
}

/// What one fan-out did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fanout {
    /// Members the frame was queued to.
    pub queued: usize,
    /// Members whose outbox was full (they are being closed as slow consumers).
    pub dropped: usize,
}

/// The local rooms of one node.
#[derive(Debug)]
pub struct Hub {
    rooms: RwLock<HashMap<RoomName, Room>>,
    metrics: Metrics,
    /// Largest raw payload from the broker that is wrapped and delivered (`--max-message-size`).
    max_raw_payload: usize,
    /// Largest envelope from the broker that is delivered: a message whose `data` was at most
    /// `--max-message-size` bytes, plus room for JSON string escaping and the envelope fields.
    max_envelope: usize,
    ids: MessageIds,
}

/// Cluster-unique message ids: node id, a random per-process boot tag (so a restarted node never
/// reuses ids) and a sequence number.
#[derive(Debug)]
struct MessageIds {
    prefix: String,
    seq: AtomicU64,
}

impl Hub {
    /// An empty hub for node `node_id`.
    pub fn new(node_id: &str, metrics: Metrics, max_message_size: usize) -> Self {
        Self {
            rooms: RwLock::new(HashMap::new()),
            metrics,
            max_raw_payload: max_message_size,
            max_envelope: max_message_size * 6 + 1024,
            ids: MessageIds {
                prefix: format!("{node_id}-{:08x}-", fastrand::u32(..)),
                seq: AtomicU64::new(0),
            },
        }
    }

    /// A fresh cluster-unique message id.
    pub fn next_message_id(&self) -> String {
        let n = self.ids.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:x}", self.ids.prefix)
    }

    /// Adds a member; `on_first` runs under the lock when it is the room's first local member.
    pub fn join(
        &self,
        room: &RoomName,
        conn: u64,
        role: Role,
        outbox: Arc<Outbox>,
        on_first: impl FnOnce(),
    ) {
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        let first = !rooms.contains_key(room);
        let entry = rooms.entry(room.clone()).or_default();
        entry.members.insert(conn, Member { role, outbox });
        match role {
            Role::Host => entry.hosts += 1,
            _ => entry.viewers += 1,
        }
        if first {
            on_first();
        }
    }

    /// Removes a member; returns true when the room has no local member left (and is gone).
    pub fn leave(&self, room: &RoomName, conn: u64) -> bool {
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = rooms.get_mut(room) else {
            return false;
        };
        if let Some(m) = entry.members.remove(&conn) {
            match m.role {
                Role::Host => entry.hosts -= 1,
                _ => entry.viewers -= 1,
            }
        }
        if entry.members.is_empty() {
            rooms.remove(room);
            true
        } else {
            false
        }
    }

    /// Runs `f` under the lock if `room` has no local member; returns whether it ran.
    pub fn if_empty(&self, room: &RoomName, f: impl FnOnce()) -> bool {
        let rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        if rooms.contains_key(room) {
            false
        } else {
            f();
            true
        }
    }

    /// Local counts of `room`.
    pub fn counts(&self, room: &RoomName) -> RoomCounts {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        rooms
            .get(room)
            .map(|r| RoomCounts {
                hosts: r.hosts,
                viewers: r.viewers,
            })
            .unwrap_or_default()
    }

    /// Every room with local members and its local counts.
    pub fn snapshot(&self) -> Vec<(RoomName, RoomCounts)> {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        rooms
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    RoomCounts {
                        hosts: r.hosts,
                        viewers: r.viewers,
                    },
                )
            })
            .collect()
    }

    /// Local members of every room summed by role, and the number of rooms, from one read of the
    /// rooms (the source of the `gateway_connections` and `gateway_rooms` gauges). O(rooms); called
    /// once per scrape.
    pub fn totals(&self) -> (RoomCounts, usize) {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        let mut sum = RoomCounts::default();
        for r in rooms.values() {
            sum.hosts += r.hosts;
            sum.viewers += r.viewers;
        }
        (sum, rooms.len())
    }

    /// Number of rooms with local members.
    pub fn room_count(&self) -> usize {
        self.rooms.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Queues `frame` (the same bytes) to every local member of `room`.
    pub fn fanout(&self, room: &RoomName, frame: &Bytes) -> Fanout {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Fanout::default();
        if let Some(r) = rooms.get(room) {
            for m in r.members.values() {
                match m.outbox.push(frame.clone()) {
                    Ok(()) => out.queued += 1,
                    Err(PushError::Full) => out.dropped += 1,
                    Err(PushError::Closed) => {}
                }
            }
        }
        out
    }

    /// The outboxes of `room`'s local members (a snapshot; cheap `Arc` clones).
    pub fn outboxes(&self, room: &RoomName) -> Vec<Arc<Outbox>> {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        rooms
            .get(room)
            .map(|r| r.members.values().map(|m| m.outbox.clone()).collect())
            .unwrap_or_default()
    }

    /// Calls `f` with every local member's outbox (under the read lock: `f` must not block).
    pub fn for_each_outbox(&self, mut f: impl FnMut(&Arc<Outbox>)) {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        for r in rooms.values() {
            for m in r.members.values() {
                f(&m.outbox);
            }
        }
    }

    /// Delivers a payload the broker received on `room`'s channel to the room's local members.
    ///
    /// Our own envelopes are forwarded byte for byte; anything else is another program's plain
    /// `PUBLISH` and is wrapped once as a `server` message. Never blocks: a member whose outbox is
    /// full loses this frame and is closed. Records one fan-out latency sample per message.
    pub fn deliver(&self, room: &str, payload: Bytes) {
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
        let (frame, ts) = match protocol::classify_broker_payload(&room, &payload) {
            BrokerPayload::Envelope { ts } => (payload, ts),
            BrokerPayload::Raw => {
                if payload.len() > self.max_raw_payload {
                    m.dropped(DropReason::TooLarge).increment(1);
                    return;
                }
                m.published(Source::Redis).increment(1);
                let ts = protocol::now_micros();
                let id = self.next_message_id();
                (protocol::wrap_raw_payload(&room, &payload, &id, ts), ts)
            }
        };
        self.deliver_local(&room, frame, ts);
    }

    /// Queues an encoded message frame published at `ts` to the room's local members and records
    /// the fan-out metrics (the end of [`Hub::deliver`], and the local fallback of a publish
    /// during a broker outage).
    pub fn deliver_local(&self, room: &RoomName, frame: Bytes, ts: u64) {
        let m = &self.metrics;
        let out = self.fanout(room, &frame);
        if out.queued == 0 && out.dropped == 0 {
            m.dropped(DropReason::NoMembers).increment(1);
            return;
        }
        if out.dropped > 0 {
            m.dropped(DropReason::SlowConsumer)
                .increment(out.dropped as u64);
        }
        // A `ts` from another program's envelope is not ours to trust: a sample from a clock an
        // hour off (or from the future) would only poison the histogram.
        let now = protocol::now_micros();
        if ts <= now + MAX_CLOCK_SKEW_US && now.saturating_sub(ts) <= MAX_LATENCY_SAMPLE_US {
            m.fanout_latency.record(now.saturating_sub(ts) as f64 / 1e6);
        }
        m.fanout_recipients.record(out.queued as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub() -> Hub {
        Hub::new("n1", Metrics::new("n1"), 1024)
    }

    #[test]
    fn first_and_last_member_transitions() {
        let hub = hub();
        let room = RoomName::parse("r").unwrap();
        let (a, _ra) = Outbox::new(8, 1024);
        let (b, _rb) = Outbox::new(8, 1024);
        let mut firsts = 0;
        hub.join(&room, 1, Role::Host, Arc::new(a), || firsts += 1);
        hub.join(&room, 2, Role::Viewer, Arc::new(b), || firsts += 1);
        assert_eq!(firsts, 1);
        assert_eq!(
            hub.counts(&room),
            RoomCounts {
                hosts: 1,
                viewers: 1
            }
        );
        assert!(!hub.leave(&room, 1));
        assert!(!hub.if_empty(&room, || panic!("room is not empty")));
        assert!(hub.leave(&room, 2));
        assert_eq!(hub.room_count(), 0);
        let mut ran = false;
        assert!(hub.if_empty(&room, || ran = true));
        assert!(ran);
        assert!(!hub.leave(&room, 2), "leaving twice is harmless");
    }

    #[tokio::test]
    async fn fanout_shares_bytes_and_counts_full_outboxes() {
        let hub = hub();
        let room = RoomName::parse("r").unwrap();
        let (a, mut ra) = Outbox::new(8, 1024);
        let a = Arc::new(a);
        let (b, _rb) = Outbox::new(8, 4);
        let b = Arc::new(b);
        hub.join(&room, 1, Role::Viewer, a.clone(), || {});
        hub.join(&room, 2, Role::Viewer, b.clone(), || {});
        let frame = Bytes::from_static(b"0123456789");
        let out = hub.fanout(&room, &frame);
        assert_eq!(
            out,
            Fanout {
                queued: 1,
                dropped: 1
            }
        );
        assert!(b.is_closing());
        let mut batch = Vec::new();
        ra.recv_batch(&a, &mut batch, 8).await;
        match &batch[0] {
            crate::session::outbox::Outgoing::Text(t) => assert_eq!(t.as_ptr(), frame.as_ptr()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn message_ids_are_unique() {
        let hub = hub();
        let a = hub.next_message_id();
        let b = hub.next_message_id();
        assert_ne!(a, b);
        assert!(a.starts_with("n1-"));
    }
}
