//! Refusals before the upgrade and on the HTTP API: room names, roles, names, API key, methods.

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_room_role_or_name_is_refused_with_400_before_the_upgrade() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    let long = "x".repeat(129);
    for path in [
        "/ws/bad%20room".to_string(),
        "/ws/".to_string(),
        "/ws/a/b".to_string(),
        format!("/ws/{long}"),
        "/ws/ok?role=admin".to_string(),
        "/ws/ok?role=server".to_string(),
        "/ws/ok?name=%0A".to_string(),
        "/ws/ok?name=%zz".to_string(),
    ] {
        let url = format!("ws://{}{path}", node.client);
        assert_eq!(
            WsClient::connect_status(&url).await.err(),
            Some(400),
            "{path}"
        );
    }
    assert_eq!(
        node.metric("gateway_connections_refused_total{reason=\"bad_request\"}")
            .await,
        8.0
    );
    assert_eq!(node.metric("gateway_connections_opened_total").await, 0.0);

    // The longest valid name and every allowed character are fine.
    let ok = "A-z_0.9:x".to_string() + &"y".repeat(119);
    let mut c = WsClient::connect(&node.ws_url(&ok, "role=host&name=Zo%C3%AB+B")).await;
    let w = c.next_of("welcome").await;
    assert_eq!(w["room"], ok.as_str());
    assert_eq!(w["role"], "host");
    assert_eq!(w["name"], "Zoë B");

    // Without an upgrade, /ws/ answers 426; unknown paths 404.
    let (status, _) = http(node.client, "GET", "/ws/room", &[], b"")
        .await
        .unwrap();
    assert_eq!(status, 426);
    let (status, _) = http(node.client, "GET", "/nope", &[], b"").await.unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_upgrade_on_root_joins_the_lobby_and_root_without_upgrade_answers() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    let mut a = WsClient::connect(&format!("ws://{}", node.client)).await;
    let w = a.next_of("welcome").await;
    assert_eq!(w["room"], "lobby");
    assert_eq!(w["role"], "viewer");
    assert_eq!(w["name"], serde_json::Value::Null);
    let mut b = node.join("lobby", "viewer", "b").await;
    a.send_text("hello world!").await;
    assert_eq!(b.next_message().await["data"], "hello world!");
    assert_eq!(a.next_message().await["data"], "hello world!");
    let (status, body) = http(node.client, "GET", "/", &[], b"").await.unwrap();
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("/ws/"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_room_and_body_refusals_on_the_http_api() {
    let node = TestNode::start(test_config("n1", None, &["--api-key", "s3cret-key"])).await;
    let mut v = node.join("r", "viewer", "v").await;

    let (status, body) = http_publish(&node, "r", &[], b"x").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) =
        http_publish(&node, "r", &[("Authorization", "Bearer wrong-key!")], b"x").await;
    assert_eq!(status, 401);
    let (status, _) = http_publish(&node, "r", &[("Authorization", "s3cret-key")], b"x").await;
    assert_eq!(status, 401, "the scheme is required");
    v.expect_no_message(std::time::Duration::from_millis(200))
        .await;

    let auth = ("Authorization", "Bearer s3cret-key");
    let (status, body) = http_publish(&node, "bad%20room", &[auth], b"x").await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    let (status, _) = http_publish(
        &node,
        "r",
        &[auth, ("Content-Type", "application/json")],
        b"{not json",
    )
    .await;
    assert_eq!(status, 400);
    let big = vec![b'a'; 64 * 1024 + 1];
    let (status, body) = http_publish(&node, "r", &[auth], &big).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")));
    let (status, _) = http(node.client, "PUT", "/api/rooms/r/messages", &[auth], b"")
        .await
        .unwrap();
    assert_eq!(status, 405);
    v.expect_no_message(std::time::Duration::from_millis(200))
        .await;

    let (status, body) = http_publish(&node, "r", &[auth], br#"{"ok":true}"#).await;
    assert_eq!(status, 202);
    let m = v.next_message().await;
    assert_eq!(
        m["data"],
        serde_json::json!({"ok": true}),
        "no content type: JSON when it parses"
    );
    assert_eq!(m["id"], body["id"]);
    let (status, _) = http_publish(&node, "r", &[auth], b"just words").await;
    assert_eq!(status, 202);
    assert_eq!(v.next_message().await["data"], "just words");
    assert_eq!(
        node.metric("gateway_http_requests_total{status=\"4xx\"}")
            .await,
        7.0
    );
    assert_eq!(
        node.metric("gateway_http_requests_total{status=\"2xx\"}")
            .await,
        2.0
    );
}
