//! The token expiry timer: every [`TICK`], the sessions whose token is within
//! `--token-expiry-warning` of its `exp` get an `expiring` event, and those whose token lapsed
//! without a refresh are closed with 4010 ("get a new token, then reconnect").
//!
//! One node-wide timer over the [`Registry`](crate::moderation::registry::Registry)'s ordered deadlines,
//! not a timer per session: a tick costs a look at the earliest deadline, and an idle session
//! owns no timer (its memory stays small).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::node::Node;

/// How often deadlines are checked: a lapsed token is closed within this of its `exp`.
pub const TICK: Duration = Duration::from_millis(250);

/// Runs until the node stops.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => return,
            _ = tick.tick() => {
                let (warned, closed) = node.registry.expire(crate::wire::clock::unix_micros() / 1000);
                if warned + closed > 0 {
                    debug!(warned, closed, "token expiry round");
                }
            }
        }
    }
}
