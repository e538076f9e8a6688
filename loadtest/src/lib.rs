//! Load tester for the gateway, built on goose: simulated hosts and viewers in live rooms, with
//! end-to-end latency, loss and order measured per message. `docs/loadtest.md` is the manual.
//!
//! # Layout
//! - `main.rs` — the binary: parses goose's options and ours, calls [`run`], maps the exit code.
//! - [`config`] — our options (`--target`, `--rooms`, rates, phases, `--bind`, `--expect`).
//! - [`plan`] — the population (seats), rooms' ledgers, and the phases of a run (warm-up, settle,
//!   measured window, drain).
//! - [`personas`] — host and viewer as goose scenarios; [`user`] — a goose user's life
//!   (join, tick, leave) and reconnect policy.
//! - [`session`] — one connection's task: reads frames, publishes on schedule, keeps the ledger.
//! - [`ws`] — the client side of the wire contract: connect from a source address, frames.
//! - [`ledger`] — gap, duplicate and reorder detection per publisher.
//! - [`stats`] — histograms and counters; [`probe`] — the generator watching itself.
//! - [`summary`] — the JSON summary and its printout; [`rules`] — pass/fail rules.

pub mod config;
pub mod ledger;
pub mod personas;
pub mod plan;
pub mod probe;
pub mod rules;
pub mod session;
pub mod stats;
pub mod summary;
pub mod user;
pub mod ws;

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use goose::config::GooseConfiguration;
use goose::prelude::*;

use crate::config::Options;
use crate::plan::{Plan, Role, Schedule, Window};
use crate::stats::Stats;
use crate::summary::Summary;

/// Everything the users of one process share.
pub struct Shared {
    /// Our options.
    pub opts: Options,
    /// Seats, rooms and targets.
    pub plan: Plan,
    /// Phases.
    pub schedule: Schedule,
    /// Measurements.
    pub stats: Stats,
    /// Random id in every message, to tell ours from anyone else's.
    pub run_id: u32,
    /// The padding string of every message (`--message-size` bytes).
    pub filler: String,
    /// Name of the sampled delivery row (`deliver 1/N`).
    pub deliver_row: String,
    /// Generator CPU, left by the probe.
    pub usage: probe::UsageSlot,
}

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every rule held (or there were none).
    Pass,
    /// A rule (ours or goose's `--threshold`) failed.
    Fail,
}

/// Once the window is fixed: start the generator probe, and end the run when the drain is over.
pub fn spawn_conductor(shared: Arc<Shared>, window: Window) {
    log::info!(
        "all {} members made their first attempt; measured window starts in {:?}",
        shared.schedule.first_attempts(),
        window.start.saturating_duration_since(Instant::now())
    );
    probe::spawn(shared.clone(), window);
    tokio::spawn(async move {
        tokio::time::sleep_until(window.end.into()).await;
        log::info!("measured window over; draining");
        tokio::time::sleep_until(window.drain_end.into()).await;
        shared.schedule.complete.store(true, Ordering::Release);
        goose::trigger_killswitch("loadtest: measured window and drain complete");
    });
}

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

/// Resolves a target's address (loopback only, checked again after resolution).
fn resolve(url: &str) -> anyhow::Result<SocketAddr> {
    let hostport = url.trim_start_matches("ws://");
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| p.parse::<u16>().is_ok() && (!h.starts_with('[') || h.ends_with(']')))
    {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {url}"))?
        .find(|a| a.ip().is_loopback())
        .with_context(|| format!("{url} does not resolve to a loopback address"))?;
    Ok(addr)
}

/// Runs a load test: goose with our scenarios, then our summary and rules.
pub async fn run(mut goose_config: GooseConfiguration, opts: Options) -> anyhow::Result<Outcome> {
    opts.validate().map_err(anyhow::Error::msg)?;
    let population = opts.population();
    match goose_config.users {
        None => goose_config.users = Some(population),
        Some(u) if u == population => {}
        Some(u) => {
            bail!("--users {u} does not match the rooms ({population} members); leave --users out")
        }
    }
    if goose_config.increase_rate.is_none() && goose_config.increase_time.is_none() {
        goose_config.increase_rate = Some("500".into());
    }
    if goose_config.iterations.is_some() {
        bail!("--iterations does not apply: the run's phases end it");
    }
    // Connection rows from the warm-up are what we want to keep; per-tick transaction rows mean
    // nothing; a Controller changing the user count would break the accounting.
    goose_config.no_reset_metrics = true;
    goose_config.no_transaction_metrics = true;
    goose_config.no_scenario_metrics = true;
    goose_config.no_telnet = true;

    let mut raw_targets = opts.targets.clone();
    if raw_targets.is_empty() {
        match &goose_config.host {
            Some(h) => raw_targets.push(h.clone()),
            None => bail!("give --target ws://127.0.0.1:PORT (or goose's --host)"),
        }
    }
    let mut targets = Vec::new();
    for t in &raw_targets {
        let url = config::normalize_target(t).map_err(anyhow::Error::msg)?;
        let addr = resolve(&url)?;
        targets.push((url, addr));
    }
    if goose_config.host.is_none() {
        goose_config.host = Some(targets[0].0.replacen("ws://", "http://", 1));
    }
    let binds: Vec<Ipv4Addr> = opts.bind.iter().flat_map(|r| r.addrs()).collect();
    if !binds.is_empty() && targets.iter().any(|t| t.1.is_ipv6()) {
        bail!("--bind takes IPv4 addresses; IPv6 targets cannot use them");
    }

    let run_id = fastrand::u32(..);
    let prefix = opts
        .room_prefix
        .clone()
        .unwrap_or_else(|| format!("lt{}", std::process::id()));
    let plan = Plan::new(&opts.resolved_groups(), &prefix, targets, binds);
    let (hosts, viewers) = (plan.host_count(), plan.viewer_count());
    let shared = Arc::new(Shared {
        schedule: Schedule::new(population, opts.settle, opts.measure, opts.drain),
        plan,
        stats: Stats::default(),
        run_id,
        filler: "x".repeat(opts.message_size),
        deliver_row: format!("deliver 1/{}", opts.deliver_sample),
        usage: Mutex::new(None),
        opts,
    });
    eprintln!(
        "loadtest: {} rooms, {hosts} hosts, {viewers} viewers ({population} connections) → {}; run {run_id:08x}, rooms {prefix}-*",
        shared.plan.rooms.len(),
        shared
            .plan
            .targets
            .iter()
            .map(|t| t.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut attack = GooseAttack::initialize_with_config(goose_config)?
        .set_client_builder_without_cookies(
            goose::client::GooseClientBuilder::new().without_cookies(),
        )?;
    if hosts > 0 {
        attack = attack.register_scenario(personas::scenario(&shared, Role::Host, hosts)?);
    }
    if viewers > 0 {
        attack = attack.register_scenario(personas::scenario(&shared, Role::Viewer, viewers)?);
    }
    spawn_watchdog(shared.clone());
    let goose_failed = match attack.execute().await {
        Ok(_) => false,
        Err(GooseError::ThresholdsFailed { .. }) => true,
        Err(e) => return Err(e.into()),
    };

    let mut summary = Summary::collect(&shared);
    summary.judge(&shared.opts.rules);
    let json = serde_json::to_string_pretty(&summary)?;
    println!("\n{}", summary.human());
    match &shared.opts.summary_file {
        Some(path) => std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => println!("{json}"),
    }
    if goose_failed {
        println!("goose thresholds (--threshold) failed");
    }
    Ok(if summary.pass && !goose_failed {
        Outcome::Pass
    } else {
        Outcome::Fail
    })
}
