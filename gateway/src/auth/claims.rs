//! The claim shape of a connection token, its checks, and how its grants match a room.
//!
//! What the signature proves is decided elsewhere ([`super::Verifier`]); this module only says
//! whether a verified payload follows the documented shape (`docs/protocol.md`, Authentication)
//! and what it grants. The first grant whose pattern matches the joined room decides.

use std::sync::Arc;

use serde::Deserialize;

use super::patterns::{matches, valid_pattern};
use crate::wire::protocol::{self, Role, RoomName};

/// Most grants one token may carry.
pub const MAX_GRANTS: usize = 64;
/// Longest `sub`, in bytes.
pub const MAX_SUB_LEN: usize = 128;

/// The payload of a connection token, as signed by the operator's backend.
#[derive(Debug, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Display name shown to the room (same rules as `?name=`).
    #[serde(default)]
    pub name: Option<String>,
    /// Expiry, seconds since the epoch (checked by the verifier).
    pub exp: u64,
    /// The rights: which rooms, as what.
    pub rooms: Vec<Grant>,
}

/// One right of a token: a room pattern, the role there, and whether the user may publish.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// An exact room name, or a prefix ending in `*` (`*` alone is every room).
    pub room: String,
    /// `host` or `viewer`.
    pub role: GrantRole,
    /// Defaults to true for hosts, false for viewers.
    #[serde(default)]
    pub publish: Option<bool>,
    /// Lists its holder in the room and lets it see the member list (docs/protocol.md, "Member
    /// lists"); rooms matching `--list-rooms` list every member anyway.
    #[serde(default)]
    pub list: bool,
}

/// The role a grant gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantRole {
    /// A host.
    Host,
    /// A viewer.
    Viewer,
}

/// What a token allows in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Right {
    /// The role the client gets.
    pub role: Role,
    /// Whether its publishes are accepted.
    pub publish: bool,
    /// Whether the grant says `"list": true`.
    pub list: bool,
}

/// A verified user: who, until when, and with which rights.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user id (`sub`).
    pub sub: Arc<str>,
    /// The display name, if the token gave one.
    pub name: Option<Arc<str>>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    grants: Box<[Grant]>,
}

/// Why a payload does not follow the claim shape (the message is safe to show: it never quotes
/// the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ClaimsError(pub &'static str);

impl Claims {
    /// Checks the shape and turns the claims into an [`Identity`].
    pub fn into_identity(self) -> Result<Identity, ClaimsError> {
        if self.sub.is_empty() || self.sub.len() > MAX_SUB_LEN {
            return Err(ClaimsError("sub must be 1-128 bytes"));
        }
        if self.sub.chars().any(char::is_control) {
            return Err(ClaimsError("sub must not contain control characters"));
        }
        if let Some(n) = &self.name {
            if !protocol::valid_name(n) {
                return Err(ClaimsError(
                    "name must be 1-64 bytes without control characters",
                ));
            }
        }
        if self.rooms.is_empty() || self.rooms.len() > MAX_GRANTS {
            return Err(ClaimsError("rooms must hold 1-64 grants"));
        }
        if !self.rooms.iter().all(|g| valid_pattern(&g.room)) {
            return Err(ClaimsError(
                "a grant's room must be a room name or a prefix ending in *",
            ));
        }
        Ok(Identity {
            sub: Arc::from(self.sub),
            name: self.name.map(Arc::from),
            exp: self.exp,
            grants: self.rooms.into_boxed_slice(),
        })
    }
}

impl Identity {
    /// What the first grant matching `room` allows, if any grant does.
    pub fn right(&self, room: &RoomName) -> Option<Right> {
        self.grants
            .iter()
            .find(|g| matches(&g.room, room.as_str()))
            .map(|g| match g.role {
                GrantRole::Host => Right {
                    role: Role::Host,
                    publish: g.publish.unwrap_or(true),
                    list: g.list,
                },
                GrantRole::Viewer => Right {
                    role: Role::Viewer,
                    publish: g.publish.unwrap_or(false),
                    list: g.list,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(json: serde_json::Value) -> Result<Identity, ClaimsError> {
        serde_json::from_value::<Claims>(json)
            .map_err(|_| ClaimsError("shape"))?
            .into_identity()
    }

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    #[test]
    fn first_matching_grant_decides() {
        let id = identity(serde_json::json!({
            "sub": "user-42", "name": "Ann", "exp": 1,
            "rooms": [
                {"room": "quiz-7", "role": "host"},
                {"room": "public-*", "role": "viewer"},
                {"room": "chat-*", "role": "viewer", "publish": true, "list": true},
                {"room": "*", "role": "host"}
            ]
        }))
        .unwrap();
        let host = Right {
            role: Role::Host,
            publish: true,
            list: false,
        };
        assert_eq!(id.right(&room("quiz-7")), Some(host));
        assert_eq!(
            id.right(&room("public-1")),
            Some(Right {
                role: Role::Viewer,
                publish: false,
                list: false
            })
        );
        assert_eq!(
            id.right(&room("chat-x")),
            Some(Right {
                role: Role::Viewer,
                publish: true,
                list: true
            })
        );
        assert_eq!(id.right(&room("other")), Some(host), "* is every room");
        let narrow = identity(serde_json::json!({
            "sub": "u", "exp": 1, "rooms": [{"room": "quiz-7", "role": "viewer"}]
        }))
        .unwrap();
        assert_eq!(narrow.right(&room("quiz-70")), None, "exact means exact");
        assert_eq!(narrow.right(&room("quiz-")), None);
    }

    #[test]
    fn shape_is_enforced() {
        let bad = [
            serde_json::json!({"sub": "", "exp": 1, "rooms": [{"room": "a", "role": "host"}]}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": []}),
            serde_json::json!({"sub": "u", "exp": 1}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": [{"room": "a b", "role": "host"}]}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": [{"room": "a*b", "role": "host"}]}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": [{"room": "a", "role": "server"}]}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": [{"room": "a", "role": "host", "x": 1}]}),
            serde_json::json!({"sub": "u", "exp": 1, "name": "", "rooms": [{"room": "a", "role": "host"}]}),
            serde_json::json!({"sub": "u".repeat(129), "exp": 1, "rooms": [{"room": "a", "role": "host"}]}),
            serde_json::json!({"sub": "u", "exp": 1, "rooms": vec![serde_json::json!({"room": "a", "role": "host"}); 65]}),
        ];
        for b in bad {
            assert!(identity(b.clone()).is_err(), "{b}");
        }
    }
}
