#!/usr/bin/env bash
# The containers for real: builds the image from deploy/docker/Dockerfile, brings up
# deploy/compose (Redis, three gateway nodes, HAProxy, Prometheus) in a Docker engine of its own,
# load-tests it from the load tester's container and cuts pieces off while the load runs. The
# checks are scripts/deploytest/test_docker.py (pytest; the engine, its teardown and the restore
# of the host's iptables rules, ip_forward and docker0 are scripts/deploytest/engine.py); this
# wrapper installs pytest (PyPI) when missing and runs them. As root. Arguments go to pytest:
#
#   scripts/docker-test.sh                        # everything (installs what is missing)
#   scripts/docker-test.sh -k partition           # one check (with the cluster it needs)
#   KEEP_WORK=1 scripts/docker-test.sh            # keep target/docker-test/run (logs, summaries)
#   DOCKER_TEST_FRESH=1 ...                       # rebuild the cached debootstrap root filesystems
#   scripts/docker-test.sh --prepare              # only install the tools (docker.io, Compose v2)
#                                                 # and make those root filesystems (no engine;
#                                                 # scripts/test.sh runs it during the Rust build)
#   DOCKER_TEST_REQUIRE_NO_LOSS=0 ...             # report the loss across faults, not require none
#   LOAD_ROOMS=20x1x20 ...                        # the load (loadtest --rooms)
#
# Exits non-zero when any check fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY="${PYTHON:-python3}"
[[ "$(id -u)" -eq 0 ]] || { echo "docker-test.sh must run as root (it starts dockerd)" >&2; exit 1; }
if ! "$PY" -c 'import pytest' 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore pytest
fi
cd "$ROOT/scripts/deploytest"
if [[ "${1:-}" == "--prepare" ]]; then
  exec "$PY" -c 'import engine; engine.Tools(); engine.prepare_rootfs()'
fi
exec "$PY" -m pytest test_docker.py "$@"
