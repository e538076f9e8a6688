//! Continuity (docs/protocol.md, "Continuity"): offsets and epochs, publish acks and idempotency
//! keys, the history API, and resuming after drops, drains, node kills and a Redis that lost
//! everything — with real Redis, real nodes, and real gateway processes where a process must die.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use tokio::sync::watch;

/// Joins `room` on `addr` with `query` and returns the client and its welcome.
async fn join_with(addr: SocketAddr, room: &str, query: &str) -> (WsClient, Value) {
    let mut c = WsClient::connect(&format!("ws://{addr}/ws/{room}?{query}")).await;
    let w = c.next_of("welcome").await;
    (c, w)
}

/// The next `count` messages' offsets.
async fn offsets(c: &mut WsClient, count: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for _ in 0..count {
        out.push(c.next_message().await["offset"].as_u64().unwrap());
    }
    out
}

/// Publishes `n` messages over HTTP; returns the last ack.
async fn publish_n(node: &TestNode, room: &str, n: usize) -> Value {
    let mut last = Value::Null;
    for i in 0..n {
        let (status, body) = http_publish(node, room, &[], json!(i).to_string().as_bytes()).await;
        assert_eq!(status, 202, "{body}");
        last = body;
    }
    last
}

/// Offsets and acks, keyed publishes over WebSocket and HTTP, and the history API, on `nodes`
/// (two nodes sharing Redis, or one node alone).
async fn acks_keys_and_history(a: &TestNode, b: &TestNode) {
    let (mut host, w) = join_with(a.client, "acks", "role=host&name=h").await;
    assert_eq!(w["offset"], 0);
    let joined_epoch = w["epoch"]
        .as_str()
        .expect("a room's sequence begins at its first join")
        .to_string();
    assert!(w.get("recovered").is_none(), "no since, no recovered");
    let (mut viewer, _) = join_with(b.client, "acks", "").await;

    host.send_text(r#"{"type":"publish","data":"one","key":"k1"}"#)
        .await;
    let ack = host.next_of("ack").await;
    assert_eq!(
        (&ack["key"], &ack["offset"], &ack["duplicate"]),
        (&json!("k1"), &json!(1), &json!(false))
    );
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    assert!(epoch.chars().all(|c| c.is_ascii_alphanumeric()) && !epoch.is_empty());
    assert_eq!(
        epoch, joined_epoch,
        "the first publish continues the join's sequence"
    );
    let m = viewer.next_message().await;
    assert_eq!(
        (&m["data"], &m["offset"], &m["epoch"]),
        (&json!("one"), &json!(1), &json!(epoch))
    );
    assert_eq!(m["id"], ack["id"]);

    // The same key again (a publisher that never saw its ack): acknowledged, not published.
    host.send_text(r#"{"type":"publish","data":"one again","key":"k1"}"#)
        .await;
    let dup = host.next_of("ack").await;
    assert_eq!(
        (&dup["offset"], &dup["duplicate"], &dup["id"]),
        (&json!(1), &json!(true), &ack["id"])
    );
    // Unkeyed publishes get no ack; over HTTP the key is a header. Without an ack, only the
    // viewer's copy shows that "two" was numbered before the other node's HTTP publish.
    host.publish(json!("two")).await;
    let two = viewer.next_message().await;
    assert_eq!((&two["data"], &two["offset"]), (&json!("two"), &json!(2)));
    let (status, body) = http_publish(b, "acks", &[("Idempotency-Key", "h1")], br#""three""#).await;
    assert_eq!(status, 202);
    assert_eq!(
        (&body["offset"], &body["duplicate"], &body["epoch"]),
        (&json!(3), &json!(false), &json!(epoch))
    );
    let (_, again) = http_publish(a, "acks", &[("Idempotency-Key", "h1")], br#""three""#).await;
    assert_eq!(
        (&again["offset"], &again["duplicate"], &again["id"]),
        (&json!(3), &json!(true), &body["id"])
    );
    let got: Vec<Value> = vec![two, viewer.next_message().await];
    assert_eq!(
        got.iter()
            .map(|m| (m["data"].clone(), m["offset"].clone()))
            .collect::<Vec<_>>(),
        [(json!("two"), json!(2)), (json!("three"), json!(3))]
    );
    viewer.expect_no_message(Duration::from_millis(300)).await;
    let (status, _) = http_publish(a, "acks", &[("Idempotency-Key", "")], b"x").await;
    assert_eq!(status, 400, "an empty key is refused");
    host.send_text(r#"{"type":"publish","data":1,"key":7}"#)
        .await;
    assert_eq!(host.next_of("error").await["code"], "invalid_command");

    // History API: since, limit, the backlog without since, recovered.
    let (status, h) = http_history(a.client, "acks", &format!("since={epoch}:1"), &[]).await;
    assert_eq!(status, 200, "{h}");
    assert_eq!(
        (&h["epoch"], &h["offset"], &h["recovered"]),
        (&json!(epoch), &json!(3), &json!(true))
    );
    let data: Vec<&Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["data"])
        .collect();
    assert_eq!(data, [&json!("two"), &json!("three")]);
    let (_, h) = http_history(b.client, "acks", "limit=2", &[]).await;
    let offs: Vec<&Value> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offs, [&json!(2), &json!(3)]);
    let (_, h) = http_history(b.client, "acks", "since=other:1", &[]).await;
    assert_eq!(
        (&h["recovered"], &h["messages"]),
        (&json!(false), &json!([]))
    );
    let (status, _) = http_history(b.client, "acks", "since=bad", &[]).await;
    assert_eq!(status, 400);

    // Resume on the other node, with a backlog for a fresh joiner.
    let (mut resumed, w) = join_with(b.client, "acks", &format!("since={epoch}:1")).await;
    assert_eq!(
        (&w["recovered"], &w["offset"], &w["epoch"]),
        (&json!(true), &json!(3), &json!(epoch))
    );
    assert_eq!(offsets(&mut resumed, 2).await, [2, 3]);
    let (mut fresh, w) = join_with(a.client, "acks", "backlog=2").await;
    assert!(w.get("recovered").is_none());
    assert_eq!(offsets(&mut fresh, 2).await, [2, 3]);
    // Live continues after the catch-up, for both.
    host.publish(json!("four")).await;
    assert_eq!(offsets(&mut resumed, 1).await, [4]);
    assert_eq!(offsets(&mut fresh, 1).await, [4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_keys_history_api_and_resume_with_redis() {
    let cluster = TestCluster::start(&["a", "b"], &[]).await;
    let (redis, a, b) = (cluster.redis(), &cluster[0], &cluster[1]);
    acks_keys_and_history(a, b).await;
    // The keys live where the contract says, with the room's hash tag.
    let mut c = redis.connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gw:room:{acks}:*")
        .query_async(&mut c)
        .await
        .unwrap();
    for k in [
        "gw:room:{acks}:meta",
        "gw:room:{acks}:hist",
        // Keys are per publisher (protocol.md 11.3): the anonymous host's, the open API's.
        "gw:room:{acks}:idem:anon:k1",
        "gw:room:{acks}:idem:api:h1",
    ] {
        assert!(keys.iter().any(|x| x == k), "{k} in {keys:?}");
    }
    assert!(a.metric("gateway_publish_duplicates_total").await >= 1.0);
    assert_eq!(
        b.metric("gateway_recoveries_total{result=\"complete\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_keys_history_api_and_resume_in_process() {
    let a = TestNode::start(test_config("solo", None, &[])).await;
    acks_keys_and_history(&a, &a).await;
}

/// A member who joined a room before its first message, and was away when the messages came,
/// resumes from its welcome's position and gets them from history. This was issue 21's lost
/// publish: a welcome into a room nobody had published in had no epoch, so neither `/client.js`
/// nor the load tester had a position to resume from, and the load tester kept no copy of its
/// publishes to send again — a host whose node was killed while its publish was in flight lost
/// it (acknowledged never, delivered never, re-sent never).
async fn resume_from_an_empty_rooms_welcome(a: &TestNode, b: &TestNode) {
    let (early, w) = join_with(a.client, "fresh", "role=host").await;
    let epoch = w["epoch"]
        .as_str()
        .expect("a room's sequence begins at its first join")
        .to_string();
    assert_eq!(w["offset"], 0);
    drop(early);
    let ack = publish_n(b, "fresh", 2).await;
    assert_eq!(
        (&ack["epoch"], &ack["offset"]),
        (&json!(epoch), &json!(2)),
        "the publishes continue the sequence the join began"
    );
    let (mut back, w) = join_with(a.client, "fresh", &format!("since={epoch}:0")).await;
    assert_eq!(
        (&w["recovered"], &w["epoch"], &w["offset"]),
        (&json!(true), &json!(epoch), &json!(2))
    );
    assert_eq!(offsets(&mut back, 2).await, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_joined_an_empty_room_resumes_without_a_gap_with_redis() {
    let cluster = TestCluster::start(&["e1", "e2"], &[]).await;
    resume_from_an_empty_rooms_welcome(&cluster[0], &cluster[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_who_joined_an_empty_room_resumes_without_a_gap_in_process() {
    let a = TestNode::start(test_config("e", None, &[])).await;
    resume_from_an_empty_rooms_welcome(&a, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_api_needs_the_api_key() {
    let a = TestNode::start(test_config("k", None, &["--api-key", "secret-key-1"])).await;
    let (status, _) = http_history(a.client, "r", "", &[]).await;
    assert_eq!(status, 401);
    let (status, body) = http_history(
        a.client,
        "r",
        "",
        &[("Authorization", "Bearer secret-key-1")],
    )
    .await;
    assert_eq!(status, 200);
    // A room nobody published in: its sequence begins at this first read (offset 0).
    let epoch = body["epoch"].as_str().expect("an epoch").to_string();
    assert!(!epoch.is_empty());
    assert_eq!(
        body,
        json!({"room":"r","epoch":epoch,"offset":0,"recovered":true,"truncated":false,"messages":[]})
    );
}

/// Trimmed by size, by age, too many missed, and a bad `since`.
async fn trimmed_cases(redis: Option<&RedisServer>) {
    let flags = [
        "--history-size",
        "5",
        "--history-ttl",
        "2s",
        "--max-recovery",
        "4",
    ];
    let a = TestNode::start(test_config("t", redis, &flags)).await;
    let last = publish_n(&a, "trim", 10).await;
    let epoch = last["epoch"].as_str().unwrap().to_string();
    assert_eq!(last["offset"], 10);
    // Size: 6..10 kept; a client at 4 missed 5..10 (too many, 6 > 4); at 5 missed 6..10 (5 > 4).
    let (_, w) = join_with(a.client, "trim", &format!("since={epoch}:4")).await;
    assert_eq!(w["recovered"], false);
    let (mut c, w) = join_with(a.client, "trim", &format!("since={epoch}:6")).await;
    assert_eq!((&w["recovered"], &w["offset"]), (&json!(true), &json!(10)));
    assert_eq!(offsets(&mut c, 4).await, [7, 8, 9, 10]);
    let flags2 = ["--history-size", "3", "--max-recovery", "100"];
    let b = TestNode::start(test_config("t2", redis, &flags2)).await;
    publish_n(&b, "trim2", 10).await;
    let (_, h) = http_history(b.client, "trim2", "limit=100", &[]).await;
    let epoch2 = h["epoch"].as_str().unwrap().to_string();
    assert_eq!(h["messages"].as_array().unwrap().len(), 3);
    let (mut c, w) = join_with(b.client, "trim2", &format!("since={epoch2}:5&backlog=2")).await;
    assert_eq!(
        w["recovered"], false,
        "history starts at 8: 6 and 7 are gone"
    );
    assert_eq!(
        offsets(&mut c, 2).await,
        [9, 10],
        "the backlog asked for instead"
    );
    // Age: after the TTL nothing is recoverable, but a client that missed nothing is fine.
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let (_, w) = join_with(a.client, "trim", &format!("since={epoch}:9")).await;
    assert_eq!(w["recovered"], false, "message 10 aged out");
    let (_, w) = join_with(a.client, "trim", &format!("since={epoch}:10")).await;
    assert_eq!(w["recovered"], true, "nothing missed");
    let (_, w) = join_with(a.client, "trim", "since=otherEpoch:10").await;
    assert_eq!(
        (&w["recovered"], &w["epoch"]),
        (&json!(false), &json!(epoch))
    );
    let refused = WsClient::connect_status(&a.ws_url("trim", "since=nocolon")).await;
    assert_eq!(refused.err(), Some(400));
    assert!(
        a.metric("gateway_recoveries_total{result=\"too_many\"}")
            .await
            >= 1.0
    );
    assert!(
        a.metric("gateway_recoveries_total{result=\"trimmed\"}")
            .await
            >= 1.0
    );
    assert!(
        a.metric("gateway_recoveries_total{result=\"epoch_changed\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_past_a_client_is_not_recovered_with_redis() {
    let redis = RedisServer::start().await;
    trimmed_cases(Some(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_trimmed_past_a_client_is_not_recovered_in_process() {
    trimmed_cases(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_means_a_new_epoch_and_recovered_false() {
    let mut redis = RedisServer::start().await;
    let a = TestNode::start(test_config("r1", Some(&redis), &[])).await;
    let b = TestNode::start(test_config("r2", Some(&redis), &[])).await;
    let (mut watcher, _) = join_with(b.client, "restart", "").await;
    let before = publish_n(&a, "restart", 3).await;
    let old = before["epoch"].as_str().unwrap().to_string();
    assert_eq!(offsets(&mut watcher, 3).await, [1, 2, 3]);

    redis.restart().await;
    a.wait_ready().await;
    b.wait_ready().await;
    // The script cache is empty too: the node loads the script again and publishes.
    let after = {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = http_publish(&a, "restart", &[], b"4").await;
            if status == 202 {
                break body;
            }
            assert!(
                Instant::now() < deadline,
                "no publish after the restart: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let new = after["epoch"].as_str().unwrap().to_string();
    assert_ne!(new, old, "a new epoch");
    assert_eq!(after["offset"], 1, "a new sequence");
    let m = watcher.next_message().await;
    assert_eq!((&m["offset"], &m["epoch"]), (&json!(1), &json!(new)));
    let (_, w) = join_with(b.client, "restart", &format!("since={old}:3")).await;
    assert_eq!(
        (&w["recovered"], &w["epoch"], &w["offset"]),
        (&json!(false), &json!(new), &json!(1))
    );
    assert_eq!(
        b.metric("gateway_recoveries_total{result=\"epoch_changed\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_redis_publish_is_delivered_live_without_an_offset() {
    let redis = RedisServer::start().await;
    let a = TestNode::start(test_config("p", Some(&redis), &[])).await;
    let (mut c, _) = join_with(a.client, "plain", "").await;
    redis.wait_numsub("gw:room:plain", 1).await;
    redis.publish("gw:room:plain", b"hello").await;
    let m = c.next_message().await;
    assert_eq!(m["data"], "hello");
    assert!(m.get("offset").is_none() && m.get("epoch").is_none());
    let (_, h) = http_history(a.client, "plain", "", &[]).await;
    assert_eq!(h["messages"], json!([]), "not in history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_script_publishes_from_a_stock_client() {
    // What docs/protocol.md tells a PHP or Python backend to do, done with a plain connection.
    let redis = RedisServer::start().await;
    let a = TestNode::start(test_config("s", Some(&redis), &[])).await;
    let (mut c, _) = join_with(a.client, "script", "").await;
    let mut conn = redis.connection().await.unwrap();
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(include_str!("../../src/broker/publish.lua"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let prefix = r#"{"type":"message","room":"script","from":"backend","role":"server","data":{"score":3},"id":"php-1","ts":1700000000000000"#;
    let run = |key: &'static str| {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&sha)
            .arg(3)
            .arg("gw:room:{script}:meta")
            .arg("gw:room:{script}:hist")
            .arg(format!("gw:room:{{script}}:idem:{key}"))
            .arg(prefix)
            .arg(300)
            .arg(600_000)
            .arg(300_000)
            .arg("PUBLISH")
            .arg("gw:room:script")
            .arg(86_400_000)
            .arg("php-1");
        cmd
    };
    let (offset, _epoch, dup, _id): (u64, String, i64, String) =
        run("x").query_async(&mut conn).await.unwrap();
    assert_eq!((offset, dup), (1, 0));
    let (offset, _, dup, _): (u64, String, i64, String) =
        run("x").query_async(&mut conn).await.unwrap();
    assert_eq!((offset, dup), (1, 1), "the same key publishes once");
    let m = c.next_message().await;
    assert_eq!(
        (&m["data"], &m["offset"], &m["from"]),
        (&json!({"score":3}), &json!(1), &json!("backend"))
    );
    c.expect_no_message(Duration::from_millis(300)).await;
}

/// 100 clients that drop their connection every few messages and resume on another node while
/// a host publishes continuously: each gets every message exactly once, in order.
async fn resume_while_publishing(nodes: Vec<SocketAddr>, publish_on: SocketAddr) {
    let room = "race";
    let nodes = Arc::new(RwLock::new(nodes));
    let (mut host, _) = join_with(publish_on, room, "role=host").await;
    host.publish(json!("warm-up")).await;
    let _ = host.next_message().await;
    let (until_tx, until) = watch::channel(None);
    let mut members = tokio::task::JoinSet::new();
    let mut joined = Vec::new();
    for i in 0..100 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        joined.push(rx);
        let r = Resumer {
            nodes: nodes.clone(),
            room: room.into(),
            drop_every: 7 + i % 13,
            until: until.clone(),
            joined: Some(tx),
        };
        members.spawn(r.run(Duration::from_secs(40)));
    }
    for rx in joined {
        rx.await.unwrap();
    }
    let total = 300u64;
    for i in 0..total {
        host.send_text(&json!({"type":"publish","data":i,"key":format!("m{i}")}).to_string())
            .await;
        let ack = host.next_of("ack").await;
        assert_eq!(ack["offset"], i + 2);
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    until_tx.send(Some(total + 1)).unwrap();
    let mut reconnects = 0;
    let mut n = 0;
    while let Some(r) = members.join_next().await {
        let r = r.unwrap();
        r.assert_exactly_once(2, total + 1, &format!("member {n}"));
        reconnects += r.reconnects;
        n += 1;
    }
    assert!(
        reconnects > 100 * 10,
        "members resumed many times ({reconnects})"
    );
    eprintln!("100 members, {reconnects} resumes, 0 lost, 0 duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_resume_while_a_host_publishes_with_redis() {
    let redis = RedisServer::start().await;
    let a = TestNode::start(test_config(
        "c1",
        Some(&redis),
        &["--max-publish-rate", "0"],
    ))
    .await;
    let b = TestNode::start(test_config("c2", Some(&redis), &[])).await;
    resume_while_publishing(vec![a.client, b.client], a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_clients_resume_while_a_host_publishes_in_process() {
    let a = TestNode::start(test_config("m1", None, &["--max-publish-rate", "0"])).await;
    resume_while_publishing(vec![a.client], a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_publish_repeated_after_a_dropped_connection_is_published_once() {
    let cluster = TestCluster::start(&["i1", "i2"], &[]).await;
    let (a, b) = (&cluster[0], &cluster[1]);
    let (mut watcher, _) = join_with(b.client, "idem", "").await;
    for round in 0..10 {
        let key = format!("once-{round}");
        // Send and drop the connection at once, before any ack can arrive.
        let (mut first, _) = join_with(a.client, "idem", "role=host").await;
        first
            .send_text(&json!({"type":"publish","data":round,"key":key}).to_string())
            .await;
        drop(first);
        // The publisher does not know whether it got through: it sends again with the same key.
        let (mut second, _) = join_with(b.client, "idem", "role=host").await;
        second
            .send_text(&json!({"type":"publish","data":round,"key":key}).to_string())
            .await;
        let ack = second.next_of("ack").await;
        let m = watcher.next_message().await;
        assert_eq!((&m["data"], &m["offset"]), (&json!(round), &ack["offset"]));
    }
    watcher.expect_no_message(Duration::from_millis(500)).await;
}

/// Publishes over HTTP at `rate` per second to a random live node until `stop`, each with its own
/// idempotency key, retrying a failed publish with the same key; returns the last offset.
async fn http_publisher(
    nodes: Arc<RwLock<Vec<SocketAddr>>>,
    room: &'static str,
    rate: u64,
    run_for: Duration,
) -> u64 {
    let start = Instant::now();
    let mut last = 0;
    let mut i = 0u64;
    while start.elapsed() < run_for {
        i += 1;
        let key = format!("p{i}");
        loop {
            let addr = {
                let n = nodes.read().unwrap();
                n[fastrand::usize(..n.len())]
            };
            let path = format!("/api/rooms/{room}/messages");
            let body = json!(i).to_string();
            match http(
                addr,
                "POST",
                &path,
                &[("Idempotency-Key", &key)],
                body.as_bytes(),
            )
            .await
            {
                Ok((202, b)) => {
                    let v: Value = serde_json::from_slice(&b).unwrap();
                    let o = v["offset"].as_u64().unwrap();
                    assert!(o > last, "offsets grow: {o} after {last}");
                    last = o;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let next = start + Duration::from_millis(i * 1000 / rate);
        tokio::time::sleep_until(next.into()).await;
    }
    last
}

/// Starts `n` resumers on `nodes` in `room`; returns their handles once all are welcomed.
async fn start_viewers(
    n: usize,
    nodes: &Arc<RwLock<Vec<SocketAddr>>>,
    room: &str,
    until: &watch::Receiver<Option<u64>>,
) -> tokio::task::JoinSet<Resumed> {
    let mut set = tokio::task::JoinSet::new();
    let mut joined = Vec::new();
    for _ in 0..n {
        let (tx, rx) = tokio::sync::oneshot::channel();
        joined.push(rx);
        let r = Resumer {
            nodes: nodes.clone(),
            room: room.into(),
            drop_every: 0,
            until: until.clone(),
            joined: Some(tx),
        };
        set.spawn(r.run(Duration::from_secs(50)));
    }
    for rx in joined {
        rx.await.unwrap();
    }
    set
}

async fn check_viewers(mut set: tokio::task::JoinSet<Resumed>, first: u64, last: u64) -> usize {
    let mut reconnected = 0;
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        r.assert_exactly_once(first, last, &format!("viewer {n}"));
        reconnected += usize::from(r.reconnects > 0);
        n += 1;
    }
    reconnected
}

/// Warms `room` up with one publish (so welcomes carry an epoch).
async fn warm_up(addr: SocketAddr, room: &str) {
    let (status, _) = http(
        addr,
        "POST",
        &format!("/api/rooms/{room}/messages"),
        &[],
        b"0",
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_a_node_mid_stream_its_viewers_resume_elsewhere_exactly_once() {
    let redis = RedisServer::start().await;
    let n1 = GatewayProcess::start("k1", Some(&redis), &[]).await;
    let n2 = GatewayProcess::start("k2", Some(&redis), &[]).await;
    let mut n3 = GatewayProcess::start("k3", Some(&redis), &[]).await;
    warm_up(n1.client, "kill").await;
    let nodes = Arc::new(RwLock::new(vec![n1.client, n2.client, n3.client]));
    let (until_tx, until) = watch::channel(None);
    let viewers = start_viewers(300, &nodes, "kill", &until).await;
    let publisher_nodes = Arc::new(RwLock::new(vec![n1.client, n2.client]));
    let publisher = tokio::spawn(http_publisher(
        publisher_nodes,
        "kill",
        20,
        Duration::from_secs(4),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes.write().unwrap().retain(|a| *a != n3.client);
    n3.kill();
    let last = publisher.await.unwrap();
    until_tx.send(Some(last)).unwrap();
    let reconnected = check_viewers(viewers, 2, last).await;
    assert!(
        reconnected > 50,
        "the killed node's viewers resumed ({reconnected})"
    );
    assert!(
        n1.metric("gateway_recoveries_total{result=\"complete\"}")
            .await
            + n2.metric("gateway_recoveries_total{result=\"complete\"}")
                .await
            >= reconnected as f64
    );
    eprintln!("SIGKILL: {reconnected} viewers resumed, {last} offsets each, 0 lost, 0 duplicated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_drain_of_three_nodes_with_a_host_at_20_per_second_loses_nothing() {
    let viewers: usize = std::env::var("CONTINUITY_VIEWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let redis = RedisServer::start().await;
    let flags = ["--drain-seconds", "2"];
    let mut procs = Vec::new();
    for i in 0..3 {
        procs.push(GatewayProcess::start(&format!("old{i}"), Some(&redis), &flags).await);
    }
    warm_up(procs[0].client, "drain").await;
    let nodes = Arc::new(RwLock::new(
        procs.iter().map(|p| p.client).collect::<Vec<_>>(),
    ));
    let (until_tx, until) = watch::channel(None);
    let set = start_viewers(viewers, &nodes, "drain", &until).await;
    let started = Instant::now();
    let publisher = tokio::spawn(http_publisher(
        nodes.clone(),
        "drain",
        20,
        Duration::from_secs(600),
    ));
    // Replace each node in turn: start the new one, take the old one out, SIGTERM it (1012 over
    // 2 s), wait for its exit.
    let mut new = Vec::new();
    for (i, mut old) in procs.into_iter().enumerate() {
        let fresh = GatewayProcess::start(&format!("new{i}"), Some(&redis), &flags).await;
        {
            let mut n = nodes.write().unwrap();
            n.push(fresh.client);
            n.retain(|a| *a != old.client);
        }
        old.terminate();
        let (status, _) = old.wait_exit(Duration::from_secs(10)).await;
        assert!(status.success());
        new.push(fresh);
    }
    publisher.abort();
    let _ = publisher.await;
    // The last acked offset: read it from the room's position.
    let (_, h) = http_history(new[0].client, "drain", "limit=1", &[]).await;
    let last = h["offset"].as_u64().unwrap();
    until_tx.send(Some(last)).unwrap();
    let reconnected = check_viewers(set, 2, last).await;
    assert_eq!(
        reconnected, viewers,
        "every viewer was drained at least once"
    );
    eprintln!(
        "rolling drain: {viewers} viewers, {} messages, {:?}, 0 lost, 0 duplicated",
        last - 1,
        started.elapsed()
    );
}

/// Issue 21: a node whose subscription missed messages (here Redis dropped every subscriber
/// connection, as a failover or a network cut would) fills the gap from history before the next
/// message, so its members get every message once, in order, with no resume and no reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_fills_a_gap_in_its_subscription_from_history() {
    let cluster = TestCluster::start(&["a", "b"], &[]).await;
    let (redis, a, b) = (cluster.redis(), &cluster[0], &cluster[1]);
    let (mut va, _) = join_with(a.client, "gap", "role=viewer&name=va").await;
    let (mut vb, _) = join_with(b.client, "gap", "role=viewer&name=vb").await;
    publish_n(a, "gap", 2).await;
    assert_eq!(offsets(&mut va, 2).await, [1, 2]);
    assert_eq!(offsets(&mut vb, 2).await, [1, 2]);
    // Both nodes' subscriber connections dropped; publishes go on through the command
    // connections (acknowledged, in history) while the subscribers reconnect.
    let mut c = redis.connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(killed >= 2, "killed {killed} subscriber connections");
    publish_n(a, "gap", 5).await;
    // Once the subscriptions are back, the next message shows the gap and the nodes fill it.
    eventually("both subscribers back", || async {
        a.metric("gateway_redis_connected").await == 1.0
            && b.metric("gateway_redis_connected").await == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_n(a, "gap", 1).await;
    assert_eq!(offsets(&mut va, 6).await, [3, 4, 5, 6, 7, 8]);
    assert_eq!(offsets(&mut vb, 6).await, [3, 4, 5, 6, 7, 8]);
    va.expect_no_message(Duration::from_millis(300)).await;
    vb.expect_no_message(Duration::from_millis(300)).await;
    for n in [a, b] {
        assert!(
            n.metric("gateway_gap_fills_total{result=\"filled\"}").await >= 1.0,
            "node {} filled the gap",
            n.id
        );
        assert_eq!(
            n.metric("gateway_recoveries_total{result=\"complete\"}")
                .await,
            0.0,
            "no member resumed"
        );
    }
}
