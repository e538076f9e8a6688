//! Moderation on this node: applying the disconnects that arrive on the control channel, and
//! checking bans at joins and refreshes. The commands, the bans' storage and the registry of
//! sessions by user are [`crate::moderation`]'s.
//!
//! - The routes are [`crate::http::moderation`]; the commands and the bans' storage are
//!   [`crate::moderation::control`].
//! - A disconnect travels as a JSON [`Command`] on the broker's control channel
//!   (`{prefix}_control` in Redis, which every node subscribes to permanently; a direct hand-over
//!   with the in-process broker) and each node closes the matching sessions of its
//!   [`Registry`](crate::moderation::registry::Registry) with 4501 (kicked) or 4502 (banned).
//! - A ban is stored by the broker with its time-to-live (a Redis hash `{prefix}ban:{sub}`: field
//!   room or `*`, value expiry in unix ms; [`crate::broker::control::MemoryBans`] with the in-process broker) and checked
//!   at every join and refresh that carries a token.
//!
//! The control queue between the broker's receiving task and [`run`] is bounded
//! ([`crate::broker::control::CONTROL_QUEUE`]); a command that finds it full is dropped and counted, never waited for.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::fanout::outbox::Outbox;
use crate::metrics::ControlResult;
use crate::moderation::control::{covers, Command, Reason};
use crate::moderation::registry::Selector;
use crate::node::Node;
use crate::wire::close::CloseReason;
use crate::wire::protocol::RoomName;

/// Connects the broker's control channel to a bounded queue and spawns [`run`] on the node's
/// tracker.
pub fn start(node: &Arc<Node>) {
    let (tx, rx) = mpsc::channel(crate::broker::control::CONTROL_QUEUE);
    node.broker.set_control(tx);
    node.tracker.spawn(run(node.clone(), rx));
}

/// Applies control commands to this node's sessions until the node stops.
pub async fn run(node: Arc<Node>, mut rx: mpsc::Receiver<Bytes>) {
    loop {
        let payload = tokio::select! {
            _ = node.stopping().cancelled() => return,
            p = rx.recv() => match p { Some(p) => p, None => return },
        };
        match serde_json::from_slice::<Command>(&payload) {
            Ok(Command::Disconnect { sub, room, reason }) => {
                let close = match reason {
                    Reason::Kicked => CloseReason::Kicked,
                    Reason::Banned => CloseReason::Banned,
                };
                let n = match (sub.as_deref(), room.as_deref()) {
                    // A room (or everyone): every member, anonymous ones too, from the hub.
                    (None, room) => close_members(&node, room, close),
                    (user, room) => node.registry.close_matching(Selector { user, room }, close),
                };
                node.metrics.control(ControlResult::Applied);
                debug!(
                    sessions = n,
                    reason = close.label(),
                    "moderation disconnect"
                );
            }
            Err(e) => {
                node.metrics.control(ControlResult::Invalid);
                debug!(cause = %e, "invalid control command");
            }
        }
    }
}

/// Closes every local member of `room` (of every room when `None`) with `reason`; returns how
/// many.
fn close_members(node: &Node, room: Option<&str>, reason: CloseReason) -> usize {
    let mut n = 0;
    let mut close = |outbox: &Arc<Outbox>| {
        outbox.close(reason);
        n += 1;
    };
    match room {
        Some(room) => {
            if let Some(room) = RoomName::parse(room) {
                node.hub.outboxes(&room).iter().for_each(&mut close);
            }
        }
        None => node.hub.for_each_outbox(&mut close),
    }
    n
}

/// Whether `sub` is banned from `room`. A broker that cannot answer lets the user in (and logs):
/// during a Redis outage the node cannot fan out either, and refusing every login would turn an
/// outage of the ban store into an outage of the service.
pub async fn is_banned(node: &Node, sub: &str, room: &RoomName) -> bool {
    match node.broker.bans(sub).await {
        Ok(bans) => covers(&bans, room.as_str()),
        Err(e) => {
            warn!(cause = %e, "ban check failed; admitting");
            false
        }
    }
}
