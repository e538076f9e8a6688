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

use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use arrayvec::ArrayVec;
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::wire::close::CloseReason;
use crate::wire::history::Stamp;

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
    /// ([`frame_text`]), or the rest of a frame a direct write sent only part of — and whether it
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

/// Formats the header of an unmasked server frame into `head`; returns its length (2–10 bytes).
pub fn frame_head(head: &mut [u8; 16], opcode: OpCode, payload: &[u8]) -> usize {
    Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(head)
}

/// A whole unmasked text frame, header and payload in one buffer: a room message is framed once
/// per node and the same bytes go to every member, each in one plain `send`.
pub fn frame_text(payload: &[u8]) -> Bytes {
    let mut head = [0u8; 16];
    let n = frame_head(&mut head, OpCode::Text, payload);
    let mut framed = Vec::with_capacity(n + payload.len());
    framed.extend_from_slice(&head[..n]);
    framed.extend_from_slice(payload);
    Bytes::from(framed)
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
}

/// Most frames one direct write carries (two iovecs each, far below the kernel's `IOV_MAX`).
const WRITE_FRAMES: usize = 32;

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
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Outgoing>,
    /// Bytes queued; with `max_bytes` it bounds memory per session whatever the frame sizes.
    bytes: usize,
    /// The writer owns the socket's output: it has taken items it has not finished writing, or has
    /// not started yet (true until its first idle moment). No push writes directly meanwhile.
    writing: bool,
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
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                writing: true,
                held: None,
                cut: None,
            }),
            ready: Notify::new(),
            socket: OnceLock::new(),
            max_frames,
            max_bytes,
            reason: OnceLock::new(),
            last_seen: AtomicU64::new(crate::wire::clock::monotonic_millis()),
        };
        (outbox, OutboxReceiver(()))
    }

    /// Sends a text frame without waiting: written at once when the outbox is idle, else queued.
    /// On [`PushError::Full`] the session has been told to close as a slow consumer.
    pub fn push(&self, frame: Bytes) -> Result<Pushed, PushError> {
        self.push_item(Outgoing::Text(frame))
    }

    /// Sends one text frame made by [`frame_text`] with its stamp (`None`: an event, or a message
    /// without one) without waiting: one message of [`Outbox::push_messages`], as a [`Pushed`].
    pub fn push_message(
        &self,
        frame: Bytes,
        stamp: Option<Stamp>,
        direct: bool,
    ) -> Result<Pushed, PushError> {
        let out = self.push_messages(&[(frame, stamp)], direct);
        match out {
            PushedMany { written: 1, .. } => Ok(Pushed::Written),
            PushedMany { queued: 1, .. } => Ok(Pushed::Queued),
            PushedMany { covered: 1, .. } => Ok(Pushed::Covered),
            PushedMany { dropped: 1, .. } => Err(PushError::Full),
            _ => Err(PushError::Closed),
        }
    }

    /// Sends room messages (each a whole text frame made by [`frame_text`], with its stamp; in
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
    pub fn push_messages(&self, msgs: &[(Bytes, Option<Stamp>)], direct: bool) -> PushedMany {
        let mut out = PushedMany::default();
        if self.is_closing() {
            return out;
        }
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = q.held.as_mut() {
            for (k, (frame, stamp)) in msgs.iter().enumerate() {
                if held.items.len() >= self.max_frames || held.bytes + frame.len() > self.max_bytes
                {
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
                if q.items.len() >= self.max_frames || q.bytes + frame.len() > self.max_bytes {
                    out.dropped = rest.len() - k;
                    q.writing |= out.queued > 0;
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
        if out.queued > 0 {
            q.writing = true;
            drop(q);
            self.ready.notify_one();
        }
        out
    }

    /// Sends any item without waiting (see [`Outbox::push`]).
    pub fn push_item(&self, item: Outgoing) -> Result<Pushed, PushError> {
        self.push_entry(None, item, true)
    }

    fn push_entry(
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
            if held.items.len() >= self.max_frames || held.bytes + len > self.max_bytes {
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
        if q.items.len() >= self.max_frames || q.bytes + len > self.max_bytes {
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

    /// Hands the session's socket to the outbox; pushes may write to it directly from the
    /// writer's first idle moment on.
    pub fn attach(&self, socket: TcpStream) {
        let _ = self.socket.set(socket);
    }

    /// The session's socket, once attached.
    pub fn socket(&self) -> Option<&TcpStream> {
        self.socket.get()
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

    /// Milliseconds since the client last sent anything.
    pub fn silent_for_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_seen.load(Ordering::Relaxed))
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }
}

/// What a direct write did.
enum Direct {
    /// The whole frame was written.
    All,
    /// Only a part: these bytes (framed already) remain.
    Part(Bytes),
    /// Nothing: the socket's send buffer is full.
    None,
    /// The socket failed.
    Failed,
}

/// A non-blocking `sendmsg` through the runtime's readiness tracking (a `WouldBlock` clears it,
/// so the writer's next wait is a real one). `sendmsg` rather than `writev`: a socket call skips
/// the VFS write path, which showed as ~10 % of the gateway's CPU in a broadcast profile.
pub fn send_vectored(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
    socket.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(socket).send_vectored(bufs)
    })
}

/// A non-blocking `sendmsg` that skips the runtime's readiness check: a push writes only to a
/// socket whose writer is idle, which is writable unless the kernel says otherwise, and reading
/// the readiness of thousands of sockets per message cost a cache miss each (~2.4 % of the
/// gateway's CPU in a broadcast profile). A `WouldBlock` here leaves the readiness stale: the
/// writer's wait then returns at once, its own write (through [`send_vectored`]) meets the
/// `WouldBlock` and clears it, and its next wait is a real one.
fn send_now(socket: &TcpStream, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).send_vectored(bufs)
}

/// One vectored non-blocking write of a whole frame: the header from the stack, the payload the
/// shared bytes themselves (no copy).
fn write_now(socket: &TcpStream, item: &Outgoing) -> Direct {
    let Some((opcode, payload)) = item.frame() else {
        return Direct::None;
    };
    let mut head = [0u8; 16];
    let n = frame_head(&mut head, opcode, payload);
    let total = n + payload.len();
    match send_now(socket, &[IoSlice::new(&head[..n]), IoSlice::new(payload)]) {
        Ok(w) if w == total => Direct::All,
        Ok(w) if w >= n => Direct::Part(match item {
            Outgoing::Text(b) | Outgoing::Pong(b) => b.slice(w - n..),
            _ => Bytes::copy_from_slice(&payload[w - n..]),
        }),
        Ok(w) => {
            let mut rest = Vec::with_capacity(total - w);
            rest.extend_from_slice(&head[w..n]);
            rest.extend_from_slice(payload);
            Direct::Part(Bytes::from(rest))
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Direct::None,
        Err(_) => Direct::Failed,
    }
}

/// What a direct write of framed messages did.
enum Written {
    /// This many whole frames went out, and this many bytes of the next one (0: none).
    Frames(usize, usize),
    /// The socket failed.
    Failed,
}

/// One non-blocking write of up to [`WRITE_FRAMES`] framed messages, without the runtime's
/// readiness check (see [`send_now`]): a plain `send` of the shared bytes for one (no message header or iovec array for the kernel to copy in: ~3 % of the
/// gateway's CPU in a broadcast profile went to `sendmsg`'s own handling), one vectored
/// `sendmsg` for several.
fn write_frames(socket: &TcpStream, frames: &[&[u8]]) -> Written {
    let sock = socket2::SockRef::from(socket);
    let sent = if let [one] = frames {
        sock.send(one)
    } else {
        let iov: ArrayVec<IoSlice<'_>, WRITE_FRAMES> =
            frames.iter().map(|f| IoSlice::new(f)).collect();
        sock.send_vectored(&iov)
    };
    match sent {
        Ok(mut w) => {
            for (k, f) in frames.iter().enumerate() {
                if w < f.len() {
                    return Written::Frames(k, w);
                }
                w -= f.len();
            }
            Written::Frames(frames.len(), 0)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Written::Frames(0, 0),
        Err(_) => Written::Failed,
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
