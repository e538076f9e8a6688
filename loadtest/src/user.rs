//! A goose user's life around its connection: `join` (on start) takes a seat and connects,
//! `tick` (repeated) turns the connection's rows into goose rows and reconnects after an
//! unexpected close, `leave` (on stop) closes. A connection tries the targets in turn from the
//! next in the round robin, and backs off only when every one of them failed. Every transaction
//! but a connection attempt returns within about a second so goose can stop users between
//! transactions.
//!
//! Goose rows (method `WS`): `connect` (TCP + upgrade; failures carry the cause and HTTP status),
//! `join` (upgrade → welcome), `publish` (how far behind schedule each publish was written),
//! `deliver 1/N` (end-to-end latency of every Nth received message), `close` (unexpected closes,
//! the close code as status), `error` (`error` events, the code as message).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use goose::prelude::*;
use tokio::sync::Mutex as AsyncMutex;

use crate::config::TokenIn;
use crate::member::Member;
use crate::plan::Role;
use crate::session::{self, Conn, End, Row, Rows};
use crate::shared::Shared;
use crate::stats::Stats;
use crate::target::Target;
use crate::{token, ws};

/// Longest a `tick` waits before returning to goose, while the member's connection lives. Each
/// return costs goose's bookkeeping of a transaction (~5 µs): at 1 s that was a quarter of a
/// 16 000-member generator's CPU (docs/benchmarks.md, "Audience scale"). The tick also returns
/// when the connection ends and when the run ends, so nothing waits for it.
const TICK: Duration = Duration::from_secs(30);
/// Longest a member without a connection waits before its next look (its retry time rules).
const RETRY_TICK: Duration = Duration::from_secs(1);

/// Goose session data: cloned out of the user, then locked for the transaction. A tokio mutex
/// since it is held across awaits; only this user's transactions ever lock it, one at a time.
#[derive(Clone)]
pub struct UserState(Arc<AsyncMutex<Inner>>);

struct Inner {
    member: Arc<Member>,
    rows: Rows,
    conn: Option<Conn>,
    /// When to try again after an unexpected close; `None`: do not.
    retry_at: Option<Instant>,
    /// Consecutive failed attempts, for the backoff.
    failures: u32,
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

/// `on_start`: take a seat of `role`, connect, and count the first attempt.
pub async fn join(user: &mut GooseUser, shared: &Arc<Shared>, role: Role) -> TransactionResult {
    let Some(slot) = shared.plan.take(role) else {
        return Err(Box::new(TransactionError::Custom(format!(
            "no free {} seat: more goose users than members",
            role.as_str()
        ))));
    };
    let member = Arc::new(Member::new(slot, user.weighted_users_index));
    let rows: Rows = Arc::default();
    let conn = connect(user, shared, &member, &rows).await;
    let mut inner = Inner {
        member,
        rows,
        retry_at: None,
        failures: 0,
        conn: None,
    };
    match conn {
        Ok(c) => inner.conn = Some(c),
        Err(()) => {
            inner.failures = 1;
            inner.retry_at = (!shared.opts.no_reconnect)
                .then(|| Instant::now() + reconnect_delay(None, 0).unwrap_or(RETRY_TICK));
        }
    }
    user.set_session_data(UserState(Arc::new(AsyncMutex::new(inner))));
    if let Some(window) = shared.schedule.first_attempt_done() {
        crate::conductor::spawn_conductor(shared.clone(), window);
    }
    Ok(())
}

/// Connects to one of the targets: from the next one in the round robin, a failed attempt moves
/// on to the next target at once, so that a member whose node died or refuses reaches a live
/// one without waiting out a backoff; only when every target failed in a row does the caller
/// back off (`reconnect_delay`). With one target, that is one attempt, as before.
async fn connect(
    user: &mut GooseUser,
    shared: &Arc<Shared>,
    member: &Arc<Member>,
    rows: &Rows,
) -> Result<Conn, ()> {
    let (first, bind) = shared.plan.route_index();
    let targets = &shared.plan.targets;
    for k in 0..targets.len() {
        let target = &targets[(first + k) % targets.len()];
        if let Ok(conn) = attempt(user, shared, member, rows, target, bind).await {
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

/// One connection attempt to `target`, recorded as `WS connect` and `WS join` rows.
async fn attempt(
    user: &mut GooseUser,
    shared: &Arc<Shared>,
    member: &Arc<Member>,
    rows: &Rows,
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
                let _ = user
                    .record_custom_request_duration(
                        "WS",
                        "connect",
                        started.elapsed(),
                        false,
                        e.status,
                        Some(&e.cause),
                    )
                    .await;
                log::debug!("connect {}: {} ({})", target.url, e.cause, e.detail);
                return Err(());
            }
        };
    stats.connect.record(member.key, took.as_micros() as u64);
    let _ = user
        .record_custom_request_duration("WS", "connect", took, true, Some(101), None)
        .await;
    let mut conn = session::spawn(
        shared.clone(),
        member.clone(),
        rows.clone(),
        socket,
        since.is_some(),
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
            let _ = user
                .record_custom_request_duration("WS", "join", took, true, None, None)
                .await;
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
    let _ = user
        .record_custom_request_duration(
            "WS",
            "join",
            started.elapsed(),
            false,
            None,
            Some(&failure),
        )
        .await;
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
        match row {
            Row::Publish { lag, error } => {
                user.record_custom_request_duration(
                    "WS",
                    "publish",
                    lag,
                    error.is_none(),
                    None,
                    error.as_deref(),
                )
                .await?
            }
            Row::Deliver(latency) => {
                user.record_custom_request_duration(
                    "WS",
                    &shared.deliver_row,
                    latency,
                    true,
                    None,
                    None,
                )
                .await?
            }
            Row::Error(code) => {
                user.record_custom_request_duration(
                    "WS",
                    "error",
                    Duration::ZERO,
                    false,
                    None,
                    Some(&code),
                )
                .await?
            }
        }
    }
    Ok(())
}

/// Counts and records a close the load tester did not ask for.
async fn record_close(user: &mut GooseUser, shared: &Shared, end: &End) -> TransactionResult {
    let code = end.code.unwrap_or(1006);
    shared.stats.closes.add(&code.to_string());
    let reason = if end.reason.is_empty() {
        format!("closed {code}")
    } else {
        format!("closed {code}: {}", end.reason)
    };
    log::debug!("member closed unexpectedly: {reason}");
    user.record_custom_request_duration("WS", "close", end.lived, false, Some(code), Some(&reason))
        .await
}

/// The repeated transaction.
pub async fn tick(user: &mut GooseUser, shared: &Arc<Shared>) -> TransactionResult {
    let state = state(user)?;
    let mut inner = state.0.lock().await;
    match &inner.conn {
        Some(conn) => {
            let done = conn.done.clone();
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = done.cancelled() => {}
                _ = shared.schedule.ended.cancelled() => {}
            }
        }
        None => {
            let wait = inner
                .retry_at
                .map(|at| at.saturating_duration_since(Instant::now()))
                .unwrap_or(RETRY_TICK)
                .min(RETRY_TICK);
            tokio::time::sleep(wait).await;
        }
    }
    let rows = inner.rows.clone();
    // Boxed here and below: goose's recording futures are large, and inline they would make
    // every member's tick that big while it waits.
    Box::pin(flush_rows(user, shared, &rows)).await?;

    if inner.conn.as_ref().is_some_and(|c| c.task.is_finished()) {
        let conn = inner.conn.take().expect("checked");
        let end = conn.task.await.unwrap_or_else(|e| End {
            requested: false,
            code: None,
            reason: format!("connection task failed: {e}"),
            welcomed: true,
            lived: Duration::ZERO,
        });
        Box::pin(flush_rows(user, shared, &rows)).await?;
        if !end.requested {
            Box::pin(record_close(user, shared, &end)).await?;
            inner.failures = 0;
            inner.retry_at = if shared.opts.no_reconnect {
                None
            } else {
                reconnect_delay(end.code, 0).map(|d| Instant::now() + d)
            };
        }
    }

    let before_drain_end = shared
        .schedule
        .window()
        .is_none_or(|w| Instant::now() < w.drain_end);
    if inner.conn.is_none() && inner.retry_at.is_some_and(|at| Instant::now() >= at) {
        if !before_drain_end {
            inner.retry_at = None;
            return Ok(());
        }
        Stats::add(&shared.stats.reconnects, 1);
        let member = inner.member.clone();
        // Boxed: the connect future (TCP, TLS, upgrade, over every target) is several KiB, and
        // inline it would make every idle member's tick that big for the whole run.
        match Box::pin(connect(user, shared, &member, &rows)).await {
            Ok(conn) => {
                inner.conn = Some(conn);
                inner.failures = 0;
                inner.retry_at = None;
            }
            Err(()) => {
                inner.failures += 1;
                inner.retry_at = reconnect_delay(None, inner.failures).map(|d| Instant::now() + d);
            }
        }
    }
    Ok(())
}

/// `on_stop`: close the connection and account for what the schedule could not send.
pub async fn leave(user: &mut GooseUser, shared: &Arc<Shared>) -> TransactionResult {
    let state = state(user)?;
    let mut inner = state.0.lock().await;
    if let Some(conn) = inner.conn.take() {
        let _ = conn.cancel.send(());
        let mut task = conn.task;
        match tokio::time::timeout(Duration::from_secs(3), &mut task).await {
            Ok(Ok(end)) if !end.requested => record_close(user, shared, &end).await?,
            Ok(_) => {}
            Err(_) => task.abort(),
        }
    }
    let rows = inner.rows.clone();
    flush_rows(user, shared, &rows).await?;
    inner.member.account(shared);
    if let (Some(cadence), Some(w)) = (inner.member.cadence, shared.schedule.window()) {
        let scheduled = cadence.scheduled(w.measure());
        let sent = inner
            .member
            .next_seq
            .load(std::sync::atomic::Ordering::Relaxed);
        Stats::add(&shared.stats.unsent, scheduled.saturating_sub(sent));
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
