//! Gapless delivery across this node's own subscription gaps (issue 21).
//!
//! A room's numbered messages reach a node in offset order, one after another, for as long as its
//! subscription holds. When it did not — the subscriber reconnected, a Cluster shard failed over
//! and the room was subscribed again on the new master, another node published while this one
//! was still subscribing — the next message arrives with an offset past the next one. Before,
//! every member saw the jump and resynced (`/client.js` reconnects with `since` on a gap): after a
//! failover, every member of every room of the failed shard at once, a reconnect storm. Now the
//! node fills the gap itself: it holds the room's new messages, reads the missed ones from
//! history ([`MissedSource`], the broker's history read), and hands the members the missed ones
//! and then the held ones, in order, with no duplicate (a message at or below the room's last
//! offset is dropped, so a copy that arrives twice is harmless too).
//!
//! One record per room the node receives numbered messages for, dropped when the node
//! unsubscribes the room ([`Sequences::forget`]); plain `PUBLISH`es carry no offset and pass
//! untouched. Bounded: a room holds at most [`MAX_HELD`] messages while its gap is read (more,
//! and it gives up: what it held goes out with the gap, and the members resync as before), and a
//! gap of more than [`MAX_FILL`] messages is not replayed (that is a resume's job, from history,
//! by the member). History is the authority on a room's position, so a payload published
//! straight to Redis with a made-up offset cannot make the node drop real messages as repeats.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::wire::history::{Since, Stamp};
use crate::wire::protocol::RoomName;

/// Most messages a room holds while its gap is being read.
pub const MAX_HELD: usize = 4096;
/// Largest gap the node reads from history itself: a larger one is left to the members' resume
/// (the read then reports only the room's position).
pub const MAX_FILL: u64 = 10_000;

/// Where the missed messages come from: the broker's history.
pub trait MissedSource: Send + Sync {
    /// `room`'s messages after `since` as history has them, or `None` when it could not be read.
    fn missed(
        self: std::sync::Arc<Self>,
        room: RoomName,
        since: Since,
    ) -> BoxFuture<'static, Option<Missed>>;
}

/// What a history read found after a room's last offset.
#[derive(Debug, Default)]
pub struct Missed {
    /// The room's offset when history was read: the authority on how far its numbering goes
    /// (a payload that claims a higher offset without being in history is not trusted to move
    /// the room's position).
    pub position: u64,
    /// Whether `frames` holds every message after the asked offset up to `position`.
    pub complete: bool,
    /// The stored messages with their offsets, in order.
    pub frames: Vec<(u64, Bytes)>,
}

/// A message held while its room's gap is read.
#[derive(Debug)]
pub struct Held {
    /// The message as the broker brought it (or history keeps it).
    pub frame: Bytes,
    /// Its publish time (µs since the epoch).
    pub ts: u64,
    /// Its offset and epoch.
    pub stamp: Stamp,
}

#[derive(Debug)]
struct RoomSeq {
    /// `epoch_tag` of the room's epoch and the last offset handed to the members.
    epoch: u64,
    offset: u64,
    /// While a gap is read: the messages that came meanwhile, and which read they wait for.
    filling: Option<(u64, Vec<Held>)>,
}

/// What to do with a numbered message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next one: hand it to the members.
    Deliver,
    /// Already handed out (or older): drop it.
    Duplicate,
    /// Held until the gap before it is read.
    Held,
    /// Held; read the messages after offset `after` and call [`Sequences::filled`] with `fill`.
    Fill {
        /// Which read this is (a later one supersedes it).
        fill: u64,
        /// The room's last offset handed out: the read starts after it.
        after: u64,
    },
    /// The hold overflowed: hand out the released (held) ones, in order, then this one, with the
    /// gap left to the members.
    Jump,
}

/// Per-room positions of the numbered messages this node handed out.
#[derive(Debug, Default)]
pub struct Sequences {
    rooms: Mutex<HashMap<RoomName, RoomSeq>>,
    next_fill: std::sync::atomic::AtomicU64,
    /// Set when a new record brings the count to a multiple of [`PRUNE_EVERY`]: time for the
    /// caller to [`Sequences::retain`] the rooms it still has.
    prune_due: std::sync::atomic::AtomicBool,
}

/// New records between two checks for records of rooms the node left.
pub const PRUNE_EVERY: usize = 1024;

impl Sequences {
    fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, RoomSeq>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files a numbered message of `room`; see [`Step`]. On [`Step::Jump`] the held messages to
    /// hand out first are in `released`.
    pub fn observe(
        &self,
        room: &RoomName,
        held: Held,
        released: &mut Vec<Held>,
    ) -> (Step, Option<Held>) {
        let mut rooms = self.rooms();
        let Some(r) = rooms.get_mut(room) else {
            rooms.insert(
                room.clone(),
                RoomSeq {
                    epoch: held.stamp.epoch,
                    offset: held.stamp.offset,
                    filling: None,
                },
            );
            if rooms.len().is_multiple_of(PRUNE_EVERY) {
                self.prune_due
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return (Step::Deliver, Some(held));
        };
        if r.epoch != held.stamp.epoch {
            // A new epoch (history lost): nothing to fill from; start over.
            if let Some((_, h)) = r.filling.take() {
                released.extend(h);
            }
            r.epoch = held.stamp.epoch;
            r.offset = held.stamp.offset;
            return (Step::Deliver, Some(held));
        }
        if let Some((_, h)) = &mut r.filling {
            if h.len() >= MAX_HELD {
                let (_, h) = r.filling.take().expect("filling");
                released.extend(h);
                r.offset = held.stamp.offset;
                return (Step::Jump, Some(held));
            }
            h.push(held);
            return (Step::Held, None);
        }
        let off = held.stamp.offset;
        if off <= r.offset {
            return (Step::Duplicate, None);
        }
        if off == r.offset + 1 {
            r.offset = off;
            return (Step::Deliver, Some(held));
        }
        let fill = self
            .next_fill
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let after = r.offset;
        r.filling = Some((fill, vec![held]));
        (Step::Fill { fill, after }, None)
    }

    /// The read of fill `fill` came back with `missed` (`None`: history could not be read).
    /// Hands `deliver`, in order, the missed messages after the room's offset and then the held
    /// ones above them — under the rooms' lock, so that no message of the room that arrives
    /// meanwhile can overtake them. Nothing happens if this fill is stale (the room gave up or
    /// moved to another epoch meanwhile).
    ///
    /// History is the authority on the room's position: after a read, the position is the one
    /// history reported, and a held message moves it only one offset at a time past that. A
    /// payload published straight to Redis with a made-up offset is still handed out, but cannot
    /// make the node drop the room's real messages as repeats.
    pub fn filled(
        &self,
        room: &RoomName,
        fill: u64,
        missed: Option<Missed>,
        stamp_of: impl Fn(u64) -> Stamp,
        ts_of: impl Fn(&Bytes) -> u64,
        mut deliver: impl FnMut(Held),
    ) {
        let mut rooms = self.rooms();
        let Some(r) = rooms.get_mut(room) else {
            return;
        };
        if !matches!(&r.filling, Some((f, _)) if *f == fill) {
            return;
        }
        let (_, held) = r.filling.take().expect("filling");
        let mut last = r.offset;
        // The highest offset handed out from history: a held message at or below it is a copy
        // (or not a message of this room).
        let mut covered = last;
        let read = missed.is_some();
        if let Some(m) = missed {
            if m.complete {
                for (off, frame) in m.frames {
                    if off == last + 1 && off <= m.position {
                        deliver(Held {
                            ts: ts_of(&frame),
                            frame,
                            stamp: stamp_of(off),
                        });
                        last = off;
                    }
                }
                covered = last;
            }
            last = last.max(m.position);
        }
        for h in held {
            let off = h.stamp.offset;
            if off <= covered {
                continue;
            }
            if off == last + 1 || !read {
                last = off.max(last);
            }
            deliver(h);
        }
        r.offset = last;
    }

    /// The epoch of `room`'s gap being filled, as text (read from the first held message: the
    /// records keep only its tag, and a gap is rare).
    pub fn epoch_text(&self, room: &RoomName) -> Option<String> {
        let rooms = self.rooms();
        let (_, held) = rooms.get(room)?.filling.as_ref()?;
        let first = held.first()?;
        let v: serde_json::Value = serde_json::from_slice(&first.frame).ok()?;
        v.get("epoch")?.as_str().map(str::to_owned)
    }

    /// The node no longer receives `room` (unsubscribed): its next message starts afresh.
    pub fn forget(&self, room: &RoomName) {
        self.rooms().remove(room);
    }

    /// Whether records should be checked against the node's rooms (and clears the flag).
    pub fn prune_due(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.prune_due.load(Relaxed) && self.prune_due.swap(false, Relaxed)
    }

    /// Keeps only the records of rooms `keep` says yes to (the node's rooms): a message that
    /// raced the unsubscribe of its room leaves a record that [`Sequences::forget`] already ran
    /// for.
    pub fn retain(&self, keep: impl Fn(&RoomName) -> bool) {
        self.rooms().retain(|r, _| keep(r));
    }

    /// Rooms with a record.
    pub fn len(&self) -> usize {
        self.rooms().len()
    }

    /// Whether no room has a record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room() -> RoomName {
        RoomName::parse("r").unwrap()
    }

    fn msg(offset: u64) -> Held {
        Held {
            frame: Bytes::from(format!("m{offset}")),
            ts: offset,
            stamp: Stamp::new(offset, "E"),
        }
    }

    fn step(s: &Sequences, offset: u64) -> Step {
        let mut released = Vec::new();
        let (step, _) = s.observe(&room(), msg(offset), &mut released);
        assert!(released.is_empty());
        step
    }

    fn history(offsets: std::ops::RangeInclusive<u64>) -> Missed {
        Missed {
            position: *offsets.end(),
            complete: true,
            frames: offsets.map(|o| (o, Bytes::from(format!("h{o}")))).collect(),
        }
    }

    #[test]
    fn a_made_up_offset_does_not_move_the_room_past_its_real_messages() {
        let s = Sequences::default();
        step(&s, 1);
        // A payload published straight to Redis claims offset 1000.
        let Step::Fill { fill, .. } = step(&s, 1000) else {
            panic!()
        };
        // History says the room is at 3.
        let out = fill_with(&s, fill, Some(history(2..=3)));
        assert_eq!(
            offsets(&out),
            [2, 3, 1000],
            "handed out, but the position stays 3"
        );
        assert_eq!(
            step(&s, 4),
            Step::Deliver,
            "the room's real next message is not a repeat"
        );
        // A history too far behind to read reports the position alone: the members see the jump.
        let Step::Fill { fill, .. } = step(&s, 20_000) else {
            panic!()
        };
        let far = Missed {
            position: 20_000,
            complete: false,
            frames: Vec::new(),
        };
        assert_eq!(offsets(&fill_with(&s, fill, Some(far))), [20_000]);
        assert_eq!(step(&s, 20_001), Step::Deliver);
    }

    fn fill_with(s: &Sequences, fill: u64, missed: Option<Missed>) -> Vec<Held> {
        let mut out = Vec::new();
        s.filled(
            &room(),
            fill,
            missed,
            |o| Stamp::new(o, "E"),
            |_| 0,
            |h| out.push(h),
        );
        out
    }

    fn offsets(v: &[Held]) -> Vec<u64> {
        v.iter().map(|h| h.stamp.offset).collect()
    }

    #[test]
    fn in_order_messages_pass_and_repeats_are_dropped() {
        let s = Sequences::default();
        assert_eq!(
            step(&s, 5),
            Step::Deliver,
            "the first one sets the position"
        );
        assert_eq!(step(&s, 6), Step::Deliver);
        assert_eq!(step(&s, 6), Step::Duplicate);
        assert_eq!(step(&s, 4), Step::Duplicate);
        assert_eq!(step(&s, 7), Step::Deliver);
    }

    #[test]
    fn a_gap_is_filled_from_history_then_the_held_messages_follow_in_order() {
        let s = Sequences::default();
        step(&s, 1);
        let Step::Fill { fill, after } = step(&s, 4) else {
            panic!("a gap asks for a fill")
        };
        assert_eq!(after, 1);
        assert_eq!(step(&s, 5), Step::Held);
        assert_eq!(
            step(&s, 5),
            Step::Held,
            "a copy while filling is held, then dropped"
        );
        assert_eq!(step(&s, 6), Step::Held);
        // History has 2..=5 (it was read after 5 was published, before 6).
        let out = fill_with(&s, fill, Some(history(2..=5)));
        assert_eq!(offsets(&out), [2, 3, 4, 5, 6]);
        assert_eq!(out[0].frame, "h2", "the missed ones come from history");
        assert_eq!(out[2].frame, "h4", "history's copy of what was held too");
        assert_eq!(
            out[4].frame, "m6",
            "then the held ones past history, as they came"
        );
        assert_eq!(step(&s, 7), Step::Deliver);
        assert_eq!(step(&s, 5), Step::Duplicate);
        // A second answer to the same fill changes nothing.
        assert!(fill_with(&s, fill, None).is_empty());
    }

    #[test]
    fn an_unreadable_history_hands_out_what_was_held_with_the_gap() {
        let s = Sequences::default();
        step(&s, 1);
        let Step::Fill { fill, .. } = step(&s, 3) else {
            panic!()
        };
        let out = fill_with(&s, fill, None);
        assert_eq!(offsets(&out), [3]);
        assert_eq!(step(&s, 4), Step::Deliver);
    }

    #[test]
    fn past_its_bound_a_room_gives_up_and_leaves_the_gap_to_the_members() {
        let s = Sequences::default();
        step(&s, 1 + MAX_FILL);
        let Step::Fill { fill, .. } = step(&s, 5 + MAX_FILL) else {
            panic!()
        };
        for i in 1..MAX_HELD as u64 {
            assert_eq!(step(&s, 5 + MAX_FILL + i), Step::Held);
        }
        let mut released = Vec::new();
        let (next, this) = s.observe(&room(), msg(5 + MAX_FILL + MAX_HELD as u64), &mut released);
        assert_eq!(next, Step::Jump);
        assert_eq!(
            released.len(),
            MAX_HELD,
            "everything held goes out, in order"
        );
        assert_eq!(this.unwrap().stamp.offset, 5 + MAX_FILL + MAX_HELD as u64);
        assert!(
            fill_with(&s, fill, None).is_empty(),
            "the late fill is ignored"
        );
    }

    #[test]
    fn records_of_rooms_the_node_left_can_be_dropped() {
        let s = Sequences::default();
        step(&s, 1);
        let other = RoomName::parse("other").unwrap();
        let mut released = Vec::new();
        s.observe(&other, msg(1), &mut released);
        assert_eq!(s.len(), 2);
        s.retain(|r| r.as_str() == "r");
        assert_eq!(s.len(), 1);
        assert_eq!(step(&s, 2), Step::Deliver, "the kept record goes on");
        // The caller is told to check once every PRUNE_EVERY new records.
        assert!(!s.prune_due());
        for i in 1..PRUNE_EVERY {
            let room = RoomName::parse(&format!("x{i}")).unwrap();
            s.observe(&room, msg(1), &mut released);
        }
        assert_eq!(s.len(), PRUNE_EVERY);
        assert!(s.prune_due());
        assert!(!s.prune_due(), "once");
    }

    #[test]
    fn a_new_epoch_starts_over_and_forget_drops_the_record() {
        let s = Sequences::default();
        step(&s, 7);
        let mut released = Vec::new();
        let other = Held {
            frame: Bytes::from_static(b"x"),
            ts: 0,
            stamp: Stamp::new(1, "F"),
        };
        assert_eq!(s.observe(&room(), other, &mut released).0, Step::Deliver);
        s.forget(&room());
        assert!(s.is_empty());
        assert_eq!(
            step(&s, 100),
            Step::Deliver,
            "after forget, no gap from the old position"
        );
    }
}
