"""Threads and memory per Dask worker process, from the batch system's environment.

Pure: stdlib only, reads nothing but the mapping it is given.

Variables read (and only these):

Slurm (``SLURM_JOB_ID``), memory values in MiB (Slurm's "MB")
    - *threads*: ``SLURM_CPUS_PER_TASK``; else ``SLURM_CPUS_ON_NODE`` / local ranks; else
      the first node of ``SLURM_JOB_CPUS_PER_NODE`` ("16(x2),8" -> 16) / local ranks.
    - *memory*: ``SLURM_MEM_PER_CPU`` x cpus of the rank; else ``SLURM_MEM_PER_NODE`` / local
      ranks (0 means "the whole node": ignored).  Inside an ``srun`` step SLURM_CPUS_ON_NODE
      and SLURM_MEM_PER_NODE are still the job's per node values (checked on Slurm 22.05), so
      dividing by the ranks on the node is right.

PBS Pro / OpenPBS / Torque (``PBS_JOBID``)
    - *threads*: ``NCPUS`` / local ranks (PBS sets NCPUS to the chunk's ``ompthreads``, which
      defaults to the chunk's ``ncpus``); else ``OMP_NUM_THREADS`` (set by PBS the same way,
      per process); else Torque's ``PBS_NUM_PPN`` / local ranks.
    - *memory*: PBS exports no memory variable: share of the node's memory.

LSF (``LSB_JOBID``)
    - *threads*: first host's slots in ``LSB_MCPU_HOSTS`` ("hostA 4 hostB 4") / local ranks;
      else ``LSB_DJOB_NUMPROC`` (slots of the whole job) / local ranks.
    - *memory*: LSF exports no memory limit variable (the -R rusage string's units depend on
      the site's LSF_UNIT_FOR_LIMITS): share of the node's memory.

Grid Engine (``JOB_ID`` with ``SGE_ROOT``, ``SGE_CELL``, ``PE_HOSTFILE`` or ``SGE_JOB_SPOOL_DIR``)
    - *threads*: slots of the job on this host / local ranks: from the text of
      ``$PE_HOSTFILE`` (``pe_hostfile=``, lines "host slots queue processors") for
      ``hostname=``; else ``NSLOTS`` when ``NHOSTS`` is 1 (or unset); else ``NSLOTS`` /
      ``NHOSTS``.
    - *memory*: Grid Engine exports no memory variable: ``h_vmem`` (per slot) becomes the
      soft RLIMIT_AS of every process of the job, multiplied by the job's slots on the host
      (``qsub -pe mpi 4 -l h_vmem=1G``: 4 GiB).  Pass it as ``address_space_limit=`` (bytes,
      0 = none): each rank gets that / local ranks.

MPI launcher only, or nothing
    ``cpu_count // local_ranks`` threads and ``total_memory // local_ranks`` bytes.

A memory figure from the batch system is capped at the rank's share of ``total_memory``
(physical), so a node configured with more memory than it has cannot overcommit.  Threads
are not capped: the batch system's CPU allocation is the truth.  Values that are not
positive integers are ignored (and said so in ``source``), never raised.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dask_mpi_launch.hpc.launchers import is_grid_engine

MIB = 1024 * 1024

# set by MPI launchers (MPICH Hydra, Open MPI/PRRTE, PMIx): tells "mpi" from "none"
_MPI_MARKERS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class Resources:
    """What the batch job gives each worker process (frozen; a plain class, as
    ``dataclasses`` costs every thin rank ~100 file look-ups)."""

    __slots__ = ("nthreads", "memory_limit", "job_id", "scheduler", "source")
    nthreads: int  # threads per worker process, >= 1
    memory_limit: int | None  # bytes per worker process; None = let Dask decide
    job_id: str | None
    scheduler: str  # "slurm" | "pbs" | "lsf" | "sge" | "mpi" | "none"
    source: str  # how the numbers were found, e.g. "SLURM_CPUS_PER_TASK=2; ..."

    def __init__(self, nthreads: int, memory_limit: int | None, job_id: str | None,
                 scheduler: str, source: str):
        for name, value in zip(self.__slots__,
                               (nthreads, memory_limit, job_id, scheduler, source)):
            object.__setattr__(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self):
        return hash(self._values())

    def __repr__(self) -> str:
        return "Resources(" + ", ".join(f"{n}={getattr(self, n)!r}"
                                        for n in self.__slots__) + ")"

    def __setattr__(self, name, value):
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        from dataclasses import FrozenInstanceError

        raise FrozenInstanceError(f"cannot delete field {name!r}")


class _Reader:
    """Reads positive integers from env, remembering what it used and what it rejected."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.notes: list[str] = []

    def int(self, name: str) -> int | None:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            value = 0
        if value <= 0:
            self.notes.append(f"ignored {name}={raw!r}")
            return None
        return value

    def first_count(self, name: str, parse) -> int | None:
        raw = self.env.get(name)
        if not raw:
            return None
        value = parse(raw)
        if value is None:
            self.notes.append(f"ignored {name}={raw!r}")
        return value


def parse_slurm_counts(value: str) -> list[int] | None:
    """Expand Slurm's compressed per-node counts: "16(x2),8" -> [16, 16, 8]; None if bad."""
    counts: list[int] = []
    for part in value.strip().split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", part)
        if not m or int(m.group(1)) <= 0:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts or None


def _first_slurm_count(value: str) -> int | None:
    counts = parse_slurm_counts(value)
    return counts[0] if counts else None


def _first_lsf_host_slots(value: str) -> int | None:
    """LSB_MCPU_HOSTS "hostA 4 hostB 2" -> 4."""
    fields = value.split()
    if len(fields) < 2 or len(fields) % 2 or not fields[1].isdigit() or int(fields[1]) <= 0:
        return None
    return int(fields[1])


def _short(host: str) -> str:
    return host.strip().split(".")[0].lower()


def parse_pe_hostfile(text: str) -> list[tuple[str, int]] | None:
    """Grid Engine's $PE_HOSTFILE, "host slots queue processors" a line -> [(host, slots)].

    A host may appear once per queue: its slots are added up.  None if a line is bad.
    """
    slots: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) <= 0:
            return None
        slots[fields[0]] = slots.get(fields[0], 0) + int(fields[1])
    return list(slots.items()) or None




def detect_resources(
    env: Mapping[str, str],
    *,
    local_ranks: int,
    cpu_count: int,
    total_memory: int,
    worker_processes: int = 1,
    pe_hostfile: str | None = None,
    hostname: str | None = None,
    address_space_limit: int = 0,
) -> Resources:
    """Threads and memory for each of ``worker_processes`` Dask worker processes of one rank.

    ``local_ranks`` is the number of ranks of this job on this node (pass 0 if unknown: it
    is then taken from the first node of SLURM_STEP_TASKS_PER_NODE (inside srun), else
    SLURM_TASKS_PER_NODE, else SLURM_NTASKS_PER_NODE, else 1).
    ``cpu_count`` and ``total_memory`` (bytes) describe the node (0 = unknown).
    Grid Engine only: ``pe_hostfile`` is the text of the file ``$PE_HOSTFILE`` names and
    ``hostname`` this host's name (slots on this host); ``address_space_limit`` is this
    process's soft RLIMIT_AS in bytes (0 = unlimited), which is how h_vmem reaches a job.
    """
    r = _Reader(env)
    used: list[str] = []
    threads: int | None = None  # per rank
    memory: int | None = None  # bytes per rank

    if local_ranks <= 0:
        local_ranks = (r.first_count("SLURM_STEP_TASKS_PER_NODE", _first_slurm_count)
                       or r.first_count("SLURM_TASKS_PER_NODE", _first_slurm_count)
                       or r.int("SLURM_NTASKS_PER_NODE") or 1)
        used.append(f"{local_ranks} local ranks from the environment")
    ranks = local_ranks

    def per_rank(name: str, value: int | None) -> int | None:
        if value is None:
            return None
        used.append(f"{name}={env[name].strip()} / {ranks} local ranks")
        return max(1, value // ranks)

    if env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID"):
        scheduler, job_id = "slurm", env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        threads = r.int("SLURM_CPUS_PER_TASK")
        if threads:
            used.append(f"SLURM_CPUS_PER_TASK={threads}")
        else:
            threads = (per_rank("SLURM_CPUS_ON_NODE", r.int("SLURM_CPUS_ON_NODE"))
                       or per_rank("SLURM_JOB_CPUS_PER_NODE",
                                   r.first_count("SLURM_JOB_CPUS_PER_NODE", _first_slurm_count)))
        mem_per_cpu = r.int("SLURM_MEM_PER_CPU")
        mem_per_node = r.int("SLURM_MEM_PER_NODE")
        if mem_per_cpu:
            cpus = threads or max(1, cpu_count // ranks)
            memory = mem_per_cpu * cpus * MIB
            used.append(f"SLURM_MEM_PER_CPU={mem_per_cpu} MiB x {cpus} cpus")
        elif mem_per_node:
            memory = mem_per_node * MIB // ranks
            used.append(f"SLURM_MEM_PER_NODE={mem_per_node} MiB / {ranks} local ranks")
    elif env.get("PBS_JOBID"):
        scheduler, job_id = "pbs", env["PBS_JOBID"]
        threads = per_rank("NCPUS", r.int("NCPUS"))
        if threads is None:
            threads = r.int("OMP_NUM_THREADS")
            if threads:
                used.append(f"OMP_NUM_THREADS={threads}")
            else:
                threads = per_rank("PBS_NUM_PPN", r.int("PBS_NUM_PPN"))
    elif env.get("LSB_JOBID"):
        scheduler, job_id = "lsf", env["LSB_JOBID"]
        slots = r.first_count("LSB_MCPU_HOSTS", _first_lsf_host_slots)
        if slots:
            used.append(f"LSB_MCPU_HOSTS first host {slots} slots / {ranks} local ranks")
            threads = max(1, slots // ranks)
        else:
            threads = per_rank("LSB_DJOB_NUMPROC", r.int("LSB_DJOB_NUMPROC"))
    elif is_grid_engine(env):
        scheduler, job_id = "sge", env["JOB_ID"]
        host_slots = None
        if pe_hostfile is not None and hostname:
            hosts = parse_pe_hostfile(pe_hostfile)
            if hosts is None:
                r.notes.append(f"ignored PE_HOSTFILE {pe_hostfile.strip()[:80]!r}")
            else:
                host_slots = dict((_short(h), n) for h, n in hosts).get(_short(hostname))
                if host_slots:
                    used.append(f"PE_HOSTFILE {host_slots} slots on {hostname} "
                                f"/ {ranks} local ranks")
                else:
                    r.notes.append(f"{hostname} not in PE_HOSTFILE")
        if host_slots is None:
            nslots, nhosts = r.int("NSLOTS"), r.int("NHOSTS") or 1
            if nslots:
                host_slots = max(1, nslots // nhosts)
                used.append(f"NSLOTS={nslots}" + (f" / NHOSTS={nhosts}" if nhosts > 1 else "")
                            + f" / {ranks} local ranks")
        if host_slots:
            threads = max(1, host_slots // ranks)
        if address_space_limit > 0:
            memory = address_space_limit // ranks
            used.append(f"RLIMIT_AS (h_vmem x slots) {address_space_limit} bytes "
                        f"/ {ranks} local ranks")
    else:
        scheduler = "mpi" if any(env.get(k) for k in _MPI_MARKERS) else "none"
        job_id = None

    if threads is None:
        threads = max(1, cpu_count // ranks) if cpu_count > 0 else 1
        used.append(f"{cpu_count} cpus / {ranks} local ranks")
    share = total_memory // ranks if total_memory > 0 else None
    if memory is None:
        memory = share
        if share is not None:
            used.append(f"{total_memory} bytes of node memory / {ranks} local ranks")
    elif share is not None and memory > share:
        used.append(f"capped at the node share {share} bytes")
        memory = share

    if worker_processes > 1:
        threads = max(1, threads // worker_processes)
        memory = memory // worker_processes if memory is not None else None
        used.append(f"/ {worker_processes} worker processes")

    return Resources(
        nthreads=threads,
        memory_limit=memory,
        job_id=job_id,
        scheduler=scheduler,
        source="; ".join(used + r.notes),
    )
