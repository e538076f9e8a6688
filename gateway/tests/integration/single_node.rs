//! One node with no Redis at all: the in-process broker serves rooms, chat and the HTTP API.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

// In process with the in-process broker and loopback sockets only, so on tokio's paused clock:
// the 200 ms of silence and the drain at the end pass without waiting.
#[tokio::test(start_paused = true)]
async fn in_process_broker_serves_a_single_node_without_redis() {
    let node = TestNode::start(test_config("solo", None, &[])).await;
    let (status, body) = http(node.admin, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(ready["broker"], "memory");

    let mut host = node.join("stage", "host", "h").await;
    let mut viewer = node.join("stage", "viewer", "v").await;
    let mut elsewhere = node.join("other", "viewer", "o").await;
    host.publish(json!({"n": 1})).await;
    assert_eq!(viewer.next_message().await["data"], json!({"n": 1}));
    assert_eq!(host.next_message().await["data"], json!({"n": 1}));
    viewer.send_text("nice!").await;
    assert_eq!(host.next_message().await["data"], "nice!");
    assert_eq!(viewer.next_message().await["data"], "nice!");
    let (status, _) = http_publish(
        &node,
        "stage",
        &[("Content-Type", "application/json")],
        b"[1,2]",
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(viewer.next_message().await["data"], json!([1, 2]));
    assert_eq!(host.next_message().await["role"], "server");
    elsewhere
        .expect_no_message(Duration::from_millis(200))
        .await;

    // Presence right after the welcome counts local members.
    let mut late = WsClient::connect(&node.ws_url("stage", "role=viewer")).await;
    late.next_of("welcome").await;
    let p = late.next_of("presence").await;
    assert_eq!(
        (p["hosts"].as_u64(), p["viewers"].as_u64()),
        (Some(1), Some(2))
    );
    node.stop().await;
}
