//! Every metric's name, the closed label enums and the histogram buckets: the metrics API the
//! dashboards, alert rules and docs/metrics.md use. [`super::Metrics`] registers them.

/// Current WebSocket connections on this node, by `role` (`host`, `viewer`).
pub const CONNECTIONS: &str = "gateway_connections";
/// Rooms with at least one local member.
pub const ROOMS: &str = "gateway_rooms";
/// WebSocket sessions accepted (after the upgrade).
pub const CONNECTIONS_OPENED: &str = "gateway_connections_opened_total";
/// WebSocket sessions ended, by `reason` (see [`crate::wire::close::CloseReason::label`]).
pub const CONNECTIONS_CLOSED: &str = "gateway_connections_closed_total";
/// Connection attempts refused before the upgrade, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "gateway_connections_refused_total";
/// Messages this node accepted for publishing, by `source` (`client`, `http`, `redis`).
/// `redis` counts payloads that arrived from Redis without our envelope (a raw `PUBLISH`).
pub const MESSAGES_PUBLISHED: &str = "gateway_messages_published_total";
/// Text frames (messages and JSON events) written to client sockets; WebSocket control frames
/// are not counted.
pub const MESSAGES_DELIVERED: &str = "gateway_messages_delivered_total";
/// `presence` events the presence timer did not send because the member already had those
/// counts (the room's counts did not change since).
pub const PRESENCE_UNCHANGED: &str = "gateway_presence_unchanged_total";
/// `presence` events and keepalive Pings that went out in the same write as a member's next room
/// message (or were queued with it) instead of in a write of their own (riders, see
/// `fanout/outbox/rider.rs`).
pub const RIDERS: &str = "gateway_riders_total";
/// Entries this node lists across its listing rooms (member lists, docs/protocol.md), read at
/// scrape time; an entry whose member left stays until the next tick has written the leave.
pub const LIST_MEMBERS: &str = "gateway_list_members";
/// Members not listed because their room already lists `--list-max-members` from this node.
pub const LIST_OVERFLOW: &str = "gateway_list_overflow_total";
/// `members_diff` events queued to members (one per listing member per tick with changes).
pub const MEMBERS_DIFFS: &str = "gateway_members_diffs_total";
/// `members` commands answered (refusals not included: they count as client errors).
pub const MEMBERS_COMMANDS: &str = "gateway_members_commands_total";
/// Dead node instances this node reaped from the registry (their counts and listed members
/// removed, members left with `node_lost`).
pub const ROSTER_REAPS: &str = "gateway_roster_reaps_total";
/// Gaps in a room's offsets this node saw in what its subscription brought, by `result`:
/// `filled` from history, `unreadable` (history could not be read; handed out with the gap),
/// `too_large` (history did not have them all: trimmed, more than `gapfill::MAX_FILL`, or over
/// the read budget; left to the members' resume), `overflow` (more than `gapfill::MAX_HELD`
/// arrived while reading).
pub const GAP_FILLS: &str = "gateway_gap_fills_total";
/// Messages or frames lost on purpose, by `reason`.
pub const MESSAGES_DROPPED: &str = "gateway_messages_dropped_total";
/// Publish time (`ts`) until this node queued the frame to every local member; one sample per
/// message per node.
pub const FANOUT_LATENCY: &str = "gateway_fanout_latency_seconds";
/// Number of local members one message was queued to (one sample per message per node).
pub const FANOUT_RECIPIENTS: &str = "gateway_fanout_recipients";
/// Messages received from the broker (any room this node is subscribed to).
pub const BROKER_MESSAGES_RECEIVED: &str = "gateway_broker_messages_received_total";
/// Broker publish failures (the publisher got an error or a 503).
pub const BROKER_PUBLISH_ERRORS: &str = "gateway_broker_publish_errors_total";
/// Rooms this node's subscriber connection is currently subscribed to in Redis.
pub const BROKER_SUBSCRIPTIONS: &str = "gateway_broker_subscriptions";
/// 1 while both Redis connections (subscriber and publisher) are up; 1 for the in-process broker.
pub const REDIS_CONNECTED: &str = "gateway_redis_connected";
/// 1 while the master of shard `shard` answers the broker, 0 while it does not. Redis Cluster:
/// `shard` is the shard's index (shards numbered by the first slot they own; stable across
/// failovers), never an address; at most [`MAX_SHARD_LABELS`] series. One Redis or Sentinel: the
/// one shard `0`, equal to [`REDIS_CONNECTED`]. Not exported with the in-process broker.
pub const REDIS_SHARD_UP: &str = "gateway_redis_shard_up";
/// Shards (masters owning slots) in the broker's last view of Redis: 1 for one Redis or Sentinel.
pub const REDIS_SHARDS: &str = "gateway_redis_shards";
/// Most shard indices exported as [`REDIS_SHARD_UP`] series (bounds the label's values).
pub const MAX_SHARD_LABELS: usize = 64;
/// Successful reconnections to Redis after a loss, by `connection` (`subscriber`, `publisher`).
pub const REDIS_RECONNECTS: &str = "gateway_redis_reconnects_total";
/// Client commands refused with an `error` event, by `code`.
pub const CLIENT_ERRORS: &str = "gateway_client_errors_total";
/// HTTP API requests by `status` class (`2xx`, `4xx`, `5xx`).
pub const HTTP_REQUESTS: &str = "gateway_http_requests_total";
/// Client control commands (`ping`, `refresh`, malformed commands) refused by the per-connection
/// control rate limit (`--max-control-rate`), each answered with `rate_limited`.
pub const CONTROL_RATE_LIMITED: &str = "gateway_control_rate_limited_total";
/// HTTP connections of the client and admin ports closed by a deadline, by `phase` (see
/// [`HttpTimeout::label`]).
pub const HTTP_TIMEOUTS: &str = "gateway_http_timeouts_total";
/// Always 1; labels carry the build's `version`.
pub const BUILD_INFO: &str = "gateway_build_info";
// The process's own series (`process_cpu_seconds_total` as a counter, `process_open_fds`,
// `process_max_fds`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
// `process_threads`, `process_start_time_seconds`, ...) are the Prometheus client libraries'
// standard set, named and sampled by the `metrics-process` crate at each scrape.
/// `--max-connections` (0: no limit but the open-file limit), for alerts on the headroom.
pub const MAX_CONNECTIONS: &str = "gateway_max_connections";
/// Tokens refused (at an upgrade or a refresh), by `reason` (see [`crate::auth::AuthError::label`]).
pub const AUTH_FAILURES: &str = "gateway_auth_failures_total";
/// Moderation commands (disconnect, ban) this node received on the control channel, by `result`
/// (`applied`, `invalid`, `dropped` when the control queue was full).
pub const CONTROL_COMMANDS: &str = "gateway_control_commands_total";
/// Joins that asked to resume (`since`), by `result` (see [`RecoveryResult::label`]).
pub const RECOVERIES: &str = "gateway_recoveries_total";
/// Messages sent to joining clients from history (missed ones on resume, and backlogs).
pub const HISTORY_REPLAYED: &str = "gateway_history_messages_replayed_total";
/// History reads whose byte budget (half of `--outbox-bytes`) left out messages they asked for:
/// a resume answered `too_many` for its bytes, a backlog or an API page cut short.
pub const HISTORY_READS_TRUNCATED: &str = "gateway_history_reads_truncated_total";
/// Time of one history read (a joining client's position and missed messages, or the API's).
pub const HISTORY_READ_LATENCY: &str = "gateway_history_read_seconds";
/// Publishes not published again because their idempotency key was seen (acked `duplicate`).
pub const PUBLISH_DUPLICATES: &str = "gateway_publish_duplicates_total";

/// Buckets of [`HISTORY_READ_LATENCY`]: 100 µs to 2.5 s.
pub const HISTORY_READ_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// How a resume ended: the `result` label of [`RECOVERIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryResult {
    /// Every missed message was replayed (`recovered: true`).
    Complete,
    /// The room's epoch changed (`recovered: false`).
    EpochChanged,
    /// History no longer reached back far enough (`recovered: false`).
    Trimmed,
    /// More than `--max-recovery` were missed (`recovered: false`).
    TooMany,
    /// History could not be read (broker down; `recovered: false`).
    Unavailable,
    /// Live messages overflowed the catch-up buffer: closed with 4000 before the welcome.
    Overflow,
}

impl RecoveryResult {
    pub(super) const ALL: [RecoveryResult; 6] = [
        Self::Complete,
        Self::EpochChanged,
        Self::Trimmed,
        Self::TooMany,
        Self::Unavailable,
        Self::Overflow,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::EpochChanged => "epoch_changed",
            Self::Trimmed => "trimmed",
            Self::TooMany => "too_many",
            Self::Unavailable => "unavailable",
            Self::Overflow => "overflow",
        }
    }
}

impl From<crate::wire::history::Recovery> for RecoveryResult {
    fn from(r: crate::wire::history::Recovery) -> Self {
        use crate::wire::history::Recovery;
        match r {
            Recovery::Complete => Self::Complete,
            Recovery::EpochChanged => Self::EpochChanged,
            Recovery::Trimmed => Self::Trimmed,
            Recovery::TooMany => Self::TooMany,
        }
    }
}

/// Buckets of [`FANOUT_LATENCY`]: 100 µs to 10 s, roughly ×2.5 per step.
pub const FANOUT_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Buckets of [`FANOUT_RECIPIENTS`].
pub const FANOUT_RECIPIENTS_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0, 50000.0,
];

/// Why a message or frame was dropped: the `reason` label of [`MESSAGES_DROPPED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A member's outbox was full: the frame was not queued and the member is being closed.
    SlowConsumer,
    /// The broker was unavailable when a client or the HTTP API published.
    BrokerUnavailable,
    /// A payload from Redis was larger than `--max-message-size`.
    TooLarge,
    /// A payload from Redis named a channel that is not a valid room.
    InvalidRoom,
    /// A message arrived for a room that has no local member any more (a race with the last leave).
    NoMembers,
    /// A publish was refused by the per-connection rate limit.
    RateLimited,
    /// A room's messages arrived faster than the node could fan them out: its write window
    /// already held `write_window::MAX_PENDING` messages.
    Overloaded,
    /// A numbered message at or below the room's last offset this node handed out (a copy, or
    /// one a gap fill already delivered from history).
    Duplicate,
}

impl DropReason {
    pub(super) const ALL: [DropReason; 8] = [
        Self::SlowConsumer,
        Self::BrokerUnavailable,
        Self::TooLarge,
        Self::InvalidRoom,
        Self::NoMembers,
        Self::RateLimited,
        Self::Overloaded,
        Self::Duplicate,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::BrokerUnavailable => "broker_unavailable",
            Self::TooLarge => "too_large",
            Self::Overloaded => "overloaded",
            Self::InvalidRoom => "invalid_room",
            Self::NoMembers => "no_members",
            Self::RateLimited => "rate_limited",
            Self::Duplicate => "duplicate",
        }
    }
}

/// How a gap in a room's offsets ended: the `result` label of [`GAP_FILLS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapFill {
    /// Read from history and handed out in order.
    Filled = 0,
    /// History could not be read: handed out with the gap.
    Unreadable = 1,
    /// History did not have them all (trimmed, more than `gapfill::MAX_FILL`, over the read
    /// budget): left to the members' resume.
    TooLarge = 2,
    /// More than `gapfill::MAX_HELD` arrived while reading: handed out with the gap.
    Overflow = 3,
}

/// Where a published message came from: the `source` label of [`MESSAGES_PUBLISHED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A client's `publish` command or chat text.
    Client,
    /// `POST /api/rooms/{room}/messages`.
    Http,
    /// A plain `PUBLISH` on Redis by another program.
    Redis,
}

impl Source {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Http => "http",
            Self::Redis => "redis",
        }
    }
}

/// Why a connection attempt was refused before the upgrade: the `reason` label of
/// [`CONNECTIONS_REFUSED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Room name, role or name parameter invalid (HTTP 400).
    BadRequest,
    /// `--max-connections` reached (HTTP 503).
    Capacity,
    /// Origin not in `--allowed-origins` (HTTP 403).
    Origin,
    /// The node is draining (HTTP 503).
    Draining,
    /// No valid token, or no right to the room or role, or banned (HTTP 401/403; the reason is
    /// in [`AUTH_FAILURES`]).
    Auth,
}

impl RefuseReason {
    pub(super) const ALL: [RefuseReason; 5] = [
        Self::BadRequest,
        Self::Capacity,
        Self::Origin,
        Self::Draining,
        Self::Auth,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Capacity => "capacity",
            Self::Origin => "origin",
            Self::Draining => "draining",
            Self::Auth => "auth",
        }
    }
}

/// Which HTTP deadline closed a connection: the `phase` label of [`HTTP_TIMEOUTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpTimeout {
    /// No complete first request headers within `--http-header-timeout`.
    Header = 0,
    /// No complete next request headers within `--http-keepalive-timeout` of a response.
    KeepAlive = 1,
    /// A request body not complete within `--http-body-timeout`.
    Body = 2,
}

impl HttpTimeout {
    /// Every phase, in label order.
    pub const ALL: [HttpTimeout; 3] = [Self::Header, Self::KeepAlive, Self::Body];

    /// The `phase` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::KeepAlive => "keepalive",
            Self::Body => "body",
        }
    }
}

/// The `result` of a control command (see [`CONTROL_COMMANDS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlResult {
    /// Parsed and applied to this node's sessions.
    Applied = 0,
    /// Not a command this node understands.
    Invalid = 1,
    /// The control queue was full.
    Dropped = 2,
}

/// `error` event codes that get their own [`CLIENT_ERRORS`] series (see `docs/protocol.md`).
pub const CLIENT_ERROR_CODES: &[&str] = &[
    "unknown_command",
    "invalid_command",
    "unsupported_binary",
    "rate_limited",
    "unavailable",
    "forbidden",
    "refresh_failed",
    "too_large",
];

/// Room lifecycle events (webhooks) finished by this node, by `result`: `delivered` (every
/// `--webhook-url` answered 2xx), `dead_letter` (refused with a 4xx other than 408/429
/// `--webhook-dead-letter-after` times, malformed or too large: moved to the room's dead-letter
/// stream).
pub const WEBHOOK_EVENTS: &str = "gateway_webhook_events_total";
/// Webhook requests sent, by `result`: `accepted` (2xx), `refused` (4xx other than 408 and
/// 429), `failed` (any other status), `timeout` (`--webhook-timeout`), `unreachable` (no
/// connection, TLS or I/O error).
pub const WEBHOOK_ATTEMPTS: &str = "gateway_webhook_attempts_total";
/// An event's `ts_ms` until every receiver accepted it (one sample per delivered event).
pub const WEBHOOK_LAG: &str = "gateway_webhook_delivery_lag_seconds";
/// Buckets of [`WEBHOOK_LAG`]: from a prompt delivery (tens of ms) to a receiver's long outage.
pub const WEBHOOK_LAG_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Age of the oldest event this node is delivering and has not had accepted yet (0 when none).
pub const WEBHOOK_OLDEST_PENDING: &str = "gateway_webhook_oldest_pending_age_seconds";
/// Rooms whose webhook lease this node holds (rooms it is delivering now).
pub const WEBHOOK_LEASES: &str = "gateway_webhook_leases";
/// Lifecycle events lost before delivery: trimmed by the event stream's `MAXLEN` (10 000
/// undelivered per room) or, in process, by the memory bound.
pub const WEBHOOK_EVENTS_DROPPED: &str = "gateway_webhook_events_dropped_total";
/// Wake-ups of a room's delivery dropped because the wake queue was full; the room is found by
/// the next sweep instead.
pub const WEBHOOK_WAKEUPS_DROPPED: &str = "gateway_webhook_wakeups_dropped_total";
