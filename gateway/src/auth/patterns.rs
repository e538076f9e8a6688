//! Room patterns: an exact room name, or a prefix ending in `*` (`*` alone is every room). Used by
//! the grants of a token ([`super::claims`]) and by `--allow-anonymous-viewers`; what a match
//! allows is decided by their owners.

use crate::wire::protocol::{RoomName, MAX_ROOM_LEN};

/// Whether `pattern` is an exact room name or a valid room-name prefix followed by `*`.
pub fn valid_pattern(pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => prefix.len() < MAX_ROOM_LEN && RoomName::parse(prefix).is_some(),
        None => RoomName::parse(pattern).is_some(),
    }
}

/// Whether `room` matches `pattern` (exact, or by prefix when the pattern ends in `*`).
pub fn matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

/// A list of room patterns, checked at start ([`crate::config::Config::validate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomPatterns(Box<[Box<str>]>);

impl RoomPatterns {
    /// The patterns, blank entries dropped.
    pub fn new<'a>(patterns: impl Iterator<Item = &'a str>) -> Self {
        Self(
            patterns
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(Box::from)
                .collect(),
        )
    }

    /// Whether any pattern matches `room`.
    pub fn covers(&self, room: &RoomName) -> bool {
        self.0.iter().any(|p| matches(p, room.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_everything() {
        let p = RoomPatterns::new(["public-*", "lobby", " "].into_iter());
        let room = |s| RoomName::parse(s).unwrap();
        assert!(p.covers(&room("public-1")));
        assert!(p.covers(&room("public-")));
        assert!(p.covers(&room("lobby")));
        assert!(!p.covers(&room("lobby2")), "exact means exact");
        assert!(!p.covers(&room("publi")));
        assert!(!p.covers(&room("private-1")));
        assert!(RoomPatterns::new(["*"].into_iter()).covers(&room("anything")));
        assert!(!RoomPatterns::default().covers(&room("lobby")));
        assert!(valid_pattern("a-*") && valid_pattern("*") && valid_pattern("a"));
        assert!(!valid_pattern("a*b") && !valid_pattern("a b") && !valid_pattern(""));
        assert!(!valid_pattern("**"));
    }
}
