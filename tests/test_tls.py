"""Secure by default: per-job TLS credentials, in memory between ranks, 0600 beside the
scheduler file for the owner's outside clients, never in command lines or environments."""
import json
import os
import stat
import time

import pytest

from launch import finish, run
from test_launch import CLIENT, HANG, _wait_for_file

pytestmark = pytest.mark.mpi

REACH = """
import sys, time
from distributed import Client
start = time.monotonic()
try:
    client = Client(sys.argv[1], timeout=5)
    print("RAN", client.submit(lambda: 42).result(timeout=5))
except BaseException as e:
    print("REFUSED", type(e).__name__, round(time.monotonic() - start, 1))
"""


def _secrets_in_processes(needle: str) -> list:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    if needle.encode() in f.read():
                        found.append(f"{pid}/{name}")
            except OSError:
                pass
    return found


def test_script_mode_uses_tls_by_default(venv, script):
    out = venv.launch(3, script(CLIENT + "\nprint('address', client.scheduler.address)\n"),
                      timeout=HANG)
    assert out.status == 0, out
    assert "address tls://127.0.0.1:" in out.out and "result=42" in out.out, out


def test_cluster_refuses_outsiders_and_serves_the_owner(mpich, tmp_path, script):
    sched = tmp_path / "scheduler.json"
    proc = mpich.start([mpich.mpiexec, "-n", "3", mpich.bin / "dask-mpi-launch",
                        "--scheduler-file", sched])
    try:
        assert _wait_for_file(sched, proc), finish(proc, 5)
        address = json.loads(sched.read_text())["address"]
        assert address.startswith("tls://"), address
        creds = tmp_path / "scheduler.json.credentials"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o700
        assert sorted(p.name for p in creds.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in creds.iterdir())

        # an outsider, without the credentials: over tls:// and over plain tcp://
        reach = script(REACH)
        for target in (address, address.replace("tls://", "tcp://")):
            out = run([mpich.python, reach, target], timeout=30, env=mpich.env())
            assert "REFUSED" in out.out and "RAN" not in out.out, out
            assert float(out.out.split()[-1]) < 10, out

        # the credentials are nowhere in command lines or environments
        key_line = (creds / "key.pem").read_text().splitlines()[1]
        assert len(key_line) > 40
        assert _secrets_in_processes(key_line) == []

        # the owner, through the scheduler file
        owner = ("import sys; from dask_mpi_launch import connect\n"
                 "c = connect(sys.argv[1], timeout=20)\n"
                 "print('RAN', c.submit(lambda: 42).result(timeout=10))\n"
                 "c.shutdown()\n")
        out = run([mpich.python, "-c", owner, sched], timeout=HANG, env=mpich.env())
        assert "RAN 42" in out.out, out
        assert finish(proc, HANG).status == 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            finish(proc, HANG)
    assert not sched.exists() and not creds.exists()  # removed with the cluster


def test_no_tls_warns_once(mpich, script):
    out = mpich.launch(3, "--no-tls", script(CLIENT + "\nprint('address', client.scheduler.address)\n"),
                       timeout=HANG)
    assert out.status == 0, out
    assert "address tcp://" in out.out, out
    warnings = [x for x in out.err.splitlines() if "warning: TLS is off" in x]
    assert len(warnings) == 1, out


def test_protocol_and_tls_contradiction_is_a_usage_error(mpich, script):
    out = mpich.launch(3, "--no-tls", "--protocol", "tls", script(CLIENT), timeout=HANG)
    assert out.status == 2, out
    assert "contradict each other" in out.err


def test_connect_says_when_the_file_never_appears(mpich, tmp_path):
    code = ("import sys; from dask_mpi_launch import connect\n"
            "try:\n    connect(sys.argv[1], timeout=1)\n"
            "except TimeoutError as e:\n    print('TIMEOUT', e)\n")
    start = time.monotonic()
    out = run([mpich.python, "-c", code, tmp_path / "never.json"], timeout=30, env=mpich.env())
    assert "TIMEOUT no scheduler file" in out.out, out
    assert time.monotonic() - start < 15
