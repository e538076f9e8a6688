//! One webhook request: the body (the event with its `id`), the signature
//! (`X-Gateway-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`) and the POST with
//! its deadline, read as one [`WebhookAttempt`] result. The wire contract is docs/protocol.md,
//! "Webhooks".
//!
//! Not here: retries, order and leases ([`super::worker`]).

use std::time::Duration;

use aws_lc_rs::hmac;
use serde_json::{Map, Value};

use crate::metrics::WebhookAttempt;
use crate::wire::protocol::RoomName;

/// Largest request body: a lifecycle event is a few hundred bytes; a larger one is malformed
/// and goes to the dead letters instead of being sent.
pub const MAX_BODY: usize = 16 * 1024;

/// Why an event cannot be sent at all (it goes to the dead letters with this reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not a JSON object.
    #[error("malformed")]
    Malformed,
    /// Over [`MAX_BODY`].
    #[error("too_large")]
    TooLarge,
}

/// An event ready to send: its id and body; the signature is made per attempt (the timestamp
/// is the attempt's).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `<room>/<stream entry id>`: unique, and the same on every retry and every node.
    pub id: String,
    /// The event's JSON with `"id"` added.
    pub body: Vec<u8>,
    /// The event's `ts_ms`, if it has one (for the lag histogram).
    pub ts_ms: Option<u64>,
}

/// Builds the request body of the stream entry `entry` of `room` holding `event`.
pub fn prepare(room: &RoomName, entry: &str, event: &str) -> Result<Prepared, BodyError> {
    if event.len() > MAX_BODY {
        return Err(BodyError::TooLarge);
    }
    let mut map: Map<String, Value> =
        serde_json::from_str(event).map_err(|_| BodyError::Malformed)?;
    let id = format!("{room}/{entry}");
    let ts_ms = map.get("ts_ms").and_then(Value::as_u64);
    map.insert("id".into(), Value::String(id.clone()));
    let body = serde_json::to_vec(&map).map_err(|_| BodyError::Malformed)?;
    if body.len() > MAX_BODY {
        return Err(BodyError::TooLarge);
    }
    Ok(Prepared { id, body, ts_ms })
}

/// `v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1={}", hex::encode(ctx.sign().as_ref()))
}

/// Sends events to the receivers.
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    /// `--webhook-url`s.
    pub urls: Vec<String>,
    /// The signing secret: the first `--webhook-secret`.
    secret: Vec<u8>,
}

impl Sender {
    /// A client with the request deadline `timeout` that follows no redirect (a receiver is
    /// trusted where it was configured).
    pub fn new(urls: Vec<String>, secret: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(Self {
            client,
            urls,
            secret: secret.as_bytes().to_vec(),
        })
    }

    /// POSTs `event` to the receiver `url` (an index in [`Sender::urls`]), signed now.
    pub async fn post(&self, url: usize, event: &Prepared) -> WebhookAttempt {
        let timestamp = crate::wire::clock::unix_millis() / 1000;
        let answer = self
            .client
            .post(&self.urls[url])
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("X-Gateway-Event-Id", &event.id)
            .header("X-Gateway-Timestamp", timestamp.to_string())
            .header(
                "X-Gateway-Signature",
                signature(&self.secret, timestamp, &event.body),
            )
            .body(event.body.clone())
            .send()
            .await;
        match answer {
            Ok(r) => classify(r.status().as_u16()),
            Err(e) if e.is_timeout() => WebhookAttempt::Timeout,
            Err(_) => WebhookAttempt::Unreachable,
        }
    }
}

/// A status read as an attempt's result: 2xx accepted; 408 and 429 (the receiver asks to come
/// back) and every other status failed (retried); the remaining 4xx refused (dead-lettered after
/// `--webhook-dead-letter-after` attempts).
pub fn classify(status: u16) -> WebhookAttempt {
    match status {
        200..=299 => WebhookAttempt::Accepted,
        408 | 429 => WebhookAttempt::Failed,
        400..=499 => WebhookAttempt::Refused,
        _ => WebhookAttempt::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently with Python:
        // hmac.new(b"whsec-test-0123456789", b"1765100000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            signature(b"whsec-test-0123456789", 1_765_100_000, b"{}"),
            "v1=3dd4a095965b0ee04e6bf2e4703a37ea5cb7c6a15056269c1374785a90e4850a"
        );
    }

    #[test]
    fn bodies_carry_a_stable_id_and_are_bounded() {
        let room = RoomName::parse("r1").unwrap();
        let p = prepare(
            &room,
            "1765100000000-0",
            r#"{"type":"member.joined","ts_ms":5}"#,
        )
        .unwrap();
        assert_eq!(p.id, "r1/1765100000000-0");
        assert_eq!(p.ts_ms, Some(5));
        let v: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(v["id"], "r1/1765100000000-0");
        assert_eq!(v["type"], "member.joined");
        assert_eq!(
            prepare(&room, "1-0", "[1]").unwrap_err(),
            BodyError::Malformed
        );
        assert_eq!(
            prepare(&room, "1-0", "not json").unwrap_err(),
            BodyError::Malformed
        );
        let big = format!(r#"{{"type":"x","pad":"{}"}}"#, "a".repeat(MAX_BODY));
        assert_eq!(
            prepare(&room, "1-0", &big).unwrap_err(),
            BodyError::TooLarge
        );
    }

    #[test]
    fn statuses() {
        assert_eq!(classify(204), WebhookAttempt::Accepted);
        assert_eq!(classify(400), WebhookAttempt::Refused);
        assert_eq!(classify(408), WebhookAttempt::Failed);
        assert_eq!(classify(429), WebhookAttempt::Failed);
        assert_eq!(classify(503), WebhookAttempt::Failed);
        assert_eq!(classify(302), WebhookAttempt::Failed);
    }
}
