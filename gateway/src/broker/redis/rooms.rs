//! The rooms API's reads (issue 22): which rooms have members anywhere in the cluster, and a
//! room's counts, from the presence hashes every node reports into each tick
//! ([`Naming::presence_key`](super::conn::Naming::presence_key)) — no node is asked, no member
//! listed: the cost is one `SCAN` page and one read-only script per room.
//!
//! Paging follows `SCAN`: a cursor per call, a page of about `limit` rooms (`SCAN`'s `COUNT`
//! hint: a page may hold fewer, even none, while the cursor goes on), done when the cursor comes
//! back empty. A Cluster is scanned shard after shard (the cursor names the shard by its index
//! in the slot map, then that server's cursor); a room that changes shard during a scan
//! (resharding) may be listed twice or not at all, as with `SCAN` itself.

use futures_util::future::join_all;

use super::RedisBroker;
use crate::broker::scripts;
use crate::broker::BrokerError;
use crate::wire::protocol::{RoomCounts, RoomName};

/// One page of the rooms list and the cursor of the next (`None`: done).
pub type RoomsPage = (Vec<(RoomName, RoomCounts)>, Option<String>);

impl RedisBroker {
    /// `room`'s cluster-wide counts as the nodes last reported them.
    pub(in crate::broker) async fn room_counts(
        &self,
        room: &RoomName,
    ) -> Result<RoomCounts, BrokerError> {
        let s = &self.shared;
        let keys = [s.naming.presence_key(room)];
        let (hosts, viewers) = s
            .commands
            .eval::<(u64, u64)>(&scripts::COUNTS, &keys, |_| {})
            .await?;
        Ok(RoomCounts { hosts, viewers })
    }

    /// A page of the rooms with members after `cursor` (`None`: from the start), about `limit`.
    /// A malformed cursor is [`BrokerError::Config`] (the caller's 400).
    pub(in crate::broker) async fn rooms(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<RoomsPage, BrokerError> {
        let s = &self.shared;
        let bad = || BrokerError::Config("malformed cursor".into());
        // Shards by the first slot they own (one server: one "shard" at slot 0).
        let shards: Vec<u16> = if s.naming.cluster {
            s.cluster.first_slots()
        } else {
            vec![0]
        };
        if shards.is_empty() {
            return Err(BrokerError::Unavailable);
        }
        let (mut shard, mut at) = match cursor {
            None | Some("") => (0usize, 0u64),
            Some(c) => {
                let (i, c) = c.split_once(':').ok_or_else(bad)?;
                let i: usize = i.parse().map_err(|_| bad())?;
                let c: u64 = c.parse().map_err(|_| bad())?;
                if i >= shards.len() {
                    return Err(bad());
                }
                (i, c)
            }
        };
        let pattern = format!("{}{}", glob_escape(&s.naming.prefix), self.key_glob());
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(limit);
        let (next, keys): (u64, Vec<String>) =
            redis::from_redis_value(s.commands.query_at(&cmd, shards[shard]).await?)
                .map_err(|e| BrokerError::Failed(e.to_string()))?;
        at = next;
        let rooms: Vec<RoomName> = keys.iter().filter_map(|k| self.room_of_key(k)).collect();
        let counts = join_all(rooms.iter().map(|r| self.room_counts(r))).await;
        let mut page = Vec::with_capacity(rooms.len());
        for (room, counts) in rooms.into_iter().zip(counts) {
            let c = counts?;
            if c.hosts + c.viewers > 0 {
                page.push((room, c));
            }
        }
        if at == 0 {
            shard += 1;
        }
        let next = (shard < shards.len()).then(|| format!("{shard}:{at}"));
        Ok((page, next))
    }

    /// The part of a presence key after the prefix, as a `SCAN` pattern.
    fn key_glob(&self) -> &'static str {
        if self.shared.naming.cluster {
            "{*}:presence"
        } else {
            "presence:*"
        }
    }

    /// The room of one of our presence keys (the inverse of `Naming::presence_key`).
    fn room_of_key(&self, key: &str) -> Option<RoomName> {
        let rest = key.strip_prefix(self.shared.naming.prefix.as_str())?;
        let room = if self.shared.naming.cluster {
            rest.strip_prefix('{')?.strip_suffix("}:presence")?
        } else {
            rest.strip_prefix("presence:")?
        };
        RoomName::parse(room)
    }
}

/// `s` as a literal in a Redis glob pattern.
pub(super) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_matched_literally() {
        assert_eq!(glob_escape("gw:room:"), "gw:room:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
