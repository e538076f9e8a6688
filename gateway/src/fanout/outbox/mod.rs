//! A session's way out: the only way frames reach a client. A frame pushed onto an idle outbox is
//! written to the socket at once by the pusher; anything the socket does not take at once is
//! queued for the session's writer.
//!
//! The hub pushes the same shared [`Bytes`] of a room message into every member's outbox. In the
//! common case — nothing queued, the writer idle, room in the kernel's send buffer — the push
//! writes the frame (header and shared payload, one vectored non-blocking write) and is done: no
//! queue entry, no task wake-up, which at a few thousand members per message is most of the
//! user-space cost of a fan-out. Otherwise the frame (or what is left of it after a partial write)
//! is queued and the writer is woken; while the writer has bytes in flight no push writes
//! directly, so frames never overtake each other.
//!
//! The queue is bounded twice, by frames and by bytes, and never blocks the pusher: a push onto a
//! full outbox fails, the frame is dropped (counted by the caller) and the session is told to
//! close as a slow consumer (close code 4000). The outbox also carries the session's close
//! signal, so anything holding it (the hub, the reader, the node) can end the session with a
//! reason; the first reason given wins.
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
//!
//! Split by concern: `queue` (the bounded queue: pushes, direct or queued, and the writer's
//! draining side), `hold` (holding pushes while a joining session catches up, and the cut),
//! `direct` (the non-blocking writes a push makes to an idle socket), `rider` (presence events
//! and pings that wait for the next room message to go out in its write). The frames themselves are
//! built by [`crate::wire::frame`].

mod direct;
mod hold;
mod queue;
mod rider;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::Bytes;
use fastwebsockets::OpCode;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::wire::close::CloseReason;
use crate::wire::history::Stamp;
pub use direct::send_vectored;
pub use queue::OutboxReceiver;
use queue::Queue;
pub use rider::Rider;

/// One item of the queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A text frame (JSON event or room message), already encoded.
    Text(Bytes),
    /// A Pong answering the client's Ping, with its payload.
    Pong(Bytes),
    /// A keepalive Ping (from the node's keepalive timer).
    Ping,
    /// Bytes framed already — a whole room message framed once for every member
    /// ([`crate::wire::frame::frame_text`]), or the rest of a frame a direct write sent only part of — and whether it
    /// is (the end of) a text frame, for the delivered count.
    Framed(Bytes, bool),
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Self::Text(b) | Self::Pong(b) | Self::Framed(b, _) => b.len(),
            Self::Ping => 0,
        }
    }

    /// The frame's opcode and payload (`None` for [`Outgoing::Framed`], which is framed already).
    pub fn frame(&self) -> Option<(OpCode, &[u8])> {
        match self {
            Self::Text(b) => Some((OpCode::Text, b)),
            Self::Pong(b) => Some((OpCode::Pong, b)),
            Self::Ping => Some((OpCode::Ping, b"")),
            Self::Framed(..) => None,
        }
    }
}

/// What became of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The whole frame went to the socket at once.
    Written,
    /// It waits in the queue for the writer (or, while the session catches up on history, in the
    /// held buffer).
    Queued,
    /// Not sent: the session's history already covered this message.
    Covered,
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue was full: the frame is dropped and the session is closing as a slow consumer.
    Full,
    /// The session is already closing.
    Closed,
}

/// What a push of several messages did, message by message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PushedMany {
    /// Written to the socket at once.
    pub written: usize,
    /// Queued for the writer (or held while the session catches up on history).
    pub queued: usize,
    /// Skipped: the session's history covered them.
    pub covered: usize,
    /// Dropped: the outbox was full, and the session is closing as a slow consumer.
    pub dropped: usize,
    /// Riders (see [`Outbox::defer`]) that went out, or were queued, with these messages.
    pub riders: usize,
    /// Of those, presence events the socket took at once (delivered text frames).
    pub presence_written: usize,
}

/// A session's queue, shared (in an `Arc`) by the hub, the reader and the writer.
///
/// A `VecDeque` under a std mutex rather than a channel: an empty deque owns no memory, and an
/// idle connection must cost as little as possible. The lock is held for a push or a drain,
/// never across an await.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    /// Wakes the writer after a push that queued, and when the session must end (a stored permit
    /// covers a wake-up before the writer waits). One `Notify` for both: the writer is its only
    /// waiter, and each one costs an idle connection its waiter's room in the writer's future.
    ready: Notify,
    /// The session's socket, held here rather than split into two `Arc`-shared halves: a push
    /// reads its descriptor from the outbox's own memory (one cache miss less per delivery) and a
    /// connection has one allocation less. Pushes write to it directly (non-blocking) while
    /// nothing is queued and the writer is idle; the writer waits for it to become writable
    /// otherwise; the reader reads it through [`Outbox::socket`].
    socket: OnceLock<TcpStream>,
    max_frames: usize,
    max_bytes: usize,
    /// The first reason anyone gave for closing; set means closing (the writer is woken through
    /// `ready`). Not a `CancellationToken`, whose tree node is one more allocation per connection.
    reason: OnceLock<CloseReason>,
    /// When the client last sent anything (ms on [`crate::wire::clock::monotonic_millis`]'s clock); the keepalive timer
    /// closes sessions that stay silent too long.
    last_seen: AtomicU64,
    /// The presence counts the presence timer last queued for this member
    /// ([`crate::wire::protocol::RoomCounts::packed`], or `RoomCounts::NONE`): the timer sends a
    /// room's counts only to members whose last ones differ. Written by that timer alone.
    presence: AtomicU64,
}

impl Outbox {
    /// A queue of at most `max_frames` frames and `max_bytes` bytes.
    pub fn new(max_frames: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let outbox = Outbox {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                writing: true,
                held: None,
                cut: None,
                due: 0,
            }),
            ready: Notify::new(),
            socket: OnceLock::new(),
            max_frames,
            max_bytes,
            reason: OnceLock::new(),
            last_seen: AtomicU64::new(crate::wire::clock::monotonic_millis()),
            presence: AtomicU64::new(crate::wire::protocol::RoomCounts::NONE),
        };
        (outbox, OutboxReceiver(()))
    }

    /// Sends a text frame without waiting: written at once when the outbox is idle, else queued.
    /// On [`PushError::Full`] the session has been told to close as a slow consumer.
    pub fn push(&self, frame: Bytes) -> Result<Pushed, PushError> {
        self.push_item(Outgoing::Text(frame))
    }

    /// Sends one text frame made by [`crate::wire::frame::frame_text`] with its stamp (`None`: an event, or a message
    /// without one) without waiting: one message of [`Outbox::push_messages`], as a [`Pushed`].
    pub fn push_message(
        &self,
        frame: Bytes,
        stamp: Option<Stamp>,
        direct: bool,
    ) -> Result<Pushed, PushError> {
        let out = self.push_messages(&[(frame, stamp)], direct, None);
        match out {
            PushedMany { written: 1, .. } => Ok(Pushed::Written),
            PushedMany { queued: 1, .. } => Ok(Pushed::Queued),
            PushedMany { covered: 1, .. } => Ok(Pushed::Covered),
            PushedMany { dropped: 1, .. } => Err(PushError::Full),
            _ => Err(PushError::Closed),
        }
    }

    /// Sends any item without waiting (see [`Outbox::push`]).
    pub fn push_item(&self, item: Outgoing) -> Result<Pushed, PushError> {
        self.push_entry(None, item, true)
    }

    /// Hands the session's socket to the outbox; pushes may write to it directly from the
    /// writer's first idle moment on.
    pub fn attach(&self, socket: TcpStream) {
        let _ = self.socket.set(socket);
    }

    /// The session's socket, once attached.
    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
    }

    /// Asks the session to end for `reason`; the first reason given is the one the client sees.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.ready.notify_one();
    }

    /// Whether the session has been asked to end.
    pub fn is_closing(&self) -> bool {
        self.reason.get().is_some()
    }

    /// Resolves at the writer's next wake-up: a push that queued, or a close.
    pub async fn woken(&self) {
        self.ready.notified().await
    }

    /// The reason given to [`Outbox::close`], if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Records that the client just sent something.
    pub fn touch(&self) {
        self.last_seen
            .store(crate::wire::clock::monotonic_millis(), Ordering::Relaxed);
    }

    /// The packed counts the presence timer last queued here.
    pub fn presence_sent(&self) -> u64 {
        self.presence.load(Ordering::Relaxed)
    }

    /// Records the packed counts the presence timer just queued here.
    pub fn set_presence_sent(&self, packed: u64) {
        self.presence.store(packed, Ordering::Relaxed);
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
        assert_eq!(
            rx.recv_batch(&outbox, &mut batch, 10).await,
            0,
            "a closing session's queue is not sent"
        );
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
        assert_eq!(rx.recv_batch(&outbox, &mut batch, 10).await, 0);
    }

    #[tokio::test]
    async fn held_items_follow_history_minus_what_it_covered() {
        let (outbox, mut rx) = Outbox::new(8, 1 << 20);
        outbox.hold();
        for o in [3, 4, 5] {
            outbox
                .push_message(
                    Bytes::from(format!("live{o}")),
                    Some(Stamp::new(o, "E")),
                    true,
                )
                .unwrap();
        }
        outbox.push(Bytes::from_static(b"presence")).unwrap();
        outbox
            .push_message(Bytes::from_static(b"raw"), None, true)
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
                // Events are framed by the writer, messages were framed once by the fan-out.
                Outgoing::Text(b) => format!("T:{}", String::from_utf8(b.to_vec()).unwrap()),
                Outgoing::Framed(b, true) => {
                    format!("F:{}", String::from_utf8(b.to_vec()).unwrap())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            texts,
            [
                "T:welcome",
                "T:hist3",
                "T:hist4",
                "F:live5",
                "T:presence",
                "F:raw"
            ]
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
                .push_message(Bytes::from(format!("{e}{o}")), Some(Stamp::new(o, e)), true)
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
            .push_message(Bytes::from_static(b"F1"), Some(Stamp::new(1, "F")), true)
            .unwrap();
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 100).await;
        let texts: Vec<Vec<u8>> = batch
            .iter()
            .map(|i| match i {
                Outgoing::Text(b) | Outgoing::Framed(b, true) => b.to_vec(),
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
                .push_message(Bytes::from_static(b"m"), Some(Stamp::new(o, "E")), true)
                .unwrap();
        }
        assert_eq!(
            outbox.push_message(Bytes::from_static(b"m"), Some(Stamp::new(9, "E")), true),
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

    #[tokio::test]
    async fn direct_writes_only_while_idle_and_never_overtake_queued_frames() {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (outbox, mut rx) = Outbox::new(1 << 20, 1 << 30);
        outbox.attach(server);
        let frame = Bytes::from(vec![b'x'; 4096]);
        assert_eq!(
            outbox.push(frame.clone()),
            Ok(Pushed::Queued),
            "the writer has not gone idle yet"
        );
        let mut batch = Vec::new();
        rx.recv_batch(&outbox, &mut batch, 8).await;
        // The writer finds nothing more: idle (its wait is cut short here).
        let idle = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            rx.recv_batch(&outbox, &mut batch, 8),
        );
        assert!(idle.await.is_err());
        assert_eq!(outbox.push(frame.clone()), Ok(Pushed::Written));
        // Nobody reads: the kernel's buffers fill and pushes start to queue.
        let mut pushes = 0;
        while outbox.push(frame.clone()) == Ok(Pushed::Written) {
            pushes += 1;
            assert!(pushes < 100_000, "the socket never filled");
        }
        // The client reads: the socket has room again, but frames are queued, so a push must
        // queue behind them rather than write.
        let mut sink = vec![0u8; 1 << 20];
        let _ = client.read(&mut sink).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(outbox.push(frame.clone()), Ok(Pushed::Queued));
        assert!(!rx.is_empty(&outbox));
    }
}
