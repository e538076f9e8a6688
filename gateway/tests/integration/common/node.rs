//! Gateway nodes for tests: [`TestNode`] runs the library's own `gateway::run` in this process on
//! `127.0.0.1:0`; [`TestCluster`] is N of them on one real `redis-server` (or one on the
//! in-process broker); [`GatewayProcess`] is the real binary as a child, for what only a process
//! shows (signals, exit codes, SIGKILL). Timer flags for tests live in [`test_config`]; a node's
//! own API calls ([`http_publish`], [`readyz_status`]) sit beside it.
//!
//! Not here: the Redis launcher (`redis`), clients (`ws`, `http`), resuming viewers (`resume`).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use gateway::{Config, Listeners};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::http::{http, metric_value};
use super::redis::RedisServer;
use super::ws::WsClient;
use super::{free_port, WAIT};

/// A gateway node running `gateway::run` in this process.
pub struct TestNode {
    pub id: String,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), gateway::Error>>>,
}

/// A configuration for tests: short timers, loopback, `extra` flags appended.
pub fn test_config(node_id: &str, redis: Option<&RedisServer>, extra: &[&str]) -> Config {
    let mut args: Vec<String> = vec![
        "gateway".into(),
        "--node-id".into(),
        node_id.into(),
        "--unsubscribe-delay".into(),
        "200ms".into(),
        "--redis-timeout".into(),
        "1s".into(),
        "--redis-probe-interval".into(),
        "500ms".into(),
        "--drain-seconds".into(),
        "1".into(),
    ];
    if let Some(r) = redis {
        args.push("--redis-url".into());
        args.push(r.url());
    }
    // Outage tests look at a node that keeps its clients through the outage; the hand-over of
    // clients to other nodes (`--broker-loss-close`) has tests of its own that set it.
    if !extra.contains(&"--broker-loss-close") {
        args.extend(["--broker-loss-close".into(), "0".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Config::try_parse_from(args).expect("test flags parse")
}

impl TestNode {
    /// Starts a node and waits until `/readyz` answers 200.
    pub async fn start(config: Config) -> Self {
        let node = Self::start_unready(config).await;
        node.wait_ready().await;
        node
    }

    /// Starts a node without waiting for readiness.
    pub async fn start_unready(config: Config) -> Self {
        let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client_addr, admin_addr) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let id = config.node_id.clone();
        let task = tokio::spawn(gateway::run(
            config,
            Listeners { client, admin },
            shutdown.clone(),
        ));
        Self {
            id,
            client: client_addr,
            admin: admin_addr,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) = http(self.admin, "GET", "/readyz", &[], b"").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never became ready",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `ws://…/ws/{room}?{query}`.
    pub fn ws_url(&self, room: &str, query: &str) -> String {
        format!("ws://{}/ws/{room}?{query}", self.client)
    }

    /// Joins `room` as `role` with `name` and returns the client after its `welcome`.
    pub async fn join(&self, room: &str, role: &str, name: &str) -> WsClient {
        let mut c =
            WsClient::connect(&self.ws_url(room, &format!("role={role}&name={name}"))).await;
        let w = c.next_of("welcome").await;
        assert_eq!(w["room"], room);
        assert_eq!(w["node"], self.id.as_str());
        c
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = http(self.admin, "GET", "/metrics", &[], b"").await.unwrap();
        assert_eq!(status, 200);
        String::from_utf8(body).unwrap()
    }

    /// The value of the series `name{labels}` (labels without `node`, in exposition order), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Starts draining and waits for `run` to return.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), t)
                .await
                .expect("node stops within drain + grace")
                .unwrap()
                .unwrap();
        }
    }

    /// Cancels the node's shutdown token (drain) without waiting.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Takes the node's `run` task, to await its end.
    pub fn take_task(&mut self) -> JoinHandle<Result<(), gateway::Error>> {
        self.task.take().expect("running")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The real `gateway` binary as a child process, for what only a process shows: signals, exit,
/// and dying without a word (SIGKILL).
pub struct GatewayProcess {
    pub id: String,
    pub client: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
}

impl GatewayProcess {
    /// Starts the `gateway` binary with test timers and `extra` flags; waits for `/readyz`.
    pub async fn start(node_id: &str, redis: Option<&RedisServer>, extra: &[&str]) -> Self {
        Self::start_with_log(node_id, redis, extra, None).await
    }

    /// Like [`GatewayProcess::start`], with every log line (`RUST_LOG=debug`) written to `log`.
    pub async fn start_logged(
        node_id: &str,
        redis: Option<&RedisServer>,
        extra: &[&str],
        log: &std::path::Path,
    ) -> Self {
        Self::start_with_log(node_id, redis, extra, Some(log)).await
    }

    async fn start_with_log(
        node_id: &str,
        redis: Option<&RedisServer>,
        extra: &[&str],
        log: Option<&std::path::Path>,
    ) -> Self {
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        cmd.args([
            "--listen",
            &client.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args(["--node-id", node_id, "--unsubscribe-delay", "200ms"])
        .args(["--redis-timeout", "1s", "--redis-probe-interval", "500ms"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
        if let Some(path) = log {
            let file = std::fs::File::create(path).expect("log file");
            cmd.env("RUST_LOG", "debug")
                .stdout(file.try_clone().expect("log file"))
                .stderr(file);
        }
        if let Some(r) = redis {
            cmd.args(["--redis-url", &r.url()]);
        }
        let child = cmd.spawn().expect("gateway binary");
        let p = Self {
            id: node_id.to_string(),
            client,
            admin,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, _)) = http(p.admin, "GET", "/readyz", &[], b"").await {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "gateway process {node_id} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn ws_url(&self, room: &str, query: &str) -> String {
        format!("ws://{}/ws/{room}?{query}", self.client)
    }

    pub async fn join(&self, room: &str, role: &str, name: &str) -> WsClient {
        let url = self.ws_url(room, &format!("role={role}&name={name}"));
        let mut c = WsClient::connect(&url).await;
        assert_eq!(c.next_of("welcome").await["node"], self.id.as_str());
        c
    }

    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = http(self.admin, "GET", "/metrics", &[], b"").await.unwrap();
        metric_value(&String::from_utf8_lossy(&body), series)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM (drain).
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
    }

    /// Kills with SIGKILL: no drain, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit; returns its exit status and how long it took.
    pub async fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        let mut child = self.child.take().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                panic!("gateway did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test configuration pointing at an arbitrary Redis URL (`rediss://`, `redis+sentinel://`,
/// `redis+cluster://`).
pub fn test_config_url(node_id: &str, url: &str, extra: &[&str]) -> Config {
    let mut flags = vec!["--redis-url", url];
    flags.extend_from_slice(extra);
    test_config(node_id, None, &flags)
}

/// GET /readyz's status (0 when the admin port does not answer).
pub async fn readyz_status(node: &TestNode) -> u16 {
    http(node.admin, "GET", "/readyz", &[], b"")
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// `POST /api/rooms/{room}/messages`; returns status and parsed JSON body.
pub async fn http_publish(
    node: &TestNode,
    room: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let (status, body) = http(
        node.client,
        "POST",
        &format!("/api/rooms/{room}/messages"),
        headers,
        body,
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Several [`TestNode`]s sharing one broker: a real `redis-server` owned by the cluster, or (one
/// node) the in-process broker. Nodes are declared before the server so that they drop first.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    redis: Option<RedisServer>,
}

impl TestCluster {
    /// Starts a fresh `redis-server` and one ready node per name on it, each with `extra` flags.
    pub async fn start(names: &[&str], extra: &[&str]) -> Self {
        Self::on(RedisServer::start().await, names, extra).await
    }

    /// One ready node per name on `redis`, which the cluster then owns.
    pub async fn on(redis: RedisServer, names: &[&str], extra: &[&str]) -> Self {
        let mut nodes = Vec::with_capacity(names.len());
        for name in names {
            nodes.push(TestNode::start(test_config(name, Some(&redis), extra)).await);
        }
        Self {
            nodes,
            redis: Some(redis),
        }
    }

    /// One ready node on the in-process broker (which is per node: it cannot join others).
    pub async fn in_process(name: &str, extra: &[&str]) -> Self {
        Self {
            nodes: vec![TestNode::start(test_config(name, None, extra)).await],
            redis: None,
        }
    }

    /// The shared `redis-server`.
    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("a cluster on Redis")
    }

    /// The shared `redis-server`, to kill or restart it.
    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("a cluster on Redis")
    }
}

impl std::ops::Index<usize> for TestCluster {
    type Output = TestNode;

    fn index(&self, i: usize) -> &TestNode {
        &self.nodes[i]
    }
}
