//! Authentication and moderation on real nodes with a real Redis: tokens decide who joins which
//! room as what; bad tokens are refused with the right status and reason; keys rotate (HMAC
//! overlap, JWKS); refresh and expiry on the open socket; anonymous viewers; kick and ban across
//! three nodes; tokens never reach the logs.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECRET: &str = "integration-secret-0123456789";
const API_KEY: &str = "moderator-key-123";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims for `sub` with `grants` (room, role), valid for `secs` seconds (negative: expired).
fn claims(sub: &str, grants: &[(&str, &str)], secs: i64) -> Value {
    let rooms: Vec<Value> = grants
        .iter()
        .map(|(room, role)| json!({"room": room, "role": role}))
        .collect();
    json!({"sub": sub, "name": format!("N-{sub}"), "exp": (now() as i64 + secs) as u64, "rooms": rooms})
}

fn hs256(claims: &Value, secret: &[u8], kid: Option<&str>) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

fn token(claims: &Value) -> String {
    hs256(claims, SECRET.as_bytes(), None)
}

fn rs256(claims: &Value, key_file: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(key_file)).unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

/// `--auth jwt` with the test secret and the API key (a node under `--auth jwt` needs one, or
/// `--open-api`).
fn jwt_flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = vec![
        "--auth",
        "jwt",
        "--jwt-hmac-secret",
        SECRET,
        "--api-key",
        API_KEY,
    ];
    f.extend_from_slice(extra);
    f
}

/// Connects to `room` with `query`; the client after its welcome, or the refusal's status.
async fn connect(addr: SocketAddr, room: &str, query: &str) -> Result<(WsClient, Value), u16> {
    let mut c = WsClient::connect_status(&format!("ws://{addr}/ws/{room}?{query}")).await?;
    let w = c.next_of("welcome").await;
    Ok((c, w))
}

async fn connect_token(
    addr: SocketAddr,
    room: &str,
    token: &str,
) -> Result<(WsClient, Value), u16> {
    connect(addr, room, &format!("token={token}")).await
}

/// An upgrade request by hand: status, head and body of the answer.
async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head, then as many body bytes as Content-Length says (the connection may stay
    // open: a refused upgrade is an ordinary keep-alive answer).
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= len {
                break;
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (
        status,
        head.to_string(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
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
    // every 5 s, so hammering it with made-up kids does not hammer the key server).
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

async fn api(node: &TestNode, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, body) = http(
        node.client,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_and_ban_reach_clients_on_all_three_nodes() {
    let redis = RedisServer::start().await;
    let flags = jwt_flags(&[
        "--api-key",
        "old-key-0000,moderator-key-123",
        "--allow-anonymous-viewers",
        "*",
    ]);
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(TestNode::start(test_config(&format!("n{i}"), Some(&redis), &flags)).await);
    }
    redis.wait_numsub("gw:room:_control", 3).await;
    let t = |sub: &str| token(&claims(sub, &[("*", "viewer")], 600));

    // The API needs a key.
    let (status, _) = http(
        nodes[0].client,
        "POST",
        "/api/users/u1/disconnect",
        &[],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);

    // Kick u1 everywhere: its sessions on all three nodes close with 4501 within 1 s; u2 stays.
    let mut u1 = Vec::new();
    let mut u2 = Vec::new();
    for n in &nodes {
        u1.push(connect_token(n.client, "r", &t("u1")).await.unwrap().0);
        u2.push(connect_token(n.client, "r", &t("u2")).await.unwrap().0);
    }
    let (status, body) = api(&nodes[0], "POST", "/api/users/u1/disconnect", Value::Null).await;
    assert_eq!(status, 202, "{body}");
    // Within a second of the API's answer, on every node.
    for c in &mut u1 {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    }
    for c in &mut u2 {
        c.send_text(r#"{"type":"ping"}"#).await;
        assert_eq!(c.next_of("pong").await["type"], "pong");
    }

    // Everyone in a room, on every node, anonymous viewers too.
    let mut in_room = Vec::new();
    for n in &nodes {
        in_room.push(connect_token(n.client, "stage", &t("u3")).await.unwrap().0);
        in_room.push(connect(n.client, "stage", "name=Guest").await.unwrap().0);
    }
    let (status, _) = api(
        &nodes[1],
        "POST",
        "/api/rooms/stage/disconnect",
        Value::Null,
    )
    .await;
    assert_eq!(status, 202);
    for c in &mut in_room {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    }

    // Ban u2 from room r for 2 s: closed with 4502 everywhere, refused (403) while it lasts,
    // welcome again when it expired. Other rooms stay open to u2.
    let (status, body) = api(
        &nodes[2],
        "PUT",
        "/api/bans",
        json!({"sub":"u2","room":"r","duration":"2s"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let banned_at = Instant::now();
    for c in &mut u2 {
        assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4502));
    }
    let (status, _, body) =
        raw_upgrade(nodes[0].client, &format!("/ws/r?token={}", t("u2")), &[]).await;
    assert_eq!(status, 403);
    assert_eq!(body["message"], "banned");
    assert!(connect_token(nodes[1].client, "elsewhere", &t("u2"))
        .await
        .is_ok());
    let (status, list) = api(&nodes[1], "GET", "/api/bans?sub=u2", Value::Null).await;
    assert_eq!(status, 200);
    assert_eq!(list["bans"][0]["room"], "r", "{list}");
    let mut c = redis.connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("gw:room:ban:u2")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= 2000,
        "the ban lives in Redis with its TTL ({ttl} ms)"
    );
    loop {
        match connect_token(nodes[2].client, "r", &t("u2")).await {
            Ok(_) => break,
            Err(403) => {
                assert!(
                    banned_at.elapsed() < Duration::from_secs(5),
                    "the ban never expired"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("unexpected {s}"),
        }
    }
    assert!(
        banned_at.elapsed() >= Duration::from_millis(1900),
        "refused until it expired"
    );

    // A ban from every room, lifted by DELETE.
    let (status, _) = api(
        &nodes[0],
        "PUT",
        "/api/bans",
        json!({"sub":"u4","room":null,"duration":600}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        connect_token(nodes[1].client, "any", &t("u4")).await.err(),
        Some(403)
    );
    let (status, body) = api(
        &nodes[0],
        "DELETE",
        "/api/bans",
        json!({"sub":"u4","room":null}),
    )
    .await;
    assert_eq!((status, body["removed"].clone()), (200, json!(true)));
    assert!(connect_token(nodes[1].client, "any", &t("u4"))
        .await
        .is_ok());
    // Bad bodies.
    let (status, _) = api(
        &nodes[0],
        "PUT",
        "/api/bans",
        json!({"sub":"u4","duration":"forever"}),
    )
    .await;
    assert_eq!(status, 400);
    let mut banned = 0.0;
    for n in &nodes {
        banned += n
            .metric("gateway_auth_failures_total{reason=\"banned\"}")
            .await;
    }
    assert!(banned >= 2.0, "ban refusals are counted ({banned})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_name_of_the_control_channel_is_reserved() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    assert_eq!(connect(node.client, "_control", "").await.err(), Some(400));
    let (status, _) = http_publish(&node, "_control", &[], b"{}").await;
    assert_eq!(status, 400);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_works_with_the_in_process_broker_and_needs_a_key() {
    let node = TestNode::start(test_config(
        "solo",
        None,
        &jwt_flags(&["--api-key", API_KEY]),
    ))
    .await;
    let t = token(&claims("u1", &[("*", "viewer")], 600));
    let (mut a, _) = connect_token(node.client, "r", &t).await.unwrap();
    let (status, _) = http(
        node.client,
        "POST",
        "/api/users/u1/disconnect",
        &[("Authorization", "Bearer wrong-key-123")],
        b"",
    )
    .await
    .unwrap();
    assert_eq!(status, 401);
    let (status, _) = api(&node, "POST", "/api/rooms/r/disconnect", Value::Null).await;
    assert_eq!(status, 202);
    assert_eq!(a.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    let (status, _) = api(
        &node,
        "PUT",
        "/api/bans",
        json!({"sub":"u1","room":null,"duration":"1m"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(connect_token(node.client, "r", &t).await.err(), Some(403));
    let (_, list) = api(&node, "GET", "/api/bans?sub=u1", Value::Null).await;
    assert_eq!(list["bans"][0]["room"], Value::Null, "{list}");
    assert_eq!(
        node.metric("gateway_control_commands_total{result=\"applied\"}")
            .await,
        2.0
    );
    // Without any API key the moderation routes are refused outright.
    let open = TestNode::start(test_config(
        "open",
        None,
        &["--auth", "jwt", "--jwt-hmac-secret", SECRET, "--open-api"],
    ))
    .await;
    let (status, body) = api(&open, "POST", "/api/users/u1/disconnect", Value::Null).await;
    assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_is_subscribed_again_after_a_redis_restart() {
    let mut redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt_flags(&["--api-key", API_KEY]),
    ))
    .await;
    redis.wait_numsub("gw:room:_control", 1).await;
    redis.restart().await;
    redis.wait_numsub("gw:room:_control", 1).await;
    node.wait_ready().await;
    let t = token(&claims("u1", &[("r", "viewer")], 600));
    let (mut c, _) = connect_token(node.client, "r", &t).await.unwrap();
    // A backend may publish a command itself.
    redis
        .publish(
            "gw:room:_control",
            br#"{"type":"disconnect","sub":"u1","room":null,"reason":"kicked"}"#,
        )
        .await;
    assert_eq!(c.ended(Duration::from_secs(1)).await, Ended::Closed(4501));
    redis.publish("gw:room:_control", b"not a command").await;
    let n = &node;
    eventually("the invalid command is counted", || async move {
        n.metric("gateway_control_commands_total{result=\"invalid\"}")
            .await
            == 1.0
    })
    .await;
}
