//! Process-wide measurements: latency histograms (HDR, microseconds) and counters, written by every
//! connection's task and read once at the end by `summary.rs`. Goose keeps its own rows; these are
//! the exact figures behind the JSON summary and the pass/fail rules.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest latency a histogram holds (one hour, in µs); larger values are clamped to it.
const MAX_MICROS: u64 = 3_600_000_000;

/// Shards per histogram: connections record into `shard % SHARDS`, so two cores rarely contend on
/// one lock. A std `Mutex` is right: the critical section is one array increment, never an await.
const SHARDS: usize = 16;

/// An empty latency histogram with the bounds every recorder uses (mergeable with any other).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("static histogram bounds are valid")
}

/// An empty histogram for one second of the timeline: two significant digits (1 %) and sized
/// to the largest value it holds (it grows up to [`MAX_MICROS`] as values come). A run has a
/// histogram per second: at [`new_histogram`]'s full range and three digits each would cost
/// ~190 KB, which made the generator's memory grow with the length of the run; this one costs
/// ~10 KB for latencies up to 100 ms. Adds to and from the others.
pub fn new_second_histogram() -> Histogram<u64> {
    Histogram::new(2).expect("two significant digits are valid")
}

/// A histogram in HdrHistogram's interchange form: V2 compressed encoding, base64 (the
/// `HISTFAAA…` strings other HdrHistogram libraries read).
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serializing into memory cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Reads [`encode_histogram`]'s form back, resized to hold anything another recorder holds.
pub fn decode_histogram(s: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not decode: {e:?}"))?;
    let mut all = new_histogram();
    all.add(&h)
        .map_err(|e| format!("histogram out of bounds: {e:?}"))?;
    Ok(all)
}

/// `h` as a fresh [`new_second_histogram`] holding the same values (at two digits): the same
/// values give the same histogram, and the same encoding, however it was built (recorded in
/// any order, added up from shards, or read from an older three-digit summary).
pub fn canonical_second(h: &Histogram<u64>) -> Histogram<u64> {
    let mut c = new_second_histogram();
    for v in h.iter_recorded() {
        let _ = c.record_n(
            v.value_iterated_to().clamp(1, MAX_MICROS),
            v.count_at_value(),
        );
    }
    c
}

/// Serde adapter: a per-second histogram ([`new_second_histogram`]) as its encoded string, in
/// its [`canonical_second`] form both ways.
pub mod second_hist_b64 {
    use super::*;

    /// Writes the encoded form.
    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_histogram(&canonical_second(h)))
    }

    /// Reads the encoded form.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| serde::de::Error::custom(format!("histogram is not base64: {e}")))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| serde::de::Error::custom(format!("histogram does not decode: {e:?}")))?;
        Ok(canonical_second(&h))
    }
}

/// Serde adapter: a histogram field as its encoded string.
pub mod hist_b64 {
    use super::*;

    /// Writes the encoded form.
    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_histogram(h))
    }

    /// Reads the encoded form.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = String::deserialize(d)?;
        decode_histogram(&text).map_err(serde::de::Error::custom)
    }
}

/// A latency histogram in microseconds, sharded for concurrent writers. Each shard is sized to
/// the largest value it holds (three digits, up to [`MAX_MICROS`]): at full range from the
/// start, the 16 shards of each of the six recorders cost ~18 MiB of resident memory (their
/// counts are written zero), whatever the run.
pub struct Recorder {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Histogram::new(3).expect("three digits are valid")))
                .collect(),
        }
    }
}

impl Recorder {
    /// Records `micros` (at least 1, at most [`MAX_MICROS`]) into the shard picked by `key`.
    /// Not hdrhistogram's `saturating_record`: that clamps to the current size instead of
    /// growing the histogram.
    pub fn record(&self, key: usize, micros: u64) {
        let mut h = self.shards[key % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let _ = h.record(micros.clamp(1, MAX_MICROS));
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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

/// One second of the run, by wall-clock second: what the HTML report draws.
#[derive(Debug, Clone)]
pub struct Second {
    /// Members connected (welcomed, not closed), the highest sample in the second.
    pub connected: u64,
    /// Publishes written (WebSocket and HTTP API) in this second.
    pub sent: u64,
    /// Our messages received in this second (every member, duplicates too).
    pub received: u64,
    /// Distinct window messages published in this second that measured members received (by
    /// the end of the drain): the loss over time is the expected count minus this.
    pub delivered: u64,
    /// End-to-end latency of the messages received in this second, µs.
    pub latency: Histogram<u64>,
}

impl Default for Second {
    fn default() -> Self {
        Self {
            connected: 0,
            sent: 0,
            received: 0,
            delivered: 0,
            latency: new_second_histogram(),
        }
    }
}

impl Second {
    /// Records a latency of `micros` (at least 1, at most [`MAX_MICROS`]). Not hdrhistogram's
    /// `saturating_record`: that clamps to the current size instead of growing the histogram.
    pub fn record_latency(&mut self, micros: u64) {
        let _ = self.latency.record(micros.clamp(1, MAX_MICROS));
    }

    /// Adds another part of the same second (another shard's).
    fn add(&mut self, b: &Second) {
        self.connected = self.connected.max(b.connected);
        self.sent += b.sent;
        self.received += b.received;
        self.delivered += b.delivered;
        self.latency
            .add(&b.latency)
            .expect("an auto-resizing histogram takes any value");
    }
}

/// How many seconds behind its newest a shard keeps its own: older ones are folded into the
/// settled series, so that a second costs one histogram, not one per shard.
const RECENT_SECONDS: u64 = 3;

/// One shard's recent seconds.
#[derive(Default)]
struct Recent {
    /// The newest second this shard has seen.
    newest: u64,
    seconds: BTreeMap<u64, Second>,
}

/// Per-second series. The seconds being written now are sharded like [`Recorder`]; once a
/// shard has moved [`RECENT_SECONDS`] past a second, it folds it into `settled`, so memory is
/// one [`new_second_histogram`] per second of the run plus a few per shard, whatever the rate.
/// std `Mutex`es: one map update, never an await; a shard's lock is taken before `settled`'s.
pub struct Timeline {
    shards: Vec<Mutex<Recent>>,
    settled: Mutex<BTreeMap<u64, Second>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Recent::default())).collect(),
            settled: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Timeline {
    /// Updates second `sec` in the shard picked by `key` (or in the settled series, for a
    /// second the shard has already folded: a late delivery counted by its publish second).
    pub fn with(&self, key: usize, sec: u64, f: impl FnOnce(&mut Second)) {
        let mut shard = self.shards[key % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shard.seconds.get_mut(&sec) {
            return f(s);
        }
        if sec + RECENT_SECONDS < shard.newest {
            let mut settled = self.settled.lock().unwrap_or_else(|p| p.into_inner());
            return f(settled.entry(sec).or_default());
        }
        f(shard.seconds.entry(sec).or_default());
        if sec > shard.newest {
            shard.newest = sec;
            let keep = shard.seconds.split_off(&(sec - RECENT_SECONDS.min(sec)));
            let old = std::mem::replace(&mut shard.seconds, keep);
            if !old.is_empty() {
                let mut settled = self.settled.lock().unwrap_or_else(|p| p.into_inner());
                for (t, s) in old {
                    match settled.entry(t) {
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(s);
                        }
                        std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().add(&s),
                    }
                }
            }
        }
    }

    /// Every second, shards added up.
    pub fn merged(&self) -> BTreeMap<u64, Second> {
        let mut all = self
            .settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(|p| p.into_inner());
            for (sec, b) in shard.seconds.iter() {
                all.entry(*sec).or_default().add(b);
            }
        }
        all
    }

    /// Deliveries counted for the seconds before `sec` (the live line's loss so far), without
    /// copying any histogram.
    pub fn delivered_before(&self, sec: u64) -> u64 {
        let settled: u64 = self
            .settled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .range(..sec)
            .map(|(_, s)| s.delivered)
            .sum();
        let recent: u64 = self
            .shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .seconds
                    .range(..sec)
                    .map(|(_, s)| s.delivered)
                    .sum::<u64>()
            })
            .sum();
        settled + recent
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
    pub timer_lag: std::sync::Arc<Recorder>,
    /// Per-second series for the report and the live line.
    pub timeline: Timeline,
    /// Members connected now (welcome received, not closed).
    pub connected: AtomicI64,
    /// Our messages received, every member, since the start (the live line's rate).
    pub received_total: AtomicU64,
    /// Publishes written since the start, window or not (the live line's rate).
    pub sent_total: AtomicU64,

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
    /// Receipts by members of the window too late for the reorder window (`ledger.rs`).
    pub stale: AtomicU64,
    /// Window messages that arrived after the drain ended (not counted as delivered).
    pub after_drain: AtomicU64,
    /// `message` events that were not the load tester's (another client in the room).
    pub foreign: AtomicU64,
    /// Messages received before the welcome (allowed by the protocol; counted for information).
    pub before_welcome: AtomicU64,

    /// Window messages published through the HTTP API (202).
    pub api_published: AtomicU64,
    /// HTTP API publishes that failed, by cause (`http_503`, `timeout`, …).
    pub api_errors: Tally,

    /// Welcomes that carried a room position (the gateway numbers messages).
    pub numbered_welcomes: AtomicU64,
    /// Reconnects that asked to resume (`since=`) and got a welcome saying how it went.
    pub resumes: AtomicU64,
    /// Of those, welcomes with `recovered: false`.
    pub resumes_incomplete: AtomicU64,
    /// Messages received after a resume with an offset at or below the welcome's: recovered from
    /// history rather than live.
    pub recovered: AtomicU64,
    /// Receipts whose room offset a member had already received (the gateway's view of a
    /// duplicate).
    pub offset_duplicates: AtomicU64,
    /// Receipts whose room offset came after a higher one.
    pub offset_reorders: AtomicU64,
    /// `ack` events for our publishes.
    pub acks: AtomicU64,
    /// Acks with `duplicate: true` (a re-sent publish the cluster had already taken).
    pub ack_duplicates: AtomicU64,
    /// Publishes sent again after a reconnect because no ack had come.
    pub resent: AtomicU64,
    /// Unacknowledged publishes forgotten because a member held too many.
    pub unacked_dropped: AtomicU64,

    /// Members connected at the end of the run whose connection had received a `presence`.
    pub presence_checked: AtomicU64,
    /// Of those, whose last `presence` differed from the room's size in the whole run.
    pub presence_wrong: AtomicU64,
    /// Members connected at the end of the run that never received a `presence`.
    pub presence_missing: AtomicU64,

    /// Members whose list view was judged at the end of the drain (`--lists`).
    pub lists_checked: AtomicU64,
    /// Of those, whose view differed from the room's members.
    pub lists_wrong: AtomicU64,
    /// Members whose list read had not finished by the end of the drain.
    pub lists_missing: AtomicU64,
    /// Members whose room was not listing (`over_limit`, `not_listed`): not judged.
    pub lists_over_limit: AtomicU64,
    /// Reads of the list started again (pages of different versions, `reset`).
    pub lists_rereads: AtomicU64,
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
    fn recorders_grow_with_what_they_hold() {
        let r = Recorder::default();
        r.record(0, 5_000);
        let small = r.shards[0].lock().unwrap().distinct_values();
        assert!(small < 20_000, "sized to 5 ms, not to an hour: {small}");
        r.record(0, 2_000_000_000);
        let h = r.merged();
        assert_eq!(h.len(), 2);
        assert!(h.max() >= 1_999_000_000, "grows when it must: {}", h.max());
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
    fn histograms_round_trip_in_interchange_form() {
        let r = Recorder::default();
        for v in [1u64, 10, 1_000, 250_000, 3_000_000] {
            r.record(0, v);
        }
        let h = r.merged();
        let text = encode_histogram(&h);
        assert!(text.starts_with("HISTF"), "V2 compressed cookie: {text}");
        let back = decode_histogram(&text).unwrap();
        assert_eq!(back, h);
        assert!(decode_histogram("not base64!").is_err());
        assert!(decode_histogram("aGVsbG8=").is_err());
    }

    #[test]
    fn timeline_adds_shards() {
        let t = Timeline::default();
        t.with(0, 100, |s| s.received += 2);
        t.with(1, 100, |s| {
            s.received += 3;
            s.connected = 7;
            s.latency.record(1000).unwrap();
        });
        t.with(2, 101, |s| s.sent += 1);
        let m = t.merged();
        assert_eq!(m[&100].received, 5);
        assert_eq!(m[&100].connected, 7);
        assert_eq!(m[&100].latency.len(), 1);
        assert_eq!(m[&101].sent, 1);
    }

    #[test]
    fn old_seconds_fold_into_one_series() {
        let t = Timeline::default();
        for sec in 100..200u64 {
            for key in 0..SHARDS {
                t.with(key, sec, |s| {
                    s.received += 1;
                    s.latency.record(1000 + sec).unwrap();
                });
            }
        }
        // A late delivery counted by an old publish second.
        t.with(3, 120, |s| s.delivered += 1);
        for shard in &t.shards {
            let shard = shard.lock().unwrap();
            assert!(shard.seconds.len() as u64 <= RECENT_SECONDS + 1);
        }
        let m = t.merged();
        assert_eq!(m.len(), 100);
        assert!(m.values().all(|s| s.received == SHARDS as u64));
        assert_eq!(m[&150].latency.len(), SHARDS as u64);
        assert_eq!(m[&120].delivered, 1);
        assert_eq!(t.delivered_before(121), 1);
        assert_eq!(t.delivered_before(120), 0);
    }

    #[test]
    fn second_histograms_are_small_and_round_trip() {
        let mut h = new_second_histogram();
        for v in [1u64, 900, 45_000, 99_000] {
            h.record(v).unwrap();
        }
        // Counts sized to 100 ms at 2 digits, not to an hour at 3.
        assert!(h.distinct_values() < 2_000, "{}", h.distinct_values());
        #[derive(Serialize, Deserialize)]
        struct P(#[serde(with = "second_hist_b64")] Histogram<u64>);
        let text = serde_json::to_string(&P(h.clone())).unwrap();
        let back: P = serde_json::from_str(&text).unwrap();
        assert_eq!(back.0.len(), h.len());
        assert_eq!(back.0.max(), h.max());
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        // However it was built: added up from parts gives the same encoding.
        let (mut a, mut b) = (new_second_histogram(), new_second_histogram());
        a.record(99_000).unwrap();
        a.record(1).unwrap();
        b.record(900).unwrap();
        b.record(45_000).unwrap();
        let mut sum = new_second_histogram();
        sum.add(&b).unwrap();
        sum.add(&a).unwrap();
        assert_eq!(serde_json::to_string(&P(sum)).unwrap(), text);
        // An older summary's three-digit, full-range second reads at two digits.
        let mut old = new_histogram();
        old.record(45_000).unwrap();
        let back: P = serde_json::from_str(&serde_json::to_string(&P(old)).unwrap()).unwrap();
        assert_eq!(back.0.sigfig(), 2);
        assert_eq!(back.0.len(), 1);
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
