//! The subscriptions a Redis broker converges to, shared by the single-server and the Cluster
//! broker: the *desired* rooms (changed by joins and leaves, cheaply and synchronously) and the
//! rooms Redis has *confirmed* on the current subscriber connection, with the signals between
//! the callers and the broker's subscriber task.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{watch, Notify};

use crate::wire::protocol::RoomName;

/// The two sets, under one lock.
#[derive(Debug, Default)]
pub struct Rooms {
    /// Rooms the node wants (local members, or within the unsubscribe delay).
    pub desired: HashSet<RoomName>,
    /// Rooms Redis has confirmed on the current subscriber connection.
    pub confirmed: HashSet<RoomName>,
}

/// Desired and confirmed subscriptions with their wake-ups.
#[derive(Debug)]
pub struct Subscriptions {
    /// A std lock: only set operations happen under it, never an await.
    rooms: Mutex<Rooms>,
    /// Wakes the subscriber task when the desired set changed (a stored permit is never lost).
    /// Shared so that others (the Cluster broker's push sender) can wake it too.
    changed: Arc<Notify>,
    /// Bumped whenever `confirmed` grows, for [`Subscriptions::wait_subscribed`].
    confirmed_epoch: watch::Sender<u64>,
}

impl Subscriptions {
    /// Starts with `desired` (nothing confirmed); `changed` wakes the subscriber task.
    pub fn new(desired: HashSet<RoomName>, changed: Arc<Notify>) -> Self {
        Self {
            rooms: Mutex::new(Rooms {
                desired,
                confirmed: HashSet::new(),
            }),
            changed,
            confirmed_epoch: watch::Sender::new(0),
        }
    }

    /// The sets, locked.
    pub fn lock(&self) -> MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `room` to the desired set; wakes the subscriber task when it is new.
    pub fn subscribe(&self, room: &RoomName) {
        if self.lock().desired.insert(room.clone()) {
            self.changed.notify_one();
        }
    }

    /// Removes `room` from the desired set; wakes the subscriber task when it was there.
    pub fn unsubscribe(&self, room: &RoomName) {
        if self.lock().desired.remove(room) {
            self.changed.notify_one();
        }
    }

    /// Resolves once Redis has confirmed `room` (false if the broker is gone).
    pub async fn wait_subscribed(&self, room: &RoomName) -> bool {
        let mut epoch = self.confirmed_epoch.subscribe();
        loop {
            if self.lock().confirmed.contains(room) {
                return true;
            }
            if epoch.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Tells the waiters of [`Subscriptions::wait_subscribed`] that `confirmed` grew.
    pub fn confirmed_grew(&self) {
        self.confirmed_epoch.send_modify(|e| *e += 1);
    }

    /// Resolves when the desired set changed (or someone else woke the subscriber task).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}
