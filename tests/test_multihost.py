"""dask-mpi-launch across two "hosts" (network namespaces, tests/netns_hosts.py).

Each host has ib0 (reaches the other host) and eth0 (reaches nothing, but carries the
default route, so Dask's guess of "the external address" is eth0's). A job on the wrong
interface must end quickly with one line that says which host cannot reach which address
and which --interface works; ``--check`` must find ib0.

Skipped where namespaces cannot be made (not root...), except under CI=true.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import unavailable  # noqa: E402
from launch import Venv  # noqa: E402
from netns_hosts import NetnsHosts, can_create_namespaces, run_with_timeout  # noqa: E402

pytestmark = [pytest.mark.mpi, pytest.mark.netns]

JOB_TIMEOUT = 60  # hang guard per job; the bounds asserted are much tighter

SCRIPT = textwrap.dedent("""
    import json, os, socket
    from distributed import Client
    client = Client()
    client.wait_for_workers(3, timeout=30)
    workers = sorted(client.scheduler_info()["workers"])
    hosts = client.run(socket.gethostname)
    parents = client.run(os.getppid)  # the node's zygote
    result = client.submit(sum, range(10)).result()
    print("JOB " + json.dumps({"workers": workers, "hosts": hosts, "result": result,
                               "parents": parents}), flush=True)
""")


@pytest.fixture(scope="module")
def hosts():
    reason = can_create_namespaces()
    if reason:
        unavailable(reason)
    with NetnsHosts(2) as h:
        yield h


def _env(venv: Venv) -> dict:
    env = dict(os.environ)
    env.pop("DASK_MPI_LAUNCH__INTERFACE", None)  # the point here is choosing it
    env.update(PATH=f"{venv.bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
               DASK_MPI_LAUNCH__DASHBOARD="False", PYTHONUNBUFFERED="1",
               DASK_DISTRIBUTED__WORKER__MEMORY__TARGET="False")
    return env


def _job(hosts, venv, tmp_path, *args, n=4, ppn=2):
    """``mpiexec -n N -ppn P dask-mpi-launch ARGS`` across hosts a and b, started on a."""
    argv = hosts.mpiexec_argv(venv.mpiexec, n=n, ppn=ppn) + ["dask-mpi-launch", *map(str, args)]
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


def _nothing_left(hosts) -> dict:
    """{host: [pids]} still running in the hosts' namespaces (waits up to 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        left = {}
        for h in hosts.hosts:
            out = run_with_timeout(["ip", "netns", "pids", hosts.namespace(h)], timeout=10,
                                   capture_output=True, text=True).stdout.split()
            if out:
                left[h] = out
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _error_lines(res) -> list[str]:
    return [ln for ln in res.output.splitlines() if "dask-mpi-launch: error" in ln]


def test_job_on_ib0_uses_both_hosts(hosts, mpich, tmp_path):
    (tmp_path / "job.py").write_text(SCRIPT)
    res = _job(hosts, mpich, tmp_path, "--layout", "compact", "--interface", "ib0", "job.py")
    print(f"\n[multihost] 4 ranks on 2 hosts over ib0: {res.seconds:.2f} s")
    assert res.returncode == 0, res.shown
    [line] = [ln for ln in res.stdout.splitlines() if ln.startswith("JOB ")]
    job = json.loads(line[4:])
    assert job["result"] == 45, res.shown
    assert set(job["hosts"].values()) == {"a", "b"}, res.shown
    for address, host in job["hosts"].items():  # tls:// by default, tcp:// with --no-tls
        assert re.match(rf"(tcp|tls)://{re.escape(hosts.address(host, 'ib0'))}:\d+$",
                        address), res.shown
    assert sorted(job["hosts"]) == job["workers"]
    # each host has its own node zygote: one parent per host, different across hosts
    parents = {h: {job["parents"][w] for w in job["hosts"] if job["hosts"][w] == h}
               for h in ("a", "b")}
    assert len(parents["b"]) == 1 and parents["a"].isdisjoint(parents["b"]), job
    assert res.stderr == "", res.shown  # no connection noise (e.g. TLS handshake warnings)
    assert _nothing_left(hosts) == {}


MPI_SCRIPT = textwrap.dedent("""
    import json, socket
    import numpy as np
    from distributed import Client
    from dask_mpi_launch.dataplane import backend

    def stats():
        return backend.engine().stats

    client = Client()
    client.wait_for_workers(3, timeout=30)
    hosts = client.run(socket.gethostname)
    on_a = [w for w, h in hosts.items() if h == "a"]
    on_b = [w for w, h in hosts.items() if h == "b"]
    n = 2**22  # 32 MiB of int64, made on host a, summed on host b
    x = client.submit(np.arange, n, workers=on_a[:1], pure=False)
    total = client.submit(lambda v: int(v.sum()), x, workers=on_b[:1], pure=False).result()
    print("JOB " + json.dumps({"hosts": hosts, "sum": total, "a": on_a[0], "b": on_b[0],
                               "stats": client.run(stats)}), flush=True)
""")


def test_protocol_mpi_moves_data_between_hosts_over_mpi(hosts, mpich, tmp_path):
    """--protocol mpi across two hosts: a worker on b gets an array from a worker on a
    through MPI point-to-point (the data-plane engines count the bytes), correct sum."""
    (tmp_path / "job.py").write_text(MPI_SCRIPT)
    res = _job(hosts, mpich, tmp_path, "--layout", "compact", "--interface", "ib0",
               "--protocol", "mpi", "job.py")
    print(f"\n[multihost] --protocol mpi on 2 hosts over ib0: {res.seconds:.2f} s")
    assert res.returncode == 0, res.shown
    [line] = [ln for ln in res.stdout.splitlines() if ln.startswith("JOB ")]
    job = json.loads(line[4:])
    n = 2**22
    assert job["sum"] == n * (n - 1) // 2, res.shown
    assert set(job["hosts"].values()) == {"a", "b"}, res.shown
    for address, host in job["hosts"].items():  # mpi://IB0-ADDRESS:PORT/RANK
        assert re.match(rf"mpi://{re.escape(hosts.address(host, 'ib0'))}:\d+/\d+$",
                        address), res.shown
    assert job["stats"][job["a"]]["sent_bytes"] >= 8 * n, job
    assert job["stats"][job["b"]]["received_bytes"] >= 8 * n, job
    assert _nothing_left(hosts) == {}


def _assert_clear_error(hosts, res, bound):
    assert res.returncode != 0, res.shown
    assert res.seconds < bound, res.shown
    lines = _error_lines(res)
    assert len(lines) == 1, res.shown
    line = lines[0]
    unreachable = f"://{hosts.address('a', 'eth0')}:"
    assert "host b" in line and unreachable in line, line
    # host b's interfaces, the scheduler host's, and the advice
    assert f"ib0={hosts.address('b', 'ib0')}/24" in line, line
    assert f"eth0={hosts.address('b', 'eth0')}/24" in line, line
    assert f"ib0={hosts.address('a', 'ib0')}/24" in line, line
    assert "use --interface ib0" in line, line
    # nothing but that line (and the launcher's own warnings, e.g. --no-tls): no
    # tracebacks, no Dask warnings about half-open connections
    others = [ln for ln in res.stderr.strip().splitlines()
              if not ln.startswith("dask-mpi-launch: warning:")]
    assert others == [line], res.shown
    assert _nothing_left(hosts) == {}, res.shown
    return line


@pytest.mark.parametrize("protocol", [[], ["--no-tls"]], ids=["tls", "tcp"])
def test_wrong_interface_says_which_host_cannot_reach_what(hosts, mpich, tmp_path, protocol):
    (tmp_path / "job.py").write_text(SCRIPT)
    res = _job(hosts, mpich, tmp_path, "--layout", "compact", "--interface", "eth0",
               "--connect-timeout", "3", *protocol, "job.py")
    line = _assert_clear_error(hosts, res, bound=30)
    assert ("tcp://" if protocol else "tls://") + hosts.address("a", "eth0") in line, line
    print(f"\n[multihost] --interface eth0 {' '.join(protocol)}: status {res.returncode} after "
          f"{res.seconds:.2f} s\n{line}")


def test_no_interface_given_is_a_clear_error_too(hosts, mpich, tmp_path):
    # Dask picks the address of the default route: eth0 here, as on many clusters
    (tmp_path / "job.py").write_text(SCRIPT)
    res = _job(hosts, mpich, tmp_path, "--layout", "compact", "--connect-timeout", "3", "job.py")
    line = _assert_clear_error(hosts, res, bound=30)
    print(f"\n[multihost] no --interface: status {res.returncode} after {res.seconds:.2f} s\n"
          f"{line}")


def test_check_recommends_ib0(hosts, mpich, tmp_path):
    res = _job(hosts, mpich, tmp_path, "--check")
    print(f"\n[multihost] --check on 2 hosts: {res.seconds:.2f} s\n{res.output}")
    assert res.returncode == 0, res.shown
    lines = res.stdout.splitlines()
    assert lines[-1] == "dask-mpi-launch: use --interface ib0", res.shown
    ib0 = [ln.split() for ln in lines if ln.split()[:1] == ["ib0"]]
    eth0 = [ln.split() for ln in lines if ln.split()[:1] == ["eth0"]]
    assert ib0 and ib0[0][1:4] == ["2/2", "hosts", "ok"], res.shown
    assert eth0 and eth0[0][1:3] == ["1/2", "hosts"] and "ok" not in eth0[0], res.shown
    assert "a->b" in res.stdout and "b->a" in res.stdout, res.shown
    assert _error_lines(res) == [], res.shown
    assert res.seconds < 20, res.shown
    assert _nothing_left(hosts) == {}


def test_check_on_one_host(mpich, tmp_path):
    env = mpich.env()  # TEST_ENV: loopback only is fine here
    t0 = time.monotonic()
    res = run_with_timeout([mpich.mpiexec, "-n", "2", str(mpich.bin / "dask-mpi-launch"), "--check"],
                           timeout=JOB_TIMEOUT, capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    seconds = time.monotonic() - t0
    print(f"\n[multihost] --check on one host: {seconds:.2f} s\n{res.stdout}{res.stderr}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("dask-mpi-launch: use --interface "), res.stdout
    rows = [ln.split() for ln in res.stdout.splitlines()]
    assert ["lo", "1/1", "host", "ok", f"{socket.gethostname()}=127.0.0.1"] in [
        r[:5] for r in rows], res.stdout
    assert res.stderr == "", res.stderr
    assert seconds < 20
