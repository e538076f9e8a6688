//! History bounded in bytes and idempotency keys scoped to their publisher (issue 20, items 3
//! and 5), against real nodes and a real `redis-server`: what a room keeps in Redis, what a join
//! and the HTTP API read out of it, and whose key suppresses whose publish. Each test failed on
//! the code before: a room kept every large message its count allowed, a read returned as much
//! as the outbox took (or, over HTTP, everything), and keys were shared by a room's publishers.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

/// A stream entry as `XRANGE` answers it: its id and its fields.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// A JSON body whose frame is a little over `n` bytes.
fn big(n: usize) -> Vec<u8> {
    json!({ "blob": "x".repeat(n) }).to_string().into_bytes()
}

async fn publish_big(node: &TestNode, room: &str, n: usize) -> Value {
    let (status, ack) =
        http_publish(node, room, &[("Content-Type", "application/json")], &big(n)).await;
    assert_eq!(status, 202, "{ack}");
    ack
}

/// The frames a client received after its welcome, until none arrives for half a second.
async fn welcome_and_messages(addr: SocketAddr, room: &str, query: &str) -> (Value, Vec<Value>) {
    let mut c = WsClient::connect(&format!("ws://{addr}/ws/{room}?{query}")).await;
    let welcome = c.next_of("welcome").await;
    let mut messages = Vec::new();
    while let Some(v) = c.next_json_within(Duration::from_millis(500)).await {
        if v["type"] == "message" {
            messages.push(v);
        }
    }
    (welcome, messages)
}

fn bytes_of(messages: &[Value]) -> usize {
    messages.iter().map(|m| m.to_string().len()).sum()
}

fn offsets_of(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn a_rooms_history_stays_within_its_byte_budget_in_redis() {
    // Default flags: --history-max-bytes 1.5 MiB, 300 entries. 60 messages of 60 kB are 3.6 MB,
    // well under the count: only the byte budget can hold the room under 2 MiB.
    let cluster = TestCluster::start(&["n1"], &[]).await;
    for _ in 0..60 {
        publish_big(&cluster[0], "big", 60_000).await;
    }
    let mut redis = cluster.redis().connection().await.unwrap();
    let entries: Vec<StreamEntry> = redis::cmd("XRANGE")
        .arg("gw:room:{big}:hist")
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    let frames: usize = entries
        .iter()
        .map(|(_, fields)| fields.iter().find(|(k, _)| k == "f").unwrap().1.len())
        .sum();
    assert!(frames <= 1536 * 1024, "{frames} bytes of frames kept");
    assert!(entries.len() >= 20, "the newest that fit are kept");
    assert_eq!(entries.last().unwrap().0, "0-60", "the newest is kept");
    let recorded: usize = redis::cmd("HGET")
        .arg("gw:room:{big}:meta")
        .arg("bytes")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(recorded, frames, "the meta's running total is the stream's");
    let usage: usize = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg("gw:room:{big}:hist")
        .arg("SAMPLES")
        .arg(0)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(usage <= 2 * 1024 * 1024, "{usage} bytes of Redis memory");
}

#[tokio::test]
async fn a_history_written_without_a_byte_total_is_counted_once_and_trimmed() {
    // An older node's room: a meta without `bytes` and a stream of 40 entries of 100 kB (4 MB).
    let cluster = TestCluster::start(&["n1"], &[]).await;
    let mut redis = cluster.redis().connection().await.unwrap();
    let frame = format!(r#"{{"type":"message","data":"{}"}}"#, "x".repeat(100_000));
    for i in 1..=40 {
        let _: String = redis::cmd("XADD")
            .arg("gw:room:{old}:hist")
            .arg(format!("0-{i}"))
            .arg("t")
            .arg(jsonwebtoken::get_current_timestamp() * 1000)
            .arg("f")
            .arg(&frame)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg("gw:room:{old}:meta")
        .arg("epoch")
        .arg("old1")
        .arg("seq")
        .arg(40)
        .query_async(&mut redis)
        .await
        .unwrap();
    let ack = publish_big(&cluster[0], "old", 1_000).await;
    assert_eq!(
        (&ack["offset"], &ack["epoch"]),
        (&json!(41), &json!("old1"))
    );
    let (len, recorded): (usize, usize) = redis::pipe()
        .cmd("XLEN")
        .arg("gw:room:{old}:hist")
        .cmd("HGET")
        .arg("gw:room:{old}:meta")
        .arg("bytes")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(len, 16, "15 old entries and the new one fit 1.5 MiB");
    assert!(recorded <= 1536 * 1024, "{recorded}");
    assert_eq!(
        recorded,
        15 * frame.len() + ack_frame_len(&cluster[0], "old").await
    );
}

/// The length of the newest frame of `room`, as the history API returns it.
async fn ack_frame_len(node: &TestNode, room: &str) -> usize {
    let (_, h) = http_history(node.client, room, "limit=1", &[]).await;
    h["messages"][0].to_string().len()
}

/// Flags of a node whose reads are bounded at 128 KiB (half of --outbox-bytes).
const SMALL_READS: &[&str] = &["--outbox-bytes", "262144"];

#[tokio::test]
async fn a_join_over_a_large_history_is_bounded_and_the_node_stays_ready() {
    let cluster = TestCluster::start(&["n1"], SMALL_READS).await;
    let node = &cluster[0];
    let ack = publish_big(node, "deep", 30_000).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    for _ in 1..20 {
        publish_big(node, "deep", 30_000).await;
    }
    // 600 kB missed, more than one read may carry: not recovered, and the backlog holds the
    // newest messages that fit the read's budget.
    let (w, messages) =
        welcome_and_messages(node.client, "deep", &format!("since={epoch}:0&backlog=100")).await;
    assert_eq!(w["recovered"], false);
    assert_eq!(w["offset"], 20);
    assert!(bytes_of(&messages) <= 128 * 1024, "{}", bytes_of(&messages));
    assert_eq!(offsets_of(&messages), [17, 18, 19, 20]);
    // Within the budget, the resume is complete.
    let (w, messages) =
        welcome_and_messages(node.client, "deep", &format!("since={epoch}:16")).await;
    assert_eq!(w["recovered"], true);
    assert_eq!(offsets_of(&messages), [17, 18, 19, 20]);
    assert_eq!(readyz_status(node).await, 200);
    assert_eq!(
        node.metric("gateway_history_reads_truncated_total").await,
        1.0
    );

    // The script itself stops at the budget: what leaves Redis is the status, not the history.
    let mut redis = cluster.redis().connection().await.unwrap();
    let answer = resume_read(&mut redis, &epoch, 131_072, false).await;
    assert_eq!(answer.len(), 4, "no entry in a too_many answer");
    assert_eq!(answer[2], redis::Value::BulkString(b"too_many".to_vec()));
    assert_eq!(answer[3], redis::Value::Int(1), "truncated");
    // A page (the API's) with a budget below one message still advances by one.
    let answer = resume_read(&mut redis, &epoch, 10, true).await;
    assert_eq!(answer.len(), 6, "one entry: {answer:?}");
    assert_eq!(answer[2], redis::Value::BulkString(b"complete".to_vec()));
    assert_eq!(
        (&answer[3], &answer[4]),
        (&redis::Value::Int(1), &redis::Value::Int(1))
    );
}

/// The HTTP API's history read on `node` after 20 messages of 30 kB: a page cut at the budget
/// that says so, newest first without `since`, oldest first after it, and paging goes on.
async fn api_reads_are_truncated_pages(node: &TestNode) {
    let ack = publish_big(node, "paged", 30_000).await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    for _ in 1..20 {
        publish_big(node, "paged", 30_000).await;
    }
    let page = |v: &Value| -> Vec<Value> { v["messages"].as_array().unwrap().clone() };
    let (status, latest) = http_history(node.client, "paged", "", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(latest["truncated"], true);
    assert!(bytes_of(&page(&latest)) <= 128 * 1024);
    assert_eq!(offsets_of(&page(&latest)), [17, 18, 19, 20]);

    let (_, first) = http_history(node.client, "paged", &format!("since={epoch}:0"), &[]).await;
    assert_eq!(
        (&first["recovered"], &first["truncated"]),
        (&json!(true), &json!(true))
    );
    assert_eq!(offsets_of(&page(&first)), [1, 2, 3, 4]);
    let (_, last) = http_history(node.client, "paged", &format!("since={epoch}:16"), &[]).await;
    assert_eq!(
        (&last["recovered"], &last["truncated"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(offsets_of(&page(&last)), [17, 18, 19, 20]);
    let (_, small) = http_history(node.client, "paged", "limit=2", &[]).await;
    assert_eq!(small["truncated"], false, "a limit is not a truncation");
    assert_eq!(offsets_of(&page(&small)), [19, 20]);
    assert_eq!(
        node.metric("gateway_history_reads_truncated_total").await,
        2.0,
        "the two pages cut short"
    );
}

#[tokio::test]
async fn the_api_history_read_is_bounded_and_says_truncated() {
    let cluster = TestCluster::start(&["n1"], SMALL_READS).await;
    api_reads_are_truncated_pages(&cluster[0]).await;
}

#[tokio::test]
async fn the_in_process_broker_bounds_reads_the_same_way() {
    let cluster = TestCluster::in_process("n1", SMALL_READS).await;
    api_reads_are_truncated_pages(&cluster[0]).await;
}

/// Sends a keyed publish and returns its ack.
async fn keyed(c: &mut WsClient, data: &str, key: &str) -> Value {
    c.send_text(&json!({"type":"publish","data":data,"key":key}).to_string())
        .await;
    let ack = c.next_of("ack").await;
    assert_eq!(ack["key"], key, "the ack carries the client's own key");
    ack
}

#[tokio::test]
async fn keys_belong_to_their_publisher() {
    let cluster = TestCluster::start(&["n1"], &jwt_flags(&[])).await;
    let node = &cluster[0];
    let url = |sub: &str| {
        let t = token(&claims(sub, &[("quiz", "host")], 60));
        node.ws_url("quiz", &format!("token={t}"))
    };
    // A chatter takes the backend's next key first...
    let mut mallory = WsClient::connect(&url("mallory")).await;
    let m = keyed(&mut mallory, "spoiler", "question-4").await;
    assert_eq!(m["duplicate"], false);
    // ...and the backend's publish with that key still goes out; its own resend does not.
    let auth = format!("Bearer {API_KEY}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
        ("Idempotency-Key", "question-4"),
    ];
    let (status, first) = http_publish(node, "quiz", &headers, br#"{"q":4}"#).await;
    assert_eq!(
        (status, &first["duplicate"]),
        (202, &json!(false)),
        "{first}"
    );
    assert_eq!(first["offset"], m["offset"].as_u64().unwrap() + 1);
    let (_, again) = http_publish(node, "quiz", &headers, br#"{"q":4}"#).await;
    assert_eq!(
        (&again["duplicate"], &again["id"]),
        (&json!(true), &first["id"])
    );
    // A token user's resend after a reconnect (a new connection, the same sub) is a repeat...
    let mut alice = WsClient::connect(&url("alice")).await;
    let a = keyed(&mut alice, "bid 7", "bid-7").await;
    alice.close().await;
    let mut alice = WsClient::connect(&url("alice")).await;
    let resent = keyed(&mut alice, "bid 7", "bid-7").await;
    assert_eq!(
        (&resent["duplicate"], &resent["offset"], &resent["id"]),
        (&json!(true), &a["offset"], &a["id"])
    );
    // ...and another user's equal key is not.
    let mut bob = WsClient::connect(&url("bob")).await;
    assert_eq!(keyed(&mut bob, "bid 9", "bid-7").await["duplicate"], false);
    let mut redis = cluster.redis().connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("gw:room:{quiz}:idem:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        keys.iter().all(|k| !k.contains(API_KEY)),
        "the API key never reaches Redis: {keys:?}"
    );
    // The first 12 hex digits of SHA-1(API_KEY).
    let api = redis::Script::new(API_KEY).get_hash()[..12].to_string();
    assert!(keys.contains(&format!("gw:room:{{quiz}}:idem:api:{api}:question-4")));
    assert!(keys.contains(&"gw:room:{quiz}:idem:u:mallory:question-4".to_string()));
}

/// Runs `history.lua` itself for room `deep`: a resume from (`epoch`, 0) with a read budget of
/// `budget` bytes, as a page (the API's) or not (a joining client's). The arguments are the
/// broker's (`broker/scripts.rs`, `history_args`), the meta TTL last.
async fn resume_read(
    redis: &mut redis::aio::MultiplexedConnection,
    epoch: &str,
    budget: u64,
    page: bool,
) -> Vec<redis::Value> {
    redis::cmd("EVAL")
        .arg(include_str!("../../src/broker/history.lua"))
        .arg(2)
        .arg("gw:room:{deep}:meta")
        .arg("gw:room:{deep}:hist")
        .arg(epoch)
        .arg(0)
        .arg(1000)
        .arg(0)
        .arg(600_000)
        .arg(budget)
        .arg(u8::from(page))
        .arg(86_400_000u64)
        .query_async(redis)
        .await
        .unwrap()
}
