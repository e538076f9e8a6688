"""The containers for real: the image from deploy/docker/Dockerfile and deploy/compose (Redis,
three gateway nodes, HAProxy, Prometheus) in a Docker engine of the test's own (engine.py), loaded
from the load tester's container while pieces are cut off.

  cluster  docker compose (v2 only) with docker-compose.test.yml on top; every container healthy
           and HAProxy seeing three nodes up; the image as it runs (user, read-only root,
           HEALTHCHECK state); Prometheus scrapes all three nodes.
  load     the load tester's container (compose profile `loadtest`, in HAProxy's network
           namespace) against HAProxy with --expect rules, three times: a baseline (lost == 0),
           across a partition of gateway-2 from Redis (`docker network disconnect`), across a
           10 s `docker pause` of Redis. The summary prints lost, reconnects and p99 of each.

Not covered: Grafana (its image cannot be made from Debian packages). Root only (it starts
dockerd). Environment: KEEP_WORK=1 keeps target/docker-test/run; DOCKER_TEST_FRESH=1 rebuilds the
cached root filesystems; DOCKER_TEST_REQUIRE_NO_LOSS=0 reports the loss across faults instead of
requiring none; LOAD_ROOMS=20x1x20 sets the load (loadtest --rooms).
"""

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from engine import (COMPOSE_DIR, GATEWAY_IMAGE, PROJECT, RUN, Engine, HostState, Tools, build_base_images,
                    build_binaries, build_project_images, docker, docker_out)
from helpers import http_status, wait_until

# The load: 20 rooms of one host and 20 viewers (420 connections, ~840 deliveries/s), small
# enough for two shared cores running the whole cluster.
LOAD_ROOMS = os.environ.get("LOAD_ROOMS", "20x1x20")
# The load tester's rules across a fault: nothing lost. A node without Redis hands its clients
# over (4002, --broker-loss-close), they resume from their last offset on another node, and
# publishes the broker refused are sent again with their idempotency keys after the reconnect.
BROKER_LOST = 'reason="broker_lost"'
FAULT_RULES = "delivered>0" if os.environ.get("DOCKER_TEST_REQUIRE_NO_LOSS", "1") == "0" else "lost==0"


@pytest.fixture(scope="session")
def engine(request):
    if os.geteuid() != 0:
        pytest.exit("the docker test must run as root (it starts dockerd)", returncode=1)
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    tools = Tools()
    host = HostState()
    e = Engine(tools)
    try:
        e.start()
        yield e
    finally:
        print("\nteardown")
        e.stop()
        host.restore()
        if not os.environ.get("KEEP_WORK") and request.session.testsfailed == 0:
            shutil.rmtree(RUN, ignore_errors=True)
        else:
            print(f"logs kept: {RUN}")


@pytest.fixture(scope="session")
def base_images(engine):
    build_base_images(engine.tools)


@pytest.fixture(scope="session")
def binaries():
    build_binaries()


@pytest.fixture(scope="session")
def project_images(engine, base_images, binaries):
    build_project_images(engine.tools)


def cid(engine, service) -> str:
    """The container id of a compose service."""
    p = engine.compose("ps", "-q", service, check=False, quiet=True)
    return (p.stdout.split() or [""])[0]


_ips = {}


def ip_of(engine, service, net) -> str:
    """A container's address on one of the project's networks."""
    key = (service, net, cid(engine, service))
    if key not in _ips:
        _ips[key] = docker_out("inspect", "-f",
                               f'{{{{with index .NetworkSettings.Networks "{PROJECT}_{net}"}}}}{{{{.IPAddress}}}}{{{{end}}}}', key[2])
    return _ips[key]


def readyz(engine, service):
    return http_status(f"http://{ip_of(engine, service, 'backend')}:9090/readyz", timeout=2)


def haproxy_status(engine, server) -> str:
    """HAProxy's view of one server of the `gateways` backend (UP, DOWN, ...), from its stats CSV."""
    try:
        with urllib.request.urlopen(f"http://{ip_of(engine, 'haproxy', 'backend')}:8404/;csv", timeout=2) as r:
            for line in r.read().decode().splitlines():
                f = line.split(",")
                if len(f) > 17 and f[0] == "gateways" and f[1] == server:
                    return f[17]
    except Exception:
        pass
    return ""


def metric(engine, service, name, where="") -> int:
    """A gateway metric of a node summed over its series whose labels contain `where`, from its
    admin port; 0 when the node does not answer."""
    try:
        with urllib.request.urlopen(f"http://{ip_of(engine, service, 'backend')}:9090/metrics", timeout=2) as r:
            text = r.read().decode()
    except Exception:
        return 0
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        if re.sub(r"\{.*", "", series) == name and where in series:
            total += float(value)
    return int(total)


def prom_query(engine, expr):
    url = f"http://{ip_of(engine, 'prometheus', 'backend')}:9090/api/v1/query"
    data = urllib.parse.urlencode({"query": expr}).encode()
    with urllib.request.urlopen(url, data=data, timeout=5) as r:
        return json.load(r)["data"]["result"]


def prom_value(engine, expr):
    res = prom_query(engine, expr)
    return res[0]["value"][1] if res else None


@pytest.fixture(scope="session")
def cluster(engine, project_images):
    engine.compose("config", "-q")
    p = engine.compose("up", "-d", "--no-build", "--wait", "--wait-timeout", "120",
                       "redis", "gateway-1", "gateway-2", "gateway-3", "haproxy", "prometheus", check=False)
    if p.returncode != 0:
        engine.compose("ps", "-a", check=False)
        pytest.fail("compose up failed")
    engine.compose("ps")
    for n in ("gw1", "gw2", "gw3"):
        assert wait_until(30, lambda: haproxy_status(engine, n).startswith("UP")) is not None, f"HAProxy does not see {n} up"
    print("HAProxy:", ", ".join(f"{n} {haproxy_status(engine, n)}" for n in ("gw1", "gw2", "gw3")))
    return engine


def test_start_engine(engine):
    assert engine.proc.poll() is None


def test_base_images(base_images):
    pass


def test_release_binaries(binaries):
    pass


def test_project_images(project_images):
    pass


def test_compose_up(cluster):
    pass


def test_image_runtime(cluster, report):
    """The image as it runs: non-root, read-only root filesystem, HEALTHCHECK healthy."""
    c = cid(cluster, "gateway-1")
    print(docker_out("inspect", "-f", "user={{.Config.User}} readonly={{.HostConfig.ReadonlyRootfs}} "
                     "capdrop={{.HostConfig.CapDrop}} health={{.State.Health.Status}}", c))
    errors = []
    if docker_out("inspect", "-f", "{{.Config.User}}", c) != "65532:65532":
        errors.append("not uid 65532")
    if docker_out("inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", c) != "true":
        errors.append("root fs writable")
    if docker_out("inspect", "-f", "{{.State.Health.Status}}", c) != "healthy":
        errors.append("not healthy")
    # The process really runs as 65532 and cannot write its root filesystem.
    uid = docker_out("exec", c, "/usr/local/bin/busybox", "id", "-u")
    if uid != "65532":
        errors.append(f"process uid {uid}")
    if subprocess.run(["docker", "exec", c, "/usr/local/bin/busybox", "touch", "/usr/local/bin/x"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
        errors.append("could write the root filesystem")
    mb = int(docker_out("image", "inspect", "-f", "{{.Size}}", GATEWAY_IMAGE)) // 1_000_000
    print(f"image {GATEWAY_IMAGE}: {mb} MB")
    report(f"gateway image: {mb} MB")
    assert not errors, "; ".join(errors)


def test_prometheus_scrapes_3_nodes(cluster):
    """One `up` == 1 per node and three distinct `node` labels."""
    def all_up():
        return prom_value(cluster, 'count(up{job="gateway"} == 1)') == "3" and \
            prom_value(cluster, 'count(count by (node) (gateway_build_info{job="gateway"}))') == "3"
    if wait_until(60, all_up) is None:
        print([[s["metric"].get("instance"), s["value"][1]] for s in prom_query(cluster, "up")])
        pytest.fail("Prometheus does not scrape three gateway nodes")
    for s in prom_query(cluster, 'up{job="gateway"}'):
        print(f"{s['metric']['instance']} up={s['value'][1]}")
    for s in prom_query(cluster, "gateway_build_info"):
        print(f"node {s['metric']['node']} at {s['metric']['instance']}")


def ws_nodes(engine, n) -> list[str]:
    """n WebSocket clients through HAProxy (from the host, on the frontend network), all open at
    once so that leastconn spreads them: the node of each welcome."""
    from websockets.sync.client import connect
    host = ip_of(engine, "haproxy", "frontend")
    nodes = []
    with contextlib.ExitStack() as stack:
        for i in range(n):
            ws = stack.enter_context(connect(f"ws://{host}:8080/ws/docker-test-probe?role=viewer&name=probe{i}", open_timeout=5))
            nodes.append(str(json.loads(ws.recv(timeout=5)).get("node")))
    return nodes


class Load:
    """The load tester's container against HAProxy, in the background; its summary goes to
    RUN/load/NAME.json."""

    def __init__(self, engine, name, measure, rules):
        self.name = name
        d = RUN / "load"
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o777)
        self.out = d / f"{name}.out"
        self.summary = d / f"{name}.json"
        self.proc = subprocess.Popen(
            [*engine.tools.compose, "-p", PROJECT, "--project-directory", COMPOSE_DIR,
             "-f", COMPOSE_DIR / "docker-compose.yml", "-f", COMPOSE_DIR / "docker-compose.test.yml",
             "--profile", "loadtest", "run", "--rm", "--no-deps", "-v", f"{d}:/out", "loadtest",
             "--target=ws://127.0.0.1:8080", f"--rooms={LOAD_ROOMS}", f"--measure={measure}",
             f"--summary-file=/out/{name}.json", f"--expect={rules}",
             # The generator shares the two cores with the cluster it measures (scripts/test.sh).
             f"--max-generator-lag={os.environ.get('LOADTEST_MAX_GENERATOR_LAG', '100ms')}"],
            stdout=open(self.out, "w"), stderr=subprocess.STDOUT)

    def wait(self) -> int:
        """The load tester's exit status (1: an --expect rule failed)."""
        rc = self.proc.wait()
        print("\n".join(self.out.read_text().splitlines()[-5:]))
        return rc

    def record(self, report, notes) -> bool:
        """The figures of the run, for the summary; the summary's own verdict, whatever exit
        status the compose client passed on."""
        if not self.summary.exists() or self.summary.stat().st_size == 0:
            report(f"{self.name:<12} no summary ({notes})")
            return False
        s = json.loads(self.summary.read_text())
        m, c = s["messages"], s["connections"]
        p99 = int(s["latency_us"]["p99"] / 1000)
        line = (f"lost {m['lost']}/{m['expected']}, reconnects {c['reconnects']}, p99 {p99} ms, "
                f"publish errors {m['publish_errors']}, closes {json.dumps(c['closes_by_code'])}, "
                f"connect errors {json.dumps(c['errors_by_cause'])}, pass={str(s['pass']).lower()}")
        print(f"{self.name}: {line}")
        report(f"{self.name:<12} {line}. {notes}")
        return s["pass"] is True


def test_load_baseline(cluster, report):
    load = Load(cluster, "baseline", "20s", "lost==0,connect-errors==0,p99<1s")
    rc = load.wait()
    passed = load.record(report, "no fault")
    assert rc == 0 and passed, "the baseline load failed its rules"


def test_fault_partition_gw2(cluster, report):
    """gateway-2 cut off from Redis while the load runs: its /readyz goes red, HAProxy takes it
    out (new clients land on gw1/gw3), its clients' publishes get `unavailable` errors, and after
    --broker-loss-close it hands its clients over (4002): they reconnect through HAProxy to
    gw1/gw3 and resume from their last offset. When the network comes back it is ready again,
    back in HAProxy, and new clients land on it and are welcomed (subscribed in Redis)."""
    e, errors = cluster, []
    c = cid(e, "gateway-2")
    load = Load(e, "partition", "40s", FAULT_RULES)
    time.sleep(10)   # the members' window begins after the users joined and --settle
    e0 = metric(e, "gateway-2", "gateway_broker_publish_errors_total")
    print(f"t0: disconnect gateway-2 from {PROJECT}_redis")
    if docker("network", "disconnect", f"{PROJECT}_redis", c, check=False).returncode:
        errors.append("network disconnect failed")
    t = wait_until(30, lambda: readyz(e, "gateway-2") == 503)
    print(f"gw2 /readyz 503 after {t}s") if t is not None else errors.append("gw2 /readyz stayed green")
    print(f"gw2 gateway_redis_connected={metric(e, 'gateway-2', 'gateway_redis_connected')}")
    t = wait_until(30, lambda: haproxy_status(e, "gw2").startswith("DOWN"))
    print(f"HAProxy marked gw2 DOWN {t}s later") if t is not None else errors.append(f"HAProxy kept gw2 {haproxy_status(e, 'gw2')}")
    nodes = ws_nodes(e, 12)
    print("12 new clients through HAProxy landed on:", " ".join(nodes))
    if "gw2" in nodes:
        errors.append("HAProxy still sends new clients to gw2")
    time.sleep(5)
    e1 = metric(e, "gateway-2", "gateway_broker_publish_errors_total")
    print(f"gw2 broker publish errors during the partition: {e1 - e0} (its clients got 'unavailable')")
    if not e1 > e0:
        errors.append("no publish failed on gw2: its clients were not told")

    def handed_over():
        return metric(e, "gateway-2", "gateway_connections_closed_total", BROKER_LOST)
    t = wait_until(30, lambda: handed_over() > 0)
    if t is not None:
        print(f"gw2 handed its clients over (4002) {t}s later: {handed_over()} closed")
    else:
        errors.append("gw2 kept its clients")
    print(f"t1: reconnect gateway-2 to {PROJECT}_redis")
    if docker("network", "connect", f"{PROJECT}_redis", c, check=False).returncode:
        errors.append("network connect failed")
    t = wait_until(60, lambda: readyz(e, "gateway-2") == 200)
    print(f"gw2 /readyz 200 after {t}s") if t is not None else errors.append("gw2 never ready again")
    t = wait_until(30, lambda: haproxy_status(e, "gw2").startswith("UP"))
    print(f"HAProxy marked gw2 UP {t}s later") if t is not None else errors.append(f"HAProxy kept gw2 {haproxy_status(e, 'gw2')}")
    nodes = ws_nodes(e, 12)
    print("12 new clients through HAProxy after the rejoin landed on:", " ".join(nodes))
    if "gw2" not in nodes:
        errors.append("gw2 gets no new clients after rejoining")
    if load.wait() != 0:
        errors.append("the load failed its rules")
    if not load.record(report, "gw2 cut off from Redis ~15 s"):
        errors.append("the load's summary does not pass")
    assert not errors, "; ".join(errors)


def test_fault_redis_pause(cluster, report):
    """Redis frozen for 10 s (`docker pause`): every node reports it (/readyz 503 and
    gateway_redis_connected 0, also as Prometheus saw it) and recovers when it is thawed."""
    e, errors = cluster, []
    r = cid(e, "redis")
    load = Load(e, "redis-pause", "35s", FAULT_RULES)
    time.sleep(10)
    print("t0: docker pause redis")
    if docker("pause", r, check=False, quiet=True).returncode:
        errors.append("docker pause failed")
    t0 = time.monotonic()
    nodes = ("gateway-1", "gateway-2", "gateway-3")
    for n in nodes:
        t = wait_until(9, lambda: readyz(e, n) == 503)
        print(f"{n} /readyz 503 ({t}s after the previous check)") if t is not None else errors.append(f"{n} did not report Redis lost")
    print("redis_connected:", " ".join(f"{n} {metric(e, n, 'gateway_redis_connected')}" for n in nodes))
    time.sleep(max(0.0, 10 - (time.monotonic() - t0)))
    print(f"t0+{int(time.monotonic() - t0)}s: docker unpause redis")
    if docker("unpause", r, check=False, quiet=True).returncode:
        errors.append("docker unpause failed")
    for n in nodes:
        t = wait_until(60, lambda: readyz(e, n) == 200)
        print(f"{n} /readyz 200 after {t}s") if t is not None else errors.append(f"{n} did not recover")
    if load.wait() != 0:
        errors.append("the load failed its rules")
    if not load.record(report, "Redis paused 10 s"):
        errors.append("the load's summary does not pass")
    # Prometheus saw every node report it (scraped every 5 s; the outage lasted 10 s).
    seen = prom_value(e, 'count(min_over_time(gateway_redis_connected{job="gateway"}[2m]) == 0)') or "0"
    print(f"nodes Prometheus saw with gateway_redis_connected 0: {seen}")
    if seen != "3":
        errors.append(f"Prometheus saw {seen} nodes without Redis, not 3")
    assert not errors, "; ".join(errors)
