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

log "starting the local cluster: redis, 3 nodes, HAProxy"
deploy/local/cluster.sh start 3
eval "$(deploy/local/cluster.sh env)"

log "load test through HAProxy ($CLUSTER_LB): 1x2x1000 + 100x1x5, window $measure, p99 < $p99"
status=0
timeout 600 target/release/loadtest \
  --target "$CLUSTER_LB" \
  --rooms "1x2x1000@5/0.01 100x1x5@5/0.2" \
  --settle 2s --measure "$measure" --drain 5s \
  --expect lost==0 --expect connect-errors==0 --expect closes==0 \
  --expect publish-errors==0 --expect unsent==0 --expect "p99<$p99" \
  --summary-file "$out/summary.json" \
  --report-file "$out/report.html" --report-file "$out/report.json" \
  --html-report "$out/loadtest-report.html" \
  >"$out/loadtest.log" 2>&1 || status=$?

# The summary block (goose's tables are in the log and the reports).
sed -n '/=== LIVE ROOMS SUMMARY/,$p' "$out/loadtest.log"
if [ "$status" -eq 0 ]; then
  log "smoke load test passed (reports in $out)"
else
  tail -n 40 "$out/loadtest.log" | grep -v '^ *$' >&2 || true
  log "smoke load test FAILED with status $status (reports and logs in $out)"
fi
exit "$status"
