"""--protocol mpi through the launcher (process/in_rank.py + dataplane/backend.py), on real MPI: workers in
their ranks exchange data over MPI, the scheduler and the script keep TLS, statuses and
failures keep their promises."""
import pytest

from launch import wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 90

RECHUNK = """
import os, sys
import dask.array as da
import numpy as np
from distributed import Client
client = Client()
workers = sorted(client.scheduler_info()["workers"])
x = da.arange(3000 * 3000, chunks=3000 * 250).reshape(3000, 3000)
got = int(x.rechunk((250, 3000)).T.sum().compute())
want = int(np.arange(3000 * 3000, dtype="int64").sum())
print("scheduler", client.scheduler.address.split(":")[0],
      "workers", [w.split(":")[0] for w in workers], "ok", got == want, flush=True)
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


@pytest.mark.parametrize("status", [0, 3])
def test_cli_protocol_mpi(venv, script, status):
    out = venv.launch(4, "--protocol", "mpi", script(RECHUNK), status, timeout=HANG)
    assert out.status == status, out
    assert "scheduler tls workers ['mpi', 'mpi'] ok True" in out.out, out
    assert "Traceback" not in out.output, out


def test_initialize_protocol_mpi(mpich, script):
    text = 'from dask_mpi_launch import initialize\ninitialize(protocol="mpi")\n' + RECHUNK
    out = mpich.launch_python(4, script(text), timeout=HANG)
    assert out.status == 0, out
    assert "workers ['mpi', 'mpi'] ok True" in out.out, out


def test_worker_rank_killed_ends_the_job(mpich, script):
    path = script("""
import os, signal, time
from distributed import Client
client = Client()
pids = client.run(os.getpid)  # the workers are their ranks
os.kill(min(pids.values()), signal.SIGKILL)
time.sleep(120)
""")
    out = mpich.launch(4, "--protocol", "mpi", path, timeout=HANG)
    assert out.status != 0, out
    assert out.seconds < 60, out
    assert wait_no_leftovers(str(path)) == []


def test_protocol_mpi_refuses_worker_processes(mpich, script):
    out = mpich.launch(3, "--protocol", "mpi", "--worker-processes", "2", script("pass"),
                       timeout=HANG)
    assert out.status == 2, out
    assert out.err.count("--protocol mpi runs one worker in each rank") == 1, out
