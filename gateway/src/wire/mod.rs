//! The wire: what crosses a socket or the broker, as plain data and bytes, with no I/O and no
//! state of the node. Protocol types and their encoding ([`protocol`]), the WebSocket frame in
//! both directions ([`frame`]), close codes and their meaning ([`close`]), room positions and
//! history reads ([`history`]), and the one clock every timestamp comes from ([`clock`]).
//!
//! Imports nothing else of the crate: every other layer may import `wire`, and `wire` imports
//! none of them.

pub mod clock;
pub mod close;
pub mod frame;
pub mod history;
pub mod protocol;
