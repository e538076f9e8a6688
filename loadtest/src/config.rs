//! The load tester's own options (goose's are flattened beside them in `main.rs`): where to
//! connect and how (TLS, tokens), what the rooms look like, this generator's shard, the phases of
//! a run, the reports and the pass/fail rules. Parsing and validation only; nothing here opens a
//! socket.

use std::path::PathBuf;
use std::time::Duration;

use crate::rules::Rule;
pub use crate::spec::{AddrRange, RoomGroup, Shard};
use crate::target::ResolveOverride;

/// From this many members in a generator, `--members-per-user 0` puts [`AUTO_BATCH`] members in
/// each goose user.
pub const AUTO_BATCH_FROM: usize = 1_000;
/// Members per goose user chosen at scale: a goose user's ~8 KiB shared 16 ways is ~0.5 KiB per
/// member, while a batch's tick stays a small loop.
pub const AUTO_BATCH: usize = 16;
/// Most members one goose user may carry: its tick scans them on each wake-up.
pub const MAX_BATCH: usize = 1_024;
/// Most worker threads `--threads` may ask for: a guard against a mistyped count, far above
/// any machine's cores (0, the default, takes them all).
pub const MAX_THREADS: usize = 4_096;

/// Options of the live-rooms simulation. Every one has a `LOADTEST_…` environment variable too.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Live rooms (loadtest)")]
pub struct Options {
    /// Gateway URLs, comma-separated or repeated: ws://HOST:PORT or wss://HOST:PORT (http:// and
    /// https:// mean the same). Users are spread over them round robin: give one load balancer,
    /// or every node. Without it, goose's --host is the target.
    #[arg(
        long = "target",
        env = "LOADTEST_TARGET",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub targets: Vec<String>,

    /// A group of identical rooms, as ROOMSxHOSTSxVIEWERS with optional per-group rates
    /// @HOST_RATE/VIEWER_RATE (messages per second per member): `1x2x1000` is one room with 2 hosts
    /// and 1000 viewers, `100x1x5@5/0.2` a hundred rooms of 1 host and 5 viewers. Repeat for a mix.
    /// The goose user count is the sum of all members (set for you; a different --users is refused).
    #[arg(
        long = "rooms",
        env = "LOADTEST_ROOMS",
        value_delimiter = ' ',
        value_name = "SPEC",
        default_value = "10x1x20"
    )]
    pub groups: Vec<RoomGroup>,

    /// Messages per second each host publishes during the measured window (open loop: a fixed
    /// schedule that does not wait for the gateway). Keep it at or under the gateway's
    /// --max-publish-rate (20 by default), or publishes are refused as `rate_limited`.
    #[arg(
        long,
        env = "LOADTEST_HOST_RATE",
        default_value_t = 2.0,
        value_name = "PER_SEC"
    )]
    pub host_rate: f64,

    /// Messages per second each viewer publishes (chat) during the measured window; 0 for none.
    #[arg(
        long,
        env = "LOADTEST_VIEWER_RATE",
        default_value_t = 0.02,
        value_name = "PER_SEC"
    )]
    pub viewer_rate: f64,

    /// Bytes of filler in each published message's data, on top of its ~70 bytes of fields.
    #[arg(
        long,
        env = "LOADTEST_MESSAGE_SIZE",
        default_value_t = 64,
        value_name = "BYTES"
    )]
    pub message_size: usize,

    /// Pause between the moment every user has made its first connection attempt and the start of
    /// the measured window, so that welcome and presence traffic settles.
    #[arg(long, env = "LOADTEST_SETTLE", value_parser = parse_duration, default_value = "2s")]
    pub settle: Duration,

    /// Length of the measured window, in which members publish on schedule.
    #[arg(long, env = "LOADTEST_MEASURE", value_parser = parse_duration, default_value = "20s")]
    pub measure: Duration,

    /// Time after the window in which nobody publishes and members wait for messages in flight; a
    /// message not received by its end counts as lost. Then the run stops by itself.
    #[arg(long, env = "LOADTEST_DRAIN", value_parser = parse_duration, default_value = "5s")]
    pub drain: Duration,

    /// Longest a connection attempt may take, from TCP connect to the welcome frame.
    #[arg(long, env = "LOADTEST_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,

    /// Members each goose user carries, each with its own connection: 0 chooses (1 below 1 000
    /// members in this generator, so small runs keep one goose user per member; 16 from 1 000
    /// on). A goose user costs ~8 KiB of its own, so at scale several members share one.
    /// --increase-rate (-r) still counts members per second; goose's user count becomes the
    /// number of batches.
    #[arg(
        long,
        env = "LOADTEST_MEMBERS_PER_USER",
        default_value_t = 0,
        value_name = "N"
    )]
    pub members_per_user: usize,

    /// Worker threads of the generator's runtime (at most 4 096): 0, one per core (or tokio's
    /// TOKIO_WORKER_THREADS). Several generators on one
    /// machine (`--shard`, one per core) are cheapest with 1 each: a multi-threaded runtime
    /// wakes its idle threads for every burst of reads, ~15 % of the CPU per message at
    /// audience scale on two cores (docs/benchmarks.md, "The generator's own cost").
    #[arg(long, env = "LOADTEST_THREADS", default_value_t = 0, value_name = "N")]
    pub threads: usize,

    /// Source addresses to bind, round robin over connections: a comma-separated list of IPv4
    /// addresses or ranges, such as `127.0.0.2-127.0.0.9`. Each address has its own ~28 000
    /// ephemeral ports. Without it the kernel picks.
    #[arg(
        long = "bind",
        env = "LOADTEST_BIND",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub bind: Vec<AddrRange>,

    /// Prefix of room names. Rooms are `PREFIX-gG-N`. Independent generators running side by
    /// side must use different prefixes (the default includes the process id); the shards of one
    /// distributed run must use the same one (required with --shard), which also gives them one
    /// run id.
    #[arg(long, env = "LOADTEST_ROOM_PREFIX", value_name = "PREFIX")]
    pub room_prefix: Option<String>,

    /// Do not resume on reconnect: no `since=` (the messages missed meanwhile count as lost), and
    /// no re-sending of unacknowledged publishes. Against a gateway without offsets nothing is
    /// resumed anyway.
    #[arg(long, env = "LOADTEST_NO_RESUME")]
    pub no_resume: bool,

    /// Check member lists: each member reads its room's list after its welcome (`members`, paged)
    /// and follows `members_diff`, and its view is judged at the end of the drain against the
    /// room's members (`list-wrong`). The gateway must list the run's rooms (`--list-rooms`, or
    /// grants with `"list": true`); a room over the gateway's bound is counted, not judged.
    #[arg(long, env = "LOADTEST_LISTS")]
    pub lists: bool,

    /// Run a webhook receiver on ADDR (e.g. 0.0.0.0:9900; any address, the gateway must reach
    /// it): it verifies each request's signature with --webhook-secret, deduplicates by `id`, and
    /// judges the rooms' lifecycle events at the end (`webhook-missing`, `webhook-duplicates`…).
    /// Start the gateway with `--webhook-url http://THIS_HOST:PORT/hooks`.
    #[arg(long, env = "LOADTEST_WEBHOOK_LISTEN", value_name = "ADDR")]
    pub webhook_listen: Option<std::net::SocketAddr>,

    /// The secret(s) the gateway signs webhooks with (its --webhook-secret), comma-separated: a
    /// request signed by any of them is accepted. Required with --webhook-listen.
    #[arg(
        long,
        env = "LOADTEST_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,

    /// How long the receiver waits at the end of the run for the last events (members' leaves
    /// come a presence tick after their close, `room.vacated` after the gateway's
    /// --unsubscribe-delay); it stops earlier once every expected event is in and nothing new
    /// came for 2 s.
    #[arg(long, env = "LOADTEST_WEBHOOK_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub webhook_grace: Duration,

    /// Do not reconnect after an unexpected close. By default members reconnect as the protocol
    /// says: at once (with jitter) after 1012, with backoff after 4000, 4001 and an abnormal close,
    /// never after 1000 or 1002/1007/1008/1009.
    #[arg(long, env = "LOADTEST_NO_RECONNECT")]
    pub no_reconnect: bool,

    /// Record every Nth received message of each member as a `WS deliver` row in goose's reports
    /// (goose's per-request bookkeeping would cost more CPU than the clients themselves). The
    /// summary counts every message regardless.
    #[arg(
        long,
        env = "LOADTEST_DELIVER_SAMPLE",
        default_value_t = 10,
        value_name = "N"
    )]
    pub deliver_sample: u32,

    /// The generator reports itself as the bottleneck when its timer lag (p99) exceeds this, or
    /// when its publishers' lag behind schedule (p99) does while its timers are late too
    /// (publishers behind with timers on time are the gateway not taking the writes: noted,
    /// not a bottleneck).
    #[arg(long, env = "LOADTEST_MAX_GENERATOR_LAG", value_parser = parse_duration, default_value = "25ms")]
    pub max_generator_lag: Duration,

    /// Write the JSON summary (schema in docs/loadtest.md) here; without it, it is printed on
    /// stdout at the end.
    #[arg(long, env = "LOADTEST_SUMMARY_FILE", value_name = "PATH")]
    pub summary_file: Option<PathBuf>,

    /// Write the HTML report (charts of latency, connections, deliveries and losses over time,
    /// with the rules' thresholds) here.
    #[arg(long, env = "LOADTEST_HTML_REPORT", value_name = "PATH")]
    pub html_report: Option<PathBuf>,

    /// Seconds between live lines on stderr (members connected, messages per second, p50/p99 and
    /// lost so far); 0 for none.
    #[arg(long, env = "LOADTEST_LIVE_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub live_interval: Duration,

    /// Show goose's own output (its metrics tables at the end). Off by default: the live lines,
    /// the summary and one verdict line per rule are what a CI log needs.
    #[arg(long, env = "LOADTEST_GOOSE_OUTPUT")]
    pub goose_output: bool,

    /// curl-style address override: connect to ADDR for HOST:PORT instead of asking DNS (the
    /// URL's host name still goes in SNI, the certificate check and `Host`). Repeatable.
    #[arg(
        long = "resolve",
        env = "LOADTEST_RESOLVE",
        value_delimiter = ',',
        value_name = "HOST:PORT:ADDR"
    )]
    pub resolve: Vec<ResolveOverride>,

    /// PEM file of CA certificates to trust for wss:// and https:// besides the system's
    /// (a private CA). Repeatable.
    #[arg(
        long = "ca-file",
        env = "LOADTEST_CA_FILE",
        value_delimiter = ',',
        value_name = "PEM"
    )]
    pub ca_files: Vec<PathBuf>,

    /// Accept any TLS certificate (a self-signed staging cluster). Off by default.
    #[arg(long, env = "LOADTEST_INSECURE")]
    pub insecure: bool,

    /// Messages per second per room published through the HTTP API (`POST
    /// /api/rooms/ROOM/messages`) during the window, besides the members' publishes; counted in
    /// the same loss ledger. 0 for none.
    #[arg(
        long,
        env = "LOADTEST_API_PUBLISH_RATE",
        default_value_t = 0.0,
        value_name = "PER_SEC"
    )]
    pub api_publish_rate: f64,

    /// The gateway's API key (`Authorization: Bearer KEY` on HTTP API publishes).
    #[arg(
        long,
        env = "LOADTEST_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// Mint members' tokens (HS256) with the gateway's HMAC secrets, in the gateway's own form
    /// and variable: `SECRET` or `KID=SECRET`, comma-separated. The first entry signs (its KID
    /// goes in the token header unless --jwt-kid is given), so one GATEWAY_JWT_HMAC_SECRETS
    /// serves the gateway and the load tester.
    #[arg(
        long = "jwt-hmac-secrets",
        env = "GATEWAY_JWT_HMAC_SECRETS",
        value_name = "[KID=]SECRET,...",
        hide_env_values = true
    )]
    pub jwt_hmac_secrets: Option<String>,

    /// One HMAC secret, taken whole (no KID= form). Deprecated: use --jwt-hmac-secrets /
    /// GATEWAY_JWT_HMAC_SECRETS; LOADTEST_JWT_HMAC_SECRET is still read.
    #[arg(
        long,
        env = "LOADTEST_JWT_HMAC_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub jwt_hmac_secret: Option<String>,

    /// Mint members' tokens with this PEM private key: RSA (RS256), EC P-256 (ES256) or Ed25519
    /// (EdDSA), by the key's type.
    #[arg(long, env = "LOADTEST_JWT_PRIVATE_KEY", value_name = "PEM")]
    pub jwt_private_key: Option<PathBuf>,

    /// `kid` header of minted tokens.
    #[arg(long, env = "LOADTEST_JWT_KID", value_name = "KID")]
    pub jwt_kid: Option<String>,

    /// `aud` claim of minted tokens.
    #[arg(long, env = "LOADTEST_JWT_AUDIENCE", value_name = "AUD")]
    pub jwt_audience: Option<String>,

    /// `iss` claim of minted tokens.
    #[arg(long, env = "LOADTEST_JWT_ISSUER", value_name = "ISS")]
    pub jwt_issuer: Option<String>,

    /// Lifetime of minted tokens (a token is minted for every connection attempt).
    #[arg(long, env = "LOADTEST_JWT_TTL", value_parser = parse_duration, default_value = "1h")]
    pub jwt_ttl: Duration,

    /// Ready tokens, one per line, handed to members round robin (instead of minting).
    #[arg(long, env = "LOADTEST_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Where the token goes on the upgrade request.
    #[arg(long, env = "LOADTEST_TOKEN_IN", value_enum, default_value = "query")]
    pub token_in: TokenIn,

    /// This generator's share of a distributed run, INDEX/TOTAL (`0/4` … `3/4`): every TOTAL-th
    /// host, viewer and HTTP API room from INDEX. Without it, JOB_COMPLETION_INDEX (set by a
    /// Kubernetes Indexed Job) with --shards gives the same.
    #[arg(long, env = "LOADTEST_SHARD", value_name = "I/N")]
    pub shard: Option<Shard>,

    /// Total generators, with the index from JOB_COMPLETION_INDEX.
    #[arg(long, env = "LOADTEST_SHARDS", value_name = "N")]
    pub shards: Option<usize>,

    /// Wall-clock start of the measured window (RFC 3339, e.g. 2026-11-30T14:05:00Z, or unix
    /// seconds), so that several generators measure the same window. Every member should have
    /// joined by then.
    #[arg(long, env = "LOADTEST_START_AT", value_parser = parse_start_at, value_name = "TIME")]
    pub start_at: Option<u64>,

    /// A pass/fail rule on the summary; repeat for several. Metrics: `lost`, `loss` (% of
    /// expected), `delivered`, `connect-errors`, `closes` (unexpected), `publish-errors`,
    /// `unsent`, `duplicates`, `reordered`, `error-rate` (%), latency `p50` `p90` `p99` `p99.9` `max` (humantime units: us, ms, s; bare is ms), `generator-lag`. Operators < <= > >= ==. Examples: `lost==0`, `p99<250ms`,
    /// `error-rate<0.1`. Any failing rule makes the process exit 1.
    #[arg(
        long = "expect",
        env = "LOADTEST_EXPECT",
        value_delimiter = ',',
        value_name = "RULE"
    )]
    pub rules: Vec<Rule>,
}

/// Parses a duration with humantime (`250ms`, `20s`, `2m`, `1h 30m`); a bare number is seconds
/// (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        if v.is_finite() && (0.0..=1e7).contains(&v) {
            return Ok(Duration::from_secs_f64(v));
        }
        return Err(format!("`{s}` is out of range"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration ({e}; examples: 250ms, 20s, 2m)"))
}

/// Parses `--start-at`: an RFC 3339 time (`2026-11-30T14:05:00Z`, fractions allowed), or
/// seconds since the Unix epoch. Returns unix microseconds.
pub fn parse_start_at(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(
            "empty: set it (or LOADTEST_START_AT) to the same time for every generator, e.g. $(( $(date +%s) + 90 ))"
                .into(),
        );
    }
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok((secs * 1e6) as u64);
        }
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("`{s}` is not a time ({e}): write 2026-11-30T14:05:00Z or unix seconds")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("`{s}` is before 1970"))?
        .as_micros() as u64)
}

/// `KID=SECRET` or `SECRET`, split exactly as the gateway splits its `--jwt-hmac-secret` entries
/// (a KID is non-empty and holds no `/` or space, and an `=` followed only by `=` is base64
/// padding, not a KID), so that both read one variable alike.
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

/// Where a member's token goes on the upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenIn {
    /// The `token` query parameter.
    Query,
    /// `Authorization: Bearer`.
    Header,
    /// Both.
    Both,
}

impl Options {
    /// The room groups with their rates resolved.
    pub fn resolved_groups(&self) -> Vec<RoomGroup> {
        self.groups
            .iter()
            .map(|g| RoomGroup {
                host_rate: Some(g.host_rate.unwrap_or(self.host_rate)),
                viewer_rate: Some(g.viewer_rate.unwrap_or(self.viewer_rate)),
                ..g.clone()
            })
            .collect()
    }

    /// Members over every group: the goose user count.
    pub fn population(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.rooms * (g.hosts + g.viewers))
            .sum()
    }

    /// Members per goose user for a generator of `population` members (`--members-per-user`,
    /// or the automatic choice).
    pub fn batch_size(&self, population: usize) -> usize {
        match self.members_per_user {
            0 if population >= AUTO_BATCH_FROM => AUTO_BATCH,
            0 => 1,
            k => k,
        }
    }

    /// This generator's shard: `--shard`, else JOB_COMPLETION_INDEX with `--shards`, else 0/1.
    pub fn resolved_shard(&self) -> Result<Shard, String> {
        self.shard_from(std::env::var("JOB_COMPLETION_INDEX").ok())
    }

    fn shard_from(&self, job_index: Option<String>) -> Result<Shard, String> {
        if let Some(s) = self.shard {
            return Ok(s);
        }
        match (job_index, self.shards) {
            (Some(i), Some(n)) => format!("{}/{n}", i.trim()).parse(),
            (None, Some(n)) if n > 1 => {
                Err("--shards without --shard needs JOB_COMPLETION_INDEX".into())
            }
            _ => Ok(Shard::default()),
        }
    }

    /// The HMAC secret that signs members' tokens and the `kid` it names, if any: the first entry
    /// of `--jwt-hmac-secrets` (split into KID and SECRET as the gateway splits it), else the
    /// deprecated `--jwt-hmac-secret`. Both may be given only if they agree.
    pub fn hmac_signing_key(&self) -> Result<Option<(String, Option<String>)>, String> {
        let listed = match &self.jwt_hmac_secrets {
            None => None,
            Some(list) => {
                let first = list
                    .split(',')
                    .map(str::trim)
                    .find(|e| !e.is_empty())
                    .ok_or("--jwt-hmac-secrets (GATEWAY_JWT_HMAC_SECRETS) is empty")?;
                let (kid, secret) = split_kid(first);
                if secret.is_empty() {
                    return Err(format!(
                        "--jwt-hmac-secrets (GATEWAY_JWT_HMAC_SECRETS): the first entry reads as KID `{}` with an empty secret",
                        kid.unwrap_or_default()
                    ));
                }
                Some((secret.to_string(), kid.map(str::to_string)))
            }
        };
        match (listed, &self.jwt_hmac_secret) {
            (Some(l), Some(old)) if &l.0 != old => Err(
                "--jwt-hmac-secrets (GATEWAY_JWT_HMAC_SECRETS) and the deprecated --jwt-hmac-secret (LOADTEST_JWT_HMAC_SECRET) name different secrets: keep GATEWAY_JWT_HMAC_SECRETS".into(),
            ),
            (Some(l), _) => Ok(Some(l)),
            (None, Some(old)) => Ok(Some((old.clone(), None))),
            (None, None) => Ok(None),
        }
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.threads > MAX_THREADS {
            return Err(format!("--threads {}: at most {MAX_THREADS}", self.threads));
        }
        if self.members_per_user > MAX_BATCH {
            return Err(format!(
                "--members-per-user {}: at most {MAX_BATCH}",
                self.members_per_user
            ));
        }
        if self.webhook_listen.is_some()
            && self
                .webhook_secret
                .as_deref()
                .is_none_or(|s| s.split(',').all(|s| s.trim().is_empty()))
        {
            return Err("--webhook-listen needs --webhook-secret (the gateway's webhook secret): unsigned requests are refused".into());
        }
        let shard = self.resolved_shard()?;
        if shard.is_split() && self.room_prefix.is_none() {
            return Err(
                "--shard: give every generator the same --room-prefix (it names the rooms and the run)"
                    .into(),
            );
        }
        if shard.is_split() && self.start_at.is_none() {
            return Err("--shard: give every generator the same --start-at, so that their measured windows line up".into());
        }
        let hmac = self.hmac_signing_key()?.is_some();
        if hmac as u8 + self.jwt_private_key.is_some() as u8 + self.token_file.is_some() as u8 > 1 {
            return Err(
                "--jwt-hmac-secrets (or --jwt-hmac-secret), --jwt-private-key and --token-file: choose one"
                    .into(),
            );
        }
        if !self.api_publish_rate.is_finite() || !(0.0..=1000.0).contains(&self.api_publish_rate) {
            return Err("--api-publish-rate: 0 to 1000 messages per second per room".into());
        }
        for r in [self.host_rate, self.viewer_rate] {
            if !r.is_finite() || r < 0.0 {
                return Err("--host-rate and --viewer-rate must be 0 or more".into());
            }
        }
        for g in self.resolved_groups() {
            let (h, v) = (g.host_rate.unwrap_or(0.0), g.viewer_rate.unwrap_or(0.0));
            if h > 1000.0 || v > 1000.0 {
                return Err(format!(
                    "group {g}: at most 1000 messages per second per member"
                ));
            }
        }
        if self.population() == 0 {
            return Err("--rooms gives no member".into());
        }
        if self.measure.is_zero() {
            return Err("--measure must not be zero".into());
        }
        if self.connect_timeout.is_zero() {
            return Err("--connect-timeout must not be zero".into());
        }
        if self.deliver_sample == 0 {
            return Err("--deliver-sample must be at least 1".into());
        }
        if self.message_size > 60_000 {
            return Err("--message-size must be at most 60000 (the gateway takes 64 KiB)".into());
        }
        if let Some(p) = &self.room_prefix {
            let ok = !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
            if !ok {
                return Err("--room-prefix: 1-64 characters of A-Z a-z 0-9 _ . : -".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: Options,
    }

    fn opts(args: &[&str]) -> Options {
        Cli::try_parse_from(std::iter::once("lt").chain(args.iter().copied()))
            .unwrap()
            .o
    }

    #[test]
    fn members_per_user_is_bounded_and_chosen_by_population() {
        let max = MAX_BATCH.to_string();
        assert!(opts(&["--members-per-user", &max]).validate().is_ok());
        let over = (MAX_BATCH + 1).to_string();
        let err = opts(&["--members-per-user", &over]).validate().unwrap_err();
        assert!(err.contains("--members-per-user"), "{err}");
        let auto = opts(&[]);
        assert_eq!(auto.batch_size(AUTO_BATCH_FROM - 1), 1);
        assert_eq!(auto.batch_size(AUTO_BATCH_FROM), AUTO_BATCH);
        assert_eq!(opts(&["--members-per-user", "3"]).batch_size(1), 3);
    }

    #[test]
    fn threads_are_bounded() {
        let max = MAX_THREADS.to_string();
        assert!(opts(&["--threads", &max]).validate().is_ok());
        let over = (MAX_THREADS + 1).to_string();
        let err = opts(&["--threads", &over]).validate().unwrap_err();
        assert!(err.contains(&format!("--threads {over}")), "{err}");
    }

    #[test]
    fn shards_from_flags_or_the_job_index() {
        let o = opts(&["--shard", "1/4"]);
        assert_eq!(o.shard_from(None).unwrap(), Shard { index: 1, total: 4 });
        let o = opts(&["--shards", "3"]);
        assert_eq!(
            o.shard_from(Some("2".into())).unwrap(),
            Shard { index: 2, total: 3 }
        );
        assert!(o.shard_from(Some("3".into())).is_err());
        assert!(o.shard_from(None).is_err());
        assert_eq!(opts(&[]).shard_from(None).unwrap(), Shard::default());
        let o = opts(&["--shard", "0/2"]);
        assert!(o.validate().unwrap_err().contains("room-prefix"));
        let o = opts(&["--shard", "0/2", "--room-prefix", "x"]);
        assert!(o.validate().unwrap_err().contains("start-at"));
        let o = opts(&[
            "--shard",
            "0/2",
            "--room-prefix",
            "x",
            "--start-at",
            "1795713448",
        ]);
        assert!(o.validate().is_ok());
        let o = opts(&["--jwt-hmac-secret", "a", "--token-file", "/t"]);
        assert!(o.validate().is_err());
    }

    #[test]
    fn the_gateway_secret_variable_signs() {
        let key = |args: &[&str]| opts(args).hmac_signing_key();
        assert_eq!(
            key(&["--jwt-hmac-secrets", "k2=0123456789abcdef0123,k1=old"]),
            Ok(Some(("0123456789abcdef0123".into(), Some("k2".into())))),
            "the first entry signs, with its kid"
        );
        assert_eq!(
            key(&["--jwt-hmac-secrets", " 0123456789abcdef "]),
            Ok(Some(("0123456789abcdef".into(), None)))
        );
        assert_eq!(
            key(&["--jwt-hmac-secret", "a=b"]),
            Ok(Some(("a=b".into(), None))),
            "the deprecated flag takes the secret whole, as before"
        );
        assert_eq!(
            key(&["--jwt-hmac-secrets", "s", "--jwt-hmac-secret", "s"]),
            Ok(Some(("s".into(), None)))
        );
        assert!(key(&["--jwt-hmac-secrets", "a", "--jwt-hmac-secret", "b"])
            .unwrap_err()
            .contains("different secrets"));
        // Base64 padding is not a KID, as the gateway reads it.
        assert_eq!(
            key(&["--jwt-hmac-secrets", "c2VjcmV0LXNlY3JldA=="]),
            Ok(Some(("c2VjcmV0LXNlY3JldA==".into(), None)))
        );
        assert_eq!(
            key(&["--jwt-hmac-secrets", "k1=c2VjcmV0=="]),
            Ok(Some(("c2VjcmV0==".into(), Some("k1".into()))))
        );
        assert!(key(&["--jwt-hmac-secrets", " , "]).is_err());
        assert_eq!(key(&[]), Ok(None));
        assert_eq!(
            split_kid("a/b=c"),
            (None, "a/b=c"),
            "as the gateway reads it"
        );
        let o = opts(&["--jwt-hmac-secrets", "k=s", "--token-file", "/t"]);
        assert!(o.validate().unwrap_err().contains("choose one"));
    }

    #[test]
    fn start_times() {
        assert_eq!(parse_start_at("1795713448"), Ok(1_795_713_448_000_000));
        assert_eq!(
            parse_start_at("2026-11-30T14:05:00Z"),
            Ok(1_796_047_500_000_000)
        );
        assert!(parse_start_at("tomorrow").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
    }
}
