"""Live checks: the dashboards, alert rules and prometheus-adapter rule against a real Prometheus
scraping three real gateway nodes (release build) under WebSocket and HTTP traffic, and
deploy/compose/haproxy.cfg in front of them.

Each test can run alone (`-k name`): the fixtures build, start and load what it needs. The order
below is the order of a full run; test_traffic_crossed_nodes ends the traffic and comes last.
"""

import asyncio
import csv
import io
import json
import re
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from helpers import ROOT, free_ports, run, wait_http
from live import API_KEY, GATEWAY_BIN, Traffic, build_gateway, start_cluster


@pytest.fixture(scope="session")
def gateway_bin():
    build_gateway()
    return GATEWAY_BIN


@pytest.fixture(scope="session")
def cluster(tools, gateway_bin, work, procs):
    return start_cluster(work, procs)


@pytest.fixture(scope="session")
def traffic(cluster, work, procs):
    t = Traffic(work, procs, cluster)
    yield t
    t.stop()


def prom_api(prom, path, **params):
    q = urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(f"{prom}{path}?{q}", timeout=10) as r:
        return json.load(r)


def prom_query(prom, expr):
    return prom_api(prom, "/api/v1/query", query=expr)["data"]["result"]


def test_build_gateway(gateway_bin):
    assert gateway_bin.is_file()


def test_runtime_libraries(gateway_bin):
    """The binary the image ships needs no shared library beyond what distroless cc-debian12 has
    (glibc, libgcc, libstdc++, libgomp, OpenSSL 3): the builder and runtime are both bookworm."""
    p = run(["ldd", gateway_bin], quiet=True)
    libs = [l.split()[0].rsplit("/", 1)[-1] for l in p.stdout.splitlines() if l.strip()]
    print(f"{gateway_bin} needs: {' '.join(libs)}")
    allowed = re.compile(r"^(linux-vdso\.so\.1|ld-linux-x86-64\.so\.2|"
                         r"lib(c|m|dl|pthread|rt|util|gcc_s|stdc\+\+|gomp|ssl|crypto)\.so\.[0-9]+)$")
    extra = [l for l in libs if not allowed.match(l)]
    assert not extra, f"not in the distroless runtime image: {extra}"


def test_kubernetes_settings_are_flags(gateway_bin, tools):
    """Every GATEWAY_* setting the Kubernetes ConfigMap (and the Deployment) sets is a variable
    the gateway reads (`gateway --help` lists each flag's env name), so a renamed flag fails
    here instead of being ignored in a cluster."""
    help_text = run([gateway_bin, "--help"], quiet=True).stdout
    known = set(re.findall(r"\[env: (GATEWAY_[A-Z0-9_]+)=", help_text))
    assert known, "gateway --help lists no GATEWAY_* variables"
    p = run(["kubectl", "kustomize", ROOT / "deploy/kubernetes/full"], quiet=True)
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    used = set()
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gateway-config"):
            used |= set(d["data"])
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway":
            for c in d["spec"]["template"]["spec"]["containers"]:
                used |= {e["name"] for e in c.get("env", [])}
    used = {u for u in used if u.startswith("GATEWAY_")}
    print(f"{len(used)} GATEWAY_* settings in the manifests; gateway --help knows {len(known)}")
    assert used - known == set(), f"not read by the gateway: {sorted(used - known)}"


def test_start_cluster(cluster):
    assert cluster.prom


def test_start_traffic(traffic):
    assert traffic.ready.exists()


def haproxy_cfg_for_loopback(src: str, hp, sp, clients, admins) -> str:
    """deploy/compose/haproxy.cfg with loopback addresses for the compose names."""
    text = re.sub(r"\nresolvers compose\n(?:[ \t]+.*\n)+", "\n", src)     # no Docker DNS here
    text = re.sub(r" resolvers compose| init-addr \S+| port 9090", "", text)
    for i in range(3):
        text, n = re.subn(rf"server gw{i + 1} gateway-{i + 1}:8080",
                          f"server gw{i + 1} 127.0.0.1:{clients[i]} port {admins[i]}", text)
        assert n == 1, f"server gw{i + 1} not found"
    text = re.sub(r"bind \S*:8080\b", f"bind 127.0.0.1:{hp}", text)
    text = re.sub(r"bind \S*:8404\b", f"bind 127.0.0.1:{sp}", text)
    # HAProxy wants 2 descriptors per maxconn; this machine's limit is lower than compose's ulimit.
    return re.sub(r"maxconn \d+", "maxconn 2000", text)


class HAProxy:
    """deploy/compose/haproxy.cfg running in front of the live nodes."""

    def __init__(self, cluster, work, procs):
        self.port, self.stats = free_ports(2)
        cfg = work / "haproxy.cfg"
        cfg.write_text(haproxy_cfg_for_loopback((ROOT / "deploy/compose/haproxy.cfg").read_text(), self.port,
                                                self.stats, cluster.client_ports, cluster.admin_ports))
        run(["haproxy", "-c", "-f", cfg])
        self.log = work / "logs" / "haproxy.out"
        procs.start(["haproxy", "-db", "-f", cfg], self.log)
        wait_http(f"http://127.0.0.1:{self.stats}/metrics", 10)


@pytest.fixture(scope="session")
def haproxy(cluster, work, procs):
    return HAProxy(cluster, work, procs)


def test_haproxy_websockets(haproxy, traffic):
    """HAProxy's /readyz checks mark every node up, WebSockets upgrade through it and reach every
    node (leastconn), and messages and the HTTP API pass."""
    from websockets.asyncio.client import connect
    hp, sp = haproxy.port, haproxy.stats

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
    assert set(status.values()) == {"UP"} and len(status) == 3, "not every gateway is UP behind HAProxy"

    async def main():
        conns, nodes = [], set()
        for i in range(12):
            ws = await connect(f"ws://127.0.0.1:{hp}/ws/through-haproxy?role=viewer&name=lb{i}")
            nodes.add(json.loads(await ws.recv())["node"])
            conns.append(ws)
        print("nodes reached through HAProxy:", sorted(nodes))
        assert len(nodes) == 3, f"leastconn should spread 12 connections over 3 nodes, got {sorted(nodes)}"
        await asyncio.sleep(0.5)                       # subscriptions settle on every node
        await conns[0].send(json.dumps({"type": "publish", "data": {"via": "haproxy"}}))
        req = urllib.request.Request(f"http://127.0.0.1:{hp}/api/rooms/through-haproxy/messages",
                                     data=b'{"via":"haproxy-http"}', method="POST",
                                     headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {API_KEY}"})
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


def test_haproxy_log_has_no_query_string(haproxy):
    """A token in the query string reaches the gateway through HAProxy but not HAProxy's log: the
    request is logged with its path only."""
    from websockets.sync.client import connect
    secret = "tok" + "en-never-logged-7f3a9c"
    with connect(f"ws://127.0.0.1:{haproxy.port}/ws/log-check?role=viewer&name=log&token={secret}") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    req = urllib.request.Request(f"http://127.0.0.1:{haproxy.port}/api/rooms/log-check/messages?token={secret}",
                                 data=b'{"log":"check"}', method="POST", headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 202, r.status
    # HAProxy logs a tunnel when it closes and a request when it ends; give it a moment.
    deadline = time.monotonic() + 5
    lines = []
    while time.monotonic() < deadline:
        lines = [l for l in haproxy.log.read_text().splitlines() if "/log-check" in l]
        if len(lines) >= 2:
            break
        time.sleep(0.2)
    for l in lines:
        print(l)
    assert len(lines) >= 2, "HAProxy logged neither request (is logging on?)"
    assert not [l for l in haproxy.log.read_text().splitlines() if secret in l or "token=" in l], \
        "HAProxy's log holds the query string"


AGG = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
       "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "bool", "offset", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a prometheus-adapter template) reads."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"<<[^>]*>>", " ", s)                     # prometheus-adapter templates
    s = re.sub(r"\{[^}]*\}", "{}", s)                     # label matchers
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", "[]", s)                    # ranges and subqueries
    s = re.sub(r"\$\{?\w+\}?", " ", s)                    # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok, before = m.group(0), s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":
            continue                                      # 1e-9, 5m
        if s[m.end():].lstrip().startswith("(") and tok not in AGG | KEYWORDS:
            continue                                      # a function
        if tok in AGG or tok in KEYWORDS:
            continue
        names.add(tok)
    return names


def dashboard_panels(d):
    return [q for p in d["panels"] for q in [p] + p.get("panels", [])]


def referenced_metrics() -> set[tuple[str, str]]:
    """(metric, where) for every metric the dashboards, the alert rules and the
    prometheus-adapter rule name."""
    refs = []
    for f in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        for p in dashboard_panels(d):
            for t in p.get("targets", []):
                refs += [(n, f"dashboard {p['title']!r}") for n in metric_names(t.get("expr", ""))]
        for v in d.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            if v.get("type") == "query":
                inner = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q)
                refs += [(n, f"variable {v['name']}") for n in metric_names(inner)]
    for f in sorted((ROOT / "deploy/prometheus/rules").glob("*.yml")):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                refs += [(n, f"rule {r.get('alert') or r.get('record')}") for n in metric_names(r["expr"])]
    a = yaml.safe_load((ROOT / "deploy/kubernetes/autoscaling/prometheus-adapter-values.yaml").read_text())
    for r in a["rules"]["custom"]:
        refs += [(n, "prometheus-adapter seriesQuery") for n in metric_names(r["seriesQuery"])]
    return set(refs)


def test_metric_names_exported(cluster, traffic):
    """Every metric a dashboard, alert rule or the prometheus-adapter rule names is exported by
    the live node."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin_ports[0]}/metrics", timeout=5) as r:
        scrape = r.read().decode()
    exported = {re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", l).group(0)
                for l in scrape.splitlines() if l.strip() and not l.startswith("#")}
    # Made by Prometheus itself for every target, not by the gateway.
    synthetic = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
    refs = referenced_metrics()
    used = {n for n, _ in refs}
    missing = sorted(f"{n} (in {w})" for n, w in refs if n not in exported and n not in synthetic)
    print(f"{len(exported)} metric names exported by a live node; {len(used)} referenced")

    def base(n):
        return re.sub(r"_(bucket|sum|count)$", "", n)
    unused = sorted({base(n) for n in exported} - {base(n) for n in used})
    if unused:
        print("exported but on no dashboard or rule (fine, for information):", ", ".join(unused))
    assert not missing, "NOT EXPORTED: " + "; ".join(missing)


SUBST = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def expand(expr: str) -> str:
    for k, v in SUBST.items():
        expr = expr.replace(k, v)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)      # $job, $instance, … → match everything


def test_dashboard_queries_have_data(cluster, traffic):
    """Every query of every panel, and every variable, returns data through Prometheus' HTTP API."""
    failures, n = [], 0
    for f in sorted((ROOT / "grafana/dashboards").glob("*.json")):
        d = json.loads(f.read_text())
        for p in dashboard_panels(d):
            for t in p.get("targets", []):
                n += 1
                expr = expand(t["expr"])
                try:
                    res = prom_api(cluster.prom, "/api/v1/query", query=expr)
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
            vals = prom_api(cluster.prom, f"/api/v1/label/{m.group(2)}/values", **{"match[]": expand(m.group(1))})["data"]
            if not vals:
                failures.append(f"variable {v['name']} has no values: {q}")
            else:
                print(f"ok  variable {v['name']}: {vals}")
    print(f"{n - len(failures)}/{n} queries returned data")
    assert not failures, "\n".join(failures)


def test_series_per_node(cluster, traffic):
    """Each node is its own series, and the prometheus-adapter query yields one value per pod."""
    errors = []
    info = prom_query(cluster.prom, 'gateway_build_info{job="gateway"}')
    nodes = {s["metric"]["node"] for s in info}
    inst = {s["metric"]["instance"] for s in info}
    if len(nodes) != 3 or len(inst) != 3:
        errors.append(f"want 3 nodes as 3 targets, got nodes {nodes} instances {inst}")
    up = prom_query(cluster.prom, 'up{job="gateway"} == 1')
    if len(up) != 3:
        errors.append(f"want 3 targets up, got {len(up)}")
    adapter = ROOT / "deploy/kubernetes/autoscaling/prometheus-adapter-values.yaml"
    rule = yaml.safe_load(adapter.read_text())["rules"]["custom"][0]
    series = rule["seriesQuery"].split("{")[0]
    expr = (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="check",pod=~"n1|n2|n3"')
            .replace("<<.GroupBy>>", "pod"))
    res = prom_query(cluster.prom, expr)
    pods = {s["metric"].get("pod") for s in res}
    if pods != {"n1", "n2", "n3"}:
        errors.append(f"prometheus-adapter query {expr} gave pods {pods}")
    print(f"nodes {sorted(nodes)}; adapter query per pod: "
          + ", ".join(f"{s['metric']['pod']}={s['value'][1]}" for s in res))
    assert not errors, "; ".join(errors)


def test_alert_rules_evaluate(cluster, traffic):
    """The live Prometheus loaded the alert rules and evaluates every one without error, and none
    of them fires on a healthy cluster."""
    groups = prom_api(cluster.prom, "/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    bad = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in rules if r.get("health") != "ok"]
    firing = [f"{r['name']} is {r['state']}" for r in rules if r.get("state") not in (None, "inactive")]
    print(f"{len(rules)} rules loaded and evaluated")
    assert rules and not bad and not firing, "; ".join(bad + firing)


def test_image_healthcheck_command(cluster, tools):
    """The image's HEALTHCHECK command, run with the same busybox against a live node."""
    bb = tools["busybox"]
    assert bb.is_file(), "busybox-static unavailable"
    text = re.sub(r"\\\n", " ", (ROOT / "deploy/docker/Dockerfile").read_text())
    m = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert m, "no HEALTHCHECK CMD in exec form"
    args = json.loads(m.group(1))
    args[0] = str(bb)
    args = [a.replace("127.0.0.1:9090", f"127.0.0.1:{cluster.admin_ports[0]}") for a in args]
    print("running:", " ".join(args))
    run(args)
    bad = [a.replace("/healthz", "/nope") for a in args]
    assert run(bad, check=False, quiet=True).returncode != 0, \
        "HEALTHCHECK command does not fail on an error status"


def test_traffic_crossed_nodes(traffic):
    """Last: ends the traffic; every viewer got messages from other nodes' hosts."""
    rc = traffic.stop()
    print(traffic.log.read_text())
    assert rc == 0, "traffic reported problems"
