//! Every metric this node exports: names, labels, buckets and help texts live here and nowhere else.
//!
//! Each [`Node`](crate::node::Node) owns its own Prometheus recorder instead of installing a global
//! one, so several nodes in one process (the integration tests) keep separate registries, and the
//! hot path increments pre-registered handles instead of looking keys up. The `node` label is a
//! global label of the recorder, so every series carries it. No label here is per room or per user:
//! label values come from small closed enums.

//!
//! The names, labels and buckets are [`names`] (re-exported here); this module registers and
//! renders them.

mod names;

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

pub use names::*;

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
    /// See [`WEBHOOK_LEASES`].
    pub webhook_leases: usize,
    /// See [`WEBHOOK_OLDEST_PENDING`], in seconds.
    pub webhook_oldest_pending: f64,
    /// See [`LIST_MEMBERS`].
    pub list_members: usize,
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
    /// See [`PRESENCE_UNCHANGED`].
    pub presence_unchanged: Counter,
    /// See [`RIDERS`].
    pub riders: Counter,
    /// See [`LIST_MEMBERS`].
    list_members: Gauge,
    /// See [`LIST_OVERFLOW`].
    pub list_overflow: Counter,
    /// See [`MEMBERS_DIFFS`].
    pub members_diffs: Counter,
    /// See [`MEMBERS_COMMANDS`].
    pub members_commands: Counter,
    /// See [`ROSTER_REAPS`].
    pub roster_reaps: Counter,
    /// See [`GAP_FILLS`]: filled, unreadable, too_large, overflow.
    gap_fills: [Counter; 4],
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
    /// See [`HISTORY_READS_TRUNCATED`].
    pub history_reads_truncated: Counter,
    /// See [`PUBLISH_DUPLICATES`].
    pub publish_duplicates: Counter,
    /// See [`CONTROL_RATE_LIMITED`].
    pub control_rate_limited: Counter,
    http_timeouts: [Counter; 3],
    /// The webhook dispatcher's series.
    pub webhooks: WebhookMetrics,
    webhook_leases: Gauge,
    webhook_oldest_pending: Gauge,
}

/// The webhook dispatcher's counters and histogram ([`crate::hooks`]).
#[derive(Clone)]
pub struct WebhookMetrics {
    /// See [`WEBHOOK_EVENTS`]: delivered, dead_letter.
    events: [Counter; 2],
    /// See [`WEBHOOK_ATTEMPTS`], by [`WebhookAttempt`].
    attempts: [Counter; 5],
    /// See [`WEBHOOK_LAG`].
    pub lag: Histogram,
    /// See [`WEBHOOK_EVENTS_DROPPED`].
    pub events_dropped: Counter,
    /// See [`WEBHOOK_WAKEUPS_DROPPED`].
    pub wakeups_dropped: Counter,
}

/// The `result` of one webhook request (see [`WEBHOOK_ATTEMPTS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookAttempt {
    /// 2xx.
    Accepted = 0,
    /// 4xx other than 408 and 429.
    Refused = 1,
    /// Any other status.
    Failed = 2,
    /// No answer within `--webhook-timeout`.
    Timeout = 3,
    /// No connection, TLS or I/O error.
    Unreachable = 4,
}

impl WebhookAttempt {
    /// Every result, in label order.
    pub const ALL: [WebhookAttempt; 5] = [
        Self::Accepted,
        Self::Refused,
        Self::Failed,
        Self::Timeout,
        Self::Unreachable,
    ];

    /// The `result` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Refused => "refused",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Unreachable => "unreachable",
        }
    }
}

impl WebhookMetrics {
    /// One request's result.
    pub fn attempt(&self, result: WebhookAttempt) {
        self.attempts[result as usize].increment(1);
    }

    /// An event every receiver accepted.
    pub fn delivered(&self) {
        self.events[0].increment(1);
    }

    /// An event moved to the dead letters.
    pub fn dead_lettered(&self) {
        self.events[1].increment(1);
    }
}

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
            .set_buckets_for_metric(Matcher::Full(WEBHOOK_LAG.into()), WEBHOOK_LAG_BUCKETS)
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
            presence_unchanged: counter(PRESENCE_UNCHANGED, &[]),
            riders: counter(RIDERS, &[]),
            list_members: gauge(LIST_MEMBERS, &[]),
            list_overflow: counter(LIST_OVERFLOW, &[]),
            members_diffs: counter(MEMBERS_DIFFS, &[]),
            members_commands: counter(MEMBERS_COMMANDS, &[]),
            roster_reaps: counter(ROSTER_REAPS, &[]),
            gap_fills: ["filled", "unreadable", "too_large", "overflow"]
                .map(|r| counter(GAP_FILLS, &[("result", r)])),
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
            history_reads_truncated: counter(HISTORY_READS_TRUNCATED, &[]),
            publish_duplicates: counter(PUBLISH_DUPLICATES, &[]),
            control_rate_limited: counter(CONTROL_RATE_LIMITED, &[]),
            http_timeouts: HttpTimeout::ALL
                .map(|p| counter(HTTP_TIMEOUTS, &[("phase", p.label())])),
            webhooks: WebhookMetrics {
                events: ["delivered", "dead_letter"]
                    .map(|r| counter(WEBHOOK_EVENTS, &[("result", r)])),
                attempts: WebhookAttempt::ALL
                    .map(|a| counter(WEBHOOK_ATTEMPTS, &[("result", a.label())])),
                lag: histogram(WEBHOOK_LAG),
                events_dropped: counter(WEBHOOK_EVENTS_DROPPED, &[]),
                wakeups_dropped: counter(WEBHOOK_WAKEUPS_DROPPED, &[]),
            },
            webhook_leases: gauge(WEBHOOK_LEASES, &[]),
            webhook_oldest_pending: gauge(WEBHOOK_OLDEST_PENDING, &[]),
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

    /// Counts one gap in a room's offsets: 0 filled, 1 unreadable, 2 too large, 3 overflow.
    pub fn gap_fill(&self, result: GapFill) {
        self.gap_fills[result as usize].increment(1);
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
        self.webhook_leases.set(state.webhook_leases as f64);
        self.webhook_oldest_pending
            .set(state.webhook_oldest_pending);
        self.list_members.set(state.list_members as f64);
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
        CONNECTIONS
        | ROOMS
        | BROKER_SUBSCRIPTIONS
        | REDIS_CONNECTED
        | REDIS_SHARD_UP
        | REDIS_SHARDS
        | BUILD_INFO
        | MAX_CONNECTIONS
        | WEBHOOK_LEASES
        | WEBHOOK_OLDEST_PENDING => r.describe_gauge(
            KeyName::from_const_str(name),
            unit,
            SharedString::const_str(help),
        ),
        FANOUT_LATENCY | FANOUT_RECIPIENTS | HISTORY_READ_LATENCY | WEBHOOK_LAG => r
            .describe_histogram(
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
        GAP_FILLS,
        None,
        "Gaps in a room's offsets seen by this node's subscription, by result.",
    );
    d(
        PRESENCE_UNCHANGED,
        None,
        "Presence events not sent: the member already had the room's counts.",
    );
    d(
        RIDERS,
        None,
        "Presence events and pings sent in the same write as a room message.",
    );
    d(
        LIST_MEMBERS,
        None,
        "Members this node lists across its listing rooms.",
    );
    d(
        LIST_OVERFLOW,
        None,
        "Members not listed: their room already lists --list-max-members from this node.",
    );
    d(
        MEMBERS_DIFFS,
        None,
        "members_diff events queued to listing members.",
    );
    d(MEMBERS_COMMANDS, None, "members commands answered.");
    d(
        ROSTER_REAPS,
        None,
        "Dead node instances this node reaped (counts and listed members removed).",
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
        HISTORY_READS_TRUNCATED,
        None,
        "History reads cut short by their byte budget.",
    );
    d(
        PUBLISH_DUPLICATES,
        None,
        "Publishes skipped as repeats of an idempotency key.",
    );
    d(
        WEBHOOK_EVENTS,
        None,
        "Lifecycle events finished by this node's webhook dispatcher, by result.",
    );
    d(WEBHOOK_ATTEMPTS, None, "Webhook requests sent, by result.");
    d(
        WEBHOOK_LAG,
        Some(Unit::Seconds),
        "Lifecycle event time until every webhook receiver accepted it.",
    );
    d(
        WEBHOOK_OLDEST_PENDING,
        Some(Unit::Seconds),
        "Age of the oldest event this node is delivering and not yet accepted.",
    );
    d(
        WEBHOOK_LEASES,
        None,
        "Rooms whose webhooks this node is delivering (leases held).",
    );
    d(
        WEBHOOK_EVENTS_DROPPED,
        None,
        "Lifecycle events lost before delivery (stream MAXLEN or memory bound).",
    );
    d(
        WEBHOOK_WAKEUPS_DROPPED,
        None,
        "Room wake-ups dropped on a full wake queue (left to the sweep).",
    );
}
