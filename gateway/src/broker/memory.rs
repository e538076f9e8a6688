//! The in-process broker: a single node with no Redis. A publish is numbered, appended to the
//! room's history and handed straight to this node's [`Inbound`] handler (for the rooms that are
//! subscribed), exactly as the Redis broker's script does it in Redis and hands it over after a
//! round trip.
//!
//! Same semantics as Redis, in memory and bounded: per room a sequence, an epoch (random, so a
//! restarted node's epochs never match its old ones), the last `--history-size` entries within
//! `--history-max-bytes` with their age; history for at most [`MAX_HISTORY_ROOMS`] rooms (the
//! longest idle room's entries go first) and sequences for at most [`MAX_ROOMS`]; idempotency
//! keys, scoped to their publisher, for `--idempotency-ttl`, at most [`MAX_KEYS`] of them (the
//! oldest go first). A room's log is forgotten after [`META_TTL`] without a publish, and entries
//! past `--history-ttl` are freed at the next sweep of idle rooms. Reads stop at the read byte
//! budget as `history.lua` does.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use crate::broker::control::{ControlSink, MemoryBans};
use crate::metrics::Metrics;
use crate::wire::history::{
    frame_tail, Ack, HistoryLimits, HistoryQuery, HistoryRead, Recovery, META_TTL,
};
use crate::wire::protocol::{RoomCounts, RoomName};

/// Most idempotency keys remembered at once; beyond, the oldest are forgotten early.
pub const MAX_KEYS: usize = 100_000;
/// Most rooms whose history is kept at once: with `--history-max-bytes` this bounds the
/// history's memory (1024 × 1.5 MiB by default). Beyond, the longest idle room's entries are
/// dropped (its sequence stays: a resume into it is `trimmed`, as after `--history-ttl`).
pub const MAX_HISTORY_ROOMS: usize = 1024;
/// Most rooms whose sequence is kept at once (about 100 bytes each); beyond, the longest idle
/// room is forgotten, as if its meta had expired (its next publish starts a new epoch).
pub const MAX_ROOMS: usize = 100_000;
/// Publishes between two sweeps of idle rooms.
const SWEEP_EVERY: u64 = 4096;

/// In-process pub/sub for one node.
#[derive(Debug)]
pub struct MemoryBroker {
    inbound: Arc<dyn crate::broker::Receiver>,
    pub(super) metrics: Metrics,
    limits: HistoryLimits,
    /// Rooms subscribed; a std lock, held only for a set operation.
    subscribed: Mutex<HashSet<RoomName>>,
    /// Sequences, histories and keys. A std lock held for one publish *including* its hand-off
    /// to the inbound handler (which never blocks), so that members get offsets in order.
    logs: Mutex<Logs>,
    /// Moderation commands go straight to this node's queue.
    pub(super) control: ControlSink,
    /// Bans, in memory (the in-process broker is the whole cluster).
    pub(super) bans: MemoryBans,
    /// Member lists, in memory.
    pub(super) roster: crate::broker::roster::RosterBook,
    /// Rooms occupied as far as the lifecycle events go (`room.occupied` sent, `room.vacated`
    /// not yet): bounded by the rooms with members, as the node's counts are.
    occupied: Mutex<HashSet<RoomName>>,
}

#[derive(Debug, Default)]
struct Logs {
    rooms: HashMap<RoomName, RoomLog>,
    /// Rooms whose `entries` are not empty (kept at most [`MAX_HISTORY_ROOMS`]).
    history_rooms: usize,
    /// (room, scoped key) → the first publish's ack.
    keys: HashMap<(RoomName, String), Ack>,
    /// Keys in insertion order (= expiry order, the TTL being one for all), with their expiry.
    key_order: VecDeque<(Instant, RoomName, String)>,
    publishes: u64,
}

#[derive(Debug)]
struct RoomLog {
    epoch: String,
    seq: u64,
    entries: VecDeque<Entry>,
    /// The frame bytes of `entries` (at most `--history-max-bytes`).
    bytes: usize,
    touched: Instant,
}

impl RoomLog {
    /// A new sequence: a fresh epoch, nothing published yet.
    fn new(now: Instant) -> Self {
        Self {
            epoch: new_epoch(),
            seq: 0,
            entries: VecDeque::new(),
            bytes: 0,
            touched: now,
        }
    }
}

#[derive(Debug)]
struct Entry {
    offset: u64,
    at: Instant,
    frame: Bytes,
}

impl MemoryBroker {
    /// One presence tick of `room` in process: the roster write of a room that lists, and
    /// with `events` the room's lifecycle events as `presence.lua` appends them (section 12.6 of
    /// docs/protocol.md): `room.occupied` when the node first reports members, the members'
    /// events, `room.vacated` at its withdrawal (`counts` `None`, after `--unsubscribe-delay`).
    pub(super) fn tick(
        &self,
        room: &RoomName,
        counts: Option<RoomCounts>,
        write: Option<&crate::broker::roster::RosterWrite<'_>>,
        events: bool,
    ) -> (RoomCounts, Option<crate::broker::roster::RosterRead>) {
        let mut read = write.map(|w| self.roster.write(room, w));
        if events {
            let mut made = read
                .as_mut()
                .map(|r| std::mem::take(&mut r.in_process))
                .unwrap_or_default();
            let mut occupied = self.occupied.lock().unwrap_or_else(|e| e.into_inner());
            let lifecycle = |kind: &str| {
                serde_json::json!({"type": kind, "room": room.as_str(),
                    "ts_ms": crate::wire::clock::unix_millis()})
                .to_string()
            };
            if counts.is_some() && occupied.insert(room.clone()) {
                made.insert(0, lifecycle("room.occupied"));
            } else if counts.is_none() && occupied.remove(room) {
                made.push(lifecycle("room.vacated"));
            }
            if !made.is_empty() {
                let r = read.get_or_insert_with(Default::default);
                r.events = made.len() as u64;
                r.in_process = made;
            }
        }
        (counts.unwrap_or_default(), read)
    }

    /// A broker handing what is published to `inbound`.
    pub fn new(
        inbound: Arc<dyn crate::broker::Receiver>,
        metrics: Metrics,
        limits: HistoryLimits,
    ) -> Self {
        Self {
            inbound,
            metrics,
            limits,
            subscribed: Mutex::new(HashSet::new()),
            control: ControlSink::default(),
            bans: MemoryBans::default(),
            roster: Default::default(),
            occupied: Mutex::default(),
            logs: Mutex::new(Logs::default()),
        }
    }

    pub(super) fn subscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(room.clone());
    }

    pub(super) fn unsubscribe(&self, room: &RoomName) {
        let mut s = self.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        s.remove(room);
    }

    pub(super) fn subscription_count(&self) -> usize {
        self.subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Numbers, records and delivers one message; `prefix` is its frame without the closing `}`.
    pub(super) fn publish(
        &self,
        room: &RoomName,
        prefix: &[u8],
        id: &str,
        key: Option<&str>,
    ) -> Ack {
        let now = Instant::now();
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.forget_expired_keys(now);
        if let Some(key) = key {
            if let Some(ack) = logs.keys.get(&(room.clone(), key.to_string())) {
                return Ack {
                    duplicate: true,
                    ..ack.clone()
                };
            }
        }
        logs.publishes += 1;
        if logs.publishes.is_multiple_of(SWEEP_EVERY) {
            logs.rooms
                .retain(|_, r| now.duration_since(r.touched) < META_TTL);
            // Entries past --history-ttl are never read again (Redis lets an idle room's stream
            // expire after it): free them.
            let ttl = self.limits.ttl;
            for r in logs.rooms.values_mut() {
                while r
                    .entries
                    .front()
                    .is_some_and(|e| now.duration_since(e.at) >= ttl)
                {
                    let old = r.entries.pop_front().expect("front exists");
                    r.bytes -= old.frame.len();
                }
            }
            logs.history_rooms = logs
                .rooms
                .values()
                .filter(|r| !r.entries.is_empty())
                .count();
        }
        if !logs.rooms.contains_key(room) && logs.rooms.len() >= MAX_ROOMS {
            logs.forget_idlest_room();
        }
        let log = logs
            .rooms
            .entry(room.clone())
            .or_insert_with(|| RoomLog::new(now));
        let had_history = !log.entries.is_empty();
        if now.duration_since(log.touched) >= META_TTL {
            // The room was silent longer than its meta lives: a new sequence, as in Redis.
            log.epoch = new_epoch();
            log.seq = 0;
            log.entries.clear();
            log.bytes = 0;
        }
        log.touched = now;
        log.seq += 1;
        let tail = frame_tail(log.seq, &log.epoch);
        let mut frame = Vec::with_capacity(prefix.len() + tail.len());
        frame.extend_from_slice(prefix);
        frame.extend_from_slice(tail.as_bytes());
        let frame = Bytes::from(frame);
        if self.limits.size > 0 {
            log.bytes += frame.len();
            log.entries.push_back(Entry {
                offset: log.seq,
                at: now,
                frame: frame.clone(),
            });
            // The same trim as publish.lua's: from the oldest, by count and by bytes (the new
            // entry too, when it alone is over the budget).
            while log.entries.len() > self.limits.size || log.bytes > self.limits.max_bytes {
                let Some(old) = log.entries.pop_front() else {
                    break;
                };
                log.bytes -= old.frame.len();
            }
        }
        let ack = Ack {
            offset: log.seq,
            epoch: log.epoch.clone(),
            id: id.to_string(),
            duplicate: false,
        };
        match (had_history, !log.entries.is_empty()) {
            (false, true) => logs.history_rooms += 1,
            (true, false) => logs.history_rooms -= 1,
            _ => {}
        }
        if logs.history_rooms > MAX_HISTORY_ROOMS {
            logs.drop_idlest_history();
        }
        if let Some(key) = key {
            let expires = now + self.limits.idempotency_ttl;
            logs.keys
                .insert((room.clone(), key.to_string()), ack.clone());
            logs.key_order
                .push_back((expires, room.clone(), key.to_string()));
            while logs.key_order.len() > MAX_KEYS {
                if let Some((_, r, k)) = logs.key_order.pop_front() {
                    logs.keys.remove(&(r, k));
                }
            }
        }
        let subscribed = self
            .subscribed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(room);
        if subscribed {
            self.inbound.receive(room.as_str(), frame);
        }
        ack
    }

    /// Reads `room`'s position and history for `query` (see `history.lua` for the same rules).
    pub(super) fn history(&self, room: &RoomName, query: &HistoryQuery) -> HistoryRead {
        let now = Instant::now();
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.begin_sequence(room, now);
        let log = logs.rooms.get(room);
        let (epoch, seq) = log.map(|l| (l.epoch.clone(), l.seq)).unwrap_or_default();
        let young = |e: &Entry| now.duration_since(e.at) < self.limits.ttl;
        let budget = self.limits.read_bytes;
        let mut read = HistoryRead {
            epoch,
            offset: seq,
            recovery: None,
            frames: Vec::new(),
            truncated: false,
        };
        if let Some(since) = &query.since {
            let recovery =
                if read.epoch.is_empty() || since.epoch != read.epoch || since.offset > seq {
                    Recovery::EpochChanged
                } else if since.offset == seq {
                    Recovery::Complete
                } else if seq - since.offset > query.max_recovery as u64 {
                    Recovery::TooMany
                } else {
                    let entries = &log.expect("a room with a sequence has a log").entries;
                    let mut missed = entries.iter().filter(|e| e.offset > since.offset);
                    match missed.next() {
                        Some(e) if e.offset == since.offset + 1 && young(e) => {
                            let missed = std::iter::once(e).chain(missed);
                            let (frames, over) = within(missed, budget, query.partial);
                            read.truncated = over;
                            if over && !query.partial {
                                Recovery::TooMany
                            } else {
                                read.frames = frames;
                                Recovery::Complete
                            }
                        }
                        _ => Recovery::Trimmed,
                    }
                };
            read.recovery = Some(recovery);
            if recovery == Recovery::Complete {
                return read;
            }
        }
        if query.backlog > 0 {
            if let Some(log) = log {
                let newest = log
                    .entries
                    .iter()
                    .rev()
                    .take(query.backlog)
                    .take_while(|e| young(e));
                let (mut frames, over) = within(newest, budget, false);
                frames.reverse();
                read.frames = frames;
                read.truncated |= over;
            }
        }
        read
    }
}

/// The entries of `entries`, in their order, until the next would take their frames over
/// `budget` bytes (the first always, with `at_least_one`: a page that always advances); and
/// whether one was left out for the budget.
fn within<'a>(
    entries: impl Iterator<Item = &'a Entry>,
    budget: usize,
    at_least_one: bool,
) -> (Vec<(u64, Bytes)>, bool) {
    let mut used = 0;
    let mut frames = Vec::new();
    for e in entries {
        if used + e.frame.len() > budget && !(at_least_one && frames.is_empty()) {
            return (frames, true);
        }
        used += e.frame.len();
        frames.push((e.offset, e.frame.clone()));
    }
    (frames, false)
}

/// A new epoch: 10 random letters and digits.
fn new_epoch() -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(10)
        .collect()
}

impl Logs {
    /// The longest idle room among those `with` selects. A scan, made only when a bound is
    /// reached (at most once per publish or first read of a room), over at most [`MAX_ROOMS`] rooms.
    fn idlest(&self, with: impl Fn(&RoomLog) -> bool) -> Option<RoomName> {
        self.rooms
            .iter()
            .filter(|(_, r)| with(r))
            .min_by_key(|(_, r)| r.touched)
            .map(|(name, _)| name.clone())
    }

    /// Makes sure `room` has a live sequence: a room first read (a join) gets its epoch now, as
    /// at its first publish (`history.lua` does the same), so that a member who joined before
    /// any message has a position to resume from. A read does not extend a live log's life.
    fn begin_sequence(&mut self, room: &RoomName, now: Instant) {
        match self.rooms.get_mut(room) {
            Some(log) if now.duration_since(log.touched) < META_TTL => {}
            Some(log) => {
                if !log.entries.is_empty() {
                    self.history_rooms -= 1;
                }
                *log = RoomLog::new(now);
            }
            None => {
                if self.rooms.len() >= MAX_ROOMS {
                    self.forget_idlest_room();
                }
                self.rooms.insert(room.clone(), RoomLog::new(now));
            }
        }
    }

    /// Forgets the longest idle room entirely (its next publish starts a new epoch).
    fn forget_idlest_room(&mut self) {
        if let Some(name) = self.idlest(|_| true) {
            if let Some(log) = self.rooms.remove(&name) {
                if !log.entries.is_empty() {
                    self.history_rooms -= 1;
                }
            }
        }
    }

    /// Drops the history of the longest idle room that has one; its sequence stays.
    fn drop_idlest_history(&mut self) {
        if let Some(name) = self.idlest(|r| !r.entries.is_empty()) {
            if let Some(log) = self.rooms.get_mut(&name) {
                log.entries.clear();
                log.bytes = 0;
                self.history_rooms -= 1;
            }
        }
    }

    fn forget_expired_keys(&mut self, now: Instant) {
        while let Some((expires, _, _)) = self.key_order.front() {
            if *expires > now {
                break;
            }
            let (_, r, k) = self.key_order.pop_front().expect("front exists");
            self.keys.remove(&(r, k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::inbound::Inbound;
    use crate::wire::history::Since;
    use std::time::Duration;

    fn broker(size: usize) -> MemoryBroker {
        bounded(size, 1 << 20, 1 << 20)
    }

    fn bounded(size: usize, max_bytes: usize, read_bytes: usize) -> MemoryBroker {
        let metrics = Metrics::new("n1");
        let hub = Arc::new(crate::fanout::hub::Hub::new());
        let inbound = Arc::new(Inbound::new("n1", hub, metrics.clone(), 1024));
        MemoryBroker::new(
            inbound,
            metrics,
            HistoryLimits {
                size,
                max_bytes,
                read_bytes,
                ttl: Duration::from_secs(60),
                idempotency_ttl: Duration::from_secs(60),
            },
        )
    }

    fn since(read: &HistoryRead, offset: u64, backlog: usize) -> HistoryQuery {
        HistoryQuery {
            since: Some(Since {
                epoch: read.epoch.clone(),
                offset,
            }),
            max_recovery: 5,
            backlog,
            partial: false,
        }
    }

    #[test]
    fn numbers_records_and_recovers() {
        let b = broker(4);
        let room = RoomName::parse("r").unwrap();
        // The first read begins the room's sequence: an epoch at offset 0 to resume from.
        let empty = b.history(&room, &HistoryQuery::default());
        assert_eq!((empty.epoch.len(), empty.offset), (10, 0));
        for i in 1..=6u64 {
            let ack = b.publish(&room, br#"{"type":"message","data":1"#, "id", None);
            assert_eq!(ack.offset, i);
            assert_eq!(ack.epoch, empty.epoch, "the publishes continue it");
            assert!(!ack.duplicate);
        }
        let now = b.history(&room, &HistoryQuery::default());
        assert_eq!(now.offset, 6);
        assert_eq!(now.epoch, empty.epoch);
        let r = b.history(&room, &since(&now, 3, 0));
        assert_eq!(r.recovery, Some(Recovery::Complete));
        assert_eq!(r.frames.iter().map(|f| f.0).collect::<Vec<_>>(), [4, 5, 6]);
        let f: serde_json::Value = serde_json::from_slice(&r.frames[0].1).unwrap();
        assert_eq!(f["offset"], 4);
        assert_eq!(f["epoch"], now.epoch.as_str());
        assert_eq!(
            b.history(&room, &since(&now, 6, 0)).recovery,
            Some(Recovery::Complete)
        );
        let trimmed = b.history(&room, &since(&now, 1, 2));
        assert_eq!(
            trimmed.recovery,
            Some(Recovery::Trimmed),
            "4 kept, 5 missed"
        );
        assert_eq!(
            trimmed.frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [5, 6],
            "the backlog instead"
        );
        let mut other = since(&now, 3, 0);
        other.since.as_mut().unwrap().epoch = "old".into();
        assert_eq!(
            b.history(&room, &other).recovery,
            Some(Recovery::EpochChanged)
        );
        let mut many = since(&now, 0, 0);
        many.max_recovery = 2;
        assert_eq!(b.history(&room, &many).recovery, Some(Recovery::TooMany));
    }

    #[test]
    fn idempotency_keys_publish_once() {
        let b = broker(10);
        let room = RoomName::parse("r").unwrap();
        let a = b.publish(&room, b"{", "first", Some("k"));
        let again = b.publish(&room, b"{", "second", Some("k"));
        assert_eq!(again.offset, a.offset);
        assert_eq!(again.id, "first");
        assert!(again.duplicate);
        let other = b.publish(&room, b"{", "third", Some("k2"));
        assert_eq!(other.offset, a.offset + 1);
        let elsewhere = b.publish(&RoomName::parse("s").unwrap(), b"{", "x", Some("k"));
        assert!(!elsewhere.duplicate, "keys are per room");
    }

    #[test]
    fn history_off_still_numbers() {
        let b = broker(0);
        let room = RoomName::parse("r").unwrap();
        b.publish(&room, b"{", "a", None);
        let now = b.history(&room, &HistoryQuery::default());
        assert_eq!(now.offset, 1);
        assert_eq!(
            b.history(&room, &since(&now, 0, 5)).recovery,
            Some(Recovery::Trimmed)
        );
    }

    /// 100 bytes of prefix; with the tail of a one-digit offset and a 10-letter epoch, a frame
    /// is 133 bytes.
    const PREFIX: &[u8] = &[b'x'; 100];
    const FRAME: usize = 133;

    fn offsets(read: &HistoryRead) -> Vec<u64> {
        read.frames.iter().map(|f| f.0).collect()
    }

    #[test]
    fn a_room_keeps_at_most_its_bytes() {
        let b = bounded(100, 3 * FRAME, 1 << 20);
        let room = RoomName::parse("r").unwrap();
        for _ in 0..3 {
            b.publish(&room, PREFIX, "id", None);
        }
        let all = |b: &MemoryBroker| {
            let q = HistoryQuery {
                backlog: 100,
                ..Default::default()
            };
            b.history(&room, &q)
        };
        assert_eq!(offsets(&all(&b)), [1, 2, 3], "exactly the budget is kept");
        b.publish(&room, PREFIX, "id", None);
        assert_eq!(
            offsets(&all(&b)),
            [2, 3, 4],
            "one byte over trims the oldest"
        );
        // A message larger than the whole budget is not kept, and takes the rest with it.
        b.publish(&room, &[b'x'; 500], "id", None);
        assert!(all(&b).frames.is_empty());
        let logs = b.logs.lock().unwrap();
        assert_eq!(logs.rooms[&room].bytes, 0);
        assert_eq!(logs.history_rooms, 0);
    }

    #[test]
    fn reads_stop_at_their_byte_budget() {
        let b = bounded(100, 1 << 20, 3 * FRAME);
        let room = RoomName::parse("r").unwrap();
        for _ in 0..5 {
            b.publish(&room, PREFIX, "id", None);
        }
        let now = b.history(&room, &HistoryQuery::default());
        let fits = b.history(&room, &since(&now, 2, 0));
        assert_eq!(
            fits.recovery,
            Some(Recovery::Complete),
            "exactly the budget"
        );
        assert_eq!((offsets(&fits), fits.truncated), (vec![3, 4, 5], false));
        let over = b.history(&room, &since(&now, 1, 9));
        assert_eq!(over.recovery, Some(Recovery::TooMany), "one frame over");
        assert!(over.truncated);
        assert_eq!(
            offsets(&over),
            [3, 4, 5],
            "the newest that fit as the backlog"
        );
        let mut page = since(&now, 0, 0);
        page.partial = true;
        let page = b.history(&room, &page);
        assert_eq!(page.recovery, Some(Recovery::Complete));
        assert_eq!((offsets(&page), page.truncated), (vec![1, 2, 3], true));
        let tiny = bounded(100, 1 << 20, FRAME - 1);
        for _ in 0..2 {
            tiny.publish(&room, PREFIX, "id", None);
        }
        let mut one = since(&tiny.history(&room, &HistoryQuery::default()), 0, 0);
        one.partial = true;
        let one = tiny.history(&room, &one);
        assert_eq!(
            (offsets(&one), one.truncated),
            (vec![1], true),
            "a page advances"
        );
        let backlog = HistoryQuery {
            backlog: 3,
            ..Default::default()
        };
        let exact = b.history(&room, &backlog);
        assert_eq!((offsets(&exact), exact.truncated), (vec![3, 4, 5], false));
    }

    #[test]
    fn history_is_kept_for_a_bounded_number_of_rooms() {
        let b = broker(10);
        let room = |i: usize| RoomName::parse(&format!("r{i}")).unwrap();
        b.publish(&room(0), PREFIX, "id", None);
        std::thread::sleep(Duration::from_millis(2));
        for i in 1..=MAX_HISTORY_ROOMS {
            b.publish(&room(i), PREFIX, "id", None);
        }
        let logs = b.logs.lock().unwrap();
        assert_eq!(logs.history_rooms, MAX_HISTORY_ROOMS);
        assert!(
            logs.rooms[&room(0)].entries.is_empty(),
            "the idlest lost its history"
        );
        assert_eq!(logs.rooms[&room(0)].seq, 1, "but not its sequence");
        assert_eq!(logs.rooms[&room(MAX_HISTORY_ROOMS)].entries.len(), 1);
        let kept = logs
            .rooms
            .values()
            .filter(|r| !r.entries.is_empty())
            .count();
        assert_eq!(kept, MAX_HISTORY_ROOMS);
    }

    #[test]
    fn sequences_are_kept_for_a_bounded_number_of_rooms() {
        let b = broker(0);
        let room = |i: usize| RoomName::parse(&format!("r{i}")).unwrap();
        let first = b.publish(&room(0), b"{", "id", None);
        // Idler than all others by a clear margin (equal instants would leave the choice open).
        std::thread::sleep(Duration::from_millis(2));
        for i in 1..MAX_ROOMS {
            b.publish(&room(i), b"{", "id", None);
        }
        assert_eq!(
            b.logs.lock().unwrap().rooms.len(),
            MAX_ROOMS,
            "full, none forgotten"
        );
        b.publish(&room(MAX_ROOMS), b"{", "id", None);
        let logs = b.logs.lock().unwrap();
        assert_eq!(logs.rooms.len(), MAX_ROOMS);
        assert!(
            !logs.rooms.contains_key(&room(0)),
            "the idlest is forgotten"
        );
        drop(logs);
        let again = b.publish(&room(0), b"{", "id", None);
        assert_eq!(again.offset, 1);
        assert_ne!(
            again.epoch, first.epoch,
            "a new sequence, as after the meta's expiry"
        );
        // A first read (a join) begins a sequence too, within the same bound.
        let read = b.history(&room(MAX_ROOMS + 1), &HistoryQuery::default());
        assert_eq!((read.epoch.len(), read.offset), (10, 0));
        assert_eq!(b.logs.lock().unwrap().rooms.len(), MAX_ROOMS);
    }

    #[test]
    fn the_sweep_frees_entries_past_their_age() {
        let mut b = broker(10);
        b.limits.ttl = Duration::from_millis(1);
        let (quiet, busy) = (RoomName::parse("q").unwrap(), RoomName::parse("b").unwrap());
        b.publish(&quiet, PREFIX, "id", None);
        std::thread::sleep(Duration::from_millis(2));
        for _ in 1..SWEEP_EVERY {
            b.publish(&busy, PREFIX, "id", None);
        }
        let logs = b.logs.lock().unwrap();
        assert!(
            logs.rooms[&quiet].entries.is_empty(),
            "aged out at the sweep"
        );
        assert_eq!(logs.rooms[&quiet].bytes, 0);
        assert_eq!(logs.rooms[&quiet].seq, 1, "the sequence stays");
    }

    #[test]
    fn scoped_keys_are_per_publisher() {
        use crate::wire::history::KeyScope;
        let b = broker(10);
        let room = RoomName::parse("r").unwrap();
        let chatter = KeyScope::User("mallory".into()).scoped("question-4");
        let backend = KeyScope::Api(Some("0a1b2c3d4e5f".into())).scoped("question-4");
        assert!(!b.publish(&room, b"{", "a", Some(&chatter)).duplicate);
        assert!(!b.publish(&room, b"{", "b", Some(&backend)).duplicate);
        assert!(b.publish(&room, b"{", "c", Some(&backend)).duplicate);
    }
}
