//! The in-process broker: a single node with no Redis. A publish is delivered straight to this
//! node's hub, for the rooms that are subscribed, exactly as the Redis broker would deliver it
//! after a round trip.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::hub::Hub;
use crate::protocol::RoomName;

/// In-process pub/sub for one node.
#[derive(Debug)]
pub struct MemoryBroker {
    hub: Arc<Hub>,
    /// Rooms subscribed; a std lock, held only for a set operation.
    subscribed: Mutex<HashSet<RoomName>>,
}

impl MemoryBroker {
    /// A broker delivering into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            subscribed: Mutex::new(HashSet::new()),
        }
    }

    pub(super) fn subscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(room.clone());
    }

    pub(super) fn unsubscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(room);
    }

    pub(super) fn subscription_count(&self) -> usize {
        self.subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub(super) fn publish(&self, room: &RoomName, payload: Bytes) {
        let subscribed = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(room);
        if subscribed {
            self.hub.deliver(room.as_str(), payload);
        }
    }
}
