//! The client's opening handshake (RFC 6455 4.1) on the load tester's [`Stream`]: the upgrade
//! request, the check of the `101` (`Upgrade`, `Connection`, `Sec-WebSocket-Accept`) and, for a
//! refusal, its status and the `error` code of its body. Returns the bytes read past the
//! response (the gateway's `welcome` often arrives with it), which the [`Socket`] reads first.
//!
//! [`Socket`]: super::Socket

use aws_lc_rs::digest;
use base64::Engine;
use hyper::Uri;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{io_error, refusal_code, ConnectError, Stream};

/// Longest response head read; a larger one is not a gateway's.
const MAX_HEAD: usize = 16 * 1024;
/// Longest refusal body read (it carries the `error` code).
const MAX_BODY: usize = 16 * 1024;
/// Headers parsed in a response.
const MAX_HEADERS: usize = 32;
/// RFC 6455 1.3.
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for `key`.
pub fn accept_key(key: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(ACCEPT_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

/// The upgrade request for `uri` with `key`, and `Authorization: Bearer` when given.
pub fn request(uri: &Uri, key: &str, bearer: Option<&str>) -> Result<String, ConnectError> {
    let host = uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ConnectError::new("bad_url", format!("{uri}: no host")))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    if let Some(t) = bearer {
        if t.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(ConnectError::new(
                "bad_token",
                "token is not a header value",
            ));
        }
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    Ok(req)
}

/// What a response head says.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Not complete yet.
    Partial,
    /// `101` with the right headers; the head's length.
    Upgraded(usize),
    /// Another status: its code, the head's length and the body's announced length.
    Refused {
        /// The HTTP status.
        status: u16,
        /// Bytes of the head.
        len: usize,
        /// `Content-Length`, when given.
        body: Option<usize>,
    },
}

/// Reads a response head out of `buf`, checking a `101` against `key`.
pub fn parse_head(buf: &[u8], key: &str) -> Result<Head, ConnectError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Head::Partial),
        Err(e) => return Err(ConnectError::new("handshake", format!("bad response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if status != 101 {
        let body = header("content-length").and_then(|v| v.parse().ok());
        return Ok(Head::Refused { status, len, body });
    }
    let bad = |what: &str| {
        Err(ConnectError::new(
            "handshake",
            format!("101 without {what}"),
        ))
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return bad("Upgrade: websocket");
    }
    if !header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return bad("Connection: upgrade");
    }
    if header("sec-websocket-accept").as_deref() != Some(accept_key(key).as_str()) {
        return bad("the right Sec-WebSocket-Accept");
    }
    Ok(Head::Upgraded(len))
}

/// Upgrades `stream` for `uri`: returns the bytes read past the `101`.
pub async fn upgrade(
    stream: &mut Stream,
    uri: &Uri,
    bearer: Option<&str>,
) -> Result<Vec<u8>, ConnectError> {
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_ne_bytes());
    let req = request(uri, &key, bearer)?;
    stream.write_all(req.as_bytes()).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_head(&buf, &key)? {
            Head::Partial if buf.len() >= MAX_HEAD => {
                return Err(ConnectError::new("handshake", "response head too large"))
            }
            Head::Partial => read_more(stream, &mut buf).await?,
            Head::Upgraded(len) => return Ok(buf.split_off(len)),
            Head::Refused { status, len, body } => {
                let want = len + body.unwrap_or(0).min(MAX_BODY);
                while buf.len() < want {
                    if read_more(stream, &mut buf).await.is_err() {
                        break;
                    }
                }
                let body = buf.get(len..want.min(buf.len()));
                let cause = match refusal_code(body) {
                    Some(code) => format!("http_{status}_{code}"),
                    None => format!("http_{status}"),
                };
                return Err(ConnectError {
                    cause,
                    status: Some(status),
                    detail: format!("upgrade refused with HTTP {status}"),
                });
            }
        }
    }
}

async fn read_more(stream: &mut Stream, buf: &mut Vec<u8>) -> Result<(), ConnectError> {
    buf.reserve(1024);
    match stream.read_buf(buf).await {
        Ok(0) => Err(ConnectError::new("eof", "closed during the handshake")),
        Ok(_) => Ok(()),
        Err(e) => Err(io_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rfc_example_key() {
        // RFC 6455 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn requests_name_the_host_path_and_token() {
        let uri: Uri = "ws://127.0.0.1:8080/ws/r1?role=viewer&name=v1"
            .parse()
            .unwrap();
        let r = request(&uri, "k", Some("a.b.c")).unwrap();
        assert!(
            r.starts_with("GET /ws/r1?role=viewer&name=v1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
        );
        assert!(r.contains("Sec-WebSocket-Key: k\r\n"));
        assert!(r.contains("Authorization: Bearer a.b.c\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
        assert_eq!(
            request(&uri, "k", Some("a\nb")).unwrap_err().cause,
            "bad_token"
        );
    }

    #[test]
    fn heads_are_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut bytes = ok.as_bytes().to_vec();
        bytes.extend_from_slice(b"\x81\x02hi");
        assert_eq!(parse_head(&bytes, key).unwrap(), Head::Upgraded(ok.len()));
        for cut in 0..ok.len() {
            assert_eq!(
                parse_head(&bytes[..cut], key).unwrap(),
                Head::Partial,
                "{cut}"
            );
        }
        let wrong = ok.replace("s3pP", "xxxx");
        assert_eq!(
            parse_head(wrong.as_bytes(), key).unwrap_err().cause,
            "handshake"
        );
        let no_upgrade = ok.replace("Upgrade: websocket\r\n", "");
        assert!(parse_head(no_upgrade.as_bytes(), key).is_err());
        let refused = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 20\r\n\r\n";
        assert_eq!(
            parse_head(refused.as_bytes(), key).unwrap(),
            Head::Refused {
                status: 503,
                len: refused.len(),
                body: Some(20)
            }
        );
        assert!(parse_head(b"nonsense\r\n\r\n", key).is_err());
    }
}
