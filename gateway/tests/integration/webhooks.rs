//! Room lifecycle webhooks, the delivery side (issue 22, point 4; docs/protocol.md "Webhooks"):
//! against real `redis-server`s (one, and a Cluster) and real HTTP receivers on 127.0.0.1:0 in
//! this process. Events are produced as the lifecycle scripts produce them — an `XADD` of one
//! field `e` to the room's stream — followed by the node's wake-up
//! (`Node::lifecycle_appended`) or left to the node's recovery sweep.
//!
//! Each test checks what the receiver ACCEPTED (answered 2xx): each event exactly once, in
//! order per room, signed with an HMAC the test computes itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use clap::Parser;
use gateway::metrics::Metrics;
use gateway::node::Node;
use gateway::wire::protocol::RoomName;
use gateway::Config;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn config(id: &str, redis_url: Option<&str>, url: &str, extra: &[&str]) -> Config {
    let mut args = vec!["gateway".to_string(), "--node-id".into(), id.into()];
    if let Some(r) = redis_url {
        args.extend(["--redis-url".into(), r.into()]);
    }
    // Test defaults, each unless `extra` sets it.
    for pair in hook_flags(url).chunks(2) {
        if !extra.contains(&pair[0].as_str()) {
            args.extend(pair.iter().cloned());
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let c = Config::try_parse_from(args).unwrap();
    c.validate().unwrap();
    c
}

/// A node without listeners (the library's `Node`, as `gateway::run` builds it), so that the
/// test can call its wake-up as the lifecycle scripts' caller does. Stopped on drop.
struct HookNode {
    node: Arc<Node>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl HookNode {
    async fn start(config: Config) -> Self {
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Metrics::new(&config.node_id);
        let node = Node::start(config, metrics, tracker.clone(), stop.clone(), None).unwrap();
        let deadline = Instant::now() + WAIT;
        while !node.broker.is_connected() {
            assert!(Instant::now() < deadline, "broker never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            node,
            stop,
            tracker,
        }
    }

    fn wake(&self, room: &str) {
        self.node
            .lifecycle_appended(&RoomName::parse(room).unwrap());
    }

    fn metric(&self, series: &str) -> f64 {
        metric_value(&self.node.render_metrics(), series)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .expect("the node's tasks stop");
    }
}

impl Drop for HookNode {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One lifecycle event's JSON as the scripts write it (without `id`); `n` tells them apart.
fn event(room: &str, n: usize) -> String {
    serde_json::json!({
        "type": if n.is_multiple_of(2) { "member.joined" } else { "member.left" },
        "room": room,
        "ts_ms": gateway::wire::clock::unix_millis(),
        "sub": format!("u{n}"),
        "name": "Ann",
        "role": "viewer",
        "n": n,
    })
    .to_string()
}

/// `XADD {prefix}{room}:events MAXLEN ~ 10000 * e <event>`, as the lifecycle scripts append.
async fn xadd<C: redis::aio::ConnectionLike>(conn: &mut C, room: &str, n: usize) {
    let _: String = redis::cmd("XADD")
        .arg(format!("gw:room:{{{room}}}:events"))
        .arg("MAXLEN")
        .arg("~")
        .arg(10_000)
        .arg("*")
        .arg("e")
        .arg(event(room, n))
        .query_async(conn)
        .await
        .unwrap();
}

/// Accepted events by room, each as its `n`, in the order the receiver accepted them.
fn accepted_by_room(r: &Receiver) -> BTreeMap<String, Vec<u64>> {
    let mut rooms: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for g in r.log().into_iter().filter(|g| g.accepted) {
        let v: Value = serde_json::from_slice(&g.body).unwrap();
        assert!(v["id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/", v["room"].as_str().unwrap())));
        rooms
            .entry(v["room"].as_str().unwrap().to_string())
            .or_default()
            .push(v["n"].as_u64().unwrap());
    }
    rooms
}

/// Each room's events `0..n` accepted exactly once each, in order, and every accepted id once.
fn assert_once_in_order(r: &Receiver, rooms: &[String], n: u64) {
    let by_room = accepted_by_room(r);
    for room in rooms {
        let got = by_room.get(room).cloned().unwrap_or_default();
        assert_eq!(got, (0..n).collect::<Vec<_>>(), "room {room}");
    }
    assert_eq!(by_room.len(), rooms.len(), "no other room");
    let mut ids = r.accepted();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "an id accepted twice");
}

async fn no_undelivered_keys(conn: &mut redis::aio::MultiplexedConnection) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gw:room:{*}:events")
        .query_async(conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "streams left: {keys:?}");
}

/// A receiver that fails its first three attempts (503, then a timeout, then 500) and then
/// accepts: each event is accepted exactly once, in order, every request signed, the retries
/// spaced by the backoff; the node's metrics count the attempts and the delivery.
#[tokio::test]
async fn a_failing_receiver_gets_each_event_once_in_order_after_backoff() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|n, _| match n {
        0 => Reply::Status(503),
        1 => Reply::Hang(Duration::from_millis(1500)),
        2 => Reply::Status(500),
        _ => Reply::Status(204),
    })
    .await;
    let node = HookNode::start(config("n1", Some(&redis.url()), &receiver.url(), &[])).await;
    let mut conn = redis.connection().await.unwrap();
    for n in 0..4 {
        xadd(&mut conn, "r1", n).await;
    }
    node.wake("r1");
    receiver.wait_accepted(4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = receiver.log();
    assert_eq!(log.len(), 7, "3 failures, 4 deliveries: {log:?}");
    assert_signed(&log);
    assert_once_in_order(&receiver, &["r1".to_string()], 4);
    // The first event's three failed attempts, then its success: the same id each time.
    assert!(log[..4].iter().all(|g| g.id == log[0].id), "{log:?}");
    // Backoff: every retry waited at least half the first step (full jitter's floor) after the
    // previous attempt ended; the timed-out attempt took the node's timeout.
    let (retry_min, retry_max) = (Duration::from_millis(100), Duration::from_millis(400));
    let timeout = Duration::from_millis(500);
    let gaps: Vec<Duration> = log.windows(2).take(3).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= retry_min / 2, "{gaps:?}");
    assert!(
        gaps[1] >= timeout + retry_min / 2,
        "the hung attempt timed out: {gaps:?}"
    );
    assert!(gaps[2] >= retry_min / 2, "{gaps:?}");
    // ... and never beyond the cap (plus the request's own time and scheduling slack).
    assert!(gaps[0] < retry_max + Duration::from_millis(300), "{gaps:?}");
    assert!(gaps[2] < retry_max + Duration::from_millis(300), "{gaps:?}");
    assert_eq!(
        node.metric("gateway_webhook_attempts_total{result=\"failed\"}"),
        2.0
    );
    assert_eq!(
        node.metric("gateway_webhook_attempts_total{result=\"timeout\"}"),
        1.0
    );
    assert_eq!(
        node.metric("gateway_webhook_attempts_total{result=\"accepted\"}"),
        4.0
    );
    assert_eq!(
        node.metric("gateway_webhook_events_total{result=\"delivered\"}"),
        4.0
    );
    assert_eq!(
        node.metric("gateway_webhook_delivery_lag_seconds_count"),
        4.0
    );
    assert_eq!(node.metric("gateway_webhook_leases"), 0.0, "released");
    no_undelivered_keys(&mut conn).await;
    let lease: Option<String> = redis::cmd("GET")
        .arg("gw:room:{r1}:hooklease")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lease, None, "the lease is released once nothing is left");
    node.stop().await;
}

/// Three nodes on one Redis, every one woken for every room (each runs a dispatcher): each
/// event of 30 rooms is accepted exactly once across the cluster, in order per room — also
/// while the receiver fails one request in five.
#[tokio::test]
async fn three_nodes_deliver_each_event_once_in_order() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|n, _| {
        if n % 5 == 3 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        nodes.push(HookNode::start(config(id, Some(&redis.url()), &receiver.url(), &[])).await);
    }
    let rooms: Vec<String> = (0..30).map(|i| format!("room-{i}")).collect();
    let mut conn = redis.connection().await.unwrap();
    for n in 0..5 {
        for room in &rooms {
            xadd(&mut conn, room, n).await;
            for node in &nodes {
                node.wake(room);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    receiver.wait_accepted(150, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_signed(&receiver.log());
    assert_once_in_order(&receiver, &rooms, 5);
    let delivered: f64 = nodes
        .iter()
        .map(|n| n.metric("gateway_webhook_events_total{result=\"delivered\"}"))
        .sum();
    assert_eq!(delivered, 150.0, "each event delivered by one node");
    no_undelivered_keys(&mut conn).await;
    for n in nodes {
        n.stop().await;
    }
}

/// A node process SIGKILLed while it holds leases on rooms with undelivered events (its
/// receiver failing): another node adopts its rooms once the dead node's heartbeat expires (the
/// index, not the slow scan: the survivor's scan interval is a minute) and delivers every event,
/// in order, within the documented bound (lease + 3 sweeps, here 2 s + 0.6 s, plus slack).
#[tokio::test]
async fn a_killed_nodes_rooms_are_delivered_by_another() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(503)).await;
    let flags = hook_flags(&receiver.url());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut doomed = GatewayProcess::start("doomed", Some(&redis), &flags).await;
    let rooms: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let mut conn = redis.connection().await.unwrap();
    for n in 0..3 {
        for room in &rooms {
            xadd(&mut conn, room, n).await;
        }
    }
    // The process finds them with its first scans, leases them and fails to deliver.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut held = 0;
        for room in &rooms {
            let lease: Option<String> = redis::cmd("GET")
                .arg(format!("gw:room:{{{room}}}:hooklease"))
                .query_async(&mut conn)
                .await
                .unwrap();
            held += usize::from(lease.is_some_and(|l| l.starts_with("doomed:")));
        }
        if held == rooms.len() {
            break;
        }
        assert!(Instant::now() < deadline, "the process leased {held} rooms");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!receiver.log().is_empty(), "it tried");
    doomed.kill();
    let killed = Instant::now();
    receiver.set_plan(|_, _| Reply::Status(200));
    let survivor = HookNode::start(config(
        "survivor",
        Some(&redis.url()),
        &receiver.url(),
        &["--webhook-scan-interval", "60s"],
    ))
    .await;
    receiver.wait_accepted(18, Duration::from_secs(15)).await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(8), "recovered in {took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once_in_order(&receiver, &rooms, 3);
    no_undelivered_keys(&mut conn).await;
    survivor.stop().await;
}

/// The receiver goes away for 5 s (no listener, connections closed) while events keep coming,
/// then returns: none lost, each accepted once, in order.
#[tokio::test]
async fn a_receiver_outage_loses_nothing() {
    let redis = RedisServer::start().await;
    let mut receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let node = HookNode::start(config("n1", Some(&redis.url()), &receiver.url(), &[])).await;
    let rooms: Vec<String> = (0..3).map(|i| format!("o{i}")).collect();
    let mut conn = redis.connection().await.unwrap();
    let mut n = 0;
    let append = async |conn: &mut redis::aio::MultiplexedConnection, n: usize| {
        for room in &rooms {
            xadd(conn, room, n).await;
            node.wake(room);
        }
    };
    for _ in 0..3 {
        append(&mut conn, n).await;
        n += 1;
    }
    receiver.wait_accepted(9, Duration::from_secs(10)).await;
    receiver.stop();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(5) {
        append(&mut conn, n).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    receiver.restart().await;
    let total = rooms.len() * n;
    receiver.wait_accepted(total, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once_in_order(&receiver, &rooms, n as u64);
    assert!(
        node.metric("gateway_webhook_attempts_total{result=\"unreachable\"}") > 0.0,
        "the outage was seen"
    );
    no_undelivered_keys(&mut conn).await;
    node.stop().await;
}

/// On a Redis Cluster, rooms on every shard: each event accepted once, in order, with two
/// nodes woken for every room; the safety scan goes shard after shard (one room is appended
/// without a wake-up and found by the scan).
#[tokio::test]
async fn redis_cluster_rooms_on_every_shard_are_delivered_once() {
    let cluster = ClusterTopology::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let a = HookNode::start(config("a", Some(&cluster.url()), &receiver.url(), &[])).await;
    let b = HookNode::start(config("b", Some(&cluster.url()), &receiver.url(), &[])).await;
    let rooms = rooms_per_shard(3);
    let ports: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("redis://127.0.0.1:{}/", n.port))
        .collect();
    let client = redis::cluster::ClusterClient::new(ports).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for n in 0..4 {
        for (i, room) in rooms.iter().enumerate() {
            xadd(&mut conn, room, n).await;
            if i != 0 {
                a.wake(room);
                b.wake(room);
            }
        }
    }
    receiver
        .wait_accepted(rooms.len() * 4, Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_once_in_order(&receiver, &rooms, 4);
    a.stop().await;
    b.stop().await;
}

/// The in-process broker (no Redis): events held in memory, delivered by the one node in order.
#[tokio::test]
async fn in_process_events_are_delivered_in_order() {
    let receiver = Receiver::start(|n, _| {
        if n == 0 {
            Reply::Status(502)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let node = HookNode::start(config("solo", None, &receiver.url(), &[])).await;
    for n in 0..5 {
        for room in ["m1", "m2"] {
            node.node
                .lifecycle_in_process(&RoomName::parse(room).unwrap(), event(room, n));
        }
    }
    receiver.wait_accepted(10, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_signed(&receiver.log());
    assert_once_in_order(&receiver, &["m1".into(), "m2".into()], 5);
    node.stop().await;
}

/// A receiver that refuses an event with 400 every time: after `--webhook-dead-letter-after`
/// attempts it goes to the room's dead-letter stream, and the room's next event is delivered.
#[tokio::test]
async fn a_refused_event_is_dead_lettered_and_the_room_goes_on() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, body| {
        if body["n"] == 0 {
            Reply::Status(400)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let node = HookNode::start(config(
        "n1",
        Some(&redis.url()),
        &receiver.url(),
        &["--webhook-dead-letter-after", "3"],
    ))
    .await;
    let mut conn = redis.connection().await.unwrap();
    for n in 0..2 {
        xadd(&mut conn, "d1", n).await;
    }
    node.wake("d1");
    receiver.wait_accepted(1, Duration::from_secs(10)).await;
    let log = receiver.log();
    assert_eq!(
        log.iter().filter(|g| !g.accepted).count(),
        3,
        "three refusals"
    );
    let dead: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("gw:room:{d1}:deadletter")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        node.metric("gateway_webhook_events_total{result=\"dead_letter\"}"),
        1.0
    );
    node.stop().await;
}

/// Events trimmed by the stream's MAXLEN before delivery are counted as dropped.
#[tokio::test]
async fn events_trimmed_before_delivery_are_counted() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let mut conn = redis.connection().await.unwrap();
    for n in 0..10 {
        let _: String = redis::cmd("XADD")
            .arg("gw:room:{t1}:events")
            .arg("MAXLEN")
            .arg(4)
            .arg("*")
            .arg("e")
            .arg(event("t1", n))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let node = HookNode::start(config("n1", Some(&redis.url()), &receiver.url(), &[])).await;
    node.wake("t1");
    receiver.wait_accepted(4, Duration::from_secs(10)).await;
    assert_eq!(
        accepted_by_room(&receiver)["t1"],
        vec![6, 7, 8, 9],
        "the newest four"
    );
    assert_eq!(node.metric("gateway_webhook_events_dropped_total"), 6.0);
    node.stop().await;
}

/// The verification examples of docs/protocol.md ("Webhooks"), Python (`python3`) and Node.js
/// (`node`), run against a real request the gateway signed: each accepts it, and refuses it
/// tampered, checked with another secret, or too old.
#[tokio::test]
async fn the_docs_examples_verify_a_real_request() {
    let receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let node = HookNode::start(config("solo", None, &receiver.url(), &[])).await;
    node.node
        .lifecycle_in_process(&RoomName::parse("py").unwrap(), event("py", 0));
    receiver.wait_accepted(1, Duration::from_secs(10)).await;
    let got = receiver.log().remove(0);
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.lines().next().is_some_and(|h| h.contains("Webhooks")))
        .expect("docs/protocol.md has a Webhooks section");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a python block in the Webhooks section");
    let dir = scratch_dir("webhook-py");
    std::fs::write(dir.join("body"), &got.body).unwrap();
    let driver = format!(
        r#"
import sys, time
body = open({body:?}, "rb").read()
headers = {{"X-Gateway-Timestamp": {ts:?}, "X-Gateway-Signature": {sig:?}}}
now = int({ts:?})
assert verify(body, headers, [b"rotated-old-secret-00", {secret:?}.encode()], now=now), "genuine"
assert not verify(body + b" ", headers, [{secret:?}.encode()], now=now), "tampered"
assert not verify(body, headers, [b"another-secret-0123456"], now=now), "other secret"
assert not verify(body, headers, [{secret:?}.encode()], now=now + 3600), "too old"
print("ok")
"#,
        body = dir.join("body").to_string_lossy(),
        ts = got.timestamp,
        sig = got.signature,
        secret = HOOK_SECRET,
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!("{code}\n{driver}"))
        .output()
        .expect("python3");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The Node.js example too (CI installs Node 20), on the same request, signed seconds ago.
    let js = section
        .split("```js\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a js block in the Webhooks section");
    let driver = format!(
        r#"
const body = require("node:fs").readFileSync({body:?});
const headers = {{ "x-gateway-timestamp": {ts:?}, "x-gateway-signature": {sig:?} }};
if (!verify(body, headers, ["rotated-old-secret-00", {secret:?}])) throw new Error("genuine");
if (verify(Buffer.concat([body, Buffer.from(" ")]), headers, [{secret:?}])) throw new Error("tampered");
if (verify(body, headers, ["another-secret-0123456"])) throw new Error("other secret");
if (verify(body, {{ ...headers, "x-gateway-timestamp": "1" }}, [{secret:?}])) throw new Error("old");
console.log("ok");
"#,
        body = dir.join("body").to_string_lossy(),
        ts = got.timestamp,
        sig = got.signature,
        secret = HOOK_SECRET,
    );
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg(format!("{js}\n{driver}"))
        .output()
        .expect("node");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "node: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Kept when an assertion above failed, for a look at the request.
    let _ = std::fs::remove_dir_all(&dir);
    node.stop().await;
}

/// `--webhook-url` without `--webhook-secret`: the binary refuses to start, saying why.
#[test]
fn a_url_without_a_secret_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--webhook-url", "http://127.0.0.1:9/hooks"])
        .env_remove("GATEWAY_WEBHOOK_SECRETS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--webhook-secret"), "{err}");
}

/// `hook_release.lua` refuses to release a lease while the stream holds an event (one appended
/// by another node while the holder was finishing is never stranded), refuses another
/// instance's lease, and, with nothing left, removes the lease, the stream and its state.
#[tokio::test]
async fn release_refuses_while_events_are_left() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    // A long scan interval and no wake-up: this node's dispatcher leaves the room alone.
    let node = HookNode::start(config(
        "n1",
        Some(&redis.url()),
        &receiver.url(),
        &["--webhook-scan-interval", "60s"],
    ))
    .await;
    let broker = node.node.broker.redis().unwrap();
    let room = RoomName::parse("rel").unwrap();
    let lease = Duration::from_secs(5);
    let claim = broker.hook_claim("me", &room, lease, 10).await.unwrap();
    assert!(claim.held && claim.events.is_empty());
    let mut conn = redis.connection().await.unwrap();
    xadd(&mut conn, "rel", 0).await; // appended while "me" was finishing
    use gateway::broker::redis::Release;
    assert_eq!(
        broker.hook_release("other", &room, false).await.unwrap(),
        Release::NotOurs
    );
    assert!(
        !broker
            .hook_claim("other", &room, lease, 1)
            .await
            .unwrap()
            .held
    );
    assert_eq!(
        broker.hook_release("me", &room, false).await.unwrap(),
        Release::Pending,
        "an event is left: the holder keeps the lease"
    );
    let claim = broker.hook_claim("me", &room, lease, 10).await.unwrap();
    assert_eq!(claim.events.len(), 1);
    let (id, _) = &claim.events[0];
    assert!(!broker
        .hook_ack("other", &room, id, lease, None)
        .await
        .unwrap());
    assert!(broker.hook_ack("me", &room, id, lease, None).await.unwrap());
    assert_eq!(
        broker.hook_release("me", &room, false).await.unwrap(),
        Release::Released
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gw:room:{rel}:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert!(
        receiver.log().is_empty(),
        "the test drove the scripts itself"
    );
    node.stop().await;
}

/// A node that stops (its cancellation token) while its receiver fails releases its leases,
/// leaves the undelivered events in Redis and marks its heartbeat expired (so that the index
/// hands its rooms over at once): another node delivers them as soon as it looks (here its
/// start-up scan), without waiting out the 30 s lease.
#[tokio::test]
async fn a_stopping_node_releases_its_leases_for_another() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(503)).await;
    let long = ["--webhook-lease", "30s", "--webhook-scan-interval", "60s"];
    let first = HookNode::start(config("first", Some(&redis.url()), &receiver.url(), &long)).await;
    let mut conn = redis.connection().await.unwrap();
    for n in 0..3 {
        xadd(&mut conn, "s1", n).await;
    }
    first.wake("s1");
    eventually("first tries", || async { !receiver.log().is_empty() }).await;
    assert_eq!(first.metric("gateway_webhook_leases"), 1.0);
    let instance = first.node.hooks.as_ref().unwrap().instance.clone();
    first.stop().await;
    let dead: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg("gw:room:{_hooks}:instances")
        .arg("-inf")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, vec![instance], "marked dead at shutdown");
    let lease: Option<String> = redis::cmd("GET")
        .arg("gw:room:{s1}:hooklease")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lease, None, "released at shutdown");
    let left: usize = redis::cmd("XLEN")
        .arg("gw:room:{s1}:events")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 3, "the undelivered events stay in Redis");
    receiver.set_plan(|_, _| Reply::Status(200));
    let started = Instant::now();
    let second =
        HookNode::start(config("second", Some(&redis.url()), &receiver.url(), &long)).await;
    receiver.wait_accepted(3, Duration::from_secs(5)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "adopted at once, not after the 30 s lease: {:?}",
        started.elapsed()
    );
    assert_once_in_order(&receiver, &["s1".into()], 3);
    second.stop().await;
}

/// A full wake queue (shrunk to 2 rooms, one room delivered at a time, a slow receiver): the
/// wake-ups that do not fit are dropped and counted, and the scan they trigger (not the
/// periodic one: a minute here) finds every room; nothing is lost.
#[tokio::test]
async fn a_full_wake_queue_falls_back_to_the_scan() {
    let redis = RedisServer::start().await;
    let receiver = Receiver::start(|_, _| Reply::Slow(Duration::from_millis(50))).await;
    let node = HookNode::start(config(
        "n1",
        Some(&redis.url()),
        &receiver.url(),
        &[
            "--webhook-wake-queue",
            "2",
            "--webhook-concurrency",
            "1",
            "--webhook-scan-interval",
            "60s",
        ],
    ))
    .await;
    // Past the start-up scan: only a dropped wake-up can trigger another.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rooms: Vec<String> = (0..12).map(|i| format!("q{i}")).collect();
    let mut conn = redis.connection().await.unwrap();
    for room in &rooms {
        xadd(&mut conn, room, 0).await;
        node.wake(room);
    }
    assert!(node.metric("gateway_webhook_wakeups_dropped_total") > 0.0);
    receiver
        .wait_accepted(rooms.len(), Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_once_in_order(&receiver, &rooms, 1);
    node.stop().await;
}
