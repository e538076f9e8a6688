//! What the brokers carry for moderation, below them and the node: the control channel's
//! commands ([`Command`], JSON on `{prefix}_control`, which every node subscribes to
//! permanently), the bounded hand-over of received commands to the node ([`ControlSink`]), and
//! the bans' storage with the in-process broker ([`MemoryBans`]; in Redis it is
//! [`crate::broker::control`]'s).
//! Applying a command is [`crate::node::moderation`]'s business; the routes are
//! [`crate::http::moderation`]'s.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::{ControlResult, Metrics};

/// The room name reserved for the control channel: its channel would be `{prefix}_control`.
pub const CONTROL_ROOM: &str = "_control";
/// Control commands queued between the broker and [`run`].
pub const CONTROL_QUEUE: usize = 1024;
/// The field of a ban on every room.
pub const ALL_ROOMS: &str = "*";

/// A command on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Command {
    /// Close every session of `sub` (any user when `None`) in `room` (any room when `None`).
    Disconnect {
        /// The user, if only one.
        #[serde(default)]
        sub: Option<String>,
        /// The room, if only one.
        #[serde(default)]
        room: Option<String>,
        /// `kicked` (4501) or `banned` (4502).
        reason: Reason,
    },
}

/// Why a moderator disconnects: the close code clients see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// 4501.
    Kicked,
    /// 4502.
    Banned,
}

impl Command {
    /// The bytes published on the control channel.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("commands always serialize"))
    }
}

/// Where a broker hands the control commands it receives: the sending side of the bounded
/// queue to [`run`], set once when the node starts.
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

/// Whether live bans `(field, expiry)` cover `room`.
pub fn covers(bans: &[(String, u64)], room: &str) -> bool {
    let now = crate::wire::clock::unix_millis();
    bans.iter()
        .any(|(f, until)| *until > now && (f == room || f == ALL_ROOMS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        let c = Command::Disconnect {
            sub: Some("u1".into()),
            room: None,
            reason: Reason::Banned,
        };
        let bytes = c.encode();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            serde_json::json!({"type":"disconnect","sub":"u1","room":null,"reason":"banned"})
        );
        assert_eq!(serde_json::from_slice::<Command>(&bytes).unwrap(), c);
    }

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
