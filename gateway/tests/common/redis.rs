//! Redis for tests: ONE launcher ([`Launched`]) starts every `redis-server` child on loopback,
//! whatever its topology: a plain single server ([`RedisServer`], ready when it answers PING) or
//! a server with arbitrary arguments for TLS, Sentinel and Cluster set-ups ([`RedisProcess`],
//! ready when its port accepts connections, since a TLS port cannot answer a plain PING). Both
//! are killed on drop. Also the raw one-command client [`redis_at`].
//!
//! Not here: gateway nodes (`node`), and how a Sentinel or Cluster topology is wired together
//! (the tests that need one build their arguments with [`redis_args`]).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{free_port, WAIT};

fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

/// One `redis-server` child process started from `args`, listening on `port`. Restartable with
/// the same arguments (same port, so nodes reconnect to the same address).
struct Launched {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Launched {
    /// Spawns the server and waits until its port accepts TCP connections.
    async fn start(port: u16, args: Vec<String>) -> Self {
        let mut l = Self {
            port,
            args,
            child: None,
        };
        l.spawn().await;
        l
    }

    async fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (scripts/test.sh installs it) or REDIS_SERVER set",
            );
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// SIGKILL, reaped.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        // A test may have stopped the server (SIGSTOP); let it run so that it dies and is reaped.
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A real single `redis-server` on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    server: Launched,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub async fn start() -> Self {
        let port = free_port();
        let s = Self {
            port,
            server: Launched::start(port, redis_args(port, &[])).await,
        };
        s.wait_ping().await;
        s
    }

    async fn wait_ping(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = self.connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A fresh command connection.
    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    /// `PUBLISH channel payload` from an outside program's point of view; returns receivers.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        let mut c = self.connection().await.unwrap();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Number of subscribers of `channel` (one per subscribed node).
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut c = self.connection().await.unwrap();
        let v: Vec<redis::Value> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut c)
            .await
            .unwrap();
        match v.get(1) {
            Some(redis::Value::Int(n)) => *n,
            other => panic!("unexpected NUMSUB answer {other:?}"),
        }
    }

    /// Waits until `channel` has `n` subscribers.
    pub async fn wait_numsub(&self, channel: &str, n: i64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.numsub(channel).await;
            if got == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{channel} has {got} subscribers, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.server.kill();
        self.server.spawn().await;
        self.wait_ping().await;
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.server.pid();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// A `redis-server` child started with arbitrary arguments (TLS, `--sentinel`, cluster mode),
/// listening on `port`; killed on drop.
pub struct RedisProcess {
    pub port: u16,
    server: Launched,
}

impl RedisProcess {
    /// Starts `redis-server ARGS…` and waits until `port` accepts TCP connections.
    pub async fn start(port: u16, args: Vec<String>) -> Self {
        Self {
            port,
            server: Launched::start(port, args).await,
        }
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.server.child.is_some()
    }
}

/// Waits until `127.0.0.1:port` accepts TCP connections.
pub async fn wait_port(port: u16) {
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The common arguments of a throw-away loopback redis-server on `port`.
pub fn redis_args(port: u16, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Runs one command on `127.0.0.1:port` (plain TCP) and returns the answer.
pub async fn redis_at(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut c = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut c))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "command timed out")))?
}
