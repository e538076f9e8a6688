//! The live line: every `--live-interval` one compact line on stderr — members connected out of
//! the target, messages per second sent and received, p50/p99 end to end so far, and lost so
//! far — and, every second, the connected count into the timeline for the report.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::plan::unix_micros;
use crate::shared::Shared;
use crate::stats::Stats;

/// Messages published at least this long ago and not received count as "lost so far".
const IN_FLIGHT: u64 = 2;

/// Figures of one live line.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Seconds since the start.
    pub elapsed_s: u64,
    /// Members connected.
    pub connected: i64,
    /// Members planned.
    pub target: usize,
    /// Publishes per second since the last line.
    pub sent_per_s: f64,
    /// Receipts per second since the last line.
    pub received_per_s: f64,
    /// p50 end to end so far, µs (`None` before any sample).
    pub p50_us: Option<u64>,
    /// p99 so far.
    pub p99_us: Option<u64>,
    /// Lost so far (`None` in a sharded run, where only the merge knows).
    pub lost: Option<u64>,
}

impl std::fmt::Display for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<u64>| match v {
            Some(us) => format!("{:.1}ms", us as f64 / 1e3),
            None => "-".into(),
        };
        write!(
            f,
            "[{:>4}s] members {}/{} | sent {:.0}/s received {:.0}/s | p50 {} p99 {} | lost {}",
            self.elapsed_s,
            self.connected,
            self.target,
            self.sent_per_s,
            self.received_per_s,
            ms(self.p50_us),
            ms(self.p99_us),
            self.lost
                .map(|l| l.to_string())
                .unwrap_or_else(|| "n/a (sharded: see the merge)".into())
        )
    }
}

/// Lost so far: window messages published up to `IN_FLIGHT` seconds ago, times the members
/// from the start of their room, minus what those members received.
fn lost_so_far(shared: &Shared, now_s: u64) -> u64 {
    let mut expected = 0u64;
    for room in &shared.plan.rooms {
        let members = Stats::get(&room.members_from_start);
        if members == 0 {
            continue;
        }
        let published = room.published.lock().unwrap_or_else(|p| p.into_inner());
        expected += published
            .range(..now_s.saturating_sub(IN_FLIGHT))
            .map(|(_, n)| n * members)
            .sum::<u64>();
    }
    let delivered = shared
        .stats
        .timeline
        .delivered_before(now_s.saturating_sub(IN_FLIGHT));
    expected.saturating_sub(delivered)
}

/// Runs until the process ends: samples every second, prints every `interval` (never when 0).
pub fn spawn(shared: Arc<Shared>, population: usize) {
    let interval = shared.opts.live_interval;
    tokio::spawn(async move {
        let started = Instant::now();
        let mut last = (Instant::now(), 0u64, 0u64);
        let mut next_print = Instant::now() + interval;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let stats = &shared.stats;
            let connected = stats.connected.load(Ordering::Relaxed);
            let now_s = unix_micros() / 1_000_000;
            stats.timeline.with(0, now_s, |s| {
                s.connected = s.connected.max(connected.max(0) as u64)
            });
            if interval.is_zero() || Instant::now() < next_print {
                continue;
            }
            next_print += interval;
            let (sent, received) = (
                Stats::get(&stats.sent_total),
                Stats::get(&stats.received_total),
            );
            let dt = last.0.elapsed().as_secs_f64().max(1e-3);
            let e2e = stats.e2e.merged();
            let line = Line {
                elapsed_s: started.elapsed().as_secs(),
                connected,
                target: population,
                sent_per_s: (sent - last.1) as f64 / dt,
                received_per_s: (received - last.2) as f64 / dt,
                p50_us: (!e2e.is_empty()).then(|| e2e.value_at_quantile(0.5)),
                p99_us: (!e2e.is_empty()).then(|| e2e.value_at_quantile(0.99)),
                lost: (!shared.plan.shard.is_split()).then(|| lost_so_far(&shared, now_s)),
            };
            last = (Instant::now(), sent, received);
            eprintln!("{line}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_at_a_glance() {
        let l = Line {
            elapsed_s: 12,
            connected: 1600,
            target: 1602,
            sent_per_s: 610.4,
            received_per_s: 24400.0,
            p50_us: Some(3_100),
            p99_us: Some(41_000),
            lost: Some(0),
        };
        assert_eq!(
            l.to_string(),
            "[  12s] members 1600/1602 | sent 610/s received 24400/s | p50 3.1ms p99 41.0ms | lost 0"
        );
        let l = Line {
            p50_us: None,
            lost: None,
            ..l
        };
        assert!(l.to_string().contains("p50 - "));
        assert!(l.to_string().contains("lost n/a"));
    }
}
