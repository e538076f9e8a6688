//! Docs that cannot drift from the gateway: `docs/configuration.md` against `gateway --help`
//! (every flag, its variable and its default, both ways), every command in `README.md` and
//! `docs/*.md` that starts the gateway against its real flags, and `docs/metrics.md` against the
//! families a running node exports on `/metrics`, and the relative links between the docs. The load
//! tester's side is `loadtest/tests/docs.rs`.

#[path = "docs/markdown.rs"]
mod markdown;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clap::Parser;
use gateway::{Config, Listeners};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use markdown::{code_spans, help_flags, help_text, invocations, markdown_files, table_rows};

const GATEWAY: &str = env!("CARGO_BIN_EXE_gateway");

fn root() -> std::path::PathBuf {
    markdown::repo_root(env!("CARGO_MANIFEST_DIR"))
}

/// Every flag of `gateway --help` has a row in docs/configuration.md's "Gateway" table with the
/// same environment variable and default, and every row names a real flag.
#[test]
fn configuration_md_matches_gateway_help() {
    let help = help_flags(&help_text(GATEWAY, &[]));
    assert!(help.len() > 20, "too few flags read from --help: {help:?}");
    let doc = markdown::read(&root().join("docs/configuration.md"));
    let rows = table_rows(&doc, "## Gateway");
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in rows.iter().filter(|r| r[0].starts_with("`--")) {
        assert!(
            row.len() >= 4,
            "a row needs flag, variable, default, meaning: {row:?}"
        );
        for flag in code_spans(&row[0]) {
            let name = flag.trim_start_matches("--").to_string();
            let Some(h) = help.get(&name) else {
                problems.push(format!("documented flag --{name} is not in gateway --help"));
                continue;
            };
            documented.insert(name.clone());
            let env = code_spans(&row[1]);
            if env.first() != h.env.as_ref() {
                problems.push(format!(
                    "--{name}: documented variable {env:?}, --help says {:?}",
                    h.env
                ));
            }
            // A default written as one literal must be the real one; prose ("the host name",
            // "none", "off") describes a default that --help cannot show as such.
            if let [lit] = code_spans(&row[2]).as_slice() {
                if row[2] == format!("`{lit}`") && h.default.as_deref() != Some(lit.as_str()) {
                    problems.push(format!(
                        "--{name}: documented default `{lit}`, --help says {:?}",
                        h.default
                    ));
                }
            }
        }
    }
    for name in help.keys().filter(|n| !documented.contains(*n)) {
        problems.push(format!(
            "--{name} (gateway --help) is missing from docs/configuration.md"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every command in README.md and docs/*.md that starts the gateway uses only flags it has; a
/// command without shell expansions is parsed by the gateway's own parser, values included.
#[test]
fn gateway_commands_in_docs_use_real_flags() {
    let help = help_flags(&help_text(GATEWAY, &[]));
    let files = markdown_files(&root());
    let found = invocations(&files, "gateway");
    assert!(
        found.len() >= 2,
        "expected the README's gateway commands, found {found:?}"
    );
    let mut problems = Vec::new();
    for inv in &found {
        for flag in markdown::long_flags(&inv.args) {
            if !help.contains_key(&flag) && flag != "help" && flag != "version" {
                problems.push(format!(
                    "{}: --{flag} is not a gateway flag: {}",
                    inv.place, inv.line
                ));
            }
        }
        if markdown::is_literal(&inv.args) {
            let argv = std::iter::once("gateway".to_string()).chain(inv.args.iter().cloned());
            if let Err(e) = Config::try_parse_from(argv) {
                problems.push(format!(
                    "{}: gateway refuses `{}`: {e}",
                    inv.place, inv.line
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every relative link in README.md and docs/*.md points at a file of the repository and, into a
/// Markdown file, at one of its headings (moved sections break links silently otherwise).
#[test]
fn links_in_docs_resolve() {
    let root = root();
    let files = markdown_files(&root);
    let mut problems = Vec::new();
    let mut checked = 0;
    for (name, text) in &files {
        let dir = std::path::Path::new(name).parent().unwrap();
        for target in markdown::link_targets(text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let file = if path.is_empty() {
                root.join(name)
            } else {
                root.join(dir).join(path)
            };
            if !file.exists() {
                problems.push(format!("{name}: link to {target}: no such file"));
                continue;
            }
            if !anchor.is_empty() && file.extension().is_some_and(|e| e == "md") {
                let heads = markdown::anchors(&markdown::read(&file));
                if !heads.iter().any(|h| h == anchor) {
                    problems.push(format!("{name}: link to {target}: no such heading"));
                }
            }
        }
    }
    assert!(checked > 10, "too few links read: {checked}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// docs/metrics.md names every family a node exports (scraped from a real node with the
/// in-process broker, plus the names defined in metrics/names.rs that only some brokers export), and
/// nothing else; the documented type is the exported one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_md_lists_every_metric() {
    let exported = scrape_families().await;
    assert!(
        exported.contains_key("gateway_connections") && exported.len() > 20,
        "too few families scraped: {exported:?}"
    );
    let mut expected: BTreeSet<String> = exported.keys().cloned().collect();
    expected.extend(defined_in_metrics_rs());

    let doc = markdown::read(&root().join("docs/metrics.md"));
    let mut documented = BTreeMap::new();
    for row in table_rows(&doc, "## Metrics (`GET /metrics`)") {
        if row.len() < 4 || !row[0].starts_with('`') {
            continue;
        }
        for name in code_spans(&row[0]) {
            documented.insert(name, row[1].clone());
        }
    }
    let mut problems = Vec::new();
    for name in expected.iter().filter(|n| !documented.contains_key(*n)) {
        problems.push(format!("{name} is exported but not in docs/metrics.md"));
    }
    for (name, kind) in &documented {
        if !expected.contains(name) {
            problems.push(format!("{name} is in docs/metrics.md but not exported"));
        }
        if let Some(real) = exported.get(name) {
            if real != kind {
                problems.push(format!("{name}: documented as {kind}, exported as {real}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The `gateway_*` names defined as constants in gateway/src/metrics/names.rs (some are exported only
/// with some brokers, e.g. the per-shard gauge).
fn defined_in_metrics_rs() -> BTreeSet<String> {
    let src = markdown::read(&root().join("gateway/src/metrics/names.rs"));
    let names: BTreeSet<String> = src
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"gateway_"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect();
    assert!(
        names.len() > 20,
        "too few names read from metrics/names.rs: {names:?}"
    );
    names
}

/// Starts a node (in-process broker, loopback, port 0), scrapes its `/metrics` and returns each
/// family's `# TYPE`.
async fn scrape_families() -> BTreeMap<String, String> {
    let config = Config::try_parse_from(["gateway", "--node-id", "docs", "--drain-seconds", "1"])
        .expect("flags parse");
    let client = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let node = tokio::spawn(gateway::run(
        config,
        Listeners { client, admin },
        shutdown.clone(),
    ));

    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        match get(admin_addr, "/metrics").await {
            Some((200, body)) => break body,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("no /metrics from the node: {other:?}"),
        }
    };
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), node)
        .await
        .expect("the node stops")
        .expect("the node's task")
        .expect("the node ran");

    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// A plain HTTP/1.1 GET (the connection closed after the answer): status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(buf).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
