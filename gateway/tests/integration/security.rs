//! The adversarial tests (issue 20): each tries one attack against real nodes (in-process
//! `gateway::run` on 127.0.0.1:0, a real `redis-server` where the attack involves Redis, the real
//! binary where the attack is its environment) and asserts the refusal or the bound. Each failed
//! on the code before issue 20: the node started with the API open, or answered 200/202, or kept
//! the connection open.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use gateway::Listeners;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "security-secret-0123456789";
const API_KEY: &str = "backend-key-0123";

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token for `sub` granting `grants` (room pattern, role) for a minute.
fn token(sub: &str, grants: &[(&str, &str)]) -> String {
    let rooms: Vec<Value> = grants
        .iter()
        .map(|(room, role)| json!({"room": room, "role": role}))
        .collect();
    let claims = json!({"sub": sub, "exp": now() + 60, "rooms": rooms});
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn jwt(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = vec!["--auth", "jwt", "--jwt-hmac-secret", SECRET];
    f.extend_from_slice(extra);
    f
}

/// Runs a node with `config` and returns its error when it refuses to start (or panics if it
/// starts).
async fn refused_at_start(config: gateway::Config) -> String {
    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = gateway::run(
        config,
        Listeners { client, admin },
        CancellationToken::new(),
    );
    match tokio::time::timeout(WAIT, run).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("the node ran and stopped instead of refusing"),
        Err(_) => panic!("the node started"),
    }
}

/// The real binary with `env` and `args`: its exit status and what it wrote to stderr, or a
/// panic when it is still running after a few seconds (it started).
async fn binary_refuses(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--node-id",
        "attacked",
    ])
    .args(args)
    .env_remove("GATEWAY_API_KEY")
    .env_remove("GATEWAY_AUTH")
    .env_remove("GATEWAY_JWT_HMAC_SECRETS")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("the binary started instead of refusing")
        .unwrap();
    assert!(!out.status.success(), "refused means a failure exit");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---- 1. The HTTP API under --auth jwt ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_without_an_api_key_refuses_to_start() {
    let e = refused_at_start(test_config("n1", None, &jwt(&[]))).await;
    assert!(
        e.contains("--api-key") && e.contains("--open-api"),
        "a clear message: {e}"
    );
    let stderr = binary_refuses(&[("GATEWAY_JWT_HMAC_SECRETS", SECRET)], &["--auth", "jwt"]).await;
    assert!(stderr.contains("--api-key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_needs_the_right_to_join_the_room() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt(&[
            "--api-key",
            API_KEY,
            "--allow-anonymous-viewers",
            "public-*",
        ]),
    ))
    .await;
    let key = format!("Bearer {API_KEY}");
    for room in ["private", "public-1"] {
        let (status, _) = http_publish(
            &node,
            room,
            &[
                ("Authorization", &key),
                ("Content-Type", "application/json"),
            ],
            b"\"secret plans\"",
        )
        .await;
        assert_eq!(status, 202);
    }
    // No credentials: refused, for a room anonymous viewers may not join.
    let (status, body) = http_history(node.client, "private", "", &[]).await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("unauthorized"))
    );
    // A token for another room: refused as a join would be (403).
    let other = format!("Bearer {}", token("u1", &[("lobby", "host")]));
    let (status, _) = http_history(node.client, "private", "", &[("Authorization", &other)]).await;
    assert_eq!(status, 403);
    let (status, _) = http_history(
        node.client,
        "private",
        &format!("token={}", token("u1", &[("lobby", "host")])),
        &[],
    )
    .await;
    assert_eq!(status, 403, "the token query parameter too");
    // A forged token: 401.
    let forged = format!("Bearer {}x", token("u1", &[("*", "host")]));
    let (status, _) = http_history(node.client, "private", "", &[("Authorization", &forged)]).await;
    assert_eq!(status, 401);
    // A grant for the room (a viewer's is enough, as for joining), or the API key: the history.
    let viewer = format!("Bearer {}", token("u2", &[("priv*", "viewer")]));
    for auth in [&viewer, &key] {
        let (status, body) =
            http_history(node.client, "private", "", &[("Authorization", auth)]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["messages"][0]["data"], "secret plans");
    }
    // A room open to anonymous viewers: its history is readable without a token, as joining is.
    let (status, body) = http_history(node.client, "public-1", "", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        node.metric("gateway_auth_failures_total{reason=\"missing\"}")
            .await
            >= 1.0
    );
    assert!(
        node.metric("gateway_auth_failures_total{reason=\"room_not_granted\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicitly_open_api_still_guards_history() {
    let node = TestNode::start(test_config("n1", None, &jwt(&["--open-api"]))).await;
    let (status, _) = http_publish(&node, "r", &[], b"\"from anyone\"").await;
    assert_eq!(
        status, 202,
        "--open-api opens the publish API, as documented"
    );
    let (status, _) = http_history(node.client, "r", "", &[]).await;
    assert_eq!(status, 401, "history still needs the right to join");
    let t = format!("Bearer {}", token("u1", &[("r", "viewer")]));
    let (status, body) = http_history(node.client, "r", "", &[("Authorization", &t)]).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"][0]["data"], "from anyone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_page_cannot_publish() {
    // `--auth none` and no key: the API is open to backends, but not to a browser on another
    // site (a `text/plain` form POST needs no CORS preflight).
    let node = TestNode::start(test_config(
        "n1",
        None,
        &["--allowed-origins", "https://live.example.com"],
    ))
    .await;
    let mut viewer = node.join("r", "viewer", "v").await;
    let attempts: [&[(&str, &str)]; 5] = [
        &[
            ("Origin", "https://evil.example"),
            ("Content-Type", "text/plain"),
        ],
        &[
            ("Origin", "https://evil.example"),
            ("Content-Type", "application/json"),
        ],
        &[("Origin", "null"), ("Content-Type", "text/plain")],
        &[
            ("Sec-Fetch-Site", "cross-site"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        // A listed origin, but a content type a form could send.
        &[
            ("Origin", "https://live.example.com"),
            ("Content-Type", "text/plain"),
        ],
    ];
    for headers in attempts {
        let (status, body) = http_publish(&node, "r", headers, b"\"pwned\"").await;
        assert!(
            status == 403 || status == 415,
            "{headers:?}: {status} {body}"
        );
    }
    viewer.expect_no_message(Duration::from_millis(300)).await;
    // The listed origin with JSON, and a backend (no Origin) with text: published.
    let (status, _) = http_publish(
        &node,
        "r",
        &[
            ("Origin", "https://live.example.com"),
            ("Content-Type", "application/json"),
        ],
        b"\"from the page\"",
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(viewer.next_message().await["data"], "from the page");
    let (status, _) = http_publish(&node, "r", &[("Content-Type", "text/plain")], b"backend").await;
    assert_eq!(status, 202);
    assert_eq!(viewer.next_message().await["data"], "backend");
}

// ---- 2. Empty keys and secrets ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_api_key_or_hmac_secret_refuses_to_start() {
    for blank in ["", " , ", " "] {
        let stderr = binary_refuses(&[("GATEWAY_API_KEY", blank)], &[]).await;
        assert!(stderr.contains("empty or blank"), "{blank:?}: {stderr}");
        let stderr = binary_refuses(
            &[
                ("GATEWAY_API_KEY", API_KEY),
                ("GATEWAY_JWT_HMAC_SECRETS", blank),
            ],
            &["--auth", "jwt"],
        )
        .await;
        assert!(
            stderr.contains("blank") || stderr.contains("needs at least one"),
            "{blank:?}: {stderr}"
        );
    }
    let e = refused_at_start(test_config("n1", None, &["--api-key", " , "])).await;
    assert!(e.contains("empty or blank"), "{e}");
}

// ---- 4. Anonymous viewers by room pattern ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_viewers_reach_only_the_rooms_opened_to_them() {
    let node = TestNode::start(test_config(
        "n1",
        None,
        &jwt(&[
            "--api-key",
            API_KEY,
            "--allow-anonymous-viewers",
            "public-*,lobby",
        ]),
    ))
    .await;
    for room in ["public-1", "lobby"] {
        let mut c = WsClient::connect_status(&node.ws_url(room, ""))
            .await
            .unwrap_or_else(|s| panic!("{room}: {s}"));
        assert_eq!(c.next_of("welcome").await["role"], "viewer");
    }
    for room in ["private", "lobby2", "publi"] {
        for query in ["", "backlog=100", "since=x:0"] {
            let r = WsClient::connect_status(&node.ws_url(room, query)).await;
            assert!(
                matches!(r, Err(401) | Err(400)),
                "{room}?{query}: {:?}",
                r.err()
            );
        }
    }
    assert_eq!(
        WsClient::connect_status(&node.ws_url("private", "backlog=5"))
            .await
            .err(),
        Some(401)
    );
    let e = refused_at_start(test_config(
        "n2",
        None,
        &jwt(&["--api-key", API_KEY, "--allow-anonymous-viewers"]),
    ))
    .await;
    assert!(e.contains("needs the rooms"), "{e}");
}

// ---- 6. Deadlines on every HTTP connection ----

/// Reads until the peer closes or `limit` passes; returns the bytes and whether it closed.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return (buf, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn timeout_flags() -> Vec<&'static str> {
    vec![
        "--http-header-timeout",
        "700ms",
        "--http-keepalive-timeout",
        "1s",
        "--http-body-timeout",
        "1s",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed() {
    let node = TestNode::start(test_config("n1", None, &timeout_flags())).await;
    for addr in [node.client, node.admin] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let path = if addr == node.client { "/" } else { "/healthz" };
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let started = Instant::now();
        let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(4)).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{addr}");
        assert!(closed, "{addr}: still open after 4 s");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{addr}: closed after {took:?}, not after the 1 s keep-alive deadline"
        );
    }
    assert_eq!(
        node.metric("gateway_http_timeouts_total{phase=\"keepalive\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_trickled_after_a_first_request_are_cut_off() {
    let node = TestNode::start(test_config("n1", None, &timeout_flags())).await;
    let mut s = TcpStream::connect(node.client).await.unwrap();
    s.write_all(b"GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One header byte every 200 ms: each read resets no deadline.
    let mut closed_at = None;
    for b in b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(&[*b]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        let mut probe = [0u8; 65536];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
        {
            closed_at = Some(started.elapsed());
            break;
        }
    }
    let closed_at = closed_at.expect("a trickling client was never cut off");
    assert!(
        closed_at < Duration::from_secs(3),
        "cut off after {closed_at:?}"
    );
    // Before the first request too.
    let mut s = TcpStream::connect(node.client).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let (_, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(closed);
    assert!(
        node.metric("gateway_http_timeouts_total{phase=\"header\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_answered_408_and_closed() {
    let node = TestNode::start(test_config("n1", None, &timeout_flags())).await;
    let mut s = TcpStream::connect(node.client).await.unwrap();
    s.write_all(
        b"POST /api/rooms/r/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n\"only the start",
    )
    .await
    .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut s, Duration::from_secs(4)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(closed, "the connection is closed after a stalled body");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        node.metric("gateway_http_timeouts_total{phase=\"body\"}")
            .await,
        1.0
    );
}

// ---- 7. Control commands are rate-limited ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_rate_limited_then_closed() {
    let node = TestNode::start(test_config("n1", None, &[])).await;
    let mut c = node.join("r", "viewer", "flood").await;
    for _ in 0..30 {
        c.send_text(r#"{"type":"ping"}"#).await;
    }
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 30 {
        let v = c.next_json().await;
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if v["code"] == "rate_limited" => limited += 1,
            _ => {}
        }
    }
    // A burst of 10 (twice --max-control-rate 5), plus what refilled while the flood was sent.
    assert!((10..=12).contains(&pongs), "{pongs} pongs");
    assert_eq!(
        node.metric("gateway_control_rate_limited_total").await,
        f64::from(limited)
    );
    // Keeping it up is abuse: more than 50 refusals within 10 s close the connection (1008).
    for _ in 0..60 {
        c.send_text(r#"{"type":"ping"}"#).await;
    }
    assert_eq!(c.ended(WAIT).await, Ended::Closed(1008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_flood_costs_at_most_the_burst_in_signature_checks() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config(
        "n1",
        Some(&redis),
        &jwt(&["--api-key", API_KEY]),
    ))
    .await;
    let t = token("u1", &[("r", "viewer")]);
    let mut c = WsClient::connect(&node.ws_url("r", &format!("token={t}"))).await;
    c.next_of("welcome").await;
    // Refreshes with a forged token: each would cost a signature check.
    let forged = format!("{t}x");
    for _ in 0..40 {
        c.send_text(&json!({"type": "refresh", "token": forged}).to_string())
            .await;
    }
    let mut codes = Vec::new();
    while codes.len() < 40 {
        let v = c.next_of("error").await;
        codes.push(v["code"].as_str().unwrap().to_string());
    }
    let checked = codes.iter().filter(|c| *c == "refresh_failed").count();
    assert!((10..=12).contains(&checked), "{checked} refreshes checked");
    assert_eq!(
        node.metric("gateway_auth_failures_total{reason=\"signature\"}")
            .await,
        checked as f64
    );
    assert_eq!(
        node.metric("gateway_control_rate_limited_total").await,
        (40 - checked) as f64
    );
}

// ---- 9. JWKS over https only, no redirects ----

/// A JWKS document with the RSA fixture key `rsa1` as `kid`.
fn jwks_doc(kid: &str) -> String {
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/auth/rsa1.key",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let enc = EncodingKey::from_rsa_pem(&pem).unwrap();
    let mut jwk = serde_json::to_value(
        jsonwebtoken::jwk::Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap(),
    )
    .unwrap();
    jwk["kid"] = kid.into();
    json!({ "keys": [jwk] }).to_string()
}

/// A key server on 127.0.0.1:0: `/moved` redirects (302) to `/keys`, which serves `doc`.
async fn redirecting_key_server(doc: String) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let doc = doc.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let answer = if head.starts_with("GET /keys ") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{doc}",
                        doc.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: http://{addr}/keys\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                };
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_needs_https_and_follows_no_redirect() {
    let addr = redirecting_key_server(jwks_doc("k1")).await;
    let e = refused_at_start(test_config(
        "n1",
        None,
        &[
            "--auth",
            "jwt",
            "--api-key",
            API_KEY,
            "--jwks-url",
            &format!("http://{addr}/keys"),
        ],
    ))
    .await;
    assert!(e.contains("https"), "{e}");
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/auth/rsa1.key",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("k1".into());
    let claims = json!({"sub": "u1", "exp": now() + 60, "rooms": [{"room": "r", "role": "host"}]});
    let signed = encode(&h, &claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap();
    // The same key server, straight and through a redirect (http allowed for the test).
    for (path, admitted) in [("/keys", true), ("/moved", false)] {
        let url = format!("http://{addr}{path}");
        let node = TestNode::start(test_config(
            "n1",
            None,
            &[
                "--auth",
                "jwt",
                "--api-key",
                API_KEY,
                "--jwks-url",
                &url,
                "--jwks-allow-http",
            ],
        ))
        .await;
        let r = WsClient::connect_status(&node.ws_url("r", &format!("token={signed}"))).await;
        assert_eq!(r.is_ok(), admitted, "{path}: {:?}", r.as_ref().err());
        if !admitted {
            assert_eq!(r.err(), Some(401));
        }
        node.stop().await;
    }
}

// ---- The HTTP API routes, fuzzed ----

/// Random path, query, headers and body for the API routes of a node under `--auth jwt` with a
/// key: whatever arrives, without the key or a valid token nothing is published or read (no 2xx
/// from `/api/`), every answer is a documented status with a JSON error, and the node stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_api_requests_without_credentials_never_succeed() {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("api routes: FUZZ_SEED={seed}");
    let mut r = fastrand::Rng::with_seed(seed);
    let budget = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(3));
    let node = TestNode::start(test_config("n1", None, &jwt(&["--api-key", API_KEY]))).await;
    let mut viewer =
        WsClient::connect(&node.ws_url("r", &format!("token={}", token("v", &[("*", "viewer")]))))
            .await;
    viewer.next_of("welcome").await;
    const PATHS: &[&str] = &[
        "/api/rooms/r/messages",
        "/api/rooms/_control/messages",
        "/api/rooms//messages",
        "/api/rooms/r%2Fx/messages",
        "/api/rooms/r/disconnect",
        "/api/users/u1/disconnect",
        "/api/bans",
        "/api/rooms/r/messages/",
        "/api/rooms/../bans",
        "/api/rooms/r/messages%00",
    ];
    const QUERIES: &[&str] = &[
        "",
        "?since=x",
        "?since=1:2",
        "?limit=0",
        "?limit=99999999999999999999",
        "?from=%ff",
        "?token=a.b.c",
        "?token=",
        "?%",
        "?sub=u1",
    ];
    const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"];
    let forged = token("u1", &[("*", "host")]) + "x";
    let auths: Vec<String> = vec![
        String::new(),
        "Bearer ".into(),
        "Bearer  , ".into(),
        format!("Bearer {}", &API_KEY[..API_KEY.len() - 1]),
        format!("Bearer {API_KEY}x"),
        format!("bearer {API_KEY}"),
        format!("Basic {API_KEY}"),
        format!("Bearer {forged}"),
        "Bearer a.b.c".into(),
    ];
    const TYPES: &[&str] = &[
        "",
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-8",
    ];
    // Longer than the 128 characters a key may have.
    let long_key = "k".repeat(200);
    let end = Instant::now() + budget;
    let mut n = 0u64;
    while Instant::now() < end {
        let path = format!(
            "{}{}",
            PATHS[r.usize(..PATHS.len())],
            QUERIES[r.usize(..QUERIES.len())]
        );
        let method = METHODS[r.usize(..METHODS.len())];
        let auth = &auths[r.usize(..auths.len())];
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if !auth.is_empty() {
            headers.push(("Authorization", auth));
        }
        let ct = TYPES[r.usize(..TYPES.len())];
        if !ct.is_empty() {
            headers.push(("Content-Type", ct));
        }
        if r.bool() {
            headers.push(("Origin", "https://evil.example"));
        }
        if r.u8(..4) == 0 {
            headers.push(("Idempotency-Key", &long_key));
        }
        let body: Vec<u8> = match r.u8(..4) {
            0 => Vec::new(),
            1 => b"{\"sub\":\"u1\",\"room\":null,\"duration\":\"1m\"}".to_vec(),
            2 => (0..r.usize(..300)).map(|_| r.u8(..)).collect(),
            _ => json!({"x": r.u64(..)}).to_string().into_bytes(),
        };
        let (status, answer) = http(node.client, method, &path, &headers, &body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path} {headers:?}: {e}"));
        assert!(
            !(200..300).contains(&status),
            "{method} {path} {headers:?} succeeded without credentials: {status} {}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            [400, 401, 403, 404, 405, 413, 415].contains(&status),
            "{method} {path} {headers:?}: undocumented {status}"
        );
        if method != "HEAD" {
            let v: Value = serde_json::from_slice(&answer).unwrap_or_else(|_| {
                panic!("{method} {path} {headers:?}: {status}, not JSON: {answer:?}")
            });
            assert!(v["error"].is_string(), "{v}");
        }
        n += 1;
    }
    viewer.expect_no_message(Duration::from_millis(200)).await;
    // Still serving: the key works.
    let (status, _) = http_publish(
        &node,
        "r",
        &[("Authorization", &format!("Bearer {API_KEY}"))],
        b"\"still up\"",
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(viewer.next_message().await["data"], "still up");
    eprintln!("api routes: {n} requests");
}

// ---- 3 (outside the broker). The size limit holds on what is stored and sent ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_cannot_amplify_a_message_past_the_limit() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(test_config("n1", Some(&redis), &[])).await;
    let mut member = node.join("r", "viewer", "m").await;
    // 60 000 control bytes: within --max-message-size as received, ~360 KB once JSON-escaped.
    let flood = "\u{1}".repeat(60_000);
    let mut c = node.join("r", "host", "attacker").await;
    c.send_text(&flood).await;
    let e = c.next_of("error").await;
    assert_eq!(e["code"], "too_large", "{e}");
    let (status, body) = http_publish(
        &node,
        "r",
        &[("Content-Type", "text/plain")],
        flood.as_bytes(),
    )
    .await;
    assert_eq!((status, body["error"].clone()), (413, json!("too_large")));
    member.expect_no_message(Duration::from_millis(300)).await;
    let (status, history) = http_history(node.client, "r", "", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(history["messages"], json!([]), "nothing reached Redis");
    assert_eq!(
        node.metric("gateway_messages_dropped_total{reason=\"too_large\"}")
            .await,
        2.0
    );
    // A plain line of exactly the limit still goes through, as documented.
    let line = "b".repeat(65536);
    c.send_text(&line).await;
    assert_eq!(member.next_message().await["data"], line);
}
