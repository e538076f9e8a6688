//! Broker throughput: one Redis against a 3-master Redis Cluster (sharded pub/sub), with the same
//! three gateway nodes and many rooms. See `docs/benchmarks.md` for the command and the figures.
//!
//! It starts the Redis processes (one `redis-server`, or three cluster-mode `redis-server`s joined
//! with `redis-cli --cluster create`), three `target/release/gateway` nodes, and for each of R rooms
//! one host on node `r % 3` and one viewer on node `r % 3 + 1`, so every message crosses the broker.
//! The hosts publish in an open loop at each aggregate rate of `--rates` in turn (round robin over
//! the rooms, each message carrying its send time); every viewer records receive − send time. One
//! JSON line per rate: sent, received, p50 / p99 latency. The broker layer "sustains" a rate while
//! nothing is lost and p99 stays near its low-rate value.
//!
//! Minimal hand-written WebSocket clients, loopback only.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Topology {
    Single,
    Cluster,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "single")]
    topology: Topology,
    #[arg(long, default_value = "target/release/gateway")]
    gateway: String,
    #[arg(long, default_value_t = 300)]
    rooms: usize,
    /// Aggregate publish rates (messages per second), in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,4000,8000,16000"
    )]
    rates: Vec<u64>,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn free_port(bus: bool) -> u16 {
    loop {
        let p = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !bus || (p < 55000 && std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()) {
            return p;
        }
    }
}

/// Child processes, killed on drop.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn redis(port: u16, extra: &[&str], dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server")
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("port {port} never opened");
}

/// Starts the Redis side and returns the gateway's `--redis-url`.
async fn start_redis(t: Topology, procs: &mut Procs, dir: &std::path::Path) -> String {
    match t {
        Topology::Single => {
            let p = free_port(false);
            procs.0.push(redis(p, &[], dir));
            wait_port(p).await;
            format!("redis://127.0.0.1:{p}/")
        }
        Topology::Cluster => {
            let mut addrs = Vec::new();
            for _ in 0..3 {
                let p = free_port(true);
                let conf = format!("nodes-{p}.conf");
                procs.0.push(redis(
                    p,
                    &["--cluster-enabled", "yes", "--cluster-config-file", &conf],
                    dir,
                ));
                wait_port(p).await;
                addrs.push(format!("127.0.0.1:{p}"));
            }
            let ok = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&addrs)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .stdout(Stdio::null())
                .status()
                .expect("redis-cli")
                .success();
            assert!(ok, "cluster create");
            tokio::time::sleep(Duration::from_secs(2)).await;
            format!("redis+cluster://{}", addrs.join(","))
        }
    }
}

async fn start_gateway(bin: &str, id: &str, url: &str, procs: &mut Procs) -> SocketAddr {
    let client: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    let admin = free_port(false);
    procs.0.push(
        Command::new(bin)
            .args(["--listen", &client.to_string()])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args([
                "--node-id",
                id,
                "--redis-url",
                url,
                "--max-publish-rate",
                "0",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("gateway binary (cargo build --release -p gateway)"),
    );
    for _ in 0..400 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", admin)).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.contains("\"ready\":true") {
                return client;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway {id} not ready");
}

async fn ws_connect(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed during handshake");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "upgrade refused");
    s
}

fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81, 0x80 | payload.len() as u8];
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

fn find_t(p: &[u8]) -> Option<u64> {
    let pos = p.windows(4).position(|w| w == b"\"t\":")? + 4;
    let d: Vec<u8> = p[pos..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&d).ok()?.parse().ok()
}

/// Reads server frames; when `lat` is set, records the latency of frames carrying `"t":`.
async fn reader(mut s: tokio::net::tcp::OwnedReadHalf, lat: Option<Arc<Mutex<Vec<u32>>>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut have = 0;
    loop {
        let n = match s.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have += n;
        let now = now_us();
        let mut off = 0;
        while have - off >= 2 {
            let (len, hdr) = match (buf[off + 1] & 0x7f) as usize {
                126 if have - off >= 4 => {
                    (u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize, 4)
                }
                126 => break,
                127 => panic!("frame too large"),
                n => (n, 2),
            };
            if have - off < hdr + len {
                break;
            }
            if let Some(lat) = &lat {
                if let Some(t) = find_t(&buf[off + hdr..off + hdr + len]) {
                    let us = now.saturating_sub(t).min(u32::MAX as u64) as u32;
                    lat.lock().unwrap().push(us);
                }
            }
            off += hdr + len;
        }
        buf.copy_within(off..have, 0);
        have -= off;
    }
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("broker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs = Procs(Vec::new());
    let url = start_redis(args.topology, &mut procs, &dir).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start_gateway(&args.gateway, &format!("b{i}"), &url, &mut procs).await);
    }
    let lat = Arc::new(Mutex::new(Vec::<u32>::new()));
    let mut hosts: Vec<OwnedWriteHalf> = Vec::new();
    for r in 0..args.rooms {
        let (hr, hw) = ws_connect(nodes[r % 3], &format!("/ws/bench-{r}?role=host&name=h"))
            .await
            .into_split();
        tokio::spawn(reader(hr, None));
        hosts.push(hw);
        let (vr, _vw) = ws_connect(
            nodes[(r + 1) % 3],
            &format!("/ws/bench-{r}?role=viewer&name=v"),
        )
        .await
        .into_split();
        tokio::spawn(reader(vr, Some(lat.clone())));
        std::mem::forget(_vw); // keep the viewer's socket open for the whole run
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // subscriptions settle
    let sent_total = AtomicU64::new(0);
    for rate in &args.rates {
        lat.lock().unwrap().clear();
        let interval = Duration::from_secs_f64(1.0 / *rate as f64);
        let start = Instant::now();
        let mut next = start;
        let mut sent = 0u64;
        let mut r = 0;
        while start.elapsed() < Duration::from_secs(args.seconds) {
            // Open loop: send every message due by now, then sleep until the next is due.
            while next <= Instant::now() {
                let payload = format!("{{\"type\":\"publish\",\"data\":{{\"t\":{}}}}}", now_us());
                let _ = hosts[r].write_all(&client_frame(payload.as_bytes())).await;
                r = (r + 1) % hosts.len();
                sent += 1;
                next += interval;
            }
            tokio::time::sleep_until(next.into()).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await; // stragglers
        sent_total.fetch_add(sent, Ordering::Relaxed);
        let mut l = std::mem::take(&mut *lat.lock().unwrap());
        l.sort_unstable();
        println!(
            "{{\"topology\":\"{:?}\",\"rooms\":{},\"rate\":{},\"sent\":{},\"received\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1}}}",
            args.topology,
            args.rooms,
            rate,
            sent,
            l.len(),
            pct(&l, 0.5),
            pct(&l, 0.99)
        );
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
