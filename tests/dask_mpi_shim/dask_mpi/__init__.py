"""dask-mpi's module name over dask-mpi-launch: what a user's one-line import change does.
Used by tests/test_dask_mpi_compat.py to run dask-mpi's own tests against this package."""
from dask_mpi_launch import WorldTooSmallException, execute, initialize, send_close_signal

__version__ = "2026.3.0"
__all__ = ["execute", "initialize", "send_close_signal", "WorldTooSmallException"]
