#!/usr/bin/env python3
"""What presence lists and lifecycle webhooks cost (issue 22, docs/benchmarks.md "Presence lists
and webhooks"). Release gateway nodes on one redis-server, everything on loopback.

  bench-lifecycle.py lists     MEMBERS members in one listing room over NODES nodes, first held
                               still, then with CHURN short-lived members joining (and leaving
                               one second later) every second. Reports, for each phase, the
                               gateways' CPU per second, Redis commands per second, and what each
                               member received per minute (frames and bytes, by frame type),
                               the list frames per member per presence tick (batching: at most
                               one), and how long a join took to show on other members (p50/p99).
  bench-lifecycle.py webhooks  CHURN short-lived members a second joining (one second each) ROOMS
                               listing rooms over NODES nodes with --webhook-url pointing at a
                               receiver in this script. Reports events delivered per second, the
                               lag from the event's `ts_ms` to the receiver and from the member's
                               `welcome` to the receiver's `member.joined` (p50/p99), duplicates
                               (by event id) and missing member events (every short-lived member
                               must be joined once and left once).

Options: --members 5000 --nodes 3 --churn 50 --rooms 100 --seconds 30 --interval 1s.
Needs: python3 with `websockets` (pip install websockets), redis-server, target/release/gateway
(GATEWAY_BIN to use another build). Raise the open-file limit first (ulimit -n 20000).
"""
import argparse, asyncio, hashlib, hmac, json, os, random, resource, shutil, signal, socket, statistics
import subprocess, sys, tempfile, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATEWAY = os.environ.get("GATEWAY_BIN", os.path.join(ROOT, "target", "release", "gateway"))
SECRET = "bench-lifecycle-secret"
PROCS = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def spawn(args, log):
    p = subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    PROCS.append(p)
    return p


def stop_all():
    for p in PROCS:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in PROCS:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def redis_calls(port):
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True, text=True).stdout
    total = 0
    for line in out.splitlines():
        if line.startswith("cmdstat_"):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


class Cluster:
    def __init__(self, work, nodes, extra):
        self.redis_port = free_port()
        spawn(["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
               "--appendonly", "no"], f"{work}/redis.log")
        wait_port(self.redis_port)
        self.urls, self.pids, self.admins = [], [], []
        for i in range(nodes):
            c, a = free_port(), free_port()
            p = spawn([GATEWAY, "--listen", f"127.0.0.1:{c}", "--admin-listen", f"127.0.0.1:{a}",
                       "--node-id", f"b{i}", "--redis-url", f"redis://127.0.0.1:{self.redis_port}",
                       "--max-connections", "20000"] + extra, f"{work}/gateway-{i}.log")
            if not wait_port(c):
                sys.exit(f"gateway {i} did not listen; see {work}/gateway-{i}.log")
            self.urls.append(f"ws://127.0.0.1:{c}")
            self.admins.append(a)
            self.pids.append(p.pid)

    def metric(self, prefix):
        """Every node's series of a metric, summed by its labels."""
        import urllib.request
        out = {}
        for a in self.admins:
            text = urllib.request.urlopen(f"http://127.0.0.1:{a}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                if line.startswith(prefix):
                    key, value = line.rsplit(" ", 1)
                    labels = key[len(prefix):]
                    if labels.startswith("{") or not labels:
                        labels = ",".join(p for p in labels.strip("{}").split(",") if not p.startswith("node="))
                        out[labels] = out.get(labels, 0) + float(value)
        return out

    def cpu(self):
        return sum(cpu_s(p) for p in self.pids)


class Member:
    """One listening member: counts what it receives, and when each churn name first shows."""

    def __init__(self):
        self.frames, self.bytes = {}, {}
        self.seen = {}

    def take(self, text, now):
        try:
            v = json.loads(text)
        except ValueError:
            return
        t = v.get("type", "?") if isinstance(v, dict) else "?"
        self.frames[t] = self.frames.get(t, 0) + 1
        self.bytes[t] = self.bytes.get(t, 0) + len(text.encode()) + (2 if len(text) < 126 else 4)
        if isinstance(v, dict):
            for j in v.get("joined") or []:
                name = j.get("name") if isinstance(j, dict) else None
                if name and name not in self.seen:
                    self.seen[name] = now


async def hold(url, member, stop, sem):
    async with sem:
        ws = await websockets.connect(url, max_size=None, open_timeout=30, ping_interval=None)
    async with ws:
        while not stop.is_set():
            try:
                text = await asyncio.wait_for(ws.recv(), 1.0)
            except asyncio.TimeoutError:
                continue
            if isinstance(text, str):
                member.take(text, time.monotonic())


async def churn(cluster, room_of, rate, stop, opened, names, opened_wall=None):
    opened_wall = {} if opened_wall is None else opened_wall
    n = 0
    period = 1.0 / rate
    start = time.monotonic()
    tasks = set()

    async def one(k):
        name = f"churn{k}"
        url = f"{cluster.urls[k % len(cluster.urls)]}/ws/{room_of(k)}?role=viewer&name={name}"
        try:
            async with websockets.connect(url, open_timeout=30, ping_interval=None) as ws:
                await ws.recv()  # welcome
                opened[name] = time.monotonic()
                opened_wall[name] = time.time() * 1000
                names.append(name)
                await asyncio.sleep(1.0)
        except Exception as e:  # counted, not fatal: the report says how many opened
            print(f"churn connection failed: {e}", file=sys.stderr)

    while not stop.is_set():
        t = asyncio.ensure_future(one(n))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
        n += 1
        await asyncio.sleep(max(0.0, start + n * period - time.monotonic()))
    if tasks:
        await asyncio.wait(tasks)


def snapshot(cluster, members):
    frames, byts = {}, {}
    for m in members:
        for k, v in m.frames.items():
            frames[k] = frames.get(k, 0) + v
        for k, v in m.bytes.items():
            byts[k] = byts.get(k, 0) + v
    return cluster.cpu(), redis_calls(cluster.redis_port), frames, byts


def phase_report(name, a, b, secs, members, interval_s):
    (c0, r0, f0, b0), (c1, r1, f1, b1) = a, b
    per_min = 60.0 / secs / max(len(members), 1)
    row = {"phase": name, "seconds": round(secs, 1), "gateway_cpu_ms_per_s": round((c1 - c0) * 1000 / secs, 1),
           "redis_cmds_per_s": round((r1 - r0) / secs, 1), "per_member_per_min": {}}
    for t in sorted(set(f1) | set(f0)):
        fr = (f1.get(t, 0) - f0.get(t, 0)) * per_min
        by = (b1.get(t, 0) - b0.get(t, 0)) * per_min
        row["per_member_per_min"][t] = {"frames": round(fr, 2), "bytes": round(by)}
    ticks = secs / interval_s
    lists = sum(f1.get(t, 0) - f0.get(t, 0) for t in f1 if t.startswith("members"))
    row["list_frames_per_member_per_tick"] = round(lists / max(len(members), 1) / ticks, 3)
    return row


async def run_lists(a, work):
    extra = ["--list-rooms", "bench*", "--presence-interval", a.interval, "--list-max-members", str(a.members + 10 * a.churn + 100)]
    cluster = Cluster(work, a.nodes, extra)
    stop = asyncio.Event()
    members = [Member() for _ in range(a.members)]
    sem = asyncio.Semaphore(200)

    holders = [asyncio.ensure_future(hold(f"{cluster.urls[i % len(cluster.urls)]}/ws/bench-lists?role=viewer&name=m{i}", m, stop, sem))
               for i, m in enumerate(members)]
    interval_s = float(a.interval.rstrip("s"))
    # Everyone welcomed, then the list held still for three ticks (no diff anywhere).
    deadline = time.monotonic() + 120
    while sum(m.frames.get("welcome", 0) for m in members) < len(members):
        if time.monotonic() > deadline:
            sys.exit("not every member was welcomed within 120 s")
        await asyncio.sleep(0.5)
    def diffs():
        return sum(m.frames.get("members_diff", 0) for m in members)
    last, still_since = diffs(), time.monotonic()
    while time.monotonic() - still_since < 3 * interval_s:
        await asyncio.sleep(interval_s / 2)
        if diffs() != last:
            last, still_since = diffs(), time.monotonic()
        if time.monotonic() > deadline:
            sys.exit("the list never held still")
    rows = []
    s0 = snapshot(cluster, members)
    t0 = time.monotonic()
    await asyncio.sleep(a.seconds)
    s1 = snapshot(cluster, members)
    rows.append(phase_report("still", s0, s1, time.monotonic() - t0, members, interval_s))
    cstop = asyncio.Event()
    opened, names = {}, []
    ch = asyncio.ensure_future(churn(cluster, lambda k: "bench-lists", a.churn, cstop, opened, names))
    await asyncio.sleep(3)
    s2 = snapshot(cluster, members)
    t2 = time.monotonic()
    await asyncio.sleep(a.seconds)
    s3 = snapshot(cluster, members)
    rows.append(phase_report(f"churn {a.churn}/s", s2, s3, time.monotonic() - t2, members, interval_s))
    cstop.set()
    await ch
    await asyncio.sleep(3 * interval_s)
    lags = []
    for m in members[:: max(1, len(members) // 50)]:
        for name, seen in m.seen.items():
            if name in opened:
                lags.append((seen - opened[name]) * 1000)
    rows.append({"join_shown_ms": {"samples": len(lags), "p50": pct(lags, 0.5), "p99": pct(lags, 0.99)}})
    stop.set()
    await asyncio.gather(*holders, return_exceptions=True)
    return rows


class Receiver(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a production receiver would
    events = []
    bad_signatures = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        now = time.time() * 1000
        ts = self.headers.get("X-Gateway-Timestamp", "")
        sig = self.headers.get("X-Gateway-Signature", "")
        want = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        ok = any(hmac.compare_digest(part.strip()[3:], want) for part in sig.split(",") if part.strip().startswith("v1="))
        v = json.loads(body)
        with Receiver.lock:
            if not ok:
                Receiver.bad_signatures += 1
            for e in v if isinstance(v, list) else [v]:
                Receiver.events.append((e.get("id"), e.get("type"), e.get("ts_ms"), now, e))
        self.send_response(204)
        self.end_headers()


async def run_webhooks(a, work):
    port = free_port()
    # A listen backlog for every node's concurrent deliveries (the default 5 overflows, and a
    # refused SYN costs seconds of retransmission: the receiver, not the gateway, is then slow).
    ThreadingHTTPServer.request_queue_size = 1024
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    extra = ["--list-rooms", "bench*", "--presence-interval", a.interval,
             "--webhook-url", f"http://127.0.0.1:{port}/hook", "--webhook-secret", SECRET]
    cluster = Cluster(work, a.nodes, extra)
    cstop = asyncio.Event()
    opened, names = {}, []
    c0, r0, t0 = cluster.cpu(), redis_calls(cluster.redis_port), time.monotonic()
    opened_wall = {}
    ch = asyncio.ensure_future(churn(cluster, lambda k: f"bench-hooks-{k % a.rooms}", a.churn, cstop, opened, names, opened_wall))
    await asyncio.sleep(a.seconds)
    cstop.set()
    await ch
    secs = time.monotonic() - t0
    c1, r1 = cluster.cpu(), redis_calls(cluster.redis_port)
    # wait for the tail: every member left, the last ticks run, the dispatchers catch up
    quiet_until = time.monotonic() + 60
    last = -1
    while time.monotonic() < quiet_until:
        await asyncio.sleep(2)
        with Receiver.lock:
            n = len(Receiver.events)
        if n == last:
            break
        last = n
    attempts = cluster.metric("gateway_webhook_attempts_total")
    server.shutdown()
    ev = Receiver.events
    ids = [e[0] for e in ev]
    dup = len(ids) - len(set(ids))
    joined = {e[4].get("name") for e in ev if e[1] == "member.joined"}
    left = {e[4].get("name") for e in ev if e[1] == "member.left"}
    want = set(names)
    lags = [e[3] - e[2] for e in ev if isinstance(e[2], (int, float))]
    # From the member's welcome to the receiver's `member.joined` (the presence tick included).
    join_lags = [e[3] - opened_wall[e[4].get("name")] for e in ev
                 if e[1] == "member.joined" and e[4].get("name") in opened_wall]
    span = (max(e[3] for e in ev) - min(e[3] for e in ev)) / 1000 if ev else 0
    by_type = {}
    for e in ev:
        by_type[e[1]] = by_type.get(e[1], 0) + 1
    return [{
        "members_churned": len(names), "events": len(ev), "by_type": by_type,
        "events_per_s": round(len(ev) / max(span, 1e-3), 1), "lag_ms": {"p50": pct(lags, 0.5), "p99": pct(lags, 0.99), "max": max(lags) if lags else None},
        "join_to_receiver_ms": {"p50": pct(join_lags, 0.5), "p99": pct(join_lags, 0.99)},
        "duplicates": dup, "missing_joined": len(want - joined), "missing_left": len(want - left),
        "bad_signatures": Receiver.bad_signatures, "attempts": attempts,
        "gateway_cpu_ms_per_s": round((c1 - c0) * 1000 / secs, 1), "redis_cmds_per_s": round((r1 - r0) / secs, 1),
    }]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["lists", "webhooks"])
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--churn", type=int, default=50)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--interval", default="1s")
    a = ap.parse_args()
    if not os.access(GATEWAY, os.X_OK):
        sys.exit(f"{GATEWAY} is missing: cargo build --release -p gateway")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = tempfile.mkdtemp(prefix=f"bench-{a.mode}-")
    try:
        rows = asyncio.run(run_lists(a, work) if a.mode == "lists" else run_webhooks(a, work))
    finally:
        stop_all()
    for r in rows:
        print(json.dumps(r))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
