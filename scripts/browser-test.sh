#!/usr/bin/env bash
# Browser tests of the live-room page and the JavaScript client (issue #6).
#
# Unit-tests the client's logic with node's test runner, then starts a real cluster on loopback —
# redis-server, three gateway nodes (release build) and HAProxy in front of them — and drives the
# page in headless Debian Chromium with Playwright (browser/test/live-room.test.mjs): two pages on
# two nodes, presence, broadcast and chat, a raw WebSocket, then a drained and a killed node; then
# (browser/test/live-room-auth.test.mjs) a node of its own with --auth jwt: a token in the page's
# URL fragment, and an anonymous viewer.
#
# Works on a fresh Debian machine as root: installs chromium, redis-server, haproxy and curl with
# apt when they are missing (Node.js 20+ and npm must be there). Screenshots and node logs go to
# target/browser/. Every process it starts is stopped on exit; any failure exits non-zero.
#
# Usage: scripts/browser-test.sh        (BROWSER_TEST_SKIP_BUILD=1 to reuse target/release/gateway)
#        scripts/browser-test.sh --prepare  (only the tools and `npm ci`: scripts/test.sh runs it
#                                            during the Rust build, so the tests need no apt-get)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
OUT=$ROOT/target/browser
BIN=$ROOT/target/release/gateway
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
WORK=$(mktemp -d -t browser-test.XXXXXX)
PIDS=()
TEST_PID=

log() { printf '\n== %s\n' "$*"; }

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "${TEST_PID:-}" ] && kill -TERM -- "-$TEST_PID" 2>/dev/null; then
    sleep 1
    kill -KILL -- "-$TEST_PID" 2>/dev/null || true
  fi
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$status" -ne 0 ] && [ -d "$OUT/logs" ]; then
    for f in "$OUT"/logs/*.log; do
      [ -s "$f" ] || continue
      printf '\n-- last lines of %s\n' "${f#"$ROOT"/}"
      tail -n 20 "$f"
    done
    printf '\nbrowser tests FAILED (status %s)\n' "$status"
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts a background process with its output in target/browser/logs/NAME.log.
start() {
  local name=$1
  shift
  "$@" >"$OUT/logs/$name.log" 2>&1 &
  PIDS+=($!)
  # The tests kill nodes on purpose: no job notices about them.
  disown $!
}

# Waits up to 20 s for an HTTP URL to answer 2xx.
wait_http() {
  for _ in $(seq 200); do
    curl -fs -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  return 1
}

# Chromium, the servers and curl (apt-get as root when missing), Node.js 20+, and the page's npm
# packages.
tools() {
  log "tools"
  missing=()
  [ -x "$CHROMIUM" ] || missing+=(chromium)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v haproxy >/dev/null || missing+=(haproxy)
  command -v curl >/dev/null || missing+=(curl)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "missing ${missing[*]}: install them, or run as root to let this script use apt-get" >&2
      exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  fi
  command -v node >/dev/null && command -v npm >/dev/null || { echo "Node.js 20+ and npm are required" >&2; exit 1; }
  node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' || {
    echo "Node.js 20+ is required, found $(node --version)" >&2
    exit 1
  }
  "$CHROMIUM" --version
  echo "node $(node --version), $(redis-server --version | cut -d' ' -f1-3), $(haproxy -v | head -n1 | cut -d' ' -f1-3)"

  # Again only when the lock file changed since (npm ci starts from an empty node_modules).
  if [ ! -f browser/node_modules/.package-lock.json ] ||
    [ browser/package-lock.json -nt browser/node_modules/.package-lock.json ]; then
    log "npm ci (browser/)"
    (cd browser && npm ci --no-audit --no-fund --loglevel=error)
  fi
}
tools
[ "${1:-}" != --prepare ] || exit 0

mkdir -p "$OUT/logs"
rm -f "$OUT"/*.png "$OUT"/logs/*.log

log "client unit tests"
node --test browser/test/client.test.mjs

if [ "${BROWSER_TEST_SKIP_BUILD:-0}" != 1 ] || [ ! -x "$BIN" ]; then
  # The same package set as the load tests' builds, so that the one release build serves all
  # (building the gateway alone resolves features differently and rebuilds every shared crate).
  log "cargo build --release -p gateway -p loadtest"
  cargo build --release -p gateway -p loadtest
fi

log "cluster: redis-server, three gateway nodes, haproxy"
# Eight free loopback ports: redis, the load balancer, and a client and an admin port per node.
read -r REDIS LB P1 A1 P2 A2 P3 A3 < <(node -e '
  const net = require("net");
  (async () => {
    const servers = [];
    for (let i = 0; i < 8; i++) {
      const s = net.createServer();
      await new Promise((r) => s.listen(0, "127.0.0.1", r));
      servers.push(s);
    }
    console.log(servers.map((s) => s.address().port).join(" "));
    servers.forEach((s) => s.close());
  })();')

[ -n "${A3:-}" ] || { echo "could not find free ports" >&2; exit 1; }
start redis redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no
for _ in $(seq 100); do
  redis-cli -p "$REDIS" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$REDIS" ping >/dev/null

NODES_JSON=()
i=0
for ports in "$P1 $A1" "$P2 $A2" "$P3 $A3"; do
  i=$((i + 1))
  read -r port admin <<<"$ports"
  NO_COLOR=1 start "n$i" "$BIN" --node-id "n$i" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --redis-url "redis://127.0.0.1:$REDIS/" --drain-seconds 2 --presence-interval 1s --list-rooms 'concert-*'
  NODES_JSON+=("{\"id\":\"n$i\",\"pid\":${PIDS[-1]},\"client\":\"127.0.0.1:$port\",\"admin\":\"127.0.0.1:$admin\"}")
done
for admin in "$A1" "$A2" "$A3"; do wait_http "http://127.0.0.1:$admin/readyz"; done

# leastconn: the usual balancing for long-lived WebSockets (each new one goes to the node with the
# fewest). Health checks on /readyz take a draining node out; redispatch retries a refused connect
# on another node.
cat >"$WORK/haproxy.cfg" <<EOF
global
  maxconn 1000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 60s
  timeout tunnel 1h
  retries 3
  option redispatch 1
frontend live
  bind 127.0.0.1:$LB
  default_backend gateways
backend gateways
  balance leastconn
  option httpchk
  http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
  default-server check inter 300ms fall 1 rise 2
  server n1 127.0.0.1:$P1 check port $A1
  server n2 127.0.0.1:$P2 check port $A2
  server n3 127.0.0.1:$P3 check port $A3
EOF
haproxy -c -q -f "$WORK/haproxy.cfg"
start haproxy haproxy -db -f "$WORK/haproxy.cfg"
wait_http "http://127.0.0.1:$LB/"

log "browser tests (headless Chromium)"
# In its own process group and waited for in the background, so that a signal to this script
# runs the cleanup at once and stops the test runner, its test process and Chromium with it.
GATEWAY_URL="http://127.0.0.1:$LB" \
  GATEWAY_NODES="[$(IFS=,; echo "${NODES_JSON[*]}")]" \
  CHROMIUM="$CHROMIUM" \
  SCREENSHOT_DIR="$OUT" \
  GATEWAY_BIN="$BIN" \
  setsid node --test --test-concurrency=1 --test-timeout=240000 browser/test/live-room.test.mjs \
    browser/test/live-room-auth.test.mjs &
TEST_PID=$!
wait "$TEST_PID"

log "screenshots"
ls -l "$OUT"/*.png
echo "browser tests passed"
