//! Timers and endings across real processes: cluster-wide presence that adds up and forgets a
//! node that died, and a graceful drain on SIGTERM; and the production drain window's spacing,
//! in process on tokio's paused clock.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

/// Reads presence events until one shows `hosts`/`viewers` (within `limit`).
async fn presence_reaches(c: &mut WsClient, hosts: u64, viewers: u64, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = limit.saturating_sub(start.elapsed());
        let v = c
            .next_json_within(left)
            .await
            .unwrap_or_else(|| panic!("presence never showed {hosts} hosts / {viewers} viewers"));
        if v["type"] == "presence" && v["hosts"] == hosts && v["viewers"] == viewers {
            return start.elapsed();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_adds_up_across_nodes_and_forgets_a_dead_node() {
    let redis = RedisServer::start().await;
    let flags = ["--presence-interval", "300ms"];
    let n1 = GatewayProcess::start("p1", Some(&redis), &flags).await;
    let n2 = GatewayProcess::start("p2", Some(&redis), &flags).await;
    let mut n3 = GatewayProcess::start("p3", Some(&redis), &flags).await;

    let mut host = n1.join("stage", "host", "h").await;
    let _v1 = n1.join("stage", "viewer", "v1").await;
    let _v2 = n2.join("stage", "viewer", "v2").await;
    let _v3 = n2.join("stage", "viewer", "v3").await;
    let _v4 = n3.join("stage", "viewer", "v4").await;
    let _other = n3.join("elsewhere", "host", "x").await;
    presence_reaches(&mut host, 1, 4, Duration::from_secs(3)).await;

    // A join shows within one interval (plus the time to get there).
    let _v5 = n2.join("stage", "viewer", "v5").await;
    let took = presence_reaches(&mut host, 1, 5, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(900),
        "join took {took:?} to show"
    );
    // A leave too.
    _v5.close().await;
    let took = presence_reaches(&mut host, 1, 4, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(900),
        "leave took {took:?} to show"
    );

    // Node 3 dies without a word: its viewer vanishes from the counts within the TTL (3 × 300 ms).
    n3.kill();
    let took = presence_reaches(&mut host, 1, 3, Duration::from_secs(3)).await;
    assert!(
        took < Duration::from_millis(1500),
        "dead node's counts lasted {took:?}"
    );
    // Counts that stay the same are not sent again (issue 22): nothing for four intervals, though
    // every tick ran — the nodes counted the frames they did not send.
    let before = n1.metric("gateway_presence_unchanged_total").await;
    if let Some(v) = host.next_json_within(Duration::from_millis(1200)).await {
        panic!("unchanged counts sent again: {v}");
    }
    let skipped = n1.metric("gateway_presence_unchanged_total").await - before;
    assert!(
        skipped >= 6.0,
        "node 1's two members were skipped at each of ~4 ticks ({skipped})"
    );
    // A change reaches every member, the ones whose counts it does not change on their own node
    // included.
    let _v6 = n2.join("stage", "viewer", "v6").await;
    presence_reaches(&mut host, 1, 4, Duration::from_secs(3)).await;
    drop(n2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gets_presence_after_welcome_and_then_only_when_the_counts_change() {
    let node = GatewayProcess::start("q1", None, &["--presence-interval", "200ms"]).await;
    let mut first = node.join("quiet", "host", "h").await;
    let p = first.next_of("presence").await;
    assert_eq!(
        (p["hosts"].as_u64(), p["viewers"].as_u64()),
        (Some(1), Some(0))
    );
    // The first tick confirms the counts to the new member once; then nothing while they stay.
    let mut seen = 0;
    let end = tokio::time::Instant::now() + Duration::from_millis(1000);
    while let Some(v) = first
        .next_json_within(end.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        assert_eq!(v["type"], "presence", "{v}");
        assert_eq!(
            (v["hosts"].as_u64(), v["viewers"].as_u64()),
            (Some(1), Some(0))
        );
        seen += 1;
    }
    assert!(
        seen <= 1,
        "{seen} presence events for unchanged counts in 5 intervals"
    );
    // A second member: both get the new counts (the newcomer after its welcome too), once.
    let mut second = node.join("quiet", "viewer", "v").await;
    presence_reaches(&mut first, 1, 1, Duration::from_secs(2)).await;
    presence_reaches(&mut second, 1, 1, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    if let Some(v) = first.next_json_within(Duration::from_millis(800)).await {
        panic!("unchanged counts sent again: {v}");
    }
    // A leave is a change.
    second.close().await;
    presence_reaches(&mut first, 1, 0, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_1012_over_the_window_and_the_cluster_keeps_delivering() {
    let redis = RedisServer::start().await;
    let flags = ["--drain-seconds", "2"];
    let n1 = GatewayProcess::start("d1", Some(&redis), &flags).await;
    let n2 = GatewayProcess::start("d2", Some(&redis), &flags).await;
    let mut n3 = GatewayProcess::start("d3", Some(&redis), &flags).await;

    let mut host = n1.join("live", "host", "h").await;
    let mut stay = n2.join("live", "viewer", "stay").await;
    let mut leaving = Vec::new();
    for i in 0..20 {
        leaving.push(n3.join("live", "viewer", &format!("v{i}")).await);
    }
    redis.wait_numsub("gw:room:live", 3).await;

    let start = Instant::now();
    n3.terminate();
    // /readyz fails at once.
    eventually("readyz fails at once", || async {
        http(n3.admin, "GET", "/readyz", &[], b"")
            .await
            .map(|(s, _)| s)
            .unwrap_or(503)
            == 503
    })
    .await;
    assert!(start.elapsed() < Duration::from_millis(500));
    // The listener stops accepting.
    let refused = tokio_tungstenite::connect_async(n3.ws_url("live", "")).await;
    assert!(refused.is_err(), "a draining node accepts no new clients");

    // Every client of node 3 gets 1012, spread over the 2 s window; the host keeps publishing and
    // the viewer on node 2 keeps receiving all the while.
    let mut closes = Vec::new();
    let mut join = tokio::task::JoinSet::new();
    for mut c in leaving.drain(..) {
        join.spawn(async move {
            let ended = c.ended(Duration::from_secs(6)).await;
            (ended, Instant::now())
        });
    }
    let mut seq = 0;
    let publisher = async {
        while start.elapsed() < Duration::from_millis(2500) {
            seq += 1;
            host.publish(json!(seq)).await;
            assert_eq!(stay.next_message().await["data"], seq);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seq
    };
    let (sent, ()) = tokio::join!(publisher, async {
        while let Some(r) = join.join_next().await {
            closes.push(r.unwrap());
        }
    });
    assert!(
        sent > 20,
        "kept delivering through the drain ({sent} messages)"
    );
    let offsets: Vec<Duration> = closes
        .iter()
        .map(|(e, at)| {
            assert_eq!(*e, Ended::Closed(1012));
            at.duration_since(start)
        })
        .collect();
    let first = offsets.iter().min().unwrap();
    let last = offsets.iter().max().unwrap();
    assert!(
        *last - *first > Duration::from_millis(800),
        "closes spread over the window: {first:?}..{last:?}"
    );
    assert!(
        *last < Duration::from_millis(2600),
        "all closed within the window: {last:?}"
    );

    let (status, _) = n3.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    let total = start.elapsed();
    assert!(
        total < Duration::from_secs(7),
        "exited {total:?} after SIGTERM: more than drain + 5 s"
    );
    eprintln!("drain: closes from {first:?} to {last:?}, exit after {total:?}");
    redis.wait_numsub("gw:room:live", 2).await;
    drop(n1);
    drop(n2);
}

/// The production drain window (`--drain-seconds 10`) in process on tokio's paused clock: the
/// node's clients get 1012 at evenly spaced moments over the window (here 2, 4, 6, 8 and 10 s),
/// and `run` returns once the last is gone.
#[tokio::test(start_paused = true)]
async fn the_production_drain_spreads_its_1012s_evenly_over_the_window_on_paused_time() {
    let mut config = test_config("d", None, &[]);
    config.drain_seconds = gateway::Config::defaults().drain_seconds;
    let window = config.drain_seconds;
    assert_eq!(window, Duration::from_secs(10));
    let mut node = TestNode::start(config).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(node.join("r", "viewer", &format!("v{i}")).await);
    }
    let task = node.take_task();
    let began = tokio::time::Instant::now();
    node.begin_shutdown();
    let ends = futures_util::future::join_all(clients.into_iter().map(|mut c| async move {
        let how = c.ended(window * 2).await;
        let at = began.elapsed();
        drop(c);
        (how, at)
    }))
    .await;
    let mut at: Vec<Duration> = ends
        .iter()
        .map(|(how, at)| {
            assert_eq!(*how, Ended::Closed(1012));
            *at
        })
        .collect();
    at.sort();
    let step = window / 5;
    for (i, t) in at.iter().enumerate() {
        let due = step * (i as u32 + 1);
        assert!(
            *t >= due && *t < due + Duration::from_millis(100),
            "close {i} at {t:?}, due at {due:?} (all: {at:?})"
        );
    }
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("run returns once the last client is gone")
        .unwrap()
        .unwrap();
}

/// Riders (docs/protocol.md, section 2, `presence`): in a room with traffic, a presence change
/// and a keepalive Ping go out in the same write as a member's next message — they arrive in
/// one read with it — and nothing is lost or reordered; a quiet room's member still gets its Ping
/// on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_room_with_traffic_presence_and_pings_ride_with_its_messages() {
    let node = TestNode::start(test_config(
        "rd",
        None,
        &[
            "--presence-interval",
            "400ms",
            "--ping-interval",
            "1s",
            "--idle-timeout",
            "30s",
            "--max-publish-rate",
            "0",
        ],
    ))
    .await;
    let mut host = node.join("busy", "host", "h").await;
    let mut viewer = RawWs::connect(node.client, "/ws/busy?role=viewer").await;
    let mut quiet = RawWs::connect(node.client, "/ws/still?role=viewer").await;
    const N: u64 = 120;
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            host.publish(json!(i)).await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        host
    });
    // A second viewer joins mid-run: the counts change under traffic.
    let late = tokio::spawn({
        let url = node.ws_url("busy", "role=viewer&name=late");
        async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let mut c = WsClient::connect(&url).await;
            c.next_of("welcome").await;
            c
        }
    });
    let (mut presence_rode, mut ping_rode) = (false, false);
    let mut data = Vec::new();
    while data.len() < N as usize {
        let frames = viewer.read_together().await;
        assert!(!frames.is_empty(), "the connection ended after {data:?}");
        let json = |(op, p): &(u8, Vec<u8>)| {
            (*op == 1).then(|| serde_json::from_slice::<serde_json::Value>(p).unwrap())
        };
        for (k, f) in frames.iter().enumerate() {
            let next_is_message = frames
                .get(k + 1)
                .and_then(json)
                .is_some_and(|v| v["type"] == "message");
            match json(f) {
                Some(v) if v["type"] == "message" => data.push(v["data"].as_u64().unwrap()),
                Some(v) if v["type"] == "presence" && v["viewers"] == 2 => {
                    presence_rode |= next_is_message;
                }
                _ if f.0 == 0x9 => ping_rode |= next_is_message,
                _ => {}
            }
        }
    }
    assert_eq!(data, (0..N).collect::<Vec<_>>(), "every message, in order");
    assert!(presence_rode, "the new counts never rode with a message");
    assert!(ping_rode, "no Ping rode with a message");
    assert!(node.metric("gateway_riders_total").await >= 2.0);
    // The quiet room had no message: its member's Ping came on its own.
    let ping = loop {
        let (op, _) = quiet.read_frame().await.expect("connection open");
        if op == 0x9 {
            break op;
        }
    };
    assert_eq!(ping, 0x9);
    drop((publisher.await.unwrap(), late.await.unwrap()));
}
