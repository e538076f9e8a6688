//! The `loadtest` binary end to end against a real gateway node on loopback (in this process,
//! memory broker): exit codes, the built-in verdicts, moving past refused targets, the gateway's
//! secret variable, and the generator's own figures in the summary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use clap::Parser;
use gateway::{Config, Listeners};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A gateway node running `gateway::run` on 127.0.0.1:0.
struct Node {
    client: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), gateway::Error>>,
}

impl Node {
    async fn start(extra: &[&str]) -> Self {
        let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = client.local_addr().unwrap();
        let mut args = vec!["gateway", "--node-id", "lt-test", "--drain-seconds", "0"];
        args.extend(extra);
        let config = Config::try_parse_from(args).expect("gateway flags parse");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway::run(
            config,
            Listeners { client, admin },
            shutdown.clone(),
        ));
        Self {
            client: addr,
            shutdown,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.client)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A loopback port with nothing listening: connections to it are refused.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("ws://{addr}")
}

/// What a run of the binary left.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    summary: Option<Value>,
    took: Duration,
}

impl Run {
    /// Checks the exit code, showing the output when it is not `code`.
    fn exited(&self, code: i32) {
        assert_eq!(
            self.code, code,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
    }
}

/// Runs `loadtest` with `args` (and a short run's phases, a summary file), `env` set and
/// nothing inherited from this process's environment.
async fn loadtest(args: &[&str], env: &[(&str, &str)]) -> Run {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let summary: PathBuf = std::env::temp_dir().join(format!(
        "loadtest-cli-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&summary);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadtest"));
    cmd.env_clear()
        .args([
            "--settle",
            "300ms",
            "--measure",
            "1s",
            "--drain",
            "1s",
            "--connect-timeout",
            "2s",
            "--live-interval",
            "0",
            // This shared machine's timers are not the subject here.
            "--max-generator-lag",
            "2s",
            "--summary-file",
        ])
        .arg(&summary)
        .args(args)
        .envs(env.iter().copied());
    let started = Instant::now();
    let out: Output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("the loadtest binary runs");
    let took = started.elapsed();
    let text = std::fs::read_to_string(&summary).ok();
    let _ = std::fs::remove_file(&summary);
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        summary: text.map(|t| serde_json::from_str(&t).expect("the summary is JSON")),
        took,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_which_nobody_joined_fails_without_rules() {
    let target = closed_port();
    let run = loadtest(&["--target", &target, "--rooms", "1x1x2"], &[]).await;
    run.exited(1);
    assert!(
        run.stdout
            .contains("rule FAIL joined>0 — no member ever joined"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("result: FAIL"), "{}", run.stdout);
    let s = run.summary.unwrap();
    assert_eq!(s["connections"]["joined"], 0);
    assert!(
        s["connections"]["errors_by_cause"]["refused"]
            .as_u64()
            .unwrap()
            >= 3
    );
    assert_eq!(s["pass"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_is_passed_over_at_once() {
    let node = Node::start(&[]).await;
    // Every member's round robin starts at one of the two; half start at the refusing one.
    let targets = format!("{},{}", closed_port(), node.url());
    // On one worker thread (`--threads 1`), which the summary states.
    let run = loadtest(
        &[
            "--target",
            &targets,
            "--rooms",
            "1x1x5@5/0",
            "--expect",
            "lost==0",
            "--threads",
            "1",
        ],
        &[],
    )
    .await;
    node.stop().await;
    run.exited(0);
    let s = run.summary.unwrap();
    let c = &s["connections"];
    assert!(
        c["errors_by_cause"]["refused"].as_u64().unwrap() >= 2,
        "members started at the refusing target: {c}"
    );
    // The window starts 300 ms after every member's first attempt; a member that backed off
    // after the refusal (at least 500 ms) would join after it and not count from the start.
    assert_eq!(c["members_from_start"], 6, "{c}");
    assert_eq!(c["joined"], 6, "{c}");
    assert_eq!(c["reconnects"], 0, "no backoff round: {c}");
    assert!(s["messages"]["expected"].as_u64().unwrap() > 0);

    // The generator's own cost, in the JSON and the printout.
    let g = &s["generator"];
    assert_eq!(g["threads"], 1, "{g}");
    assert!(
        run.stdout.contains(", 1 threads (load average"),
        "{}",
        run.stdout
    );
    assert!(g["received"].as_u64().unwrap() > 0, "{g}");
    assert!(g["cpu_us_per_message"].as_f64().unwrap() > 0.0, "{g}");
    assert!(g["kib_per_member"].as_f64().unwrap() >= 0.0, "{g}");
    assert!(g["peak_rss_mib"].as_f64().unwrap() > 0.0, "{g}");
    assert!(
        run.stdout.contains("µs CPU per received message"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("KiB per member"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_batched_in_goose_users_keep_every_rule() {
    let node = Node::start(&["--presence-interval", "200ms"]).await;
    // 2 hosts and 38 viewers, 16 to a goose user: batches of 2, 16, 16 and 6. Half the members
    // start at a refusing target, and 20 members/s start over ~2 s.
    let targets = format!("{},{}", closed_port(), node.url());
    let run = loadtest(
        &[
            "--target",
            &targets,
            "--rooms",
            "1x2x38@2/0",
            "--members-per-user",
            "16",
            "-r",
            "20",
            "--expect",
            "lost==0",
            "--expect",
            "presence-wrong==0",
        ],
        &[],
    )
    .await;
    node.stop().await;
    run.exited(0);
    assert!(
        run.stderr
            .contains("40 connections, 4 goose users of up to 16 members"),
        "{}",
        run.stderr
    );
    // Settle, window and drain take 2.3 s; the members' ramp at 20/s another 1.95 s at least
    // (at goose's unchanged rate the 4 users, and so every member, would start within 0.2 s).
    assert!(
        run.took >= Duration::from_millis(4_200),
        "members started faster than -r 20: {:?}",
        run.took
    );
    let s = run.summary.unwrap();
    let c = &s["connections"];
    assert_eq!(c["joined"], 40, "{c}");
    assert_eq!(c["members_from_start"], 40, "{c}");
    assert_eq!(
        c["reconnects"], 0,
        "refused targets passed over at once: {c}"
    );
    assert!(
        c["errors_by_cause"]["refused"].as_u64().unwrap() >= 10,
        "{c}"
    );
    let m = &s["messages"];
    let expected = m["expected"].as_u64().unwrap();
    // 2 hosts at 2/s for 1 s, each message to 40 members (the window is 1 s: 2 or so each).
    assert!(expected >= 40 * 2, "{m}");
    assert_eq!(m["delivered"].as_u64().unwrap(), expected, "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(
        (&s["presence"]["checked"], &s["presence"]["wrong"]),
        (&Value::from(40), &Value::from(0)),
        "{}",
        s["presence"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_secret_variable_mints_tokens() {
    let secret = "k2=0123456789abcdef0123456789abcdef";
    let node = Node::start(&[
        "--auth",
        "jwt",
        "--jwt-hmac-secret",
        secret,
        "--api-key",
        "cli-test-api-key",
    ])
    .await;
    let url = node.url();
    let run = loadtest(
        &[
            "--target",
            &url,
            "--rooms",
            "1x1x2@5/0",
            "--expect",
            "lost==0",
        ],
        &[(
            "GATEWAY_JWT_HMAC_SECRETS",
            "k2=0123456789abcdef0123456789abcdef,k1=an-older-secret-still-accepted",
        )],
    )
    .await;
    run.exited(0);
    assert_eq!(run.summary.unwrap()["connections"]["joined"], 3);

    // The deprecated name still works, and says so.
    let run = loadtest(
        &[
            "--target",
            &url,
            "--rooms",
            "1x1x1@5/0",
            "--expect",
            "lost==0",
        ],
        &[(
            "LOADTEST_JWT_HMAC_SECRET",
            "0123456789abcdef0123456789abcdef",
        )],
    )
    .await;
    node.stop().await;
    run.exited(0);
    assert!(run.stderr.contains("deprecated"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_presence_is_checked_against_the_whole_runs_rooms() {
    let node = Node::start(&["--presence-interval", "200ms"]).await;
    let url = node.url();
    let run = loadtest(
        &[
            "--target",
            &url,
            "--rooms",
            "2x1x3@2/0",
            "--expect",
            "presence-wrong==0",
        ],
        &[],
    )
    .await;
    run.exited(0);
    let s = run.summary.unwrap();
    assert_eq!(
        (
            &s["presence"]["checked"],
            &s["presence"]["wrong"],
            &s["presence"]["missing"]
        ),
        (&Value::from(8), &Value::from(0), &Value::from(0)),
        "every member saw 1 host and 3 viewers: {}",
        s["presence"]
    );
    assert!(
        run.stdout.contains("presence at the end: 8 of 8"),
        "{}",
        run.stdout
    );

    // One shard of two, alone: its members (1 host, 2 viewers) are half of the room, so the
    // counts they see are not the run's room size, and the rule says so.
    let start_at = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2)
    .to_string();
    let run = loadtest(
        &[
            "--target",
            &url,
            "--rooms",
            "1x2x4@2/0",
            "--shard",
            "0/2",
            "--room-prefix",
            "half",
            "--start-at",
            &start_at,
            "--expect",
            "presence-wrong==0",
        ],
        &[],
    )
    .await;
    node.stop().await;
    run.exited(1);
    let s = run.summary.unwrap();
    assert_eq!(s["presence"]["checked"], 3);
    assert_eq!(s["presence"]["wrong"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_option_combinations_exit_2() {
    let target = closed_port();
    for (args, says) in [
        (vec!["--shard", "0/2"], "room-prefix"),
        (
            vec!["--jwt-hmac-secrets", "k=s", "--token-file", "/nonexistent"],
            "choose one",
        ),
        (
            vec!["--jwt-hmac-secrets", "a", "--jwt-hmac-secret", "b"],
            "different secrets",
        ),
        (vec!["--users", "7"], "--users 7"),
        (vec!["--threads", "4097"], "--threads 4097"),
    ] {
        let mut all = vec!["--target", &target];
        all.extend(args.iter().copied());
        let run = loadtest(&all, &[]).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{args:?}: {}", run.stderr);
        assert!(run.took < Duration::from_secs(5), "refused before any run");
    }
    let run = loadtest(&["--target", "ftp://x"], &[]).await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = loadtest(&[], &[]).await;
    assert_eq!(run.code, 2, "no target: {}", run.stderr);
    let run = loadtest(&["--rooms", "nonsense"], &[]).await;
    assert_eq!(run.code, 2, "clap's own errors too: {}", run.stderr);
}
