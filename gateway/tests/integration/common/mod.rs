//! Test harness shared by every module of the integration tests. Everything talks to real
//! processes and sockets on loopback; nothing is mocked.
//!
//! - `redis`: one launcher for every `redis-server` topology (single, Sentinel, Cluster, TLS).
//! - `node`: gateway nodes in this process (`TestNode`, `TestCluster`) or as child processes.
//! - `ws`: WebSocket clients, a well-behaved one and a raw one.
//! - `http`: a tiny HTTP client, the history API call, Prometheus text.
//! - `auth`: the test secret and API key, signed tokens, the flags that turn JWT auth on.
//! - `resume`: viewers that reconnect with `since`, and delivery-resumption probes.
//! - `topology`: a Redis Cluster and a Sentinel set-up, built from `redis`'s launcher.
//! - `webhook`: a webhook receiver (real HTTP server) with a failure plan, the expected signature.
//!
//! Each test module imports `crate::common::*`. Imports point one way: `node` uses `redis`, `ws`
//! and `http`; `resume` uses `ws`; `topology` uses `redis`; `redis`, `ws` and `http` use only this
//! file (`WAIT`, `free_port`). One binary uses all of it: what no test uses is a warning.

mod auth;
mod http;
mod node;
mod redis;
mod resume;
mod topology;
mod webhook;
mod ws;

use std::time::{Duration, Instant};

pub use self::auth::*;
pub use self::http::*;
pub use self::node::*;
pub use self::redis::*;
pub use self::resume::*;
pub use self::topology::*;
pub use self::webhook::*;
pub use self::ws::*;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a child process).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns true or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gw-{name}-{}-{}",
        std::process::id(),
        fastrand_u32()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fastrand_u32() -> u32 {
    fastrand::u32(..)
}
