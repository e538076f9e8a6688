//! The gate between a Cluster subscriber connection and its replacement, so that a failover on
//! one shard never interrupts the rooms of the others (issue 21).
//!
//! When a shard gets a new master, the subscriber makes a fresh cluster connection (it reads the
//! new slot map at once), subscribes every room on it, and only then lets the old connection go:
//! make before break. While both are subscribed, a message published on a healthy shard arrives
//! twice, once on each, and a message published before the new subscription took effect arrives
//! on the old connection only. So that each message reaches the node once and in order, the old
//! connection's messages pass as they come while the new one's are held; when the old one is
//! released ([`Overlap::retire_old`], after a `PING` through it to each healthy master, so that
//! what it had in flight has arrived), the held ones are handed out except those the old one
//! already delivered — counted per room and payload, so two identical plain `PUBLISH`es still
//! arrive twice — and until [`Overlap::finish`] the new connection's late copies of what the old
//! one delivered are dropped the same way. Outside a swap only the current connection's messages
//! pass, with one atomic load and no lock.
//!
//! Bounded: a swap holds and remembers at most [`MAX_TRACKED`] messages; beyond that it hands out
//! what it held and lets every copy through (a duplicate is better than a loss), and says so in
//! the log.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use tracing::warn;

/// Messages one swap holds or remembers (a few MB at most).
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
    /// Copies the old connection delivered and the new one has not brought yet, per message
    /// fingerprint.
    delivered_by_old: HashMap<u64, u32>,
    /// The new connection's messages while the old one still delivers, in order.
    held: Vec<(Vec<u8>, Vec<u8>)>,
    hasher: std::collections::hash_map::RandomState,
    overflowed: bool,
}

impl Swap {
    fn fingerprint(&self, channel: &[u8], payload: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(channel);
        h.write_u8(0);
        h.write(payload);
        h.finish()
    }

    /// Whether the new connection's copy of this message is one the old connection delivered
    /// (and forgets that copy).
    fn old_delivered(&mut self, fp: u64) -> bool {
        match self.delivered_by_old.get_mut(&fp) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.delivered_by_old.remove(&fp);
                }
                true
            }
            _ => false,
        }
    }

    /// Past the bound: hand out what is held and remember nothing more.
    fn overflow(&mut self, deliver: &mut dyn FnMut(&[u8], &[u8])) {
        self.overflowed = true;
        self.delivered_by_old = HashMap::new();
        for (c, p) in std::mem::take(&mut self.held) {
            deliver(&c, &p);
        }
        warn!(
            tracked = MAX_TRACKED,
            "redis cluster subscriber swap: too many messages to compare; letting every copy through"
        );
    }
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
            delivered_by_old: HashMap::new(),
            held: Vec::new(),
            hasher: Default::default(),
            overflowed: false,
        });
        self.swapping.store(true, Ordering::Release);
    }

    /// The new connection is subscribed to everything and the old one has handed over what it
    /// had in flight: the old one's messages stop passing, and `deliver` gets the new one's held
    /// messages that the old one did not deliver, in order — under the gate's lock, so that no
    /// message the new connection brings meanwhile overtakes them.
    pub fn retire_old(&self, mut deliver: impl FnMut(&[u8], &[u8])) {
        let mut swap = self.swap();
        if let Some(sw) = swap.as_mut() {
            sw.old_retired = true;
            self.current.store(sw.new, Ordering::Release);
            for (c, p) in std::mem::take(&mut sw.held) {
                let fp = sw.fingerprint(&c, &p);
                if sw.overflowed || !sw.old_delivered(fp) {
                    deliver(&c, &p);
                }
            }
        }
    }

    /// The swap is over (the new connection has long caught up): back to the fast path.
    pub fn finish(&self) {
        *self.swap() = None;
        self.swapping.store(false, Ordering::Release);
    }

    /// The new connection could not be made or subscribed: the old one stays the only one (it
    /// was subscribed all along, so what the new one held is dropped).
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

    /// Whether the message `payload` on `channel` that connection `generation` brought passes
    /// now; a held one is handed to `deliver` later ([`Overlap::retire_old`]), and on overflow
    /// what was held goes to `deliver` at once.
    pub fn admit(
        &self,
        generation: u64,
        channel: &[u8],
        payload: &[u8],
        mut deliver: impl FnMut(&[u8], &[u8]),
    ) -> bool {
        if !self.swapping.load(Ordering::Acquire) {
            return generation == self.current.load(Ordering::Acquire);
        }
        let mut swap = self.swap();
        let Some(sw) = swap.as_mut() else {
            return generation == self.current.load(Ordering::Acquire);
        };
        if generation == sw.old {
            if sw.old_retired {
                return false;
            }
            if !sw.overflowed {
                if sw.delivered_by_old.len() >= MAX_TRACKED {
                    sw.overflow(&mut deliver);
                } else {
                    let fp = sw.fingerprint(channel, payload);
                    *sw.delivered_by_old.entry(fp).or_default() += 1;
                }
            }
            return true;
        }
        if generation != sw.new {
            return false;
        }
        if sw.overflowed {
            return true;
        }
        if !sw.old_retired {
            if sw.held.len() >= MAX_TRACKED {
                sw.overflow(&mut deliver);
                return true;
            }
            sw.held.push((channel.to_vec(), payload.to_vec()));
            return false;
        }
        let fp = sw.fingerprint(channel, payload);
        !sw.old_delivered(fp)
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

    /// Admits one message; what passes now or is handed out goes to `out`.
    fn admit(o: &Overlap, g: u64, m: &str, out: &mut Vec<String>) {
        let mut later = Vec::new();
        if o.admit(g, b"c", m.as_bytes(), |_, p| {
            later.push(String::from_utf8_lossy(p).into_owned())
        }) {
            out.extend(later);
            out.push(m.to_string());
        } else {
            out.extend(later);
        }
    }

    fn retire(o: &Overlap, out: &mut Vec<String>) {
        o.retire_old(|_, p| out.push(String::from_utf8_lossy(p).into_owned()));
    }

    #[test]
    fn outside_a_swap_only_the_current_connection_passes() {
        let o = Overlap::default();
        let a = o.next_generation();
        let b = o.next_generation();
        o.only(a);
        let mut out = Vec::new();
        admit(&o, a, "m", &mut out);
        admit(&o, a, "m", &mut out);
        admit(&o, b, "m", &mut out);
        assert_eq!(
            out,
            ["m", "m"],
            "no dedup outside a swap; only the current connection"
        );
        assert!(o.listens_to(a) && !o.listens_to(b));
    }

    #[test]
    fn during_a_swap_each_message_passes_once_and_in_order() {
        let (o, a, b) = swapping();
        assert!(o.listens_to(b));
        let mut out = Vec::new();
        // m0 was published before the new subscription (old only); m1 and m2 after (both),
        // and the new connection brings its copies first.
        admit(&o, b, "m1", &mut out);
        admit(&o, b, "m2", &mut out);
        admit(&o, a, "m0", &mut out);
        admit(&o, a, "m1", &mut out);
        // Two identical plain publishes, on both.
        admit(&o, b, "same", &mut out);
        admit(&o, b, "same", &mut out);
        admit(&o, a, "same", &mut out);
        assert_eq!(
            out,
            ["m0", "m1", "same"],
            "the old connection's, as they come"
        );
        retire(&o, &mut out);
        assert_eq!(
            out,
            ["m0", "m1", "same", "m2", "same"],
            "then the new one's held messages the old one had not delivered"
        );
        // Late copies: the old connection is cut; the new one's copy of what the old one
        // delivered is dropped, a new message passes.
        admit(&o, a, "m3", &mut out);
        admit(&o, b, "m3", &mut out);
        assert_eq!(out.last().unwrap(), "m3");
        assert_eq!(out.iter().filter(|m| *m == "m3").count(), 1);
        o.finish();
        admit(&o, b, "m1", &mut out);
        assert_eq!(out.last().unwrap(), "m1", "after the swap, no memory");
        assert!(o.listens_to(b) && !o.listens_to(a));
    }

    #[test]
    fn the_new_connections_late_copy_of_what_the_old_one_delivered_is_dropped() {
        let (o, a, b) = swapping();
        let mut out = Vec::new();
        admit(&o, a, "m1", &mut out);
        retire(&o, &mut out);
        admit(&o, b, "m1", &mut out);
        admit(&o, b, "m2", &mut out);
        assert_eq!(out, ["m1", "m2"]);
    }

    #[test]
    fn an_abandoned_swap_keeps_the_old_connection() {
        let (o, a, b) = swapping();
        let mut out = Vec::new();
        admit(&o, b, "held", &mut out);
        o.abandon();
        admit(&o, a, "m", &mut out);
        admit(&o, b, "m", &mut out);
        assert_eq!(
            out,
            ["m"],
            "the old one was subscribed all along: nothing held is lost"
        );
    }

    #[test]
    fn past_its_bound_a_swap_hands_out_what_it_held_and_lets_every_copy_through() {
        let (o, a, b) = swapping();
        let mut out = Vec::new();
        for i in 0..MAX_TRACKED {
            admit(&o, b, &i.to_string(), &mut out);
        }
        assert!(out.is_empty(), "held");
        admit(&o, b, "one more", &mut out);
        assert_eq!(
            out.len(),
            MAX_TRACKED + 1,
            "everything held, in order, then this one"
        );
        assert_eq!(out[0], "0");
        admit(&o, a, "0", &mut out);
        assert_eq!(
            out.len(),
            MAX_TRACKED + 2,
            "duplicates from here, never a loss"
        );
        retire(&o, &mut out);
        admit(&o, a, "late", &mut out);
        assert_eq!(
            out.len(),
            MAX_TRACKED + 2,
            "the retired connection is still cut"
        );
    }
}
