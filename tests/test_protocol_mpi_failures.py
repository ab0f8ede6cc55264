"""--protocol mpi: a worker that ends when nobody asked it to (issue 21, cases 12 and 13).

The worker runs in its rank's own process (process/in_rank.py), so it cannot be restarted: whatever
ends it (a task's ``os._exit(N)``, ``sys.exit(N)``, a worker thread that fails) ends the job
with one line saying which worker and how, and status 1 ("a worker fails",
docs/failures.rst) under both MPIs; never a restart that fails with "name taken", never
MPICH's "BAD TERMINATION" or a traceback of ours, nothing left running."""
import pytest

from launch import wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 120

HEAD = """
import os, sys
from distributed import Client
client = Client()
"""

CASES = {
    # os._exit as a function (pickled by reference: posix._exit) and inside a lambda
    "os-exit-3": ("client.submit(os._exit, 3).result()\n", "os._exit(3)"),
    "os-exit-0": ("client.submit(lambda: os._exit(0)).result()\n", "os._exit(0)"),
    # in every worker's event loop (client.run): both die, one line
    "run-os-exit-2": ("client.run(os._exit, 2)\n", "os._exit(2)"),
    "sys-exit-0": ("client.submit(sys.exit, 0).result()\n", "sys.exit(0)"),
    "sys-exit-5": ("client.submit(lambda: sys.exit(5)).result()\n", "sys.exit(5)"),
    # every worker closes itself (nobody asked it to): never a job that waits for ever
    "closes-itself": ("client.run(lambda dask_worker: dask_worker.loop.add_callback("
                      "dask_worker.close))\nclient.submit(lambda: 1).result()\n",
                      "closed itself (worker-close)"),
    # the worker's event loop stopped under it: its thread fails
    "thread-fails": ("client.run(lambda dask_worker: dask_worker.loop.stop())\n"
                     "import time; time.sleep(120)\n", "failed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_worker_ended_by_a_task_ends_the_job_with_one_line(venv, script, case):
    body, said = CASES[case]
    path = script(HEAD + body)
    out = venv.launch(4, "--protocol", "mpi", path, timeout=HANG)
    assert out.status == 1, out
    lines = [x for x in out.err.splitlines() if x.startswith("dask-mpi-launch:")]
    assert len(lines) == 1, out
    assert said in lines[0] and "cannot be restarted" in lines[0], out
    assert "(worker, host" in lines[0], out
    assert "restarting" not in out.output and "name taken" not in out.output, out
    if case.startswith("sys-exit"):  # distributed logs the task's SystemExit, as in a
        # worker process: the task's own traceback, none of ours
        assert "dask_mpi_launch" not in out.output.split("Traceback", 1)[-1], out
    else:
        assert "Traceback" not in out.output, out
    assert "BAD TERMINATION" not in out.output and "never awaited" not in out.output, out
    assert out.seconds < 90, out
    assert wait_no_leftovers(str(path)) == []
