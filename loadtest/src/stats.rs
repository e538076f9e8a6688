//! Process-wide measurements: latency histograms (HDR, microseconds) and counters, written by every
//! connection's task and read once at the end by `summary.rs`. Goose keeps its own rows; these are
//! the exact figures behind the JSON summary and the pass/fail rules.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram holds (one hour, in µs); larger values are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// Shards per histogram: connections record into `shard % SHARDS`, so two cores rarely contend on
/// one lock. A std `Mutex` is right: the critical section is one array increment, never an await.
const SHARDS: usize = 16;

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid")
}

/// A latency histogram in microseconds, sharded for concurrent writers.
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl Recorder {
    /// Records `micros` (at least 1) into the shard picked by `key`.
    pub fn record(&self, key: usize, micros: u64) {
        let mut h = self.shards[key % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        h.saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// Percentiles of a histogram, microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Mean, rounded.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p99_9: u64,
    /// Largest (exact up to the histogram's 3 significant digits).
    pub max: u64,
}

impl LatencySummary {
    /// Summarizes `h`; all zero when it is empty.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min: h.min(),
            mean: h.mean().round() as u64,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A counter map with a lock (closes by code, connect errors by cause); written only on rare
/// events, so one lock is plenty.
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    /// Adds one under `key`.
    pub fn add(&self, key: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(key.to_string()).or_default() += 1;
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The sum of the counts.
    pub fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
}

/// Everything the connections measure. One per process, shared by `Arc`.
#[derive(Default)]
pub struct Stats {
    /// Intended send time (in the payload) → received, for every message of the window.
    pub e2e: Recorder,
    /// Gateway publish stamp (`ts`) → received: the fan-out part of `e2e`.
    pub fanout: Recorder,
    /// Intended send time → the frame was written: how far publishers ran behind schedule.
    pub publish_lag: Recorder,
    /// TCP connect + HTTP upgrade.
    pub connect: Recorder,
    /// TCP connect → `welcome` received: the whole join.
    pub join: Recorder,
    /// Oversleep of the generator's 10 ms probe timer: its own scheduling delay.
    pub timer_lag: Recorder,

    /// Connection attempts, first ones and reconnects.
    pub connect_attempts: AtomicU64,
    /// Attempts that got their welcome.
    pub joined: AtomicU64,
    /// Attempts after an unexpected close.
    pub reconnects: AtomicU64,
    /// Failed attempts by cause (`refused`, `http_503_capacity`, `welcome_timeout`, …).
    pub connect_errors: Tally,
    /// Closes the load tester did not ask for, by close code (`1006` when the socket just ended).
    pub closes: Tally,
    /// `error` events from the gateway, by code.
    pub error_events: Tally,

    /// Window messages written to a socket.
    pub published: AtomicU64,
    /// Scheduled window messages never written (publisher disconnected or too far behind).
    pub unsent: AtomicU64,
    /// Failed writes of a publish.
    pub publish_write_errors: AtomicU64,

    /// Distinct window messages received by members of the window (see `plan.rs`).
    pub delivered: AtomicU64,
    /// Window messages received by members that joined after the window started.
    pub delivered_late_members: AtomicU64,
    /// Receipts by members of the window that were duplicates.
    pub duplicates: AtomicU64,
    /// Receipts by members of the window that arrived after a higher number of the same publisher.
    pub reordered: AtomicU64,
    /// Holes opened in members' sequences.
    pub gaps: AtomicU64,
    /// Holes never filled by the end.
    pub open_holes: AtomicU64,
    /// Window messages that arrived after the drain ended (not counted as delivered).
    pub after_drain: AtomicU64,
    /// `message` events that were not the load tester's (another client in the room).
    pub foreign: AtomicU64,
    /// Messages received before the welcome (allowed by the protocol; counted for information).
    pub before_welcome: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let r = Recorder::default();
        for v in 1..=1000u64 {
            r.record(v as usize, v * 1000); // 1 ms … 1000 ms, spread over shards
        }
        let s = LatencySummary::of(&r.merged());
        assert_eq!(s.count, 1000);
        let near = |a: u64, b: u64| a.abs_diff(b) <= b / 500; // 3 significant digits
        assert!(near(s.min, 1_000), "{s:?}");
        assert!(near(s.p50, 500_000), "{s:?}");
        assert!(near(s.p90, 900_000), "{s:?}");
        assert!(near(s.p99, 990_000), "{s:?}");
        assert!(near(s.p99_9, 999_000), "{s:?}");
        assert!(near(s.max, 1_000_000), "{s:?}");
        assert!(near(s.mean, 500_500), "{s:?}");
    }

    #[test]
    fn empty_and_clamped() {
        assert_eq!(
            LatencySummary::of(&Recorder::default().merged()),
            LatencySummary::default()
        );
        let r = Recorder::default();
        r.record(0, 0);
        r.record(0, u64::MAX);
        let s = LatencySummary::of(&r.merged());
        assert_eq!(s.count, 2);
        assert_eq!(s.min, 1);
        assert!(s.max >= MAX_MICROS);
    }

    #[test]
    fn tallies() {
        let t = Tally::default();
        t.add("1012");
        t.add("1012");
        t.add("4000");
        assert_eq!(t.total(), 3);
        assert_eq!(t.snapshot()["1012"], 2);
    }
}
