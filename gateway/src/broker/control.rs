//! The Redis side of moderation: the control channel (`PREFIX_control`, or `PREFIX{_control}`
//! in a Cluster — the reserved room `_control`'s channel, which the subscriber keeps like a
//! room's) and the bans' storage (a hash per user, `PREFIXban:<sub>`, field = room or `*`,
//! value = expiry in unix ms, written by `ban.lua`). What the commands mean and how the node
//! applies them is [`crate::moderation`]'s; the in-process broker's bans are
//! [`crate::moderation::control::MemoryBans`].

use std::collections::HashMap;

use bytes::Bytes;

use super::redis::RedisBroker;
use super::scripts;
use super::BrokerError;
use crate::moderation::control::CONTROL_ROOM;
use crate::wire::protocol::RoomName;

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
