//! Accept loops: one per listener, each connection served by hyper's HTTP/1 with upgrades, every
//! task tracked.
//!
//! Every connection has deadlines, also after its first request: its first request's headers
//! within `--http-header-timeout` of accept, and each later request's headers within
//! `--http-keepalive-timeout` of the previous response (so an idle keep-alive connection is
//! closed too); request bodies have theirs where they are read ([`crate::http::request`]).
//!
//! A listener stops accepting when its token is cancelled (the client port at the start of the
//! drain, the admin port at the very end); open keep-alive connections are then shut down
//! gracefully. Upgraded WebSockets are not hyper's any more: the node drains those itself.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::http::response::Body;
use crate::metrics::{HttpTimeout, Metrics};

/// The deadlines of every connection (`--http-header-timeout`, `--http-keepalive-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From accept to the first request's complete headers.
    pub header: Duration,
    /// From a response to the next request's complete headers (idle and header read together).
    pub keepalive: Duration,
}

/// [`ConnState`] while a request is being handled.
const BUSY: u64 = u64::MAX;

/// Where a connection is between requests, shared by the service (which hyper calls once a
/// request's headers are parsed) and the connection's deadline. One word per connection: our own
/// deadline rather than hyper's `header_read_timeout`, whose timer's waker kept the finished
/// connection task (~1 KiB) alive for the whole life of an upgraded WebSocket (measured with
/// massif; docs/benchmarks.md).
///
/// 0: no request yet; [`BUSY`]: a request is being handled; otherwise the connection has been
/// waiting for its next request since this many milliseconds after accept (at least 1).
struct ConnState(AtomicU64);

impl ConnState {
    /// The deadline of the current state, the phase it closes, and the state it was computed for.
    fn deadline(&self, start: Instant, t: Timeouts) -> (Instant, Option<HttpTimeout>, u64) {
        match self.0.load(Ordering::Acquire) {
            0 => (start + t.header, Some(HttpTimeout::Header), 0),
            // Handlers bound their own waits (body reads, broker timeouts): look again later.
            BUSY => (Instant::now() + t.keepalive, None, BUSY),
            ms => (
                start + Duration::from_millis(ms) + t.keepalive,
                Some(HttpTimeout::KeepAlive),
                ms,
            ),
        }
    }

    /// Waits until the connection misses a deadline and returns which.
    async fn expired(&self, start: Instant, t: Timeouts) -> HttpTimeout {
        loop {
            let (deadline, phase, seen) = self.deadline(start, t);
            tokio::time::sleep_until(deadline).await;
            if let Some(phase) = phase {
                if self.0.load(Ordering::Acquire) == seen {
                    return phase;
                }
            }
        }
    }
}

/// Accepts on `listener` until `stop`, serving each connection with `handler` on `tracker`; a
/// connection that misses a deadline of `timeouts` is closed and counted in `metrics`.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    timeouts: Timeouts,
    metrics: Metrics,
    stop: CancellationToken,
    tracker: TaskTracker,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: back off briefly
                // instead of spinning.
                warn!(cause = %e, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        tracker.spawn(async move {
            let start = Instant::now();
            let state = Arc::new(ConnState(AtomicU64::new(0)));
            let service = {
                let state = state.clone();
                service_fn(move |req| {
                    state.0.store(BUSY, Ordering::Release);
                    let state = state.clone();
                    let answer = handler(req);
                    async move {
                        let r = answer.await;
                        // The response is written after this; a client that does not read it
                        // is closed by the keep-alive deadline like an idle one.
                        let ms = start.elapsed().as_millis().clamp(1, u128::from(BUSY - 1));
                        state.0.store(ms as u64, Ordering::Release);
                        r
                    }
                })
            };
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                phase = state.expired(start, timeouts) => {
                    metrics.http_timeout(phase);
                    debug!(phase = phase.label(), "http deadline missed; connection closed");
                    return;
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(cause = %e, "http connection ended with an error");
            }
        });
    }
}
