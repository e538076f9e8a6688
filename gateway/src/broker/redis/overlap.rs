//! The gate between a Cluster subscriber connection and its replacement, so that a failover on
//! one shard never interrupts the rooms of the others (issue 21).
//!
//! When a shard gets a new master, the subscriber makes a fresh cluster connection (it reads the
//! new slot map at once), subscribes every room on it, and only then lets the old connection go:
//! make before break. While both are subscribed, a message published on a healthy shard arrives
//! twice, once on each; a message published before the new subscription took effect arrives on
//! the old connection only. The gate lets each one through once: for every message (room and
//! payload) it counts the copies each connection brought, and a copy passes only when its
//! connection has now brought more copies than the other — so identical payloads (two plain
//! `PUBLISH`es of the same text) are still delivered as often as they were published. Outside a
//! swap only the current connection's messages pass, with one atomic load and no lock.
//!
//! Bounded: a swap remembers at most [`MAX_TRACKED`] distinct messages; beyond that it lets
//! every copy through (a duplicate is better than a loss) and says so in the log.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::warn;

/// Distinct messages one swap remembers (a few MB at most).
pub const MAX_TRACKED: usize = 100_000;

/// Which connection's messages reach the node.
#[derive(Debug, Default)]
pub struct Overlap {
    /// The generation of the connection whose messages pass outside a swap.
    current: AtomicU64,
    /// Whether a swap is under way (the fast path skips the lock when not).
    swapping: AtomicBool,
    swap: Mutex<Option<Swap>>,
    /// The generation the next connection gets.
    next: AtomicU64,
}

#[derive(Debug)]
struct Swap {
    old: u64,
    new: u64,
    /// The old connection is gone: what it still brings is dropped.
    old_retired: bool,
    /// Copies seen per message fingerprint: (old, new).
    copies: HashMap<u64, (u32, u32)>,
    hasher: std::collections::hash_map::RandomState,
    overflowed: bool,
}

impl Overlap {
    fn swap(&self) -> std::sync::MutexGuard<'_, Option<Swap>> {
        self.swap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A generation for a new connection.
    pub fn next_generation(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Connection `generation` is the only one (a first connection, or one made after a loss).
    pub fn only(&self, generation: u64) {
        *self.swap() = None;
        self.swapping.store(false, Ordering::Release);
        self.current.store(generation, Ordering::Release);
    }

    /// Connection `new` is being subscribed beside the current one.
    pub fn begin(&self, new: u64) {
        let old = self.current.load(Ordering::Acquire);
        *self.swap() = Some(Swap {
            old,
            new,
            old_retired: false,
            copies: HashMap::new(),
            hasher: Default::default(),
            overflowed: false,
        });
        self.swapping.store(true, Ordering::Release);
    }

    /// The new connection is subscribed to everything: the old one's messages stop passing, and
    /// the new one's copies of what the old one already delivered are still dropped until
    /// [`Overlap::finish`].
    pub fn retire_old(&self) {
        let mut swap = self.swap();
        if let Some(sw) = swap.as_mut() {
            sw.old_retired = true;
            self.current.store(sw.new, Ordering::Release);
        }
    }

    /// The swap is over (the new connection has long caught up): back to the fast path.
    pub fn finish(&self) {
        *self.swap() = None;
        self.swapping.store(false, Ordering::Release);
    }

    /// The new connection could not be made or subscribed: the old one stays the only one.
    pub fn abandon(&self) {
        let mut swap = self.swap();
        if let Some(sw) = swap.take() {
            self.current.store(sw.old, Ordering::Release);
        }
        self.swapping.store(false, Ordering::Release);
    }

    /// Whether a server push (other than a message) from connection `generation` concerns the
    /// node: the current connection's, or the new one's during a swap.
    pub fn listens_to(&self, generation: u64) -> bool {
        if generation == self.current.load(Ordering::Acquire) {
            return true;
        }
        self.swapping.load(Ordering::Acquire)
            && self.swap().as_ref().is_some_and(|sw| sw.new == generation)
    }

    /// Whether the message `payload` on `channel` that connection `generation` brought passes.
    pub fn admit(&self, generation: u64, channel: &[u8], payload: &[u8]) -> bool {
        if !self.swapping.load(Ordering::Acquire) {
            return generation == self.current.load(Ordering::Acquire);
        }
        let mut swap = self.swap();
        let Some(sw) = swap.as_mut() else {
            return generation == self.current.load(Ordering::Acquire);
        };
        let from_old = generation == sw.old;
        if !from_old && generation != sw.new {
            return false;
        }
        if from_old && sw.old_retired {
            return false;
        }
        if sw.overflowed {
            return true;
        }
        let mut h = sw.hasher.build_hasher();
        h.write(channel);
        h.write_u8(0);
        h.write(payload);
        let fp = h.finish();
        if sw.copies.len() >= MAX_TRACKED && !sw.copies.contains_key(&fp) {
            sw.overflowed = true;
            sw.copies = HashMap::new();
            warn!(
                tracked = MAX_TRACKED,
                "redis cluster subscriber swap: too many messages to compare; letting every copy through"
            );
            return true;
        }
        let (old, new) = sw.copies.entry(fp).or_default();
        let (mine, other) = if from_old { (old, *new) } else { (new, *old) };
        *mine += 1;
        *mine > other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connection `a` current, `b` being subscribed beside it.
    fn swapping() -> (Overlap, u64, u64) {
        let o = Overlap::default();
        let (a, b) = (o.next_generation(), o.next_generation());
        o.only(a);
        o.begin(b);
        (o, a, b)
    }

    #[test]
    fn outside_a_swap_only_the_current_connection_passes() {
        let o = Overlap::default();
        let a = o.next_generation();
        let b = o.next_generation();
        o.only(a);
        assert!(o.admit(a, b"c", b"m"));
        assert!(o.admit(a, b"c", b"m"), "no dedup outside a swap");
        assert!(!o.admit(b, b"c", b"m"));
        assert!(o.listens_to(a) && !o.listens_to(b));
    }

    #[test]
    fn during_a_swap_each_message_passes_once_whichever_connection_brings_it_first() {
        let (o, a, b) = swapping();
        assert!(o.listens_to(b));
        // Published before the new subscription: the old connection only.
        assert!(o.admit(a, b"c", b"m0"));
        // Published after: both bring it, in either order.
        assert!(o.admit(a, b"c", b"m1"));
        assert!(!o.admit(b, b"c", b"m1"));
        assert!(o.admit(b, b"c", b"m2"));
        assert!(!o.admit(a, b"c", b"m2"));
        // The same payload on another channel is another message.
        assert!(o.admit(b, b"d", b"m2"));
        // Two identical plain publishes are delivered twice, not once.
        assert!(o.admit(a, b"c", b"same"));
        assert!(o.admit(a, b"c", b"same"));
        assert!(!o.admit(b, b"c", b"same"));
        assert!(!o.admit(b, b"c", b"same"));
        assert!(
            o.admit(b, b"c", b"same"),
            "a third copy was published once more"
        );
        o.retire_old();
        // The old connection's late copies are dropped; the new one's copies of what the old
        // one delivered still are too.
        assert!(!o.admit(a, b"c", b"m3"));
        assert!(o.admit(b, b"c", b"m3"));
        assert!(!o.admit(a, b"c", b"m4"));
        o.finish();
        assert!(o.admit(b, b"c", b"m1"), "after the swap, no memory");
        assert!(!o.admit(a, b"c", b"m5"));
        assert!(o.listens_to(b) && !o.listens_to(a));
    }

    #[test]
    fn an_abandoned_swap_keeps_the_old_connection() {
        let (o, a, b) = swapping();
        o.abandon();
        assert!(o.admit(a, b"c", b"m"));
        assert!(!o.admit(b, b"c", b"m"));
    }

    #[test]
    fn past_its_bound_a_swap_lets_every_copy_through() {
        let (o, a, b) = swapping();
        for i in 0..MAX_TRACKED {
            assert!(o.admit(a, b"c", &i.to_le_bytes()));
        }
        assert_eq!(o.swap().as_ref().unwrap().copies.len(), MAX_TRACKED);
        // One more distinct message: the memory is dropped, copies pass (duplicates, never a loss).
        assert!(o.admit(b, b"c", b"new"));
        assert!(o.admit(b, b"c", &0usize.to_le_bytes()));
        assert!(o.swap().as_ref().unwrap().copies.is_empty());
        o.retire_old();
        assert!(
            !o.admit(a, b"c", b"late"),
            "the retired connection is still cut"
        );
    }
}
