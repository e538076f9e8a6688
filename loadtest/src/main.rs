//! The `loadtest` binary: goose's options and ours on one command line, then [`loadtest::run`].
//! Exit status: 0 every rule held, 1 a rule failed, 2 bad command line, 3 the run could not start.

use std::process::ExitCode;

use clap::Parser;
use goose::config::GooseConfiguration;
use loadtest::config::Options;
use loadtest::Outcome;

/// Simulates live rooms against gateway nodes: hosts publish on an open-loop schedule, viewers
/// receive and chat; measures connect results, loss, order and end-to-end latency. Traffic goes
/// to loopback targets only, and the run stops by itself after its measured window and drain.
/// Manual: docs/loadtest.md.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Cli {
    #[command(flatten)]
    goose: GooseConfiguration,
    #[command(flatten)]
    options: Options,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match loadtest::run(cli.goose, cli.options).await {
        Ok(Outcome::Pass) => ExitCode::SUCCESS,
        Ok(Outcome::Fail) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(3)
        }
    }
}
