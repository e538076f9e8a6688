//! A tiny HTTP/1.1 client for tests (one request per connection, `Connection: close`), the
//! history API call built on it, and a reader of Prometheus text.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await??;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    s.write_all(body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(buf.len());
    Ok((status, buf[split..].to_vec()))
}

/// `GET /api/rooms/{room}/messages?{query}`; returns status and parsed JSON body.
pub async fn http_history(
    addr: SocketAddr,
    room: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/rooms/{room}/messages?{query}"),
        headers,
        b"",
    )
    .await
    .unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

// ---- Redis topologies (TLS, Sentinel, Cluster): processes with arbitrary arguments ----

/// Finds `series` in Prometheus text: matches a line starting with the metric name whose labels
/// include every `k="v"` of `series`' labels. Sums matching lines.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let (name, want): (&str, Vec<&str>) = match series.split_once('{') {
        Some((n, rest)) => (
            n,
            rest.trim_end_matches('}')
                .split(',')
                .filter(|s| !s.is_empty())
                .collect(),
        ),
        None => (series, Vec::new()),
    };
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (line_name, labels) = match head.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (head, ""),
        };
        if line_name != name {
            continue;
        }
        if want.iter().all(|w| labels.split(',').any(|l| l == *w)) {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}
