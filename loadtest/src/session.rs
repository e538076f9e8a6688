//! One connection's life, in one task: read every frame (welcome, messages, errors, close), publish
//! on the member's open-loop schedule, and keep the member's sequence ledger. The goose user that
//! owns it (`user.rs`) only starts it, reads its rows, and stops it; goose cannot wait inside a
//! transaction for a socket that lives for the whole run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::plan::{unix_micros, Cadence, Slot, Window};
use crate::stats::Stats;
use crate::ws::{self, Event, Stamp, Ws};
use crate::Shared;

/// How long a close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// A goose user's identity, which outlives its connections.
#[derive(Debug)]
pub struct Member {
    /// Room, role, rate and publisher id.
    pub slot: Slot,
    /// Shard key for the histograms (the goose user index).
    pub key: usize,
    /// The publish schedule; `None` for a member that never publishes.
    pub cadence: Option<Cadence>,
    /// Next sequence number to publish. Kept here, not in the connection, so that numbering
    /// stays contiguous across reconnects and a hole always means a lost message.
    pub next_seq: AtomicU64,
}

impl Member {
    /// A member in `slot` with a random phase in its schedule.
    pub fn new(slot: Slot, key: usize) -> Self {
        let cadence = (slot.rate > 0.0).then(|| Cadence {
            rate: slot.rate,
            phase: Duration::from_secs_f64(fastrand::f64() / slot.rate),
        });
        Self {
            slot,
            key,
            cadence,
            next_seq: AtomicU64::new(0),
        }
    }
}

/// Something for the owning goose user to record as a row in goose's reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A publish was written (or failed to be): how far behind its schedule.
    Publish {
        /// Written − intended.
        lag: Duration,
        /// Why the write failed.
        error: Option<String>,
    },
    /// A sampled delivery: its end-to-end latency.
    Deliver(Duration),
    /// An `error` event from the gateway.
    Error(String),
}

/// Rows waiting for the goose user; a std `Mutex` since it is only pushed to and swapped out.
pub type Rows = Arc<Mutex<Vec<Row>>>;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// The load tester closed it (end of run or welcome timeout).
    pub requested: bool,
    /// Close code from the server; `None` when the socket ended without one (1006).
    pub code: Option<u16>,
    /// Close reason or I/O error.
    pub reason: String,
    /// Whether the welcome had arrived.
    pub welcomed: bool,
    /// How long the connection lived.
    pub lived: Duration,
}

/// The owner's handle on a running connection.
#[derive(Debug)]
pub struct Conn {
    /// Ask the connection to close (1000).
    pub cancel: CancellationToken,
    /// Cancelled by the connection when it ends, whatever the cause.
    pub done: CancellationToken,
    /// The task; yields how it ended.
    pub task: JoinHandle<End>,
    /// Fires with the time from upgrade to welcome; dropped if it ends first.
    pub joined: Option<oneshot::Receiver<Duration>>,
}

/// Starts a connection's task on an upgraded socket.
pub fn spawn(shared: Arc<Shared>, member: Arc<Member>, rows: Rows, ws: Ws) -> Conn {
    let cancel = CancellationToken::new();
    let done = CancellationToken::new();
    let (joined_tx, joined_rx) = oneshot::channel();
    let session = Session {
        window_rx: shared.schedule.subscribe(),
        window: shared.schedule.window(),
        shared,
        member,
        rows,
        started: Instant::now(),
        welcomed_at: None,
        joined: Some(joined_tx),
        measured: None,
        ledger: Ledger::new(false),
        received: 0,
    };
    let task = tokio::spawn(session.run(ws, cancel.clone(), done.clone()));
    Conn {
        cancel,
        done,
        task,
        joined: Some(joined_rx),
    }
}

struct Session {
    shared: Arc<Shared>,
    member: Arc<Member>,
    rows: Rows,
    window_rx: watch::Receiver<Option<Window>>,
    window: Option<Window>,
    started: Instant,
    welcomed_at: Option<Instant>,
    joined: Option<oneshot::Sender<Duration>>,
    /// Decided when the window starts: was this connection in the room then?
    measured: Option<bool>,
    ledger: Ledger,
    /// Window messages received, for sampling rows.
    received: u64,
}

impl Session {
    async fn run(mut self, mut ws: Ws, cancel: CancellationToken, done: CancellationToken) -> End {
        let _done = done.drop_guard();
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut window_gone = false;
        let end = loop {
            let decide_at = match (self.measured, self.window) {
                (None, Some(w)) => Some(w.start),
                _ => None,
            };
            let publish_at = self.next_publish_at();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break self.close(&mut ws).await,
                r = self.window_rx.changed(), if self.window.is_none() && !window_gone => {
                    match r {
                        Ok(()) => self.window = *self.window_rx.borrow_and_update(),
                        Err(_) => window_gone = true,
                    }
                }
                _ = sleep_until(decide_at.unwrap_or(far).into()), if decide_at.is_some() => {
                    self.decide();
                }
                _ = sleep_until(publish_at.map(|(at, _)| at).unwrap_or(far).into()), if publish_at.is_some() => {
                    let (at, k) = publish_at.expect("guarded");
                    if let Err(end) = self.publish(&mut ws, at, k).await {
                        break end;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_text(text.as_str()),
                    Some(Ok(Message::Close(frame))) => {
                        // tungstenite has queued the reply; let it go out and see the end.
                        let _ = tokio::time::timeout(CLOSE_GRACE, async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        break self.end(
                            false,
                            frame.as_ref().map(|f| u16::from(f.code)),
                            frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        );
                    }
                    Some(Ok(_)) => {} // pings are answered by tungstenite; pongs, binary: ignored
                    Some(Err(e)) => break self.end(false, None, e.to_string()),
                    None => break self.end(false, None, "connection ended".into()),
                },
            }
        };
        self.finish();
        end
    }

    fn end(&self, requested: bool, code: Option<u16>, reason: String) -> End {
        End {
            requested,
            code,
            reason,
            welcomed: self.welcomed_at.is_some(),
            lived: self.started.elapsed(),
        }
    }

    async fn close(&mut self, ws: &mut Ws) -> End {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = ws.next().await {}
            }
        })
        .await;
        self.end(true, Some(1000), String::new())
    }

    /// The next schedule entry (time, sequence number) once the window is known and the member
    /// has joined; `None` when done or never publishing.
    fn next_publish_at(&self) -> Option<(Instant, u64)> {
        let cadence = self.member.cadence?;
        let w = self.window?;
        self.welcomed_at?;
        let k = self.member.next_seq.load(Ordering::Relaxed);
        let offset = cadence.offset(k);
        if offset >= w.measure() || Instant::now() > w.publish_until {
            return None;
        }
        Some((w.start + offset, k))
    }

    async fn publish(&mut self, ws: &mut Ws, at: Instant, k: u64) -> Result<(), End> {
        let w = self.window.expect("publishing needs the window");
        let cadence = self.member.cadence.expect("publishing needs a cadence");
        let stamp = Stamp {
            lt: self.shared.run_id,
            p: self.member.slot.publisher,
            s: k,
            t: w.start_unix_us + cadence.offset(k).as_micros() as u64,
        };
        let frame = ws::publish_frame(stamp, &self.shared.filler);
        let result = ws.send(Message::text(frame)).await;
        let lag = Instant::now().saturating_duration_since(at);
        let stats = &self.shared.stats;
        match result {
            Ok(()) => {
                self.member.next_seq.store(k + 1, Ordering::Relaxed);
                self.shared.plan.rooms[self.member.slot.room]
                    .published
                    .fetch_add(1, Ordering::Relaxed);
                Stats::add(&stats.published, 1);
                stats
                    .publish_lag
                    .record(self.member.key, lag.as_micros() as u64);
                self.push(Row::Publish { lag, error: None });
                Ok(())
            }
            Err(e) => {
                Stats::add(&stats.publish_write_errors, 1);
                self.push(Row::Publish {
                    lag,
                    error: Some(format!("write failed: {e}")),
                });
                Err(self.end(false, None, e.to_string()))
            }
        }
    }

    fn push(&self, row: Row) {
        self.rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(row);
    }

    fn on_text(&mut self, text: &str) {
        match ws::parse_event(text) {
            Some(Event::Welcome) if self.welcomed_at.is_none() => {
                self.welcomed_at = Some(Instant::now());
                if let Some(tx) = self.joined.take() {
                    let _ = tx.send(self.started.elapsed());
                }
            }
            Some(Event::Message {
                ts,
                stamp: Some(stamp),
            }) if stamp.lt == self.shared.run_id => self.on_message(ts, stamp),
            Some(Event::Message { .. }) => Stats::add(&self.shared.stats.foreign, 1),
            Some(Event::Error(code)) => {
                self.shared.stats.error_events.add(&code);
                self.push(Row::Error(code));
            }
            _ => {}
        }
    }

    fn on_message(&mut self, ts: u64, stamp: Stamp) {
        let now_unix = unix_micros();
        let now = Instant::now();
        let shared = self.shared.clone();
        let stats = &shared.stats;
        let Some(w) = self.window else {
            // Our run id but no window yet: cannot happen, publishers wait for it.
            Stats::add(&stats.foreign, 1);
            return;
        };
        if self.measured.is_none() {
            self.decide();
        }
        if now > w.drain_end {
            Stats::add(&stats.after_drain, 1);
            return;
        }
        if self.welcomed_at.is_none() {
            Stats::add(&stats.before_welcome, 1);
        }
        let e2e = now_unix.saturating_sub(stamp.t);
        stats.e2e.record(self.member.key, e2e);
        if ts > 0 {
            stats
                .fanout
                .record(self.member.key, now_unix.saturating_sub(ts));
        }
        self.received += 1;
        if self
            .received
            .is_multiple_of(u64::from(self.shared.opts.deliver_sample))
        {
            self.push(Row::Deliver(Duration::from_micros(e2e)));
        }
        self.ledger.record(stamp.p, stamp.s);
    }

    /// Decides, at the window start, whether this connection is a member from the start.
    fn decide(&mut self) {
        let Some(w) = self.window else { return };
        let measured = self.welcomed_at.is_some_and(|at| at < w.start);
        self.measured = Some(measured);
        self.ledger = Ledger::new(measured);
        if measured {
            self.shared.plan.rooms[self.member.slot.room]
                .members_from_start
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds this connection's ledger to the totals.
    fn finish(&mut self) {
        if self.measured.is_none() && self.window.is_some_and(|w| Instant::now() >= w.start) {
            self.decide();
        }
        let stats = &self.shared.stats;
        let c = self.ledger.counts();
        match self.measured {
            Some(true) => {
                Stats::add(&stats.delivered, c.unique);
                self.shared.plan.rooms[self.member.slot.room]
                    .delivered
                    .fetch_add(c.unique, Ordering::Relaxed);
                Stats::add(&stats.duplicates, c.duplicates);
                Stats::add(&stats.reordered, c.reordered);
                Stats::add(&stats.gaps, c.gaps);
                Stats::add(&stats.open_holes, self.ledger.open_holes());
            }
            Some(false) => Stats::add(&stats.delivered_late_members, c.unique),
            None => {}
        }
    }
}
