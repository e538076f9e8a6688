//! What room history costs in Redis (docs/benchmarks.md, "Continuity"): publishes per second one
//! Redis sustains through the gateway's `publish.lua` with history on and off (and a plain
//! `PUBLISH` for reference), and Redis memory per room for the default history bounds.
//!
//! Talks to a Redis the caller started (`redis-server --port 6390 --save '' --appendonly no`);
//! it flushes that Redis. Loopback only.
//!
//! ```sh
//! cargo build --release -p gateway --examples
//! ./target/release/examples/history_bench --redis redis://127.0.0.1:6390/ rate --seconds 5
//! ./target/release/examples/history_bench --redis redis://127.0.0.1:6390/ memory --rooms 1000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

const SCRIPT: &str = include_str!("../src/broker/publish.lua");
const PREFIX: &str = "gw:room:";

#[derive(Parser)]
struct Args {
    /// The Redis to use (it is flushed).
    #[arg(long)]
    redis: String,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Publishes per second: plain PUBLISH, the script with history off, the script with history.
    Rate {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Concurrent publishers (pipelined on one multiplexed connection).
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Rooms the publishes are spread over.
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        /// Bytes of `data` per message.
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Redis memory per room with a full history of the default bounds.
    Memory {
        #[arg(long, default_value_t = 1000)]
        rooms: usize,
        #[arg(long, default_value_t = 300)]
        history: usize,
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
}

/// The frame prefix a node would send for a message of `size` data bytes in `room`.
fn prefix(room: &str, size: usize, n: u64) -> String {
    format!(
        r#"{{"type":"message","room":"{room}","from":"bench","role":"host","data":"{}","id":"bench-{n:x}","ts":1795713448167795"#,
        "x".repeat(size.saturating_sub(2))
    )
}

fn publish_cmd(sha: &str, room: &str, size: usize, history: usize, n: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha)
        .arg(2)
        .arg(format!("{PREFIX}{{{room}}}:meta"))
        .arg(format!("{PREFIX}{{{room}}}:hist"))
        .arg(prefix(room, size, n))
        .arg(history)
        .arg(600_000)
        .arg(300_000)
        .arg("PUBLISH")
        .arg(format!("{PREFIX}{room}"))
        .arg(86_400_000)
        .arg(format!("bench-{n:x}"));
    cmd
}

async fn used_memory(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let client = redis::Client::open(args.redis.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable");
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(SCRIPT)
        .query_async(&mut conn)
        .await
        .unwrap();
    match args.what {
        What::Rate {
            seconds,
            concurrency,
            rooms,
            size,
        } => {
            for mode in ["plain", "script-history-off", "script-history-300"] {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                let done = Arc::new(AtomicU64::new(0));
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let mut set = tokio::task::JoinSet::new();
                for w in 0..concurrency {
                    let mut c = conn.clone();
                    let done = done.clone();
                    let sha = sha.clone();
                    set.spawn(async move {
                        let mut n = w as u64;
                        while Instant::now() < deadline {
                            let room = format!("r{}", n as usize % rooms);
                            let cmd = match mode {
                                "plain" => {
                                    let mut cmd = redis::cmd("PUBLISH");
                                    cmd.arg(format!("{PREFIX}{room}"))
                                        .arg(prefix(&room, size, n) + "}");
                                    cmd
                                }
                                "script-history-off" => publish_cmd(&sha, &room, size, 0, n),
                                _ => publish_cmd(&sha, &room, size, 300, n),
                            };
                            let _: redis::Value = cmd.query_async(&mut c).await.unwrap();
                            done.fetch_add(1, Ordering::Relaxed);
                            n += concurrency as u64;
                        }
                    });
                }
                while set.join_next().await.is_some() {}
                let total = done.load(Ordering::Relaxed);
                println!(
                    "{{\"bench\":\"publish_rate\",\"mode\":\"{mode}\",\"publishes\":{total},\"per_second\":{:.0},\"concurrency\":{concurrency},\"rooms\":{rooms},\"data_bytes\":{size}}}",
                    total as f64 / seconds as f64
                );
            }
        }
        What::Memory {
            rooms,
            history,
            size,
        } => {
            let before = used_memory(&mut conn).await;
            for r in 0..rooms {
                let room = format!("room-{r}");
                let mut pipe = redis::pipe();
                for n in 0..history as u64 {
                    pipe.add_command(publish_cmd(&sha, &room, size, history, n))
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await.unwrap();
            }
            let after = used_memory(&mut conn).await;
            let hist: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{PREFIX}{{room-0}}:hist"))
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await
                .unwrap();
            let meta: u64 = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("{PREFIX}{{room-0}}:meta"))
                .query_async(&mut conn)
                .await
                .unwrap();
            let frame = prefix("room-0", size, 0).len() + 40;
            println!(
                "{{\"bench\":\"history_memory\",\"rooms\":{rooms},\"history\":{history},\"data_bytes\":{size},\"frame_bytes\":{frame},\"used_memory_per_room\":{},\"hist_key_bytes\":{hist},\"meta_key_bytes\":{meta}}}",
                (after.saturating_sub(before)) / rooms as u64
            );
        }
    }
}
