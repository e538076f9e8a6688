//! The in-process broker: a single node with no Redis. A publish is handed straight to this
//! node's [`Inbound`] handler, for the rooms that are subscribed, exactly as the Redis broker would
//! hand it over after a round trip.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::control::{ControlSink, MemoryBans};
use crate::inbound::Inbound;
use crate::metrics::Metrics;
use crate::protocol::RoomName;

/// In-process pub/sub for one node.
#[derive(Debug)]
pub struct MemoryBroker {
    inbound: Arc<Inbound>,
    pub(super) metrics: Metrics,
    /// Rooms subscribed; a std lock, held only for a set operation.
    subscribed: Mutex<HashSet<RoomName>>,
    /// Moderation commands go straight to this node's queue.
    pub(super) control: ControlSink,
    /// Bans, in memory (the in-process broker is the whole cluster).
    pub(super) bans: MemoryBans,
}

impl MemoryBroker {
    /// A broker handing what is published to `inbound`.
    pub fn new(inbound: Arc<Inbound>, metrics: Metrics) -> Self {
        metrics.redis_connected.set(1.0);
        Self {
            inbound,
            metrics,
            subscribed: Mutex::new(HashSet::new()),
            control: ControlSink::default(),
            bans: MemoryBans::default(),
        }
    }

    pub(super) fn subscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(room.clone());
        self.metrics.broker_subscriptions.set(s.len() as f64);
    }

    pub(super) fn unsubscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(room);
        self.metrics.broker_subscriptions.set(s.len() as f64);
    }

    pub(super) fn publish(&self, room: &RoomName, payload: Bytes) {
        let subscribed = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(room);
        if subscribed {
            self.inbound.receive(room.as_str(), payload);
        }
    }
}
