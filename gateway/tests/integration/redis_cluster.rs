//! Redis Cluster with sharded pub/sub against a real 6-process cluster (3 masters, 3 replicas)
//! this test creates on loopback: three gateway nodes, rooms on every shard; a master is killed
//! and its replica takes over; a slot holding an active room moves to another master while a host
//! publishes. Delivery must resume by itself, and no subscription may be lost — the cases other
//! clients are known to get wrong (node-redis #2902 and #3311, ioredis #1987).

use std::time::{Duration, Instant};

use crate::common::*;
use redis::Value;
use serde_json::json;

async fn shard_numsub(port: u16, channel: &str) -> i64 {
    match redis_at(port, &["PUBSUB", "SHARDNUMSUB", channel]).await {
        Ok(Value::Array(v)) => match v.get(1) {
            Some(Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

struct Room {
    name: String,
    host: WsClient,
    viewer: WsClient,
}

/// Three nodes on the cluster; `probe` overrides the Redis probe interval.
async fn start_nodes(cluster: &ClusterTopology, probe: Option<Duration>) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let mut config = test_config_url(
            &format!("n{i}"),
            &cluster.url(),
            &["--presence-interval", "500ms"],
        );
        if let Some(p) = probe {
            config.redis_probe_interval = p;
        }
        nodes.push(TestNode::start(config).await);
    }
    nodes
}

async fn join_rooms(nodes: &[TestNode], names: &[String]) -> Vec<Room> {
    let mut rooms = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let host = nodes[i % 3].join(name, "host", "h").await;
        let viewer = nodes[(i + 1) % 3].join(name, "viewer", "v").await;
        rooms.push(Room {
            name: name.clone(),
            host,
            viewer,
        });
    }
    for r in &mut rooms {
        assert!(
            delivery_resumes(&mut r.host, &mut r.viewer, Duration::from_secs(10))
                .await
                .is_some(),
            "room {} delivers across nodes",
            r.name
        );
    }
    rooms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_fails_over_and_delivery_resumes() {
    let mut cluster = ClusterTopology::start_requiring_full_coverage().await;
    let nodes = start_nodes(&cluster, None).await;
    let names = rooms_per_shard(2);
    let mut rooms = join_rooms(&nodes, &names).await;
    for n in &nodes {
        assert_eq!(n.metric("gateway_redis_shards").await, 3.0);
        assert_eq!(
            n.metric("gateway_redis_shard_up").await,
            3.0,
            "sum over shards"
        );
    }
    // Every room's channel is subscribed once per node that has members, on its shard.
    for r in &rooms {
        let port = cluster.master_of(room_slot(&r.name)).await;
        assert_eq!(
            shard_numsub(port, &format!("gw:room:{{{}}}", r.name)).await,
            2
        );
    }

    let victim_room = 0;
    let victim = cluster.master_of(room_slot(&rooms[victim_room].name)).await;
    let killed = Instant::now();
    cluster.kill_port(victim);
    eventually("/readyz red while a shard is down", || async {
        readyz_status(&nodes[0]).await == 503
    })
    .await;
    assert_eq!(nodes[0].metric("gateway_redis_connected").await, 0.0);
    let r = &mut rooms[victim_room];
    let resumed = delivery_resumes(&mut r.host, &mut r.viewer, Duration::from_secs(30))
        .await
        .map(|_| killed.elapsed());
    let resumed = resumed.expect("delivery resumes after the replica took over");
    println!("cluster failover: delivery resumed {resumed:?} after SIGKILL of a master");
    for n in &nodes {
        eventually("ready again", || async { readyz_status(n).await == 200 }).await;
    }
    // Every room delivers, on every shard.
    for r in &mut rooms {
        assert!(
            delivery_resumes(&mut r.host, &mut r.viewer, Duration::from_secs(10))
                .await
                .is_some(),
            "room {} after the failover",
            r.name
        );
    }
    assert!(
        resumed < Duration::from_secs(15),
        "resumed after {resumed:?}"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// Moves `slot` from master `from` to master `to` the way `redis-cli --cluster reshard` does.
async fn move_slot(cluster: &ClusterTopology, slot: u16, from: (u16, String), to: (u16, String)) {
    let s = slot.to_string();
    redis_at(to.0, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from.1])
        .await
        .unwrap();
    redis_at(from.0, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to.1])
        .await
        .unwrap();
    loop {
        let keys = redis_at(from.0, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
            .await
            .unwrap();
        let Value::Array(keys) = keys else { panic!() };
        if keys.is_empty() {
            break;
        }
        let keys: Vec<String> = keys.iter().map(value_text).collect();
        let port = to.0.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        redis_at(from.0, &args).await.unwrap();
    }
    for port in [to.0, from.0] {
        redis_at(port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.1])
            .await
            .unwrap();
    }
    for n in cluster.nodes.iter().filter(|n| n.running()) {
        let _ = redis_at(n.port, &["CLUSTER", "SETSLOT", &s, "NODE", &to.1]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moves_under_a_publishing_host_and_no_subscription_is_lost() {
    let cluster = ClusterTopology::start_requiring_full_coverage().await;
    // A probe far beyond the test's bounds: only the server's SUNSUBSCRIBE can tell the nodes
    // that the slot moved, so this tests that path (the probe would also repair it, later).
    let nodes = start_nodes(&cluster, Some(Duration::from_secs(60))).await;
    let names = rooms_per_shard(2);
    let mut rooms = join_rooms(&nodes, &names).await;
    let moving = rooms.remove(0);
    let channel = format!("gw:room:{{{}}}", moving.name);
    let slot = room_slot(&moving.name);
    let from = cluster.master_entry(slot).await;
    let to = {
        // Any other master.
        let mut to = None;
        for r in &rooms {
            let m = cluster.master_entry(room_slot(&r.name)).await;
            if m.0 != from.0 {
                to = Some(m);
                break;
            }
        }
        to.unwrap()
    };
    assert_eq!(shard_numsub(from.0, &channel).await, 2);

    // The host publishes all along, every 50 ms.
    let Room {
        mut host,
        mut viewer,
        ..
    } = moving;
    let publishing = tokio::spawn(async move {
        for i in 0..80u64 {
            host.publish(json!({ "seq": i })).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        host
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let moved = Instant::now();
    move_slot(&cluster, slot, from.clone(), to.clone()).await;
    // Both subscribing nodes are subscribed on the new owner, none on the old one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if shard_numsub(to.0, &channel).await == 2 && shard_numsub(from.0, &channel).await == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "subscriptions did not follow the slot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resubscribed = moved.elapsed();
    let mut host = publishing.await.unwrap();
    // Messages published after the move reach the viewer.
    let mut got_late = false;
    while let Some(m) = viewer.next_json_within(Duration::from_millis(300)).await {
        if m["type"] == "message" && m["data"]["seq"].as_u64() >= Some(70) {
            got_late = true;
        }
    }
    assert!(got_late, "messages published after the move are delivered");
    assert!(
        delivery_resumes(&mut host, &mut viewer, Duration::from_secs(5))
            .await
            .is_some()
    );
    println!("slot migration: resubscribed on the new owner {resubscribed:?} after the move");
    // Presence keeps working on the new owner: the key carries the room's hash tag, so it moved
    // with the slot, and both nodes' reports (host on one node, viewer on another) meet in it.
    let key = format!("gw:room:{{{}}}:presence", names[0]);
    eventually("presence key on the new owner", || async {
        matches!(redis_at(to.0, &["EXISTS", &key]).await, Ok(Value::Int(1)))
    })
    .await;
    // A change of the counts after the move reaches the viewer: a second viewer on the host's
    // node makes 1 host and 2 viewers (presence is sent only when the counts change).
    let _second = nodes[0].join(&names[0], "viewer", "second").await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = viewer.next_of("presence").await;
        if m["hosts"] == 1 && m["viewers"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "cluster-wide presence: {m}");
    }
    // The other rooms never noticed.
    for r in &mut rooms {
        assert!(
            delivery_resumes(&mut r.host, &mut r.viewer, Duration::from_secs(5))
                .await
                .is_some()
        );
    }
    for n in nodes {
        n.stop().await;
    }
}

/// The history, resume and moderation paths in cluster mode: every message is numbered in its
/// room's slot (the publish script `SPUBLISH`es there), a client resumes on another node with
/// `since` and gets exactly what it missed, the history API reads the room's slot, and a
/// moderator's room disconnect reaches members on all three nodes through the control channel
/// (`gw:room:{_control}`, one fixed slot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_resume_and_moderation_work_on_a_cluster() {
    let cluster = ClusterTopology::start_requiring_full_coverage().await;
    let mut nodes = Vec::new();
    for i in 1..=3 {
        let config = test_config_url(
            &format!("n{i}"),
            &cluster.url(),
            &["--api-key", "cluster-key-1"],
        );
        nodes.push(TestNode::start(config).await);
    }
    let auth = ("Authorization", "Bearer cluster-key-1");
    for name in rooms_per_shard(2) {
        let mut host = nodes[0].join(&name, "host", "h").await;
        let mut viewer = nodes[1].join(&name, "viewer", "v").await;
        for i in 1..=3 {
            host.publish(json!({ "n": i })).await;
        }

        let mut offsets = Vec::new();
        let mut epoch = String::new();
        for _ in 1..=3 {
            let m = viewer.next_message().await;
            offsets.push(m["offset"].as_u64().expect("numbered"));
            epoch = text_of(&m["epoch"]);
        }
        assert_eq!(offsets, [1, 2, 3], "room {name}: offsets in order");
        // The viewer leaves after offset 1; two more are published; it resumes on node 3.
        viewer.close().await;
        host.publish(json!({ "n": 4 })).await;
        host.publish(json!({ "n": 5 })).await;
        let mut resumed =
            WsClient::connect(&nodes[2].ws_url(&name, &format!("role=viewer&since={epoch}:3")))
                .await;
        let w = resumed.next_of("welcome").await;
        assert_eq!(w["recovered"], true, "room {name}: {w}");
        let got: Vec<u64> = [resumed.next_message().await, resumed.next_message().await]
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(got, [4, 5], "room {name}: exactly what was missed");
        let (status, body) = http_history(nodes[1].client, &name, "limit=10", &[auth]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["offset"], 5);
        assert_eq!(body["messages"].as_array().unwrap().len(), 5);
        resumed.close().await;
        host.close().await;
    }

    let room = "mod-room";
    let mut members = Vec::new();
    for n in &nodes {
        members.push(n.join(room, "viewer", "v").await);
    }
    let (status, _) = http(
        nodes[0].client,
        "POST",
        &format!("/api/rooms/{room}/disconnect"),
        &[auth],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 202);
    for m in &mut members {
        assert!(matches!(
            m.ended(Duration::from_secs(3)).await,
            Ended::Closed(4501)
        ));
    }
    for n in nodes {
        n.stop().await;
    }
}

fn text_of(v: &serde_json::Value) -> String {
    v.as_str().expect("a string").to_string()
}
