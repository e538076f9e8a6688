//! Redis outages against a real `redis-server` that the tests kill, restart and freeze: nodes
//! stay up, say they are not ready, keep local fan-out, refuse publishes clearly, and resume
//! cross-node delivery by themselves after Redis returns.

use std::time::{Duration, Instant};

use crate::common::*;
use gateway::Config;
use serde_json::json;

/// The longest wait between reconnect attempts in these tests (`--redis-backoff-cap`; 2 s in
/// production): a tenth, so that an outage many caps long takes seconds rather than half a
/// minute. What the tests assert is relative to it.
const BACKOFF_CAP: Duration = Duration::from_millis(200);

/// [`test_config`] with the short backoff cap.
fn outage_config(node_id: &str, redis: &RedisServer, extra: &[&str]) -> Config {
    let mut config = test_config(node_id, Some(redis), extra);
    config.redis_backoff_cap = BACKOFF_CAP;
    config
}

async fn readyz(node: &TestNode) -> u16 {
    http(node.admin, "GET", "/readyz", &[], b"")
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// Two nodes, a member of room `r` on each; checks cross-node delivery works.
async fn setup(redis: &RedisServer) -> (TestNode, TestNode, WsClient, WsClient) {
    let n1 = TestNode::start(outage_config("n1", redis, &[])).await;
    let n2 = TestNode::start(outage_config("n2", redis, &[])).await;
    let mut a = n1.join("r", "host", "a").await;
    let mut b = n2.join("r", "viewer", "b").await;
    redis.wait_numsub("gw:room:r", 2).await;
    a.publish(json!("before")).await;
    assert_eq!(b.next_message().await["data"], "before");
    assert_eq!(a.next_message().await["data"], "before");
    (n1, n2, a, b)
}

async fn expect_outage_seen(nodes: [&TestNode; 2]) {
    for n in nodes {
        eventually("redis_connected drops to 0", || async {
            n.metric("gateway_redis_connected").await == 0.0
        })
        .await;
        eventually("/readyz fails", || async { readyz(n).await == 503 }).await;
        let (status, _) = http(n.admin, "GET", "/healthz", &[], b"").await.unwrap();
        assert_eq!(status, 200, "liveness never depends on Redis");
    }
}

/// After Redis is back: both nodes ready within 5 s and cross-node delivery resumed.
async fn expect_recovery(n1: &TestNode, n2: &TestNode, a: &mut WsClient, b: &mut WsClient) {
    let back = Instant::now();
    for n in [n1, n2] {
        eventually("ready again", || async { readyz(n).await == 200 }).await;
    }
    // Cross-node delivery resumes: keep publishing until one gets through, within 5 s.
    let mut i = 0;
    loop {
        i += 1;
        a.publish(json!({"after": i})).await;
        if let Some(m) = b.next_json_within(Duration::from_millis(200)).await {
            if m["type"] == "message" && m["data"]["after"].is_number() {
                break;
            }
        }
        assert!(
            back.elapsed() < Duration::from_secs(5),
            "cross-node delivery did not resume within 5 s"
        );
    }
    // And it is steady: the next one arrives too.
    a.publish(json!("steady")).await;
    loop {
        let m = b.next_message().await;
        if m["data"] == "steady" {
            break;
        }
    }
    assert!(
        n1.metric("gateway_redis_reconnects_total{connection=\"subscriber\"}")
            .await
            >= 1.0
    );
    assert_eq!(n2.metric("gateway_redis_connected").await, 1.0);
    for n in [n1, n2] {
        let rooms = n.metric("gateway_rooms").await;
        assert_eq!(
            n.metric("gateway_broker_subscriptions").await,
            rooms,
            "every room resubscribed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_outage_nodes_stay_up_publishes_fail_clearly_and_delivery_resumes() {
    let mut redis = RedisServer::start().await;
    let (n1, n2, mut a, mut b) = setup(&redis).await;
    let mut a_local = n1.join("r", "viewer", "a2").await;

    redis.kill();
    expect_outage_seen([&n1, &n2]).await;

    // A client publish during the outage: an error event, and local members still get it.
    a.publish(json!("during")).await;
    let e = a.next_of("error").await;
    assert_eq!(e["code"], "unavailable");
    assert_eq!(
        a_local.next_message().await["data"],
        "during",
        "local fan-out keeps working"
    );
    b.expect_no_message(Duration::from_millis(300)).await;
    // The HTTP API: 503 with Retry-After, never a silent drop.
    let (status, body) = http_publish(&n2, "r", &[], b"x").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
    assert!(
        n1.metric("gateway_messages_dropped_total{reason=\"broker_unavailable\"}")
            .await
            >= 1.0
    );
    assert!(
        n2.metric("gateway_messages_dropped_total{reason=\"broker_unavailable\"}")
            .await
            >= 1.0
    );
    // Joining during the outage works (the subscription is made when Redis returns).
    let mut late = n2.join("late", "viewer", "l").await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().await;
    expect_recovery(&n1, &n2, &mut a, &mut b).await;
    redis.wait_numsub("gw:room:late", 1).await;
    redis.publish("gw:room:late", b"welcome back").await;
    assert_eq!(late.next_message().await["data"], "welcome back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// An outage of over fifteen backoff caps (31 s with the production cap of 2 s; 3.1 s with the
/// tests' cap): every reconnect loop has long reached its longest wait and keeps trying.
async fn long_outage_of_over_fifteen_backoff_caps_recovers_without_restart() {
    let mut redis = RedisServer::start().await;
    let (n1, n2, mut a, mut b) = setup(&redis).await;
    redis.kill();
    expect_outage_seen([&n1, &n2]).await;
    tokio::time::sleep(BACKOFF_CAP * 31 / 2).await;
    assert_eq!(
        readyz(&n1).await,
        503,
        "still honest after fifteen backoff caps"
    );
    redis.restart().await;
    expect_recovery(&n1, &n2, &mut a, &mut b).await;
    assert!(
        n1.metric("gateway_redis_reconnects_total{connection=\"publisher\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_detected_by_the_probe_and_handled_as_an_outage() {
    let redis = RedisServer::start().await;
    let (n1, n2, mut a, mut b) = setup(&redis).await;
    redis.signal("STOP");
    let frozen = Instant::now();
    expect_outage_seen([&n1, &n2]).await;
    // Probe interval 500 ms + timeout 1 s, plus scheduling slack.
    assert!(
        frozen.elapsed() < Duration::from_secs(4),
        "took {:?}",
        frozen.elapsed()
    );
    a.publish(json!("while frozen")).await;
    assert_eq!(a.next_of("error").await["code"], "unavailable");
    redis.signal("CONT");
    expect_recovery(&n1, &n2, &mut a, &mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_comes_up_when_it_returns() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let node = TestNode::start_unready(outage_config("n1", &redis, &[])).await;
    eventually("admin answers", || async { readyz(&node).await == 503 }).await;
    let mut c = node.join("r", "viewer", "c").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart().await;
    node.wait_ready().await;
    redis.wait_numsub("gw:room:r", 1).await;
    redis.publish("gw:room:r", b"hello").await;
    assert_eq!(c.next_message().await["data"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_rooms_than_one_subscribe_batch_are_all_resubscribed_after_a_restart() {
    // The subscriber sends SUBSCRIBE in batches of 500 channels; 600 rooms take two.
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(outage_config("n1", &redis, &[])).await;
    let mut members = Vec::new();
    for i in 0..600 {
        members.push(node.join(&format!("r{i}"), "viewer", "v").await);
    }
    eventually("600 subscriptions", || async {
        node.metric("gateway_broker_subscriptions").await == 600.0
    })
    .await;
    redis.kill();
    eventually("outage seen", || async {
        node.metric("gateway_redis_connected").await == 0.0
    })
    .await;
    redis.restart().await;
    node.wait_ready().await;
    eventually("600 subscriptions again", || async {
        node.metric("gateway_broker_subscriptions").await == 600.0
    })
    .await;
    for i in [0, 499, 500, 599] {
        redis.wait_numsub(&format!("gw:room:r{i}"), 1).await;
        redis.publish(&format!("gw:room:r{i}"), b"back").await;
        assert_eq!(members[i].next_message().await["data"], "back");
    }
}

/// With `--broker-loss-close`, a node that lost Redis hands its clients over: they are closed
/// with 4002 (reconnect with backoff) once the outage lasted that long, spread over a second,
/// while the node fails `/readyz`; a client that joins during the outage is closed the same way
/// at the next round; nobody is closed while Redis is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_redis_hands_its_clients_over_with_4002() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(outage_config("n1", &redis, &["--broker-loss-close", "1s"])).await;
    let mut a = node.join("r", "viewer", "a").await;
    let mut b = node.join("r", "viewer", "b").await;
    a.expect_no_message(Duration::from_millis(1500)).await;
    redis.kill();
    let killed = std::time::Instant::now();
    for c in [&mut a, &mut b] {
        match c.ended(Duration::from_secs(10)).await {
            Ended::Closed(code) => assert_eq!(code, 4002),
            Ended::Dropped => panic!("closed without a Close frame"),
        }
    }
    let after = killed.elapsed();
    // Detection (probe + timeout, ≤ 1.5 s here) + the 1 s limit + the 1 s spread.
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(6),
        "{after:?}"
    );
    assert_eq!(readyz(&node).await, 503);
    let mut late = WsClient::connect(&node.ws_url("r", "role=viewer")).await;
    match late.ended(Duration::from_secs(5)).await {
        Ended::Closed(code) => assert_eq!(code, 4002),
        Ended::Dropped => panic!("closed without a Close frame"),
    }
    assert_eq!(
        node.metric("gateway_connections_closed_total{node=\"n1\",reason=\"broker_lost\"}")
            .await,
        3.0
    );
    redis.restart().await;
    eventually("ready again", || async { readyz(&node).await == 200 }).await;
    let mut c = node.join("r", "viewer", "c").await;
    c.expect_no_message(Duration::from_secs(2)).await;
    node.stop().await;
}

/// A Redis that lost its script cache without losing the connection (`SCRIPT FLUSH`; a restart
/// or failover does the same) answers `EVALSHA` with `NOSCRIPT`: the broker sends the script
/// itself once (`EVAL`, which caches it again), and the publish goes through without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_scripts_gets_them_again_and_publishes_go_through() {
    let redis = RedisServer::start().await;
    let (n1, n2, mut a, mut b) = setup(&redis).await;
    let sha = redis::Script::new(include_str!("../../src/broker/publish.lua"))
        .get_hash()
        .to_string();
    let cached = || async {
        redis_at(redis.port, &["SCRIPT", "EXISTS", &sha])
            .await
            .map(|v| matches!(v, redis::Value::Array(a) if a == [redis::Value::Int(1)]))
            .unwrap()
    };
    assert!(
        cached().await,
        "publish.lua is cached after the first publish"
    );
    redis_at(redis.port, &["SCRIPT", "FLUSH"]).await.unwrap();
    assert!(!cached().await);
    a.publish(json!("after flush")).await;
    assert_eq!(b.next_message().await["data"], "after flush");
    let own = a.next_json().await;
    assert_eq!(
        (own["type"].as_str(), own["data"].as_str()),
        (Some("message"), Some("after flush")),
        "no error event: {own}"
    );
    assert!(cached().await, "the fallback cached the script again");
    for n in [&n1, &n2] {
        assert_eq!(n.metric("gateway_broker_publish_errors_total").await, 0.0);
    }
}
