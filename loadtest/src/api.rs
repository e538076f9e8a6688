//! The HTTP API as a second publishing path (`--api-publish-rate`): one open-loop publisher per
//! room (this shard's rooms), posting the same stamped data as the members do to
//! `POST /api/rooms/ROOM/messages` with the API key and an `Idempotency-Key`, so its messages go
//! through the same loss ledger. A failed request is tried once more with the same key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::plan::{unix_micros, Cadence, Window};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::ws::{self, Stamp};

/// Longest one HTTP publish may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the HTTP client: the same TLS configuration as the WebSockets, and every target's
/// host pinned to the address it resolved to (so `--resolve` holds here too).
pub fn client(shared: &Shared, tls: rustls::ClientConfig) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(64)
        // Below the gateway's keep-alive deadline (--http-keepalive-timeout, 30 s by default):
        // a pooled connection the server already closed would fail the next publish.
        .pool_idle_timeout(std::time::Duration::from_secs(20));
    for t in &shared.plan.targets {
        b = b.resolve(&t.host, t.addr);
    }
    Ok(b.build()?)
}

/// Starts the publishers of this shard's rooms; each yields how many of its scheduled messages
/// it never got accepted.
pub fn spawn_publishers(
    shared: &Arc<Shared>,
    client: reqwest::Client,
    window: Window,
) -> Vec<JoinHandle<u64>> {
    let rate = shared.opts.api_publish_rate;
    if rate <= 0.0 {
        return Vec::new();
    }
    shared
        .plan
        .api_rooms()
        .map(|room| {
            let cadence = Cadence {
                rate,
                phase: Duration::from_secs_f64(fastrand::f64() / rate),
            };
            tokio::spawn(run(shared.clone(), client.clone(), window, room, cadence))
        })
        .collect()
}

async fn run(
    shared: Arc<Shared>,
    client: reqwest::Client,
    w: Window,
    room: usize,
    cadence: Cadence,
) -> u64 {
    let publisher = shared.plan.api_publisher(room);
    let scheduled = cadence.scheduled(w.measure());
    let name = &shared.plan.rooms[room].name;
    let stats = &shared.stats;
    let mut sent = 0;
    for k in 0..scheduled {
        let at = w.start + cadence.offset(k);
        tokio::time::sleep_until(at.into()).await;
        if Instant::now() > w.publish_until {
            break;
        }
        let stamp = Stamp {
            lt: shared.run_id,
            p: publisher,
            s: k,
            t: w.start_unix_us + cadence.offset(k).as_micros() as u64,
        };
        let target = &shared.plan.targets[room % shared.plan.targets.len()];
        let url = format!("{}/api/rooms/{name}/messages?from=api", target.http_url());
        let body = ws::stamp_data(stamp, &shared.filler);
        let key = ws::publish_key(stamp);
        let lag = Instant::now().saturating_duration_since(at);
        let mut outcome = Err(String::new());
        for attempt in 0..2 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outcome = post(&client, &url, &body, &key, shared.opts.api_key.as_deref()).await;
            match &outcome {
                Ok(()) => break,
                // A refusal that a retry cannot change.
                Err(cause) if cause.starts_with("http_4") => break,
                Err(_) => {}
            }
        }
        match outcome {
            Ok(()) => {
                sent += 1;
                shared.plan.count_published(room, stamp.t / 1_000_000);
                Stats::add(&stats.published, 1);
                Stats::add(&stats.api_published, 1);
                Stats::add(&stats.sent_total, 1);
                stats
                    .timeline
                    .with(room, unix_micros() / 1_000_000, |s| s.sent += 1);
                stats.publish_lag.record(room, lag.as_micros() as u64);
            }
            Err(cause) => {
                log::debug!("HTTP publish to {name}: {cause}");
                stats.api_errors.add(&cause);
            }
        }
    }
    scheduled - sent
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &str,
    key: &str,
    api_key: Option<&str>,
) -> Result<(), String> {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string());
    if let Some(k) = api_key {
        req = req.bearer_auth(k);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("http_{}", resp.status().as_u16())),
        Err(e) if e.is_timeout() => Err("timeout".into()),
        Err(e) if e.is_connect() => Err("connect".into()),
        Err(_) => Err("io".into()),
    }
}
