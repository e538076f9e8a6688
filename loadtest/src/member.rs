//! A member's identity, which outlives its connections (a goose user carries one or several): its seat (room, role, rate,
//! publisher id), its publish schedule and next sequence number, and its [`Book`]. Adds its books
//! to the run's totals once, when it leaves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::book::Book;
use crate::plan::{Cadence, Slot};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::ws::Position;

/// A member's identity, which outlives its connections.
#[derive(Debug)]
pub struct Member {
    /// Room, role, rate and publisher id.
    pub slot: Slot,
    /// Shard key for the histograms (unique in the generator: the goose user index times the
    /// batch size, plus the member's place in its batch).
    pub key: usize,
    /// The publish schedule; `None` for a member that never publishes.
    pub cadence: Option<Cadence>,
    /// Next sequence number to publish. Kept here, not in the connection, so that numbering
    /// stays contiguous across reconnects and a hole always means a lost message.
    pub next_seq: AtomicU64,
    /// The member's books.
    pub book: Mutex<Book>,
}

impl Member {
    /// A member in `slot` with a random phase in its schedule.
    pub fn new(slot: Slot, key: usize) -> Self {
        let cadence = (slot.rate > 0.0).then(|| Cadence {
            rate: slot.rate,
            phase: Duration::from_secs_f64(fastrand::f64() / slot.rate),
        });
        Self {
            slot,
            key,
            cadence,
            next_seq: AtomicU64::new(0),
            book: Mutex::new(Book::default()),
        }
    }

    /// Locks the books.
    pub fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where to resume from, when the member has seen a position.
    pub fn since(&self) -> Option<Position> {
        self.book().position.clone()
    }

    /// Adds the member's books to the totals, once, when it leaves.
    pub fn account(&self, shared: &Shared) {
        let stats = &shared.stats;
        let book = self.book();
        let c = book.ledger.counts();
        match book.measured {
            Some(true) => {
                Stats::add(&stats.delivered, c.unique);
                shared.plan.rooms[self.slot.room]
                    .delivered
                    .fetch_add(c.unique, Ordering::Relaxed);
                Stats::add(&stats.duplicates, c.duplicates);
                Stats::add(&stats.reordered, c.reordered);
                Stats::add(&stats.gaps, c.gaps);
                Stats::add(&stats.stale, c.stale);
                Stats::add(&stats.open_holes, book.ledger.open_holes());
            }
            Some(false) => Stats::add(&stats.delivered_late_members, c.unique),
            None => {}
        }
    }
}
