"""initialize() at the top of an existing script, on real MPI."""
import pytest

pytestmark = pytest.mark.mpi

HANG = 45

SCRIPT = """
import os, sys
from dask_mpi_launch import initialize
initialize({kwargs})
from distributed import Client
client = Client()
print("workers", len(client.scheduler_info()["workers"]),
      "result", client.submit(lambda x: x + 1, 41).result(), flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
try:
    if mode == "exit":
        sys.exit(7)
    if mode == "raise":
        raise RuntimeError("boom in the script")
    if mode == "osexit":
        os._exit(3)
finally:
    print("finally", mode, flush=True)
"""


@pytest.mark.parametrize("mode, status", [("ok", 0), ("exit", 7), ("raise", 1), ("osexit", 3)])
def test_initialize_keeps_the_scripts_status(venv, script, mode, status):
    out = venv.launch_python(4, script(SCRIPT.format(kwargs="")), mode, timeout=HANG)
    assert out.status == status, out
    assert "workers 2 result 42" in out.out, out
    if mode != "osexit":
        assert out.out.count(f"finally {mode}") == 1, out  # the script's code ran once
    assert out.output.count("Traceback") == (1 if mode == "raise" else 0), out
    assert "CommClosedError" not in out.output


def test_dask_mpi_keywords_are_accepted(mpich, script):
    kwargs = ('interface="lo", nthreads=2, memory_limit="1GiB", nanny=True, dashboard=False, '
              'protocol="tcp", worker_options={"resources": {"X": 1}}, exit=True')
    out = mpich.launch_python(3, script(SCRIPT.format(kwargs=kwargs)), timeout=60)
    assert out.status == 0, out
    assert "workers 1 result 42" in out.out


def test_exit_false_and_send_close_signal(venv, script):
    path = script("""
import sys
from mpi4py import MPI
from dask_mpi_launch import initialize, send_close_signal
is_client = initialize(exit=False)
if is_client:
    from distributed import Client
    client = Client()  # left open, as users do: send_close_signal closes it first
    print(f"client sees {len(client.scheduler_info()['workers'])} workers", flush=True)
    send_close_signal()
# one write per line: print() writes its pieces one by one, and the ranks share the pipe
sys.stdout.write(f"rank {MPI.COMM_WORLD.rank} continues {is_client}\\n")
sys.stdout.flush()
""")
    out = venv.launch_python(4, path, timeout=HANG)
    assert out.status == 0, out
    assert "Traceback" not in out.err, out  # the open client closed before the cluster
    assert "client sees 2 workers" in out.out
    for rank, is_client in [(0, False), (1, True), (2, False), (3, False)]:
        assert f"rank {rank} continues {is_client}" in out.out, out


def test_initialize_world_too_small_is_one_message(mpich, script):
    out = mpich.launch_python(2, script(SCRIPT.format(kwargs="")), timeout=HANG)
    assert out.status == 2, out
    lines = [x for x in out.output.splitlines() if "dask-mpi-launch: error" in x]
    assert len(lines) == 1 and "needs at least 3 ranks (got 2)" in lines[0], out


def test_initialize_after_user_imported_mpi4py(mpich, script):
    text = "from mpi4py import MPI\n" + SCRIPT.format(kwargs="")
    out = mpich.launch_python(3, script(text), "exit", timeout=HANG)
    assert out.status == 7, out
    assert out.out.count("finally exit") == 1
