//! The write window (`--write-window`) on a live node, seen from a raw socket: a room's message
//! goes out at once when the room's last fan-out is at least one window old; messages arriving
//! within one window of the last fan-out wait for the window's end and reach each member together
//! (one write, so one read), in order, none lost. The rule is `fanout/write_window.rs`'s.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Long enough that "at once" (well under half a window) and "at the window's end" cannot be
/// confused on a loaded machine.
const WINDOW: Duration = Duration::from_secs(1);
/// Messages published within one window of the first: fewer than `write_window::FLUSH_AT` (64),
/// so the window's end, not the pending bound, sends them.
const BURST: u64 = 20;

/// The `message` events among `frames` (text frames; presence and others skipped).
fn messages(frames: Vec<(u8, Vec<u8>)>) -> Vec<Value> {
    frames
        .into_iter()
        .filter(|(op, _)| *op == 0x1)
        .map(|(_, p)| serde_json::from_slice::<Value>(&p).unwrap())
        .filter(|v| v["type"] == "message")
        .collect()
}

/// Reads until some `message` events arrive; returns those that arrived together, and when.
async fn next_messages(viewer: &mut RawWs) -> (Vec<Value>, Instant) {
    loop {
        let frames = viewer.read_together().await;
        assert!(!frames.is_empty(), "the viewer's connection ended");
        let got = messages(frames);
        if !got.is_empty() {
            return (got, Instant::now());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_room_is_batched_in_order_and_a_quiet_room_goes_out_at_once() {
    let window = format!("{}ms", WINDOW.as_millis());
    let cluster = TestCluster::in_process(
        "ww",
        &["--write-window", &window, "--max-publish-rate", "0"],
    )
    .await;
    let node = &cluster[0];
    let mut host = node.join("hot", "host", "h").await;
    let mut viewer = RawWs::connect(node.client, "/ws/hot?role=viewer&name=v").await;
    assert_eq!(viewer.next_json().await["type"], "welcome");

    // The room has never been fanned out: its first message goes out at once.
    let sent = Instant::now();
    host.publish(json!(1)).await;
    let (first, first_at) = next_messages(&mut viewer).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(
        (&first[0]["data"], &first[0]["offset"]),
        (&json!(1), &json!(1))
    );
    let took = first_at - sent;
    assert!(took < WINDOW / 2, "a quiet room's message waited {took:?}");

    // A burst within the window since that fan-out: held to the window's end, then one write.
    for i in 2..=BURST + 1 {
        host.publish(json!(i)).await;
    }
    let (batch, batch_at) = next_messages(&mut viewer).await;
    let waited = batch_at - first_at;
    assert!(
        waited >= WINDOW / 2,
        "the burst went out {waited:?} after the room's last fan-out, before its window's end"
    );
    let got: Vec<(Value, Value)> = batch
        .iter()
        .map(|m| (m["data"].clone(), m["offset"].clone()))
        .collect();
    let want: Vec<(Value, Value)> = (2..=BURST + 1).map(|i| (json!(i), json!(i))).collect();
    assert_eq!(got, want, "the whole burst, in order, in one read");

    // Quiet for more than a window: the next message goes out at once again.
    tokio::time::sleep(WINDOW + WINDOW / 2).await;
    let sent = Instant::now();
    host.publish(json!("after a pause")).await;
    let (after, after_at) = next_messages(&mut viewer).await;
    assert_eq!(
        (&after[0]["data"], &after[0]["offset"]),
        (&json!("after a pause"), &json!(BURST + 2))
    );
    assert_eq!(after.len(), 1, "{after:?}");
    let took = after_at - sent;
    assert!(
        took < WINDOW / 2,
        "the first message after a pause waited {took:?}"
    );
    assert_eq!(
        node.metric("gateway_messages_dropped_total").await,
        0.0,
        "nothing dropped"
    );
}
