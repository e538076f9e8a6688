//! The room lifecycle webhooks' flags (`--webhook-*`, flattened into [`super::Config`]) and
//! their checks: a URL needs a secret (fail closed), secrets are not blank or short, URLs are
//! http(s) with a host, timers are sane. What they drive is [`crate::hooks`].

use std::time::Duration;

use clap::Args;

use super::{parse_duration, ConfigError, Secret};

/// Default of the hidden `--webhook-wake-queue`: rooms waiting to be woken.
pub const WEBHOOK_WAKE_QUEUE: usize = 4096;

/// The `--webhook-*` flags.
#[derive(Debug, Clone, Args)]
pub struct WebhookFlags {
    /// URLs (http or https; repeat the flag or a comma list) that receive the room lifecycle
    /// webhooks (`room.occupied`, `room.vacated`, `member.joined`, `member.left`; see
    /// docs/protocol.md, Webhooks): each event POSTed to every URL, at least once, in order per
    /// room. Without a URL no event is recorded and nothing is sent. Needs --webhook-secret.
    #[arg(
        long = "webhook-url",
        env = "GATEWAY_WEBHOOK_URLS",
        value_delimiter = ','
    )]
    pub urls: Vec<String>,

    /// Secrets (comma list, each at least 16 bytes) of the webhooks' `X-Gateway-Signature`: the
    /// first signs; list the next one first and the old one after it to rotate (receivers
    /// accept either meanwhile). Required with --webhook-url: the node refuses to start without.
    #[arg(
        long = "webhook-secret",
        env = "GATEWAY_WEBHOOK_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub secrets: Vec<Secret>,

    /// Time one webhook request may take (connect, send, answer) before it counts as failed and
    /// is retried.
    #[arg(long = "webhook-timeout", env = "GATEWAY_WEBHOOK_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,

    /// First wait before a failed webhook is retried; each further failure doubles it (with
    /// jitter) up to --webhook-retry-max.
    #[arg(long = "webhook-retry-min", env = "GATEWAY_WEBHOOK_RETRY_MIN", value_parser = parse_duration, default_value = "500ms")]
    pub retry_min: Duration,

    /// Longest wait between two attempts of a failing webhook.
    #[arg(long = "webhook-retry-max", env = "GATEWAY_WEBHOOK_RETRY_MAX", value_parser = parse_duration, default_value = "60s")]
    pub retry_max: Duration,

    /// Attempts after which an event that a receiver keeps refusing with a 4xx other than 408
    /// and 429 (a request it will never take) goes to the room's dead-letter stream instead of
    /// holding the room's later events back; 5xx, 408, 429, timeouts and refused connections are
    /// retried for as long as it takes.
    #[arg(
        long = "webhook-dead-letter-after",
        env = "GATEWAY_WEBHOOK_DEAD_LETTER_AFTER",
        default_value_t = 5
    )]
    pub dead_letter_after: u32,

    /// Rooms whose webhooks one node delivers at the same time (each room's events one after
    /// the other; more rooms wait their turn).
    #[arg(
        long = "webhook-concurrency",
        env = "GATEWAY_WEBHOOK_CONCURRENCY",
        default_value_t = 64
    )]
    pub concurrency: usize,

    /// Lifetime of a node's lease on a room's webhooks in Redis (renewed while it delivers): a
    /// node that dies is replaced within about this time plus three --webhook-sweep-interval.
    #[arg(long = "webhook-lease", env = "GATEWAY_WEBHOOK_LEASE", value_parser = parse_duration, default_value = "10s")]
    pub lease: Duration,

    /// Interval of the recovery sweep: the node's heartbeat, the rooms of nodes whose heartbeat
    /// expired, and this node's own leased rooms left without a delivery task.
    #[arg(long = "webhook-sweep-interval", env = "GATEWAY_WEBHOOK_SWEEP_INTERVAL", value_parser = parse_duration, default_value = "2s")]
    pub sweep_interval: Duration,

    /// Interval of the safety scan: a `SCAN` of every room's event stream (shard after shard in
    /// a Cluster) for undelivered events that no index points to (a lost wake-up, a full wake
    /// queue).
    #[arg(long = "webhook-scan-interval", env = "GATEWAY_WEBHOOK_SCAN_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub scan_interval: Duration,

    /// Rooms the wake queue holds (a full queue drops the wake-up, counted, and the scan finds
    /// the room). Hidden: only tests shrink it, to see the overflow's fallback.
    #[arg(long = "webhook-wake-queue", default_value_t = WEBHOOK_WAKE_QUEUE, hide = true)]
    pub wake_queue: usize,
}

impl WebhookFlags {
    /// At least one `--webhook-url`: events are recorded and delivered.
    pub fn enabled(&self) -> bool {
        self.urls().next().is_some()
    }

    /// The webhook URLs, blank entries skipped.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty())
    }

    /// The webhook secrets, the signing one first.
    pub fn secrets(&self) -> impl Iterator<Item = &str> {
        self.secrets.iter().map(|s| s.expose().trim())
    }
}

impl WebhookFlags {
    /// The webhook flags: a URL needs a secret (fail closed: unsigned events are never sent),
    /// secrets are not blank and not short, URLs are http(s) with a host, timers are sane.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for url in self.urls() {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => return bad(format!("--webhook-url `{url}` is not an http(s) URL")),
            }
        }
        if !self.secrets.is_empty() && self.secrets().any(|s| s.len() < 16) {
            return bad("--webhook-secret values must be at least 16 bytes (none blank)".into());
        }
        if !self.enabled() {
            return Ok(());
        }
        if self.secrets.is_empty() {
            return bad(
                "--webhook-url needs --webhook-secret: webhooks are always signed (the receiver \
                 verifies X-Gateway-Signature)"
                    .into(),
            );
        }
        if self.timeout.is_zero() || self.retry_min.is_zero() || self.retry_max < self.retry_min {
            return bad(
                "--webhook-timeout and --webhook-retry-min must not be zero, and \
                 --webhook-retry-max must be at least --webhook-retry-min"
                    .into(),
            );
        }
        if self.concurrency == 0 || self.dead_letter_after == 0 || self.wake_queue == 0 {
            return bad(
                "--webhook-concurrency and --webhook-dead-letter-after must be at least 1".into(),
            );
        }
        if self.lease < self.timeout * 2
            || self.sweep_interval.is_zero()
            || self.scan_interval < self.sweep_interval
        {
            return bad(
                "--webhook-lease must be at least twice --webhook-timeout, \
                 --webhook-sweep-interval not zero and --webhook-scan-interval at least the sweep"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use clap::Parser;

    #[test]
    fn webhooks_need_a_secret_and_sane_values() {
        let parse = |extra: &[&str]| {
            Config::try_parse_from([&["gateway"][..], extra].concat())
                .map_err(|e| e.to_string())?
                .validate()
                .map_err(|e| e.to_string())
        };
        assert!(!Config::defaults().webhooks.enabled(), "no URL, no events");
        let e = parse(&["--webhook-url", "https://backend.example/hooks"]).unwrap_err();
        assert!(e.contains("--webhook-secret"), "{e}");
        let secret = ["--webhook-secret", "0123456789abcdef"];
        let ok = |extra: &[&str]| parse(&[&secret[..], extra].concat());
        ok(&["--webhook-url", "https://backend.example/hooks"]).unwrap();
        ok(&[
            "--webhook-url",
            "http://10.0.0.7:8000/h,https://b.example/h",
        ])
        .unwrap();
        let c = Config::parse_from([
            "gateway",
            "--webhook-url",
            "http://a.example/h, https://b.example/h",
            "--webhook-secret",
            "0123456789abcdef,old-secret-0123456",
        ]);
        assert!(c.webhooks.enabled() && c.lifecycle_events());
        assert_eq!(c.webhooks.urls().count(), 2);
        assert_eq!(c.webhooks.secrets().next(), Some("0123456789abcdef"));
        assert!(
            !format!("{c:?}").contains("old-secret"),
            "secrets are not printed"
        );
        for bad in [
            &["--webhook-url", "ftp://a.example/h"][..],
            &["--webhook-url", "backend/hooks"],
            &[
                "--webhook-url",
                "https://a.example/h",
                "--webhook-secret",
                "short",
            ],
            &[
                "--webhook-url",
                "https://a.example/h",
                "--webhook-timeout",
                "0",
            ],
            &[
                "--webhook-url",
                "https://a.example/h",
                "--webhook-retry-max",
                "100ms",
            ],
            &[
                "--webhook-url",
                "https://a.example/h",
                "--webhook-concurrency",
                "0",
            ],
            &[
                "--webhook-url",
                "https://a.example/h",
                "--webhook-lease",
                "6s",
            ],
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
        assert!(parse(&["--webhook-secret", " "]).is_err(), "blank secret");
    }
}
