//! Redis under Sentinel against real processes this test starts on loopback: a master, a replica
//! and three sentinels (down-after-milliseconds 1000). Nodes are pointed at the sentinels
//! (`redis+sentinel://…/mymaster`), find the master, and follow a failover — a `SENTINEL FAILOVER`
//! and a SIGKILL of the master — with no restart: cross-node delivery resumes within a measured
//! bound, and `/readyz` is red while there is no master.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use redis::Value;

const MASTER: &str = "mymaster";

struct Setup {
    servers: Vec<RedisProcess>,
    sentinels: Vec<RedisProcess>,
    dir: std::path::PathBuf,
}

impl Setup {
    async fn start() -> Self {
        let dir = scratch_dir("sentinel");
        let (pm, pr) = (free_port(), free_port());
        let d = dir.to_str().unwrap().to_string();
        let master = RedisProcess::start(pm, redis_args(pm, &["--dir", &d])).await;
        let replica = RedisProcess::start(
            pr,
            redis_args(
                pr,
                &[
                    "--replicaof",
                    "127.0.0.1",
                    &pm.to_string(),
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    &d,
                ],
            ),
        )
        .await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {pm} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            sentinels.push(
                RedisProcess::start(
                    port,
                    vec![conf.to_str().unwrap().to_string(), "--sentinel".into()],
                )
                .await,
            );
        }
        let s = Self {
            servers: vec![master, replica],
            sentinels,
            dir,
        };
        s.wait_settled().await;
        s
    }

    /// Until the replica is in sync and every sentinel knows the replica and the other two.
    async fn wait_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        'outer: loop {
            assert!(Instant::now() < deadline, "sentinels never settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
            for s in &self.servers {
                match redis_at(s.port, &["INFO", "replication"]).await {
                    Ok(v) if text(&v).contains("role:master") => {}
                    Ok(v) if text(&v).contains("master_link_status:up") => {}
                    _ => continue 'outer,
                }
            }
            for s in &self.sentinels {
                let replicas = redis_at(s.port, &["SENTINEL", "REPLICAS", MASTER]).await;
                let peers = redis_at(s.port, &["SENTINEL", "SENTINELS", MASTER]).await;
                match (replicas, peers) {
                    (Ok(Value::Array(r)), Ok(Value::Array(p))) if !r.is_empty() && p.len() == 2 => {
                    }
                    _ => continue 'outer,
                }
            }
            return;
        }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{MASTER}", hosts.join(","))
    }

    async fn master_port(&self) -> u16 {
        let v = redis_at(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER],
        )
        .await
        .unwrap();
        let Value::Array(a) = v else { panic!("{v:?}") };
        text(&a[1]).parse().unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for p in self.servers.iter_mut().chain(self.sentinels.iter_mut()) {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => s.clone(),
        other => format!("{other:?}"),
    }
}

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
async fn reached_from_master(setup: &Setup, to: &mut [&mut WsClient], limit: Duration) -> bool {
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
    setup: &Setup,
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
    let mut setup = Setup::start().await;
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
    redis_at(setup.sentinels[0].port, &["SENTINEL", "FAILOVER", MASTER])
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
