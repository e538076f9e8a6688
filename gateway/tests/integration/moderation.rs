//! Moderation on real nodes: kick and ban through the API reach clients on every node of a
//! Redis cluster within a second, bans refuse new upgrades, the control channel's room name is
//! reserved, the in-process broker moderates a single node, and the control channel is
//! subscribed again after a Redis restart.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

async fn api(node: &TestNode, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, body) = http(
        node.client,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_and_ban_reach_clients_on_all_three_nodes() {
    let flags = jwt_flags(&[
        "--api-key",
        "old-key-0000,moderator-key-123",
        "--allow-anonymous-viewers",
        "*",
    ]);
    let cluster = TestCluster::start(&["n1", "n2", "n3"], &flags).await;
    let (redis, nodes) = (cluster.redis(), &cluster.nodes);
    redis.wait_numsub("gw:room:_control", 3).await;
    let t = |sub: &str| token(&claims(sub, &[("*", "viewer")], 600));

    // The API needs a key.
    let (status, _) = http(
        nodes[0].client,
        "POST",
        "/api/users/u1/disconnect",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);

    // Kick u1 everywhere: its sessions on all three nodes close with 4501 within 1 s; u2 stays.
    let mut u1 = Vec::new();
    let mut u2 = Vec::new();
    for n in nodes {
        u1.push(connect_token(n.client, "r", &t("u1")).await.unwrap().0);
        u2.push(connect_token(n.client, "r", &t("u2")).await.unwrap().0);
    }
    let (status, body) = api(&nodes[0], "POST", "/api/users/u1/disconnect", Value::Null).await;
    assert_eq!(status, 202, "{body}");
    // Within a second of the API's answer, on every node.
    for c in &mut u1 {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    }
    for c in &mut u2 {
        c.send_text(r#"{"type":"ping"}"#).await;
        assert_eq!(c.next_of("pong").await["type"], "pong");
    }

    // Everyone in a room, on every node, anonymous viewers too.
    let mut in_room = Vec::new();
    for n in nodes {
        in_room.push(connect_token(n.client, "stage", &t("u3")).await.unwrap().0);
        in_room.push(connect(n.client, "stage", "name=Guest").await.unwrap().0);
    }
    let (status, _) = api(
        &nodes[1],
        "POST",
        "/api/rooms/stage/disconnect",
        Value::Null,
    )
    .await;
    assert_eq!(status, 202);
    for c in &mut in_room {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    }

    // Ban u2 from room r for 2 s: closed with 4502 everywhere, refused (403) while it lasts,
    // welcome again when it expired. Other rooms stay open to u2.
    let (status, body) = api(
        &nodes[2],
        "PUT",
        "/api/bans",
        json!({"sub":"u2","room":"r","duration":"2s"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let banned_at = Instant::now();
    for c in &mut u2 {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4502));
    }
    let (status, _, body) =
        raw_upgrade(nodes[0].client, &format!("/ws/r?token={}", t("u2")), &[]).await;
    assert_eq!(status, 403);
    assert_eq!(body["message"], "banned");
    assert!(connect_token(nodes[1].client, "elsewhere", &t("u2"))
        .await
        .is_ok());
    let (status, list) = api(&nodes[1], "GET", "/api/bans?sub=u2", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(list["bans"][0]["room"], "r", "{list}");
    let mut c = redis.connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gw:room:ban:u2")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 2000,
        "the ban lives in Redis with its TTL ({ttl} ms)"
    );
    loop {
        match connect_token(nodes[2].client, "r", &t("u2")).await {
            Ok(_) => break,
            Err(403) => {
                assert!(
                    banned_at.elapsed() < Duration::from_secs(5),
                    "the ban never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("unexpected {s}"),
        }
    }
    assert!(
        banned_at.elapsed() >= Duration::from_millis(1900),
        "refused until it expired"
    );

    // A ban from every room, lifted by DELETE.
    let (status, _) = api(
        &nodes[0],
        "PUT",
        "/api/bans",
        json!({"sub":"u4","room":null,"duration":600}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        connect_token(nodes[1].client, "any", &t("u4")).await.err(),
        Some(403)
    );
    let (status, body) = api(
        &nodes[0],
        "DELETE",
        "/api/bans",
        json!({"sub":"u4","room":null}),
    )
    .await;
    assert_eq!((status, body["removed"].clone()), (200, json!(true)));
    assert!(connect_token(nodes[1].client, "any", &t("u4"))
        .await
        .is_ok());
    // Bad bodies.
    let (status, _) = api(
        &nodes[0],
        "PUT",
        "/api/bans",
        json!({"sub":"u4","duration":"forever"}),
    )
    .await;
    assert_eq!(status, 400);
    let mut banned = 0.0;
    for n in nodes {
        banned += n
            .metric("gateway_auth_failures_total{reason=\"banned\"}")
            .await;
    }
    assert!(banned >= 2.0, "ban refusals are counted ({banned})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_name_of_the_control_channel_is_reserved() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    assert_eq!(connect(node.client, "_control", "").await.err(), Some(400));
    let (status, _) = http_publish(&node, "_control", &[], b"{}").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_works_with_the_in_process_broker_and_needs_a_key() {
    let node = TestNode::start(test_config(
        "solo",
        None,
        &jwt_flags(&["--api-key", API_KEY]),
    ))
    .await;
    let t = token(&claims("u1", &[("*", "viewer")], 600));
    let (mut a, _) = connect_token(node.client, "r", &t).await.unwrap();
    let (status, _) = http(
        node.client,
        "POST",
        "/api/users/u1/disconnect",
        &[("Authorization", "Bearer wrong-key-123")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = api(&node, "POST", "/api/rooms/r/disconnect", Value::Null).await;
    assert_eq!(status, 202);
    assert_eq!(a.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    let (status, _) = api(
        &node,
        "PUT",
        "/api/bans",
        json!({"sub":"u1","room":null,"duration":"1m"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(connect_token(node.client, "r", &t).await.err(), Some(403));
    let (_, list) = api(&node, "GET", "/api/bans?sub=u1", Value::Null).await;
    assert_eq!(list["bans"][0]["room"], Value::Null, "{list}");
    assert_eq!(
        node.metric("gateway_control_commands_total{result=\"applied\"}")
            .await,
        2.0
    );
    // Without any API key the moderation routes are refused outright.
    let open = TestNode::start(test_config(
        "open",
        None,
        &["--auth", "jwt", "--jwt-hmac-secret", SECRET, "--open-api"],
    ))
    .await;
    let (status, body) = api(&open, "POST", "/api/users/u1/disconnect", Value::Null).await;
    assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_is_subscribed_again_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt_flags(&["--api-key", API_KEY]),
    ))
    .await;
    redis.wait_numsub("gw:room:_control", 1).await;
    redis.restart().await;
    redis.wait_numsub("gw:room:_control", 1).await;
    node.wait_ready().await;
    let t = token(&claims("u1", &[("r", "viewer")], 600));
    let (mut c, _) = connect_token(node.client, "r", &t).await.unwrap();
    // A backend may publish a command itself.
    redis
        .publish(
            "gw:room:_control",
            br#"{"type":"disconnect","sub":"u1","room":null,"reason":"kicked"}"#,
        )
        .await;
    assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    redis.publish("gw:room:_control", b"not a command").await;
    let n = &node;
    eventually("the invalid command is counted", || async move {
        n.metric("gateway_control_commands_total{result=\"invalid\"}")
            .await
            == 1.0
    })
    .await;
}
