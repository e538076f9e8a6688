//! The presence timer: every `--presence-interval`, report this node's local counts of each room
//! to the broker, get the cluster-wide counts back, and send a `presence` event (encoded once per
//! room) to each member whose last one from this timer differs — a member that joined since, or
//! every member when the counts changed. A room whose counts stay the same costs its members
//! nothing (issue 22): no frame, no syscall, one compare per member. Rooms whose last local member left are withdrawn, so leaves
//! show within one interval; a node that dies stops renewing its reports, which expire after
//! three intervals.
//!
//! The frames of one round go out in slices of 500 members spread over a quarter of the interval
//! (at most 1 s), not in one burst: a change shows on every member within 1¼ intervals.
//!
//! The latest cluster-wide counts go to the node's [`crate::node::presence_cache::PresenceCache`], so that a client that joins
//! between two ticks gets a sensible `presence` right after its `welcome`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use tracing::warn;

use crate::fanout::outbox::{Outbox, PushError, Pushed};
use crate::metrics::DropReason;
use crate::node::pacing;
use crate::node::Node;
use crate::wire::frame::frame_text;
use crate::wire::protocol::{self, RoomName};

/// Runs the presence timer until the node stops, then withdraws this node's reports.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config.presence_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported: HashSet<RoomName> = HashSet::new();
    let mut failures = 0u64;
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => break,
            _ = tick.tick() => {
                match once(&node, &mut reported).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(60) {
                            warn!(cause = %e, failures, "presence update failed");
                        }
                    }
                }
            }
        }
    }
    // Leave no counts behind for the TTL to clean up.
    let gone: Vec<RoomName> = reported.into_iter().collect();
    if !gone.is_empty() {
        let _ = node
            .broker
            .presence(&node.config.node_id, &[], &gone, node.config.presence_ttl())
            .await;
    }
}

async fn once(
    node: &Node,
    reported: &mut HashSet<RoomName>,
) -> Result<(), crate::broker::BrokerError> {
    let local = node.hub.snapshot();
    let now: HashSet<RoomName> = local.iter().map(|(r, _)| r.clone()).collect();
    let gone: Vec<RoomName> = reported.difference(&now).cloned().collect();
    let cluster = node
        .broker
        .presence(
            &node.config.node_id,
            &local,
            &gone,
            node.config.presence_ttl(),
        )
        .await?;
    *reported = now;
    let mut cache = HashMap::with_capacity(local.len());
    let mut sends: Vec<Frame> = Vec::new();
    let mut unchanged = 0u64;
    for ((room, mine), counts) in local.into_iter().zip(cluster) {
        // Only to members whose last counts differ (a new member, or the counts changed), framed
        // once per room: every member gets the same bytes, each in one plain `send`.
        let packed = counts.packed();
        let mut frame: Option<Bytes> = None;
        for outbox in node.hub.outboxes(&room) {
            if outbox.presence_sent() == packed {
                unchanged += 1;
                continue;
            }
            let frame = frame
                .get_or_insert_with(|| {
                    frame_text(&protocol::presence(&room, counts.hosts, counts.viewers))
                })
                .clone();
            sends.push((frame, outbox, packed));
        }
        cache.insert(room, (counts, mine));
    }
    node.presence.replace(cache);
    node.metrics.presence_unchanged.increment(unchanged);
    spread(node, sends).await;
    Ok(())
}

/// One member's presence frame and the packed counts it carries.
type Frame = (Bytes, Arc<Outbox>, u64);

/// Queues the presence frames spread over [`pacing::window`] of the interval.
/// A frame that could not be queued leaves the member's record alone, so the next tick tries again.
async fn spread(node: &Node, sends: Vec<Frame>) {
    let (mut dropped, mut written) = (0u64, 0u64);
    let window = pacing::window(node.config.presence_interval);
    pacing::in_slices(
        &sends,
        window,
        node.stopping(),
        |(frame, outbox, packed)| match outbox.push_message(frame.clone(), None, true) {
            Err(PushError::Full) => dropped += 1,
            Err(_) => {}
            Ok(pushed) => {
                outbox.set_presence_sent(*packed);
                if matches!(pushed, Pushed::Written) {
                    written += 1;
                }
            }
        },
    )
    .await;
    node.metrics.delivered.increment(written);
    if dropped > 0 {
        node.metrics
            .dropped(DropReason::SlowConsumer)
            .increment(dropped);
    }
}
