"""Exit statuses and the one way we say things: every "error -> status" decision lives here.

A job ends with exactly one status, decided in one place (:class:`Outcome`), the way
mpi4py's ``run.py`` does it: the ranks propose ``(priority, status)`` pairs and the highest
priority wins, the first proposal among equals.

========== =================================================================
priority   what ended the job
========== =================================================================
FAILED     a role could not start, or died; a rank did not answer in time
SCRIPT     the client script ended: its own status (``sys.exit``, exception)
SIGNALLED  SIGTERM/SIGINT (scancel, walltime, Ctrl-C): 128 + the signal
NORMAL     a cluster-only job closed by its client
========== =================================================================

A job that ends itself before its time limit (process/deadline.py) ends with
:data:`TIME_LIMIT`, 124 as coreutils' ``timeout``: at SIGNALLED priority when the job is
stopped at ``end - teardown`` (the script's own status after that is not its own doing), as
the script's status when it let the warning (``TimeLimitReached``) end it. A batch script
tests ``[ $? -eq 124 ]`` to resubmit.

Statuses of processes come from their POSIX wait status (:class:`Ended`): a script that
calls ``sys.exit(137)`` *exited* with 137, it was not killed by signal 9.
"""
from __future__ import annotations

import os
import signal
import sys

from dask_mpi_launch.base.record import Record

PREFIX = "dask-mpi-launch"

NORMAL, SIGNALLED, SCRIPT, FAILED = 0, 1, 2, 3

TIME_LIMIT = 124  # the job ended itself before its allocation's end (coreutils' timeout)


def say(message: str) -> None:
    """One line on stderr, with our prefix; the only way this package talks to users."""
    print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)


def say_error(message: str) -> None:
    say(f"error: {message}")


def exit_status(e: SystemExit, *, show: bool = True) -> int:
    """The process status CPython gives for ``SystemExit(e.code)``: None is 0, an int is
    itself (modulo 256), anything else is printed (``show``) and is 1."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    if isinstance(code, bool):
        return int(code)
    if show:
        print(code, file=sys.stderr, flush=True)
    return 1


def signal_status(signum: int) -> int:
    """A shell's status for a job ended by ``signum``."""
    return 128 + int(signum)


class Ended(Record):
    """How a process ended, from its wait status: ``exited`` with a status, or killed by
    ``signal``."""

    exited: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait(cls, raw: int) -> "Ended":
        if os.WIFSIGNALED(raw):
            return cls(signal=os.WTERMSIG(raw))
        return cls(exited=os.WEXITSTATUS(raw))

    @property
    def status(self) -> int:
        """The status to pass on: the exit status, or 128 + the signal."""
        return self.exited if self.signal is None else signal_status(self.signal)

    @property
    def ok(self) -> bool:
        return self.exited == 0

    @property
    def crashed(self) -> bool:
        """Killed by a signal that means the process died, not that it was asked to stop."""
        return self.signal in (signal.SIGKILL, signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT,
                               signal.SIGILL, signal.SIGFPE)

    def describe(self) -> str:
        """'exited with status 3' or 'was killed by signal 9 (SIGKILL)'."""
        if self.signal is None:
            return f"exited with status {self.exited}"
        try:
            name = f" ({signal.Signals(self.signal).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {self.signal}{name}"


class Outcome:
    """The job's status as this rank knows it: the highest-priority proposal wins."""

    def __init__(self):
        self.priority: int | None = None
        self.status = 0

    @property
    def decided(self) -> bool:
        return self.priority is not None

    def propose(self, status: int, priority: int) -> bool:
        """Take ``status`` if it outranks what is known; True if this is the first one."""
        first = self.priority is None
        if first or priority > self.priority:
            self.priority, self.status = priority, int(status) & 0xFF
        return first

    def encode(self) -> int:
        """One integer whose maximum over all ranks is the job's outcome."""
        return (self.priority or NORMAL) * 256 + self.status

    @staticmethod
    def decode(value: int) -> int:
        """The status of an :meth:`encode`-d maximum."""
        return value % 256

    def on_signal(self, signum: int, has_client: bool) -> int:
        """A job signalled with a client ends with 128+N; a cluster-only job with 0
        (shutting it down is how such a job ends)."""
        return signal_status(signum) if has_client else 0
