//! Room lifecycle webhooks end to end (issue 22, point 4): real members join and leave listing
//! rooms on real nodes (in this process, and as child processes that are SIGKILLed), the
//! presence scripts produce the events once per cluster, and the webhook dispatcher delivers
//! them to a real receiver that fails, times out and goes away (on one Redis, and on a Redis
//! Cluster with a room on every shard). Each test checks what the
//! receiver ACCEPTED: every event exactly once, in order per room, signed. The delivery side
//! alone (events appended by hand) is `webhooks.rs`'s.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

/// The accepted events, parsed, in arrival order.
fn accepted_events(r: &Receiver) -> Vec<Value> {
    r.log()
        .into_iter()
        .filter(|g| g.accepted)
        .map(|g| serde_json::from_slice(&g.body).unwrap())
        .collect()
}

/// Every accepted event once (by id), and each room's events in their stream's order.
fn assert_once_in_order(events: &[Value]) {
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an event accepted twice: {ids:?}");
    let mut by_room: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for e in events {
        let id = e["id"].as_str().unwrap();
        let (room, entry) = id.rsplit_once('/').unwrap();
        assert_eq!(e["room"], room, "{e}");
        let (ms, seq) = entry.split_once('-').unwrap();
        by_room
            .entry(room.to_string())
            .or_default()
            .push((ms.parse().unwrap(), seq.parse().unwrap()));
    }
    for (room, entries) in by_room {
        let mut sorted = entries.clone();
        sorted.sort();
        assert_eq!(entries, sorted, "{room}'s events out of order");
    }
}

/// A room's events when two members join one after the other and leave, the second first.
const TWO_MEMBERS_COME_AND_GO: [&str; 6] = [
    "room.occupied",
    "member.joined",
    "member.joined",
    "member.left",
    "member.left",
    "room.vacated",
];

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

/// The list flags with quick ticks and the webhook flags for `receiver`.
fn flags(rooms: &str, receiver: &Receiver) -> Vec<String> {
    let mut f: Vec<String> = ["--list-rooms", rooms, "--presence-interval", "200ms"]
        .map(str::to_string)
        .to_vec();
    f.extend(hook_flags(&receiver.url()));
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_events_reach_a_failing_receiver_once_each_in_order() {
    let redis = RedisServer::start().await;
    // 503, a timeout (the tests' --webhook-timeout is 500 ms), 500; then every request accepted.
    let receiver = Receiver::start(|n, _| match n {
        0 => Reply::Status(503),
        1 => Reply::Hang(Duration::from_secs(2)),
        2 => Reply::Status(500),
        _ => Reply::Status(204),
    })
    .await;
    let f = flags("life", &receiver);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let e1 = TestNode::start(test_config("e1", Some(&redis), &f)).await;
    let e2 = TestNode::start(test_config("e2", Some(&redis), &f)).await;

    let one = e1.join("life", "host", "one").await;
    receiver.wait_accepted(2, Duration::from_secs(10)).await;
    let two = e2.join("life", "viewer", "two").await;
    receiver.wait_accepted(3, WAIT).await;
    two.close().await;
    receiver.wait_accepted(4, WAIT).await;
    one.close().await;
    receiver.wait_accepted(6, WAIT).await;
    // Nothing more comes: each event once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = accepted_events(&receiver);
    assert_eq!(kinds(&events), TWO_MEMBERS_COME_AND_GO, "{events:#?}");
    assert_once_in_order(&events);
    assert_signed(&receiver.log());
    assert_eq!(events[1]["name"], "one");
    assert_eq!(events[2]["name"], "two");
    assert_eq!(events[3]["sub"], events[2]["sub"], "two leaves first");
    for e in &events[3..5] {
        assert_eq!(e["reason"], "client_closed", "{e}");
    }
    for e in &events {
        assert!(e["ts_ms"].as_u64().unwrap() > 1_600_000_000_000);
    }
    // The failures were real: three requests refused or timed out before the first accepted.
    let log = receiver.log();
    assert!(log.len() >= events.len() + 3, "{} requests", log.len());
    assert!(log[..3].iter().all(|g| !g.accepted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_members_are_reported_once_across_a_receiver_outage() {
    let redis = RedisServer::start().await;
    let mut receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let f = flags("stage*", &receiver);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let k1 = GatewayProcess::start("k1", Some(&redis), &f).await;
    let mut k2 = GatewayProcess::start("k2", Some(&redis), &f).await;
    let _watcher = k1.join("stage", "host", "watcher").await;
    receiver.wait_accepted(2, Duration::from_secs(10)).await;
    let _g1 = k2.join("stage", "viewer", "g1").await;
    let _g2 = k2.join("stage", "viewer", "g2").await;
    // A room whose only member is on the node that dies: its vacated comes from the reaper.
    let _solo = k2.join("stage-solo", "host", "solo").await;
    receiver.wait_accepted(6, Duration::from_secs(10)).await;
    // Let the last acknowledgements reach Redis before the kill.
    tokio::time::sleep(Duration::from_millis(500)).await;

    receiver.stop();
    k2.kill();
    // The reaper appends the dead node's leaves and the solo room's vacated while the receiver
    // is away; nothing is lost, and the dead node's leases (if any) are adopted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    receiver.restart().await;
    receiver.wait_accepted(10, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = accepted_events(&receiver);
    assert_once_in_order(&events);
    assert_signed(&receiver.log());
    assert_eq!(events.len(), 10, "{events:#?}");
    let of = |room: &str| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["room"] == room)
            .cloned()
            .collect()
    };
    let stage = of("stage");
    assert_eq!(
        kinds(&stage),
        [
            "room.occupied",
            "member.joined",
            "member.joined",
            "member.joined",
            "member.left",
            "member.left"
        ],
        "{stage:#?}"
    );
    let left: BTreeSet<&str> = stage[4..]
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(left, BTreeSet::from(["g1", "g2"]));
    assert!(stage[4..].iter().all(|e| e["reason"] == "node_lost"));
    let solo = of("stage-solo");
    assert_eq!(
        kinds(&solo),
        [
            "room.occupied",
            "member.joined",
            "member.left",
            "room.vacated"
        ],
        "{solo:#?}"
    );
    assert_eq!(solo[2]["reason"], "node_lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_broker_sends_the_same_events() {
    let receiver = Receiver::start(|n, _| {
        if n == 0 {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let f = flags("*", &receiver);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let cluster = TestCluster::in_process("m1", &f).await;
    let a = cluster[0].join("solo", "host", "a").await;
    receiver.wait_accepted(2, Duration::from_secs(10)).await;
    let b = cluster[0].join("solo", "viewer", "b").await;
    receiver.wait_accepted(3, WAIT).await;
    b.close().await;
    a.close().await;
    receiver.wait_accepted(6, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = accepted_events(&receiver);
    assert_eq!(kinds(&events), TWO_MEMBERS_COME_AND_GO, "{events:#?}");
    assert_once_in_order(&events);
    assert_signed(&receiver.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_rooms_on_every_shard_of_a_redis_cluster_arrive_once_in_order() {
    let topology = ClusterTopology::start().await;
    let receiver = Receiver::start(|_, _| Reply::Status(200)).await;
    let f = flags("room-*", &receiver);
    let f: Vec<&str> = f.iter().map(String::as_str).collect();
    let c1 = TestNode::start(test_config_url("c1", &topology.url(), &f)).await;
    let c2 = TestNode::start(test_config_url("c2", &topology.url(), &f)).await;
    // One room in each master's slots: each room's scripts and stream live on its own shard.
    let rooms = rooms_per_shard(1);
    let mut n = 0;
    for room in &rooms {
        let a = c1.join(room, "host", "a").await;
        n += 2;
        receiver.wait_accepted(n, Duration::from_secs(10)).await;
        let b = c2.join(room, "viewer", "b").await;
        n += 1;
        receiver.wait_accepted(n, WAIT).await;
        b.close().await;
        a.close().await;
        n += 3;
        receiver.wait_accepted(n, WAIT).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let events = accepted_events(&receiver);
    assert_eq!(events.len(), 6 * rooms.len(), "{events:#?}");
    assert_once_in_order(&events);
    assert_signed(&receiver.log());
    for room in &rooms {
        let of: Vec<Value> = events
            .iter()
            .filter(|e| e["room"] == room.as_str())
            .cloned()
            .collect();
        assert_eq!(kinds(&of), TWO_MEMBERS_COME_AND_GO, "{room}: {of:#?}");
    }
}
