//! What the client port reads off a request besides its path: query parameters (decoded,
//! strictly) and the API key. Below the routes that use it ([`crate::http::routes`] and
//! [`crate::http::moderation`]), so that neither imports the other.

use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::config::Config;
use crate::http::response::Refusal;

/// Decodes one component of a query string (`+` is a space, `%XX` an escaped byte); see
/// [`decode_escapes`].
pub fn decode_component(s: &str) -> Option<String> {
    decode_escapes(&s.replace('+', " "))
}

/// Decodes the `%XX` escapes of a path segment or query component. A `%` that is not followed by
/// two hex digits, or escapes that do not decode to UTF-8, are refused (None) rather than passed
/// through as the lenient URL parsers do: a name must mean one thing.
pub fn decode_escapes(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let escapes_ok = s.match_indices('%').all(|(i, _)| {
        b.get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The query parameters of a request, decoded; a malformed escape is a 400.
pub fn query_params(req: &Request<Incoming>) -> Result<Vec<(String, String)>, Refusal> {
    let Some(q) = req.uri().query() else {
        return Ok(Vec::new());
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match (decode_component(k), decode_component(v)) {
                (Some(k), Some(v)) => Ok((k, v)),
                _ => Err(Refusal::bad_request("malformed query string")),
            }
        })
        .collect()
}

/// One decoded query parameter of a request.
pub fn query_param(req: &Request<Incoming>, key: &str) -> Result<Option<String>, Refusal> {
    Ok(param(&query_params(req)?, key).map(str::to_string))
}

/// The first value of query parameter `key`, if given.
pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Larger than the route's limit.
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    /// Not complete within `--http-body-timeout` (a stalled or trickled body).
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    /// The connection failed while reading.
    #[error("could not read the body: {0}")]
    Read(String),
}

impl BodyError {
    /// The answer to the client: 413, 408 or 400.
    pub fn refusal(&self) -> Refusal {
        let (status, code) = match self {
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            Self::Read(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        };
        Refusal::new(status, code, self.to_string())
    }
}

/// Reads a request body of at most `limit` bytes within `timeout` (the whole body, so that a
/// body trickled a byte at a time cannot hold a connection and its buffer open).
pub async fn read_body(
    body: Incoming,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(BodyError::Timeout(timeout)),
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Ok(Err(e)) => Err(BodyError::Read(e.to_string())),
    }
}

/// Compares two byte strings in time independent of where they differ (crate `subtle`; only
/// the length may leak, and a key's length is not a secret worth the padding).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Checks `Authorization: Bearer KEY` against every `--api-key` (each compared in constant
/// time, all of them compared, so the time does not tell which key matched). No key configured
/// means the API is open.
pub fn check_api_key(config: &Config, req: &Request<Incoming>) -> Result<(), Refusal> {
    if !config.api_key_required() || matching_api_key(config, req).is_some() {
        Ok(())
    } else {
        Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send Authorization: Bearer KEY",
        ))
    }
}

/// For the APIs that exist only with a key (moderation, rooms): refused with 403 on a node
/// without `--api-key` (fail closed: never open by default), 401 without the right key.
pub fn require_api_key(config: &Config, req: &Request<Incoming>, api: &str) -> Result<(), Refusal> {
    if !config.api_key_required() {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the {api} API needs --api-key on the node"),
        ));
    }
    check_api_key(config, req)
}

/// The configured `--api-key` that `Authorization: Bearer KEY` names, if any. Every key is
/// compared, each in constant time, so the time does not tell which one matched (or whether any).
pub fn matching_api_key<'a>(config: &'a Config, req: &Request<Incoming>) -> Option<&'a str> {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    config.api_keys().fold(None, |found, key| {
        let same = constant_time_eq(given.as_bytes(), key.as_bytes());
        found.or(same.then_some(key))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(decode_component("Alice%20B").as_deref(), Some("Alice B"));
        assert_eq!(decode_component("a+b").as_deref(), Some("a b"));
        assert_eq!(decode_component("Zo%C3%AB").as_deref(), Some("Zoë"));
        assert_eq!(decode_component("%zz"), None);
        assert_eq!(decode_component("%4"), None);
        assert_eq!(decode_component("%ff"), None, "not UTF-8");
        assert_eq!(
            decode_component("a%2Bb").as_deref(),
            Some("a+b"),
            "an escaped plus stays a plus"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret-key", b"secret-key"));
        assert!(!constant_time_eq(b"secret-key", b"secret-kez"));
        assert!(!constant_time_eq(b"secret", b"secret-key"));
    }
}
