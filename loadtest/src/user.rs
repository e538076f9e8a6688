//! A goose user's life around its members' connections. A goose user carries a batch of
//! members (`--members-per-user`: one in small runs, 16 at scale, so that goose's own ~8 KiB per
//! user is shared): `join` (on start) takes their seats and starts their first attempts, one
//! every member-hatch interval; `tick` (repeated) turns their connections' rows into goose rows,
//! notices closes, and reconnects each member after an unexpected close; `leave` (on stop)
//! closes them all. Each member keeps its own rules, as when it was a goose user of its own:
//! its attempts run beside the others' (a slow attempt delays no other member), with its own
//! backoff and retry time. An attempt tries the targets in turn from the next in the round
//! robin, and backs off only when every one of them failed. A `tick` returns within 30 s, at
//! once when the run ends, so goose can stop users between transactions.
//!
//! Goose rows (method `WS`): `connect` (TCP + upgrade; failures carry the cause and HTTP status),
//! `join` (upgrade → welcome), `publish` (how far behind schedule each publish was written),
//! `deliver 1/N` (end-to-end latency of every Nth received message), `close` (unexpected closes,
//! the close code as status), `error` (`error` events, the code as message).

use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use goose::prelude::*;
use tokio::sync::{Mutex as AsyncMutex, Notify};

use crate::config::TokenIn;
use crate::member::Member;
use crate::plan::Role;
use crate::row::{Row, Rows};
use crate::session::{self, Conn, End};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::target::Target;
use crate::{token, ws};

/// Longest a `tick` waits before returning to goose. Each return costs goose's bookkeeping of a
/// transaction (~5 µs): at 1 s that was a quarter of a 16 000-member generator's CPU
/// (docs/benchmarks.md, "Audience scale"). The tick also returns when the run ends, so nothing
/// waits for it.
const TICK: Duration = Duration::from_secs(30);
/// A member's first retry when its first attempt failed and the backoff has no delay to give.
const RETRY_TICK: Duration = Duration::from_secs(1);

/// Goose session data: cloned out of the user, then locked for the transaction. A tokio mutex
/// since it is held across awaits; only this user's transactions ever lock it, one at a time.
#[derive(Clone)]
pub struct UserState(Arc<AsyncMutex<Batch>>);

/// A connection attempt under way, with its member's index in the batch.
type Attempt = Pin<Box<dyn Future<Output = (usize, Result<Conn, ()>)> + Send>>;

/// The members of one goose user.
struct Batch {
    /// At most `--members-per-user`, fixed at `join`.
    seats: Vec<Seat>,
    /// Rows of every member's connections and attempts, for goose.
    rows: Rows,
    /// Notified by each connection when it ends.
    wake: Arc<Notify>,
    /// Attempts under way (boxed: a connect future is several KiB, and only an attempting
    /// member should pay for one). At most one per seat.
    attempts: FuturesUnordered<Attempt>,
}

/// One member of a batch.
struct Seat {
    member: Arc<Member>,
    conn: Option<Conn>,
    /// When to try again after an unexpected close or a failed attempt; `None`: do not.
    retry_at: Option<Instant>,
    /// Consecutive failed attempts, for the backoff.
    failures: u32,
    /// An attempt of this member is in [`Batch::attempts`].
    attempting: bool,
    /// Its first attempt has not ended yet (the window waits for every member's).
    first: bool,
}

/// What to do after a close the load tester did not ask for, as `docs/protocol.md` section 7
/// says: `Some(delay)` to reconnect.
pub fn reconnect_delay(code: Option<u16>, failures: u32) -> Option<Duration> {
    let backoff = || {
        let base = Duration::from_millis(500) * 2u32.saturating_pow(failures.min(5));
        let capped = base.min(Duration::from_secs(10));
        Some(capped + capped.mul_f64(fastrand::f64() * 0.5))
    };
    match code {
        Some(1012) => Some(Duration::from_millis(fastrand::u64(0..500))),
        Some(1000 | 1002 | 1003 | 1007 | 1008 | 1009) => None,
        Some(c) if (4500..5000).contains(&c) => None,
        _ => backoff(),
    }
}

/// `on_start`: take up to `--members-per-user` seats of `role` and start their first attempts,
/// member `i` of the batch `i` member-hatch intervals after the first (goose starts batches at
/// the member rate divided by the batch size, so members start at the member rate).
pub async fn join(user: &mut GooseUser, shared: &Arc<Shared>, role: Role) -> TransactionResult {
    let k = shared.members_per_user;
    let mut seats = Vec::with_capacity(k);
    for i in 0..k {
        let Some(slot) = shared.plan.take(role) else {
            break;
        };
        seats.push(Seat {
            member: Arc::new(Member::new(slot, user.weighted_users_index * k + i)),
            conn: None,
            retry_at: None,
            failures: 0,
            attempting: true,
            first: true,
        });
    }
    if seats.is_empty() {
        return Err(Box::new(TransactionError::Custom(format!(
            "no free {} seat: more goose users than members",
            role.as_str()
        ))));
    }
    let batch = Batch {
        rows: Rows::default(),
        wake: Arc::new(Notify::new()),
        attempts: FuturesUnordered::new(),
        seats,
    };
    let start = tokio::time::Instant::now();
    for (i, seat) in batch.seats.iter().enumerate() {
        let at = start + shared.hatch_interval * i as u32;
        let connect = connect(
            shared.clone(),
            seat.member.clone(),
            batch.rows.clone(),
            batch.wake.clone(),
        );
        batch.attempts.push(Box::pin(async move {
            tokio::time::sleep_until(at).await;
            (i, connect.await)
        }));
    }
    user.set_session_data(UserState(Arc::new(AsyncMutex::new(batch))));
    Ok(())
}

/// Connects to one of the targets: from the next one in the round robin, a failed attempt moves
/// on to the next target at once, so that a member whose node died or refuses reaches a live
/// one without waiting out a backoff; only when every target failed in a row does the caller
/// back off (`reconnect_delay`). With one target, that is one attempt, as before.
async fn connect(
    shared: Arc<Shared>,
    member: Arc<Member>,
    rows: Rows,
    wake: Arc<Notify>,
) -> Result<Conn, ()> {
    let (first, bind) = shared.plan.route_index();
    let targets = &shared.plan.targets;
    for k in 0..targets.len() {
        let target = &targets[(first + k) % targets.len()];
        if let Ok(conn) = attempt(&shared, &member, &rows, &wake, target, bind).await {
            return Ok(conn);
        }
        if shared
            .schedule
            .window()
            .is_some_and(|w| Instant::now() >= w.drain_end)
        {
            break;
        }
    }
    Err(())
}

fn push(rows: &Rows, row: Row) {
    rows.lock().unwrap_or_else(|p| p.into_inner()).push(row);
}

/// One connection attempt to `target`, recorded as `WS connect` and `WS join` rows.
async fn attempt(
    shared: &Arc<Shared>,
    member: &Arc<Member>,
    rows: &Rows,
    wake: &Arc<Notify>,
    target: &Target,
    bind: Option<Ipv4Addr>,
) -> Result<Conn, ()> {
    let stats = &shared.stats;
    Stats::add(&stats.connect_attempts, 1);
    let room = &shared.plan.rooms[member.slot.room].name;
    let sub = format!("{}-{}", shared.prefix, member.slot.name);
    let persona = token::Persona {
        sub: &sub,
        name: &member.slot.name,
        room,
        role: member.slot.role,
        publishes: member.slot.rate > 0.0,
    };
    let started = Instant::now();
    let token = match shared
        .tokens
        .for_member(member.slot.publisher as usize, &persona)
    {
        Ok(t) => t,
        Err(e) => {
            stats.connect_errors.add("token");
            log::warn!("{e}");
            return Err(());
        }
    };
    let (in_query, in_header) = match shared.opts.token_in {
        TokenIn::Query => (true, false),
        TokenIn::Header => (false, true),
        TokenIn::Both => (true, true),
    };
    let since = if shared.opts.no_resume {
        None
    } else {
        member.since()
    };
    let url = ws::join_url(
        &target.url,
        room,
        member.slot.role,
        &member.slot.name,
        since.as_ref().map(|p| (p.epoch.as_str(), p.offset)),
        token.as_deref().filter(|_| in_query),
    );
    let timeout = shared.opts.connect_timeout;
    let bearer = token.as_deref().filter(|_| in_header);
    let (socket, took) =
        match ws::connect(&shared.dialer, &url, target.addr, bind, bearer, timeout).await {
            Ok(ok) => ok,
            Err(e) => {
                stats.connect_errors.add(&e.cause);
                log::debug!("connect {}: {} ({})", target.url, e.cause, e.detail);
                push(
                    rows,
                    Row::Connect {
                        took: started.elapsed(),
                        error: Some(e.cause),
                        status: e.status,
                    },
                );
                return Err(());
            }
        };
    stats.connect.record(member.key, took.as_micros() as u64);
    push(
        rows,
        Row::Connect {
            took,
            error: None,
            status: Some(101),
        },
    );
    let mut conn = session::spawn(
        shared.clone(),
        member.clone(),
        rows.clone(),
        socket,
        since.is_some(),
        wake.clone(),
    );
    let joined = conn
        .joined
        .take()
        .expect("a new connection has its join signal");
    let remaining = timeout.saturating_sub(started.elapsed());
    let failure = match tokio::time::timeout(remaining, joined).await {
        Ok(Ok(_)) => {
            let took = started.elapsed();
            stats.join.record(member.key, took.as_micros() as u64);
            Stats::add(&stats.joined, 1);
            push(rows, Row::Join { took, error: None });
            return Ok(conn);
        }
        Ok(Err(_)) => {
            let end = (&mut conn.task).await.ok();
            let code = end.and_then(|e| e.code).unwrap_or(1006);
            format!("closed_before_welcome_{code}")
        }
        Err(_) => {
            let _ = conn.cancel.send(());
            let _ = (&mut conn.task).await;
            "welcome_timeout".to_string()
        }
    };
    stats.connect_errors.add(&failure);
    push(
        rows,
        Row::Join {
            took: started.elapsed(),
            error: Some(failure),
        },
    );
    Err(())
}

fn state(user: &GooseUser) -> Result<UserState, Box<TransactionError>> {
    user.get_session_data::<UserState>()
        .cloned()
        .ok_or_else(|| {
            Box::new(TransactionError::Custom(
                "user has no connection state (join did not run)".into(),
            ))
        })
}

/// Turns queued rows into goose rows.
async fn flush_rows(user: &mut GooseUser, shared: &Shared, rows: &Rows) -> TransactionResult {
    let taken = std::mem::take(&mut *rows.lock().unwrap_or_else(|p| p.into_inner()));
    for row in taken {
        let (name, took, ok, status, error) = match &row {
            Row::Publish { lag, error } => {
                ("publish", *lag, error.is_none(), None, error.as_deref())
            }
            Row::Deliver(latency) => (shared.deliver_row.as_str(), *latency, true, None, None),
            Row::Error(code) => ("error", Duration::ZERO, false, None, Some(code.as_str())),
            Row::Connect {
                took,
                error,
                status,
            } => ("connect", *took, error.is_none(), *status, error.as_deref()),
            Row::Join { took, error } => ("join", *took, error.is_none(), None, error.as_deref()),
            Row::Close {
                lived,
                code,
                reason,
            } => ("close", *lived, false, Some(*code), Some(reason.as_str())),
        };
        user.record_custom_request_duration("WS", name, took, ok, status, error)
            .await?;
    }
    Ok(())
}

/// Counts a close the load tester did not ask for, and queues its row.
fn closed(shared: &Shared, rows: &Rows, end: &End) {
    let code = end.code.unwrap_or(1006);
    shared.stats.closes.add(&code.to_string());
    let reason = if end.reason.is_empty() {
        format!("closed {code}")
    } else {
        format!("closed {code}: {}", end.reason)
    };
    log::debug!("member closed unexpectedly: {reason}");
    push(
        rows,
        Row::Close {
            lived: end.lived,
            code,
            reason,
        },
    );
}

impl Batch {
    /// An attempt of member `i` ended: keep its connection, or set its retry time.
    fn attempted(&mut self, shared: &Arc<Shared>, i: usize, result: Result<Conn, ()>) {
        let seat = &mut self.seats[i];
        seat.attempting = false;
        match result {
            Ok(conn) => {
                seat.conn = Some(conn);
                seat.failures = 0;
                seat.retry_at = None;
            }
            Err(()) if seat.first => {
                seat.failures = 1;
                seat.retry_at = (!shared.opts.no_reconnect)
                    .then(|| Instant::now() + reconnect_delay(None, 0).unwrap_or(RETRY_TICK));
            }
            Err(()) => {
                seat.failures += 1;
                seat.retry_at = reconnect_delay(None, seat.failures).map(|d| Instant::now() + d);
            }
        }
        if std::mem::take(&mut seat.first) {
            if let Some(window) = shared.schedule.first_attempt_done() {
                crate::conductor::spawn_conductor(shared.clone(), window);
            }
        }
    }

    /// Collects the connections that ended; an end the load tester did not ask for is counted
    /// and sets the member's retry time by its close code.
    async fn reap(&mut self, shared: &Shared) {
        for seat in &mut self.seats {
            if !seat
                .conn
                .as_ref()
                .is_some_and(|c| c.done.is_cancelled() || c.task.is_finished())
            {
                continue;
            }
            let conn = seat.conn.take().expect("checked");
            let end = conn.task.await.unwrap_or_else(|e| End {
                requested: false,
                code: None,
                reason: format!("connection task failed: {e}"),
                welcomed: true,
                lived: Duration::ZERO,
            });
            if !end.requested {
                closed(shared, &self.rows, &end);
                seat.failures = 0;
                seat.retry_at = if shared.opts.no_reconnect {
                    None
                } else {
                    reconnect_delay(end.code, 0).map(|d| Instant::now() + d)
                };
            }
        }
    }

    /// Starts the attempts whose time has come (none after the drain's end).
    fn start_due(&mut self, shared: &Arc<Shared>) {
        let now = Instant::now();
        let before_drain_end = shared.schedule.window().is_none_or(|w| now < w.drain_end);
        for (i, seat) in self.seats.iter_mut().enumerate() {
            if seat.conn.is_some() || seat.attempting || seat.retry_at.is_none_or(|at| now < at) {
                continue;
            }
            if !before_drain_end {
                seat.retry_at = None;
                continue;
            }
            Stats::add(&shared.stats.reconnects, 1);
            seat.attempting = true;
            let connect = connect(
                shared.clone(),
                seat.member.clone(),
                self.rows.clone(),
                self.wake.clone(),
            );
            self.attempts
                .push(Box::pin(async move { (i, connect.await) }));
        }
    }

    /// The earliest retry time of a member without a connection or an attempt.
    fn next_retry(&self) -> Option<Instant> {
        self.seats
            .iter()
            .filter(|s| s.conn.is_none() && !s.attempting)
            .filter_map(|s| s.retry_at)
            .min()
    }
}

/// The repeated transaction: serves every member of the batch until `TICK` (30 s) has passed or
/// the run ended, turning their rows into goose rows as they come.
pub async fn tick(user: &mut GooseUser, shared: &Arc<Shared>) -> TransactionResult {
    let state = state(user)?;
    let mut guard = state.0.lock().await;
    let batch = &mut *guard;
    let wake = batch.wake.clone();
    let until = Instant::now() + TICK;
    loop {
        batch.reap(shared).await;
        batch.start_due(shared);
        // Boxed: goose's recording futures are large, and inline they would make every
        // batch's tick that big while it waits.
        Box::pin(flush_rows(user, shared, &batch.rows)).await?;
        if Instant::now() >= until || shared.schedule.ended.is_cancelled() {
            return Ok(());
        }
        let wake_at = batch.next_retry().map_or(until, |at| at.min(until));
        let attempted = tokio::select! {
            _ = tokio::time::sleep_until(wake_at.into()) => None,
            _ = wake.notified() => None,
            _ = shared.schedule.ended.cancelled() => None,
            Some(done) = batch.attempts.next(), if !batch.attempts.is_empty() => Some(done),
        };
        if let Some((i, result)) = attempted {
            batch.attempted(shared, i, result);
        }
    }
}

/// `on_stop`: close every member's connection and account for what the schedule could not send.
pub async fn leave(user: &mut GooseUser, shared: &Arc<Shared>) -> TransactionResult {
    let state = state(user)?;
    let mut guard = state.0.lock().await;
    let batch = &mut *guard;
    // An attempt still under way is dropped: its connection, if it had one, closes itself.
    batch.attempts.clear();
    let closing = batch
        .seats
        .iter_mut()
        .filter_map(|s| s.conn.take())
        .map(|conn| async move {
            let _ = conn.cancel.send(());
            let mut task = conn.task;
            match tokio::time::timeout(Duration::from_secs(3), &mut task).await {
                Ok(Ok(end)) if !end.requested => Some(end),
                Ok(_) => None,
                Err(_) => {
                    task.abort();
                    None
                }
            }
        });
    for end in futures_util::future::join_all(closing)
        .await
        .into_iter()
        .flatten()
    {
        closed(shared, &batch.rows, &end);
    }
    flush_rows(user, shared, &batch.rows).await?;
    for seat in &batch.seats {
        let member = &seat.member;
        member.account(shared);
        if let (Some(cadence), Some(w)) = (member.cadence, shared.schedule.window()) {
            let scheduled = cadence.scheduled(w.measure());
            let sent = member.next_seq.load(std::sync::atomic::Ordering::Relaxed);
            Stats::add(&shared.stats.unsent, scheduled.saturating_sub(sent));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_follows_the_close_codes() {
        let d = reconnect_delay(Some(1012), 0).unwrap();
        assert!(
            d < Duration::from_millis(500),
            "draining: reconnect at once"
        );
        for code in [4000, 4001] {
            let d = reconnect_delay(Some(code), 0).unwrap();
            assert!(d >= Duration::from_millis(500), "{code}: with backoff");
        }
        assert!(reconnect_delay(None, 0).is_some(), "abnormal close");
        for code in [1000, 1002, 1007, 1008, 1009, 4500] {
            assert_eq!(reconnect_delay(Some(code), 0), None, "{code}");
        }
        let late = reconnect_delay(None, 10).unwrap();
        assert!(late <= Duration::from_secs(15), "capped: {late:?}");
        assert!(late >= Duration::from_secs(10));
    }
}
