//! This node's side of member lists (issue 22): its listed members per room with their
//! connection counts, what changed since the last presence tick (sent to the broker at the next
//! one, batched: absolute counts per changed member, so a write repeated after a failure changes
//! nothing), the version of each room's roster it saw last, and which of its sessions see the
//! list. The presence timer ([`crate::node::presence`]) writes and reads it; sessions join and
//! leave it. The cluster-wide roster is the broker's ([`crate::broker::roster`]).
//!
//! Bounded: a room lists at most `--list-max-members` distinct members from this node; a member
//! beyond that is counted but not listed (and does not see the list), counted in
//! `gateway_list_overflow_total`. Rooms leave the map once nothing of theirs is left to send.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::broker::roster::{Change, Member, RosterRead};
use crate::fanout::outbox::Outbox;
use crate::wire::protocol::RoomName;

/// One listed member of a room on this node.
#[derive(Debug)]
struct Entry {
    member: Member,
    /// Its connections on this node now.
    conns: u32,
    /// The close reason of its last connection to end here.
    reason: &'static str,
}

/// One listing room on this node.
#[derive(Debug, Default)]
struct Room {
    /// Listed members by key (entries at 0 connections stay until their removal is written).
    members: HashMap<String, Entry>,
    /// Keys whose counts changed since the last successful write.
    dirty: HashSet<String>,
    /// Sessions that see the list: session id → (outbox, member key).
    sessions: HashMap<u64, (Arc<Outbox>, String)>,
    /// The roster epoch and version this node saw last (`None`: none yet).
    version: Option<(u64, u64)>,
    /// Whether the room was over `--list-max-members` at the last tick.
    over: bool,
}

impl Room {
    /// Marks every member to be written again.
    fn rewrite(&mut self) {
        let keys: Vec<String> = self.members.keys().cloned().collect();
        self.dirty.extend(keys);
    }
}

/// One room's roster write of a tick, taken by [`LocalRoster::writes`].
#[derive(Debug)]
pub struct Write {
    /// The room.
    pub room: RoomName,
    /// The epoch and version seen last.
    pub last_seen: Option<(u64, u64)>,
    /// The changed members with their counts now.
    pub changes: Vec<Change>,
}

/// The node's listed members. A std lock: held for one join, leave or room update, never across
/// an await.
#[derive(Debug)]
pub struct LocalRoster {
    rooms: Mutex<HashMap<RoomName, Room>>,
    /// `--list-max-members`: the bound of each room's local entries.
    max_members: usize,
}

impl LocalRoster {
    /// An empty roster bounded by `max_members` per room.
    pub fn new(max_members: usize) -> Self {
        Self {
            rooms: Mutex::new(HashMap::new()),
            max_members,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RoomName, Room>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists `session` as `member` in `room`; returns false (not listed) when the room already
    /// lists `--list-max-members` members from this node.
    pub fn join(&self, room: &RoomName, session: u64, member: Member, outbox: Arc<Outbox>) -> bool {
        let mut rooms = self.lock();
        let r = rooms.entry(room.clone()).or_default();
        let key = member.sub.clone();
        let full = r.members.len() >= self.max_members;
        match r.members.get_mut(&key) {
            Some(e) => {
                e.conns += 1;
                e.member = member;
            }
            None if full => {
                if r.members.is_empty() && r.sessions.is_empty() {
                    rooms.remove(room);
                }
                return false;
            }
            None => {
                r.members.insert(
                    key.clone(),
                    Entry {
                        member,
                        conns: 1,
                        reason: "",
                    },
                );
            }
        }
        r.dirty.insert(key.clone());
        r.sessions.insert(session, (outbox, key));
        true
    }

    /// Unlists `session` from `room`, its connection having ended for `reason`.
    pub fn leave(&self, room: &RoomName, session: u64, reason: &'static str) {
        let mut rooms = self.lock();
        let Some(r) = rooms.get_mut(room) else {
            return;
        };
        let Some((_, key)) = r.sessions.remove(&session) else {
            return;
        };
        if let Some(e) = r.members.get_mut(&key) {
            e.conns = e.conns.saturating_sub(1);
            e.reason = reason;
            r.dirty.insert(key);
        }
    }

    /// Every listing room's write for this tick: the changed members and the version seen last.
    pub fn writes(&self) -> Vec<Write> {
        let rooms = self.lock();
        rooms
            .iter()
            .map(|(room, r)| Write {
                room: room.clone(),
                last_seen: r.version,
                changes: r
                    .dirty
                    .iter()
                    .filter_map(|k| r.members.get(k))
                    .map(|e| Change {
                        member: e.member.clone(),
                        count: e.conns,
                        reason: e.reason,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Records the broker's answer to `write`: the changes written are clean (unless they changed
    /// again meanwhile), members at 0 connections go, the version moves on; after a `reset`
    /// every member is written again. Returns the outboxes
    /// of the room's sessions that see the list, and whether the room is gone from this node
    /// (nothing left to list or send).
    pub fn written(&self, write: &Write, read: &RosterRead) -> (Vec<Arc<Outbox>>, bool) {
        let mut rooms = self.lock();
        let Some(r) = rooms.get_mut(&write.room) else {
            return (Vec::new(), true);
        };
        for c in &write.changes {
            let sub = &c.member.sub;
            if r.members.get(sub).is_some_and(|e| e.conns == c.count) {
                r.dirty.remove(sub);
                if c.count == 0 {
                    r.members.remove(sub);
                }
            }
        }
        if read.reset {
            // The roster may have been lost (Redis restarted empty): send every member's count
            // again at the next tick. Counts are absolute, so where nothing was lost this
            // changes nothing.
            r.rewrite();
        }
        r.version = Some((read.epoch, read.version));
        r.over = read.over;
        let outboxes = r.sessions.values().map(|(o, _)| o.clone()).collect();
        let gone = r.sessions.is_empty() && r.members.is_empty() && r.dirty.is_empty();
        if gone {
            rooms.remove(&write.room);
        }
        (outboxes, gone)
    }

    /// Marks every member of every room to be written again (this instance was reaped while it
    /// could not reach the registry: its entries are gone).
    pub fn rewrite_all(&self) {
        self.lock().values_mut().for_each(Room::rewrite);
    }

    /// Whether `room` was over `--list-max-members` at the last tick.
    pub fn is_over(&self, room: &RoomName) -> bool {
        self.lock().get(room).is_some_and(|r| r.over)
    }

    /// Marks every member of every room as leaving with `reason` (a stopping node's last write).
    pub fn leave_all(&self, reason: &'static str) {
        let mut rooms = self.lock();
        for r in rooms.values_mut() {
            r.sessions.clear();
            for (k, e) in r.members.iter_mut() {
                e.conns = 0;
                e.reason = reason;
                r.dirty.insert(k.clone());
            }
        }
    }

    /// Listed entries on this node across rooms (the `gateway_list_members` gauge).
    pub fn size(&self) -> usize {
        self.lock().values().map(|r| r.members.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(sub: &str) -> Member {
        Member {
            sub: sub.into(),
            name: None,
            role: "viewer".into(),
        }
    }

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(8, 1024).0)
    }

    #[test]
    fn a_room_lists_at_most_its_bound_from_this_node() {
        let roster = LocalRoster::new(2);
        let room = RoomName::parse("r").unwrap();
        assert!(roster.join(&room, 1, member("a"), outbox()));
        assert!(roster.join(&room, 2, member("b"), outbox()));
        assert!(
            roster.join(&room, 3, member("a"), outbox()),
            "a second connection of a listed member is no new entry"
        );
        assert!(!roster.join(&room, 4, member("c"), outbox()), "overflow");
        assert_eq!(roster.size(), 2);
        // The overflowing session was not recorded: its leave changes nothing.
        roster.leave(&room, 4, "client_closed");
        let w = roster.writes();
        assert_eq!(w[0].changes.len(), 2);
    }

    #[test]
    fn counts_are_absolute_and_a_written_leave_forgets_the_member_and_the_room() {
        let roster = LocalRoster::new(10);
        let room = RoomName::parse("r").unwrap();
        roster.join(&room, 1, member("a"), outbox());
        roster.join(&room, 2, member("a"), outbox());
        let w = roster.writes().remove(0);
        assert_eq!(w.changes[0].count, 2);
        let read = RosterRead {
            version: 1,
            ..RosterRead::default()
        };
        let (outboxes, gone) = roster.written(&w, &read);
        assert_eq!((outboxes.len(), gone), (2, false));
        assert!(
            roster.writes()[0].changes.is_empty(),
            "clean after the write"
        );
        roster.leave(&room, 1, "kicked");
        roster.leave(&room, 2, "client_closed");
        let w = roster.writes().remove(0);
        assert_eq!(w.last_seen, Some((0, 1)));
        assert_eq!(
            (w.changes[0].count, w.changes[0].reason),
            (0, "client_closed")
        );
        // A rejoin between the take and the answer keeps the member dirty.
        roster.join(&room, 3, member("a"), outbox());
        let (_, gone) = roster.written(&w, &read);
        assert!(!gone);
        assert_eq!(roster.writes()[0].changes[0].count, 1);
        // A reset (the roster lost) writes every member again.
        let reset = RosterRead {
            version: 0,
            reset: true,
            ..RosterRead::default()
        };
        let w = roster.writes().remove(0);
        roster.written(&w, &read);
        assert!(roster.writes()[0].changes.is_empty());
        roster.written(&roster.writes().remove(0), &reset);
        assert_eq!(
            roster.writes()[0].changes.len(),
            1,
            "rewritten after a reset"
        );
        roster.leave(&room, 3, "client_closed");
        let w = roster.writes().remove(0);
        let (_, gone) = roster.written(&w, &read);
        assert!(gone);
        assert!(roster.writes().is_empty());
    }
}
