//! The writing half of a session: writes what the outbox had to queue (the socket did not take it
//! at once, see [`crate::fanout::outbox`]), in batches, one socket write per batch, and sends the Close
//! frame when the session ends. In the common case pushes write directly and this task sleeps.
//!
//! Frames are formatted straight into one reusable buffer (server frames are unmasked, so a frame
//! is a 2–10 byte header plus the shared payload) and written with a single `write` loop, so a
//! member that has 50 messages queued costs one syscall, not 50. (Copying the payloads is cheaper
//! here than a vectored write of many small slices whose partial writes must be tracked: this is
//! the backlog path, not the common one.) Writes race the session's close
//! signal: once the session is closing, the last write and the Close frame get [`CLOSE_GRACE`]
//! before the socket is dropped; a write that makes no progress for `--idle-timeout` ends the
//! session as a slow consumer.

use std::io::{ErrorKind, IoSlice};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use fastwebsockets::OpCode;
use tokio::net::TcpStream;

use super::{CLOSE_GRACE, WRITE_BATCH};
use crate::fanout::outbox::{send_vectored, Outbox, OutboxReceiver, Outgoing};
use crate::node::Node;
use crate::wire::close::CloseReason;
use crate::wire::frame::append_frame;

/// Keep at most this much buffer capacity between batches while more is queued; an idle session
/// keeps none.
const KEEP_BUFFER: usize = 16 * 1024;

/// The writer's state.
pub struct Writer {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    rx: OutboxReceiver,
    batch: Vec<Outgoing>,
    buf: Vec<u8>,
}

/// Writes some of `buf` once the socket is writable (what `AsyncWrite::write` does, on a shared
/// reference: the outbox holds the socket so that pushes can write to it directly too).
async fn write_some(socket: &TcpStream, buf: &[u8]) -> std::io::Result<usize> {
    loop {
        socket.writable().await?;
        match send_vectored(socket, &[IoSlice::new(buf)]) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// How a write ended early.
enum WriteEnd {
    /// The socket failed.
    Io,
    /// The session started closing and the grace ran out, or the client read nothing for too long.
    Stalled,
}

impl Writer {
    /// A writer for one session, which writes to the socket attached to `outbox`.
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>, rx: OutboxReceiver) -> Self {
        Self {
            node,
            outbox,
            rx,
            batch: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Writes until the session closes; returns why it closed (after sending the Close frame).
    ///
    /// Idle, this future waits on one thing only (the outbox's wake-up, for a push that queued or
    /// a close): pings and drain closes come from node-wide timers through the outbox, so an idle
    /// session owns no timer.
    pub async fn run(mut self) -> CloseReason {
        let stall_limit = self.node.config.idle_timeout;
        loop {
            let n = self
                .rx
                .recv_batch(&self.outbox, &mut self.batch, WRITE_BATCH)
                .await;
            if n == 0 {
                break;
            }
            let mut texts = 0u64;
            for item in self.batch.drain(..) {
                match item {
                    Outgoing::Text(b) => {
                        texts += 1;
                        append_frame(&mut self.buf, OpCode::Text, &b);
                    }
                    Outgoing::Framed(b, text) => {
                        texts += u64::from(text);
                        self.buf.extend_from_slice(&b);
                    }
                    other => {
                        if let Some((op, payload)) = other.frame() {
                            append_frame(&mut self.buf, op, payload);
                        }
                    }
                }
            }
            // Boxed: the write future is only alive while writing.
            match Box::pin(self.flush(stall_limit)).await {
                Ok(()) => self.node.metrics.delivered.increment(texts),
                Err(WriteEnd::Io) => self.outbox.close(CloseReason::IoError),
                Err(WriteEnd::Stalled) => self.outbox.close(CloseReason::SlowConsumer),
            }
        }
        let reason = self.outbox.close_reason().unwrap_or(CloseReason::IoError);
        if let Some(code) = reason.code() {
            self.buf.clear();
            let mut payload = Vec::with_capacity(2 + reason.text().len());
            payload.extend_from_slice(&code.to_be_bytes());
            payload.extend_from_slice(reason.text().as_bytes());
            append_frame(&mut self.buf, OpCode::Close, &payload);
            if Box::pin(self.flush(CLOSE_GRACE)).await.is_ok() {
                if let Some(socket) = self.outbox.socket() {
                    let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Write);
                }
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
        let Some(socket) = self.outbox.socket() else {
            return Err(WriteEnd::Io);
        };
        let result = loop {
            if off == self.buf.len() {
                break Ok(());
            }
            tokio::select! {
                biased;
                r = write_some(socket, &self.buf[off..]) => match r {
                    Ok(0) | Err(_) => break Err(WriteEnd::Io),
                    Ok(n) => {
                        off += n;
                        if !closing {
                            deadline = tokio::time::Instant::now() + limit;
                        }
                    }
                },
                // Woken by pushes too (one `Notify` for both); only a close changes anything.
                () = self.outbox.woken(), if !closing => {
                    if self.outbox.is_closing() {
                        closing = true;
                        deadline = deadline.min(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::fanout::outbox::Pushed;
    use crate::metrics::Metrics;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// A connected pair: (our side, the client's stream).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (server, client)
    }

    /// Reads unmasked server frames until `n` text payloads arrived.
    async fn read_texts(client: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        while out.len() < n {
            let got = client.read(&mut chunk).await.unwrap();
            assert!(got > 0, "socket closed after {} frames", out.len());
            buf.extend_from_slice(&chunk[..got]);
            loop {
                if buf.len() < 2 {
                    break;
                }
                let (len, off) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                    127 if buf.len() >= 10 => (
                        u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => break,
                    l => (l as usize, 2),
                };
                if buf.len() < off + len {
                    break;
                }
                assert_eq!(buf[0], 0x81, "a whole text frame, FIN set");
                out.push(buf[off..off + len].to_vec());
                buf.drain(..off + len);
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_outbox_writes_at_once_then_queues_in_order_when_the_socket_is_full() {
        whole_and_in_order_under_pressure(1).await;
    }

    /// The same with the write window's batches: several frames per direct write, more than one
    /// write's worth (`WRITE_FRAMES`) in some, partial writes in the middle of a batch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batched_pushes_write_together_and_queue_the_rest_in_order() {
        whole_and_in_order_under_pressure(7).await;
        whole_and_in_order_under_pressure(45).await;
    }

    /// Pushes `batch` messages at a time (one by one when 1) to an outbox whose client reads late
    /// and slowly; every frame must arrive whole and in order.
    async fn whole_and_in_order_under_pressure(batch: usize) {
        let mut config = Config::defaults();
        config.outbox_frames = 1 << 20;
        config.outbox_bytes = 1 << 30;
        let node = crate::node::Node::start(
            config,
            Metrics::new("n1"),
            TaskTracker::new(),
            CancellationToken::new(),
            None,
        )
        .unwrap();
        let (outbox, rx) = Outbox::new(1 << 20, 1 << 30);
        let outbox = Arc::new(outbox);
        let (socket, mut client) = pair().await;
        // Before the writer's first idle moment everything is queued (the welcome goes first).
        assert_eq!(
            outbox.push(Bytes::from_static(b"first")),
            Ok(Pushed::Queued)
        );
        outbox.attach(socket);
        let writer = tokio::spawn(Writer::new(node, outbox.clone(), rx).run());
        assert_eq!(read_texts(&mut client, 1).await, vec![b"first".to_vec()]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            outbox.push(Bytes::from_static(b"second")),
            Ok(Pushed::Written),
            "an idle outbox writes directly"
        );
        assert_eq!(read_texts(&mut client, 1).await, vec![b"second".to_vec()]);

        // The client reads late and slowly: the kernel's buffers fill, pushes start to queue
        // (after partial writes) while the writer drains on another thread and the client reads,
        // and the frames still arrive whole and in order.
        let payload = |i: usize| format!("{i:08}{}", "x".repeat(1000 + i % 7)).into_bytes();
        let total = 20_000;
        let (start_reading, go) = tokio::sync::oneshot::channel::<()>();
        let reading = tokio::spawn(async move {
            let _ = go.await;
            read_texts(&mut client, total).await
        });
        let mut start_reading = Some(start_reading);
        let (mut written, mut queued) = (0, 0);
        let mut i = 0;
        while i < total {
            let n = batch.min(total - i);
            if n == 1 {
                match outbox.push(Bytes::from(payload(i))).unwrap() {
                    Pushed::Written => written += 1,
                    Pushed::Queued => queued += 1,
                    Pushed::Covered => unreachable!("no history cut here"),
                }
            } else {
                let msgs: Vec<_> = (i..i + n)
                    .map(|k| (crate::wire::frame::frame_text(&payload(k)), None))
                    .collect();
                let p = outbox.push_messages(&msgs, true, None);
                assert_eq!((p.covered, p.dropped), (0, 0));
                assert_eq!(p.written + p.queued, n);
                written += p.written;
                queued += p.queued;
            }
            let before = i;
            i += n;
            if before <= total / 4 && i > total / 4 {
                let _ = start_reading.take().map(|s| s.send(()));
            }
            if i > total / 4 && (before / 50 != i / 50) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        assert!(
            written > 0 && queued > 0,
            "{written} written, {queued} queued"
        );
        let got = reading.await.unwrap();
        for (i, p) in got.iter().enumerate() {
            assert_eq!(p, &payload(i), "frame {i} whole and in order");
        }
        // Drained: direct writes resume.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            outbox.push(Bytes::from_static(b"again")),
            Ok(Pushed::Written)
        );
        outbox.close(CloseReason::Shutdown);
        assert_eq!(writer.await.unwrap(), CloseReason::Shutdown);
    }
}
