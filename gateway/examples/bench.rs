//! Benchmarks of one gateway node, run against the release binary in its own process (never
//! timed unit tests). See `docs/benchmarks.md` for the commands and the recorded figures.
//!
//! - `idle`: RSS per idle WebSocket connection: (RSS at N − RSS at 0) / N.
//! - `fanout`: one publisher, V viewers in one room, S-byte messages at R per second: gateway
//!   deliveries per gateway CPU-second, and publish → receive latency percentiles (client send
//!   time in the payload against the same clock on the receiving side).
//! - `handshakes`: WebSocket handshakes per second and gateway CPU per handshake, with
//!   `--auth none` or `--auth jwt` (HS256 or RS256 tokens minted up front, one per connection, in
//!   the `token` query parameter as a browser sends it).
//!
//! The clients are minimal hand-written WebSocket clients (no per-message JSON parsing) so that
//! the load generator costs as little CPU as possible on a 2-core machine. Loopback only.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
struct Args {
    /// Path of the gateway binary (build it with `cargo build --release -p gateway`).
    #[arg(long, default_value = "target/release/gateway")]
    gateway: String,
    /// An extra flag for the gateway (repeat for several), e.g. `--gateway-arg=--history-size=0`.
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    gateway_args: Vec<String>,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// RSS per idle connection.
    Idle {
        #[arg(long, default_value_t = 15000)]
        connections: usize,
    },
    /// Fan-out efficiency and latency.
    Fanout {
        #[arg(long, default_value_t = 5000)]
        viewers: usize,
        /// Messages per second from the one publisher.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
    /// Handshakes per second, with and without token verification.
    Handshakes {
        /// `none`, `hs256` or `rs256`.
        #[arg(long, default_value = "none")]
        auth: String,
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

/// HMAC secret of the handshake benchmark (loopback only).
const BENCH_SECRET: &str = "bench-secret-0123456789abcdef";

/// One token per connection, minted before the clock starts (`None` for `--auth none`).
fn bench_tokens(auth: &str, n: usize) -> Vec<Option<String>> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let key = match auth {
        "none" => return vec![None; n],
        "hs256" => (
            Algorithm::HS256,
            EncodingKey::from_secret(BENCH_SECRET.as_bytes()),
        ),
        "rs256" => {
            let pem = std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/auth/rsa1.key"
            ))
            .unwrap();
            (Algorithm::RS256, EncodingKey::from_rsa_pem(&pem).unwrap())
        }
        other => panic!("--auth must be none, hs256 or rs256, not {other}"),
    };
    let exp = now_us() / 1_000_000 + 3600;
    (0..n)
        .map(|i| {
            let claims = serde_json::json!({
                "sub": format!("user-{i}"), "name": format!("User {i}"), "exp": exp,
                "rooms": [{"room": "hs-*", "role": "viewer"}, {"room": "stage", "role": "host"}],
            });
            Some(encode(&Header::new(key.0), &claims, &key.1).unwrap())
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Gateway {
    child: Child,
    client: SocketAddr,
    admin: SocketAddr,
}

impl Gateway {
    async fn start(bin: &str, extra: &[&str]) -> Self {
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(bin)
            .args([
                "--listen",
                &client.to_string(),
                "--admin-listen",
                &admin.to_string(),
                "--node-id",
                "bench",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("gateway binary (cargo build --release -p gateway)");
        let g = Self {
            child,
            client,
            admin,
        };
        for _ in 0..200 {
            if g.get("/readyz")
                .await
                .map(|b| b.contains("\"ready\":true"))
                .unwrap_or(false)
            {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("gateway not ready");
    }

    async fn get(&self, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(self.admin).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.unwrap_or_default();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter(|l| l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum()
    }

    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// User + system CPU seconds of the gateway process.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SIGTERM first (a profiler wrapping the gateway writes its report on exit).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens a WebSocket from source address 127.0.0.`src` and completes the handshake.
async fn ws_connect(addr: SocketAddr, path: &str, src: u8) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(format!("127.0.0.{src}:0").parse().unwrap())?;
    let mut s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&head).to_string(),
        ));
    }
    Ok(s)
}

/// A masked client text frame.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let key = [1u8, 2, 3, 4];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Finds `"t":NUMBER` in a frame and returns the number.
fn find_t(payload: &[u8]) -> Option<u64> {
    let pos = payload.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits: Vec<u8> = payload[pos..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Reads server frames forever, answering nothing; records latency of frames carrying `"t":`.
async fn viewer(mut s: TcpStream, lat: Arc<std::sync::Mutex<Vec<u32>>>, received: Arc<AtomicU64>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0usize;
    let mut local = Vec::with_capacity(1024);
    loop {
        let n = match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        have += n;
        let now = now_us();
        let mut off = 0;
        while have - off >= 2 {
            let len = (buf[off + 1] & 0x7f) as usize;
            let (len, hdr) = match len {
                126 if have - off >= 4 => {
                    (u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize, 4)
                }
                126 => break,
                127 => panic!("frame too large for the bench"),
                n => (n, 2),
            };
            if have - off < hdr + len {
                break;
            }
            let payload = &buf[off + hdr..off + hdr + len];
            if let Some(t) = find_t(payload) {
                local.push(now.saturating_sub(t).min(u32::MAX as u64) as u32);
                received.fetch_add(1, Ordering::Relaxed);
            }
            off += hdr + len;
        }
        buf.copy_within(off..have, 0);
        have -= off;
        if local.len() >= 16 {
            lat.lock().unwrap().append(&mut local);
        }
    }
    lat.lock().unwrap().append(&mut local);
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match args.what {
        What::Idle { connections } => {
            let extra: Vec<&str> = args.gateway_args.iter().map(String::as_str).collect();
            let g = Gateway::start(&args.gateway, &extra).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let base = g.rss_bytes();
            let start = Instant::now();
            let mut sockets = Vec::with_capacity(connections);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..connections {
                let addr = g.client;
                set.spawn(async move {
                    ws_connect(
                        addr,
                        &format!("/ws/idle-{}", i % 100),
                        1 + (i / 20000) as u8,
                    )
                    .await
                });
                if set.len() >= 256 {
                    sockets.push(set.join_next().await.unwrap().unwrap().expect("connect"));
                }
            }
            while let Some(r) = set.join_next().await {
                sockets.push(r.unwrap().expect("connect"));
            }
            let connect_time = start.elapsed();
            while (g.metric("gateway_connections").await as usize) < connections {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            let loaded = g.rss_bytes();
            let per = (loaded.saturating_sub(base)) as f64 / connections as f64;
            println!(
                "{{\"bench\":\"idle\",\"connections\":{connections},\"rss_base_bytes\":{base},\"rss_loaded_bytes\":{loaded},\"bytes_per_connection\":{per:.0},\"connect_seconds\":{:.2}}}",
                connect_time.as_secs_f64()
            );
            drop(sockets);
        }
        What::Handshakes {
            auth,
            connections,
            concurrency,
        } => {
            let pub_key = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth/rsa1.pub");
            let flags: Vec<&str> = match auth.as_str() {
                "none" => vec![],
                "hs256" => vec![
                    "--auth",
                    "jwt",
                    "--jwt-hmac-secret",
                    BENCH_SECRET,
                    "--api-key",
                    "bench-api-key-1",
                ],
                _ => vec![
                    "--auth",
                    "jwt",
                    "--jwt-public-key",
                    pub_key,
                    "--api-key",
                    "bench-api-key-1",
                ],
            };
            let tokens = bench_tokens(&auth, connections);
            let g = Gateway::start(&args.gateway, &flags).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let cpu0 = g.cpu_seconds();
            let start = Instant::now();
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut set = tokio::task::JoinSet::new();
            for (i, token) in tokens.into_iter().enumerate() {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let addr = g.client;
                set.spawn(async move {
                    let path = match token {
                        Some(t) => format!("/ws/hs-{}?token={t}", i % 100),
                        None => format!("/ws/hs-{}", i % 100),
                    };
                    // The 101 is the end of the handshake; the socket is then dropped.
                    let r = ws_connect(addr, &path, 1 + (i % 200) as u8).await;
                    drop(permit);
                    r.map(drop)
                });
                while let Some(r) = set.try_join_next() {
                    r.unwrap().expect("handshake");
                }
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().expect("handshake");
            }
            let secs = start.elapsed().as_secs_f64();
            // The sessions' ends (the clients hung up) belong to the cost of a handshake too.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let cpu = g.cpu_seconds() - cpu0;
            println!(
                "{{\"bench\":\"handshakes\",\"auth\":\"{auth}\",\"connections\":{connections},\"concurrency\":{concurrency},\
                 \"seconds\":{secs:.2},\"handshakes_per_second\":{:.0},\"gateway_cpu_seconds\":{cpu:.2},\"gateway_cpu_us_per_handshake\":{:.0}}}",
                connections as f64 / secs,
                cpu * 1e6 / connections as f64,
            );
        }
        What::Fanout {
            viewers,
            rate,
            size,
            seconds,
        } => {
            let mut extra = vec!["--max-publish-rate", "0"];
            extra.extend(args.gateway_args.iter().map(String::as_str));
            let g = Gateway::start(&args.gateway, &extra).await;
            let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
            let received = Arc::new(AtomicU64::new(0));
            let mut set = tokio::task::JoinSet::new();
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..viewers {
                let addr = g.client;
                set.spawn(async move {
                    ws_connect(addr, "/ws/stage?role=viewer", 1 + (i / 20000) as u8).await
                });
                if set.len() >= 256 {
                    let s = set.join_next().await.unwrap().unwrap().expect("connect");
                    tasks.spawn(viewer(s, lat.clone(), received.clone()));
                }
            }
            while let Some(r) = set.join_next().await {
                tasks.spawn(viewer(
                    r.unwrap().expect("connect"),
                    lat.clone(),
                    received.clone(),
                ));
            }
            let publisher = ws_connect(g.client, "/ws/stage?role=host&name=bench", 1)
                .await
                .unwrap();
            // The publisher gets its own messages back: read and discard them.
            let (mut echo, mut publisher) = publisher.into_split();
            tokio::spawn(async move {
                let mut b = vec![0u8; 64 * 1024];
                while echo.read(&mut b).await.map(|n| n > 0).unwrap_or(false) {}
            });
            // Warm up, then measure.
            tokio::time::sleep(Duration::from_secs(2)).await;
            lat.lock().unwrap().clear();
            received.store(0, Ordering::Relaxed);
            let cpu0 = g.cpu_seconds();
            let del0 = g.metric("gateway_messages_delivered_total").await;
            let interval = Duration::from_secs_f64(1.0 / rate);
            let total = (rate * seconds as f64) as u64;
            let start = tokio::time::Instant::now();
            let mut behind = Duration::ZERO;
            for k in 0..total {
                let due = start + interval * k as u32;
                tokio::time::sleep_until(due).await;
                behind = behind.max(tokio::time::Instant::now() - due);
                let head = format!(
                    "{{\"type\":\"publish\",\"data\":{{\"t\":{},\"k\":{k},\"p\":\"",
                    now_us()
                );
                let pad = size.saturating_sub(head.len() + 4);
                let text = format!("{head}{}\"}}}}", "x".repeat(pad));
                publisher
                    .write_all(&client_frame(text.as_bytes()))
                    .await
                    .unwrap();
            }
            // Let in-flight messages land.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let cpu = g.cpu_seconds() - cpu0;
            let delivered = g.metric("gateway_messages_delivered_total").await - del0;
            let expected = total * viewers as u64;
            let got = received.load(Ordering::Relaxed);
            tasks.abort_all();
            let mut l = std::mem::take(&mut *lat.lock().unwrap());
            l.sort_unstable();
            println!(
                "{{\"bench\":\"fanout\",\"viewers\":{viewers},\"rate\":{rate},\"size\":{size},\"seconds\":{seconds},\
                 \"expected\":{expected},\"received\":{got},\"gateway_delivered\":{delivered},\"gateway_cpu_seconds\":{cpu:.2},\
                 \"deliveries_per_cpu_second\":{:.0},\"latency_ms\":{{\"p50\":{:.2},\"p90\":{:.2},\"p99\":{:.2},\"max\":{:.2}}},\
                 \"publisher_max_behind_ms\":{:.1}}}",
                delivered / cpu,
                percentile(&l, 0.5),
                percentile(&l, 0.9),
                percentile(&l, 0.99),
                percentile(&l, 1.0),
                behind.as_secs_f64() * 1000.0,
            );
        }
    }
}
