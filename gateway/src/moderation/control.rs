//! The moderation commands the control channel carries ([`Command`], JSON on `{prefix}_control`,
//! which every node subscribes to permanently) and what a ban covers ([`covers`]). The channel,
//! the bounded hand-over of received commands to the node and the bans' storage are the
//! broker's ([`crate::broker::control`]).
//! Applying a command is [`crate::node::moderation`]'s business; the routes are
//! [`crate::http::moderation`]'s.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

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
}
