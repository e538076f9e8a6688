//! One client's life on this node, from the finished upgrade to the last byte: join the room,
//! greet, run a reader task and a writer, leave, count why it ended.
//!
//! The socket is split in two: the [`reader`] task is the only caller of `read_frame` (which is
//! not cancel-safe, so it is never raced in a `select!`); the [`writer`] owns the write half and
//! the [`outbox`]. Either side ends the session by closing the outbox with a reason; the writer
//! then sends the Close frame and the reader, if the client does not answer within
//! [`CLOSE_GRACE`], is aborted (the socket is being dropped, so losing its read state is fine).

pub mod outbox;
pub mod reader;
pub mod writer;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::node::{Node, SessionSlot};
use crate::protocol::{self, Role, RoomName};
use outbox::Outbox;

/// How long a closing session waits for the client's side (its Close answer, or the last queued
/// bytes) before dropping the socket.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Frames the writer takes off the outbox per write.
pub const WRITE_BATCH: usize = 256;

/// Who the client is, decided before the upgrade.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The room it joins.
    pub room: RoomName,
    /// Host or viewer.
    pub role: Role,
    /// Display name, if it gave one.
    pub name: Option<Arc<str>>,
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Splits an upgraded connection into owned halves. The common case is our own TCP stream, which
/// splits without a lock; bytes hyper read past the handshake are replayed first.
fn split(upgraded: Upgraded) -> (BoxRead, BoxWrite) {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (r, w) = parts.io.into_inner().into_split();
            let r = std::io::Cursor::new(parts.read_buf).chain(r);
            (Box::new(r), Box::new(w))
        }
        Err(upgraded) => {
            let (r, w) = tokio::io::split(TokioIo::new(upgraded));
            (Box::new(r), Box::new(w))
        }
    }
}

/// Runs one session to its end.
pub async fn run(node: Arc<Node>, slot: SessionSlot, admission: Admission, upgraded: Upgraded) {
    let (read, write) = split(upgraded);
    let cfg = &node.config;
    let (outbox, rx) = Outbox::new(cfg.outbox_frames, cfg.outbox_bytes);
    let outbox = Arc::new(outbox);
    let Admission { room, role, name } = admission;
    let conn_id = format!("{}-{}", cfg.node_id, slot.id);

    node.join(&room, slot.id, role, outbox.clone());
    // Greet only once the room's subscription is confirmed, so that everything published after
    // the welcome reaches this client. During a broker outage, greet anyway after the deadline.
    node.broker.wait_subscribed(&room, cfg.redis_timeout).await;
    let _ = outbox.push(protocol::welcome(
        &cfg.node_id,
        &room,
        role,
        &conn_id,
        name.as_deref(),
    ));
    let counts = node.presence.estimate(&room, node.hub.counts(&room));
    let _ = outbox.push(protocol::presence(&room, counts.hosts, counts.viewers));

    let last_seen = Arc::new(AtomicU64::new(writer::now_millis()));
    let reader = node.tracker.spawn(
        reader::Reader {
            node: node.clone(),
            outbox: outbox.clone(),
            room: room.clone(),
            role,
            name,
            last_seen: last_seen.clone(),
            rate: std::sync::Mutex::new(reader::RateLimitState::new(cfg.max_publish_rate)),
        }
        .run(read),
    );
    let reason = writer::Writer::new(node.clone(), outbox.clone(), rx, write, last_seen)
        .run()
        .await;

    node.leave(&room, slot.id, role);
    node.metrics.closed(reason).increment(1);
    let mut reader = reader;
    if tokio::time::timeout(CLOSE_GRACE, &mut reader)
        .await
        .is_err()
    {
        // The client did not answer our Close: its read half is dropped unread.
        reader.abort();
        debug!(conn = %conn_id, "reader aborted after close grace");
    }
    debug!(conn = %conn_id, room = %room, reason = reason.label(), "session ended");
    drop(slot);
}
