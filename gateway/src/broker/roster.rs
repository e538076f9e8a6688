//! Member lists, the broker's side (issue 22): what a node's presence tick writes into a room's
//! cluster-wide roster and reads back ([`RosterWrite`], [`RosterRead`]), a page of the list
//! ([`MembersPage`]), how the batches read back fold into the one `members_diff` of a tick
//! ([`fold`]), and [`RosterBook`], the in-process broker's roster with the same semantics as
//! `roster.lua` (one node: the node's counts are the cluster's).
//!
//! The roster of a room, in either broker: per member key (a token's `sub`, or
//! `conn:<connection id>`) the number of connections cluster-wide; a member is *joined* when the
//! number goes 0 → 1 and *left* when it goes back to 0, with the close reason of its last
//! connection. Every change of the list is one *batch* numbered by the room's version; the last
//! [`LOG_CAP`] batches are kept, so a node that passes the version it saw last gets the batches
//! after it — or `reset` when they are gone (its members re-read the list). Above
//! `--list-max-members` distinct members the room stops listing (an `over_limit` batch) until it
//! is back to [`HYSTERESIS_PERCENT`] % of the bound (a `reset` batch). What the node does with
//! the answers is [`crate::node::roster`]'s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::wire::protocol::{RoomCounts, RoomName};

/// Batches of list changes kept per room (a node that is further behind gets `reset`).
pub const LOG_CAP: usize = 1_000;

/// Members per page of the `members` command and of the rooms API.
pub const PAGE: usize = 100;

/// A room over `--list-max-members` lists again once back at this share of it.
pub const HYSTERESIS_PERCENT: usize = 90;

/// One listed member as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The token's `sub`, or `conn:<connection id>` without one.
    pub sub: String,
    /// The display name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `host` or `viewer`.
    pub role: String,
}

/// A member that left, with the close reason of its last connection (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    /// The member's key.
    pub sub: String,
    /// Why its last connection ended (`client_closed`, `kicked`, `node_lost`, …).
    pub reason: String,
}

/// One member key's number of connections on the writing node instance now, and why the last
/// one ended when it is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Who.
    pub member: Member,
    /// Connections of this member on the writing instance now (absolute, so a write that is
    /// repeated after a failure changes nothing).
    pub count: u32,
    /// The close reason of its last connection here, used when `count` is 0.
    pub reason: &'static str,
}

/// One numbered change of a room's list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The room's roster version after this batch.
    pub v: u64,
    /// Members whose connection total went 0 → 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<Member>,
    /// Members whose connection total went back to 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<Left>,
    /// The room lists again after being over the bound: re-read the list.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reset: bool,
    /// The room went over `--list-max-members`: it stops listing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_limit: bool,
}

/// What a node writes into one room's roster at a tick.
#[derive(Debug)]
pub struct RosterWrite<'a> {
    /// The writing node instance (node id and boot nonce).
    pub instance: &'a str,
    /// The roster epoch and version the node saw last (`None`: none yet — it gets the current
    /// ones and no batches). Another epoch (the roster was lost and began again) is a `reset`.
    pub last_seen: Option<(u64, u64)>,
    /// Its members whose counts changed since its last write.
    pub changes: &'a [Change],
    /// `--list-max-members`.
    pub max_members: usize,
    /// Whether lifecycle events are appended ([`crate::config::Config::lifecycle_events`]).
    pub events: bool,
}

/// One room's part of a node's presence tick: its counts (or its withdrawal) and, for a room
/// that lists, its roster write.
#[derive(Debug)]
pub struct RoomTick<'a> {
    /// The room.
    pub room: &'a RoomName,
    /// This node's counts of it; `None` withdraws them (its last local member left).
    pub counts: Option<RoomCounts>,
    /// The roster write, for a room that lists.
    pub roster: Option<RosterWrite<'a>>,
}

/// What a roster write answers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RosterRead {
    /// The room's roster epoch (made when the roster began: a roster lost and begun again has
    /// another) and version now.
    pub epoch: u64,
    /// The room's roster version now.
    pub version: u64,
    /// Whether the room is over `--list-max-members` (not listing).
    pub over: bool,
    /// The batches after the node's `last_seen`, in order.
    pub batches: Vec<Batch>,
    /// The batches after `last_seen` are gone (trimmed, or the roster was lost): re-read.
    pub reset: bool,
    /// Lifecycle events appended to the room's `events` stream.
    pub events: u64,
    /// The in-process broker's lifecycle events of this write (their JSON without `id`), for
    /// the node to hand to the webhooks; always empty with Redis, whose scripts append to the
    /// room's stream themselves.
    pub in_process: Vec<String>,
}

/// One page of a room's list.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MembersPage {
    /// The roster version the page was read at.
    pub version: u64,
    /// The room is over `--list-max-members`: no members are listed.
    pub over: bool,
    /// The page's members.
    pub members: Vec<Member>,
    /// The next page's cursor (`None`: done).
    pub cursor: Option<String>,
}

/// The one `members_diff` of a tick, folded from the batches read back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// The version the diff brings the member to.
    pub v: u64,
    /// Joined since the last diff (their last change was a join).
    pub joined: Vec<Member>,
    /// Left since the last diff (their last change was a leave).
    pub left: Vec<Left>,
    /// Re-read the list.
    pub reset: bool,
    /// The room stopped listing.
    pub over_limit: bool,
}

/// Folds the batches of one tick into one diff: per member only its last change counts; a
/// `reset` or `over_limit` batch supersedes what came before it (the last one wins).
pub fn fold(version: u64, batches: &[Batch], reset: bool) -> Option<Diff> {
    if reset {
        return Some(Diff {
            v: version,
            reset: true,
            ..Diff::default()
        });
    }
    if batches.is_empty() {
        return None;
    }
    let mut last: Vec<(&str, Result<&Member, &Left>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut special: Option<(bool, bool)> = None;
    for b in batches {
        if b.reset || b.over_limit {
            special = Some((b.reset, b.over_limit));
            last.clear();
            index.clear();
            continue;
        }
        let changes = b
            .joined
            .iter()
            .map(|m| (m.sub.as_str(), Ok(m)))
            .chain(b.left.iter().map(|l| (l.sub.as_str(), Err(l))));
        for (sub, change) in changes {
            match index.get(sub) {
                Some(&i) => last[i].1 = change,
                None => {
                    index.insert(sub, last.len());
                    last.push((sub, change));
                }
            }
        }
    }
    let v = batches.last().map_or(version, |b| b.v);
    let mut diff = Diff {
        v,
        ..Diff::default()
    };
    match special {
        Some((_, true)) if last.is_empty() => diff.over_limit = true,
        Some(_) => diff.reset = true,
        None => {}
    }
    if diff.reset {
        return Some(diff);
    }
    for (_, change) in last {
        match change {
            Ok(m) => diff.joined.push(m.clone()),
            Err(l) => diff.left.push(l.clone()),
        }
    }
    Some(diff)
}

/// The in-process broker's `member.joined` and `member.left` events of one write, as
/// `presence.lua` appends them (docs/protocol.md, section 12.6): `gone` holds the members of
/// `batch.left`, in its order.
fn member_events(room: &RoomName, batch: &Batch, gone: &[Member]) -> Vec<String> {
    let ts_ms = crate::wire::clock::unix_millis();
    let joined = batch.joined.iter().map(|m| {
        serde_json::json!({"type": "member.joined", "room": room.as_str(), "ts_ms": ts_ms,
            "sub": m.sub, "name": m.name, "role": m.role})
    });
    let left = batch.left.iter().zip(gone).map(|(l, m)| {
        serde_json::json!({"type": "member.left", "room": room.as_str(), "ts_ms": ts_ms,
            "sub": l.sub, "name": m.name, "role": m.role, "reason": l.reason})
    });
    joined.chain(left).map(|e| e.to_string()).collect()
}

/// One room's roster in the in-process broker.
#[derive(Debug, Default)]
struct Room {
    /// Connections per member key (only keys with connections).
    totals: HashMap<String, u32>,
    /// The listed members by key, ordered for paging.
    members: BTreeMap<String, Member>,
    /// Made when the room's roster began.
    epoch: u64,
    version: u64,
    /// The last [`LOG_CAP`] batches.
    log: VecDeque<Batch>,
    over: bool,
}

/// The in-process broker's rosters: the same semantics as `roster.lua`, this node being the
/// whole cluster. A std lock: held for one room's write or one page, never across an await.
#[derive(Debug, Default)]
pub struct RosterBook {
    /// Room → roster; a room whose last member left is removed (bounded by the listing rooms
    /// with members, so by the node's connections).
    rooms: Mutex<HashMap<RoomName, Room>>,
    /// The next roster's epoch.
    next_epoch: std::sync::atomic::AtomicU64,
}

impl RosterBook {
    /// Applies one node's changes to `room` and answers as `roster.lua` does.
    pub fn write(&self, room: &RoomName, w: &RosterWrite<'_>) -> RosterRead {
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let r = rooms.entry(room.clone()).or_insert_with(|| Room {
            epoch: 1 + self
                .next_epoch
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            ..Room::default()
        });
        let mut batch = Batch::default();
        let mut gone = Vec::new();
        for c in w.changes {
            let before = r.totals.get(&c.member.sub).copied().unwrap_or(0);
            if c.count == 0 {
                r.totals.remove(&c.member.sub);
            } else {
                r.totals.insert(c.member.sub.clone(), c.count);
            }
            if before == 0 && c.count > 0 {
                r.members.insert(c.member.sub.clone(), c.member.clone());
                batch.joined.push(c.member.clone());
            } else if before > 0 && c.count == 0 {
                gone.push(
                    r.members
                        .remove(&c.member.sub)
                        .unwrap_or_else(|| c.member.clone()),
                );
                batch.left.push(Left {
                    sub: c.member.sub.clone(),
                    reason: c.reason.to_string(),
                });
            }
        }
        let n = r.totals.len();
        let special = if !r.over && n > w.max_members {
            r.over = true;
            Some(Batch {
                over_limit: true,
                ..Batch::default()
            })
        } else if r.over && n <= w.max_members * HYSTERESIS_PERCENT / 100 {
            r.over = false;
            Some(Batch {
                reset: true,
                ..Batch::default()
            })
        } else {
            None
        };
        let events = if w.events && !r.over {
            member_events(room, &batch, &gone)
        } else {
            Vec::new()
        };
        let logged = match special {
            Some(b) => Some(b),
            None if !r.over && (!batch.joined.is_empty() || !batch.left.is_empty()) => Some(batch),
            None => None,
        };
        if let Some(mut b) = logged {
            r.version += 1;
            b.v = r.version;
            r.log.push_back(b);
            if r.log.len() > LOG_CAP {
                r.log.pop_front();
            }
        }
        let mut read = answer(r, w.last_seen);
        read.events = events.len() as u64;
        read.in_process = events;
        if r.totals.is_empty() {
            // Nobody left to list: the next member starts a new roster (a new epoch), and a node
            // that remembered the old one gets `reset`, which re-reads an empty list at worst.
            rooms.remove(room);
        }
        read
    }

    /// A page of `room`'s list after `cursor` (the last key of the previous page).
    pub fn members(&self, room: &RoomName, cursor: Option<&str>, limit: usize) -> MembersPage {
        let rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(r) = rooms.get(room) else {
            return MembersPage::default();
        };
        if r.over {
            return MembersPage {
                version: r.version,
                over: true,
                ..MembersPage::default()
            };
        }
        let after = cursor.filter(|c| !c.is_empty());
        let mut members: Vec<Member> = r
            .members
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit + 1)
            .map(|(_, m)| m.clone())
            .collect();
        let cursor = (members.len() > limit).then(|| {
            members.truncate(limit);
            members.last().map(|m| m.sub.clone()).unwrap_or_default()
        });
        MembersPage {
            version: r.version,
            over: false,
            members,
            cursor,
        }
    }
}

/// The batches of `r` after `last_seen`, or `reset` when they are gone.
fn answer(r: &Room, last_seen: Option<(u64, u64)>) -> RosterRead {
    let mut read = RosterRead {
        epoch: r.epoch,
        version: r.version,
        over: r.over,
        ..RosterRead::default()
    };
    let Some((epoch, seen)) = last_seen else {
        return read;
    };
    if epoch != r.epoch {
        read.reset = true;
        return read;
    }
    if seen == r.version {
        return read;
    }
    let behind = r.version.saturating_sub(seen) as usize;
    if seen > r.version || behind > r.log.len() {
        read.reset = true;
        return read;
    }
    read.batches = r.log.iter().skip(r.log.len() - behind).cloned().collect();
    read
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(sub: &str) -> Member {
        Member {
            sub: sub.into(),
            name: Some(format!("name-{sub}")),
            role: "viewer".into(),
        }
    }

    fn change(sub: &str, count: u32) -> Change {
        Change {
            member: member(sub),
            count,
            reason: "client_closed",
        }
    }

    fn write(book: &RosterBook, room: &RoomName, seen: Option<u64>, c: &[Change]) -> RosterRead {
        let epoch = book.rooms.lock().unwrap().get(room).map_or(0, |r| r.epoch);
        book.write(
            room,
            &RosterWrite {
                instance: "n1:x",
                last_seen: seen.map(|v| (epoch, v)),
                changes: c,
                max_members: 3,
                events: false,
            },
        )
    }

    #[test]
    fn joins_and_leaves_are_numbered_and_read_back_after_the_version_seen() {
        let book = RosterBook::default();
        let room = RoomName::parse("r").unwrap();
        let first = write(&book, &room, None, &[change("a", 1), change("b", 2)]);
        assert_eq!(first.version, 1);
        assert!(first.batches.is_empty(), "no version seen yet: no batches");
        // A second connection of `b` changes nothing visible; `a` leaves.
        let second = write(&book, &room, Some(1), &[change("b", 1), change("a", 0)]);
        assert_eq!(second.version, 2);
        assert_eq!(second.batches.len(), 1);
        assert_eq!(
            second.batches[0].left,
            vec![Left {
                sub: "a".into(),
                reason: "client_closed".into()
            }]
        );
        assert!(second.batches[0].joined.is_empty());
        let page = book.members(&room, None, 10);
        assert_eq!(page.members, vec![member("b")]);
        assert_eq!(page.version, 2);
        // Nothing changed: the same version, nothing logged.
        let idle = write(&book, &room, Some(2), &[change("b", 1)]);
        assert_eq!((idle.version, idle.batches.len()), (2, 0));
    }

    #[test]
    fn pages_follow_the_cursor() {
        let book = RosterBook::default();
        let room = RoomName::parse("r").unwrap();
        let all: Vec<Change> = ["a", "b", "c"].iter().map(|s| change(s, 1)).collect();
        write(&book, &room, None, &all);
        let p1 = book.members(&room, None, 2);
        assert_eq!(p1.members, vec![member("a"), member("b")]);
        let p2 = book.members(&room, p1.cursor.as_deref(), 2);
        assert_eq!(p2.members, vec![member("c")]);
        assert_eq!(p2.cursor, None);
    }

    #[test]
    fn over_the_bound_stops_listing_and_below_the_hysteresis_lists_again() {
        let book = RosterBook::default();
        let room = RoomName::parse("r").unwrap();
        let all: Vec<Change> = ["a", "b", "c"].iter().map(|s| change(s, 1)).collect();
        let r = write(&book, &room, None, &all);
        assert!(!r.over);
        let r = write(&book, &room, Some(r.version), &[change("d", 1)]);
        assert!(r.over);
        assert!(r.batches[0].over_limit);
        assert!(book.members(&room, None, 10).over);
        // 3 is not ≤ 90 % of 3: still over.
        let r = write(&book, &room, Some(r.version), &[change("d", 0)]);
        assert!(r.over && r.batches.is_empty());
        let r = write(&book, &room, Some(r.version), &[change("c", 0)]);
        assert!(!r.over);
        assert!(r.batches[0].reset);
        assert_eq!(book.members(&room, None, 10).members.len(), 2);
    }

    #[test]
    fn the_log_is_capped_and_a_node_further_behind_gets_reset() {
        let book = RosterBook::default();
        let room = RoomName::parse("r").unwrap();
        write(&book, &room, None, &[change("keep", 1)]);
        for i in 0..LOG_CAP + 5 {
            write(&book, &room, None, &[change("x", (i % 2 == 0) as u32)]);
        }
        let rooms = book.rooms.lock().unwrap();
        assert_eq!(rooms[&room].log.len(), LOG_CAP, "the log is bounded");
        drop(rooms);
        let r = write(&book, &room, Some(1), &[]);
        assert!(r.reset, "version 1's successors were trimmed");
        let r = write(&book, &room, Some(r.version - 2), &[]);
        assert_eq!(r.batches.len(), 2);
    }

    #[test]
    fn an_empty_room_is_forgotten() {
        let book = RosterBook::default();
        let room = RoomName::parse("r").unwrap();
        let first = write(&book, &room, None, &[change("a", 1)]);
        write(&book, &room, Some(1), &[change("a", 0)]);
        assert!(book.rooms.lock().unwrap().is_empty());
        // The next roster has another epoch: a node that remembers the old one is told `reset`,
        // even where the versions happen to match.
        let w = RosterWrite {
            instance: "n1:x",
            last_seen: Some((first.epoch, 1)),
            changes: &[change("b", 1)],
            max_members: 3,
            events: false,
        };
        let again = book.write(&room, &w);
        assert_eq!(again.version, 1);
        assert_ne!(again.epoch, first.epoch);
        assert!(again.reset);
    }

    #[test]
    fn a_tick_folds_into_one_diff_per_member() {
        let b = |v, joined: &[&str], left: &[&str]| Batch {
            v,
            joined: joined.iter().map(|s| member(s)).collect(),
            left: left
                .iter()
                .map(|s| Left {
                    sub: s.to_string(),
                    reason: "kicked".into(),
                })
                .collect(),
            ..Batch::default()
        };
        let d = fold(0, &[b(1, &["a", "b"], &[]), b(2, &[], &["a"])], false).unwrap();
        assert_eq!(d.v, 2);
        assert_eq!(d.joined, vec![member("b")]);
        assert_eq!(d.left.len(), 1);
        assert_eq!(fold(3, &[], false), None);
        assert!(fold(3, &[], true).unwrap().reset);
        let over = Batch {
            v: 3,
            over_limit: true,
            ..Batch::default()
        };
        let d = fold(0, &[b(2, &["a"], &[]), over.clone()], false).unwrap();
        assert!(d.over_limit && d.joined.is_empty());
        let reset = Batch {
            v: 4,
            reset: true,
            ..Batch::default()
        };
        assert!(fold(0, &[over, reset], false).unwrap().reset);
    }
}
