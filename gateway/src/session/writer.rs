//! The writing half of a session: drains the outbox in batches, one socket write per batch,
//! pings the client, closes idle clients, and spreads drain closes over the drain window.
//!
//! Frames are formatted straight into one reusable buffer (server frames are unmasked, so a frame
//! is a 2–10 byte header plus the shared payload) and written with a single `write` loop, so a
//! member that has 50 messages queued costs one syscall, not 50. Writes race the session's close
//! signal: once the session is closing, the last write and the Close frame get [`CLOSE_GRACE`]
//! before the socket is dropped; a write that makes no progress for `--idle-timeout` ends the
//! session as a slow consumer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::outbox::{Outbox, OutboxReceiver, Outgoing};
use super::{CLOSE_GRACE, WRITE_BATCH};
use crate::disconnect::CloseReason;
use crate::node::Node;

/// Keep at most this much buffer capacity between batches; a burst of large frames does not pin
/// its buffer to an idle connection.
const KEEP_BUFFER: usize = 16 * 1024;

/// Milliseconds on a monotonic clock shared by the reader and the writer.
pub fn now_millis() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The writer's state.
pub struct Writer<W> {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    rx: OutboxReceiver,
    io: W,
    last_seen: Arc<AtomicU64>,
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
    pub fn new(
        node: Arc<Node>,
        outbox: Arc<Outbox>,
        rx: OutboxReceiver,
        io: W,
        last_seen: Arc<AtomicU64>,
    ) -> Self {
        Self {
            node,
            outbox,
            rx,
            io,
            last_seen,
            batch: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Writes until the session closes; returns why it closed (after sending the Close frame).
    pub async fn run(mut self) -> CloseReason {
        let cfg = self.node.config.clone();
        let ping_every = cfg.ping_interval;
        let idle_ms = cfg.idle_timeout.as_millis() as u64;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let draining = self.node.draining().clone();
        let drain_window = cfg.drain_window();
        let mut drain_at: Option<tokio::time::Instant> = None;
        loop {
            let drain_sleep = async {
                match drain_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.outbox.closed() => break,
                n = self.rx.recv_batch(&self.outbox, &mut self.batch, WRITE_BATCH) => {
                    if n == 0 {
                        self.outbox.close(CloseReason::IoError);
                        break;
                    }
                    for item in self.batch.drain(..) {
                        match item {
                            Outgoing::Text(b) => put_frame(&mut self.buf, OpCode::Text, &b),
                            Outgoing::Pong(b) => put_frame(&mut self.buf, OpCode::Pong, &b),
                        }
                    }
                    let frames = n as u64;
                    match self.flush(cfg.idle_timeout).await {
                        Ok(()) => self.node.metrics.delivered.increment(frames),
                        Err(WriteEnd::Io) => self.outbox.close(CloseReason::IoError),
                        Err(WriteEnd::Stalled) => self.outbox.close(CloseReason::SlowConsumer),
                    }
                }
                _ = ping.tick() => {
                    let silent = now_millis().saturating_sub(self.last_seen.load(Ordering::Relaxed));
                    if silent >= idle_ms {
                        self.outbox.close(CloseReason::IdleTimeout);
                        break;
                    }
                    put_frame(&mut self.buf, OpCode::Ping, b"");
                    match self.flush(cfg.idle_timeout).await {
                        Ok(()) => {}
                        Err(WriteEnd::Io) => self.outbox.close(CloseReason::IoError),
                        Err(WriteEnd::Stalled) => self.outbox.close(CloseReason::SlowConsumer),
                    }
                }
                _ = draining.cancelled(), if drain_at.is_none() => {
                    let spread = drain_window.mul_f64(fastrand::f64());
                    drain_at = Some(tokio::time::Instant::now() + spread);
                }
                _ = drain_sleep => {
                    self.outbox.close(CloseReason::Shutdown);
                    break;
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
            if self.flush(CLOSE_GRACE).await.is_ok() {
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
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::new();
        }
        if self.batch.capacity() > WRITE_BATCH {
            self.batch = Vec::new();
        }
        result
    }
}
