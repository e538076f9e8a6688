//! The keepalive timer: every `--ping-interval`, one pass over the node's sessions queues a
//! WebSocket Ping to each, and closes (4001) each session from which nothing at all — no frame,
//! no Pong — arrived within `--idle-timeout`. A dead client is therefore removed at most
//! idle timeout + ping interval after its last sign of life.
//!
//! One node-wide timer instead of one per session: an idle session owns no timer, which keeps a
//! quiet viewer's memory small, and a ping round costs one queue push per session, spread over
//! a short window ([`crate::node::pacing`]) rather than all at once.

use std::sync::Arc;

use tracing::debug;

use crate::fanout::outbox::Outgoing;
use crate::node::pacing;
use crate::node::Node;
use crate::wire::close::CloseReason;

/// Runs until the node stops.
pub async fn run(node: Arc<Node>) {
    let every = node.config.ping_interval;
    let idle_ms = node.config.idle_timeout.as_millis() as u64;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => return,
            _ = tick.tick() => {
                let now = crate::wire::clock::monotonic_millis();
                let mut sessions = Vec::new();
                node.hub.for_each_outbox(|o| sessions.push(o.clone()));
                let mut closed = 0usize;
                let window = pacing::window(every);
                pacing::in_slices(&sessions, window, node.stopping(), |outbox| {
                    if outbox.silent_for_ms(now) >= idle_ms {
                        outbox.close(CloseReason::IdleTimeout);
                        closed += 1;
                    } else {
                        let _ = outbox.push_item(Outgoing::Ping);
                    }
                })
                .await;
                if closed > 0 {
                    debug!(sessions = sessions.len(), closed, "keepalive round");
                }
            }
        }
    }
}
