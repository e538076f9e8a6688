#!/usr/bin/env bash
# Audience scale (docs/benchmarks.md, "Audience scale"): VIEWERS viewers in one room, plus HOSTS
# hosts publishing SIZE-byte messages at RATE messages a second each, over NODES gateway nodes on
# one Redis (release builds, no load balancer: the generators spread their connections over the
# nodes), loaded by SHARDS load-generator processes (`--shard i/SHARDS`, the same --room-prefix and
# --start-at), each from loopback source addresses of its own (`--bind`), then `loadtest merge`
# for one verdict. Every process stays under the machine's open-file limit (20 000 here): a node
# holds VIEWERS/NODES connections, a generator VIEWERS/SHARDS.
#
# Prints and writes (OUT/result.txt): the time for every member to join (handshakes/s), the
# gateways' RSS per connection, the CPU per delivery of the gateways and of the generators, the
# merged verdict (delivered/expected, lost, p50/p99/p99.9) and how many members saw their room's
# exact presence counts at the end.
#
# Environment (defaults in brackets):
#   VIEWERS [100000]  HOSTS [2]  RATE [1] msg/s per host  SIZE [100] bytes
#   ROOMS [1]         with ROOMS > 1, the viewers are spread evenly over ROOMS rooms with HOSTS
#                     hosts each
#   NODES [VIEWERS/16000, rounded up]  SHARDS [as NODES]  MEASURE [30s]  DRAIN [10s]
#   HATCH [1500]      connections per second per generator
#   GEN_THREADS [1]   each generator's --threads (0: one per core)
#   BROKER [redis]    `memory`: one node on the in-process broker (the single-node reference;
#                     VIEWERS must then fit one process's open files); `cluster`: a Redis
#                     Cluster of 3 masters + 3 replicas (`cluster-node-timeout` DOWN_AFTER,
#                     `cluster-require-full-coverage no`); `sentinel`: a master, a replica and
#                     three sentinels (`down-after-milliseconds` DOWN_AFTER)
#   FAULT_AT          with `cluster` or `sentinel`: SIGKILL a master this many seconds into the
#                     window (the master of the first room's slot, or the Sentinel master) and
#                     report the failover: its duration as the nodes saw it, members closed,
#                     reconnects, resumes, refused publishes (re-sent), lost
#   DOWN_AFTER [2000] ms, the failure detection of `cluster` and `sentinel`
#   PRESENCE [5s]     the nodes' --presence-interval
#   EXPECT            extra --expect rules for the merge (lost==0 and duplicates==0 always)
#   OUT [target/bench-audience]; GATEWAY_BIN, LOADTEST_BIN (default target/release/…, built
#   when missing); BASE_PORT [24000]
#
# Everything runs on this machine's loopback: 127.0.0.1 for the nodes and Redis, 127.0.S.1-4 as
# generator S's source addresses.
#
# Failover at audience scale (issue 21), e.g.:
#   VIEWERS=100000 ROOMS=1000 HOSTS=1 RATE=0.2 BROKER=cluster FAULT_AT=10 MEASURE=40s scripts/bench-audience.sh
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
root="$(pwd)"

log() { printf '==> %s\n' "$*"; }
die() {
  printf 'bench-audience: %s\n' "$*" >&2
  exit 1
}

viewers="${VIEWERS:-100000}"
hosts="${HOSTS:-2}"
rate="${RATE:-1}"
size="${SIZE:-100}"
rooms="${ROOMS:-1}"
broker="${BROKER:-redis}"
fault_at="${FAULT_AT:-}"
down_after="${DOWN_AFTER:-2000}"
case "$broker" in redis | memory | cluster | sentinel) ;; *) die "BROKER must be redis, memory, cluster or sentinel" ;; esac
[ -z "$fault_at" ] || [ "$broker" = cluster ] || [ "$broker" = sentinel ] ||
  die "FAULT_AT needs BROKER=cluster or BROKER=sentinel"
per_node=16000
if [ "$broker" = memory ]; then
  nodes=1
else
  nodes="${NODES:-$(((viewers + per_node - 1) / per_node))}"
fi
shards="${SHARDS:-$nodes}"
measure="${MEASURE:-30s}"
drain="${DRAIN:-10s}"
hatch="${HATCH:-1500}"
presence="${PRESENCE:-5s}"
out="${OUT:-$root/target/bench-audience}"
export GATEWAY_BIN="${GATEWAY_BIN:-$root/target/release/gateway}"
loadtest="${LOADTEST_BIN:-$root/target/release/loadtest}"
[ "$nodes" -le 9 ] || die "at most 9 nodes (deploy/local/cluster.sh)"
[ "$shards" -le 250 ] || die "at most 250 generators"
[ $((viewers % rooms)) -eq 0 ] || die "VIEWERS must be a multiple of ROOMS"

if [ ! -x "$GATEWAY_BIN" ] || [ ! -x "$loadtest" ]; then
  log "building the gateway and the load tester (release)"
  cargo build --release -p gateway -p loadtest
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" -ge $((viewers / shards + 1000)) ] ||
  die "the open-file limit ($(ulimit -n)) is below a generator's share; raise SHARDS"

rm -rf "$out"
mkdir -p "$out"
export CLUSTER_DIR="$out/cluster"
export BASE_PORT="${BASE_PORT:-24000}"
export NO_HAPROXY=1
export GATEWAY_ARGS="${GATEWAY_ARGS:-} --presence-interval $presence"

pids=()
redis_pids=()
cleanup() {
  local status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  deploy/local/cluster.sh stop >/dev/null 2>&1 || true
  for p in "${redis_pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# /proc/PID: CPU seconds (user + system) and RSS in KiB.
cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
node_pids() { for i in $(seq 1 "$nodes"); do cat "$CLUSTER_DIR/node$i.pid"; done; }
sum() { awk '{ s += $1 } END { printf "%.2f", s }'; }
connections() {
  local total=0 i v
  for i in $(seq 1 "$nodes"); do
    # gateway_connections{role="host"|"viewer"}: both roles.
    v=$(curl -fsS "http://127.0.0.1:$((BASE_PORT + 90 + i))/metrics" 2>/dev/null |
      awk '/^gateway_connections[{ ]/ { s += $NF } END { printf "%d", s }' || true)
    v=${v%.*}
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

if [ "$broker" = memory ]; then
  log "one gateway node on the in-process broker"
  mkdir -p "$CLUSTER_DIR"
  port=$((BASE_PORT + 81)) admin=$((BASE_PORT + 91))
  "$GATEWAY_BIN" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --node-id n1 \
    --drain-seconds 2 --presence-interval "$presence" >"$CLUSTER_DIR/node1.log" 2>&1 &
  pids+=($!)
  echo "$!" >"$CLUSTER_DIR/node1.pid"
  for _ in $(seq 1 100); do
    curl -fsS "127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  targets="ws://127.0.0.1:$port"
else
  rdir="$out/redis"
  mkdir -p "$rdir"
  # Six server ports and their cluster-bus ports (+10000) all free, from BASE_PORT+300 on.
  port_free() { ! ss -Htan "sport = :$1" | grep -q .; }
  rport=$((BASE_PORT + 300))
  while :; do
    ok=1
    for i in $(seq 0 12); do
      port_free $((rport + i)) && port_free $((rport + i + 10000)) || { ok=0; break; }
    done
    [ "$ok" = 1 ] && break
    rport=$((rport + 13))
  done
  # redis_start PORT ARGS...: one redis-server on loopback, recorded for cleanup and the fault.
  redis_start() {
    local port="$1"
    shift
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$rdir" \
      --maxclients 4000 "$@" >"$rdir/$port.log" 2>&1 &
    redis_pids+=($!)
    echo "$!" >"$rdir/$port.pid"
    for _ in $(seq 1 50); do
      redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
      sleep 0.1
    done
    die "redis-server on $port did not start"
  }
  case "$broker" in
    cluster)
      log "a Redis Cluster: 3 masters + 3 replicas on $rport-$((rport + 5))"
      addrs=()
      for i in 0 1 2 3 4 5; do
        redis_start $((rport + i)) --cluster-enabled yes \
          --cluster-config-file "nodes-$((rport + i)).conf" --cluster-node-timeout "$down_after" \
          --cluster-require-full-coverage no --repl-diskless-sync-delay 0
        addrs+=("127.0.0.1:$((rport + i))")
      done
      redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$rdir/create.log" 2>&1 || die "redis-cli --cluster create failed ($rdir/create.log)"
      for _ in $(seq 1 100); do
        redis-cli -p "$rport" cluster info | grep -q cluster_state:ok && break
        sleep 0.2
      done
      export REDIS_URL="redis+cluster://127.0.0.1:$rport,127.0.0.1:$((rport + 1)),127.0.0.1:$((rport + 2))"
      ;;
    sentinel)
      log "Sentinel: a master on $rport, a replica on $((rport + 1)), sentinels on $((rport + 10))-$((rport + 12))"
      redis_start "$rport"
      redis_start $((rport + 1)) --replicaof 127.0.0.1 "$rport"
      for i in 0 1 2; do
        sp=$((rport + 10 + i))
        printf 'port %s\nbind 127.0.0.1\nsentinel monitor gw 127.0.0.1 %s 2\nsentinel down-after-milliseconds gw %s\nsentinel failover-timeout gw 10000\n' \
          "$sp" "$rport" "$down_after" >"$rdir/sentinel-$sp.conf"
        redis-server "$rdir/sentinel-$sp.conf" --sentinel >"$rdir/$sp.log" 2>&1 &
        redis_pids+=($!)
      done
      sleep 1
      export REDIS_URL="redis+sentinel://127.0.0.1:$((rport + 10)),127.0.0.1:$((rport + 11)),127.0.0.1:$((rport + 12))/gw"
      ;;
  esac
  log "${REDIS_URL:-redis} and $nodes gateway nodes"
  deploy/local/cluster.sh start "$nodes" >"$out/cluster.log"
  eval "$(deploy/local/cluster.sh env)"
  targets="$CLUSTER_NODES"
fi

if [ "$rooms" -eq 1 ]; then
  spec="1x${hosts}x${viewers}@${rate}/0"
else
  spec="${rooms}x${hosts}x$((viewers / rooms))@${rate}/0"
fi
members=$((viewers + hosts * rooms))
# One worker thread per generator (GEN_THREADS, 0 for one per core): the generators and the nodes
# share the machine's cores, and a multi-threaded generator spends ~15 % more CPU per message
# waking its idle threads (docs/benchmarks.md, "The generator's own cost").
threads="${GEN_THREADS:-1}"
# The window starts once every member can have joined at the hatch rate, with room to spare.
ramp=$(((members / shards + hatch - 1) / hatch))
start_at=$(($(date +%s) + ramp + 15))
prefix="aud$$"
log "$members members ($spec) from $shards generators at $hatch/s each; window at $(date -u -d "@$start_at" +%H:%M:%S) UTC"

mapfile -t gw < <(node_pids)
base_rss=0
for p in "${gw[@]}"; do base_rss=$((base_rss + $(rss_kib "$p"))); done
started=$(date +%s.%N)
gens=()
for s in $(seq 0 $((shards - 1))); do
  net=$((s + 1))
  "$loadtest" --target "$targets" --rooms "$spec" --message-size "$size" \
    --shard "$s/$shards" --room-prefix "$prefix" --start-at "$start_at" \
    --bind "127.0.$net.1-127.0.$net.4" -r "$hatch" --threads "$threads" \
    --measure "$measure" --drain "$drain" --live-interval 10s --deliver-sample 1000 \
    --summary-file "$out/summary-$s.json" --no-print-metrics \
    >"$out/generator-$s.log" 2>&1 &
  pids+=($!)
  gens+=($!)
done

# Join time: until the nodes hold every member.
joined_after=""
while :; do
  n=$(connections)
  if [ "$n" -ge "$members" ]; then
    joined_after=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    break
  fi
  [ "$(date +%s)" -lt "$start_at" ] || break
  sleep 0.5
done
all_rss=0
for p in "${gw[@]}"; do all_rss=$((all_rss + $(rss_kib "$p"))); done
held=$(connections)

# CPU over the window: from its start to its end.
sleep $((start_at - $(date +%s) > 0 ? start_at - $(date +%s) : 0))
gw_cpu0=$(for p in "${gw[@]}"; do cpu_s "$p"; done | sum)
gen_cpu0=$(for p in "${gens[@]}"; do cpu_s "$p"; done | sum)
window_s=$(awk -v m="$measure" 'BEGIN { sub(/s$/, "", m); print m + 0 }')
metric_sum() {
  local total=0 i v
  for i in $(seq 1 "$nodes"); do
    v=$(curl -fsS "http://127.0.0.1:$((BASE_PORT + 90 + i))/metrics" 2>/dev/null |
      awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { printf "%d", s }' || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
failover_s="" victim=""
if [ -n "$fault_at" ]; then
  sleep "$fault_at"
  if [ "$broker" = cluster ]; then
    slot=$(redis-cli -p "$rport" cluster keyslot "${prefix}-g0-0")
    victim=$(redis-cli --json -p "$rport" cluster slots | python3 -c '
import json, sys
slot = int(sys.argv[1])
for start, end, master, *_ in json.load(sys.stdin):
    if start <= slot <= end:
        print(master[1])
' "$slot")
  else
    victim=$(redis-cli -p $((rport + 10)) sentinel get-master-addr-by-name gw | tail -1)
  fi
  [ -n "$victim" ] || die "no master found to kill"
  log "SIGKILL the master on port $victim"
  killed=$(date +%s.%N)
  kill -9 "$(cat "$rdir/$victim.pid")"
  # Lost on every node, then back on every node.
  want=$([ "$broker" = cluster ] && echo $((3 * nodes)) || echo "$nodes")
  series=$([ "$broker" = cluster ] && echo gateway_redis_shard_up || echo gateway_redis_connected)
  for _ in $(seq 1 100); do [ "$(metric_sum "$series")" -lt "$want" ] && break; sleep 0.1; done
  for _ in $(seq 1 600); do [ "$(metric_sum "$series")" -ge "$want" ] && break; sleep 0.1; done
  failover_s=$(awk -v a="$killed" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  log "the nodes had the broker back $failover_s s after the kill"
  left=$((window_s - fault_at - ${failover_s%.*}))
  [ "$left" -gt 0 ] && sleep "$left"
else
  sleep "$window_s"
fi
closed_broker_lost=0
for i in $(seq 1 "$nodes"); do
  v=$(curl -fsS "http://127.0.0.1:$((BASE_PORT + 90 + i))/metrics" 2>/dev/null |
    awk '/^gateway_connections_closed_total\{/ && /reason="broker_lost"/ { s += $NF } END { printf "%d", s }' || true)
  closed_broker_lost=$((closed_broker_lost + ${v:-0}))
done
moved=$(metric_sum 'gateway_redis_reconnects_total')
gw_cpu1=$(for p in "${gw[@]}"; do cpu_s "$p"; done | sum)
gen_cpu1=$(for p in "${gens[@]}"; do cpu_s "$p"; done | sum)

statuses=()
for p in "${gens[@]}"; do
  s=0
  wait "$p" || s=$?
  statuses+=("$s")
done
pids=()

rules=(--expect lost==0 --expect duplicates==0)
for r in ${EXPECT:-}; do rules+=(--expect "$r"); done
status=0
"$loadtest" merge "$out"/summary-*.json "${rules[@]}" --summary-file "$out/merged.json" \
  --html-report "$out/merged.html" >"$out/merge.log" 2>&1 || status=$?

python3 - "$out" "$members" "$joined_after" "$held" "$base_rss" "$all_rss" \
  "$gw_cpu0" "$gw_cpu1" "$gen_cpu0" "$gen_cpu1" "$window_s" "$spec" "$nodes" "$shards" \
  "$broker" "${statuses[*]}" "$fault_at" "$failover_s" "$closed_broker_lost" "$moved" <<'PY' | tee "$out/result.txt"
import json, sys
(out, members, joined_after, held, base_rss, all_rss, g0, g1, c0, c1, window, spec, nodes,
 shards, broker, statuses, fault_at, failover_s, closed_lost, moved) = sys.argv[1:]
m = json.load(open(f"{out}/merged.json"))
msg, lat, pr = m["messages"], m["latency_us"], m.get("presence", {})
members, held = int(members), int(held)
deliveries = msg["delivered"]
window = float(window)
# Deliveries inside the CPU window: the run's rate over the window (messages are spread evenly).
in_window = msg["delivered_per_sec"] * window
gw_cpu, gen_cpu = float(g1) - float(g0), float(c1) - float(c0)
print(f"audience: {spec} on {nodes} node(s) ({broker} broker), {shards} generator(s); generator exits: {statuses}")
if joined_after:
    print(f"  join: {members} members in {joined_after} s ({members / float(joined_after):.0f} handshakes/s)")
else:
    print(f"  join: only {held} of {members} members held when the window started")
print(f"  gateway RSS: {(int(all_rss) - int(base_rss)) / max(held, 1):.2f} KiB per connection "
      f"({int(all_rss) / 1024:.0f} MiB for {held} connections on {nodes} node(s))")
print(f"  delivered {deliveries} of {msg['expected']} expected, lost {msg['lost']}, "
      f"duplicates {msg['duplicates']}, {msg['delivered_per_sec']:.0f}/s")
print(f"  latency end to end: p50 {lat['p50'] / 1000:.1f} ms, p99 {lat['p99'] / 1000:.1f} ms, "
      f"p99.9 {lat['p99.9'] / 1000:.1f} ms, max {lat['max'] / 1000:.1f} ms")
if in_window > 0:
    print(f"  CPU per delivery over the window: gateways {gw_cpu * 1e6 / in_window:.2f} µs, "
          f"generators {gen_cpu * 1e6 / in_window:.2f} µs ({gw_cpu:.1f} and {gen_cpu:.1f} CPU-s in {window:.0f} s)")
g = m["generator"]
if g.get("kib_per_member") is not None:
    print(f"  generators: {g['kib_per_member']:.1f} KiB per member, "
          f"{g.get('cpu_us_per_message') or 0:.2f} µs CPU per received message (whole run)")
if pr:
    print(f"  presence at the end: {pr['checked'] - pr['wrong']} of {pr['checked'] + pr['missing']} "
          f"members saw their room's exact counts ({pr['wrong']} wrong, {pr['missing']} without one)")
if fault_at:
    c, k = m["connections"], m["continuity"]
    print(f"  failover: master SIGKILLed {fault_at} s into the window; the broker back on every node "
          f"{failover_s} s later; members closed by the nodes (broker_lost) {closed_lost}; "
          f"the nodes' Redis connections moved or remade {moved}")
    print(f"    generators: reconnects {c['reconnects']}, closes {c['closes_by_code']}, resumes "
          f"{k['resumes']} ({k['recovered']} recovered), publishes refused {msg['publish_errors']} "
          f"{msg['errors_by_code']} and re-sent {k['resent']}, lost {msg['lost']}, gaps {msg['gaps']}")
print(f"  verdict: {'PASS' if m['pass'] else 'FAIL'} ({', '.join(v['rule'] + ('' if v['pass'] else ' FAILED') for v in m['rules'])})")
PY
[ "$status" -eq 0 ] || die "the merged run failed its rules (see $out/merge.log)"
log "audience benchmark passed (reports in $out)"
