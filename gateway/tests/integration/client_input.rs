//! What a client may send, and what happens when it breaks the rules: error events that keep the
//! connection, close codes that end it.

use std::time::Duration;

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_commands_get_an_error_event_and_the_connection_lives() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    let mut c = node.join("r", "viewer", "v").await;
    for (input, code) in [
        (r#"{"type":"dance"}"#, "unknown_command"),
        ("[1,2]", "unknown_command"),
        ("42", "unknown_command"),
        (r#"{"type":"publish"}"#, "invalid_command"),
    ] {
        c.send_text(input).await;
        let e = c.next_of("error").await;
        assert_eq!(e["code"], code, "{input}");
        assert!(e["message"].as_str().unwrap().len() > 5);
    }
    c.ws.send_binary(vec![1, 2, 3]).await;
    assert_eq!(c.next_of("error").await["code"], "unsupported_binary");
    c.send_text(r#"{"type":"ping"}"#).await;
    assert!(c.next_of("pong").await["ts"].as_u64().is_some());
    // Still a working member.
    c.publish(json!({"after": "errors"})).await;
    assert_eq!(c.next_message().await["data"], json!({"after": "errors"}));
    c.publish(json!(null)).await;
    assert_eq!(c.next_message().await["data"], json!(null));
    assert_eq!(
        node.metric("gateway_client_errors_total{code=\"unknown_command\"}")
            .await,
        3.0
    );
    assert_eq!(
        node.metric("gateway_client_errors_total{code=\"invalid_command\"}")
            .await,
        1.0
    );
}

trait SendBinary {
    async fn send_binary(&mut self, b: Vec<u8>);
}

impl SendBinary
    for tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
{
    async fn send_binary(&mut self, b: Vec<u8>) {
        use futures_util::SinkExt;
        self.send(tokio_tungstenite::tungstenite::Message::binary(b))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_end_the_session_with_their_close_codes() {
    let node = TestNode::start(test_config(
        "n1",
        None,
        &["--max-message-size", "1024", "--max-fragments", "4"],
    ))
    .await;
    let mut witness = node.join("r", "viewer", "w").await;

    // Too large in one frame: 1009.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 1, &vec![b'a'; 1025], true))
        .await;
    assert_eq!(c.close_code().await, Some(1009));

    // Exactly the limit is fine.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 1, "b".repeat(1024).as_bytes(), true))
        .await;
    assert_eq!(witness.next_message().await["data"], "b".repeat(1024));

    // Too large once reassembled: 1009.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(false, 1, &[b'c'; 600], true)).await;
    c.send(&RawWs::frame(true, 0, &[b'c'; 600], true)).await;
    assert_eq!(c.close_code().await, Some(1009));

    // Too many fragments: 1009.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(false, 1, b"a", true)).await;
    for _ in 0..4 {
        c.send(&RawWs::frame(false, 0, b"a", true)).await;
    }
    assert_eq!(c.close_code().await, Some(1009));

    // A fragmented message within the limits is reassembled and published.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(false, 1, b"frag", true)).await;
    c.send(&RawWs::frame(false, 0, b"mented ", true)).await;
    c.send(&RawWs::frame(true, 0, "text é".as_bytes(), true))
        .await;
    assert_eq!(witness.next_message().await["data"], "fragmented text é");
    drop(c);

    // Invalid UTF-8 in one frame, and split across fragments: 1007.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 1, &[0xff, 0xfe], true)).await;
    assert_eq!(c.close_code().await, Some(1007));
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(false, 1, &[0xc3], true)).await;
    c.send(&RawWs::frame(true, 0, &[0x28], true)).await;
    assert_eq!(c.close_code().await, Some(1007));

    // Unmasked frame, reserved opcode, continuation without a start: 1002.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 1, b"hi", false)).await;
    assert_eq!(c.close_code().await, Some(1002));
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 3, b"hi", true)).await;
    assert_eq!(c.close_code().await, Some(1002));
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 0, b"hi", true)).await;
    assert_eq!(c.close_code().await, Some(1002));

    // A Ping is answered with a Pong carrying its payload; a Close is echoed.
    let mut c = RawWs::connect(node.client, "/ws/r").await;
    c.send(&RawWs::frame(true, 9, b"are you there", true)).await;
    loop {
        let (op, payload) = c.read_frame().await.unwrap();
        if op == 0xA {
            assert_eq!(payload, b"are you there");
            break;
        }
    }
    c.send(&RawWs::frame(true, 8, &1000u16.to_be_bytes(), true))
        .await;
    assert_eq!(c.close_code().await, Some(1000));

    witness.expect_no_message(Duration::from_millis(200)).await;
    let m = node.metrics().await;
    assert_eq!(
        metric_value(&m, "gateway_connections_closed_total{reason=\"too_large\"}"),
        3.0
    );
    assert_eq!(
        metric_value(
            &m,
            "gateway_connections_closed_total{reason=\"invalid_utf8\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &m,
            "gateway_connections_closed_total{reason=\"protocol_error\"}"
        ),
        3.0
    );
    // The witness saw all of it and is still connected.
    witness.publish(json!("alive")).await;
    assert_eq!(witness.next_message().await["data"], "alive");
}
