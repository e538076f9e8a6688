//! The writing half of a session: drains the outbox in batches, one socket write per batch, and
//! sends the Close frame when the session ends.
//!
//! Frames are formatted straight into one reusable buffer (server frames are unmasked, so a frame
//! is a 2–10 byte header plus the shared payload) and written with a single `write` loop, so a
//! member that has 50 messages queued costs one syscall, not 50. Writes race the session's close
//! signal: once the session is closing, the last write and the Close frame get [`CLOSE_GRACE`]
//! before the socket is dropped; a write that makes no progress for `--idle-timeout` ends the
//! session as a slow consumer.

use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::outbox::{Outbox, OutboxReceiver, Outgoing};
use super::{CLOSE_GRACE, WRITE_BATCH};
use crate::disconnect::CloseReason;
use crate::node::Node;

/// Keep at most this much buffer capacity between batches while more is queued; an idle session
/// keeps none.
const KEEP_BUFFER: usize = 16 * 1024;

/// The writer's state.
pub struct Writer<W> {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    rx: OutboxReceiver,
    io: W,
    batch: Vec<Outgoing>,
    buf: Vec<u8>,
}

/// Appends one unmasked frame to `buf`.
fn put_frame(buf: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let mut head = [0u8; 16];
    let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
    buf.extend_from_slice(&head[..n]);
    buf.extend_from_slice(payload);
}

/// How a write ended early.
enum WriteEnd {
    /// The socket failed.
    Io,
    /// The session started closing and the grace ran out, or the client read nothing for too long.
    Stalled,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// A writer for one session.
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>, rx: OutboxReceiver, io: W) -> Self {
        Self {
            node,
            outbox,
            rx,
            io,
            batch: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Writes until the session closes; returns why it closed (after sending the Close frame).
    ///
    /// Idle, this future waits on two things only (the outbox and its close signal): pings and
    /// drain closes come from node-wide timers through the outbox, so an idle session owns no
    /// timer.
    pub async fn run(mut self) -> CloseReason {
        let stall_limit = self.node.config.idle_timeout;
        loop {
            tokio::select! {
                biased;
                _ = self.outbox.closed() => break,
                n = self.rx.recv_batch(&self.outbox, &mut self.batch, WRITE_BATCH) => {
                    let mut texts = 0u64;
                    for item in self.batch.drain(..) {
                        match item {
                            Outgoing::Text(b) => {
                                texts += 1;
                                put_frame(&mut self.buf, OpCode::Text, &b);
                            }
                            Outgoing::Pong(b) => put_frame(&mut self.buf, OpCode::Pong, &b),
                            Outgoing::Ping => put_frame(&mut self.buf, OpCode::Ping, b""),
                        }
                    }
                    debug_assert!(n > 0);
                    // Boxed: the write future is only alive while writing.
                    match Box::pin(self.flush(stall_limit)).await {
                        Ok(()) => self.node.metrics.delivered.increment(texts),
                        Err(WriteEnd::Io) => self.outbox.close(CloseReason::IoError),
                        Err(WriteEnd::Stalled) => self.outbox.close(CloseReason::SlowConsumer),
                    }
                }
            }
        }
        let reason = self.outbox.close_reason().unwrap_or(CloseReason::IoError);
        if let Some(code) = reason.code() {
            self.buf.clear();
            let mut payload = Vec::with_capacity(2 + reason.text().len());
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(reason.text().as_bytes());
            put_frame(&mut self.buf, OpCode::Close, &payload);
            if Box::pin(self.flush(CLOSE_GRACE)).await.is_ok() {
                let _ = tokio::time::timeout(CLOSE_GRACE, self.io.shutdown()).await;
            }
        }
        reason
    }

    /// Writes the whole buffer. Gives up after `limit` without progress, or [`CLOSE_GRACE`] after
    /// the session started closing.
    async fn flush(&mut self, limit: Duration) -> Result<(), WriteEnd> {
        let mut off = 0;
        let mut deadline = tokio::time::Instant::now() + limit;
        let mut closing = self.outbox.is_closing();
        if closing {
            deadline = deadline.min(tokio::time::Instant::now() + CLOSE_GRACE);
        }
        let result = loop {
            if off == self.buf.len() {
                break Ok(());
            }
            tokio::select! {
                biased;
                r = self.io.write(&self.buf[off..]) => match r {
                    Ok(0) | Err(_) => break Err(WriteEnd::Io),
                    Ok(n) => {
                        off += n;
                        if !closing {
                            deadline = tokio::time::Instant::now() + limit;
                        }
                    }
                },
                _ = self.outbox.closed(), if !closing => {
                    closing = true;
                    deadline = deadline.min(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                _ = tokio::time::sleep_until(deadline) => break Err(WriteEnd::Stalled),
            }
        };
        self.buf.clear();
        let idle = self.rx.is_empty(&self.outbox);
        if idle || self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        if idle || self.batch.capacity() > WRITE_BATCH {
            self.batch = Vec::new();
        }
        result
    }
}
