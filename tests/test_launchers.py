"""One module knows the launchers' environment (hpc/launchers.py): a table test per
launcher, with the variables each one really sets (MPICH's Hydra, Open MPI's PRRTE, Slurm's
srun, PMIx, Grid Engine, PBS, LSF), in-process."""
from __future__ import annotations

import pytest

from dask_mpi_launch.hpc import launchers

# (launcher, environment of rank 5 of 8, the 2nd of 3 ranks on the 2nd node) ->
# (rank, size, (local rank, local size), node id, job id)
CASES = {
    "hydra": ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
               "MPI_LOCALNRANKS": "3", "PMI_FD": "7"}, (5, 8, (1, 3), None, None)),
    "prrte": ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
               "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
               "PMIX_RANK": "5", "PMIX_NAMESPACE": "prterun-host-123@1"},
              (5, 8, (1, 3), None, None)),
    "pmix": ({"PMIX_RANK": "5", "PMIX_LOCAL_RANK": "1", "PMIX_LOCAL_SIZE": "3"},
             (5, None, (1, 3), None, None)),
    "srun": ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "2,3(x2)", "SLURM_TASKS_PER_NODE": "2,3(x2)",
              "SLURM_NODEID": "1", "SLURM_JOB_ID": "42"}, (5, 8, (1, 3), 1, "42")),
    # mpiexec inside an sbatch: Hydra's variables win over the batch step's SLURM_PROCID
    "hydra in slurm": ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
                        "MPI_LOCALNRANKS": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                        "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "1",
                        "SLURM_NODEID": "0", "SLURM_JOB_ID": "42"},
                       (5, 8, (1, 3), 0, "42")),
    "grid engine": ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1",
                     "MPI_LOCALNRANKS": "3", "JOB_ID": "17", "SGE_ROOT": "/var/lib/gridengine"},
                    (5, 8, (1, 3), None, "17")),
    "pbs": ({"PMI_RANK": "5", "PMI_SIZE": "8", "PBS_JOBID": "99.server"},
            (5, 8, None, None, "99.server")),
    "lsf": ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
             "LSB_JOBID": "3001"}, (5, 8, None, None, "3001")),
    "no launcher": ({"JOB_ID": "17"}, (0, None, None, None, None)),
}


@pytest.mark.parametrize("name", CASES)
def test_each_launcher(name):
    env, (rank, size, local, node, job) = CASES[name]
    assert launchers.rank(env) == rank
    assert launchers.size(env) == size
    assert launchers.local_rank(env) == local
    assert launchers.local_size(env) == (local[1] if local and name != "srun" else 0)
    assert launchers.node_id(env) == node
    assert launchers.job_id(env) == job


def test_slurm_task_counts_are_expanded_per_node():
    assert launchers.parse_slurm_counts("2(x3),1") == [2, 2, 2, 1]
    env = {"SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "4(x2),1", "SLURM_NODEID": "2"}
    assert launchers.local_rank(env) == (0, 1)
    assert launchers.parse_slurm_counts("two") is None
    # a variable the launcher garbled is not trusted
    assert launchers.local_rank({"SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "x"}) is None


def test_what_names_a_rank_is_not_what_names_the_job():
    """The node zygote parses one command line for the ranks that differ only in these."""
    for env, _ in CASES.values():
        for key in env:
            per_rank = key in launchers.PER_RANK
            assert per_rank == (key in launchers.RANK or key.endswith(
                ("LOCALRANKID", "LOCAL_RANK", "LOCALID", "PMI_FD"))), key


def test_launch_id():
    assert launchers.launch_id({"PMIX_NAMESPACE": "ns", "SLURM_JOB_ID": "4"}) == "ns"
    assert launchers.launch_id({"SLURM_JOB_ID": "4"}) == "4"
    assert launchers.launch_id({}) == ""
