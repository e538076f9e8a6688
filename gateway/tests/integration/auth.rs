//! Authentication on real nodes with a real Redis: tokens decide who joins which room as what;
//! bad tokens are refused with the right status and reason; keys rotate (HMAC overlap, JWKS);
//! refresh and expiry on the open socket; anonymous viewers; tokens never reach the logs.
//! Kick and ban live in `moderation.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn rs256(claims: &Value, key_file: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

async fn failures(node: &TestNode, reason: &str) -> f64 {
    node.metric(&format!(
        "gateway_auth_failures_total{{reason=\"{reason}\"}}"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_token_cannot_broadcast_as_host_or_join_another_room() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config("n1", Some(&redis), &jwt_flags(&[]))).await;
    let viewer = token(&claims("v1", &[("show", "viewer")], 60));

    // Another room, or the host role: 403 with a JSON reason.
    let (status, head, body) =
        raw_upgrade(node.client, &format!("/ws/other?token={viewer}"), &[]).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(
        body,
        json!({"error":"forbidden","message":"room not granted"})
    );
    let (status, _, body) = raw_upgrade(
        node.client,
        &format!("/ws/show?role=host&token={viewer}"),
        &[],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["message"], "role not granted");
    assert_eq!(failures(&node, "room_not_granted").await, 1.0);
    assert_eq!(failures(&node, "role_not_granted").await, 1.0);
    assert_eq!(
        node.metric("gateway_connections_refused_total{reason=\"auth\"}")
            .await,
        2.0
    );

    // As a viewer it joins, with the token's identity (not the query's name), and may not publish.
    let (mut v, w) = connect(node.client, "show", &format!("name=Mallory&token={viewer}"))
        .await
        .unwrap();
    assert_eq!(w["role"], "viewer");
    assert_eq!(w["user"], "v1");
    assert_eq!(w["name"], "N-v1");
    v.publish(json!("I am the host now")).await;
    let e = v.next_of("error").await;
    assert_eq!(e["code"], "forbidden");

    // A host token publishes, through the header this time; the viewer reads it.
    let host = token(&claims("h1", &[("show", "host")], 60));
    let mut h = RawWs::connect_with(
        node.client,
        "/ws/show",
        &[("Authorization", &format!("Bearer {host}"))],
    )
    .await
    .unwrap();
    let w = h.next_json().await;
    assert_eq!(w["role"], "host");
    assert_eq!(w["user"], "h1");
    h.send(&RawWs::frame(
        true,
        0x1,
        json!({"type":"publish","data":"hello"})
            .to_string()
            .as_bytes(),
        true,
    ))
    .await;
    let m = v.next_message().await;
    assert_eq!(m["data"], "hello");
    assert_eq!(m["role"], "host");
    assert_eq!(m["from"], "N-h1");
    v.expect_no_message(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_the_right_status_and_reason() {
    let redis = RedisServer::start().await;
    let rsa_pub = fixture("rsa1.pub");
    let key_flag = format!("rsa={rsa_pub}");
    let flags: Vec<&str> = vec![
        "--auth",
        "jwt",
        "--jwt-hmac-secret",
        SECRET,
        "--jwt-public-key",
        &key_flag,
        "--jwt-audience",
        "live",
        "--api-key",
        API_KEY,
    ];
    let node = TestNode::start(test_config("n1", Some(&redis), &flags)).await;
    let mut good = claims("u1", &[("r", "host")], 60);
    good["aud"] = "live".into();

    // Valid tokens of both kinds are accepted.
    assert!(connect_token(node.client, "r", &token(&good)).await.is_ok());
    assert!(
        connect_token(node.client, "r", &rs256(&good, "rsa1.key", Some("rsa")))
            .await
            .is_ok()
    );

    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let mut expired = good.clone();
    expired["exp"] = (now() - 10).into();
    let mut other_aud = good.clone();
    other_aud["aud"] = "other".into();
    let no_rooms = json!({"sub": "u1", "exp": now() + 60, "aud": "live"});
    let rsa_pem = std::fs::read(&rsa_pub).unwrap();
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "forged",
            hs256(&good, b"not-the-secret-0123456789", None),
            "signature",
            "token invalid",
        ),
        ("expired", token(&expired), "expired", "token expired"),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&good.to_string())
            ),
            "algorithm",
            "token invalid",
        ),
        (
            "HS256 signed with the RSA public key",
            hs256(&good, &rsa_pem, Some("rsa")),
            "algorithm",
            "token invalid",
        ),
        (
            "wrong audience",
            token(&other_aud),
            "audience",
            "token invalid",
        ),
        (
            "wrong kid",
            hs256(&good, SECRET.as_bytes(), Some("nope")),
            "unknown_key",
            "token invalid",
        ),
        (
            "not a JWT",
            "garbage".to_string(),
            "malformed",
            "token invalid",
        ),
        ("bad claims", token(&no_rooms), "claims", "token invalid"),
    ];
    for (what, t, reason, message) in &cases {
        let before = failures(&node, reason).await;
        let (status, head, body) = raw_upgrade(node.client, &format!("/ws/r?token={t}"), &[]).await;
        assert_eq!(status, 401, "{what}: {head}");
        assert!(
            head.contains("www-authenticate: Bearer") || head.contains("WWW-Authenticate: Bearer"),
            "{what}: {head}"
        );
        assert_eq!(
            body,
            json!({"error":"unauthorized","message":message}),
            "{what}"
        );
        assert_eq!(
            failures(&node, reason).await,
            before + 1.0,
            "{what} counted as {reason}"
        );
        assert!(
            !body.to_string().contains(t.as_str()),
            "the token is not echoed"
        );
    }
    // The header is read too, and wins over the query.
    let (status, _, _) = raw_upgrade(
        node.client,
        &format!("/ws/r?token={}", token(&good)),
        &[("Authorization", "Bearer garbage")],
    )
    .await;
    assert_eq!(status, 401);
    // No token at all.
    let (status, _, body) = raw_upgrade(node.client, "/ws/r", &[]).await;
    assert_eq!(status, 401);
    assert_eq!(body["message"], "token missing");
    assert_eq!(failures(&node, "missing").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_secrets_rotate_with_an_overlap() {
    let redis = RedisServer::start().await;
    let old = "old-secret-0123456789abcdef";
    let new = "new-secret-0123456789abcdef";
    let both = format!("{old},{new}");
    let c = claims("u1", &[("r", "host")], 60);
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &[
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            &both,
            "--api-key",
            API_KEY,
        ],
    ))
    .await;
    assert!(
        connect_token(node.client, "r", &hs256(&c, old.as_bytes(), None))
            .await
            .is_ok()
    );
    assert!(
        connect_token(node.client, "r", &hs256(&c, new.as_bytes(), None))
            .await
            .is_ok()
    );
    node.stop().await;
    // The old secret removed (a restart with the new configuration).
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &[
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            new,
            "--api-key",
            API_KEY,
        ],
    ))
    .await;
    assert_eq!(
        connect_token(node.client, "r", &hs256(&c, old.as_bytes(), None))
            .await
            .err(),
        Some(401)
    );
    assert!(
        connect_token(node.client, "r", &hs256(&c, new.as_bytes(), None))
            .await
            .is_ok()
    );
    assert_eq!(failures(&node, "signature").await, 1.0);
}

/// A JWKS document for RSA key files with their key ids.
fn jwks(keys: &[(&str, &str)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(file, kid)| {
            let pem = std::fs::read(fixture(file)).unwrap();
            let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
            let mut jwk = serde_json::to_value(
                jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap(),
            )
            .unwrap();
            jwk["kid"] = (*kid).into();
            jwk
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

/// A tiny JWKS server on 127.0.0.1:0 serving whatever `doc` holds; counts requests.
async fn jwks_server(doc: Arc<Mutex<String>>, hits: Arc<Mutex<u32>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let doc = doc.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                *hits.lock().unwrap() += 1;
                let body = doc.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_fetched_and_a_rotation_is_picked_up() {
    let redis = RedisServer::start().await;
    let doc = Arc::new(Mutex::new(jwks(&[("rsa1.key", "k1")])));
    let hits = Arc::new(Mutex::new(0));
    let addr = jwks_server(doc.clone(), hits.clone()).await;
    let url = format!("http://{addr}/.well-known/jwks.json");
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &[
            "--auth",
            "jwt",
            "--jwks-url",
            &url,
            "--jwks-allow-http",
            "--jwks-unknown-kid-gap",
            "2s",
            "--api-key",
            API_KEY,
        ],
    ))
    .await;
    let c = claims("u1", &[("r", "host")], 60);
    let deadline = Instant::now() + WAIT;
    while connect_token(node.client, "r", &rs256(&c, "rsa1.key", Some("k1")))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the first JWKS key is never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A key that the document does not hold (yet) is unknown.
    assert_eq!(
        connect_token(node.client, "r", &rs256(&c, "rsa2.key", Some("k2")))
            .await
            .err(),
        Some(401)
    );
    // Rotate at the key server: k2 in, k1 out. The node refetches on the unknown kid (at most
    // once per gap: 5 s in production, 2 s here; so hammering it with made-up kids does not
    // hammer the key server).
    *doc.lock().unwrap() = jwks(&[("rsa2.key", "k2")]);
    let rotated = Instant::now();
    let hits_before = *hits.lock().unwrap();
    for i in 0..20 {
        let _ = connect_token(
            node.client,
            "r",
            &rs256(&c, "rsa2.key", Some(&format!("bogus{i}"))),
        )
        .await;
    }
    assert!(
        *hits.lock().unwrap() <= hits_before + 1,
        "unknown kids are rate-limited"
    );
    loop {
        if connect_token(node.client, "r", &rs256(&c, "rsa2.key", Some("k2")))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(15),
            "the rotated key was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And k1, gone from the document, is refused after the refetch.
    assert_eq!(
        connect_token(node.client, "r", &rs256(&c, "rsa1.key", Some("k1")))
            .await
            .err(),
        Some(401)
    );
    assert!(failures(&node, "unknown_key").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_a_connection_and_a_lapsed_one_closes_with_4010() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt_flags(&["--token-expiry-warning", "2s"]),
    ))
    .await;
    let short = claims("u1", &[("r", "viewer")], 3);
    let (mut kept, w) = connect_token(node.client, "r", &token(&short))
        .await
        .unwrap();
    assert_eq!(w["user"], "u1");
    let (mut lapsed, _) = connect_token(node.client, "r", &token(&short))
        .await
        .unwrap();

    // The warning comes about 2 s before exp.
    let e = kept.next_of("expiring").await;
    assert_eq!(e["exp"], short["exp"]);
    // A token for another user, or a garbage one, is refused without closing.
    let other = token(&claims("u2", &[("r", "viewer")], 60));
    kept.send_text(&json!({"type":"refresh","token":other}).to_string())
        .await;
    assert_eq!(kept.next_of("error").await["code"], "refresh_failed");
    kept.send_text(&json!({"type":"refresh","token":"x.y.z"}).to_string())
        .await;
    let e = kept.next_of("error").await;
    assert_eq!(e["code"], "refresh_failed");
    assert_eq!(e["message"], "token invalid");
    // The real refresh.
    let longer = claims("u1", &[("r", "viewer")], 60);
    kept.send_text(&json!({"type":"refresh","token":token(&longer)}).to_string())
        .await;
    assert_eq!(kept.next_of("refreshed").await["exp"], longer["exp"]);

    // The one that did not refresh is closed with 4010 at exp (3 s; the timer ticks at 250 ms).
    assert_eq!(
        lapsed.ended(Duration::from_secs(6)).await,
        Ended::Closed(4010)
    );
    // The refreshed one lives on past the old exp.
    kept.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(kept.next_of("pong").await["type"], "pong");
    assert_eq!(
        node.metric("gateway_connections_closed_total{reason=\"token_expired\"}")
            .await,
        1.0
    );

    // A refresh whose rights no longer cover the room closes the session with 4503.
    let elsewhere = claims("u1", &[("not-r", "viewer")], 60);
    kept.send_text(&json!({"type":"refresh","token":token(&elsewhere)}).to_string())
        .await;
    assert_eq!(kept.ended(WAIT).await, Ended::Closed(4503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_viewers_read_but_cannot_publish() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt_flags(&["--allow-anonymous-viewers", "r"]),
    ))
    .await;
    let (mut anon, w) = connect(node.client, "r", "name=Guest").await.unwrap();
    assert_eq!(w["role"], "viewer");
    assert_eq!(w["user"], Value::Null);
    assert_eq!(w["name"], "Guest");
    // A host still needs a token.
    assert_eq!(
        connect(node.client, "r", "role=host").await.err(),
        Some(401)
    );
    anon.publish(json!("spam")).await;
    assert_eq!(anon.next_of("error").await["code"], "forbidden");
    anon.send_text("plain chat").await;
    assert_eq!(anon.next_of("error").await["code"], "forbidden");
    let (mut host, _) = connect_token(node.client, "r", &token(&claims("h", &[("r", "host")], 60)))
        .await
        .unwrap();
    host.publish(json!("welcome all")).await;
    let m = anon.next_message().await;
    assert_eq!(m["data"], "welcome all");
    anon.expect_no_message(Duration::from_millis(200)).await;
    assert_eq!(
        node.metric("gateway_client_errors_total{code=\"forbidden\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_appear_in_logs_metrics_or_answers() {
    let redis = RedisServer::start().await;
    let dir = std::env::temp_dir().join(format!("gateway-auth-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("node.log");
    let node = GatewayProcess::start_logged(
        "logged",
        Some(&redis),
        &[
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            SECRET,
            "--api-key",
            API_KEY,
        ],
        &log,
    )
    .await;
    let good = token(&claims("secret-user", &[("r", "host")], 60));
    let forged = hs256(
        &claims("u", &[("r", "host")], 60),
        b"forged-secret-0123456789",
        None,
    );
    let expired = token(&claims("u", &[("r", "host")], -5));
    let mut c = WsClient::connect(&node.ws_url("r", &format!("token={good}"))).await;
    c.next_of("welcome").await;
    c.send_text(&json!({"type":"refresh","token":good}).to_string())
        .await;
    c.next_of("refreshed").await;
    c.send_text(&json!({"type":"refresh","token":forged}).to_string())
        .await;
    c.next_of("error").await;
    for t in [&forged, &expired] {
        let (status, _, body) = raw_upgrade(node.client, &format!("/ws/r?token={t}"), &[]).await;
        assert_eq!(status, 401);
        assert!(!body.to_string().contains(t.as_str()));
        let (status, _, _) = raw_upgrade(
            node.client,
            "/ws/r",
            &[("Authorization", &format!("Bearer {t}"))],
        )
        .await;
        assert_eq!(status, 401);
    }
    let (_, metrics) = http(node.admin, "GET", "/metrics", &[], b"").await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics).to_string();
    c.close().await;
    drop(node);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("DEBUG") || text.contains("INFO"),
        "debug logging was on"
    );
    for t in [&good, &forged, &expired] {
        // The signature part alone is secret-derived and unique: look for it and the whole token.
        let sig = t.rsplit('.').next().unwrap();
        assert!(
            !text.contains(t.as_str()) && !text.contains(sig),
            "a token in the logs"
        );
        assert!(!metrics.contains(sig), "a token in the metrics");
    }
    assert!(
        !text.contains(SECRET) && !text.contains(API_KEY),
        "a secret in the logs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
