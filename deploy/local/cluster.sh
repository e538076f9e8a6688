#!/usr/bin/env bash
# A gateway cluster on loopback: a real redis-server, N gateway nodes, and HAProxy in front of
# them as the load balancer (deploy/local/haproxy.cfg.in). For load tests and trying things out.
#
#   deploy/local/cluster.sh start [N]   start redis, N nodes (default 3) and HAProxy; wait until ready
#   deploy/local/cluster.sh stop        stop everything this script started (SIGTERM, then SIGKILL)
#   deploy/local/cluster.sh status      what runs, and the addresses
#   deploy/local/cluster.sh env         the addresses as shell variables (eval "$(… env)")
#   deploy/local/cluster.sh usage       CPU seconds (user+system) and RSS / peak RSS of each process
#
# Addresses (all on 127.0.0.1; BASE_PORT moves them all, default 18000):
#   HAProxy clients  BASE+80   (ws://127.0.0.1:18080/ws/ROOM)
#   HAProxy stats    BASE+404  (http://127.0.0.1:18404/, Prometheus at /metrics)
#   redis            BASE+379
#   node i (1..N)    client BASE+80+i, admin BASE+90+i   (max 9 nodes)
#
# Environment:
#   CLUSTER_DIR        state: pid files, logs, rendered haproxy.cfg (default /tmp/gateway-local-cluster)
#   BASE_PORT          see above (default 18000)
#   GATEWAY_BIN        the gateway binary (default target/release/gateway, built when missing)
#   GATEWAY_ARGS       extra flags for every node (e.g. "--max-publish-rate 50")
#   DRAIN_SECONDS      the nodes' --drain-seconds (default 2: stop is quick)
#   HAPROXY_MAXCONN    HAProxy's maxconn (default 9000: two descriptors per client under the
#                      machine's 20 000 open-file limit)
#   NO_HAPROXY=1       start redis and the nodes only (load tests then target the nodes)
#   REDIS_URL          use this broker (any --redis-url form: a Redis Cluster, Sentinel, TLS)
#                      instead of starting a redis-server
#
# Installs redis-server and haproxy with apt-get when they are missing (as root, or with sudo).
# Only processes whose pid this script recorded are ever signalled.
set -euo pipefail

here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dir="${CLUSTER_DIR:-/tmp/gateway-local-cluster}"
base="${BASE_PORT:-18000}"
drain="${DRAIN_SECONDS:-2}"
maxconn="${HAPROXY_MAXCONN:-9000}"
bin="${GATEWAY_BIN:-$root/target/release/gateway}"

lb_port=$((base + 80))
stats_port=$((base + 404))
redis_port=$((base + 379))

log() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'cluster.sh: %s\n' "$*" >&2
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

ensure_packages() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  if [ "${NO_HAPROXY:-0}" != 1 ] && ! command -v haproxy >/dev/null 2>&1 &&
    [ ! -x /usr/sbin/haproxy ]; then
    missing+=(haproxy)
  fi
  [ "${#missing[@]}" -eq 0 ] && return
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
  log "installing ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  # Debian starts the packaged services; this cluster runs its own copies on other ports.
  as_root service haproxy stop >/dev/null 2>&1 || true
  as_root service redis-server stop >/dev/null 2>&1 || true
}

haproxy_bin() { command -v haproxy 2>/dev/null || echo /usr/sbin/haproxy; }

ensure_gateway() {
  [ -x "$bin" ] && return
  [ -z "${GATEWAY_BIN:-}" ] || die "GATEWAY_BIN=$bin is not an executable"
  if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
    # shellcheck source=/dev/null
    . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || die "no gateway binary at $bin and no cargo to build it"
  log "building the gateway (cargo build --release -p gateway)"
  (cd "$root" && cargo build --release -p gateway)
}

# http_ok PORT PATH: does GET http://127.0.0.1:PORT/PATH answer 200? (bash only, no curl needed)
http_ok() {
  local status
  status=$(
    exec 3<>"/dev/tcp/127.0.0.1/$1" 2>/dev/null || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$2" >&3
    timeout 2 head -n1 <&3
  ) 2>/dev/null || return 1
  [[ "$status" == *" 200"* ]]
}

# wait_for WHAT SECONDS COMMAND...: retries COMMAND every 0.2 s.
wait_for() {
  local what="$1" secs="$2"
  shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what not ready after ${secs}s (logs in $dir)"
    sleep 0.2
  done
}

redis_ok() {
  local reply
  reply=$(
    exec 3<>"/dev/tcp/127.0.0.1/$redis_port" 2>/dev/null || exit 1
    printf 'PING\r\n' >&3
    timeout 2 head -c 5 <&3
  ) 2>/dev/null || return 1
  [[ "$reply" == "+PONG"* ]]
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# spawn NAME LOGFILE COMMAND...: starts COMMAND in the background, records its pid.
spawn() {
  local name="$1" logfile="$2"
  shift 2
  nohup "$@" >"$logfile" 2>&1 </dev/null &
  echo $! >"$dir/$name.pid"
}

nodes_file() { echo "$dir/nodes"; }

start() {
  local n="${1:-3}"
  [[ "$n" =~ ^[1-9]$ ]] || die "N must be 1 to 9"
  if ls "$dir"/*.pid >/dev/null 2>&1; then
    for f in "$dir"/*.pid; do
      alive "$f" && die "a cluster is already running from $dir (run: $0 stop)"
    done
  fi
  ensure_packages
  ensure_gateway
  mkdir -p "$dir"
  rm -f "$dir"/*.pid
  echo "$n" >"$(nodes_file)"
  # Descriptors: one per client on a node; the hard limit here is 20 000 per process.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

  local redis_url="${REDIS_URL:-}"
  if [ -z "$redis_url" ]; then
    log "redis-server on 127.0.0.1:$redis_port"
    spawn redis "$dir/redis.log" redis-server --port "$redis_port" --bind 127.0.0.1 \
      --save "" --appendonly no --daemonize no --dir "$dir" --maxclients 1000
    wait_for redis 10 redis_ok
    redis_url="redis://127.0.0.1:$redis_port"
  else
    log "broker: $redis_url (not started here)"
  fi
  echo "$redis_url" >"$dir/redis_url"

  local servers="" i
  for i in $(seq 1 "$n"); do
    local port=$((base + 80 + i)) admin=$((base + 90 + i))
    log "gateway n$i on 127.0.0.1:$port (admin $admin)"
    # shellcheck disable=SC2086 # GATEWAY_ARGS is a list of flags
    spawn "node$i" "$dir/node$i.log" "$bin" --listen "127.0.0.1:$port" \
      --admin-listen "127.0.0.1:$admin" --redis-url "$redis_url" \
      --node-id "n$i" --drain-seconds "$drain" ${GATEWAY_ARGS:-}
    servers+="    server n$i 127.0.0.1:$port check port $admin"$'\n'
  done
  for i in $(seq 1 "$n"); do
    wait_for "node n$i" 30 http_ok $((base + 90 + i)) /readyz
  done

  if [ "${NO_HAPROXY:-0}" != 1 ]; then
    log "haproxy on 127.0.0.1:$lb_port (stats http://127.0.0.1:$stats_port/)"
    awk -v listen="127.0.0.1:$lb_port" -v stats="127.0.0.1:$stats_port" -v maxconn="$maxconn" \
      -v servers="${servers%$'\n'}" '
      { gsub(/@LISTEN@/, listen); gsub(/@STATS@/, stats); gsub(/@MAXCONN@/, maxconn) }
      /^@SERVERS@$/ { print servers; next }
      { print }' "$here/haproxy.cfg.in" >"$dir/haproxy.cfg"
    "$(haproxy_bin)" -c -q -f "$dir/haproxy.cfg" || die "haproxy refused $dir/haproxy.cfg"
    spawn haproxy "$dir/haproxy.log" "$(haproxy_bin)" -db -f "$dir/haproxy.cfg"
    wait_for "haproxy's health checks" 20 all_up "$n"
  fi
  status
}

# all_up N: HAProxy sees N servers UP.
all_up() {
  local csv
  csv=$(
    exec 3<>"/dev/tcp/127.0.0.1/$stats_port" 2>/dev/null || exit 1
    printf 'GET /;csv HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    timeout 2 cat <&3
  ) 2>/dev/null || return 1
  [ "$(grep -c '^gateways,n[0-9],.*,UP' <<<"$csv")" -eq "$1" ]
}

# stop_pid NAME SECONDS: SIGTERM, wait, then SIGKILL the recorded process.
stop_pid() {
  local f="$dir/$1.pid" secs="$2"
  alive "$f" || {
    rm -f "$f"
    return 0
  }
  local pid
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + secs))
  while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$1 did not stop in ${secs}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() {
  [ -d "$dir" ] || return 0
  # HAProxy first (no new clients), then the nodes drain in parallel, then redis.
  stop_pid haproxy 5
  local f pids=()
  for f in "$dir"/node*.pid; do
    [ -e "$f" ] || continue
    local name
    name=$(basename "$f" .pid)
    stop_pid "$name" $((drain + 7)) &
    pids+=($!)
  done
  [ "${#pids[@]}" -eq 0 ] || wait "${pids[@]}"
  stop_pid redis 5
  log "cluster stopped (logs kept in $dir)"
}

status() {
  local n
  n=$(cat "$(nodes_file)" 2>/dev/null || echo 0)
  local f
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    if alive "$f"; then
      printf '%-8s pid %s\n' "$(basename "$f" .pid)" "$(cat "$f")"
    else
      printf '%-8s DEAD\n' "$(basename "$f" .pid)"
    fi
  done
  echo "load balancer: ws://127.0.0.1:$lb_port   (stats http://127.0.0.1:$stats_port/)"
  echo "nodes:        $(node_urls "$n")"
  echo "redis:        $(cat "$dir/redis_url" 2>/dev/null || echo "redis://127.0.0.1:$redis_port")"
}

node_urls() {
  local i urls=""
  for i in $(seq 1 "$1"); do urls+="${urls:+,}ws://127.0.0.1:$((base + 80 + i))"; done
  echo "$urls"
}

env_vars() {
  local n
  n=$(cat "$(nodes_file)" 2>/dev/null || echo 0)
  echo "CLUSTER_LB=ws://127.0.0.1:$lb_port"
  echo "CLUSTER_NODES=$(node_urls "$n")"
  echo "CLUSTER_REDIS=$(cat "$dir/redis_url" 2>/dev/null || echo "redis://127.0.0.1:$redis_port")"
  local i admins=""
  for i in $(seq 1 "$n"); do admins+="${admins:+,}http://127.0.0.1:$((base + 90 + i))"; done
  echo "CLUSTER_ADMIN=$admins"
}

# usage: one line per recorded process: name, CPU seconds so far, RSS and peak RSS in MiB. Take
# it before and after a load test; the CPU difference over the wall time is the process's load.
usage() {
  local f
  printf '%-8s %10s %9s %9s\n' process cpu_s rss_mib peak_mib
  for f in "$dir"/*.pid; do
    [ -e "$f" ] || continue
    alive "$f" || continue
    local pid stat rest ticks rss hwm
    pid=$(cat "$f")
    stat=$(cat "/proc/$pid/stat")
    rest=${stat##*) }
    # shellcheck disable=SC2086 # split the fields on purpose
    set -- $rest
    ticks=$((${12} + ${13}))
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
    hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
    printf '%-8s %10.2f %9.1f %9.1f\n' "$(basename "$f" .pid)" \
      "$(awk -v t="$ticks" 'BEGIN {print t / 100}')" \
      "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$(awk -v k="$hwm" 'BEGIN {print k / 1024}')"
  done
}

case "${1:-}" in
start) start "${2:-3}" ;;
stop) stop ;;
status) status ;;
env) env_vars ;;
usage) usage ;;
*)
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
  ;;
esac
