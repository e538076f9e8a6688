"""Background WebSocket and HTTP traffic against the live check's three nodes (run as its own
process by live.py): members of rooms that span every node, hosts publishing over WebSocket,
backends over HTTP, refused upgrades, error events, abnormal closes, history reads (API, backlog,
resume), duplicate publishes and moderation commands — so that every dashboard panel has data.

    python3 traffic.py WORK SECONDS PORT...

Writes WORK/traffic.ready once SECONDS have passed, keeps its members connected until
WORK/traffic.stop exists, then closes them; exits non-zero unless every viewer got messages from
other nodes' hosts and nothing unexpected happened.
"""
import asyncio, json, os, sys, time, urllib.request
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

work, seconds, ports = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
ROOMS = ["alpha", "beta", "gamma"]
# The nodes' --api-key (live.py): every HTTP API call carries it.
AUTH = {"Authorization": f"Bearer {os.environ['TRAFFIC_API_KEY']}"}
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
                                 data=body, method="POST", headers={"Content-Type": ctype, **AUTH})
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

def http(method, port, path, body=None, headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={**AUTH, **(headers or {})})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, json.loads(r.read() or b"null")


async def history_and_moderation(port, node, k):
    # History reads: the API's, and a join with backlog then a resume with since (recoveries).
    status, _ = await asyncio.to_thread(http, "GET", port, "/api/rooms/alpha/messages?limit=10")
    if status != 200:
        problems.append(f"history API: {status}")
    async with connect(url(port, "alpha", "viewer", f"back{node}{k}") + "&backlog=5", max_size=None) as ws:
        welcome = json.loads(await ws.recv())
    epoch, offset = welcome.get("epoch"), welcome.get("offset")
    if epoch is not None and offset is not None:
        async with connect(url(port, "alpha", "viewer", f"resume{node}{k}") + f"&since={epoch}:{offset}",
                           max_size=None) as ws:
            welcome = json.loads(await ws.recv())
            if "recovered" not in welcome:
                problems.append(f"resume welcome without recovered: {welcome}")
    # The same idempotency key twice: the second is a duplicate.
    key = {"Content-Type": "application/json", "Idempotency-Key": f"dup-{node}-{k}"}
    body = json.dumps({"dup": k}).encode()
    _, first = await asyncio.to_thread(http, "POST", port, "/api/rooms/beta/messages", body, key)
    _, second = await asyncio.to_thread(http, "POST", port, "/api/rooms/beta/messages", body, key)
    if first.get("duplicate") is not False or second.get("duplicate") is not True:
        problems.append(f"idempotency: {first} then {second}")
    # A control command (every node applies it): disconnect a room nobody is in.
    status, _ = await asyncio.to_thread(http, "POST", port, f"/api/rooms/kick{node}{k}/disconnect")
    if status != 202:
        problems.append(f"room disconnect: {status}")


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
        await asyncio.gather(*(misbehave(p, i + 1, k) for i, p in enumerate(ports)),
                             *(history_and_moderation(p, i + 1, k) for i, p in enumerate(ports)))
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
