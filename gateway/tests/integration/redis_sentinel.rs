//! Redis under Sentinel against real processes this test starts on loopback: a master, a replica
//! and three sentinels (down-after-milliseconds 1000). Nodes are pointed at the sentinels
//! (`redis+sentinel://…/mymaster`), find the master, and follow a failover — a `SENTINEL FAILOVER`
//! and a SIGKILL of the master — with no restart: cross-node delivery resumes within a measured
//! bound, and `/readyz` is red while there is no master.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// Polls `/readyz` of `node` every 20 ms until dropped; records whether it ever saw a 503.
fn watch_red(node: &TestNode) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let red = Arc::new(AtomicBool::new(false));
    let admin = node.admin;
    let flag = red.clone();
    let task = tokio::spawn(async move {
        loop {
            if let Ok((503, _)) = http(admin, "GET", "/readyz", &[], b"").await {
                flag.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (red, task)
}

/// Publishes a raw payload on the master the sentinels name now, until every client in `to`
/// got it (so each node's subscriber is on the real master), within `limit`.
async fn reached_from_master(
    setup: &SentinelTopology,
    to: &mut [&mut WsClient],
    limit: Duration,
) -> bool {
    let token = format!("tok-{}", fastrand::u32(..));
    let start = Instant::now();
    let mut got = vec![false; to.len()];
    while start.elapsed() < limit {
        let master = setup.master_port().await;
        let payload = format!("\"{token}\"");
        let _ = redis_at(master, &["PUBLISH", "gw:room:s", &payload]).await;
        let until = Instant::now() + Duration::from_millis(100);
        for (i, c) in to.iter_mut().enumerate() {
            while let Some(m) = c
                .next_json_within(until.saturating_duration_since(Instant::now()))
                .await
            {
                if m["type"] == "message" && m["data"].to_string().contains(&token) {
                    got[i] = true;
                }
            }
        }
        if got.iter().all(|g| *g) {
            return true;
        }
    }
    false
}

/// Cross-node delivery through the real master: the backend's raw publish reaches both members,
/// and a member's publish reaches the other.
async fn delivery_through_master(
    setup: &SentinelTopology,
    a: &mut WsClient,
    b: &mut WsClient,
    limit: Duration,
) -> bool {
    let start = Instant::now();
    reached_from_master(setup, &mut [&mut *a, &mut *b], limit).await
        && delivery_resumes(a, b, limit.saturating_sub(start.elapsed()))
            .await
            .is_some()
}

async fn wait_both_ready(n1: &TestNode, n2: &TestNode) {
    for n in [n1, n2] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while readyz_status(n).await != 200 {
            assert!(Instant::now() < deadline, "{} never ready again", n.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_sentinel_failovers_without_a_restart() {
    let mut setup = SentinelTopology::start().await;
    let url = setup.url();
    let n1 = TestNode::start(test_config_url("n1", &url, &[])).await;
    let n2 = TestNode::start(test_config_url("n2", &url, &[])).await;
    let mut a = n1.join("s", "host", "a").await;
    let mut b = n2.join("s", "viewer", "b").await;
    assert!(delivery_through_master(&setup, &mut a, &mut b, Duration::from_secs(5)).await);
    let first = setup.master_port().await;

    // 1. A manual failover.
    let (red, watcher) = watch_red(&n1);
    let start = Instant::now();
    redis_at(
        setup.sentinels[0].port,
        &["SENTINEL", "FAILOVER", SENTINEL_MASTER],
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while setup.master_port().await == first {
        assert!(Instant::now() < deadline, "sentinel did not fail over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        delivery_through_master(&setup, &mut a, &mut b, Duration::from_secs(20)).await,
        "delivery through the new master after SENTINEL FAILOVER"
    );
    let resumed = start.elapsed();
    wait_both_ready(&n1, &n2).await;
    watcher.abort();
    println!(
        "SENTINEL FAILOVER: delivery resumed {resumed:?} after the command (readyz red seen: {})",
        red.load(Ordering::Relaxed)
    );
    assert!(resumed < Duration::from_secs(10), "{resumed:?}");
    setup.wait_settled().await;

    // 2. SIGKILL of the (new) master.
    let master = setup.master_port().await;
    let (red, watcher) = watch_red(&n1);
    let killed = Instant::now();
    setup
        .servers
        .iter_mut()
        .find(|s| s.port == master)
        .unwrap()
        .kill();
    assert!(
        delivery_through_master(&setup, &mut a, &mut b, Duration::from_secs(30)).await,
        "delivery through the new master after the old one was killed"
    );
    let resumed = killed.elapsed();
    wait_both_ready(&n1, &n2).await;
    watcher.abort();
    assert!(
        red.load(Ordering::Relaxed),
        "/readyz is red while there is no master"
    );
    assert_ne!(setup.master_port().await, master);
    println!("SIGKILL of the master: delivery resumed {resumed:?} after the kill");
    assert!(resumed < Duration::from_secs(15), "{resumed:?}");
    assert!(
        n2.metric("gateway_redis_reconnects_total{connection=\"subscriber\"}")
            .await
            >= 2.0
    );
    n1.stop().await;
    n2.stop().await;
}
