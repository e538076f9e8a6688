//! The browser side a node serves itself, compiled in from `gateway/assets/`: the live-room page
//! (`GET /` without an upgrade), its script (`/page.js`) and the JavaScript client
//! (`/client.js`, an ES module; `docs/client.md`).
//!
//! This module owns what a response for an asset looks like: content type, caching and security
//! headers, conditional requests. Routing stays in [`crate::http::routes`]; the client's behaviour lives
//! in `assets/client.js`.
//!
//! Caching is short on purpose: [`CACHE_CONTROL`] allows a minute and every asset has a strong `ETag`
//! (a hash of its bytes), so after a deploy browsers pick up the new page within a minute and
//! revalidate with a bodyless 304. The page and the client may briefly come from different
//! versions during a rolling deploy; the client's API is kept backward compatible for that.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::http::response::Body;

/// How long a browser may use an asset without asking again: a minute.
pub const CACHE_CONTROL: &str = "public, max-age=60";

/// The page's Content-Security-Policy: scripts only from this origin (no inline script), inline
/// styles (the page has one `<style>`), WebSockets and fetches to this origin, and nothing may
/// frame it.
const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                        connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                        form-action 'none'; frame-ancestors 'none'";

/// A file served from memory.
pub struct Asset {
    /// `Content-Type` of the response.
    pub content_type: &'static str,
    /// The file, compiled into the binary.
    pub body: &'static [u8],
    /// FNV-1a hash of `body`, the `ETag`; computed at compile time.
    hash: u64,
    /// Whether this is an HTML document (it gets the page's security headers).
    html: bool,
}

impl Asset {
    const fn new(content_type: &'static str, body: &'static [u8], html: bool) -> Self {
        Self {
            content_type,
            body,
            hash: fnv1a(body),
            html,
        }
    }

    /// The strong entity tag, quoted.
    pub fn etag(&self) -> String {
        format!("\"{:016x}\"", self.hash)
    }
}

/// The live-room page, served at `/`.
pub static PAGE: Asset = Asset::new(
    "text/html; charset=utf-8",
    include_bytes!("../../assets/index.html"),
    true,
);

/// The page's script.
pub static PAGE_JS: Asset = Asset::new(
    "text/javascript; charset=utf-8",
    include_bytes!("../../assets/page.js"),
    false,
);

/// The JavaScript client, an ES module.
pub static CLIENT_JS: Asset = Asset::new(
    "text/javascript; charset=utf-8",
    include_bytes!("../../assets/client.js"),
    false,
);

/// The asset served at `path`, other than the page itself (which shares `/` with the lobby's
/// WebSocket and is routed there).
pub fn find(path: &str) -> Option<&'static Asset> {
    match path {
        "/client.js" => Some(&CLIENT_JS),
        "/page.js" => Some(&PAGE_JS),
        _ => None,
    }
}

/// FNV-1a, 64 bits: a content hash for the `ETag`, not a security measure.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// Whether an `If-None-Match` header value matches `etag` (weak comparison, RFC 9110 13.1.2).
fn none_match(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// Answers a `GET` or `HEAD` for `asset`: 200 with the body, or 304 when the client's copy is
/// current. The caller checks the method; hyper leaves out the body of an answer to `HEAD`.
pub fn serve<B>(asset: &Asset, req: &Request<B>) -> Response<Body> {
    debug_assert!(req.method() == Method::GET || req.method() == Method::HEAD);
    let etag = asset.etag();
    let fresh = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| none_match(v, &etag));
    let mut r = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(asset.body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex in quotes is a valid header value"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.html {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_CSP),
        );
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    } else {
        // Public code: other sites may import the client as a module, which needs CORS.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(asset: &Asset, if_none_match: Option<&str>) -> Response<Body> {
        let mut req = Request::get("/").body(()).unwrap();
        if let Some(v) = if_none_match {
            req.headers_mut()
                .insert(header::IF_NONE_MATCH, HeaderValue::from_str(v).unwrap());
        }
        serve(asset, &req)
    }

    #[test]
    fn page_and_client_are_served_with_their_types() {
        let r = get(&PAGE, None);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("script-src 'self';"));
        assert!(std::str::from_utf8(PAGE.body)
            .unwrap()
            .contains("./page.js"));

        let js = find("/client.js").expect("client is routed");
        let r = get(js, None);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(std::str::from_utf8(js.body)
            .unwrap()
            .contains("export class RoomClient"));
        assert!(find("/page.js").is_some());
        assert!(find("/").is_none());
        assert!(find("/package.json").is_none());
    }

    #[test]
    fn etags_differ_per_file_and_revalidate_to_304() {
        assert_ne!(PAGE.etag(), CLIENT_JS.etag());
        assert_eq!(PAGE.etag().len(), 18);
        let tag = CLIENT_JS.etag();
        let r = get(&CLIENT_JS, None);
        assert_eq!(r.headers()[header::ETAG], tag.as_str());
        assert_eq!(r.headers()[header::CACHE_CONTROL], CACHE_CONTROL);

        for matching in [
            tag.clone(),
            format!("W/{tag}"),
            format!("\"x\", {tag}"),
            "*".into(),
        ] {
            let r = get(&CLIENT_JS, Some(&matching));
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED, "{matching}");
            assert_eq!(r.headers()[header::ETAG], tag.as_str());
            assert!(r.headers().get(header::CONTENT_TYPE).is_none());
        }
        let r = get(&CLIENT_JS, Some("\"0000000000000000\""));
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[test]
    fn fnv1a_matches_the_reference() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
