//! The generator's books must not grow with the length of a run: the loss/order ledger and the
//! per-second timeline are fed millions of deliveries here while the process's resident memory
//! is watched. (A 20-minute soak once grew ~150 bytes per delivery.)

use std::sync::Mutex;

use loadtest::ledger::{Arrival, Ledger};
use loadtest::probe::rss_mib;
use loadtest::stats::Timeline;

/// One measurement at a time: resident memory is the process's.
static ONE: Mutex<()> = Mutex::new(());

/// Resident memory now, KiB (unsafe code is forbidden here, so no counting allocator: the
/// process's own figure, as the generator reports it).
fn rss_kib() -> i64 {
    (rss_mib().expect("linux /proc") * 1024.0) as i64
}

#[test]
fn the_ledger_stays_bounded_over_millions_of_deliveries() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    const PUBLISHERS: u32 = 20;
    const PER_PUBLISHER: u64 = 300_000; // 6 000 000 arrivals
    let mut ledger = Ledger::new(true);
    // Warm up: every publisher heard once, with a hole, so every track has its ring.
    for p in 0..PUBLISHERS {
        ledger.record(p, 1);
    }
    let base = rss_kib();
    let mut reordered = 0;
    for s in 2..PER_PUBLISHER {
        for p in 0..PUBLISHERS {
            // 10 % lost for good, 10 % late by a few numbers, the rest in order.
            match s % 10 {
                3 => {}
                7 => {}
                9 => {
                    ledger.record(p, s);
                    if ledger.record(p, s - 2) == Arrival::Reordered {
                        reordered += 1;
                    }
                }
                _ => {
                    ledger.record(p, s);
                }
            }
        }
    }
    let grown = rss_kib() - base;
    // 600 000 holes: kept one by one, they would take several MiB.
    assert!(
        grown < 1024,
        "the ledger grew {grown} KiB over 6 000 000 arrivals"
    );
    let c = ledger.counts();
    assert_eq!(reordered, c.reordered);
    assert!(c.unique > 4_700_000, "{c:?}");
    // Holes: 0 of every publisher, and one in ten for good.
    let lost = u64::from(PUBLISHERS) * (1 + (PER_PUBLISHER - 3) / 10 + 1);
    assert!(
        ledger.open_holes().abs_diff(lost) <= u64::from(PUBLISHERS),
        "{} vs {lost}",
        ledger.open_holes()
    );
}

#[test]
fn the_timeline_costs_a_few_kib_per_second_whatever_the_rate() {
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let timeline = Timeline::default();
    const SECONDS: u64 = 120;
    const PER_SECOND: u64 = 20_000; // 2 400 000 deliveries
    let base = rss_kib();
    for sec in 0..SECONDS {
        for i in 0..PER_SECOND {
            // As the connections do: 16-way sharded by member, latencies 1–80 ms.
            let key = (i % 1_000) as usize;
            let us = 1_000 + (i * 7_919) % 79_000;
            timeline.with(key, 1_000_000 + sec, |s| {
                s.received += 1;
                s.delivered += 1;
                s.record_latency(us);
            });
        }
    }
    let per_second = (rss_kib() - base) / SECONDS as i64;
    // Kept per shard at three digits, a second cost ~3 MiB (~150 bytes per delivery here).
    assert!(
        per_second < 64,
        "the timeline costs {per_second} KiB per second of run"
    );
    let merged = timeline.merged();
    assert_eq!(merged.len() as u64, SECONDS);
    assert!(merged
        .values()
        .all(|s| s.received == PER_SECOND && s.latency.len() == PER_SECOND));
}
