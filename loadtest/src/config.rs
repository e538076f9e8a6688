//! The load tester's own options (goose's are flattened beside them in `main.rs`): where to
//! connect, what the rooms look like, the phases of a run, and the pass/fail rules. Parsing and
//! validation only; nothing here opens a socket.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::rules::Rule;

/// Options of the live-rooms simulation. Every one has a `LOADTEST_…` environment variable too.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Live rooms (loadtest)")]
pub struct Options {
    /// Gateway URLs, comma-separated or repeated (ws://127.0.0.1:8080, or http://…, which means
    /// the same). Users are spread over them round robin: give one load balancer, or every node.
    /// Only loopback addresses (127.0.0.0/8, localhost, ::1) are accepted. Without it, goose's
    /// --host is the target.
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

    /// Source addresses to bind, round robin over connections: a comma-separated list of IPv4
    /// addresses or ranges in 127.0.0.0/8, such as `127.0.0.2-127.0.0.9`. Each address has its
    /// own ~28 000 ephemeral ports. Without it the kernel picks (127.0.0.1).
    #[arg(
        long = "bind",
        env = "LOADTEST_BIND",
        value_delimiter = ',',
        value_name = "ADDRS"
    )]
    pub bind: Vec<AddrRange>,

    /// Prefix of room names. Rooms are `PREFIX-gG-N`. Generators running side by side must use
    /// different prefixes (the default includes the process id), since each process accounts for
    /// its own rooms only.
    #[arg(long, env = "LOADTEST_ROOM_PREFIX", value_name = "PREFIX")]
    pub room_prefix: Option<String>,

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

    /// The generator reports itself as the bottleneck when its timer lag (p99) or its publishers'
    /// lag behind schedule (p99) exceeds this.
    #[arg(long, env = "LOADTEST_MAX_GENERATOR_LAG", value_parser = parse_duration, default_value = "25ms")]
    pub max_generator_lag: Duration,

    /// Write the JSON summary (delivered, expected, lost, latency percentiles, errors) here; it is
    /// printed on stdout at the end in any case.
    #[arg(long, env = "LOADTEST_SUMMARY_FILE", value_name = "PATH")]
    pub summary_file: Option<PathBuf>,

    /// A pass/fail rule on the summary; repeat for several. Metrics: `lost`, `loss` (% of
    /// expected), `delivered`, `connect-errors`, `closes` (unexpected), `publish-errors`,
    /// `unsent`, `error-rate` (%), latency `p50` `p90` `p99` `p99.9` `max` (units us, ms, s; bare
    /// is ms), `generator-lag`. Operators < <= > >= ==. Examples: `lost==0`, `p99<250ms`,
    /// `error-rate<0.1`. Any failing rule makes the process exit 1.
    #[arg(
        long = "expect",
        env = "LOADTEST_EXPECT",
        value_delimiter = ',',
        value_name = "RULE"
    )]
    pub rules: Vec<Rule>,
}

/// A set of identical rooms.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomGroup {
    /// How many rooms.
    pub rooms: usize,
    /// Hosts in each room.
    pub hosts: usize,
    /// Viewers in each room.
    pub viewers: usize,
    /// Per-host rate of this group; `None` takes --host-rate.
    pub host_rate: Option<f64>,
    /// Per-viewer rate of this group; `None` takes --viewer-rate.
    pub viewer_rate: Option<f64>,
}

impl FromStr for RoomGroup {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}` is not a room group: write ROOMSxHOSTSxVIEWERS[@HOST_RATE[/VIEWER_RATE]], e.g. 1x2x1000 or 100x1x5@5/0.2")
        };
        let (counts, rates) = match s.split_once('@') {
            Some((c, r)) => (c, Some(r)),
            None => (s, None),
        };
        let n: Vec<usize> = counts
            .split(['x', 'X'])
            .map(|p| p.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let [rooms, hosts, viewers] = n[..] else {
            return Err(bad());
        };
        if rooms == 0 || hosts + viewers == 0 {
            return Err(format!(
                "`{s}`: a group needs at least one room and one member"
            ));
        }
        let rate = |r: &str| -> Result<f64, String> {
            let v: f64 = r.trim().parse().map_err(|_| bad())?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(bad())
            }
        };
        let (host_rate, viewer_rate) = match rates {
            None => (None, None),
            Some(r) => match r.split_once('/') {
                Some((h, v)) => (Some(rate(h)?), Some(rate(v)?)),
                None => (Some(rate(r)?), None),
            },
        };
        Ok(RoomGroup {
            rooms,
            hosts,
            viewers,
            host_rate,
            viewer_rate,
        })
    }
}

impl fmt::Display for RoomGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.rooms, self.hosts, self.viewers)?;
        match (self.host_rate, self.viewer_rate) {
            (Some(h), Some(v)) => write!(f, "@{h}/{v}"),
            (Some(h), None) => write!(f, "@{h}"),
            _ => Ok(()),
        }
    }
}

/// An inclusive range of IPv4 loopback source addresses (one address is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    /// First address.
    pub first: Ipv4Addr,
    /// Last address, not below `first`.
    pub last: Ipv4Addr,
}

impl AddrRange {
    /// Every address of the range, in order.
    pub fn addrs(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl FromStr for AddrRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |a: &str| -> Result<Ipv4Addr, String> {
            let ip: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
            if !ip.is_loopback() {
                return Err(format!(
                    "`{ip}` is not a loopback address: load traffic stays on 127.0.0.0/8"
                ));
            }
            Ok(ip)
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if u32::from(last) < u32::from(first) {
            return Err(format!("`{s}`: the range ends before it starts"));
        }
        if u32::from(last) - u32::from(first) >= 4096 {
            return Err(format!("`{s}`: at most 4096 addresses"));
        }
        Ok(AddrRange { first, last })
    }
}

/// Parses `250ms`, `25s`, `2m`, `1h`, `5us`, or a plain number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 250ms, 20s, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * mult > 1e7 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Turns a target into the WebSocket base URL (`ws://host:port`), refusing anything that is not
/// on this machine's loopback.
pub fn normalize_target(raw: &str) -> Result<String, String> {
    let raw = raw.trim().trim_end_matches('/');
    let rest = raw
        .strip_prefix("ws://")
        .or_else(|| raw.strip_prefix("http://"))
        .ok_or_else(|| format!("`{raw}`: targets start with ws:// or http:// (no TLS)"))?;
    if rest.contains('/') || rest.contains('?') {
        return Err(format!(
            "`{raw}`: give the base URL only; the load tester adds /ws/ROOM"
        ));
    }
    let host = match rest.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ if rest.starts_with('[') && rest.ends_with(']') => rest,
        Some(_) if !rest.starts_with('[') => {
            return Err(format!("`{raw}`: bad port"));
        }
        _ => rest,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if !loopback {
        return Err(format!(
            "`{raw}`: only loopback targets (127.0.0.0/8, localhost, ::1) are allowed"
        ));
    }
    Ok(format!("ws://{rest}"))
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

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
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

    #[test]
    fn room_groups() {
        let g: RoomGroup = "1x2x1000".parse().unwrap();
        assert_eq!((g.rooms, g.hosts, g.viewers), (1, 2, 1000));
        assert_eq!((g.host_rate, g.viewer_rate), (None, None));
        let g: RoomGroup = "100x1x5@5/0.2".parse().unwrap();
        assert_eq!((g.host_rate, g.viewer_rate), (Some(5.0), Some(0.2)));
        assert_eq!(g.to_string(), "100x1x5@5/0.2");
        let g: RoomGroup = "3x0x7@4".parse().unwrap();
        assert_eq!((g.host_rate, g.viewer_rate), (Some(4.0), None));
        for bad in [
            "",
            "1x2",
            "0x1x1",
            "1x0x0",
            "ax1x1",
            "1x1x1@-1",
            "1x1x1@x/1",
        ] {
            assert!(bad.parse::<RoomGroup>().is_err(), "{bad}");
        }
    }

    #[test]
    fn address_ranges() {
        let r: AddrRange = "127.0.0.2-127.0.0.4".parse().unwrap();
        let all: Vec<String> = r.addrs().map(|a| a.to_string()).collect();
        assert_eq!(all, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
        assert_eq!("127.0.0.9".parse::<AddrRange>().unwrap().addrs().count(), 1);
        assert!("10.0.0.1".parse::<AddrRange>().is_err());
        assert!("127.0.0.4-127.0.0.2".parse::<AddrRange>().is_err());
    }

    #[test]
    fn targets_stay_on_loopback() {
        assert_eq!(
            normalize_target("http://127.0.0.1:8080/").unwrap(),
            "ws://127.0.0.1:8080"
        );
        assert_eq!(
            normalize_target("ws://localhost:80").unwrap(),
            "ws://localhost:80"
        );
        assert_eq!(normalize_target("ws://[::1]:80").unwrap(), "ws://[::1]:80");
        assert!(normalize_target("ws://127.0.0.1:8080/ws/x").is_err());
        assert!(normalize_target("ws://192.168.1.1:80").is_err());
        assert!(normalize_target("ws://example.com:80").is_err());
        assert!(normalize_target("wss://127.0.0.1:443").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert!(parse_duration("soon").is_err());
    }
}
