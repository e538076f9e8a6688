//! The node's write window (`--write-window`): a leading-edge throttle of each busy room's
//! fan-outs, so that the members of a room that sends many messages a second get several messages
//! per write instead of one syscall each.
//!
//! Only *hot* rooms are throttled: rooms that sent at least [`BATCH_FROM`] messages per window on
//! average over the last complete [`RATE_BUCKET`] (100 messages a second with the default 20 ms
//! window). Below that a batch would rarely hold more than one message, and waiting would only
//! cost latency, so every message of a quieter room goes out at once, however bursty it is.
//!
//! In a hot room a message goes out at once when the room's last fan-out is at least one window
//! old; otherwise it waits with the room's other pending messages until the window since that
//! last fan-out is over, and they go out together: each idle member gets all of them in one
//! vectored write. A hot room therefore costs one write per member per window whatever its rate,
//! for at most one window of added latency.
//!
//! A room is fanned out by one task at a time (`busy`), so its messages never overtake each
//! other: a message arriving while the room is being fanned out waits for the next turn. The
//! pending messages of a room are bounded: at [`FLUSH_AT`] the receiving task fans them out
//! itself at once (if nobody else is), and beyond [`MAX_PENDING`] (the node cannot keep up with
//! the room at all) a message is dropped and counted, as a full outbox is.
//!
//! Window 0 turns it off: every message goes out at once, as it arrives.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::wire::history::Stamp;
use crate::wire::protocol::RoomName;

/// Messages per window (on average over one [`RATE_BUCKET`]) from which a room is hot, and
/// batched.
pub const BATCH_FROM: u64 = 2;
/// How long a room's messages are counted to tell whether it is hot; a room turns hot (or cold)
/// within two buckets of its rate changing.
pub const RATE_BUCKET: Duration = Duration::from_millis(200);

/// Pending messages of one room at which the receiving task fans them out without waiting for
/// the window's end.
pub const FLUSH_AT: usize = 64;
/// Pending messages of one room beyond which a message is dropped (the room's fan-out cannot keep
/// up with its input).
pub const MAX_PENDING: usize = 4096;

/// Messages of one room, in order, with their publish times (µs).
#[derive(Debug, Default)]
pub struct Batch {
    /// Frame and stamp of each message.
    pub msgs: Vec<(Bytes, Option<Stamp>)>,
    /// When each was published (µs since the epoch), for the latency histogram.
    pub ts: Vec<u64>,
}

impl Batch {
    /// A batch of one message.
    pub fn one(frame: Bytes, stamp: Option<Stamp>, ts: u64) -> Self {
        Self {
            msgs: vec![(frame, stamp)],
            ts: vec![ts],
        }
    }

    fn push(&mut self, frame: Bytes, stamp: Option<Stamp>, ts: u64) {
        self.msgs.push((frame, stamp));
        self.ts.push(ts);
    }

    fn len(&self) -> usize {
        self.msgs.len()
    }
}

/// What to do with an offered message.
#[derive(Debug)]
pub enum Offer {
    /// Fan these out now (in order), then call [`WriteWindow::done`].
    Now(Batch),
    /// It waits for the room's next turn.
    Pending,
    /// Dropped: the room has [`MAX_PENDING`] messages waiting.
    Full,
}

#[derive(Debug, Default)]
struct RoomWindow {
    /// When the room's last fan-out started (ms on [`crate::wire::clock::monotonic_millis`]'s clock).
    last: u64,
    /// A task is fanning the room out now.
    busy: bool,
    /// Whether the room is in `due`.
    scheduled: bool,
    pending: Batch,
    /// Start of the current rate bucket (ms) and messages counted in it.
    bucket_start: u64,
    bucket_count: u64,
    /// The last complete bucket had at least [`BATCH_FROM`] messages per window.
    hot: bool,
}

impl RoomWindow {
    /// Counts one message at `now`; closes the bucket when it is over.
    fn count(&mut self, now: u64, window_ms: u64, bucket_ms: u64) {
        let elapsed = now.saturating_sub(self.bucket_start);
        if elapsed >= bucket_ms {
            // More than one bucket since the last count: the last complete one was empty.
            self.hot =
                elapsed < 2 * bucket_ms && self.bucket_count * window_ms >= BATCH_FROM * bucket_ms;
            self.bucket_start = now;
            self.bucket_count = 0;
        }
        self.bucket_count += 1;
    }
}

#[derive(Debug, Default)]
struct State {
    rooms: HashMap<RoomName, RoomWindow>,
    /// Rooms with pending messages, by the time their window ends.
    due: BinaryHeap<Reverse<(u64, RoomName)>>,
    /// Room count after the last pruning of idle rooms.
    pruned_len: usize,
}

/// The write windows of every room with recent traffic on this node.
#[derive(Debug)]
pub struct WriteWindow {
    window_ms: u64,
    /// [`RATE_BUCKET`] in ms (shorter or longer in tests).
    bucket_ms: u64,
    state: Mutex<State>,
    /// Wakes the window's task when a room becomes due earlier than it waits for.
    wake: Notify,
}

impl WriteWindow {
    /// A write window of `window` (0 = off; rounded to milliseconds).
    pub fn new(window: Duration) -> Self {
        Self {
            window_ms: window.as_millis() as u64,
            bucket_ms: RATE_BUCKET.as_millis() as u64,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    /// Counts rooms' rates over `bucket` instead of [`RATE_BUCKET`].
    pub fn with_rate_bucket(mut self, bucket: Duration) -> Self {
        self.bucket_ms = (bucket.as_millis() as u64).max(1);
        self
    }

    /// Whether the window is on.
    pub fn is_on(&self) -> bool {
        self.window_ms > 0
    }

    /// Offers a message of `room`: see [`Offer`].
    pub fn offer(&self, room: &RoomName, frame: Bytes, stamp: Option<Stamp>, ts: u64) -> Offer {
        if self.window_ms == 0 {
            return Offer::Now(Batch::one(frame, stamp, ts));
        }
        let now = crate::wire::clock::monotonic_millis();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        if !st.rooms.contains_key(room) {
            prune(st, now, self.window_ms, self.bucket_ms);
        }
        let w = st.rooms.entry(room.clone()).or_insert_with(|| RoomWindow {
            bucket_start: now,
            ..RoomWindow::default()
        });
        w.count(now, self.window_ms, self.bucket_ms);
        let quiet = !w.hot || w.last == 0 || now.saturating_sub(w.last) >= self.window_ms;
        if !w.busy && w.pending.len() == 0 && quiet {
            w.busy = true;
            w.last = now.max(1);
            return Offer::Now(Batch::one(frame, stamp, ts));
        }
        if w.pending.len() >= MAX_PENDING {
            return Offer::Full;
        }
        w.pending.push(frame, stamp, ts);
        if !w.busy && w.pending.len() >= FLUSH_AT {
            w.busy = true;
            w.last = now.max(1);
            return Offer::Now(std::mem::take(&mut w.pending));
        }
        if !w.busy && !w.scheduled {
            w.scheduled = true;
            let at = w.last + self.window_ms;
            let earliest = st.due.peek().map(|Reverse((t, _))| *t);
            st.due.push(Reverse((at, room.clone())));
            if earliest.is_none_or(|t| at < t) {
                self.wake.notify_one();
            }
        }
        Offer::Pending
    }

    /// Ends a fan-out of `room` that [`WriteWindow::offer`] or [`WriteWindow::next_due`] started;
    /// schedules what arrived meanwhile.
    pub fn done(&self, room: &RoomName) {
        if self.window_ms == 0 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        let Some(w) = st.rooms.get_mut(room) else {
            return;
        };
        w.busy = false;
        if w.pending.len() > 0 && !w.scheduled {
            w.scheduled = true;
            // What arrived during the fan-out: a hot room's at the end of its window, a cold
            // room's right away (it only waited so as not to overtake the fan-out).
            let at = if w.hot {
                w.last + self.window_ms
            } else {
                crate::wire::clock::monotonic_millis()
            };
            st.due.push(Reverse((at, room.clone())));
            self.wake.notify_one();
        }
    }

    /// Waits for the next room whose window is over and takes its pending messages; the caller
    /// fans them out, then calls [`WriteWindow::done`]. Cancel-safe: messages are taken only in
    /// the poll that returns them.
    pub async fn next_due(&self) -> (RoomName, Batch) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let wait = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = crate::wire::clock::monotonic_millis();
                match take_due(&mut st, now) {
                    Ok(found) => return found,
                    Err(wait) => wait,
                }
            };
            match wait {
                Some(ms) => {
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(ms)) => {}
                        () = &mut woken => {}
                    }
                }
                None => woken.await,
            }
        }
    }

    /// Takes every room's pending messages, at once (the node is stopping).
    pub fn take_all(&self) -> Vec<(RoomName, Batch)> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.due.clear();
        st.rooms
            .iter_mut()
            .filter(|(_, w)| w.pending.len() > 0)
            .map(|(room, w)| {
                w.scheduled = false;
                (room.clone(), std::mem::take(&mut w.pending))
            })
            .collect()
    }

    /// Rooms the window remembers (for tests).
    #[cfg(test)]
    fn rooms(&self) -> usize {
        self.state.lock().unwrap().rooms.len()
    }
}

/// The first due room's messages (marking it busy), or how long to wait for one (`None`: none is
/// scheduled).
fn take_due(st: &mut State, now: u64) -> Result<(RoomName, Batch), Option<u64>> {
    while let Some(Reverse((at, _))) = st.due.peek() {
        if *at > now {
            return Err(Some(*at - now));
        }
        let Some(Reverse((_, room))) = st.due.pop() else {
            break;
        };
        let Some(w) = st.rooms.get_mut(&room) else {
            continue;
        };
        w.scheduled = false;
        if w.busy || w.pending.len() == 0 {
            // Fanned out by the receiving task meanwhile; `done` schedules what is left.
            continue;
        }
        w.busy = true;
        w.last = now.max(1);
        return Ok((room, std::mem::take(&mut w.pending)));
    }
    Err(None)
}

/// Forgets rooms with nothing pending whose window and rate buckets are over, once the map has
/// doubled since the last pruning (amortised O(1) per message).
fn prune(st: &mut State, now: u64, window_ms: u64, bucket_ms: u64) {
    if st.rooms.len() < 2 * st.pruned_len + 64 {
        return;
    }
    st.rooms.retain(|_, w| {
        w.busy
            || w.scheduled
            || w.pending.len() > 0
            || now.saturating_sub(w.last) < window_ms
            || now.saturating_sub(w.bucket_start) < 2 * bucket_ms
    });
    st.pruned_len = st.rooms.len();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> RoomName {
        RoomName::parse(s).unwrap()
    }

    fn frame(n: u64) -> Bytes {
        Bytes::from(n.to_string())
    }

    fn texts(b: &Batch) -> Vec<String> {
        b.msgs
            .iter()
            .map(|(f, _)| String::from_utf8(f.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn off_sends_everything_at_once() {
        let w = WriteWindow::new(Duration::ZERO);
        for n in 0..3 {
            assert!(
                matches!(w.offer(&room("r"), frame(n), None, 0), Offer::Now(b) if b.len() == 1)
            );
        }
    }

    /// A window with 400 ms rate buckets (room to run a test's steps within one), and a room
    /// made hot in it: enough messages for the threshold, then a bucket's wait.
    async fn hot(window: Duration, r: &RoomName) -> WriteWindow {
        let w = WriteWindow::new(window).with_rate_bucket(Duration::from_millis(400));
        let needed = (BATCH_FROM * 400).div_ceil(window.as_millis() as u64);
        for n in 0..needed {
            assert!(
                matches!(w.offer(r, frame(n), None, 0), Offer::Now(_)),
                "a cold room is never held"
            );
            w.done(r);
        }
        tokio::time::sleep(Duration::from_millis(410)).await;
        w
    }

    #[tokio::test]
    async fn a_cold_room_is_never_held_however_bursty() {
        let w = WriteWindow::new(Duration::from_millis(30));
        let r = room("r");
        for n in 0..5 {
            assert!(matches!(w.offer(&r, frame(n), None, 0), Offer::Now(_)));
            w.done(&r);
        }
        // One arriving during a fan-out waits for it, then goes out at once, not a window later.
        assert!(matches!(w.offer(&r, frame(5), None, 0), Offer::Now(_)));
        assert!(matches!(w.offer(&r, frame(6), None, 0), Offer::Pending));
        w.done(&r);
        let started = std::time::Instant::now();
        let (_, batch) = w.next_due().await;
        assert_eq!(texts(&batch), ["6"]);
        assert!(started.elapsed() < Duration::from_millis(20));
    }

    #[tokio::test]
    async fn a_hot_room_gets_its_messages_together_after_one_window_in_order() {
        let r = room("r");
        let w = hot(Duration::from_millis(30), &r).await;
        let Offer::Now(first) = w.offer(&r, frame(0), None, 0) else {
            panic!("a window after the last fan-out, a message goes out at once");
        };
        assert_eq!(texts(&first), ["0"]);
        // Arrives during the first fan-out: waits, even though nothing is due yet.
        assert!(matches!(w.offer(&r, frame(1), None, 0), Offer::Pending));
        w.done(&r);
        for n in 2..5 {
            assert!(matches!(w.offer(&r, frame(n), None, 0), Offer::Pending));
        }
        // Another, cold room is not held up by the hot one.
        assert!(matches!(
            w.offer(&room("q"), frame(9), None, 0),
            Offer::Now(_)
        ));
        w.done(&room("q"));
        let started = std::time::Instant::now();
        let (due, batch) = w.next_due().await;
        let waited = started.elapsed();
        assert_eq!(due, r);
        assert_eq!(texts(&batch), ["1", "2", "3", "4"]);
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        // While that batch is out, the next message waits for the room's next turn.
        assert!(matches!(w.offer(&r, frame(5), None, 0), Offer::Pending));
        w.done(&r);
        let (_, batch) = w.next_due().await;
        assert_eq!(texts(&batch), ["5"]);
        w.done(&r);
    }

    #[tokio::test]
    async fn a_room_flushes_early_at_flush_at_and_drops_beyond_max_pending() {
        let r = room("r");
        // Hot, and its last fan-out (warming up) less than a window ago: messages wait.
        let w = hot(Duration::from_secs(60), &r).await;
        for n in 1..FLUSH_AT as u64 {
            assert!(matches!(w.offer(&r, frame(n), None, 0), Offer::Pending));
        }
        // The FLUSH_AT-th pending message: the receiving task takes them all, without waiting a
        // minute.
        let Offer::Now(batch) = w.offer(&r, frame(FLUSH_AT as u64), None, 0) else {
            panic!("not flushed at FLUSH_AT");
        };
        assert_eq!(batch.len(), FLUSH_AT);
        assert_eq!(texts(&batch)[0], "1");
        // While that fan-out runs (busy), messages wait up to MAX_PENDING, then are refused.
        for n in 0..MAX_PENDING as u64 {
            assert!(matches!(w.offer(&r, frame(n), None, 0), Offer::Pending));
        }
        assert!(matches!(w.offer(&r, frame(0), None, 0), Offer::Full));
        w.done(&r);
        let all = w.take_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.len(), MAX_PENDING);
    }

    #[test]
    fn idle_rooms_are_forgotten() {
        let w =
            WriteWindow::new(Duration::from_millis(1)).with_rate_bucket(Duration::from_millis(1));
        for n in 0..64 {
            let r = room(&format!("r{n}"));
            assert!(matches!(w.offer(&r, frame(0), None, 0), Offer::Now(_)));
            w.done(&r);
        }
        std::thread::sleep(Duration::from_millis(5));
        for n in 0..1000 {
            let r = room(&format!("s{n}"));
            assert!(matches!(w.offer(&r, frame(0), None, 0), Offer::Now(_)));
            w.done(&r);
            if n % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert!(w.rooms() < 400, "{} rooms remembered", w.rooms());
    }
}
