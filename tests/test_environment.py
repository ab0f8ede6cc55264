"""dask_mpi_launch.hpc.resources: threads and memory per worker from batch-system variables.

The Slurm dicts are the SLURM_* variables seen inside real jobs on Slurm 22.05.8
(tests/slurm_cluster.py, a 16-CPU 16000-MB node), by sbatch options.
"""

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from dask_mpi_launch.hpc.resources import (
    MIB, Resources, detect_resources, is_grid_engine, parse_pe_hostfile, parse_slurm_counts,
)

GIB = 1024 * MIB
NODE = dict(cpu_count=2, total_memory=24 * GIB)  # this machine

# sbatch -n4 --cpus-per-task=2 --mem-per-cpu=1000, batch script
SLURM_CPT2_MPC1000 = {
    "SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_CPUS_PER_NODE": "8",
    "SLURM_JOB_ID": "2", "SLURM_JOB_NUM_NODES": "1", "SLURM_MEM_PER_CPU": "1000",
    "SLURM_NNODES": "1", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4",
}
# the same job, inside `srun -n1`: step counts change, node counts do not
SLURM_CPT2_MPC1000_STEP = {
    **SLURM_CPT2_MPC1000, "SLURM_LOCALID": "0", "SLURM_NTASKS": "1",
    "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1",
}
# sbatch -n4 --mem=8000
SLURM_MEM8000 = {
    "SLURM_CPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "4", "SLURM_JOB_ID": "3",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_MEM_PER_NODE": "8000", "SLURM_NNODES": "1",
    "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "4",
}
# sbatch -N1 --ntasks-per-node=4
SLURM_TPN4 = {
    "SLURM_CPUS_ON_NODE": "4", "SLURM_JOB_CPUS_PER_NODE": "4", "SLURM_JOB_ID": "4",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4",
}
# sbatch -n3 --cpus-per-task=3 --mem=6000
SLURM_CPT3_MEM6000 = {
    "SLURM_CPUS_ON_NODE": "9", "SLURM_CPUS_PER_TASK": "3", "SLURM_JOB_CPUS_PER_NODE": "9",
    "SLURM_JOB_ID": "6", "SLURM_JOB_NUM_NODES": "1", "SLURM_MEM_PER_NODE": "6000",
    "SLURM_NNODES": "1", "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "3",
}
# sbatch --exclusive -n4
SLURM_EXCLUSIVE = {
    "SLURM_CPUS_ON_NODE": "16", "SLURM_JOB_CPUS_PER_NODE": "16", "SLURM_JOB_ID": "7",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "4",
    "SLURM_TASKS_PER_NODE": "4",
}
# three nodes of two kinds, 8 tasks; no SLURM_CPUS_ON_NODE (e.g. copied into a remote env)
SLURM_HETERO_NODES = {
    "SLURM_JOB_ID": "81234", "SLURM_JOB_CPUS_PER_NODE": "16(x2),8", "SLURM_NNODES": "3",
    "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_MEM_PER_NODE": "64000",
}


def test_slurm_cpus_per_task_and_mem_per_cpu():
    res = detect_resources(SLURM_CPT2_MPC1000, local_ranks=4, **NODE)
    assert res == Resources(
        nthreads=2, memory_limit=2000 * MIB, job_id="2", scheduler="slurm",
        source="SLURM_CPUS_PER_TASK=2; SLURM_MEM_PER_CPU=1000 MiB x 2 cpus",
    )


def test_slurm_values_inside_an_srun_step_are_the_same():
    assert detect_resources(SLURM_CPT2_MPC1000_STEP, local_ranks=4, **NODE) == (
        detect_resources(SLURM_CPT2_MPC1000, local_ranks=4, **NODE))


def test_slurm_split_among_worker_processes():
    res = detect_resources(SLURM_CPT2_MPC1000, local_ranks=4, worker_processes=2, **NODE)
    assert (res.nthreads, res.memory_limit) == (1, 1000 * MIB)
    assert res.source.endswith("/ 2 worker processes")
    # more processes than threads: every process keeps one thread
    res = detect_resources(SLURM_CPT2_MPC1000, local_ranks=4, worker_processes=3, **NODE)
    assert (res.nthreads, res.memory_limit) == (1, 2000 * MIB // 3)


def test_slurm_mem_per_node_shared_by_local_ranks():
    res = detect_resources(SLURM_MEM8000, local_ranks=4, **NODE)
    assert (res.nthreads, res.memory_limit, res.job_id) == (1, 2000 * MIB, "3")
    assert res.source == ("SLURM_CPUS_ON_NODE=4 / 4 local ranks; "
                          "SLURM_MEM_PER_NODE=8000 MiB / 4 local ranks")


def test_slurm_cpus_per_task_with_mem_per_node():
    res = detect_resources(SLURM_CPT3_MEM6000, local_ranks=3, **NODE)
    assert (res.nthreads, res.memory_limit) == (3, 2000 * MIB)


def test_slurm_without_memory_request_takes_node_share():
    res = detect_resources(SLURM_EXCLUSIVE, local_ranks=4, **NODE)
    assert (res.nthreads, res.memory_limit) == (4, 6 * GIB)
    assert "25769803776 bytes of node memory / 4 local ranks" in res.source


def test_slurm_mem_per_cpu_without_cpus_per_task_uses_cpus_of_the_rank():
    env = {**SLURM_EXCLUSIVE, "SLURM_MEM_PER_CPU": "500"}
    res = detect_resources(env, local_ranks=4, **NODE)
    assert (res.nthreads, res.memory_limit) == (4, 4 * 500 * MIB)


def test_slurm_heterogeneous_nodes_uses_first_node():
    res = detect_resources(SLURM_HETERO_NODES, local_ranks=4, cpu_count=16,
                           total_memory=128 * GIB)
    assert (res.nthreads, res.memory_limit) == (4, 16000 * MIB)
    assert "SLURM_JOB_CPUS_PER_NODE=16(x2),8 / 4 local ranks" in res.source


def test_slurm_local_ranks_unknown_taken_from_tasks_per_node():
    res = detect_resources(SLURM_TPN4, local_ranks=0, **NODE)
    assert (res.nthreads, res.memory_limit) == (1, 6 * GIB)
    res = detect_resources(SLURM_HETERO_NODES, local_ranks=0, cpu_count=16,
                           total_memory=128 * GIB)
    assert (res.nthreads, res.memory_limit) == (4, 16000 * MIB)  # "4(x2)" -> 4 per node
    # inside `srun -n 2` of a --ntasks-per-node=4 job the step's count wins
    env = {**SLURM_TPN4, "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2"}
    res = detect_resources(env, local_ranks=0, **NODE)
    assert (res.nthreads, res.memory_limit) == (2, 12 * GIB)
    res = detect_resources({"SLURM_JOB_ID": "9"}, local_ranks=0, cpu_count=8,
                           total_memory=8 * GIB)
    assert (res.nthreads, res.memory_limit) == (8, 8 * GIB)  # nothing known: 1 rank


def test_slurm_memory_capped_at_physical_share():
    env = {**SLURM_MEM8000, "SLURM_MEM_PER_NODE": "64000"}
    res = detect_resources(env, local_ranks=2, cpu_count=2, total_memory=16 * GIB)
    assert res.memory_limit == 8 * GIB
    assert f"capped at the node share {8 * GIB} bytes" in res.source


@pytest.mark.parametrize("bad", ["two", "", "-1", "0", "2.5", "1G"])
def test_slurm_bad_values_fall_back(bad):
    env = {**SLURM_CPT2_MPC1000, "SLURM_CPUS_PER_TASK": bad, "SLURM_MEM_PER_CPU": bad}
    res = detect_resources(env, local_ranks=4, **NODE)
    # CPUS_ON_NODE=8 / 4 ranks; no memory request left: node share
    assert (res.nthreads, res.memory_limit) == (2, 6 * GIB)
    if bad:
        assert f"ignored SLURM_CPUS_PER_TASK={bad!r}" in res.source


def test_slurm_mem_per_node_zero_means_whole_node():
    env = {**SLURM_MEM8000, "SLURM_MEM_PER_NODE": "0"}
    res = detect_resources(env, local_ranks=4, **NODE)
    assert res.memory_limit == 6 * GIB


def test_slurm_everything_bad_falls_back_to_cpu_count():
    env = {"SLURM_JOB_ID": "5", "SLURM_CPUS_ON_NODE": "x", "SLURM_JOB_CPUS_PER_NODE": "(x2)"}
    res = detect_resources(env, local_ranks=2, cpu_count=8, total_memory=4 * GIB)
    assert (res.nthreads, res.memory_limit, res.scheduler) == (4, 2 * GIB, "slurm")
    assert "ignored SLURM_JOB_CPUS_PER_NODE='(x2)'" in res.source


@pytest.mark.parametrize("value, expected", [
    ("16(x2),8", [16, 16, 8]),
    ("4", [4]),
    ("2,3(x3)", [2, 3, 3, 3]),
    ("36(x1)", [36]),
    ("", None),
    ("abc", None),
    ("16(x),8", None),
    ("0", None),
])
def test_parse_slurm_counts(value, expected):
    assert parse_slurm_counts(value) == expected


def test_pbs_pro_ncpus_shared_by_ranks():
    env = {"PBS_JOBID": "1234.pbs01", "NCPUS": "32", "OMP_NUM_THREADS": "32",
           "PBS_NODEFILE": "/var/spool/pbs/aux/1234.pbs01"}
    res = detect_resources(env, local_ranks=4, cpu_count=64, total_memory=256 * GIB)
    assert res == Resources(nthreads=8, memory_limit=64 * GIB, job_id="1234.pbs01",
                            scheduler="pbs",
                            source="NCPUS=32 / 4 local ranks; "
                                   f"{256 * GIB} bytes of node memory / 4 local ranks")


def test_pbs_omp_num_threads_is_per_process():
    env = {"PBS_JOBID": "77.server", "NCPUS": "none", "OMP_NUM_THREADS": "6"}
    res = detect_resources(env, local_ranks=4, cpu_count=64, total_memory=64 * GIB)
    assert (res.nthreads, res.memory_limit) == (6, 16 * GIB)
    assert "ignored NCPUS='none'" in res.source


def test_torque_ppn():
    env = {"PBS_JOBID": "567.torque", "PBS_NUM_PPN": "16", "PBS_NP": "32",
           "PBS_NUM_NODES": "2"}
    res = detect_resources(env, local_ranks=2, cpu_count=16, total_memory=32 * GIB,
                           worker_processes=2)
    assert (res.nthreads, res.memory_limit, res.scheduler) == (4, 8 * GIB, "pbs")


def test_lsf_first_host_slots():
    env = {"LSB_JOBID": "4242", "LSB_MCPU_HOSTS": "node01 8 node02 8",
           "LSB_DJOB_NUMPROC": "16", "LSB_HOSTS": "node01 " * 8 + "node02 " * 8}
    res = detect_resources(env, local_ranks=2, cpu_count=40, total_memory=192 * GIB)
    assert res == Resources(nthreads=4, memory_limit=96 * GIB, job_id="4242",
                            scheduler="lsf",
                            source="LSB_MCPU_HOSTS first host 8 slots / 2 local ranks; "
                                   f"{192 * GIB} bytes of node memory / 2 local ranks")


def test_lsf_numproc_when_hosts_list_is_bad():
    env = {"LSB_JOBID": "4243", "LSB_MCPU_HOSTS": "node01", "LSB_DJOB_NUMPROC": "6"}
    res = detect_resources(env, local_ranks=2, cpu_count=40, total_memory=8 * GIB)
    assert (res.nthreads, res.memory_limit) == (3, 4 * GIB)
    assert "ignored LSB_MCPU_HOSTS='node01'" in res.source


# Grid Engine 8.1.9 (tests/sge_cluster.py), `qsub -pe mpi 4 -l h_vmem=1G`: the job's
# variables (memory is not among them: h_vmem becomes RLIMIT_AS = 4 GiB, 1G x 4 slots)
SGE_PE4 = {
    "JOB_ID": "1", "NSLOTS": "4", "NHOSTS": "1", "NQUEUES": "1", "PE": "mpi", "QUEUE": "all.q",
    "PE_HOSTFILE": "/var/spool/gridengine/execd/localhost/active_jobs/1.1/pe_hostfile",
    "SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default", "RESTARTED": "0",
    "SGE_TASK_ID": "undefined",
}
SGE_PE4_HOSTFILE = "vm 4 all.q@vm UNDEFINED\n"


def test_sge_nslots_shared_by_ranks():
    res = detect_resources(SGE_PE4, local_ranks=2, **NODE)
    assert res == Resources(nthreads=2, memory_limit=12 * GIB, job_id="1", scheduler="sge",
                            source="NSLOTS=4 / 2 local ranks; "
                                   f"{24 * GIB} bytes of node memory / 2 local ranks")


def test_sge_h_vmem_from_address_space_limit():
    res = detect_resources(SGE_PE4, local_ranks=4, address_space_limit=4 * GIB,
                           pe_hostfile=SGE_PE4_HOSTFILE, hostname="vm", **NODE)
    assert (res.nthreads, res.memory_limit) == (1, GIB)
    assert res.source == ("PE_HOSTFILE 4 slots on vm / 4 local ranks; RLIMIT_AS (h_vmem x "
                          f"slots) {4 * GIB} bytes / 4 local ranks")
    res = detect_resources(SGE_PE4, local_ranks=2, address_space_limit=4 * GIB,
                           worker_processes=2, **NODE)
    assert (res.nthreads, res.memory_limit) == (1, GIB)


def test_sge_slots_of_this_host_from_pe_hostfile():
    env = {**SGE_PE4, "NSLOTS": "24", "NHOSTS": "2"}
    hostfile = ("n01.cluster 16 all.q@n01.cluster UNDEFINED\n"
                "n02.cluster 6 all.q@n02.cluster UNDEFINED\n"
                "n02.cluster 2 long.q@n02.cluster UNDEFINED\n")
    assert parse_pe_hostfile(hostfile) == [("n01.cluster", 16), ("n02.cluster", 8)]
    for host, threads in (("n01", 4), ("n02.cluster", 2)):
        res = detect_resources(env, local_ranks=4, pe_hostfile=hostfile, hostname=host,
                               cpu_count=16, total_memory=64 * GIB)
        assert res.nthreads == threads, res.source
    # no hostfile text: NSLOTS spread evenly over NHOSTS
    res = detect_resources(env, local_ranks=4, cpu_count=16, total_memory=64 * GIB)
    assert res.nthreads == 3
    assert "NSLOTS=24 / NHOSTS=2 / 4 local ranks" in res.source


def test_sge_bad_hostfile_or_unknown_host_falls_back_to_nslots():
    res = detect_resources(SGE_PE4, local_ranks=2, pe_hostfile="vm four all.q\n",
                           hostname="vm", **NODE)
    assert res.nthreads == 2
    assert "ignored PE_HOSTFILE 'vm four all.q'" in res.source
    res = detect_resources(SGE_PE4, local_ranks=2, pe_hostfile=SGE_PE4_HOSTFILE,
                           hostname="elsewhere", **NODE)
    assert res.nthreads == 2 and "elsewhere not in PE_HOSTFILE" in res.source
    res = detect_resources({**SGE_PE4, "NSLOTS": "x"}, local_ranks=2, **NODE)
    assert (res.nthreads, res.scheduler) == (1, "sge")  # 2 cpus / 2 ranks
    assert "ignored NSLOTS='x'" in res.source


def test_job_id_alone_is_not_grid_engine():
    assert not is_grid_engine({"JOB_ID": "5"})
    assert is_grid_engine({"JOB_ID": "5", "SGE_ROOT": "/opt/sge"})
    res = detect_resources({"JOB_ID": "5", "NSLOTS": "8"}, local_ranks=1, **NODE)
    assert (res.scheduler, res.job_id, res.nthreads) == ("none", None, 2)


@pytest.mark.parametrize("env", [
    {"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "4", "MPI_LOCALRANKID": "1"},
    {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"},
])
def test_plain_mpi(env):
    res = detect_resources(env, local_ranks=4, cpu_count=2, total_memory=24 * GIB)
    assert res == Resources(nthreads=1, memory_limit=6 * GIB, job_id=None, scheduler="mpi",
                            source=f"2 cpus / 4 local ranks; {24 * GIB} bytes of node "
                                   "memory / 4 local ranks")


def test_no_batch_system():
    res = detect_resources({"HOME": "/root"}, local_ranks=1, cpu_count=8,
                           total_memory=16 * GIB, worker_processes=3)
    assert (res.nthreads, res.memory_limit, res.scheduler, res.job_id) == (
        2, 16 * GIB // 3, "none", None)


def test_unknown_machine_size():
    res = detect_resources({}, local_ranks=2, cpu_count=0, total_memory=0)
    assert (res.nthreads, res.memory_limit) == (1, None)


def test_resources_is_frozen():
    res = detect_resources({}, local_ranks=1, cpu_count=1, total_memory=GIB)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.nthreads = 3


@pytest.mark.parametrize("name", ["resources", "launchers"])
def test_module_imports_only_stdlib(name):
    """The rank reads its resources and its launcher before it imports anything heavy:
    these modules import the standard library, and resources its neighbour launchers and
    the Record base (both standard library only)."""
    path = Path(__file__).parents[1] / "dask_mpi_launch" / "hpc" / f"{name}.py"
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            if name != "resources" or node.module not in ("dask_mpi_launch.hpc.launchers",
                                                          "dask_mpi_launch.base.record"):
                imported.add(node.module.split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names), imported
