//! The compact result of a run: what scripts and CI read (`--summary-file`), what the rules judge,
//! and the human-readable block printed after goose's own report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::probe;
use crate::rules::Verdict;
use crate::stats::{LatencySummary, Stats};
use crate::Shared;

/// The population and phases of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunInfo {
    /// Random id stamped in every message.
    pub run_id: u32,
    /// Room groups as given.
    pub rooms_spec: Vec<String>,
    /// Rooms.
    pub rooms: usize,
    /// Hosts.
    pub hosts: usize,
    /// Viewers.
    pub viewers: usize,
    /// Target URLs.
    pub targets: Vec<String>,
    /// Source addresses bound.
    pub source_addresses: usize,
    /// Seconds of the measured window.
    pub measure_s: f64,
    /// Seconds of the drain.
    pub drain_s: f64,
    /// Whether the window and drain ran to their end (not cut short by goose or a watchdog).
    pub complete: bool,
}

/// Connection figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Connections {
    /// Attempts, first ones and reconnects.
    pub attempts: u64,
    /// Attempts that got their welcome.
    pub joined: u64,
    /// Attempts after an unexpected close or a failed attempt.
    pub reconnects: u64,
    /// Failed attempts.
    pub errors: u64,
    /// Failed attempts by cause.
    pub errors_by_cause: BTreeMap<String, u64>,
    /// Closes the load tester did not ask for.
    pub unexpected_closes: u64,
    /// Those closes by code (1006: ended without a close frame).
    pub closes_by_code: BTreeMap<String, u64>,
    /// Members in their room when the window started.
    pub members_from_start: u64,
    /// TCP connect + upgrade, µs.
    pub connect_us: LatencySummary,
    /// TCP connect → welcome, µs.
    pub join_us: LatencySummary,
}

/// Message figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Messages {
    /// Window messages written by publishers.
    pub published: u64,
    /// Scheduled window messages never written.
    pub unsent: u64,
    /// `error` events plus failed writes.
    pub publish_errors: u64,
    /// `error` events by code.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Σ rooms: published × members from the start.
    pub expected: u64,
    /// Distinct window messages received by members from the start.
    pub delivered: u64,
    /// expected − delivered.
    pub lost: u64,
    /// delivered / window seconds.
    pub delivered_per_sec: f64,
    /// Receipts of a message already received.
    pub duplicates: u64,
    /// Receipts after a higher number of the same publisher.
    pub reordered: u64,
    /// Holes that opened in a sequence.
    pub gaps: u64,
    /// Holes that never filled.
    pub open_holes: u64,
    /// Rooms where some member from the start missed something.
    pub rooms_with_loss: u64,
    /// Window messages received by members that joined late (not in `expected`).
    pub late_member_deliveries: u64,
    /// Window messages that arrived after the drain (counted as lost).
    pub after_drain: u64,
    /// Messages received before the welcome (allowed by the protocol).
    pub before_welcome: u64,
    /// `message` events that were not ours.
    pub foreign: u64,
}

impl Messages {
    /// `lost` as a percentage of `expected` (0 when nothing was expected).
    pub fn loss_percent(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 * 100.0 / self.expected as f64
        }
    }
}

/// The generator's own health.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Generator {
    /// Oversleep of a 10 ms timer during the window and drain, µs.
    pub timer_lag_us: LatencySummary,
    /// CPU over the window and drain, per cent of one core.
    pub cpu_percent: Option<f64>,
    /// Cores available to the process.
    pub cores: usize,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: Option<f64>,
    /// The machine's 1-minute load average at the end (what else competed for the cores).
    pub load_average: Option<f64>,
    /// Whether the generator itself limited the run; then latency figures are not the gateway's.
    pub bottleneck: bool,
    /// Why it is considered the bottleneck.
    pub reasons: Vec<String>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Population and phases.
    pub run: RunInfo,
    /// Connection figures.
    pub connections: Connections,
    /// Message figures.
    pub messages: Messages,
    /// End to end: intended send time (payload) → received, µs.
    pub latency_us: LatencySummary,
    /// Gateway publish stamp → received, µs (the fan-out part).
    pub fanout_us: LatencySummary,
    /// Intended send time → written, µs (publishers behind schedule).
    pub publish_lag_us: LatencySummary,
    /// The generator's health.
    pub generator: Generator,
    /// Verdicts of the `--expect` rules.
    pub rules: Vec<Verdict>,
    /// Whether every rule held (true without rules).
    pub pass: bool,
    /// The latency histogram, for percentiles the fixed fields do not hold.
    #[serde(skip)]
    pub latency_hist: Option<Histogram<u64>>,
}

impl Summary {
    /// Reads the totals once every user has left.
    pub fn collect(shared: &Shared) -> Summary {
        let s: &Stats = &shared.stats;
        let opts = &shared.opts;
        let window = shared.schedule.window();
        let measure_s = window.map(|w| w.measure().as_secs_f64()).unwrap_or(0.0);

        let mut expected = 0u64;
        let mut rooms_with_loss = 0u64;
        let mut members_from_start = 0u64;
        for room in &shared.plan.rooms {
            let published = Stats::get(&room.published);
            let members = Stats::get(&room.members_from_start);
            members_from_start += members;
            let room_expected = published * members;
            expected += room_expected;
            if Stats::get(&room.delivered) < room_expected {
                rooms_with_loss += 1;
            }
        }
        let delivered = Stats::get(&s.delivered);
        let errors_by_code = s.error_events.snapshot();
        let latency = s.e2e.merged();
        let timer_lag = LatencySummary::of(&s.timer_lag.merged());
        let publish_lag = LatencySummary::of(&s.publish_lag.merged());
        let usage = *shared.usage.lock().unwrap_or_else(|p| p.into_inner());
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);

        let mut reasons = Vec::new();
        let max_lag = opts.max_generator_lag.as_micros() as u64;
        if timer_lag.p99 > max_lag {
            reasons.push(format!(
                "its timers fired {:.1} ms late (p99): its process is starved of CPU (by its own load, or by other processes: see load_average)",
                timer_lag.p99 as f64 / 1e3
            ));
        }
        if publish_lag.p99 > max_lag {
            reasons.push(format!(
                "publishers wrote {:.1} ms behind schedule (p99): generator overloaded, or the gateway pushed back on writes",
                publish_lag.p99 as f64 / 1e3
            ));
        }
        if let Some(u) = usage {
            if u.cpu_percent > 90.0 * cores as f64 {
                reasons.push(format!(
                    "it used {:.0}% CPU of {cores} cores",
                    u.cpu_percent
                ));
            }
        }

        let closes_by_code = s.closes.snapshot();
        let errors_by_cause = s.connect_errors.snapshot();
        Summary {
            run: RunInfo {
                run_id: shared.run_id,
                rooms_spec: opts.groups.iter().map(|g| g.to_string()).collect(),
                rooms: shared.plan.rooms.len(),
                hosts: shared.plan.host_count(),
                viewers: shared.plan.viewer_count(),
                targets: shared.plan.targets.iter().map(|t| t.0.clone()).collect(),
                source_addresses: shared.plan.binds.len(),
                measure_s,
                drain_s: opts.drain.as_secs_f64(),
                complete: shared
                    .schedule
                    .complete
                    .load(std::sync::atomic::Ordering::Acquire),
            },
            connections: Connections {
                attempts: Stats::get(&s.connect_attempts),
                joined: Stats::get(&s.joined),
                reconnects: Stats::get(&s.reconnects),
                errors: errors_by_cause.values().sum(),
                errors_by_cause,
                unexpected_closes: closes_by_code.values().sum(),
                closes_by_code,
                members_from_start,
                connect_us: LatencySummary::of(&s.connect.merged()),
                join_us: LatencySummary::of(&s.join.merged()),
            },
            messages: Messages {
                published: Stats::get(&s.published),
                unsent: Stats::get(&s.unsent),
                publish_errors: errors_by_code.values().sum::<u64>()
                    + Stats::get(&s.publish_write_errors),
                errors_by_code,
                expected,
                delivered,
                lost: expected.saturating_sub(delivered),
                delivered_per_sec: if measure_s > 0.0 {
                    delivered as f64 / measure_s
                } else {
                    0.0
                },
                duplicates: Stats::get(&s.duplicates),
                reordered: Stats::get(&s.reordered),
                gaps: Stats::get(&s.gaps),
                open_holes: Stats::get(&s.open_holes),
                rooms_with_loss,
                late_member_deliveries: Stats::get(&s.delivered_late_members),
                after_drain: Stats::get(&s.after_drain),
                before_welcome: Stats::get(&s.before_welcome),
                foreign: Stats::get(&s.foreign),
            },
            latency_us: LatencySummary::of(&latency),
            fanout_us: LatencySummary::of(&s.fanout.merged()),
            publish_lag_us: publish_lag,
            generator: Generator {
                timer_lag_us: timer_lag,
                cpu_percent: usage.map(|u| (u.cpu_percent * 10.0).round() / 10.0),
                cores,
                peak_rss_mib: probe::peak_rss_mib().map(|m| m.round()),
                load_average: probe::load_average(),
                bottleneck: !reasons.is_empty(),
                reasons,
            },
            rules: Vec::new(),
            pass: true,
            latency_hist: Some(latency),
        }
    }

    /// A latency percentile (per cent) in µs, from the full histogram when there is one.
    pub fn latency_percentile(&self, q: f64) -> Option<u64> {
        if let Some(h) = &self.latency_hist {
            return (!h.is_empty()).then(|| h.value_at_percentile(q));
        }
        let l = &self.latency_us;
        if l.count == 0 {
            return None;
        }
        Some(match q {
            q if q <= 50.0 => l.p50,
            q if q <= 90.0 => l.p90,
            q if q <= 99.0 => l.p99,
            q if q <= 99.9 => l.p99_9,
            _ => l.max,
        })
    }

    /// (connect errors + unexpected closes + publish errors) / (attempts + publishes), per cent.
    pub fn error_rate_percent(&self) -> f64 {
        let errors = self.connections.errors
            + self.connections.unexpected_closes
            + self.messages.publish_errors;
        let ops = self.connections.attempts + self.messages.published;
        if ops == 0 {
            0.0
        } else {
            errors as f64 * 100.0 / ops as f64
        }
    }

    /// Judges `rules`, plus the rules every judged run must meet: it ran to its end, and it
    /// expected something.
    pub fn judge(&mut self, rules: &[crate::rules::Rule]) {
        let mut verdicts: Vec<Verdict> = rules.iter().map(|r| r.judge(self)).collect();
        if !rules.is_empty() {
            verdicts.push(Verdict {
                rule: "complete".into(),
                observed: Some(f64::from(u8::from(self.run.complete))),
                pass: self.run.complete,
                note: (!self.run.complete).then(|| {
                    "the run stopped before its window and drain ended (goose --run-time, Ctrl-C or the watchdog)".to_string()
                }),
            });
            verdicts.push(Verdict {
                rule: "expected>0".into(),
                observed: Some(self.messages.expected as f64),
                pass: self.messages.expected > 0,
                note: (self.messages.expected == 0)
                    .then(|| "nothing was published to a member: nothing was measured".to_string()),
            });
        }
        if self.generator.bottleneck {
            for (v, r) in verdicts.iter_mut().zip(rules) {
                if r.is_latency() && !v.pass {
                    let note = v.note.take().unwrap_or_default();
                    v.note = Some(format!(
                        "{note}; the generator was the bottleneck, so this latency is not the gateway's"
                    ));
                }
            }
        }
        self.pass = verdicts.iter().all(|v| v.pass);
        self.rules = verdicts;
    }

    /// The block printed at the end of a run.
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1e3;
        let mut o = String::new();
        let r = &self.run;
        let c = &self.connections;
        let m = &self.messages;
        let l = &self.latency_us;
        let _ = writeln!(o, "=== LIVE ROOMS SUMMARY (run {:08x}) ===", r.run_id);
        let _ = writeln!(
            o,
            "rooms {} ({}), hosts {}, viewers {}; window {:.0}s + drain {:.0}s{}",
            r.rooms,
            r.rooms_spec.join(" "),
            r.hosts,
            r.viewers,
            r.measure_s,
            r.drain_s,
            if r.complete { "" } else { "  [INCOMPLETE]" }
        );
        let _ = writeln!(
            o,
            "connections: {} attempts, {} joined, {} errors {:?}, {} unexpected closes {:?}, {} members from the start",
            c.attempts, c.joined, c.errors, c.errors_by_cause, c.unexpected_closes, c.closes_by_code, c.members_from_start
        );
        let _ = writeln!(
            o,
            "  connect p50 {:.2} ms p99 {:.2} ms max {:.2} ms; join p50 {:.2} ms p99 {:.2} ms",
            ms(c.connect_us.p50),
            ms(c.connect_us.p99),
            ms(c.connect_us.max),
            ms(c.join_us.p50),
            ms(c.join_us.p99)
        );
        let _ = writeln!(
            o,
            "messages: published {} (unsent {}, errors {}), expected {}, delivered {} ({:.0}/s), lost {} ({:.4}%)",
            m.published, m.unsent, m.publish_errors, m.expected, m.delivered, m.delivered_per_sec, m.lost, m.loss_percent()
        );
        let _ = writeln!(
            o,
            "  duplicates {}, reordered {}, gaps {} (open {}), rooms with loss {}, after drain {}, late members {}",
            m.duplicates, m.reordered, m.gaps, m.open_holes, m.rooms_with_loss, m.after_drain, m.late_member_deliveries
        );
        let _ = writeln!(
            o,
            "latency end to end: p50 {:.2} ms, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2} ({} samples)",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p99_9),
            ms(l.max),
            l.count
        );
        let _ = writeln!(
            o,
            "  fan-out (gateway ts → received): p50 {:.2} ms, p99 {:.2}; publish lag p99 {:.2} ms, max {:.2}",
            ms(self.fanout_us.p50),
            ms(self.fanout_us.p99),
            ms(self.publish_lag_us.p99),
            ms(self.publish_lag_us.max)
        );
        let g = &self.generator;
        let _ = writeln!(
            o,
            "generator: timer lag p99 {:.2} ms, max {:.2} ms; CPU {}% of {} cores (load average {}); peak RSS {} MiB{}",
            ms(g.timer_lag_us.p99),
            ms(g.timer_lag_us.max),
            g.cpu_percent.map(|c| format!("{c:.0}")).unwrap_or("?".into()),
            g.cores,
            g.load_average
                .map(|c| format!("{c:.1}"))
                .unwrap_or("?".into()),
            g.peak_rss_mib.map(|c| format!("{c:.0}")).unwrap_or("?".into()),
            if g.bottleneck { "  [BOTTLENECK]" } else { "" }
        );
        for reason in &g.reasons {
            let _ = writeln!(o, "  WARNING: the generator is the bottleneck: {reason}");
        }
        for v in &self.rules {
            let _ = writeln!(
                o,
                "rule {:<24} {}{}",
                v.rule,
                if v.pass { "PASS" } else { "FAIL" },
                v.note
                    .as_ref()
                    .map(|n| format!(" — {n}"))
                    .unwrap_or_default()
            );
        }
        if !self.rules.is_empty() {
            let _ = writeln!(o, "result: {}", if self.pass { "PASS" } else { "FAIL" });
        }
        o
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 1000 expected, 998 delivered, latency 1…100 ms uniformly.
    pub(crate) fn sample_summary() -> Summary {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for ms in 1..=100u64 {
            h.record(ms * 1000).unwrap();
        }
        Summary {
            run: RunInfo {
                complete: true,
                ..RunInfo::default()
            },
            connections: Connections {
                attempts: 100,
                joined: 99,
                errors: 1,
                ..Connections::default()
            },
            messages: Messages {
                published: 100,
                expected: 1000,
                delivered: 998,
                lost: 2,
                ..Messages::default()
            },
            latency_us: LatencySummary::of(&h),
            latency_hist: Some(h),
            ..Summary::default()
        }
    }

    #[test]
    fn loss_and_error_rate() {
        let s = sample_summary();
        assert!((s.messages.loss_percent() - 0.2).abs() < 1e-9);
        assert!((s.error_rate_percent() - 0.5).abs() < 1e-9, "1 of 200");
        assert_eq!(Messages::default().loss_percent(), 0.0);
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let s = sample_summary();
        let p999 = s.latency_percentile(99.9).unwrap();
        assert!((99_900..=100_100).contains(&p999), "{p999}");
        let mut fixed = sample_summary();
        fixed.latency_hist = None;
        assert_eq!(fixed.latency_percentile(99.0), Some(fixed.latency_us.p99));
    }

    #[test]
    fn judged_runs_must_complete_and_measure_something() {
        let rules: Vec<crate::rules::Rule> = vec!["lost<=2".parse().unwrap()];
        let mut s = sample_summary();
        s.judge(&rules);
        assert!(s.pass, "{:?}", s.rules);
        let mut s = sample_summary();
        s.run.complete = false;
        s.judge(&rules);
        assert!(!s.pass);
        let mut s = sample_summary();
        s.messages = Messages::default();
        s.judge(&rules);
        assert!(!s.pass, "lost 0 of 0 expected is not a pass");
        let mut s = sample_summary();
        s.judge(&[]);
        assert!(s.pass && s.rules.is_empty(), "no rules, no verdicts");
    }

    #[test]
    fn a_lagging_generator_is_named_in_latency_failures() {
        let mut s = sample_summary();
        s.generator.bottleneck = true;
        s.judge(&["p99<1ms".parse().unwrap()]);
        assert!(!s.pass);
        assert!(s.rules[0].note.as_ref().unwrap().contains("generator"));
    }
}
