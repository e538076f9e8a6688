//! The Lua scripts the Redis broker runs — `publish.lua`, `history.lua`, `presence.lua` (counts,
//! member lists and lifecycle events of one room), `members.lua` (a page of a room's list),
//! `registry.lua` (the node registry's heartbeat), `counts.lua` (the rooms API's read of one
//! room's counts), `ban.lua` and the webhooks' `hook_claim.lua`, `hook_ack.lua` and
//! `hook_release.lua`, each a file beside this one — with their keys, their arguments and how their answers
//! read. Every room key carries the room's hash tag (`{prefix}{<room>}:meta|hist|idem:<scoped key>`), so
//! one script touches one cluster slot. How a script reaches Redis (`EVALSHA`, and `EVAL` when a
//! server answers `NOSCRIPT`) is [`super::redis::conn`]'s one place.

use std::sync::LazyLock;

use crate::wire::history::{Ack, HistoryLimits, HistoryQuery, HistoryRead, Recovery, META_TTL};
use crate::wire::protocol::RoomName;

use super::BrokerError;
use bytes::Bytes;

/// A Lua script: its source and its SHA1, computed once per process (Redis caches a script by
/// this hash, so `EVALSHA` sends 40 bytes instead of the source).
#[derive(Debug)]
pub struct LuaScript {
    /// The script's text, compiled into the binary from its `.lua` file.
    pub source: &'static str,
    /// `SHA1(source)` in hex, as `SCRIPT LOAD` would answer.
    pub sha: String,
}

impl LuaScript {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: redis::Script::new(source).get_hash().to_string(),
        }
    }
}

/// Numbers, records and publishes one message.
pub static PUBLISH: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("publish.lua")));
/// Reads a room's position and history for a joining or resuming client.
pub static HISTORY: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("history.lua")));
/// Reports one node instance's counts and listed members of one room (or reaps a dead
/// instance's), appends lifecycle events, and returns the room's cluster-wide counts and the
/// list's changes.
pub static PRESENCE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("presence.lua")));
/// Reads a room's cluster-wide counts without reporting any (the rooms API).
pub static COUNTS: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("counts.lua")));
/// Reads one page of a room's member list.
pub static MEMBERS: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("members.lua")));
/// The node registry's heartbeat: renews an instance, records its rooms, names the dead.
pub static REGISTRY: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("registry.lua")));
/// Stores one ban and keeps the user's ban hash alive exactly as long as its latest ban.
pub static BAN: LazyLock<LuaScript> = LazyLock::new(|| LuaScript::new(include_str!("ban.lua")));
/// Takes or renews a node's lease on a room's webhooks and reads its oldest undelivered events.
pub static HOOK_CLAIM: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("hook_claim.lua")));
/// Removes one delivered (or dead-lettered) event, if the lease is still the node's.
pub static HOOK_ACK: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("hook_ack.lua")));
/// Releases a room's webhook lease unless undelivered events are left.
pub static HOOK_RELEASE: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new(include_str!("hook_release.lua")));

/// A key of `room`'s history: `{prefix}{<room>}:<suffix>`, hash-tagged by the room.
pub fn room_key(prefix: &str, room: &RoomName, suffix: &str) -> String {
    format!("{prefix}{{{room}}}:{suffix}")
}

/// The roster keys of `room` after its presence hash in `presence.lua` (KEYS[2..8]): the
/// instance's roster hash, the totals, the listed members, the version, the change log, the
/// over-the-bound flag and the lifecycle event stream — all hash-tagged by the room.
pub fn roster_keys(prefix: &str, room: &RoomName, instance: &str) -> [String; 7] {
    [
        room_key(prefix, room, &format!("roster:i:{instance}")),
        room_key(prefix, room, "roster:n"),
        room_key(prefix, room, "roster:m"),
        room_key(prefix, room, "roster:v"),
        room_key(prefix, room, "roster:log"),
        room_key(prefix, room, "roster:over"),
        room_key(prefix, room, "events"),
    ]
}

/// The node registry (a sorted set of instances by heartbeat expiry) and an instance's room set,
/// in one fixed slot (`{registry}`), apart from the rooms' slots.
pub fn registry_keys(prefix: &str, instance: &str) -> [String; 2] {
    [
        format!("{prefix}{{registry}}:nodes"),
        format!("{prefix}{{registry}}:rooms:{instance}"),
    ]
}

/// The reaping lock of a dead instance (`SET NX PX`), in the registry's slot.
pub fn reap_lock_key(prefix: &str, instance: &str) -> String {
    format!("{prefix}{{registry}}:reap:{instance}")
}

/// The keys of `publish.lua`: the room's meta and stream, and the idempotency `key`'s — already
/// scoped to its publisher ([`crate::wire::history::KeyScope::scoped`]).
pub fn publish_keys(prefix: &str, room: &RoomName, key: Option<&str>) -> Vec<String> {
    let mut keys = vec![
        room_key(prefix, room, "meta"),
        room_key(prefix, room, "hist"),
    ];
    if let Some(k) = key {
        keys.push(room_key(prefix, room, &format!("idem:{k}")));
    }
    keys
}

/// Appends `publish.lua`'s arguments: the node-encoded frame without its position tail, the
/// history bounds, the publish command and channel, the meta's lifetime, the message id and the
/// history's byte budget.
pub fn publish_args(
    cmd: &mut redis::Cmd,
    frame: &[u8],
    limits: &HistoryLimits,
    command: &str,
    channel: &str,
    id: &str,
) {
    cmd.arg(frame)
        .arg(limits.size)
        .arg(limits.ttl.as_millis() as u64)
        .arg(limits.idempotency_ttl.as_millis() as u64)
        .arg(command)
        .arg(channel)
        .arg(META_TTL.as_millis() as u64)
        .arg(id)
        .arg(limits.max_bytes);
}

/// Reads `publish.lua`'s answer: offset, epoch, duplicate flag, id.
pub fn parse_ack(answer: redis::Value) -> Result<Ack, BrokerError> {
    let (offset, epoch, duplicate, id): (u64, String, i64, String) =
        redis::from_redis_value(answer).map_err(|e| BrokerError::Failed(e.to_string()))?;
    Ok(Ack {
        offset,
        epoch,
        id,
        duplicate: duplicate == 1,
    })
}

/// The keys of `history.lua`: the room's meta and stream.
pub fn history_keys(prefix: &str, room: &RoomName) -> Vec<String> {
    vec![
        room_key(prefix, room, "meta"),
        room_key(prefix, room, "hist"),
    ]
}

/// Appends `history.lua`'s arguments: the resume position (empty epoch without one), the bounds
/// of the read, the history's age limit, the read's byte budget, whether it is a page, and the
/// meta's lifetime (a room without a sequence begins one at its first read).
pub fn history_args(cmd: &mut redis::Cmd, query: &HistoryQuery, limits: &HistoryLimits) {
    let (epoch, offset) = match &query.since {
        Some(since) => (since.epoch.as_str(), since.offset),
        None => ("", 0),
    };
    cmd.arg(epoch)
        .arg(offset)
        .arg(query.max_recovery)
        .arg(query.backlog)
        .arg(limits.ttl.as_millis() as u64)
        .arg(limits.read_bytes)
        .arg(u8::from(query.partial))
        .arg(META_TTL.as_millis() as u64);
}

/// Reads `history.lua`'s answer.
pub fn parse_history_answer(answer: redis::Value) -> Result<HistoryRead, BrokerError> {
    redis::from_redis_value::<Vec<redis::Value>>(answer)
        .ok()
        .and_then(parse_history)
        .ok_or_else(|| BrokerError::Failed("unexpected history answer".into()))
}

/// A script's string answer (bulk or simple), as UTF-8.
pub(crate) fn reply_text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// A script's integer answer, or a string of digits.
pub(crate) fn reply_int(v: &redis::Value) -> Option<u64> {
    match v {
        redis::Value::Int(n) => u64::try_from(*n).ok(),
        other => reply_text(other)?.parse().ok(),
    }
}

/// Parses `history.lua`'s answer.
fn parse_history(values: Vec<redis::Value>) -> Option<HistoryRead> {
    use redis::Value;
    let (text, int) = (reply_text, reply_int);
    let mut it = values.into_iter();
    let epoch = text(&it.next()?)?;
    let offset = int(&it.next()?)?;
    let status = text(&it.next()?)?;
    let recovery = match status.as_str() {
        "none" => None,
        s => Some(Recovery::from_status(s)?),
    };
    let truncated = int(&it.next()?)? == 1;
    let mut frames = Vec::new();
    while let Some(off) = it.next() {
        let frame = match it.next()? {
            Value::BulkString(b) => Bytes::from(b),
            _ => return None,
        };
        frames.push((int(&off)?, frame));
    }
    Some(HistoryRead {
        epoch,
        offset,
        recovery,
        frames,
        truncated,
    })
}
