//! Sequence accounting for one receiving member: for each publisher it hears, which sequence
//! numbers arrived, which are missing, and which came twice or out of order. Pure bookkeeping,
//! no I/O, so every rule is unit-tested.
//!
//! Publishers number their messages 0, 1, 2, … across reconnects (a message that failed to send
//! is sent again with the same number), so any hole is a message the gateway did not deliver.
//!
//! Memory is O(publishers heard), never O(deliveries): a publisher costs its next number, and
//! after its first hole a ring of [`REORDER_WINDOW`] bits (128 bytes) marking the numbers still
//! missing among the last [`REORDER_WINDOW`]. A hole that falls out of the ring stays counted as
//! open; if its message still comes, it is [`Arrival::Stale`] (a reorder that late cannot be
//! told from a duplicate, and for a live room it is a loss).

use rustc_hash::FxHashMap;

/// How many numbers behind a publisher's newest a missing one is still tracked.
pub const REORDER_WINDOW: u64 = 1024;

/// `REORDER_WINDOW` bits.
const RING_WORDS: usize = (REORDER_WINDOW / 64) as usize;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// The next number, as expected.
    InOrder,
    /// Ahead of the next number: this many messages are now missing before it.
    Gap(u64),
    /// A number that was missing: it came late, out of order.
    Reordered,
    /// A number that had already arrived.
    Duplicate,
    /// A number more than [`REORDER_WINDOW`] behind the newest: no longer tracked, so neither
    /// delivered nor a duplicate.
    Stale,
}

/// One publisher as seen by one receiver.
#[derive(Debug, Clone, Default)]
struct Track {
    /// One past the highest number seen.
    next: u64,
    /// Bit `n % REORDER_WINDOW` set: number `n` in `[next - REORDER_WINDOW, next)` is missing.
    /// `None` until the first hole: an in-order stream costs no ring.
    missing: Option<Box<[u64; RING_WORDS]>>,
    /// Bits set in `missing`.
    holes: u64,
}

impl Track {
    fn bit(n: u64) -> (usize, u64) {
        let i = n % REORDER_WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Clears `n`'s bit; returns whether it was set.
    fn take(&mut self, n: u64) -> bool {
        let Some(ring) = self.missing.as_mut() else {
            return false;
        };
        let (w, b) = Self::bit(n);
        let was = ring[w] & b != 0;
        ring[w] &= !b;
        if was {
            self.holes -= 1;
        }
        was
    }

    fn mark(&mut self, n: u64) {
        let ring = self
            .missing
            .get_or_insert_with(|| Box::new([0; RING_WORDS]));
        let (w, b) = Self::bit(n);
        ring[w] |= b;
        self.holes += 1;
    }

    /// `seq >= next` arrived: the numbers in between become missing, and the ones that leave
    /// the window with their bit still set become expired holes (returned).
    fn advance(&mut self, seq: u64) -> u64 {
        let to = seq + 1;
        let mut expired = 0;
        let mut from = self.next;
        if to - from > REORDER_WINDOW {
            // The whole ring leaves the window; numbers too far behind `seq` are missing and
            // expired at once.
            expired += self.holes;
            self.holes = 0;
            self.missing = self.missing.take().map(|_| Box::new([0; RING_WORDS]));
            expired += to - REORDER_WINDOW - from;
            from = to - REORDER_WINDOW;
        }
        for n in from..to {
            // `n` takes the place of `n - REORDER_WINDOW`, which leaves the window.
            if self.take(n) {
                expired += 1;
            }
            if n != seq {
                self.mark(n);
            }
        }
        self.next = to;
        expired
    }
}

/// A receiver's counts over all its publishers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Distinct messages received.
    pub unique: u64,
    /// Messages received again.
    pub duplicates: u64,
    /// Messages that arrived after a higher number from the same publisher.
    pub reordered: u64,
    /// Times a hole opened (a number skipped ahead).
    pub gaps: u64,
    /// Messages that arrived more than [`REORDER_WINDOW`] numbers late (see [`Arrival::Stale`]).
    pub stale: u64,
}

/// Sequence tracking for one receiving member.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By publisher id. Fx, not SipHash: looked up once per delivery with our own ids as keys
    /// (nothing to fear from chosen keys), and SipHash was most of `record`'s own time.
    tracks: FxHashMap<u32, Track>,
    counts: Counts,
    /// Holes that fell out of their publisher's window unfilled.
    expired_holes: u64,
    /// Whether the receiver was a member before the first message of the window: then every
    /// publisher's first number is 0 and a later first arrival is a gap. A member that joined
    /// later starts each publisher at whatever it first hears.
    from_zero: bool,
}

impl Ledger {
    /// A ledger; `from_zero` when the receiver was a member before anything was published.
    pub fn new(from_zero: bool) -> Self {
        Self {
            from_zero,
            ..Self::default()
        }
    }

    /// Records message `seq` of `publisher`.
    pub fn record(&mut self, publisher: u32, seq: u64) -> Arrival {
        let from_zero = self.from_zero;
        let track = self.tracks.entry(publisher).or_insert_with(|| Track {
            next: if from_zero { 0 } else { seq },
            ..Track::default()
        });
        let arrival = if seq == track.next {
            self.expired_holes += track.advance(seq);
            Arrival::InOrder
        } else if seq > track.next {
            let skipped = seq - track.next;
            self.expired_holes += track.advance(seq);
            Arrival::Gap(skipped)
        } else if seq + REORDER_WINDOW < track.next {
            Arrival::Stale
        } else if track.take(seq) {
            Arrival::Reordered
        } else {
            Arrival::Duplicate
        };
        match arrival {
            Arrival::InOrder => self.counts.unique += 1,
            Arrival::Gap(_) => {
                self.counts.unique += 1;
                self.counts.gaps += 1;
            }
            Arrival::Reordered => {
                self.counts.unique += 1;
                self.counts.reordered += 1;
            }
            Arrival::Duplicate => self.counts.duplicates += 1,
            Arrival::Stale => self.counts.stale += 1,
        }
        arrival
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Numbers still missing inside the ranges seen (holes that never filled, including those
    /// that fell out of the window). Messages lost at the end of a publisher's run leave no
    /// hole; the room totals catch those.
    pub fn open_holes(&self) -> u64 {
        self.expired_holes + self.tracks.values().map(|t| t.holes).sum::<u64>()
    }

    /// Publishers heard from.
    pub fn publishers(&self) -> usize {
        self.tracks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream() {
        let mut l = Ledger::new(true);
        for s in 0..5 {
            assert_eq!(l.record(7, s), Arrival::InOrder);
        }
        assert_eq!(
            l.counts(),
            Counts {
                unique: 5,
                ..Counts::default()
            }
        );
        assert_eq!(l.open_holes(), 0);
    }

    #[test]
    fn gap_then_late_arrival_is_a_reorder() {
        let mut l = Ledger::new(true);
        assert_eq!(l.record(1, 0), Arrival::InOrder);
        assert_eq!(l.record(1, 3), Arrival::Gap(2));
        assert_eq!(l.open_holes(), 2);
        assert_eq!(l.record(1, 1), Arrival::Reordered);
        assert_eq!(l.open_holes(), 1);
        assert_eq!(l.record(1, 4), Arrival::InOrder);
        let c = l.counts();
        assert_eq!((c.unique, c.gaps, c.reordered, c.duplicates), (4, 1, 1, 0));
        assert_eq!(l.open_holes(), 1, "2 never came");
    }

    #[test]
    fn duplicates() {
        let mut l = Ledger::new(true);
        l.record(1, 0);
        l.record(1, 1);
        assert_eq!(l.record(1, 1), Arrival::Duplicate);
        assert_eq!(l.record(1, 0), Arrival::Duplicate);
        l.record(1, 5);
        l.record(1, 3);
        assert_eq!(l.record(1, 3), Arrival::Duplicate, "a filled hole twice");
        let c = l.counts();
        assert_eq!((c.unique, c.duplicates, c.reordered), (4, 3, 1));
    }

    #[test]
    fn publishers_are_independent() {
        let mut l = Ledger::new(true);
        assert_eq!(l.record(1, 0), Arrival::InOrder);
        assert_eq!(l.record(2, 0), Arrival::InOrder);
        assert_eq!(l.record(2, 1), Arrival::InOrder);
        assert_eq!(l.record(1, 1), Arrival::InOrder);
        assert_eq!(l.publishers(), 2);
    }

    #[test]
    fn a_member_from_the_start_misses_the_first_message() {
        let mut l = Ledger::new(true);
        assert_eq!(l.record(1, 2), Arrival::Gap(2));
        assert_eq!(l.open_holes(), 2);
    }

    #[test]
    fn holes_are_tracked_within_the_window_and_expire_beyond_it() {
        let mut l = Ledger::new(true);
        assert_eq!(l.record(1, 0), Arrival::InOrder);
        // 1 and 2 missing.
        assert_eq!(l.record(1, 3), Arrival::Gap(2));
        // Up to 1 + REORDER_WINDOW: 1 leaves the window (an open hole still), 2 stays in it.
        for s in 4..(2 + REORDER_WINDOW) {
            assert_eq!(l.record(1, s), Arrival::InOrder);
        }
        assert_eq!(l.open_holes(), 2);
        assert_eq!(
            l.record(1, 2),
            Arrival::Reordered,
            "2 is still in the window"
        );
        assert_eq!(l.record(1, 2 + REORDER_WINDOW), Arrival::InOrder);
        assert_eq!(l.open_holes(), 1);
        assert_eq!(l.record(1, 1), Arrival::Stale);
        assert_eq!(l.record(1, 0), Arrival::Stale);
        let c = l.counts();
        assert_eq!(
            (c.unique, c.reordered, c.stale, c.duplicates),
            (REORDER_WINDOW + 2, 1, 2, 0)
        );
    }

    #[test]
    fn a_jump_beyond_the_window_counts_every_skipped_number() {
        let mut l = Ledger::new(true);
        l.record(1, 0);
        l.record(1, 2); // hole 1
        assert_eq!(
            l.record(1, 10 * REORDER_WINDOW),
            Arrival::Gap(10 * REORDER_WINDOW - 3)
        );
        assert_eq!(l.open_holes(), 10 * REORDER_WINDOW - 2);
        assert_eq!(l.record(1, 10 * REORDER_WINDOW - 1), Arrival::Reordered);
        assert_eq!(l.record(1, 9 * REORDER_WINDOW + 1), Arrival::Reordered);
        assert_eq!(l.record(1, 9 * REORDER_WINDOW), Arrival::Stale);
        assert_eq!(l.open_holes(), 10 * REORDER_WINDOW - 4);
        assert_eq!(l.counts().gaps, 2);
    }

    #[test]
    fn a_late_member_starts_where_it_joined() {
        let mut l = Ledger::new(false);
        assert_eq!(l.record(1, 40), Arrival::InOrder);
        assert_eq!(l.record(1, 41), Arrival::InOrder);
        // Before it joined: it cannot tell a reorder from a duplicate, which is why only members
        // from the start are reported.
        assert_eq!(l.record(1, 39), Arrival::Duplicate);
        assert_eq!(l.open_holes(), 0);
    }
}
