//! The hand-over of a node's clients when it loses its broker — only of the members a move can
//! help. Per shard of the broker (one Redis or a Sentinel-managed master is one shard; a Redis
//! Cluster has one per master):
//!
//! 1. A shard this node cannot use for `--broker-loss-close` has its members — the members of
//!    rooms whose slot it owns, never others — considered for a hand-over. Members of rooms on
//!    healthy shards are never closed.
//! 2. Before closing, the broker's witness is asked ([`Broker::witness`]): the sentinels, or any
//!    other Cluster node this node reaches. If it lost the same master too (a failover, or the
//!    master gone for everyone), every node is in the same place: the members stay and resume
//!    once the failover is done (their publishes meanwhile get `unavailable`). If the witness
//!    reaches the master, or no witness answers, this node is cut off: its members of that shard
//!    are closed with 4002 (reconnect with backoff), spread over one second, so that they
//!    reconnect through the load balancer to a node that has the shard, and resume from their
//!    last offset. One Redis without Sentinel has no witness: it is always handed over.
//! 3. The wait has an upper bound: a shard lost for `--broker-failover-wait` (default three
//!    times `--broker-loss-close`) is handed over whatever the witness says.
//!
//! While a shard stays lost, the sessions that joined its rooms meanwhile are considered again
//! every `--broker-loss-close`. The witness is asked at most once a [`ASK_EVERY`] per shard, and
//! only while a shard is lost. A draining node hands nothing over (its drain does).
//!
//! One node-wide timer, like the keepalive: no per-session state.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::{Broker, Outage};
use crate::node::pacing;
use crate::node::Node;
use crate::wire::close::CloseReason;

/// How often the broker's state is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// Closes of one round go out over this long (a reconnect wave rather than a burst).
const SPREAD: Duration = Duration::from_secs(1);
/// How often a lost shard's witness is asked while it says "wait".
const ASK_EVERY: Duration = Duration::from_secs(1);

/// One lost shard.
#[derive(Debug)]
struct Lost {
    /// Since when this node cannot use the shard.
    since: Instant,
    /// When its members were last handed over.
    handed_over: Option<Instant>,
    /// When the witness was last asked (and said to wait).
    asked: Option<Instant>,
}

/// Watches the broker until the node stops.
pub async fn run(node: Arc<Node>) {
    let limit = node.config.broker_loss_close;
    if limit.is_zero() {
        return;
    }
    let wait_max = node.config.failover_wait();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lost: HashMap<usize, Lost> = HashMap::new();
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => return,
            _ = tick.tick() => {}
        }
        let states = if node.is_draining() {
            Vec::new()
        } else {
            node.broker.usable_shards()
        };
        lost.retain(|shard, _| states.get(*shard) == Some(&false));
        let now = Instant::now();
        let mut hand = Vec::new();
        for (shard, _) in states.iter().enumerate().filter(|(_, up)| !**up) {
            let l = lost.entry(shard).or_insert(Lost {
                since: now,
                handed_over: None,
                asked: None,
            });
            let due = match l.handed_over {
                None => now.duration_since(l.since) >= limit,
                Some(last) => now.duration_since(last) >= limit,
            };
            if !due || l.asked.is_some_and(|a| now.duration_since(a) < ASK_EVERY) {
                continue;
            }
            let down_for = now.duration_since(l.since);
            let why = if down_for >= wait_max {
                "the outage outlasted --broker-failover-wait"
            } else {
                match ask(&node, shard).await {
                    None => return,
                    Some(Outage::Shared(why)) => {
                        if l.asked.is_none() {
                            warn!(
                                shard,
                                down_for = ?down_for,
                                witness = why,
                                "broker shard lost by every node alike: keeping its clients"
                            );
                        }
                        l.asked = Some(now);
                        continue;
                    }
                    Some(Outage::Alone(why)) => why,
                }
            };
            l.handed_over = Some(now);
            l.asked = None;
            hand.push((shard, down_for, why));
        }
        if hand.is_empty() {
            continue;
        }
        let sessions = members_of(&node.broker, &node, |shard| {
            hand.iter().any(|(s, ..)| *s == shard)
        });
        for (shard, down_for, why) in &hand {
            warn!(
                shard,
                down_for = ?down_for,
                cause = why,
                "broker shard unavailable: handing its clients over to other nodes (4002)"
            );
        }
        if sessions.is_empty() {
            continue;
        }
        info!(sessions = sessions.len(), "closing with 4002");
        pacing::in_slices(&sessions, SPREAD, node.stopping(), |outbox| {
            outbox.close(CloseReason::BrokerLost)
        })
        .await;
    }
}

/// The witness's word on `shard`, or `None` when the node stops meanwhile.
async fn ask(node: &Node, shard: usize) -> Option<Outage> {
    tokio::select! {
        _ = node.stopping().cancelled() => None,
        o = node.broker.witness(shard) => Some(o),
    }
}

/// The outboxes of the local members of rooms on the shards `chosen` picks.
fn members_of(
    broker: &Broker,
    node: &Node,
    chosen: impl Fn(usize) -> bool,
) -> Vec<Arc<crate::fanout::outbox::Outbox>> {
    let mut out = Vec::new();
    for (room, _) in node.hub.snapshot() {
        if chosen(broker.shard_of(&room)) {
            out.extend(node.hub.outboxes(&room));
        }
    }
    out
}
