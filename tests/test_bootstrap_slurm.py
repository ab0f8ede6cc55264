"""--bootstrap slurm: no MPI at all, roles from Slurm's variables, messages through files.

These tests start the tasks themselves with Slurm's variables (the live-Slurm test with
srun is in test_slurm_examples.py)."""
import os
import subprocess
import time
import uuid

import pytest

from launch import kill_group
from test_launch import CLIENT, HANG


def start_tasks(venv, n, args, tmp_path, job=None, ranks=None, env=None):
    job = job or uuid.uuid4().hex[:8]
    procs = []
    for rank in (range(n) if ranks is None else ranks):
        task_env = venv.env({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(n),
                             "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0", **(env or {})})
        procs.append(subprocess.Popen(
            [venv.bin / "dask-mpi-launch", "--bootstrap", "slurm", "--bootstrap-dir", tmp_path,
             *map(str, args)], env=task_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True))
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
