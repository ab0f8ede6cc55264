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

from collections.abc import Mapping

from dask_mpi_launch.base.record import Record
from dask_mpi_launch.hpc.launchers import is_grid_engine, parse_slurm_counts

MIB = 1024 * 1024

# set by MPI launchers (MPICH Hydra, Open MPI/PRRTE, PMIx): tells "mpi" from "none"
_MPI_MARKERS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


class Resources(Record):
    """What the batch job gives each worker process (frozen; a ``Record``, as
    ``dataclasses`` costs every thin rank ~100 file look-ups)."""

    nthreads: int  # threads per worker process, >= 1
    memory_limit: int | None  # bytes per worker process; None = let Dask decide
    job_id: str | None
    scheduler: str  # "slurm" | "pbs" | "lsf" | "sge" | "mpi" | "none"
    source: str  # how the numbers were found, e.g. "SLURM_CPUS_PER_TASK=2; ..."


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




class _Job:
    """What the readers below fill in for one rank: threads and memory (bytes) per rank,
    and what they used to decide (``used``, shown as the banner's source)."""

    def __init__(self, reader: _Reader, ranks: int, used: list[str]):
        self.env, self.r, self.ranks, self.used = reader.env, reader, ranks, used
        self.threads: int | None = None
        self.memory: int | None = None

    def per_rank(self, name: str, value: int | None) -> int | None:
        if value is None:
            return None
        self.used.append(f"{name}={self.env[name].strip()} / {self.ranks} local ranks")
        return max(1, value // self.ranks)

    def say(self, text: str) -> None:
        self.used.append(text)


def _slurm(job: _Job, cpu_count: int, **_) -> str | None:
    r = job.r
    threads = r.int("SLURM_CPUS_PER_TASK")
    if threads:
        job.say(f"SLURM_CPUS_PER_TASK={threads}")
    else:
        threads = (job.per_rank("SLURM_CPUS_ON_NODE", r.int("SLURM_CPUS_ON_NODE"))
                   or job.per_rank("SLURM_JOB_CPUS_PER_NODE",
                                   r.first_count("SLURM_JOB_CPUS_PER_NODE", _first_slurm_count)))
    job.threads = threads
    mem_per_cpu = r.int("SLURM_MEM_PER_CPU")
    mem_per_node = r.int("SLURM_MEM_PER_NODE")
    if mem_per_cpu:
        cpus = threads or max(1, cpu_count // job.ranks)
        job.memory = mem_per_cpu * cpus * MIB
        job.say(f"SLURM_MEM_PER_CPU={mem_per_cpu} MiB x {cpus} cpus")
    elif mem_per_node:
        job.memory = mem_per_node * MIB // job.ranks
        job.say(f"SLURM_MEM_PER_NODE={mem_per_node} MiB / {job.ranks} local ranks")
    return job.env.get("SLURM_JOB_ID") or job.env.get("SLURM_JOBID")


def _pbs(job: _Job, **_) -> str:
    r = job.r
    job.threads = job.per_rank("NCPUS", r.int("NCPUS"))
    if job.threads is None:
        job.threads = r.int("OMP_NUM_THREADS")
        if job.threads:
            job.say(f"OMP_NUM_THREADS={job.threads}")
        else:
            job.threads = job.per_rank("PBS_NUM_PPN", r.int("PBS_NUM_PPN"))
    return job.env["PBS_JOBID"]


def _lsf(job: _Job, **_) -> str:
    slots = job.r.first_count("LSB_MCPU_HOSTS", _first_lsf_host_slots)
    if slots:
        job.say(f"LSB_MCPU_HOSTS first host {slots} slots / {job.ranks} local ranks")
        job.threads = max(1, slots // job.ranks)
    else:
        job.threads = job.per_rank("LSB_DJOB_NUMPROC", job.r.int("LSB_DJOB_NUMPROC"))
    return job.env["LSB_JOBID"]


def _sge_host_slots(job: _Job, pe_hostfile: str | None, hostname: str | None) -> int | None:
    """This host's slots: from the PE_HOSTFILE's line for it, else NSLOTS / NHOSTS."""
    if pe_hostfile is not None and hostname:
        hosts = parse_pe_hostfile(pe_hostfile)
        if hosts is None:
            job.r.notes.append(f"ignored PE_HOSTFILE {pe_hostfile.strip()[:80]!r}")
        else:
            host_slots = dict((_short(h), n) for h, n in hosts).get(_short(hostname))
            if host_slots:
                job.say(f"PE_HOSTFILE {host_slots} slots on {hostname} / {job.ranks} local ranks")
                return host_slots
            job.r.notes.append(f"{hostname} not in PE_HOSTFILE")
    nslots, nhosts = job.r.int("NSLOTS"), job.r.int("NHOSTS") or 1
    if not nslots:
        return None
    job.say(f"NSLOTS={nslots}" + (f" / NHOSTS={nhosts}" if nhosts > 1 else "")
            + f" / {job.ranks} local ranks")
    return max(1, nslots // nhosts)


def _sge(job: _Job, pe_hostfile=None, hostname=None, address_space_limit=0, **_) -> str:
    host_slots = _sge_host_slots(job, pe_hostfile, hostname)
    if host_slots:
        job.threads = max(1, host_slots // job.ranks)
    if address_space_limit > 0:
        job.memory = address_space_limit // job.ranks
        job.say(f"RLIMIT_AS (h_vmem x slots) {address_space_limit} bytes "
                f"/ {job.ranks} local ranks")
    return job.env["JOB_ID"]


#: (batch system, is this job one of its, its reader), in the order they are trusted
_BATCH_SYSTEMS = (
    ("slurm", lambda env: bool(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")), _slurm),
    ("pbs", lambda env: bool(env.get("PBS_JOBID")), _pbs),
    ("lsf", lambda env: bool(env.get("LSB_JOBID")), _lsf),
    ("sge", is_grid_engine, _sge),
)


def _local_ranks(r: _Reader, used: list[str]) -> int:
    """Ranks on this node from the batch system, when the MPI launcher did not say."""
    ranks = (r.first_count("SLURM_STEP_TASKS_PER_NODE", _first_slurm_count)
             or r.first_count("SLURM_TASKS_PER_NODE", _first_slurm_count)
             or r.int("SLURM_NTASKS_PER_NODE") or 1)
    used.append(f"{ranks} local ranks from the environment")
    return ranks


def _node_defaults(job: _Job, cpu_count: int, total_memory: int) -> None:
    """Where the batch system said nothing: the node's cpus and memory, shared by its
    ranks; memory it gave beyond the node's share is capped at that share."""
    ranks = job.ranks
    if job.threads is None:
        job.threads = max(1, cpu_count // ranks) if cpu_count > 0 else 1
        job.say(f"{cpu_count} cpus / {ranks} local ranks")
    share = total_memory // ranks if total_memory > 0 else None
    if job.memory is None:
        job.memory = share
        if share is not None:
            job.say(f"{total_memory} bytes of node memory / {ranks} local ranks")
    elif share is not None and job.memory > share:
        job.say(f"capped at the node share {share} bytes")
        job.memory = share


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
    One reader per batch system (:data:`_BATCH_SYSTEMS`), the first whose job this is.
    """
    used: list[str] = []
    reader = _Reader(env)
    if local_ranks <= 0:
        local_ranks = _local_ranks(reader, used)
    job = _Job(reader, local_ranks, used)
    scheduler, job_id = "mpi" if any(env.get(k) for k in _MPI_MARKERS) else "none", None
    for name, applies, read in _BATCH_SYSTEMS:
        if applies(env):
            scheduler = name
            job_id = read(job, cpu_count=cpu_count, pe_hostfile=pe_hostfile,
                          hostname=hostname, address_space_limit=address_space_limit)
            break
    _node_defaults(job, cpu_count, total_memory)
    threads, memory = job.threads, job.memory
    if worker_processes > 1:
        threads = max(1, threads // worker_processes)
        memory = memory // worker_processes if memory is not None else None
        used.append(f"/ {worker_processes} worker processes")
    return Resources(nthreads=threads, memory_limit=memory, job_id=job_id,
                     scheduler=scheduler, source="; ".join(used + job.r.notes))
