//! Sequence accounting for one receiving member: for each publisher it hears, which sequence
//! numbers arrived, which are missing, and which came twice or out of order. Pure bookkeeping,
//! no I/O, so every rule is unit-tested.
//!
//! Publishers number their messages 0, 1, 2, … across reconnects (a message that failed to send
//! is sent again with the same number), so any hole is a message the gateway did not deliver.

use std::collections::{BTreeSet, HashMap};

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
}

/// One publisher as seen by one receiver.
#[derive(Debug, Clone, Default)]
struct Track {
    /// One past the highest number seen.
    next: u64,
    /// Numbers below `next` that have not arrived. Bounded by what the publisher sent.
    missing: BTreeSet<u64>,
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
}

/// Sequence tracking for one receiving member.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By publisher id.
    tracks: HashMap<u32, Track>,
    counts: Counts,
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
            missing: BTreeSet::new(),
        });
        let arrival = if seq == track.next {
            track.next += 1;
            Arrival::InOrder
        } else if seq > track.next {
            let skipped = seq - track.next;
            track.missing.extend(track.next..seq);
            track.next = seq + 1;
            Arrival::Gap(skipped)
        } else if track.missing.remove(&seq) {
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
        }
        arrival
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Numbers still missing inside the ranges seen (holes that never filled). Messages lost at
    /// the end of a publisher's run leave no hole; the room totals catch those.
    pub fn open_holes(&self) -> u64 {
        self.tracks.values().map(|t| t.missing.len() as u64).sum()
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
