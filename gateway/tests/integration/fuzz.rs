//! Property tests with many random inputs, bounded in time (`FUZZ_SECONDS`, default 3 per
//! target; the seed is printed and `FUZZ_SEED` replays it): the command parser, the broker payload
//! classifier, the frame decoder over a real socket, and a live node fed garbage by many clients.
//! Each asserts what must hold for every input, not only that nothing panics.

use std::time::{Duration, Instant};

use crate::common::*;
use gateway::wire::frame::{DecodeError, Decoder};
use gateway::wire::protocol::{self, BrokerPayload, ClientCommand, RoomName};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

fn rng(name: &str) -> fastrand::Rng {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("{name}: FUZZ_SEED={seed}");
    fastrand::Rng::with_seed(seed)
}

/// A random JSON value, small and nested.
fn json_value(r: &mut fastrand::Rng, depth: u32) -> Value {
    match r.u8(0..if depth > 3 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(r.bool()),
        2 => Value::from(r.i64(..)),
        3 => Value::from(r.f64() * 1e6 - 5e5),
        4 => Value::String(text(r, 12)),
        5 => Value::Array(
            (0..r.usize(0..4))
                .map(|_| json_value(r, depth + 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..r.usize(0..4))
                .map(|_| (text(r, 6), json_value(r, depth + 1)))
                .collect(),
        ),
    }
}

/// Random text: ASCII, JSON punctuation, escapes, multi-byte characters.
fn text(r: &mut fastrand::Rng, max: usize) -> String {
    const PIECES: &[&str] = &[
        "a", "Z", "0", " ", "{", "}", "[", "]", "\"", ":", ",", "\\", "\\u0041", "é", "😀", "\n",
        "\t", "type", "publish", "ping", "data", "null", "true", "-", "1e9", ".",
    ];
    (0..r.usize(0..=max))
        .map(|_| PIECES[r.usize(..PIECES.len())])
        .collect()
}

/// A command-like input: well-formed, near-miss, or mangled.
fn command_input(r: &mut fastrand::Rng) -> String {
    let base = match r.u8(0..6) {
        0 => serde_json::json!({"type": "publish", "data": json_value(r, 0)}).to_string(),
        1 => serde_json::json!({"type": text(r, 8), "data": json_value(r, 0)}).to_string(),
        2 => json_value(r, 0).to_string(),
        3 => text(r, 40),
        4 => serde_json::json!({"type": "ping"}).to_string(),
        5 if r.bool() => serde_json::json!({"type": "refresh", "token": text(r, 40)}).to_string(),
        _ => serde_json::json!({"type": "publish"}).to_string(),
    };
    match r.u8(0..4) {
        0 if !base.is_empty() => {
            let mut cut = r.usize(0..base.len());
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            base[..cut].to_string()
        }
        1 => {
            let mut s = base.clone();
            let mut at = r.usize(0..=s.len());
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.insert_str(at, &text(r, 3));
            s
        }
        _ => base,
    }
}

#[test]
fn command_parser_classifies_every_input_consistently() {
    let mut r = rng("command parser");
    let end = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            let input = command_input(&mut r);
            // JSON by syntax (RFC 8259): numbers beyond f64 are still JSON, so the oracle is
            // the raw-value parser; `Value` is used for the fields where it can represent them.
            let is_json = serde_json::from_str::<&serde_json::value::RawValue>(&input).is_ok();
            let parsed: Result<Value, _> = serde_json::from_str(&input);
            match protocol::parse_command(&input) {
                Ok(ClientCommand::Chat(t)) => {
                    assert_eq!(t, input);
                    assert!(!is_json, "valid JSON taken for chat: {input:?}");
                    // Chat becomes a JSON string holding exactly the text.
                    let data = protocol::chat_data(t);
                    assert_eq!(
                        serde_json::from_str::<Value>(data.get()).unwrap(),
                        Value::String(input.clone())
                    );
                }
                Ok(ClientCommand::Publish(data, _)) => {
                    assert!(is_json, "{input}");
                    if let Ok(v) = &parsed {
                        assert_eq!(v["type"], "publish");
                        assert_eq!(
                            serde_json::from_str::<Value>(data.get()).unwrap(),
                            v["data"],
                            "{input}"
                        );
                    }
                    assert!(
                        input.contains(data.get()),
                        "data is carried verbatim: {input}"
                    );
                    // The message frame built from it is ours to forward as is.
                    let room = RoomName::parse("fuzz").unwrap();
                    let frame = protocol::Message::new(
                        "fuzz",
                        Some("n"),
                        protocol::Role::Viewer,
                        data,
                        "id",
                        7,
                    )
                    .encode();
                    assert_eq!(
                        protocol::classify_broker_payload(&room, &frame),
                        BrokerPayload::Envelope { ts: 7, stamp: None }
                    );
                }
                Ok(ClientCommand::Refresh(token)) => {
                    assert!(is_json);
                    if let Ok(v) = &parsed {
                        assert_eq!(v["type"], "refresh", "{input}");
                        assert_eq!(v["token"], *token, "{input}");
                    }
                }
                Ok(ClientCommand::Members(cursor)) => {
                    assert!(is_json);
                    if let Ok(v) = &parsed {
                        assert_eq!(v["type"], "members", "{input}");
                        if let Some(c) = &cursor {
                            assert_eq!(v["cursor"], **c, "{input}");
                        }
                    }
                }
                Ok(ClientCommand::Ping) => {
                    assert!(is_json);
                    if let Ok(v) = &parsed {
                        assert_eq!(v["type"], "ping", "{input}");
                    }
                }
                Err(e) => {
                    assert!(is_json, "non-JSON refused instead of chat: {input:?}");
                    assert!(["unknown_command", "invalid_command"].contains(&e.code()));
                }
            }
            n += 1;
        }
    }
    eprintln!("command parser: {n} inputs");
}

#[test]
fn any_broker_payload_becomes_a_valid_message_frame() {
    let mut r = rng("broker payload");
    let room = RoomName::parse("r").unwrap();
    let end = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < end {
        let payload: Vec<u8> = match r.u8(0..3) {
            0 => (0..r.usize(0..64)).map(|_| r.u8(..)).collect(),
            1 => command_input(&mut r).into_bytes(),
            _ => serde_json::json!({"type":"message","room":"r","from":null,"role":"server","data":json_value(&mut r, 0),"id":"x","ts":r.u64(..)})
                .to_string()
                .into_bytes(),
        };
        match protocol::classify_broker_payload(&room, &payload) {
            BrokerPayload::Envelope { .. } => {
                let v: Value = serde_json::from_slice(&payload).expect("an envelope is JSON");
                assert_eq!(
                    (v["type"].as_str(), v["room"].as_str()),
                    (Some("message"), Some("r"))
                );
            }
            BrokerPayload::Raw => {
                let v: Value =
                    serde_json::from_slice(&protocol::wrap_raw_payload(&room, &payload, "i", 1))
                        .unwrap();
                assert_eq!(
                    v["data"],
                    Value::String(String::from_utf8_lossy(&payload).into_owned())
                );
                assert_eq!(v["role"], "server");
            }
        }
        n += 1;
    }
    eprintln!("broker payload: {n} inputs");
}

/// A masked client frame with arbitrary header bits.
fn frame(r: &mut fastrand::Rng, first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut f = vec![first];
    let m = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let key = [r.u8(..), r.u8(..), r.u8(..), r.u8(..)];
    if masked {
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_decoder_round_trips_valid_frames_and_rejects_the_rest() {
    let mut r = rng("frame decoder");
    let end = Instant::now() + budget();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut streams = 0u64;
    while Instant::now() < end {
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rd, _wr) = server.into_split();
        // A stream of valid frames, then maybe one bad one.
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for _ in 0..r.usize(1..20) {
            let op = [0x0, 0x1, 0x2, 0x9, 0xA][r.usize(0..5)];
            let len = if op >= 0x8 {
                r.usize(0..=125)
            } else {
                r.usize(0..3000)
            };
            let payload: Vec<u8> = (0..len).map(|_| r.u8(..)).collect();
            let fin = op >= 0x8 || r.bool();
            wire.extend(frame(&mut r, (fin as u8) << 7 | op, &payload, true));
            expected.push((fin, op, payload));
        }
        let bad = match r.u8(0..5) {
            0 => Some(frame(&mut r, 0x81, b"unmasked", false)),
            1 => Some(frame(&mut r, 0xC1, b"rsv", true)),
            2 => {
                let op = 0x80 | r.u8(3..8);
                Some(frame(&mut r, op, b"op", true))
            }
            3 => Some(frame(&mut r, 0x81, &vec![b'x'; 5000], true)),
            _ => None,
        };
        if let Some(b) = &bad {
            wire.extend_from_slice(b);
        }
        let mut d = Decoder::new(rd, &[], 4096);
        let writer = tokio::spawn({
            let chunks: Vec<Vec<u8>> = {
                let mut c = Vec::new();
                let mut rest = &wire[..];
                while !rest.is_empty() {
                    let n = r.usize(1..=rest.len().min(700));
                    c.push(rest[..n].to_vec());
                    rest = &rest[n..];
                }
                c
            };
            async move {
                for c in chunks {
                    if client.write_all(&c).await.is_err() {
                        return;
                    }
                }
                let _ = client.shutdown().await;
            }
        });
        for (fin, op, payload) in &expected {
            let f = tokio::time::timeout(WAIT, d.read_frame())
                .await
                .expect("in time")
                .expect("valid frame");
            assert_eq!((f.fin, f.opcode, &f.payload[..]), (*fin, *op, &payload[..]));
        }
        let last = tokio::time::timeout(WAIT, d.read_frame())
            .await
            .expect("in time");
        match (&bad, last) {
            (None, Err(DecodeError::Eof)) => {}
            (Some(_), Err(DecodeError::Protocol(_) | DecodeError::TooLarge)) => {}
            (b, other) => panic!(
                "after the valid frames, bad={:?}: {other:?}",
                b.as_ref().map(|b| &b[..4])
            ),
        }
        writer.await.unwrap();
        streams += 1;
    }
    eprintln!("frame decoder: {streams} streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_survives_garbage_from_many_clients() {
    let mut r = rng("live node");
    let node = TestNode::start(test_config(
        "fuzz",
        None,
        &["--max-message-size", "2048", "--max-fragments", "8"],
    ))
    .await;
    let mut witness = node.join("room", "viewer", "witness").await;
    let end = Instant::now() + budget();
    let mut clients = 0u64;
    while Instant::now() < end {
        let mut c = RawWs::connect(node.client, "/ws/room?name=f").await;
        let mut wire = Vec::new();
        for _ in 0..r.usize(1..8) {
            match r.u8(0..6) {
                0 => {
                    let cmd = command_input(&mut r);
                    wire.extend(frame(&mut r, 0x81, cmd.as_bytes(), true))
                }
                1 => wire.extend((0..r.usize(1..40)).map(|_| r.u8(..))),
                2 => {
                    let p: Vec<u8> = (0..r.usize(0..3000)).map(|_| r.u8(..)).collect();
                    let first = r.u8(..);
                    let masked = r.u8(0..8) != 0;
                    wire.extend(frame(&mut r, first, &p, masked));
                }
                3 => wire.extend(frame(&mut r, 0x01, b"part", true)),
                4 => wire.extend(frame(&mut r, 0x80, b"end", true)),
                _ => wire.extend(frame(&mut r, 0x89, b"p", true)),
            }
        }
        c.send(&wire).await;
        // Either the connection lives on (a bounded wait), or it ends with a documented code.
        let outcome = tokio::time::timeout(Duration::from_millis(50), async {
            while let Some((op, p)) = c.read_frame().await {
                if op == 0x8 {
                    return Some(u16::from_be_bytes([p[0], p[1]]));
                }
            }
            None
        })
        .await;
        if let Ok(Some(code)) = outcome {
            assert!(
                [1000, 1002, 1007, 1008, 1009].contains(&code),
                "undocumented close {code}"
            );
        }
        clients += 1;
    }
    // The node is fine and the room still works.
    let (status, _) = http(node.admin, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(status, 200);
    let mut host = node.join("room", "host", "h").await;
    host.publish(serde_json::json!("after the storm")).await;
    loop {
        let m = witness.next_message().await;
        if m["data"] == "after the storm" {
            break;
        }
    }
    eprintln!("live node: {clients} garbage clients");
}

/// A random token-like string: JWT-shaped pieces, random bytes, or something huge.
fn token_input(r: &mut fastrand::Rng) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = match r.u8(0..6) {
        0 => r#"{"alg":"HS256"}"#.to_string(),
        1 => r#"{"alg":"none"}"#.to_string(),
        2 => r#"{"alg":"RS256","kid":"k"}"#.to_string(),
        3 => json_value(r, 0).to_string(),
        4 => text(r, 30),
        _ => r#"{"alg":"HS256","kid":""}"#.to_string(),
    };
    match r.u8(0..5) {
        0 => (0..r.usize(0..200)).map(|_| r.char(..)).collect(),
        1 => format!(
            "{}.{}.{}",
            b64(header.as_bytes()),
            b64(json_value(r, 0).to_string().as_bytes()),
            b64(&(0..r.usize(0..64)).map(|_| r.u8(..)).collect::<Vec<_>>())
        ),
        2 => "a.".repeat(r.usize(0..5000)),
        3 => {
            // Huge: far beyond the 8 KiB bound.
            let n = r.usize(8 * 1024..200 * 1024);
            format!("{}.{}.x", b64(header.as_bytes()), "A".repeat(n))
        }
        _ => format!("{}.{}", b64(header.as_bytes()), text(r, 40)),
    }
}

#[tokio::test]
async fn the_token_path_is_bounded_and_never_panics() {
    let mut r = rng("token verifier");
    let config = test_config(
        "n1",
        None,
        &[
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            "fuzz-secret-0123456789",
        ],
    );
    let verifier = gateway::auth::Verifier::from_config(&config)
        .unwrap()
        .unwrap();
    let end = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < end {
        let t = token_input(&mut r);
        let started = Instant::now();
        let result = verifier.verify(&t).await;
        assert!(result.is_err(), "a random token was accepted: {t:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "one token took {:?}",
            started.elapsed()
        );
        n += 1;
    }
    eprintln!("token verifier: {n} tokens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_tokens_on_a_live_node_get_a_clean_refusal() {
    let mut r = rng("live tokens");
    let node = TestNode::start(test_config(
        "n1",
        None,
        &[
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            "fuzz-secret-0123456789",
            "--api-key",
            "fuzz-api-key-123",
        ],
    ))
    .await;
    let end = Instant::now() + budget();
    let mut n = 0u64;
    while Instant::now() < end {
        let t = token_input(&mut r);
        // As a header (raw: arbitrary bytes that HTTP allows) or as a query parameter.
        let status = if r.bool() && t.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            RawWs::connect_with(
                node.client,
                "/ws/r",
                &[("Authorization", &format!("Bearer {t}"))],
            )
            .await
            .err()
        } else {
            let q: String = t.bytes().map(|b| format!("%{b:02X}")).collect();
            RawWs::connect_with(node.client, &format!("/ws/r?token={q}"), &[])
                .await
                .err()
        };
        // 401 for a bad token; 400/431 when the request itself is too large or malformed.
        assert!(
            matches!(status, Some(400 | 401 | 414 | 431)),
            "status {status:?} for {} bytes",
            t.len()
        );
        n += 1;
    }
    let (status, _) = http(node.admin, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        node.metric("gateway_auth_failures_total{reason=\"malformed\"}")
            .await
            > 0.0
    );
    eprintln!("live tokens: {n} upgrades");
}
