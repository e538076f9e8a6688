//! Reconnecting forever: the capped, jittered [`Backoff`] and the one loop ([`reconnect`]) that
//! every Redis connection task runs — connect within a deadline, serve the connection until it is
//! lost, wait, try again — until the node shuts down. What a connection is and how it is served
//! belongs to the caller ([`super::subscriber`], [`super::publisher`]).

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// First reconnect wait; doubles up to the configured cap (`--redis-backoff-cap`, 2 s by
/// default), with full jitter.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// Capped exponential backoff with full jitter, for reconnect loops that never give up.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never waits longer than `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next wait: uniformly random in [base/2, min(cap, base·2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let floor = self.base / 2;
        let span = ceiling.saturating_sub(floor).as_micros() as u64;
        floor + Duration::from_micros(fastrand::u64(0..=span))
    }

    /// Back to the first step, after a connection came up.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How serving one connection ended.
pub enum Served {
    /// The node is shutting down: the task ends.
    Stopped,
    /// The connection was lost (the reason is logged): connect again.
    Lost(String),
}

/// Runs one connection task: `connect` (within `limit`), then `serve` the connection — told
/// how many connections this task has made, 1 for the first, so that it counts reconnects —
/// and after a loss or a failed attempt waits [`Backoff::next_delay`] (reset by a successful
/// connect) and starts over, until `cancel`. Failed attempts are logged on the first and every
/// fiftieth, so that a long outage does not flood the log. `what` names the connection in logs.
pub async fn reconnect<C, E, Fc, Cf, Fs, Sf>(
    what: &'static str,
    cap: Duration,
    limit: Duration,
    cancel: &CancellationToken,
    mut connect: Fc,
    mut serve: Fs,
) where
    E: std::fmt::Display,
    Fc: FnMut() -> Cf,
    Cf: Future<Output = Result<C, E>>,
    Fs: FnMut(C, u64) -> Sf,
    Sf: Future<Output = Served>,
{
    let mut backoff = Backoff::new(BACKOFF_BASE, cap);
    let mut made = 0u64;
    let mut failures = 0u64;
    loop {
        let attempt = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(limit, connect()) => r,
        };
        match attempt {
            Ok(Ok(conn)) => {
                made += 1;
                failures = 0;
                backoff.reset();
                match serve(conn, made).await {
                    Served::Stopped => return,
                    Served::Lost(cause) => {
                        warn!(%cause, "redis {what} connection lost; reconnecting")
                    }
                }
            }
            Ok(Err(e)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    warn!(cause = %e, attempts = failures, "redis {what} cannot connect");
                }
            }
            Err(_) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    warn!(attempts = failures, "redis {what} connect timed out");
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_secs(2)));
        assert!(delays[0] <= Duration::from_millis(100));
        let late: std::collections::HashSet<_> = delays[20..].iter().collect();
        assert!(late.len() > 5, "jitter spreads the waits");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    /// A connection that never comes up is tried again and again, each wait within the cap, and
    /// the loop ends when the node stops — under paused time, so the waits cost nothing.
    #[tokio::test(start_paused = true)]
    async fn retries_within_the_cap_until_cancelled() {
        let cancel = CancellationToken::new();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let cap = Duration::from_millis(400);
        let task = {
            let (cancel, attempts) = (cancel.clone(), attempts.clone());
            tokio::spawn(async move {
                reconnect(
                    "test",
                    cap,
                    Duration::from_secs(1),
                    &cancel,
                    || {
                        attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        async { Err::<(), _>("refused") }
                    },
                    |_, _| async { Served::Stopped },
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
        // 10 s of waits of at most 400 ms each: at least 25 attempts.
        assert!(n >= 25, "{n} attempts in 10 s with a 400 ms cap");
        cancel.cancel();
        task.await.unwrap();
    }
}
