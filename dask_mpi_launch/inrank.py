"""``--protocol mpi``: the worker runs in the rank process itself, in a thread.

Worker-to-worker data goes over MPI point-to-point (``mpicomm.py``), and only a process
that holds the job's MPI can do that; role processes never do (``zygote.py``). So with
``--protocol mpi`` the worker role of a rank is a thread of the rank, with its own event
loop, while the rank's supervisor keeps the main thread, its signals and its other roles
(the scheduler and the script stay processes of their own and talk TLS/TCP).

To the supervisor the thread looks like any role process (:class:`ThreadChild`): a pipe it
reads events from, an end with a status, and a "signal" that asks the worker to close. What
it gives up: a worker thread cannot be killed or restarted (the rank is the worker), so
``--worker-restarts`` does not apply, and one worker per rank (``--worker-processes 1``).
"""
from __future__ import annotations

import json
import os
import signal
import threading

from .children import Child
from .status import Ended

START_TIMEOUT = 120.0


class ThreadChild(Child):
    """A worker in a thread of this rank, seen as a role process."""

    announces_leaving = False  # its end status is the thread's own: 0 once closed

    def __init__(self, label: str, spec: dict, handle, fd: int):
        super().__init__("worker", label, -1, fd, spec)
        self.handle = handle
        self.done: Ended | None = None

    def reap(self) -> bool:
        if self.ended is None and self.done is not None:
            self.ended = self.done
            return True
        return False

    def signal(self, signum: int) -> None:
        if self.ended is not None:
            return
        self.handle.stop()
        if signum == signal.SIGKILL:  # a thread cannot be killed: the rank ends with it
            self.done = self.done or Ended(signal=signal.SIGKILL)


class InRankLauncher:
    """Starts workers as threads of this rank; every other role through ``base``."""

    def __init__(self, base, comm):
        self.base = base
        self.comm = comm  # the data plane's communicator (collectively made)

    def start(self, role, label, spec, *, stdin=None, returns=False):
        if spec.get("run") != "worker":
            return self.base.start(role, label, spec, stdin=stdin, returns=returns)
        from . import mpicomm
        from .roles import _quiet
        from .security import security_from

        s = spec["settings"]
        from .tuning import apply_hpc_defaults

        _quiet(s.log_level)  # as in a worker process: this rank is one now
        apply_hpc_defaults()
        if spec.get("dask_config"):
            import dask.config

            dask.config.set(spec["dask_config"])
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        handle = mpicomm.start_worker_thread(
            self.comm, spec["address"], name=spec["name"], nthreads=spec["nthreads"],
            memory_limit=spec["memory_limit"],
            security=security_from(spec.get("credentials")), interface=s.interface,
            worker_options={"local_directory": s.local_directory, **s.worker_options})
        child = ThreadChild(label, spec, handle, read_fd)
        threading.Thread(target=_watch, args=(child, write_fd), daemon=True,
                         name=f"dask-mpi-launch-{label}").start()
        return child

    def check(self, what, value):
        return self.base.check(what, value)

    def close(self) -> None:
        from . import mpicomm

        mpicomm.shutdown()
        self.base.close()


def _watch(child: ThreadChild, fd: int) -> None:
    """Tell the supervisor, through the pipe, that the worker started (or why not), then
    how it ended."""
    def send(event, **fields):
        try:
            os.write(fd, (json.dumps({"event": event, **fields}) + "\n").encode())
        except OSError:
            pass

    handle = child.handle
    try:
        address = handle.wait_started(timeout=START_TIMEOUT)
    except Exception as e:
        send("error", message=f"the worker could not start: {type(e).__name__}: {e}")
    else:
        from .roles import _quiet_heartbeat_at_close

        _quiet_heartbeat_at_close(handle.worker)  # as a worker process does
        send("ready", name=str(child.spec["name"]), address=address)
    handle.join(None)
    child.done = child.done or Ended(exited=0 if handle.status == "closed" else 1)
    os.close(fd)
