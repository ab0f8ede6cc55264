"""Issue 21, by construction: a worker that ends unasked is dead whatever its status, the
roles end as ``python script.py`` ends, nothing the job started outlives it, a second
initialize() starts nothing, a full local directory is one line. Each case on real MPI,
under MPICH and Open MPI; each launch bounded, and checked for processes left behind."""
import os
import signal
import subprocess
import time

import pytest

from launch import finish, kill_group, wait_for_line, wait_no_leftovers

pytestmark = pytest.mark.mpi

HANG = 90


def lines_of(text: str, prefix: str = "dask-mpi-launch:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


TASK_ENDS_WORKER = """
import os, sys
from distributed import Client
from distributed.scheduler import KilledWorker
client = Client()
try:
    client.submit({end}, 0, pure=False).result(timeout=60)
except KilledWorker:
    print("killed worker", flush=True)
print("after", client.submit(lambda x: x + 1, 1).result(timeout=60), flush=True)
"""


@pytest.mark.parametrize("end", ["sys.exit", "os._exit"])
def test_a_task_that_ends_its_worker_with_status_0_is_a_dead_worker(venv, script, end):
    """Issue 21 case 1: hung for good (the exit 0 taken for a normal close). Now each
    death is a restart; after distributed's allowed-failures (3) the script sees
    KilledWorker, and the cluster still computes."""
    path = script(TASK_ENDS_WORKER.format(end=end))
    out = venv.launch(3, "--quiet", "--worker-restarts", "5", path, timeout=HANG)
    assert out.status == 0, out
    assert "killed worker" in out.out and "after 2" in out.out, out
    restarts = [line for line in lines_of(out.err) if "restarting it" in line]
    assert len(restarts) == 4, out
    assert "without being asked to" in restarts[0], out
    assert not wait_no_leftovers(str(path.parent)), out


def test_a_worker_ending_unasked_past_its_restarts_ends_the_job(venv, script):
    path = script("""
import os
from distributed import Client
Client().submit(os._exit, 0, pure=False).result()
""")
    out = venv.launch(3, "--quiet", "--worker-restarts", "0", path, timeout=HANG)
    assert out.status == 1, out
    errors = lines_of(out.err)
    assert len(errors) == 1 and "without being asked to" in errors[0], out
    assert not wait_no_leftovers(str(path.parent)), out


def test_client_restart_with_the_default_worker_brings_the_workers_back(venv, script):
    """Case 6: upstream shuts nanny-less workers down and times out after 60 s."""
    path = script("""
from distributed import Client
client = Client()
before = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
client.restart(timeout=60)
after = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
print("same names", before == after, len(after), flush=True)
print("result", client.submit(lambda x: x * 2, 21).result(), flush=True)
""")
    out = venv.launch(4, "--quiet", path, timeout=HANG)
    assert out.status == 0, out
    assert "same names True 2" in out.out and "result 42" in out.out, out
    assert not lines_of(out.err), out
    assert out.seconds < 60, out  # upstream's restart waited out its timeout


ENDS_AS_PYTHON = """
import ctypes, os, threading, time
from concurrent.futures import ThreadPoolExecutor
from distributed import Client
client = Client()
print("task", client.submit(lambda: ctypes.CDLL(None).printf(b"printf in a task\\n")).result(),
      flush=True)
out = {out!r}
unclosed = open(os.path.join(out, "unclosed.txt"), "w")
unclosed.write("x" * 1000)
def late():
    time.sleep(1)
    with open(os.path.join(out, "thread.txt"), "w") as f:
        f.write("thread")
threading.Thread(target=late).start()
pool = ThreadPoolExecutor(1)
pool.submit(time.sleep, 0.5)
pool.submit(lambda: open(os.path.join(out, "pool.txt"), "w").write("pool"))
ctypes.CDLL(None).printf(b"printf in the script\\n")
"""


def test_the_script_ends_as_python_would(venv, script, tmp_path):
    """Case 7: the script's and the workers' processes ended with os._exit, losing a
    non-daemon thread's work, pending executor work, an unclosed file's bytes and C stdio
    output."""
    path = script(ENDS_AS_PYTHON.format(out=str(tmp_path)))
    out = venv.launch(3, "--quiet", path, timeout=HANG)
    assert out.status == 0, out
    assert (tmp_path / "unclosed.txt").read_text() == "x" * 1000, out
    assert (tmp_path / "thread.txt").read_text() == "thread", out
    assert (tmp_path / "pool.txt").read_text() == "pool", out
    assert "printf in the script" in out.out, out
    assert "printf in a task" in out.out, out


DETACHED = """
import os, subprocess, sys, time
from distributed import Client
Client()
helper = subprocess.Popen(["sleep", "300"], start_new_session=True)  # keeps our stdout
if os.fork() == 0:  # a double-forked daemon, in a session of its own
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
with open({pids!r}, "w") as f:
    f.write(str(helper.pid))
print("started", flush=True)
"""


def test_helpers_that_left_the_session_end_with_the_job(venv, script, tmp_path):
    """Case 4: a start_new_session helper and a double-forked daemon held the job's
    stdout, and mpiexec never ended; with their output elsewhere they outlived it."""
    pids = tmp_path / "pids"
    path = script(DETACHED.format(pids=str(pids)))
    out = venv.launch(3, "--quiet", path, timeout=HANG)
    assert out.status == 0, out
    assert "started" in out.out, out
    ended = [line for line in lines_of(out.err) if "the job left running" in line]
    assert len(ended) == 1 and "ended 2 processes" in ended[0], out
    helper = int(pids.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(helper, 0)
    assert not wait_no_leftovers(str(tmp_path)), out


def test_initialize_twice_returns_at_once(venv, script):
    """Case 2: the second call started a second layout and hung (MPICH: the client kept
    spinning in MPI_Init after the job was killed)."""
    path = script("""
from dask_mpi_launch import initialize
print("first", initialize(), flush=True)
print("second", initialize(), flush=True)
from distributed import Client
print("result", Client().submit(lambda: 5).result(), flush=True)
""")
    out = venv.launch_python(3, path, timeout=HANG)
    assert out.status == 0, out
    assert "first True" in out.out and "second True" in out.out and "result 5" in out.out, out
    assert not wait_no_leftovers(str(path.parent)), out
    # a script run by the command that calls initialize() is already the job's client
    out = venv.launch(3, "--quiet", path, timeout=HANG)
    assert out.status == 0, out
    assert "second True" in out.out and "result 5" in out.out, out


@pytest.fixture
def full_directory(tmp_path):
    """A 256 KiB tmpfs: a local directory with no room to spill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (run the suite as root)")
    mount = tmp_path / "full"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_local_directory_is_one_line(venv, script, full_directory):
    """Case 5: workers paused for good behind 666 lines of ENOSPC tracebacks."""
    path = script("""
import numpy as np
from distributed import Client
c = Client()
fs = [c.submit(lambda i: np.ones(20_000_000, dtype="u1"), i) for i in range(40)]
print(sum(f.result().sum() for f in fs))
""")
    out = venv.launch(3, "--quiet", "--local-directory", full_directory,
                      "--memory-limit", "400MB", path, timeout=HANG)
    assert out.status == 1, out
    errors = lines_of(out.err)
    assert len(errors) == 1 and "is full" in errors[0], out
    assert "Traceback" not in out.err, out
    assert not wait_no_leftovers(str(path.parent)), out


# Stuck in C code: the main thread never returns to Python, so Python's handler of the
# SIGTERM that another thread received (the main thread blocks it) never runs.
STUCK = """
import ctypes, signal
from distributed import Client
Client()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
print("stuck", flush=True)
ctypes.CDLL(None).sleep(300)
"""


def _rank_process(job: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            env = proc.environ()
            if proc.name() == "dml-rank" and (
                    env.get("PMI_RANK") == str(rank)
                    or env.get("OMPI_COMM_WORLD_RANK") == str(rank)):
                return proc.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize("share", ["--share-imports", "--no-share-imports"])
def test_a_stuck_script_ends_when_its_rank_is_killed(venv, script, share):
    """Case 3: the role's parent-death signal is SIGTERM, which a script stuck in C code
    never handles: under MPICH the job hung with the script spinning. The zygote that
    forked the role now ends its process group once the grace is over."""
    path = script(STUCK)
    job = venv.start([venv.mpiexec, "-n", "3", str(venv.bin / "dask-mpi-launch"), "--quiet",
                      share, path], env={"DASK_MPI_LAUNCH__SHUTDOWN_TIMEOUT": "3"})
    try:
        assert wait_for_line(job, "stuck", 60), "the script never started"
        rank = _rank_process(job, 1)
        assert rank is not None, "no rank 1 found"
        os.kill(rank, signal.SIGKILL)
        out = finish(job, 60)
    finally:
        kill_group(job)
    assert out.status != 0, out
    assert not wait_no_leftovers(str(path.parent), 15), out


def test_os_exit_in_an_exit_false_client_is_the_jobs_status(venv, script):
    """Case 20: initialize(exit=False) and os._exit(6) in the client gave 9 under MPICH
    (the rank died without MPI_Finalize) and 6 under Open MPI."""
    path = script("""
import os
from dask_mpi_launch import initialize
if initialize(exit=False):
    from distributed import Client
    print("result", Client().submit(lambda: 5).result(), flush=True)
    os._exit(6)
""")
    out = venv.launch_python(3, path, timeout=HANG)
    assert out.status == 6, out
    assert "result 5" in out.out, out
    assert not wait_no_leftovers(str(path.parent)), out


def test_ranks_started_through_a_wrapper_share_the_nodes_zygote(venv, script, tmp_path):
    """Start-up: a per-rank wrapper (bash without exec) made every rank's parent its own
    shell, so the ranks never found the node's zygote and waited 10 s each."""
    wrapper = tmp_path / "wrap.sh"
    wrapper.write_text('#!/bin/bash\n"$@"\n')
    wrapper.chmod(0o755)
    path = script("""
import os
from distributed import Client
client = Client()
parents = set(client.run(os.getppid).values()) | {os.getppid()}
with open(f"/proc/{parents.pop()}/comm") as f:
    print("parents", len(parents) + 1, f.read().strip(), flush=True)
""")
    job = [venv.mpiexec, "-n", "4", str(wrapper), str(venv.bin / "dask-mpi-launch"),
           "--quiet", str(path)]
    from launch import run

    out = run(job, timeout=HANG, env=venv.env())
    assert out.status == 0, out
    assert "parents 1 dml-zygote" in out.out, out


def test_a_killed_scheduler_is_one_line_and_where_the_script_was(venv, script):
    """Case 18: distributed's 35-line client traceback (and an atexit one) came with our
    line."""
    path = script("""
import os, signal, time
from distributed import Client
client = Client()
pid = client.run_on_scheduler(os.getpid)
f = client.submit(time.sleep, 60)
time.sleep(0.5)
os.kill(pid, signal.SIGKILL)
f.result()
""")
    out = venv.launch(3, "--quiet", path, timeout=HANG)
    assert out.status == 1, out
    ours = lines_of(out.err)
    assert len(ours) == 2, out
    assert any("scheduler process was killed by signal 9" in line for line in ours), out
    assert any("stopped at script" in line and "lost the cluster" in line for line in ours), out
    assert "Traceback" not in out.err, out
    assert not wait_no_leftovers(str(path.parent)), out


@pytest.mark.parametrize("share", ["--share-imports", "--no-share-imports"])
def test_a_killed_mpiexec_leaves_nothing_running(venv, script, share):
    """A launcher killed by ``timeout`` or the batch system (SIGKILL, no forwarding): every
    rank, zygote, role and worker of the job ends, on every node."""
    path = script("""
import time
from distributed import Client
Client()
print("ready", flush=True)
time.sleep(300)
""")
    job = venv.start([venv.mpiexec, "-n", "4", str(venv.bin / "dask-mpi-launch"), "--quiet",
                      share, path], env={"DASK_MPI_LAUNCH__SHUTDOWN_TIMEOUT": "3"})
    try:
        assert wait_for_line(job, "ready", 60), "the script never started"
        job.kill()  # the launcher alone: its group is left to fend for itself
        job.wait(30)
        assert not wait_no_leftovers(str(path.parent), 30)
    finally:
        kill_group(job)


def _process_named(job: subprocess.Popen, name: str) -> int | None:
    import psutil

    for proc in psutil.Process(job.pid).children(recursive=True):
        try:
            if proc.name() == name:
                return proc.pid
        except psutil.Error:
            continue
    return None


def test_a_killed_node_zygote_is_named_as_such(venv, script):
    """Case 18: the roles lost with a killed node zygote were reported as "the scheduler
    process was killed by signal 9"."""
    path = script("""
import time
from distributed import Client
Client()
print("ready", flush=True)
time.sleep(300)
""")
    job = venv.start([venv.mpiexec, "-n", "3", str(venv.bin / "dask-mpi-launch"), "--quiet",
                      path], env={"DASK_MPI_LAUNCH__SHUTDOWN_TIMEOUT": "3"})
    try:
        assert wait_for_line(job, "ready", 60), "the script never started"
        zygote = _process_named(job, "dml-zygote")
        assert zygote is not None, "no node zygote found"
        os.kill(zygote, signal.SIGKILL)
        out = finish(job, 60)
    finally:
        kill_group(job)
    assert out.status == 1, out
    ours = [line for line in lines_of(out.err) if "error" in line]
    assert len(ours) == 1 and "node's zygote" in ours[0], out
    assert "Traceback" not in out.err, out
    assert not wait_no_leftovers(str(path.parent), 15), out
