//! Reading the repository's Markdown and a binary's `--help` for the docs tests: fenced code
//! blocks, the command lines in them that start a given program, table rows, and the flags a
//! `--help` text lists. Shared by `gateway/tests/docs.rs` and `loadtest/tests/docs.rs` (included
//! by path, so that both crates check the docs with the same reading); it knows no flag or metric
//! of its own.
#![allow(dead_code)] // each including test uses a different part

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the parent of the including crate's directory).
pub fn repo_root(manifest_dir: &str) -> PathBuf {
    Path::new(manifest_dir)
        .parent()
        .expect("the crate lives in the workspace root")
        .to_path_buf()
}

/// `README.md` and every `docs/*.md`, as (path relative to the root, text).
pub fn markdown_files(root: &Path) -> Vec<(String, String)> {
    let mut files = vec![("README.md".to_string(), read(&root.join("README.md")))];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    for p in docs {
        let name = format!("docs/{}", p.file_name().unwrap().to_string_lossy());
        files.push((name, read(&p)));
    }
    files
}

/// A file's text, or a panic that names it.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One flag as `--help` lists it.
#[derive(Debug, Default, Clone)]
pub struct HelpFlag {
    /// Its environment variable, if it has one.
    pub env: Option<String>,
    /// Its default value, if `--help` shows one.
    pub default: Option<String>,
}

/// Runs `bin args… --help` with no `GATEWAY_*`/`LOADTEST_*` variables set (they would show up
/// as values in the help text) and returns its standard output.
pub fn help_text(bin: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("--help");
    for (k, _) in std::env::vars() {
        if k.starts_with("GATEWAY_") || k.starts_with("LOADTEST_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {bin} --help: {e}"));
    assert!(
        out.status.success(),
        "{bin} {args:?} --help failed: {out:?}"
    );
    String::from_utf8(out.stdout).expect("--help is UTF-8")
}

/// The long flags of a `--help` text (without `--help` and `--version`), with their variables
/// and defaults. Works on clap's long help (`-h, --name <V>` lines, then `[env: X=]` and
/// `[default: V]` lines below) and on its short help (all on one line).
pub fn help_flags(help: &str) -> BTreeMap<String, HelpFlag> {
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // A flag line is indented and starts with `-x, --name` or `--name`.
        let head = trimmed
            .strip_prefix('-')
            .filter(|_| indent > 0)
            .and_then(|rest| {
                if rest.starts_with('-') {
                    Some(trimmed)
                } else {
                    // `-x, --name` or a short-only flag (no long name: not ours to check).
                    trimmed.split_once(", ").map(|(_, long)| long)
                }
            });
        if let Some(long) = head.and_then(|h| h.strip_prefix("--")) {
            let name: String = long
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            if !name.is_empty() && indent <= 8 {
                current = Some(name.clone());
                flags.insert(name, HelpFlag::default());
            }
        }
        let Some(name) = current.as_ref() else {
            continue;
        };
        let flag = flags.get_mut(name).unwrap();
        if let Some(env) = bracket(line, "[env: ") {
            flag.env = Some(env.split('=').next().unwrap().to_string());
        }
        if let Some(default) = bracket(line, "[default: ") {
            flag.default = Some(default.to_string());
        }
    }
    flags.remove("help");
    flags.remove("version");
    flags
}

/// The text inside `[prefix…]` on a line, if any.
fn bracket<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    let start = line.find(prefix)? + prefix.len();
    let len = line[start..].find(']')?;
    Some(&line[start..start + len])
}

/// The rows of the Markdown tables in `section` of `text` (from the heading that is exactly
/// `section` to the next heading of the same or a higher level), each as its cells.
pub fn table_rows(text: &str, section: &str) -> Vec<Vec<String>> {
    let level = section.chars().take_while(|c| *c == '#').count();
    let mut inside = false;
    let mut rows = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            let l = line.chars().take_while(|c| *c == '#').count();
            if line.trim_end() == section {
                inside = true;
                continue;
            }
            if inside && l <= level {
                break;
            }
        }
        if inside && line.starts_with('|') && !line.starts_with("|---") {
            rows.push(split_row(line));
        }
    }
    assert!(inside, "no section {section:?}");
    rows
}

/// The cells of one table row; `\|` inside a cell is a literal bar.
fn split_row(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().unwrap().push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().unwrap().push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_string()).collect()
}

/// The `code spans` of a Markdown cell, in order.
pub fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// A command line from a fenced code block that starts the program.
#[derive(Debug)]
pub struct Invocation {
    /// Where it is (`docs/x.md:LINE`), for the failure message.
    pub place: String,
    /// The whole line as written (continuations joined).
    pub line: String,
    /// The words after the program (or after `cargo run … --`), up to the end of its command.
    pub args: Vec<String>,
}

/// Every command in the fenced code blocks of `files` that runs `program`: `program …`,
/// `path/to/program …`, `cargo run [-p|--package] program [-- …]`, and a Compose
/// `run [--rm] program …` (the service of that name runs the program with those arguments).
pub fn invocations(files: &[(String, String)], program: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    for (name, text) in files {
        let mut in_block = false;
        let mut shell = false;
        let mut pending = String::new();
        let mut pending_line = 0;
        for (i, raw) in text.lines().enumerate() {
            if let Some(lang) = raw.trim_start().strip_prefix("```") {
                in_block = !in_block;
                shell = in_block && SHELL_BLOCKS.contains(&lang.trim());
                pending.clear();
                continue;
            }
            if !shell {
                continue;
            }
            if pending.is_empty() {
                pending_line = i + 1;
            }
            // A trailing backslash continues the command on the next line.
            if let Some(head) = raw.trim_end().strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(raw);
            let line = std::mem::take(&mut pending);
            for args in commands_of(&words(&line), program) {
                found.push(Invocation {
                    place: format!("{name}:{pending_line}"),
                    line: line.trim().to_string(),
                    args,
                });
            }
        }
    }
    found
}

/// Languages of the fenced blocks that hold shell commands (a block without one counts).
const SHELL_BLOCKS: &[&str] = &["", "sh", "bash", "shell", "console", "sh-session"];

/// Shell words of a line: quotes removed, `#` comments dropped, the operators `| & ; ( )`
/// as words of their own. Enough for the commands in the docs, not a shell.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    word.push(q);
                }
            }
            '#' if !in_word => break,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '|' | '&' | ';' | '(' | ')' => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
                let mut op = c.to_string();
                if chars.peek() == Some(&c) {
                    op.push(chars.next().unwrap());
                }
                words.push(op);
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Words after which a new command starts.
fn starts_command(prev: Option<&str>) -> bool {
    match prev {
        None => true,
        Some(w) => matches!(
            w,
            "|" | "||"
                | "&"
                | "&&"
                | ";"
                | "("
                | "do"
                | "then"
                | "else"
                | "time"
                | "exec"
                | "sudo"
                | "nohup"
                | "$("
        ),
    }
}

/// Whether a word ends the current command (its arguments stop there).
fn ends_command(w: &str) -> bool {
    matches!(w, "|" | "||" | "&" | "&&" | ";" | ")" | "done" | "fi")
        || w.starts_with('>')
        || w.starts_with('<')
        || w.starts_with("2>")
}

/// The argument lists of every run of `program` in one line's words.
fn commands_of(words: &[String], program: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let w = words[i].as_str();
        let prev = (i > 0).then(|| words[i - 1].as_str());
        // An environment assignment (`X=1 program …`) keeps the command position.
        let at_start = starts_command(prev)
            || (i > 0 && is_assignment(&words[i - 1]) && {
                let mut j = i - 1;
                while j > 0 && is_assignment(&words[j - 1]) {
                    j -= 1;
                }
                starts_command((j > 0).then(|| words[j - 1].as_str()))
            });
        let named = w == program || w.ends_with(&format!("/{program}"));
        let args_from = if at_start && named {
            Some(i + 1)
        } else if at_start && w == "cargo" && words.get(i + 1).is_some_and(|s| s == "run") {
            cargo_run_args(&words[i + 2..], program).map(|k| i + 2 + k)
        } else if named && prev == Some("--rm") && i >= 2 && words[i - 2] == "run" {
            Some(i + 1)
        } else {
            None
        };
        if let Some(start) = args_from {
            let end = (start..words.len())
                .find(|&k| ends_command(&words[k]))
                .unwrap_or(words.len());
            out.push(words[start..end].to_vec());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn is_assignment(w: &str) -> bool {
    w.split_once('=').is_some_and(|(k, _)| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    })
}

/// For the words after `cargo run`: the index where the program's arguments start (after `--`,
/// or the end of the command when there is none) if the package run is `program`.
fn cargo_run_args(rest: &[String], program: &str) -> Option<usize> {
    let end = rest
        .iter()
        .position(|w| ends_command(w))
        .unwrap_or(rest.len());
    let cargo = &rest[..end];
    let dashdash = cargo.iter().position(|w| w == "--");
    let own = &cargo[..dashdash.unwrap_or(cargo.len())];
    let runs_it = own
        .windows(2)
        .any(|p| (p[0] == "-p" || p[0] == "--package" || p[0] == "--bin") && p[1] == program)
        || own
            .iter()
            .any(|w| *w == format!("--package={program}") || *w == format!("--bin={program}"));
    runs_it.then(|| dashdash.map_or(end, |d| d + 1))
}

/// The long flags among a command's arguments (`--name` or `--name=value`, not after a bare
/// `--`).
pub fn long_flags(args: &[String]) -> Vec<String> {
    args.iter()
        .take_while(|a| *a != "--")
        .filter_map(|a| a.strip_prefix("--"))
        .map(|f| f.split('=').next().unwrap().to_string())
        .collect()
}

/// Whether a command's words are literal (no shell expansion or placeholder), so that the real
/// parser can be run on them.
pub fn is_literal(args: &[String]) -> bool {
    args.iter()
        .all(|a| !a.contains(['$', '`', '*', '…', '<', '>', '{']) && !a.contains("..."))
}

/// GitHub's anchor for a heading: lower case, letters, digits, `-` and `_` kept, spaces as `-`,
/// everything else dropped.
pub fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown text's headings (outside code blocks).
pub fn anchors(text: &str) -> Vec<String> {
    let mut in_block = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block && line.starts_with('#') {
            out.push(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a Markdown text, outside code blocks.
pub fn link_targets(text: &str) -> Vec<String> {
    let mut in_block = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            let target = &tail[..end];
            if !target.is_empty() && !target.contains(char::is_whitespace) {
                out.push(target.to_string());
            }
            rest = &tail[end..];
        }
    }
    out
}
