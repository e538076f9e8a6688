#!/usr/bin/env bash
# Smoke load test, for CI: starts the local cluster (redis-server, 3 gateway nodes, HAProxy;
# deploy/local/cluster.sh), runs the load tester through HAProxy, stops the cluster, and exits
# non-zero when a rule fails.
#
# The scenario (docs/loadtest.md, "CI smoke test"): one big room (2 hosts at 5 msg/s, 1 000 viewers
# chatting at 0.01 msg/s) plus 100 small rooms (1 host at 5 msg/s, 5 viewers at 0.2 msg/s): 1 602
# WebSockets, ~12 000 messages and ~480 000 deliveries in a 20 s window. The rules: nothing lost,
# no connect error, no unexpected close, no publish error, nothing left unsent, and p99 end-to-end
# latency under LOADTEST_P99 (default 500ms; docs/loadtest.md says why).
#
# The nodes run with `--auth jwt` (an HMAC secret made for the run): every WebSocket carries a
# token the load tester mints per persona (hosts get host rights, chatting viewers the right to
# publish), so CI exercises the token path at load.
#
# Then a second run kills one node (SIGKILL) in the middle of its window: its members reconnect
# through HAProxy to the other nodes and resume from their last offset (`since=`), publishers
# re-send what was not acknowledged (idempotency keys), and the rules are: nothing lost,
# duplicated or reordered per member, nothing left unsent.
#
# Works from a fresh clone as root (or with sudo): installs redis-server and haproxy when missing
# and builds the release binaries. Takes about 2 minutes after the build.
#
# Environment:
#   LOADTEST_P99       p99 budget (default 500ms)
#   LOADTEST_OUT       where reports go (default target/loadtest-smoke): summary.json,
#                      loadtest-report.html (charts), report.html,
#                      report.json (goose), loadtest.log, and the cluster's logs under cluster/
#   SMOKE_BASE_PORT    port base of the cluster (default 27000; see deploy/local/cluster.sh)
#   SMOKE_MEASURE      length of the measured window (default 20s)
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"

log() { printf '==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "loadtest-smoke: cargo not found (install Rust with rustup)" >&2
  exit 1
}

out="${LOADTEST_OUT:-$root/target/loadtest-smoke}"
rm -rf "$out"
mkdir -p "$out"
export CLUSTER_DIR="$out/cluster"
export BASE_PORT="${SMOKE_BASE_PORT:-27000}"
p99="${LOADTEST_P99:-500ms}"
measure="${SMOKE_MEASURE:-20s}"

log "building the gateway and the load tester (release)"
cargo build --release -p gateway -p loadtest

# The load tester and the nodes hold one descriptor per WebSocket; lift the soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cleanup() {
  log "stopping the cluster"
  deploy/local/cluster.sh stop || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A secret for this run only: the nodes verify, the load tester mints.
secret="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# `--auth jwt` needs an API key (or --open-api): one for this run, also given to the load tester.
api_key="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export GATEWAY_ARGS="${GATEWAY_ARGS:-} --auth jwt --jwt-hmac-secret $secret --api-key $api_key"
export GATEWAY_JWT_HMAC_SECRETS="$secret" # the nodes and the load tester read the same name
export LOADTEST_API_KEY="$api_key"

log "starting the local cluster: redis, 3 nodes (--auth jwt), HAProxy"
deploy/local/cluster.sh start 3
eval "$(deploy/local/cluster.sh env)"

log "load test through HAProxy ($CLUSTER_LB): 1x2x1000 + 100x1x5, window $measure, p99 < $p99"
status=0
timeout 600 target/release/loadtest \
  --target "$CLUSTER_LB" \
  --rooms "1x2x1000@5/0.01 100x1x5@5/0.2" \
  --settle 2s --measure "$measure" --drain 5s \
  --expect lost==0 --expect connect-errors==0 --expect closes==0 \
  --expect publish-errors==0 --expect unsent==0 --expect "p99<$p99" --expect presence-wrong==0 \
  --summary-file "$out/summary.json" \
  --report-file "$out/report.html" --report-file "$out/report.json" \
  --html-report "$out/loadtest-report.html" \
  >"$out/loadtest.log" 2>&1 || status=$?

# The summary block (goose's tables are in the log and the reports).
sed -n '/=== LIVE ROOMS SUMMARY/,$p' "$out/loadtest.log"
if [ "$status" -ne 0 ]; then
  tail -n 40 "$out/loadtest.log" | grep -v '^ *$' >&2 || true
  log "smoke load test FAILED with status $status (reports and logs in $out)"
  exit "$status"
fi
log "smoke load test passed (reports in $out)"

# The node kill: 1 room of 1 host (5 msg/s) and 300 viewers plus 20 small rooms, a 20 s window;
# node 2 is killed 8 s after the load started (2 s settle + 6 s into the window).
kill_out="$out/kill"
mkdir -p "$kill_out"
log "node kill with recovery: SIGKILL node 2 in the middle of the window; lost, duplicates, reordered == 0"
(
  sleep 8
  pid="$(cat "$CLUSTER_DIR/node2.pid")"
  printf '==> SIGKILL node 2 (pid %s)\n' "$pid"
  kill -KILL "$pid"
) &
killer=$!
status=0
timeout 600 target/release/loadtest \
  --target "$CLUSTER_LB" \
  --rooms "1x1x300@5/0 20x1x5@5/0.2" --room-prefix smoke-kill \
  --settle 2s --measure 20s --drain 8s \
  --expect lost==0 --expect duplicates==0 --expect reordered==0 --expect unsent==0 \
  --summary-file "$kill_out/summary.json" --html-report "$kill_out/loadtest-report.html" \
  >"$kill_out/loadtest.log" 2>&1 || status=$?
wait "$killer" || true
sed -n '/=== LIVE ROOMS SUMMARY/,$p' "$kill_out/loadtest.log"
if [ "$status" -eq 0 ]; then
  log "node kill: nothing lost (reports in $kill_out)"
else
  tail -n 40 "$kill_out/loadtest.log" | grep -v '^ *$' >&2 || true
  log "node kill FAILED with status $status (reports and logs in $kill_out)"
fi
exit "$status"
