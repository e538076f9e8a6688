//! Redis topologies built from [`super::redis`]'s one launcher: a Redis Cluster
//! ([`ClusterTopology`]: 3 masters + 3 replicas, `cluster-node-timeout` 1000 ms) and a
//! Sentinel set-up ([`SentinelTopology`]: a master, a replica, three sentinels with
//! `down-after-milliseconds` 1000). Every process on loopback, killed on drop.
//!
//! Not here: gateway nodes (`node`).

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::Value;

use super::redis::{redis_args, redis_at, RedisProcess};
use super::{free_port, scratch_dir};

/// A Redis value as text (bulk, simple or verbatim string).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => s.clone(),
        other => format!("{other:?}"),
    }
}

/// The cluster slot of a room (its channel's hash tag).
pub fn room_slot(room: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(room.as_bytes()) % 16384
}

/// `per_shard` room names for each third of the slots (`--cluster create` splits them in
/// thirds), sorted.
pub fn rooms_per_shard(per_shard: usize) -> Vec<String> {
    let mut per_third: HashMap<u16, Vec<String>> = HashMap::new();
    for i in 0.. {
        let r = format!("room-{i}");
        let v = per_third.entry(room_slot(&r) / 5462).or_default();
        if v.len() < per_shard {
            v.push(r);
        }
        if per_third.values().map(Vec::len).sum::<usize>() == 3 * per_shard {
            break;
        }
    }
    let mut rooms: Vec<String> = per_third.into_values().flatten().collect();
    rooms.sort();
    rooms
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = fastrand::u16(20000..40000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            return p;
        }
    }
}

/// A real 6-process Redis Cluster (3 masters, 3 replicas).
pub struct ClusterTopology {
    pub nodes: Vec<RedisProcess>,
    dir: std::path::PathBuf,
}

impl ClusterTopology {
    /// With `cluster-require-full-coverage no`: the healthy shards keep serving while one shard
    /// has no master (what docs/operations.md recommends).
    pub async fn start() -> Self {
        Self::launch(false).await
    }

    /// With Redis's default `cluster-require-full-coverage yes`: while one shard has no master,
    /// every shard answers CLUSTERDOWN (the harsher case `redis_cluster.rs` recovers from).
    pub async fn start_requiring_full_coverage() -> Self {
        Self::launch(true).await
    }

    async fn launch(full_coverage: bool) -> Self {
        let dir = scratch_dir("cluster");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = cluster_port();
            let conf = format!("nodes-{port}.conf");
            let args = redis_args(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-require-full-coverage",
                    if full_coverage { "yes" } else { "no" },
                    "--repl-diskless-sync-delay",
                    "0",
                    "--dir",
                    dir.to_str().unwrap(),
                ],
            );
            nodes.push(RedisProcess::start(port, args).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (scripts/test.sh installs redis-tools)");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let c = Self { nodes, dir };
        c.wait_ok().await;
        c
    }

    /// Until every running node says `cluster_state:ok` and every replica is in sync.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        'outer: loop {
            assert!(Instant::now() < deadline, "cluster never became ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
            for n in self.nodes.iter().filter(|n| n.running()) {
                match redis_at(n.port, &["CLUSTER", "INFO"]).await {
                    Ok(v) if value_text(&v).contains("cluster_state:ok") => {}
                    _ => continue 'outer,
                }
                match redis_at(n.port, &["INFO", "replication"]).await {
                    Ok(v) if value_text(&v).contains("role:master") => {}
                    Ok(v) if value_text(&v).contains("master_link_status:up") => {}
                    _ => continue 'outer,
                }
            }
            return;
        }
    }

    /// `redis+cluster://` with two seeds.
    pub fn url(&self) -> String {
        format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// The port of the master that owns `slot`.
    pub async fn master_of(&self, slot: u16) -> u16 {
        self.master_entry(slot).await.0
    }

    /// The port and node id of the master that owns `slot`.
    pub async fn master_entry(&self, slot: u16) -> (u16, String) {
        let port = self.nodes.iter().find(|n| n.running()).unwrap().port;
        let Value::Array(entries) = redis_at(port, &["CLUSTER", "SLOTS"]).await.unwrap() else {
            panic!("CLUSTER SLOTS")
        };
        for e in entries {
            let Value::Array(f) = e else { continue };
            let (Value::Int(a), Value::Int(b), Value::Array(m)) = (&f[0], &f[1], &f[2]) else {
                continue;
            };
            if (*a as u16..=*b as u16).contains(&slot) {
                let Value::Int(port) = m[1] else { panic!() };
                return (port as u16, value_text(&m[2]));
            }
        }
        panic!("slot {slot} unowned")
    }

    /// SIGKILL of the process on `port`.
    pub fn kill_port(&mut self, port: u16) {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .kill();
    }
}

impl Drop for ClusterTopology {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The master's name in the sentinels' configuration.
pub const SENTINEL_MASTER: &str = "mymaster";

/// A master, a replica and three sentinels (quorum 2, down-after-milliseconds 1000).
pub struct SentinelTopology {
    pub servers: Vec<RedisProcess>,
    pub sentinels: Vec<RedisProcess>,
    dir: std::path::PathBuf,
}

impl SentinelTopology {
    pub async fn start() -> Self {
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
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {pm} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
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
    pub async fn wait_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        'outer: loop {
            assert!(Instant::now() < deadline, "sentinels never settled");
            tokio::time::sleep(Duration::from_millis(100)).await;
            for s in &self.servers {
                match redis_at(s.port, &["INFO", "replication"]).await {
                    Ok(v) if value_text(&v).contains("role:master") => {}
                    Ok(v) if value_text(&v).contains("master_link_status:up") => {}
                    _ => continue 'outer,
                }
            }
            for s in &self.sentinels {
                let replicas = redis_at(s.port, &["SENTINEL", "REPLICAS", SENTINEL_MASTER]).await;
                let peers = redis_at(s.port, &["SENTINEL", "SENTINELS", SENTINEL_MASTER]).await;
                match (replicas, peers) {
                    (Ok(Value::Array(r)), Ok(Value::Array(p))) if !r.is_empty() && p.len() == 2 => {
                    }
                    _ => continue 'outer,
                }
            }
            return;
        }
    }

    /// `redis+sentinel://…/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", hosts.join(","))
    }

    /// The port of the master the first sentinel names.
    pub async fn master_port(&self) -> u16 {
        let v = redis_at(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER],
        )
        .await
        .unwrap();
        let Value::Array(a) = v else { panic!("{v:?}") };
        value_text(&a[1]).parse().unwrap()
    }

    /// SIGKILL of the server on `port`.
    pub fn kill_server(&mut self, port: u16) {
        self.servers
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap()
            .kill();
    }
}

impl Drop for SentinelTopology {
    fn drop(&mut self) {
        for p in self.servers.iter_mut().chain(self.sentinels.iter_mut()) {
            p.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
