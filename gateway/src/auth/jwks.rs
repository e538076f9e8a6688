//! Keys from a JWKS URL: fetched at start and every [`BACKGROUND_REFRESH`], and again when a
//! token names a key id we do not know — at most once per `--jwks-unknown-kid-gap` (default
//! [`UNKNOWN_KID_MIN_GAP`]), so that a
//! flood of tokens with made-up `kid`s cannot turn the node into a load generator against the
//! key server.
//!
//! The URL must be https (unless `--jwks-allow-http`, for tests) and a redirect is an error, not
//! followed: a redirect answer counts as a failed fetch and the previous keys stay.
//!
//! The current set is an `Arc` swapped under a std lock (held for a pointer copy only); a fetch
//! happens outside it, one at a time (a tokio mutex serializes fetches, and whoever waited on it
//! finds the set fresh and does not fetch again).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Key;

/// Interval of the background refresh.
pub const BACKGROUND_REFRESH: Duration = Duration::from_secs(300);
/// Default shortest time between two fetches caused by unknown key ids
/// (`--jwks-unknown-kid-gap`).
pub const UNKNOWN_KID_MIN_GAP: Duration = Duration::from_secs(5);
/// Deadline of one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document accepted.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// Why a fetch failed (logged; tokens then fail with `unknown_key`).
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The request failed.
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The server answered with an error status.
    #[error("status {0}")]
    Status(u16),
    /// The document is too large.
    #[error("document larger than {MAX_DOCUMENT} bytes")]
    TooLarge,
    /// The document is not a JWKS.
    #[error("not a JWKS document: {0}")]
    Json(#[from] serde_json::Error),
}

/// A JWKS URL and its cached keys.
#[derive(Debug)]
pub struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<Arc<[Key]>>,
    /// When the last fetch started (success or not); serializes fetches.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    /// A cache of `url`'s keys, empty until the first fetch.
    pub fn new(url: &str) -> Result<Self, JwksError> {
        // No redirects: a key set is trusted for where it was configured (https, checked by
        // `Config::validate`), and a redirect could lead to a plain-http or attacker's host.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()?;
        Ok(Self {
            url: url.to_string(),
            client,
            keys: RwLock::new(Arc::from(Vec::new())),
            last_fetch: tokio::sync::Mutex::new(None),
        })
    }

    /// The current keys.
    pub fn keys(&self) -> Arc<[Key]> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Fetches again unless a fetch started less than `min_gap` ago; returns whether it fetched.
    pub async fn refresh(&self, min_gap: Duration) -> bool {
        let mut last = self.last_fetch.lock().await;
        if matches!(*last, Some(t) if t.elapsed() < min_gap) {
            return false;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                info!(keys = keys.len(), "jwks fetched");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(keys);
            }
            Err(e) => warn!(cause = %e, "jwks fetch failed; keeping the previous keys"),
        }
        true
    }

    async fn fetch(&self) -> Result<Vec<Key>, JwksError> {
        let mut resp = self.client.get(&self.url).send().await?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(parse(&body)?)
    }

    /// Refreshes every [`BACKGROUND_REFRESH`] (the first fetch at once) until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(BACKGROUND_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => { self.refresh(Duration::ZERO).await; }
            }
        }
    }
}

/// The usable keys of a JWKS document; keys of an unknown type, for encryption, or with an
/// algorithm we do not verify, and symmetric keys are skipped (each alone, so one odd key does not hide the others).
pub fn parse(document: &[u8]) -> Result<Vec<Key>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(document)?;
    Ok(doc
        .keys
        .into_iter()
        .filter_map(|v| {
            let jwk: Jwk = serde_json::from_value(v).ok()?;
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                return None;
            }
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            // A symmetric key in a published document would let anyone sign tokens.
            if key.family() == jsonwebtoken::AlgorithmFamily::Hmac {
                return None;
            }
            let algorithms = match jwk.common.key_algorithm {
                Some(a) => {
                    let a: Algorithm = a.to_string().parse().ok()?;
                    if !key.family().algorithms().contains(&a) {
                        return None;
                    }
                    vec![a]
                }
                None => key.family().algorithms().to_vec(),
            };
            Some(Key {
                kid: jwk.common.key_id.clone(),
                key,
                algorithms,
            })
        })
        .collect())
}
