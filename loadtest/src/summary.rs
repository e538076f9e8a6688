//! The result of a run as plain data: what scripts and CI read (`--summary-file`, schema in
//! `docs/loadtest.md`, versioned by [`SCHEMA_VERSION`]), what `loadtest merge` adds up from
//! several generators, what the rules judge (through [`Observations`]), and the block printed at
//! the end. Everything derived (expected, lost, percentiles) is computed from the raw parts —
//! rooms' ledgers and histograms — by [`Summary::derive`], so one generator's summary and a merge
//! of shards are computed the same way.
//!
//! This file is the schema and the derivation; [`merge`] adds shards up, [`text`] prints the
//! block shown at the end of a run.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::rules::{self, Observations, Rule, Verdict};
use crate::spec::Shard;
use crate::stats::new_histogram;
use crate::stats::{hist_b64, new_second_histogram, second_hist_b64, LatencySummary};

mod merge;
mod text;

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
    /// Receipts more than the reorder window (1024 messages of one publisher) late: not
    /// counted as delivered (a receiver no longer tracks whether that number was missing).
    #[serde(default)]
    pub stale: u64,
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

/// What the members' last `presence` said at the end of the run, against the room sizes the run
/// put there (every shard's members: presence counts are cluster-wide). Judged only when every
/// member stayed: after a node kill or a drain, the counts of a room converge within a few
/// `--presence-interval`s, which a short drain may not cover.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceCheck {
    /// Members connected at the end whose last `presence` was compared.
    pub checked: u64,
    /// Of those, whose counts differed from their room's size.
    pub wrong: u64,
    /// Members connected at the end that had received no `presence` at all.
    pub missing: u64,
}

/// The members' view of their rooms' lists at the end of the drain (`--lists`): count and
/// fingerprint against the room's members (the plan's count; the fingerprint of the generator's
/// own members when the run has one shard).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListsCheck {
    /// Members whose view was compared.
    pub checked: u64,
    /// Of those, whose view was wrong.
    pub wrong: u64,
    /// Members whose read had not finished.
    pub missing: u64,
    /// Members whose room was not listing (over the gateway's bound): not judged.
    pub over_limit: u64,
    /// Reads started again (pages of different versions, `reset`).
    pub rereads: u64,
}

/// What the webhook receiver (`--webhook-listen`) took and found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WebhookCheck {
    /// Whether a receiver ran (any generator's, when merged).
    pub enabled: bool,
    /// Requests with a valid signature.
    pub received: u64,
    /// Requests refused for their signature (401).
    pub bad_signature: u64,
    /// Repeats of an event id.
    pub duplicates: u64,
    /// Expected events that never came (rooms' occupied/vacated, members' joined/left).
    pub missing: u64,
    /// Events after a later one of their room.
    pub out_of_order: u64,
    /// Events out of turn, or for keys no member here was welcomed with.
    pub unexpected: u64,
    /// Events for other rooms, unreadable, or over the receiver's bound: not judged.
    pub ignored: u64,
    /// Keys no member here saw welcomed, with exactly one joined then one left (a connection
    /// whose welcome never reached the generator): not judged.
    #[serde(default)]
    pub unseen: u64,
    /// Rooms judged.
    pub rooms: u64,
    /// Member keys judged.
    pub keys: u64,
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
    /// The runtime's worker threads, `--threads` (summed over generators).
    #[serde(default)]
    pub threads: usize,
    /// Peak resident memory, MiB (the largest generator's).
    pub peak_rss_mib: Option<f64>,
    /// CPU seconds used over the window and drain (summed over generators).
    #[serde(default)]
    pub cpu_s: Option<f64>,
    /// Our messages received over the window and drain, every member, duplicates too (summed).
    #[serde(default)]
    pub received: u64,
    /// `cpu_s` / `received`: the generator's CPU per received message, µs.
    #[serde(default)]
    pub cpu_us_per_message: Option<f64>,
    /// Peak resident memory minus the resident memory before the first connection, MiB
    /// (summed over generators).
    #[serde(default)]
    pub rss_growth_mib: Option<f64>,
    /// `rss_growth_mib` / the members simulated (hosts + viewers): memory per member, KiB.
    #[serde(default)]
    pub kib_per_member: Option<f64>,
    /// The machine's 1-minute load average at the end (the highest).
    pub load_average: Option<f64>,
    /// Whether a generator itself limited the run; then latency figures are not the gateway's.
    pub bottleneck: bool,
    /// Why.
    pub reasons: Vec<String>,
    /// What held the publishers back that was not the generator's own saturation (its timers
    /// on time): writes the gateway did not take at once. Reported, never a failed verdict.
    #[serde(default)]
    pub notes: Vec<String>,
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
    /// The second's latency histogram (two significant digits).
    #[serde(with = "second_hist_b64")]
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
    /// The members' view of their rooms' counts at the end (absent in older summaries).
    #[serde(default)]
    pub presence: PresenceCheck,
    /// The members' view of their rooms' lists (absent in older summaries).
    #[serde(default)]
    pub lists: ListsCheck,
    /// The webhook receiver's figures (absent in older summaries).
    #[serde(default)]
    pub webhooks: WebhookCheck,
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
            presence: PresenceCheck::default(),
            lists: ListsCheck::default(),
            webhooks: WebhookCheck::default(),
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
        let g = &mut self.generator;
        g.cpu_us_per_message = g
            .cpu_s
            .filter(|_| g.received > 0)
            .map(|s| (s * 1e6 / g.received as f64 * 100.0).round() / 100.0);
        let simulated = (self.run.hosts + self.run.viewers) as f64;
        g.kib_per_member = g
            .rss_growth_mib
            .filter(|_| simulated > 0.0)
            .map(|m| (m * 1024.0 / simulated * 10.0).round() / 10.0);
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
            joined: self.connections.joined,
            closes: self.connections.unexpected_closes,
            publish_errors: self.messages.publish_errors,
            published: self.messages.published,
            unsent: self.messages.unsent,
            duplicates: self.messages.duplicates,
            reordered: self.messages.reordered,
            presence_wrong: self.presence.wrong + self.presence.missing,
            list_wrong: self.lists.wrong + self.lists.missing,
            webhook_missing: self.webhooks.missing,
            webhook_duplicates: self.webhooks.duplicates,
            webhook_out_of_order: self.webhooks.out_of_order,
            webhook_unexpected: self.webhooks.unexpected,
            webhook_bad_signature: self.webhooks.bad_signature,
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
}

impl Point {
    /// A second with nothing in it.
    pub(crate) fn empty(t: u64) -> Self {
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
            latency: new_second_histogram(),
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
        s.generator.cpu_s = Some(0.25);
        s.generator.received = s.timeline.iter().map(|p| p.received).sum();
        s.generator.rss_growth_mib = Some(0.5 * (s.run.hosts + s.run.viewers) as f64 / 1024.0);
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
    fn the_generator_reports_its_cost_per_message_and_per_member() {
        let s = pretend(4, Shard::default());
        let g = &s.generator;
        assert_eq!(g.received, 1200 - 6);
        assert_eq!(
            g.cpu_us_per_message,
            Some(209.38),
            "0.25 s over 1194 messages"
        );
        assert_eq!(g.kib_per_member, Some(0.5), "{g:?}");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["generator"]["cpu_us_per_message"], 209.38);
        assert_eq!(v["generator"]["kib_per_member"], 0.5);
        let text = s.human();
        assert!(
            text.contains("209.38 µs CPU per received message"),
            "{text}"
        );
        assert!(text.contains("0.5 KiB per member"), "{text}");
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
