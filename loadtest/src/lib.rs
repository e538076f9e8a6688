//! Load tester for the gateway, built on goose: simulated hosts and viewers in live rooms, with
//! end-to-end latency, loss and order measured per message, against any deployment (`ws://` or
//! `wss://`, tokens, the HTTP API), from one generator or several (`--shard`, `loadtest merge`).
//! `docs/loadtest.md` is the manual.
//!
//! # Layout
//! Modules point one way: plain values at the bottom, the run at the top.
//! - `main.rs` — the binary: `loadtest [OPTIONS]` runs, `loadtest merge FILES` merges; exit codes.
//! - [`spec`] — plain shared values (role, room group, address range, shard); imports nothing.
//! - [`rules`] — `--expect` rules judged on plain [`rules::Observations`].
//! - [`config`] — our options (`--target`, `--rooms`, rates, phases, TLS, tokens, shard, rules).
//! - [`target`] — target URLs and `--resolve`; [`tls`] — the rustls client configuration;
//!   [`token`] — minted or file tokens for `--auth jwt` gateways.
//! - [`plan`] — the population (seats, this shard's share), rooms' ledgers, and the phases.
//! - [`personas`] — host and viewer as goose scenarios; [`user`] — a goose user's life
//!   (join, tick, leave) with its batch of members (`--members-per-user`), and the reconnect
//!   policy.
//! - [`shared`] — what every user of the process shares; [`conductor`] — the window's timers.
//! - [`member`] — a member's identity across connections (seat, schedule, sequence
//!   numbers); [`book`] — its books (ledgers, resume position, unacknowledged publishes);
//!   [`session`] — one connection's task, which feeds them; [`row`] — what connections and
//!   attempts leave for goose's rows; [`api`] — the HTTP API publishers.
//! - [`ws`] — the client side of the wire contract: connect, frames, events; `ws/handshake.rs`
//!   is the client upgrade (request, `101` check), `ws/socket.rs` an established connection's
//!   frames (read unmasked, written masked, small buffers), `ws/scan.rs` reads the gateway's
//!   `message` events without a full JSON parse.
//! - [`lists`] — the member-list check (`--lists`): a connection's view of its room's list as a
//!   count and a fingerprint, and the truth it is judged against (plain values, below [`ws`]).
//! - [`hooks`] — the webhook receiver (`--webhook-listen`): signature, deduplication, the
//!   rooms' events; its `hooks/judge.rs` judges them at the end of the run.
//! - [`ledger`] — gap, duplicate and reorder detection per publisher.
//! - [`stats`] — histograms, counters and the per-second timeline; [`probe`] — the generator
//!   watching itself; [`live`] — the live line.
//! - [`summary`] — the JSON summary (versioned) and the figures derived from it; its
//!   `summary/merge.rs` adds shards' summaries up, `summary/text.rs` prints the end-of-run block;
//!   [`report`] — the HTML report with charts.

pub mod api;
pub mod book;
pub mod conductor;
pub mod config;
pub mod hooks;
pub mod ledger;
pub mod lists;
pub mod live;
pub mod member;
pub mod personas;
pub mod plan;
pub mod probe;
pub mod report;
pub mod row;
pub mod rules;
pub mod session;
pub mod shared;
pub mod spec;
pub mod stats;
pub mod summary;
pub mod target;
pub mod tls;
pub mod token;
pub mod user;
pub mod ws;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use goose::config::GooseConfiguration;
use goose::prelude::*;

use crate::config::Options;
use crate::plan::{Plan, Role, Schedule};
use crate::rules::Rule;
pub use crate::shared::Shared;
use crate::stats::Stats;
use crate::summary::{Continuity, Histograms, Point, PresenceCheck, RoomFigures, Summary};
use crate::token::{Minter, Tokens};

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every rule held (or there were none).
    Pass,
    /// A rule (ours, a built-in one such as `joined>0`, or goose's `--threshold`) failed.
    Fail,
}

/// A command line the load tester refuses: an invalid option or combination of options that
/// clap cannot see. `main.rs` exits 2 on it, as it does on clap's own errors (3 is for a run
/// that could not start).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Stops the run if users stop making first attempts (goose starting users too slowly, or fewer
/// users than members), so that a run always ends by itself.
fn spawn_watchdog(shared: Arc<Shared>) {
    let patience = shared.opts.connect_timeout + Duration::from_secs(60);
    tokio::spawn(async move {
        let mut last = (0, Instant::now());
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if shared.schedule.window().is_some() {
                return;
            }
            let n = shared.schedule.first_attempts();
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > patience {
                goose::trigger_killswitch(&format!(
                    "loadtest watchdog: only {n} members made a first attempt in {patience:?}"
                ));
                return;
            }
        }
    });
}

/// How members are put in goose users.
struct Batching {
    /// Members per goose user.
    size: usize,
    /// Between two members' first attempts within one user.
    interval: Duration,
}

/// Puts up to `--members-per-user` members of one role in each goose user, and translates goose's
/// user count and hatch rate so that the members and the member hatch rate asked for are what
/// happens: goose starts `ceil(hosts / K) + ceil(viewers / K)` users at `rate / K` per second,
/// and each user starts its members one `1 / rate` apart.
fn batching(
    goose_config: &mut GooseConfiguration,
    opts: &Options,
    hosts: usize,
    viewers: usize,
) -> anyhow::Result<Batching> {
    let population = hosts + viewers;
    let size = opts.batch_size(population);
    goose_config.users = Some(hosts.div_ceil(size) + viewers.div_ceil(size));
    // --increase-time spreads the users over a time: the members keep that pace too.
    let over = goose_config
        .increase_time
        .as_deref()
        .and_then(goose::util::parse_timespan)
        .filter(|s| *s > 0);
    let interval = match over {
        Some(secs) => Duration::from_secs(secs as u64) / population.max(1) as u32,
        None => {
            let rate: f64 = goose_config
                .increase_rate
                .as_deref()
                .or(Some("1"))
                .and_then(|r| r.trim().parse().ok())
                .filter(|r: &f64| *r > 0.0 && r.is_finite())
                .ok_or_else(|| UsageError("--increase-rate: a rate above 0".into()))?;
            if size > 1 {
                goose_config.increase_rate = Some(format!("{}", rate / size as f64));
            }
            Duration::from_secs_f64(1.0 / rate)
        }
    };
    Ok(Batching { size, interval })
}

/// FNV-1a of the room prefix: the run id every shard of a distributed run derives alike.
fn run_id_of(prefix: &str) -> u32 {
    prefix.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn tokens(opts: &Options) -> anyhow::Result<Tokens> {
    let with = |m: Minter| {
        m.with(
            opts.jwt_ttl,
            opts.jwt_audience.clone(),
            opts.jwt_issuer.clone(),
        )
    };
    Ok(
        if let Some((secret, kid)) = opts.hmac_signing_key().map_err(UsageError)? {
            Tokens::Mint(Box::new(with(Minter::hmac(
                secret.as_bytes(),
                opts.jwt_kid.clone().or(kid),
            ))))
        } else if let Some(path) = &opts.jwt_private_key {
            let pem = std::fs::read(path)
                .with_context(|| format!("--jwt-private-key {}", path.display()))?;
            Tokens::Mint(Box::new(with(
                Minter::private_key(&pem, opts.jwt_kid.clone()).map_err(anyhow::Error::msg)?,
            )))
        } else if let Some(path) = &opts.token_file {
            Tokens::from_file(path).map_err(anyhow::Error::msg)?
        } else {
            Tokens::None
        },
    )
}

/// Runs a load test: goose with our scenarios, then our summary, reports and rules.
pub async fn run(mut goose_config: GooseConfiguration, opts: Options) -> anyhow::Result<Outcome> {
    opts.validate().map_err(UsageError)?;
    let shard = opts.resolved_shard().map_err(UsageError)?;
    if goose_config.iterations.is_some() {
        return Err(
            UsageError("--iterations does not apply: the run's phases end it".into()).into(),
        );
    }
    if std::env::var_os("LOADTEST_JWT_HMAC_SECRET").is_some() {
        eprintln!("loadtest: LOADTEST_JWT_HMAC_SECRET is deprecated: set GATEWAY_JWT_HMAC_SECRETS, the gateway's variable (same secrets, KID=SECRET,…)");
    }
    if goose_config.increase_rate.is_none() && goose_config.increase_time.is_none() {
        goose_config.increase_rate = Some("500".into());
    }
    // Connection rows from the warm-up are what we want to keep; per-tick transaction rows mean
    // nothing; a Controller changing the user count would break the accounting.
    goose_config.no_reset_metrics = true;
    goose_config.no_transaction_metrics = true;
    goose_config.no_scenario_metrics = true;
    goose_config.no_telnet = true;
    if !opts.goose_output {
        goose_config.no_print_metrics = true;
        goose_config.no_error_summary = true;
        if goose_config.verbose == 0 {
            goose_config.quiet = goose_config.quiet.max(1);
        }
    }

    let mut raw_targets = opts.targets.clone();
    if raw_targets.is_empty() {
        match &goose_config.host {
            Some(h) => raw_targets.push(h.clone()),
            None => {
                return Err(UsageError(
                    "give --target ws://HOST:PORT or wss://HOST:PORT (or goose's --host)".into(),
                )
                .into())
            }
        }
    }
    let mut targets = Vec::new();
    for t in &raw_targets {
        target::parse(t).map_err(UsageError)?;
        targets.push(target::resolve(t, &opts.resolve).map_err(anyhow::Error::msg)?);
    }
    if goose_config.host.is_none() {
        goose_config.host = Some(targets[0].http_url());
    }
    let binds: Vec<Ipv4Addr> = opts.bind.iter().flat_map(|r| r.addrs()).collect();
    if !binds.is_empty() && targets.iter().any(|t| t.addr.is_ipv6()) {
        return Err(
            UsageError("--bind takes IPv4 addresses; IPv6 targets cannot use them".into()).into(),
        );
    }
    let tls = tls::client_config(&opts.ca_files, opts.insecure).map_err(anyhow::Error::msg)?;
    if opts.insecure {
        eprintln!("loadtest: --insecure: TLS certificates are not checked");
    }

    let prefix = opts
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("lt{}", std::process::id()));
    let run_id = if shard.is_split() {
        run_id_of(&prefix)
    } else {
        fastrand::u32(..)
    };
    let plan = Plan::new(&opts.resolved_groups(), &prefix, targets, binds, shard);
    let (hosts, viewers) = (plan.host_count(), plan.viewer_count());
    let population = hosts + viewers;
    if population == 0 {
        return Err(UsageError(format!(
            "shard {shard} has no member: fewer members than shards"
        ))
        .into());
    }
    match goose_config.users {
        None => {}
        Some(u) if u == population => {}
        Some(u) => {
            return Err(UsageError(format!(
                "--users {u} does not match the rooms ({population} members); leave --users out"
            ))
            .into())
        }
    }
    let batch = batching(&mut goose_config, &opts, hosts, viewers)?;
    let mut shared = Shared {
        schedule: Schedule::new(population, opts.settle, opts.measure, opts.drain)
            .with_start_at(opts.start_at),
        plan,
        stats: Arc::default(),
        run_id,
        prefix: prefix.clone(),
        tokens: tokens(&opts)?,
        dialer: ws::Dialer {
            tls: Arc::new(tls.clone()),
        },
        http: None,
        filler: "x".repeat(opts.message_size),
        deliver_row: format!("deliver 1/{}", opts.deliver_sample),
        usage: Mutex::new(None),
        start_rss_mib: probe::rss_mib(),
        truth: lists::Truth::default(),
        hooks: None,
        members_per_user: batch.size,
        hatch_interval: batch.interval,
        opts,
    };
    shared.truth = lists::Truth::new(shared.plan.rooms.len());
    let hooks_stop = tokio_util::sync::CancellationToken::new();
    let _stop_hooks = hooks_stop.clone().drop_guard();
    if let Some(addr) = shared.opts.webhook_listen {
        let secret = shared.opts.webhook_secret.clone().unwrap_or_default();
        let receiver = Arc::new(hooks::Receiver::new(&secret, &prefix, shared.opts.lists));
        let local = receiver
            .clone()
            .serve(addr, hooks_stop.clone())
            .await
            .with_context(|| format!("--webhook-listen {addr}"))?;
        eprintln!("loadtest: webhook receiver on http://{local}/");
        shared.hooks = Some(receiver);
    }
    if shared.opts.api_publish_rate > 0.0 {
        shared.http = Some(api::client(&shared, tls)?);
    }
    let shared = Arc::new(shared);
    eprintln!(
        "loadtest: {} rooms, {hosts} hosts, {viewers} viewers ({population} connections, {} goose users of up to {} members{}) → {}; run {run_id:08x}, rooms {prefix}-*",
        shared.plan.rooms.len(),
        hosts.div_ceil(batch.size) + viewers.div_ceil(batch.size),
        batch.size,
        if shard.is_split() {
            format!(", shard {shard}")
        } else {
            String::new()
        },
        shared
            .plan
            .targets
            .iter()
            .map(|t| t.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut attack = GooseAttack::initialize_with_config(goose_config)?
        .set_client_builder_without_cookies(
            goose::client::GooseClientBuilder::new().without_cookies(),
        )?;
    let k = batch.size;
    if hosts > 0 {
        attack =
            attack.register_scenario(personas::scenario(&shared, Role::Host, hosts.div_ceil(k))?);
    }
    if viewers > 0 {
        attack = attack.register_scenario(personas::scenario(
            &shared,
            Role::Viewer,
            viewers.div_ceil(k),
        )?);
    }
    spawn_watchdog(shared.clone());
    live::spawn(shared.clone(), population);
    let goose_failed = match attack.execute().await {
        Ok(_) => false,
        Err(GooseError::ThresholdsFailed { .. }) => true,
        Err(e) => return Err(e.into()),
    };

    if let Some(hooks) = &shared.hooks {
        hooks.settle(shared.opts.webhook_grace).await;
    }
    let mut summary = collect(&shared);
    summary.judge(&shared.opts.rules);
    let outcome = publish(
        &summary,
        shared.opts.summary_file.as_deref(),
        shared.opts.html_report.as_deref(),
    )?;
    if goose_failed {
        println!("goose thresholds (--threshold) failed");
        return Ok(Outcome::Fail);
    }
    Ok(outcome)
}

/// Prints the summary block (one verdict line per rule), writes the JSON summary (or prints it)
/// and the HTML report.
fn publish(
    summary: &Summary,
    json_file: Option<&Path>,
    html: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let json = serde_json::to_string_pretty(summary)?;
    println!("\n{}", summary.human());
    match json_file {
        Some(path) => std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{json}"),
    }
    if let Some(path) = html {
        std::fs::write(path, report::html(summary))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if summary.pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    })
}

/// `loadtest merge`: adds generators' summaries into one and judges it, with `rules` or, when
/// none are given, the rules the generators ran with.
pub fn merge(
    files: &[PathBuf],
    rules: &[Rule],
    json_file: Option<&Path>,
    html: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let mut parts = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        let s: Summary = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a load tester summary", f.display()))?;
        parts.push(s);
    }
    let mut merged = Summary::merge(parts).map_err(anyhow::Error::msg)?;
    let rules: Vec<Rule> = if rules.is_empty() {
        merged
            .expect
            .iter()
            .map(|r| r.parse().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?
    } else {
        rules.to_vec()
    };
    merged.judge(&rules);
    publish(&merged, json_file, html)
}

/// The webhook receiver's counters and the judge's findings.
fn webhook_figures(r: &hooks::Receiver) -> summary::WebhookCheck {
    let c = &r.counters;
    let j = r.judge();
    summary::WebhookCheck {
        enabled: true,
        received: Stats::get(&c.received),
        bad_signature: Stats::get(&c.bad_signature),
        duplicates: Stats::get(&c.duplicates),
        missing: j.missing,
        out_of_order: j.out_of_order,
        unexpected: j.unexpected,
        ignored: Stats::get(&c.foreign) + Stats::get(&c.overflow),
        unseen: j.unseen,
        rooms: j.rooms,
        keys: j.keys,
    }
}

fn p99(h: &hdrhistogram::Histogram<u64>) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(0.99)
    }
}

/// Reads the totals once every user has left.
pub fn collect(shared: &Shared) -> Summary {
    let s: &Stats = &shared.stats;
    let opts = &shared.opts;
    let window = shared.schedule.window();
    let usage = *shared.usage.lock().unwrap_or_else(|p| p.into_inner());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // The runtime's worker threads (`--threads`).
    let threads = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(cores);
    let histograms = Histograms {
        latency_us: s.e2e.merged(),
        fanout_us: s.fanout.merged(),
        publish_lag_us: s.publish_lag.merged(),
        connect_us: s.connect.merged(),
        join_us: s.join.merged(),
        timer_lag_us: s.timer_lag.merged(),
    };
    let mut reasons = Vec::new();
    let max_lag = opts.max_generator_lag.as_micros() as u64;
    let timer_p99 = p99(&histograms.timer_lag_us);
    if timer_p99 > max_lag {
        reasons.push(format!(
            "its timers fired {:.1} ms late (p99): its process is starved of CPU (by its own load, or by other processes: see load_average)",
            timer_p99 as f64 / 1e3
        ));
    }
    // Publishers behind schedule are the generator's fault only when its own timers are late
    // too; with timers on time, the gateway did not take the writes at once (back-pressure, a
    // node or its broker away), which is the gateway's figure, not a generator bottleneck.
    let lag_p99 = p99(&histograms.publish_lag_us);
    let mut notes = Vec::new();
    if lag_p99 > max_lag {
        let line = format!(
            "publishers wrote {:.1} ms behind schedule (p99)",
            lag_p99 as f64 / 1e3
        );
        if timer_p99 > max_lag {
            reasons.push(format!("{line}: generator overloaded"));
        } else {
            notes.push(format!(
                "{line} with the generator's timers on time: the gateway did not take the writes at once"
            ));
        }
    }
    if let Some(reason) = usage.and_then(|u| probe::cpu_saturated(u.cpu_percent, threads, cores)) {
        reasons.push(reason);
    }
    let rooms = shared
        .plan
        .rooms
        .iter()
        .map(|r| RoomFigures {
            name: r.name.clone(),
            members_from_start: Stats::get(&r.members_from_start),
            delivered: Stats::get(&r.delivered),
            published: r
                .published
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        })
        .collect();
    let timeline = s
        .timeline
        .merged()
        .into_iter()
        .map(|(t, sec)| Point {
            t,
            connected: sec.connected,
            sent: sec.sent,
            received: sec.received,
            expected: 0,
            delivered: sec.delivered,
            lost: 0,
            p50_us: 0,
            p99_us: 0,
            max_us: 0,
            latency: sec.latency,
        })
        .collect();
    let errors_by_code = s.error_events.snapshot();
    let mut summary = Summary {
        run: summary::RunInfo {
            run_id: shared.run_id,
            rooms_spec: opts.groups.iter().map(|g| g.to_string()).collect(),
            rooms: shared.plan.rooms.len(),
            hosts: shared.plan.host_count(),
            viewers: shared.plan.viewer_count(),
            targets: shared.plan.targets.iter().map(|t| t.url.clone()).collect(),
            source_addresses: shared.plan.binds.len(),
            measure_s: window.map(|w| w.measure().as_secs_f64()).unwrap_or(0.0),
            drain_s: opts.drain.as_secs_f64(),
            window_start_unix_us: window.map(|w| w.start_unix_us).unwrap_or(0),
            complete: shared.schedule.complete.load(Ordering::Acquire),
            shard: shared.plan.shard,
            generators: 1,
        },
        connections: summary::Connections {
            attempts: Stats::get(&s.connect_attempts),
            joined: Stats::get(&s.joined),
            reconnects: Stats::get(&s.reconnects),
            errors_by_cause: s.connect_errors.snapshot(),
            closes_by_code: s.closes.snapshot(),
            ..Default::default()
        },
        messages: summary::Messages {
            published: Stats::get(&s.published),
            api_published: Stats::get(&s.api_published),
            unsent: Stats::get(&s.unsent),
            publish_errors: errors_by_code.values().sum::<u64>()
                + Stats::get(&s.publish_write_errors)
                + s.api_errors.total(),
            errors_by_code,
            api_errors_by_cause: s.api_errors.snapshot(),
            duplicates: Stats::get(&s.duplicates),
            reordered: Stats::get(&s.reordered),
            gaps: Stats::get(&s.gaps),
            open_holes: Stats::get(&s.open_holes),
            stale: Stats::get(&s.stale),
            late_member_deliveries: Stats::get(&s.delivered_late_members),
            after_drain: Stats::get(&s.after_drain),
            before_welcome: Stats::get(&s.before_welcome),
            foreign: Stats::get(&s.foreign),
            ..Default::default()
        },
        continuity: Continuity {
            offsets_seen: Stats::get(&s.numbered_welcomes) > 0,
            resumes: Stats::get(&s.resumes),
            incomplete: Stats::get(&s.resumes_incomplete),
            recovered: Stats::get(&s.recovered),
            offset_duplicates: Stats::get(&s.offset_duplicates),
            offset_reorders: Stats::get(&s.offset_reorders),
            acks: Stats::get(&s.acks),
            ack_duplicates: Stats::get(&s.ack_duplicates),
            resent: Stats::get(&s.resent),
            unacked_dropped: Stats::get(&s.unacked_dropped),
        },
        presence: PresenceCheck {
            checked: Stats::get(&s.presence_checked),
            wrong: Stats::get(&s.presence_wrong),
            missing: Stats::get(&s.presence_missing),
        },
        lists: summary::ListsCheck {
            checked: Stats::get(&s.lists_checked),
            wrong: Stats::get(&s.lists_wrong),
            missing: Stats::get(&s.lists_missing),
            over_limit: Stats::get(&s.lists_over_limit),
            rereads: Stats::get(&s.lists_rereads),
        },
        webhooks: shared
            .hooks
            .as_deref()
            .map(webhook_figures)
            .unwrap_or_default(),
        generator: summary::Generator {
            cpu_percent: usage.map(|u| (u.cpu_percent * 10.0).round() / 10.0),
            cpu_s: usage.map(|u| u.cpu_seconds),
            received: usage.map(|u| u.received).unwrap_or(0),
            rss_growth_mib: probe::peak_rss_mib()
                .zip(shared.start_rss_mib)
                .map(|(peak, start)| (peak - start).max(0.0)),
            cores,
            threads,
            peak_rss_mib: probe::peak_rss_mib().map(|m| m.round()),
            load_average: probe::load_average(),
            bottleneck: !reasons.is_empty(),
            reasons,
            notes,
            ..Default::default()
        },
        histograms,
        rooms,
        timeline,
        ..Summary::default()
    };
    summary.derive();
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_of_one_run_share_its_id() {
        assert_eq!(run_id_of("staging-1"), run_id_of("staging-1"));
        assert_ne!(run_id_of("staging-1"), run_id_of("staging-2"));
    }
}
