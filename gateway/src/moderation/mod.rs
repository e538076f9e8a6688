//! Moderation's plain parts, below the node: the commands the control channel carries and the
//! bans' storage ([`control`]), and the registry of this node's sessions by user and room with
//! their token deadlines ([`registry`]). The node applies them ([`crate::node::moderation`]); the
//! routes are [`crate::http::moderation`].

pub mod control;
pub mod registry;
