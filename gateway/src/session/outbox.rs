//! A session's bounded outbound queue: the only way frames reach a client's writer.
//!
//! The hub pushes the same shared [`Bytes`] of a room message into every member's outbox; the
//! session's writer drains it in batches. The queue is bounded twice, by frames and by bytes, and
//! never blocks the pusher: a push onto a full outbox fails, the frame is dropped (counted by the
//! caller) and the session is told to close as a slow consumer (close code 4000). The outbox also
//! carries the session's close signal, so anything holding it (the hub, the reader, the node) can
//! end the session with a reason; the first reason given wins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::disconnect::CloseReason;

/// One item of the queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A text frame (JSON event or room message), already encoded.
    Text(Bytes),
    /// A Pong answering the client's Ping, with its payload.
    Pong(Bytes),
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Self::Text(b) | Self::Pong(b) => b.len(),
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

/// The pushing side of a session's queue, shared (in an `Arc`) by the hub and the session.
#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    /// Bytes pushed and not yet taken by the writer; with `max_bytes` it bounds memory per session
    /// whatever the frame sizes are.
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Cancelled when the session must end; the writer watches it.
    closing: CancellationToken,
    /// The first reason anyone gave for closing.
    reason: OnceLock<CloseReason>,
}

/// The draining side, owned by the session's writer.
#[derive(Debug)]
pub struct OutboxReceiver {
    rx: mpsc::Receiver<Outgoing>,
}

impl Outbox {
    /// A queue of at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(max_frames);
        let outbox = Outbox {
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            closing: CancellationToken::new(),
            reason: OnceLock::new(),
        };
        (outbox, OutboxReceiver { rx })
    }

    /// Queues a text frame without waiting. On [`PushError::Full`] the session has been told to
    /// close as a slow consumer.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        self.push_item(Outgoing::Text(frame))
    }

    /// Queues any item without waiting (see [`Outbox::push`]).
    pub fn push_item(&self, item: Outgoing) -> Result<(), PushError> {
        if self.closing.is_cancelled() {
            return Err(PushError::Closed);
        }
        let len = item.len();
        let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.max_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseReason::SlowConsumer);
            return Err(PushError::Full);
        }
        match self.tx.try_send(item) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        self.close(CloseReason::SlowConsumer);
                        Err(PushError::Full)
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(PushError::Closed),
                }
            }
        }
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

    /// Marks `n` bytes as taken off the queue by the writer.
    fn taken(&self, n: usize) {
        self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }
}

impl OutboxReceiver {
    /// Waits for at least one item and moves up to `limit` queued items into `batch`. Returns 0
    /// only when every sender is gone.
    pub async fn recv_batch(
        &mut self,
        outbox: &Outbox,
        batch: &mut Vec<Outgoing>,
        limit: usize,
    ) -> usize {
        let n = self.rx.recv_many(batch, limit).await;
        let bytes: usize = batch[batch.len() - n..].iter().map(Outgoing::len).sum();
        outbox.taken(bytes);
        n
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

    #[test]
    fn first_close_reason_wins() {
        let (outbox, _rx) = Outbox::new(4, 100);
        outbox.close(CloseReason::Shutdown);
        outbox.close(CloseReason::SlowConsumer);
        assert_eq!(outbox.close_reason(), Some(CloseReason::Shutdown));
    }
}
