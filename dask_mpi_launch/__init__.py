"""dask-mpi-launch: a Dask cluster on the ranks of an MPI job, in one line.

Importing this package is light: it imports neither mpi4py nor distributed, so MPI is
always initialized first, when :func:`initialize` or the command line starts. The
functions below are imported where first used (a thin rank of the command line needs
none of them).
"""
__version__ = "0.1.0"

from dask_mpi_launch.base.errors import LaunchError, UsageError, WorldTooSmallError, WorldTooSmallException  # noqa: E402

_LAZY = {
    "initialize": "dask_mpi_launch.bootstrap",
    "send_close_signal": "dask_mpi_launch.bootstrap",
    "execute": "dask_mpi_launch.execute",
    "connect": "dask_mpi_launch.security.credentials",
    "time_left": "dask_mpi_launch.hpc.time_limit",
    "on_time_limit": "dask_mpi_launch.hpc.time_limit",
    "TimeLimitReached": "dask_mpi_launch.hpc.time_limit",
}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "initialize",
    "execute",
    "send_close_signal",
    "connect",
    "time_left",
    "on_time_limit",
    "TimeLimitReached",
    "LaunchError",
    "UsageError",
    "WorldTooSmallError",
    "WorldTooSmallException",
    "__version__",
]
