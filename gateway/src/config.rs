//! Node configuration: every flag, its `GATEWAY_…` environment variable, its default, and the
//! checks that run before anything binds ([`Config::validate`]).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

mod webhooks;
pub use webhooks::{WebhookFlags, WEBHOOK_WAKE_QUEUE};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// How WebSocket clients are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No authentication: role and name come from the query string.
    None,
    /// Signed JSON Web Tokens decide who joins which room as what.
    Jwt,
}

/// A secret value (an API key, an HMAC secret): never printed by `Debug`, so that a logged
/// configuration does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Configuration of one gateway node.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "gateway",
    version,
    about = "WebSocket gateway for live rooms: clients join rooms as hosts or viewers; messages fan \
             out to every member on every node through Redis (or an in-process broker when no \
             Redis is given)."
)]
pub struct Config {
    /// Address for WebSocket clients and the HTTP API.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address for /metrics, /healthz and /readyz (keep it off the public network).
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Redis URL. One server: `redis://[user:pass@]host:port[/db]` (`rediss://` for TLS).
    /// Sentinel: `redis+sentinel://[user:pass@]host:port,host:port/MASTER[/db]`
    /// (`rediss+sentinel://` for TLS). Redis Cluster (sharded pub/sub, Redis 7):
    /// `redis+cluster://[user:pass@]host:port,host:port` (`rediss+cluster://` for TLS). Without it
    /// the node runs alone with an in-process broker.
    #[arg(long, env = "GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,

    /// PEM file of the CAs that sign the Redis servers' certificates (rediss URLs), trusted
    /// instead of the system roots. An untrusted server certificate is always refused.
    #[arg(long, env = "GATEWAY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// PEM client certificate for mutual TLS with Redis (with --redis-client-key).
    #[arg(long, env = "GATEWAY_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<std::path::PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(long, env = "GATEWAY_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<std::path::PathBuf>,

    /// This node's id, shown to clients and on every metric as the `node` label.
    #[arg(long, env = "GATEWAY_NODE_ID", default_value_t = default_node_id())]
    pub node_id: String,

    /// Keys accepted as `Authorization: Bearer KEY` on the HTTP API (comma list, so that keys
    /// rotate without downtime; compared in constant time). An empty or blank entry is refused at
    /// start. Without a key: with `--auth none` the publish and history API is open (development
    /// only); with `--auth jwt` the node refuses to start unless `--open-api` is given; the
    /// moderation API is always refused.
    #[arg(
        long = "api-key",
        env = "GATEWAY_API_KEY",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub api_keys: Vec<Secret>,

    /// `none` (default): anyone may join any room with the role and name of the query string.
    /// `jwt`: every WebSocket upgrade needs a signed token (see docs/protocol.md, Authentication).
    #[arg(long, env = "GATEWAY_AUTH", value_enum, default_value = "none")]
    pub auth: AuthMode,

    /// With `--auth jwt`: rooms (comma list of names and prefixes ending in `*`, e.g.
    /// `public-*,lobby`; `*` alone is every room) that clients without a token may join as viewers
    /// who may not publish, and whose history they may read. A room outside them needs a token.
    /// The flag without patterns is refused.
    #[arg(
        long,
        env = "GATEWAY_ALLOW_ANONYMOUS_VIEWERS",
        value_delimiter = ',',
        num_args = 0..=1,
        default_missing_value = ""
    )]
    pub allow_anonymous_viewers: Option<Vec<String>>,

    /// With `--auth jwt` and no `--api-key`: serve `POST /api/rooms/{room}/messages` without a
    /// key anyway, so anyone who reaches the client port publishes as `server` (history reads
    /// still need the right to join the room). Without this flag such a node refuses to start.
    #[arg(long, env = "GATEWAY_OPEN_API")]
    pub open_api: bool,

    /// HMAC secrets (HS256/384/512) that sign tokens, each `SECRET` or `KID=SECRET`; several
    /// (repeat the flag or a comma list) so that secrets rotate without downtime.
    #[arg(
        long = "jwt-hmac-secret",
        env = "GATEWAY_JWT_HMAC_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub jwt_hmac_secrets: Vec<Secret>,

    /// PEM public keys (RSA, EC P-256/P-384, Ed25519) that verify tokens, each `FILE` or
    /// `KID=FILE`; repeatable.
    #[arg(
        long = "jwt-public-key",
        env = "GATEWAY_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<String>,

    /// A JWKS URL whose keys verify tokens: fetched at start, every 5 minutes, and when a token
    /// names an unknown `kid` (at most every 5 s).
    /// Must be `https://`; redirects are not followed.
    #[arg(long, env = "GATEWAY_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Accept an `http://` --jwks-url (tests and local key servers only: a key set fetched in
    /// clear text can be replaced by anyone on the path).
    #[arg(long, env = "GATEWAY_JWKS_ALLOW_HTTP")]
    pub jwks_allow_http: bool,

    /// Shortest time between two JWKS fetches caused by tokens naming an unknown `kid`, so that
    /// made-up key ids cannot hammer the key server. Hidden: only tests shorten it, to see a
    /// rotation picked up without waiting out the production gap.
    #[arg(long, value_parser = parse_duration, default_value = "5s", hide = true)]
    pub jwks_unknown_kid_gap: Duration,

    /// Required `aud` of tokens (when set).
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` of tokens (when set).
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// How long before a connection's token expires the client gets an `expiring` event.
    #[arg(long, env = "GATEWAY_TOKEN_EXPIRY_WARNING", value_parser = parse_duration, default_value = "30s")]
    pub token_expiry_warning: Duration,

    /// Prefix of the Redis channel of each room: a room's channel is PREFIX + room name.
    #[arg(long, env = "GATEWAY_CHANNEL_PREFIX", default_value = "gw:room:")]
    pub channel_prefix: String,

    /// Log format; the level comes from RUST_LOG (default info).
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Largest message a client may send or the API accept, in bytes (close 1009 / HTTP 413).
    /// Also caps the reassembled size of a fragmented message and payloads from Redis.
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_SIZE", default_value_t = 64 * 1024)]
    pub max_message_size: usize,

    /// Most frames one fragmented message may have (close 1009 beyond).
    #[arg(long, env = "GATEWAY_MAX_FRAGMENTS", default_value_t = 64)]
    pub max_fragments: usize,

    /// Frames a client's outbound queue may hold; a client whose queue is full is too slow and is
    /// closed with code 4000.
    #[arg(long, env = "GATEWAY_OUTBOX_FRAMES", default_value_t = 1024)]
    pub outbox_frames: usize,

    /// Bytes a client's outbound queue may hold (same result as --outbox-frames).
    #[arg(long, env = "GATEWAY_OUTBOX_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub outbox_bytes: usize,

    /// How long the node stays subscribed to a room after its last local member left, so that
    /// quick rejoins do not churn Redis subscriptions.
    #[arg(long, env = "GATEWAY_UNSUBSCRIBE_DELAY", value_parser = parse_duration, default_value = "2s")]
    pub unsubscribe_delay: Duration,

    /// Interval of WebSocket pings to each client.
    #[arg(long, env = "GATEWAY_PING_INTERVAL", value_parser = parse_duration, default_value = "25s")]
    pub ping_interval: Duration,

    /// A client from which nothing (not even a pong) arrives for this long is closed (4001).
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub idle_timeout: Duration,

    /// Time a Redis command (publish, subscribe, probe) may take before the connection is treated
    /// as lost.
    #[arg(long, env = "GATEWAY_REDIS_TIMEOUT", value_parser = parse_duration, default_value = "2s")]
    pub redis_timeout: Duration,

    /// Interval of the health probes (PING) on the Redis subscriber and publisher connections.
    #[arg(long, env = "GATEWAY_REDIS_PROBE_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub redis_probe_interval: Duration,

    /// Longest wait between two attempts to reconnect to Redis (the waits start at 100 ms and
    /// double, with jitter). Short enough that service resumes within seconds of Redis
    /// returning; hidden because only tests that wait out an outage change it.
    #[arg(long, env = "GATEWAY_REDIS_BACKOFF_CAP", value_parser = parse_duration, default_value = "2s", hide = true)]
    pub redis_backoff_cap: Duration,

    /// How often each node reports its rooms' counts and sends `presence` events (cluster-wide
    /// host and viewer counts) to the members whose last counts differ; a room whose counts hold
    /// still sends nothing. Each node's counts live in Redis for three intervals, so the counts
    /// of a node that died vanish within that time.
    #[arg(long, env = "GATEWAY_PRESENCE_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub presence_interval: Duration,

    /// Rooms that list their members (comma list of names and prefixes ending in `*`, as in
    /// grants; `*` alone is every room). A member of such a room is listed (its `sub`, `name`,
    /// role), gets the list with the `members` command and its changes as one `members_diff` per
    /// `--presence-interval`. With token auth a grant with `"list": true` lists its holder in that
    /// room too. Default: none (rooms report counts only). See docs/protocol.md, "Member lists".
    #[arg(long, env = "GATEWAY_LIST_ROOMS", value_delimiter = ',')]
    pub list_rooms: Vec<String>,

    /// Most distinct members a room lists: above it the room stops listing (members get one
    /// `members_diff` with `"over_limit":true`, `members` answers `over_limit`, `presence` carries
    /// `"listing":false`) until it is back to 90 % of this number, when it lists again (a
    /// `members_diff` with `"reset":true`).
    #[arg(long, env = "GATEWAY_LIST_MAX_MEMBERS", default_value_t = 5_000)]
    pub list_max_members: usize,

    /// Publishes per second one connection may make (token bucket, bursts up to the same number).
    /// An excess publish gets an `error` event `rate_limited`; a connection refused more than
    /// 10 × this number (at least 20) times within 10 s is closed with 1008. 0 disables the limit.
    #[arg(long, env = "GATEWAY_MAX_PUBLISH_RATE", default_value_t = 20.0)]
    pub max_publish_rate: f64,

    /// Control commands per second one connection may send (`ping`, `refresh`, and commands
    /// refused as malformed; token bucket, bursts up to twice the number). An excess one is
    /// answered with an `error` event `rate_limited` and not executed; a connection refused more
    /// than 10 × this number (at least 20) times within 10 s is closed with 1008. Each refusal is
    /// counted in `gateway_control_rate_limited_total`.
    #[arg(long, env = "GATEWAY_MAX_CONTROL_RATE", default_value_t = 5.0)]
    pub max_control_rate: f64,

    /// Time a new HTTP connection gets to send its first request's headers (slow-loris guard).
    #[arg(long, env = "GATEWAY_HTTP_HEADER_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub http_header_timeout: Duration,

    /// Time a keep-alive HTTP connection may wait, after a response, for the complete headers
    /// of its next request (idle time and header read together); then it is closed.
    #[arg(long, env = "GATEWAY_HTTP_KEEPALIVE_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub http_keepalive_timeout: Duration,

    /// Time an API request's body may take to arrive in full (HTTP 408 and the connection
    /// closed beyond).
    #[arg(long, env = "GATEWAY_HTTP_BODY_TIMEOUT", value_parser = parse_duration, default_value = "15s")]
    pub http_body_timeout: Duration,

    /// How long the node may be without its broker (Redis) before it closes its clients with
    /// 4002 so that they reconnect to a node that has one and resume from their last offset
    /// (meanwhile they would miss what other nodes publish). Closes go out spread over one
    /// second; clients that join during the outage are closed the same way. 0 keeps clients
    /// through any outage (local fan-out only).
    #[arg(long, env = "GATEWAY_BROKER_LOSS_CLOSE", value_parser = parse_duration, default_value = "5s")]
    pub broker_loss_close: Duration,

    /// The longest a node keeps the members of a lost shard (one Redis, a Sentinel-managed
    /// master, or one Cluster shard) while a witness — a sentinel or another Cluster node —
    /// reports that it lost the same master (a failover every node waits out alike; moving
    /// clients would help none of them). Beyond it they are handed over anyway (4002).
    /// 0 = three times `--broker-loss-close`.
    #[arg(long, env = "GATEWAY_BROKER_FAILOVER_WAIT", value_parser = parse_duration, default_value = "0")]
    pub broker_failover_wait: Duration,

    /// Deliveries per second (node-wide, measured over 100 ms) below which a fan-out writes to
    /// each idle member's socket itself, with no task wake-up; above it, fan-outs queue and the
    /// members' writers send in batches on every worker thread. 0 = always queue.
    #[arg(long, env = "GATEWAY_DIRECT_WRITE_MAX_RATE", default_value_t = DIRECT_WRITE_MAX_RATE)]
    pub direct_write_max_rate: u64,

    /// Write window: a hot room — one that sent at least two messages per window on average over
    /// the last complete 200 ms (100 a second at 20 ms) — has its messages sent together, at most
    /// once per window, so that each member gets several messages per write (fewer syscalls) for
    /// at most one window of added latency. Every message of a quieter room goes out at once,
    /// however bursty. 0 turns it off (every message written as it arrives).
    #[arg(long, env = "GATEWAY_WRITE_WINDOW", value_parser = parse_duration, default_value = WRITE_WINDOW_DEFAULT)]
    pub write_window: Duration,

    /// Origins allowed to open WebSockets (comma-separated, e.g.
    /// `https://live.example.com,https://admin.example.com`); others get HTTP 403. Requests without
    /// an Origin header (non-browser clients) are allowed. Empty allows every origin. The publish
    /// API accepts browser requests (with `Content-Type: application/json`) only from origins
    /// listed here explicitly: the empty list admits none there.
    #[arg(
        long,
        env = "GATEWAY_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub allowed_origins: Vec<String>,

    /// Most WebSocket connections this node holds; further upgrades get HTTP 503. 0 means no limit
    /// other than the process's open-file limit.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// On SIGTERM/SIGINT, each client is closed with code 1012 at a random moment within this
    /// window (so they reconnect elsewhere without a storm); the process exits within it plus 5 s.
    #[arg(long, env = "GATEWAY_DRAIN_SECONDS", value_parser = parse_duration, default_value = "10")]
    pub drain_seconds: Duration,

    /// Messages kept per room for recovery and backlog (a Redis stream per room, or memory with
    /// the in-process broker); 0 turns history off (offsets are still assigned).
    #[arg(long, env = "GATEWAY_HISTORY_SIZE", default_value_t = 300)]
    pub history_size: usize,

    /// Bytes of message frames kept per room's history, besides --history-size: the oldest
    /// entries are trimmed until the room fits (the default keeps a room's stream under 2 MiB of
    /// Redis memory). At least --max-message-size.
    #[arg(long, env = "GATEWAY_HISTORY_MAX_BYTES", default_value_t = 1536 * 1024)]
    pub history_max_bytes: usize,

    /// Age after which a history entry counts as gone (and a room's idle history expires).
    #[arg(long, env = "GATEWAY_HISTORY_TTL", value_parser = parse_duration, default_value = "10m")]
    pub history_ttl: Duration,

    /// Most messages a client may ask for with `backlog=N` on join (larger asks are clamped), and
    /// the default and largest `limit` of `GET /api/rooms/{room}/messages` without `since`.
    #[arg(long, env = "GATEWAY_MAX_BACKLOG", default_value_t = 100)]
    pub max_backlog: usize,

    /// Most missed messages one resume (`since=`) replays; a client that missed more gets
    /// `recovered: false`.
    #[arg(long, env = "GATEWAY_MAX_RECOVERY", default_value_t = 1000)]
    pub max_recovery: usize,

    /// How long the cluster remembers a publish's idempotency key (`key` / `Idempotency-Key`).
    #[arg(long, env = "GATEWAY_IDEMPOTENCY_TTL", value_parser = parse_duration, default_value = "5m")]
    pub idempotency_ttl: Duration,

    /// The room lifecycle webhooks' flags (`--webhook-*`).
    #[command(flatten)]
    pub webhooks: WebhookFlags,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of its range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// A configuration with every default, for tests and embedding; listens are placeholders since
    /// [`crate::run`] takes bound listeners.
    pub fn defaults() -> Self {
        Self::parse_from(["gateway"])
    }

    /// `--broker-failover-wait`, its default (0) resolved: three times `--broker-loss-close`.
    pub fn failover_wait(&self) -> Duration {
        if self.broker_failover_wait.is_zero() {
            self.broker_loss_close * 3
        } else {
            self.broker_failover_wait
        }
    }

    /// Whether a WebSocket from `origin` (the Origin header, if any) is allowed.
    pub fn origin_allowed(&self, origin: Option<&str>) -> bool {
        let allowed: Vec<&str> = self
            .allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect();
        match origin {
            _ if allowed.is_empty() => true,
            None => true,
            Some(o) => allowed
                .iter()
                .any(|a| *a == "*" || a.eq_ignore_ascii_case(o.trim_end_matches('/'))),
        }
    }

    /// Whether `origin` is listed in `--allowed-origins` (`*` lists every origin). Unlike
    /// [`Config::origin_allowed`], an empty list lists nothing: used where a browser must be
    /// admitted explicitly (the publish API).
    pub fn origin_listed(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }

    /// The API keys ([`Config::validate`] refuses empty and blank ones, so that an unset
    /// templated variable cannot open the API).
    pub fn api_keys(&self) -> impl Iterator<Item = &str> {
        self.api_keys.iter().map(|k| k.expose().trim())
    }

    /// The room patterns anonymous viewers may join (`None` without the flag).
    pub fn anonymous_rooms(&self) -> Option<crate::auth::RoomPatterns> {
        self.allow_anonymous_viewers
            .as_ref()
            .map(|p| crate::auth::RoomPatterns::new(p.iter().map(|p| p.trim())))
    }

    /// The room patterns that list their members (`--list-rooms`).
    pub fn list_patterns(&self) -> crate::auth::RoomPatterns {
        crate::auth::RoomPatterns::new(self.list_rooms.iter().map(|p| p.as_str()))
    }

    /// Whether the HTTP API requires a key.
    pub fn api_key_required(&self) -> bool {
        self.api_keys().next().is_some()
    }

    /// The HMAC secrets as `(kid, secret)` ([`Config::validate`] refuses blank ones).
    pub fn jwt_hmac_secrets(&self) -> impl Iterator<Item = (Option<&str>, &str)> {
        self.jwt_hmac_secrets
            .iter()
            .map(|s| s.expose().trim())
            .map(split_kid)
    }

    /// The TLS files for Redis connections.
    pub fn redis_tls(&self) -> crate::broker::redis_endpoint::RedisTlsFiles {
        crate::broker::redis_endpoint::RedisTlsFiles {
            ca_file: self.redis_ca_file.clone(),
            client_cert: self.redis_client_cert.clone(),
            client_key: self.redis_client_key.clone(),
        }
    }

    /// Time-to-live of this node's presence report in Redis.
    pub fn presence_ttl(&self) -> Duration {
        self.presence_interval * 3
    }

    /// The history bounds the brokers apply.
    pub fn history_limits(&self) -> crate::wire::history::HistoryLimits {
        crate::wire::history::HistoryLimits {
            size: self.history_size,
            max_bytes: self.history_max_bytes,
            read_bytes: self.outbox_bytes / 2,
            ttl: self.history_ttl,
            idempotency_ttl: self.idempotency_ttl,
        }
    }

    /// Whether room lifecycle events are recorded and delivered: at least one `--webhook-url`.
    pub fn lifecycle_events(&self) -> bool {
        self.webhooks.enabled()
    }

    /// The window over which draining closes clients.
    pub fn drain_window(&self) -> Duration {
        self.drain_seconds
    }

    /// Checks values that clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || self.node_id.chars().any(char::is_control)
        {
            return bad("--node-id must be 1-64 printable characters");
        }
        if self.channel_prefix.is_empty() {
            return bad("--channel-prefix must not be empty");
        }
        if self.max_message_size < 128 {
            return bad("--max-message-size must be at least 128 bytes");
        }
        if self.max_fragments == 0 {
            return bad("--max-fragments must be at least 1");
        }
        if self.outbox_frames < 8 || self.outbox_bytes < self.max_message_size {
            return bad(
                "--outbox-frames must be at least 8 and --outbox-bytes at least --max-message-size",
            );
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return bad(
                "--idle-timeout must be longer than --ping-interval, which must not be zero",
            );
        }
        if self.redis_timeout.is_zero() || self.redis_probe_interval.is_zero() {
            return bad("--redis-timeout and --redis-probe-interval must not be zero");
        }
        if self.redis_backoff_cap < Duration::from_millis(100) {
            return bad("--redis-backoff-cap must be at least the first wait, 100ms");
        }
        if !self
            .list_rooms
            .iter()
            .map(|p| p.trim())
            .filter(|p| !p.is_empty())
            .all(crate::auth::valid_pattern)
        {
            return bad("--list-rooms takes room names and prefixes ending in *");
        }
        if self.list_max_members == 0 {
            return bad("--list-max-members must be at least 1");
        }
        if self.presence_interval < Duration::from_millis(100) {
            return bad("--presence-interval must be at least 100ms");
        }
        if !self.max_publish_rate.is_finite() || self.max_publish_rate < 0.0 {
            return bad(
                "--max-publish-rate must be a number of publishes per second, 0 to disable",
            );
        }
        if self.history_ttl < Duration::from_secs(1)
            || self.idempotency_ttl < Duration::from_secs(1)
        {
            return bad("--history-ttl and --idempotency-ttl must be at least 1s");
        }
        if self.history_max_bytes < self.max_message_size {
            return bad("--history-max-bytes must be at least --max-message-size");
        }
        if self.max_recovery == 0 || self.max_recovery > 100_000 || self.max_backlog > 100_000 {
            return bad("--max-recovery must be 1-100000 and --max-backlog at most 100000");
        }
        if self.api_keys().any(str::is_empty) {
            return bad(
                "--api-key (GATEWAY_API_KEY) has an empty or blank entry: an unset variable would \
                 open the API; give real keys, or leave the flag and variable out",
            );
        }
        if self.api_keys().any(|k| k.len() < 8) {
            return bad("--api-key must be at least 8 characters");
        }
        if self.jwt_hmac_secrets().any(|(_, s)| s.trim().is_empty()) {
            return bad(
                "--jwt-hmac-secret (GATEWAY_JWT_HMAC_SECRETS) has an empty or blank entry; give \
                 real secrets, or leave the flag and variable out",
            );
        }
        if self.auth == AuthMode::Jwt && !self.api_key_required() && !self.open_api {
            return bad(
                "--auth jwt without --api-key would leave POST /api/rooms/{room}/messages open to \
                 anyone who reaches --listen; give --api-key (GATEWAY_API_KEY), or --open-api to \
                 accept that explicitly",
            );
        }
        if self.open_api && self.auth != AuthMode::Jwt {
            return bad("--open-api is only meaningful with --auth jwt");
        }
        if let Some(url) = &self.jwks_url {
            let lower = url.trim().to_ascii_lowercase();
            if !(lower.starts_with("https://")
                || (self.jwks_allow_http && lower.starts_with("http://")))
            {
                return bad(
                    "--jwks-url must be an https:// URL (--jwks-allow-http accepts http:// for \
                     tests and local key servers)",
                );
            }
        }
        if !self.max_control_rate.is_finite() || self.max_control_rate < 0.0 {
            return bad("--max-control-rate must be a number of commands per second, 0 to disable");
        }
        if self.http_header_timeout.is_zero()
            || self.http_keepalive_timeout.is_zero()
            || self.http_body_timeout.is_zero()
        {
            return bad(
                "--http-header-timeout, --http-keepalive-timeout and --http-body-timeout must not \
                 be zero",
            );
        }
        if self.auth == AuthMode::Jwt
            && self.jwt_hmac_secrets().next().is_none()
            && self.jwt_public_keys.iter().all(|k| k.trim().is_empty())
            && self.jwks_url.is_none()
        {
            return bad(
                "--auth jwt needs at least one of --jwt-hmac-secret, --jwt-public-key, --jwks-url",
            );
        }
        if self.jwt_hmac_secrets().any(|(_, s)| s.len() < 16) {
            return bad("--jwt-hmac-secret values must be at least 16 bytes");
        }
        self.webhooks.validate()?;
        if let Some(patterns) = &self.allow_anonymous_viewers {
            if self.auth != AuthMode::Jwt {
                return bad("--allow-anonymous-viewers needs --auth jwt");
            }
            let patterns: Vec<&str> = patterns.iter().map(|p| p.trim()).collect();
            if patterns.iter().all(|p| p.is_empty()) {
                return bad("--allow-anonymous-viewers needs the rooms it opens, e.g. \
                     --allow-anonymous-viewers 'public-*,lobby' (`*` opens every room)");
            }
            if let Some(p) = patterns.iter().find(|p| {
                !crate::auth::patterns::valid_pattern(p)
                    || p.eq_ignore_ascii_case("true")
                    || p.eq_ignore_ascii_case("false")
            }) {
                return Err(ConfigError::Invalid(format!(
                    "--allow-anonymous-viewers: `{p}` is not a room name or a prefix ending in * \
                     (the flag takes room patterns, not true/false)"
                )));
            }
        }
        Ok(())
    }
}

/// Splits `KID=VALUE` into its key id and value; a value without `=` has no key id, and neither
/// has one whose `=` are only at its end (base64 padding: `c2VjcmV0LXNlY3JldA==` is one secret).
pub fn split_kid(s: &str) -> (Option<&str>, &str) {
    match s.split_once('=') {
        Some((kid, v))
            if !kid.is_empty()
                && !kid.contains(['/', ' '])
                && !v.trim_start_matches('=').is_empty() =>
        {
            (Some(kid), v)
        }
        _ => (None, s),
    }
}

fn default_node_id() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_string())
}

/// Default of `--direct-write-max-rate`: one core's direct writes on loopback (~130 000
/// deliveries per CPU-second in the broadcast benchmark) keep well up with this, so a fan-out
/// never falls behind its own input; the chat-storm benchmark (200 000/s) is above it.
pub const DIRECT_WRITE_MAX_RATE: u64 = 100_000;

/// Default of `--write-window` (docs/benchmarks.md, "Write window", has the measurements).
pub const WRITE_WINDOW_DEFAULT: &str = "20ms";
/// [`WRITE_WINDOW_DEFAULT`] as a duration.
pub const WRITE_WINDOW: Duration = Duration::from_millis(20);

/// Parses a duration as `humantime` writes it (`250ms`, `25s`, `2m`, `1h30m`), or a plain number
/// of seconds (`10`, `1.5`), which the `--drain-seconds` flag has always taken.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| d.as_secs() <= 1_000_000_000)
            .ok_or_else(|| format!("`{s}` is out of range"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}; examples: 250ms, 25s, 2m, 1h30m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("NaN").is_err());
        assert!(parse_duration("1e30").is_err());
    }

    #[test]
    fn key_ids_and_base64_padding() {
        assert_eq!(split_kid("k1=secret"), (Some("k1"), "secret"));
        assert_eq!(split_kid("k1=c2VjcmV0=="), (Some("k1"), "c2VjcmV0=="));
        assert_eq!(split_kid("secret"), (None, "secret"));
        // A padded base64 secret without a key id is one secret, not `KID=`.
        assert_eq!(
            split_kid("c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
            (None, "c2VjcmV0LXNlY3JldC1zZWNyZXQ=")
        );
        assert_eq!(
            split_kid("c2VjcmV0LXNlY3JldC1zZWNyZXQtcw=="),
            (None, "c2VjcmV0LXNlY3JldC1zZWNyZXQtcw==")
        );
        assert_eq!(split_kid("/etc/keys/a=b.pem"), (None, "/etc/keys/a=b.pem"));
    }

    #[test]
    fn defaults_validate() {
        let c = Config::defaults();
        c.validate().unwrap();
        assert_eq!(c.channel_prefix, "gw:room:");
        assert_eq!(c.ping_interval, Duration::from_secs(25));
        assert_eq!(
            c.jwks_unknown_kid_gap,
            crate::auth::jwks::UNKNOWN_KID_MIN_GAP
        );
        assert!(!c.node_id.is_empty());
    }

    #[test]
    fn redis_backoff_cap_is_hidden_and_bounded() {
        assert_eq!(Config::defaults().redis_backoff_cap, Duration::from_secs(2));
        let c = Config::parse_from(["gateway", "--redis-backoff-cap", "200ms"]);
        c.validate().unwrap();
        assert_eq!(c.redis_backoff_cap, Duration::from_millis(200));
        let c = Config::parse_from(["gateway", "--redis-backoff-cap", "50ms"]);
        assert!(c.validate().is_err(), "below the first wait");
        use clap::CommandFactory;
        let help = Config::command().render_long_help().to_string();
        assert!(
            !help.contains("redis-backoff-cap"),
            "a test knob, not an operator's"
        );
    }

    #[test]
    fn origins() {
        let c = Config::defaults();
        assert!(c.origin_allowed(Some("https://evil.example")));
        let c = Config::parse_from([
            "gateway",
            "--allowed-origins",
            "https://live.example.com, http://localhost:8080",
        ]);
        assert!(c.origin_allowed(Some("https://live.example.com")));
        assert!(c.origin_allowed(Some("http://localhost:8080")));
        assert!(c.origin_allowed(None), "non-browser clients send no Origin");
        assert!(!c.origin_allowed(Some("https://evil.example")));
        assert!(!c.origin_allowed(Some("https://live.example.com.evil.example")));
    }

    fn jwt(extra: &[&str]) -> Result<(), String> {
        let mut args = vec![
            "gateway",
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            "0123456789abcdef",
        ];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn jwt_without_an_api_key_refuses_to_start_unless_opened_explicitly() {
        let e = jwt(&[]).unwrap_err();
        assert!(e.contains("--api-key") && e.contains("--open-api"), "{e}");
        jwt(&["--api-key", "backend-key-1"]).unwrap();
        jwt(&["--open-api"]).unwrap();
        let c = Config::parse_from(["gateway", "--open-api"]);
        assert!(
            c.validate().is_err(),
            "--open-api means something only with jwt"
        );
    }

    #[test]
    fn blank_hmac_secrets_are_refused() {
        for blank in ["", " ", " , ", "kid="] {
            let e = jwt(&["--api-key", "backend-key-1", "--jwt-hmac-secret", blank]).unwrap_err();
            assert!(
                e.contains("blank") || e.contains("16 bytes"),
                "{blank:?}: {e}"
            );
        }
        // 16 bytes is the shortest accepted, 15 is refused.
        jwt(&[
            "--api-key",
            "backend-key-1",
            "--jwt-hmac-secret",
            "k=0123456789abcde",
        ])
        .unwrap_err();
        jwt(&[
            "--api-key",
            "backend-key-1",
            "--jwt-hmac-secret",
            "k=0123456789abcdef",
        ])
        .unwrap();
    }

    #[test]
    fn anonymous_viewers_need_room_patterns() {
        let key = ["--api-key", "backend-key-1"];
        let with = |p: &[&str]| jwt(&[&key[..], p].concat());
        let e = with(&["--allow-anonymous-viewers"]).unwrap_err();
        assert!(e.contains("needs the rooms"), "{e}");
        assert!(with(&["--allow-anonymous-viewers", ""]).is_err());
        assert!(with(&["--allow-anonymous-viewers", " , "]).is_err());
        assert!(
            with(&["--allow-anonymous-viewers", "true"]).is_err(),
            "the old boolean"
        );
        assert!(with(&["--allow-anonymous-viewers", "a b"]).is_err());
        assert!(with(&["--allow-anonymous-viewers", "a*b"]).is_err());
        with(&["--allow-anonymous-viewers", "public-*,lobby"]).unwrap();
        with(&["--allow-anonymous-viewers", "*"]).unwrap();
        let c = Config::parse_from(["gateway", "--allow-anonymous-viewers", "public-*, lobby"]);
        let p = c.anonymous_rooms().unwrap();
        let room = |s| crate::wire::protocol::RoomName::parse(s).unwrap();
        assert!(p.covers(&room("public-7")) && p.covers(&room("lobby")));
        assert!(!p.covers(&room("private")));
        assert!(Config::defaults().anonymous_rooms().is_none());
    }

    #[test]
    fn jwks_url_must_be_https() {
        let key = ["--api-key", "backend-key-1"];
        let with = |p: &[&str]| jwt(&[&key[..], p].concat());
        with(&["--jwks-url", "https://idp.example/jwks.json"]).unwrap();
        let e = with(&["--jwks-url", "http://idp.example/jwks.json"]).unwrap_err();
        assert!(e.contains("https"), "{e}");
        assert!(with(&["--jwks-url", "ftp://idp.example/jwks.json"]).is_err());
        assert!(with(&["--jwks-url", "idp.example/jwks.json"]).is_err());
        with(&[
            "--jwks-url",
            "http://127.0.0.1:1/jwks.json",
            "--jwks-allow-http",
        ])
        .unwrap();
    }

    #[test]
    fn http_timeouts_and_control_rate() {
        let c = Config::defaults();
        assert_eq!(c.http_header_timeout, Duration::from_secs(10));
        assert!(c.http_keepalive_timeout <= Duration::from_secs(60));
        assert!(c.http_body_timeout <= Duration::from_secs(30));
        assert_eq!(c.max_control_rate, 5.0);
        for flag in [
            "--http-header-timeout",
            "--http-keepalive-timeout",
            "--http-body-timeout",
        ] {
            let c = Config::parse_from(["gateway", flag, "0"]);
            assert!(c.validate().is_err(), "{flag} 0");
            let c = Config::parse_from(["gateway", flag, "1ms"]);
            c.validate().unwrap();
        }
        let c = Config::parse_from(["gateway", "--max-control-rate=-1"]);
        assert!(c.validate().is_err());
        let c = Config::parse_from(["gateway", "--max-control-rate", "0"]);
        c.validate().unwrap();
    }

    #[test]
    fn listed_origins_are_explicit() {
        let c = Config::defaults();
        assert!(
            !c.origin_listed("https://live.example.com"),
            "empty lists none"
        );
        let c = Config::parse_from(["gateway", "--allowed-origins", "https://live.example.com"]);
        assert!(c.origin_listed("https://live.example.com/"));
        assert!(!c.origin_listed("https://evil.example"));
        let c = Config::parse_from(["gateway", "--allowed-origins", "*"]);
        assert!(c.origin_listed("https://evil.example"));
    }

    #[test]
    fn refuses_bad_values() {
        let c = Config::parse_from(["gateway", "--idle-timeout", "10s", "--ping-interval", "20s"]);
        assert!(c.validate().is_err());
        let c = Config::parse_from(["gateway", "--api-key", "short"]);
        assert!(c.validate().is_err());
        // A room must be able to keep one message of the largest size; exactly that is enough.
        let c = Config::parse_from(["gateway", "--history-max-bytes", "65535"]);
        assert!(c.validate().is_err());
        let c = Config::parse_from(["gateway", "--history-max-bytes", "65536"]);
        c.validate().unwrap();
        assert_eq!(c.history_limits().max_bytes, 65536);
        assert_eq!(
            c.history_limits().read_bytes,
            2 * 1024 * 1024,
            "half of --outbox-bytes"
        );
        // An empty or blank key (an unset templated variable) is refused, not read as "no key"
        // (issue 20: it used to open the API).
        for blank in ["", " ", " , ", "old-key-123,"] {
            let c = Config::parse_from(["gateway", "--api-key", blank]);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("empty or blank"), "{blank:?}: {e}");
        }
        let c = Config::parse_from(["gateway", "--api-key", "old-key-123,new-key-456"]);
        c.validate().unwrap();
        assert_eq!(c.api_keys().count(), 2);
        assert!(
            !format!("{c:?}").contains("old-key-123"),
            "secrets are not printed"
        );
        let c = Config::parse_from(["gateway", "--auth", "jwt"]);
        assert!(c.validate().is_err(), "jwt without a key");
        let c = Config::parse_from(["gateway", "--allow-anonymous-viewers"]);
        assert!(c.validate().is_err(), "anonymous viewers without jwt");
        let c = Config::parse_from([
            "gateway",
            "--auth",
            "jwt",
            "--jwt-hmac-secret",
            "k1=0123456789abcdef,0123456789abcdefXYZ",
            "--api-key",
            "backend-key-1",
        ]);
        c.validate().unwrap();
        let secrets: Vec<_> = c.jwt_hmac_secrets().collect();
        assert_eq!(
            secrets,
            vec![
                (Some("k1"), "0123456789abcdef"),
                (None, "0123456789abcdefXYZ")
            ]
        );
    }
}
