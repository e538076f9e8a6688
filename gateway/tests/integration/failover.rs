//! A Redis failover is not a reconnect storm (issue 21, part 2), against real processes: a Redis
//! Cluster (3 masters + 3 replicas, `cluster-node-timeout` 1000 ms) and a Sentinel set-up (one
//! master, one replica, three sentinels, `down-after-milliseconds` 1000). Two gateway nodes with
//! `--broker-loss-close 1s` — shorter than the failover, so that a node which hands over whatever
//! it loses (the behaviour before) closes members during it — and rooms whose host is on one node
//! and viewer on the other. Hosts publish with idempotency keys all along (a publish refused
//! `unavailable` is sent again with the same key); a master is SIGKILLed.
//!
//! Expected: no member is closed (every node lost the same master: the witness says so); in
//! rooms on healthy shards no publish is refused and every message arrives live — in the Cluster
//! test also in a room fed by plain `SPUBLISH` at ~1 000/s, each message exactly once, in order,
//! while each node's fresh connections replace the old ones; members of the failed shard's rooms
//! get every acknowledged message (live, or by a resume with `since` after a gap). The figures
//! (failover duration, closes, refusals, lost) are printed.
//!
//! That a node really cut off still hands over is `redis_outage.rs`'s
//! `a_node_without_redis_hands_its_clients_over_with_4002`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};
use tokio::sync::Mutex;

/// Publishes per room (one every [`EVERY`] plus the ack's round trip: ~12 s of traffic).
const PUBLISHES: u64 = 150;
const EVERY: Duration = Duration::from_millis(50);

fn node_flags() -> Vec<&'static str> {
    vec![
        "--broker-loss-close",
        "1s",
        "--broker-failover-wait",
        "60s",
        "--redis-backoff-cap",
        "500ms",
        "--max-publish-rate",
        "100",
    ]
}

async fn start_nodes(url: &str) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let flags = node_flags();
        let mut config = test_config_url(&format!("n{i}"), url, &flags);
        config.redis_probe_interval = Duration::from_millis(200);
        nodes.push(TestNode::start(config).await);
    }
    nodes
}

/// What one host saw.
#[derive(Debug, Default)]
struct Published {
    acked: u64,
    /// Attempts answered `unavailable` (each sent again with the same key).
    refused: u64,
    /// When the first attempt was refused and when the next ack came (the room's gap).
    first_refused: Option<Instant>,
    acked_again: Option<Instant>,
    closes: Vec<u16>,
}

/// What one viewer saw.
#[derive(Debug, Default)]
struct Received {
    /// `seq` of every message received live, in order.
    live: Vec<u64>,
    /// (offset, epoch) of every message received live.
    offsets: Vec<(u64, String)>,
    /// `seq`s received by the resume after a gap.
    resumed: Vec<u64>,
    closes: Vec<u16>,
}

/// Reads the next text frame as JSON within `limit`; `Err(code)` when the connection closes.
async fn next_frame(c: &mut WsClient, limit: Duration) -> Result<Option<Value>, u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    match tokio::time::timeout(limit, c.ws.next()).await {
        Err(_) => Ok(None),
        Ok(Some(Ok(Message::Text(t)))) => Ok(Some(serde_json::from_str(&t).unwrap())),
        Ok(Some(Ok(Message::Close(f)))) => Err(f.map(|f| u16::from(f.code)).unwrap_or(1005)),
        Ok(Some(Ok(_))) => Ok(None),
        Ok(Some(Err(_))) | Ok(None) => Err(1006),
    }
}

/// The host publishes `{"seq": n}` with key `room-n`, each until acknowledged.
async fn publish_all(room: String, mut host: WsClient) -> Published {
    let mut p = Published::default();
    for seq in 0..PUBLISHES {
        let key = format!("{room}-{seq}");
        let frame = json!({"type": "publish", "data": {"seq": seq}, "key": key}).to_string();
        'attempt: loop {
            host.send_text(&frame).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match next_frame(&mut host, Duration::from_millis(200)).await {
                    Err(code) => {
                        p.closes.push(code);
                        return p;
                    }
                    Ok(Some(v)) if v["key"] == key.as_str() && v["type"] == "ack" => {
                        p.acked += 1;
                        if p.first_refused.is_some() && p.acked_again.is_none() {
                            p.acked_again = Some(Instant::now());
                        }
                        break 'attempt;
                    }
                    Ok(Some(v)) if v["key"] == key.as_str() && v["type"] == "error" => {
                        assert_eq!(v["code"], "unavailable", "{v}");
                        p.refused += 1;
                        p.first_refused.get_or_insert_with(Instant::now);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'attempt;
                    }
                    Ok(_) => {}
                }
            }
        }
        tokio::time::sleep(EVERY).await;
    }
    p
}

/// Publishes 0, 1, 2, … on `channel` with `SPUBLISH` at the master on `port`, ten every 5 ms,
/// until `stop`; returns how many it published (each must succeed: the shard is healthy).
async fn spsublish_until(
    port: u16,
    channel: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..10 {
            let _: i64 = redis::cmd("SPUBLISH")
                .arg(&channel)
                .arg(n.to_string())
                .query_async(&mut c)
                .await
                .expect("SPUBLISH on a healthy shard");
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n
}

/// The viewer reads until it has every `seq` or the host is done and a second passed.
async fn receive_all(mut viewer: WsClient, done: Arc<Mutex<bool>>) -> Received {
    let mut r = Received::default();
    let mut quiet_since: Option<Instant> = None;
    loop {
        if r.live.len() as u64 >= PUBLISHES {
            return r;
        }
        match next_frame(&mut viewer, Duration::from_millis(200)).await {
            Err(code) => {
                r.closes.push(code);
                return r;
            }
            Ok(Some(v)) if v["type"] == "message" => {
                if let Some(seq) = v["data"]["seq"].as_u64() {
                    r.live.push(seq);
                    r.offsets.push((
                        v["offset"].as_u64().unwrap_or(0),
                        v["epoch"].as_str().unwrap_or("").to_string(),
                    ));
                }
                quiet_since = None;
            }
            _ => {
                if *done.lock().await {
                    let q = *quiet_since.get_or_insert_with(Instant::now);
                    if q.elapsed() > Duration::from_secs(1) {
                        return r;
                    }
                }
            }
        }
    }
}

/// After a gap in live delivery, resumes on `node` with `since` = the last offset before the
/// first gap (as `/client.js` does), and collects the missing `seq`s.
async fn resume_gap(node: &TestNode, room: &str, r: &mut Received) {
    let missing = |r: &Received| {
        let mut all: Vec<u64> = r.live.iter().chain(&r.resumed).copied().collect();
        all.sort();
        all.dedup();
        PUBLISHES - all.len() as u64
    };
    if missing(r) == 0 {
        return;
    }
    let mut since = r.offsets.first().map(|(o, e)| (o - 1, e.clone()));
    for w in r.offsets.windows(2) {
        if w[1].0 != w[0].0 + 1 {
            since = Some(w[0].clone());
            break;
        }
    }
    let (offset, epoch) = since.unwrap_or((0, String::new()));
    let mut c =
        WsClient::connect(&node.ws_url(room, &format!("role=viewer&since={epoch}:{offset}"))).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && missing(r) > 0 {
        if let Ok(Some(v)) = next_frame(&mut c, Duration::from_millis(200)).await {
            if let (Some("message"), Some(seq)) = (v["type"].as_str(), v["data"]["seq"].as_u64()) {
                r.resumed.push(seq);
            }
        }
    }
}

/// One room's outcome.
struct Outcome {
    room: String,
    published: Published,
    received: Received,
}

impl Outcome {
    fn lost(&self) -> u64 {
        let mut all: Vec<u64> = self
            .received
            .live
            .iter()
            .chain(&self.received.resumed)
            .copied()
            .collect();
        all.sort();
        all.dedup();
        self.published.acked - all.len() as u64
    }

    /// No member closed, every publish acknowledged, nothing lost, nothing twice.
    fn assert_kept_and_complete(&self) {
        assert!(
            self.published.closes.is_empty() && self.received.closes.is_empty(),
            "room {}: members closed ({:?}, {:?})",
            self.room,
            self.published.closes,
            self.received.closes
        );
        assert_eq!(
            self.published.acked, PUBLISHES,
            "room {}: every publish acked",
            self.room
        );
        assert_eq!(self.lost(), 0, "room {}: nothing lost", self.room);
        assert_eq!(
            self.live_duplicates(),
            0,
            "room {}: no message twice (two subscriber connections may overlap)",
            self.room
        );
    }

    fn live_duplicates(&self) -> usize {
        let mut live = self.received.live.clone();
        live.sort();
        let n = live.len();
        live.dedup();
        n - live.len()
    }

    fn live_missing(&self) -> u64 {
        let mut live = self.received.live.clone();
        live.sort();
        live.dedup();
        PUBLISHES - live.len() as u64
    }
}

/// Joins every room (host on one node, viewer on the other, alternating), runs `fault` once the
/// traffic runs, and returns each room's outcome.
async fn traffic_through(
    nodes: &[TestNode],
    rooms: &[String],
    fault: impl std::future::Future<Output = ()>,
) -> Vec<Outcome> {
    let mut tasks = Vec::new();
    let done = Arc::new(Mutex::new(false));
    for (i, room) in rooms.iter().enumerate() {
        let mut host = nodes[i % 2].join(room, "host", "h").await;
        let mut viewer = nodes[(i + 1) % 2].join(room, "viewer", "v").await;
        assert!(
            delivery_resumes(&mut host, &mut viewer, Duration::from_secs(10))
                .await
                .is_some(),
            "room {room} delivers across nodes before the fault"
        );
        // Drain the probes so that the viewer's count starts clean.
        while viewer
            .next_json_within(Duration::from_millis(100))
            .await
            .is_some()
        {}
        let publishing = tokio::spawn(publish_all(room.clone(), host));
        let receiving = tokio::spawn(receive_all(viewer, done.clone()));
        tasks.push((room.clone(), (i + 1) % 2, publishing, receiving));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault.await;
    let mut outcomes = Vec::new();
    let mut published = Vec::new();
    for (room, viewer_node, publishing, receiving) in tasks {
        published.push((room, viewer_node, publishing.await.unwrap(), receiving));
    }
    *done.lock().await = true;
    for (room, viewer_node, published, receiving) in published {
        let mut received = receiving.await.unwrap();
        if received.closes.is_empty() {
            resume_gap(&nodes[viewer_node], &room, &mut received).await;
        }
        outcomes.push(Outcome {
            room,
            published,
            received,
        });
    }
    outcomes
}

/// The longest time any host waited from its first refused publish to its next ack.
fn longest_publish_gap(outcomes: &[Outcome]) -> Option<Duration> {
    outcomes
        .iter()
        .filter_map(|o| o.published.first_refused.zip(o.published.acked_again))
        .map(|(a, b)| b - a)
        .max()
}

fn print(kind: &str, outcomes: &[Outcome], failed: &dyn Fn(&str) -> bool) {
    for o in outcomes {
        println!(
            "{kind}: room {} ({}): acked {}, refused {} (gap {:?}), host closes {:?}, viewer closes {:?}, live missing {}, resumed {}, lost {}",
            o.room,
            if failed(&o.room) { "failed shard" } else { "healthy shard" },
            o.published.acked,
            o.published.refused,
            o.published
                .first_refused
                .zip(o.published.acked_again)
                .map(|(a, b)| b - a),
            o.published.closes,
            o.received.closes,
            o.live_missing(),
            o.received.resumed.len(),
            o.lost()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_failover_closes_no_member_and_loses_nothing() {
    let mut cluster = ClusterTopology::start().await;
    let nodes = start_nodes(&cluster.url()).await;
    let rooms = rooms_per_shard(2);
    let victim_room = rooms[0].clone();
    let victim = cluster.master_of(room_slot(&victim_room)).await;
    let mut on_victim = Vec::new();
    for r in &rooms {
        if cluster.master_of(room_slot(r)).await == victim {
            on_victim.push(r.clone());
        }
    }
    assert_eq!(
        on_victim.len(),
        2,
        "two rooms on the failed shard, four on the others"
    );
    // A room on a healthy shard fed by plain `SPUBLISH` at ~1 000 messages a second, watched on
    // both nodes: while a node's fresh subscriber connection overlaps its old one, every message
    // comes on both, so this room shows a gap or a duplicate that the slower rooms may not.
    let burst = (0..)
        .map(|i| format!("burst-{i}"))
        .find(|r| room_slot(r) / 5462 != room_slot(&victim_room) / 5462)
        .unwrap();
    let burst_master = cluster.master_of(room_slot(&burst)).await;
    assert_ne!(burst_master, victim);
    let mut burst_viewers = Vec::new();
    for n in &nodes {
        burst_viewers.push(n.join(&burst, "viewer", "b").await);
    }
    let stop_burst = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let burst_publisher = tokio::spawn(spsublish_until(
        burst_master,
        format!("gw:room:{{{burst}}}"),
        stop_burst.clone(),
    ));
    let mut failover = None;
    let outcomes = traffic_through(&nodes, &rooms, async {
        let killed = Instant::now();
        cluster.kill_port(victim);
        // The nodes see the shard lost (2 of 3 up), then back (a replica took over).
        eventually("the nodes see the shard lost", || async {
            nodes[0].metric("gateway_redis_shard_up").await == 2.0
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while nodes[0].metric("gateway_redis_shard_up").await != 3.0
            || nodes[1].metric("gateway_redis_shard_up").await != 3.0
        {
            assert!(Instant::now() < deadline, "the failover never completed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failover = Some(killed.elapsed());
    })
    .await;
    let failover = failover.unwrap();
    stop_burst.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = burst_publisher.await.unwrap();
    for (n, mut v) in nodes.iter().zip(burst_viewers) {
        let mut got: Vec<u64> = Vec::new();
        while (got.len() as u64) < sent {
            let Some(m) = v.next_json_within(Duration::from_secs(3)).await else {
                break;
            };
            if m["type"] == "message" {
                got.push(m["data"].as_str().unwrap().parse().unwrap());
            }
        }
        let mut distinct = got.clone();
        distinct.sort();
        distinct.dedup();
        println!(
            "cluster: burst room on a healthy shard, viewer on {}: published {sent}, received {} ({} distinct)",
            n.id,
            got.len(),
            distinct.len()
        );
        let first_wrong = got.iter().enumerate().find(|(i, m)| **m != *i as u64);
        assert!(
            got.len() as u64 == sent && first_wrong.is_none(),
            "node {}: every burst message once, in order: {} of {sent}, first out of place {first_wrong:?}",
            n.id,
            got.len()
        );
    }
    let failed = |r: &str| on_victim.iter().any(|v| v == r);
    print("cluster", &outcomes, &failed);
    let gap = longest_publish_gap(&outcomes);
    println!(
        "cluster failover: shard back on both nodes within {failover:?} of the SIGKILL; longest publish gap {gap:?}"
    );
    for n in &nodes {
        println!(
            "cluster failover: node {} closes broker_lost = {}",
            n.id,
            n.metric("gateway_connections_closed_total{reason=\"broker_lost\"}")
                .await
        );
        // Both connections moved to fresh ones (make before break), not left on the old.
        for conn in ["subscriber", "publisher"] {
            let moved = n
                .metric(&format!(
                    "gateway_redis_reconnects_total{{connection=\"{conn}\"}}"
                ))
                .await;
            assert!(moved >= 1.0, "node {}: the {conn} moved ({moved})", n.id);
        }
    }
    // The test is a test: the outage outlasted --broker-loss-close (1 s), so a node that hands
    // over whatever it loses would have closed members.
    assert!(
        failover > Duration::from_secs(1),
        "failover took {failover:?}"
    );
    for o in &outcomes {
        o.assert_kept_and_complete();
        if !failed(&o.room) {
            assert_eq!(
                o.live_missing(),
                0,
                "room {} on a healthy shard: every message live",
                o.room
            );
            assert_eq!(
                o.published.refused, 0,
                "room {} on a healthy shard: no publish refused",
                o.room
            );
        }
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_closes_no_member_and_loses_nothing() {
    let mut setup = SentinelTopology::start().await;
    let nodes = start_nodes(&setup.url()).await;
    let rooms: Vec<String> = (0..4).map(|i| format!("s-{i}")).collect();
    let old = setup.master_port().await;
    let mut failover = None;
    let outcomes = traffic_through(&nodes, &rooms, async {
        let killed = Instant::now();
        setup.kill_server(old);
        eventually("the nodes see the master lost", || async {
            nodes[0].metric("gateway_redis_connected").await == 0.0
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while setup.master_port().await == old
            || nodes[0].metric("gateway_redis_connected").await != 1.0
            || nodes[1].metric("gateway_redis_connected").await != 1.0
        {
            assert!(Instant::now() < deadline, "the failover never completed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        failover = Some(killed.elapsed());
    })
    .await;
    let failover = failover.unwrap();
    print("sentinel", &outcomes, &|_| true);
    let gap = longest_publish_gap(&outcomes);
    println!(
        "sentinel failover: both nodes on the new master within {failover:?} of the SIGKILL; longest publish gap {gap:?}"
    );
    assert!(
        failover > Duration::from_secs(1),
        "failover took {failover:?}"
    );
    for o in &outcomes {
        o.assert_kept_and_complete();
    }
    for n in nodes {
        n.stop().await;
    }
}

/// The node port of the replica of the master on `master` (from `CLUSTER NODES`).
async fn replica_of(cluster: &ClusterTopology, master: u16) -> u16 {
    let id = value_text(&redis_at(master, &["CLUSTER", "MYID"]).await.unwrap());
    let nodes = value_text(&redis_at(master, &["CLUSTER", "NODES"]).await.unwrap());
    for line in nodes.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && f[3] == id {
            let addr = f[1].split('@').next().unwrap();
            let port: u16 = addr.rsplit_once(':').unwrap().1.parse().unwrap();
            assert!(cluster.nodes.iter().any(|n| n.port == port));
            return port;
        }
    }
    panic!("no replica of {master}: {nodes}")
}

/// A shard with no failover to wait for (its master and its replica are killed): every node
/// lost it alike, so its members stay for `--broker-failover-wait` (3 s here), then are handed
/// over with 4002 — and only they: the members of rooms on the two healthy shards stay and keep
/// delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_lost_for_good_hands_over_only_its_members_after_the_failover_wait() {
    let mut cluster = ClusterTopology::start().await;
    for n in &cluster.nodes {
        // The healthy shards keep serving while one shard has no master.
        redis_at(
            n.port,
            &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
        )
        .await
        .unwrap();
    }
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let mut config = test_config_url(
            &format!("n{i}"),
            &cluster.url(),
            &["--broker-loss-close", "1s", "--broker-failover-wait", "3s"],
        );
        config.redis_probe_interval = Duration::from_millis(200);
        nodes.push(TestNode::start(config).await);
    }
    let rooms = rooms_per_shard(1);
    let mut members = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        let mut host = nodes[i % 2].join(room, "host", "h").await;
        let mut viewer = nodes[(i + 1) % 2].join(room, "viewer", "v").await;
        assert!(
            delivery_resumes(&mut host, &mut viewer, Duration::from_secs(10))
                .await
                .is_some()
        );
        members.push((room.clone(), host, viewer));
    }
    let victim = cluster.master_of(room_slot(&rooms[0])).await;
    let replica = replica_of(&cluster, victim).await;
    cluster.kill_port(replica);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    cluster.kill_port(victim);
    let (_, host, viewer) = &mut members[0];
    for c in [host, viewer] {
        assert_eq!(c.ended(Duration::from_secs(15)).await, Ended::Closed(4002));
    }
    let closed = killed.elapsed();
    println!("a shard lost for good: its members handed over {closed:?} after the SIGKILL");
    assert!(
        closed >= Duration::from_secs(3),
        "handed over after {closed:?}, before --broker-failover-wait"
    );
    for (room, host, viewer) in members.iter_mut().skip(1) {
        assert!(
            delivery_resumes(host, viewer, Duration::from_secs(5))
                .await
                .is_some(),
            "room {room} on a healthy shard still delivers"
        );
    }
    let mut handed = 0.0;
    for n in &nodes {
        handed += n
            .metric("gateway_connections_closed_total{reason=\"broker_lost\"}")
            .await;
    }
    assert_eq!(
        handed, 2.0,
        "only the lost shard's two members were handed over"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// Sentinel, with the sentinels gone too: no witness answers, so the node cannot tell that
/// others lost the master as well — it hands its members over after `--broker-loss-close`,
/// as before (the case of a node cut off from Redis and sentinels alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_answering_sentinel_a_lost_master_is_handed_over() {
    let mut setup = SentinelTopology::start().await;
    let mut config = test_config_url(
        "n1",
        &setup.url(),
        &["--broker-loss-close", "1s", "--broker-failover-wait", "30s"],
    );
    config.redis_probe_interval = Duration::from_millis(200);
    let node = TestNode::start(config).await;
    let mut viewer = node.join("cut", "viewer", "v").await;
    let master = setup.master_port().await;
    for s in &mut setup.sentinels {
        s.kill();
    }
    // The sentinels alone gone changes nothing: the master still answers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(node.metric("gateway_redis_connected").await, 1.0);
    assert!(
        next_frame(&mut viewer, Duration::from_millis(100))
            .await
            .is_ok(),
        "still open with the sentinels gone"
    );
    let killed = Instant::now();
    setup.kill_server(master);
    assert_eq!(
        viewer.ended(Duration::from_secs(10)).await,
        Ended::Closed(4002)
    );
    let closed = killed.elapsed();
    println!("no sentinel answers: handed over {closed:?} after the SIGKILL");
    assert!(
        closed < Duration::from_secs(5),
        "handed over after {closed:?}"
    );
    node.stop().await;
}

/// A Cluster node that reaches no cluster node at all is cut off (every process killed here:
/// from the node's side, the same): it hands its members over after `--broker-loss-close`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaching_no_cluster_node_hands_over() {
    let mut cluster = ClusterTopology::start().await;
    let mut config = test_config_url(
        "n1",
        &cluster.url(),
        &["--broker-loss-close", "1s", "--broker-failover-wait", "30s"],
    );
    config.redis_probe_interval = Duration::from_millis(200);
    let node = TestNode::start(config).await;
    let rooms = rooms_per_shard(1);
    let mut members = Vec::new();
    for room in &rooms {
        members.push(node.join(room, "viewer", "v").await);
    }
    let killed = Instant::now();
    for n in &mut cluster.nodes {
        n.kill();
    }
    for m in &mut members {
        assert_eq!(m.ended(Duration::from_secs(10)).await, Ended::Closed(4002));
    }
    let closed = killed.elapsed();
    println!("no cluster node answers: all members handed over {closed:?} after the SIGKILLs");
    assert!(
        closed < Duration::from_secs(5),
        "handed over after {closed:?}"
    );
    node.stop().await;
}
