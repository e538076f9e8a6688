//! The result of a run as plain data: what scripts and CI read (`--summary-file`, schema in
//! `docs/loadtest.md`, versioned by [`SCHEMA_VERSION`]), what `loadtest merge` adds up from
//! several generators, what the rules judge (through [`Observations`]), and the block printed at
//! the end. Everything derived (expected, lost, percentiles) is computed from the raw parts —
//! rooms' ledgers and histograms — by [`Summary::derive`], so one generator's summary and a merge
//! of shards are computed the same way.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::rules::{self, Observations, Rule, Verdict};
use crate::spec::Shard;
use crate::stats::{hist_b64, new_histogram, LatencySummary};

/// The schema version of the JSON summary; bumped when a field changes meaning or goes away
/// (adding a field does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

/// The population and phases of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunInfo {
    /// Id stamped in every message (shared by the generators of one distributed run).
    pub run_id: u32,
    /// Room groups as given.
    pub rooms_spec: Vec<String>,
    /// Rooms (all shards').
    pub rooms: usize,
    /// Hosts this summary covers.
    pub hosts: usize,
    /// Viewers this summary covers.
    pub viewers: usize,
    /// Target URLs.
    pub targets: Vec<String>,
    /// Source addresses bound.
    pub source_addresses: usize,
    /// Seconds of the measured window.
    pub measure_s: f64,
    /// Seconds of the drain.
    pub drain_s: f64,
    /// Window start, unix microseconds.
    pub window_start_unix_us: u64,
    /// Whether the window and drain ran to their end (every generator's, when merged).
    pub complete: bool,
    /// Which share of a distributed run (`0/1` for a single generator).
    pub shard: Shard,
    /// Shards merged into this summary (1 for one generator).
    pub generators: usize,
}

/// Connection figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// TCP connect + TLS + upgrade, µs.
    pub connect_us: LatencySummary,
    /// TCP connect → welcome, µs.
    pub join_us: LatencySummary,
}

/// Message figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Messages {
    /// Window messages written by publishers (WebSocket and HTTP API).
    pub published: u64,
    /// Of those, published through the HTTP API.
    pub api_published: u64,
    /// Scheduled window messages never written.
    pub unsent: u64,
    /// `error` events, failed writes and failed HTTP publishes.
    pub publish_errors: u64,
    /// `error` events by code.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Failed HTTP API publishes by cause.
    pub api_errors_by_cause: BTreeMap<String, u64>,
    /// Σ rooms: published × members from the start.
    pub expected: u64,
    /// Distinct window messages received by members from the start, by any path.
    pub delivered: u64,
    /// expected − delivered: messages a member never received by any path.
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

/// Recovery across reconnects (docs/protocol.md, continuity). All zero against a gateway
/// without offsets, or with `--no-resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Continuity {
    /// Whether the gateway numbered messages (some welcome carried an offset).
    pub offsets_seen: bool,
    /// Reconnects that resumed with `since=` and were welcomed.
    pub resumes: u64,
    /// Of those, with `recovered: false`.
    pub incomplete: u64,
    /// Messages recovered from history after a resume.
    pub recovered: u64,
    /// Receipts of a room offset already received.
    pub offset_duplicates: u64,
    /// Receipts of a room offset after a higher one.
    pub offset_reorders: u64,
    /// Acks received for publishes with a key.
    pub acks: u64,
    /// Acks saying the cluster already had the message.
    pub ack_duplicates: u64,
    /// Publishes re-sent after a reconnect (no ack had come).
    pub resent: u64,
    /// Unacknowledged publishes forgotten (a member held too many).
    pub unacked_dropped: u64,
}

/// The generator's own health.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Generator {
    /// Oversleep of a 10 ms timer during the window and drain, µs.
    pub timer_lag_us: LatencySummary,
    /// CPU over the window and drain, per cent of one core (summed over generators).
    pub cpu_percent: Option<f64>,
    /// Cores available (summed over generators).
    pub cores: usize,
    /// Peak resident memory, MiB (the largest generator's).
    pub peak_rss_mib: Option<f64>,
    /// The machine's 1-minute load average at the end (the highest).
    pub load_average: Option<f64>,
    /// Whether a generator itself limited the run; then latency figures are not the gateway's.
    pub bottleneck: bool,
    /// Why.
    pub reasons: Vec<String>,
}

/// One room's ledger: the raw material of `expected` and `lost`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoomFigures {
    /// Room name.
    pub name: String,
    /// Members in the room when the window started (this generator's).
    pub members_from_start: u64,
    /// Distinct window messages those members received.
    pub delivered: u64,
    /// Window messages published into the room, by unix second.
    pub published: BTreeMap<u64, u64>,
}

/// The histograms behind every latency figure, in HdrHistogram interchange form.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histograms {
    /// End to end.
    #[serde(with = "hist_b64")]
    pub latency_us: Histogram<u64>,
    /// Gateway stamp → received.
    #[serde(with = "hist_b64")]
    pub fanout_us: Histogram<u64>,
    /// Publishers behind schedule.
    #[serde(with = "hist_b64")]
    pub publish_lag_us: Histogram<u64>,
    /// Connect.
    #[serde(with = "hist_b64")]
    pub connect_us: Histogram<u64>,
    /// Join.
    #[serde(with = "hist_b64")]
    pub join_us: Histogram<u64>,
    /// Generator timer lag (the generators' samples together).
    #[serde(with = "hist_b64")]
    pub timer_lag_us: Histogram<u64>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            latency_us: new_histogram(),
            fanout_us: new_histogram(),
            publish_lag_us: new_histogram(),
            connect_us: new_histogram(),
            join_us: new_histogram(),
            timer_lag_us: new_histogram(),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Unix second.
    pub t: u64,
    /// Members connected (summed over generators).
    pub connected: u64,
    /// Publishes written.
    pub sent: u64,
    /// Our messages received.
    pub received: u64,
    /// Window messages published in this second × members from the start.
    pub expected: u64,
    /// Of those, received by the end of the drain.
    pub delivered: u64,
    /// expected − delivered.
    pub lost: u64,
    /// Latency of the messages received in this second: p50, µs.
    pub p50_us: u64,
    /// p99, µs.
    pub p99_us: u64,
    /// max, µs.
    pub max_us: u64,
    /// The second's latency histogram.
    #[serde(with = "hist_b64")]
    pub latency: Histogram<u64>,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// Population and phases.
    pub run: RunInfo,
    /// Connection figures.
    pub connections: Connections,
    /// Message figures.
    pub messages: Messages,
    /// Recovery figures.
    pub continuity: Continuity,
    /// End to end: intended send time (payload) → received, µs.
    pub latency_us: LatencySummary,
    /// Gateway publish stamp → received, µs (the fan-out part).
    pub fanout_us: LatencySummary,
    /// Intended send time → written, µs (publishers behind schedule).
    pub publish_lag_us: LatencySummary,
    /// The generator's health.
    pub generator: Generator,
    /// The `--expect` rules as given (so that `merge` without `--expect` judges the same).
    pub expect: Vec<String>,
    /// Verdicts of the rules.
    pub rules: Vec<Verdict>,
    /// Whether every rule held (true without rules).
    pub pass: bool,
    /// The histograms, for merging and for percentiles the fixed fields do not hold.
    pub histograms: Histograms,
    /// Rooms' ledgers.
    pub rooms: Vec<RoomFigures>,
    /// Per-second series.
    pub timeline: Vec<Point>,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            version: SCHEMA_VERSION,
            run: RunInfo {
                generators: 1,
                ..RunInfo::default()
            },
            connections: Connections::default(),
            messages: Messages::default(),
            continuity: Continuity::default(),
            latency_us: LatencySummary::default(),
            fanout_us: LatencySummary::default(),
            publish_lag_us: LatencySummary::default(),
            generator: Generator::default(),
            expect: Vec::new(),
            rules: Vec::new(),
            pass: true,
            histograms: Histograms::default(),
            rooms: Vec::new(),
            timeline: Vec::new(),
        }
    }
}

fn add_maps(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Summary {
    /// Computes every derived figure from the rooms' ledgers, the histograms and the timeline.
    pub fn derive(&mut self) {
        let mut expected = 0u64;
        let mut delivered = 0u64;
        let mut rooms_with_loss = 0u64;
        let mut members = 0u64;
        let mut expected_at: BTreeMap<u64, u64> = BTreeMap::new();
        for r in &self.rooms {
            let published: u64 = r.published.values().sum();
            let room_expected = published * r.members_from_start;
            expected += room_expected;
            delivered += r.delivered;
            members += r.members_from_start;
            if r.delivered < room_expected {
                rooms_with_loss += 1;
            }
            for (sec, n) in &r.published {
                *expected_at.entry(*sec).or_default() += n * r.members_from_start;
            }
        }
        let m = &mut self.messages;
        m.expected = expected;
        m.delivered = delivered;
        m.lost = expected.saturating_sub(delivered);
        m.rooms_with_loss = rooms_with_loss;
        m.delivered_per_sec = if self.run.measure_s > 0.0 {
            delivered as f64 / self.run.measure_s
        } else {
            0.0
        };
        self.connections.members_from_start = members;
        self.connections.errors = self.connections.errors_by_cause.values().sum();
        self.connections.unexpected_closes = self.connections.closes_by_code.values().sum();

        let h = &self.histograms;
        self.latency_us = LatencySummary::of(&h.latency_us);
        self.fanout_us = LatencySummary::of(&h.fanout_us);
        self.publish_lag_us = LatencySummary::of(&h.publish_lag_us);
        self.connections.connect_us = LatencySummary::of(&h.connect_us);
        self.connections.join_us = LatencySummary::of(&h.join_us);
        self.generator.timer_lag_us = LatencySummary::of(&h.timer_lag_us);

        for sec in expected_at.keys() {
            if !self.timeline.iter().any(|p| p.t == *sec) {
                self.timeline.push(Point::empty(*sec));
            }
        }
        self.timeline.sort_by_key(|p| p.t);
        for p in &mut self.timeline {
            p.expected = expected_at.get(&p.t).copied().unwrap_or(0);
            p.lost = p.expected.saturating_sub(p.delivered);
            let l = LatencySummary::of(&p.latency);
            (p.p50_us, p.p99_us, p.max_us) = (l.p50, l.p99, l.max);
        }
    }

    /// The plain figures the rules judge.
    pub fn observations(&self) -> Observations {
        Observations {
            lost: self.messages.lost,
            expected: self.messages.expected,
            delivered: self.messages.delivered,
            connect_errors: self.connections.errors,
            connect_attempts: self.connections.attempts,
            closes: self.connections.unexpected_closes,
            publish_errors: self.messages.publish_errors,
            published: self.messages.published,
            unsent: self.messages.unsent,
            duplicates: self.messages.duplicates,
            reordered: self.messages.reordered,
            latency: self.histograms.latency_us.clone(),
            generator_lag_p99: self.generator.timer_lag_us.p99,
            complete: self.run.complete,
            bottleneck: self.generator.bottleneck,
        }
    }

    /// Judges `rules` (and the built-in ones) and records the verdicts.
    pub fn judge(&mut self, rules: &[Rule]) {
        let (verdicts, pass) = rules::judge_all(rules, &self.observations());
        self.expect = rules.iter().map(|r| r.text.clone()).collect();
        self.rules = verdicts;
        self.pass = pass;
    }

    /// Adds several generators' summaries into one, as if one generator had made all the load.
    /// Judge the result with [`Summary::judge`].
    pub fn merge(parts: Vec<Summary>) -> Result<Summary, String> {
        let first = parts.first().ok_or("nothing to merge")?;
        for p in &parts {
            if p.version != SCHEMA_VERSION {
                return Err(format!(
                    "summary version {} (this load tester reads {SCHEMA_VERSION})",
                    p.version
                ));
            }
            if p.run.run_id != first.run.run_id {
                return Err(format!(
                    "run ids differ ({:08x} and {:08x}): these are not shards of one run (give every generator the same --room-prefix)",
                    first.run.run_id, p.run.run_id
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for p in &parts {
            if p.run.shard.is_split() && !seen.insert(p.run.shard.index) {
                return Err(format!("shard {} appears twice", p.run.shard));
            }
        }
        let mut out = Summary {
            run: RunInfo {
                shard: Shard::default(),
                generators: 0,
                complete: true,
                measure_s: 0.0,
                ..first.run.clone()
            },
            expect: first.expect.clone(),
            ..Summary::default()
        };
        out.run.hosts = 0;
        out.run.viewers = 0;
        out.run.source_addresses = 0;
        let mut rooms: BTreeMap<String, RoomFigures> = BTreeMap::new();
        let mut timeline: BTreeMap<u64, Point> = BTreeMap::new();
        let mut reasons = Vec::new();
        let (mut cpu, mut cores) = (None::<f64>, 0usize);
        for p in parts {
            let r = &mut out.run;
            r.hosts += p.run.hosts;
            r.viewers += p.run.viewers;
            r.source_addresses += p.run.source_addresses;
            r.measure_s = r.measure_s.max(p.run.measure_s);
            r.drain_s = r.drain_s.max(p.run.drain_s);
            r.complete &= p.run.complete;
            r.generators += p.run.generators;
            for t in &p.run.targets {
                if !r.targets.contains(t) {
                    r.targets.push(t.clone());
                }
            }
            let c = &mut out.connections;
            c.attempts += p.connections.attempts;
            c.joined += p.connections.joined;
            c.reconnects += p.connections.reconnects;
            add_maps(&mut c.errors_by_cause, &p.connections.errors_by_cause);
            add_maps(&mut c.closes_by_code, &p.connections.closes_by_code);
            let m = &mut out.messages;
            let pm = &p.messages;
            m.published += pm.published;
            m.api_published += pm.api_published;
            m.unsent += pm.unsent;
            m.publish_errors += pm.publish_errors;
            add_maps(&mut m.errors_by_code, &pm.errors_by_code);
            add_maps(&mut m.api_errors_by_cause, &pm.api_errors_by_cause);
            m.duplicates += pm.duplicates;
            m.reordered += pm.reordered;
            m.gaps += pm.gaps;
            m.open_holes += pm.open_holes;
            m.late_member_deliveries += pm.late_member_deliveries;
            m.after_drain += pm.after_drain;
            m.before_welcome += pm.before_welcome;
            m.foreign += pm.foreign;
            let k = &mut out.continuity;
            let pk = &p.continuity;
            k.offsets_seen |= pk.offsets_seen;
            k.resumes += pk.resumes;
            k.incomplete += pk.incomplete;
            k.recovered += pk.recovered;
            k.offset_duplicates += pk.offset_duplicates;
            k.offset_reorders += pk.offset_reorders;
            k.acks += pk.acks;
            k.ack_duplicates += pk.ack_duplicates;
            k.resent += pk.resent;
            k.unacked_dropped += pk.unacked_dropped;
            let h = &mut out.histograms;
            let ph = &p.histograms;
            for (a, b) in [
                (&mut h.latency_us, &ph.latency_us),
                (&mut h.fanout_us, &ph.fanout_us),
                (&mut h.publish_lag_us, &ph.publish_lag_us),
                (&mut h.connect_us, &ph.connect_us),
                (&mut h.join_us, &ph.join_us),
                (&mut h.timer_lag_us, &ph.timer_lag_us),
            ] {
                a.add(b)
                    .map_err(|e| format!("histograms do not add: {e:?}"))?;
            }
            let g = &mut out.generator;
            let pg = &p.generator;
            if let Some(c) = pg.cpu_percent {
                cpu = Some(cpu.unwrap_or(0.0) + c);
            }
            cores += pg.cores;
            g.peak_rss_mib = max_opt(g.peak_rss_mib, pg.peak_rss_mib);
            g.load_average = max_opt(g.load_average, pg.load_average);
            g.bottleneck |= pg.bottleneck;
            for reason in &pg.reasons {
                reasons.push(if p.run.shard.is_split() {
                    format!("generator {}: {reason}", p.run.shard)
                } else {
                    reason.clone()
                });
            }
            for room in p.rooms {
                let e = rooms
                    .entry(room.name.clone())
                    .or_insert_with(|| RoomFigures {
                        name: room.name.clone(),
                        ..RoomFigures::default()
                    });
                e.members_from_start += room.members_from_start;
                e.delivered += room.delivered;
                for (sec, n) in room.published {
                    *e.published.entry(sec).or_default() += n;
                }
            }
            for pt in p.timeline {
                let e = timeline.entry(pt.t).or_insert_with(|| Point::empty(pt.t));
                e.connected += pt.connected;
                e.sent += pt.sent;
                e.received += pt.received;
                e.delivered += pt.delivered;
                e.latency
                    .add(&pt.latency)
                    .map_err(|e| format!("histograms do not add: {e:?}"))?;
            }
        }
        out.generator.cpu_percent = cpu.map(|c| (c * 10.0).round() / 10.0);
        out.generator.cores = cores;
        out.generator.reasons = reasons;
        out.rooms = rooms.into_values().collect();
        out.timeline = timeline.into_values().collect();
        out.derive();
        Ok(out)
    }

    /// The block printed at the end of a run: figures, then one line per rule.
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1e3;
        let mut o = String::new();
        let r = &self.run;
        let c = &self.connections;
        let m = &self.messages;
        let l = &self.latency_us;
        let _ = writeln!(
            o,
            "=== LIVE ROOMS SUMMARY (run {:08x}{}) ===",
            r.run_id,
            if r.shard.is_split() {
                format!(", shard {}", r.shard)
            } else if r.generators > 1 {
                format!(", {} generators merged", r.generators)
            } else {
                String::new()
            }
        );
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
            "messages: published {} (HTTP API {}, unsent {}, errors {}), expected {}, delivered {} ({:.0}/s), lost {} ({:.4}%)",
            m.published, m.api_published, m.unsent, m.publish_errors, m.expected, m.delivered, m.delivered_per_sec, m.lost, self.observations().loss_percent()
        );
        let _ = writeln!(
            o,
            "  duplicates {}, reordered {}, gaps {} (open {}), rooms with loss {}, after drain {}, late members {}",
            m.duplicates, m.reordered, m.gaps, m.open_holes, m.rooms_with_loss, m.after_drain, m.late_member_deliveries
        );
        if r.shard.is_split() {
            let _ = writeln!(
                o,
                "  (shard {}: its members also hear the other shards' publishers, so expected/lost are not the run's; judge the whole with `loadtest merge`)",
                r.shard
            );
        }
        let k = &self.continuity;
        if k.offsets_seen || k.resumes > 0 || k.acks > 0 {
            let _ = writeln!(
                o,
                "continuity: {} resumes ({} incomplete), {} recovered; offsets: {} duplicates, {} reorders; acks {} ({} duplicate), re-sent {}",
                k.resumes, k.incomplete, k.recovered, k.offset_duplicates, k.offset_reorders, k.acks, k.ack_duplicates, k.resent
            );
        }
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
            let _ = writeln!(o, "rule {}", rules::verdict_line(v));
        }
        if !self.rules.is_empty() {
            let _ = writeln!(o, "result: {}", if self.pass { "PASS" } else { "FAIL" });
        }
        o
    }
}

impl Point {
    fn empty(t: u64) -> Self {
        Self {
            t,
            connected: 0,
            sent: 0,
            received: 0,
            expected: 0,
            delivered: 0,
            lost: 0,
            p50_us: 0,
            p99_us: 0,
            max_us: 0,
            latency: new_histogram(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic pretend run: `rooms` rooms, each with 3 members from the start; publisher
    /// messages at seconds 100..110; member `i` of room `r` misses message (r + i) % 50 when
    /// `r` is odd; latencies spread by member. Built once as a whole and once as `n` shards,
    /// each shard holding every n-th member and every n-th publisher.
    pub(crate) fn pretend(rooms: usize, shard: Shard) -> Summary {
        let mut s = Summary {
            run: RunInfo {
                run_id: 7,
                rooms,
                measure_s: 10.0,
                drain_s: 2.0,
                complete: true,
                shard,
                generators: 1,
                ..RunInfo::default()
            },
            ..Summary::default()
        };
        let mut member = 0usize;
        let mut publisher = 0usize;
        for r in 0..rooms {
            let mut fig = RoomFigures {
                name: format!("room-{r}"),
                ..RoomFigures::default()
            };
            // Two publishers per room, 5 messages each per second.
            for _ in 0..2 {
                if shard.owns(publisher) {
                    s.run.hosts += 1;
                    for sec in 100..110u64 {
                        *fig.published.entry(sec).or_default() += 5;
                        s.messages.published += 5;
                    }
                }
                publisher += 1;
            }
            for i in 0..3 {
                if shard.owns(member) {
                    s.run.viewers += 1;
                    fig.members_from_start += 1;
                    s.connections.attempts += 1;
                    s.connections.joined += 1;
                    let missed = u64::from(r % 2 == 1);
                    fig.delivered += 100 - missed;
                    for k in 0..(100 - missed) {
                        let us = 1_000 + (member as u64 * 37 + k * 11) % 90_000;
                        s.histograms.latency_us.record(us).unwrap();
                        let sec = 100 + k / 10;
                        if let Some(p) = s.timeline.iter_mut().find(|p| p.t == sec) {
                            p.received += 1;
                            p.delivered += 1;
                            p.latency.record(us).unwrap();
                        } else {
                            let mut p = Point::empty(sec);
                            p.received = 1;
                            p.delivered = 1;
                            p.latency.record(us).unwrap();
                            s.timeline.push(p);
                        }
                    }
                    if i == 0 && r == 0 {
                        *s.connections
                            .errors_by_cause
                            .entry("refused".into())
                            .or_default() += 1;
                    }
                }
                member += 1;
            }
            s.rooms.push(fig);
        }
        if shard.owns(0) {
            s.histograms.timer_lag_us.record(500).unwrap();
        }
        s.generator.cores = 2;
        s.derive();
        s
    }

    #[test]
    fn derived_figures() {
        let s = pretend(4, Shard::default());
        assert_eq!(s.messages.expected, 4 * 100 * 3);
        assert_eq!(s.messages.lost, 2 * 3, "odd rooms: each member missed one");
        assert_eq!(s.messages.rooms_with_loss, 2);
        assert_eq!(s.connections.members_from_start, 12);
        assert_eq!(s.connections.errors, 1);
        let lost_over_time: u64 = s.timeline.iter().map(|p| p.lost).sum();
        assert_eq!(lost_over_time, 6);
        assert_eq!(s.latency_us.count, 1200 - 6);
    }

    #[test]
    fn merging_two_halves_equals_the_whole() {
        let rules: Vec<Rule> = ["lost<=6", "p99<80ms", "connect-errors==0"]
            .iter()
            .map(|r| r.parse().unwrap())
            .collect();
        let mut whole = pretend(5, Shard::default());
        whole.judge(&rules);
        let halves: Vec<Summary> = (0..2)
            .map(|i| {
                let mut s = pretend(5, Shard { index: i, total: 2 });
                s.judge(&rules);
                // Through JSON, as `loadtest merge` reads them.
                serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap()
            })
            .collect();
        assert_ne!(
            halves[0].messages.expected + halves[1].messages.expected,
            whole.messages.expected,
            "per-shard expected counts do not add up: only the rooms' ledgers do"
        );
        let mut merged = Summary::merge(halves).unwrap();
        merged.judge(&rules);
        assert_eq!(merged.run.generators, 2);
        assert_eq!(merged.run.hosts, whole.run.hosts);
        assert_eq!(merged.run.viewers, whole.run.viewers);
        let j = |s: &Summary| {
            let mut v = serde_json::to_value(s).unwrap();
            for k in ["run", "generator"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        };
        assert_eq!(j(&merged), j(&whole));
        assert_eq!(merged.rules, whole.rules);
        assert!(!merged.pass, "connect-errors==0 fails in both");
    }

    #[test]
    fn merge_refuses_mixed_runs() {
        let a = pretend(2, Shard { index: 0, total: 2 });
        let mut b = pretend(2, Shard { index: 1, total: 2 });
        b.run.run_id = 8;
        assert!(Summary::merge(vec![a.clone(), b])
            .unwrap_err()
            .contains("run ids"));
        assert!(Summary::merge(vec![a.clone(), a.clone()])
            .unwrap_err()
            .contains("twice"));
        let mut old = a;
        old.version = 0;
        assert!(Summary::merge(vec![old]).is_err());
        assert!(Summary::merge(vec![]).is_err());
    }

    #[test]
    fn the_json_has_a_version_and_round_trips() {
        let s = pretend(2, Shard::default());
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["version"], SCHEMA_VERSION);
        assert!(v["histograms"]["latency_us"]
            .as_str()
            .unwrap()
            .starts_with("HISTF"));
        let back: Summary = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
    }
}
