"""A ``distributed.Worker`` in a thread of this rank, on the ``mpi`` protocol.

With ``--protocol mpi`` every worker runs *inside* its MPI rank process, in a thread of its
own with its own asyncio loop (forked role processes cannot call MPI). This module starts
that thread (:func:`start_worker_thread`, which also joins the data plane) and gives the
rank's supervisor a :class:`WorkerThread` handle on it. The supervisor reaches these names
through :mod:`dask_mpi_launch.dataplane.backend`, whose import registers ``mpi://`` with
distributed.

API for the rank's supervisor
-----------------------------
MPI must be initialized with ``MPI_THREAD_MULTIPLE`` (mpi4py's default request; both wheels
provide it). Create the data-plane communicator collectively, e.g. ``dp =
MPI.COMM_WORLD.Dup()`` on every rank (or a ``Split`` of the worker ranks), then on each worker
rank::

    from dask_mpi_launch.dataplane import backend
    handle = backend.start_worker_thread(
        dp, scheduler_address, name=name, nthreads=2, memory_limit="auto",
        security=security,            # distributed.Security of the job (TLS door), or None
        host="10.0.0.5",              # or interface="ib0"; the fallback TCP/TLS listener's host
        worker_options={...},         # any further distributed.Worker keyword arguments
    )
    handle.wait_started(timeout=60)   # -> the worker's address; raises if it failed to start
    ...
    handle.stop()                     # ask the worker to close (thread-safe, returns at once)
    handle.join(timeout=30)           # True when the thread has ended
    handle.status                     # "starting", "running", "closed" or "failed"
    handle.error                      # the exception when "failed", else None
    handle.asked_to_close             # True when stop(), the scheduler or a client closed it
    backend.shutdown()                # stop the progress thread; before MPI_Finalize

The worker thread ends when the worker closes (scheduler shutdown, ``handle.stop()``, or a
fatal error). A worker in the rank cannot be restarted when it dies: the rank is the worker.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from dask_mpi_launch.dataplane.engine import _post, join

logger = logging.getLogger(__name__)


class WorkerThread:
    """Handle on a ``distributed.Worker`` running in a thread of this process."""

    def __init__(self, scheduler_address, kwargs):
        self.status = "starting"
        self.error: BaseException | None = None
        self.address: str | None = None
        self.worker = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._stop_asked = False
        self.closing = False  # told to close by the scheduler or a client
        self.close_reason: str | None = None  # the first reason its close was called with
        self._args = (scheduler_address, kwargs)
        self.thread = threading.Thread(target=self._run, name="dask-mpi-worker", daemon=True)

    def _run(self):
        try:
            asyncio.run(self._main())
            if self.status != "failed":
                self.status = "closed"
        except BaseException as e:  # noqa: BLE001 - reported through the handle
            self.error, self.status = e, "failed"
            logger.debug("worker in the rank failed: %r", e)  # the caller says it
        finally:
            self._started.set()

    async def _main(self):
        from distributed import Worker

        scheduler_address, kwargs = self._args
        self.loop = asyncio.get_running_loop()
        worker = Worker(scheduler_address, **kwargs)
        self.worker = worker
        self._note_close_requests(worker)
        await worker
        self.address = worker.address
        self.status = "running"
        self._started.set()
        if self._stop_asked:
            await worker.close()
        await worker.finished()

    @property
    def asked_to_close(self) -> bool:
        """True when :meth:`stop`, the scheduler or a client told the worker to close: its
        end (or a failure during that close) is then no death."""
        return self._stop_asked or self.closing

    def _note_close_requests(self, worker) -> None:
        """Set :attr:`closing` when the scheduler (or a client) tells the worker to close,
        and :attr:`close_reason` when anything closes it (the worker's own calls go
        through the instance's ``close``)."""
        def noting(close):
            async def handler(*args, **kwargs):  # a coroutine function, as Worker.close:
                self.closing = True  # distributed awaits handlers that are
                return await close(*args, **kwargs)
            return handler

        for table, op in ((worker.stream_handlers, "close"), (worker.handlers, "terminate")):
            if op in table:
                table[op] = noting(table[op])
        close = worker.close

        async def recording(*args, **kwargs):
            if self.close_reason is None:
                self.close_reason = str(kwargs.get("reason", "worker-close"))
            return await close(*args, **kwargs)

        worker.close = recording

    def wait_started(self, timeout: float | None = None) -> str:
        """The worker's address once it runs; raises its error, or TimeoutError."""
        if not self._started.wait(timeout):
            raise TimeoutError(f"the worker did not start within {timeout} s")
        if self.error is not None:
            raise self.error
        if self.address is None:
            raise RuntimeError("the worker closed before it started")
        return self.address

    def stop(self) -> None:
        """Ask the worker to close; returns at once (thread-safe, idempotent)."""
        self._stop_asked = True
        loop, worker = self.loop, self.worker
        if loop is not None and worker is not None and not loop.is_closed():
            _post(loop, lambda: asyncio.ensure_future(worker.close()))  # (closed: nothing)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it has."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def is_alive(self) -> bool:
        return self.thread.is_alive()


def start_worker_thread(comm, scheduler_address: str, *, name=None, nthreads: int = 1,
                        memory_limit="auto", security=None, host: str | None = None,
                        interface: str | None = None, worker_options: dict | None = None,
                        stall_timeout: float | None = None) -> WorkerThread:
    """Join the data plane on ``comm`` and start a Worker over ``mpi`` in a new thread.

    ``comm`` is a communicator reserved for the data plane (e.g. ``MPI.COMM_WORLD.Dup()``,
    created collectively by the caller); worker addresses carry ranks of ``comm``.
    ``security``: the job's ``distributed.Security`` (its TLS, if any, guards the TCP/TLS door
    of the worker's listener and its connections to the scheduler). ``host``/``interface``:
    where that door listens. ``worker_options``: further ``distributed.Worker`` arguments.
    """
    join(comm, stall_timeout, job=scheduler_address)
    kwargs = dict(worker_options or {})
    kwargs.update(name=name, nthreads=nthreads, memory_limit=memory_limit, protocol="mpi")
    if security is not None:
        kwargs["security"] = security
    if host is not None:
        kwargs["host"] = host
    if interface is not None:
        kwargs["interface"] = interface
    handle = WorkerThread(scheduler_address, kwargs)
    handle.thread.start()
    return handle
