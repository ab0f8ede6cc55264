"""--protocol mpi with many tiny tasks and an idle cluster (issue 25): small messages travel
on the peers' TCP/TLS socket and only bulk frames over MPI, so 10,000 tiny tasks whose
results move between the workers complete exactly, and an idle worker rank's progress
thread (which makes no MPI call while nothing is in flight) uses no CPU, its worker under
1% of a core. One job per MPI does both."""
import pytest

from launch import wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 300  # a hang guard only: on a loaded 2-core machine 10,000 tasks take minutes

SCRIPT = """
import time
import psutil
from distributed import Client

client = Client()
workers = sorted(client.scheduler_info()["workers"])
n = 10_000
futs = client.map(lambda i: i + 1, range(n), pure=False)
total = client.submit(sum, futs, workers=[workers[0]], pure=False).result(timeout=120)
print("tasks", n, "sum ok", total == n * (n + 1) // 2, flush=True)
stats = client.run(lambda: dict(__import__("dask_mpi_launch.dataplane.backend",
                                           fromlist=["engine"]).engine().stats))
print("bulk messages", sum(s["received_messages"] for s in stats.values()), flush=True)
del futs, total
time.sleep(2.0)  # the releases and the last heartbeats settle


def cpu():  # CPU seconds of the rank process, its supervisor and its progress thread
    import threading
    names = {t.native_id: t.name for t in threading.enumerate()}
    threads = {names.get(t.id): t.user_time + t.system_time for t in psutil.Process().threads()}
    t = psutil.Process().cpu_times()
    return (t.user + t.system, threads.get("MainThread", 0.0),
            threads.get("dask-mpi-progress", 0.0), time.monotonic())


before = client.run(cpu)
time.sleep(5.0)
after = client.run(cpu)
for w in sorted(before):
    (p0, m0, g0, t0), (p1, m1, g1, t1) = before[w], after[w]
    dt = t1 - t0
    print(f"idle rank {(p1 - p0) / dt:.4f} supervisor {(m1 - m0) / dt:.4f} "
          f"progress {(g1 - g0) / dt:.4f}", flush=True)
"""


def test_ten_thousand_tiny_tasks_then_an_idle_rank_polls_nothing(venv, script):
    path = script(SCRIPT)
    out = venv.launch(4, "--protocol", "mpi", path, timeout=HANG)
    assert out.status == 0, out
    assert "tasks 10000 sum ok True" in out.out, out
    # tiny results travel on the socket; at most the final gather of 5,000 of them (one
    # ~250 kB message per worker) is large enough for MPI
    bulk = int(out.out.split("bulk messages ", 1)[1].split()[0])
    assert bulk <= 2, out
    idle = [dict(zip(x.split()[1::2], map(float, x.split()[2::2])))
            for x in out.out.splitlines() if x.startswith("idle rank")]
    assert len(idle) == 2, out
    for i in idle:  # the progress thread makes no call; the worker's own threads stay under
        # 1%; the rank's supervisor (process/supervisor.py, 5-ms steps) costs the same
        # whether its worker is a thread (here) or a process of its own (TCP)
        assert i["progress"] <= 0.001, out
        assert i["rank"] - i["supervisor"] <= 0.01, out
    assert "Traceback" not in out.output, out
    assert wait_no_leftovers(str(path)) == []
