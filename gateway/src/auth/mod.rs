//! Authentication: the configured keys, and the check that turns a token into an [`Identity`]
//! (or a refusal with its reason).
//!
//! The algorithm is fixed by the key, never taken from the token: every key carries the list of
//! algorithms it verifies (an HMAC secret HS256/384/512, an RSA key RS*/PS*, an EC key ES256/384,
//! an Ed25519 key EdDSA, a JWKS key its `alg` when it names one), and a token whose header names
//! another algorithm is refused before any signature check — so `alg: none`, or an HS256 token
//! signed with an RSA public key as the secret, never reaches a verifier. A `kid` in the header
//! picks the keys with that id; without one every key of the right family is tried (so HMAC
//! secrets rotate by overlap). Signatures, times, audience and issuer are checked by the crate
//! `jsonwebtoken`; the claim shape by [`claims`].
//!
//! What it does not own: where the token comes from and what a refusal looks like on the wire
//! ([`crate::http::routes`]), bans ([`crate::node::moderation`]), the expiry of open sessions
//! ([`crate::node::expiry`]).

pub mod claims;
pub mod jwks;
pub mod patterns;

use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::{split_kid, AuthMode, Config};
pub use claims::{Identity, Right};
use jwks::Jwks;
pub use patterns::{valid_pattern, RoomPatterns};

/// Longest token accepted, in bytes: far above any real token, small enough that a hostile one
/// costs nothing to refuse.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A verification key and the algorithms it verifies.
#[derive(Clone)]
pub struct Key {
    /// Its key id, if it has one.
    pub kid: Option<String>,
    /// The key.
    pub key: DecodingKey,
    /// The only algorithms a token verified by this key may name.
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// Why a client was not admitted (or a refresh refused). Each variant is one `reason` label of
/// `gateway_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is required.
    #[error("token missing")]
    Missing,
    /// Not a JWT: wrong number of parts, bad base64 or header, too long.
    #[error("token invalid")]
    Malformed,
    /// The signature does not verify with any candidate key.
    #[error("token invalid")]
    Signature,
    /// `exp` is past.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` missing or not the configured audience.
    #[error("token invalid")]
    Audience,
    /// `iss` missing or not the configured issuer.
    #[error("token invalid")]
    Issuer,
    /// The `kid` names no key we know (after a JWKS refresh when one is configured).
    #[error("token invalid")]
    UnknownKey,
    /// The header's `alg` is none, unknown, or not one the candidate keys verify.
    #[error("token invalid")]
    Algorithm,
    /// The payload does not follow the claim shape.
    #[error("token invalid")]
    Claims,
    /// A valid token that grants nothing in this room.
    #[error("room not granted")]
    RoomNotGranted,
    /// A valid token that grants another role in this room.
    #[error("role not granted")]
    RoleNotGranted,
    /// The user is banned from this room.
    #[error("banned")]
    Banned,
}

impl AuthError {
    /// Every reason, for registering one metric series each.
    pub const ALL: [AuthError; 13] = [
        Self::Missing,
        Self::Malformed,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Audience,
        Self::Issuer,
        Self::UnknownKey,
        Self::Algorithm,
        Self::Claims,
        Self::RoomNotGranted,
        Self::RoleNotGranted,
        Self::Banned,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Issuer => "issuer",
            Self::UnknownKey => "unknown_key",
            Self::Algorithm => "algorithm",
            Self::Claims => "claims",
            Self::RoomNotGranted => "room_not_granted",
            Self::RoleNotGranted => "role_not_granted",
            Self::Banned => "banned",
        }
    }

    /// Whether the refusal is 403 (a valid token without the right) rather than 401.
    pub fn is_forbidden(self) -> bool {
        matches!(
            self,
            Self::RoomNotGranted | Self::RoleNotGranted | Self::Banned
        )
    }
}

fn map_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthError::Signature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::Algorithm,
        ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::InvalidSubject
        | ErrorKind::Json(_) => AuthError::Claims,
        _ => AuthError::Malformed,
    }
}

/// Why the configured keys are unusable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A PEM file could not be read.
    #[error("cannot read public key {path}: {cause}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
    /// A PEM file holds no RSA, EC or Ed25519 public key.
    #[error("{0} is not an RSA, EC (P-256/P-384) or Ed25519 public key in PEM")]
    Pem(String),
    /// The JWKS client could not be built.
    #[error("jwks: {0}")]
    Jwks(#[from] jwks::JwksError),
}

/// Checks tokens against the configured keys.
#[derive(Debug)]
pub struct Verifier {
    /// HMAC secrets and PEM keys, in configuration order.
    keys: Vec<Key>,
    /// The JWKS cache, when `--jwks-url` is set.
    jwks: Option<Arc<Jwks>>,
    /// Shortest time between two JWKS fetches caused by unknown key ids
    /// (`--jwks-unknown-kid-gap`, default [`jwks::UNKNOWN_KID_MIN_GAP`]).
    unknown_kid_gap: std::time::Duration,
    /// One validation per algorithm (only `algorithms` differs), built once.
    validations: Vec<(Algorithm, Validation)>,
    /// `--allow-anonymous-viewers`: the rooms clients without a token may join as viewers
    /// (and read the history of); `None` when every room needs a token.
    pub anonymous_rooms: Option<RoomPatterns>,
}

/// Every algorithm a key may verify.
const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The part of a JWT header we read before choosing keys.
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

impl Verifier {
    /// The verifier of `config`, or `None` with `--auth none`.
    pub fn from_config(config: &Config) -> Result<Option<Self>, KeyError> {
        if config.auth == AuthMode::None {
            return Ok(None);
        }
        let mut keys = Vec::new();
        for (kid, secret) in config.jwt_hmac_secrets() {
            keys.push(Key {
                kid: kid.map(str::to_string),
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithms: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            });
        }
        for entry in config.jwt_public_keys.iter().map(|e| e.trim()) {
            if entry.is_empty() {
                continue;
            }
            let (kid, path) = split_kid(entry);
            let pem = std::fs::read(path).map_err(|cause| KeyError::Read {
                path: path.to_string(),
                cause,
            })?;
            keys.push(Key {
                kid: kid.map(str::to_string),
                ..pem_key(&pem).ok_or_else(|| KeyError::Pem(path.to_string()))?
            });
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Arc::new(Jwks::new(url)?)),
            None => None,
        };
        let validations = ALGORITHMS
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                // `exp` is the deadline the session's expiry timer enforces too: no leeway, so
                // a token is valid on the socket exactly as long as at the door.
                v.leeway = 0;
                v.validate_nbf = true;
                let mut required = vec!["exp", "sub"];
                match &config.jwt_audience {
                    Some(aud) => {
                        v.set_audience(&[aud]);
                        required.push("aud");
                    }
                    None => v.validate_aud = false,
                }
                if let Some(iss) = &config.jwt_issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                v.set_required_spec_claims(&required);
                (*alg, v)
            })
            .collect();
        Ok(Some(Self {
            keys,
            jwks,
            unknown_kid_gap: config.jwks_unknown_kid_gap,
            validations,
            anonymous_rooms: config.anonymous_rooms(),
        }))
    }

    /// Whether a client without a token may join `room` as a viewer.
    pub fn anonymous_may_view(&self, room: &crate::wire::protocol::RoomName) -> bool {
        self.anonymous_rooms
            .as_ref()
            .is_some_and(|p| p.covers(room))
    }

    /// The JWKS cache, for its background refresh task.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwks.as_ref()
    }

    /// Keys matching `kid` (or every key without one).
    fn candidates(&self, kid: Option<&str>) -> Vec<Key> {
        let jwks = self.jwks.as_ref().map(|j| j.keys());
        let all = self.keys.iter().chain(jwks.iter().flat_map(|k| k.iter()));
        match kid {
            Some(kid) => all
                .filter(|k| k.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None => all.cloned().collect(),
        }
    }

    /// Verifies `token` and returns who it names and what it grants.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        let header = read_header(token)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthError::Algorithm)?;
        let mut keys = self.candidates(header.kid.as_deref());
        if keys.is_empty() {
            if let Some(jwks) = &self.jwks {
                jwks.refresh(self.unknown_kid_gap).await;
                keys = self.candidates(header.kid.as_deref());
            }
        }
        if keys.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        keys.retain(|k| k.algorithms.contains(&alg));
        if keys.is_empty() {
            return Err(AuthError::Algorithm);
        }
        let validation = &self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .expect("every algorithm has a validation")
            .1;
        let mut last = AuthError::Signature;
        for key in &keys {
            match jsonwebtoken::decode::<serde_json::Value>(token, &key.key, validation) {
                Ok(data) => {
                    let claims: claims::Claims =
                        serde_json::from_value(data.claims).map_err(|_| AuthError::Claims)?;
                    return claims.into_identity().map_err(|_| AuthError::Claims);
                }
                Err(e) => {
                    last = map_error(e.kind());
                    if last != AuthError::Signature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// A PEM public key of any supported type, with its algorithms.
fn pem_key(pem: &[u8]) -> Option<Key> {
    let key = |key: DecodingKey, algorithms: &[Algorithm]| Key {
        kid: None,
        key,
        algorithms: algorithms.to_vec(),
    };
    let text = std::str::from_utf8(pem).ok()?;
    // `from_*_pem` only check the PEM envelope's label, so the label decides the type; an
    // SPKI "PUBLIC KEY" can be any of the three, told apart by its algorithm OID.
    if text.contains("BEGIN RSA PUBLIC KEY") {
        return DecodingKey::from_rsa_pem(pem)
            .ok()
            .map(|k| key(k, jsonwebtoken::AlgorithmFamily::Rsa.algorithms()));
    }
    let der = pem_body(text)?;
    // OIDs: rsaEncryption 1.2.840.113549.1.1.1, id-ecPublicKey 1.2.840.10045.2.1, Ed25519 1.3.101.112;
    // curves secp256r1 1.2.840.10045.3.1.7, secp384r1 1.3.132.0.34.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    if has(RSA) {
        DecodingKey::from_rsa_pem(pem)
            .ok()
            .map(|k| key(k, jsonwebtoken::AlgorithmFamily::Rsa.algorithms()))
    } else if has(EC) && has(P256) {
        DecodingKey::from_ec_pem(pem)
            .ok()
            .map(|k| key(k, &[Algorithm::ES256]))
    } else if has(EC) && has(P384) {
        DecodingKey::from_ec_pem(pem)
            .ok()
            .map(|k| key(k, &[Algorithm::ES384]))
    } else if has(ED25519) {
        DecodingKey::from_ed_pem(pem)
            .ok()
            .map(|k| key(k, &[Algorithm::EdDSA]))
    } else {
        None
    }
}

/// The DER bytes of the first `PUBLIC KEY` block of a PEM text.
fn pem_body(text: &str) -> Option<Vec<u8>> {
    let start = text.find("-----BEGIN PUBLIC KEY-----")? + "-----BEGIN PUBLIC KEY-----".len();
    let end = start + text[start..].find("-----END PUBLIC KEY-----")?;
    let b64: String = text[start..end].split_whitespace().collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

/// Reads the header of a compact JWT without trusting anything in it.
fn read_header(token: &str) -> Result<RawHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef-test-secret";

    fn verifier(args: &[&str]) -> Verifier {
        let mut all = vec!["gateway", "--auth", "jwt", "--api-key", "backend-key-1"];
        all.extend_from_slice(args);
        let c = Config::parse_from(all);
        c.validate().unwrap();
        Verifier::from_config(&c).unwrap().unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(exp: u64) -> serde_json::Value {
        serde_json::json!({"sub": "u1", "exp": exp, "rooms": [{"room": "r", "role": "host"}]})
    }

    fn hs256(claims: &serde_json::Value, secret: &str, kid: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = kid.map(str::to_string);
        encode(&h, claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    #[tokio::test]
    async fn hmac_tokens() {
        let v = verifier(&["--jwt-hmac-secret", SECRET]);
        let ok = hs256(&claims(now() + 60), SECRET, None);
        let id = v.verify(&ok).await.unwrap();
        assert_eq!(&*id.sub, "u1");
        assert_eq!(
            v.verify(&hs256(&claims(now() + 60), "another-secret-0123456", None))
                .await
                .unwrap_err(),
            AuthError::Signature
        );
        assert_eq!(
            v.verify(&hs256(&claims(now() - 1), SECRET, None))
                .await
                .unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&hs256(&claims(now() + 60), SECRET, Some("nope")))
                .await
                .unwrap_err(),
            AuthError::UnknownKey
        );
        let bad_shape = serde_json::json!({"sub": "u1", "exp": now() + 60});
        assert_eq!(
            v.verify(&hs256(&bad_shape, SECRET, None))
                .await
                .unwrap_err(),
            AuthError::Claims
        );
        assert_eq!(v.verify("a.b").await.unwrap_err(), AuthError::Malformed);
        assert_eq!(v.verify("").await.unwrap_err(), AuthError::Missing);
        let huge = format!("{}.{}.x", "a".repeat(MAX_TOKEN_LEN), "b");
        assert_eq!(v.verify(&huge).await.unwrap_err(), AuthError::Malformed);
        // alg: none, unsigned.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims(now() + 60).to_string())
        );
        assert_eq!(v.verify(&none).await.unwrap_err(), AuthError::Algorithm);
    }

    #[tokio::test]
    async fn kid_picks_the_secret_and_rotation_overlaps() {
        let v = verifier(&[
            "--jwt-hmac-secret",
            "old=old-secret-0123456789,new=new-secret-0123456789",
        ]);
        let c = claims(now() + 60);
        assert!(v
            .verify(&hs256(&c, "old-secret-0123456789", Some("old")))
            .await
            .is_ok());
        assert!(v
            .verify(&hs256(&c, "new-secret-0123456789", Some("new")))
            .await
            .is_ok());
        assert!(v
            .verify(&hs256(&c, "new-secret-0123456789", None))
            .await
            .is_ok());
        assert_eq!(
            v.verify(&hs256(&c, "new-secret-0123456789", Some("old")))
                .await
                .unwrap_err(),
            AuthError::Signature
        );
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn signed(alg: Algorithm, key: &EncodingKey) -> String {
        encode(&Header::new(alg), &claims(now() + 60), key).unwrap()
    }

    #[tokio::test]
    async fn pem_keys_fix_the_algorithm() {
        let keys = format!(
            "{},{},{}",
            fixture("rsa1.pub"),
            fixture("ec256.pub"),
            fixture("ed25519.pub")
        );
        let v = verifier(&["--jwt-public-key", &keys]);
        let pem = |f: &str| std::fs::read(fixture(f)).unwrap();
        let rsa = EncodingKey::from_rsa_pem(&pem("rsa1.key")).unwrap();
        let ec = EncodingKey::from_ec_pem(&pem("ec256.key")).unwrap();
        let ed = EncodingKey::from_ed_pem(&pem("ed25519.key")).unwrap();
        for (alg, key) in [
            (Algorithm::RS256, &rsa),
            (Algorithm::RS512, &rsa),
            (Algorithm::PS256, &rsa),
            (Algorithm::ES256, &ec),
            (Algorithm::EdDSA, &ed),
        ] {
            assert!(v.verify(&signed(alg, key)).await.is_ok(), "{alg:?}");
        }
        // Algorithm confusion: HS256 with the RSA public key's PEM as the HMAC secret. No HMAC
        // key is configured, so no key verifies HS256 at all.
        let confused = EncodingKey::from_secret(&pem("rsa1.pub"));
        assert_eq!(
            v.verify(&signed(Algorithm::HS256, &confused))
                .await
                .unwrap_err(),
            AuthError::Algorithm
        );
        // The right family, another key: a signature failure.
        let other = EncodingKey::from_rsa_pem(&pem("rsa2.key")).unwrap();
        assert_eq!(
            v.verify(&signed(Algorithm::RS256, &other))
                .await
                .unwrap_err(),
            AuthError::Signature
        );
        // A file that is no key is refused at start.
        let c = Config::parse_from([
            "gateway",
            "--auth",
            "jwt",
            "--jwt-public-key",
            &fixture("README.md"),
        ]);
        assert!(matches!(Verifier::from_config(&c), Err(KeyError::Pem(_))));
    }

    #[tokio::test]
    async fn audience_and_issuer() {
        let v = verifier(&[
            "--jwt-hmac-secret",
            SECRET,
            "--jwt-audience",
            "live",
            "--jwt-issuer",
            "backend",
        ]);
        let mut c = claims(now() + 60);
        c["iss"] = "backend".into();
        assert_eq!(
            v.verify(&hs256(&c, SECRET, None)).await.unwrap_err(),
            AuthError::Audience,
            "aud required when configured"
        );
        c["aud"] = "live".into();
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            v.verify(&hs256(&c, SECRET, None)).await.unwrap_err(),
            AuthError::Issuer,
            "iss required when configured"
        );
        c["aud"] = "live".into();
        c["iss"] = "backend".into();
        assert!(v.verify(&hs256(&c, SECRET, None)).await.is_ok());
        c["aud"] = "other".into();
        assert_eq!(
            v.verify(&hs256(&c, SECRET, None)).await.unwrap_err(),
            AuthError::Audience
        );
        c["aud"] = "live".into();
        c["iss"] = "evil".into();
        assert_eq!(
            v.verify(&hs256(&c, SECRET, None)).await.unwrap_err(),
            AuthError::Issuer
        );
        c["iss"] = "backend".into();
        c["nbf"] = (now() + 3600).into();
        assert_eq!(
            v.verify(&hs256(&c, SECRET, None)).await.unwrap_err(),
            AuthError::NotYetValid
        );
    }
}
