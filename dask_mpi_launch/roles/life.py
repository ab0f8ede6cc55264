"""How a role process lives and ends, seen from inside it: its channel to the rank, its
title, running its body and ending as ``python script.py`` ends.

The rank's side of the same processes (starting, signalling, reaping them) is
``process/children.py``; this half is what the roles themselves use, so it lives with
them, below the process tree (a role never imports the supervisor that started it).
"""
from __future__ import annotations

import os
import signal
import sys

from dask_mpi_launch.base.messages import event_line
from dask_mpi_launch.base.status import exit_status

#: ``initialize()`` joined the layout in this process: the client's answer, kept for a
#: second call (which never starts a second layout, nor MPI in a role process)
JOINED: dict = {}


#: the close reason our scheduler gives a worker without a nanny in ``client.restart()``:
#: its rank starts it again (the nanny's part; scheduler_ext.Scheduler.restart_workers)
RESTART_REASON = "dask-mpi-launch-restart"


class BecomeClient(BaseException):
    """Raised in the client process of ``initialize()`` to unwind into the calling script."""

    def __init__(self, address: str, credentials: dict | None):
        super().__init__(address)
        self.address = address
        self.credentials = credentials


class Channel:
    """The role's end of the pipe: one JSON object per line."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, event: str, **fields) -> None:
        data = event_line(event, **fields)
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # the rank is gone; PR_SET_PDEATHSIG ends us

    def error(self, message: str) -> None:
        self.send("error", message=message)


def set_title(name: str) -> None:
    """Name this process in ps/top (``dml-scheduler``, ``dml-worker``...; PR_SET_NAME)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)
    except Exception:
        pass


def run_body(body, channel: Channel, spec=None) -> None:
    """Run a role's body and end the process with its status (never returns), as
    ``python script.py`` ends (:func:`end_as_python_would`): the scheduler's and the
    workers' ending is bounded by the shutdown grace, the script's is not (as under
    ``python``, its non-daemon threads are waited for); the scheduler runs no user code,
    so its (large) heap is not searched for open files."""
    from dask_mpi_launch.roles.record_output import tee

    tee(getattr(spec, "log", None))  # --record: its output copied to its log too
    runs = getattr(spec, "runs", None)  # a RoleSpec (base/messages.py), or None
    bound = None if runs in ("script", "jupyter") else getattr(
        getattr(spec, "settings", None), "shutdown_timeout", None)
    status = 1
    try:
        import atexit

        atexit._clear()  # the forking process's handlers are its own (the rank's: MPI's)
        status = body(channel)
    except SystemExit as e:
        status = exit_status(e)
    except BaseException as e:  # one line to the rank instead of a traceback per rank
        channel.error(f"{type(e).__name__}: {e}")
    finally:
        end_as_python_would(status if isinstance(status, int) else 1, bound,
                            files=runs != "scheduler")


#: set once a role's body is done and its process ends (a signal then only bounds it)
ENDING = [False]


def end_as_python_would(status: int, bound: float | None = None, files: bool = True) -> None:
    """End this forked process as the interpreter ends ``python script.py``, then exit
    with ``status`` (never returns).

    A role process is a fork of the zygote deep in its stack, so it cannot return to the
    interpreter's own exit; ``os._exit`` alone lost a non-daemon thread's work, pending
    ``ThreadPoolExecutor`` work, an unclosed file's buffered bytes and C ``printf`` output
    (issue 21). So, in Python's order: non-daemon threads are joined (and
    ``concurrent.futures``' exit hooks run, ``threading._shutdown``), the ``atexit``
    handlers run, unreachable objects are collected (their finalizers run: a file left
    open is closed), every file object still open is flushed, then C stdio; only then
    ``os._exit``, which skips what a fork must not run twice (the zygote's own exit).
    A signal during this still ends the process (SIGTERM's handler bounds it)."""
    ENDING[0] = True
    if bound is not None:
        signal.alarm(max(1, int(bound + 0.999)))  # SIGALRM's default action ends us
    flush()
    try:
        import threading

        threading._shutdown()
    except BaseException:
        pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    if files:
        _close_files()
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass
    os._exit(status)


def _close_files() -> None:
    """Flush every file object still open, as Python's teardown would: ``python`` clears
    ``__main__``'s globals, so a file left open there is closed (text layer first, then its
    buffer). Here the script's globals may sit in a reference cycle (a function defined in
    the script refers to them), where the collector finalizes the raw file before its
    buffer and the buffered bytes are lost: so every writable file is flushed first, text
    files then buffered ones, before anything is collected."""
    try:
        import gc
        import io

        gc.unfreeze()  # objects made since a gc.freeze() sit in its permanent generation
        streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
        objects = gc.get_objects()
        for kind in (io.TextIOBase, io.BufferedIOBase):
            # type(), not isinstance(): a proxy's __class__ may raise
            for obj in objects:
                if issubclass(type(obj), kind) and id(obj) not in streams:
                    try:
                        if not obj.closed and obj.writable():
                            obj.flush()
                    except Exception:
                        pass
        del objects
        gc.collect()
    except BaseException:
        pass
    flush()


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass

