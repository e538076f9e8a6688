//! The outbox's bounded queue: a push writes straight to an idle socket (through [`super::direct`])
//! or queues, in order, within the frame and byte bounds; a push onto a full queue closes the
//! session as a slow consumer. The writer drains it through [`OutboxReceiver`].

use std::collections::VecDeque;

use arrayvec::ArrayVec;
use bytes::Bytes;

use super::direct::{write_frames, write_now, Direct, Written, WRITE_FRAMES};
use super::hold::{covered, Held};
use super::rider;
use super::{Outbox, Outgoing, PushError, Pushed, PushedMany};
use crate::wire::close::CloseReason;
use crate::wire::history::Stamp;

#[derive(Debug)]
pub(super) struct Queue {
    pub(super) items: VecDeque<Outgoing>,
    /// Bytes queued; with `max_bytes` it bounds memory per session whatever the frame sizes.
    pub(super) bytes: usize,
    /// The writer owns the socket's output: it has taken items it has not finished writing, or has
    /// not started yet (true until its first idle moment). No push writes directly meanwhile.
    pub(super) writing: bool,
    /// Items pushed while the session catches up on history, with their message stamps; boxed
    /// so that the common case (not catching up) costs one pointer.
    pub(super) held: Option<Box<Held>>,
    /// What the history covered: live messages at or below it are not queued again.
    pub(super) cut: Option<Stamp>,
    /// Riders due ([`super::rider::Rider`] bits): they go out with the next room message.
    pub(super) due: u8,
}

/// The draining side, owned by the session's writer (kept as a type so that only the writer
/// drains).
#[derive(Debug)]
pub struct OutboxReceiver(pub(super) ());

impl Outbox {
    /// Whether one more item of `len` bytes fits a queue (or the held buffer) of `items` items and
    /// `bytes` bytes: the frame and byte bounds every push checks.
    fn fits(&self, items: usize, bytes: usize, len: usize) -> bool {
        items < self.max_frames && bytes + len <= self.max_bytes
    }

    /// Sends room messages (each a whole text frame made by [`crate::wire::frame::frame_text`], with its stamp; in
    /// order) without waiting: when the outbox is idle, written at once — one `send` for one
    /// message, one vectored `sendmsg` for several, the shared bytes themselves — else queued;
    /// messages the session's history covered are skipped. What the socket does not take at once
    /// is queued for the writer, in order.
    ///
    /// `direct: false` queues even when the outbox is idle, so that the member's writer sends
    /// them (on any worker thread, batched with whatever else queued meanwhile): the fan-out's
    /// choice when the node writes at a rate one thread's direct writes could not keep up with.
    /// A full outbox drops the rest (counted in [`PushedMany::dropped`]) and closes the session
    /// as a slow consumer; a closing session takes nothing (all counts 0).
    ///
    /// Riders due on this outbox ([`Outbox::defer`]) go first, in the same write as the first
    /// message: the Ping, and the presence event when the room has one (`presence`).
    pub fn push_messages(
        &self,
        msgs: &[(Bytes, Option<Stamp>)],
        direct: bool,
        presence: Option<&Bytes>,
    ) -> PushedMany {
        let mut out = PushedMany::default();
        if self.is_closing() {
            return out;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = q.held.as_mut() {
            for (k, (frame, stamp)) in msgs.iter().enumerate() {
                if !self.fits(held.items.len(), held.bytes, frame.len()) {
                    drop(q);
                    self.close(CloseReason::SlowConsumer);
                    out.dropped = msgs.len() - k;
                    return out;
                }
                held.bytes += frame.len();
                held.items
                    .push_back((*stamp, Outgoing::Framed(frame.clone(), true)));
                out.queued += 1;
            }
            return out;
        }
        // The lock is held across the writes so that no other push, and not the writer, can put
        // bytes on the socket in between: non-blocking syscalls, never an await.
        let mut socket = match (q.writing || !direct, self.socket.get()) {
            (false, Some(socket)) => Some(socket),
            _ => None,
        };
        let mut rest = msgs;
        let mut riders_queued = false;
        let riders = rider::take(&mut q.due, presence);
        if !riders.is_empty() {
            // The riders and the first message (unless the history covered it) in one write.
            let mut frames = riders;
            let n_riders = frames.len();
            if let Some(((frame, stamp), after)) = rest.split_first() {
                if covered(&mut q.cut, *stamp) {
                    out.covered += 1;
                } else {
                    frames.push((frame.clone(), true));
                }
                rest = after;
            }
            let mut whole = 0;
            let mut sent = 0;
            if let Some(s) = socket {
                let bufs: ArrayVec<&[u8], 3> = frames.iter().map(|(f, _)| &f[..]).collect();
                match write_frames(s, &bufs) {
                    Written::Frames(w, b) => (whole, sent) = (w, b),
                    Written::Failed => {
                        drop(q);
                        self.close(CloseReason::IoError);
                        return PushedMany::default();
                    }
                }
                if whole < frames.len() {
                    socket = None;
                }
            }
            out.riders = n_riders;
            out.presence_written = frames[..whole.min(n_riders)]
                .iter()
                .filter(|(_, text)| *text)
                .count();
            out.written += whole.saturating_sub(n_riders);
            for (i, (frame, text)) in frames.iter().enumerate().skip(whole) {
                let frame = if i == whole && sent > 0 {
                    frame.slice(sent..)
                } else {
                    frame.clone()
                };
                if !self.fits(q.items.len(), q.bytes, frame.len()) {
                    let lead_left = frames.len() > n_riders && i <= n_riders;
                    out.dropped = rest.len() + usize::from(lead_left);
                    q.writing |= riders_queued || out.queued > 0;
                    drop(q);
                    self.close(CloseReason::SlowConsumer);
                    return out;
                }
                q.bytes += frame.len();
                q.items.push_back(Outgoing::Framed(frame, *text));
                riders_queued = true;
                if i >= n_riders {
                    out.queued += 1;
                }
            }
        }
        while !rest.is_empty() {
            // Up to WRITE_FRAMES frames the history did not cover, for one write (on the stack,
            // uninitialised until used: this runs once per member per message).
            let mut chunk: ArrayVec<&[u8], WRITE_FRAMES> = ArrayVec::new();
            let mut owners: ArrayVec<usize, WRITE_FRAMES> = ArrayVec::new();
            let mut taken = 0;
            for (k, (frame, stamp)) in rest.iter().enumerate() {
                if chunk.is_full() {
                    break;
                }
                taken = k + 1;
                if covered(&mut q.cut, *stamp) {
                    out.covered += 1;
                    continue;
                }
                chunk.push(frame);
                owners.push(k);
            }
            let n = chunk.len();
            let mut first_queued = 0;
            if let Some(s) = socket {
                match write_frames(s, &chunk) {
                    Written::Frames(whole, sent) => {
                        out.written += whole;
                        first_queued = whole;
                        if sent > 0 {
                            let frame = &rest[owners[whole]].0;
                            let item = Outgoing::Framed(frame.slice(sent..), true);
                            q.bytes += item.len();
                            q.items.push_back(item);
                            out.queued += 1;
                            first_queued += 1;
                        }
                        if whole < n {
                            // The socket is full: the rest queues behind what it did not take.
                            socket = None;
                        }
                    }
                    Written::Failed => {
                        drop(q);
                        self.close(CloseReason::IoError);
                        return PushedMany::default();
                    }
                }
            }
            for &k in &owners[first_queued..n] {
                let frame = &rest[k].0;
                if !self.fits(q.items.len(), q.bytes, frame.len()) {
                    out.dropped = rest.len() - k;
                    q.writing |= riders_queued || out.queued > 0;
                    drop(q);
                    self.close(CloseReason::SlowConsumer);
                    return out;
                }
                q.bytes += frame.len();
                q.items.push_back(Outgoing::Framed(frame.clone(), true));
                out.queued += 1;
                socket = None;
            }
            rest = &rest[taken..];
        }
        if out.queued > 0 || riders_queued {
            q.writing = true;
            drop(q);
            self.ready.notify_one();
        }
        out
    }

    pub(super) fn push_entry(
        &self,
        stamp: Option<Stamp>,
        item: Outgoing,
        direct: bool,
    ) -> Result<Pushed, PushError> {
        if self.is_closing() {
            return Err(PushError::Closed);
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = q.held.as_mut() {
            let len = item.len();
            if !self.fits(held.items.len(), held.bytes, len) {
                drop(q);
                self.close(CloseReason::SlowConsumer);
                return Err(PushError::Full);
            }
            held.bytes += len;
            held.items.push_back((stamp, item));
            return Ok(Pushed::Queued);
        }
        if covered(&mut q.cut, stamp) {
            return Ok(Pushed::Covered);
        }
        // The lock is held across the write so that no other push, and not the writer, can put
        // bytes on the socket in between: a non-blocking syscall, never an await.
        let item = match (q.writing || !direct, self.socket.get()) {
            (false, Some(socket)) => match write_now(socket, &item) {
                Direct::All => return Ok(Pushed::Written),
                Direct::Part(rest) => Outgoing::Framed(rest, matches!(item, Outgoing::Text(_))),
                Direct::None => item,
                Direct::Failed => {
                    drop(q);
                    self.close(CloseReason::IoError);
                    return Err(PushError::Closed);
                }
            },
            _ => item,
        };
        let len = item.len();
        if !self.fits(q.items.len(), q.bytes, len) {
            drop(q);
            self.close(CloseReason::SlowConsumer);
            return Err(PushError::Full);
        }
        q.bytes += len;
        q.items.push_back(item);
        q.writing = true;
        drop(q);
        self.ready.notify_one();
        Ok(Pushed::Queued)
    }
}

impl OutboxReceiver {
    /// Waits for at least one item and moves up to `limit` queued items into `batch`; returns how
    /// many, or 0 once the session is closing (whatever is still queued is not sent). The writer
    /// calls it again once it has written the batch; finding nothing queued then is the moment it
    /// goes idle, and pushes write directly until they queue again.
    pub async fn recv_batch(
        &mut self,
        outbox: &Outbox,
        batch: &mut Vec<Outgoing>,
        limit: usize,
    ) -> usize {
        loop {
            let ready = outbox.ready.notified();
            if outbox.is_closing() {
                return 0;
            }
            {
                let mut q = outbox.queue.lock().unwrap_or_else(|e| e.into_inner());
                if !q.items.is_empty() {
                    let n = q.items.len().min(limit);
                    let mut bytes = 0;
                    for item in q.items.drain(..n) {
                        bytes += item.len();
                        batch.push(item);
                    }
                    q.bytes -= bytes;
                    q.writing = true;
                    if q.items.is_empty() && q.items.capacity() > 0 {
                        // Nothing left: an idle session keeps no queue memory.
                        q.items = VecDeque::new();
                    }
                    return n;
                }
                // Idle: pushes may write directly now.
                q.writing = false;
            }
            ready.await;
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self, outbox: &Outbox) -> bool {
        outbox
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .items
            .is_empty()
    }
}
