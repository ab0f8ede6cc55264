"""The single-node Slurm harness (tests/slurm_cluster.py) really runs MPI jobs.

Skipped when Slurm cannot be installed, except under CI=true, where that is a failure.
The MPICH venv (python, mpiexec) comes from DML_MPICH_VENV.
"""

import os
import sys
import time
from pathlib import Path

import pytest
from conftest import unavailable
from launch import Venv

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, ensure_slurm_installed  # noqa: E402

VENV = Path(os.environ.get("DML_MPICH_VENV") or Venv("mpich").path)
PY = VENV / "bin" / "python"
MPIEXEC = VENV / "bin" / "mpiexec"
PRINT_SIZE = "from mpi4py import MPI; print(MPI.COMM_WORLD.size)"


@pytest.fixture(scope="module")
def slurm():
    reason = ensure_slurm_installed()
    if reason:
        unavailable(reason)
    if not PY.exists() or not MPIEXEC.exists():
        unavailable(f"no MPICH venv at {VENV} (set DML_MPICH_VENV)")
    with SlurmCluster() as cluster:
        print(f"slurm cluster up in {cluster.start_seconds:.2f} s")
        yield cluster


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "job.sh"
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + body + "\n")
    return path


def _digits(out: str) -> str:
    """Output without whitespace: ranks' lines can interleave ("44\\n\\n4\\n4\\n" seen)."""
    return "".join(out.split())


def _run(slurm, script, *args, timeout=60):
    t0 = time.monotonic()
    job_id, state, code, out = slurm.sbatch(script, *args, timeout=timeout)
    print(f"job {job_id} {args}: {state} rc {code} in {time.monotonic() - t0:.2f} s")
    assert (state, code) == ("COMPLETED", 0), out
    return out


def test_srun_pmi2_gives_one_world_of_four(slurm, tmp_path):
    script = _script(tmp_path, f'srun --mpi=pmi2 -n 4 {PY} -c "{PRINT_SIZE}"')
    out = _run(slurm, script, "--ntasks=4")
    assert _digits(out) == "4444"


def test_mpiexec_inside_sbatch_gives_world_of_four(slurm, tmp_path):
    script = _script(tmp_path, f'{MPIEXEC} -n "$SLURM_NTASKS" {PY} -c "{PRINT_SIZE}"')
    out = _run(slurm, script, "--ntasks=4")
    assert _digits(out) == "4444"


def test_cpus_per_task_and_mem_per_cpu_reach_the_job(slurm, tmp_path):
    script = _script(tmp_path, 'echo "cpt=$SLURM_CPUS_PER_TASK mpc=$SLURM_MEM_PER_CPU '
                               'ntasks=$SLURM_NTASKS"')
    out = _run(slurm, script, "--ntasks=2", "--cpus-per-task=2", "--mem-per-cpu=1000")
    assert out.split() == ["cpt=2", "mpc=1000", "ntasks=2"]


def test_failing_job_reports_its_exit_code(slurm, tmp_path):
    script = _script(tmp_path, "echo before; exit 7")
    job_id, state, code, out = slurm.sbatch(script, timeout=60)
    assert (state, code, out.strip()) == ("FAILED", 7, "before")


def test_job_that_cannot_start_times_out_and_is_cancelled(slurm, tmp_path):
    from slurm_cluster import SlurmError

    script = _script(tmp_path, "echo never")
    with pytest.raises(SlurmError, match="still PENDING"):
        slurm.sbatch(script, "--ntasks=64", timeout=3)  # node has 16 CPUs: pends forever
    # the cancelled job no longer occupies the queue
    queue = slurm.run(["squeue", "-h", "-o", "%i %T"], timeout=10).stdout.strip()
    assert queue == ""


def test_detect_resources_inside_a_real_srun_step(slurm, tmp_path):
    """dask_mpi_launch/hpc/resources.py, loaded by path, reads a live job's variables."""
    module = Path(__file__).parents[1] / "dask_mpi_launch" / "hpc/resources.py"
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('environment', {str(module)!r})\n"
        "env = sys.modules['environment'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(env)\n"
        "r = env.detect_resources(os.environ, local_ranks=0, cpu_count=2,\n"
        "                         total_memory=24 * 2**30)\n"
        "print(r.scheduler, r.job_id == os.environ['SLURM_JOB_ID'], r.nthreads,\n"
        "      r.memory_limit, flush=True)\n"
    )
    script = _script(tmp_path, f"srun --mpi=pmi2 -n 4 {PY} {probe}")
    out = _run(slurm, script, "--ntasks=4", "--cpus-per-task=2", "--mem-per-cpu=1000")
    assert out.splitlines() == [f"slurm True 2 {2000 * 2**20}"] * 4


def test_multinode_cluster_by_hand(tmp_path):
    """``python tests/slurm_cluster.py up --nodes 2`` returns, its shell lines reach the
    cluster (srun -N 2 runs on n1 and n2, in the submitter's environment), and ``down``
    from another process removes every namespace, daemon and file."""
    import shlex
    import subprocess

    from netns_hosts import can_create_namespaces
    from slurm_cluster import STATE_FILE

    reason = ensure_slurm_installed() or can_create_namespaces()
    if reason:
        unavailable(reason)
    if STATE_FILE.exists():
        pytest.skip(f"a cluster started by hand is up ({STATE_FILE}): not touching it")
    harness = [sys.executable, str(Path(__file__).parent / "slurm_cluster.py")]
    up = subprocess.run([*harness, "up", "--nodes", "2"], capture_output=True, text=True,
                        timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in up.stdout.splitlines())
        env = {**os.environ, "SLURM_CONF": shlex.split(exports["SLURM_CONF"])[0],
               "MARK": "kept"}
        submit = shlex.split(shlex.split(exports["SUBMIT"])[0])
        step = subprocess.run([*submit, "srun", "-N", "2", "--ntasks-per-node=1", "bash",
                               "-c", 'echo "$(hostname) $MARK"'], capture_output=True,
                              text=True, timeout=60, env=env)
        assert sorted(step.stdout.splitlines()) == ["n1 kept", "n2 kept"], step
    finally:
        down = subprocess.run([*harness, "down"], capture_output=True, text=True,
                              timeout=120)
    assert down.returncode == 0, down.stderr
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           timeout=10).stdout
    assert submit[3] not in netns, netns
    assert not Path(env["SLURM_CONF"]).exists()
