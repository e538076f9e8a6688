//! Viewers that resume: [`Resumer`] reconnects with `since` whenever its connection ends and
//! records every offset it saw ([`Resumed`]); [`delivery_resumes`] measures how long until a
//! publish gets through again after a failure.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::ws::WsClient;

/// What a [`Resumer`] saw over its life.
#[derive(Debug, Default, Clone)]
pub struct Resumed {
    /// Offsets of every message received, in arrival order (duplicates and gaps show here).
    pub offsets: Vec<u64>,
    /// The epoch of the first welcome.
    pub epoch: Option<String>,
    /// The offset of the first welcome.
    pub start: u64,
    /// Welcomes after a `since` that said `recovered: false`.
    pub not_recovered: usize,
    /// Connections after the first.
    pub reconnects: usize,
    /// Close codes received.
    pub closes: Vec<u16>,
}

impl Resumed {
    /// Asserts the offsets are exactly `first..=last`, once each, in order.
    pub fn assert_exactly_once(&self, first: u64, last: u64, who: &str) {
        assert_eq!(self.not_recovered, 0, "{who}: a resume was not recovered");
        if self.offsets != (first..=last).collect::<Vec<_>>() {
            let mut dups = 0;
            let mut gaps = 0;
            let mut reordered = 0;
            for w in self.offsets.windows(2) {
                match w[1].cmp(&(w[0] + 1)) {
                    std::cmp::Ordering::Equal => {}
                    std::cmp::Ordering::Greater => gaps += w[1] - w[0] - 1,
                    std::cmp::Ordering::Less if w[1] == w[0] => dups += 1,
                    std::cmp::Ordering::Less => reordered += 1,
                }
            }
            panic!(
                "{who}: expected offsets {first}..={last} once each; got {} offsets ({gaps} lost, \
                 {dups} duplicated, {reordered} reordered; first {:?}, last {:?})",
                self.offsets.len(),
                self.offsets.first(),
                self.offsets.last()
            );
        }
    }
}

/// A viewer that keeps its room position and, whenever its connection ends (or after every
/// `drop_every` messages, on purpose), reconnects to a random node of `nodes` with `since`, until
/// it has the offset `until` announces.
pub struct Resumer {
    /// Client addresses of the nodes to (re)connect to; the test edits it as nodes come and go.
    pub nodes: std::sync::Arc<std::sync::RwLock<Vec<SocketAddr>>>,
    pub room: String,
    /// Drop the connection after every N messages (0: never).
    pub drop_every: usize,
    /// The last offset the test published; the resumer stops once it has it.
    pub until: tokio::sync::watch::Receiver<Option<u64>>,
    /// Sent once, after the first welcome.
    pub joined: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Resumer {
    /// Runs until the resumer has the last offset, or `limit` passes (then returns what it got).
    pub async fn run(mut self, limit: Duration) -> Resumed {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Resumed::default();
        let mut first = true;
        loop {
            let addr = {
                let nodes = self.nodes.read().unwrap();
                nodes[fastrand::usize(..nodes.len())]
            };
            let mut url = format!("ws://{addr}/ws/{}?role=viewer", self.room);
            // The test warms its room up (one message) so that the first welcome has an epoch.
            let resuming = got.epoch.as_deref().is_some_and(|e| !e.is_empty());
            if resuming {
                let last = got.offsets.last().copied().unwrap_or(got.start);
                url.push_str(&format!("&since={}:{last}", got.epoch.as_deref().unwrap()));
            }
            if !first {
                got.reconnects += 1;
            }
            first = false;
            let conn = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_tungstenite::connect_async(&url),
            )
            .await;
            let mut ws = match conn {
                Ok(Ok((ws, _))) => ws,
                _ => {
                    if tokio::time::Instant::now() > deadline {
                        return got;
                    }
                    tokio::time::sleep(Duration::from_millis(20 + fastrand::u64(..100))).await;
                    continue;
                }
            };
            let mut since_drop = 0;
            loop {
                let until = *self.until.borrow();
                if let Some(last) = until {
                    if got.offsets.last().copied().unwrap_or(0) >= last {
                        let _ = ws.close(None).await;
                        return got;
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    return got;
                }
                let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await
                {
                    Err(_) => continue,
                    Ok(f) => f,
                };
                match frame {
                    Some(Ok(WsMessage::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        match v["type"].as_str() {
                            Some("welcome") => {
                                if got.epoch.is_none() {
                                    got.start = v["offset"].as_u64().unwrap_or(0);
                                    got.epoch = v["epoch"].as_str().map(str::to_string);
                                    if got.epoch.is_none() {
                                        // The room has no sequence yet: resume from its start.
                                        got.epoch = Some(String::new());
                                    }
                                }
                                if resuming && v["recovered"] != true {
                                    got.not_recovered += 1;
                                }
                                if let Some(tx) = self.joined.take() {
                                    let _ = tx.send(());
                                }
                            }
                            Some("message") => {
                                if let Some(o) = v["offset"].as_u64() {
                                    if got.epoch.as_deref() == Some("") {
                                        got.epoch = v["epoch"].as_str().map(str::to_string);
                                    }
                                    got.offsets.push(o);
                                    since_drop += 1;
                                    if self.drop_every > 0 && since_drop >= self.drop_every {
                                        break;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(WsMessage::Close(f))) => {
                        got.closes
                            .push(f.map(|f| u16::from(f.code)).unwrap_or(1005));
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }
    }
}

/// Publishes from `from` until `to` receives one, within `limit`; returns the time it took.
/// Messages carry `{"probe": n, "token": T}` with a token of this call; other frames are skipped.
pub async fn delivery_resumes(
    from: &mut WsClient,
    to: &mut WsClient,
    limit: Duration,
) -> Option<Duration> {
    // A token of this call only: probes of an earlier call still on their way do not count.
    let token = format!("{}", fastrand::u32(..));
    let start = Instant::now();
    let mut i = 0u64;
    while start.elapsed() < limit {
        i += 1;
        from.publish(serde_json::json!({ "probe": i, "token": token }))
            .await;
        let until = Instant::now() + Duration::from_millis(100);
        while let Some(m) = to
            .next_json_within(until.saturating_duration_since(Instant::now()))
            .await
        {
            if m["type"] == "message" && m["data"]["token"] == token.as_str() {
                return Some(start.elapsed());
            }
        }
    }
    None
}
