"""Fixtures every deployment check shares, and the summary table printed at the end.

Owns the per-run work directory, the registry of processes a check started (all stopped at the
end, by PID), and the report: one row per check (PASS, FAIL, ERROR when its setup failed, SKIP)
with its time, plus the figures checks publish through the `report` fixture. The tools and the
live cluster live in their own modules (tools.py, live.py, engine.py).
"""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

_rows: dict[str, list] = {}      # test name -> [outcome, seconds]
_notes: list[str] = []           # lines checks add to the summary (figures, tool versions)


class Processes:
    """Every background process the checks started; all are stopped at the end of the run."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd, log: Path, **kw) -> subprocess.Popen:
        f = open(log, "w")
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="session")
def work():
    """This run's temp dir (logs, Prometheus data); KEEP_WORK=1 keeps it."""
    d = Path(tempfile.mkdtemp(prefix="deploytest."))
    (d / "logs").mkdir()
    yield d
    if os.environ.get("KEEP_WORK"):
        print(f"\nwork dir kept: {d}")
    else:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def procs():
    p = Processes()
    yield p
    p.stop_all()


@pytest.fixture(scope="session")
def tools():
    """The static and live checks' tools, installed when missing (tools.py); their versions go
    to the summary."""
    from tools import ensure_deploy_tools, tool_versions
    t = ensure_deploy_tools()
    yield t
    _notes.append("tools: " + tool_versions())


@pytest.fixture(scope="session")
def report():
    """report(line): a line for the summary at the end (figures a check measured)."""
    return _notes.append


def pytest_runtest_logreport(report):
    row = _rows.setdefault(report.nodeid.split("::")[-1], ["PASS", 0.0])
    row[1] += report.duration
    if report.failed:
        row[0] = "ERROR" if report.when != "call" else "FAIL"
    elif report.skipped:
        row[0] = "SKIP"


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return
    tr = terminalreporter
    tr.section("deployment checks")
    for name, (status, secs) in _rows.items():
        tr.write_line(f"  {name:<40} {status:<5} {secs:6.1f}s")
    if _notes:
        tr.write_line("")
        for n in _notes:
            tr.write_line(f"  {n}")
    passed = sum(1 for s, _ in _rows.values() if s == "PASS")
    tr.write_line(f"\n  {passed} passed, {len(_rows) - passed} not passed")
