//! The keepalive timer: every `--ping-interval`, one pass over the node's sessions queues a
//! WebSocket Ping to each, and closes (4001) each session from which nothing at all — no frame,
//! no Pong — arrived within `--idle-timeout`. A dead client is therefore removed at most
//! idle timeout + ping interval after its last sign of life.
//!
//! One node-wide timer instead of one per session: an idle session owns no timer, which keeps a
//! quiet viewer's memory small, and a ping round costs one queue push per session, spread over
//! a short window ([`crate::node::pacing`]) rather than all at once. A member of a room that had
//! a fan-out within the last half window gets its Ping with its next room message, in the same
//! write ([`Rider::Ping`]); those still due half a window after the round get it on its own.

use std::sync::Arc;

use tracing::debug;

use crate::fanout::outbox::{Outgoing, Rider};
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
                let window = pacing::window(every);
                let ride = window / 2;
                let mut sessions = Vec::new();
                node.hub.for_each_outbox_busy(now, ride.as_millis() as u64, |o, busy| {
                    sessions.push((o.clone(), busy))
                });
                let mut closed = 0usize;
                let mut riding = Vec::new();
                pacing::in_slices(&sessions, window, node.stopping(), |(outbox, busy)| {
                    if outbox.silent_for_ms(now) >= idle_ms {
                        outbox.close(CloseReason::IdleTimeout);
                        closed += 1;
                    } else if *busy && outbox.defer(Rider::Ping) {
                        riding.push(outbox.clone());
                    } else {
                        let _ = outbox.push_item(Outgoing::Ping);
                    }
                })
                .await;
                if closed > 0 {
                    debug!(sessions = sessions.len(), closed, "keepalive round");
                }
                drop(sessions);
                // The pings that did not ride with a message meanwhile go out on their own.
                pacing::leftovers(
                    riding,
                    ride,
                    ride,
                    node.stopping(),
                    |outbox| outbox.take_due(Rider::Ping),
                    |outbox| {
                        let _ = outbox.push_item(Outgoing::Ping);
                    },
                )
                .await;
            }
        }
    }
}
