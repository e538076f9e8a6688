//! One room's delivery task: claim the lease and the oldest events, send each to every receiver
//! until all accepted it (retrying with capped, jittered backoff, the lease renewed meanwhile),
//! remove it, and go on in order; with nothing left, release the lease — which refuses while
//! events are left — and end.
//!
//! An event is removed from the stream only after every `--webhook-url` answered 2xx (or it was
//! dead-lettered), so a node that dies mid-way leaves it for the next holder: at least once.
//! Not here: waking and recovery ([`super`]), the request itself ([`super::request`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::request::{prepare, Prepared};
use super::Dispatcher;
use crate::broker::redis::{Backoff, Release};
use crate::metrics::WebhookAttempt;
use crate::wire::protocol::RoomName;

/// How an event's delivery ended.
enum Outcome {
    /// Removed from the stream: go on with the next.
    Done,
    /// The lease is another instance's now, or the node stops: this task ends.
    Leave,
}

/// Delivers `room` until nothing is left (or the lease is lost, or the node stops).
pub async fn run(d: Arc<Dispatcher>, room: RoomName) {
    let mut redis_backoff = Backoff::new(d.settings.retry_min, d.settings.retry_max);
    let mut indexed = false;
    'room: loop {
        if d.stop.is_cancelled() {
            break;
        }
        let claim = match d
            .store
            .claim(&d.instance, &room, d.settings.lease, super::BATCH)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(room = %room, cause = %e, "webhooks: claim failed; retrying");
                if !pause(&d, &room, redis_backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        };
        redis_backoff.reset();
        if !claim.held {
            // Another instance delivers the room (and has it in its index).
            let _ = d.store.own(&d.instance, &room, false).await;
            if d.finish(&room) {
                return;
            }
            continue;
        }
        if !indexed {
            indexed = d.store.own(&d.instance, &room, true).await.is_ok();
        }
        if claim.dropped > 0 {
            warn!(room = %room, dropped = claim.dropped, "webhooks: events trimmed before delivery");
            d.metrics.webhooks.events_dropped.increment(claim.dropped);
        }
        if claim.events.is_empty() {
            match d.store.release(&d.instance, &room, false).await {
                Ok(Release::Pending) => continue,
                Ok(_) => {
                    let _ = d.store.own(&d.instance, &room, false).await;
                    indexed = false;
                    if d.finish(&room) {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    warn!(room = %room, cause = %e, "webhooks: release failed; retrying");
                    if !pause(&d, &room, redis_backoff.next_delay()).await {
                        break;
                    }
                    continue;
                }
            }
        }
        for (id, event) in claim.events {
            match deliver(&d, &room, &id, &event).await {
                Outcome::Done => {}
                Outcome::Leave => break 'room,
            }
        }
        d.set_head(&room, None);
    }
    if d.stop.is_cancelled() {
        // Shutdown: the undelivered events stay in Redis, and the room in this instance's
        // index entry, which the dispatcher marks dead for another node to adopt.
        let _ = d.store.release(&d.instance, &room, true).await;
    }
    d.active().remove(&room);
}

/// Sends one event to every receiver until each accepted it, then removes it.
async fn deliver(d: &Dispatcher, room: &RoomName, id: &str, event: &str) -> Outcome {
    let prepared = match prepare(room, id, event) {
        Ok(p) => p,
        Err(reason) => {
            warn!(room = %room, id, %reason, "webhooks: event cannot be sent; dead-lettered");
            return finish(d, room, id, None, Some(&reason.to_string())).await;
        }
    };
    d.set_head(
        room,
        prepared.ts_ms.or(Some(crate::wire::clock::unix_millis())),
    );
    let mut pending: Vec<usize> = (0..d.sender.urls.len()).collect();
    let mut backoff = Backoff::new(d.settings.retry_min, d.settings.retry_max);
    let mut refusals = 0u32;
    loop {
        let results =
            futures_util::future::join_all(pending.iter().map(|&url| attempt(d, url, &prepared)));
        let results = tokio::select! {
            _ = d.stop.cancelled() => return Outcome::Leave,
            r = results => r,
        };
        let mut still = Vec::new();
        let mut all_refused = true;
        for (&url, result) in pending.iter().zip(results) {
            if result != WebhookAttempt::Accepted {
                all_refused &= result == WebhookAttempt::Refused;
                still.push(url);
            }
        }
        pending = still;
        if pending.is_empty() {
            return finish(d, room, id, Some(&prepared), None).await;
        }
        if all_refused {
            refusals += 1;
            if refusals >= d.settings.dead_letter_after {
                warn!(room = %room, id, "webhooks: refused by a receiver; dead-lettered");
                return finish(d, room, id, None, Some("refused")).await;
            }
        }
        let wait = backoff.next_delay();
        debug!(room = %room, id, ?wait, "webhooks: delivery failed; retrying");
        if !pause(d, room, wait).await {
            return Outcome::Leave;
        }
    }
}

async fn attempt(d: &Dispatcher, url: usize, event: &Prepared) -> WebhookAttempt {
    let result = d.sender.post(url, event).await;
    d.metrics.webhooks.attempt(result);
    result
}

/// Removes the event (delivered, or into the dead letters with `dead_letter`'s reason), retrying
/// a failing Redis; counts it.
async fn finish(
    d: &Dispatcher,
    room: &RoomName,
    id: &str,
    delivered: Option<&Prepared>,
    dead_letter: Option<&str>,
) -> Outcome {
    let mut backoff = Backoff::new(d.settings.retry_min, d.settings.retry_max);
    loop {
        match d
            .store
            .ack(&d.instance, room, id, d.settings.lease, dead_letter)
            .await
        {
            Ok(true) => break,
            Ok(false) => {
                warn!(room = %room, id, "webhooks: lease lost mid-delivery; the new holder resends");
                return Outcome::Leave;
            }
            Err(e) => {
                warn!(room = %room, cause = %e, "webhooks: ack failed; retrying");
                if !pause(d, room, backoff.next_delay()).await {
                    return Outcome::Leave;
                }
            }
        }
    }
    match delivered {
        Some(p) => {
            d.metrics.webhooks.delivered();
            if let Some(ts) = p.ts_ms {
                let lag = crate::wire::clock::unix_millis().saturating_sub(ts);
                d.metrics.webhooks.lag.record(lag as f64 / 1000.0);
            }
        }
        None => d.metrics.webhooks.dead_lettered(),
    }
    Outcome::Done
}

/// Waits `wait`, renewing the lease every third of its lifetime and once more at the end (so
/// that the next attempt starts on a fresh lease); false when the node stops or the lease is
/// lost meanwhile.
async fn pause(d: &Dispatcher, room: &RoomName, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    let step = d.settings.lease / 3;
    loop {
        let now = Instant::now();
        tokio::select! {
            _ = d.stop.cancelled() => return false,
            _ = tokio::time::sleep(until.saturating_duration_since(now).min(step)) => {}
        }
        match d.store.claim(&d.instance, room, d.settings.lease, 0).await {
            Ok(c) if !c.held => return false,
            // A failing Redis: the lease cannot be renewed, nor taken by anyone else.
            _ => {}
        }
        if Instant::now() >= until {
            return true;
        }
    }
}
