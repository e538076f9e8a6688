//! Why a session ends: the WebSocket close code a client sees, its reason text, whether the client
//! should reconnect, and the `reason` label the node counts it under.
//!
//! The codes and their reconnect meaning are the contract in `docs/protocol.md`; the browser client
//! and the load tester both follow it. Codes 4000–4499 mean "reconnect with backoff", 4500–4999
//! mean "do not reconnect", as in centrifuge's disconnect.go.

/// Why a session ended. Each variant maps to one close code and one metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a valid Close frame; we answer with 1000.
    ClientClosed,
    /// The socket ended without a Close frame (client vanished; 1006 on the client side).
    Eof,
    /// Reading or writing the socket failed.
    IoError,
    /// The client broke the WebSocket protocol: unmasked or reserved-bit frames, bad opcodes,
    /// fragmented control frames, continuation without a start (1002).
    ProtocolError,
    /// A text message that is not valid UTF-8 (1007).
    InvalidUtf8,
    /// A message or reassembled fragmented message over `--max-message-size`, or more fragments than
    /// allowed (1009).
    TooLarge,
    /// The client kept publishing over `--max-publish-rate` after being warned (1008).
    RateLimited,
    /// The client's outbox was full: it does not read fast enough (4000, reconnect).
    SlowConsumer,
    /// Nothing came from the client (not even a Pong) within the idle timeout (4001, reconnect).
    IdleTimeout,
    /// The node is draining or shutting down (1012, reconnect elsewhere).
    Shutdown,
    /// The connection's token expired without a refresh (4010: get a new token, then reconnect).
    TokenExpired,
    /// The node lost its broker for longer than `--broker-loss-close` (4002, reconnect with
    /// backoff): its members would miss what other nodes publish, so they go to a node that
    /// has the broker and resume there from their last offset.
    BrokerLost,
    /// A moderator disconnected the user or the room (4501, do not reconnect automatically).
    Kicked,
    /// The user was banned from the room (4502, do not reconnect).
    Banned,
    /// A refreshed token no longer grants this room or role (4503, do not reconnect).
    Forbidden,
}

impl CloseReason {
    /// Every reason, for registering one metric series each.
    pub const ALL: [CloseReason; 15] = [
        Self::ClientClosed,
        Self::Eof,
        Self::IoError,
        Self::ProtocolError,
        Self::InvalidUtf8,
        Self::TooLarge,
        Self::RateLimited,
        Self::SlowConsumer,
        Self::IdleTimeout,
        Self::Shutdown,
        Self::TokenExpired,
        Self::BrokerLost,
        Self::Kicked,
        Self::Banned,
        Self::Forbidden,
    ];

    /// The close code sent to the client, or `None` when no Close frame can be sent (the socket is
    /// gone) or one was already answered.
    pub fn code(self) -> Option<u16> {
        match self {
            Self::ClientClosed => Some(1000),
            Self::Eof | Self::IoError => None,
            Self::ProtocolError => Some(1002),
            Self::InvalidUtf8 => Some(1007),
            Self::TooLarge => Some(1009),
            Self::RateLimited => Some(1008),
            Self::SlowConsumer => Some(4000),
            Self::IdleTimeout => Some(4001),
            Self::Shutdown => Some(1012),
            Self::TokenExpired => Some(4010),
            Self::BrokerLost => Some(4002),
            Self::Kicked => Some(4501),
            Self::Banned => Some(4502),
            Self::Forbidden => Some(4503),
        }
    }

    /// The short reason text sent in the Close frame (at most 123 bytes by the RFC).
    pub fn text(self) -> &'static str {
        match self {
            Self::ClientClosed => "",
            Self::Eof | Self::IoError => "",
            Self::ProtocolError => "protocol error",
            Self::InvalidUtf8 => "invalid utf-8",
            Self::TooLarge => "message too large",
            Self::RateLimited => "publish rate exceeded",
            Self::SlowConsumer => "slow consumer",
            Self::IdleTimeout => "idle timeout",
            Self::Shutdown => "service restart",
            Self::TokenExpired => "token expired",
            Self::BrokerLost => "broker unavailable",
            Self::Kicked => "kicked",
            Self::Banned => "banned",
            Self::Forbidden => "forbidden",
        }
    }

    /// Whether a client should reconnect after this close.
    pub fn reconnect(self) -> bool {
        matches!(
            self,
            Self::Eof
                | Self::IoError
                | Self::SlowConsumer
                | Self::IdleTimeout
                | Self::Shutdown
                | Self::TokenExpired
                | Self::BrokerLost
        )
    }

    /// The `reason` label of `gateway_connections_closed_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::Eof => "eof",
            Self::IoError => "io_error",
            Self::ProtocolError => "protocol_error",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::SlowConsumer => "slow_consumer",
            Self::IdleTimeout => "idle_timeout",
            Self::Shutdown => "shutdown",
            Self::TokenExpired => "token_expired",
            Self::BrokerLost => "broker_lost",
            Self::Kicked => "kicked",
            Self::Banned => "banned",
            Self::Forbidden => "forbidden",
        }
    }
}

impl CloseReason {
    /// The `reason` of a member that left a listing room because its last connection ended so
    /// (docs/protocol.md, "Member lists"): `client_closed` (the client closed, or its socket
    /// ended), `kicked`, `banned`, `token_expired`, `forbidden`, `shutdown` (its node drained),
    /// `broker_lost`, `slow_consumer`, `idle_timeout`, `rate_limited` and `protocol_error` (any
    /// broken frame); `node_lost` is the reaper's, for a node that died.
    pub fn left_reason(self) -> &'static str {
        match self {
            Self::ClientClosed | Self::Eof | Self::IoError => "client_closed",
            Self::ProtocolError | Self::InvalidUtf8 | Self::TooLarge => "protocol_error",
            other => other.label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_documented_ranges() {
        for r in CloseReason::ALL {
            if let Some(code) = r.code() {
                assert!(r.text().len() <= 123);
                if (4000..4500).contains(&code) {
                    assert!(r.reconnect(), "{r:?}");
                }
                if (4500..5000).contains(&code) {
                    assert!(!r.reconnect(), "{r:?}");
                }
            }
        }
        assert_eq!(CloseReason::Shutdown.code(), Some(1012));
        assert_eq!(CloseReason::TooLarge.code(), Some(1009));
        assert_eq!(CloseReason::InvalidUtf8.code(), Some(1007));
        assert_eq!(CloseReason::ProtocolError.code(), Some(1002));
    }
}
