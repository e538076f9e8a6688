//! The gateway's integration tests, one binary (`cargo nextest run -p gateway --test integration`),
//! one module per feature. Every test starts real servers (gateway nodes on `127.0.0.1:0`,
//! `redis-server` processes, HTTP receivers) through `common`; nothing is mocked.
//!
//! One binary rather than one per file: each binary compiled the harness (`common`) again and
//! linked every dependency again, ~3 s of a 2-core CI machine's time per file. nextest still runs
//! every test in a process of its own, so no test shares state with another; pick a feature with
//! `-E 'test(/^failover::/)'`. The real-process failover tier (`redis_cluster`, `redis_sentinel`,
//! `redis_outage`, `redis_tls`, `failover`) is a test group of its own in `.config/nextest.toml`.

mod common;

mod admission;
mod auth;
mod client_input;
mod cluster;
mod continuity;
mod failover;
mod fuzz;
mod history_bounds;
mod lifecycle;
mod limits;
mod moderation;
mod presence_and_drain;
mod presence_lists;
mod redis_cluster;
mod redis_outage;
mod redis_sentinel;
mod redis_tls;
mod rooms_api;
mod security;
mod single_node;
mod webhooks;
mod write_window;
