#!/usr/bin/env bash
# Quiet rooms and the write window, in one run: two release gateway nodes on one redis-server,
# one with the default --write-window (20 ms) and one with --write-window 0, each loaded in turn
# by the load tester with many quiet rooms (default 500 rooms x 3 hosts x 5 viewers, 2 msg/s per
# host, `--rooms "500x3x5@2/0"`), alternating RUNS times. Prints each run's end-to-end p50/p99
# and loss, and the medians per node: a quiet room must pay nothing for the window (the window's
# p99 no worse than the window-off node's, within noise). docs/benchmarks.md quotes it.
#
# Environment: ROOMS (default 500x3x5@2/0), MEASURE (20s), RUNS (3), OUT (target/bench-quiet-rooms),
# GATEWAY_BIN and LOADTEST_BIN (default target/release/…, built when missing).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"
rooms="${ROOMS:-500x3x5@2/0}"
measure="${MEASURE:-20s}"
runs="${RUNS:-3}"
out="${OUT:-$root/target/bench-quiet-rooms}"
gateway="${GATEWAY_BIN:-$root/target/release/gateway}"
loadtest="${LOADTEST_BIN:-$root/target/release/loadtest}"

log() { printf '==> %s\n' "$*"; }
if [ ! -x "$gateway" ] || [ ! -x "$loadtest" ]; then
  log "building the gateway and the load tester (release)"
  cargo build --release -p gateway -p loadtest
fi
command -v redis-server >/dev/null || { echo "redis-server is needed" >&2; exit 1; }
ulimit -n 20000 || true

rm -rf "$out"
mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

redis_port=$(free_port)
redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no >"$out/redis.log" 2>&1 &
pids+=($!)

declare -A client admin
for node in on off; do
  client[$node]=$(free_port)
  admin[$node]=$(free_port)
  window=20ms
  [ "$node" = off ] && window=0
  "$gateway" --listen "127.0.0.1:${client[$node]}" --admin-listen "127.0.0.1:${admin[$node]}" \
    --node-id "window-$node" --redis-url "redis://127.0.0.1:$redis_port" --write-window "$window" \
    >"$out/gateway-$node.log" 2>&1 &
  pids+=($!)
done
for node in on off; do
  for _ in $(seq 1 100); do
    curl -fsS "127.0.0.1:${admin[$node]}/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

for run in $(seq 1 "$runs"); do
  for node in on off; do
    log "run $run, write window $node: --rooms $rooms, --measure $measure"
    "$loadtest" --target "ws://127.0.0.1:${client[$node]}" --rooms "$rooms" --measure "$measure" \
      --room-prefix "q$run$node" --summary-file "$out/$node-$run.json" --expect lost==0 \
      >"$out/$node-$run.log" 2>&1 || { tail -20 "$out/$node-$run.log"; exit 1; }
  done
done

python3 - "$out" "$runs" "$rooms" <<'PY'
import json, statistics, sys
out, runs, rooms = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for node in ("on", "off"):
    for r in range(1, runs + 1):
        s = json.load(open(f"{out}/{node}-{r}.json"))
        lat, m = s["latency_us"], s["messages"]
        rows.setdefault(node, []).append((lat["p50"] / 1000, lat["p99"] / 1000, m["lost"], m["expected"]))
print(f"quiet rooms {rooms}: end-to-end latency, ms (each run, then the median)")
print("| write window | p50 | p99 | lost / expected |")
print("|---|---|---|---|")
for node, label in (("on", "20 ms (default)"), ("off", "0 (off)")):
    rs = rows[node]
    p50 = statistics.median(r[0] for r in rs); p99 = statistics.median(r[1] for r in rs)
    runs_s = " / ".join(f"{r[1]:.1f}" for r in rs)
    lost = sum(r[2] for r in rs); exp = sum(r[3] for r in rs)
    print(f"| {label} | {p50:.1f} | **{p99:.1f}** ({runs_s}) | {lost} / {exp} |")
PY
