//! A webhook receiver: a real HTTP server (hyper) on 127.0.0.1:0 in the test's process that
//! records every request and answers by a plan (fail, time out, accept), the signature the
//! gateway must send (computed here with the test secret, not by the gateway), and the
//! `--webhook-*` flags with test timings. Used by `webhooks.rs` (the delivery side) and
//! `lifecycle.rs` (events produced by real members, delivered end to end).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

use super::WAIT;

pub const HOOK_SECRET: &str = "whsec-test-0123456789";

/// What the receiver answers to one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Accepts (200) after this long.
    Slow(Duration),
    /// Answers 200 only after this long (beyond the node's `--webhook-timeout`: a timeout).
    Hang(Duration),
}

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Got {
    pub id: String,
    pub header_id: String,
    pub timestamp: String,
    pub signature: String,
    pub content_type: String,
    pub body: Bytes,
    pub at: Instant,
    pub accepted: bool,
}

pub type Plan = Box<dyn FnMut(usize, &Value) -> Reply + Send>;

/// A real HTTP receiver (hyper) on loopback that records every request and answers by its plan
/// (given the number of requests before this one and the body).
pub struct Receiver {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<Got>>>,
    /// The plan and how many requests it answered (arrivals, counted before a hang).
    pub plan: Arc<Mutex<(usize, Plan)>>,
    pub server: Option<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    pub async fn start(plan: impl FnMut(usize, &Value) -> Reply + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut r = Self {
            addr: listener.local_addr().unwrap(),
            log: Arc::default(),
            plan: Arc::new(Mutex::new((0, Box::new(plan)))),
            server: None,
        };
        r.serve(listener);
        r
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks", self.addr)
    }

    pub fn serve(&mut self, listener: TcpListener) {
        let (log, plan) = (self.log.clone(), self.plan.clone());
        self.server = Some(tokio::spawn(async move {
            // Connections live in this set: aborting the server drops them all (an outage).
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (log, plan) = (log.clone(), plan.clone());
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, log.clone(), plan.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }));
    }

    /// Takes the receiver down: no listener, every open connection closed.
    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    /// Brings it back on the same port.
    pub async fn restart(&mut self) {
        let deadline = Instant::now() + WAIT;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(Instant::now() < deadline, "rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        self.serve(listener);
    }

    pub fn set_plan(&self, plan: impl FnMut(usize, &Value) -> Reply + Send + 'static) {
        self.plan.lock().unwrap().1 = Box::new(plan);
    }

    /// Every request, in arrival order.
    pub fn log(&self) -> Vec<Got> {
        let mut log = self.log.lock().unwrap().clone();
        log.sort_by_key(|g| g.at);
        log
    }

    /// Ids accepted, in arrival order.
    pub fn accepted(&self) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|g| g.accepted)
            .map(|g| g.id)
            .collect()
    }

    /// Waits until `n` requests were accepted, at most `limit`.
    pub async fn wait_accepted(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.accepted().len() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} events accepted within {limit:?}",
                self.accepted().len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    log: Arc<Mutex<Vec<Got>>>,
    plan: Arc<Mutex<(usize, Plan)>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (header_id, timestamp, signature, content_type) = (
        header("x-gateway-event-id"),
        header("x-gateway-timestamp"),
        header("x-gateway-signature"),
        header("content-type"),
    );
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let reply = {
        let mut plan = plan.lock().unwrap();
        let n = plan.0;
        plan.0 += 1;
        (plan.1)(n, &json)
    };
    // A hung request is logged on arrival, not accepted: its client gives up (a timeout) and
    // the connection may be gone before the handler would end.
    let (status, accepted) = match reply {
        Reply::Status(s) => (s, (200..300).contains(&s)),
        Reply::Slow(_) => (200, true),
        Reply::Hang(_) => (200, false),
    };
    log.lock().unwrap().push(Got {
        id: json["id"].as_str().unwrap_or_default().to_string(),
        header_id,
        timestamp,
        signature,
        content_type,
        body,
        at,
        accepted,
    });
    if let Reply::Hang(d) | Reply::Slow(d) = reply {
        tokio::time::sleep(d).await;
    }
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap())
}

/// `v1=<hex HMAC-SHA256(HOOK_SECRET, "<timestamp>.<body>")>`, computed here, not by the gateway.
pub fn expected_signature(timestamp: &str, body: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, HOOK_SECRET.as_bytes());
    let mut msg = format!("{timestamp}.").into_bytes();
    msg.extend_from_slice(body);
    let tag = hmac::sign(&key, &msg);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// Every request is signed, well-formed and carries its id in the header and the body.
pub fn assert_signed(log: &[Got]) {
    let now = gateway::wire::clock::unix_millis() / 1000;
    for g in log {
        assert_eq!(
            g.signature,
            expected_signature(&g.timestamp, &g.body),
            "{g:?}"
        );
        assert_eq!(g.content_type, "application/json");
        assert_eq!(g.header_id, g.id);
        let ts: u64 = g.timestamp.parse().unwrap();
        assert!(ts <= now && now - ts < 120, "timestamp {ts} is now");
    }
}

/// Timer flags for tests: quick retries, leases and sweeps.
pub fn hook_flags(url: &str) -> Vec<String> {
    [
        "--webhook-url",
        url,
        "--webhook-secret",
        HOOK_SECRET,
        "--webhook-timeout",
        "500ms",
        "--webhook-retry-min",
        "100ms",
        "--webhook-retry-max",
        "400ms",
        "--webhook-lease",
        "2s",
        "--webhook-sweep-interval",
        "200ms",
        "--webhook-scan-interval",
        "1s",
    ]
    .map(str::to_string)
    .to_vec()
}
