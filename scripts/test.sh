#!/usr/bin/env bash
# The one command that checks the workspace: installs what the tests need on Debian (redis-server,
# with apt-get, when it is missing), then formatting, lints and every test: the browser tests, the
# load tests (smoke, TLS, shards, a 20 000-viewer room), the deployment checks, the containers for
# real (image, compose cluster, load and faults in Docker) and the Rust unit and integration tests
# (the order that keeps two cores busy: see "The order" below).
# `scripts/test.sh --rust-only` runs only clippy and the Rust tests (the quick loop while coding).
#
# Run it from anywhere, as root or as a user with sudo. The integration tests start their own
# redis-server on a free port; they find it on PATH or through the REDIS_SERVER variable (then
# nothing is installed).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

# Each step with the seconds since the start, so that a run's log shows where its time went.
log() { printf '==> [%4d s] %s\n' "$SECONDS" "$*"; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root or sudo to run: $*"
  fi
}

# Debian packages for commands the build and the tests use that are not installed.
packages=()
if [ -z "${REDIS_SERVER:-}" ] && ! command -v redis-server >/dev/null 2>&1; then
  packages+=(redis-server)
fi
if ! command -v redis-cli >/dev/null 2>&1; then
  packages+=(redis-tools) # redis_cluster.rs creates its cluster with redis-cli --cluster create
fi
if ! command -v openssl >/dev/null 2>&1; then
  packages+=(openssl) # redis_tls.rs makes its CA and certificates with openssl
fi
if ! type -P kill >/dev/null 2>&1; then
  packages+=(procps) # the tests send STOP/CONT to redis-server with kill(1)
fi
if ! command -v cc >/dev/null 2>&1; then
  packages+=(gcc libc6-dev) # the linker rustc calls
fi
if [ "${#packages[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${packages[*]} and no apt-get to install them (or set REDIS_SERVER)"
  log "installing ${packages[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${packages[@]}"
fi

# Rust comes from rustup (Debian's own cargo is older than the workspace's rust-version).
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
  die "cargo not found: install Rust with rustup (https://rustup.rs), then run this again"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null 2>&1 || die "cargo fmt and cargo clippy are needed"
  log "adding the rustfmt and clippy components"
  rustup component add rustfmt clippy
fi

log "cargo fmt --all -- --check"
cargo fmt --all -- --check

# Jobs beside the foreground, each with its output in target/background/NAME.log. Two kinds:
# `in_background` for builds and installs (stopped when the run fails), `beside` for a check that
# runs beside the next ones (waited for, never killed, when the run fails: the Docker test must
# stop its engine and restore the host's firewall).
background=()
mkdir -p target/background
# `in_background [--low] NAME CMD...`: --low runs it at the lowest priority (`nice -n 19`), so
# that it takes only what the foreground leaves.
in_background() {
  local nice=0
  if [ "$1" = --low ]; then
    nice=19
    shift
  fi
  local name=$1
  shift
  log "in the background: $name (target/background/$name.log)"
  nice -n "$nice" "$@" >"target/background/$name.log" 2>&1 &
  background+=("$name:build:$!")
}
# `beside NAME CMD...`: a check started beside the next ones; `wait_jobs show` prints its output,
# whether it passed or not.
beside() {
  local name=$1
  shift
  "$@" >"target/background/$name.log" 2>&1 &
  background+=("$name:check:$!")
}
# Jobs are NAME:KIND:PID. `wait_jobs quiet|show [NAME...]` waits for the named jobs (all when
# none is named; a name not started is an error). quiet: a job's log is printed (its last 60
# lines) only when it failed; show: always, whole. Any failure fails the run once all of them are
# waited for.
wait_jobs() {
  local show=$1 job name ok failed=0 rest=() want
  shift
  for want in "$@"; do
    [[ " ${background[*]%%:*} " == *" $want "* ]] || die "wait_jobs: no job named $want"
  done
  for job in "${background[@]}"; do
    name=${job%%:*}
    if [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]]; then
      rest+=("$job")
      continue
    fi
    ok=1
    wait "${job##*:}" || ok=0
    if [ "$show" = show ]; then
      log "output of $name, started beside:"
      cat "target/background/$name.log"
    elif [ "$ok" -eq 1 ]; then
      log "background $name done"
    else
      tail -n 60 "target/background/$name.log" >&2
    fi
    if [ "$ok" -eq 0 ]; then
      printf 'error: %s failed\n' "$name" >&2
      failed=1
    fi
  done
  background=("${rest[@]}")
  [ "$failed" -eq 0 ] || exit 1
}
# On the way out of a failed run: builds and installs are stopped; a check running beside is
# waited for (it cleans up after itself) and the end of its log printed.
stop_background() {
  local job name
  for job in "${background[@]}"; do
    name=${job%%:*}
    case $job in
      *:build:*) kill "${job##*:}" 2>/dev/null || true ;;
      *:check:*)
        printf '==> waiting for %s, started beside\n' "$name" >&2
        wait "${job##*:}" 2>/dev/null || true
        tail -n 30 "target/background/$name.log" >&2
        ;;
    esac
  done
}
trap stop_background EXIT

# The Rust tests: every test in its own process, six at a time (.config/nextest.toml: the
# real-Redis failover tier at most three at a time, and first); plain cargo test where nextest is
# missing.
have_nextest() { cargo nextest --version >/dev/null 2>&1; }
# Clippy's lints in the test build itself: clippy-driver compiles the workspace's crates (what
# `cargo clippy` does with `cargo check`: the same wrapper, the same lints, `-D warnings`), so the
# dependencies are built once for the lints and the tests instead of once checked and once built
# (`cargo clippy --workspace --all-targets` was ~220 CPU-s of a fresh CI run on two cores). The
# test build covers the same targets as `--all-targets` (libraries, binaries, tests, examples;
# the workspace has no benches). The tests run with the same variables, so nothing is rebuilt.
export_lints() {
  export RUSTC_WORKSPACE_WRAPPER
  RUSTC_WORKSPACE_WRAPPER="$(rustc --print sysroot)/bin/clippy-driver"
  export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
}
build_tests() {
  if have_nextest; then
    cargo nextest run --workspace --no-run
  else
    cargo test --workspace --no-run
  fi
}
# `rust_tests [NICE]`: at niceness NICE (default 0).
rust_tests() {
  local nice=${1:-0}
  if have_nextest; then
    log "cargo nextest run --workspace (and the doc tests)"
    nice -n "$nice" cargo nextest run --workspace
    nice -n "$nice" cargo test --workspace --doc
  else
    log "cargo test --workspace (cargo-nextest not installed)"
    nice -n "$nice" cargo test --workspace
  fi
}

if [ "${1:-}" = "--rust-only" ]; then
  log "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets -- -D warnings
  rust_tests
  log "Rust checks passed (--rust-only: browser, load and deployment tests skipped)"
  exit 0
fi

# The order keeps both cores busy on a 2-core machine, and the checks that measure time away from
# any compiler at normal priority:
# 1. the release build and the outside tools at normal priority (the release binaries are what
#    the load, browser and deployment checks wait for; the tools are downloads and unpacking: the
#    deployment checks' tools, the Docker test's Debian root filesystems, Chromium and the page's
#    npm packages, so that no check calls apt-get later);
# 2. beside them from the start, the test build with clippy's lints (above) at the lowest
#    priority: it takes what the release build leaves, then the time the checks below leave idle
#    (they mostly wait on sockets, timers and faults they inject);
# 3. the smoke test alone; then the Docker test (~3 minutes, mostly waiting on its engine and
#    the faults it injects) beside the browser, TLS, shards and deployment checks and, once they
#    are done, the Rust tests; then the 20 000-viewer run alone.
# Background output goes to target/background/*.log, printed when a job fails.
# The browser test's tools as the user who runs this (its `npm ci` writes browser/node_modules
# in the checkout; apt-get, when something is missing, needs root as the browser test itself does).
prepare_outside_tools() {
  scripts/check-deploy.sh --prepare
  as_root env "PATH=$PATH" scripts/docker-test.sh --prepare
  scripts/browser-test.sh --prepare
}
in_background release-build cargo build --release --locked -p gateway -p loadtest
in_background outside-tools bash -c "$(declare -f as_root die prepare_outside_tools); prepare_outside_tools"
in_background --low test-build bash -c \
  "$(declare -f have_nextest export_lints build_tests); export_lints; build_tests"
wait_jobs quiet release-build outside-tools

# The load tests below run the generator on the same two cores as the gateways, HAProxy and
# Redis it measures: its own-saturation verdict (generator-kept-up) is judged at 100 ms of timer
# lag there rather than the 25 ms meant for a generator with cores of its own.
export LOADTEST_MAX_GENERATOR_LAG="${LOADTEST_MAX_GENERATOR_LAG:-100ms}"

# The smoke test first, alone: the heaviest of the load tests (10 000 deliveries a second through
# three nodes), judged on its p99 (< 500 ms). Beside the Docker test its p99 went from ~100 ms to
# 199–319 ms in four runs: too close to its rule to share the cores with it.
log "smoke load test through HAProxy (scripts/loadtest-smoke.sh)"
scripts/loadtest-smoke.sh

# The Docker test spends its ~3 minutes mostly waiting (the engine, images, compose up, a
# baseline load, a 15 s partition and a 10 s Redis pause, each with its recovery) and has ports
# and networks of its own: it runs beside the browser, TLS, shards and deployment checks, which
# are light (the TLS runs have 44 members, the shards 84). Root: it starts its own dockerd (and
# restores the host's firewall and forwarding state after). The one started beside prints its
# output when it has finished; either failing fails the run.
log "the image and the compose cluster in a real Docker engine, with load and faults (scripts/docker-test.sh), beside the next"
beside docker as_root env "PATH=$PATH" scripts/docker-test.sh

log "browser tests in headless Chromium (scripts/browser-test.sh)"
scripts/browser-test.sh

log "distributed load test: two shards and a merge (scripts/loadtest-shards.sh), beside the next"
beside shards scripts/loadtest-shards.sh

log "load tester over TLS through HAProxy, and its HTML report in Chromium (scripts/loadtest-tls.sh)"
scripts/loadtest-tls.sh

log "deployment checks against real tools and a live cluster (scripts/check-deploy.sh)"
scripts/check-deploy.sh
wait_jobs show shards

# The Rust tests while the Docker test goes through its faults: both mostly wait (the tests on
# sockets, timers and real Redis failovers; the Docker test on a partition and a Redis pause under
# a light load). At niceness 5, so that the Docker test's load generator, judged on its own timer
# lag, comes first when both want a core.
log "waiting for the test build (with clippy's lints, -D warnings)"
wait_jobs quiet test-build
# In a subshell: the release builds of the checks after must not see clippy-driver.
(
  export_lints
  rust_tests 5
)
wait_jobs show docker

# Audience scale, CI-sized (issue 23; the 100 000-viewer runs are in docs/benchmarks.md): one room
# of 20 000 viewers and 2 hosts at 1 msg/s over 2 nodes on Redis, two generators merged; the
# verdict needs nothing lost or duplicated and every member's presence exact. Alone: it keeps
# both cores busy.
log "audience scale: 20 000 viewers in one room over 2 nodes (scripts/bench-audience.sh)"
VIEWERS=20000 MEASURE=20s DRAIN=8s HATCH=2000 BASE_PORT=26000 OUT=target/scale-ci \
  EXPECT="presence-wrong==0" scripts/bench-audience.sh

log "all checks passed"
