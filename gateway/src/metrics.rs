//! Every metric this node exports: names, labels, buckets and help texts live here and nowhere else.
//!
//! Each [`Node`](crate::node::Node) owns its own Prometheus recorder instead of installing a global
//! one, so several nodes in one process (the integration tests) keep separate registries, and the
//! hot path increments pre-registered handles instead of looking keys up. The `node` label is a
//! global label of the recorder, so every series carries it. No label here is per room or per user:
//! label values come from small closed enums.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::auth::AuthError;
use crate::wire::close::CloseReason;

/// Current WebSocket connections on this node, by `role` (`host`, `viewer`).
pub const CONNECTIONS: &str = "gateway_connections";
/// Rooms with at least one local member.
pub const ROOMS: &str = "gateway_rooms";
/// WebSocket sessions accepted (after the upgrade).
pub const CONNECTIONS_OPENED: &str = "gateway_connections_opened_total";
/// WebSocket sessions ended, by `reason` (see [`CloseReason::label`]).
pub const CONNECTIONS_CLOSED: &str = "gateway_connections_closed_total";
/// Connection attempts refused before the upgrade, by `reason`.
pub const CONNECTIONS_REFUSED: &str = "gateway_connections_refused_total";
/// Messages this node accepted for publishing, by `source` (`client`, `http`, `redis`).
/// `redis` counts payloads that arrived from Redis without our envelope (a raw `PUBLISH`).
pub const MESSAGES_PUBLISHED: &str = "gateway_messages_published_total";
/// Text frames (messages and JSON events) written to client sockets; WebSocket control frames
/// are not counted.
pub const MESSAGES_DELIVERED: &str = "gateway_messages_delivered_total";
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
/// Tokens refused (at an upgrade or a refresh), by `reason` (see [`AuthError::label`]).
pub const AUTH_FAILURES: &str = "gateway_auth_failures_total";
/// Moderation commands (disconnect, ban) this node received on the control channel, by `result`
/// (`applied`, `invalid`, `dropped` when the control queue was full).
pub const CONTROL_COMMANDS: &str = "gateway_control_commands_total";
/// Joins that asked to resume (`since`), by `result` (see [`RecoveryResult::label`]).
pub const RECOVERIES: &str = "gateway_recoveries_total";
/// Messages sent to joining clients from history (missed ones on resume, and backlogs).
pub const HISTORY_REPLAYED: &str = "gateway_history_messages_replayed_total";
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
    const ALL: [RecoveryResult; 6] = [
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
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        Self::SlowConsumer,
        Self::BrokerUnavailable,
        Self::TooLarge,
        Self::InvalidRoom,
        Self::NoMembers,
        Self::RateLimited,
        Self::Overloaded,
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
        }
    }
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
    const ALL: [RefuseReason; 5] = [
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

/// The state gauges' values, read from each state's one owner at scrape time (issue 15).
///
/// A gauge that each of several tasks *pushes* after changing its part of the state can end up
/// showing a stale combination (two tasks compute the value at the same moment and the last
/// `set` wins with old data), and then disagree with `/readyz` — which reads the state itself.
/// So no task sets these gauges: [`Metrics::render`] takes the values that the node read from
/// the owners (broker, hub, config) for this very scrape, the same reads `/readyz` makes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StateGauges {
    /// See [`REDIS_CONNECTED`]: what `/readyz` reports as `broker_connected`.
    pub broker_connected: bool,
    /// See [`BROKER_SUBSCRIPTIONS`].
    pub broker_subscriptions: usize,
    /// See [`CONNECTIONS`], `role="host"`.
    pub hosts: u64,
    /// See [`CONNECTIONS`], `role="viewer"`.
    pub viewers: u64,
    /// See [`ROOMS`].
    pub rooms: usize,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`REDIS_SHARD_UP`], by shard index (empty with the in-process broker).
    pub redis_shards: Vec<bool>,
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

/// Pre-registered handles of every metric of one node. Cheap to clone (handles are `Arc`s).
#[derive(Clone)]
pub struct Metrics {
    /// Renders the registry for `GET /metrics`.
    handle: PrometheusHandle,
    /// Serializes renders, so that two concurrent scrapes never interleave setting the state
    /// gauges and rendering them (each scrape shows one consistent set of reads). A std lock:
    /// held only while setting a few gauges and formatting text, never across an `.await`.
    render_lock: Arc<Mutex<()>>,
    /// The recorder, for the per-shard series registered when a shard first appears.
    recorder: Arc<PrometheusRecorder>,
    /// [`REDIS_SHARD_UP`] handles by shard index, registered on first sight (under
    /// `render_lock`), at most [`MAX_SHARD_LABELS`].
    shard_up: Arc<Mutex<Vec<Gauge>>>,
    redis_shards: Gauge,
    connections_host: Gauge,
    connections_viewer: Gauge,
    rooms: Gauge,
    /// See [`CONNECTIONS_OPENED`].
    pub connections_opened: Counter,
    closed: Arc<[Counter]>,
    refused: Arc<[Counter]>,
    published: [Counter; 3],
    /// See [`MESSAGES_DELIVERED`].
    pub delivered: Counter,
    dropped: Arc<[Counter]>,
    /// See [`FANOUT_LATENCY`].
    pub fanout_latency: Histogram,
    /// See [`FANOUT_RECIPIENTS`].
    pub fanout_recipients: Histogram,
    /// See [`BROKER_MESSAGES_RECEIVED`].
    pub broker_received: Counter,
    /// See [`BROKER_PUBLISH_ERRORS`].
    pub broker_publish_errors: Counter,
    broker_subscriptions: Gauge,
    redis_connected: Gauge,
    /// See [`REDIS_RECONNECTS`], `connection="subscriber"`.
    pub redis_reconnects_subscriber: Counter,
    /// See [`REDIS_RECONNECTS`], `connection="publisher"`.
    pub redis_reconnects_publisher: Counter,
    client_errors: Arc<[(&'static str, Counter)]>,
    http_requests: [Counter; 3],
    /// Samples the process's standard series (CPU, memory, descriptors) at each scrape.
    process: metrics_process::Collector,
    /// See [`MAX_CONNECTIONS`].
    max_connections: Gauge,
    auth_failures: Arc<[Counter]>,
    /// See [`CONTROL_COMMANDS`]: applied, invalid, dropped.
    control: [Counter; 3],
    recoveries: Arc<[Counter]>,
    /// See [`HISTORY_REPLAYED`].
    pub history_replayed: Counter,
    /// See [`HISTORY_READ_LATENCY`].
    pub history_read_latency: Histogram,
    /// See [`PUBLISH_DUPLICATES`].
    pub publish_duplicates: Counter,
    /// See [`CONTROL_RATE_LIMITED`].
    pub control_rate_limited: Counter,
    http_timeouts: [Counter; 3],
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

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Builds a private registry for the node `node_id` and registers every series, so that all of
    /// them are exported (at zero) from the first scrape on.
    pub fn new(node_id: &str) -> Self {
        let recorder: PrometheusRecorder = PrometheusBuilder::new()
            .add_global_label("node", node_id)
            .set_buckets_for_metric(Matcher::Full(FANOUT_LATENCY.into()), FANOUT_LATENCY_BUCKETS)
            .expect("static buckets are not empty")
            .set_buckets_for_metric(
                Matcher::Full(FANOUT_RECIPIENTS.into()),
                FANOUT_RECIPIENTS_BUCKETS,
            )
            .expect("static buckets are not empty")
            .set_buckets_for_metric(
                Matcher::Full(HISTORY_READ_LATENCY.into()),
                HISTORY_READ_BUCKETS,
            )
            .expect("static buckets are not empty")
            .build_recorder();
        describe(&recorder);
        let process = metrics_process::Collector::default();
        metrics::with_local_recorder(&recorder, || process.describe());
        let r = &recorder;
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            r.register_counter(&key(name, labels), &meta)
        };
        let gauge = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            r.register_gauge(&key(name, labels), &meta)
        };
        let histogram = |name: &'static str| r.register_histogram(&key(name, &[]), &meta);

        let build = gauge(BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]);
        build.set(1.0);
        let redis_connected = gauge(REDIS_CONNECTED, &[]);
        redis_connected.set(0.0);

        let redis_shards = gauge(REDIS_SHARDS, &[]);
        Self {
            render_lock: Arc::new(Mutex::new(())),
            shard_up: Arc::new(Mutex::new(Vec::new())),
            redis_shards,
            connections_host: gauge(CONNECTIONS, &[("role", "host")]),
            connections_viewer: gauge(CONNECTIONS, &[("role", "viewer")]),
            rooms: gauge(ROOMS, &[]),
            connections_opened: counter(CONNECTIONS_OPENED, &[]),
            closed: CloseReason::ALL
                .iter()
                .map(|r| counter(CONNECTIONS_CLOSED, &[("reason", r.label())]))
                .collect(),
            refused: RefuseReason::ALL
                .iter()
                .map(|r| counter(CONNECTIONS_REFUSED, &[("reason", r.label())]))
                .collect(),
            published: [Source::Client, Source::Http, Source::Redis]
                .map(|s| counter(MESSAGES_PUBLISHED, &[("source", s.label())])),
            delivered: counter(MESSAGES_DELIVERED, &[]),
            dropped: DropReason::ALL
                .iter()
                .map(|r| counter(MESSAGES_DROPPED, &[("reason", r.label())]))
                .collect(),
            fanout_latency: histogram(FANOUT_LATENCY),
            fanout_recipients: histogram(FANOUT_RECIPIENTS),
            broker_received: counter(BROKER_MESSAGES_RECEIVED, &[]),
            broker_publish_errors: counter(BROKER_PUBLISH_ERRORS, &[]),
            broker_subscriptions: gauge(BROKER_SUBSCRIPTIONS, &[]),
            redis_connected,
            redis_reconnects_subscriber: counter(REDIS_RECONNECTS, &[("connection", "subscriber")]),
            redis_reconnects_publisher: counter(REDIS_RECONNECTS, &[("connection", "publisher")]),
            client_errors: CLIENT_ERROR_CODES
                .iter()
                .map(|c| (*c, counter(CLIENT_ERRORS, &[("code", c)])))
                .collect(),
            http_requests: ["2xx", "4xx", "5xx"].map(|s| counter(HTTP_REQUESTS, &[("status", s)])),
            auth_failures: AuthError::ALL
                .iter()
                .map(|r| counter(AUTH_FAILURES, &[("reason", r.label())]))
                .collect(),
            control: ["applied", "invalid", "dropped"]
                .map(|r| counter(CONTROL_COMMANDS, &[("result", r)])),
            process,
            max_connections: gauge(MAX_CONNECTIONS, &[]),
            recoveries: RecoveryResult::ALL
                .iter()
                .map(|r| counter(RECOVERIES, &[("result", r.label())]))
                .collect(),
            history_replayed: counter(HISTORY_REPLAYED, &[]),
            history_read_latency: histogram(HISTORY_READ_LATENCY),
            publish_duplicates: counter(PUBLISH_DUPLICATES, &[]),
            control_rate_limited: counter(CONTROL_RATE_LIMITED, &[]),
            http_timeouts: HttpTimeout::ALL
                .map(|p| counter(HTTP_TIMEOUTS, &[("phase", p.label())])),
            handle: recorder.handle(),
            recorder: Arc::new(recorder),
        }
    }

    /// The counter of sessions closed for `reason`.
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        &self.closed[CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)]
    }

    /// The counter of connection attempts refused for `reason`.
    pub fn refused(&self, reason: RefuseReason) -> &Counter {
        &self.refused[RefuseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)]
    }

    /// Counts one refused token.
    pub fn auth_failure(&self, reason: AuthError) {
        if let Some(i) = AuthError::ALL.iter().position(|r| *r == reason) {
            self.auth_failures[i].increment(1);
        }
    }

    /// Counts one control command.
    pub fn control(&self, result: ControlResult) {
        self.control[result as usize].increment(1);
    }

    /// The counter of messages published from `source`.
    pub fn published(&self, source: Source) -> &Counter {
        &self.published[source as usize]
    }

    /// The counter of messages dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> &Counter {
        &self.dropped[DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0)]
    }

    /// The counter of resumes that ended with `result`.
    pub fn recovery(&self, result: RecoveryResult) -> &Counter {
        &self.recoveries[RecoveryResult::ALL
            .iter()
            .position(|r| *r == result)
            .unwrap_or(0)]
    }

    /// Counts one `error` event sent to a client.
    pub fn client_error(&self, code: &str) {
        if let Some((_, c)) = self.client_errors.iter().find(|(name, _)| *name == code) {
            c.increment(1);
        }
    }

    /// Counts one HTTP connection closed by the deadline of `phase`.
    pub fn http_timeout(&self, phase: HttpTimeout) {
        self.http_timeouts[phase as usize].increment(1);
    }

    /// Counts one HTTP API answer.
    pub fn http_request(&self, status: u16) {
        let i = match status {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.http_requests[i].increment(1);
    }

    /// Prometheus text exposition of this node's registry, with the state gauges set to `state`
    /// (read by the caller from the owners of that state for this scrape).
    pub fn render(&self, state: &StateGauges) -> String {
        let _one_at_a_time = self.render_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.redis_connected
            .set(if state.broker_connected { 1.0 } else { 0.0 });
        self.broker_subscriptions
            .set(state.broker_subscriptions as f64);
        self.connections_host.set(state.hosts as f64);
        self.connections_viewer.set(state.viewers as f64);
        self.rooms.set(state.rooms as f64);
        self.max_connections.set(state.max_connections as f64);
        self.set_shards(&state.redis_shards);
        // The collector records through whichever recorder is current: this node's.
        metrics::with_local_recorder(&*self.recorder, || self.process.collect());
        self.handle.render()
    }

    /// Sets the per-shard gauges; a shard index no longer in the view (the cluster shrank) is set
    /// to NaN so that neither `== 0` nor `== 1` matches it.
    fn set_shards(&self, shards: &[bool]) {
        self.redis_shards.set(shards.len() as f64);
        let mut gauges = self.shard_up.lock().unwrap_or_else(|e| e.into_inner());
        let meta = Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));
        while gauges.len() < shards.len().min(MAX_SHARD_LABELS) {
            let index = gauges.len().to_string();
            let key = Key::from_parts(
                KeyName::from_const_str(REDIS_SHARD_UP),
                vec![Label::new("shard", index)],
            );
            gauges.push(self.recorder.register_gauge(&key, &meta));
        }
        for (i, g) in gauges.iter().enumerate() {
            g.set(match shards.get(i) {
                Some(true) => 1.0,
                Some(false) => 0.0,
                None => f64::NAN,
            });
        }
    }

    /// Drains histogram buffers; the exporter needs this called periodically when it does not run
    /// its own HTTP listener.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Interval of [`Metrics::run_upkeep`].
    pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    Key::from_parts(
        KeyName::from_const_str(name),
        labels
            .iter()
            .map(|(k, v)| Label::from_static_parts(k, v))
            .collect::<Vec<_>>(),
    )
}

fn describe(r: &PrometheusRecorder) {
    let d = |name: &'static str, unit: Option<Unit>, help: &'static str| match name {
        CONNECTIONS | ROOMS | BROKER_SUBSCRIPTIONS | REDIS_CONNECTED | REDIS_SHARD_UP
        | REDIS_SHARDS | BUILD_INFO | MAX_CONNECTIONS => r.describe_gauge(
            KeyName::from_const_str(name),
            unit,
            SharedString::const_str(help),
        ),
        FANOUT_LATENCY | FANOUT_RECIPIENTS | HISTORY_READ_LATENCY => r.describe_histogram(
            KeyName::from_const_str(name),
            unit,
            SharedString::const_str(help),
        ),
        _ => r.describe_counter(
            KeyName::from_const_str(name),
            unit,
            SharedString::const_str(help),
        ),
    };
    d(CONNECTIONS, None, "Current WebSocket connections by role.");
    d(ROOMS, None, "Rooms with at least one local member.");
    d(CONNECTIONS_OPENED, None, "WebSocket sessions accepted.");
    d(
        CONNECTIONS_CLOSED,
        None,
        "WebSocket sessions ended, by reason.",
    );
    d(
        CONNECTIONS_REFUSED,
        None,
        "Connection attempts refused before the upgrade, by reason.",
    );
    d(
        AUTH_FAILURES,
        None,
        "Tokens refused at an upgrade or a refresh, by reason.",
    );
    d(
        CONTROL_COMMANDS,
        None,
        "Moderation commands received on the control channel, by result.",
    );
    d(
        MESSAGES_PUBLISHED,
        None,
        "Messages accepted for publishing, by source.",
    );
    d(
        MESSAGES_DELIVERED,
        None,
        "Message frames written to client sockets.",
    );
    d(
        MESSAGES_DROPPED,
        None,
        "Messages or frames dropped, by reason.",
    );
    d(
        FANOUT_LATENCY,
        Some(Unit::Seconds),
        "Publish time until this node queued the frame to every local member.",
    );
    d(
        FANOUT_RECIPIENTS,
        None,
        "Local members one message was queued to.",
    );
    d(
        BROKER_MESSAGES_RECEIVED,
        None,
        "Messages received from the broker.",
    );
    d(
        BROKER_PUBLISH_ERRORS,
        None,
        "Publishes the broker refused or failed.",
    );
    d(
        BROKER_SUBSCRIPTIONS,
        None,
        "Room channels subscribed on the broker.",
    );
    d(
        REDIS_CONNECTED,
        None,
        "1 while the broker's connections are up.",
    );
    d(
        REDIS_SHARD_UP,
        None,
        "1 while the Redis shard's master answers, by shard index (one Redis: shard 0).",
    );
    d(
        REDIS_SHARDS,
        None,
        "Redis shards in the broker's view (one Redis: 1).",
    );
    d(
        REDIS_RECONNECTS,
        None,
        "Reconnections to Redis after a loss, by connection.",
    );
    d(
        CLIENT_ERRORS,
        None,
        "error events sent to clients, by code.",
    );
    d(HTTP_REQUESTS, None, "HTTP API answers by status class.");
    d(
        CONTROL_RATE_LIMITED,
        None,
        "Client control commands refused by the per-connection control rate limit.",
    );
    d(
        HTTP_TIMEOUTS,
        None,
        "HTTP connections closed by a header, keep-alive or body deadline, by phase.",
    );
    d(BUILD_INFO, None, "Build information; always 1.");
    d(
        MAX_CONNECTIONS,
        None,
        "Configured --max-connections (0: only the open-file limit applies).",
    );
    d(RECOVERIES, None, "Joins that asked to resume, by result.");
    d(
        HISTORY_REPLAYED,
        None,
        "Messages sent to joining clients from history.",
    );
    d(
        HISTORY_READ_LATENCY,
        Some(Unit::Seconds),
        "Time of one history read.",
    );
    d(
        PUBLISH_DUPLICATES,
        None,
        "Publishes skipped as repeats of an idempotency key.",
    );
}
