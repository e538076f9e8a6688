#!/usr/bin/env bash
# The load tester against a TLS deployment: a TLS-terminating HAProxy (certificate signed by a CA
# this script generates with openssl) in front of two gateway nodes and redis on loopback
# (deploy/local/cluster.sh). It checks that
#   1. the load tester reaches the nodes over wss:// by a host name that only --resolve knows
#      (gw.test), trusting the CA with --ca-file, and a run with HTTP API publishes passes
#      (lost==0, no connect error);
#   2. the same works by the name `localhost` without --resolve;
#   3. without --ca-file the certificate is refused: connect errors of cause `tls`, exit non-zero;
#      with --insecure (and no CA) it is accepted;
#   4. the run's HTML report opens in headless Chromium without a console error
#      (browser/test/loadtest-report.test.mjs; skipped with LOADTEST_TLS_NO_BROWSER=1).
#
# Works from a fresh clone as root: installs openssl, haproxy, redis-server (and chromium for
# step 4) when missing and builds the release binaries.
#
# Environment:
#   LOADTEST_BIN, GATEWAY_BIN  binaries to use (default target/release/…, built when missing)
#   TLS_BASE_PORT              port base (default 27500; see deploy/local/cluster.sh)
#   LOADTEST_OUT               reports and logs (default target/loadtest-tls)
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'loadtest-tls: %s\n' "$*" >&2
  exit 1
}

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

out="${LOADTEST_OUT:-$root/target/loadtest-tls}"
rm -rf "$out"
mkdir -p "$out/pki"
export CLUSTER_DIR="$out/cluster"
export BASE_PORT="${TLS_BASE_PORT:-27500}"
export NO_HAPROXY=1
tls_port=$((BASE_PORT + 443))
loadtest="${LOADTEST_BIN:-$root/target/release/loadtest}"
export GATEWAY_BIN="${GATEWAY_BIN:-$root/target/release/gateway}"

missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if [ "${#missing[@]}" -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}: install them or run as root"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ -z "${LOADTEST_BIN:-}" ] || [ ! -x "$GATEWAY_BIN" ]; then
  log "building the gateway and the load tester (release)"
  cargo build --release -p gateway -p loadtest
fi

haproxy_pid=
cleanup() {
  local status=$?
  if [ -n "$haproxy_pid" ]; then
    kill "$haproxy_pid" 2>/dev/null || true
    wait "$haproxy_pid" 2>/dev/null || true
  fi
  deploy/local/cluster.sh stop >/dev/null 2>&1 || true
  [ "$status" -eq 0 ] || log "TLS load test FAILED (logs and reports in $out)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "a CA and a certificate for gw.test and localhost (openssl)"
pki="$out/pki"
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 2 -subj "/CN=loadtest test CA" \
  -keyout "$pki/ca.key" -out "$pki/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=gw.test" \
  -keyout "$pki/server.key" -out "$pki/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:gw.test,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$pki/ext.cnf"
openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -sha256 -extfile "$pki/ext.cnf" -out "$pki/server.pem" 2>/dev/null
cat "$pki/server.pem" "$pki/server.key" >"$pki/haproxy.pem"

log "redis and two gateway nodes"
# Presence every second: the runs are short (1 s settle, 5 s window, 2 s drain), and each member's
# last `presence` must show its room's whole size by the end of the drain (presence-wrong==0),
# which takes up to two intervals after the last join when members are on both nodes.
export GATEWAY_ARGS="${GATEWAY_ARGS:-} --presence-interval 1s"
deploy/local/cluster.sh start 2
n1=$((BASE_PORT + 81))
n2=$((BASE_PORT + 82))

log "HAProxy terminating TLS on 127.0.0.1:$tls_port"
cat >"$out/haproxy.cfg" <<CFG
global
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout tunnel 1h
frontend tls
    bind 127.0.0.1:$tls_port ssl crt $pki/haproxy.pem
    default_backend gateways
backend gateways
    balance roundrobin
    server n1 127.0.0.1:$n1
    server n2 127.0.0.1:$n2
CFG
haproxy -c -q -f "$out/haproxy.cfg"
haproxy -db -f "$out/haproxy.cfg" >"$out/haproxy.log" 2>&1 &
haproxy_pid=$!
for _ in $(seq 50); do
  curl -fsk -o /dev/null --max-time 1 "https://127.0.0.1:$tls_port/" 2>/dev/null && break
  sleep 0.2
done

run() {
  local name=$1
  shift
  local status=0
  timeout 180 "$loadtest" --rooms "4x1x10@5/0.5" --settle 1s --measure 5s --drain 2s \
    --live-interval 2s --summary-file "$out/$name.json" "$@" >"$out/$name.log" 2>&1 || status=$?
  sed -n '/=== LIVE ROOMS SUMMARY/,/^result/p' "$out/$name.log"
  return "$status"
}

log "1. wss://gw.test (only --resolve knows it) with --ca-file, WebSocket and HTTP API publishers"
run by-name --target "wss://gw.test:$tls_port" --resolve "gw.test:$tls_port:127.0.0.1" \
  --ca-file "$pki/ca.pem" --api-publish-rate 2 --html-report "$out/report.html" \
  --expect lost==0 --expect connect-errors==0 --expect publish-errors==0 --expect "p99<2s" \
  --expect presence-wrong==0 ||
  die "the run over wss:// with --ca-file failed"
grep -q '"api_published": [1-9]' "$out/by-name.json" || die "no HTTP API publish went through"

log "2. wss://localhost with --ca-file"
run localhost --target "wss://localhost:$tls_port" --ca-file "$pki/ca.pem" \
  --expect lost==0 --expect connect-errors==0 --expect presence-wrong==0 || die "the run over wss://localhost failed"

log "3. without --ca-file: the certificate must be refused"
status=0
run untrusted --target "wss://gw.test:$tls_port" --resolve "gw.test:$tls_port:127.0.0.1" \
  --no-reconnect --expect connect-errors==0 || status=$?
[ "$status" -ne 0 ] || die "the untrusted certificate was accepted"
grep -q '"tls": [1-9]' "$out/untrusted.json" || die "the refusals were not counted as tls errors"
echo "refused as expected (exit $status)"

log "3b. --insecure accepts the untrusted certificate (explicitly)"
run insecure --target "wss://gw.test:$tls_port" --resolve "gw.test:$tls_port:127.0.0.1" \
  --insecure --expect lost==0 --expect connect-errors==0 --expect presence-wrong==0 ||
  die "--insecure did not connect"

if [ "${LOADTEST_TLS_NO_BROWSER:-0}" != 1 ]; then
  log "4. the HTML report in headless Chromium"
  chromium="${CHROMIUM:-/usr/bin/chromium}"
  if [ ! -x "$chromium" ]; then
    [ "$(id -u)" -eq 0 ] || die "chromium missing: install it or run as root"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
  fi
  command -v node >/dev/null 2>&1 || die "Node.js 20+ is needed for the report check"
  [ -d browser/node_modules/playwright-core ] ||
    (cd browser && npm ci --no-audit --no-fund --loglevel=error)
  REPORT_FILE="$out/report.html" CHROMIUM="$chromium" SCREENSHOT_DIR="$out" \
    node --test browser/test/loadtest-report.test.mjs
fi

log "TLS load test passed (reports in $out)"
