//! Holding a joining session's pushes while it reads history, and the cut: live messages the
//! history already covered are not sent again (see the outbox's module docs).

use std::collections::VecDeque;

use bytes::Bytes;

use super::{Outbox, Outgoing};
use crate::wire::history::Stamp;

#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) items: VecDeque<(Option<Stamp>, Outgoing)>,
    pub(super) bytes: usize,
}

/// Whether a message with `stamp` is covered by `cut` (drop it); clears the cut once a message
/// passes it.
pub(super) fn covered(cut: &mut Option<Stamp>, stamp: Option<Stamp>) -> bool {
    let (Some(c), Some(s)) = (*cut, stamp) else {
        return false;
    };
    if s.epoch == c.epoch && s.offset <= c.offset {
        return true;
    }
    *cut = None;
    false
}

impl Outbox {
    /// Holds everything pushed from now on until [`Outbox::release`] (a joining session reading
    /// history).
    pub fn hold(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.held.get_or_insert_with(Default::default);
    }

    /// Ends the hold: queues `first` (the welcome and the history, in order), then the held items
    /// except messages at or below `cut` in its epoch (the history or the welcome's position
    /// already accounts for them); the cut stays for messages still on their way. `first` is not
    /// checked against the bounds: the session keeps it within `--outbox-bytes`.
    /// Returns how many held messages were skipped as covered.
    pub fn release(&self, first: impl IntoIterator<Item = Bytes>, cut: Option<Stamp>) -> usize {
        let mut skipped = 0;
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            let held = q.held.take();
            q.cut = cut.filter(|c| c.offset > 0);
            q.writing = true;
            for frame in first {
                q.bytes += frame.len();
                q.items.push_back(Outgoing::Text(frame));
            }
            for (stamp, item) in held.map(|h| h.items).unwrap_or_default() {
                if covered(&mut q.cut, stamp) {
                    skipped += 1;
                    continue;
                }
                q.bytes += item.len();
                q.items.push_back(item);
            }
        }
        self.ready.notify_one();
        skipped
    }
}
