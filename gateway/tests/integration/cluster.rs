//! Three gateway nodes on one real `redis-server`: fan-out across nodes from every publish source,
//! subscription only where members are, and unsubscribe after the last member leaves.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publish_reaches_members_on_every_node_and_the_publisher() {
    let cluster = TestCluster::start(&["n1", "n2", "n3"], &[]).await;
    let (redis, nodes) = (cluster.redis(), &cluster.nodes);
    let mut host = nodes[0].join("show", "host", "alice").await;
    let mut v1 = nodes[0].join("show", "viewer", "bob").await;
    let mut v2 = nodes[1].join("show", "viewer", "carol").await;
    let mut v3 = nodes[2].join("show", "viewer", "dave").await;
    redis.wait_numsub("gw:room:show", 3).await;

    host.publish(json!({"slide": 3, "text": "hi"})).await;
    let mut ids = Vec::new();
    for c in [&mut host, &mut v1, &mut v2, &mut v3] {
        let m = c.next_message().await;
        assert_eq!(m["room"], "show");
        assert_eq!(m["from"], "alice");
        assert_eq!(m["role"], "host");
        assert_eq!(m["data"], json!({"slide": 3, "text": "hi"}));
        assert!(
            m["ts"].as_u64().unwrap() > 1_600_000_000_000_000,
            "ts is unix microseconds"
        );
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "one message, one id: {ids:?}"
    );

    // A viewer chats with plain text: everyone, on every node, gets it as a string.
    v3.send_text("hello world!").await;
    for c in [&mut host, &mut v1, &mut v2, &mut v3] {
        let m = c.next_message().await;
        assert_eq!(m["data"], "hello world!");
        assert_eq!(m["role"], "viewer");
        assert_eq!(m["from"], "dave");
    }
    // Exactly once each: nothing else is queued.
    for c in [&mut host, &mut v1, &mut v2, &mut v3] {
        c.expect_no_message(Duration::from_millis(300)).await;
    }
    assert_eq!(
        nodes[0]
            .metric("gateway_messages_published_total{source=\"client\"}")
            .await,
        1.0
    );
    assert_eq!(
        nodes[2]
            .metric("gateway_messages_published_total{source=\"client\"}")
            .await,
        1.0
    );
    // One fan-out latency sample per message per node, not per member.
    assert_eq!(
        nodes[0]
            .metric("gateway_fanout_latency_seconds_count")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_and_raw_redis_publish_reach_every_node() {
    let cluster = TestCluster::start(&["n1", "n2", "n3"], &[]).await;
    let (redis, nodes) = (cluster.redis(), &cluster.nodes);
    let mut viewers = Vec::new();
    for n in nodes {
        viewers.push(n.join("news", "viewer", "v").await);
    }
    redis.wait_numsub("gw:room:news", 3).await;

    let (status, body) = http_publish(
        &nodes[1],
        "news",
        &[("Content-Type", "application/json")],
        br#"{"headline":"up"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    for v in &mut viewers {
        let m = v.next_message().await;
        assert_eq!(m["role"], "server");
        assert_eq!(m["from"], serde_json::Value::Null);
        assert_eq!(m["data"], json!({"headline":"up"}));
        assert_eq!(m["id"], id.as_str());
    }

    let (status, _) = http(
        nodes[2].client,
        "POST",
        "/api/rooms/news/messages?from=desk",
        &[("Content-Type", "text/plain")],
        b"42",
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    for v in &mut viewers {
        let m = v.next_message().await;
        assert_eq!(m["data"], "42", "text/plain is always a string");
        assert_eq!(m["from"], "desk");
    }

    // Any program with a stock Redis client: a raw string payload.
    assert_eq!(
        redis.publish("gw:room:news", b"breaking: it works").await,
        3
    );
    for v in &mut viewers {
        let m = v.next_message().await;
        assert_eq!(m["role"], "server");
        assert_eq!(m["data"], "breaking: it works");
        assert_eq!(m["from"], serde_json::Value::Null);
        assert_eq!(m["room"], "news");
    }
    // JSON that is not our envelope is still a raw string.
    redis.publish("gw:room:news", br#"{"score":3}"#).await;
    for v in &mut viewers {
        assert_eq!(v.next_message().await["data"], r#"{"score":3}"#);
    }
    for n in nodes {
        assert_eq!(
            n.metric("gateway_messages_published_total{source=\"redis\"}")
                .await,
            2.0
        );
    }
    assert_eq!(
        nodes[1]
            .metric("gateway_messages_published_total{source=\"http\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_members_of_a_room_gets_none_of_its_traffic() {
    let cluster = TestCluster::start(&["n1", "n2", "n3"], &[]).await;
    let (redis, nodes) = (cluster.redis(), &cluster.nodes);
    let mut a = nodes[0].join("busy", "host", "h").await;
    let mut b = nodes[1].join("busy", "viewer", "v").await;
    let mut other = nodes[2].join("quiet", "viewer", "q").await;
    redis.wait_numsub("gw:room:busy", 2).await;
    redis.wait_numsub("gw:room:quiet", 1).await;
    let before = nodes[2]
        .metric("gateway_broker_messages_received_total")
        .await;

    for i in 0..20 {
        a.publish(json!(i)).await;
    }
    for i in 0..20 {
        assert_eq!(a.next_message().await["data"], i);
        assert_eq!(b.next_message().await["data"], i, "in order");
    }
    let (status, _) = http_publish(&nodes[2], "busy", &[], b"via node 3").await;
    assert_eq!(
        status, 202,
        "node 3 can publish into a room it is not subscribed to"
    );
    assert_eq!(b.next_message().await["data"], "via node 3");

    other.expect_no_message(Duration::from_millis(300)).await;
    let after = nodes[2]
        .metric("gateway_broker_messages_received_total")
        .await;
    assert_eq!(
        after, before,
        "node 3 received traffic of a room it has no member in"
    );
    assert_eq!(nodes[2].metric("gateway_broker_subscriptions").await, 1.0);
    assert_eq!(
        nodes[0]
            .metric("gateway_broker_messages_received_total")
            .await,
        21.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribes_after_the_last_member_leaves() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config("n1", Some(&redis), &[])).await;
    let a = node.join("ephemeral", "viewer", "a").await;
    let b = node.join("ephemeral", "viewer", "b").await;
    redis.wait_numsub("gw:room:ephemeral", 1).await;
    assert_eq!(node.metric("gateway_rooms").await, 1.0);
    a.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        redis.numsub("gw:room:ephemeral").await,
        1,
        "one member is still there"
    );
    b.close().await;
    redis.wait_numsub("gw:room:ephemeral", 0).await;
    eventually("subscriptions gauge drops", || async {
        node.metric("gateway_broker_subscriptions").await == 0.0
    })
    .await;
    assert_eq!(node.metric("gateway_rooms").await, 0.0);
    assert_eq!(
        node.metric("gateway_connections_closed_total{reason=\"client_closed\"}")
            .await,
        2.0
    );

    // A member who rejoins within the unsubscribe delay keeps the subscription (no churn) and
    // receives messages.
    let c = node.join("ephemeral", "viewer", "c").await;
    redis.wait_numsub("gw:room:ephemeral", 1).await;
    c.close().await;
    let mut d = node.join("ephemeral", "viewer", "d").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(redis.numsub("gw:room:ephemeral").await, 1);
    redis.publish("gw:room:ephemeral", b"still here").await;
    assert_eq!(d.next_message().await["data"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_node_label_and_real_buckets() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config("metrics-node", Some(&redis), &[])).await;
    let mut v = node.join("m", "viewer", "v").await;
    let mut h = node.join("m", "host", "h").await;
    h.publish(json!("x")).await;
    v.next_message().await;
    h.next_message().await;
    let text = node.metrics().await;
    for series in [
        "gateway_connections",
        "gateway_rooms",
        "gateway_connections_opened_total",
        "gateway_connections_closed_total",
        "gateway_messages_published_total",
        "gateway_messages_delivered_total",
        "gateway_messages_dropped_total",
        "gateway_fanout_latency_seconds_bucket",
        "gateway_broker_messages_received_total",
        "gateway_redis_connected",
        "gateway_redis_reconnects_total",
        "gateway_build_info",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_threads",
    ] {
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(series)).collect();
        assert!(!lines.is_empty(), "{series} missing");
        assert!(
            lines.iter().all(|l| l.contains("node=\"metrics-node\"")),
            "{series} lacks node label"
        );
    }
    // The process series follow the Prometheus client libraries' conventions: CPU seconds are a
    // counter.
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );
    assert!(metric_value(&text, "process_open_fds") >= 4.0);
    assert!(metric_value(&text, "process_resident_memory_bytes") > 1e6);
    assert!(
        text.contains("le=\"0.0001\""),
        "fan-out latency has buckets from 100 µs"
    );
    assert!(text.contains("le=\"10\""), "… to 10 s");
    assert_eq!(
        metric_value(&text, "gateway_connections{role=\"host\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&text, "gateway_connections{role=\"viewer\"}"),
        1.0
    );
    assert_eq!(metric_value(&text, "gateway_redis_connected"), 1.0);
    // welcome + presence + message, to each of the two members (counted once the write returned,
    // which can be just after the client read it).
    eventually("6 frames delivered", || async {
        node.metric("gateway_messages_delivered_total").await == 6.0
    })
    .await;
    let (status, body) = http(node.admin, "GET", "/healthz", &[], b"").await.unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
}
