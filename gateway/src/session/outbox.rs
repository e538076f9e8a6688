//! A session's bounded outbound queue: the only way frames reach a client's writer.
//!
//! The hub pushes the same shared [`Bytes`] of a room message into every member's outbox; the
//! session's writer drains it in batches. The queue is bounded twice, by frames and by bytes, and
//! never blocks the pusher: a push onto a full outbox fails, the frame is dropped (counted by the
//! caller) and the session is told to close as a slow consumer (close code 4000). The outbox also
//! carries the session's close signal, so anything holding it (the hub, the reader, the node) can
//! end the session with a reason; the first reason given wins.
//!
//! While a joining session reads the room's history, its outbox is *held* ([`Outbox::hold`]):
//! everything pushed meanwhile (live messages with their stamps, presence, pings) waits in a
//! side buffer with the same bounds, and [`Outbox::release`] queues the welcome and the history
//! first, then the held items minus the messages the history already covered. Overflowing the
//! side buffer closes the session as a slow consumer (4000): it reconnects and resumes. The side
//! buffer exists only during the catch-up; an idle outbox pays one empty pointer for it.
//!
//! The *cut* (the position the history covered) outlives the release: a message published
//! before the history read may still be on its way through the node's subscription when the
//! read's answer arrives on the other connection. Live messages of the cut's epoch at or below
//! it are dropped until the first one above it (or of another epoch) passes; then the cut is
//! gone. It costs 24 bytes inline, no allocation.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::disconnect::CloseReason;
use crate::history::Stamp;

/// Milliseconds on a process-wide monotonic clock (cheap to store in an atomic).
pub fn now_millis() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// One item of the queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A text frame (JSON event or room message), already encoded.
    Text(Bytes),
    /// A Pong answering the client's Ping, with its payload.
    Pong(Bytes),
    /// A keepalive Ping (from the node's keepalive timer).
    Ping,
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Self::Text(b) | Self::Pong(b) => b.len(),
            Self::Ping => 0,
        }
    }
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue was full: the frame is dropped and the session is closing as a slow consumer.
    Full,
    /// The session is already closing.
    Closed,
}

/// A session's queue, shared (in an `Arc`) by the hub, the reader and the writer.
///
/// A `VecDeque` under a std mutex rather than a channel: an empty deque owns no memory, and an
/// idle connection must cost as little as possible. The lock is held for a push or a drain,
/// never across an await.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the writer after a push (a stored permit covers a push before the writer waits).
    ready: Notify,
    max_frames: usize,
    max_bytes: usize,
    /// Cancelled when the session must end; the writer watches it.
    closing: CancellationToken,
    /// The first reason anyone gave for closing.
    reason: OnceLock<CloseReason>,
    /// When the client last sent anything (ms on [`now_millis`]'s clock); the keepalive timer
    /// closes sessions that stay silent too long.
    last_seen: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// Bytes queued; with `max_bytes` it bounds memory per session whatever the frame sizes.
    bytes: usize,
    /// Items pushed while the session catches up on history, with their message stamps; boxed
    /// so that the common case (not catching up) costs one pointer.
    held: Option<Box<Held>>,
    /// What the history covered: live messages at or below it are not queued again.
    cut: Option<Stamp>,
}

#[derive(Debug, Default)]
struct Held {
    items: VecDeque<(Option<Stamp>, Outgoing)>,
    bytes: usize,
}

/// Whether a message with `stamp` is covered by `cut` (drop it); clears the cut once a message
/// passes it.
fn covered(cut: &mut Option<Stamp>, stamp: Option<Stamp>) -> bool {
    let (Some(c), Some(s)) = (*cut, stamp) else {
        return false;
    };
    if s.epoch == c.epoch && s.offset <= c.offset {
        return true;
    }
    *cut = None;
    false
}

/// The draining side, owned by the session's writer (kept as a type so that only the writer
/// drains).
#[derive(Debug)]
pub struct OutboxReceiver(());

impl Outbox {
    /// A queue of at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let outbox = Outbox {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            max_frames,
            max_bytes,
            closing: CancellationToken::new(),
            reason: OnceLock::new(),
            last_seen: AtomicU64::new(now_millis()),
        };
        (outbox, OutboxReceiver(()))
    }

    /// Queues a text frame without waiting. On [`PushError::Full`] the session has been told to
    /// close as a slow consumer.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.push_item(Outgoing::Text(frame))
    }

    /// Queues a room message with its stamp (`None`: a message without one) without waiting
    /// (see [`Outbox::push`]); a message the session's history covered is dropped (`Ok`).
    pub fn push_message(&self, frame: Bytes, stamp: Option<Stamp>) -> Result<(), PushError> {
        self.push_entry(stamp, Outgoing::Text(frame))
    }

    /// Queues any item without waiting (see [`Outbox::push`]).
    pub fn push_item(&self, item: Outgoing) -> Result<(), PushError> {
        self.push_entry(None, item)
    }

    fn push_entry(&self, stamp: Option<Stamp>, item: Outgoing) -> Result<(), PushError> {
        if self.closing.is_cancelled() {
            return Err(PushError::Closed);
        }
        let len = item.len();
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(held) = q.held.as_mut() {
                if held.items.len() >= self.max_frames || held.bytes + len > self.max_bytes {
                    drop(q);
                    self.close(CloseReason::SlowConsumer);
                    return Err(PushError::Full);
                }
                held.bytes += len;
                held.items.push_back((stamp, item));
                return Ok(());
            }
            if covered(&mut q.cut, stamp) {
                return Ok(());
            }
            if q.items.len() >= self.max_frames || q.bytes + len > self.max_bytes {
                drop(q);
                self.close(CloseReason::SlowConsumer);
                return Err(PushError::Full);
            }
            q.bytes += len;
            q.items.push_back(item);
        }
        self.ready.notify_one();
        Ok(())
    }

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

    /// Asks the session to end for `reason`; the first reason given is the one the client sees.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closing.cancel();
    }

    /// Whether the session has been asked to end.
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Resolves once the session has been asked to end.
    pub async fn closed(&self) {
        self.closing.cancelled().await
    }

    /// The reason given to [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Records that the client just sent something.
    pub fn touch(&self) {
        self.last_seen.store(now_millis(), Ordering::Relaxed);
    }

    /// Milliseconds since the client last sent anything.
    pub fn silent_for_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed))
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

impl OutboxReceiver {
    /// Waits for at least one item and moves up to `limit` queued items into `batch`.
    pub async fn recv_batch(
        &mut self,
        outbox: &Outbox,
        batch: &mut Vec<Outgoing>,
        limit: usize,
    ) -> usize {
        loop {
            let ready = outbox.ready.notified();
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
                    if q.items.is_empty() && q.items.capacity() > 0 {
                        // Nothing left: an idle session keeps no queue memory.
                        q.items = VecDeque::new();
                    }
                    return n;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_by_frames_closes_as_slow_consumer() {
        let (outbox, mut rx) = Outbox::new(2, 1 << 20);
        outbox.push(Bytes::from_static(b"a")).unwrap();
        outbox.push(Bytes::from_static(b"b")).unwrap();
        assert_eq!(outbox.push(Bytes::from_static(b"c")), Err(PushError::Full));
        assert!(outbox.is_closing());
        assert_eq!(outbox.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(
            outbox.push(Bytes::from_static(b"d")),
            Err(PushError::Closed)
        );
        let mut batch = Vec::new();
        assert_eq!(rx.recv_batch(&outbox, &mut batch, 10).await, 2);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn full_by_bytes_closes_as_slow_consumer() {
        let (outbox, mut rx) = Outbox::new(100, 10);
        outbox.push(Bytes::from_static(b"123456")).unwrap();
        assert_eq!(outbox.queued_bytes(), 6);
        assert_eq!(
            outbox.push(Bytes::from_static(b"123456")),
            Err(PushError::Full)
        );
        assert_eq!(outbox.queued_bytes(), 6);
        let mut batch = Vec::new();
        assert_eq!(rx.recv_batch(&outbox, &mut batch, 10).await, 1);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn held_items_follow_history_minus_what_it_covered() {
        let (outbox, mut rx) = Outbox::new(8, 1 << 20);
        outbox.hold();
        for o in [3, 4, 5] {
            outbox
                .push_message(Bytes::from(format!("live{o}")), Some(Stamp::new(o, "E")))
                .unwrap();
        }
        outbox.push(Bytes::from_static(b"presence")).unwrap();
        outbox
            .push_message(Bytes::from_static(b"raw"), None)
            .unwrap();
        let skipped = outbox.release(
            ["welcome", "hist3", "hist4"].map(|s| Bytes::from_static(s.as_bytes())),
            Some(Stamp::new(4, "E")),
        );
        assert_eq!(skipped, 2);
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 100).await;
        let texts: Vec<String> = batch
            .iter()
            .map(|i| match i {
                Outgoing::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            texts,
            ["welcome", "hist3", "hist4", "live5", "presence", "raw"]
        );
        assert_eq!(outbox.queued_bytes(), 0);
        // Released: pushes go straight to the queue again.
        outbox.push(Bytes::from_static(b"x")).unwrap();
        assert_eq!(outbox.queued_bytes(), 1);
    }

    #[tokio::test]
    async fn the_cut_drops_late_covered_messages_until_one_passes_it() {
        let (outbox, mut rx) = Outbox::new(16, 1 << 20);
        outbox.hold();
        outbox.release([Bytes::from_static(b"w")], Some(Stamp::new(10, "E")));
        let push = |o: u64, e: &str| {
            outbox
                .push_message(Bytes::from(format!("{e}{o}")), Some(Stamp::new(o, e)))
                .unwrap()
        };
        push(9, "E"); // published before the read, late through the subscription
        push(10, "E");
        push(11, "E");
        push(10, "E"); // cannot happen in order; once passed, the cut is gone
        let (other, mut rx2) = Outbox::new(16, 1 << 20);
        other.hold();
        other.release([], Some(Stamp::new(10, "E")));
        other
            .push_message(Bytes::from_static(b"F1"), Some(Stamp::new(1, "F")))
            .unwrap();
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 100).await;
        let texts: Vec<Vec<u8>> = batch
            .iter()
            .map(|i| match i {
                Outgoing::Text(b) => b.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, [&b"w"[..], b"E11", b"E10"]);
        batch.clear();
        rx2.recv_batch(&other, &mut batch, 100).await;
        assert_eq!(batch.len(), 1, "a new epoch is not covered by the old one");
    }

    #[test]
    fn overflowing_the_hold_closes_as_slow_consumer() {
        let (outbox, _rx) = Outbox::new(8, 1 << 20);
        outbox.hold();
        for o in 0..8 {
            outbox
                .push_message(Bytes::from_static(b"m"), Some(Stamp::new(o, "E")))
                .unwrap();
        }
        assert_eq!(
            outbox.push_message(Bytes::from_static(b"m"), Some(Stamp::new(9, "E"))),
            Err(PushError::Full)
        );
        assert_eq!(outbox.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn first_close_reason_wins() {
        let (outbox, _rx) = Outbox::new(4, 100);
        outbox.close(CloseReason::Shutdown);
        outbox.close(CloseReason::SlowConsumer);
        assert_eq!(outbox.close_reason(), Some(CloseReason::Shutdown));
    }
}
