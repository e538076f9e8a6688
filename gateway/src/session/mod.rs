//! One client's life on this node, from the finished upgrade to the last byte: join the room,
//! catch up on history, greet, run the reader and the writer, leave, count why it ended.
//!
//! Joining is gapless (docs/protocol.md, "Continuity"): the outbox is held and the member joins
//! the hub, so live messages from then on wait with their offsets; the room's subscription is
//! confirmed; only then is history read (the room's position, the missed messages after `since`,
//! or the backlog). The welcome and the history are queued first, then the held live messages
//! with an offset above the position read; then the session is live. A message published before
//! the read is in the history (or below the welcome's offset), one published after it arrives
//! live, and none twice.
//!
//! The [`outbox`] owns the socket; two halves of work are driven by the session's one task: the
//! [`reader`] reads it through the [`codec`]'s decoder, pushes write to it directly, and the
//! [`writer`] drains what the socket did not take at once.
//! Either side ends the session by closing the outbox with a reason; the writer then sends the
//! Close frame, and the reader, if the client does not answer within [`CLOSE_GRACE`], is dropped
//! (the socket is being dropped, so losing its read state is fine).

pub mod reader;
pub mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::broker::roster::Member;
use crate::fanout::outbox::Outbox;
use crate::metrics::RecoveryResult;
use crate::node::{Node, SessionSlot};
use crate::wire::close::CloseReason;
use crate::wire::frame::Decoder;
use crate::wire::history::{HistoryQuery, HistoryRead, Recovery, Since, Stamp};
use crate::wire::protocol::{self, Role, RoomName, WelcomePosition};

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
    /// Whether its grant for the room says `"list": true` (see [`Node::lists`]).
    pub list: bool,
    /// What it asks of the room's history.
    pub resume: Resume,
}

/// What a joining client asks of the room's history (`since=E:N`, `backlog=N` in the query).
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Resume after this position.
    pub since: Option<Since>,
    /// The last N messages on join (clamped to `--max-backlog`).
    pub backlog: usize,
}

/// The reading side of a session: its outbox, which owns the socket (see [`Outbox::attach`]).
struct ReadSide(Arc<Outbox>);

impl AsRef<TcpStream> for ReadSide {
    fn as_ref(&self) -> &TcpStream {
        self.0
            .socket()
            .expect("a session's socket is attached before its reader starts")
    }
}

/// Hands an upgraded connection's socket to the session's outbox and returns the frame decoder
/// reading it. Our listener only ever serves `TcpStream`s, so the downcast holds; bytes hyper
/// read past the handshake seed the decoder (copied, so that hyper's 8 KiB read buffer is not
/// kept alive by a slice of it).
fn attach(
    upgraded: Upgraded,
    outbox: &Arc<Outbox>,
    max_payload: usize,
) -> Option<Decoder<ReadSide>> {
    let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
    outbox.attach(parts.io.into_inner());
    Some(Decoder::new(
        ReadSide(outbox.clone()),
        &parts.read_buf,
        max_payload,
    ))
}

/// Starts one session: joins the room, greets the client, and spawns the session's one live
/// task on the node's tracker. The caller's task (the upgrade) ends here, so nothing of the
/// handshake and the join stays alive with the connection.
pub async fn run(node: Arc<Node>, slot: SessionSlot, admission: Admission, upgraded: Upgraded) {
    if let Some(live) = join(node, slot, admission, upgraded).await {
        let tracker = live.node.tracker.clone();
        tracker.spawn(live.run());
    }
}

/// The reading half's future (see [`reader::Reader::run`]).
type Reading = Pin<Box<dyn Future<Output = ()> + Send>>;
/// The writing half's future (see [`writer::Writer::run`]).
type Writing = Pin<Box<dyn Future<Output = CloseReason> + Send>>;

/// A session that has joined its room: all that stays alive while it is connected. The two
/// halves are boxed futures of exactly their own size: held inline, the compiler's layout of
/// the enclosing future kept copies of their state (moved-from arguments still take room in an
/// async fn), which cost more idle memory per connection than the boxes.
struct Live {
    node: Arc<Node>,
    slot: SessionSlot,
    room: RoomName,
    role: Role,
    reading: Reading,
    writing: Writing,
}

/// Joins the room and greets the client; `None` when the connection is not usable.
async fn join(
    node: Arc<Node>,
    slot: SessionSlot,
    admission: Admission,
    upgraded: Upgraded,
) -> Option<Live> {
    let cfg = &node.config;
    let (outbox, rx) = Outbox::new(cfg.outbox_frames, cfg.outbox_bytes);
    let outbox = Arc::new(outbox);
    let Some(decoder) = attach(upgraded, &outbox, cfg.max_message_size) else {
        warn!("upgraded connection is not a TCP stream; dropped");
        return None;
    };
    let Admission {
        room,
        role,
        name,
        user,
        exp,
        publish,
        list,
        resume,
    } = admission;
    let conn_id = format!("{}-{}", cfg.node_id, slot.id);
    // Listed before the catch-up, so that the member is in the next tick's write.
    let listed = node.lists(&room, list) && {
        let listed = node.roster.join(
            &room,
            slot.id,
            Member {
                sub: user
                    .as_deref()
                    .map_or_else(|| format!("conn:{conn_id}"), str::to_string),
                name: name.as_deref().map(str::to_string),
                role: role.as_str().to_string(),
            },
            outbox.clone(),
        );
        if !listed {
            node.metrics.list_overflow.increment(1);
        }
        listed
    };

    node.registry
        .register(slot.id, room.clone(), user.clone(), exp, outbox.clone());
    catch_up(
        &node,
        &outbox,
        &room,
        role,
        name.as_deref(),
        user.as_deref(),
        slot.id,
        &conn_id,
        resume,
    )
    .await;

    let reader = reader::Reader::new(node.clone(), outbox.clone(), room.clone(), role, name)
        .with_access(slot.id, user, publish)
        .with_list(listed);
    let writer = writer::Writer::new(node.clone(), outbox, rx);
    Some(Live {
        node,
        slot,
        room,
        role,
        reading: Box::pin(reader.run(decoder)),
        writing: Box::pin(writer.run()),
    })
}

impl Live {
    /// Reads and writes in this one task until the session closes. One task rather than a reader
    /// task and a writer task: pushes write to the socket directly (see [`outbox`]), so the
    /// writing half rarely wakes, and a second task per connection cost more idle memory than
    /// anything else the connection owns.
    async fn run(mut self) {
        let (reason, read_done) = tokio::select! {
            reason = &mut self.writing => (reason, false),
            () = &mut self.reading => ((&mut self.writing).await, true),
        };
        let node = &self.node;
        node.registry.unregister(self.slot.id);
        node.roster
            .leave(&self.room, self.slot.id, reason.left_reason());
        node.leave(&self.room, self.slot.id, self.role);
        node.metrics.closed(reason).increment(1);
        // Boxed: the timer is only alive while closing, not in every idle session's task.
        if !read_done
            && Box::pin(tokio::time::timeout(CLOSE_GRACE, &mut self.reading))
                .await
                .is_err()
        {
            // The client did not answer our Close: its reading is dropped unread.
            debug!(session = self.slot.id, "reader dropped after close grace");
        }
        debug!(session = self.slot.id, room = %self.room, reason = reason.label(), "session ended");
    }
}

/// Joins `room` and catches up: see the module docs for the order that makes it gapless.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    node: &Arc<Node>,
    outbox: &Arc<Outbox>,
    room: &RoomName,
    role: Role,
    name: Option<&str>,
    user: Option<&str>,
    session: u64,
    conn_id: &str,
    resume: Resume,
) {
    let cfg = &node.config;
    // Held first, then in the hub: every live message from now on waits with its offset. The
    // history is read only once the subscription is confirmed, so that anything published after
    // the read arrives live. During a broker outage the welcome goes out without a position after
    // the subscription deadline (the subscription is made when the broker returns).
    outbox.hold();
    node.join(room, session, role, outbox.clone());
    let subscribed = node.broker.wait_subscribed(room, cfg.redis_timeout).await;
    let query = HistoryQuery {
        since: resume.since.clone(),
        max_recovery: cfg.max_recovery,
        backlog: resume.backlog.min(cfg.max_backlog),
        partial: false,
    };
    let read = if subscribed && node.broker.is_connected() {
        match node.history(room, &query).await {
            Ok(mut read) => {
                fit_outbox(&mut read, cfg.outbox_bytes);
                Some(read)
            }
            Err(e) => {
                debug!(room = %room, cause = %e, "history read failed; welcome without a position");
                None
            }
        }
    } else {
        None
    };
    let asked = query.since.is_some();
    let (position, history, covered) = match &read {
        Some(r) => (
            WelcomePosition {
                epoch: (!r.epoch.is_empty()).then_some(r.epoch.as_str()),
                offset: r.offset,
                recovered: r.recovered(),
            },
            r.frames.as_slice(),
            Some(Stamp::new(r.offset, &r.epoch)),
        ),
        None => (
            WelcomePosition {
                epoch: None,
                offset: 0,
                recovered: asked.then_some(false),
            },
            &[][..],
            None,
        ),
    };
    if asked {
        let result = if outbox.is_closing() {
            RecoveryResult::Overflow
        } else {
            match read.as_ref().and_then(|r| r.recovery) {
                Some(r) => r.into(),
                None => RecoveryResult::Unavailable,
            }
        };
        node.metrics.recovery(result).increment(1);
    }
    node.metrics
        .history_replayed
        .increment(history.len() as u64);
    let welcome = protocol::welcome(&cfg.node_id, room, role, conn_id, name, user, position);
    outbox.release(
        std::iter::once(welcome).chain(history.iter().map(|(_, f)| f.clone())),
        covered,
    );
    drop(read);
    let counts = node.presence.estimate(room, node.hub.counts(room));
    let _ = outbox.push(protocol::presence(room, counts.hosts, counts.viewers));
}

/// Keeps what a joining client is sent from history within `--outbox-bytes`: a resume that does
/// not fit is not recovered (the client reloads instead), a backlog that does not fit loses its
/// oldest messages.
fn fit_outbox(read: &mut HistoryRead, max_bytes: usize) {
    let total: usize = read.frames.iter().map(|(_, f)| f.len()).sum();
    if total <= max_bytes {
        return;
    }
    if read.recovery == Some(Recovery::Complete) {
        read.recovery = Some(Recovery::TooMany);
        read.frames.clear();
        return;
    }
    let mut kept = 0;
    let keep = read
        .frames
        .iter()
        .rev()
        .take_while(|(_, f)| {
            kept += f.len();
            kept <= max_bytes
        })
        .count();
    read.frames.drain(..read.frames.len() - keep);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn history_is_kept_within_the_outbox_bytes() {
        let frames = |n: u64| (1..=n).map(|o| (o, Bytes::from(vec![b'x'; 10]))).collect();
        let mut resume = HistoryRead {
            epoch: "E".into(),
            offset: 5,
            recovery: Some(Recovery::Complete),
            frames: frames(5),
            truncated: false,
        };
        fit_outbox(&mut resume, 50);
        assert_eq!(resume.frames.len(), 5, "fits exactly");
        fit_outbox(&mut resume, 49);
        assert_eq!(resume.recovery, Some(Recovery::TooMany));
        assert!(resume.frames.is_empty());
        let mut backlog = HistoryRead {
            epoch: "E".into(),
            offset: 5,
            recovery: None,
            frames: frames(5),
            truncated: false,
        };
        fit_outbox(&mut backlog, 35);
        assert_eq!(
            backlog.frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [3, 4, 5]
        );
    }
}

#[cfg(test)]
mod idle_size {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    /// What an idle session keeps: its task (the `Live` future), the two boxed halves and the
    /// outbox. Budgets with a little room; the idle-memory benchmark (docs/benchmarks.md) has
    /// the resident figure. An await added inline to a half, or a field, shows up here first.
    #[tokio::test]
    async fn an_idle_sessions_state_stays_within_its_budget() {
        let node = Node::start(
            Config::defaults(),
            Metrics::new("n1"),
            TaskTracker::new(),
            CancellationToken::new(),
            None,
        )
        .unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let (outbox, rx) = Outbox::new(8, 1024);
        let outbox = Arc::new(outbox);
        outbox.attach(server);
        let room = RoomName::parse("r").unwrap();
        let reader = reader::Reader::new(
            node.clone(),
            outbox.clone(),
            room.clone(),
            Role::Viewer,
            None,
        )
        .run(Decoder::new(ReadSide(outbox.clone()), b"", 1024));
        let writer = writer::Writer::new(node.clone(), outbox.clone(), rx).run();
        let (reader_size, writer_size) = (
            std::mem::size_of_val(&reader),
            std::mem::size_of_val(&writer),
        );
        let live = Live {
            node: node.clone(),
            slot: node.reserve_session().unwrap(),
            room,
            role: Role::Viewer,
            reading: Box::pin(reader),
            writing: Box::pin(writer),
        }
        .run();
        let sizes = [
            ("reader", reader_size, 448),
            ("writer", writer_size, 320),
            // The socket itself included (no separate `Arc<TcpStream>` allocation).
            ("outbox", std::mem::size_of::<Outbox>(), 208),
            ("live task's future", std::mem::size_of_val(&live), 256),
        ];
        for (what, size, budget) in sizes {
            assert!(size <= budget, "{what}: {size} bytes, budget {budget}");
        }
    }
}
