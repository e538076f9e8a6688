//! One client's life on this node, from the finished upgrade to the last byte: join the room,
//! greet, run a reader task and a writer, leave, count why it ended.
//!
//! The socket is split in two: the [`reader`] task owns the read half through the [`codec`]'s
//! decoder; the [`writer`] owns the write half and drains the [`outbox`]. Either side ends the
//! session by closing the outbox with a reason; the writer then sends the Close frame, and the
//! reader, if the client does not answer within [`CLOSE_GRACE`], is aborted (the socket is being
//! dropped, so losing its read state is fine).

pub mod codec;
pub mod outbox;
pub mod reader;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::node::{Node, SessionSlot};
use crate::protocol::{self, Role, RoomName};
use codec::Decoder;
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
    /// Display name, if it gave one (the token's `name`, or its `sub`, with `--auth jwt`).
    pub name: Option<Arc<str>>,
    /// The token's `sub`; `None` when anonymous or with `--auth none`.
    pub user: Option<Arc<str>>,
    /// The token's `exp` (seconds), when there is a token.
    pub exp: Option<u64>,
    /// Whether the client's publishes are accepted.
    pub publish: bool,
}

/// Splits an upgraded connection into the frame decoder and the owned write half. Our listener
/// only ever serves `TcpStream`s, so the downcast holds; bytes hyper read past the handshake seed
/// the decoder (copied, so that hyper's 8 KiB read buffer is not kept alive by a slice of it).
fn split(upgraded: Upgraded, max_payload: usize) -> Option<(Decoder, OwnedWriteHalf)> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    let (r, w) = parts.io.into_inner().into_split();
    Some((Decoder::new(r, &parts.read_buf, max_payload), w))
}

/// Runs one session to its end.
pub async fn run(node: Arc<Node>, slot: SessionSlot, admission: Admission, upgraded: Upgraded) {
    let cfg = &node.config;
    let Some((decoder, write)) = split(upgraded, cfg.max_message_size) else {
        warn!("upgraded connection is not a TCP stream; dropped");
        return;
    };
    let (outbox, rx) = Outbox::new(cfg.outbox_frames, cfg.outbox_bytes);
    let outbox = Arc::new(outbox);
    let Admission {
        room,
        role,
        name,
        user,
        exp,
        publish,
    } = admission;
    let conn_id = format!("{}-{}", cfg.node_id, slot.id);

    // The welcome is queued first, so it is the first frame whatever is fanned out meanwhile;
    // the writer starts only once the room's subscription is confirmed, so everything published
    // after the client sees its welcome reaches it. During a broker outage it starts after the
    // deadline anyway (the subscription is made when the broker returns).
    let _ = outbox.push(protocol::welcome(
        &cfg.node_id,
        &room,
        role,
        &conn_id,
        name.as_deref(),
        user.as_deref(),
    ));
    node.join(&room, slot.id, role, outbox.clone());
    node.registry
        .register(slot.id, room.clone(), user.clone(), exp, outbox.clone());
    node.broker.wait_subscribed(&room, cfg.redis_timeout).await;
    let counts = node.presence.estimate(&room, node.hub.counts(&room));
    let _ = outbox.push(protocol::presence(&room, counts.hosts, counts.viewers));

    let reader = reader::Reader::new(node.clone(), outbox.clone(), room.clone(), role, name)
        .with_access(slot.id, user, publish);
    let reader = node.tracker.spawn(reader.run(decoder));
    let reason = writer::Writer::new(node.clone(), outbox.clone(), rx, write)
        .run()
        .await;

    node.registry.unregister(slot.id);
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
