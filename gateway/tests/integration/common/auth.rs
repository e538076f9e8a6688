//! Credentials for tests: the HS256 secret and API key the test nodes are started with,
//! claims and tokens signed with them, and the flags that turn JWT auth on.
//!
//! Not here: RS256/JWKS fixtures (only `auth.rs` uses them) and connecting with a token (`ws`).

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub const SECRET: &str = "integration-secret-0123456789";
pub const API_KEY: &str = "moderator-key-123";

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Claims for `sub` with `grants` (room, role), valid for `secs` seconds (negative: expired).
pub fn claims(sub: &str, grants: &[(&str, &str)], secs: i64) -> Value {
    let rooms: Vec<Value> = grants
        .iter()
        .map(|(room, role)| json!({"room": room, "role": role}))
        .collect();
    json!({"sub": sub, "name": format!("N-{sub}"), "exp": (now() as i64 + secs) as u64, "rooms": rooms})
}

pub fn hs256(claims: &Value, secret: &[u8], kid: Option<&str>) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &EncodingKey::from_secret(secret)).unwrap()
}

pub fn token(claims: &Value) -> String {
    hs256(claims, SECRET.as_bytes(), None)
}

pub fn jwt_flags(extra: &[&'static str]) -> Vec<&'static str> {
    // A node under `--auth jwt` needs an API key (or `--open-api`).
    let mut f = vec![
        "--auth",
        "jwt",
        "--jwt-hmac-secret",
        SECRET,
        "--api-key",
        API_KEY,
    ];
    f.extend_from_slice(extra);
    f
}
