#!/usr/bin/env bash
# A distributed load test on loopback: two generators (`--shard 0/2` and `--shard 1/2`, the same
# --room-prefix and --start-at) against a real gateway cluster (redis + 2 nodes + HAProxy,
# deploy/local/cluster.sh), then `loadtest merge` of their summaries with --expect rules. Checks
# that the shards split the members, that each shard alone cannot judge loss (its own members
# receive the other shard's publishes), and that the merge accounts for all of it: lost == 0 and
# expected == the whole run's.
#
# Environment:
#   LOADTEST_BIN, GATEWAY_BIN  binaries to use (default target/release/…, built when missing)
#   SHARDS_BASE_PORT           port base (default 27700; see deploy/local/cluster.sh)
#   LOADTEST_OUT               reports and logs (default target/loadtest-shards)
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'loadtest-shards: %s\n' "$*" >&2
  exit 1
}

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

out="${LOADTEST_OUT:-$root/target/loadtest-shards}"
rm -rf "$out"
mkdir -p "$out"
export CLUSTER_DIR="$out/cluster"
export BASE_PORT="${SHARDS_BASE_PORT:-27700}"
loadtest="${LOADTEST_BIN:-$root/target/release/loadtest}"
if ! command -v python3 >/dev/null 2>&1; then
  [ "$(id -u)" -eq 0 ] || die "python3 is needed: install it or run as root"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3
fi
export GATEWAY_BIN="${GATEWAY_BIN:-$root/target/release/gateway}"
if [ -z "${LOADTEST_BIN:-}" ] || [ ! -x "$GATEWAY_BIN" ]; then
  log "building the gateway and the load tester (release)"
  cargo build --release -p gateway -p loadtest
fi

pids=()
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  deploy/local/cluster.sh stop >/dev/null 2>&1 || true
  [ "$status" -eq 0 ] || log "distributed load test FAILED (logs in $out)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "redis, two gateway nodes, HAProxy"
deploy/local/cluster.sh start 2
eval "$(deploy/local/cluster.sh env)"

rooms="1x2x40@5/0.1 6x1x6@4/0.5"
start_at=$(($(date +%s) + 12))
prefix="shards$$"
log "two generators, shard 0/2 and 1/2, window at $(date -u -d "@$start_at" +%H:%M:%S) UTC"
for i in 0 1; do
  timeout 300 "$loadtest" --target "$CLUSTER_LB" --rooms "$rooms" \
    --shard "$i/2" --room-prefix "$prefix" --start-at "$start_at" \
    --measure 8s --drain 3s --live-interval 3s \
    --summary-file "$out/summary-$i.json" --html-report "$out/report-$i.html" \
    --expect lost==0 >"$out/generator-$i.log" 2>&1 &
  pids+=($!)
done
statuses=()
for p in "${pids[@]}"; do
  s=0
  wait "$p" || s=$?
  statuses+=("$s")
done
pids=()
for i in 0 1; do
  sed -n '/=== LIVE ROOMS SUMMARY/,/^result/p' "$out/generator-$i.log"
  grep -q '"version": 1' "$out/summary-$i.json" || die "generator $i wrote no summary"
done
echo "generators exited ${statuses[*]} (a shard alone cannot judge loss: its members hear the other shard's publishers)"

log "loadtest merge"
status=0
"$loadtest" merge "$out"/summary-*.json --expect lost==0 --expect duplicates==0 \
  --expect connect-errors==0 --expect "p99<2s" --expect presence-wrong==0 \
  --summary-file "$out/merged.json" --html-report "$out/merged.html" | tee "$out/merge.log" ||
  status=$?
[ "$status" -eq 0 ] || die "the merged run failed its rules (status $status)"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
parts = [json.load(open(f"{out}/summary-{i}.json")) for i in (0, 1)]
merged = json.load(open(f"{out}/merged.json"))
members = 1 * (2 + 40) + 6 * (1 + 6)
assert merged["run"]["generators"] == 2, merged["run"]
assert merged["run"]["hosts"] + merged["run"]["viewers"] == members, merged["run"]
assert all(p["run"]["hosts"] + p["run"]["viewers"] < members for p in parts), "each shard has a share"
assert merged["connections"]["members_from_start"] == members
published = sum(sum(r["published"].values()) for r in merged["rooms"])
assert published == merged["messages"]["published"] > 0
assert merged["messages"]["expected"] > sum(p["messages"]["expected"] for p in parts), \
    "the whole expects more than the shards' own products"
assert merged["messages"]["lost"] == 0 and merged["pass"], merged["messages"]
print(f"merged: {members} members, {published} published, "
      f"{merged['messages']['expected']} expected, {merged['messages']['delivered']} delivered, lost 0")
PY
log "distributed load test passed (reports in $out)"
