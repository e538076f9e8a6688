//! A member's books, kept across its connections: which publisher numbers and room offsets it
//! received (through [`Ledger`]s), where to resume from (`since=`), and its publishes not yet
//! acknowledged, to send them again after a reconnect. Pure bookkeeping, no I/O: the connection
//! task (`session.rs`) feeds it frame by frame and turns what it says into counters.
//!
//! The books belong to the member, not the connection, so that a member's deliveries count
//! across reconnects (`lost` is what it never received by any path), and so that it can resume.
//! Against a gateway without offsets, none of the resume bookkeeping engages.

use std::collections::{BTreeMap, VecDeque};

use crate::ledger::{Arrival, Ledger};
use crate::ws::Position;

/// Most unacknowledged publishes a member keeps for re-sending; older ones are forgotten (and
/// counted) so a gateway that never acks cannot grow memory.
const MAX_UNACKED: usize = 10_000;

/// What a welcome meant for the books.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Welcomed {
    /// The gateway numbers messages.
    pub numbered: bool,
    /// A resume was answered (`recovered` present after `since=`).
    pub resumed: bool,
    /// ... with `recovered: false`.
    pub incomplete: bool,
    /// After a complete resume: messages up to this offset come from history.
    pub recovered_upto: Option<u64>,
    /// Publishes to send again.
    pub resend: Vec<String>,
}

/// What one message's room position meant.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Positioned {
    /// Recovered from history (at or below the resume welcome's offset).
    pub recovered: bool,
    /// An offset the member already had.
    pub duplicate: bool,
    /// An offset after a higher one.
    pub reordered: bool,
}

/// A member's books, kept across its connections. A std `Mutex`: short updates, no await.
#[derive(Debug, Default)]
pub struct Book {
    /// Decided at the window start: was the member in its room then?
    pub measured: Option<bool>,
    /// Publisher sequence numbers received (end-to-end truth).
    pub ledger: Ledger,
    /// Room offsets received in the current epoch (the gateway's numbering).
    pub offsets: Ledger,
    /// The epoch of `offsets`.
    pub offsets_epoch: Option<String>,
    /// The last position seen, for `since=`.
    pub position: Option<Position>,
    /// Some welcome of this member carried a room position: the gateway numbers messages and
    /// acknowledges keyed publishes, so they are kept until their ack. Sticky across connections:
    /// a later welcome without a position (its node's broker was away) does not turn it off.
    pub numbered: bool,
    /// Publishes with a key and no ack yet, by sequence number: the frames to send again.
    pub unacked: BTreeMap<u64, String>,
    /// Unacked publishes the gateway refused for now (`rate_limited` after a reconnect's burst,
    /// `unavailable` while its broker is away): sent again at the session's retry pace.
    pub retry: VecDeque<u64>,
    /// Window messages received, for sampling rows.
    pub received: u64,
}

/// What becomes of a refused keyed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Sent again with the same key at the retry pace while it stays unacked.
    Retry,
    /// Not sent again.
    Final,
}

impl Book {
    /// A welcome arrived; `resuming` when the connection asked for `since=`, `resend` whether to
    /// hand back the unacknowledged publishes.
    pub fn on_welcome(
        &mut self,
        position: Option<Position>,
        recovered: Option<bool>,
        resuming: bool,
        resend: bool,
    ) -> Welcomed {
        let mut w = Welcomed::default();
        if let Some(position) = position {
            self.numbered = true;
            w.numbered = true;
            if resuming {
                if let Some(r) = recovered {
                    w.resumed = true;
                    if r {
                        w.recovered_upto = Some(position.offset);
                    } else {
                        w.incomplete = true;
                    }
                }
            }
            // The welcome's position is where a member resumes from only when it has none of
            // its own, or the recovery failed: after a complete one, the missed messages are
            // still to come, and a drop during the catch-up must resume before them.
            if self.position.is_none() || recovered == Some(false) {
                self.position = Some(position);
            }
        }
        // What an earlier connection left unacknowledged goes out again, also through a node
        // whose broker is away (it answers `unavailable`, and the retry pace takes over).
        if resend && self.numbered {
            w.resend = self.unacked.values().cloned().collect();
            self.retry.clear();
        }
        w
    }

    /// A keyed publish was refused for now: send it again later (it stays unacked).
    pub fn retry_later(&mut self, key: &str) {
        if let Some(seq) = key.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()) {
            if self.unacked.contains_key(&seq) && self.retry.len() < MAX_UNACKED {
                self.retry.push_back(seq);
            }
        }
    }

    /// A keyed publish was refused with `code`: whether it goes out again (same key, paced by
    /// the session) or is final.
    ///
    /// `unavailable` (the node's broker did not take it) is retried like `rate_limited`, not
    /// kept for the next reconnect: a node whose Redis comes back before `--broker-loss-close`
    /// never hands its clients over, so a publish waiting for a welcome would never be sent
    /// again and would count as lost. A retry of a publish that did reach Redis is answered as a
    /// duplicate by its key, so retrying never delivers twice. Any other refusal is final.
    pub fn on_refused(&mut self, code: &str, key: &str) -> Refusal {
        match code {
            "rate_limited" | "unavailable" => {
                self.retry_later(key);
                Refusal::Retry
            }
            _ => {
                self.forget(key);
                Refusal::Final
            }
        }
    }

    /// The next refused publish to send again, if one is still unacked.
    pub fn next_retry(&mut self) -> Option<String> {
        while let Some(seq) = self.retry.pop_front() {
            if let Some(frame) = self.unacked.get(&seq) {
                return Some(frame.clone());
            }
        }
        None
    }

    /// A message with a room position arrived.
    pub fn on_position(&mut self, p: Position, recovered_upto: Option<u64>) -> Positioned {
        let mut out = Positioned {
            recovered: recovered_upto.is_some_and(|upto| p.offset <= upto),
            ..Positioned::default()
        };
        if self.offsets_epoch.as_deref() != Some(p.epoch.as_str()) {
            self.offsets = Ledger::new(false);
            self.offsets_epoch = Some(p.epoch.clone());
        }
        match self.offsets.record(0, p.offset) {
            Arrival::Duplicate => out.duplicate = true,
            Arrival::Reordered => out.reordered = true,
            _ => {}
        }
        let newer = match &self.position {
            Some(old) => old.epoch != p.epoch || p.offset > old.offset,
            None => true,
        };
        if newer {
            self.position = Some(p);
        }
        out
    }

    /// Keeps a keyed publish until its ack (when the gateway numbers messages); returns whether an
    /// older one had to be forgotten.
    pub fn remember(&mut self, seq: u64, frame: String) -> bool {
        if !self.numbered {
            return false;
        }
        self.unacked.insert(seq, frame);
        if self.unacked.len() > MAX_UNACKED {
            self.unacked.pop_first();
            return true;
        }
        false
    }

    /// An ack or keyed error came for `key` (`RUN-PUBLISHER-SEQ`).
    pub fn forget(&mut self, key: &str) {
        if let Some(seq) = key.rsplit('-').next().and_then(|s| s.parse::<u64>().ok()) {
            self.unacked.remove(&seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    #[test]
    fn a_gateway_without_offsets_engages_nothing() {
        let mut b = Book::default();
        let w = b.on_welcome(None, None, false, true);
        assert_eq!(w, Welcomed::default());
        assert!(
            b.position.is_none(),
            "nothing to resume from: reconnect as before"
        );
    }

    #[test]
    fn resume_counts_recovered_duplicates_and_reorders() {
        let mut b = Book::default();
        let w = b.on_welcome(Some(at("e1", 5)), None, false, true);
        assert!(w.numbered && !w.resumed);
        assert_eq!(b.position, Some(at("e1", 5)));
        for o in [6, 7] {
            assert_eq!(b.on_position(at("e1", o), None), Positioned::default());
        }
        assert_eq!(
            b.position,
            Some(at("e1", 7)),
            "resume from the last message seen"
        );

        // Reconnect with since=e1:7; the room is at 10 now.
        let w = b.on_welcome(Some(at("e1", 10)), Some(true), true, true);
        assert!(w.resumed && !w.incomplete);
        assert_eq!(w.recovered_upto, Some(10));
        assert_eq!(
            b.position,
            Some(at("e1", 7)),
            "a drop during the catch-up must resume before the missed messages"
        );
        let recovered = (8..=10)
            .filter(|o| b.on_position(at("e1", *o), w.recovered_upto).recovered)
            .count();
        assert_eq!(recovered, 3);
        assert!(
            !b.on_position(at("e1", 11), w.recovered_upto).recovered,
            "live"
        );
        assert!(b.on_position(at("e1", 9), None).duplicate);
        assert!(!b.on_position(at("e1", 13), None).duplicate);
        assert!(b.on_position(at("e1", 12), None).reordered);
        assert_eq!(b.position, Some(at("e1", 13)));
    }

    #[test]
    fn an_incomplete_recovery_starts_over_at_the_new_epoch() {
        let mut b = Book::default();
        b.on_welcome(Some(at("e1", 5)), None, false, true);
        b.on_position(at("e1", 6), None);
        let w = b.on_welcome(Some(at("e2", 3)), Some(false), true, true);
        assert!(w.resumed && w.incomplete);
        assert_eq!(w.recovered_upto, None);
        assert_eq!(b.position, Some(at("e2", 3)));
        let p = b.on_position(at("e2", 4), None);
        assert_eq!(p, Positioned::default(), "a new epoch is a new numbering");
        // `recovered` is only read after a resume.
        let w = b.on_welcome(Some(at("e2", 9)), Some(false), false, true);
        assert!(!w.resumed);
    }

    #[test]
    fn unavailable_publishes_are_retried_without_waiting_for_a_reconnect() {
        let mut b = numbered();
        b.remember(7, "frame7".into());
        b.remember(8, "frame8".into());
        // The node's publish failed (Redis briefly away) but the node never hands over: no
        // welcome comes, and the publish must still go out again.
        assert_eq!(b.on_refused("unavailable", "run-p-7"), Refusal::Retry);
        assert_eq!(b.next_retry().as_deref(), Some("frame7"));
        assert_eq!(b.next_retry(), None);
        assert!(b.unacked.contains_key(&7), "unacked until its ack");
        // A final refusal forgets it.
        assert_eq!(b.on_refused("forbidden", "run-p-8"), Refusal::Final);
        assert!(!b.unacked.contains_key(&8));
        assert_eq!(b.on_refused("rate_limited", "run-p-7"), Refusal::Retry);
        b.forget("run-p-7"); // acked meanwhile
        assert_eq!(b.next_retry(), None);
    }

    #[test]
    fn rate_limited_publishes_are_retried_while_unacked() {
        let mut b = numbered();
        b.remember(3, "frame3".into());
        b.remember(4, "frame4".into());
        b.retry_later("run-p-3");
        b.retry_later("run-p-4");
        b.retry_later("run-p-9"); // not unacked: nothing to retry
        b.unacked.remove(&3); // acked meanwhile
        assert_eq!(b.next_retry().as_deref(), Some("frame4"));
        assert_eq!(b.next_retry(), None);
    }

    #[test]
    fn unacknowledged_publishes_are_sent_again_in_order() {
        let mut b = numbered();
        for seq in 0..3 {
            assert!(!b.remember(seq, format!("frame{seq}")));
        }
        b.forget("0badf00d-7-1");
        b.forget("garbage");
        let w = b.on_welcome(Some(at("e", 1)), Some(true), true, true);
        assert_eq!(w.resend, ["frame0", "frame2"]);
        let w = b.on_welcome(Some(at("e", 1)), Some(true), true, false);
        assert!(w.resend.is_empty(), "--no-resume sends nothing again");
        let mut full = numbered();
        for seq in 0..MAX_UNACKED as u64 {
            full.remember(seq, String::new());
        }
        assert!(full.remember(MAX_UNACKED as u64, String::new()), "bounded");
        assert_eq!(full.unacked.len(), MAX_UNACKED);
        assert!(!full.unacked.contains_key(&0), "the oldest goes");
    }

    /// A book after a welcome with a position.
    fn numbered() -> Book {
        let mut b = Book::default();
        b.on_welcome(Some(at("e", 0)), None, false, true);
        b
    }

    #[test]
    fn publishes_are_kept_from_the_first_numbered_welcome_on() {
        let mut b = Book::default();
        b.on_welcome(None, None, false, true);
        b.remember(1, "frame1".into());
        assert!(
            b.unacked.is_empty(),
            "a gateway without offsets: nothing is kept"
        );
        // A welcome into a room nobody published in carries (epoch, 0): numbered.
        b.on_welcome(Some(at("e", 0)), None, false, true);
        b.remember(2, "frame2".into());
        // A later welcome without a position (that node's broker was away) keeps it so, and
        // hands back what is unacknowledged.
        let w = b.on_welcome(None, None, true, true);
        assert!(!w.numbered);
        assert_eq!(w.resend, ["frame2"]);
        b.remember(3, "frame3".into());
        assert_eq!(b.unacked.keys().copied().collect::<Vec<_>>(), [2, 3]);
    }
}
