"""The dashboard still shows real content with the HPC defaults (dask_mpi_launch/tuning/idle.py):
a real job under mpiexec whose script computes, then reads /status and /profile over HTTP
and as a Bokeh client (the document a browser gets through the page's websocket)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import unavailable  # noqa: E402

pytestmark = pytest.mark.mpi

SCRIPT = """
import json, time, urllib.request
import dask
from distributed import Client
from bokeh.client import pull_session
from bokeh.models import ColumnDataSource

client = Client()
keys = ["distributed.worker.profile.interval", "distributed.admin.tick.interval",
        "distributed.admin.system-monitor.interval"]
report = {
    "workers": list(client.run(lambda: [dask.config.get(k) for k in keys]).values()),
    "scheduler": client.run_on_scheduler(lambda: [dask.config.get(k) for k in keys]),
    "client": [dask.config.get(k) for k in keys],
}

def busy(seconds):
    end = time.time() + seconds
    while time.time() < end:
        pass
    return seconds

client.gather(client.map(busy, [2.0] * 2, pure=False))
report["profile_count"] = client.profile()["count"]
base = client.dashboard_link.rsplit("/", 1)[0]
report["pages"] = {}
# /profile shows the samples of the finished profile cycles (distributed.worker.profile.cycle)
# as they were when the page was opened (its Update button reloads): reopen until it shows them
filled = {
    "status": lambda sources: any(s.get("worker") == 2 for s in sources),
    "profile": lambda sources: any(s.get("percentage", 0) >= 2 for s in sources),
}
for page in ("status", "profile"):
    with urllib.request.urlopen(f"{base}/{page}", timeout=30) as r:
        html = r.read().decode()
    deadline = time.monotonic() + 30
    while True:
        with pull_session(url=f"{base}/{page}") as session:
            sources = [{k: len(v) for k, v in m.data.items()}
                       for m in session.document.select({"type": ColumnDataSource})]
        if filled[page](sources) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report["pages"][page] = {"status": r.status, "bokeh": "bokeh" in html.lower(),
                             "sources": sources}
print("REPORT " + json.dumps(report), flush=True)
"""


def test_status_and_profile_pages_render_with_hpc_defaults(mpich, script):
    has_bokeh = subprocess.run([mpich.python, "-c", "import bokeh"], capture_output=True,
                               timeout=60).returncode == 0
    if not has_bokeh:
        unavailable("bokeh is not installed in the mpich venv (the [jupyter] extra)")
    # a user's DASK_* variable reaches the role processes and wins over our default
    out = mpich.launch(
        4, "--nthreads", "1", "--dashboard", "--quiet", script(SCRIPT), timeout=180,
        env={"DASK_MPI_LAUNCH__DASHBOARD": "True",
             "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "750ms"})
    assert out.status == 0, out
    line = next((s for s in out.out.splitlines() if s.startswith("REPORT ")), None)
    assert line, out
    report = json.loads(line.split(" ", 1)[1])
    _check_intervals(report)
    _check_pages(report)


def _check_intervals(report) -> None:
    """Our idle defaults in every role, the user's DASK_* variable winning over them."""
    from dask.utils import parse_timedelta

    for where in (*report["workers"], report["scheduler"], report["client"]):
        profile, tick, monitor = where
        assert parse_timedelta(tick) >= 0.5, report  # ours, not distributed's 20ms
        assert monitor == "750ms", report  # the user's
    for profile, _, _ in report["workers"]:
        assert 0.01 < parse_timedelta(profile) <= 0.5, report  # coarser, still sampling
    assert len(report["workers"]) == 2


def _check_pages(report) -> None:
    """The status and profile pages render, with what the job did in them."""
    # 2 tasks of 2 s each were sampled: the profile is not empty
    assert report["profile_count"] >= 4, report
    for page, seen in report["pages"].items():
        assert seen["status"] == 200 and seen["bokeh"], (page, report)
    status = report["pages"]["status"]["sources"]
    # one row per worker in the status page's worker plots
    assert any(s.get("worker") == 2 for s in status), report
    profile = report["pages"]["profile"]["sources"]
    flame = [s for s in profile if "percentage" in s]  # the flame graph's rectangles
    timeline = [s for s in profile if set(s) == {"time", "count"}]
    assert flame and flame[0]["left"] >= 2, report  # the root and the task's frames
    assert timeline and timeline[0]["count"] >= 1, report
