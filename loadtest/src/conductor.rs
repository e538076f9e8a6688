//! The run's conductor: once the window is fixed (the last member's first attempt), it starts the
//! generator probe and the HTTP API publishers, and ends the run when the drain is over.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::plan::Window;
use crate::shared::Shared;
use crate::stats::Stats;
use crate::{api, probe};

/// Starts the generator probe and the HTTP API publishers, and end the
/// run when the drain is over.
pub fn spawn_conductor(shared: Arc<Shared>, window: Window) {
    log::info!(
        "all {} members made their first attempt; measured window starts in {:?}",
        shared.schedule.first_attempts(),
        window.start.saturating_duration_since(Instant::now())
    );
    let probe = probe::spawn(shared.stats.clone(), window.drain_end);
    let api = match &shared.http {
        Some(c) => api::spawn_publishers(&shared, c.clone(), window),
        None => Vec::new(),
    };
    tokio::spawn(async move {
        tokio::time::sleep_until(window.end.into()).await;
        log::info!("measured window over; draining");
        tokio::time::sleep_until(window.drain_end.into()).await;
        for p in api {
            if let Ok(unsent) = p.await {
                Stats::add(&shared.stats.unsent, unsent);
            }
        }
        if let Ok(usage) = probe.await {
            *shared.usage.lock().unwrap_or_else(|p| p.into_inner()) = usage;
        }
        shared.schedule.complete.store(true, Ordering::Release);
        shared.schedule.ended.cancel();
        goose::trigger_killswitch("loadtest: measured window and drain complete");
    });
}
