"""``--protocol mpi``: the worker runs in the rank process itself, in a thread.

Worker-to-worker data goes over MPI point-to-point (``backend.py``), and only a process
that holds the job's MPI can do that; role processes never do (``process/zygote.py``). So with
``--protocol mpi`` the worker role of a rank is a thread of the rank, with its own event
loop, while the rank's supervisor keeps the main thread, its signals and its other roles
(the scheduler and the script stay processes of their own and talk TLS/TCP).

To the supervisor the thread looks like any role process (:class:`ThreadChild`): a pipe it
reads events from, an end with a status, and a "signal" that asks the worker to close. What
it gives up: a worker thread cannot be killed or restarted (the rank is the worker), so
``--worker-restarts`` does not apply, and one worker per rank (``--worker-processes 1``).

A worker that ends when nobody asked it to is a dead worker, and here it cannot come back:
the job fails (status 1, as for any failed worker) with one line saying which worker and
how, instead of a job that waits for ever once every worker closed itself. Asked to means
told by the supervisor, the scheduler or a client (``WorkerThread.asked_to_close``); a
worker that closes because its scheduler is gone is not counted (:data:`SCHEDULER_GONE`:
the scheduler's rank says what happened, or the job is ending). Two ways a task ends it:

* ``sys.exit(N)`` (``SystemExit``) in a task: ``distributed`` lets it through the worker's
  event loop, so the thread ends "failed";
* ``os._exit(N)`` in a task would end the rank's process, without MPI_Finalize: MPICH's
  ``mpiexec`` then kills every rank (status 9, "BAD TERMINATION"), Open MPI's reports N,
  and neither lets rank 0 say what happened. So once an in-rank worker runs, ``os._exit``
  (and ``posix._exit``, which is what ``client.submit(os._exit, 3)`` unpickles to) called
  by one of its tasks (or in its event loop: ``client.run``) tells the supervisor instead,
  and that thread waits for the rank's end, never returning, as ``os._exit`` never does.
  The rank then ends like any rank whose worker failed, with the same status under both
  MPIs. Called anywhere else (the rank's main thread, a forked child) it is the real one.
  Not caught: a C ``exit()`` (a Fortran ``STOP``) in a task, and ``os._exit`` from a
  thread that a task started itself; they still end the rank.
"""
from __future__ import annotations

import operator
import os
import signal
import threading

from dask_mpi_launch.base.messages import WorkerSpec, event_line
from dask_mpi_launch.process.children import Child
from dask_mpi_launch.base.status import Ended

START_TIMEOUT = 120.0
# a worker's own reasons to close when its scheduler is gone or closing: no death of its
# own (the scheduler's rank says what happened, or the job is ending anyway)
SCHEDULER_GONE = {"worker-handle-scheduler-connection-broken", "worker-heartbeat-missing",
                  "worker-heartbeat-error"}
NO_RESTART = ("with --protocol mpi the worker is its rank's own process, so it cannot be "
              "restarted (let the task raise an exception instead)")


class ThreadChild(Child):
    """A worker in a thread of this rank, seen as a role process."""

    announces_leaving = False  # its end status is the thread's own: 0 once closed

    def __init__(self, label: str, spec: dict, handle, fd: int):
        super().__init__("worker", label, -1, fd, spec)
        self.handle = handle
        self.done: Ended | None = None
        self.write_fd: int | None = None  # the pipe's end the worker's side tells through
        self.told_end = False  # why the worker ended was said (once)
        self._lock = threading.Lock()

    def tell(self, event: str, **fields) -> None:
        """One event to the supervisor, from any thread (no-op once the pipe is closed)."""
        with self._lock:
            if self.write_fd is None:
                return
            try:
                os.write(self.write_fd, event_line(event, **fields))
            except OSError:
                pass

    def close_write(self) -> None:
        with self._lock:
            if self.write_fd is not None:
                os.close(self.write_fd)
                self.write_fd = None

    def died(self, how: str, status: int = 1) -> None:
        """The worker ended when nobody asked it to: say so once, then it has ended."""
        with self._lock:
            first, self.told_end = not self.told_end, True
        if first:
            self.tell("error", message=f"{self.label}: {how}; {NO_RESTART}")
            self.done = self.done or Ended(exited=status)

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
        if not isinstance(spec, WorkerSpec):
            return self.base.start(role, label, spec, stdin=stdin, returns=returns)
        from dask_mpi_launch.dataplane import backend
        from dask_mpi_launch.roles.run import _quiet
        from dask_mpi_launch.security.credentials import security_from

        s = spec.settings
        from dask_mpi_launch.tuning.idle import apply_hpc_defaults

        _quiet(s.log_level)  # as in a worker process: this rank is one now
        apply_hpc_defaults()
        if spec.dask_config:
            import dask.config

            dask.config.set(spec.dask_config)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        handle = backend.start_worker_thread(
            self.comm, spec.address, name=spec.name, nthreads=spec.nthreads,
            memory_limit=spec.memory_limit,
            security=security_from(spec.credentials), interface=s.interface,
            worker_options={"local_directory": s.local_directory, **s.worker_options})
        child = ThreadChild(label, spec, handle, read_fd)
        child.write_fd = write_fd
        _guard_exit(child)
        threading.Thread(target=_watch, args=(child,), daemon=True,
                         name=f"dask-mpi-launch-{label}").start()
        return child

    def check(self, what, value):
        return self.base.check(what, value)

    def close(self) -> None:
        from dask_mpi_launch.dataplane import backend

        backend.shutdown()
        self.base.close()


def _watch(child: ThreadChild) -> None:
    """Tell the supervisor, through the pipe, that the worker started (or why not), then
    how it ended."""
    handle = child.handle
    try:
        address = handle.wait_started(timeout=START_TIMEOUT)
    except Exception as e:
        child.tell("error", message=f"the worker could not start: {type(e).__name__}: {e}")
    else:
        from dask_mpi_launch.roles.run import _quiet_heartbeat_at_close

        _quiet_heartbeat_at_close(handle.worker)  # as a worker process does
        child.tell("ready", name=str(child.spec.name), address=address)
    handle.join(None)
    if handle.address is not None and not handle.asked_to_close:
        if handle.status == "failed":
            child.died(_how(handle.error))
        elif handle.close_reason not in SCHEDULER_GONE:  # closed itself: client.run, ...
            child.died(f"the worker closed itself ({handle.close_reason})")
    child.done = child.done or Ended(exited=0 if handle.status == "closed" else 1)
    child.close_write()


def _how(error: BaseException | None) -> str:
    """What ended a worker thread, in the user's terms."""
    if isinstance(error, SystemExit):
        code = "" if error.code is None else repr(error.code)
        return f"a task called sys.exit({code}), which ended the worker"
    if isinstance(error, KeyboardInterrupt):
        return "a task raised KeyboardInterrupt, which ended the worker"
    return f"the worker failed: {type(error).__name__}: {error}"


_GUARDED: dict = {}  # the rank's pid -> the in-rank worker whose rank os._exit would end


def _guard_exit(child: ThreadChild) -> None:
    """Catch ``os._exit`` from a task while ``child`` runs in this rank (module docstring)."""
    import posix

    pid = os.getpid()
    first = not _GUARDED
    _GUARDED[pid] = child
    if not first:
        return
    real = posix._exit

    def _exit(status):
        n = operator.index(status)  # what the real one refuses, refused the same way
        child = _GUARDED.get(os.getpid())
        if child is None or not _in_worker(child.handle):
            real(n)
        child.died(f"a task called os._exit({n}), which would have ended the rank", 1)
        threading.Event().wait()  # until the rank ends: os._exit never returns

    _exit.__doc__ = real.__doc__
    os._exit = posix._exit = _exit


def _in_worker(handle) -> bool:
    """True in the worker's own thread (its event loop: ``client.run``, async tasks) and
    in a thread running one of its tasks; never in the rank's main thread, nor in threads
    of the script's when it runs in this process (``initialize()``)."""
    if threading.current_thread() is handle.thread:
        return True
    try:
        from distributed.worker import get_worker

        return get_worker() is handle.worker
    except Exception:  # not in a task
        return False
