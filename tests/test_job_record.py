"""The job record (--record DIR, process/job_record.py, roles/record_output.py) and the
workers' local directory (hpc/local_dir.py).

Live: three real jobs at once under each MPI (a success during which a worker is killed
with SIGKILL and restarted, a script that fails with status 3, a worker killed with no
restarts left), each record checked file by file against what the job did; report.html
opened in headless Chromium; a read-only record directory (a read-only tmpfs in a mount
namespace of the job's own) is one warning line and the status unchanged. Units: statfs
types of each network file system, a live /tmp and /dev/shm judged local, DIR's checks."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import unavailable  # noqa: E402
from launch import finish  # noqa: E402

from dask_mpi_launch.hpc import local_dir  # noqa: E402
from dask_mpi_launch.process import job_record  # noqa: E402
from dask_mpi_launch.roles.record_output import log_name  # noqa: E402

# a worker is killed (SIGKILL) mid-job; RESTARTS: wait for its new self, then compute
KILL = """
import os, signal, sys, time
from distributed import Client
client = Client()
pids = client.run(os.getpid)
victim = max(pids, key=lambda a: client.scheduler_info()["workers"][a]["name"])
os.kill(pids[victim], signal.SIGKILL)
print("killed", client.scheduler_info()["workers"][victim]["name"], flush=True)
if sys.argv[1] == "restarts":
    deadline = time.monotonic() + 60
    while (victim in client.scheduler_info()["workers"]
           or len(client.scheduler_info()["workers"]) < len(pids)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    print("result", sum(client.gather(client.map(lambda x: x + 1, range(100)))), flush=True)
    a, b = sorted(client.scheduler_info()["workers"])  # 1 MB moved from a to b
    big = client.submit(lambda: b"x" * 10**6, workers=[a], pure=False)
    print("moved", client.submit(len, big, workers=[b], pure=False).result(), flush=True)
else:
    time.sleep(120)  # the job fails first
"""

FAIL = """
import sys
from distributed import Client
print("on stdout", Client().submit(lambda: 41 + 1).result(), flush=True)
print("on stderr", file=sys.stderr, flush=True)
sys.exit(3)
"""


def _start(venv, args, cwd):
    argv = [venv.mpiexec, "-n", "4", str(venv.bin / "dask-mpi-launch"), "--quiet",
            *map(str, args)]
    return venv.start(argv, cwd=cwd)


def _summary(record: Path, venv, report: bool = True) -> dict:
    assert record.is_dir() and (record.stat().st_mode & 0o777) == 0o700
    summary = json.loads((record / "summary.json").read_text())
    assert summary["ranks"] == 4 and summary["missing_ranks"] == []
    assert summary["roles"] == {"0": ["scheduler"], "1": ["client"], "2": ["worker"],
                                "3": ["worker"]}
    assert summary["start"] <= summary["ready"] <= summary["end"]
    for f in summary["rank_facts"]:
        assert f["record"] == "ok" and f["host"] in summary["hosts"]
        assert f["exit_status"] == summary["status"]  # every rank exits with the job's
    names = ["rank-0.scheduler.log", "rank-1.script.log", "rank-2.worker.log",
             "rank-3.worker.log"]
    assert summary["logs"] == names and all((record / n).is_file() for n in names)
    if not report or not list(venv.path.glob("lib/python*/site-packages/bokeh")):
        assert summary["report"] is None and not (record / "report.html").exists()
        return summary
    assert summary["report"] == "report.html"
    html = (record / "report.html").read_text()
    assert "Dask Performance Report" in html and "Bokeh" in html
    return summary


def _children(summary: dict) -> list:
    return [(c["rank"], c["label"], c["status"]) for f in summary["rank_facts"]
            for c in f["children"]]


@pytest.mark.mpi
def test_record_of_a_success_a_failure_and_killed_workers(venv, script, tmp_path):
    jobs = {
        "restarted": _start(venv, ["--record", tmp_path / "restarted", script(KILL),
                                   "restarts"], tmp_path),
        "failed": _start(venv, ["--record", tmp_path / "failed", "--no-record-report",
                                script(FAIL)], tmp_path),
        "killed": _start(venv, ["--worker-restarts", "0", "--record", tmp_path / "killed",
                                script(KILL), "none"], tmp_path),
    }
    done = {name: finish(proc, 120) for name, proc in jobs.items()}
    _restarted(done["restarted"], tmp_path, venv)
    _failed(done["failed"], tmp_path, venv)
    _killed(done["killed"], tmp_path, venv)
    if venv.impl == "mpich":
        _report_renders(tmp_path / "restarted" / "report.html", tmp_path)


def _restarted(ok, tmp_path, venv) -> None:
    """A worker killed and restarted; the job succeeds; its record says both lives."""
    assert ok.status == 0 and "result 5050" in ok.out and "moved 1000000" in ok.out, ok
    assert ok.err.count("record of this job:") == 1 and str(tmp_path / "restarted") in ok.err
    s = _summary(tmp_path / "restarted", venv)
    assert s["status"] == 0 and s["first_failure"] is None and s["worker_restarts"] == 1
    assert _children(s) == [(0, "scheduler", 0), (1, "script", 0), (2, "worker 2", 0),
                            (3, "worker 3", 137), (3, "worker 3", 0)]
    assert set(s["peak_memory"]) == {"worker 2", "worker 3"}
    assert all(v > 10 << 20 for v in s["peak_memory"].values())
    assert 10**6 <= s["bytes_moved"] < 10**6 + 10**5  # what the script moved
    assert "killed 3" in (tmp_path / "restarted" / "rank-1.script.log").read_text()


def _failed(bad, tmp_path, venv) -> None:
    """The script fails with 3: the record names rank 1, the client; its output as seen."""
    assert bad.status == 3, bad
    s = _summary(tmp_path / "failed", venv, report=False)  # --no-record-report
    assert s["status"] == 3 and s["ended_by"] == "the script ended"
    assert s["first_failure"]["rank"] == 1 and s["first_failure"]["role"] == "client"
    assert (1, "script", 3) in _children(s)
    log = (tmp_path / "failed" / "rank-1.script.log").read_text()
    assert "on stdout 42" in log and "on stderr" in log
    assert "on stdout 42" in bad.out and "on stderr" in bad.err  # still where they went


def _killed(killed, tmp_path, venv) -> None:
    """A worker killed with no restart left: the job fails, the record names rank 3."""
    assert killed.status == 1, killed
    s = _summary(tmp_path / "killed", venv)
    assert s["status"] == 1 and s["ended_by"] == "a failure"
    assert s["first_failure"]["rank"] == 3 and s["first_failure"]["role"] == "worker"
    assert (3, "worker 3", 137) in _children(s)
    assert "left running" not in killed.err  # the copies of the output ended by themselves


def _report_renders(report: Path, tmp_path: Path) -> None:
    """report.html in headless Chromium: Bokeh's document loads (inline: no network) and
    draws its plots (canvases in shadow roots)."""
    from test_jupyter import COUNT_CANVASES, _browser

    deadline = time.monotonic() + 40
    with _browser({"tmp": str(tmp_path)}, deadline) as browser:
        browser.call("Page.navigate", url=report.as_uri())
        canvases = browser.wait_for(f"{COUNT_CANVASES} >= 3 && {COUNT_CANVASES}", deadline)
        title = browser.eval("document.title")
        summary = browser.eval("[...Bokeh.documents[0].all_models].some(m => m.text && "
                               "m.text.includes('Dask Performance Report'))")
    assert canvases and title == "Dask Performance Report" and summary


@pytest.mark.mpi
def test_a_read_only_or_full_record_directory_is_one_warning(mpich, script, tmp_path):
    """The record's directory on a read-only file system, or on a full one (a 4 KiB
    tmpfs), each mounted in a mount namespace of the job's own: one warning line, the
    script's status unchanged."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        unavailable("needs unshare and root (a mount of the job's own)")
    jobs = {}
    for kind, options in (("ro", "ro,size=64k"), ("full", "size=4k")):
        mount = tmp_path / kind
        mount.mkdir()
        argv = ["unshare", "-m", "sh", "-c",
                f'mount -t tmpfs -o {options} tmpfs "{mount}" && exec "$@"', "sh",
                mpich.mpiexec, "-n", "4", str(mpich.bin / "dask-mpi-launch"), "--quiet",
                "--record", mount / "job", script(FAIL)]
        jobs[kind] = subprocess.Popen(argv, env=mpich.env(), cwd=tmp_path, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
    for kind, said in (("ro", "warning: no record of this job"),
                       ("full", "is incomplete: No space left on device")):
        out = finish(jobs[kind], 90)
        assert out.status == 3, out
        warnings = [line for line in out.err.splitlines() if "record" in line]
        assert len(warnings) == 1 and said in warnings[0], out
        assert "on stdout 42" in out.out and "on stderr" in out.err


# ---------------------------------------------------------------------------
# units


@pytest.mark.parametrize("magic, name", [
    (0x6969, "NFS"), (0x0BD00BD0, "Lustre"), (0x47504653, "GPFS"), (0x19830326, "BeeGFS"),
    (0xFF534D42, "CIFS"), (0xFE534D42, "SMB"), (0x5346414F, "AFS"), (0x00C36400, "CephFS"),
    (0xEF53, None), (0x01021994, None), (0x58465342, None), (0x9123683E, None), (None, None),
    (0xFFFFFFFF00006969, "NFS")])  # a sign-extended long: only the low 32 bits count
def test_network_file_systems_by_statfs_type(magic, name):
    assert local_dir.network_fs(magic) == name


def test_live_tmp_and_shm_are_local():
    for path in ("/tmp", "/dev/shm", "/tmp/not/made/yet"):
        if os.path.isdir(path.split("/not")[0]):
            kind = local_dir.fs_type(path)
            assert kind is not None and local_dir.network_fs(kind) is None, (path, hex(kind))


def test_the_default_directory_on_nfs_moves_to_the_node(tmp_path):
    nfs = str(tmp_path / "home")
    kind = lambda p: 0x6969 if p.startswith(nfs) else 0xEF53  # noqa: E731
    env = {"TMPDIR": nfs, "SLURM_TMPDIR": str(tmp_path)}
    os.mkdir(nfs)
    directory, line = local_dir.choose(None, env, kind)
    assert directory == str(tmp_path) and "on NFS" in line and "instead" in line
    # chosen by the user: kept, and said
    assert local_dir.choose(nfs, env, kind) == (nfs, local_dir.choose(nfs, env, kind)[1])
    assert "kept, since you chose it" in local_dir.choose(nfs, env, kind)[1]
    # nothing local: kept, and said; local already: nothing said
    everywhere = lambda p: 0x0BD00BD0  # noqa: E731
    assert local_dir.choose(None, env, everywhere)[0] is None
    assert "Lustre" in local_dir.choose(None, env, everywhere)[1]
    assert local_dir.choose(None, {"TMPDIR": str(tmp_path)}, lambda p: 0xEF53) == (None, None)


def test_record_directory_is_private_or_refused(tmp_path):
    made = tmp_path / "a" / "record"
    assert job_record.prepare(str(made)) is None
    assert (made.stat().st_mode & 0o777) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by others" in job_record.prepare(str(shared))
    link = tmp_path / "link"
    link.symlink_to(made)
    assert "symbolic link" in job_record.prepare(str(link))


def test_log_names():
    assert log_name(0, "scheduler") == "rank-0.scheduler.log"
    assert log_name(2, "worker 2") == "rank-2.worker.log"
    assert log_name(2, "worker job-2-1", 2) == "rank-2.worker-1.log"
    assert log_name(1, "script") == "rank-1.script.log"


def test_a_field_named_record_can_be_replaced():
    from dask_mpi_launch.base.record import replace
    from dask_mpi_launch.configure.settings import Settings

    assert replace(Settings(), record="/x").record == "/x"
