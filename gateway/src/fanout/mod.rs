//! Fan-out: a room's message from the broker to every local member's socket, framed once per
//! node. [`inbound`] is the one door from the broker (classify, count, stamp, in order);
//! [`write_window`] batches a hot room's messages; [`hub`] holds the local rooms and pushes the
//! shared bytes to each member's [`outbox`] (bounded queue, hold/cut for gapless joins, direct
//! writes to an idle socket); [`gapfill`] keeps each room's last offset, drops repeats and fills a
//! gap in what the node's subscription brought from history before the messages after it.
//!
//! Imports [`crate::wire`], [`crate::metrics`] and [`crate::config`] only: it knows neither the
//! broker (which calls [`inbound::Inbound`]; the history a gap is filled from comes through the
//! [`gapfill::MissedSource`] trait, which the node implements) nor sessions (which own an outbox).

pub mod gapfill;
pub mod hub;
pub mod inbound;
pub mod outbox;
pub mod write_window;
