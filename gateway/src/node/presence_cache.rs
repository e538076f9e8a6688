//! The cluster-wide room counts of the last presence tick, kept by the node so that a client that
//! joins between two ticks gets a sensible `presence` right after its `welcome`, and what each
//! room's members were last sent, so that a tick sends a room's `presence` only when it would
//! tell a member something new. The presence timer ([`crate::node::presence`]) writes it;
//! sessions read it. It sits below the node so that the node does not depend on the timer that
//! depends on it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::wire::protocol::{RoomCounts, RoomName};

/// One room as of the last tick.
#[derive(Debug, Clone, Copy)]
struct Room {
    /// Cluster-wide counts, as the last tick read them and sent them to every member.
    cluster: RoomCounts,
    /// This node's own counts at that tick.
    local: RoomCounts,
    /// A member joined since and was sent an estimate other than `cluster`: the next tick sends
    /// the room's counts even if they did not change.
    stale: bool,
}

/// Cluster-wide counts of the last tick, with this node's own share at that time.
#[derive(Debug, Default)]
pub struct PresenceCache {
    /// Room → its counts as of the last tick. A std lock: one swap per tick and one lookup per
    /// join, never held across an await.
    rooms: Mutex<HashMap<RoomName, Room>>,
}

impl PresenceCache {
    /// Best estimate of `room`'s cluster-wide counts for a member joining now, given this node's
    /// counts now: the last tick's cluster counts with this node's share replaced by
    /// `local_now`. The joining member is sent it, so when it differs from what the room's
    /// members were last sent, the room's next tick sends its counts whatever they are.
    pub fn estimate_for_join(&self, room: &RoomName, local_now: RoomCounts) -> RoomCounts {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        match rooms.get_mut(room) {
            Some(r) => {
                let estimate = RoomCounts {
                    hosts: r.cluster.hosts.saturating_sub(r.local.hosts) + local_now.hosts,
                    viewers: r.cluster.viewers.saturating_sub(r.local.viewers) + local_now.viewers,
                };
                r.stale |= estimate != r.cluster;
                estimate
            }
            // No member here at the last tick: the next tick's counts go out anyway.
            None => local_now,
        }
    }

    /// Replaces the counts with those of a new tick — room → (cluster-wide, this node's) — and
    /// returns, for each room, its counts and whether its members must be sent them: the counts
    /// changed since the last tick, the room is new here, or a member who joined since was sent
    /// other counts.
    pub fn tick(
        &self,
        now: Vec<(RoomName, RoomCounts, RoomCounts)>,
    ) -> Vec<(RoomName, RoomCounts, bool)> {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(now.len());
        let mut out = Vec::with_capacity(now.len());
        for (room, cluster, local) in now {
            let send = match rooms.get(&room) {
                Some(r) => r.stale || r.cluster != cluster,
                None => true,
            };
            next.insert(
                room.clone(),
                Room {
                    cluster,
                    local,
                    stale: false,
                },
            );
            out.push((room, cluster, send));
        }
        *rooms = next;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(hosts: u64, viewers: u64) -> RoomCounts {
        RoomCounts { hosts, viewers }
    }

    #[test]
    fn a_tick_sends_only_what_changed_or_what_a_joiner_was_told_otherwise() {
        let cache = PresenceCache::default();
        let r = RoomName::parse("r").unwrap();
        let q = RoomName::parse("q").unwrap();
        // New rooms are sent.
        let out = cache.tick(vec![
            (r.clone(), counts(1, 5), counts(1, 2)),
            (q.clone(), counts(0, 1), counts(0, 1)),
        ]);
        assert_eq!(out.iter().filter(|o| o.2).count(), 2);
        // Nothing changed: nothing sent.
        let out = cache.tick(vec![
            (r.clone(), counts(1, 5), counts(1, 2)),
            (q.clone(), counts(0, 1), counts(0, 1)),
        ]);
        assert!(out.iter().all(|o| !o.2), "{out:?}");
        // One room changed: only that room.
        let out = cache.tick(vec![
            (r.clone(), counts(1, 6), counts(1, 2)),
            (q.clone(), counts(0, 1), counts(0, 1)),
        ]);
        assert_eq!(
            out.iter()
                .filter(|o| o.2)
                .map(|o| o.0.as_str())
                .collect::<Vec<_>>(),
            ["r"]
        );
        // A joiner here is told 1/7 (this node's share grew by one); then someone elsewhere left,
        // so the tick reads 1/6 again, unchanged for the others but not for the joiner: sent.
        assert_eq!(cache.estimate_for_join(&r, counts(1, 3)), counts(1, 7));
        let out = cache.tick(vec![(r.clone(), counts(1, 6), counts(1, 3))]);
        assert_eq!(out, [(r.clone(), counts(1, 6), true)]);
        // A joiner told exactly what everyone was last sent does not force a send.
        assert_eq!(cache.estimate_for_join(&r, counts(1, 3)), counts(1, 6));
        let out = cache.tick(vec![(r.clone(), counts(1, 6), counts(1, 3))]);
        assert_eq!(out, [(r.clone(), counts(1, 6), false)]);
        // A room with no member here at the last tick: the joiner gets the local counts.
        assert_eq!(
            cache.estimate_for_join(&RoomName::parse("new").unwrap(), counts(0, 1)),
            counts(0, 1)
        );
    }
}
