//! Where undelivered lifecycle events wait, behind one interface for the dispatcher: the Redis
//! broker's per-room streams with their leases and recovery index
//! ([`crate::broker::redis::RedisBroker::hook_claim`] and its siblings), or, in process,
//! [`MemoryEvents`] — bounded, and lost if the process dies.
//!
//! Not here: when a room is delivered, by whom, and the HTTP side ([`super`], [`super::request`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::broker::redis::{Claim, RedisBroker, Release};
use crate::broker::BrokerError;
use crate::wire::protocol::RoomName;

/// Undelivered events one room may hold in process, like the Redis stream's `MAXLEN`.
pub const MEMORY_ROOM_EVENTS: usize = 10_000;
/// Undelivered events all rooms together may hold in process.
pub const MEMORY_TOTAL_EVENTS: usize = 100_000;

/// The dispatcher's storage.
#[derive(Debug, Clone)]
pub enum Store {
    /// Redis: durable, shared by every node; leases decide who delivers a room.
    Redis(RedisBroker),
    /// In process: one node is the whole cluster; its one task per room is the lease.
    Memory(Arc<MemoryEvents>),
}

impl Store {
    /// Takes or renews `instance`'s lease on `room` and reads up to `count` events (0: renew).
    pub async fn claim(
        &self,
        instance: &str,
        room: &RoomName,
        lease: Duration,
        count: usize,
    ) -> Result<Claim, BrokerError> {
        match self {
            Self::Redis(r) => r.hook_claim(instance, room, lease, count).await,
            Self::Memory(m) => Ok(m.claim(room, count)),
        }
    }

    /// Removes the finished event `id` (into the dead letters with a reason); false when the
    /// lease is no longer `instance`'s.
    pub async fn ack(
        &self,
        instance: &str,
        room: &RoomName,
        id: &str,
        lease: Duration,
        dead_letter: Option<&str>,
    ) -> Result<bool, BrokerError> {
        match self {
            Self::Redis(r) => r.hook_ack(instance, room, id, lease, dead_letter).await,
            Self::Memory(m) => {
                m.ack(room, id);
                Ok(true)
            }
        }
    }

    /// Releases the lease unless events are left (`force`: even then).
    pub async fn release(
        &self,
        instance: &str,
        room: &RoomName,
        force: bool,
    ) -> Result<Release, BrokerError> {
        match self {
            Self::Redis(r) => r.hook_release(instance, room, force).await,
            Self::Memory(m) => Ok(m.release(room, force)),
        }
    }

    /// Records `room` in (or removes it from) `instance`'s index entry (Redis only: in process
    /// nobody else could adopt it).
    pub async fn own(&self, instance: &str, room: &RoomName, own: bool) -> Result<(), BrokerError> {
        match self {
            Self::Redis(r) => r.hook_own(instance, room, own).await,
            Self::Memory(_) => Ok(()),
        }
    }
}

/// One room's undelivered events in process.
#[derive(Debug, Default)]
struct RoomEvents {
    events: VecDeque<(String, String)>,
    /// Events lost to the bounds since the last claim.
    dropped: u64,
}

/// Lifecycle events of the in-process broker: per room a queue of undelivered events, bounded
/// by [`MEMORY_ROOM_EVENTS`] per room and [`MEMORY_TOTAL_EVENTS`] in all (the oldest of the room
/// goes first; with the room empty, the new event), every loss counted. A std lock: held only
/// to push, pop or copy a few entries, never across an `.await`.
#[derive(Debug, Default)]
pub struct MemoryEvents {
    rooms: Mutex<(HashMap<RoomName, RoomEvents>, usize)>,
    /// Entry ids, `<unix ms>-<sequence>`: unique in the process, increasing.
    next: AtomicU64,
}

impl MemoryEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, (HashMap<RoomName, RoomEvents>, usize)> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `event` to `room`'s queue and returns its entry id.
    pub fn append(&self, room: &RoomName, event: String) -> String {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq}", crate::wire::clock::unix_millis());
        let mut guard = self.lock();
        let (rooms, total) = &mut *guard;
        let full = *total >= MEMORY_TOTAL_EVENTS;
        let r = rooms.entry(room.clone()).or_default();
        if full || r.events.len() >= MEMORY_ROOM_EVENTS {
            r.dropped += 1;
            if r.events.pop_front().is_none() {
                return id;
            }
            *total -= 1;
        }
        r.events.push_back((id.clone(), event));
        *total += 1;
        id
    }

    fn claim(&self, room: &RoomName, count: usize) -> Claim {
        let mut guard = self.lock();
        let Some(r) = guard.0.get_mut(room) else {
            return Claim {
                held: true,
                ..Claim::default()
            };
        };
        if count == 0 {
            // A renewal: the losses are reported with the next read, as in Redis.
            return Claim {
                held: true,
                ..Claim::default()
            };
        }
        Claim {
            held: true,
            dropped: std::mem::take(&mut r.dropped),
            events: r.events.iter().take(count).cloned().collect(),
        }
    }

    fn ack(&self, room: &RoomName, id: &str) {
        let mut guard = self.lock();
        let (rooms, total) = &mut *guard;
        if let Some(r) = rooms.get_mut(room) {
            if let Some(i) = r.events.iter().position(|(e, _)| e == id) {
                r.events.remove(i);
                *total -= 1;
            }
        }
    }

    fn release(&self, room: &RoomName, force: bool) -> Release {
        let mut guard = self.lock();
        match guard.0.get(room) {
            Some(r) if !r.events.is_empty() && !force => Release::Pending,
            Some(r) if r.events.is_empty() && r.dropped == 0 => {
                guard.0.remove(room);
                Release::Released
            }
            _ => Release::Released,
        }
    }

    /// Rooms with events waiting (for the sweep).
    pub fn waiting(&self) -> Vec<RoomName> {
        self.lock()
            .0
            .iter()
            .filter(|(_, r)| !r.events.is_empty() || r.dropped > 0)
            .map(|(room, _)| room.clone())
            .collect()
    }

    /// Events waiting in all rooms.
    pub fn len(&self) -> usize {
        self.lock().1
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    #[test]
    fn a_full_room_drops_its_oldest_and_counts_it() {
        let m = MemoryEvents::default();
        let r = room("r1");
        let first = m.append(&r, "e0".into());
        for i in 1..MEMORY_ROOM_EVENTS {
            m.append(&r, format!("e{i}"));
        }
        assert_eq!(m.len(), MEMORY_ROOM_EVENTS);
        m.append(&r, "overflow".into());
        assert_eq!(m.len(), MEMORY_ROOM_EVENTS, "bounded");
        assert_eq!(m.claim(&r, 0).dropped, 0, "a renewal reads nothing");
        let c = m.claim(&r, 2);
        assert_eq!(c.dropped, 1, "the loss is counted once");
        assert_ne!(c.events[0].0, first, "the oldest went");
        assert_eq!(c.events[0].1, "e1");
        assert_eq!(m.claim(&r, 1).dropped, 0);
        assert_eq!(m.release(&r, false), Release::Pending);
        m.ack(&r, &c.events[0].0);
        assert_eq!(m.len(), MEMORY_ROOM_EVENTS - 1);
    }

    #[test]
    fn all_rooms_together_are_bounded_too() {
        let m = MemoryEvents::default();
        for i in 0..MEMORY_TOTAL_EVENTS {
            m.append(&room(&format!("r{}", i % 20)), "e".into());
        }
        assert_eq!(m.len(), MEMORY_TOTAL_EVENTS);
        // A new room with nothing to give up loses the new event itself.
        m.append(&room("late"), "e".into());
        assert_eq!(m.len(), MEMORY_TOTAL_EVENTS);
        let c = m.claim(&room("late"), 10);
        assert_eq!((c.dropped, c.events.len()), (1, 0));
        assert_eq!(m.release(&room("late"), false), Release::Released);
        assert!(!m.waiting().contains(&room("late")));
    }
}
