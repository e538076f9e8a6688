//! The member-list check (`--lists`): one connection's view of its room's list, kept as a count
//! and an order-independent fingerprint rather than the list itself (the generator's memory
//! stays O(members)), and the truth it is judged against — the generator's own connected members
//! of each room, kept the same way.
//!
//! A view reads the list with `members` commands (following the cursor), buffers the
//! `members_diff`s that arrive during the read, and then applies those whose `v` is past the
//! read's, as `/client.js` does. Pages with different versions, or a `reset`, mean a re-read;
//! `over_limit` (or `error` `not_listed`) means the room does not list: counted, not judged.

use std::collections::HashMap;
use std::sync::Mutex;

/// Diffs buffered during one read, at most; beyond, they are dropped and the list read again.
pub const MAX_BUFFERED_DIFFS: usize = 256;

/// A list key's 64-bit hash (FNV-1a, then a finalizer so that sums of near keys spread).
pub fn key_hash(key: &str) -> u64 {
    let mut h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// A set of keys as a count and the wrapping sum of their hashes: adding and removing commute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Keys in the set (wrapping, so that a stray leave cannot panic).
    pub count: u64,
    /// Wrapping sum of [`key_hash`] of each key.
    pub sum: u64,
}

impl Fingerprint {
    /// A key joins.
    pub fn add(&mut self, h: u64) {
        self.count = self.count.wrapping_add(1);
        self.sum = self.sum.wrapping_add(h);
    }

    /// A key leaves.
    pub fn remove(&mut self, h: u64) {
        self.count = self.count.wrapping_sub(1);
        self.sum = self.sum.wrapping_sub(h);
    }
}

/// One `members_diff`, with its keys hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// The roster version after it.
    pub v: u64,
    /// Hashes of the joined keys.
    pub joined: Vec<u64>,
    /// Hashes of the left keys.
    pub left: Vec<u64>,
    /// Read the list again.
    pub reset: bool,
    /// The room stopped listing.
    pub over_limit: bool,
}

/// One `members` page, with its keys hashed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// The roster version the page was read at.
    pub v: u64,
    /// Hashes of the page's keys.
    pub keys: Vec<u64>,
    /// The next page's cursor (raw JSON), `None` on the last page.
    pub cursor: Option<String>,
    /// The room is over `--list-max-members`.
    pub over_limit: bool,
}

/// Where a view is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Reading pages: the first page's version, what the pages held so far, the diffs that
    /// came meanwhile (and whether some had to be dropped).
    Reading {
        /// The first page's `v`.
        v: Option<u64>,
        /// The keys of the pages so far.
        fp: Fingerprint,
        /// Diffs waiting for the read.
        diffs: Vec<Diff>,
        /// More than [`MAX_BUFFERED_DIFFS`] came: read again at the end.
        overflowed: bool,
    },
    /// The list at version `v`.
    Holding {
        /// The version.
        v: u64,
        /// The list.
        fp: Fingerprint,
    },
    /// The room does not list (`over_limit`, or `not_listed`).
    NotListing,
}

impl State {
    fn reading() -> Self {
        State::Reading {
            v: None,
            fp: Fingerprint::default(),
            diffs: Vec::new(),
            overflowed: false,
        }
    }
}

/// A connection's view of its room's list.
///
/// A `members_diff` folds every change since the node's previous frame for the room: it holds
/// the changes after the previous frame's `v` up to its own. A fingerprint cannot apply a change
/// twice harmlessly (a list keyed by member can), so a frame applies only when it starts where
/// the view is — the previous frame's `v` is the view's version; a frame that straddles the
/// version a read gave (it holds changes the pages already had) means a re-read. In a room that
/// settles, the view catches up within a frame or two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Where it is.
    pub state: State,
    /// The last frame's `v` that was processed (not buffered): where the next frame starts.
    prev: Option<u64>,
}

/// What a view needs sent: a `members` command with this cursor (raw JSON, `null` first).
pub type Read = Option<String>;

/// How a view compared with the truth at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It matched.
    Right,
    /// It did not.
    Wrong,
    /// The read had not finished.
    Missing,
    /// The room was not listing.
    NotListing,
}

impl View {
    /// A view that starts reading; send `{"type":"members","cursor":null}`.
    pub fn start() -> Self {
        View {
            state: State::reading(),
            prev: None,
        }
    }

    /// The `members` frame that asks for the page at `cursor`.
    pub fn command(cursor: &Read) -> String {
        format!(
            r#"{{"type":"members","cursor":{}}}"#,
            cursor.as_deref().unwrap_or("null")
        )
    }

    fn reread(&mut self, rereads: &mut u64) -> Option<Read> {
        *rereads += 1;
        self.state = State::reading();
        Some(None)
    }

    /// A page came; returns the next read to ask for, if any. Counts a re-read in `rereads`.
    pub fn on_page(&mut self, page: Page, rereads: &mut u64) -> Option<Read> {
        let State::Reading {
            v,
            fp,
            diffs,
            overflowed,
        } = &mut self.state
        else {
            return None; // a page nobody asked for
        };
        if page.over_limit {
            self.state = State::NotListing;
            return None;
        }
        if v.is_some_and(|v0| v0 != page.v) {
            // The roster changed between pages: what the pages hold is no snapshot.
            return self.reread(rereads);
        }
        *v = Some(page.v);
        for k in page.keys {
            fp.add(k);
        }
        if page.cursor.is_some() {
            return Some(page.cursor);
        }
        if *overflowed {
            self.prev = None;
            return self.reread(rereads);
        }
        let (v0, fp0, pending) = (page.v, *fp, std::mem::take(diffs));
        self.state = State::Holding { v: v0, fp: fp0 };
        for d in pending {
            if let Some(read) = self.on_diff(d, rereads) {
                return Some(read);
            }
        }
        None
    }

    /// A `members_diff` came; returns the read to start, if it calls for one.
    pub fn on_diff(&mut self, diff: Diff, rereads: &mut u64) -> Option<Read> {
        if let State::Reading {
            diffs, overflowed, ..
        } = &mut self.state
        {
            if diffs.len() >= MAX_BUFFERED_DIFFS {
                diffs.clear();
                *overflowed = true;
            } else if !*overflowed {
                diffs.push(diff);
            }
            return None;
        }
        let prev = self.prev.replace(diff.v);
        if diff.reset {
            return self.reread(rereads);
        }
        if diff.over_limit {
            self.state = State::NotListing;
            return None;
        }
        let State::Holding { v, fp } = &mut self.state else {
            return None; // lists again after over_limit only with a reset, above
        };
        if diff.v <= *v {
            return None; // the pages had it
        }
        if prev != Some(*v) {
            // It holds changes from before the view's version too.
            return self.reread(rereads);
        }
        for k in diff.joined {
            fp.add(k);
        }
        for k in diff.left {
            fp.remove(k);
        }
        *v = diff.v;
        None
    }

    /// The gateway said `not_listed`.
    pub fn not_listed(&mut self) {
        self.state = State::NotListing;
    }

    /// Judges the view against the room's member count and, when known, its fingerprint.
    pub fn judge(&self, count: u64, truth: Option<Fingerprint>) -> Verdict {
        match &self.state {
            State::Reading { .. } => Verdict::Missing,
            State::NotListing => Verdict::NotListing,
            State::Holding { fp, .. } => {
                let right = fp.count == count && truth.is_none_or(|t| t == *fp);
                if right {
                    Verdict::Right
                } else {
                    Verdict::Wrong
                }
            }
        }
    }
}

/// The generator's own connected members of each room, by list key: a count of connections per
/// key (a user's several connections are one entry) and the rooms' fingerprints. O(members).
#[derive(Debug, Default)]
pub struct Truth {
    rooms: Vec<Mutex<RoomTruth>>,
}

#[derive(Debug, Default)]
struct RoomTruth {
    connections: HashMap<u64, u32>,
    fp: Fingerprint,
}

impl Truth {
    /// The truth of `rooms` rooms, all empty.
    pub fn new(rooms: usize) -> Self {
        Self {
            rooms: (0..rooms).map(|_| Mutex::default()).collect(),
        }
    }

    fn room(&self, room: usize) -> std::sync::MutexGuard<'_, RoomTruth> {
        self.rooms[room].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection with list key hash `h` was welcomed in `room`.
    pub fn join(&self, room: usize, h: u64) {
        let mut r = self.room(room);
        let n = r.connections.entry(h).or_insert(0);
        *n += 1;
        if *n == 1 {
            r.fp.add(h);
        }
    }

    /// A welcomed connection with list key hash `h` ended in `room`.
    pub fn leave(&self, room: usize, h: u64) {
        let mut r = self.room(room);
        let Some(n) = r.connections.get_mut(&h) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            r.connections.remove(&h);
            r.fp.remove(h);
        }
    }

    /// The room's fingerprint now.
    pub fn fingerprint(&self, room: usize) -> Fingerprint {
        self.room(room).fp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(keys: &[&str]) -> Fingerprint {
        let mut f = Fingerprint::default();
        for k in keys {
            f.add(key_hash(k));
        }
        f
    }

    fn page(v: u64, keys: &[&str], cursor: Option<&str>) -> Page {
        Page {
            v,
            keys: keys.iter().map(|k| key_hash(k)).collect(),
            cursor: cursor.map(str::to_string),
            over_limit: false,
        }
    }

    fn diff(v: u64, joined: &[&str], left: &[&str]) -> Diff {
        Diff {
            v,
            joined: joined.iter().map(|k| key_hash(k)).collect(),
            left: left.iter().map(|k| key_hash(k)).collect(),
            ..Diff::default()
        }
    }

    #[test]
    fn fingerprints_do_not_depend_on_order() {
        let mut a = fp(&["u1", "u2", "u3"]);
        let b = fp(&["u3", "u1", "u2"]);
        assert_eq!(a, b);
        a.remove(key_hash("u2"));
        assert_eq!(a, fp(&["u3", "u1"]));
        assert_ne!(a, fp(&["u3", "u2"]));
        assert_ne!(key_hash("conn:n1-1"), key_hash("conn:n1-2"));
    }

    #[test]
    fn a_paged_read_then_diffs_by_version() {
        let mut rereads = 0;
        let mut view = View::start();
        assert_eq!(View::command(&None), r#"{"type":"members","cursor":null}"#);
        assert_eq!(
            view.on_page(page(5, &["a", "b"], Some("\"17\"")), &mut rereads),
            Some(Some("\"17\"".into()))
        );
        assert_eq!(
            View::command(&Some("\"17\"".into())),
            r#"{"type":"members","cursor":"17"}"#
        );
        // Diffs during the read wait: one at the read's version (already in the pages), one past.
        assert_eq!(view.on_diff(diff(5, &["c"], &[]), &mut rereads), None);
        assert_eq!(view.on_diff(diff(6, &["d"], &["a"]), &mut rereads), None);
        assert_eq!(view.on_page(page(5, &["c"], None), &mut rereads), None);
        assert_eq!(
            view.state,
            State::Holding {
                v: 6,
                fp: fp(&["b", "c", "d"])
            }
        );
        // An old diff is ignored; a newer one applies.
        view.on_diff(diff(6, &["x"], &[]), &mut rereads);
        view.on_diff(diff(7, &["e"], &["b"]), &mut rereads);
        let truth = fp(&["c", "d", "e"]);
        assert_eq!(view.judge(3, Some(truth)), Verdict::Right);
        assert_eq!(view.judge(3, None), Verdict::Right);
        assert_eq!(view.judge(4, None), Verdict::Wrong);
        assert_eq!(view.judge(3, Some(fp(&["c", "d", "f"]))), Verdict::Wrong);
        assert_eq!(rereads, 0);
    }

    #[test]
    fn a_frame_that_straddles_the_reads_version_reads_again() {
        let mut rereads = 0;
        let mut view = View::start();
        // Read at v8; the first frame (v10) may hold changes from before v8, already paged.
        view.on_page(page(8, &["a", "b"], None), &mut rereads);
        assert_eq!(
            view.on_diff(diff(10, &["b", "c"], &[]), &mut rereads),
            Some(None)
        );
        assert_eq!(rereads, 1);
        view.on_page(page(10, &["a", "b", "c"], None), &mut rereads);
        // The next frame starts at v10, where the view is: it applies.
        assert_eq!(view.on_diff(diff(12, &["d"], &["a"]), &mut rereads), None);
        assert_eq!(view.judge(3, Some(fp(&["b", "c", "d"]))), Verdict::Right);
        // A read that lands inside the next frame (v13 of 12..14): a frame ending at the read's
        // version is skipped but tells where the next one starts.
        view.on_diff(
            Diff {
                v: 13,
                reset: true,
                ..Diff::default()
            },
            &mut rereads,
        );
        view.on_page(page(14, &["b", "c", "d", "e"], None), &mut rereads);
        assert_eq!(view.on_diff(diff(14, &["e"], &[]), &mut rereads), None);
        assert_eq!(view.on_diff(diff(15, &["f"], &[]), &mut rereads), None);
        assert_eq!(view.judge(5, None), Verdict::Right);
        assert_eq!(rereads, 2);
    }

    #[test]
    fn pages_of_different_versions_and_resets_read_again() {
        let mut rereads = 0;
        let mut view = View::start();
        view.on_page(page(5, &["a"], Some("1")), &mut rereads);
        assert_eq!(
            view.on_page(page(6, &["b"], None), &mut rereads),
            Some(None)
        );
        assert_eq!(rereads, 1);
        assert_eq!(view.judge(0, None), Verdict::Missing);
        view.on_page(page(6, &["a", "b"], None), &mut rereads);
        assert_eq!(view.judge(2, Some(fp(&["a", "b"]))), Verdict::Right);
        let reset = Diff {
            v: 9,
            reset: true,
            ..Diff::default()
        };
        assert_eq!(view.on_diff(reset, &mut rereads), Some(None));
        assert_eq!(rereads, 2);
        assert!(matches!(view.state, State::Reading { v: None, .. }));
        // A reset buffered during a read applies after it: a third read.
        view.on_diff(
            Diff {
                v: 10,
                reset: true,
                ..Diff::default()
            },
            &mut rereads,
        );
        assert_eq!(
            view.on_page(page(9, &["a"], None), &mut rereads),
            Some(None)
        );
        assert_eq!(rereads, 3);
    }

    #[test]
    fn over_limit_is_not_judged() {
        let mut rereads = 0;
        let mut view = View::start();
        let over = Page {
            over_limit: true,
            ..Page::default()
        };
        assert_eq!(view.on_page(over, &mut rereads), None);
        assert_eq!(view.judge(3, None), Verdict::NotListing);
        let mut view = View::start();
        view.on_page(page(1, &["a"], None), &mut rereads);
        view.on_diff(
            Diff {
                v: 2,
                over_limit: true,
                ..Diff::default()
            },
            &mut rereads,
        );
        assert_eq!(view.judge(1, None), Verdict::NotListing);
        // Back under the bound: a reset, and the room lists again.
        assert_eq!(
            view.on_diff(
                Diff {
                    v: 3,
                    reset: true,
                    ..Diff::default()
                },
                &mut rereads
            ),
            Some(None)
        );
        let mut view = View::start();
        view.not_listed();
        assert_eq!(view.judge(1, None), Verdict::NotListing);
    }

    #[test]
    fn buffered_diffs_are_bounded_and_overflow_reads_again() {
        let mut rereads = 0;
        let mut view = View::start();
        view.on_page(page(1, &["a"], Some("1")), &mut rereads);
        for i in 0..=MAX_BUFFERED_DIFFS as u64 {
            view.on_diff(diff(2 + i, &["x"], &[]), &mut rereads);
            if let State::Reading { diffs, .. } = &view.state {
                assert!(diffs.len() <= MAX_BUFFERED_DIFFS);
            }
        }
        assert!(matches!(
            &view.state,
            State::Reading {
                overflowed: true,
                ..
            }
        ));
        assert_eq!(
            view.on_page(page(1, &["b"], None), &mut rereads),
            Some(None)
        );
        assert_eq!(rereads, 1);
        assert_eq!(view, View::start());
    }

    #[test]
    fn the_truth_counts_a_user_once() {
        let t = Truth::new(2);
        let (u, c) = (key_hash("lt-r0-v1"), key_hash("conn:n1-4"));
        t.join(0, u);
        t.join(0, u);
        t.join(0, c);
        assert_eq!(t.fingerprint(0), fp(&["lt-r0-v1", "conn:n1-4"]));
        t.leave(0, u);
        assert_eq!(t.fingerprint(0), fp(&["lt-r0-v1", "conn:n1-4"]));
        t.leave(0, u);
        t.leave(0, u); // a stray leave changes nothing
        assert_eq!(t.fingerprint(0), fp(&["conn:n1-4"]));
        assert_eq!(t.fingerprint(1), Fingerprint::default());
    }
}
