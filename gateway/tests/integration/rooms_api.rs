//! The rooms API (issue 22, docs/protocol.md "Rooms API"): `GET /api/rooms` lists the rooms with
//! members anywhere in the cluster with their counts, in pages that follow a cursor, and
//! `GET /api/rooms/{room}/presence` gives one room's counts — against real nodes on one Redis, on
//! a real Redis Cluster (the scan goes shard after shard), and on the in-process broker; with the
//! API key only.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::common::*;
use serde_json::Value;

const KEY: &str = "rooms-api-key-123";
const BEARER: &str = "Bearer rooms-api-key-123";

fn flags() -> Vec<&'static str> {
    vec!["--api-key", KEY, "--presence-interval", "200ms"]
}

async fn get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, Value) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    let (status, body) = http(addr, "GET", path, &headers, b"").await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Every room the API lists, following the cursor `limit` rooms at a time: room → (hosts,
/// viewers), and how many pages it took.
async fn all_rooms(addr: SocketAddr, limit: usize) -> (BTreeMap<String, (u64, u64)>, usize) {
    let mut rooms = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => format!("/api/rooms?limit={limit}"),
            Some(c) => format!("/api/rooms?limit={limit}&cursor={c}"),
        };
        let (status, body) = get(addr, &path, Some(BEARER)).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        for r in body["rooms"].as_array().unwrap() {
            let counts = (r["hosts"].as_u64().unwrap(), r["viewers"].as_u64().unwrap());
            let room = r["room"].as_str().unwrap().to_string();
            assert!(rooms.insert(room, counts).is_none(), "a room listed twice");
        }
        match body["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (rooms, pages),
        }
        assert!(pages < 1000, "the cursor never ends");
    }
}

/// Waits until the API on `addr` lists exactly `want`, with pages of `limit`.
async fn lists(addr: SocketAddr, limit: usize, want: &[(&str, (u64, u64))]) -> usize {
    let want: BTreeMap<String, (u64, u64)> =
        want.iter().map(|(r, c)| (r.to_string(), *c)).collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (got, pages) = all_rooms(addr, limit).await;
        if got == want {
            return pages;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "listed {got:?}, want {want:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn refusals(addr: SocketAddr) {
    assert_eq!(get(addr, "/api/rooms", None).await.0, 401);
    assert_eq!(
        get(addr, "/api/rooms", Some("Bearer wrong-key-123"))
            .await
            .0,
        401
    );
    assert_eq!(get(addr, "/api/rooms/x/presence", None).await.0, 401);
    assert_eq!(get(addr, "/api/rooms?limit=0", Some(BEARER)).await.0, 400);
    assert_eq!(
        get(addr, "/api/rooms?limit=1001", Some(BEARER)).await.0,
        400
    );
    assert_eq!(
        get(addr, "/api/rooms?cursor=%00", Some(BEARER)).await.0,
        400
    );
    assert_eq!(
        get(addr, "/api/rooms/bad%20name/presence", Some(BEARER))
            .await
            .0,
        400
    );
    let (status, _) = http(
        addr,
        "POST",
        "/api/rooms",
        &[("Authorization", BEARER)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_listed_cluster_wide_with_their_counts_with_redis() {
    let cluster = TestCluster::start(&["a", "b", "c"], &flags()).await;
    let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
    let _h = a.join("stage", "host", "h").await;
    let _v1 = b.join("stage", "viewer", "v1").await;
    let _v2 = c.join("stage", "viewer", "v2").await;
    let _x = b.join("side", "viewer", "x").await;
    let mut others = Vec::new();
    for i in 0..5 {
        others.push(c.join(&format!("r{i}"), "viewer", "o").await);
    }
    let mut want = vec![("stage", (1, 2)), ("side", (0, 1))];
    let names: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    for n in &names {
        want.push((n.as_str(), (0, 1)));
    }
    // Any node answers for the whole cluster, in one page or in pages of one.
    lists(a.client, 100, &want).await;
    let pages = lists(b.client, 1, &want).await;
    assert!(pages >= 2, "{pages} pages of one room");
    let (status, p) = get(a.client, "/api/rooms/stage/presence", Some(BEARER)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (p["hosts"].as_u64(), p["viewers"].as_u64()),
        (Some(1), Some(2))
    );
    let (_, p) = get(a.client, "/api/rooms/empty/presence", Some(BEARER)).await;
    assert_eq!(
        (p["hosts"].as_u64(), p["viewers"].as_u64()),
        (Some(0), Some(0))
    );
    // A room whose members all left is no longer listed.
    drop(others);
    want.retain(|(r, _)| !r.starts_with('r'));
    lists(a.client, 100, &want).await;
    refusals(a.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_listed_shard_after_shard_on_a_redis_cluster() {
    let topology = ClusterTopology::start().await;
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        nodes.push(TestNode::start(test_config_url(id, &topology.url(), &flags())).await);
    }
    // Two rooms on each third of the slots: every shard holds some.
    let rooms = rooms_per_shard(2);
    let mut members = Vec::new();
    let mut want = Vec::new();
    for (i, r) in rooms.iter().enumerate() {
        members.push(nodes[i % 2].join(r, "host", "h").await);
        members.push(nodes[(i + 1) % 2].join(r, "viewer", "v").await);
        want.push((r.as_str(), (1, 1)));
    }
    lists(nodes[0].client, 100, &want).await;
    let pages = lists(nodes[1].client, 1, &want).await;
    assert!(pages >= 3, "{pages} pages: every shard scanned");
    let (_, p) = get(
        nodes[1].client,
        &format!("/api/rooms/{}/presence", rooms[0]),
        Some(BEARER),
    )
    .await;
    assert_eq!(
        (p["hosts"].as_u64(), p["viewers"].as_u64()),
        (Some(1), Some(1))
    );
    let (status, _) = get(nodes[0].client, "/api/rooms?cursor=9:0", Some(BEARER)).await;
    assert_eq!(status, 400, "a shard that does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_broker_lists_its_own_rooms_by_name() {
    let cluster = TestCluster::in_process("solo", &flags()).await;
    let n = &cluster[0];
    let _a = n.join("alpha", "host", "h").await;
    let _b = n.join("beta", "viewer", "v").await;
    let _c = n.join("beta", "viewer", "w").await;
    let want = [("alpha", (1, 0)), ("beta", (0, 2))];
    assert_eq!(lists(n.client, 1, &want).await, 2, "one room per page");
    let (_, body) = get(n.client, "/api/rooms?limit=1", Some(BEARER)).await;
    assert_eq!(body["cursor"], "alpha");
    refusals(n.client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_api_key_the_rooms_api_is_refused() {
    let cluster = TestCluster::in_process("open", &[]).await;
    let (status, body) = get(cluster[0].client, "/api/rooms", None).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_the_rooms_api_answers_503() {
    let mut cluster = TestCluster::start(&["a"], &flags()).await;
    let addr = cluster[0].client;
    let _m = cluster[0].join("stage", "viewer", "v").await;
    cluster.redis_mut().kill();
    for path in ["/api/rooms", "/api/rooms/stage/presence"] {
        let (status, body) = get(addr, path, Some(BEARER)).await;
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(body["error"], "unavailable");
    }
}
