//! One connection's life, in one task: read every frame (welcome, messages, acks, errors, close),
//! publish on the member's open-loop schedule, and feed the member's books
//! ([`Book`](crate::book::Book)). The goose user that owns it (`user.rs`) only starts it, reads
//! its rows, and stops it; goose cannot wait inside a transaction for a socket that lives for
//! the whole run.
//!
//! The books belong to the [`Member`], not the connection: this task only reads and updates
//! them, so deliveries count across reconnects and a reconnect can resume where the last
//! connection left off.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::book::Refusal;
use crate::ledger::{Arrival, Ledger};
use crate::lists::{key_hash, Read, Verdict, View};
use crate::member::Member;
use crate::plan::{unix_micros, Window};
use crate::row::{Row, Rows};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::ws::{self, Event, Frame, Position, Stamp, Ws};

/// How long a close handshake may take before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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
    /// Send (or drop) to ask the connection to close (1000). A oneshot, not a cancellation
    /// token: the connection's task looks at it on every wake-up, and a token's look takes a
    /// lock.
    pub cancel: oneshot::Sender<()>,
    /// Cancelled by the connection when it ends, whatever the cause.
    pub done: CancellationToken,
    /// The task; yields how it ended.
    pub task: JoinHandle<End>,
    /// Fires with the time from upgrade to welcome; dropped if it ends first.
    pub joined: Option<oneshot::Receiver<Duration>>,
}

/// Starts a connection's task on an upgraded socket; `resuming` when it asked for `since=`.
/// `wake` is notified when it ends (the owning goose user waits on one for all its members).
pub fn spawn(
    shared: Arc<Shared>,
    member: Arc<Member>,
    rows: Rows,
    ws: Ws,
    resuming: bool,
    wake: Arc<Notify>,
) -> Conn {
    let (cancel, cancelled) = oneshot::channel();
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
        resuming,
        retry_at: None,
        presence: None,
        presence_checked: false,
        recovered_upto: None,
        lists: None,
        member_decided: false,
    };
    let ended = Ended {
        done: done.clone(),
        wake,
    };
    let task = tokio::spawn(session.run(ws, cancelled, ended));
    Conn {
        cancel,
        done,
        task,
        joined: Some(joined_rx),
    }
}

/// Marks a connection's end, however its task ends (a panic included): cancels its `done` and
/// wakes its owner.
struct Ended {
    done: CancellationToken,
    wake: Arc<Notify>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        self.done.cancel();
        self.wake.notify_one();
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
    /// This connection asked to resume (`since=`).
    resuming: bool,
    /// After a resume: messages up to this offset are recovered ones.
    recovered_upto: Option<u64>,
    /// When to send the next publish the gateway refused as `rate_limited` (see [`RETRY_PACE`]).
    retry_at: Option<Instant>,
    /// The room's counts in the last `presence` this connection received by the end of the
    /// drain.
    presence: Option<(u64, u64)>,
    /// Whether this connection's presence was judged (once, at the end of the drain).
    presence_checked: bool,
    /// Its view of the room's list, with `--lists` (boxed: off by default, and inline it would
    /// enlarge every connection's task).
    lists: Option<Box<Listing>>,
    /// The member's books say whether it is measured (decided once per member, never undone):
    /// the message path need not lock them to look.
    member_decided: bool,
}

/// A connection's member-list check: its view, and its list key's hash in the truth.
struct Listing {
    view: View,
    key: u64,
}

/// What a frame calls for: publishes to send again (after a resume's welcome), a `members`
/// command.
#[derive(Default)]
struct Out {
    resend: Vec<String>,
    command: Option<String>,
}

/// Publishes refused as `rate_limited` or `unavailable` go out again one per this interval (10 per second, half
/// the gateway's default limit), after the burst that a reconnect's catch-up made.
const RETRY_PACE: Duration = Duration::from_millis(100);

impl Session {
    async fn run(mut self, mut ws: Ws, mut cancelled: oneshot::Receiver<()>, ended: Ended) -> End {
        let _ended = ended;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut window_gone = false;
        let mut decided = false;
        // One timer for every deadline of the connection (the end of the drain, the window
        // start, the next retry, the next publish), kept across frames: made afresh in every
        // round of the loop, each received message registered and removed several timer
        // entries (a lock each).
        let timer = sleep_until(far.into());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        let end = loop {
            let next = self.next_deadline(decided);
            if next != armed {
                timer.as_mut().reset(next.unwrap_or(far).into());
                armed = next;
            }
            tokio::select! {
                biased;
                // Boxed: the close handshake runs once, and inline its future would enlarge every
                // connection's task for the whole run.
                // Sent or dropped: the owner wants the connection closed.
                _ = &mut cancelled => {
                    self.check_presence();
                    break Box::pin(self.close(&mut ws)).await
                }
                r = self.window_rx.changed(), if self.window.is_none() && !window_gone => {
                    match r {
                        Ok(()) => self.window = *self.window_rx.borrow_and_update(),
                        Err(_) => window_gone = true,
                    }
                }
                _ = &mut timer, if armed.is_some() => {
                    // A fired timer stays fired until it is set again.
                    armed = None;
                    if let Err(end) = self.on_deadlines(&mut ws, &mut decided).await {
                        break end;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Frame::Text)) => {
                        if let Some(out) = self.on_text(ws.text()) {
                            if let Err(end) = Box::pin(self.send_out(&mut ws, out)).await {
                                break end;
                            }
                        }
                    }
                    Some(Ok(Frame::Close(frame))) => {
                        // The reply is on its way; let it go out and see the end.
                        // Boxed, as every future that runs rarely: inline, each would enlarge
                        // every connection's task for the whole run.
                        let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, async {
                            while let Some(Ok(_)) = ws.next().await {}
                        }))
                        .await;
                        let (code, reason) = frame.unzip();
                        break self.end(false, code, reason.unwrap_or_default());
                    }
                    Some(Ok(Frame::Other)) => {} // pings are answered by the socket; pongs, binary: ignored
                    Some(Err(e)) => break self.end(false, None, e.to_string()),
                    None => break self.end(false, None, "connection ended".into()),
                },
            }
        };
        self.finish();
        end
    }

    /// The earliest of the connection's deadlines: the end of the drain (to judge presence,
    /// once welcomed: before, there is nothing to judge, and a passed deadline would fire in
    /// every round), the window start (to decide whether the member is measured), the next
    /// retry and the next publish.
    fn next_deadline(&self, decided: bool) -> Option<Instant> {
        let w = self.window;
        let judge = !self.presence_checked && self.welcomed_at.is_some();
        [
            w.filter(|_| judge).map(|w| w.drain_end),
            w.filter(|_| !decided).map(|w| w.start),
            self.retry_at,
            self.next_publish_at().map(|(at, _)| at),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Does what is due, in this order: judge presence at the end of the drain, decide at the
    /// window start, send the next retry, publish.
    async fn on_deadlines(&mut self, ws: &mut Ws, decided: &mut bool) -> Result<(), End> {
        let now = Instant::now();
        let Some(w) = self.window else { return Ok(()) };
        if !self.presence_checked && now >= w.drain_end {
            self.check_presence();
        }
        if !*decided && now >= w.start {
            self.decide();
            *decided = true;
        }
        if self.retry_at.is_some_and(|at| now >= at) {
            let retry = self.member.book().next_retry();
            self.retry_at = retry.as_ref().map(|_| Instant::now() + RETRY_PACE);
            if let Some(frame) = retry {
                Box::pin(self.resend(ws, vec![frame])).await?;
            }
        }
        // Boxed: most members never publish, and inline the publish would enlarge every
        // connection's task.
        if let Some((at, k)) = self.next_publish_at().filter(|(at, _)| now >= *at) {
            Box::pin(self.publish(ws, at, k)).await?;
        }
        Ok(())
    }

    /// Sends again the publishes that had no ack when the previous connection ended.
    async fn resend(&mut self, ws: &mut Ws, frames: Vec<String>) -> Result<(), End> {
        let n = frames.len() as u64;
        for f in frames {
            ws.feed(&f);
        }
        if let Err(e) = ws.flush().await {
            return Err(self.end(false, None, e.to_string()));
        }
        Stats::add(&self.shared.stats.resent, n);
        Ok(())
    }

    /// Sends what a frame called for.
    async fn send_out(&mut self, ws: &mut Ws, out: Out) -> Result<(), End> {
        if !out.resend.is_empty() {
            self.resend(ws, out.resend).await?;
        }
        if let Some(frame) = out.command {
            if let Err(e) = ws.send(&frame).await {
                return Err(self.end(false, None, e.to_string()));
            }
        }
        Ok(())
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
        let _ = tokio::time::timeout(CLOSE_GRACE, ws.close(1000)).await;
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
        let frame = ws::publish_frame(stamp, &self.shared.filler, true);
        if !self.shared.opts.no_resume && self.member.book().remember(k, frame.clone()) {
            Stats::add(&self.shared.stats.unacked_dropped, 1);
        }
        let result = ws.send(&frame).await;
        let lag = Instant::now().saturating_duration_since(at);
        let stats = &self.shared.stats;
        match result {
            Ok(()) => {
                self.member.next_seq.store(k + 1, Ordering::Relaxed);
                self.shared
                    .plan
                    .count_published(self.member.slot.room, stamp.t / 1_000_000);
                Stats::add(&stats.published, 1);
                Stats::add(&stats.sent_total, 1);
                stats
                    .timeline
                    .with(self.member.key, unix_micros() / 1_000_000, |s| s.sent += 1);
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

    /// Handles one server frame; returns what it calls for (publishes to send again after a
    /// resume's welcome, a `members` command).
    fn on_text(&mut self, text: &str) -> Option<Out> {
        match ws::parse_event(text) {
            Some(Event::Welcome {
                position,
                recovered,
                list_key,
            }) if self.welcomed_at.is_none() => {
                self.welcomed_at = Some(Instant::now());
                self.shared.stats.connected.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = self.joined.take() {
                    let _ = tx.send(self.started.elapsed());
                }
                let command = self.on_list_key(list_key.as_deref());
                let resend = self.on_welcome(position, recovered).unwrap_or_default();
                return (command.is_some() || !resend.is_empty())
                    .then_some(Out { resend, command });
            }
            Some(Event::Members(page)) => {
                return self.on_list(|view, rereads| view.on_page(*page, rereads));
            }
            Some(Event::MembersDiff(diff)) => {
                return self.on_list(|view, rereads| view.on_diff(*diff, rereads));
            }
            Some(Event::Message {
                ts,
                stamp,
                position,
            }) => {
                if let Some(p) = position {
                    self.on_position(p);
                }
                match stamp {
                    Some(stamp) if stamp.lt == self.shared.run_id => self.on_message(ts, stamp),
                    _ => Stats::add(&self.shared.stats.foreign, 1),
                }
            }
            Some(Event::Ack { key, duplicate }) => {
                let stats = &self.shared.stats;
                Stats::add(&stats.acks, 1);
                if duplicate {
                    Stats::add(&stats.ack_duplicates, 1);
                }
                self.forget(&key);
            }
            // Up to the end of the drain: the run's members start leaving after it, and a round
            // during that teardown counts fewer than the run put in the room.
            Some(Event::Presence { hosts, viewers })
                if self.window.is_none_or(|w| Instant::now() <= w.drain_end) =>
            {
                self.presence = Some((hosts, viewers));
            }
            Some(Event::Error { code, key }) => {
                self.shared.stats.error_events.add(&code);
                if code == "not_listed" {
                    if let Some(l) = self.lists.as_mut() {
                        l.view.not_listed();
                    }
                }
                // `rate_limited` and `unavailable` go out again at the retry pace (and at once
                // after a reconnect's welcome); any other refusal is final (Book::on_refused).
                if let Some(k) = key {
                    if self.member.book().on_refused(&code, &k) == Refusal::Retry {
                        self.retry_at.get_or_insert(Instant::now() + RETRY_PACE);
                    }
                }
                self.push(Row::Error(code));
            }
            _ => {}
        }
        None
    }

    fn on_welcome(
        &mut self,
        position: Option<Position>,
        recovered: Option<bool>,
    ) -> Option<Vec<String>> {
        let resend = !self.shared.opts.no_resume;
        let w = self
            .member
            .book()
            .on_welcome(position, recovered, self.resuming, resend);
        let stats = &self.shared.stats;
        self.recovered_upto = w.recovered_upto;
        if w.numbered {
            Stats::add(&stats.numbered_welcomes, 1);
        }
        if w.resumed {
            Stats::add(&stats.resumes, 1);
        }
        if w.incomplete {
            Stats::add(&stats.resumes_incomplete, 1);
        }
        (!w.resend.is_empty()).then_some(w.resend)
    }

    /// Feeds the list view (with `--lists`) a page or a diff; the `members` command it calls for.
    fn on_list(&mut self, feed: impl FnOnce(&mut View, &mut u64) -> Option<Read>) -> Option<Out> {
        let l = self.lists.as_mut()?;
        let mut rereads = 0;
        let read = feed(&mut l.view, &mut rereads);
        Stats::add(&self.shared.stats.lists_rereads, rereads);
        read.map(|r| Out {
            command: Some(View::command(&r)),
            ..Out::default()
        })
    }

    /// After the welcome: tells the webhook receiver the member's list key, and with `--lists`
    /// enters it in the truth and starts reading the list (the `members` command to send).
    fn on_list_key(&mut self, key: Option<&str>) -> Option<String> {
        let room = &self.shared.plan.rooms[self.member.slot.room];
        if let Some(hooks) = &self.shared.hooks {
            hooks.expect(&room.name, key);
        }
        if !self.shared.opts.lists || !self.before_drain_end() {
            return None;
        }
        let h = key_hash(key?);
        self.shared.truth.join(self.member.slot.room, h);
        self.lists = Some(Box::new(Listing {
            view: View::start(),
            key: h,
        }));
        Some(View::command(&None))
    }

    /// Whether the drain has not ended (the truth is the rooms' members at its end).
    fn before_drain_end(&self) -> bool {
        self.window.is_none_or(|w| Instant::now() < w.drain_end)
    }

    /// Follows the room's numbering: where to resume, and duplicates or reorders by offset.
    fn on_position(&mut self, p: Position) {
        let out = self.member.book().on_position(p, self.recovered_upto);
        let stats = &self.shared.stats;
        if out.recovered {
            Stats::add(&stats.recovered, 1);
        }
        if out.duplicate {
            Stats::add(&stats.offset_duplicates, 1);
        }
        if out.reordered {
            Stats::add(&stats.offset_reorders, 1);
        }
    }

    /// An ack or keyed error came: the publish need not be sent again.
    fn forget(&mut self, key: &str) {
        self.member.book().forget(key);
    }

    fn on_message(&mut self, ts: u64, stamp: Stamp) {
        let now_unix = unix_micros();
        let now = Instant::now();
        let Some(w) = self.window else {
            // Our run id but no window yet: another generator of the run started publishing
            // before this one fixed its window (a --start-at in the past), or a stray.
            Stats::add(&self.shared.stats.foreign, 1);
            return;
        };
        // A window message can come a little before this generator's own window start (another
        // generator's clock runs ahead): decide now, before the ledger counts it.
        if !self.member_decided {
            if self.member.book().measured.is_none() {
                self.decide();
            }
            self.member_decided = true;
        }
        // Borrowed, not an `Arc` clone: every worker thread touching one shared count per
        // message costs more than the rest of this bookkeeping.
        let stats = &self.shared.stats;
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
        Stats::add(&stats.received_total, 1);
        stats
            .timeline
            .with(self.member.key, now_unix / 1_000_000, |s| {
                s.received += 1;
                s.record_latency(e2e);
            });
        let (arrival, measured, sample) = {
            let mut book = self.member.book();
            book.received += 1;
            let sample = book
                .received
                .is_multiple_of(u64::from(self.shared.opts.deliver_sample));
            (
                book.ledger.record(stamp.p, stamp.s),
                book.measured == Some(true),
                sample,
            )
        };
        if measured
            && matches!(
                arrival,
                Arrival::InOrder | Arrival::Gap(_) | Arrival::Reordered
            )
        {
            stats
                .timeline
                .with(self.member.key, stamp.t / 1_000_000, |s| s.delivered += 1);
        }
        if sample {
            self.push(Row::Deliver(Duration::from_micros(e2e)));
        }
    }

    /// Decides, at the window start, whether the member is a member from the start (once per
    /// member: a reconnect does not change it).
    fn decide(&mut self) {
        let Some(w) = self.window else { return };
        let mut book = self.member.book();
        if book.measured.is_some() {
            return;
        }
        let measured = self.welcomed_at.is_some_and(|at| at < w.start);
        book.measured = Some(measured);
        book.ledger = Ledger::new(measured);
        if measured {
            self.shared.plan.rooms[self.member.slot.room]
                .members_from_start
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// At the end of the drain (or when the run stops this connection, if its timer has not
    /// fired yet): whether the last `presence` this member received by then says what the whole
    /// run put in its room (every shard's members; the counts are cluster-wide). Once per
    /// connection.
    fn check_presence(&mut self) {
        if self.presence_checked || self.welcomed_at.is_none() {
            return;
        }
        self.presence_checked = true;
        let stats = &self.shared.stats;
        if let Some(l) = &self.lists {
            let room = self.member.slot.room;
            let (hosts, viewers) = self.shared.plan.rooms[room].size;
            let truth =
                (!self.shared.plan.shard.is_split()).then(|| self.shared.truth.fingerprint(room));
            let counter = match l.view.judge(hosts + viewers, truth) {
                Verdict::Right => &stats.lists_checked,
                Verdict::Wrong => {
                    Stats::add(&stats.lists_checked, 1);
                    &stats.lists_wrong
                }
                Verdict::Missing => &stats.lists_missing,
                Verdict::NotListing => &stats.lists_over_limit,
            };
            Stats::add(counter, 1);
        }
        match self.presence {
            None => Stats::add(&stats.presence_missing, 1),
            Some(seen) => {
                Stats::add(&stats.presence_checked, 1);
                if seen != self.shared.plan.rooms[self.member.slot.room].size {
                    Stats::add(&stats.presence_wrong, 1);
                }
            }
        }
    }

    /// Leaves the member's connected count when the connection ends.
    fn finish(&mut self) {
        if self.window.is_some_and(|w| Instant::now() >= w.start) {
            self.decide();
        }
        if self.welcomed_at.is_some() {
            self.shared.stats.connected.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(l) = &self.lists {
            if self.before_drain_end() {
                self.shared.truth.leave(self.member.slot.room, l.key);
            }
        }
    }
}
