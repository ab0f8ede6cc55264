"""--bootstrap slurm: no MPI at all, roles from Slurm's variables, messages through files.

These tests start the tasks themselves with Slurm's variables (the live-Slurm test with
srun is in test_slurm_examples.py)."""
import os
import pwd
import stat
import subprocess
import time
import uuid

import pytest

from launch import kill_group, leftover_processes
from test_filecontrol import Evil, as_user, modes, scratch  # noqa: F401  (a fixture)
from test_launch import CLIENT, HANG


def start_tasks(venv, n, args, tmp_path, job=None, ranks=None, env=None, umask=None):
    job = job or uuid.uuid4().hex[:8]
    procs = []
    for rank in (range(n) if ranks is None else ranks):
        task_env = venv.env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(n),
                             "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", **(env or {})})
        procs.append(subprocess.Popen(
            [venv.bin / "dask-mpi-launch", "--bootstrap", "slurm", "--bootstrap-dir", tmp_path,
             *map(str, args)], env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
            preexec_fn=None if umask is None else (lambda: os.umask(umask))))
    return procs


def finish_all(procs, timeout):
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                kill_group(p)
            raise AssertionError("HUNG: tasks killed") from None
        results.append((proc.returncode, out, err))
    return results


def test_script_runs_without_mpi(mpich, script, tmp_path):
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    procs = start_tasks(mpich, 4, [script(CLIENT + "\nsys.exit(5)\n"), "x"], exchange)
    results = finish_all(procs, HANG)
    assert [status for status, _, _ in results] == [5, 5, 5, 5], results
    out = "".join(o for _, o, _ in results)
    assert "workers=2 names=2,3 result=42 argv=['x']" in out, results
    assert "".join(e for _, _, e in results) == "", results
    assert os.listdir(exchange) == []  # the exchange directory is removed at the end


def test_missing_task_is_a_bounded_error(mpich, script, tmp_path):
    procs = start_tasks(mpich, 3, [script(CLIENT)], tmp_path, ranks=[1, 2],
                        env={"DASK_MPI_LAUNCH__STARTUP_TIMEOUT": "3"})
    results = finish_all(procs, HANG)
    assert all(status != 0 for status, _, _ in results), results
    assert "not every rank started within 3 s" in "".join(e for _, _, e in results), results


def test_outside_slurm_is_a_clear_error(mpich, script, tmp_path):
    from launch import run

    env = {k: v for k, v in mpich.env().items() if not k.startswith("SLURM_")}
    out = run([mpich.bin / "dask-mpi-launch", "--bootstrap", "slurm", script(CLIENT)],
              timeout=HANG, env=env)
    assert out.status == 2, out
    assert "--bootstrap slurm needs to run as the tasks of a Slurm job step" in out.err, out


@pytest.mark.parametrize("directory", ["/nonexistent/dir"])
def test_unusable_bootstrap_dir(mpich, script, tmp_path, directory):
    procs = start_tasks(mpich, 1, [script(CLIENT)], directory)
    (status, out, err), = finish_all(procs, HANG)
    assert status == 2 and "is not a writable directory" in err, (status, out, err)


# what the script sees of the exchange directory while the job runs
EXPOSED = """
import os, stat, sys
bad = []
for root, dirs, files in os.walk(os.environ["EXCHANGE"]):
    for name in dirs + files:
        mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
        if mode & 0o077:
            bad.append(f"{name}={mode:04o}")
print("exposed:", bad, "entries:", sum(1 for _ in os.walk(os.environ["EXCHANGE"])), flush=True)
"""


def test_private_files_in_a_shared_scratch_dir(mpich, script, scratch):  # noqa: F811
    """A 1777 scratch directory and umask 0: everything the job writes is still 0700/0600,
    and nothing is left at the end."""
    procs = start_tasks(mpich, 4, [script(EXPOSED + CLIENT)], scratch, umask=0,
                        env={"EXCHANGE": scratch})
    results = finish_all(procs, HANG)
    assert [status for status, _, _ in results] == [0, 0, 0, 0], results
    out = "".join(o for _, o, _ in results)
    assert "exposed: [] entries: " in out and "entries: 1\n" not in out, out
    assert "workers=2 names=2,3 result=42" in out, out
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_step_directory_planted_by_another_user(mpich, script, scratch, planted):  # noqa: F811
    """Another user made our step directory in the shared scratch directory (with a pickle
    in rank 1's inbox that would run code): every task refuses it, with one line."""
    job = uuid.uuid4().hex[:8]
    step = os.path.join(scratch, f"dask-mpi-launch-{job}.0")
    marker = os.path.join(scratch, "pwned")

    def plant():
        import pickle

        target = step if planted == "directory" else os.path.join(scratch, "theirs")
        os.mkdir(target, 0o777)
        os.chmod(target, 0o777)
        os.mkdir(os.path.join(target, "inbox-1"), 0o777)
        with open(os.path.join(target, "inbox-1", "00000001-0.msg"), "wb") as f:
            pickle.dump(("address", Evil(marker)), f)
        if planted == "symlink":
            os.symlink(target, step)

    as_user("nobody", plant)
    t0 = time.monotonic()
    results = finish_all(start_tasks(mpich, 3, [script(CLIENT)], scratch, job=job), HANG)
    assert [status for status, _, _ in results] == [2, 2, 2], results
    why = "belongs to user nobody, not to you" if planted == "directory" else "is a symbolic link"
    assert "".join(e for _, _, e in results) == (
        f"dask-mpi-launch: error: --bootstrap slurm: {step} {why}: another user may have made "
        "it to read or plant messages; remove it, or give a --bootstrap-dir only you can write "
        "to (e.g. $HOME)\n"), results
    assert not os.path.exists(marker)
    assert os.lstat(step).st_uid == pwd.getpwnam("nobody").pw_uid
    assert time.monotonic() - t0 < HANG


def test_rerun_after_a_crash_starts_clean(mpich, script, tmp_path):
    """A requeued job keeps its job and step id: after a run killed mid-script, the next
    run with the same ids must not read anything the dead one left."""
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    flag = tmp_path / "running"
    job = uuid.uuid4().hex[:8]
    crash = script(f"import pathlib, time\npathlib.Path({str(flag)!r}).touch()\ntime.sleep(300)\n")
    procs = start_tasks(mpich, 4, [crash], exchange, job=job)
    deadline = time.monotonic() + HANG
    while not flag.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                kill_group(p)
            raise AssertionError(f"the first run did not start: {finish_all(procs, 5)}")
        time.sleep(0.05)
    for p in procs:  # the crash: every task killed at once, nothing cleaned up
        kill_group(p)
    finish_all(procs, 10)
    left = modes(exchange)
    assert left, "the dead run left nothing to read: the test tests nothing"
    assert {m for p, m in left.items() if not os.path.isdir(exchange / p)} <= {0o600}, left
    assert {m for p, m in left.items() if os.path.isdir(exchange / p)} == {0o700}, left

    t0 = time.monotonic()
    results = finish_all(start_tasks(mpich, 4, [script(CLIENT + "\nsys.exit(3)\n")], exchange,
                                     job=job), HANG)
    assert [status for status, _, _ in results] == [3, 3, 3, 3], results
    assert "workers=2 names=2,3 result=42" in "".join(o for _, o, _ in results), results
    err = "".join(e for _, _, e in results)
    # (not err == "": under heavy load a worker's heartbeat may still race the scheduler's
    # close and log, which is not this test's subject)
    assert "dask-mpi-launch: error" not in err and "Timed out trying to connect" not in err, err
    assert time.monotonic() - t0 < HANG
    assert os.listdir(exchange) == []


def test_rank_0_killed_mid_job_ends_the_others(mpich, script, tmp_path):
    """No MPI launcher kills the job when a task dies: the others must notice (heartbeats)
    and end, with one line, instead of waiting until the walltime."""
    exchange = tmp_path / "exchange"
    exchange.mkdir()
    flag = tmp_path / "running"
    sleeper = script(f"import pathlib, time\npathlib.Path({str(flag)!r}).touch()\ntime.sleep(300)\n")
    procs = start_tasks(mpich, 4, [sleeper], exchange,
                        env={"DASK_MPI_LAUNCH__BOOTSTRAP_PEER_TIMEOUT": "2"})
    deadline = time.monotonic() + HANG
    while not flag.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                kill_group(p)
            raise AssertionError(f"the job did not start: {finish_all(procs, 5)}")
        time.sleep(0.05)
    kill_group(procs[0])  # rank 0 and its scheduler: SIGKILL
    t0 = time.monotonic()
    results = finish_all(procs[1:], HANG)
    assert time.monotonic() - t0 < HANG
    assert [status for status, _, _ in results] == [1, 1, 1], results
    errors = [line for _, _, e in results for line in e.splitlines()]
    assert len(errors) == 1 and errors[0].startswith("dask-mpi-launch: error on rank 0 "), results
    assert errors[0].endswith("no sign of life for 2 s: killed, out of memory, or its node "
                              "failed"), results
    assert {m for m in modes(exchange).values()} <= {0o600, 0o700}
    assert leftover_processes(str(exchange)) == []
