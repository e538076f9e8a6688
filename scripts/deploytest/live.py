"""The live cluster the live checks query: a real redis-server, three release gateway nodes and a
real Prometheus scraping their admin ports every second, all on loopback, and the background
traffic (traffic.py) that makes every metric move.

Owns starting them and knowing their ports; stopping is the `procs` registry's (conftest.py).
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import PY, ROOT, free_ports, ok, run, wait_http

GATEWAY_BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "gateway"
# The HTTP API's key on the live nodes: the moderation API is refused without one, and a
# production node has one.
API_KEY = "deploytest-api-key-0123456789"
# How long the traffic runs before the queries, in seconds.
TRAFFIC_SECONDS = float(os.environ.get("TRAFFIC_SECONDS", "15"))


@dataclass
class Cluster:
    redis_port: int
    client_ports: list[int]
    admin_ports: list[int]
    prom: str                         # Prometheus' base URL
    extra: dict = field(default_factory=dict)


def build_gateway():
    # The same package set as every other release build of the test scripts: building the gateway
    # alone resolves the workspace's features differently and rebuilds every shared crate.
    run(["cargo", "build", "--release", "--locked", "-p", "gateway", "-p", "loadtest"], cwd=ROOT,
        quiet=True)


def start_cluster(work: Path, procs) -> Cluster:
    logs = work / "logs"
    redis_port, c1, c2, c3, a1, a2, a3, prom_port = free_ports(8)
    clients, admins = [c1, c2, c3], [a1, a2, a3]

    procs.start(["redis-server", "--bind", "127.0.0.1", "--port", redis_port, "--save", "",
                 "--appendonly", "no", "--dir", work], logs / "redis.out")
    for _ in range(50):
        if ok(["redis-cli", "-p", redis_port, "ping"]):
            break
        time.sleep(0.1)
    assert ok(["redis-cli", "-p", redis_port, "ping"]), "redis-server did not start"

    for i in range(3):
        procs.start([GATEWAY_BIN,
                     "--listen", f"127.0.0.1:{clients[i]}",
                     "--admin-listen", f"127.0.0.1:{admins[i]}",
                     "--redis-url", f"redis://127.0.0.1:{redis_port}",
                     "--node-id", f"n{i + 1}",
                     "--drain-seconds", "1",
                     # A connection limit, as deploy/kubernetes sets one: the dashboard's
                     # "connections against the limit" and its alerts need it.
                     "--max-connections", "5000",
                     "--api-key", API_KEY,
                     "--presence-interval", "1s"],
                    logs / f"gateway-n{i + 1}.out", env=dict(os.environ, RUST_LOG="warn"))
    for a in admins:
        wait_http(f"http://127.0.0.1:{a}/readyz", 20)

    # Prometheus with the checked-in live-check config; the targets file carries the ports, and
    # namespace/pod labels like a Kubernetes scrape has (for the prometheus-adapter rule).
    pd = work / "prometheus"
    (pd / "rules").mkdir(parents=True, exist_ok=True)
    (pd / "data").mkdir(exist_ok=True)
    shutil.copy(ROOT / "deploy/prometheus/prometheus-check.yml", pd / "prometheus.yml")
    for f in (ROOT / "deploy/prometheus/rules").glob("*.yml"):
        shutil.copy(f, pd / "rules")
    (pd / "targets.json").write_text(json.dumps(
        [{"targets": [f"127.0.0.1:{p}"], "labels": {"namespace": "check", "pod": f"n{i + 1}"}}
         for i, p in enumerate(admins)]))
    procs.start(["prometheus", f"--config.file={pd / 'prometheus.yml'}", f"--storage.tsdb.path={pd / 'data'}",
                 f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                logs / "prometheus.out")
    wait_http(f"http://127.0.0.1:{prom_port}/-/ready", 30)
    print(f"redis :{redis_port}; nodes n1-n3 clients :{clients} admin :{admins}; prometheus :{prom_port}")
    return Cluster(redis_port, clients, admins, f"http://127.0.0.1:{prom_port}")


class Traffic:
    """traffic.py in the background, until stop()."""

    def __init__(self, work: Path, procs, cluster: Cluster):
        self.work = work
        self.log = work / "logs" / "traffic.out"
        self.ready = work / "traffic.ready"
        self.stopfile = work / "traffic.stop"
        for f in (self.ready, self.stopfile):
            f.unlink(missing_ok=True)
        self.proc = procs.start([PY, Path(__file__).with_name("traffic.py"), work, TRAFFIC_SECONDS,
                                 *cluster.client_ports], self.log, env=dict(os.environ, TRAFFIC_API_KEY=API_KEY))
        self.rc = None
        deadline = time.monotonic() + TRAFFIC_SECONDS + 60
        while time.monotonic() < deadline and not self.ready.exists():
            assert self.proc.poll() is None, "traffic stopped early:\n" + self.log.read_text()
            time.sleep(0.1)
        assert self.ready.exists(), "traffic never got ready:\n" + self.log.read_text()
        # Let Prometheus take a few more scrapes of the busy cluster.
        time.sleep(3)
        print(f"traffic running for {TRAFFIC_SECONDS}s")

    def stop(self) -> int:
        """Closes the members; traffic.py's exit status (0: messages crossed nodes)."""
        if self.rc is None:
            self.stopfile.touch()
            self.rc = self.proc.wait(timeout=180)
        return self.rc
