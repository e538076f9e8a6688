//! The publisher task: keeps the command connection ([`Commands`](super::conn::Commands)) in
//! place. A command on a missing or failed connection fails at once with a
//! [`BrokerError`](crate::broker::BrokerError) (the caller tells the client), and on one server a
//! failure hands the connection back to this task to replace it.
//!
//! On one server (or under Sentinel) the task probes the connection every
//! `--redis-probe-interval`, so that an outage is noticed, and a fresh connection is ready,
//! before the next publish. Under Sentinel the probe asks `ROLE` and the sentinels: a failover
//! may leave this connection open on the demoted master, where `PUBLISH` still "works" for that
//! server's own subscribers only — a silent split — so the task (and the subscriber, through
//! `subscriber_stale`) follow the master the sentinels name. A Cluster connection reconnects its
//! node connections and follows `MOVED` by itself; when the subscriber's probe sees a new or
//! returning master, a fresh one (which reads the new slot map at once) is made and put in place
//! of the old, which serves the healthy shards until then.

use std::sync::{Arc, Mutex};

use redis::AsyncConnectionConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conn::Conn;
use super::reconnect::{reconnect, Served};
use super::Shared;
use crate::broker::redis_endpoint::Endpoint;

/// Runs the publisher task until `cancel`.
pub async fn run(s: Arc<Shared>, cancel: CancellationToken) {
    let s = &s;
    let t = s.timeouts;
    // A Cluster connection reads the slot map before it is ready: twice the deadline.
    let limit = if s.naming.cluster {
        t.command * 2
    } else {
        t.command
    };
    reconnect(
        "publisher",
        t.backoff_cap,
        limit,
        &cancel,
        || connect(s),
        |(addr, conn), made| {
            let cancel = &cancel;
            async move {
                if made > 1 {
                    s.metrics.redis_reconnects_publisher.increment(1);
                }
                *s.publisher_addr.lock().unwrap_or_else(|e| e.into_inner()) = addr;
                s.commands.install(made, conn);
                info!("redis publisher connected");
                watch(s, cancel, made).await
            }
        },
    )
    .await
}

/// A command connection, and the server's address on one server (Sentinel compares it).
async fn connect(s: &Shared) -> redis::RedisResult<(Option<String>, Conn)> {
    match &s.endpoint {
        Endpoint::Cluster(seeds) => {
            let client = seeds.client(s.timeouts.command).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cluster client",
                    e.to_string(),
                ))
            })?;
            Ok((None, Conn::Cluster(client.get_async_connection().await?)))
        }
        endpoint => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(s.timeouts.command))
                .set_response_timeout(Some(s.timeouts.command));
            let client = endpoint.client().await?;
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let addr = client.get_connection_info().addr().to_string();
            Ok((Some(addr), Conn::Server(conn)))
        }
    }
}

/// Keeps connection `generation` until it is lost or the node shuts down.
async fn watch(s: &Shared, cancel: &CancellationToken, generation: u64) -> Served {
    let probing = !s.naming.cluster;
    let mut probe = tokio::time::interval(s.timeouts.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Served::Stopped,
            _ = s.commands.lost.notified() => {
                if s.commands.generation() != Some(generation) {
                    return Served::Lost("a command failed on it".into());
                }
                if s.naming.cluster {
                    // The subscriber's probe saw a new or returning master: a fresh connection
                    // reads the new slot map at once. Made before the old one goes, so that the
                    // healthy shards' commands never find no connection in place.
                    replace_cluster(s, generation).await;
                    continue;
                }
                // A stale wake-up about an older connection.
            }
            _ = probe.tick(), if probing => {
                if let Some(lost) = probe_server(s, generation).await {
                    return lost;
                }
            }
        }
    }
}

/// Puts a fresh Cluster command connection in place of connection `generation` (kept when the
/// fresh one cannot be made: the subscriber's next probe asks again).
async fn replace_cluster(s: &Shared, generation: u64) {
    match tokio::time::timeout(s.timeouts.command * 2, connect(s)).await {
        Ok(Ok((_, conn))) => {
            s.commands.install(generation, conn);
            s.metrics.redis_reconnects_publisher.increment(1);
            info!("redis publisher moved to a fresh cluster connection (a shard has a new master)");
        }
        Ok(Err(e)) => {
            warn!(error = %e, "a fresh cluster command connection failed; keeping the old one")
        }
        Err(_) => warn!("a fresh cluster command connection timed out; keeping the old one"),
    }
}

/// One probe of a server's connection: `PING`, or under Sentinel `ROLE` and the sentinels' word.
/// Returns why the connection must be replaced, if it must.
async fn probe_server(s: &Shared, generation: u64) -> Option<Served> {
    let Some((_, Conn::Server(mut conn))) = s.commands.get() else {
        return Some(Served::Lost("no connection in place".into()));
    };
    let t = s.timeouts.command;
    let sentinel = matches!(s.endpoint, Endpoint::Sentinel(..));
    let probe = redis::cmd(if sentinel { "ROLE" } else { "PING" }).to_owned();
    let answer = tokio::time::timeout(t, probe.query_async::<redis::Value>(&mut conn)).await;
    let mut demoted = sentinel && matches!(&answer, Ok(Ok(v)) if !is_master(v));
    if sentinel && !demoted {
        // A forced failover leaves the old master a master until Sentinel converts it
        // (seconds): follow the sentinels' word, not the server's.
        if let Ok(Ok(c)) = tokio::time::timeout(t, s.endpoint.client()).await {
            let named = c.get_connection_info().addr().to_string();
            let on = |a: &Mutex<Option<String>>| {
                a.lock().unwrap_or_else(|e| e.into_inner()).as_deref() == Some(named.as_str())
            };
            demoted = !on(&s.publisher_addr);
            if !on(&s.subscriber_addr) {
                s.subscriber_stale.notify_waiters();
            }
        }
    }
    if demoted {
        s.commands.take(generation);
        s.subscriber_stale.notify_waiters();
        warn!("redis server is no longer the master; asking the sentinels again");
        return Some(Served::Lost("demoted to a replica".into()));
    }
    if !matches!(answer, Ok(Ok(_))) {
        s.commands.take(generation);
        return Some(Served::Lost("the probe failed".into()));
    }
    None
}

/// Whether a `ROLE` answer says master.
fn is_master(v: &redis::Value) -> bool {
    match v {
        redis::Value::Array(a) => matches!(
            a.first(),
            Some(redis::Value::BulkString(r)) if r.as_slice() == b"master"
        ),
        _ => false,
    }
}
