//! Docs that cannot drift from the load tester: `docs/configuration.md` against `loadtest --help`
//! and `loadtest merge --help` (every flag, its variable and its default, both ways), and every
//! command in `README.md` and `docs/*.md` that runs the load tester against its real flags. The
//! gateway's side is `gateway/tests/docs.rs`, whose Markdown reader this file shares.

#[path = "../../gateway/tests/docs/markdown.rs"]
mod markdown;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use markdown::{
    code_spans, help_flags, help_text, invocations, markdown_files, table_rows, HelpFlag,
};

const LOADTEST: &str = env!("CARGO_BIN_EXE_loadtest");

fn root() -> std::path::PathBuf {
    markdown::repo_root(env!("CARGO_MANIFEST_DIR"))
}

/// Compares the flag rows of one section of docs/configuration.md with a `--help` text's flags.
fn compare(section: &str, help: &BTreeMap<String, HelpFlag>, what: &str) -> Vec<String> {
    let doc = markdown::read(&root().join("docs/configuration.md"));
    let mut problems = Vec::new();
    let mut documented = BTreeSet::new();
    for row in table_rows(&doc, section) {
        if !row[0].starts_with('`') || !row[0].contains("`--") {
            continue;
        }
        assert!(
            row.len() >= 4,
            "a row needs flag, variable, default, meaning: {row:?}"
        );
        for flag in code_spans(&row[0]).iter().filter(|f| f.starts_with("--")) {
            let name = flag.trim_start_matches("--").to_string();
            let Some(h) = help.get(&name) else {
                problems.push(format!("documented flag --{name} is not in {what}"));
                continue;
            };
            documented.insert(name.clone());
            let env = code_spans(&row[1]);
            if env.first() != h.env.as_ref() {
                problems.push(format!(
                    "--{name}: documented variable {env:?}, {what} says {:?}",
                    h.env
                ));
            }
            // A default written as one literal must be the real one; prose describes a default
            // that --help shows in words or not at all.
            if let [lit] = code_spans(&row[2]).as_slice() {
                if row[2] == format!("`{lit}`") && h.default.as_deref() != Some(lit.as_str()) {
                    problems.push(format!(
                        "--{name}: documented default `{lit}`, {what} says {:?}",
                        h.default
                    ));
                }
            }
        }
    }
    for name in help.keys().filter(|n| !documented.contains(*n)) {
        problems.push(format!(
            "--{name} ({what}) is missing from docs/configuration.md, {section}"
        ));
    }
    problems
}

/// Every flag of `loadtest --help` (its own and goose's) is documented with its variable and
/// default, and every documented flag exists; the same for `loadtest merge --help`.
#[test]
fn configuration_md_matches_loadtest_help() {
    let run = help_flags(&help_text(LOADTEST, &[]));
    assert!(
        run.contains_key("rooms") && run.contains_key("users") && run.len() > 40,
        "too few flags read from loadtest --help: {run:?}"
    );
    let merge = help_flags(&help_text(LOADTEST, &["merge"]));
    assert!(
        merge.contains_key("expect"),
        "no --expect in loadtest merge --help: {merge:?}"
    );
    let mut problems = compare("## Load tester", &run, "loadtest --help");
    problems.extend(compare(
        "## `loadtest merge`",
        &merge,
        "loadtest merge --help",
    ));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Every command in README.md and docs/*.md that runs the load tester (`loadtest …`,
/// `target/release/loadtest …`, `cargo run -p loadtest -- …`, Compose's `run --rm loadtest …`)
/// uses only flags it has (`loadtest merge …` those of the merge). A command without shell
/// expansions goes through the real parser: with `--help` appended, the binary parses (and
/// refuses) every flag and value before it, then prints its help instead of running.
#[test]
fn loadtest_commands_in_docs_use_real_flags() {
    let run = help_flags(&help_text(LOADTEST, &[]));
    let merge = help_flags(&help_text(LOADTEST, &["merge"]));
    let files = markdown_files(&root());
    let found = invocations(&files, "loadtest");
    assert!(
        found.len() >= 3,
        "expected the docs' load tests, found {found:?}"
    );
    let mut problems = Vec::new();
    for inv in &found {
        let (flags, what) = if inv.args.first().is_some_and(|a| a == "merge") {
            (&merge, "loadtest merge")
        } else {
            (&run, "loadtest")
        };
        for flag in markdown::long_flags(&inv.args) {
            if !flags.contains_key(&flag) && flag != "help" && flag != "version" {
                problems.push(format!(
                    "{}: --{flag} is not a {what} flag: {}",
                    inv.place, inv.line
                ));
            }
        }
        if markdown::is_literal(&inv.args) {
            let mut cmd = Command::new(LOADTEST);
            cmd.args(&inv.args).arg("--help");
            for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("LOADTEST_")) {
                cmd.env_remove(k);
            }
            let out = cmd.output().expect("running loadtest");
            if !out.status.success() {
                problems.push(format!(
                    "{}: loadtest refuses `{}`: {}",
                    inv.place,
                    inv.line,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
