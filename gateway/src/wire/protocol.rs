//! The wire contract (`docs/protocol.md`): room names, roles, what a client may send, and the JSON
//! events the server sends, each encoded once into [`Bytes`].
//!
//! The Redis payload of a message *is* its client frame: a node publishes the exact bytes every
//! member will receive, and a node that receives them from Redis checks their shape and forwards
//! them untouched. A payload that does not have that shape came from another program's plain
//! `PUBLISH` and is wrapped as a `server` message with the payload as a string. This module owns
//! parsing and encoding only; it does no I/O.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::wire::history::Stamp;

/// A room's member counts (this node's, or the cluster's in a `presence` event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoomCounts {
    /// Members that joined as hosts.
    pub hosts: u64,
    /// Members that joined as viewers.
    pub viewers: u64,
}

impl RoomCounts {
    /// The counts in one word (each clamped below `u32::MAX`), never [`RoomCounts::NONE`]: what a
    /// member was last sent, kept per connection.
    pub fn packed(self) -> u64 {
        let clamp = |n: u64| n.min(u64::from(u32::MAX) - 1);
        (clamp(self.hosts) << 32) | clamp(self.viewers)
    }

    /// No counts sent yet.
    pub const NONE: u64 = u64::MAX;
}

/// Longest room name, in bytes.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest display name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// The room a bare `GET /` upgrade joins.
pub const LOBBY: &str = "lobby";

/// Who published a message, or what a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Broadcasts in a room (a streamer).
    Host,
    /// Watches and chats.
    Viewer,
    /// A backend: the HTTP API or a plain Redis `PUBLISH`. Never a member's role.
    Server,
}

impl Role {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Viewer => "viewer",
            Self::Server => "server",
        }
    }

    /// Parses a member role (`host` or `viewer`); `server` is not something a client can be.
    pub fn parse_member(s: &str) -> Option<Role> {
        match s {
            "host" => Some(Self::Host),
            "viewer" => Some(Self::Viewer),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid room name: 1–128 bytes of `[A-Za-z0-9_.:-]`. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(Arc<str>);

impl RoomName {
    /// Validates `s` as a room name.
    pub fn parse(s: &str) -> Option<RoomName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ROOM_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
        ok.then(|| RoomName(Arc::from(s)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a display name: 1–64 bytes, no control characters.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_NAME_LEN && !s.chars().any(char::is_control)
}

/// What a client's text frame asks for.
#[derive(Debug)]
pub enum ClientCommand<'a> {
    /// `{"type":"publish","data":…,"key":…}`: publish `data` (any JSON) to the client's room;
    /// with an idempotency `key`, the server acknowledges (`ack`) and publishes a repeat only once.
    Publish(&'a RawValue, Option<Cow<'a, str>>),
    /// A text frame that is not JSON: published as a string `data`.
    Chat(&'a str),
    /// `{"type":"ping"}`: answered with `{"type":"pong"}` (browsers cannot send WebSocket pings).
    Ping,
    /// `{"type":"refresh","token":…}`: a new token for this connection (same `sub`).
    Refresh(Cow<'a, str>),
    /// `{"type":"members","cursor":…}`: a page of the room's member list (`cursor` absent, null
    /// or `""`: the first page).
    Members(Option<Cow<'a, str>>),
}

impl PartialEq for ClientCommand<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Publish(a, ka), Self::Publish(b, kb)) => a.get() == b.get() && ka == kb,
            (Self::Chat(a), Self::Chat(b)) => a == b,
            (Self::Ping, Self::Ping) => true,
            (Self::Refresh(a), Self::Refresh(b)) => a == b,
            (Self::Members(a), Self::Members(b)) => a == b,
            _ => false,
        }
    }
}

/// Why a client's text frame was refused; sent back as an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Valid JSON that is not a command we know.
    #[error("not a known command: send {{\"type\":\"publish\",\"data\":...}} or plain text")]
    Unknown,
    /// A known command with missing or wrong fields.
    #[error("{0}")]
    Invalid(&'static str),
}

impl CommandError {
    /// The `code` of the `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown_command",
            Self::Invalid(_) => "invalid_command",
        }
    }
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    /// `Some` whenever the field is present, `null` included.
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    /// The token of a `refresh`.
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    /// The publish's idempotency key; anything but a string is refused.
    #[serde(borrow, default)]
    key: Option<&'a RawValue>,
    /// The page cursor of a `members` command.
    #[serde(borrow, default)]
    cursor: Option<Cow<'a, str>>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

const INVALID_KEY: &str = "key must be a string of 1-128 bytes without control characters";

/// The longest `cursor` a `members` command may carry.
const MAX_CURSOR_LEN: usize = 160;

/// Parses one text frame from a client. Text that is not JSON is chat; JSON must be a command.
pub fn parse_command(text: &str) -> Result<ClientCommand<'_>, CommandError> {
    if serde_json::from_str::<&RawValue>(text).is_err() {
        return Ok(ClientCommand::Chat(text));
    }
    // Only an object is a command: serde would also read a struct from an array
    // (`["publish", 5]`), which is not part of the contract (found by the fuzz test).
    if !text.trim_start().starts_with('{') {
        return Err(CommandError::Unknown);
    }
    match serde_json::from_str::<RawCommand<'_>>(text) {
        Ok(cmd) => match cmd.kind.as_deref() {
            Some("publish") => match cmd.data {
                Some(data) => {
                    let key = match cmd.key {
                        None => None,
                        Some(raw) => match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
                            Ok(k) if crate::wire::history::valid_key(&k) => Some(k),
                            _ => return Err(CommandError::Invalid(INVALID_KEY)),
                        },
                    };
                    Ok(ClientCommand::Publish(data, key))
                }
                None => Err(CommandError::Invalid("publish needs a \"data\" field")),
            },
            Some("ping") => Ok(ClientCommand::Ping),
            Some("refresh") => match cmd.token {
                Some(token) => Ok(ClientCommand::Refresh(token)),
                None => Err(CommandError::Invalid("refresh needs a \"token\" field")),
            },
            Some("members") => match cmd.cursor {
                Some(c) if c.len() > MAX_CURSOR_LEN => {
                    Err(CommandError::Invalid("cursor is at most 160 bytes"))
                }
                cursor => Ok(ClientCommand::Members(cursor.filter(|c| !c.is_empty()))),
            },
            _ => Err(CommandError::Unknown),
        },
        Err(_) => Err(CommandError::Unknown),
    }
}

/// A message as it travels: the fields of a `message` event. Serializes to the exact frame every
/// member receives (and to the Redis payload).
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    /// Room it was published in.
    pub room: &'a str,
    /// Display name of the publisher, if it gave one.
    pub from: Option<&'a str>,
    /// What the publisher is.
    pub role: Role,
    /// The payload, any JSON, copied verbatim.
    pub data: &'a RawValue,
    /// Cluster-unique id, stamped by the publishing node.
    pub id: &'a str,
    /// Publish time, unix microseconds.
    pub ts: u64,
}

impl<'a> Message<'a> {
    /// A message with all its fields.
    pub fn new(
        room: &'a str,
        from: Option<&'a str>,
        role: Role,
        data: &'a RawValue,
        id: &'a str,
        ts: u64,
    ) -> Self {
        Self {
            kind: "message",
            room,
            from,
            role,
            data,
            id,
            ts,
        }
    }

    /// The frame bytes, encoded once and shared by every member.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a message always serializes"))
    }

    /// The frame without its closing `}`, for the broker to append `offset` and `epoch`
    /// (`,"offset":N,"epoch":"E"}`): everything but that tail is encoded once, here.
    pub fn encode_prefix(&self) -> Bytes {
        let mut v = Vec::with_capacity(256);
        serde_json::to_writer(&mut v, self).expect("a message always serializes");
        debug_assert_eq!(v.last(), Some(&b'}'));
        v.pop();
        Bytes::from(v)
    }
}

#[derive(Deserialize)]
struct MessageIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    #[allow(dead_code)] // present for the shape check only
    from: Option<Cow<'a, str>>,
    role: Role,
    #[serde(borrow)]
    #[allow(dead_code)]
    data: &'a RawValue,
    #[serde(borrow)]
    #[allow(dead_code)]
    id: Cow<'a, str>,
    ts: u64,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
}

/// What a payload received from the broker for a room turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum BrokerPayload {
    /// One of ours (a gateway or a backend that speaks our envelope): forward the bytes as they are.
    Envelope {
        /// Publish time, for the fan-out latency.
        ts: u64,
        /// The message's offset and epoch in the room (published through a node or the
        /// documented script); `None` for an envelope published without them.
        stamp: Option<Stamp>,
    },
    /// Anything else: another program's plain `PUBLISH`; wrap it as a `server` message.
    Raw,
}

/// Classifies a broker payload received on `room`'s channel.
pub fn classify_broker_payload(room: &RoomName, payload: &[u8]) -> BrokerPayload {
    match serde_json::from_slice::<MessageIn<'_>>(payload) {
        Ok(m) if m.kind == "message" && m.room == room.as_str() => {
            let _ = m.role;
            BrokerPayload::Envelope {
                ts: m.ts,
                stamp: match (m.offset, &m.epoch) {
                    (Some(o), Some(e)) => Some(Stamp::new(o, e)),
                    _ => None,
                },
            }
        }
        _ => BrokerPayload::Raw,
    }
}

/// Wraps a raw broker payload as a `server` message (the payload becomes a string `data`; bytes
/// that are not UTF-8 are replaced with U+FFFD).
pub fn wrap_raw_payload(room: &RoomName, payload: &[u8], id: &str, ts: u64) -> Bytes {
    let text = String::from_utf8_lossy(payload);
    let data = serde_json::value::to_raw_value(&text).expect("a string always serializes");
    Message::new(room.as_str(), None, Role::Server, &data, id, ts).encode()
}

/// Turns chat text into a JSON string value for `data`.
pub fn chat_data(text: &str) -> Box<RawValue> {
    serde_json::value::to_raw_value(text).expect("a string always serializes")
}

/// Whether a message's `data`, as it is stored and sent (JSON-encoded: a chat line's control
/// characters, quotes and backslashes escaped, up to 6 bytes per byte received), fits in `limit`
/// bytes; a string's two enclosing quotes are not counted, so that a plain chat line of exactly
/// `limit` bytes still fits. The size check on what was received is not enough: 64 KiB of control
/// bytes would otherwise be stored and fanned out as ~390 KB.
pub fn encoded_within(data: &RawValue, limit: usize) -> bool {
    let encoded = data.get();
    let quotes = if encoded.starts_with('"') { 2 } else { 0 };
    encoded.len() - quotes <= limit
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Event<'a> {
    Welcome {
        node: &'a str,
        room: &'a str,
        role: Role,
        connection_id: &'a str,
        name: Option<&'a str>,
        /// The token's `sub`; null when anonymous or without authentication.
        user: Option<&'a str>,
        /// The room's epoch; null when the room has no sequence yet or history was unreadable.
        epoch: Option<&'a str>,
        /// The room's current offset: every message after it reaches the client.
        offset: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Refreshed {
        exp: u64,
    },
    Expiring {
        exp: u64,
    },
    Ack {
        key: &'a str,
        offset: u64,
        epoch: &'a str,
        id: &'a str,
        duplicate: bool,
    },
    Presence {
        room: &'a str,
        hosts: u64,
        viewers: u64,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
    Pong {
        ts: u64,
    },
}

fn encode(event: &Event<'_>) -> Bytes {
    Bytes::from(serde_json::to_vec(event).expect("events always serialize"))
}

/// The room's position and the outcome of a resume, as the `welcome` tells them.
#[derive(Debug, Clone, Copy, Default)]
pub struct WelcomePosition<'a> {
    /// The room's epoch (`None`: no sequence yet, or history unreadable).
    pub epoch: Option<&'a str>,
    /// The room's current offset.
    pub offset: u64,
    /// Whether the resume asked with `since` was complete (`None`: no `since`).
    pub recovered: Option<bool>,
}

/// `{"type":"welcome",…}`: the first frame of every session.
pub fn welcome(
    node: &str,
    room: &RoomName,
    role: Role,
    connection_id: &str,
    name: Option<&str>,
    user: Option<&str>,
    position: WelcomePosition<'_>,
) -> Bytes {
    encode(&Event::Welcome {
        node,
        room: room.as_str(),
        role,
        connection_id,
        name,
        user,
        epoch: position.epoch,
        offset: position.offset,
        recovered: position.recovered,
    })
}

/// `{"type":"refreshed","exp":…}`: a `refresh` was accepted; the connection now lasts until `exp`.
pub fn refreshed(exp: u64) -> Bytes {
    encode(&Event::Refreshed { exp })
}

/// `{"type":"expiring","exp":…}`: the connection's token expires at `exp` (seconds); send a
/// `refresh` before then.
pub fn expiring(exp: u64) -> Bytes {
    encode(&Event::Expiring { exp })
}

/// `{"type":"ack",…}`: a keyed publish was published (or had been: `duplicate`).
pub fn ack(key: &str, ack: &crate::wire::history::Ack) -> Bytes {
    encode(&Event::Ack {
        key,
        offset: ack.offset,
        epoch: &ack.epoch,
        id: &ack.id,
        duplicate: ack.duplicate,
    })
}

/// `{"type":"error","code":…,"message":…,"key":…}`: a keyed publish failed.
pub fn error_for_key(code: &str, message: &str, key: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "type": "error", "code": code, "message": message, "key": key
        }))
        .expect("events always serialize"),
    )
}

/// `{"type":"presence",…}` with cluster-wide counts.
pub fn presence(room: &RoomName, hosts: u64, viewers: u64) -> Bytes {
    encode(&Event::Presence {
        room: room.as_str(),
        hosts,
        viewers,
    })
}

/// `{"type":"presence",…,"listing":false}`: the counts of a listing room that is over
/// `--list-max-members` (it reports counts only).
pub fn presence_not_listing(room: &RoomName, hosts: u64, viewers: u64) -> Bytes {
    let mut v = presence(room, hosts, viewers).to_vec();
    v.pop();
    v.extend_from_slice(br#","listing":false}"#);
    Bytes::from(v)
}

/// `{"type":"members","room":…,"v":…,"members":[…],"cursor":…}`: a page of the room's list at
/// roster version `v` (`"over_limit":true` and no members when the room is over
/// `--list-max-members`). Generic over the member type so that this layer stays below the
/// broker that owns it.
pub fn members<M: Serialize>(
    room: &RoomName,
    v: u64,
    members: &[M],
    cursor: Option<&str>,
    over_limit: bool,
) -> Bytes {
    let mut e = serde_json::json!({
        "type": "members", "room": room.as_str(), "v": v, "members": members, "cursor": cursor,
    });
    if over_limit {
        e["over_limit"] = true.into();
    }
    Bytes::from(serde_json::to_vec(&e).expect("events always serialize"))
}

/// What a `members_diff` says besides its changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffKind {
    /// The changes (`joined`, `left`).
    Changes,
    /// `"reset":true`: re-read the list.
    Reset,
    /// `"over_limit":true`: the room stopped listing.
    OverLimit,
}

/// `{"type":"members_diff","room":…,"v":…,"joined":[…],"left":[…]}`: the list's changes of one
/// presence interval; `"reset":true` or `"over_limit":true` instead of changes (see
/// [`DiffKind`]).
pub fn members_diff<J: Serialize, L: Serialize>(
    room: &RoomName,
    v: u64,
    kind: DiffKind,
    joined: &[J],
    left: &[L],
) -> Bytes {
    let mut e = serde_json::json!({"type": "members_diff", "room": room.as_str(), "v": v});
    match kind {
        DiffKind::Reset => e["reset"] = true.into(),
        DiffKind::OverLimit => e["over_limit"] = true.into(),
        DiffKind::Changes => {
            e["joined"] = serde_json::json!(joined);
            e["left"] = serde_json::json!(left);
        }
    }
    Bytes::from(serde_json::to_vec(&e).expect("events always serialize"))
}

/// `{"type":"error","code":…,"message":…}`.
pub fn error(code: &str, message: &str) -> Bytes {
    encode(&Event::Error { code, message })
}

/// `{"type":"pong","ts":…}`, the answer to a `ping` command.
pub fn pong() -> Bytes {
    encode(&Event::Pong {
        ts: crate::wire::clock::unix_micros(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn encoded_size_counts_the_escapes() {
        let limit = 1024;
        let plain = chat_data(&"b".repeat(1024));
        assert!(
            encoded_within(&plain, limit),
            "a plain line of exactly the limit"
        );
        assert!(!encoded_within(&chat_data(&"b".repeat(1025)), limit));
        // One control byte is 6 bytes once escaped (\u0001): 1019 + 6 = 1025.
        let ctl = format!("{}\u{1}", "b".repeat(1019));
        assert!(!encoded_within(&chat_data(&ctl), limit));
        let ctl = format!("{}\u{1}", "b".repeat(1018));
        assert!(encoded_within(&chat_data(&ctl), limit), "1018 + 6 = 1024");
        // A quote is 2 bytes.
        assert!(!encoded_within(&chat_data(&"\"".repeat(513)), limit));
        assert!(encoded_within(&chat_data(&"\"".repeat(512)), limit));
        // 64 KiB of control bytes: ~6x over.
        let flood = "\u{2}".repeat(64 * 1024);
        assert_eq!(chat_data(&flood).get().len(), 6 * 64 * 1024 + 2);
        assert!(!encoded_within(&chat_data(&flood), 64 * 1024));
        // JSON data is kept verbatim: its size is what was received.
        let raw = RawValue::from_string(format!("[{}]", "1,".repeat(511) + "1")).unwrap();
        assert_eq!(raw.get().len(), 1025);
        assert!(!encoded_within(&raw, limit));
    }

    use super::*;
    use serde_json::Value;

    fn json(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn room_names() {
        for ok in ["a", "lobby", "Room_1.2:3-x", &"x".repeat(128)] {
            assert!(RoomName::parse(ok).is_some(), "{ok}");
        }
        for bad in ["", "a b", "ä", "a/b", "a?b", &"x".repeat(129), "%41", "a\0"] {
            assert!(RoomName::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(valid_name("Alice B"));
        assert!(valid_name("Zoë"));
        assert!(!valid_name(""));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(65)));
    }

    #[test]
    fn publish_command_keeps_data_verbatim() {
        let cmd = parse_command(r#"{"type":"publish","data":{"b":[1,2.50,"x"]}}"#).unwrap();
        match cmd {
            ClientCommand::Publish(data, None) => {
                assert_eq!(data.get(), r#"{"b":[1,2.50,"x"]}"#)
            }
            other => panic!("{other:?}"),
        }
        let cmd = parse_command(r#" {"data":null,"type":"publish","extra":1} "#).unwrap();
        assert!(matches!(cmd, ClientCommand::Publish(d, None) if d.get() == "null"));
        let cmd = parse_command(r#"{"type":"publish","data":1,"key":"k\u0031"}"#).unwrap();
        assert!(matches!(cmd, ClientCommand::Publish(_, Some(k)) if k == "k1"));
        for bad in [r#""""#, "5", "[]", &format!("{:?}", "k".repeat(129))] {
            let text = format!(r#"{{"type":"publish","data":1,"key":{bad}}}"#);
            assert_eq!(
                parse_command(&text),
                Err(CommandError::Invalid(INVALID_KEY)),
                "{text}"
            );
        }
    }

    #[test]
    fn text_that_is_not_json_is_chat() {
        for text in [
            "hello world!",
            "{not json",
            "",
            "  ",
            "[1,",
            "\"unterminated",
        ] {
            assert_eq!(
                parse_command(text),
                Ok(ClientCommand::Chat(text)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn json_that_is_not_a_command_is_an_error() {
        for text in [
            r#"{"type":"dance"}"#,
            r#"{}"#,
            "42",
            r#""hi""#,
            "[1,2]",
            "null",
            r#"{"type":7}"#,
        ] {
            assert_eq!(parse_command(text), Err(CommandError::Unknown), "{text}");
        }
        assert_eq!(
            parse_command(r#"{"type":"publish"}"#).unwrap_err().code(),
            "invalid_command"
        );
        assert_eq!(parse_command(r#"{"type":"ping"}"#), Ok(ClientCommand::Ping));
        assert_eq!(parse_command(r#"["ping"]"#), Err(CommandError::Unknown));
        assert_eq!(
            parse_command(r#"["publish", 5]"#),
            Err(CommandError::Unknown)
        );
        assert_eq!(
            parse_command(r#"{"type":"p\u0069ng"}"#),
            Ok(ClientCommand::Ping)
        );
    }

    #[test]
    fn message_frame_shape() {
        let data = RawValue::from_string(r#"{"k":1}"#.into()).unwrap();
        let bytes = Message::new("r1", Some("al\"ice"), Role::Host, &data, "id1", 17).encode();
        assert_eq!(
            json(&bytes),
            serde_json::json!({"type":"message","room":"r1","from":"al\"ice","role":"host","data":{"k":1},"id":"id1","ts":17})
        );
        let room = RoomName::parse("r1").unwrap();
        assert_eq!(
            classify_broker_payload(&room, &bytes),
            BrokerPayload::Envelope {
                ts: 17,
                stamp: None
            }
        );
        let prefix = Message::new("r1", None, Role::Host, &data, "id1", 17).encode_prefix();
        let mut full = prefix.to_vec();
        full.extend_from_slice(crate::wire::history::frame_tail(9, "E1").as_bytes());
        assert_eq!(json(&full)["offset"], 9);
        assert_eq!(
            classify_broker_payload(&room, &full),
            BrokerPayload::Envelope {
                ts: 17,
                stamp: Some(Stamp::new(9, "E1"))
            }
        );
        // Same shape, other room: not ours to forward as is.
        let other = RoomName::parse("r2").unwrap();
        assert_eq!(classify_broker_payload(&other, &bytes), BrokerPayload::Raw);
    }

    #[test]
    fn raw_payloads_become_server_strings() {
        let room = RoomName::parse("r").unwrap();
        for raw in [
            &b"hello"[..],
            b"{\"type\":\"message\"}",
            b"{\"score\":3}",
            b"",
            b"\xff\xfe",
            b"42",
        ] {
            assert_eq!(classify_broker_payload(&room, raw), BrokerPayload::Raw);
            let v = json(&wrap_raw_payload(&room, raw, "i", 5));
            assert_eq!(v["type"], "message");
            assert_eq!(v["role"], "server");
            assert_eq!(v["from"], Value::Null);
            assert_eq!(
                v["data"],
                Value::String(String::from_utf8_lossy(raw).into_owned())
            );
        }
    }

    #[test]
    fn events() {
        let room = RoomName::parse("lobby").unwrap();
        let w = json(&welcome(
            "n1",
            &room,
            Role::Viewer,
            "c7",
            None,
            None,
            WelcomePosition::default(),
        ));
        assert_eq!(
            w,
            serde_json::json!({"type":"welcome","node":"n1","room":"lobby","role":"viewer","connection_id":"c7","name":null,"user":null,"epoch":null,"offset":0})
        );
        let w = json(&welcome(
            "n1",
            &room,
            Role::Host,
            "c7",
            Some("Ann"),
            Some("u-42"),
            WelcomePosition::default(),
        ));
        assert_eq!(w["user"], "u-42");
        assert_eq!(
            json(&refreshed(17)),
            serde_json::json!({"type":"refreshed","exp":17})
        );
        assert_eq!(
            json(&expiring(17)),
            serde_json::json!({"type":"expiring","exp":17})
        );
        assert_eq!(
            parse_command(r#"{"type":"refresh","token":"a.b.c"}"#),
            Ok(ClientCommand::Refresh("a.b.c".into()))
        );
        assert_eq!(
            parse_command(r#"{"type":"refresh"}"#).unwrap_err().code(),
            "invalid_command"
        );
        let position = WelcomePosition {
            epoch: Some("E"),
            offset: 4,
            recovered: Some(false),
        };
        let w = json(&welcome(
            "n1",
            &room,
            Role::Viewer,
            "c7",
            None,
            None,
            position,
        ));
        assert_eq!(
            (&w["epoch"], &w["offset"], &w["recovered"]),
            (&Value::from("E"), &Value::from(4), &Value::from(false))
        );
        assert_eq!(
            json(&presence(&room, 2, 30)),
            serde_json::json!({"type":"presence","room":"lobby","hosts":2,"viewers":30})
        );
        assert_eq!(
            json(&error("unknown_command", "x")),
            serde_json::json!({"type":"error","code":"unknown_command","message":"x"})
        );
        assert_eq!(json(&pong())["type"], "pong");
        assert_eq!(
            json(chat_data("a\"b").get().as_bytes()),
            Value::String("a\"b".into())
        );
    }
}
