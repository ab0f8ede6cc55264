"""Proves the network-namespace test bed (tests/netns_hosts.py) works.

Skipped when namespaces cannot be made here, except under CI=true, where that fails.
The MPICH venv is the project's .venv/mpich (override with DML_MPICH_VENV).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import unavailable
from launch import Venv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netns_hosts import NetnsHosts, can_create_namespaces, run_with_timeout  # noqa: E402

pytestmark = pytest.mark.netns

MPICH_VENV = Path(os.environ.get("DML_MPICH_VENV") or Venv("mpich").path)
MPIEXEC = MPICH_VENV / "bin" / "mpiexec"
PYTHON = MPICH_VENV / "bin" / "python"


@pytest.fixture(scope="module")
def netns_ok():
    reason = can_create_namespaces()
    if reason:
        unavailable(reason)


@pytest.fixture(scope="module")
def mpich(netns_ok):
    if not (MPIEXEC.exists() and PYTHON.exists()):
        unavailable(f"no MPICH venv at {MPICH_VENV} (set DML_MPICH_VENV)")
    return MPIEXEC, PYTHON


@pytest.fixture(scope="module")
def two_hosts(netns_ok):
    with NetnsHosts(2) as hosts:
        yield hosts
    print(f"\n[netns] 2 hosts: setup {hosts.timings['setup']:.3f} s, "
          f"teardown {hosts.timings['teardown']:.3f} s")


RANK_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    import psutil
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    ib0 = [a.address for a in psutil.net_if_addrs().get("ib0", []) if a.family == socket.AF_INET]
    total = comm.allreduce(comm.rank + 1)
    row = {
        "rank": comm.rank, "size": comm.size, "hostname": socket.gethostname(),
        "netns_inode": os.stat("/proc/self/ns/net").st_ino, "ib0": ib0, "sum": total,
        "executable": sys.executable, "token": os.environ.get("DML_TEST_TOKEN"),
        "dask_var": os.environ.get("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"),
    }
    # one writer: Hydra forwards stdout in chunks, lines of different ranks can interleave
    rows = comm.gather(row, root=0)
    if comm.rank == 0:
        print("ROWS " + json.dumps(rows), flush=True)
""")


def _run_mpi_job(hosts, mpich, tmp_path, n, ppn):
    mpiexec, python = mpich
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    # bare "python": found only through the PATH mpiexec forwards to the ranks
    # (the launcher itself gives the remote side an ssh-like minimal environment)
    env = dict(os.environ, PATH=f"{python.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               DML_TEST_TOKEN="tok-123", DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="7s")
    argv = hosts.mpiexec_argv(str(mpiexec), n=n, ppn=ppn) + ["python", str(script)]
    t0 = time.monotonic()
    res = hosts.run(hosts.hosts[0], argv, timeout=120, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, f"mpiexec rc {res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
    assert len(lines) == 1, res.stdout + res.stderr
    rows = json.loads(lines[0][5:])
    assert sorted(r["rank"] for r in rows) == list(range(n)), res.stdout + res.stderr
    return rows, elapsed


def _netns_inode(hosts, host):
    return os.stat(f"/var/run/netns/{hosts.namespace(host)}").st_ino


@pytest.mark.mpi
def test_mpich_job_across_two_hosts(two_hosts, mpich, tmp_path):
    hosts = two_hosts
    rows, elapsed = _run_mpi_job(hosts, mpich, tmp_path, n=4, ppn=2)
    print(f"\n[netns] MPICH job, 4 ranks on 2 hosts: {elapsed:.3f} s")
    for h in hosts.hosts:
        on_h = [r for r in rows if r["ib0"] == [hosts.address(h, "ib0")]]
        assert len(on_h) == 2, rows
        assert {r["hostname"] for r in on_h} == {h}
        assert {r["netns_inode"] for r in on_h} == {_netns_inode(hosts, h)}
    assert all(r["size"] == 4 and r["sum"] == 1 + 2 + 3 + 4 for r in rows)
    # environment given to mpiexec reaches the ranks on both hosts (Hydra -genvall default)
    assert {r["token"] for r in rows} == {"tok-123"}
    assert {r["dask_var"] for r in rows} == {"7s"}
    assert {Path(r["executable"]).parent for r in rows} == {mpich[1].parent}


SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
    print("READY", flush=True)
    while True:
        c, _ = s.accept(); c.sendall(b"hello"); c.close()
""")

CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    t0 = time.monotonic()
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0) as c:
            c.settimeout(1.0)
            out = {"ok": True, "data": c.recv(16).decode()}
    except OSError as e:
        out = {"ok": False, "error": repr(e)}
    out["elapsed"] = time.monotonic() - t0
    print(json.dumps(out))
""")


def _connect(hosts, src, dst_addr, port):
    res = hosts.run(src, [sys.executable, "-c", CLIENT, dst_addr, str(port)],
                    timeout=20, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _start_server(hosts, host, port):
    srv = hosts.popen(host, [sys.executable, "-c", SERVER, str(port)],
                      stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "READY"
    return srv


def test_tcp_over_ib0_but_not_eth0(two_hosts):
    hosts = two_hosts
    srv = _start_server(hosts, "b", 45123)
    try:
        ok = _connect(hosts, "a", hosts.address("b", "ib0"), 45123)
        assert ok["ok"] and ok["data"] == "hello", ok
        # names resolve (inside the namespaces only) to the ib0 addresses
        assert _connect(hosts, "a", "b", 45123)["ok"]
        bad = _connect(hosts, "a", hosts.address("b", "eth0"), 45123)
        assert not bad["ok"], bad
        assert bad["elapsed"] < 3, bad
        print(f"\n[netns] a->b ib0 connect {ok['elapsed'] * 1e3:.1f} ms; "
              f"a->b eth0 fails after {bad['elapsed']:.2f} s: {bad['error']}")
    finally:
        srv.kill()
        srv.wait(timeout=10)


def test_run_timeout_kills_process_group(two_hosts):
    t0 = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        two_hosts.run("a", ["bash", "-c", "sleep 100 & sleep 100; wait"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ps = run_with_timeout(["ip", "netns", "pids", two_hosts.namespace("a")],
                              timeout=10, capture_output=True, text=True)
        if not ps.stdout.split():
            break
        time.sleep(0.05)
    assert not ps.stdout.split(), ps.stdout


@pytest.mark.mpi
def test_three_hosts_over_bridge(mpich, tmp_path):
    with NetnsHosts(3) as hosts:
        assert hosts.fabric_namespace in hosts.namespaces
        rows, elapsed = _run_mpi_job(hosts, mpich, tmp_path, n=6, ppn=2)
        srv = _start_server(hosts, "c", 45124)
        assert _connect(hosts, "a", hosts.address("c", "ib0"), 45124)["ok"]
        assert not _connect(hosts, "a", hosts.address("c", "eth0"), 45124)["ok"]
        srv.kill()
        srv.wait(timeout=10)
    print(f"\n[netns] 3 hosts: setup {hosts.timings['setup']:.3f} s, MPICH job 6 ranks "
          f"{elapsed:.3f} s, teardown {hosts.timings['teardown']:.3f} s")
    for h in hosts.hosts:
        on_h = [r for r in rows if r["ib0"] == [hosts.address(h, "ib0")]]
        assert len(on_h) == 2 and {r["hostname"] for r in on_h} == {h}
    assert all(r["sum"] == 21 for r in rows)


def _leftovers(hosts):
    listed = run_with_timeout(["ip", "netns", "list"], timeout=10,
                              capture_output=True, text=True).stdout
    names = {line.split()[0] for line in listed.splitlines() if line.strip()}
    left = [ns for ns in hosts.namespaces if ns in names]
    left += [p for p in (f"/etc/netns/{ns}" for ns in hosts.namespaces) if os.path.exists(p)]
    if hosts.tmpdir and hosts.tmpdir.exists():
        left.append(str(hosts.tmpdir))
    return left


def test_teardown_leaves_nothing(netns_ok):
    hosts = NetnsHosts(2)
    with hosts:
        assert len(hosts.namespaces) == 3  # a, b, sink
        launcher = Path(hosts.launcher_script)
        assert launcher.exists()
        # a process left running in a host must not keep anything alive
        hosts.popen("b", ["sleep", "1000"])
        hosts.run("a", ["bash", "-c", "setsid sleep 1000 >/dev/null 2>&1 &"], timeout=10)
    assert _leftovers(hosts) == []
    assert not launcher.exists()
    hosts.close()  # idempotent
    hosts.__exit__(None, None, None)


def test_teardown_on_failure_and_stale_cleanup(netns_ok):
    with pytest.raises(ZeroDivisionError):
        with NetnsHosts(3) as hosts:
            1 / 0
    assert _leftovers(hosts) == []

    # a namespace left behind by a dead process is removed by the next setup
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"dml{dead.pid}-0-a"
    run_with_timeout(["ip", "netns", "add", stale], timeout=10, check=True)
    try:
        with NetnsHosts(2):
            listed = run_with_timeout(["ip", "netns", "list"], timeout=10,
                                      capture_output=True, text=True).stdout
            assert stale not in listed
    finally:
        run_with_timeout(["ip", "netns", "del", stale], timeout=10, capture_output=True)
