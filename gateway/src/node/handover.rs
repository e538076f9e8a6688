//! The hand-over of a node's clients when it loses its broker: after `--broker-loss-close`
//! without Redis, every session is closed with 4002 (reconnect with backoff), spread over one
//! second, so that clients reconnect through the load balancer to a node that has Redis (this
//! one fails `/readyz` meanwhile) and resume from their last offset — instead of staying on a
//! node that cannot hear what the rest of the cluster publishes. While the outage lasts, the
//! sessions that join meanwhile are closed the same way every `--broker-loss-close`.
//!
//! One node-wide timer, like the keepalive: no per-session state.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::node::pacing;
use crate::node::Node;
use crate::wire::close::CloseReason;

/// How often the broker's state is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Closes of one round go out over this long (a reconnect wave rather than a burst).
const SPREAD: Duration = Duration::from_secs(1);

/// Watches the broker until the node stops.
pub async fn run(node: Arc<Node>) {
    let limit = node.config.broker_loss_close;
    if limit.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Since when the broker is down, and when its sessions were last handed over.
    let mut down_since: Option<Instant> = None;
    let mut handed_over: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => return,
            _ = tick.tick() => {}
        }
        if node.broker.is_connected() || node.is_draining() {
            down_since = None;
            handed_over = None;
            continue;
        }
        let now = Instant::now();
        let since = *down_since.get_or_insert(now);
        let due = match handed_over {
            None => now.duration_since(since) >= limit,
            Some(last) => now.duration_since(last) >= limit,
        };
        if !due {
            continue;
        }
        handed_over = Some(now);
        let mut sessions = Vec::new();
        node.hub.for_each_outbox(|o| sessions.push(o.clone()));
        if sessions.is_empty() {
            continue;
        }
        warn!(
            sessions = sessions.len(),
            down_for = ?now.duration_since(since),
            "broker unavailable: handing clients over to other nodes (4002)"
        );
        pacing::in_slices(&sessions, SPREAD, node.stopping(), |outbox| {
            outbox.close(CloseReason::BrokerLost)
        })
        .await;
    }
}
