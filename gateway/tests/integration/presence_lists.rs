//! Member lists (issue 22, points 1 and 4's production side) with real nodes on a real Redis, a
//! Redis Cluster and the in-process broker: the same list everywhere, joins and leaves batched
//! per tick, a user's several connections as one entry, a SIGKILLed node's members leaving with
//! `node_lost` within the documented bound, the `--list-max-members` bound and its hysteresis,
//! rooms that do not list. The lifecycle events these lists produce are `lifecycle.rs`'s.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// Refusals `list` takes before it fails: 10 s of pauses, under the 50 refusals in 10 s after
/// which the gateway closes a connection (1008).
const MAX_REFUSALS: u32 = 25;

/// The whole list as `c` reads it with `members` commands (following the cursor), and the
/// version of the last page. A command refused by `--max-control-rate` (5 a second, bursts of
/// 10: polling loops on a slow machine reach it) is sent again after a pause, as a client does,
/// at most [`MAX_REFUSALS`] times.
async fn list(c: &mut WsClient) -> (BTreeSet<String>, u64) {
    let mut subs = BTreeSet::new();
    let mut cursor = Value::Null;
    let mut refusals = 0;
    loop {
        c.send_text(&json!({"type": "members", "cursor": cursor}).to_string())
            .await;
        let page = c.next_of_any(&["members", "error"]).await;
        if page["type"] == "error" {
            assert_eq!(page["code"], "rate_limited", "{page}");
            refusals += 1;
            assert!(refusals <= MAX_REFUSALS, "members refused {refusals} times");
            tokio::time::sleep(Duration::from_millis(400)).await;
            continue;
        }
        assert_ne!(page["over_limit"], true, "{page}");
        for m in page["members"].as_array().expect("members") {
            assert!(
                subs.insert(m["sub"].as_str().unwrap().to_string()),
                "listed twice: {page}"
            );
        }
        cursor = page["cursor"].clone();
        if cursor.is_null() {
            return (subs, page["v"].as_u64().unwrap());
        }
    }
}

/// Asks `c`'s list until it equals `want`.
async fn list_becomes(c: &mut WsClient, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, _) = list(c).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "list {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next `members_diff` within `limit` (other events skipped), or `None`.
async fn next_diff(c: &mut WsClient, limit: Duration) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let v = c
            .next_json_within(deadline.saturating_duration_since(Instant::now()))
            .await?;
        if v["type"] == "members_diff" {
            return Some(v);
        }
    }
}

/// Every frame `c` gets until `done` holds for those read so far (within `limit`).
async fn frames_until(
    c: &mut WsClient,
    limit: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while !done(&seen) {
        let v = c
            .next_json_within(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|| panic!("not in time; got {seen:#?}"));
        seen.push(v);
    }
    seen
}

fn subs(diff: &Value, field: &str) -> BTreeSet<String> {
    diff[field]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["sub"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A token for `sub` granting `room` as a viewer.
fn viewer_token(sub: &str, room: &str) -> String {
    token(&claims(sub, &[(room, "viewer")], 300))
}

async fn join_as(node: &TestNode, room: &str, sub: &str) -> WsClient {
    connect_token(node.client, room, &viewer_token(sub, room))
        .await
        .expect("admitted")
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_list_batched_per_tick_and_deduplicated_by_sub() {
    let flags = jwt_flags(&["--list-rooms", "stage", "--presence-interval", "1s"]);
    let cluster = TestCluster::start(&["l1", "l2", "l3"], &flags).await;
    // Hashes as hash tables even when small, so that HSCAN pages them as it pages big rooms.
    let mut conn = cluster.redis().connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("hash-max-listpack-entries")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut a = join_as(&cluster[0], "stage", "ann").await;
    let mut b = join_as(&cluster[1], "stage", "bob").await;
    let mut c = join_as(&cluster[2], "stage", "cat").await;
    for observer in [&mut a, &mut b, &mut c] {
        list_becomes(observer, &["ann", "bob", "cat"]).await;
    }
    // The same counts on every node, and the rooms API lists the same members.
    for node in &cluster.nodes {
        let deadline = Instant::now() + WAIT;
        loop {
            let headers = [("Authorization", "Bearer moderator-key-123")];
            let (_, body) = http(
                node.client,
                "GET",
                "/api/rooms/stage/presence",
                &headers,
                b"",
            )
            .await
            .unwrap();
            let p: Value = serde_json::from_slice(&body).unwrap();
            if p["viewers"] == 3 {
                assert_eq!(p["listing"], true, "{p}");
                assert_eq!(subs(&p, "members").len(), 3, "{p}");
                break;
            }
            assert!(Instant::now() < deadline, "counts never reached 3: {p}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Right after node 1's tick (its member just got a diff) two users join node 1 at once:
    // node 1 writes both in its next tick, and every member gets them in ONE frame.
    // Node 1's diff naming syn carries the version of syn's batch (the last it read back).
    let _sync = join_as(&cluster[0], "stage", "syn").await;
    let syn_v = loop {
        let d = next_diff(&mut a, Duration::from_secs(3))
            .await
            .expect("syn joins");
        if subs(&d, "joined").contains("syn") {
            break d["v"].as_u64().unwrap();
        }
    };
    let mut dan = join_as(&cluster[0], "stage", "dan").await;
    let _eve = join_as(&cluster[0], "stage", "eve").await;
    // Node 3 may still be folding older batches (bob's write, syn's) into its diffs: only the
    // frames naming dan or eve count.
    let mut frames = Vec::new();
    let mut seen = BTreeSet::new();
    while !(seen.contains("dan") && seen.contains("eve")) {
        let d = next_diff(&mut c, Duration::from_secs(3))
            .await
            .expect("the joins reach node 3");
        let joined = subs(&d, "joined");
        if joined.contains("dan") || joined.contains("eve") {
            seen.extend(joined);
            frames.push(d);
        }
    }
    assert_eq!(
        frames.len(),
        1,
        "joins of one tick in one frame: {frames:?}"
    );
    // One batch, one version: nodes 2 and 3 have nothing to write meanwhile.
    assert_eq!(
        frames[0]["v"].as_u64(),
        Some(syn_v + 1),
        "dan and eve written in the batch after syn's: {frames:?}"
    );
    list_becomes(&mut b, &["ann", "bob", "cat", "dan", "eve", "syn"]).await;
    // The rooms API pages the same list, one member at a time.
    let (mut cursor, mut pages, mut paged) = (String::new(), 0, BTreeSet::new());
    loop {
        let path = format!("/api/rooms/stage/presence?limit=1&cursor={cursor}");
        let headers = [("Authorization", "Bearer moderator-key-123")];
        let (status, body) = http(cluster[2].client, "GET", &path, &headers, b"")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let p: Value = serde_json::from_slice(&body).unwrap();
        pages += 1;
        for sub in subs(&p, "members") {
            assert!(paged.insert(sub), "listed twice: {p}");
        }
        match p["cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    assert_eq!(paged.len(), 6, "{paged:?}");
    assert!(pages >= 3, "{pages} pages of one member");

    // Ann's second connection, on another node: one entry, no diff about her.
    let mut ann2 = join_as(&cluster[1], "stage", "ann").await;
    list_becomes(&mut ann2, &["ann", "bob", "cat", "dan", "eve", "syn"]).await;
    ann2.close().await;
    let quiet_until = Instant::now() + Duration::from_millis(2_500);
    while let Some(d) = next_diff(
        &mut c,
        quiet_until.saturating_duration_since(Instant::now()),
    )
    .await
    {
        assert!(
            !subs(&d, "left").contains("ann") && !subs(&d, "joined").contains("ann"),
            "a second connection's coming and going is no change: {d}"
        );
    }
    // Her last connection closes: she leaves, reason client_closed, seen on every node.
    a.close().await;
    for observer in [&mut b, &mut c, &mut dan] {
        let left = loop {
            let d = next_diff(observer, Duration::from_secs(3))
                .await
                .expect("ann's leave");
            if let Some(l) = d["left"]
                .as_array()
                .and_then(|l| l.iter().find(|m| m["sub"] == "ann").cloned())
            {
                break l;
            }
        };
        assert_eq!(left["reason"], "client_closed");
    }
    list_becomes(&mut b, &["bob", "cat", "dan", "eve", "syn"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_members_leave_with_node_lost_within_the_bound() {
    let redis = RedisServer::start().await;
    let flags = ["--list-rooms", "stage", "--presence-interval", "300ms"];
    let n1 = GatewayProcess::start("k1", Some(&redis), &flags).await;
    let _n2 = GatewayProcess::start("k2", Some(&redis), &flags).await;
    let mut n3 = GatewayProcess::start("k3", Some(&redis), &flags).await;
    let mut watcher = n1.join("stage", "host", "watcher").await;
    let _v1 = _n2.join("stage", "viewer", "v1").await;
    let _g1 = n3.join("stage", "viewer", "g1").await;
    let _g2 = n3.join("stage", "viewer", "g2").await;
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let (got, _) = list(&mut watcher).await;
        if got.len() == 4 {
            break got;
        }
        assert!(Instant::now() < deadline, "list never held 4: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let on_n3: BTreeSet<String> = before
        .iter()
        .filter(|s| s.starts_with("conn:k3-"))
        .cloned()
        .collect();
    assert_eq!(on_n3.len(), 2, "{before:?}");
    while next_diff(&mut watcher, Duration::from_millis(400))
        .await
        .is_some()
    {}

    n3.kill();
    let killed = Instant::now();
    let mut gone = BTreeSet::new();
    while gone != on_n3 {
        let d = next_diff(&mut watcher, Duration::from_secs(5))
            .await
            .expect("the dead node's members leave");
        for l in d["left"].as_array().into_iter().flatten() {
            assert_eq!(l["reason"], "node_lost", "{d}");
            gone.insert(l["sub"].as_str().unwrap().to_string());
        }
    }
    // The bound: 3 intervals (the registry entry's life) + 1 tick (the reaper's), plus the
    // diff's own tick on the watcher's node and some slack for a loaded machine.
    let took = killed.elapsed();
    assert!(
        took < Duration::from_millis(300 * 5 + 700),
        "node_lost took {took:?}"
    );
    let (after, _) = list(&mut watcher).await;
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.is_disjoint(&on_n3));
    assert!(
        n1.metric("gateway_roster_reaps_total").await
            + _n2.metric("gateway_roster_reaps_total").await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_counts_agree_on_a_redis_cluster() {
    let topology = ClusterTopology::start().await;
    let flags = ["--list-rooms", "room-*", "--presence-interval", "300ms"];
    let n1 = TestNode::start(test_config_url("c1", &topology.url(), &flags)).await;
    let n2 = TestNode::start(test_config_url("c2", &topology.url(), &flags)).await;
    // A room on every shard (the names as `rooms_per_shard` chose them: a prefix would move
    // them to other slots).
    for room in rooms_per_shard(1) {
        let mut h = n1.join(&room, "host", "h").await;
        let mut v = n2.join(&room, "viewer", "v").await;
        // The same counts on both nodes first (read before the lists, which skip frames).
        for c in [&mut h, &mut v] {
            frames_until(c, WAIT, |seen| {
                seen.iter()
                    .any(|p| p["type"] == "presence" && p["hosts"] == 1 && p["viewers"] == 1)
            })
            .await;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let (a, _) = list(&mut h).await;
            let (b, _) = list(&mut v).await;
            if a.len() == 2 && a == b {
                break;
            }
            assert!(Instant::now() < deadline, "{room}: {a:?} / {b:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        v.close().await;
        let d = loop {
            let d = next_diff(&mut h, Duration::from_secs(3))
                .await
                .expect("leave");
            if !subs(&d, "left").is_empty() {
                break d;
            }
        };
        assert_eq!(d["left"][0]["reason"], "client_closed", "{d}");
        assert_eq!(subs(&d, "left").len(), 1);
        h.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_bound_a_room_stops_listing_and_lists_again_below_its_hysteresis() {
    let flags = [
        "--list-rooms",
        "big",
        "--list-max-members",
        "3",
        "--presence-interval",
        "300ms",
    ];
    let cluster = TestCluster::start(&["b1", "b2"], &flags).await;
    let mut watcher = cluster[0].join("big", "host", "w").await;
    let _m2 = cluster[1].join("big", "viewer", "m2").await;
    let m3 = cluster[1].join("big", "viewer", "m3").await;
    let deadline = Instant::now() + WAIT;
    while list(&mut watcher).await.0.len() != 3 {
        assert!(Instant::now() < deadline, "3 never listed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m4 = cluster[0].join("big", "viewer", "m4").await;
    let seen = frames_until(&mut watcher, Duration::from_secs(3), |seen| {
        seen.iter().any(|d| d["over_limit"] == true)
            && seen
                .iter()
                .any(|p| p["type"] == "presence" && p["viewers"] == 3)
    })
    .await;
    let over = seen.iter().find(|d| d["over_limit"] == true).unwrap();
    assert_eq!(over["type"], "members_diff");
    assert!(over.get("joined").is_none(), "{over}");
    // The presence frame says so (the counts changed in the same tick).
    let p = seen
        .iter()
        .find(|p| p["type"] == "presence" && p["viewers"] == 3)
        .unwrap();
    assert_eq!(p["listing"], false, "{p}");
    watcher.send_text(r#"{"type":"members"}"#).await;
    let page = watcher.next_of("members").await;
    assert_eq!(page["over_limit"], true, "{page}");
    assert_eq!(page["members"], json!([]));
    // 3 members are not at or below 90 % of 3: still over.
    m4.close().await;
    assert!(
        next_diff(&mut watcher, Duration::from_secs(1))
            .await
            .is_none(),
        "no list changes while over the bound"
    );
    m3.close().await;
    let d = next_diff(&mut watcher, Duration::from_secs(3))
        .await
        .expect("listing again");
    assert_eq!(d["reset"], true, "{d}");
    assert_eq!(list(&mut watcher).await.0.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_does_not_list_counts_only() {
    let flags = ["--list-rooms", "listed-*", "--presence-interval", "300ms"];
    let cluster = TestCluster::start(&["u1", "u2"], &flags).await;
    let mut a = cluster[0].join("plain", "host", "a").await;
    let _b = cluster[1].join("plain", "viewer", "b").await;
    a.send_text(r#"{"type":"members"}"#).await;
    let e = a.next_of("error").await;
    assert_eq!(e["code"], "not_listed", "{e}");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut counts_seen = false;
    while let Some(v) = a
        .next_json_within(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        assert_ne!(v["type"], "members_diff", "{v}");
        if v["type"] == "presence" && v["viewers"] == 1 {
            assert!(v.get("listing").is_none(), "{v}");
            counts_seen = true;
        }
    }
    assert!(counts_seen, "the counts still arrive");
    assert_eq!(cluster[0].metric("gateway_members_diffs_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_with_list_lists_its_holder_only() {
    let flags = jwt_flags(&["--presence-interval", "300ms"]);
    let cluster = TestCluster::start(&["g1"], &flags).await;
    let grant = |sub: &str, list: bool| {
        token(&json!({"sub": sub, "exp": now() + 300,
            "rooms": [{"room": "vip", "role": "viewer", "list": list}]}))
    };
    let mut listed = connect_token(cluster[0].client, "vip", &grant("ann", true))
        .await
        .unwrap()
        .0;
    let mut counted = connect_token(cluster[0].client, "vip", &grant("bob", false))
        .await
        .unwrap()
        .0;
    list_becomes(&mut listed, &["ann"]).await;
    counted.send_text(r#"{"type":"members"}"#).await;
    assert_eq!(counted.next_of("error").await["code"], "not_listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_broker_lists_too() {
    let cluster =
        TestCluster::in_process("m1", &["--list-rooms", "*", "--presence-interval", "200ms"]).await;
    let mut a = cluster[0].join("solo", "host", "a").await;
    // Listed at the first tick after the join.
    let deadline = Instant::now() + WAIT;
    while list(&mut a).await.0.len() != 1 {
        assert!(Instant::now() < deadline, "a never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = cluster[0].join("solo", "viewer", "b").await;
    let d = loop {
        let d = next_diff(&mut a, Duration::from_secs(2))
            .await
            .expect("b joins");
        if !subs(&d, "joined").is_empty() {
            break d;
        }
    };
    assert_eq!(d["joined"][0]["name"], "b");
    assert_eq!(d["joined"][0]["role"], "viewer");
    let v = d["v"].as_u64().unwrap();
    b.close().await;
    let d = next_diff(&mut a, Duration::from_secs(2))
        .await
        .expect("b leaves");
    assert_eq!(d["left"][0]["reason"], "client_closed");
    assert_eq!(d["v"].as_u64().unwrap(), v + 1);
    assert_eq!(list(&mut a).await.0.len(), 1);
    assert_eq!(cluster[0].metric("gateway_list_members").await, 1.0);
    assert!(cluster[0].metric("gateway_members_diffs_total").await >= 2.0);
    assert!(cluster[0].metric("gateway_members_commands_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_member_leaves_with_reason_kicked() {
    let flags = jwt_flags(&["--list-rooms", "stage", "--presence-interval", "300ms"]);
    let cluster = TestCluster::start(&["q1", "q2"], &flags).await;
    cluster.redis().wait_numsub("gw:room:_control", 2).await;
    let mut ann = join_as(&cluster[0], "stage", "ann").await;
    let _bob = join_as(&cluster[1], "stage", "bob").await;
    list_becomes(&mut ann, &["ann", "bob"]).await;
    let auth = format!("Bearer {API_KEY}");
    let (status, _) = http(
        cluster[0].client,
        "POST",
        "/api/users/bob/disconnect",
        &[("Authorization", &auth)],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    let left = loop {
        let d = next_diff(&mut ann, Duration::from_secs(3))
            .await
            .expect("bob leaves");
        if let Some(l) = d["left"].as_array().and_then(|l| l.first().cloned()) {
            break l;
        }
    };
    assert_eq!(left, json!({"sub": "bob", "reason": "kicked"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roster_lost_in_redis_is_written_again_after_a_reset() {
    let flags = ["--list-rooms", "stage", "--presence-interval", "200ms"];
    let cluster = TestCluster::start(&["f1", "f2"], &flags).await;
    let mut a = cluster[0].join("stage", "host", "a").await;
    let _b = cluster[1].join("stage", "viewer", "b").await;
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let (got, _) = list(&mut a).await;
        if got.len() == 2 {
            break got;
        }
        assert!(Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Redis loses everything (a restart without persistence): the nodes' versions are ahead of
    // the roster's, so they are told `reset`, and write their members again.
    let mut conn = cluster.redis().connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let d = next_diff(&mut a, Duration::from_secs(3))
        .await
        .expect("a reset");
    assert_eq!(d["reset"], true, "{d}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, _) = list(&mut a).await;
        if got == before {
            break;
        }
        assert!(Instant::now() < deadline, "{got:?}, wanted {before:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A member that pages the list before its node's first write in the room holds a version the
/// node will never give batches from (it has seen none): that write sends it a `reset`, and its
/// re-read holds what changed meanwhile (found by the load tester's `--lists` across a node kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_first_write_in_a_room_resets_the_members_that_paged_before_it() {
    let redis = RedisServer::start().await;
    let fast = TestNode::start(test_config(
        "f1",
        Some(&redis),
        &["--list-rooms", "stage", "--presence-interval", "100ms"],
    ))
    .await;
    let slow = TestNode::start(test_config(
        "s1",
        Some(&redis),
        &["--list-rooms", "stage", "--presence-interval", "3s"],
    ))
    .await;
    let mut ann = fast.join("stage", "viewer", "ann").await;
    let deadline = Instant::now() + WAIT;
    while list(&mut ann).await.0.len() != 1 {
        assert!(Instant::now() < deadline, "ann never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Bob pages before his node wrote him: ann only.
    let mut bob = slow.join("stage", "viewer", "bob").await;
    let (paged, v) = list(&mut bob).await;
    assert_eq!(paged.len(), 1, "{paged:?}");
    // A change after bob's page, written by the fast node.
    let _cat = fast.join("stage", "viewer", "cat").await;
    let deadline = Instant::now() + WAIT;
    while list(&mut ann).await.0.len() != 2 {
        assert!(Instant::now() < deadline, "cat never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The slow node's first write: bob is told to read again, not left at his page's version.
    let diff = next_diff(&mut bob, Duration::from_secs(6))
        .await
        .expect("a members_diff at the slow node's first write");
    assert_eq!(diff["reset"], true, "{diff}");
    assert!(diff["v"].as_u64().unwrap() > v, "{diff}");
    let (again, _) = list(&mut bob).await;
    assert_eq!(again.len(), 3, "ann, bob and cat: {again:?}");
}
