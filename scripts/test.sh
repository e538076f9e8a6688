#!/usr/bin/env bash
# The one command that checks the workspace: installs what the tests need on Debian (redis-server,
# with apt-get, when it is missing), then formatting, lints and every test: the Rust unit and
# integration tests, the browser tests, the load tests (smoke, TLS, shards, a 20 000-viewer room),
# the deployment checks and the containers for real (image, compose cluster, load and faults in
# Docker).
# `scripts/test.sh --rust-only` stops after the Rust tests (the quick loop while coding).
#
# Run it from anywhere, as root or as a user with sudo. The integration tests start their own
# redis-server on a free port; they find it on PATH or through the REDIS_SERVER variable (then
# nothing is installed).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

log() { printf '==> %s\n' "$*"; }
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

# What the stages after the Rust tests need, made while clippy, the test build and the Rust tests
# run rather than after them: the release binaries (a cargo profile's directory has a lock of its
# own, so the two builds run side by side) and, in one job, the deployment checks' tools and the
# Docker test's Debian root filesystems (downloads, unpacking). They run at the lowest priority
# (`nice -n 19`): they take what the foreground leaves — the single-crate stretches of the debug
# builds, and the Rust tests, which mostly wait on sockets and timers — and the tests' own threads
# get the cores whenever they want them. Waited for after the Rust tests; their output goes to
# target/background/*.log, printed if they fail.
background=()
mkdir -p target/background
in_background() {
  local name=$1
  shift
  log "in the background: $name (target/background/$name.log)"
  nice -n 19 "$@" >"target/background/$name.log" 2>&1 &
  background+=("$name:$!")
}
# Waits for every job started by in_background or beside. `wait_jobs quiet`: a job's log is
# printed (its last 60 lines) only when it failed; `wait_jobs show`: always, whole (a check that
# ran beside another). Any failure fails the run once all are waited for.
wait_jobs() {
  local show=$1 job name pid ok failed=0
  for job in "${background[@]}"; do
    name=${job%%:*}
    pid=${job#*:}
    ok=1
    wait "$pid" || ok=0
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
  background=()
  [ "$failed" -eq 0 ] || exit 1
}
# One job, since both may call apt-get: the deployment checks' tools (a failing PyPI attempt at
# actionlint alone waits ~35 s for GitHub) and the Docker test's root filesystems.
prepare_outside_tools() {
  scripts/check-deploy.sh --prepare
  as_root env "PATH=$PATH" scripts/docker-test.sh --prepare
}
# A check started beside the next one, its output in target/background/NAME.log until
# `wait_jobs show` prints it, whether it passed or not.
beside() {
  local name=$1
  shift
  "$@" >"target/background/$name.log" 2>&1 &
  background+=("$name:$!")
}
stop_background() {
  local job
  for job in "${background[@]}"; do
    kill "${job#*:}" 2>/dev/null || true
  done
}
trap stop_background EXIT
if [ "${1:-}" != "--rust-only" ]; then
  in_background release-build cargo build --release --locked -p gateway -p loadtest
  in_background outside-tools bash -c "$(declare -f as_root die prepare_outside_tools); prepare_outside_tools"
fi

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Every test in its own process, all binaries side by side (.config/nextest.toml: four at a time,
# the real-Redis failover tier at most two at a time); plain cargo test where nextest is missing.
if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run --workspace (and the doc tests)"
  cargo nextest run --workspace
  cargo test --workspace --doc
else
  log "cargo test --workspace (cargo-nextest not installed)"
  cargo test --workspace
fi
wait_jobs quiet

if [ "${1:-}" = "--rust-only" ]; then
  log "Rust checks passed (--rust-only: browser, load and deployment tests skipped)"
  exit 0
fi

# The load tests below run the generator on the same two cores as the gateways, HAProxy and
# Redis it measures: its own-saturation verdict (generator-kept-up) is judged at 100 ms of timer
# lag there rather than the 25 ms meant for a generator with cores of its own.
export LOADTEST_MAX_GENERATOR_LAG="${LOADTEST_MAX_GENERATOR_LAG:-100ms}"

# The tests that need real outside tools; each installs what it needs when missing and stops
# every process it started.
log "browser tests in headless Chromium (scripts/browser-test.sh)"
scripts/browser-test.sh

log "smoke load test through HAProxy (scripts/loadtest-smoke.sh)"
scripts/loadtest-smoke.sh

# Two pairs of checks run side by side below: each check has ports and directories of its own,
# and each pair is light enough on two cores (the TLS runs have 44 members, the shards 84; the
# deployment checks' traffic overlaps the Docker test's engine start, images and compose up).
# The one started beside prints its output when it has finished; either failing fails the run.
log "distributed load test: two shards and a merge (scripts/loadtest-shards.sh), beside the next"
beside shards scripts/loadtest-shards.sh

log "load tester over TLS through HAProxy, and its HTML report in Chromium (scripts/loadtest-tls.sh)"
scripts/loadtest-tls.sh
wait_jobs show

# Audience scale, CI-sized (issue 23; the 100 000-viewer runs are in docs/benchmarks.md): one room
# of 20 000 viewers and 2 hosts at 1 msg/s over 2 nodes on Redis, two generators merged; the
# verdict needs nothing lost or duplicated and every member's presence exact.
log "audience scale: 20 000 viewers in one room over 2 nodes (scripts/bench-audience.sh)"
VIEWERS=20000 MEASURE=20s DRAIN=8s HATCH=2000 BASE_PORT=26000 OUT=target/scale-ci \
  EXPECT="presence-wrong==0" scripts/bench-audience.sh

log "deployment checks against real tools and a live cluster (scripts/check-deploy.sh), beside the next"
beside check-deploy scripts/check-deploy.sh

# Root: it starts its own dockerd (and restores the host's firewall and forwarding state after).
log "the image and the compose cluster in a real Docker engine, with load and faults (scripts/docker-test.sh)"
as_root env "PATH=$PATH" scripts/docker-test.sh
wait_jobs show

log "all checks passed"
