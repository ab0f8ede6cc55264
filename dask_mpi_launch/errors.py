"""Errors that end a launch with one clear line and a chosen exit status."""
from __future__ import annotations


class LaunchError(Exception):
    """A failure to report as one line (no traceback), ending the job with ``status``."""

    status = 1

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(LaunchError):
    """Bad input: an option, a script, the world size. Exit status 2."""

    status = 2


class WorldTooSmallError(UsageError):
    """Fewer MPI ranks than the layout needs."""


# dask-mpi's name, so ``except WorldTooSmallException`` keeps working after migrating.
WorldTooSmallException = WorldTooSmallError
