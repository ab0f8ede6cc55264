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


class ConfigFileError(UsageError):
    """A dask config file (``DASK_CONFIG``, ``~/.config/dask``...) that cannot be read."""

    @classmethod
    def from_dask(cls, e: ValueError) -> "ConfigFileError | None":
        """One line from dask's ``ValueError("A dask config file at 'P' is malformed,
        original error message:\n\n<YAML's, 8 lines>")``; None for any other error."""
        text = str(e)
        if not text.startswith("A dask config file at "):
            return None
        path = text[len("A dask config file at "):].split(" is malformed", 1)[0].strip("'\"")
        yaml_error = e.__context__  # dask raised it "from None": still here
        problem = getattr(yaml_error, "problem", None)
        mark = getattr(yaml_error, "problem_mark", None)
        if problem:
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            why = f"is not valid YAML ({problem}{where})"
        elif " - " in text and "\n" not in text:
            why = "is not a mapping of settings (" + text.split(" - ", 1)[1] + ")"
        else:
            why = "is not valid YAML (" + " ".join(text.split("\n\n", 1)[-1].split()) + ")"
        return cls(f"the dask config file {path} {why}: fix it, or move it out of "
                   "DASK_CONFIG / ~/.config/dask")


class WorldTooSmallError(UsageError):
    """Fewer MPI ranks than the layout needs."""


# dask-mpi's name, so ``except WorldTooSmallException`` keeps working after migrating.
WorldTooSmallException = WorldTooSmallError
