"""The data plane's progress engine: one thread per process that tests its MPI requests.

Only bulk frames travel over MPI (small messages and every announcement go on the peers'
ordinary TCP/TLS connection, whose socket wakes the event loop at once: see
:mod:`~dask_mpi_launch.dataplane.connections`). The event loop that writes or reads a message
posts its ``Isend``/``Irecv`` calls itself (MPI_THREAD_MULTIPLE allows it; no hand-off), and
hands the requests to this thread, which tests them until they complete and then resolves the
loop's future. So MPI needs progress only while a bulk transfer is in flight: with nothing in
flight the thread waits on an event and makes no MPI call at all (an idle rank polls nothing;
the previous design probed every 10 ms, 1-2% of a core). While a transfer runs it keeps
calling MPI (yielding the core between tests, for the peer on a crowded node), so the library
moves the bytes.

:func:`join` makes the process's one engine, :func:`engine` returns it, :func:`shutdown`
stops it.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import threading
import time

import dask
from dask.utils import parse_timedelta
from distributed.comm.core import CommClosedError

from dask_mpi_launch.dataplane.wire import BULK_TAG_BASE, CHUNK, chunk_spans, transfer_deadline

logger = logging.getLogger(__name__)

BUSY_MAX_SLEEP = 0.001  # s: longest pause between tests of a transfer past its spin time
SPIN_RATE = 5e8  # bytes/s: the thread spins while transfers may still run at this rate


def _post(loop, callback, *args) -> None:
    """Run ``callback`` in ``loop``'s thread; nothing when that loop has closed already."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # "Event loop is closed"
        pass


def _resolve(fut, value):
    if not fut.done():
        fut.set_result(value)


def _fail(fut, exc):
    if not fut.done():
        fut.set_exception(exc)


class _Op:
    """MPI requests of one message's bulk frames, the future that waits for them, and the
    buffers they use (kept alive until MPI lets go of them)."""

    __slots__ = ("reqs", "fut", "loop", "nbytes", "deadline", "keep", "sending", "tag")

    def __init__(self, reqs, fut, loop, nbytes, deadline, keep, sending, tag):
        self.reqs, self.fut, self.loop, self.nbytes = reqs, fut, loop, nbytes
        self.deadline, self.keep, self.sending, self.tag = deadline, keep, sending, tag


class Engine:
    """Owns the data-plane communicator; its thread tests every bulk request in flight."""

    def __init__(self, comm, stall_timeout: float | None = None, chunk: int = CHUNK,
                 job: str = ""):
        from mpi4py import MPI

        self.MPI = MPI
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(
                "the mpi protocol needs MPI initialized with MPI_THREAD_MULTIPLE "
                f"(this MPI gave level {MPI.Query_thread()}); leave mpi4py.rc.thread_level "
                "at its default 'multiple'")
        self.comm = comm
        self.pid = os.getpid()
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.job = job  # peers of one job announce the same (the scheduler's address)
        self.tag_ub = int(comm.Get_attr(MPI.TAG_UB) or 32767)
        if stall_timeout is None:
            stall_timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp"),
                                            default="seconds")
        self.stall = float(stall_timeout)
        self.chunk = int(chunk)
        self.stats = {"sent_bytes": 0, "received_bytes": 0, "sent_messages": 0,
                      "received_messages": 0}
        self.spin_until = 0.0  # test without pause until then (transfers expected to run)
        self.cpu_seconds = 0.0  # CPU time of the progress thread, updated when it idles
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.ops: list[_Op] = []
        self.posted: collections.deque = collections.deque()  # ops posted by event loops
        self._next_tag = BULK_TAG_BASE
        self._busy_tags: set[int] = set()  # tags of this process's sends in flight
        self.stopping = False
        self.drain_until: float | None = None
        self.thread = threading.Thread(target=self._run, name="dask-mpi-progress", daemon=True)
        self.thread.start()

    # called in an event loop's thread
    def new_tag(self) -> int:
        """A tag for one message's bulk frames, unused by this process's sends in flight
        (the receiver matches on source and tag, so tags need only be unique per sender)."""
        with self.lock:
            for _ in range(self.tag_ub - BULK_TAG_BASE + 1):
                tag = self._next_tag
                self._next_tag = tag + 1 if tag < self.tag_ub else BULK_TAG_BASE
                if tag not in self._busy_tags:
                    self._busy_tags.add(tag)
                    return tag
        raise CommClosedError("no free MPI tags")

    def send(self, peer: int, tag: int, big) -> asyncio.Future:
        """Post the ``Isend`` calls of a message's bulk frames ``[(index, memoryview)]`` to
        ``peer`` on ``tag``; a future that ends with the bytes sent."""
        return self._post(peer, tag, [v for _, v in big], sending=True)

    def receive(self, peer: int, tag: int, buffers) -> asyncio.Future:
        """Post the ``Irecv`` calls of a message's bulk frames into ``buffers`` (fresh
        memory, which becomes the frames); a future that ends with the bytes received."""
        return self._post(peer, tag, buffers, sending=False)

    def _post(self, peer, tag, buffers, sending) -> asyncio.Future:
        if self.stopping:
            raise CommClosedError("the MPI data plane is shut down")
        MPI = self.MPI
        call = self.comm.Isend if sending else self.comm.Irecv
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        reqs, nbytes = [], 0
        try:
            for buf in buffers:
                nbytes += buf.nbytes
                for a, b in chunk_spans(buf.nbytes, self.chunk):
                    reqs.append(call([buf[a:b], MPI.BYTE], peer, tag))
        except MPI.Exception as e:
            fut.set_exception(CommClosedError(f"MPI error: {e}"))
            deadline = None  # what was posted stays until it ends
        else:
            deadline = time.monotonic() + transfer_deadline(nbytes, self.stall)
            self.spin_until = max(self.spin_until,
                                  time.monotonic() + 0.05 + nbytes / SPIN_RATE)
        self.posted.append(_Op(reqs, fut, loop, nbytes, deadline, buffers, sending, tag))
        self.wake.set()
        return fut

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is in flight (up to half the timeout), then stop."""
        if threading.current_thread() is self.thread:
            self.stopping = True
            return
        self.drain_until = time.monotonic() + timeout / 2
        self.wake.set()
        self.thread.join(timeout / 2 + 0.5)
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout / 2)

    # the progress thread
    def _run(self) -> None:
        """Wait (no MPI call) while nothing is in flight; else test the requests in flight
        and pause as they ask."""
        sleep = 0.0
        while not self.stopping:
            self.wake.clear()  # (an op posted after this sets it again: no lost wake-up)
            while self.posted:
                self.ops.append(self.posted.popleft())
            if not self.ops:
                if self.drain_until is not None:
                    break
                self.cpu_seconds = time.thread_time()
                self.wake.wait()
                continue
            try:
                busy = self._test_ops()
            except Exception:  # noqa: BLE001 - keep the engine alive
                logger.exception("MPI data plane: progress failed")
                busy = False
            if self.drain_until is not None and time.monotonic() > self.drain_until:
                break
            sleep = self._pause(busy, sleep)

    def _pause(self, busy: bool, sleep: float) -> float:
        """After a pass: go on at once, yield, or back off gently; the new sleep."""
        if busy or self.posted:
            return 0.0
        if time.monotonic() < self.spin_until:
            # transfers in flight: keep calling MPI so the library moves the bytes, but
            # let a process waiting for this core (the peer, on a crowded node) run
            os.sched_yield()
            return sleep
        sleep = min(max(sleep * 2, 20e-6), BUSY_MAX_SLEEP)  # something slow or stuck
        self.wake.wait(sleep)
        return sleep

    def _test_ops(self) -> bool:
        """Test every op in flight; whether any ended."""
        now = time.monotonic()
        keep, changed = [], False
        for op in self.ops:
            try:
                finished = self.MPI.Request.Testall(op.reqs)
            except self.MPI.Exception as e:
                changed = True
                self._end(op, CommClosedError(f"MPI error: {e}"))
                continue
            if finished:
                changed = True
                self._end(op, None)
            elif op.deadline is not None and now > op.deadline:
                changed = True
                self._stalled(op)
                keep.append(op)  # buffers stay alive until MPI lets go of them
            else:
                keep.append(op)
        self.ops = keep
        return changed

    def _stalled(self, op: _Op) -> None:
        """Cancel a stalled op's receives (sends stay until they end) and fail its future."""
        for r in op.reqs:
            try:
                if not op.sending and r != self.MPI.REQUEST_NULL:
                    r.Cancel()
            except self.MPI.Exception:
                pass
        op.deadline = None
        _post(op.loop, _fail, op.fut, CommClosedError("MPI transfer stalled"))

    def _end(self, op: _Op, error) -> None:
        if op.sending:
            with self.lock:
                self._busy_tags.discard(op.tag)
        if error is not None:
            _post(op.loop, _fail, op.fut, error)
            return
        side = "sent" if op.sending else "received"
        self.stats[side + "_bytes"] += op.nbytes
        self.stats[side + "_messages"] += 1
        _post(op.loop, _resolve, op.fut, op.nbytes)


_ENGINE: Engine | None = None
_ENGINE_LOCK = threading.Lock()


def join(comm, stall_timeout: float | None = None, chunk: int = CHUNK, job: str = "") -> Engine:
    """Make this process a data-plane peer on ``comm`` (idempotent for the same comm).
    ``job`` names the job (the scheduler's address): two processes use MPI between them
    only when they announce the same."""
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is not None and not _ENGINE.stopping:
            if _ENGINE.comm != comm:
                raise RuntimeError("this process already joined an MPI data plane")
            _ENGINE.job = _ENGINE.job or job
            return _ENGINE
        _ENGINE = Engine(comm, stall_timeout, chunk, job)
        atexit.register(shutdown)
        return _ENGINE


def engine() -> Engine | None:
    """The process's data-plane engine, or None when this process is not a peer."""
    e = _ENGINE
    if e is None or e.stopping or e.pid != os.getpid():  # a forked child is not a peer
        return None
    return e


def shutdown(timeout: float = 5.0) -> None:
    """Stop the progress thread (call before MPI_Finalize; idempotent)."""
    global _ENGINE
    with _ENGINE_LOCK:
        e, _ENGINE = _ENGINE, None
    if e is not None:
        e.stop(timeout)
