//! Local rooms and their members: who is in which room on this node, and the fan-out of one
//! encoded message to every local member of a room. The hub knows nothing of brokers or payload
//! formats: frames reach it only through [`crate::fanout::inbound::Inbound`].
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

use crate::fanout::outbox::Outbox;
use crate::wire::history::Stamp;
use crate::wire::protocol::{Role, RoomCounts, RoomName};

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
    /// The room's latest presence frame, for members with a presence rider due
    /// ([`crate::fanout::outbox::Rider`]).
    presence_rider: Option<Bytes>,
    /// When the room's last fan-out ran ([`crate::wire::clock::monotonic_millis`]; 0: never).
    last_fanout_ms: AtomicU64,
}

/// What one fan-out did, in deliveries (one message to one member).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fanout {
    /// Members pushed to (one push each, however many messages).
    pub members: usize,
    /// Deliveries the members' sockets took at once.
    pub written: usize,
    /// Deliveries queued (the members' writers send them).
    pub queued: usize,
    /// Deliveries dropped because an outbox was full (those members are being closed as slow
    /// consumers).
    pub dropped: usize,
    /// Riders (presence events, pings) that went out or were queued with the messages.
    pub riders: usize,
    /// Of those, presence events the sockets took at once.
    pub presence_written: usize,
}

/// The local rooms of one node.
#[derive(Debug, Default)]
pub struct Hub {
    rooms: RwLock<HashMap<RoomName, Room>>,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
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

    /// Sends `msgs` (each the same shared bytes for everyone, with its stamp), in order, to every
    /// local member of `room`: written to the socket at once where the member's outbox is idle
    /// (all of them in one write), queued for its writer otherwise (a member catching up on
    /// history merges by the stamps).
    ///
    /// The read lock is held through the members' non-blocking writes: joins and leaves of any
    /// room wait for one fan-out (a few ms for thousands of members), which is cheaper than a
    /// snapshot of every member's outbox per message.
    ///
    /// `direct: false` queues to every member (their writers send, batched): see
    /// [`Outbox::push_messages`].
    pub fn fanout(&self, room: &RoomName, msgs: &[(Bytes, Option<Stamp>)], direct: bool) -> Fanout {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Fanout::default();
        if let Some(r) = rooms.get(room) {
            out.members = r.members.len();
            // 0 means never: a fan-out in the clock's first millisecond counts as at 1.
            r.last_fanout_ms.store(
                crate::wire::clock::monotonic_millis().max(1),
                Ordering::Relaxed,
            );
            let presence = r.presence_rider.as_ref();
            for m in r.members.values() {
                let p = m.outbox.push_messages(msgs, direct, presence);
                out.written += p.written;
                out.queued += p.queued;
                out.dropped += p.dropped;
                out.riders += p.riders;
                out.presence_written += p.presence_written;
            }
        }
        out
    }

    /// Sets the presence frame that members of `room` with a presence rider due get with their
    /// next message (see [`crate::fanout::outbox::Rider`]).
    pub fn set_presence_rider(&self, room: &RoomName, frame: Bytes) {
        let mut rooms = self.rooms.write().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rooms.get_mut(room) {
            r.presence_rider = Some(frame);
        }
    }

    /// Whether `room` had a fan-out within the last `within_ms` before `now_ms` (on
    /// [`crate::wire::clock::monotonic_millis`]'s clock): a room whose members' riders are
    /// likely to go out with a message soon.
    pub fn is_busy(&self, room: &RoomName, now_ms: u64, within_ms: u64) -> bool {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        rooms.get(room).is_some_and(|r| busy(r, now_ms, within_ms))
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
        self.for_each_outbox_busy(0, 0, |o, _| f(o));
    }

    /// Calls `f` with every local member's outbox and whether its room had a fan-out within the
    /// last `within_ms` before `now_ms` (see [`Hub::is_busy`]); under the read lock: `f` must not
    /// block.
    pub fn for_each_outbox_busy(
        &self,
        now_ms: u64,
        within_ms: u64,
        mut f: impl FnMut(&Arc<Outbox>, bool),
    ) {
        let rooms = self.rooms.read().unwrap_or_else(|e| e.into_inner());
        for r in rooms.values() {
            let busy = busy(r, now_ms, within_ms);
            for m in r.members.values() {
                f(&m.outbox, busy);
            }
        }
    }
}

fn busy(room: &Room, now_ms: u64, within_ms: u64) -> bool {
    let last = room.last_fanout_ms.load(Ordering::Relaxed);
    last > 0 && now_ms.saturating_sub(last) <= within_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::{Outgoing, Rider};

    #[tokio::test]
    async fn a_fanout_marks_the_room_busy_and_takes_the_rooms_presence_rider_along() {
        let hub = hub();
        let room = RoomName::parse("r").unwrap();
        let (a, mut ra) = Outbox::new(8, 1024);
        let a = Arc::new(a);
        hub.join(&room, 1, Role::Viewer, a.clone(), || {});
        let now = crate::wire::clock::monotonic_millis();
        assert!(!hub.is_busy(&room, now, 500), "no fan-out yet");
        let presence = Bytes::from_static(b"presence");
        hub.set_presence_rider(&room, presence.clone());
        assert!(a.defer(Rider::Presence));
        let out = hub.fanout(&room, &[(Bytes::from_static(b"m"), None)], true);
        assert_eq!((out.queued, out.riders), (1, 1));
        let now = crate::wire::clock::monotonic_millis();
        assert!(hub.is_busy(&room, now, 500));
        assert!(!hub.is_busy(&room, now + 600, 500));
        let mut busy = Vec::new();
        hub.for_each_outbox_busy(now + 600, 1000, |_, b| busy.push(b));
        assert_eq!(busy, [true]);
        let mut batch = Vec::new();
        ra.recv_batch(&a, &mut batch, 8).await;
        match &batch[0] {
            Outgoing::Framed(b, true) => assert_eq!(b.as_ptr(), presence.as_ptr()),
            other => panic!("{other:?}"),
        }
    }

    fn hub() -> Hub {
        Hub::new()
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
        let out = hub.fanout(&room, &[(frame.clone(), None)], true);
        assert_eq!(
            out,
            Fanout {
                members: 2,
                written: 0,
                queued: 1,
                dropped: 1,
                ..Default::default()
            }
        );
        assert!(b.is_closing());
        let mut batch = Vec::new();
        ra.recv_batch(&a, &mut batch, 8).await;
        match &batch[0] {
            crate::fanout::outbox::Outgoing::Framed(t, true) => {
                assert_eq!(t.as_ptr(), frame.as_ptr())
            }
            other => panic!("{other:?}"),
        }
    }
}
