//! The write window (`--write-window`) on a live node, seen from a raw socket: a cold room's
//! messages always go out at once, however bursty; once a room is hot (at least two messages per
//! window on average over the last complete 200 ms), its message goes out at once when the
//! room's last fan-out is at least one window old, and messages arriving within one window of the
//! last fan-out wait for the window's end and reach each member together (one write, so one
//! read), in order, none lost. The rule is `fanout/write_window.rs`'s; the last test checks it to
//! the millisecond on tokio's paused clock, which the window's clock follows.

use std::time::{Duration, Instant};

use crate::common::*;
use bytes::Bytes;
use gateway::fanout::write_window::{
    Batch, Offer, WriteWindow, BATCH_FROM, FLUSH_AT, MAX_PENDING, RATE_BUCKET,
};
use gateway::wire::protocol::RoomName;
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

    // A burst in the still cold room: never held, every message at once.
    let sent = Instant::now();
    for i in 2..=BURST + 1 {
        host.publish(json!(i)).await;
    }
    let mut got: Vec<(Value, Value)> = Vec::new();
    let mut last_at = sent;
    while got.len() < BURST as usize {
        let (msgs, at) = next_messages(&mut viewer).await;
        got.extend(
            msgs.iter()
                .map(|m| (m["data"].clone(), m["offset"].clone())),
        );
        last_at = at;
    }
    let want: Vec<(Value, Value)> = (2..=BURST + 1).map(|i| (json!(i), json!(i))).collect();
    assert_eq!(got, want, "the cold room's burst, in order");
    let took = last_at - sent;
    assert!(took < WINDOW / 2, "a cold room's burst waited {took:?}");

    // The burst's rate bucket closes (a little over one bucket later) with far more than two
    // messages per window: the room is hot. A second burst within the window since the last
    // fan-out is held to the window's end, then goes out in one write.
    tokio::time::sleep(RATE_BUCKET + RATE_BUCKET / 4).await;
    let second = BURST + 2..=2 * BURST + 1;
    for i in second.clone() {
        host.publish(json!(i)).await;
    }
    let (batch, batch_at) = next_messages(&mut viewer).await;
    let waited = batch_at - last_at;
    assert!(
        waited >= WINDOW / 2,
        "the hot burst went out {waited:?} after the room's last fan-out, before its window's end"
    );
    let got: Vec<(Value, Value)> = batch
        .iter()
        .map(|m| (m["data"].clone(), m["offset"].clone()))
        .collect();
    let want: Vec<(Value, Value)> = second.map(|i| (json!(i), json!(i))).collect();
    assert_eq!(got, want, "the whole hot burst, in order, in one read");

    // Quiet for more than a window (and two rate buckets: the room is cold again): the next
    // message goes out at once.
    tokio::time::sleep(WINDOW + WINDOW / 2).await;
    let sent = Instant::now();
    host.publish(json!("after a pause")).await;
    let (after, after_at) = next_messages(&mut viewer).await;
    assert_eq!(
        (&after[0]["data"], &after[0]["offset"]),
        (&json!("after a pause"), &json!(2 * BURST + 2))
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

/// The frames of a batch, in order.
fn frames(batch: &Batch) -> Vec<Bytes> {
    batch.msgs.iter().map(|(f, _)| f.clone()).collect()
}

fn frame(i: usize) -> Bytes {
    Bytes::from(i.to_string())
}

/// Whether `took` is `want` to the millisecond (the window counts whole milliseconds).
fn about(took: Duration, want: Duration) -> bool {
    let ms = Duration::from_millis(1);
    took + ms >= want && took <= want + 2 * ms
}

#[tokio::test(start_paused = true)]
async fn the_window_rule_holds_to_the_millisecond_on_paused_time() {
    let window = Duration::from_millis(20);
    let ww = WriteWindow::new(window);
    let room = RoomName::parse("r").unwrap();
    // Start the window's clock well before the room's first message.
    gateway::wire::clock::monotonic_millis();
    tokio::time::advance(Duration::from_secs(1)).await;

    // A cold room is never held, however bursty: one rate bucket's worth of messages at the
    // hot threshold (two per window), each at once.
    let hot_at = BATCH_FROM * RATE_BUCKET.as_millis() as u64 / window.as_millis() as u64;
    for i in 0..hot_at as usize {
        assert!(
            matches!(ww.offer(&room, frame(i), None, 0), Offer::Now(b) if frames(&b) == [frame(i)]),
            "cold message {i} held"
        );
        ww.done(&room);
    }
    // The bucket closes at the next message: the room is hot. That message, a window after the
    // last fan-out, still goes out at once.
    tokio::time::advance(RATE_BUCKET).await;
    let fanned = tokio::time::Instant::now();
    assert!(
        matches!(ww.offer(&room, frame(1), None, 1), Offer::Now(b) if frames(&b) == [frame(1)])
    );
    ww.done(&room);
    // Within the window: they wait, and go out together at its end.
    tokio::time::advance(Duration::from_millis(5)).await;
    for i in 2..=4 {
        assert!(matches!(
            ww.offer(&room, frame(i), None, i as u64),
            Offer::Pending
        ));
    }
    let (due, batch) = ww.next_due().await;
    let took = fanned.elapsed();
    assert!(about(took, window), "due after {took:?}");
    assert_eq!(due, room);
    assert_eq!(frames(&batch), [frame(2), frame(3), frame(4)]);
    assert_eq!(batch.ts, [2, 3, 4]);
    let fanned = tokio::time::Instant::now();
    ww.done(&room);

    // One millisecond short of a window after that fan-out: it still waits, for that millisecond.
    tokio::time::advance(window - Duration::from_millis(1)).await;
    assert!(matches!(ww.offer(&room, frame(5), None, 5), Offer::Pending));
    let (_, batch) = ww.next_due().await;
    assert_eq!(frames(&batch), [frame(5)]);
    let took = fanned.elapsed();
    assert!(about(took, window), "due after {took:?}");
    ww.done(&room);

    // Quiet for a whole window (still hot: its bucket is not over): at once again.
    tokio::time::advance(window).await;
    assert!(
        matches!(ww.offer(&room, frame(6), None, 6), Offer::Now(b) if frames(&b) == [frame(6)])
    );
    // A message during that fan-out waits for the next turn, even once the window is over.
    assert!(matches!(ww.offer(&room, frame(7), None, 7), Offer::Pending));
    tokio::time::advance(window * 2).await;
    assert!(matches!(ww.offer(&room, frame(8), None, 8), Offer::Pending));
    ww.done(&room);
    let (_, batch) = ww.next_due().await;
    assert_eq!(frames(&batch), [frame(7), frame(8)]);
    ww.done(&room);

    // A burst of FLUSH_AT within the window goes out at once with the last of them, in order.
    tokio::time::advance(window).await;
    assert!(matches!(ww.offer(&room, frame(0), None, 0), Offer::Now(_)));
    ww.done(&room);
    for i in 1..FLUSH_AT {
        assert!(matches!(ww.offer(&room, frame(i), None, 0), Offer::Pending));
    }
    match ww.offer(&room, frame(FLUSH_AT), None, 0) {
        Offer::Now(b) => assert_eq!(frames(&b), (1..=FLUSH_AT).map(frame).collect::<Vec<_>>()),
        other => panic!("expected the burst at once, got {other:?}"),
    }
    // While that fan-out runs, at most MAX_PENDING wait; the next is refused, not queued.
    for i in 0..MAX_PENDING {
        assert!(matches!(ww.offer(&room, frame(i), None, 0), Offer::Pending));
    }
    assert!(matches!(ww.offer(&room, frame(0), None, 0), Offer::Full));
}
