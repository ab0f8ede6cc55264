"""Two "hosts" (network namespaces, tests/netns_hosts.py) that both call themselves "node",
as containers often do: a worker that cannot reach the scheduler must not be told that
the scheduler runs on its very host, and must still be told which --interface works."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from test_multihost import SCRIPT, _env, _error_lines, _nothing_left, hosts  # noqa: F401

pytestmark = [pytest.mark.mpi, pytest.mark.netns]

JOB_TIMEOUT = 60


def _job_named_node(hosts, venv, tmp_path, *args, n=4, ppn=2):  # noqa: F811
    """The job of test_multihost._job, every rank in its own UTS namespace named "node"."""
    rename = [shutil.which("unshare") or "/usr/bin/unshare", "--uts", "/bin/sh", "-c",
              'hostname node && exec "$@"', "sh"]
    argv = (hosts.mpiexec_argv(venv.mpiexec, n=n, ppn=ppn) + rename
            + [str(venv.bin / "dask-mpi-launch"), *map(str, args)])
    t0 = time.monotonic()
    try:
        res = hosts.run("a", argv, timeout=JOB_TIMEOUT, capture_output=True, text=True,
                        env=_env(venv), cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"HUNG: killed after {JOB_TIMEOUT} s: {' '.join(argv)}\n"
                    f"{e.output}\n{e.stderr}")
    res.seconds = time.monotonic() - t0
    res.output = (res.stdout or "") + (res.stderr or "")
    res.shown = (f"$ {' '.join(argv)}\nstatus {res.returncode} after {res.seconds:.2f} s\n"
                 f"--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}")
    return res


def test_two_hosts_named_alike_still_get_the_interface_that_works(hosts, mpich,  # noqa: F811
                                                                  tmp_path):
    (tmp_path / "job.py").write_text(SCRIPT)
    res = _job_named_node(hosts, mpich, tmp_path, "--layout", "compact", "--interface", "eth0",
                          "--connect-timeout", "3", "job.py")
    print(f"\n[same hostname] --interface eth0: status {res.returncode} after "
          f"{res.seconds:.2f} s\n{res.stderr}")
    assert res.returncode != 0, res.shown
    assert res.seconds < 30, res.shown
    [line] = _error_lines(res)
    assert f"host node cannot reach the scheduler at tls://{hosts.address('a', 'eth0')}:" in line
    assert "this very host" not in line, line
    assert "the scheduler's host node (another host of the same name" in line, line
    assert f"ib0={hosts.address('b', 'ib0')}/24" in line, line
    assert "use --interface ib0" in line, line
    assert _nothing_left(hosts) == {}, res.shown


def test_check_tells_the_two_hosts_apart(hosts, mpich, tmp_path):  # noqa: F811
    res = _job_named_node(hosts, mpich, tmp_path, "--check")
    print(f"\n[same hostname] --check: {res.seconds:.2f} s\n{res.output}")
    assert res.returncode == 0, res.shown
    lines = res.stdout.splitlines()
    assert lines[0].endswith("check of 4 ranks on 2 hosts: node#1 (ranks 0-1), "
                             "node#2 (ranks 2-3)"), res.shown
    assert lines[-1] == "dask-mpi-launch: use --interface ib0", res.shown
    eth0 = [ln.split() for ln in lines if ln.split()[:1] == ["eth0"]]
    assert eth0 and eth0[0][1:3] == ["1/2", "hosts"] and "ok" not in eth0[0], res.shown
    assert "node#1->node#2" in res.stdout, res.shown
    assert _error_lines(res) == [], res.shown
    assert _nothing_left(hosts) == {}, res.shown
