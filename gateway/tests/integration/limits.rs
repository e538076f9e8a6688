//! Overload and bad input, each limit with its documented result: slow consumers, connection
//! cap, publish rate, Origin allow-list, idle clients, oversized Redis payloads.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_reading_is_cut_off_and_the_others_keep_up() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &["--outbox-frames", "1024", "--outbox-bytes", "4194304"],
    ))
    .await;
    let mut fast = node.join("flood", "viewer", "fast").await;
    let mut stuck = RawWs::connect(node.client, "/ws/flood?name=stuck").await;
    redis.wait_numsub("gw:room:flood", 1).await;

    // 5000 messages of 4 KiB (20 MiB): far more than the socket buffers plus the stuck viewer's outbox.
    let payload = "x".repeat(4096);
    let publisher = tokio::spawn({
        let url = redis.url();
        async move {
            let mut c = redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            for i in 0..5000 {
                let body = format!("{i}:{payload}");
                let _: i64 = redis::cmd("PUBLISH")
                    .arg("gw:room:flood")
                    .arg(body)
                    .query_async(&mut c)
                    .await
                    .unwrap();
            }
        }
    });
    let start = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..5000 {
        let before = Instant::now();
        let m = fast.next_message().await;
        worst = worst.max(before.elapsed());
        let data = m["data"].as_str().unwrap();
        assert!(
            data.starts_with(&format!("{i}:")),
            "fast viewer got every message in order"
        );
    }
    publisher.await.unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "fast viewer stalled {worst:?} behind a stuck one"
    );
    eventually("stuck viewer closed as slow consumer", || async {
        node.metric("gateway_connections_closed_total{reason=\"slow_consumer\"}")
            .await
            == 1.0
    })
    .await;
    assert!(
        node.metric("gateway_messages_dropped_total{reason=\"slow_consumer\"}")
            .await
            >= 1.0
    );
    // The stuck client finally reads: what was in flight, then the end (a 4000 Close when the
    // socket had room for it, otherwise a dropped connection).
    let mut frames = 0;
    let code = loop {
        match stuck.read_frame().await {
            Some((0x8, p)) => break Some(u16::from_be_bytes([p[0], p[1]])),
            Some(_) => frames += 1,
            None => break None,
        }
    };
    assert!(code.is_none() || code == Some(4000), "close code {code:?}");
    assert!(
        frames < 5000,
        "the stuck viewer cannot have received everything"
    );
    eprintln!(
        "slow consumer: got {frames} frames then {code:?}; flood took {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_refuses_with_503_before_the_upgrade() {
    let node = TestNode::start(test_config("n1", None, &["--max-connections", "2"])).await;
    let a = node.join("r", "viewer", "a").await;
    let _b = node.join("r", "viewer", "b").await;
    assert_eq!(
        WsClient::connect_status(&node.ws_url("r", "")).await.err(),
        Some(503)
    );
    assert_eq!(
        node.metric("gateway_connections_refused_total{reason=\"capacity\"}")
            .await,
        1.0
    );
    a.close().await;
    eventually("slot released", || async {
        WsClient::connect_status(&node.ws_url("r", ""))
            .await
            .is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rate_excess_gets_errors_and_abuse_a_close() {
    let node = TestNode::start(test_config("n1", None, &["--max-publish-rate", "5"])).await;
    let mut c = node.join("r", "viewer", "spammer").await;
    for i in 0..10 {
        c.publish(json!(i)).await;
    }
    let (mut delivered, mut limited) = (0, 0);
    while delivered + limited < 10 {
        let v = c.next_json().await;
        match v["type"].as_str() {
            Some("message") => delivered += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                limited += 1;
            }
            _ => {}
        }
    }
    assert!(
        (5..=6).contains(&delivered),
        "burst of 5 (+ refill) delivered, got {delivered}"
    );
    assert!(limited >= 4);
    // Keep hammering: more than 10 × rate refusals within 10 s closes with 1008.
    for i in 0..80 {
        c.send_text(&format!("spam {i}")).await;
    }
    assert_eq!(c.ended(WAIT).await, Ended::Closed(1008));
    assert!(
        node.metric("gateway_messages_dropped_total{reason=\"rate_limited\"}")
            .await
            >= 50.0
    );
    eventually("close counted", || async {
        node.metric("gateway_connections_closed_total{reason=\"rate_limited\"}")
            .await
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_allow_list_get_403() {
    let node = TestNode::start(test_config(
        "n1",
        None,
        &["--allowed-origins", "https://live.example.com"],
    ))
    .await;
    let refused =
        RawWs::connect_with(node.client, "/ws/r", &[("Origin", "https://evil.example")]).await;
    assert_eq!(refused.err(), Some(403));
    assert!(RawWs::connect_with(
        node.client,
        "/ws/r",
        &[("Origin", "https://live.example.com")]
    )
    .await
    .is_ok());
    assert!(
        RawWs::connect_with(node.client, "/ws/r", &[]).await.is_ok(),
        "no Origin: not a browser"
    );
    assert_eq!(
        node.metric("gateway_connections_refused_total{reason=\"origin\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_pinged_then_closed_and_a_live_one_stays() {
    let node = TestNode::start(test_config(
        "n1",
        None,
        &["--ping-interval", "200ms", "--idle-timeout", "700ms"],
    ))
    .await;
    let mut silent = RawWs::connect(node.client, "/ws/r").await;
    let mut live = node.join("r", "viewer", "live").await;
    let start = Instant::now();
    // The silent client reads (so the pings reach it) but never answers them; meanwhile the live
    // client keeps reading, which makes tungstenite answer every ping.
    let silent_side = async {
        let mut pings = 0;
        let code = loop {
            match silent.read_frame().await {
                Some((0x9, _)) => pings += 1,
                Some((0x8, p)) => break u16::from_be_bytes([p[0], p[1]]),
                Some(_) => {}
                None => panic!("dropped without a Close"),
            }
        };
        (code, pings, start.elapsed())
    };
    let ((code, pings, took), ()) = tokio::join!(
        silent_side,
        live.expect_no_message(Duration::from_millis(1500))
    );
    assert_eq!(code, 4001);
    assert!(pings >= 2, "pinged {pings} times before the close");
    assert!(took < Duration::from_secs(2), "closed after {took:?}");
    live.publish(json!("still here")).await;
    assert_eq!(live.next_message().await["data"], "still here");
    eventually("close counted", || async {
        node.metric("gateway_connections_closed_total{reason=\"idle_timeout\"}")
            .await
            == 1.0
    })
    .await;
}

/// The same with the production timers (`--ping-interval 25s`, `--idle-timeout 60s`), on tokio's
/// paused clock: the node, its in-process broker and both clients share this test's runtime and
/// loopback sockets, so the clock jumps from timer to timer whenever all of them wait.
#[tokio::test(start_paused = true)]
async fn the_production_keepalive_closes_a_silent_client_on_paused_time() {
    let config = test_config("n1", None, &[]);
    let (every, idle) = (config.ping_interval, config.idle_timeout);
    assert_eq!(
        (every, idle),
        (Duration::from_secs(25), Duration::from_secs(60))
    );
    let node = TestNode::start(config).await;
    let mut silent = RawWs::connect(node.client, "/ws/r").await;
    let mut live = node.join("r", "viewer", "live").await;
    let start = tokio::time::Instant::now();
    let silent_side = async {
        let mut pings = 0;
        let code = loop {
            match silent.read_frame_within(idle + every * 2).await {
                Some((0x9, _)) => pings += 1,
                Some((0x8, p)) => break u16::from_be_bytes([p[0], p[1]]),
                Some(_) => {}
                None => panic!("dropped without a Close"),
            }
        };
        (code, pings, start.elapsed())
    };
    let ((code, pings, took), ()) =
        tokio::join!(silent_side, live.expect_no_message(idle + every * 2));
    assert_eq!(code, 4001);
    assert!(pings >= 2, "pinged {pings} times before the close");
    // Closed by the first ping round that finds it silent for the idle timeout.
    assert!(
        took >= idle && took <= idle + every + Duration::from_secs(1),
        "closed after {took:?}"
    );
    // The rest on the real clock: with nothing else scheduled (a quiet room sends no presence),
    // the paused clock would jump the reply's deadline ahead before the loopback bytes are read.
    tokio::time::resume();
    live.publish(json!("still here")).await;
    assert_eq!(live.next_message().await["data"], "still here");
    assert_eq!(
        node.metric("gateway_connections_closed_total{reason=\"idle_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_odd_redis_payloads_never_hurt_the_node() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &["--max-message-size", "1024"],
    ))
    .await;
    let mut c = node.join("r", "viewer", "c").await;
    redis.wait_numsub("gw:room:r", 1).await;
    redis.publish("gw:room:r", &vec![b'z'; 1025]).await;
    redis.publish("gw:room:r", &[0xff, 0x00, 0xfe]).await;
    redis
        .publish(
            "gw:room:r",
            br#"{"type":"message","room":"r","role":"host"}"#,
        )
        .await;
    redis.publish("gw:room:r", b"").await;
    let m = c.next_message().await;
    assert_eq!(
        m["data"], "\u{fffd}\u{0}\u{fffd}",
        "bytes that are not UTF-8 are replaced"
    );
    let m = c.next_message().await;
    assert_eq!(
        m["data"], r#"{"type":"message","room":"r","role":"host"}"#,
        "half an envelope is raw"
    );
    assert_eq!(c.next_message().await["data"], "");
    c.expect_no_message(Duration::from_millis(200)).await;
    assert_eq!(
        node.metric("gateway_messages_dropped_total{reason=\"too_large\"}")
            .await,
        1.0
    );
    // A message for a room name we would never accept is dropped too.
    redis.publish("gw:room:bad room", b"x").await;
    assert_eq!(
        redis.numsub("gw:room:bad room").await,
        0,
        "and it is never subscribed anyway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_request_headers_is_closed_at_the_deadline_and_keep_alive_is_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The production deadline is 10 s; the test shortens it (--http-header-timeout) rather than wait it out.
    assert_eq!(
        test_config("n1", None, &[]).http_header_timeout,
        Duration::from_secs(10)
    );
    let deadline = Duration::from_secs(1);
    let node = TestNode::start(test_config("n1", None, &["--http-header-timeout", "1s"])).await;
    // A slow-loris: half a request line, then nothing. Its deadline runs from its accept, which
    // is after `start`.
    let start = Instant::now();
    let mut loris = tokio::net::TcpStream::connect(node.client).await.unwrap();
    loris.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    // A keep-alive client that sent a whole request: not subject to the first-request deadline.
    let mut kept = tokio::net::TcpStream::connect(node.client).await.unwrap();
    let req = format!("GET /nope HTTP/1.1\r\nHost: {}\r\n\r\n", node.client);
    kept.write_all(req.as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 404"));

    let n = tokio::time::timeout(deadline + Duration::from_secs(5), loris.read(&mut buf))
        .await
        .expect("closed within the deadline")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let took = start.elapsed();
    assert!(
        took >= deadline && took < deadline + Duration::from_secs(2),
        "{took:?}"
    );

    kept.write_all(req.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(WAIT, kept.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 404"),
        "keep-alive connection still served"
    );
}

/// A keyed publish refused by the rate limit says which one it was (its `key`), so that the
/// publisher can send that one again later rather than lose it.
// In process only, so on tokio's paused clock: the drain at the end passes without waiting (the
// rate limit itself counts real time, and the two publishes are microseconds apart either way).
#[tokio::test(start_paused = true)]
async fn a_keyed_publish_over_the_rate_limit_is_refused_with_its_key() {
    let node = TestNode::start(test_config("n1", None, &["--max-publish-rate", "1"])).await;
    let mut c = node.join("r", "host", "h").await;
    c.send_text(r#"{"type":"publish","data":1,"key":"k1"}"#)
        .await;
    c.send_text(r#"{"type":"publish","data":2,"key":"k2"}"#)
        .await;
    let ack = c.next_of("ack").await;
    assert_eq!(ack["key"], "k1");
    let err = c.next_of("error").await;
    assert_eq!(
        (&err["code"], &err["key"]),
        (&json!("rate_limited"), &json!("k2"))
    );
    node.stop().await;
}
