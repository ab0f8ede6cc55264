"""One import of distributed per node (process/node_zygote.py), on real MPI: every role of a node
comes from one zygote, with its own rank's affinity, environment and name; restarts work;
a killed node-leader rank ends the job promptly."""
import pytest

from launch import finish, wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 60

WHO = """
import os
from distributed import Client
client = Client()
rank_vars = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
def who():
    rank = next(os.environ[k] for k in rank_vars if k in os.environ)
    return os.getppid(), rank, sorted(os.sched_getaffinity(0))
found = sorted(client.run(who).values(), key=lambda x: x[1])
print("parents", len({p for p, _, _ in found}), "ranks", [r for _, r, _ in found], flush=True)
print("affinity", [a for _, _, a in found], flush=True)
print("result", client.submit(lambda x: x + 1, 41).result(), flush=True)
"""


def test_one_zygote_per_node(venv, script):
    out = venv.launch(4, "--worker-processes", "2", script(WHO), timeout=HANG)
    assert out.status == 0, out
    assert "parents 1 ranks ['2', '2', '3', '3']" in out.out, out
    assert "result 42" in out.out


def test_no_share_imports_is_one_zygote_per_rank(mpich, script):
    out = mpich.launch(4, "--no-share-imports", script(WHO), timeout=HANG)
    assert out.status == 0, out
    assert "parents 2 ranks ['2', '3']" in out.out, out


def test_roles_keep_their_ranks_affinity(mpich, script):
    # Hydra binds rank r to core r % 2 here: the workers of ranks 2 and 3 must keep it,
    # although the zygote that forked them runs on rank 0's core
    out = mpich.launch(4, script(WHO), timeout=HANG, mpiexec_args=("-bind-to", "core"))
    assert out.status == 0, out
    assert "affinity [[0], [1]]" in out.out, out


def test_killed_worker_is_restarted_by_the_shared_zygote(mpich, script):
    path = script("""
import os, signal, time
from distributed import Client
client = Client()
pids = client.run(os.getpid)
os.kill(min(pids.values()), signal.SIGKILL)
client.wait_for_workers(2, timeout=30)
time.sleep(0.5)
print("sum", client.submit(sum, range(100)).result(), flush=True)
""")
    out = mpich.launch(4, "--worker-restarts", "1", path, timeout=HANG)
    assert out.status == 0, out
    assert "sum 4950" in out.out and "restarting it (1 of 1)" in out.err, out


def test_killed_node_leader_ends_the_job(venv, script):
    path = script("""
import os, signal, time, psutil
from distributed import Client
Client().submit(lambda: 1).result()
zygote = psutil.Process(os.getppid())
leader = zygote.ppid()
print("killing", leader, flush=True)
os.kill(leader, signal.SIGKILL)
time.sleep(120)
""")
    proc = venv.start([venv.mpiexec, "-n", "4", venv.bin / "dask-mpi-launch", path])
    out = finish(proc, HANG)
    assert "killing" in out.out, out
    assert out.status != 0, out
    assert out.seconds < HANG, out
    assert wait_no_leftovers(str(path)) == []
