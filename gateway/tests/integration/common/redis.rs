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
    /// Spawns the server and waits until its port accepts TCP connections; `None` when the
    /// server exited instead (its port was taken meanwhile: [`free_port`] only finds a free one).
    async fn try_start(port: u16, args: Vec<String>) -> Option<Self> {
        let mut l = Self {
            port,
            args,
            child: None,
        };
        l.spawn().await.then_some(l)
    }

    /// Like [`Launched::try_start`] on a port the caller chose: a server that exits is an error.
    async fn start(port: u16, args: Vec<String>) -> Self {
        Self::try_start(port, args)
            .await
            .unwrap_or_else(|| panic!("redis-server exited at start (is port {port} taken?)"))
    }

    /// Starts the child; true once its port accepts connections, false if it exited first.
    async fn spawn(&mut self) -> bool {
        let mut child = Command::new(redis_server_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (scripts/test.sh installs it) or REDIS_SERVER set",
            );
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nothing listens on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
    /// Starts a server on a free port (another, if that one is taken before the server binds it)
    /// and waits until it answers.
    pub async fn start() -> Self {
        for _ in 0..5 {
            let port = free_port();
            if let Some(server) = Launched::try_start(port, redis_args(port, &[])).await {
                let s = Self { port, server };
                s.wait_answer().await;
                return s;
            }
        }
        panic!("redis-server exited at start on five free ports");
    }

    /// Waits until the server answers, and checks that it is this child and not another
    /// process that took the port.
    async fn wait_answer(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = self.connection().await {
                if let Ok(info) = redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut c)
                    .await
                {
                    let pid = format!("process_id:{}", self.server.pid());
                    assert!(
                        info.lines().any(|l| l.trim() == pid),
                        "port {} answers, but not from our redis-server",
                        self.port
                    );
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
        assert!(
            self.server.spawn().await,
            "redis-server exited at restart (is port {} taken?)",
            self.port
        );
        self.wait_answer().await;
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
