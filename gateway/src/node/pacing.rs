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

#[cfg(test)]
mod tests {
    use super::*;

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
