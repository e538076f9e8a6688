//! The presence timer: every `--presence-interval`, report this node's local counts of each room
//! to the broker, get the cluster-wide counts back, and send a `presence` event (encoded once per
//! room) to each member whose last one from this timer differs — a member that joined since, or
//! every member when the counts changed. A room whose counts stay the same costs its members
//! nothing (issue 22): no frame, no syscall, one compare per member. A room whose last local
//! member left is reported with zero counts for `--unsubscribe-delay`, then withdrawn (the
//! `room.vacated` debounce); a node that dies stops renewing its reports, which expire after
//! three intervals.
//!
//! Member lists ride on the same tick, in the same script call per room: the node's listed
//! members that changed since the last tick ([`crate::node::roster`]) go with its counts, and the
//! list's changes cluster-wide since the version the node saw last come back, folded into one
//! `members_diff` per room (encoded once) for the members that see the list. The tick also
//! renews the node instance in the registry (rooms are added to its room set before the first
//! write into them, and removed after the withdrawal from them) and reaps the instances that
//! stopped renewing (see `broker/redis/roster.rs`): their members leave with `node_lost` within
//! three intervals and one tick of the death.
//!
//! The frames of one round go out in slices of 500 members spread over a quarter of the interval
//! (at most 1 s), not in one burst: a change shows on every member within 1¼ intervals. In a room
//! that had a fan-out within the last half of that window, the frame rides with each member's
//! next message instead ([`Rider::Presence`]); those still due after half the window are pushed,
//! spread over the other half.
//!
//! The latest cluster-wide counts go to the node's [`crate::node::presence_cache::PresenceCache`], so that a client that joins
//! between two ticks gets a sensible `presence` right after its `welcome`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tracing::{debug, warn};

use crate::broker::roster::{fold, RoomTick, RosterWrite};
use crate::broker::BrokerError;
use crate::fanout::outbox::{Outbox, PushError, Pushed, Rider};
use crate::metrics::DropReason;
use crate::node::pacing;
use crate::node::roster::Write;
use crate::node::Node;
use crate::wire::frame::frame_text;
use crate::wire::protocol::{self, DiffKind, RoomCounts, RoomName};

/// What the timer remembers between ticks.
#[derive(Debug, Default)]
struct State {
    /// Rooms this node reported counts of, with the moment their last local member left (`None`
    /// while they have members).
    reported: HashMap<RoomName, Option<Instant>>,
    /// Rooms in this instance's room set in the registry.
    registered: HashSet<RoomName>,
    /// Whether the registry has answered a heartbeat of this instance yet.
    beaten: bool,
}

/// Reports, with zero counts, a room about to be withdrawn (or not reported) whose roster write
/// still has members of this node: they joined after the hub's snapshot of this tick, so the
/// snapshot did not count them but the roster write that follows it has their joins. Withdrawn
/// there, the room's `member.joined` would be appended before its `room.occupied` (which came at
/// the next tick), against the order section 12.6 of docs/protocol.md promises; reported, the
/// script appends `room.occupied` first, and the next tick's snapshot has their counts. A write
/// whose members all left again (count 0) leaves the room withdrawn: its `member.left` events go
/// in the same script, before `room.vacated`.
fn report_written_members(
    counts: &mut [(RoomName, Option<RoomCounts>)],
    writes: &HashMap<RoomName, Write>,
) {
    for (room, c) in counts.iter_mut() {
        let present = writes
            .get(room)
            .is_some_and(|w| w.changes.iter().any(|change| change.count > 0));
        if c.is_none() && present {
            *c = Some(RoomCounts::default());
        }
    }
}

/// Runs the presence timer until the node stops, then withdraws this node's reports and members.
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(node.config.presence_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State::default();
    let mut failures = 0u64;
    loop {
        tokio::select! {
            _ = node.stopping().cancelled() => break,
            _ = tick.tick() => {
                match once(&node, &mut state, false).await {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(60) {
                            warn!(cause = %e, failures, "presence update failed");
                        }
                    }
                }
            }
        }
    }
    // Leave no counts or members behind for the TTL and the reaper to clean up.
    node.roster.leave_all("shutdown");
    if once(&node, &mut state, true).await.is_ok() {
        let _ = node.broker.forget_instance(&node.instance).await;
    }
}

/// One tick; `last` withdraws every room (the node stops).
async fn once(node: &Node, state: &mut State, last: bool) -> Result<(), BrokerError> {
    let local = if last {
        Vec::new()
    } else {
        node.hub.snapshot()
    };
    let now = Instant::now();
    // Counts per room: the local ones, zero for a room emptied less than --unsubscribe-delay
    // ago, `None` (withdraw) after that.
    let mut counts: Vec<(RoomName, Option<RoomCounts>)> = Vec::new();
    let live: HashSet<&RoomName> = local.iter().map(|(r, _)| r).collect();
    for (room, emptied) in state.reported.iter_mut() {
        if live.contains(room) {
            *emptied = None;
            continue;
        }
        let since = *emptied.get_or_insert(now);
        let keep = !last && now.duration_since(since) < node.config.unsubscribe_delay;
        counts.push((room.clone(), keep.then(RoomCounts::default)));
    }
    counts.extend(local.iter().map(|(r, c)| (r.clone(), Some(*c))));
    let mut writes: HashMap<RoomName, Write> = node
        .roster
        .writes()
        .into_iter()
        .map(|w| (w.room.clone(), w))
        .collect();
    // A listing room this node neither reports nor withdraws (a member came and went between two
    // ticks) still gets its roster write.
    let counted: HashSet<RoomName> = counts.iter().map(|(r, _)| r.clone()).collect();
    for room in writes.keys().filter(|r| !counted.contains(*r)) {
        counts.push((room.clone(), None));
    }
    if !last {
        report_written_members(&mut counts, &writes);
    }
    // Registry first: a room joins this instance's room set before its first write.
    let fresh: Vec<RoomName> = counts
        .iter()
        .filter(|(r, c)| (c.is_some() || writes.contains_key(r)) && !state.registered.contains(r))
        .map(|(r, _)| r.clone())
        .collect();
    let ttl = node.config.presence_ttl();
    let dead = match node.broker.beat(&node.instance, &fresh, ttl).await {
        Ok((unknown, dead)) if unknown && state.beaten => {
            // Reaped while it could not beat (a pause, a partition): its counts, members and
            // room set are gone. Register and write everything again from the next tick on.
            warn!(instance = %node.instance, "this node was reaped as dead; writing its members again");
            state.registered.clear();
            node.roster.rewrite_all();
            writes.clear();
            dead
        }
        Ok((_, dead)) => {
            state.beaten = true;
            state.registered.extend(fresh);
            dead
        }
        Err(e) => {
            // Counts still go (they expire on their own); roster writes wait for the registry.
            // Not logged here: the tick's own failure is (throttled), and a Redis outage fails both.
            writes.retain(|r, _| state.registered.contains(r));
            debug!(cause = %e, "node registry heartbeat failed");
            Vec::new()
        }
    };
    let events = node.config.lifecycle_events();
    let max_members = node.config.list_max_members;
    let ticks: Vec<RoomTick<'_>> = counts
        .iter()
        .map(|(room, c)| RoomTick {
            room,
            counts: *c,
            roster: writes.get(room).map(|w| RosterWrite {
                instance: &node.instance,
                last_seen: w.last_seen,
                changes: &w.changes,
                max_members,
                events,
            }),
        })
        .collect();
    let answers = node.broker.tick(&node.instance, &ticks, ttl, events).await;
    let local: HashMap<RoomName, RoomCounts> = local.into_iter().collect();
    let mut cache = HashMap::with_capacity(local.len());
    let mut sends: Vec<Frame> = Vec::new();
    let mut riding: Vec<Frame> = Vec::new();
    let ride = pacing::window(node.config.presence_interval) / 2;
    let now_ms = crate::wire::clock::monotonic_millis();
    let mut unchanged = 0u64;
    let mut forget = Vec::new();
    let mut failed = None;
    for ((room, reported), answer) in counts.iter().zip(answers) {
        let (cluster, mut read) = match answer {
            Ok(a) => a,
            Err(e) => {
                failed = Some(e);
                continue;
            }
        };
        if let Some(r) = read.as_mut().filter(|r| r.events > 0) {
            if r.in_process.is_empty() {
                node.lifecycle_appended(room);
            }
            for event in r.in_process.drain(..) {
                node.lifecycle_in_process(room, event);
            }
        }
        let mut roster_gone = true;
        if let (Some(w), Some(read)) = (writes.get(room), &read) {
            let (outboxes, gone) = node.roster.written(w, read);
            roster_gone = gone;
            if read.reset {
                // The registry may have lost the room too: add it again before the rewrite.
                state.registered.remove(room);
            }
            // The node's first write in the room reads no batches (it has seen no version), yet
            // its members may have paged the list at an older version before it: they re-read.
            let first = w.last_seen.is_none();
            if let Some(diff) = fold(read.version, &read.batches, read.reset || first) {
                let kind = if diff.reset {
                    DiffKind::Reset
                } else if diff.over_limit {
                    DiffKind::OverLimit
                } else {
                    DiffKind::Changes
                };
                let frame = frame_text(&protocol::members_diff(
                    room,
                    diff.v,
                    kind,
                    &diff.joined,
                    &diff.left,
                ));
                for o in &outboxes {
                    match o.push_message(frame.clone(), None, true) {
                        Ok(_) => node.metrics.members_diffs.increment(1),
                        // The session closes as a slow consumer (it re-reads the list when it
                        // is back); counted like a refused presence frame.
                        Err(PushError::Full) => {
                            node.metrics.dropped(DropReason::SlowConsumer).increment(1)
                        }
                        Err(_) => {}
                    }
                }
            }
        }
        match reported {
            None => {
                state.reported.remove(room);
                if roster_gone {
                    forget.push(room.clone());
                }
                continue;
            }
            Some(_) => {
                state.reported.entry(room.clone()).or_insert(None);
            }
        }
        let Some(mine) = local.get(room) else {
            continue;
        };
        // Only to members whose last counts differ (a new member, or the counts changed), framed
        // once per room: every member gets the same bytes. In a room with traffic they ride with
        // each member's next message (`fanout/outbox/rider.rs`; the room's rider frame is set
        // before any member is deferred), else each goes in one plain `send`.
        let packed = cluster.packed();
        let over = node.roster.is_over(room);
        let busy = node.hub.is_busy(room, now_ms, ride.as_millis() as u64);
        let mut frame: Option<Bytes> = None;
        let mut rider_set = false;
        for outbox in node.hub.outboxes(room) {
            if outbox.presence_sent() == packed {
                unchanged += 1;
                continue;
            }
            let frame = frame
                .get_or_insert_with(|| {
                    frame_text(&if over {
                        protocol::presence_not_listing(room, cluster.hosts, cluster.viewers)
                    } else {
                        protocol::presence(room, cluster.hosts, cluster.viewers)
                    })
                })
                .clone();
            if busy {
                if !rider_set {
                    node.hub.set_presence_rider(room, frame.clone());
                    rider_set = true;
                }
                if outbox.defer(Rider::Presence) {
                    outbox.set_presence_sent(packed);
                    riding.push((frame, outbox, packed));
                    continue;
                }
            }
            sends.push((frame, outbox, packed));
        }
        cache.insert(room.clone(), (cluster, *mine));
    }
    if !forget.is_empty()
        && node
            .broker
            .forget_rooms(&node.instance, &forget)
            .await
            .is_ok()
    {
        for r in &forget {
            state.registered.remove(r);
        }
    }
    if !last {
        node.presence.replace(cache);
        node.metrics.presence_unchanged.increment(unchanged);
        tokio::join!(spread(node, sends), flush_riders(node, riding, ride));
        reap(node, dead, events).await;
    }
    failed.map_or(Ok(()), Err)
}

/// Reaps the instances the registry named as dead (one node wins each one's lock).
async fn reap(node: &Node, dead: Vec<String>, events: bool) {
    let ttl = node.config.presence_ttl();
    for instance in dead.iter().filter(|i| **i != node.instance) {
        match node
            .broker
            .reap(instance, ttl, node.config.list_max_members, events)
            .await
        {
            Ok(rooms) if !rooms.is_empty() => {
                node.metrics.roster_reaps.increment(1);
                for (room, appended) in rooms {
                    if appended > 0 {
                        node.lifecycle_appended(&room);
                    }
                }
            }
            Ok(_) => {}
            Err(e) => warn!(instance = %instance, cause = %e, "reaping a dead node failed"),
        }
    }
}

/// One member's presence frame and the packed counts it carries.
type Frame = (Bytes, Arc<Outbox>, u64);

/// Waits `ride` (half the [`pacing::window`]) for the deferred presence frames to go out with
/// their members' next messages, then pushes those still due, spread over the other half (their
/// members' counts were recorded when they were deferred).
async fn flush_riders(node: &Node, riding: Vec<Frame>, ride: std::time::Duration) {
    let (mut dropped, mut written) = (0u64, 0u64);
    pacing::leftovers(
        riding,
        ride,
        ride,
        node.stopping(),
        |(_, outbox, _)| outbox.take_due(Rider::Presence),
        |(frame, outbox, _)| match outbox.push_message(frame.clone(), None, true) {
            Err(PushError::Full) => dropped += 1,
            Ok(Pushed::Written) => written += 1,
            _ => {}
        },
    )
    .await;
    count(node, written, dropped);
}

/// Queues the presence frames spread over [`pacing::window`] of the interval.
/// A frame that could not be queued leaves the member's record alone, so the next tick tries again.
async fn spread(node: &Node, sends: Vec<Frame>) {
    let (mut dropped, mut written) = (0u64, 0u64);
    let window = pacing::window(node.config.presence_interval);
    pacing::in_slices(
        &sends,
        window,
        node.stopping(),
        |(frame, outbox, packed)| match outbox.push_message(frame.clone(), None, true) {
            Err(PushError::Full) => dropped += 1,
            Err(_) => {}
            Ok(pushed) => {
                outbox.set_presence_sent(*packed);
                if matches!(pushed, Pushed::Written) {
                    written += 1;
                }
            }
        },
    )
    .await;
    count(node, written, dropped);
}

/// Counts presence frames written at once (delivered) and refused by a full outbox.
fn count(node: &Node, written: u64, dropped: u64) {
    node.metrics.delivered.increment(written);
    if dropped > 0 {
        node.metrics
            .dropped(DropReason::SlowConsumer)
            .increment(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::roster::{Change, Member};

    fn write(room: &RoomName, counts: &[u32]) -> Write {
        Write {
            room: room.clone(),
            last_seen: None,
            changes: counts
                .iter()
                .enumerate()
                .map(|(i, &count)| Change {
                    member: Member {
                        sub: format!("m{i}"),
                        name: None,
                        role: "viewer".into(),
                    },
                    count,
                    reason: "client_closed",
                })
                .collect(),
        }
    }

    /// The race the in-process lifecycle test hit once in ~60 runs under load: a member joined
    /// between the hub's snapshot and the roster's writes, and the room went with no counts, so
    /// its `member.joined` came before `room.occupied`.
    #[test]
    fn a_room_whose_write_has_members_is_reported_not_withdrawn() {
        let room = |s: &str| RoomName::parse(s).unwrap();
        let three = RoomCounts {
            hosts: 1,
            viewers: 2,
        };
        let mut counts = vec![
            (room("joined-after-snapshot"), None),
            (room("came-and-went"), None),
            (room("emptied-long-ago"), None),
            (room("counted"), Some(three)),
        ];
        let writes: HashMap<RoomName, Write> = [
            write(&room("joined-after-snapshot"), &[1]),
            write(&room("came-and-went"), &[0, 0]),
            write(&room("counted"), &[1]),
        ]
        .into_iter()
        .map(|w| (w.room.clone(), w))
        .collect();
        report_written_members(&mut counts, &writes);
        assert_eq!(
            counts,
            vec![
                (room("joined-after-snapshot"), Some(RoomCounts::default())),
                (room("came-and-went"), None),
                (room("emptied-long-ago"), None),
                (room("counted"), Some(three)),
            ]
        );
    }
}
