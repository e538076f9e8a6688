#!/usr/bin/env bash
# Runs the distributed load test in the current kubectl context: sets the window's start a few
# minutes ahead, applies the generators (an Indexed Job), waits for them, applies the merge step
# and prints its verdicts. Exits with the merge's verdict (0: every rule held).
#
#   deploy/kubernetes/loadtest/run.sh [LEAD_SECONDS]   # default 120: time for every pod to start
#                                                      # and join its members before the window
set -euo pipefail

here="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
ns=live-gateway
lead="${1:-120}"
start_at="$(date -u -d "@$(($(date +%s) + lead))" +%Y-%m-%dT%H:%M:%SZ)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "==> window starts at $start_at"
kubectl -n "$ns" delete job loadtest-generators loadtest-merge --ignore-not-found
cp -r "$here/." "$work/"
(cd "$work" && kubectl kustomize . |
  sed "s/LOADTEST_START_AT: .*/LOADTEST_START_AT: \"$start_at\"/" >"$work/rendered.yaml")
kubectl apply -f "$work/rendered.yaml"

echo "==> waiting for the generators"
kubectl -n "$ns" wait --for=condition=complete --timeout=60m job/loadtest-generators || {
  kubectl -n "$ns" logs -l app.kubernetes.io/name=loadtest-generator --tail=40 || true
  echo "generators failed" >&2
  exit 1
}

echo "==> merge"
kubectl apply -k "$here/merge"
kubectl -n "$ns" wait --for=condition=complete --timeout=5m job/loadtest-merge &
ok=$!
kubectl -n "$ns" wait --for=condition=failed --timeout=5m job/loadtest-merge &
bad=$!
wait -n "$ok" "$bad" || true
status=0
kubectl -n "$ns" logs job/loadtest-merge | sed -n '/=== LIVE ROOMS SUMMARY/,/^result/p'
if kubectl -n "$ns" get job loadtest-merge -o jsonpath='{.status.succeeded}' | grep -q 1; then
  echo "==> PASS"
else
  echo "==> FAIL"
  status=1
fi
kill "$ok" "$bad" 2>/dev/null || true
exit "$status"
