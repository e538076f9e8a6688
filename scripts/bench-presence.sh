#!/usr/bin/env bash
# What presence costs (issue 22, docs/benchmarks.md "Presence"): MEMBERS members in one room (one
# host, the rest viewers) spread over NODES release gateway nodes on one redis-server, with
# --presence-interval INTERVAL and no messages at all, held for MEASURE. Over that window it
# reads, from /proc and the nodes' /metrics and Redis's INFO commandstats:
#   - CPU per presence tick, all nodes together (ms);
#   - Redis commands per tick (all of them: the presence scripts, the nodes' probes);
#   - presence frames and bytes sent per member per minute (frames written to sockets: with no
#     messages in the room every text frame written is a `presence`), and the frames the nodes
#     did not send because the counts had not changed (`gateway_presence_unchanged_total`).
# Run it with GATEWAY_BIN pointing at another build to compare (docs/benchmarks.md quotes the
# build before counts-on-change against the one after).
#
# Counts that change at every tick cost what every tick cost before counts-on-change (one frame
# per member per tick); this measures the other end, a room whose counts hold still.
#
# Environment: MEMBERS [10000]  NODES [3]  INTERVAL [1s]  MEASURE [60s]  OUT [target/bench-presence]
# GATEWAY_BIN, LOADTEST_BIN (default target/release/…, built when missing).
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"
members="${MEMBERS:-10000}"
nodes="${NODES:-3}"
interval="${INTERVAL:-1s}"
measure="${MEASURE:-60s}"
out="${OUT:-$root/target/bench-presence}"
gateway="${GATEWAY_BIN:-$root/target/release/gateway}"
loadtest="${LOADTEST_BIN:-$root/target/release/loadtest}"

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'bench-presence: %s\n' "$*" >&2
  exit 1
}
if [ ! -x "$gateway" ] || [ ! -x "$loadtest" ]; then
  log "building the gateway and the load tester (release)"
  cargo build --release -p gateway -p loadtest
fi
command -v redis-server >/dev/null || die "redis-server is needed"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((members + 1000)) ] || die "the open-file limit is below MEMBERS + 1000"

rm -rf "$out"
mkdir -p "$out"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secs() { awk -v d="$1" 'BEGIN { if (d ~ /ms$/) { sub(/ms$/, "", d); print d / 1000 } else { sub(/s$/, "", d); print d + 0 } }'; }

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
for _ in $(seq 1 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

targets="" admins=() gw=()
for i in $(seq 1 "$nodes"); do
  c=$(free_port) a=$(free_port)
  "$gateway" --listen "127.0.0.1:$c" --admin-listen "127.0.0.1:$a" --node-id "p$i" \
    --redis-url "redis://127.0.0.1:$redis_port" --presence-interval "$interval" \
    >"$out/gateway-$i.log" 2>&1 &
  pids+=($!)
  gw+=($!)
  admins+=("$a")
  targets+="${targets:+,}ws://127.0.0.1:$c"
done
for a in "${admins[@]}"; do
  for _ in $(seq 1 100); do curl -fsS "127.0.0.1:$a/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
done

cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }
gw_cpu() { for p in "${gw[@]}"; do cpu_s "$p"; done | awk '{ s += $1 } END { printf "%.2f", s }'; }
metric() {
  for a in "${admins[@]}"; do
    curl -fsS "127.0.0.1:$a/metrics" | awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { printf "%d\n", s }'
  done | awk '{ s += $1 } END { printf "%d", s }'
}
redis_calls() {
  redis-cli -p "$redis_port" info commandstats |
    awk -F'[:=,]' '/^cmdstat_/ { s += $3 } END { printf "%d", s }'
}

window_s=$(secs "$measure")
tick_s=$(secs "$interval")
ramp=$(((members + 1499) / 1500))
start_at=$(($(date +%s) + ramp + 8))
log "$members members in one room over $nodes nodes, presence every $interval; window of ${window_s}s at $(date -u -d "@$start_at" +%H:%M:%S) UTC"
"$loadtest" --target "$targets" --rooms "1x1x$((members - 1))@0/0" --start-at "$start_at" \
  -r 1500 --measure "$measure" --drain 2s --room-prefix "pres$$" \
  --summary-file "$out/summary.json" --no-print-metrics >"$out/loadtest.log" 2>&1 &
lt=$!
pids+=($lt)

sleep $((start_at - $(date +%s) > 0 ? start_at - $(date +%s) : 0))
sleep 2
c0=$(gw_cpu) r0=$(redis_calls) f0=$(metric gateway_messages_delivered_total) u0=$(metric gateway_presence_unchanged_total)
held=$(metric 'gateway_connections{')
sleep "$(awk -v w="$window_s" 'BEGIN { print w - 4 }')"
c1=$(gw_cpu) r1=$(redis_calls) f1=$(metric gateway_messages_delivered_total) u1=$(metric gateway_presence_unchanged_total)
status=0
wait "$lt" || status=$?

frame_bytes=$(python3 -c "
import json, sys
room, n = sys.argv[1], int(sys.argv[2])
body = json.dumps({'type': 'presence', 'room': room, 'hosts': 1, 'viewers': n - 1}, separators=(',', ':'))
print(len(body) + (2 if len(body) < 126 else 4))" "pres$$-g0-0" "$members")
python3 - "$members" "$held" "$nodes" "$interval" "$window_s" "$tick_s" "$c0" "$c1" "$r0" "$r1" \
  "$f0" "$f1" "$u0" "$u1" "$frame_bytes" <<'PY' | tee "$out/result.txt"
import sys
(members, held, nodes, interval, window, tick, c0, c1, r0, r1, f0, f1, u0, u1, frame) = sys.argv[1:]
window = float(window) - 4
ticks = window / float(tick)
held = max(int(held), 1)
cpu_ms = (float(c1) - float(c0)) * 1000 / ticks
calls = (int(r1) - int(r0)) / ticks
frames = int(f1) - int(f0)
per_min = frames / held * 60 / window
print(f"presence: {held} members in one room on {nodes} nodes, --presence-interval {interval}; {window:.0f} s measured ({ticks:.0f} ticks)")
print(f"  CPU per tick, all nodes: {cpu_ms:.1f} ms")
print(f"  Redis commands per tick: {calls:.1f}")
print(f"  presence frames per member per minute: {per_min:.2f} ({per_min * int(frame):.0f} bytes at {frame} bytes a frame)")
print(f"  frames not sent (counts unchanged): {int(u1) - int(u0)}")
PY
[ "$status" -eq 0 ] || log "the load tester exited $status (see $out/loadtest.log)"
