//! Tokens for gateways that run `--auth jwt` (docs/protocol.md, authentication): minted per
//! member from an HMAC secret or a private key, with the claims the contract names (`sub`,
//! `name`, `exp`, optional `aud`/`iss`, and one `rooms` grant for the member's room), or read
//! from a file of ready tokens used round robin.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::spec::Role;

/// A grant of the `rooms` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The exact room name (the load tester never needs patterns).
    pub room: String,
    /// `host` or `viewer`.
    pub role: String,
    /// Present (true) only for viewers that chat; hosts publish by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<bool>,
}

/// The claims of a minted token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The member's user id.
    pub sub: String,
    /// The member's display name.
    pub name: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at.
    pub iat: u64,
    /// `--jwt-audience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    /// `--jwt-issuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// One grant: the member's room with its role.
    pub rooms: Vec<Grant>,
}

/// Who a token is for.
#[derive(Debug, Clone, Copy)]
pub struct Persona<'a> {
    /// User id (`sub`).
    pub sub: &'a str,
    /// Display name.
    pub name: &'a str,
    /// The room the member joins.
    pub room: &'a str,
    /// Host or viewer.
    pub role: Role,
    /// Whether a viewer chats (then its grant carries `"publish":true`).
    pub publishes: bool,
}

/// Mints tokens with one key.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    ttl: Duration,
    audience: Option<String>,
    issuer: Option<String>,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("alg", &self.header.alg)
            .field("kid", &self.header.kid)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// HS256 with a shared secret.
    pub fn hmac(secret: &[u8], kid: Option<String>) -> Self {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid;
        Self::new(EncodingKey::from_secret(secret), header)
    }

    /// RS256, ES256 or EdDSA, by the type of the PEM private key.
    pub fn private_key(pem: &[u8], kid: Option<String>) -> Result<Self, String> {
        let (key, alg) = if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
            (k, Algorithm::RS256)
        } else if let Ok(k) = EncodingKey::from_ec_pem(pem) {
            (k, Algorithm::ES256)
        } else if let Ok(k) = EncodingKey::from_ed_pem(pem) {
            (k, Algorithm::EdDSA)
        } else {
            return Err(
                "--jwt-private-key: not an RSA, EC P-256 or Ed25519 private key in PEM".into(),
            );
        };
        let mut header = Header::new(alg);
        header.kid = kid;
        Ok(Self::new(key, header))
    }

    fn new(key: EncodingKey, header: Header) -> Self {
        Self {
            key,
            header,
            ttl: Duration::from_secs(3600),
            audience: None,
            issuer: None,
        }
    }

    /// Sets lifetime, audience and issuer.
    pub fn with(mut self, ttl: Duration, audience: Option<String>, issuer: Option<String>) -> Self {
        self.ttl = ttl;
        self.audience = audience;
        self.issuer = issuer;
        self
    }

    /// The algorithm in use.
    pub fn algorithm(&self) -> Algorithm {
        self.header.alg
    }

    /// The claims for `p`, issued now.
    pub fn claims(&self, p: &Persona<'_>) -> Claims {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let grant = match p.role {
            Role::Host => Grant {
                room: p.room.to_string(),
                role: "host".into(),
                publish: None,
            },
            Role::Viewer => Grant {
                room: p.room.to_string(),
                role: "viewer".into(),
                publish: p.publishes.then_some(true),
            },
        };
        Claims {
            sub: p.sub.to_string(),
            name: p.name.to_string(),
            exp: now + self.ttl.as_secs().max(1),
            iat: now,
            aud: self.audience.clone(),
            iss: self.issuer.clone(),
            rooms: vec![grant],
        }
    }

    /// A signed token for `p`.
    pub fn mint(&self, p: &Persona<'_>) -> Result<String, String> {
        jsonwebtoken::encode(&self.header, &self.claims(p), &self.key)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }
}

/// Where members' tokens come from.
#[derive(Debug, Default)]
pub enum Tokens {
    /// No token (`--auth none` gateways).
    #[default]
    None,
    /// Minted per connection attempt.
    Mint(Box<Minter>),
    /// Read from `--token-file`, used round robin by member.
    File(Vec<String>),
}

impl Tokens {
    /// Reads a token file: one token per line; blank lines and `#` comments skipped.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--token-file {}: {e}", path.display()))?;
        let tokens: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        if tokens.is_empty() {
            return Err(format!("--token-file {}: no token in it", path.display()));
        }
        Ok(Tokens::File(tokens))
    }

    /// The token of member number `n` (its publisher id) for persona `p`; `None` without tokens.
    pub fn for_member(&self, n: usize, p: &Persona<'_>) -> Result<Option<String>, String> {
        match self {
            Tokens::None => Ok(None),
            Tokens::Mint(m) => m.mint(p).map(Some),
            Tokens::File(list) => Ok(Some(list[n % list.len()].clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn persona(role: Role, publishes: bool) -> Persona<'static> {
        Persona {
            sub: "lt-v7",
            name: "v7",
            room: "lt-g0-3",
            role,
            publishes,
        }
    }

    fn decode(token: &str, key: &DecodingKey, alg: Algorithm, aud: Option<&str>) -> Claims {
        let mut v = Validation::new(alg);
        match aud {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&["exp", "sub"]);
        jsonwebtoken::decode::<Claims>(token, key, &v)
            .expect("the minted token verifies")
            .claims
    }

    #[test]
    fn hmac_tokens_carry_the_contract_claims() {
        let m = Minter::hmac(b"s3cret", Some("k1".into())).with(
            Duration::from_secs(600),
            Some("live".into()),
            Some("backend".into()),
        );
        let t = m.mint(&persona(Role::Viewer, true)).unwrap();
        let header = jsonwebtoken::decode_header(&t).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let c = decode(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            Algorithm::HS256,
            Some("live"),
        );
        assert_eq!(c.sub, "lt-v7");
        assert_eq!(c.name, "v7");
        assert_eq!(c.iss.as_deref(), Some("backend"));
        assert!(c.exp >= c.iat + 599 && c.exp <= c.iat + 601);
        assert_eq!(
            c.rooms,
            vec![Grant {
                room: "lt-g0-3".into(),
                role: "viewer".into(),
                publish: Some(true)
            }]
        );
        // Exactly the JSON shape of the contract.
        let payload = t.split('.').nth(1).unwrap();
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(
            v["rooms"],
            serde_json::json!([{"room":"lt-g0-3","role":"viewer","publish":true}])
        );
        // The wrong secret does not verify.
        let mut val = Validation::new(Algorithm::HS256);
        val.validate_aud = false;
        assert!(jsonwebtoken::decode::<Claims>(&t, &DecodingKey::from_secret(b"x"), &val).is_err());
    }

    #[test]
    fn grants_by_role() {
        let m = Minter::hmac(b"k", None);
        let host = m.claims(&persona(Role::Host, true));
        let v = serde_json::to_value(&host.rooms).unwrap();
        assert_eq!(v, serde_json::json!([{"room":"lt-g0-3","role":"host"}]));
        let quiet = m.claims(&persona(Role::Viewer, false));
        let v = serde_json::to_value(&quiet.rooms).unwrap();
        assert_eq!(v, serde_json::json!([{"room":"lt-g0-3","role":"viewer"}]));
        assert!(serde_json::to_value(&quiet).unwrap().get("aud").is_none());
    }

    // Test keys generated with openssl for these tests only.
    const EC_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+WEILKtD/Jg3tYp9
Ouj6xgvzm2HT4kS19CqSqgXuKeShRANCAASkXpbRdc47BucNgFXz64Ak1e9+k8Lq
nJAD+tz6Q1DIs2u988XuwZW0j1HF8GY9OsTIP+tGDTJ62yRktn0MAhRN
-----END PRIVATE KEY-----
";
    const EC_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEpF6W0XXOOwbnDYBV8+uAJNXvfpPC
6pyQA/rc+kNQyLNrvfPF7sGVtI9RxfBmPTrEyD/rRg0yetskZLZ9DAIUTQ==
-----END PUBLIC KEY-----
";
    const ED_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIOuuIJsGh5viewknnF6AF/NSeghT9VlAH2nghLFh5BtZ
-----END PRIVATE KEY-----
";

    #[test]
    fn private_keys_pick_their_algorithm() {
        let m = Minter::private_key(EC_KEY.as_bytes(), Some("ec1".into())).unwrap();
        assert_eq!(m.algorithm(), Algorithm::ES256);
        let t = m.mint(&persona(Role::Host, true)).unwrap();
        let c = decode(
            &t,
            &DecodingKey::from_ec_pem(EC_PUB.as_bytes()).unwrap(),
            Algorithm::ES256,
            None,
        );
        assert_eq!(c.rooms[0].role, "host");
        let m = Minter::private_key(ED_KEY.as_bytes(), None).unwrap();
        assert_eq!(m.algorithm(), Algorithm::EdDSA);
        assert!(m.mint(&persona(Role::Host, false)).is_ok());
        assert!(Minter::private_key(b"not a key", None).is_err());
    }

    #[test]
    fn token_files_go_round_robin() {
        let dir = std::env::temp_dir().join(format!("lt-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("tokens");
        std::fs::write(&f, "# tokens\naaa\n\nbbb\n").unwrap();
        let t = Tokens::from_file(&f).unwrap();
        let p = persona(Role::Viewer, false);
        assert_eq!(t.for_member(0, &p).unwrap().as_deref(), Some("aaa"));
        assert_eq!(t.for_member(1, &p).unwrap().as_deref(), Some("bbb"));
        assert_eq!(t.for_member(2, &p).unwrap().as_deref(), Some("aaa"));
        std::fs::write(&f, "\n# none\n").unwrap();
        assert!(Tokens::from_file(&f).is_err());
        assert_eq!(Tokens::None.for_member(0, &p).unwrap(), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
