//! Moderation's transport and storage in the brokers: the control channel (`PREFIX_control`, or
//! `PREFIX{_control}` in a Cluster — the reserved room `_control`'s channel, which the subscriber
//! keeps like a room's), the bounded hand-over of received commands to the node
//! ([`ControlSink`]), and the bans' storage: in Redis a hash per user (`PREFIXban:<sub>`, field =
//! room or `*`, value = expiry in unix ms, written by `ban.lua`), in memory [`MemoryBans`]. What
//! the commands mean is [`crate::moderation::control`]'s; the node applies them
//! ([`crate::node::moderation`]).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use super::redis::RedisBroker;
use super::scripts;
use super::BrokerError;
use crate::metrics::{ControlResult, Metrics};
use crate::wire::protocol::RoomName;

/// The room name reserved for the control channel: its channel would be `{prefix}_control`.
pub const CONTROL_ROOM: &str = "_control";
/// Control commands queued between the broker and the node ([`crate::node::moderation`]).
pub const CONTROL_QUEUE: usize = 1024;

/// Where a broker hands the control commands it receives: the sending side of the bounded
/// queue to the node ([`crate::node::moderation`]), set once when the node starts.
#[derive(Debug, Default)]
pub struct ControlSink(OnceLock<mpsc::Sender<Bytes>>);

impl ControlSink {
    /// Connects the sink to the queue (the first call wins).
    pub fn set(&self, tx: mpsc::Sender<Bytes>) {
        let _ = self.0.set(tx);
    }

    /// Queues one command without waiting; a full queue drops it (counted).
    pub fn deliver(&self, payload: &[u8], metrics: &Metrics) {
        let Some(tx) = self.0.get() else { return };
        if tx.try_send(Bytes::copy_from_slice(payload)).is_err() {
            metrics.control(ControlResult::Dropped);
            warn!("control queue full; a moderation command was dropped");
        }
    }
}

/// Bans kept in memory, for the in-process broker: user → field (room or `*`) → expiry (unix ms).
#[derive(Debug, Default)]
pub struct MemoryBans(Mutex<HashMap<String, HashMap<String, u64>>>);

impl MemoryBans {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, u64>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bans `sub` from `field` until `until_ms`.
    pub fn ban(&self, sub: &str, field: &str, until_ms: u64) {
        self.lock()
            .entry(sub.to_string())
            .or_default()
            .insert(field.to_string(), until_ms);
    }

    /// Lifts a ban; returns whether there was one.
    pub fn unban(&self, sub: &str, field: &str) -> bool {
        let mut all = self.lock();
        let removed = all
            .get_mut(sub)
            .and_then(|m| m.remove(field))
            .is_some_and(|until| until > crate::wire::clock::unix_millis());
        if all.get(sub).is_some_and(|m| m.is_empty()) {
            all.remove(sub);
        }
        removed
    }

    /// The live bans of `sub` as (field, expiry ms); expired ones are forgotten.
    pub fn list(&self, sub: &str) -> Vec<(String, u64)> {
        let now = crate::wire::clock::unix_millis();
        let mut all = self.lock();
        let Some(m) = all.get_mut(sub) else {
            return Vec::new();
        };
        m.retain(|_, until| *until > now);
        let out = m.iter().map(|(f, u)| (f.clone(), *u)).collect();
        if m.is_empty() {
            all.remove(sub);
        }
        out
    }
}

impl RedisBroker {
    /// Connects the control channel to the node's moderation queue.
    pub(super) fn set_control(&self, tx: tokio::sync::mpsc::Sender<Bytes>) {
        self.shared.control.set(tx);
    }

    /// Publishes a moderation command on the control channel (in a Cluster, `SPUBLISH` in the
    /// channel's slot); every node, this one included, receives it.
    pub(super) async fn publish_control(&self, payload: Bytes) -> Result<(), BrokerError> {
        let s = &self.shared;
        let room = RoomName::parse(CONTROL_ROOM).expect("the control room name is a room name");
        let channel = s.naming.channel(&room);
        let mut cmd = redis::cmd(s.naming.publish_command());
        cmd.arg(&channel).arg(payload.as_ref());
        s.commands.query(&cmd, &channel).await.map(|_| ())
    }

    /// Bans `sub` from `field` until `until_ms` (unix ms); the hash lives as long as its latest
    /// ban.
    pub(super) async fn ban(
        &self,
        sub: &str,
        field: &str,
        until_ms: u64,
    ) -> Result<(), BrokerError> {
        let keys = [self.ban_key(sub)];
        self.shared
            .commands
            .eval::<redis::Value>(&scripts::BAN, &keys, |cmd| {
                cmd.arg(field).arg(until_ms);
            })
            .await
            .map(|_| ())
    }

    /// Lifts a ban; returns whether one was there.
    pub(super) async fn unban(&self, sub: &str, field: &str) -> Result<bool, BrokerError> {
        let key = self.ban_key(sub);
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(&key).arg(field);
        let n: i64 = self.shared.commands.query_as(&cmd, &key).await?;
        Ok(n > 0)
    }

    /// The bans of `sub` as (field, expiry in unix ms); some may have expired.
    pub(super) async fn bans(&self, sub: &str) -> Result<Vec<(String, u64)>, BrokerError> {
        let key = self.ban_key(sub);
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&key);
        let all: HashMap<String, u64> = self.shared.commands.query_as(&cmd, &key).await?;
        Ok(all.into_iter().collect())
    }

    /// The hash of a user's bans (in a Cluster, the slot of its own name).
    fn ban_key(&self, sub: &str) -> String {
        format!("{}ban:{}", self.shared.naming.prefix, sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moderation::control::{covers, ALL_ROOMS};

    #[test]
    fn memory_bans_expire_and_cover_rooms() {
        let b = MemoryBans::default();
        let now = crate::wire::clock::unix_millis();
        b.ban("u1", "r1", now + 60_000);
        b.ban("u2", ALL_ROOMS, now + 60_000);
        b.ban("u3", "r1", now - 1);
        assert!(covers(&b.list("u1"), "r1"));
        assert!(!covers(&b.list("u1"), "r2"));
        assert!(covers(&b.list("u2"), "anything"));
        assert!(b.list("u3").is_empty(), "expired bans are forgotten");
        assert!(b.unban("u1", "r1"));
        assert!(!b.unban("u1", "r1"));
        assert!(b.list("u1").is_empty());
    }

    #[tokio::test]
    async fn a_full_control_queue_drops_and_counts() {
        let metrics = Metrics::new("n1");
        let sink = ControlSink::default();
        sink.deliver(b"x", &metrics); // not connected yet: ignored
        let (tx, mut rx) = mpsc::channel(1);
        sink.set(tx);
        sink.deliver(b"a", &metrics);
        sink.deliver(b"b", &metrics);
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"a"));
        assert!(rx.try_recv().is_err(), "the second was dropped");
        assert!(metrics
            .render(&crate::metrics::StateGauges::default())
            .contains("gateway_control_commands_total{node=\"n1\",result=\"dropped\"} 1"));
    }
}
