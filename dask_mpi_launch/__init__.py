"""dask-mpi-launch: a Dask cluster on the ranks of an MPI job, in one line.

Importing this package is light: it imports neither mpi4py nor distributed, so MPI is
always initialized first, when :func:`initialize` or the command line starts.
"""
__version__ = "0.1.0"

from .bootstrap import initialize, send_close_signal  # noqa: E402
from .execute import execute  # noqa: E402
from .security import connect  # noqa: E402
from .errors import LaunchError, UsageError, WorldTooSmallError, WorldTooSmallException  # noqa: E402

__all__ = [
    "initialize",
    "execute",
    "send_close_signal",
    "connect",
    "LaunchError",
    "UsageError",
    "WorldTooSmallError",
    "WorldTooSmallException",
    "__version__",
]
