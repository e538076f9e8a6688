//! The `loadtest` binary: goose's options and ours on one command line, then [`loadtest::run`];
//! or `loadtest merge SUMMARY…` to add several generators' summaries into one
//! ([`loadtest::merge`]).
//! Exit status: 0 every rule held, 1 a rule failed (or no member ever joined), 2 a bad command
//! line (clap's errors and [`loadtest::UsageError`]: invalid options or combinations), 3 the run
//! could not start.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use goose::config::GooseConfiguration;
use loadtest::config::Options;
use loadtest::rules::Rule;
use loadtest::{Outcome, UsageError};

/// Simulates live rooms against gateway nodes: hosts publish on an open-loop schedule, viewers
/// receive and chat; measures connect results, loss, order and end-to-end latency. The run stops
/// by itself after its measured window and drain. `loadtest merge --help` for merging the
/// summaries of several generators. Manual: docs/loadtest.md.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, disable_version_flag = true)]
struct Cli {
    #[command(flatten)]
    goose: GooseConfiguration,
    #[command(flatten)]
    options: Options,
}

/// Adds the JSON summaries of a distributed run's generators (`--shard I/N`) into one summary,
/// as if one generator had made all the load, and judges the rules on the whole.
#[derive(Debug, Parser)]
#[command(name = "loadtest merge", version)]
struct MergeCli {
    /// The generators' summary files (`--summary-file` of each).
    #[arg(required = true, value_name = "SUMMARY")]
    files: Vec<PathBuf>,
    /// Rules to judge the whole on (same syntax as the run's); without any, the rules the
    /// generators ran with.
    #[arg(long = "expect", value_delimiter = ',', value_name = "RULE")]
    rules: Vec<Rule>,
    /// Write the merged JSON summary here (else it is printed).
    #[arg(long, value_name = "PATH")]
    summary_file: Option<PathBuf>,
    /// Write the merged HTML report here.
    #[arg(long, value_name = "PATH")]
    html_report: Option<PathBuf>,
}

fn exit(r: anyhow::Result<Outcome>) -> ExitCode {
    match r {
        Ok(Outcome::Pass) => ExitCode::SUCCESS,
        Ok(Outcome::Fail) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(3)
            }
        }
    }
}

/// mimalloc, as the gateway: a generator holds tens of thousands of members' small, long-lived
/// allocations (task cells, socket buffers, books) and frees one or more small ones per received
/// message; against the system allocator it cut the generator's resident memory per member and
/// its CPU per message (docs/benchmarks.md, "Audience scale"). Built with `no_thp`, as the
/// gateway's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("merge") {
        args.remove(1);
        let cli = MergeCli::parse_from(args);
        return exit(loadtest::merge(
            &cli.files,
            &cli.rules,
            cli.summary_file.as_deref(),
            cli.html_report.as_deref(),
        ));
    }
    let cli = Cli::parse_from(args);
    // `--threads` (0: one per core). Out of range, the default runtime starts and the run's
    // checks refuse the value (exit 2) before any connection — without spawning the threads.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if (1..=loadtest::config::MAX_THREADS).contains(&cli.options.threads) {
        runtime.worker_threads(cli.options.threads);
    }
    match runtime.build() {
        Ok(rt) => exit(rt.block_on(loadtest::run(cli.goose, cli.options))),
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            ExitCode::from(3)
        }
    }
}
