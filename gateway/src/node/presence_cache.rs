//! The cluster-wide room counts of the last presence tick, kept by the node so that a client that
//! joins between two ticks gets a sensible `presence` right after its `welcome`. The presence
//! timer ([`crate::node::presence`]) writes it; sessions read it. It sits below the node so that the
//! node does not depend on the timer that depends on it.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::wire::protocol::RoomCounts;
use crate::wire::protocol::RoomName;

/// Cluster-wide counts of the last tick, with this node's own share at that time.
#[derive(Debug, Default)]
pub struct PresenceCache {
    /// Room → (cluster-wide counts, this node's counts) as of the last tick. A std lock: one map
    /// swap per tick and one lookup per join.
    rooms: Mutex<HashMap<RoomName, (RoomCounts, RoomCounts)>>,
}

impl PresenceCache {
    /// Best estimate of `room`'s cluster-wide counts given this node's counts now: the last
    /// tick's cluster counts with this node's share replaced by `local_now`.
    pub fn estimate(&self, room: &RoomName, local_now: RoomCounts) -> RoomCounts {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        match rooms.get(room) {
            Some((cluster, local_then)) => RoomCounts {
                hosts: cluster.hosts.saturating_sub(local_then.hosts) + local_now.hosts,
                viewers: cluster.viewers.saturating_sub(local_then.viewers) + local_now.viewers,
            },
            None => local_now,
        }
    }

    /// Replaces the counts with those of a new tick: room → (cluster-wide, this node's).
    pub fn replace(&self, rooms: HashMap<RoomName, (RoomCounts, RoomCounts)>) {
        *self.rooms.lock().unwrap_or_else(|e| e.into_inner()) = rooms;
    }
}
