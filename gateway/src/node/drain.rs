//! The drain, phase by phase, when the node is told to stop:
//!
//! 1. at once: `/readyz` fails and the client listener stops accepting (the node's draining
//!    token, cancelled by the caller);
//! 2. over `--drain-seconds`: every session is closed with 1012 (service restart), at evenly
//!    spaced moments in a random order, so clients reconnect elsewhere as a trickle, not a storm;
//!    sessions that were still upgrading when the drain began are picked up as they join;
//! 3. at the end of the window: whatever is left is closed at once, and the caller gives the
//!    last sessions and tasks a short grace before stopping everything.

use std::time::Duration;

use tokio::time::Instant;

use crate::node::Node;
use crate::wire::close::CloseReason;

/// How often the drain looks for sessions that joined after it started.
const STRAGGLER_POLL: Duration = Duration::from_millis(50);

/// Closes every session over `window`; returns when no session is left or `window + grace` has
/// passed.
pub async fn drain(node: &Node, window: Duration, grace: Duration) {
    node.begin_drain();
    let end = Instant::now() + window;
    let spread = async {
        loop {
            let mut open = Vec::new();
            node.hub.for_each_outbox(|o| {
                if !o.is_closing() {
                    open.push(o.clone());
                }
            });
            let now = Instant::now();
            if now >= end {
                open.iter().for_each(|o| o.close(CloseReason::Shutdown));
            } else if !open.is_empty() {
                fastrand::shuffle(&mut open);
                let step = (end - now) / open.len() as u32;
                for (i, o) in open.iter().enumerate() {
                    tokio::time::sleep_until(now + step * (i as u32 + 1)).await;
                    o.close(CloseReason::Shutdown);
                }
                continue;
            }
            if now >= end && node.session_count() == 0 {
                return;
            }
            tokio::time::sleep(STRAGGLER_POLL).await;
        }
    };
    let _ = tokio::time::timeout(window + grace, async {
        tokio::select! {
            _ = spread => {}
            _ = node.sessions_gone() => {}
        }
        node.sessions_gone().await;
    })
    .await;
}
