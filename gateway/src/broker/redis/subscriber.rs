//! The subscriber task: owns the subscriber connection and the set of channels actually
//! subscribed on it, converges that set to the desired set (changed by joins and leaves) through
//! [`Subscriptions::converge`](crate::broker::subscriptions::Subscriptions::converge) in batches,
//! and hands every message to the node without blocking. After a loss it reconnects forever
//! ([`super::reconnect`]) and subscribes the whole desired set again.
//!
//! This file serves one server or a Sentinel-managed master: a dedicated pub/sub connection,
//! probed with `PING` every `--redis-probe-interval`, so that a Redis that drops the connection
//! *or* stops answering (a stopped process) is detected within probe interval +
//! `--redis-timeout`. Under Sentinel every (re)connect asks the sentinels for the current master,
//! and the publisher's probe tells this task when its server is no longer that master. A Redis
//! Cluster's subscriber is [`super::cluster`]'s.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::cluster;
use super::conn::Naming;
use super::reconnect::{reconnect, Served};
use super::Shared;
use crate::broker::subscriptions::ChannelSink;
use crate::wire::protocol::RoomName;

/// Channels per (un)subscribe round when converging, so that a reconnect with thousands of rooms
/// sends a few large commands rather than one huge one or thousands of small.
pub const SUBSCRIBE_BATCH: usize = 500;

/// Runs the subscriber task until `cancel`.
pub async fn run(s: Arc<Shared>, cancel: CancellationToken) {
    let s = &s;
    let t = s.timeouts;
    if s.naming.cluster {
        reconnect(
            "cluster subscriber",
            t.backoff_cap,
            // A Cluster connection reads the slot map before it is ready: twice the deadline.
            t.command * 2,
            &cancel,
            || cluster::connect(s),
            |conn, made| {
                let cancel = &cancel;
                async move {
                    if made > 1 {
                        s.metrics.redis_reconnects_subscriber.increment(1);
                    }
                    cluster::serve(s, cancel, conn).await;
                    ended(s, Ok(()))
                }
            },
        )
        .await
    } else {
        reconnect(
            "subscriber",
            t.backoff_cap,
            t.command,
            &cancel,
            || connect(s),
            |(addr, pubsub), made| {
                let cancel = &cancel;
                async move {
                    *s.subscriber_addr.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    let (mut sink, mut stream) = pubsub.split();
                    ended(s, serve(s, cancel, &mut sink, &mut stream, made).await)
                }
            },
        )
        .await
    }
}

/// A connection ended: nothing is confirmed any more.
fn ended(s: &Shared, result: Result<(), SubscriberLost>) -> Served {
    s.set_subscriber_up(false);
    s.subs.lock().confirmed.clear();
    match result {
        Ok(()) => Served::Stopped,
        Err(e) => Served::Lost(e.to_string()),
    }
}

/// Why a subscriber connection ended.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberLost {
    /// Redis closed the connection.
    #[error("connection closed by Redis")]
    Closed,
    /// A command or probe got no answer in time (a frozen server).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Sentinel names another master now.
    #[error("the server is no longer the master")]
    Demoted,
    /// The connection failed.
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

/// A pub/sub connection to the current master, and its address.
async fn connect(s: &Shared) -> redis::RedisResult<(String, redis::aio::PubSub)> {
    let client = s.endpoint.client().await?;
    let pubsub = client.get_async_pubsub().await?;
    Ok((client.get_connection_info().addr().to_string(), pubsub))
}

/// Serves one server's connection until it fails (`Err`) or the node shuts down (`Ok`).
async fn serve(
    s: &Shared,
    cancel: &CancellationToken,
    sink: &mut PubSubSink,
    stream: &mut PubSubStream,
    made: u64,
) -> Result<(), SubscriberLost> {
    let mut current: HashSet<RoomName> = HashSet::new();
    let t = s.timeouts.command;
    let mut channels = ServerSink {
        sink,
        naming: &s.naming,
        timeout: t,
    };
    s.subs
        .converge(&mut channels, &mut current, SUBSCRIBE_BATCH)
        .await?;
    s.set_subscriber_up(true);
    if made > 1 {
        s.metrics.redis_reconnects_subscriber.increment(1);
    }
    info!(rooms = current.len(), "redis subscriber connected");
    let mut probe = tokio::time::interval(s.timeouts.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.tick().await;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            msg = stream.next() => {
                let Some(msg) = msg else { return Err(SubscriberLost::Closed) };
                s.deliver(msg.get_channel_name().as_bytes(), msg.get_payload_bytes());
            }
            _ = s.subs.changed() => {
                s.subs.converge(&mut channels, &mut current, SUBSCRIBE_BATCH).await?
            }
            _ = s.subscriber_stale.notified() => return Err(SubscriberLost::Demoted),
            _ = probe.tick() => {
                match tokio::time::timeout(t, channels.sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(SubscriberLost::Timeout(t)),
                }
            }
        }
    }
}

/// One server's pub/sub connection as a [`ChannelSink`]: one command per round, and any
/// failure ends the connection.
struct ServerSink<'a> {
    sink: &'a mut PubSubSink,
    naming: &'a Naming,
    timeout: Duration,
}

impl ChannelSink for ServerSink<'_> {
    type Error = SubscriberLost;

    async fn send(
        &mut self,
        subscribe: bool,
        rooms: Vec<RoomName>,
    ) -> Result<Vec<Vec<RoomName>>, SubscriberLost> {
        let channels: Vec<String> = rooms.iter().map(|r| self.naming.channel(r)).collect();
        let sent = if subscribe {
            tokio::time::timeout(self.timeout, self.sink.subscribe(&channels)).await
        } else {
            tokio::time::timeout(self.timeout, self.sink.unsubscribe(&channels)).await
        };
        match sent {
            Ok(r) => r?,
            Err(_) => return Err(SubscriberLost::Timeout(self.timeout)),
        }
        Ok(vec![rooms])
    }
}
