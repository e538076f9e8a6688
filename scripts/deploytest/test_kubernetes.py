"""Static checks of deploy/kubernetes: `kubectl kustomize` of every kustomization into
`kubernetes-validate --strict` (oldest and newest Kubernetes it knows), then what schemas cannot
say: the Deployment's operational contract, the plain-cluster install and its optional
components, the NetworkPolicy, the Ingress's routes, connections against memory, and the load
test's shard count and start time.
"""

import json
import re
import subprocess

import yaml

from helpers import ROOT, run

# Kubernetes versions the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSIONS = ["1.29.0", "1.37.0"]


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
