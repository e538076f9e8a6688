//! What a member's connection and attempts leave for the goose user that carries it to record
//! as goose rows (`WS connect`, `join`, `publish`, `deliver 1/N`, `close`, `error`): pushed by
//! `session.rs` and `user.rs`, turned into goose rows by `user.rs` when its `tick` looks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Something for the owning goose user to record as a row in goose's reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A publish was written (or failed to be): how far behind its schedule.
    Publish {
        /// Written − intended.
        lag: Duration,
        /// Why the write failed.
        error: Option<String>,
    },
    /// A sampled delivery: its end-to-end latency.
    Deliver(Duration),
    /// An `error` event from the gateway.
    Error(String),
    /// A connection attempt's TCP + upgrade (`WS connect`): how long, and on failure the cause
    /// and the HTTP status.
    Connect {
        /// How long the attempt took.
        took: Duration,
        /// `None` when it succeeded.
        error: Option<String>,
        /// The HTTP status (101 on success).
        status: Option<u16>,
    },
    /// A close the load tester did not ask for (`WS close`).
    Close {
        /// How long the connection lived.
        lived: Duration,
        /// The close code (1006 when the socket ended without one).
        code: u16,
        /// `closed CODE[: REASON]`.
        reason: String,
    },
    /// Upgrade → welcome (`WS join`), or why it failed.
    Join {
        /// From the start of the attempt.
        took: Duration,
        /// `None` when the welcome arrived.
        error: Option<String>,
    },
}

/// Rows waiting for the goose user (shared by every connection of its members); a std `Mutex`
/// since it is only pushed to and swapped out.
pub type Rows = Arc<Mutex<Vec<Row>>>;
