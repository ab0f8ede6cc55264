"""What the launchers tell each process before ``MPI_Init``: one table, read in one place.

Every MPI launcher and batch system names the same few facts differently. This module is
the only one that knows their variables; the rest of the package asks it:

=============  ===================  =====================  ==========================  =========================  =============  ==============
launcher       rank                 size                   local rank                  local size                 node id        job id
=============  ===================  =====================  ==========================  =========================  =============  ==============
MPICH/Hydra    PMI_RANK             PMI_SIZE               MPI_LOCALRANKID             MPI_LOCALNRANKS
Open MPI/PRRTE OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE   OMPI_COMM_WORLD_LOCAL_RANK  OMPI_COMM_WORLD_LOCAL_SIZE
PMIx           PMIX_RANK                                   PMIX_LOCAL_RANK             PMIX_LOCAL_SIZE                           PMIX_NAMESPACE
MVAPICH        MV2_COMM_WORLD_RANK  MV2_COMM_WORLD_SIZE    MV2_COMM_WORLD_LOCAL_RANK   MV2_COMM_WORLD_LOCAL_SIZE
Cray ALPS/PALS ALPS_APP_PE, PALS_RANKID                    PALS_LOCAL_RANKID
Slurm (srun)   SLURM_PROCID         SLURM_NTASKS           SLURM_LOCALID               SLURM_STEP_TASKS_PER_NODE  SLURM_NODEID   SLURM_JOB_ID
Grid Engine                                                                                                                      JOB_ID
PBS                                                                                                                              PBS_JOBID
LSF                                                                                                                              LSB_JOBID
=============  ===================  =====================  ==========================  =========================  =============  ==============

The MPI launcher's own variables win over the batch system's: ``mpiexec`` inside an
allocation sees ``SLURM_PROCID`` of the batch step, not of its ranks. Slurm's per-node task
counts are compressed (``2(x3),1``): :func:`local_rank` expands them and picks this node's.
Grid Engine's ``JOB_ID`` is a common name, so it counts only beside ``SGE_ROOT``,
``SGE_CELL``, ``PE_HOSTFILE`` or ``SGE_JOB_SPOOL_DIR``. Imports only the standard library.
"""
from __future__ import annotations

import os
import re

#: rank, in the order they are trusted
RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK",
        "SLURM_PROCID", "ALPS_APP_PE", "PALS_RANKID")
SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")
#: (local rank, local size): the MPI launchers' pairs, then Slurm's
LOCAL = (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
         ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
         ("PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
         ("MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
         ("SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"))
NODE = ("SLURM_NODEID",)
JOB = ("SLURM_JOB_ID", "SLURM_JOBID", "PBS_JOBID", "LSB_JOBID")
_GRID_ENGINE_MARKS = ("SGE_ROOT", "SGE_CELL", "PE_HOSTFILE", "SGE_JOB_SPOOL_DIR")

#: every variable that names one process rather than the job: ranks that differ only in
#: these parse the same command line to the same settings (the node zygote parses once)
PER_RANK = frozenset({
    *RANK, *(rank for rank, _ in LOCAL), "PMI_FD", "PMI_ID", "PMI_LOCAL_RANK",
    "OMPI_COMM_WORLD_NODE_RANK", "OMPI_FILE_LOCATION", "PMIX_ID", "SLURM_TASK_PID",
    "PALS_LOCAL_RANKID",
})


def _int(env, key) -> int | None:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        return None


def _first(env, keys) -> int | None:
    for key in keys:
        value = _int(env, key)
        if value is not None:
            return value
    return None


def rank(env=os.environ) -> int:
    """This process's rank as the launcher announced it (0 when not launched by one)."""
    found = _first(env, RANK)
    return 0 if found is None else found


def size(env=os.environ) -> int | None:
    """The number of ranks as the launcher announced it, or None."""
    return _first(env, SIZE)


def parse_slurm_counts(value: str) -> list[int] | None:
    """Expand Slurm's compressed per-node counts: "16(x2),8" -> [16, 16, 8]; None if bad."""
    counts: list[int] = []
    for part in value.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m or int(m.group(1)) <= 0:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts or None


def _slurm_local_size(env, value: str) -> int:
    counts = parse_slurm_counts(value)
    if counts is None:
        raise ValueError(value)
    node = _int(env, "SLURM_NODEID")
    return counts[node] if node is not None and 0 <= node < len(counts) else counts[0]


def local_rank(env=os.environ) -> tuple[int, int] | None:
    """(local rank, ranks on this node) as the launcher tells it, or None."""
    for rank_key, size_key in LOCAL + (("SLURM_LOCALID", "SLURM_TASKS_PER_NODE"),):
        local = _int(env, rank_key)
        if local is None or size_key not in env:
            continue
        try:
            n = (_slurm_local_size(env, env[size_key]) if size_key.startswith("SLURM")
                 else int(env[size_key]))
        except ValueError:
            continue
        return local, n
    return None


def local_size(env=os.environ) -> int:
    """How many ranks of this job share this host, as the MPI launcher tells it (0: unknown,
    left to the batch system's own variables, see ``hpc.resources``)."""
    for _, key in LOCAL[:-1]:
        value = _int(env, key)
        if value is not None:
            return max(1, value)
    return 0


def node_id(env=os.environ) -> int | None:
    """This node's index in the allocation (Slurm), or None."""
    return _first(env, NODE)


def is_grid_engine(env=os.environ) -> bool:
    """JOB_ID alone is too common a name: Grid Engine also sets SGE_ROOT/SGE_CELL/PE_HOSTFILE."""
    return bool(env.get("JOB_ID")) and any(env.get(k) for k in _GRID_ENGINE_MARKS)


def job_id(env=os.environ) -> str | None:
    """The batch job's id (Slurm, PBS, LSF, Grid Engine), or None outside a batch job."""
    for key in JOB:
        if env.get(key):
            return env[key]
    return env["JOB_ID"] if is_grid_engine(env) else None


def launch_id(env=os.environ) -> str:
    """What names this launch of the job on every node: PMIx's namespace (one per
    ``mpiexec``), else the Slurm job id, else empty."""
    return env.get("PMIX_NAMESPACE") or env.get("SLURM_JOB_ID", "")
