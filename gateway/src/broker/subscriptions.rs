//! The subscriptions the Redis broker converges to: the *desired* rooms (changed by joins and
//! leaves, cheaply and synchronously), the rooms Redis has *confirmed* on the current subscriber
//! connection, the signals between the callers and the subscriber task, and the one diff that
//! turns the difference into (un)subscribe commands ([`Subscriptions::converge`]) — whatever
//! the transport sends them on ([`ChannelSink`]).

use std::collections::HashSet;
use std::future::Future;
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

    /// Wakes the subscriber task without a change of the desired set (a Cluster server dropped
    /// a subscription).
    pub fn wake(&self) {
        self.changed.notify_one();
    }

    /// Resolves when the desired set changed (or someone else woke the subscriber task).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Sends (un)subscribe commands through `sink`, at most `batch` rooms of each at a time, until
    /// `current` (the rooms subscribed on the connection) equals the desired set. Rooms a
    /// command confirmed enter `current` and the confirmed set (and leave both on
    /// unsubscribe). Returns early, leaving the rest for the next call, when a round confirmed
    /// nothing (a Cluster shard down); a failure of the connection itself is the sink's `Err`.
    pub async fn converge<S: ChannelSink>(
        &self,
        sink: &mut S,
        current: &mut HashSet<RoomName>,
        batch: usize,
    ) -> Result<(), S::Error> {
        loop {
            let (add, remove): (Vec<RoomName>, Vec<RoomName>) = {
                let rooms = self.lock();
                (
                    rooms
                        .desired
                        .difference(current)
                        .take(batch)
                        .cloned()
                        .collect(),
                    current
                        .difference(&rooms.desired)
                        .take(batch)
                        .cloned()
                        .collect(),
                )
            };
            if add.is_empty() && remove.is_empty() {
                return Ok(());
            }
            let mut progress = false;
            for (subscribe, rooms) in [(true, add), (false, remove)] {
                if rooms.is_empty() {
                    continue;
                }
                for done in sink.send(subscribe, rooms).await? {
                    progress = true;
                    let mut sets = self.lock();
                    for r in done {
                        if subscribe {
                            sets.confirmed.insert(r.clone());
                            current.insert(r);
                        } else {
                            sets.confirmed.remove(&r);
                            current.remove(&r);
                        }
                    }
                }
                if subscribe {
                    self.confirmed_grew();
                }
            }
            if !progress {
                return Ok(());
            }
        }
    }
}

/// Where [`Subscriptions::converge`] sends its commands: one server's pub/sub connection, or a
/// Cluster connection that splits them by slot.
pub trait ChannelSink {
    /// A failure that ends the connection.
    type Error;

    /// Subscribes (or unsubscribes) `rooms`; returns the groups of rooms the server confirmed.
    fn send(
        &mut self,
        subscribe: bool,
        rooms: Vec<RoomName>,
    ) -> impl Future<Output = Result<Vec<Vec<RoomName>>, Self::Error>> + Send;
}
