//! Accept loops: one per listener, each connection served by hyper's HTTP/1 with upgrades, every
//! task tracked.
//!
//! A listener stops accepting when its token is cancelled (the client port at the start of the
//! drain, the admin port at the very end); open keep-alive connections are then shut down
//! gracefully. Upgraded WebSockets are not hyper's any more: the node drains those itself.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::http::response::Body;

/// Accepts on `listener` until `stop`, serving each connection with `handler` on `tracker`. A
/// connection that has not sent its first request's headers within `header_read_timeout`
/// (`--header-read-timeout`, a slow-loris guard) is closed.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    stop: CancellationToken,
    tracker: TaskTracker,
    header_read_timeout: Duration,
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
        tracker.spawn(async move {
            // Set once hyper has parsed a request's headers (it calls the service only then).
            let started = Arc::new(AtomicBool::new(false));
            let service = {
                let started = started.clone();
                service_fn(move |req| {
                    started.store(true, Ordering::Relaxed);
                    handler(req)
                })
            };
            let conn = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            // Our own first-request deadline rather than hyper's `header_read_timeout`: hyper's
            // timer keeps the finished connection task's memory alive for the whole life of an
            // upgraded WebSocket (about 1 KiB per connection, measured with massif).
            let first_request = async {
                tokio::time::sleep(header_read_timeout).await;
                if started.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = first_request => {
                    debug!("no request headers within the deadline; connection closed");
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
