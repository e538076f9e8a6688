//! Who is who and when: the population (every member's room, role and publish rate, handed out to
//! goose users as they start), this generator's share of it (`--shard`), the rooms' delivery
//! ledgers, and the run's phases.
//!
//! # Phases
//! 1. **Warm-up.** Goose starts users at its `--increase-rate`; each connects and waits for its
//!    welcome. Nobody publishes.
//! 2. **Settle.** When every member has made its first attempt (joined or failed), the window is
//!    fixed to start `--settle` later — or at `--start-at`, the wall-clock time that lines up the
//!    windows of several generators.
//! 3. **Measured window** (`--measure`). Members publish on their open-loop schedule. A member
//!    that is in its room (welcome received, not closed) when the window starts is a *member from
//!    the start*: it must receive every message published in its room during the window.
//! 4. **Drain** (`--drain`). Nobody publishes (a publisher behind schedule may still send its
//!    backlog during the first half); members wait for what is in flight. At its end the run stops.
//!
//! Expected deliveries = Σ over rooms of (messages published in the room during the window) ×
//! (members from the start). Delivered = distinct window messages those members received by the
//! end of the drain. Lost = expected − delivered. Members that joined late (reconnects) add
//! latency samples but are not in the expected count.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

pub use crate::spec::Role;
use crate::spec::{RoomGroup, Shard};
use crate::target::Target;

/// One room's delivery ledger (this generator's members and publishers).
#[derive(Debug)]
pub struct Room {
    /// The room name on the wire.
    pub name: String,
    /// Window messages written into this room by this generator, by unix second. A std `Mutex`:
    /// one map increment per publish, never held across an await.
    pub published: Mutex<BTreeMap<u64, u64>>,
    /// Members in the room when the window started.
    pub members_from_start: AtomicU64,
    /// Distinct window messages those members received.
    pub delivered: AtomicU64,
    /// The room's hosts and viewers in the whole run (every shard's): what a member's
    /// `presence` should say once everyone has joined.
    pub size: (u64, u64),
}

/// One member's place in the population.
#[derive(Debug, Clone)]
pub struct Slot {
    /// Index into [`Plan::rooms`].
    pub room: usize,
    /// Host or viewer.
    pub role: Role,
    /// Messages per second during the window (0: never publishes).
    pub rate: f64,
    /// Publisher id, unique in the whole run (every shard numbers seats the same way); goes in
    /// every message this member publishes.
    pub publisher: u32,
    /// Display name (`h17`, `v302`).
    pub name: String,
}

/// The population and where it connects. Built once from the options.
#[derive(Debug)]
pub struct Plan {
    /// Every room.
    pub rooms: Vec<Room>,
    hosts: Vec<Slot>,
    viewers: Vec<Slot>,
    next_host: AtomicUsize,
    next_viewer: AtomicUsize,
    next_conn: AtomicUsize,
    /// Gateway base URLs with their resolved addresses, round robin over connections.
    pub targets: Vec<Target>,
    /// Source addresses, round robin over connections; empty lets the kernel choose.
    pub binds: Vec<Ipv4Addr>,
    /// This generator's share.
    pub shard: Shard,
    /// Members in the whole run (all shards): HTTP API publishers are numbered after them.
    pub all_members: u32,
}

impl Plan {
    /// Lays out `groups` (rates resolved) as rooms named `PREFIX-gG-N`, and keeps the seats of
    /// `shard`: every `total`-th host and viewer, in the interleaved order, so that each shard
    /// gets its share of every room and no seat is in two shards.
    pub fn new(
        groups: &[RoomGroup],
        prefix: &str,
        targets: Vec<Target>,
        binds: Vec<Ipv4Addr>,
        shard: Shard,
    ) -> Self {
        let mut rooms = Vec::new();
        let mut hosts = Vec::new();
        let mut viewers = Vec::new();
        let mut publisher = 0u32;
        for (g, group) in groups.iter().enumerate() {
            for n in 0..group.rooms {
                let room = rooms.len();
                rooms.push(Room {
                    name: format!("{prefix}-g{g}-{n}"),
                    published: Mutex::new(BTreeMap::new()),
                    members_from_start: AtomicU64::new(0),
                    delivered: AtomicU64::new(0),
                    size: (group.hosts as u64, group.viewers as u64),
                });
                for (role, count, rate, list) in [
                    (
                        Role::Host,
                        group.hosts,
                        group.host_rate.unwrap_or(0.0),
                        &mut hosts,
                    ),
                    (
                        Role::Viewer,
                        group.viewers,
                        group.viewer_rate.unwrap_or(0.0),
                        &mut viewers,
                    ),
                ] {
                    for seat in 0..count {
                        let letter = if role == Role::Host { 'h' } else { 'v' };
                        list.push((
                            seat,
                            Slot {
                                room,
                                role,
                                rate,
                                publisher,
                                name: format!("{letter}{publisher}"),
                            },
                        ));
                        publisher += 1;
                    }
                }
            }
        }
        // Interleave rooms so that users started early are spread over all rooms: the k-th host
        // to start goes to the k-th room, not to the first room's k-th seat.
        let interleave = |mut seats: Vec<(usize, Slot)>| -> Vec<Slot> {
            seats.sort_by_key(|(seat, slot)| (*seat, slot.room));
            seats
                .into_iter()
                .enumerate()
                .filter(|(n, _)| shard.owns(*n))
                .map(|(_, (_, slot))| slot)
                .collect()
        };
        let (hosts, viewers) = (interleave(hosts), interleave(viewers));
        Self {
            rooms,
            hosts,
            viewers,
            next_host: AtomicUsize::new(0),
            next_viewer: AtomicUsize::new(0),
            next_conn: AtomicUsize::new(0),
            targets,
            binds,
            shard,
            all_members: publisher,
        }
    }

    /// Counts a window message published into room `room` at unix second `sec`.
    pub fn count_published(&self, room: usize, sec: u64) {
        let mut m = self.rooms[room]
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *m.entry(sec).or_default() += 1;
    }

    /// The rooms whose HTTP API publisher runs in this generator (every `total`-th room).
    pub fn api_rooms(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rooms.len()).filter(|r| self.shard.owns(*r))
    }

    /// The publisher id of room `room`'s HTTP API publisher (after every member's id).
    pub fn api_publisher(&self, room: usize) -> u32 {
        self.all_members + room as u32
    }

    /// Hosts in the population.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// Viewers in the population.
    pub fn viewer_count(&self) -> usize {
        self.viewers.len()
    }

    /// The next free seat of `role`, or `None` when all are taken.
    pub fn take(&self, role: Role) -> Option<Slot> {
        let (list, next) = match role {
            Role::Host => (&self.hosts, &self.next_host),
            Role::Viewer => (&self.viewers, &self.next_viewer),
        };
        list.get(next.fetch_add(1, Ordering::Relaxed)).cloned()
    }

    /// Target and source address for the next connection (round robin).
    pub fn route(&self) -> (&Target, Option<Ipv4Addr>) {
        let (i, bind) = self.route_index();
        (&self.targets[i], bind)
    }

    /// [`Plan::route`] with the target's index, so that a caller can move on to the next target.
    pub fn route_index(&self) -> (usize, Option<Ipv4Addr>) {
        let n = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let bind = (!self.binds.is_empty()).then(|| self.binds[n % self.binds.len()]);
        (n % self.targets.len(), bind)
    }
}

/// The fixed times of the run, known once every member has made its first attempt.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The window starts; publishing begins.
    pub start: Instant,
    /// `start` as unix microseconds: the origin of every stamp in payloads.
    pub start_unix_us: u64,
    /// The window ends; no schedule entry at or after it.
    pub end: Instant,
    /// A publisher behind schedule gives up its backlog here.
    pub publish_until: Instant,
    /// The drain ends; receipts after it do not count; the run stops.
    pub drain_end: Instant,
}

impl Window {
    /// The window starting `settle` from now.
    pub fn starting_in(settle: Duration, measure: Duration, drain: Duration) -> Self {
        let now = Instant::now();
        let start = now + settle;
        let start_unix_us = unix_micros() + settle.as_micros() as u64;
        Self::at(start, start_unix_us, measure, drain)
    }

    /// The window starting at wall-clock time `start_unix_us` (`--start-at`); a time already
    /// past starts it now.
    pub fn starting_at(start_unix_us: u64, measure: Duration, drain: Duration) -> Self {
        let now_us = unix_micros();
        if start_unix_us < now_us {
            log::warn!(
                "--start-at passed {:.1} s before every member had made its first attempt: the window starts now, out of line with other generators",
                (now_us - start_unix_us) as f64 / 1e6
            );
        }
        let ahead = Duration::from_micros(start_unix_us.saturating_sub(now_us));
        Self::at(
            Instant::now() + ahead,
            start_unix_us.max(now_us),
            measure,
            drain,
        )
    }

    fn at(start: Instant, start_unix_us: u64, measure: Duration, drain: Duration) -> Self {
        Self {
            start,
            start_unix_us,
            end: start + measure,
            publish_until: start + measure + drain / 2,
            drain_end: start + measure + drain,
        }
    }

    /// The window's length.
    pub fn measure(&self) -> Duration {
        self.end - self.start
    }
}

/// Microseconds since the Unix epoch: the one clock of every stamp (generators on several
/// machines need their clocks synchronized, as NTP keeps them, for end-to-end latency).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An open-loop schedule: a member with `rate` messages per second and a random `phase` (so that
/// members do not publish in lockstep) sends message k at `start + phase + k / rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cadence {
    /// Messages per second, above 0.
    pub rate: f64,
    /// Offset of message 0 from the window start, below `1 / rate`.
    pub phase: Duration,
}

impl Cadence {
    /// When message `k` is due, as an offset from the window start.
    pub fn offset(&self, k: u64) -> Duration {
        self.phase + Duration::from_secs_f64(k as f64 / self.rate)
    }

    /// Messages scheduled inside a window of length `measure`.
    pub fn scheduled(&self, measure: Duration) -> u64 {
        if measure <= self.phase {
            return 0;
        }
        let span = (measure - self.phase).as_secs_f64() * self.rate;
        let n = span.ceil() as u64;
        // ceil(exact integer) lands on the boundary, which is outside the half-open window.
        if self.offset(n.saturating_sub(1)) >= measure {
            n - 1
        } else {
            n
        }
    }
}

/// Tracks first attempts and fixes the window when the last one is in.
#[derive(Debug)]
pub struct Schedule {
    population: usize,
    first_attempts: AtomicUsize,
    settle: Duration,
    measure: Duration,
    drain: Duration,
    /// `--start-at`, unix microseconds.
    start_at: Option<u64>,
    window: watch::Sender<Option<Window>>,
    /// Set when the drain ended by the schedule (not cut short by goose).
    pub complete: AtomicBool,
    /// Cancelled when the run ends (the drain is over): members' goose transactions return at
    /// once instead of at their next tick.
    pub ended: tokio_util::sync::CancellationToken,
}

impl Schedule {
    /// A schedule for `population` members.
    pub fn new(population: usize, settle: Duration, measure: Duration, drain: Duration) -> Self {
        Self {
            population,
            first_attempts: AtomicUsize::new(0),
            settle,
            measure,
            drain,
            start_at: None,
            window: watch::Sender::new(None),
            complete: AtomicBool::new(false),
            ended: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// A member's first attempt ended (either way). Returns the window when this was the last.
    pub fn first_attempt_done(&self) -> Option<Window> {
        let n = self.first_attempts.fetch_add(1, Ordering::AcqRel) + 1;
        if n != self.population {
            return None;
        }
        let w = match self.start_at {
            Some(at) => Window::starting_at(at, self.measure, self.drain),
            None => Window::starting_in(self.settle, self.measure, self.drain),
        };
        self.window.send_replace(Some(w));
        Some(w)
    }

    /// Starts the window at a wall-clock time (unix microseconds) instead of after the settle.
    pub fn with_start_at(mut self, start_at: Option<u64>) -> Self {
        self.start_at = start_at;
        self
    }

    /// The window, once fixed.
    pub fn window(&self) -> Option<Window> {
        *self.window.borrow()
    }

    /// Follows the window being fixed.
    pub fn subscribe(&self) -> watch::Receiver<Option<Window>> {
        self.window.subscribe()
    }

    /// Members that made their first attempt so far.
    pub fn first_attempts(&self) -> usize {
        self.first_attempts.load(Ordering::Acquire)
    }
}

/// A shared handle to the schedule.
pub type SharedSchedule = Arc<Schedule>;

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rooms: usize, hosts: usize, viewers: usize) -> RoomGroup {
        RoomGroup {
            rooms,
            hosts,
            viewers,
            host_rate: Some(2.0),
            viewer_rate: Some(0.0),
        }
    }

    fn t(port: u16) -> Target {
        crate::target::resolve(&format!("ws://127.0.0.1:{port}"), &[]).unwrap()
    }

    fn target() -> Vec<Target> {
        vec![t(1)]
    }

    #[test]
    fn population_layout() {
        let p = Plan::new(
            &[group(1, 2, 3), group(2, 1, 1)],
            "t",
            target(),
            vec![],
            Shard::default(),
        );
        assert_eq!(p.rooms.len(), 3);
        assert_eq!(p.rooms[0].name, "t-g0-0");
        assert_eq!(p.rooms[2].name, "t-g1-1");
        assert_eq!((p.host_count(), p.viewer_count()), (4, 5));
        let mut ids = std::collections::HashSet::new();
        let mut per_room = [0usize; 3];
        while let Some(s) = p.take(Role::Host) {
            assert_eq!(s.role, Role::Host);
            assert_eq!(s.rate, 2.0);
            assert!(ids.insert(s.publisher));
            per_room[s.room] += 1;
        }
        while let Some(s) = p.take(Role::Viewer) {
            assert!(ids.insert(s.publisher));
            per_room[s.room] += 1;
        }
        assert_eq!(per_room, [5, 2, 2]);
        assert!(p.take(Role::Viewer).is_none(), "seats run out");
    }

    #[test]
    fn routes_round_robin() {
        let targets = vec![t(1), t(2)];
        let binds = vec![Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        let p = Plan::new(&[group(1, 1, 1)], "t", targets, binds, Shard::default());
        let a = p.route();
        let b = p.route();
        let c = p.route();
        assert_ne!(a.0.url, b.0.url);
        assert_eq!(a.0.url, c.0.url);
        assert_eq!(a.1, Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(b.1, Some(Ipv4Addr::new(127, 0, 0, 3)));
    }

    #[test]
    fn shards_split_seats_disjointly_and_keep_ids() {
        let groups = [group(1, 2, 1000), group(100, 1, 5)];
        let whole = Plan::new(&groups, "t", target(), vec![], Shard::default());
        let mut all = std::collections::HashSet::new();
        let mut counts = Vec::new();
        for i in 0..3 {
            let p = Plan::new(&groups, "t", target(), vec![], Shard { index: i, total: 3 });
            assert_eq!(
                p.rooms.len(),
                whole.rooms.len(),
                "every shard knows every room"
            );
            assert_eq!(p.all_members, whole.all_members);
            counts.push((p.host_count(), p.viewer_count()));
            for role in [Role::Host, Role::Viewer] {
                while let Some(s) = p.take(role) {
                    assert!(
                        all.insert(s.publisher),
                        "seat {} in two shards",
                        s.publisher
                    );
                }
            }
        }
        assert_eq!(all.len(), whole.host_count() + whole.viewer_count());
        let hosts: Vec<usize> = counts.iter().map(|c| c.0).collect();
        assert_eq!(hosts, [34, 34, 34], "102 hosts, evenly");
        for c in &counts {
            assert!((500..=501).contains(&c.1), "{counts:?}");
        }
        // The HTTP API publishers too: every room exactly once.
        let api: usize = (0..3)
            .map(|i| {
                Plan::new(&groups, "t", target(), vec![], Shard { index: i, total: 3 })
                    .api_rooms()
                    .count()
            })
            .sum();
        assert_eq!(api, 101);
        assert_eq!(whole.api_publisher(0), whole.all_members);
    }

    #[test]
    fn a_start_time_fixes_the_window() {
        let at = unix_micros() + 3_000_000;
        let s = Schedule::new(
            1,
            Duration::from_secs(30),
            Duration::from_secs(5),
            Duration::ZERO,
        )
        .with_start_at(Some(at));
        let w = s.first_attempt_done().unwrap();
        assert_eq!(w.start_unix_us, at, "not the settle");
        let ahead = w.start.saturating_duration_since(Instant::now());
        assert!(ahead > Duration::from_millis(2500) && ahead <= Duration::from_secs(3));
        let past = Window::starting_at(1, Duration::from_secs(1), Duration::ZERO);
        assert!(past.start_unix_us > 1, "a past time starts now");
    }

    #[test]
    fn cadence_counts_what_fits_in_the_window() {
        let c = Cadence {
            rate: 10.0,
            phase: Duration::ZERO,
        };
        assert_eq!(c.scheduled(Duration::from_secs(2)), 20, "0.0 … 1.9 s");
        let c = Cadence {
            rate: 10.0,
            phase: Duration::from_millis(50),
        };
        assert_eq!(c.scheduled(Duration::from_secs(2)), 20, "0.05 … 1.95 s");
        assert_eq!(c.offset(3), Duration::from_millis(350));
        let c = Cadence {
            rate: 0.1,
            phase: Duration::from_secs(7),
        };
        assert_eq!(c.scheduled(Duration::from_secs(5)), 0);
        assert_eq!(c.scheduled(Duration::from_secs(8)), 1);
    }

    #[test]
    fn window_is_fixed_by_the_last_first_attempt() {
        let s = Schedule::new(
            3,
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(2),
        );
        assert!(s.first_attempt_done().is_none());
        assert!(s.first_attempt_done().is_none());
        assert!(s.window().is_none());
        let w = s.first_attempt_done().expect("third of three");
        assert_eq!(w.measure(), Duration::from_secs(5));
        assert_eq!(w.drain_end - w.end, Duration::from_secs(2));
        assert_eq!(w.publish_until - w.end, Duration::from_secs(1));
        assert!(s.window().is_some());
    }
}
