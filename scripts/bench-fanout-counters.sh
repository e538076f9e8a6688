#!/usr/bin/env bash
# The gateway's own cost of a fan-out, counted rather than timed: starts redis-server and the given
# gateway binary on free loopback ports, runs the side-by-side benchmark's neutral client
# (wsbench, from the cache ../shared/bench/sidebyside.py fills: run it once first) with one host
# publishing to VIEWERS viewers of one room, and prints, per delivery, the gateway's CPU while
# messages flow (`perf stat` attached for SECONDS-2 of the publishing seconds) and over the whole
# phase (handshakes, publishing, drain, closes), and its syscalls and context switches per 1 000
# deliveries. Counts of writes do not depend on how busy the machine is, so two builds can be
# compared on a shared machine (docs/benchmarks.md, "The storm's efficiency ...").
#
#   scripts/bench-fanout-counters.sh GATEWAY_BIN LABEL [VIEWERS=1000] [RATE=200] [SECONDS=8]
set -euo pipefail
bin=$1 label=$2 viewers=${3:-1000} rate=${4:-200} secs=${5:-8}
wsbench=${WSBENCH:-${SIDEBYSIDE_CACHE:-/tmp/sidebyside-cache}/wsbench-target/release/wsbench}
[ -x "$wsbench" ] || { echo "no wsbench at $wsbench: run ../shared/bench/sidebyside.py once" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is needed (Debian: linux-perf)" >&2; exit 1; }
ulimit -n 20000
work=$(mktemp -d)
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rport=$(free_port) gport=$(free_port) aport=$(free_port)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
redis-server --bind 127.0.0.1 --port "$rport" --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
sleep 0.5
"$bin" --listen "127.0.0.1:$gport" --admin-listen "127.0.0.1:$aport" --redis-url "redis://127.0.0.1:$rport" \
  --node-id bench --max-publish-rate 0 >"$work/gateway.log" 2>&1 &
gw=$!
pids+=("$gw")
sleep 1.5
cpu() { awk '{print $14 + $15}' "/proc/$gw/stat"; }
c0=$(cpu)
"$wsbench" --mode fanout --proto raw --sub-url "ws://127.0.0.1:$gport/ws/{room}" \
  --pub-url "ws://127.0.0.1:$gport/ws/{room}?role=host" --pub-style gateway --conns "$viewers" --rooms 1 \
  --rate "$rate" --seconds "$secs" --sources 127.0.0.2,127.0.0.3 >"$work/client.out" 2>/dev/null &
client=$!
sleep 3 # connections made, publishing under way
perf stat -x, -o "$work/stat.csv" -p "$gw" -e task-clock,context-switches,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_recvfrom -- sleep $((secs - 2))
wait "$client"
c1=$(cpu)
python3 - "$work/stat.csv" "$work/client.out" "$viewers" "$rate" "$secs" "$label" "$c0" "$c1" <<'PY'
import json, sys
stat, out, v, r, s, label, c0, c1 = sys.argv[1:]
v, r, s = int(v), int(r), int(s)
done = next(json.loads(l) for l in open(out) if '"done"' in l)
counted = v * r * (s - 2)
row = [f"{label}: delivered {done['delivered']}/{done['expected']}, p50 {done['p50_ms']} ms, p99 {done['p99_ms']} ms",
       f"whole phase {(float(c1) - float(c0)) * 1e4 / (v * r * s):.3f} µs/delivery"]
for line in open(stat):
    f = line.strip().split(",")
    if len(f) < 3 or not f[0] or f[0].startswith("#"):
        continue
    try:
        value = float(f[0])
    except ValueError:
        continue
    name = f[2].replace("syscalls:sys_enter_", "")
    row.append(f"publishing {value * 1e3 / counted:.3f} µs/delivery" if name == "task-clock"
               else f"{name} {value * 1e3 / counted:.1f}/1k")
print(", ".join(row))
PY
