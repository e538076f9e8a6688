//! Spreading node-wide rounds of per-session work (presence frames, keepalive pings) over time.
//!
//! A round that touches every session at the same instant wakes tens of thousands of writers at
//! once and delays whatever room message falls into that burst (measured with the goose load
//! test at 30 000 connections). Rounds are therefore cut into slices handled at evenly spaced
//! moments over a window.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Items per slice.
pub const SLICE: usize = 500;

/// The window a round is spread over: a quarter of its interval, at most one second, so the
/// round still completes soon after its tick.
pub fn window(interval: Duration) -> Duration {
    (interval / 4).min(Duration::from_secs(1))
}

/// Calls `f` on every item, [`SLICE`] at a time, the slices evenly spaced over `window`; stops
/// early when `stop` is cancelled.
pub async fn in_slices<T>(
    items: &[T],
    window: Duration,
    stop: &CancellationToken,
    mut f: impl FnMut(&T),
) {
    let slices = items.len().div_ceil(SLICE).max(1);
    let gap = window / slices as u32;
    for (i, slice) in items.chunks(SLICE).enumerate() {
        if i > 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(gap) => {}
            }
        }
        slice.iter().for_each(&mut f);
    }
}

/// The second half of a round whose frames may ride with room messages
/// ([`crate::fanout::outbox::Rider`]): waits `wait` for them to go out with their members' next
/// messages, then calls `f` on each item `still_due` says was not taken, in slices spread over
/// `window`; stops early when `stop` is cancelled.
pub async fn leftovers<T>(
    items: Vec<T>,
    wait: Duration,
    window: Duration,
    stop: &CancellationToken,
    still_due: impl Fn(&T) -> bool,
    f: impl FnMut(&T),
) {
    if items.is_empty() {
        return;
    }
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(wait) => {}
    }
    let left: Vec<T> = items.into_iter().filter(|i| still_due(i)).collect();
    in_slices(&left, window, stop, f).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::outbox::{Outbox, Rider};
    use bytes::Bytes;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn leftovers_are_the_riders_no_message_took_pushed_after_the_wait() {
        let outboxes: Vec<Arc<Outbox>> = (0..3).map(|_| Arc::new(Outbox::new(8, 1024).0)).collect();
        for o in &outboxes {
            assert!(o.defer(Rider::Presence));
        }
        let start = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let presence = Bytes::from_static(b"p");
        let pushed = std::sync::Mutex::new(Vec::new());
        let flushed = leftovers(
            outboxes.clone(),
            Duration::from_millis(500),
            Duration::from_millis(500),
            &stop,
            |o| o.take_due(Rider::Presence),
            |o| {
                pushed
                    .lock()
                    .unwrap()
                    .push((Arc::as_ptr(o), start.elapsed()))
            },
        );
        let message = async {
            // A message reaches the second member during the wait: its presence rides with it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let out = outboxes[1].push_messages(
                &[(Bytes::from_static(b"m"), None)],
                true,
                Some(&presence),
            );
            assert_eq!(out.riders, 1);
        };
        tokio::join!(flushed, message);
        let pushed = pushed.into_inner().unwrap();
        let who: Vec<_> = pushed.iter().map(|(p, _)| *p).collect();
        assert_eq!(who, [Arc::as_ptr(&outboxes[0]), Arc::as_ptr(&outboxes[2])]);
        assert!(pushed
            .iter()
            .all(|(_, at)| *at == Duration::from_millis(500)));
        // Cancelled during the wait: nothing is pushed.
        assert!(outboxes[0].defer(Rider::Ping));
        stop.cancel();
        let mut called = false;
        leftovers(
            vec![outboxes[0].clone()],
            Duration::from_millis(500),
            Duration::ZERO,
            &stop,
            |_| true,
            |_| called = true,
        )
        .await;
        assert!(!called);
    }

    #[tokio::test(start_paused = true)]
    async fn slices_are_spread_over_the_window() {
        let items: Vec<u32> = (0..1200).collect();
        let start = tokio::time::Instant::now();
        let mut seen = Vec::new();
        in_slices(
            &items,
            Duration::from_millis(900),
            &CancellationToken::new(),
            |i| seen.push((*i, start.elapsed())),
        )
        .await;
        assert_eq!(seen.len(), 1200);
        assert_eq!(seen[0].1, Duration::ZERO);
        assert_eq!(seen[500].1, Duration::from_millis(300));
        assert_eq!(seen[1199].1, Duration::from_millis(600));
        assert_eq!(window(Duration::from_secs(25)), Duration::from_secs(1));
        assert_eq!(
            window(Duration::from_millis(400)),
            Duration::from_millis(100)
        );
    }
}
