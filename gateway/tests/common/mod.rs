//! Test harness: a real `redis-server` on a free loopback port, gateway nodes on `127.0.0.1:0`
//! running the library's own `gateway::run`, a WebSocket client and a tiny HTTP client.
//!
//! Everything here talks to real processes and sockets; nothing is mocked.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use gateway::{Config, Listeners};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

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

/// A real `redis-server` child process on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

fn redis_server_binary() -> String {
    std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub async fn start() -> Self {
        let mut s = Self {
            port: free_port(),
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server must be installed (scripts/test.sh installs it) or REDIS_SERVER set",
            );
        self.child = Some(child);
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Sends `signal` (e.g. "STOP", "CONT") to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

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

/// Finds `series` in Prometheus text: matches a line starting with the metric name whose labels
/// include every `k="v"` of `series`' labels. Sums matching lines.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, want): (&str, Vec<&str>) = match series.split_once('{') {
        Some((n, rest)) => (
            n,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    };
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (line_name, labels) = match head.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (head, ""),
        };
        if line_name != name {
            continue;
        }
        if want.iter().all(|w| labels.split(',').any(|l| l == *w)) {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// A WebSocket client (tokio-tungstenite, an independent implementation).
pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a client's connection ended.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// A Close frame with this code.
    Closed(u16),
    /// The connection ended without a Close frame.
    Dropped,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("upgrade accepted");
        Self { ws }
    }

    /// Tries to connect; returns the HTTP status of a refusal.
    pub async fn connect_status(url: &str) -> Result<Self, u16> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Self { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error {e}"),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(WsMessage::text(text)).await.unwrap();
    }

    pub async fn publish(&mut self, data: Value) {
        self.send_text(&serde_json::json!({"type":"publish","data":data}).to_string())
            .await;
    }

    /// The next JSON text frame within [`WAIT`].
    pub async fn next_json(&mut self) -> Value {
        self.next_json_within(WAIT).await.expect("a frame in time")
    }

    /// The next JSON text frame within `limit`, or `None`.
    pub async fn next_json_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("server sends JSON"))
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next event of `kind`, skipping others (presence, etc.).
    pub async fn next_of(&mut self, kind: &str) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self
                .next_json_within(left)
                .await
                .unwrap_or_else(|| panic!("no {kind} event in time"));
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// The next `message` event.
    pub async fn next_message(&mut self) -> Value {
        self.next_of("message").await
    }

    /// Asserts no `message` event arrives within `limit`.
    pub async fn expect_no_message(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_json_within(left).await {
                None => return,
                Some(v) if v["type"] == "message" => panic!("unexpected message {v}"),
                Some(_) => continue,
            }
        }
    }

    /// Reads until the connection ends; returns how.
    pub async fn ended(&mut self, limit: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("connection still open after {limit:?}"),
                Ok(Some(Ok(WsMessage::Close(frame)))) => {
                    return Ended::Closed(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return Ended::Dropped,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await??;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(buf.len());
    Ok((status, buf[split..].to_vec()))
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

/// A hand-rolled WebSocket client that can send frames no well-behaved library would.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Connects and completes the upgrade handshake on `path`.
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        Self::connect_with(addr, path, &[])
            .await
            .unwrap_or_else(|s| panic!("upgrade refused with {s}"))
    }

    /// Connects with extra request headers; `Err(status)` when the upgrade is refused.
    pub async fn connect_with(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, u16> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed during handshake");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0));
        }
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        Ok(Self {
            stream,
            buf: buf[end..].to_vec(),
        })
    }

    /// A client frame (masked unless `masked` is false).
    pub fn frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![(fin as u8) << 7 | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(mask_bit | n as u8),
            n if n < 65536 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            f.extend_from_slice(&key);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads one server frame: (opcode, payload); `None` when the connection ended.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let op = self.buf[0] & 0x0f;
                let (len, hdr) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= hdr + len {
                    let payload = self.buf[hdr..hdr + len].to_vec();
                    self.buf.drain(..hdr + len);
                    return Some((op, payload));
                }
            }
            let mut chunk = [0u8; 65536];
            match tokio::time::timeout(WAIT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no frame in time"),
            }
        }
    }

    /// Reads frames until a Close; returns its code (`None` if the connection ended without one).
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((op, payload)) = self.read_frame().await {
            if op == 0x8 {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }

    /// The next text frame as JSON.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let (op, payload) = self.read_frame().await.expect("connection open");
            if op == 0x1 {
                return serde_json::from_slice(&payload).unwrap();
            }
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

/// What a [`Resumer`] saw over its life.
#[derive(Debug, Default, Clone)]
pub struct Resumed {
    /// Offsets of every message received, in arrival order (duplicates and gaps show here).
    pub offsets: Vec<u64>,
    /// The epoch of the first welcome.
    pub epoch: Option<String>,
    /// The offset of the first welcome.
    pub start: u64,
    /// Welcomes after a `since` that said `recovered: false`.
    pub not_recovered: usize,
    /// Connections after the first.
    pub reconnects: usize,
    /// Close codes received.
    pub closes: Vec<u16>,
}

impl Resumed {
    /// Asserts the offsets are exactly `first..=last`, once each, in order.
    pub fn assert_exactly_once(&self, first: u64, last: u64, who: &str) {
        assert_eq!(self.not_recovered, 0, "{who}: a resume was not recovered");
        if self.offsets != (first..=last).collect::<Vec<_>>() {
            let mut dups = 0;
            let mut gaps = 0;
            let mut reordered = 0;
            for w in self.offsets.windows(2) {
                match w[1].cmp(&(w[0] + 1)) {
                    std::cmp::Ordering::Equal => {}
                    std::cmp::Ordering::Greater => gaps += w[1] - w[0] - 1,
                    std::cmp::Ordering::Less if w[1] == w[0] => dups += 1,
                    std::cmp::Ordering::Less => reordered += 1,
                }
            }
            panic!(
                "{who}: expected offsets {first}..={last} once each; got {} offsets ({gaps} lost, \
                 {dups} duplicated, {reordered} reordered; first {:?}, last {:?})",
                self.offsets.len(),
                self.offsets.first(),
                self.offsets.last()
            );
        }
    }
}

/// A viewer that keeps its room position and, whenever its connection ends (or after every
/// `drop_every` messages, on purpose), reconnects to a random node of `nodes` with `since`, until
/// it has the offset `until` announces.
pub struct Resumer {
    /// Client addresses of the nodes to (re)connect to; the test edits it as nodes come and go.
    pub nodes: std::sync::Arc<std::sync::RwLock<Vec<SocketAddr>>>,
    pub room: String,
    /// Drop the connection after every N messages (0: never).
    pub drop_every: usize,
    /// The last offset the test published; the resumer stops once it has it.
    pub until: tokio::sync::watch::Receiver<Option<u64>>,
    /// Sent once, after the first welcome.
    pub joined: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Resumer {
    /// Runs until the resumer has the last offset, or `limit` passes (then returns what it got).
    pub async fn run(mut self, limit: Duration) -> Resumed {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Resumed::default();
        let mut first = true;
        loop {
            let addr = {
                let nodes = self.nodes.read().unwrap();
                nodes[fastrand::usize(..nodes.len())]
            };
            let mut url = format!("ws://{addr}/ws/{}?role=viewer", self.room);
            // The test warms its room up (one message) so that the first welcome has an epoch.
            let resuming = got.epoch.as_deref().is_some_and(|e| !e.is_empty());
            if resuming {
                let last = got.offsets.last().copied().unwrap_or(got.start);
                url.push_str(&format!("&since={}:{last}", got.epoch.as_deref().unwrap()));
            }
            if !first {
                got.reconnects += 1;
            }
            first = false;
            let conn = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_tungstenite::connect_async(&url),
            )
            .await;
            let mut ws = match conn {
                Ok(Ok((ws, _))) => ws,
                _ => {
                    if tokio::time::Instant::now() > deadline {
                        return got;
                    }
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(..100))).await;
                    continue;
                }
            };
            let mut since_drop = 0;
            loop {
                let until = *self.until.borrow();
                if let Some(last) = until {
                    if got.offsets.last().copied().unwrap_or(0) >= last {
                        let _ = ws.close(None).await;
                        return got;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    return got;
                }
                let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    Err(_) => continue,
                    Ok(f) => f,
                };
                match frame {
                    Some(Ok(WsMessage::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        match v["type"].as_str() {
                            Some("welcome") => {
                                if got.epoch.is_none() {
                                    got.start = v["offset"].as_u64().unwrap_or(0);
                                    got.epoch = v["epoch"].as_str().map(str::to_string);
                                    if got.epoch.is_none() {
                                        // The room has no sequence yet: resume from its start.
                                        got.epoch = Some(String::new());
                                    }
                                }
                                if resuming && v["recovered"] != true {
                                    got.not_recovered += 1;
                                }
                                if let Some(tx) = self.joined.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Some("message") => {
                                if let Some(o) = v["offset"].as_u64() {
                                    if got.epoch.as_deref() == Some("") {
                                        got.epoch = v["epoch"].as_str().map(str::to_string);
                                    }
                                    got.offsets.push(o);
                                    since_drop += 1;
                                    if self.drop_every > 0 && since_drop >= self.drop_every {
                                        break;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(WsMessage::Close(f))) => {
                        got.closes
                            .push(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
    }
}

/// `GET /api/rooms/{room}/messages?{query}`; returns status and parsed JSON body.
pub async fn http_history(
    addr: SocketAddr,
    room: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/rooms/{room}/messages?{query}"),
        headers,
        b"",
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

// ---- Redis topologies (TLS, Sentinel, Cluster): processes with arbitrary arguments ----

/// A `redis-server` child started with arbitrary arguments (TLS, `--sentinel`, cluster mode),
/// listening on `port`; killed on drop.
pub struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
    args: Vec<String>,
}

impl RedisProcess {
    /// Starts `redis-server ARGS…` and waits until `port` accepts TCP connections.
    pub async fn start(port: u16, args: Vec<String>) -> Self {
        let mut p = Self {
            port,
            child: None,
            args,
        };
        p.spawn().await;
        p
    }

    async fn spawn(&mut self) {
        let child = Command::new(redis_server_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        wait_port(self.port).await;
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
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

/// A test configuration pointing at an arbitrary Redis URL (`rediss://`, `redis+sentinel://`,
/// `redis+cluster://`).
pub fn test_config_url(node_id: &str, url: &str, extra: &[&str]) -> Config {
    let mut flags = vec!["--redis-url", url];
    flags.extend_from_slice(extra);
    test_config(node_id, None, &flags)
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

/// GET /readyz's status (0 when the admin port does not answer).
pub async fn readyz_status(node: &TestNode) -> u16 {
    http(node.admin, "GET", "/readyz", &[], b"")
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
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

/// Publishes from `from` until `to` receives one, within `limit`; returns the time it took.
/// Messages carry `{"probe": n, "token": T}` with a token of this call; other frames are skipped.
pub async fn delivery_resumes(
    from: &mut WsClient,
    to: &mut WsClient,
    limit: Duration,
) -> Option<Duration> {
    // A token of this call only: probes of an earlier call still on their way do not count.
    let token = format!("{}", fastrand_u32());
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < limit {
        i += 1;
        from.publish(serde_json::json!({ "probe": i, "token": token }))
            .await;
        let until = Instant::now() + Duration::from_millis(100);
        while let Some(m) = to
            .next_json_within(until.saturating_duration_since(Instant::now()))
            .await
        {
            if m["type"] == "message" && m["data"]["token"] == token.as_str() {
                return Some(start.elapsed());
            }
        }
    }
    None
}
