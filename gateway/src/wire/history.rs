//! Room history as plain data: a room's position (epoch + offset), what a joining client asks
//! for (`since=E:N`, `backlog=N`), what a read of history returned, and a publish's
//! acknowledgement. The brokers fill these ([`crate::broker::memory`] in memory,
//! [`crate::broker::redis`] with the `publish.lua` / `history.lua` scripts); the session and the
//! HTTP API consume them. No I/O here.
//!
//! The numbering is the broker's: every message published through a node gets the room's next
//! offset (1, 2, 3, …) and the room's epoch, assigned atomically with the history append and the
//! publish itself, so no node can deliver a message history lacks or number two alike. The epoch
//! changes whenever the room's sequence was lost (Redis restarted empty, or the room's meta
//! expired after [`META_TTL`] of silence): offsets of two epochs are not comparable.

use std::time::Duration;

use bytes::Bytes;

/// How long a room's sequence and epoch live after its last publish (Redis key TTL of
/// `{prefix}{room}:meta`; the in-process broker forgets a room's log after the same idle time).
///
/// Longer than any history TTL on purpose: while the meta lives, a client that resumes from the
/// room's current offset after a long idle time is told `recovered: true` (it missed nothing),
/// and one that missed messages whose history aged out is told `recovered: false` by the
/// trimmed check. When the meta is gone the next publish starts a new epoch, and every resume
/// from the old one is `recovered: false`. A day costs about 100 bytes per room that published
/// in the last day.
pub const META_TTL: Duration = Duration::from_secs(24 * 3600);

/// Longest epoch a client may send in `since` (ours are 8-12 characters).
pub const MAX_EPOCH_LEN: usize = 32;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// The history bounds of a node (from its flags).
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Entries kept per room (`--history-size`); 0 keeps none.
    pub size: usize,
    /// Frame bytes kept per room (`--history-max-bytes`): the oldest entries are trimmed until
    /// the room's entries sum to at most this (a message larger than it is not kept at all).
    pub max_bytes: usize,
    /// Frame bytes one read of history may return (half of `--outbox-bytes`, so that a welcome's
    /// backlog or replay always fits a fresh outbox with room for live messages): a resume that
    /// would need more is `TooMany`, a backlog keeps the newest entries that fit.
    pub read_bytes: usize,
    /// Age after which an entry counts as trimmed (`--history-ttl`).
    pub ttl: Duration,
    /// How long an idempotency key is remembered (`--idempotency-ttl`).
    pub idempotency_ttl: Duration,
}

/// A position in a room's sequence, as a client reports what it last saw: `E:N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The epoch the offset belongs to.
    pub epoch: String,
    /// The last offset the client has.
    pub offset: u64,
}

impl Since {
    /// Parses `E:N` (an epoch of 1-32 ASCII letters and digits, a decimal offset).
    pub fn parse(s: &str) -> Option<Since> {
        let (epoch, offset) = s.rsplit_once(':')?;
        let ok = !epoch.is_empty()
            && epoch.len() <= MAX_EPOCH_LEN
            && epoch.bytes().all(|b| b.is_ascii_alphanumeric());
        let offset = offset.parse::<u64>().ok()?;
        ok.then(|| Since {
            epoch: epoch.to_string(),
            offset,
        })
    }
}

/// Who a publish's idempotency key belongs to: keys are remembered per publisher, so that one
/// publisher's key never suppresses another's message (docs/protocol.md, section 11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyScope {
    /// A token holder: its `sub`. The same user resending after a reconnect is deduplicated.
    User(String),
    /// A caller of the HTTP API, by a short hash of its key ([`api_key_id`]; never the key
    /// itself, and not its position in `--api-key`, which shifts when keys rotate); `None` when
    /// the API is open without a key.
    Api(Option<String>),
    /// Publishers without a token (`--auth none`): one shared scope, since nothing else about an
    /// anonymous connection survives its reconnect.
    Anonymous,
}

impl KeyScope {
    /// The stored form of `key` in this scope: `u:<sub>:<key>`, `api:<id>:<key>` (`api:<key>`
    /// for an open API) or `anon:<key>`. `%` and `:` in a `sub` are percent-escaped, so that no two
    /// (sub, key) pairs share a stored form.
    pub fn scoped(&self, key: &str) -> String {
        match self {
            Self::User(sub) => {
                let sub = sub.replace('%', "%25").replace(':', "%3A");
                format!("u:{sub}:{key}")
            }
            Self::Api(Some(id)) => format!("api:{id}:{key}"),
            Self::Api(None) => format!("api:{key}"),
            Self::Anonymous => format!("anon:{key}"),
        }
    }
}

/// An API key's identity in idempotency scopes: the first 12 hex digits (48 bits) of its SHA-1.
/// Stable across rotations (a key keeps its scope when others are added or removed), and it does
/// not reveal the key: keys are at least 8 random characters, and SHA-1's preimage resistance is
/// intact. SHA-1 is the one digest the build already has (Redis script hashes).
pub fn api_key_id(api_key: &str) -> String {
    let mut id = redis::Script::new(api_key).get_hash().to_string();
    id.truncate(12);
    id
}

/// Whether `key` is a valid idempotency key: 1-128 bytes, no control characters.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && !key.chars().any(char::is_control)
}

/// What a read of a room's history asks for.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Resume after this position: the missed messages, if history still has them all.
    pub since: Option<Since>,
    /// Most messages a resume may replay (`--max-recovery`); more missed is `TooMany`.
    pub max_recovery: usize,
    /// The last N messages, when there is no `since` or the resume was not complete.
    pub backlog: usize,
    /// A page rather than a resume (the HTTP API): when the missed messages exceed the read's
    /// byte budget, return the oldest ones that fit, marked `truncated`, instead of `TooMany`.
    pub partial: bool,
}

/// How a resume went: the `result` label of `gateway_recoveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Every missed message is in the read (or none was missed).
    Complete,
    /// The room's epoch is not the client's (history lost, e.g. Redis restarted empty).
    EpochChanged,
    /// History no longer reaches back to the client's offset (trimmed by size or age, or off).
    Trimmed,
    /// More than `--max-recovery` messages were missed.
    TooMany,
}

impl Recovery {
    /// Parses the history script's status word.
    pub fn from_status(s: &str) -> Option<Recovery> {
        Some(match s {
            "complete" => Self::Complete,
            "epoch" => Self::EpochChanged,
            "trimmed" => Self::Trimmed,
            "too_many" => Self::TooMany,
            _ => return None,
        })
    }
}

/// What a read of a room's history returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRead {
    /// The room's current epoch; empty when the room has no sequence yet (nothing published, or
    /// its meta expired).
    pub epoch: String,
    /// The room's current offset (0 when nothing was published in this epoch).
    pub offset: u64,
    /// How the resume went; `None` when no `since` was asked.
    pub recovery: Option<Recovery>,
    /// Message frames in offset order: the missed ones when the resume is complete, else the
    /// backlog (at most [`HistoryQuery::backlog`]).
    pub frames: Vec<(u64, Bytes)>,
    /// Whether the read's byte budget left out entries that were asked for: a backlog holds only
    /// the newest that fit, a partial resume only the oldest that fit, and a resume answered
    /// `TooMany` for bytes says so here.
    pub truncated: bool,
}

impl HistoryRead {
    /// Whether the resume was complete (`None` without `since`).
    pub fn recovered(&self) -> Option<bool> {
        self.recovery.map(|r| r == Recovery::Complete)
    }
}

/// A published message's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Its offset in the room.
    pub offset: u64,
    /// The room's epoch it was numbered in.
    pub epoch: String,
    /// Its message id (of the first publish, for a duplicate).
    pub id: String,
    /// Whether an earlier publish with the same idempotency key already published it.
    pub duplicate: bool,
}

/// A message's place in its room: offset and a tag of its epoch, as the fan-out carries it so
/// that a member catching up can tell what its history already covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The message's offset.
    pub offset: u64,
    /// [`epoch_tag`] of its epoch.
    pub epoch: u64,
}

impl Stamp {
    /// The stamp of `offset` in `epoch`.
    pub fn new(offset: u64, epoch: &str) -> Self {
        Self {
            offset,
            epoch: epoch_tag(epoch),
        }
    }
}

/// A 64-bit tag of an epoch (FNV-1a): comparing tags is comparing epochs, without keeping the
/// string in every member's outbox.
pub fn epoch_tag(epoch: &str) -> u64 {
    epoch.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The tail a broker appends to a message frame's prefix (the frame minus its closing `}`).
pub fn frame_tail(offset: u64, epoch: &str) -> String {
    format!(",\"offset\":{offset},\"epoch\":\"{epoch}\"}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_parses() {
        assert_eq!(
            Since::parse("abc12:42"),
            Some(Since {
                epoch: "abc12".into(),
                offset: 42
            })
        );
        assert_eq!(Since::parse("E:0").unwrap().offset, 0);
        for bad in [
            "",
            ":1",
            "E:",
            "E:-1",
            "E:x",
            "E-1",
            "é:1",
            &format!("{}:1", "a".repeat(33)),
        ] {
            assert_eq!(Since::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_and_tail() {
        assert!(valid_key("k1"));
        assert!(valid_key(&"k".repeat(128)));
        assert!(!valid_key(""));
        assert!(!valid_key(&"k".repeat(129)));
        assert!(!valid_key("a\nb"));
        assert_eq!(frame_tail(7, "ep"), r#","offset":7,"epoch":"ep"}"#);
    }

    #[test]
    fn key_scopes_never_collide() {
        let user = |s: &str| KeyScope::User(s.into());
        assert_eq!(user("alice").scoped("q-4"), "u:alice:q-4");
        let api = api_key_id("backend-key-0123");
        assert_eq!(api.len(), 12);
        assert!(api.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(api, api_key_id("backend-key-0124"));
        assert_eq!(api_key_id("abc"), "a9993e364706", "SHA-1(\"abc\")");
        assert_eq!(
            KeyScope::Api(Some(api.clone())).scoped("q-4"),
            format!("api:{api}:q-4")
        );
        assert_eq!(KeyScope::Api(None).scoped("q-4"), "api:q-4");
        assert_eq!(KeyScope::Anonymous.scoped("q-4"), "anon:q-4");
        // Without escaping, sub "a:b" with key "c" and sub "a" with key "b:c" would share one.
        assert_ne!(user("a:b").scoped("c"), user("a").scoped("b:c"));
        assert_ne!(user("a%3Ab").scoped("c"), user("a:b").scoped("c"));
        assert_ne!(
            user("api").scoped("0:k"),
            KeyScope::Api(Some("0".into())).scoped("k")
        );
    }
}
