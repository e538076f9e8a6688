//! What every goose user of one process shares: the options, the plan and schedule, the
//! measurements, the run's identity, tokens and the ways to connect. Built once by `lib.rs`;
//! read by the users, their connections, the HTTP API publishers and the live line.

use std::sync::Arc;

use crate::config::Options;
use crate::hooks::Receiver;
use crate::lists::Truth;
use crate::plan::{Plan, Schedule};
use crate::stats::Stats;
use crate::token::Tokens;
use crate::{probe, ws};

/// Everything the users of one process share.
pub struct Shared {
    /// Our options.
    pub opts: Options,
    /// Seats, rooms and targets.
    pub plan: Plan,
    /// Phases.
    pub schedule: Schedule,
    /// Measurements.
    pub stats: Arc<Stats>,
    /// Id in every message, to tell ours from anyone else's: random, or derived from the room
    /// prefix in a sharded run so that every generator of it uses the same.
    pub run_id: u32,
    /// Room name prefix.
    pub prefix: String,
    /// Members' tokens.
    pub tokens: Tokens,
    /// How connections are opened.
    pub dialer: ws::Dialer,
    /// The HTTP API client (when `--api-publish-rate` is set).
    pub http: Option<reqwest::Client>,
    /// The padding string of every message (`--message-size` bytes).
    pub filler: String,
    /// Name of the sampled delivery row (`deliver 1/N`).
    pub deliver_row: String,
    /// Generator CPU, left by the probe.
    pub usage: probe::UsageSlot,
    /// The process's resident memory before its first connection, MiB: the base of the memory
    /// per member.
    pub start_rss_mib: Option<f64>,
    /// The member-list truth: this generator's connected members of each room (`--lists`).
    pub truth: Truth,
    /// The webhook receiver (`--webhook-listen`).
    pub hooks: Option<Arc<Receiver>>,
    /// Members each goose user carries (`--members-per-user`, resolved).
    pub members_per_user: usize,
    /// Between two members' first attempts in one goose user: one over the member hatch rate,
    /// so that members start at the rate asked for whatever the batch size.
    pub hatch_interval: std::time::Duration,
}
