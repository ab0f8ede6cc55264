"""Role processes: forked from a rank after its imports, watched by the rank.

A rank never runs Dask or the user's script itself: it forks a child per role (after
``mpi4py`` and ``distributed`` are imported, before any thread or event loop starts, so the
child imports nothing again) and stays free to watch its children, read MPI messages and
handle signals. A child reports through a pipe with JSON lines (``address``, ``ready``,
``error``) and its exit status; it dies with its rank (``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings


class Channel:
    """The child's end of the pipe: one JSON object per line."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, event: str, **fields) -> None:
        data = (json.dumps({"event": event, **fields}) + "\n").encode()
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # the rank is gone; PR_SET_PDEATHSIG ends us

    def error(self, message: str) -> None:
        self.send("error", message=message)


class Child:
    """The rank's handle on one role process."""

    def __init__(self, role: str, pid: int, fd: int, label: str):
        self.role = role
        self.pid = pid
        self.fd = fd
        self.label = label  # e.g. "worker 3-1", for messages
        self.status: int | None = None  # exit status once reaped
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self.status is None

    def read_events(self) -> list[dict]:
        """Events the child wrote so far (call when select says the pipe is readable)."""
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.close_pipe()
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
        return events

    def close_pipe(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reap(self) -> bool:
        """Collect the exit status if the child ended; True if it did now."""
        if self.status is not None:
            return False
        try:
            pid, raw = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.status = 255
            return True
        if pid == 0:
            return False
        self.status = os.waitstatus_to_exitcode(raw)
        if self.status < 0:
            self.status = 128 - self.status  # killed by signal N -> 128+N, as shells do
        return True

    def signal(self, signum: int) -> None:
        if self.alive:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass


def describe_status(status: int) -> str:
    """'exited with status 3' or 'was killed by signal 9 (SIGKILL)'."""
    if status > 128:
        try:
            name = signal.Signals(status - 128).name
            return f"was killed by signal {status - 128} ({name})"
        except ValueError:
            pass
    return f"exited with status {status}"


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the rank's shutdown still signals us
        pass
    if os.getppid() != parent:  # the rank died before prctl took effect
        os._exit(1)


def fork(role: str, label: str, body, *, returns: bool = False) -> Child | None:
    """Fork a role process running ``body(channel) -> exit status``.

    With ``returns=True`` the child returns ``None`` to the caller instead of exiting (used
    by ``initialize()``, whose client is the rest of the calling script); the parent gets
    the Child either way.
    """
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with MPI's threads
        pid = os.fork()
    if pid:
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        return Child(role, pid, read_fd, label)
    # --- in the child -----------------------------------------------------
    os.close(read_fd)
    # Our own process group: launchers clean up by killing the rank's group with SIGKILL,
    # which would skip the script's finally blocks; the rank forwards signals itself, and
    # PR_SET_PDEATHSIG sends SIGTERM if the rank dies first.
    os.setpgid(0, 0)
    _die_with_parent(parent)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
    channel = Channel(write_fd)
    if returns:
        os.set_inheritable(write_fd, False)
        return None
    status = 1
    try:
        status = body(channel)
    except SystemExit as e:
        status = exit_status(e)
    except BaseException as e:  # report instead of a traceback per rank
        channel.error(f"{type(e).__name__}: {e}")
    finally:
        _flush()
        os._exit(status if isinstance(status, int) else 1)


def exit_status(e: SystemExit) -> int:
    """The process status Python gives for ``SystemExit(e.code)``."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def exit_rank(status: int) -> None:
    """End a rank whose MPI is finalized: C ``exit()`` without the interpreter's teardown.

    ``os._exit`` skips the MPI library's own exit handlers and MPICH's launcher then takes
    the rank for dead and kills the others (status 9); the interpreter's teardown can free
    MPI objects after finalization. C ``exit()`` runs the library's handlers only.
    """
    _flush()
    try:
        import ctypes

        ctypes.CDLL(None).exit(status)
    finally:
        os._exit(status)
